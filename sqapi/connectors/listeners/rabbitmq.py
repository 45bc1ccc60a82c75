"""``msg_broker: {type: rabbitmq, ...}`` -- the production listener (pika), at-least-once.

Topology, declared (idempotently) by every loader and by ``sqapi publish``::

    exchange <exchange_name> (<exchange_type>) --routing_key--> queue <queue_name>
        quorum queue (default) with x-delivery-limit; dead-letters to <queue>.dead
    queue <queue>.delay.<ms>ms    one per retry delay, declared when a session opens: TTL <ms>,
                                  then dead-lettered back to <queue_name> through the default
                                  exchange (only this queue); quorum queues dead-lettering
                                  at-least-once (<queue>.retry.<ms>ms, classic, with quorum: false)
    exchange + queue <queue>.dead where given-up and malformed messages wait, with headers
                                  x-sqapi-reason, x-sqapi-plugin, x-sqapi-attempts; a quorum
                                  queue (an existing classic one is kept)

Every blocking exchange with the broker (a publisher confirm, a declaration) is bounded by
``confirm_timeout``: past it the session is dropped and opened again (see :func:`deadline`).

Delivery: pika's I/O loop runs in the thread that called :meth:`Listener.start_listeners`;
deliveries wait in a queue that worker threads (up to ``workers``) take from, each taking up to
``batch_size`` at once (whatever has arrived: a batch is never waited for; fewer when messages
are slow, see ``_Session.batch_limit``), at most ``prefetch`` unacknowledged at once.  One
worker runs while it keeps a core busy; another starts while deliveries wait and the running
ones mostly wait themselves (see ``_Session._nudge``).  A batch
goes through the processor's ``process_batch`` (status writes shared by the batch).  The
processor records every outcome before it returns; only then does the worker hand the
outcomes back to the I/O thread (``add_callback_threadsafe``), which acks (several at once,
``multiple=True``, when they are contiguous), republishes to a delay queue with the attempt
count in ``x-sqapi-attempt`` (confirmed before the original is acked), or publishes to the
dead-letter exchange (confirmed, then acked).  A message whose channel dies before it is acked
is redelivered by the broker; the processor's idempotency makes that harmless.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from sqapi.backoff import exponential
from sqapi.config import require_keys
from sqapi.connectors.listeners import BatchListener, ProcessBatch, ProcessMessage
from sqapi.core.outcome import Action, Delivery, Outcome, RetryPolicy
from sqapi.errors import ConfigError, ConnectorError

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-sqapi-attempt"
REASON_HEADER = "x-sqapi-reason"
PLUGIN_HEADER = "x-sqapi-plugin"
ATTEMPTS_HEADER = "x-sqapi-attempts"
QUEUE_HEADER = "x-sqapi-queue"
LAST_ERROR_HEADER = "x-sqapi-last-error"
MAX_HEADER_CHARS = 2000
PERSISTENT = 2
STUCK_SECONDS = 0.05  # no worker took a batch for this long while deliveries wait: start another
CPU_BOUND = 0.8       # ... or the process used less than this share of a core meanwhile
BATCH_SECONDS = 0.5   # batches are cut to take about this long (see _Session.batch_limit)
EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")
SET_ASIDE_PAUSE = 0.5      # seconds before requeueing a message that could not be set aside; doubles while it fails
SET_ASIDE_MAX_PAUSE = 30.0


def backoff(failures: int, initial: float, cap: float) -> float:
    """Capped exponential backoff with jitter: the delay before reconnect attempt ``failures`` (1-based)."""
    return exponential(failures, initial, cap, jitter=True)


@dataclass(frozen=True)
class BrokerSettings:
    """The ``msg_broker`` section, with sqAPI's names and sqapi's additions, typed and defaulted."""

    host: str = "localhost"
    port: int = 5672
    vhost: str = "/"
    user: str = "guest"
    password: str = "guest"
    url: str | None = None
    exchange_name: str = "sqapi"
    exchange_type: str = "direct"
    routing_key: str = "sqapi"
    queue_name: str = "sqapi"
    durable: bool = True
    quorum: bool = True
    delivery_limit: int = 20
    prefetch: int = 256
    heartbeat: int = 30
    workers: int = 4
    batch_size: int = 128
    max_body_bytes: int = 1 << 20
    max_inflight_bytes: int = 256 << 20
    reconnect_initial: float = 0.5
    reconnect_max: float = 30.0
    confirm_timeout: float = 30.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BrokerSettings:
        reconnect = config.get("reconnect") or {}
        workers = int(config.get("workers") or cls.workers)
        max_body = int(config.get("max_body_bytes") or cls.max_body_bytes)
        inflight = int(config.get("max_inflight_bytes") or cls.max_inflight_bytes)
        # RabbitMQ counts prefetch in messages, not bytes: so many that they hold at most max_inflight_bytes
        prefetch = min(int(config.get("prefetch") or max(cls.prefetch, workers * 4)), max(1, inflight // max_body))
        return cls(
            host=str(config.get("host") or cls.host),
            port=int(config.get("port") or cls.port),
            vhost=str(config.get("vhost") or cls.vhost),
            user=str(config.get("user") or cls.user),
            password=str(config.get("password") if config.get("password") is not None else cls.password),
            url=str(config["url"]) if config.get("url") else None,
            exchange_name=str(config.get("exchange_name") or cls.exchange_name),
            exchange_type=str(config.get("exchange_type") or cls.exchange_type),
            routing_key=str(config.get("routing_key") if config.get("routing_key") is not None
                            else cls.routing_key),
            queue_name=str(config.get("queue_name") or cls.queue_name),
            durable=bool(config.get("durable", cls.durable)),
            quorum=bool(config.get("quorum", cls.quorum)),
            delivery_limit=int(config.get("delivery_limit") or cls.delivery_limit),
            prefetch=prefetch,
            heartbeat=int(cls.heartbeat if config.get("heartbeat") is None else config["heartbeat"]),
            workers=workers,
            batch_size=max(1, int(config.get("batch_size") or cls.batch_size)),
            max_body_bytes=max_body,
            max_inflight_bytes=inflight,
            reconnect_initial=float(reconnect.get("initial_delay", cls.reconnect_initial)),
            reconnect_max=float(reconnect.get("max_delay", cls.reconnect_max)),
            confirm_timeout=float(config.get("confirm_timeout") or cls.confirm_timeout),
        )

    @property
    def dead_letter_name(self) -> str:
        return f"{self.queue_name}.dead"

    def delay_queue_name(self, delay_ms: int) -> str:
        # quorum delay queues have names of their own: a classic one of the old name may still hold messages
        return f"{self.queue_name}.{'delay' if self.quorum else 'retry'}.{delay_ms}ms"

    def where(self) -> str:
        """Where the broker is, for messages: never the password."""
        if self.url:
            return pika.URLParameters(self.url).host + f" (vhost {pika.URLParameters(self.url).virtual_host})"
        return f"{self.host}:{self.port} vhost '{self.vhost}'"

    def parameters(self) -> pika.ConnectionParameters | pika.URLParameters:
        if self.url:
            params = pika.URLParameters(self.url)
            params.heartbeat = self.heartbeat
            return params
        return pika.ConnectionParameters(
            host=self.host, port=self.port, virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.user, self.password),
            heartbeat=self.heartbeat, blocked_connection_timeout=max(60, self.heartbeat * 4),
            connection_attempts=1, socket_timeout=10)


def validate_config(config: dict[str, Any]) -> None:
    # queue_name and exchange_name default to "sqapi" (BrokerSettings); given, they must be strings
    given = [(key, str) for key in ("queue_name", "exchange_name") if config.get(key) not in (None, "")]
    require_keys(config, "msg_broker", given)
    for key in ("port", "prefetch", "heartbeat", "delivery_limit", "batch_size", "max_body_bytes",
                "max_inflight_bytes"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"msg_broker.{key}", f"must be a whole number, not {value!r}",
                              f"set msg_broker.{key} to a number like {getattr(BrokerSettings, key)}")
    timeout = config.get("confirm_timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        raise ConfigError("msg_broker.confirm_timeout", f"must be a number of seconds above 0, not {timeout!r}",
                          "set msg_broker.confirm_timeout, e.g. 30")
    kind = config.get("exchange_type") or "direct"
    if kind not in EXCHANGE_TYPES:
        raise ConfigError("msg_broker.exchange_type", f"unknown exchange type '{kind}'",
                          f"use one of {', '.join(EXCHANGE_TYPES)}")
    if config.get("quorum", True) and config.get("durable") is False:
        raise ConfigError("msg_broker.durable", "a quorum queue is always durable",
                          "set durable: true or quorum: false")


def connect(settings: BrokerSettings) -> BlockingConnection:
    """A connection, or :class:`ConnectorError` naming the broker (never the password)."""
    try:
        return BlockingConnection(settings.parameters())
    except pika.exceptions.ProbableAuthenticationError:
        raise ConnectorError(f"RabbitMQ at {settings.where()} refused the credentials of user "
                             f"'{settings.user}'") from None
    except pika.exceptions.ProbableAccessDeniedError:
        raise ConnectorError(f"RabbitMQ at {settings.where()}: user '{settings.user}' may not use the vhost") \
            from None
    except pika.exceptions.AMQPError as exc:
        raise ConnectorError(f"RabbitMQ at {settings.where()} unreachable: {type(exc).__name__}") from None
    except OSError as exc:
        raise ConnectorError(f"RabbitMQ at {settings.where()} unreachable: {exc.strerror or exc}") from None


def declare_topology(channel: BlockingChannel, settings: BrokerSettings) -> None:
    """The exchange, the main queue (bound) and the dead-letter exchange and queue."""
    dead = settings.dead_letter_name
    channel.exchange_declare(dead, exchange_type="fanout", durable=True)
    _declare_keeping_existing(channel, dead, {"x-queue-type": "quorum"} if settings.quorum else {})
    channel.queue_bind(dead, dead)
    arguments: dict[str, Any] = {"x-dead-letter-exchange": dead}
    if settings.quorum:
        arguments["x-queue-type"] = "quorum"
        arguments["x-delivery-limit"] = settings.delivery_limit
    channel.queue_declare(settings.queue_name, durable=settings.durable or settings.quorum, arguments=arguments)
    if settings.exchange_name:
        channel.exchange_declare(settings.exchange_name, exchange_type=settings.exchange_type,
                                 durable=settings.durable)
        channel.queue_bind(settings.queue_name, settings.exchange_name, routing_key=settings.routing_key)


def _declare_keeping_existing(channel: BlockingChannel, name: str, arguments: dict[str, Any]) -> None:
    """Declare a durable queue; one that exists with other arguments (a classic ``.dead`` of an earlier
    release, where a quorum one is declared now) is kept as it is -- declared on a channel of its own,
    since RabbitMQ closes the channel that asked for the inequivalent one."""
    probe = channel.connection.channel()
    try:
        probe.queue_declare(name, durable=True, arguments=arguments)
        return
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:  # PRECONDITION_FAILED: it exists, with other arguments
            raise
        log.info("queue '%s' exists with other arguments than sqapi declares now (%s): kept as it is",
                 name, _clip(exc.reply_text))
    finally:
        if probe.is_open:
            probe.close()
    channel.queue_declare(name, passive=True)


def declare_delay_queue(channel: BlockingChannel, settings: BrokerSettings, delay_ms: int) -> str:
    """A queue holding messages ``delay_ms`` then dead-lettering them back to the main queue only.

    With quorum queues (the default) it is a quorum queue too, replicated like the main one, and
    its dead-lettering is at-least-once: a message whose delay ends while the main queue has no
    leader (a node down, a restart) stays where it is until the main queue takes it.  A classic
    queue's dead-lettering is at most once: such a message would be dropped (bench/faults.py
    measured it, docs/faults.md)."""
    name = settings.delay_queue_name(delay_ms)
    arguments: dict[str, Any] = {"x-message-ttl": delay_ms, "x-dead-letter-exchange": "",
                                 "x-dead-letter-routing-key": settings.queue_name}
    if settings.quorum:
        arguments.update({"x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once",
                          "x-overflow": "reject-publish"})
    channel.queue_declare(name, durable=True, arguments=arguments)
    return name


def retry_delays_ms(policy: RetryPolicy) -> list[int]:
    """The delay (ms) of every retry the policy can ask for: their queues are declared when a session opens."""
    delays = {policy.delay_for(attempt) for attempt in range(1, max(1, policy.max_attempts) + 1)}
    delays.add(policy.delay_for(10 ** 6))  # a redelivery that does not count an attempt may come from any attempt
    return sorted({max(1, int(round(delay * 1000))) for delay in delays})


def abandon(connection: BlockingConnection) -> None:
    """Drop a connection at once, without AMQP's closing handshake.

    A broker that held a publisher confirm may not answer Connection.Close either (measured: a
    publish waiting on a quorum queue that answered nothing; the Close-Ok never came).  Shutting
    the socket down makes the broker end the connection and requeue what it delivered on it."""
    sock = getattr(getattr(connection._impl, "_transport", None), "_sock", None)  # pika has no public abort
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already


class BrokerStalled(ConnectorError):
    """RabbitMQ did not answer within ``confirm_timeout``: the session is dropped and opened again."""


@contextlib.contextmanager
def deadline(connection: BlockingConnection, seconds: float, what: str) -> Iterator[None]:
    """Bound a blocking exchange with the broker (a publisher confirm, a declaration) to ``seconds``.

    pika's blocking channel waits for a publisher confirm or a declaration's answer with no
    timeout, and RabbitMQ holds a confirm while the queue has no leader (a quorum queue whose node
    is down or still recovering).  A timer on pika's own I/O loop -- the loop that runs while pika
    waits -- raises :class:`BrokerStalled` out of the wait.  The connection is unusable afterwards
    (a late confirm would answer the next publish): the caller drops it, and the broker requeues
    what it had delivered on it.
    """
    def expired() -> None:
        raise BrokerStalled(f"RabbitMQ did not answer {what} within {seconds:g}s (msg_broker.confirm_timeout)")

    ioloop = connection._impl.ioloop  # pika exposes no timeout for its blocking waits
    timer = ioloop.call_later(seconds, expired)
    try:
        yield
    finally:
        ioloop.remove_timeout(timer)


def attempt_of(properties: BasicProperties) -> int:
    headers = properties.headers or {}
    try:
        return max(1, int(headers.get(ATTEMPT_HEADER, 1)))
    except (TypeError, ValueError):
        return 1


def _clip(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= MAX_HEADER_CHARS else text[: MAX_HEADER_CHARS - 3] + "..."


@dataclass
class _Received:
    """A delivery waiting for a worker."""

    tag: int
    properties: BasicProperties
    body: bytes
    delivery: Delivery


@dataclass
class _Settled:
    """A worker's result, handed to the I/O thread."""

    tag: int
    properties: BasicProperties
    body: bytes
    outcome: Outcome | None      # None: the processor itself failed; requeue


