"""The message path's OpenTelemetry spans, following the messaging semantic conventions.

Made only when tracing is configured (:mod:`sqapi.tracing` builds a :class:`MessageTracing` from the
config); otherwise the processor holds ``None`` and never imports this module, so tracing that is
off costs nothing on the hot path.

One delivery, one trace tree::

    process <destination>      CONSUMER  the whole attempt; child of, and linked to, the publisher's
    │                                     context from the ``traceparent`` header (a root without one)
    ├── status QUERYING        INTERNAL  the claim and the attempt's count (one write for a batch)
    ├── fetch data             INTERNAL
    ├── fetch metadata         INTERNAL  (when it comes from the meta store)
    ├── plugin <name>          INTERNAL  one per plugin call: status, attempt, duration; the call runs in
    │                                     its context (a worker process too: :attr:`Call.trace_context`)
    ├── status PROCESSING ...  INTERNAL  each plugin's rows
    └── status DONE|RETRY|FAILED
                               INTERNAL  the last rows and the final status

A status write serves a whole batch: each message gets its own span of that write.  The trace id
goes into ``messages.trace_id`` with the status writes (``Message.trace_id``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sqapi.core.message import Message
from sqapi.core.outcome import Delivery, Outcome

#: the W3C Trace Context propagator: ``traceparent`` / ``tracestate`` in and out
PROPAGATOR = TraceContextTextMapPropagator()

#: attribute names of the messaging semantic conventions
SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
MESSAGE_ID = "messaging.message.id"


class MessageTracing:
    """Makes the spans of the processor: one ``process`` span per delivery and its children."""

    def __init__(self, tracer: Tracer, system: str, destination: str) -> None:
        self.tracer = tracer
        self.system = system
        self.destination = destination

    # -- a delivery's process span ------------------------------------------------------------------
    def start(self, delivery: Delivery) -> Span:
        """The delivery's ``process`` span: a child of the publisher's context (and linked to it) when the
        delivery carries a valid ``traceparent``, else the root of a new trace."""
        parent = otel_context.Context()  # never the caller's current span: a delivery starts its own tree
        links: list[Link] = []
        if delivery.trace_context:
            extracted = PROPAGATOR.extract(dict(delivery.trace_context))
            publisher = trace.get_current_span(extracted).get_span_context()
            if publisher.is_valid:
                parent = extracted
                links.append(Link(publisher))
        return self.tracer.start_span(
            f"process {self.destination}", context=parent, kind=SpanKind.CONSUMER, links=links,
            attributes={SYSTEM: self.system, OPERATION_TYPE: "process", OPERATION_NAME: "process",
                        DESTINATION: self.destination, "sqapi.delivery.id": delivery.id,
                        "sqapi.delivery.attempt": delivery.attempt})

    @staticmethod
    def parsed(span: Span, message: Message) -> None:
        """What the parsed message adds to its span; sets ``message.trace_id`` (recorded with its status)."""
        span.set_attribute(MESSAGE_ID, message.uuid)
        span.set_attribute("sqapi.message.action", message.action)
        message.trace_id = trace_id_of(span)

    @staticmethod
    def finish(span: Span, outcome: Outcome) -> None:
        """End a process span with the attempt's outcome (an error unless DONE)."""
        span.set_attribute("sqapi.message.status", str(outcome.status))
        span.set_attribute("sqapi.message.attempt", outcome.attempt)
        if outcome.uuid is not None:
            span.set_attribute(MESSAGE_ID, outcome.uuid)
        if outcome.plugin:
            span.set_attribute("sqapi.plugin.name", outcome.plugin)
        if outcome.status != "DONE":
            span.set_status(StatusCode.ERROR, outcome.reason or str(outcome.status))
        span.end()

    # -- children ----------------------------------------------------------------------------------
    def child(self, parent: Span, name: str, attributes: Mapping[str, Any] | None = None) -> Span:
        return self.tracer.start_span(name, context=trace.set_span_in_context(parent),
                                      attributes=dict(attributes or {}))

    @contextlib.contextmanager
    def step(self, parent: Span | None, name: str, **attributes: Any) -> Iterator[None]:
        """A child span around one step of one message (a fetch); an exception marks it an error and goes on."""
        if parent is None:
            yield
            return
        span = self.child(parent, name, attributes)
        try:
            yield
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            span.end()

    def start_write(self, parents: Iterable[Span | None], status: str) -> list[Span]:
        """One span per message of a status write that serves them all (``status <STATUS>``)."""
        return self.start_write_each((parent, status) for parent in parents)

    def start_write_each(self, writes: Iterable[tuple[Span | None, str]]) -> list[Span]:
        """As :meth:`start_write`, each message with the status written for it."""
        seen: set[int] = set()
        spans: list[Span] = []
        for parent, status in writes:
            if parent is not None and id(parent) not in seen:
                seen.add(id(parent))
                spans.append(self.child(parent, f"status {status}", {"sqapi.status": str(status)}))
        for span in spans:
            span.set_attribute("sqapi.batch.size", len(spans))
        return spans

    @staticmethod
    def end_write(spans: list[Span], error: BaseException | None = None) -> None:
        for span in spans:
            if error is not None:
                span.set_status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
            span.end()

    def write(self, parents: Iterable[Span | None], status: str) -> contextlib.AbstractContextManager[None]:
        """Spans around one status write that serves several messages (one span each)."""
        return self.write_each((parent, status) for parent in parents)

    @contextlib.contextmanager
    def write_each(self, writes: Iterable[tuple[Span | None, str]]) -> Iterator[None]:
        spans = self.start_write_each(writes)
        try:
            yield
        except BaseException as exc:
            self.end_write(spans, exc)
            raise
        self.end_write(spans)

    # -- plugin calls --------------------------------------------------------------------------------
    def start_plugin(self, parent: Span, plugin: str, attempt: int) -> tuple[Span, dict[str, str]]:
        """A plugin call's span and its W3C context (what the call carries to where it runs)."""
        span = self.child(parent, f"plugin {plugin}", {"sqapi.plugin.name": plugin, "sqapi.plugin.attempt": attempt})
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return span, carrier

    @staticmethod
    def end_plugin(span: Span, status: str, seconds: float, error: BaseException | None) -> None:
        span.set_attribute("sqapi.plugin.status", status)
        span.set_attribute("sqapi.plugin.duration_ms", seconds * 1000.0)
        if error is not None:
            span.set_status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
        span.end()


def trace_id_of(span: Span) -> str | None:
    """The span's trace id as 32 lower-case hex digits (W3C), ``None`` for a span that is not recorded."""
    context = span.get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


@contextlib.contextmanager
def running_in(carrier: Mapping[str, str]) -> Iterator[None]:
    """Run the body in the trace context ``carrier`` holds (a plugin call's): what a plugin's outgoing request
    propagates (``opentelemetry.propagate.inject``, or :func:`current_headers`)."""
    token = otel_context.attach(PROPAGATOR.extract(dict(carrier)))
    try:
        yield
    finally:
        otel_context.detach(token)


def current_headers() -> dict[str, str]:
    """The ``traceparent`` (and ``tracestate``) of the current trace context, to send on a request; ``{}`` when
    there is none."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return carrier
