"""OpenTelemetry tracing of the message path: one message, its span tree and attributes (in-memory exporter),
the trace id in its row, the webhook's traceparent (a real HTTP receiver), and nothing at all when tracing is off."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from sqapi import tracing
from sqapi.api.app import create_app
from sqapi.api.openapi import SCHEMAS
from sqapi.app import Sqapi, build
from sqapi.cli import main
from sqapi.config import Config
from sqapi.core.outcome import Delivery
from sqapi.errors import ConfigError
from tests.plugins.conftest import PLUGINS, webhook_settings
from tests.plugins.receiver import WebhookReceiver

PUBLISHER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PUBLISHER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{PUBLISHER_TRACE}-{PUBLISHER_SPAN}-01"

COUNTER = """
def execute(config, database, message, metadata, data):
    return {"seen": data.read().decode()}
"""

FAILING = """
def execute(config, database, message, metadata, data):
    raise RuntimeError("broken on purpose")
"""


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver().start()
    yield server
    server.stop()


@pytest.fixture
def traced_app(make_config: Callable[..., Config], spans: tuple[TracerProvider, InMemorySpanExporter]) \
        -> Iterator[Callable[..., Sqapi]]:
    built: list[Sqapi] = []

    def make(overrides: dict[str, Any], traced: bool = True) -> Sqapi:
        app = build(make_config(overrides), tracer_provider=spans[0] if traced else None)
        built.append(app)
        return app

    yield make
    for app in built:
        app.close()


def webhook_in_worker_processes(workdir: Path) -> None:
    """The built-in webhook as a folder of the user's (which wins), its calls in worker processes."""
    folder = workdir / "plugins" / "webhook"
    shutil.copytree(PLUGINS / "webhook", folder, ignore=shutil.ignore_patterns("__pycache__"))
    config = yaml.safe_load((folder / "config.yml").read_text())
    config["plugin"].pop("thread_safe", None)
    config["plugin"]["isolation"] = "process"
    (folder / "config.yml").write_text(yaml.safe_dump(config))


def body(uuid: str, location: str, **extra: Any) -> bytes:
    return json.dumps({"uuid_ref": uuid, "data_location": location, **extra}).encode()


def by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in finished:
        found.setdefault(span.name, []).append(span)
    return found


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_one_message_gives_a_process_span_linked_to_the_publisher_with_plugin_fetch_and_status_children(
        isolation: str, traced_app: Callable[..., Sqapi], spans: tuple[TracerProvider, InMemorySpanExporter],
        write_plugin: Callable[..., Path], write_data: Callable[[str, str], str], receiver: WebhookReceiver,
        workdir: Path) -> None:
    write_plugin("alpha", COUNTER)
    write_plugin("beta", COUNTER)
    if isolation == "process":
        webhook_in_worker_processes(workdir)
    location = write_data("hello.txt", "hello\n")
    write_data("hello.meta.json", json.dumps({"owner": "ann"}))
    app = traced_app({"active_plugins": ["alpha", "beta", "webhook"],
                      "custom": {"webhook": webhook_settings(receiver)}})
    assert app.plugins.plugins["webhook"].isolation == isolation

    outcome = app.process(body("u-1", location, meta_location="hello.meta.json"),
                          Delivery("sqapi#u-1", trace_context={"traceparent": TRACEPARENT}))

    assert outcome.status == "DONE", outcome.reason
    named = by_name(spans[1].get_finished_spans())
    [process] = named.pop(next(name for name in named if name.startswith("process ")))
    # the process span: a consumer span of the messaging conventions, in the publisher's trace, linked to it
    assert process.kind is SpanKind.CONSUMER
    assert format_trace_id(process.context.trace_id) == PUBLISHER_TRACE
    assert process.parent is not None and format_span_id(process.parent.span_id) == PUBLISHER_SPAN
    assert [format_span_id(link.context.span_id) for link in process.links] == [PUBLISHER_SPAN]
    attributes = dict(process.attributes or {})
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.operation.name"] == "process"
    assert attributes["messaging.system"] == "directory"  # the embedded default's listener type
    assert attributes["messaging.destination.name"] == process.name.removeprefix("process ")
    assert attributes["messaging.message.id"] == "u-1"
    assert attributes["sqapi.message.status"] == "DONE"
    assert process.status.status_code is not StatusCode.ERROR
    # every other span is its child, in this order
    children = sorted((s for group in named.values() for s in group), key=lambda s: s.start_time or 0)
    assert all(s.parent is not None and s.parent.span_id == process.context.span_id for s in children)
    assert [s.name for s in children] == ["status QUERYING", "fetch data", "fetch metadata", "plugin alpha",
                                          "status PROCESSING", "plugin beta", "status PROCESSING",
                                          "plugin webhook", "status DONE"]
    plugin_spans = {s.name: dict(s.attributes or {}) for s in children if s.name.startswith("plugin ")}
    assert plugin_spans["plugin alpha"]["sqapi.plugin.name"] == "alpha"
    assert plugin_spans["plugin alpha"]["sqapi.plugin.status"] == "DONE"
    assert plugin_spans["plugin alpha"]["sqapi.plugin.attempt"] == 1
    # the trace id is in the message's row (GET /messages/<uuid>, sqapi status show it), and the webhook's
    # request carries the webhook span's traceparent
    row = app.database.get_message("u-1")
    assert row["trace_id"] == PUBLISHER_TRACE
    assert create_app(app).test_client().get("/messages/u-1").get_json()["trace_id"] == PUBLISHER_TRACE
    shown = CliRunner().invoke(main, ["status", "u-1"], catch_exceptions=False)
    assert re.search(rf"^trace_id +{PUBLISHER_TRACE}$", shown.output, re.MULTILINE), shown.output
    [webhook_span] = [s for s in children if s.name == "plugin webhook"]
    [got] = receiver.received
    assert got.headers["traceparent"] == \
        f"00-{PUBLISHER_TRACE}-{format_span_id(webhook_span.context.span_id)}-01"


