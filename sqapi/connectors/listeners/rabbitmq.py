"""``msg_broker: {type: rabbitmq, ...}`` -- the production listener (pika), at-least-once.

Topology, declared (idempotently) by every loader and by ``sqapi publish``::

    exchange <exchange_name> (<exchange_type>) --routing_key--> queue <queue_name>
        quorum queue (default) with x-delivery-limit; dead-letters to <queue>.dead
    queue <queue>.retry.<ms>ms    one per retry delay: TTL <ms>, then dead-lettered back to
                                  <queue_name> through the default exchange (only this queue)
    exchange + queue <queue>.dead where given-up and malformed messages wait, with headers
                                  x-sqapi-reason, x-sqapi-plugin, x-sqapi-attempts

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
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from sqapi.config import require_keys
from sqapi.connectors.listeners import ProcessBatch, ProcessMessage
from sqapi.core.outcome import Action, Delivery, Outcome
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
    delay = min(cap, initial * 2 ** max(0, failures - 1))
    return delay * random.uniform(0.5, 1.0)


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
        )

    @property
    def dead_letter_name(self) -> str:
        return f"{self.queue_name}.dead"

    def delay_queue_name(self, delay_ms: int) -> str:
        return f"{self.queue_name}.retry.{delay_ms}ms"

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
    require_keys(config, "msg_broker", [("queue_name", str), ("exchange_name", str)])
    for key in ("port", "prefetch", "heartbeat", "delivery_limit", "batch_size", "max_body_bytes",
                "max_inflight_bytes"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"msg_broker.{key}", f"must be a whole number, not {value!r}",
                              f"set msg_broker.{key} to a number like {getattr(BrokerSettings, key)}")
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
    channel.queue_declare(dead, durable=True)
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


def declare_delay_queue(channel: BlockingChannel, settings: BrokerSettings, delay_ms: int) -> str:
    """A queue holding messages ``delay_ms`` then dead-lettering them back to the main queue only.

    A classic queue: its dead-lettering is at most once, so a message whose delay ends while the
    main queue has no leader (its node down or restarting) is dropped -- measured by
    bench/faults.py (docs/faults.md).  Quorum delay queues (at-least-once dead-lettering) were
    tried: one that came back from a node crash without a leader held the loader's publisher
    confirm, and pika's blocking channel waits for a confirm with no timeout."""
    name = settings.delay_queue_name(delay_ms)
    channel.queue_declare(name, durable=True, arguments={
        "x-message-ttl": delay_ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.queue_name,
    })
    return name


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
        self._drain_scheduled = threading.Lock()

    def open(self) -> None:
        self.channel.confirm_delivery()
        declare_topology(self.channel, self.settings)
        self.channel.basic_qos(prefetch_count=self.settings.prefetch)
        self.channel.add_on_cancel_callback(self._on_cancel)
        self.consumer_tag = self.channel.basic_consume(self.settings.queue_name, self._on_message)

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
            if outcome.action is Action.RETRY:
                self._publish_retry(settled, outcome)
            else:
                self._publish_dead_letter(settled, outcome)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            # the queue it goes to has no leader now (a node down): requeue it, but only after a pause that grows,
            # so that it neither spins nor uses up the main queue's delivery limit while the node is away
            self.set_aside_failures += 1
            pause = min(SET_ASIDE_MAX_PAUSE, SET_ASIDE_PAUSE * 2 ** (self.set_aside_failures - 1))
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
        try:
            if self.connection.is_open:
                self.connection.close()
        except pika.exceptions.AMQPError:
            pass


class Listener:
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
            self._channel.confirm_delivery()
            declare_topology(self._channel, self.settings)
        except pika.exceptions.AMQPError as exc:
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
        try:
            self._channel.basic_publish(self.settings.exchange_name, key, body, properties=properties,
                                        mandatory=True)
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
                    self._connection.close()
            except pika.exceptions.AMQPError:
                pass
        self._connection = None
        self._channel = None

    def __enter__(self) -> Publisher:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

