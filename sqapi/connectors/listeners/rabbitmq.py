"""``msg_broker: {type: rabbitmq, ...}`` -- the production listener (pika), at-least-once.

The topology, the settings and :class:`Publisher` are in :mod:`sqapi.connectors.listeners._amqp`
(re-exported here).  This module is the transport the consumer (:mod:`sqapi.core.consumer`)
drives: one connection and channel per session (:class:`_Session`), pika's I/O loop running in
the consumer's receiving thread -- the only thread that touches the channel.

Deliveries go into the consumer's inbox as they arrive, at most ``prefetch`` unacknowledged at
once.  Worker threads hand outcomes back through :meth:`Listener.settle`, which queues them and
wakes the I/O thread (``add_callback_threadsafe``); there the session acks (several at once,
``multiple=True``, when they are contiguous), republishes to a delay queue with the attempt count
in ``x-sqapi-attempt`` (confirmed before the original is acked), or publishes to the dead-letter
exchange (confirmed, then acked).  A message whose channel dies before it is acked is
redelivered by the broker; the processor's idempotency makes that harmless.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from sqapi.backoff import exponential
from sqapi.connectors.listeners import Inbox, Received, Transport
from sqapi.connectors.listeners._amqp import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    EXCHANGE_TYPES,
    LAST_ERROR_HEADER,
    MAX_HEADER_CHARS,
    PERSISTENT,
    PLUGIN_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    BrokerSettings,
    BrokerStalled,
    Publisher,
    abandon,
    attempt_of,
    clip,
    connect,
    deadline,
    declare_delay_queue,
    declare_topology,
    describe,
    retry_delays_ms,
    trace_context_of,
    validate_config,
)
from sqapi.connectors.listeners._dead_letters import AmqpDeadLetters
from sqapi.connectors.listeners._queue_depths import QueueDepth, amqp_queue_depths
from sqapi.core.outcome import Action, Delivery, Outcome, RetryPolicy
from sqapi.errors import ConnectorError

__all__ = ["ATTEMPTS_HEADER", "ATTEMPT_HEADER", "EXCHANGE_TYPES", "LAST_ERROR_HEADER", "MAX_HEADER_CHARS",
           "PERSISTENT", "PLUGIN_HEADER", "QUEUE_HEADER", "REASON_HEADER", "BrokerSettings", "BrokerStalled",
           "Listener", "Publisher", "abandon", "attempt_of", "connect", "deadline", "declare_delay_queue",
           "declare_topology", "retry_delays_ms", "validate_config"]

log = logging.getLogger(__name__)

SET_ASIDE_PAUSE = 0.5      # seconds before requeueing a message that could not be set aside; doubles while it fails
SET_ASIDE_MAX_PAUSE = 30.0
AMQP_ERRORS = (pika.exceptions.AMQPError, OSError)


@dataclass
class _Tag:
    """The consumer's handle of a delivery: its tag on the session that received it."""

    session: _Session
    tag: int
    properties: BasicProperties


@dataclass
class _Settled:
    """An outcome handed to the I/O thread."""

    tag: int
    properties: BasicProperties
    body: bytes
    outcome: Outcome | None      # None: the processor itself failed; requeue