class _Session:
    """One connection + channel; lives until the connection is lost or the listener stops."""

    def __init__(self, listener: Listener, connection: BlockingConnection) -> None:
        self.listener = listener
        self.settings = listener.settings
        self.connection = connection
        self.channel = connection.channel()
        self.unacked: collections.OrderedDict[int, bool] = collections.OrderedDict()  # tag -> finished
        self.waiting: collections.deque[_Received] = collections.deque()  # not yet taken by a worker
        self.jobs: set[concurrent.futures.Future[None]] = set()
        self.running = 0        # workers taking from ``waiting``
        self._waiting_lock = threading.Lock()
        self._nudge_due = False  # a _nudge is scheduled
        self._last_take = time.monotonic()  # when a worker last took a batch
        self._cpu_mark = (time.monotonic(), time.process_time())  # for _nudge: this process's CPU use
        self.per_message: float | None = None  # seconds a delivery took, averaged (see batch_limit)
        self.results: queue.SimpleQueue[_Settled] = queue.SimpleQueue()
        self.delay_queues: set[int] = set()
        self.cancelled_by_broker = False
        self.set_aside_failures = 0  # in a row: the pause before requeueing a message that could not be set aside
        self.stalled = False  # the broker did not answer in time: the connection is abandoned, not closed
        self.consuming = False  # a consumer on the queue, on a connection still open
        self._drain_scheduled = threading.Lock()

    def open(self) -> None:
        with self.deadline("declaring the topology"):
            self.channel.confirm_delivery()
            declare_topology(self.channel, self.settings)
            # every delay queue now, not on the first retry: a declaration that stalls stalls here, before consuming
            for delay_ms in retry_delays_ms(RetryPolicy.from_config(self.listener.config)):
                declare_delay_queue(self.channel, self.settings, delay_ms)
                self.delay_queues.add(delay_ms)
            self.channel.basic_qos(prefetch_count=self.settings.prefetch)
            self.channel.add_on_cancel_callback(self._on_cancel)
            self.consumer_tag = self.channel.basic_consume(self.settings.queue_name, self._on_message)
        self.consuming = True

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
        self.consuming = False

    def _on_message(self, _channel: BlockingChannel, method: Basic.Deliver, properties: BasicProperties,
                    body: bytes) -> None:
        tag = method.delivery_tag
        self.unacked[tag] = False
        delivery = Delivery(id=f"{self.settings.queue_name}#{properties.message_id or tag}",
                            attempt=attempt_of(properties))
        with self._waiting_lock:
            self.waiting.append(_Received(tag, properties, body, delivery))
            if self.running >= self.settings.workers:
                return  # a running worker takes it
            if self.running == 0:
                self.running += 1
            else:  # a running worker takes it, unless the running ones are stuck: see _nudge
                if not self._nudge_due:
                    self._nudge_due = True
                    self.connection.call_later(STUCK_SECONDS, self._nudge)
                return
        self._start_worker()

    def _nudge(self) -> None:
        """While deliveries wait, start another worker (up to ``workers``) when the running ones leave the CPU idle.

        Workers running at once contend for the GIL (and SQLite's one connection): while the
        process keeps a core busy, one worker is fastest.  When they mostly wait -- database
        round trips, slow plugins, slow I/O -- or took no batch for ``STUCK_SECONDS``, another
        starts.  Checked every ``STUCK_SECONDS`` while deliveries wait.
        """
        now, cpu = time.monotonic(), time.process_time()
        (since, cpu_since), self._cpu_mark = self._cpu_mark, (now, cpu)
        cpu_share = (cpu - cpu_since) / max(1e-6, now - since)
        with self._waiting_lock:
            self._nudge_due = False
            if not self.waiting or self.running >= self.settings.workers:
                return
            start = now - self._last_take >= STUCK_SECONDS or cpu_share < CPU_BOUND
            if start:
                self.running += 1
            self._nudge_due = True
        if start:
            self._start_worker()
        self.connection.call_later(STUCK_SECONDS, self._nudge)

    def _start_worker(self) -> None:
        assert self.listener.pool is not None
        job = self.listener.pool.submit(self._work)
        self.jobs.add(job)
        job.add_done_callback(self.jobs.discard)
        if job.done():  # it finished before it was added
            self.jobs.discard(job)

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
            self.channel.basic_nack(settled.tag, requeue=True)
            self.unacked.pop(settled.tag, None)
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
        if tag in self.unacked and self.channel.is_open:  # a lost channel requeued it already
            self.channel.basic_nack(tag, requeue=True)
            del self.unacked[tag]
            self._flush_acks()

    def _publish_retry(self, settled: _Settled, outcome: Outcome) -> None:
        delay_ms = max(1, int(round(outcome.delay * 1000)))
        if delay_ms not in self.delay_queues:
            declare_delay_queue(self.channel, self.settings, delay_ms)
            self.delay_queues.add(delay_ms)
        headers = dict(settled.properties.headers or {})
        headers[ATTEMPT_HEADER] = outcome.attempt + 1 if outcome.counted else outcome.attempt
        headers[LAST_ERROR_HEADER] = _clip(outcome.reason)
        self.channel.basic_publish("", self.settings.delay_queue_name(delay_ms), settled.body,
                                   properties=self._copy_properties(settled.properties, headers),
                                   mandatory=True)

    def _publish_dead_letter(self, settled: _Settled, outcome: Outcome) -> None:
        headers = dict(settled.properties.headers or {})
        headers.pop(LAST_ERROR_HEADER, None)
        headers[REASON_HEADER] = _clip(outcome.reason or "failed")
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

    def take_waiting(self) -> list[_Received]:
        """Deliveries no worker has taken, removed from the queue (no worker takes them any more)."""
        with self._waiting_lock:
            taken = list(self.waiting)
            self.waiting.clear()
        return taken

    def requeue_unstarted(self) -> None:
        """On stop: deliveries not yet picked up by a worker go back to the queue."""
        for received in self.take_waiting():
            self.channel.basic_nack(received.tag, requeue=True)
            self.unacked.pop(received.tag, None)

    # -- worker threads ---------------------------------------------------------------------
    def batch_limit(self) -> int:
        """How many deliveries a worker takes at once: ``batch_size``, cut so that a batch takes about
        ``BATCH_SECONDS`` at the time per message measured so far (1 until something was measured).

        Quick plugins get full batches (their status writes shared); slow ones get small batches, so
        a message waits behind few others and a crash redoes little."""
        if self.per_message is None:
            return 1
        return max(1, min(self.settings.batch_size, int(BATCH_SECONDS / max(self.per_message, 1e-6))))

    def _work(self) -> None:
        """Take batches from ``waiting`` until it is empty; hand every outcome to the I/O thread."""
        while True:
            with self._waiting_lock:
                if not self.waiting:
                    self.running -= 1
                    return
                batch = [self.waiting.popleft() for _ in range(min(self.batch_limit(), len(self.waiting)))]
                self._last_take = time.monotonic()
            started = time.monotonic()
            outcomes = self._process(batch)
            seconds = (time.monotonic() - started) / len(batch)
            # a moving average: one slow message does not shrink the batches for long, one quick one not grow them
            self.per_message = seconds if self.per_message is None else 0.7 * self.per_message + 0.3 * seconds
            for received, outcome in zip(batch, outcomes, strict=True):
                self.results.put(_Settled(received.tag, received.properties, received.body, outcome))
            if self._drain_scheduled.acquire(blocking=False):  # one wake-up for a burst of results
                try:
                    self.connection.add_callback_threadsafe(self.drain)
                except Exception:  # the connection is gone: the broker redelivers these messages
                    log.info("connection lost before %d deliveries were acknowledged: the broker will "
                             "redeliver them", len(batch))

    def _process(self, batch: list[_Received]) -> list[Outcome | None]:
        process_batch = self.listener.process_batch
        try:
            if process_batch is not None:
                return list(process_batch([(r.body, r.delivery) for r in batch]))
        except BaseException:  # the processor promises not to raise; if it does (even SystemExit), requeue
            log.exception("processing a batch of %d deliveries raised", len(batch))
            return [None] * len(batch)
        outcomes: list[Outcome | None] = []
        for received in batch:
            try:
                outcomes.append(self.listener.process_message(received.body, received.delivery))
            except BaseException:  # as above: requeued
                log.exception("processing delivery %s raised", received.delivery.id)
                outcomes.append(None)
        return outcomes

    def in_flight(self) -> int:
        with self._waiting_lock:
            return self.running

    def close(self) -> None:
        self.consuming = False
        if not self.stalled:
            try:
                if self.connection.is_open:
                    with self.deadline("closing the connection"):
                        self.connection.close()
            except (pika.exceptions.AMQPError, ConnectorError, OSError):
                pass  # gone already, or stalled (then abandoned below)
        if self.stalled:
            abandon(self.connection)