def test_a_failing_plugin_marks_its_span_and_the_attempt_an_error_and_a_message_without_traceparent_starts_a_trace(
        traced_app: Callable[..., Sqapi], spans: tuple[TracerProvider, InMemorySpanExporter],
        write_plugin: Callable[..., Path], write_data: Callable[[str, str], str]) -> None:
    write_plugin("broken", FAILING)
    app = traced_app({"active_plugins": ["broken"]})

    outcome = app.process(body("u-2", write_data("a.txt", "a")), Delivery("d-2"))

    assert outcome.status == "RETRY"
    named = by_name(spans[1].get_finished_spans())
    [process] = [s for name, group in named.items() if name.startswith("process ") for s in group]
    assert process.parent is None and not process.links  # no publisher context: the root of a trace of its own
    assert process.status.status_code is StatusCode.ERROR
    [plugin] = named["plugin broken"]
    assert plugin.status.status_code is StatusCode.ERROR and "broken on purpose" in (plugin.status.description or "")
    assert dict(plugin.attributes or {})["sqapi.plugin.status"] == "FAILED"
    assert named["status RETRY"][0].parent.span_id == process.context.span_id  # type: ignore[union-attr]
    assert app.database.get_message("u-2")["trace_id"] == format_trace_id(process.context.trace_id)