class _Session:
    """One connection + channel; lives until the connection is lost or the consumer stops."""

    def __init__(self, settings: BrokerSettings, policy: RetryPolicy, connection: BlockingConnection) -> None:
        self.settings = settings
        self.policy = policy
        self.connection = connection
        self.channel = connection.channel()
        self.unacked: collections.OrderedDict[int, bool] = collections.OrderedDict()  # tag -> finished
        self.results: queue.SimpleQueue[_Settled] = queue.SimpleQueue()
        self.delay_queues: set[int] = set()
        self.inbox: Inbox | None = None      # where deliveries go: the consumer's, set by receive
        self.early: list[Received] = []      # delivered before the first receive (while opening)
        self.cancelled_by_broker = False
        self.set_aside_failures = 0  # in a row: the pause before requeueing a message that could not be set aside
        self.stalled = False  # the broker did not answer in time: the connection is abandoned, not closed
        self.consumer_tag: str | None = None
        self._drain_scheduled = threading.Lock()

    def open(self) -> None:
        with self.deadline("declaring the topology"):
            self.channel.confirm_delivery()
            declare_topology(self.channel, self.settings)
            # every delay queue now, not on the first retry: a declaration that stalls stalls here, before consuming
            for delay_ms in retry_delays_ms(self.policy):
                declare_delay_queue(self.channel, self.settings, delay_ms)
                self.delay_queues.add(delay_ms)
            self.channel.basic_qos(prefetch_count=self.settings.prefetch)
            self.channel.add_on_cancel_callback(self._on_cancel)
            self.consumer_tag = self.channel.basic_consume(self.settings.queue_name, self._on_message)

    @contextlib.contextmanager
    def deadline(self, what: str) -> Iterator[None]:
        try:
            with deadline(self.connection, self.settings.confirm_timeout, what):
                yield
        except BrokerStalled:
            self.stalled = True
            raise

    # -- I/O thread -------------------------------------------------------------------------
    def _on_cancel(self, _frame: Any) -> None:
        log.warning("RabbitMQ cancelled the consumer on queue '%s' (queue deleted or node failover)",
                    self.settings.queue_name)
        self.cancelled_by_broker = True

    def _on_message(self, _channel: BlockingChannel, method: Basic.Deliver, properties: BasicProperties,
                    body: bytes) -> None:
        tag = method.delivery_tag
        self.unacked[tag] = False
        delivery = Delivery(id=f"{self.settings.queue_name}#{properties.message_id or tag}",
                            attempt=attempt_of(properties), trace_context=trace_context_of(properties))
        received = Received(body, delivery, _Tag(self, tag, properties))
        if self.inbox is None:
            self.early.append(received)
        else:
            self.inbox.put(received)

    def requeue(self, tags: Sequence[int]) -> None:
        """Deliveries no worker started go back to the queue (none, once the channel is gone: the broker has)."""
        for tag in tags:
            if tag in self.unacked and self.channel.is_open:
                self.channel.basic_nack(tag, requeue=True)
            self.unacked.pop(tag, None)

    def drain(self) -> None:
        """Act on every outcome the workers handed back since the last drain."""
        try:
            self._drain_scheduled.release()  # results put from now on schedule another drain
        except RuntimeError:
            pass
        finished: list[_Settled] = []
        while True:
            try:
                finished.append(self.results.get_nowait())
            except queue.Empty:
                break
        for settled in finished:
            self._settle(settled)
        self._flush_acks()

    def _settle(self, settled: _Settled) -> None:
        outcome = settled.outcome
        if outcome is None:
            self.requeue([settled.tag])
            return
        if outcome.action is Action.ACK:
            self.unacked[settled.tag] = True        # acked in _flush_acks, possibly with others
            return
        try:
            with self.deadline(f"the set-aside of message {outcome.uuid or 'without uuid'}"):
                if outcome.action is Action.RETRY:
                    self._publish_retry(settled, outcome)
                else:
                    self._publish_dead_letter(settled, outcome)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            # the queue it goes to has no leader now (a node down): requeue it, but only after a pause that grows,
            # so that it neither spins nor uses up the main queue's delivery limit while the node is away
            self.set_aside_failures += 1
            pause = exponential(self.set_aside_failures, SET_ASIDE_PAUSE, SET_ASIDE_MAX_PAUSE)
            log.error("could not set message %s aside (%s): requeued in %gs", outcome.uuid, type(exc).__name__,
                      pause)
            self.connection.call_later(pause, lambda: self._requeue_later(settled.tag))
            return
        self.set_aside_failures = 0
        self.unacked[settled.tag] = True

    def _requeue_later(self, tag: int) -> None:
        self.requeue([tag])
        self._flush_acks()

    def _publish_retry(self, settled: _Settled, outcome: Outcome) -> None:
        delay_ms = max(1, int(round(outcome.delay * 1000)))
        if delay_ms not in self.delay_queues:
            declare_delay_queue(self.channel, self.settings, delay_ms)
            self.delay_queues.add(delay_ms)
        headers = dict(settled.properties.headers or {})
        headers[ATTEMPT_HEADER] = outcome.attempt + 1 if outcome.counted else outcome.attempt
        headers[LAST_ERROR_HEADER] = clip(outcome.reason)
        self.channel.basic_publish("", self.settings.delay_queue_name(delay_ms), settled.body,
                                   properties=self._copy_properties(settled.properties, headers),
                                   mandatory=True)

    def _publish_dead_letter(self, settled: _Settled, outcome: Outcome) -> None:
        headers = dict(settled.properties.headers or {})
        headers.pop(LAST_ERROR_HEADER, None)
        headers[REASON_HEADER] = clip(outcome.reason or "failed")
        headers[PLUGIN_HEADER] = outcome.plugin or ""
        headers[ATTEMPTS_HEADER] = outcome.attempt
        headers[QUEUE_HEADER] = self.settings.queue_name
        log.warning("dead-lettered %s to %s: %s", outcome.uuid or "a message", self.settings.dead_letter_name,
                    outcome.reason)
        self.channel.basic_publish(self.settings.dead_letter_name, self.settings.queue_name, settled.body,
                                   properties=self._copy_properties(settled.properties, headers),
                                   mandatory=True)

    @staticmethod
    def _copy_properties(original: BasicProperties, headers: dict[str, Any]) -> BasicProperties:
        return BasicProperties(content_type=original.content_type, content_encoding=original.content_encoding,
                               message_id=original.message_id, correlation_id=original.correlation_id,
                               timestamp=original.timestamp, type=original.type, app_id=original.app_id,
                               headers=headers, delivery_mode=PERSISTENT)

    def _flush_acks(self) -> None:
        """Ack finished deliveries: a contiguous run from the oldest in one ``multiple`` ack, the rest singly."""
        last_contiguous = None
        while self.unacked:
            tag, finished = next(iter(self.unacked.items()))
            if not finished:
                break
            self.unacked.popitem(last=False)
            last_contiguous = tag
        if last_contiguous is not None:
            self.channel.basic_ack(last_contiguous, multiple=True)
        # finished behind a still-running one: ack now, or a long plugin would starve the prefetch window
        for tag in [t for t, finished in self.unacked.items() if finished]:
            self.channel.basic_ack(tag)
            del self.unacked[tag]

    # -- worker threads -----------------------------------------------------------------------
    def hand_over(self, settled: list[_Settled]) -> None:
        """Outcomes from a worker, for the I/O thread to act on (one wake-up for a burst of them)."""
        for item in settled:
            self.results.put(item)
        if self._drain_scheduled.acquire(blocking=False):
            try:
                self.connection.add_callback_threadsafe(self.drain)
            except Exception:  # the connection is gone: the broker redelivers these messages
                log.info("connection lost before %d deliveries were acknowledged: the broker will redeliver them",
                         len(settled))

    def close(self) -> None:
        if not self.stalled:
            try:
                if self.connection.is_open:
                    with self.deadline("closing the connection"):
                        self.drain()  # outcomes handed over since the last receive
                        self.connection.close()
            except (*AMQP_ERRORS, ConnectorError):
                pass  # gone already, or stalled (then abandoned below)
        if self.stalled:
            abandon(self.connection)


