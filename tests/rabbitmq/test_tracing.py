"""Traces over the real broker: the ``traceparent`` a publisher puts in the AMQP headers (``sqapi publish``,
``POST /messages``, or sqapi's publishing helper) is continued by the loader's process span."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

from sqapi import tracing
from sqapi.api.app import create_app
from sqapi.app import Sqapi, build
from sqapi.cli import main
from sqapi.config import Config
from sqapi.connectors.listeners._amqp import Publisher
from tests.rabbitmq.conftest import declare, listening, take_all, wait_until
from tests.test_processor import FLAKY

COUNTER = """
def execute(config, database, message, metadata, data):
    return {"seen": data.read().decode()}
"""

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    made = TracerProvider()
    made.add_span_processor(SimpleSpanProcessor(exporter))
    yield made
    made.shutdown()


@pytest.fixture
def traced(make_config: Callable[..., Config], provider: TracerProvider, broker: dict[str, Any],
           write_plugin: Callable[..., Path], write_data: Callable[[str, str], str]) -> Iterator[Sqapi]:
    write_plugin("alpha", COUNTER)
    write_data("item.txt", "hello")
    app = build(make_config({"msg_broker": broker, "active_plugins": ["alpha"]}), tracer_provider=provider)
    yield app
    app.close()


def one(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    [found] = [s for s in spans if s.name == name]
    return found


def publish_traced(provider: TracerProvider, broker: dict[str, Any], uuid: str) -> None:
    """Publish a message for ``item.txt`` inside a publish span of ``provider``, its ``traceparent`` in the headers."""
    publisher = Publisher(broker)
    publisher.open()  # declares the topology
    try:
        with tracing.publishing(provider.get_tracer("test"), broker, uuid) as headers:
            publisher.publish(json.dumps({"uuid_ref": uuid, "data_location": "item.txt"}).encode(),
                              message_id=uuid, headers=headers)
    finally:
        publisher.close()


def test_a_traced_publish_is_continued_by_the_loaders_process_span_and_its_trace_id_recorded(
        traced: Sqapi, provider: TracerProvider, exporter: InMemorySpanExporter, broker: dict[str, Any]) -> None:
    publish_traced(provider, broker, "t-1")

    with listening(traced):
        wait_until(lambda: any(s.name == "process sqapi" for s in exporter.get_finished_spans()),
                   what="the message's process span")

    spans = exporter.get_finished_spans()
    send, process = one(spans, "send sqapi"), one(spans, "process sqapi")
    assert send.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    assert dict(send.attributes or {})["messaging.operation.type"] == "send"
    assert dict(send.attributes or {})["messaging.message.id"] == "t-1"
    attributes = dict(process.attributes or {})
    assert (attributes["messaging.system"], attributes["messaging.destination.name"],
            attributes["messaging.operation.type"], attributes["messaging.message.id"]) == \
        ("rabbitmq", "sqapi", "process", "t-1")
    # one trace from the publisher to the plugin: the process span is the send span's child, and linked to it
    assert process.context.trace_id == send.context.trace_id
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert [link.context.span_id for link in process.links] == [send.context.span_id]
    plugin = one(spans, "plugin alpha")
    assert plugin.parent is not None and plugin.parent.span_id == process.context.span_id
    assert {s.name for s in spans if s.parent is not None and s.parent.span_id == process.context.span_id} >= \
        {"status QUERYING", "fetch data", "plugin alpha", "status DONE"}
    assert traced.database.get_message("t-1")["trace_id"] == format_trace_id(send.context.trace_id)


def test_sqapi_publish_puts_its_send_spans_traceparent_in_the_amqp_headers(
        workdir: Path, vhost: str, broker: dict[str, Any], exporter: InMemorySpanExporter,
        monkeypatch: pytest.MonkeyPatch) -> None:
    made = tracing.make_provider

    def spied(config: Any, env: Any = None) -> Any:  # the provider the config asks for, its spans kept here too
        provider = made(config, env)
        if provider is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider

    monkeypatch.setattr(tracing, "make_provider", spied)
    config = workdir / "publish.yml"
    config.write_text(yaml.safe_dump({"msg_broker": broker, "tracing": {"enabled": True, "exporter": "none"}}))

    result = CliRunner().invoke(main, ["publish", "-c", str(config), "--uuid", "p-1", "--data-location", "x.txt"],
                                catch_exceptions=False)

    assert result.exit_code == 0, result.output
    [send] = exporter.get_finished_spans()
    assert send.name == "send sqapi" and send.kind is SpanKind.PRODUCER
    [(properties, _body)] = take_all(vhost, "sqapi")
    assert properties.headers["traceparent"].startswith(  # then the trace flags: sampled (and random)
        f"00-{format_trace_id(send.context.trace_id)}-{format_span_id(send.context.span_id)}-")


def test_sqapi_publish_adds_no_header_when_tracing_is_off(workdir: Path, vhost: str, broker: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    config = workdir / "publish.yml"
    config.write_text(yaml.safe_dump({"msg_broker": broker}))
    result = CliRunner().invoke(main, ["publish", "-c", str(config), "--uuid", "p-2", "--data-location", "x.txt"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    [(properties, _body)] = take_all(vhost, "sqapi")
    assert "traceparent" not in (properties.headers or {})


def test_post_messages_continues_the_callers_trace_into_the_amqp_headers(
        traced: Sqapi, exporter: InMemorySpanExporter, vhost: str, broker: dict[str, Any]) -> None:
    declare(vhost, broker)
    client = create_app(traced).test_client()

    response = client.post("/messages", json={"uuid_ref": "h-1", "data_location": "item.txt"},
                           headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})

    assert response.status_code == 202, response.get_data(as_text=True)
    send = one(exporter.get_finished_spans(), "send sqapi")
    assert format_trace_id(send.context.trace_id) == CALLER_TRACE
    assert send.parent is not None and format_span_id(send.parent.span_id) == CALLER_SPAN
    [(properties, _body)] = take_all(vhost, "sqapi")
    assert re.fullmatch(rf"00-{CALLER_TRACE}-{format_span_id(send.context.span_id)}-0[13]",
                        properties.headers["traceparent"])




def test_a_retried_message_keeps_its_traceparent_so_every_attempt_is_in_the_publishers_trace(
        make_config: Callable[..., Config], provider: TracerProvider, exporter: InMemorySpanExporter,
        broker: dict[str, Any], write_plugin: Callable[..., Path], write_data: Callable[[str, str], str],
        workdir: Path) -> None:
    write_plugin("flaky", FLAKY)
    write_data("item.txt", "hello")
    app = build(make_config({"msg_broker": broker, "active_plugins": ["flaky"],
                             "custom": {"flaky_marker": str(workdir / "flaky")}}), tracer_provider=provider)
    try:
        publish_traced(provider, broker, "r-1")
        with listening(app):
            wait_until(lambda: len([s for s in exporter.get_finished_spans() if s.name == "process sqapi"]) == 2,
                       what="two attempts' process spans")
        assert app.database.get_message("r-1")["status"] == "DONE"
    finally:
        app.close()

    spans = exporter.get_finished_spans()
    send = one(spans, "send sqapi")
    first, second = sorted((s for s in spans if s.name == "process sqapi"), key=lambda s: s.start_time or 0)
    for attempt in (first, second):
        assert attempt.context.trace_id == send.context.trace_id
        assert attempt.parent is not None and attempt.parent.span_id == send.context.span_id
    assert [dict(s.attributes or {})["sqapi.message.status"] for s in (first, second)] == ["RETRY", "DONE"]
    assert dict(second.attributes or {})["sqapi.delivery.attempt"] == 2