def test_a_malformed_message_is_traced_and_its_row_holds_the_trace(
        traced_app: Callable[..., Sqapi], spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    app = traced_app({"active_plugins": []})

    outcome = app.process(json.dumps({"uuid_ref": "u-3"}).encode(), Delivery("d-3"))  # no data_location

    assert outcome.status == "FAILED"
    [process] = spans[1].get_finished_spans()
    assert process.status.status_code is StatusCode.ERROR
    assert app.database.get_message("u-3")["trace_id"] == format_trace_id(process.context.trace_id)


def test_tracing_off_makes_no_span_writes_null_and_sends_no_traceparent(
        traced_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[[str, str], str],
        receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    installed: list[Any] = []  # what tracing.install() made the process's global provider, during this test
    monkeypatch.setattr(tracing, "_installed", installed)
    made: list[Any] = []
    make_provider = tracing.make_provider

    def spy(config: Any, env: Any = None) -> Any:
        made.append(make_provider(config, env))
        return made[-1]

    monkeypatch.setattr(tracing, "make_provider", spy)
    write_plugin("alpha", COUNTER)
    app = traced_app({"active_plugins": ["alpha", "webhook"], "custom": {"webhook": webhook_settings(receiver)}},
                     traced=False)
    assert app.processor.tracing is None and app.tracer_provider is None

    outcome = app.process(body("u-4", write_data("b.txt", "b")),
                          Delivery("d-4", trace_context={"traceparent": TRACEPARENT}))

    assert outcome.status == "DONE"
    assert made == [None] and installed == []  # the app asked for a provider, was given none, installed none
    assert app.database.get_message("u-4")["trace_id"] is None
    [got] = receiver.received
    assert "traceparent" not in got.headers


def test_a_later_untraced_attempt_keeps_the_trace_id_of_the_one_before(
        traced_app: Callable[..., Sqapi], write_plugin: Callable[..., Path],
        write_data: Callable[[str, str], str]) -> None:
    write_plugin("alpha", COUNTER)
    location = write_data("c.txt", "c")
    traced = traced_app({"active_plugins": ["alpha"]})
    traced.process(body("u-5", location), Delivery("d-5", trace_context={"traceparent": TRACEPARENT}))
    traced.process(body("u-5", location), Delivery("d-6"))  # DONE already: no status written but the count
    assert traced.database.get_message("u-5")["trace_id"] == PUBLISHER_TRACE


# -- the column ------------------------------------------------------------------------------------
@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_a_messages_table_made_before_the_trace_id_column_gets_it(
        database: str, traced_app: Callable[..., Sqapi], write_plugin: Callable[..., Path],
        write_data: Callable[[str, str], str], workdir: Path) -> None:
    write_plugin("alpha", COUNTER)
    config: dict[str, Any] = {"active_plugins": ["alpha"]}
    if database == "sqlite":
        config["database"] = {"type": "sqlite", "path": str(workdir / "status.db")}
    app = traced_app(config)
    app.database.execute_query("ALTER TABLE messages DROP COLUMN trace_id")
    app.database.initialize_message_table()
    app.database.initialize_message_table()  # and again: adding it is idempotent

    app.process(body("old-1", write_data("old.txt", "x")), Delivery("d", trace_context={"traceparent": TRACEPARENT}))

    assert app.database.get_message("old-1")["trace_id"] == PUBLISHER_TRACE


def test_the_openapi_document_describes_trace_id() -> None:
    assert SCHEMAS["MessageRow"]["properties"]["trace_id"]["type"] == ["string", "null"]


# -- configuration ---------------------------------------------------------------------------------
def test_tracing_is_off_unless_configured() -> None:
    assert not tracing.enabled({}, env={})
    assert tracing.enabled({"tracing": {"enabled": True}}, env={})
    assert tracing.enabled({}, env={"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing.enabled({}, env={"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.enabled({"tracing": {"enabled": False}}, env={"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing.enabled({"tracing": {"enabled": True}}, env={"OTEL_SDK_DISABLED": "true"})
    assert tracing.make_provider({}, env={}) is None


def test_a_configured_provider_names_the_service_and_exports_with_the_chosen_exporter() -> None:
    provider = tracing.make_provider({"tracing": {"enabled": True, "exporter": "none", "service_name": "ingest"}},
                                     env={})
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "ingest"
    finally:
        provider.shutdown()
    provider = tracing.make_provider({"tracing": {"enabled": True, "exporter": "none"}}, env={})
    assert provider is not None and provider.resource.attributes["service.name"] == "sqapi"
    provider.shutdown()


@pytest.mark.parametrize(("section", "env", "key", "problem"), [
    ({"enabled": "yes"}, {}, "tracing.enabled", "must be true or false"),
    ({"enabled": True, "exporter": "jaeger"}, {}, "tracing.exporter", "unknown trace exporter 'jaeger'"),
    ({}, {"OTEL_TRACES_EXPORTER": "zipkin"}, "$OTEL_TRACES_EXPORTER", "unknown trace exporter 'zipkin'"),
    ({"enabled": True}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "$OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
])
def test_a_tracing_setting_sqapi_cannot_act_on_is_refused_naming_it(section: dict[str, Any], env: dict[str, str],
                                                                    key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        tracing.check({"tracing": section}, "sqapi.yml", env=env)
    assert caught.value.key == key and problem in str(caught.value)


def test_an_unknown_tracing_key_is_refused_with_a_suggestion(make_config: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config({"tracing": {"enabeld": True}})
    assert caught.value.key == "tracing.enabeld" and "did you mean 'enabled'" in str(caught.value)