class Listener(Transport):
    """Consumes ``msg_broker.queue_name``: a session per connection, opened again by the consumer when lost."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.settings = BrokerSettings.from_config(config)
        self.policy = RetryPolicy.from_config(config)
        self._session: _Session | None = None

    def ping(self) -> None:
        connect(self.settings).close()

    @classmethod
    def publisher(cls, config: dict[str, Any]) -> Publisher:
        return Publisher(config)

    @classmethod
    def dead_letters(cls, config: dict[str, Any]) -> AmqpDeadLetters:
        return AmqpDeadLetters(config)

    @classmethod
    def queue_depths(cls, config: dict[str, Any]) -> list[QueueDepth]:
        return amqp_queue_depths(config)

    @property
    def session(self) -> _Session:
        if self._session is None:
            raise ConnectorError("RabbitMQ: no session is open")
        return self._session

    def open(self) -> None:
        connection = connect(self.settings)
        session = _Session(self.settings, self.policy, connection)
        try:
            session.open()
        except (*AMQP_ERRORS, ConnectorError) as exc:
            session.close()
            raise ConnectorError(f"RabbitMQ at {self.settings.where()}: cannot start consuming: {describe(exc)}") \
                from None
        self._session = session
        log.info("consuming from queue '%s' at %s (prefetch %d)", self.settings.queue_name, self.settings.where(),
                 self.settings.prefetch)

    def receive(self, inbox: Inbox, timeout: float) -> None:
        session = self.session
        if session.inbox is None:
            session.inbox = inbox
            for received in session.early:
                inbox.put(received)
            session.early.clear()
        try:
            session.connection.process_data_events(time_limit=timeout)
        except BrokerStalled:
            raise
        except AMQP_ERRORS as exc:
            raise ConnectorError(f"RabbitMQ connection lost: {describe(exc)}") from None
        if session.cancelled_by_broker:
            raise ConnectorError("consumer cancelled by the broker")

    def settle(self, received: Sequence[Received], outcomes: Sequence[Outcome | None]) -> None:
        by_session: dict[int, tuple[_Session, list[_Settled]]] = {}
        for item, outcome in zip(received, outcomes, strict=True):
            handle: _Tag = item.handle
            entry = by_session.setdefault(id(handle.session), (handle.session, []))
            entry[1].append(_Settled(handle.tag, handle.properties, item.body, outcome))
        for session, settled in by_session.values():
            session.hand_over(settled)

    def hand_back(self, received: Sequence[Received]) -> None:
        current = [item.handle.tag for item in received if item.handle.session is self._session]
        if current and self._session is not None and not self._session.stalled:
            try:
                self._session.requeue(current)
            except AMQP_ERRORS:
                pass  # the channel is gone: the broker requeued them

    def stop_receiving(self) -> None:
        session = self.session
        try:
            if session.consumer_tag is not None and session.channel.is_open:
                session.channel.basic_cancel(session.consumer_tag)
        except AMQP_ERRORS as exc:
            raise ConnectorError(f"RabbitMQ connection lost: {describe(exc)}") from None

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        self._session = None