class Listener(BatchListener):
    """Consumes ``msg_broker.queue_name`` until :meth:`stop`; reconnects by itself."""

    def __init__(self, config: dict[str, Any], process_message: ProcessMessage, workers: int | None = None,
                 process_batch: ProcessBatch | None = None) -> None:
        self.config = config
        self.process_message = process_message
        self.process_batch = process_batch
        self.settings = BrokerSettings.from_config({**config, **({"workers": workers} if workers else {})})
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None   # made by start_listeners
        self.sessions = 0       # connections opened by start_listeners: 1 while nothing went wrong
        self._stop = threading.Event()
        self._session: _Session | None = None

    def ping(self) -> None:
        connect(self.settings).close()

    def stop(self) -> None:
        """Stop consuming; in-flight messages finish and are acked, unstarted ones are requeued."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def consuming(self) -> bool:
        """Connected, with a consumer on the queue (``sqapi loader``'s liveness)."""
        session = self._session
        return session is not None and session.consuming

    def start_listeners(self) -> None:
        """Consume until :meth:`stop`; after a lost connection or a cancelled consumer, reconnect with backoff."""
        failures = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(self.settings.workers, thread_name_prefix="sqapi-worker")
        try:
            while not self._stop.is_set():
                try:
                    connection = connect(self.settings)
                    session = _Session(self, connection)
                    self._session = session
                    self.sessions += 1
                    try:
                        session.open()
                        log.info("consuming from queue '%s' at %s (prefetch %d, %d workers)",
                                 self.settings.queue_name, self.settings.where(), self.settings.prefetch,
                                 self.settings.workers)
                        failures = 0
                        self._consume(session)
                    finally:
                        self._wait_for_workers(session)
                        session.close()
                except (ConnectorError, pika.exceptions.AMQPError, OSError) as exc:
                    if self._stop.is_set():
                        break
                    failures += 1
                    delay = backoff(failures, self.settings.reconnect_initial, self.settings.reconnect_max)
                    log.warning("RabbitMQ connection lost or refused (%s); reconnecting in %.1fs",
                                _describe(exc), delay)
                    self._stop.wait(delay)
        finally:
            self.pool.shutdown(wait=True)
            log.info("listener stopped")

    def _consume(self, session: _Session) -> None:
        while not self._stop.is_set():
            session.connection.process_data_events(time_limit=0.5)
            if session.cancelled_by_broker:
                raise ConnectorError("consumer cancelled by the broker")
        # stopping: no new deliveries, hand back what no worker has started, finish the rest
        session.channel.basic_cancel(session.consumer_tag)
        session.requeue_unstarted()
        while session.in_flight():
            session.connection.process_data_events(time_limit=0.2)
        session.drain()

    def _wait_for_workers(self, session: _Session) -> None:
        """After a lost connection, let running workers finish before consuming again.

        Their deliveries cannot be acked any more (the broker redelivers them), but waiting keeps
        this loader from processing the same message twice at the same time.
        """
        session.take_waiting()
        concurrent.futures.wait(list(session.jobs))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text and isinstance(exc, ConnectorError | OSError) \
        else type(exc).__name__


# -- publishing ------------------------------------------------------------------------------------
class Publisher:
    """Publishes message bodies to the configured exchange with publisher confirms (``sqapi publish``)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.settings = BrokerSettings.from_config(config)
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def open(self) -> None:
        self._connection = connect(self.settings)
        try:
            self._channel = self._connection.channel()
            with deadline(self._connection, self.settings.confirm_timeout, "declaring the topology"):
                self._channel.confirm_delivery()
                declare_topology(self._channel, self.settings)
        except (pika.exceptions.AMQPError, BrokerStalled) as exc:
            if isinstance(exc, BrokerStalled):
                abandon(self._connection)
                self._connection = None
            self.close()
            raise ConnectorError(f"RabbitMQ at {self.settings.where()}: cannot declare the topology: "
                                 f"{_describe(exc)}") from None

    def publish(self, body: bytes, message_id: str | None = None, routing_key: str | None = None,
                headers: dict[str, Any] | None = None) -> None:
        """Publish one persistent message; returns once the broker confirmed it, raises ConnectorError if not."""
        if self._channel is None:
            self.open()
        assert self._channel is not None
        key = self.settings.routing_key if routing_key is None else routing_key
        properties = BasicProperties(content_type="application/json", delivery_mode=PERSISTENT,
                                     message_id=message_id, headers=headers, timestamp=int(time.time()))
        assert self._connection is not None
        try:
            with deadline(self._connection, self.settings.confirm_timeout, "a publish"):
                self._channel.basic_publish(self.settings.exchange_name, key, body, properties=properties,
                                            mandatory=True)
        except BrokerStalled:
            # a late confirm would answer the next publish: the next one opens a new connection
            abandon(self._connection)
            self._connection = self._channel = None
            raise
        except pika.exceptions.UnroutableError:
            raise ConnectorError(f"unroutable: exchange '{self.settings.exchange_name}' has no queue bound for "
                                 f"routing key '{key}'") from None
        except pika.exceptions.NackError:
            raise ConnectorError("the broker refused the message (nack)") from None
        except pika.exceptions.AMQPError as exc:
            raise ConnectorError(f"publishing failed: {_describe(exc)}") from None

    def publish_all(self, bodies: Iterable[tuple[str | None, bytes]], routing_key: str | None = None,
                    on_published: Callable[[str | None], None] | None = None) -> int:
        count = 0
        for message_id, body in bodies:
            self.publish(body, message_id=message_id, routing_key=routing_key)
            count += 1
            if on_published is not None:
                on_published(message_id)
        return count

    def close(self) -> None:
        if self._connection is not None:
            try:
                if self._connection.is_open:
                    with deadline(self._connection, self.settings.confirm_timeout, "closing the connection"):
                        self._connection.close()
            except BrokerStalled:
                abandon(self._connection)
            except (pika.exceptions.AMQPError, OSError):
                pass
        self._connection = None
        self._channel = None

    def __enter__(self) -> Publisher:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

