"""OpenTelemetry tracing: off unless configured; when on, an SDK tracer provider exporting over OTLP.

On when the config's ``tracing.enabled`` is true, or (when the config says nothing) when
``$OTEL_TRACES_EXPORTER`` names an exporter other than ``none``; ``$OTEL_SDK_DISABLED=true`` turns it
off whatever the config says.  The standard variables configure the rest as the OpenTelemetry SDK
reads them -- ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*`` -- and the ``tracing`` section's keys, when given, win
(docs/configuration.md).  The exporter sends OTLP over HTTP (protobuf).

What is traced: :mod:`sqapi.core.tracing` (the processor's spans) and :func:`publishing` (``sqapi
publish``, ``POST /messages``: a ``send`` span whose ``traceparent`` goes into the AMQP headers).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from sqapi.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from sqapi.core.tracing import MessageTracing

log = logging.getLogger(__name__)

#: the keys of the ``tracing`` section
KEYS = ("enabled", "exporter", "endpoint", "service_name")
EXPORTERS = ("otlp", "console", "none")
DEFAULT_SERVICE_NAME = "sqapi"
INSTRUMENTATION = "sqapi"


def enabled(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> bool:
    """Whether tracing is on for ``config`` (and the environment)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    section = config.get("tracing") or {}
    if section.get("enabled") is not None:
        return bool(section["enabled"])
    return exporter_name(section, env) != "none" and bool(env.get("OTEL_TRACES_EXPORTER", "").strip())


def exporter_name(section: Mapping[str, Any], env: Mapping[str, str]) -> str:
    name = section.get("exporter") or env.get("OTEL_TRACES_EXPORTER", "").strip() or "otlp"
    return str(name).split(",")[0].strip().lower()


def check(config: Mapping[str, Any], source: str, env: Mapping[str, str] | None = None) -> None:
    """Refuse a ``tracing`` section (or ``OTEL_*`` setting) sqapi cannot act on, naming the key and the fix."""
    env = os.environ if env is None else env
    section = config.get("tracing") or {}
    if not isinstance(section, Mapping):
        return  # config.validate_structure names it
    if "enabled" in section and section["enabled"] is not None and not isinstance(section["enabled"], bool):
        raise ConfigError("tracing.enabled", f"must be true or false, not {section['enabled']!r}",
                          "set tracing.enabled: true (or false)", source)
    for key in ("endpoint", "service_name"):
        if section.get(key) is not None and not isinstance(section[key], str):
            raise ConfigError(f"tracing.{key}", f"must be a string, not {section[key]!r}",
                              f"quote tracing.{key}", source)
    if not enabled(config, env):
        return
    name = exporter_name(section, env)
    if name not in EXPORTERS:
        where = "tracing.exporter" if section.get("exporter") else "$OTEL_TRACES_EXPORTER"
        raise ConfigError(where, f"unknown trace exporter {name!r}", f"use one of: {', '.join(EXPORTERS)}", source)
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "").strip()
    if name == "otlp" and protocol not in ("", "http/protobuf"):
        raise ConfigError("$OTEL_EXPORTER_OTLP_PROTOCOL", f"sqapi exports OTLP over http/protobuf, not {protocol!r}",
                          "unset it or set it to http/protobuf (and point the endpoint at the collector's HTTP "
                          "port, 4318)", source)


def make_provider(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """The SDK tracer provider ``config`` asks for, exporting in batches; ``None`` when tracing is off."""
    env = os.environ if env is None else env
    if not enabled(config, env):
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    section = config.get("tracing") or {}
    attributes: dict[str, Any] = {}
    if section.get("service_name"):
        attributes[SERVICE_NAME] = section["service_name"]
    elif not env.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    provider = TracerProvider(resource=Resource.create(attributes))  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    name = exporter_name(section, env)
    exporter: SpanExporter | None = None
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = section.get("endpoint")
        if endpoint and not str(endpoint).rstrip("/").endswith("/v1/traces"):
            endpoint = f"{str(endpoint).rstrip('/')}/v1/traces"  # as OTEL_EXPORTER_OTLP_ENDPOINT is read
        exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    elif name == "console":
        exporter = ConsoleSpanExporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def message_tracing(config: Mapping[str, Any], provider: Any) -> MessageTracing:
    """The processor's spans, made by ``provider``'s tracer; their destination is the configured source."""
    from sqapi.core.tracing import MessageTracing

    broker = config.get("msg_broker") or {}
    kind = str(broker.get("type") or "")
    system = "rabbitmq" if kind == "rabbitmq" else kind.rsplit(".", 1)[-1].rsplit(":", 1)[-1] or "sqapi"
    return MessageTracing(provider.get_tracer(INSTRUMENTATION), system, destination_of(broker))


def destination_of(broker: Mapping[str, Any]) -> str:
    """What the messages come from: the RabbitMQ queue, or the spool folder's name."""
    if broker.get("type") == "rabbitmq":
        return str(broker.get("queue_name") or "sqapi")
    for key in ("queue_name", "directory"):
        if broker.get(key):
            return os.path.basename(str(broker[key]).rstrip("/")) or str(broker[key])
    return str(broker.get("type") or "sqapi")


_installed: list[Any] = []


def install(provider: Any) -> None:
    """Make ``provider`` the process's global one (what plugins' own OpenTelemetry instrumentation on the
    loader's threads reports to); only the first one made from a config is: the API allows one."""
    if not _installed:
        from opentelemetry import trace

        trace.set_tracer_provider(provider)
        _installed.append(provider)


def shutdown(provider: Any) -> None:
    """Export what is left and stop the provider (best effort: a collector that is down must not block a stop)."""
    try:
        provider.shutdown()
    except Exception as exc:  # the exporter's own errors
        log.warning("tracing: could not export the last spans: %s", exc)


@contextlib.contextmanager
def publishing(tracer: Tracer | None, broker: Mapping[str, Any], message_id: str | None,
               parent: Mapping[str, str] | None = None) -> Iterator[dict[str, Any] | None]:
    """A ``send`` span (PRODUCER) around one publication; yields the AMQP headers that carry its ``traceparent``
    (``None`` when tracing is off: nothing is added).  ``parent``: W3C headers the span continues (an HTTP
    request's ``traceparent``), else the current context."""
    if tracer is None:
        yield None
        return
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, StatusCode

    from sqapi.core.tracing import PROPAGATOR

    destination = str(broker.get("exchange_name") or "sqapi") if broker.get("type") == "rabbitmq" \
        else destination_of(broker)
    attributes: dict[str, Any] = {"messaging.system": "rabbitmq" if broker.get("type") == "rabbitmq"
                                  else str(broker.get("type") or "sqapi"),
                                  "messaging.operation.type": "send", "messaging.operation.name": "send",
                                  "messaging.destination.name": destination}
    if message_id:
        attributes["messaging.message.id"] = message_id
    if broker.get("type") == "rabbitmq":
        attributes["messaging.rabbitmq.destination.routing_key"] = str(broker.get("routing_key") or "sqapi")
    context = PROPAGATOR.extract({k.lower(): v for k, v in parent.items()}) if parent else None
    with tracer.start_as_current_span(f"send {destination}", context=context, kind=SpanKind.PRODUCER,
                                      attributes=attributes, record_exception=True,
                                      set_status_on_exception=True) as span:
        headers: dict[str, Any] = {}
        PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
        yield headers
        span.set_status(StatusCode.OK)
