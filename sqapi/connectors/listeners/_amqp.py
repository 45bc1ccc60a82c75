"""RabbitMQ plumbing shared by the ``rabbitmq`` listener and ``sqapi publish``: the settings of the
``msg_broker`` section, connecting, the topology, bounding blocking waits, and :class:`Publisher`.

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
``confirm_timeout``: past it the connection is dropped and opened again (see :func:`deadline`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import BasicProperties

from sqapi.config import DEFAULT_WORKERS, require_keys
from sqapi.core.consumer import BATCH_SIZE
from sqapi.core.outcome import RetryPolicy
from sqapi.errors import ConfigError, ConnectorError

log = logging.getLogger("sqapi.connectors.listeners.rabbitmq")

ATTEMPT_HEADER = "x-sqapi-attempt"
REASON_HEADER = "x-sqapi-reason"
PLUGIN_HEADER = "x-sqapi-plugin"
ATTEMPTS_HEADER = "x-sqapi-attempts"
QUEUE_HEADER = "x-sqapi-queue"
LAST_ERROR_HEADER = "x-sqapi-last-error"
MAX_HEADER_CHARS = 2000
PERSISTENT = 2
EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")


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
    workers: int = DEFAULT_WORKERS
    max_body_bytes: int = 1 << 20
    max_inflight_bytes: int = 256 << 20
    confirm_timeout: float = 30.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BrokerSettings:
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
            max_body_bytes=max_body,
            max_inflight_bytes=inflight,
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


DEFAULTS = {name: f.default for name, f in BrokerSettings.__dataclass_fields__.items()}


def validate_config(config: dict[str, Any]) -> None:
    # queue_name and exchange_name default to "sqapi" (BrokerSettings); given, they must be strings
    given = [(key, str) for key in ("queue_name", "exchange_name") if config.get(key) not in (None, "")]
    require_keys(config, "msg_broker", given)
    for key in ("port", "prefetch", "heartbeat", "delivery_limit", "batch_size", "max_body_bytes",
                "max_inflight_bytes"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"msg_broker.{key}", f"must be a whole number, not {value!r}",
                              f"set msg_broker.{key} to a number like {DEFAULTS.get(key, BATCH_SIZE)}")
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
                 name, clip(exc.reply_text))
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


#: the W3C trace context headers a publisher may set (``sqapi publish`` and ``POST /messages`` do when tracing is on)
TRACE_HEADERS = ("traceparent", "tracestate")


def trace_context_of(properties: BasicProperties) -> dict[str, str] | None:
    """The publisher's W3C trace context from the AMQP headers (``None`` when it sent none)."""
    headers = properties.headers
    if not headers or "traceparent" not in headers:
        return None
    found = {}
    for name in TRACE_HEADERS:
        value = headers.get(name)
        if isinstance(value, bytes):  # pika gives AMQP long strings as bytes
            value = value.decode("latin-1")
        if isinstance(value, str):
            found[name] = value
    return found or None


def clip(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= MAX_HEADER_CHARS else text[: MAX_HEADER_CHARS - 3] + "..."


def describe(exc: BaseException) -> str:
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
                                 f"{describe(exc)}") from None

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
            raise ConnectorError(f"publishing failed: {describe(exc)}") from None

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

