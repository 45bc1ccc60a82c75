"""Reading back what a listener type set aside -- RabbitMQ's ``<queue>.dead``, the spool folder's ``failed/`` --
for ``sqapi redrive``.

A :class:`DeadLetters` source yields each message set aside once per scan -- those there when the
scan began, never one set aside while it runs -- holding it (an unacked delivery, a file left
where it is) until :meth:`~DeadLetters.remove` drops it for good -- called only once its
re-publish is confirmed -- or :meth:`~DeadLetters.close` returns every letter not removed,
unchanged.  :meth:`~DeadLetters.count` only counts them (a dry run), holding none.  A scan
killed half-way loses nothing: RabbitMQ returns unacked deliveries when the connection drops,
and the spool's files stay until removed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from sqapi.connectors.listeners._amqp import (
    PLUGIN_HEADER,
    REASON_HEADER,
    BrokerSettings,
    BrokerStalled,
    abandon,
    connect,
    deadline,
    describe,
)
from sqapi.errors import ConnectorError

__all__ = ["AmqpDeadLetters", "DeadLetter", "DeadLetters", "SpoolDeadLetters"]


@dataclass
class DeadLetter:
    """One message set aside: its body as it was published, why, and by which plugin (when known)."""

    body: bytes
    reason: str | None
    plugin: str | None
    where: str                       # for people: the queue and position, or the file
    handle: Any = field(default=None, repr=False)


class DeadLetters(Protocol):
    """Where a listener type sets messages aside, read back one scan at a time."""

    @property
    def name(self) -> str: ...

    def open(self) -> None: ...

    def count(self) -> int: ...

    def scan(self) -> Iterator[DeadLetter]: ...

    def remove(self, letter: DeadLetter) -> None: ...

    def close(self) -> None: ...


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class AmqpDeadLetters:
    """``<queue>.dead``: each message taken with ``basic_get`` (unacked, so held by this connection),
    acked by :meth:`remove`; :meth:`close` returns the others to the queue.  A scan takes at most the
    messages the queue held when it began (its ``message_count``): those published later are behind them."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.settings = BrokerSettings.from_config(config)
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    @property
    def name(self) -> str:
        return self.settings.dead_letter_name

    def open(self) -> None:
        self._connection = connect(self.settings)
        self._channel = self._connection.channel()

    def count(self) -> int:
        """The messages ready in ``<queue>.dead`` (a passive declare: none is taken); on a connection of its own
        when not open."""
        if self._connection is not None:
            return self._depth()
        self.open()
        try:
            return self._depth()
        finally:
            self.close()

    def _depth(self) -> int:
        assert self._connection is not None and self._channel is not None, "open() first"
        queue = self.settings.dead_letter_name
        try:
            with deadline(self._connection, self.settings.confirm_timeout, f"a look at queue '{queue}'"):
                return int(self._channel.queue_declare(queue, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:  # no dead-letter queue: nothing was ever set aside
                self._channel = self._connection.channel()
                return 0
            raise ConnectorError(f"RabbitMQ at {self.settings.where()}: queue '{queue}': {describe(exc)}") \
                from None
        except (pika.exceptions.AMQPError, BrokerStalled) as exc:
            raise ConnectorError(f"RabbitMQ at {self.settings.where()}: queue '{queue}': {describe(exc)}") \
                from None

    def scan(self) -> Iterator[DeadLetter]:
        assert self._connection is not None and self._channel is not None, "open() first"
        queue = self.settings.dead_letter_name
        there = self._depth()  # a scan reads these only: a letter set aside while it runs stays for the next
        n = 0
        while n < there:
            try:
                with deadline(self._connection, self.settings.confirm_timeout, f"a get from queue '{queue}'"):
                    method, properties, body = self._channel.basic_get(queue, auto_ack=False)
            except (pika.exceptions.AMQPError, BrokerStalled) as exc:
                raise ConnectorError(f"RabbitMQ at {self.settings.where()}: reading queue '{queue}' failed: "
                                     f"{describe(exc)}") from None
            if method is None:
                return
            n += 1
            headers = properties.headers or {}
            yield DeadLetter(body=bytes(body), reason=_text(headers.get(REASON_HEADER)),
                             plugin=_text(headers.get(PLUGIN_HEADER)), where=f"{queue} #{n}",
                             handle=method.delivery_tag)

    def remove(self, letter: DeadLetter) -> None:
        assert self._connection is not None and self._channel is not None
        try:
            with deadline(self._connection, self.settings.confirm_timeout, "an ack"):
                self._channel.basic_ack(letter.handle)
        except (pika.exceptions.AMQPError, BrokerStalled) as exc:
            raise ConnectorError(f"RabbitMQ at {self.settings.where()}: removing {letter.where} failed: "
                                 f"{describe(exc)}") from None

    def close(self) -> None:
        """Drop the connection: RabbitMQ returns every letter not removed to ``<queue>.dead``, as it was."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is None:
            return
        try:
            if connection.is_open:
                with deadline(connection, self.settings.confirm_timeout, "closing the connection"):
                    connection.close()
        except BrokerStalled:
            abandon(connection)
        except (pika.exceptions.AMQPError, OSError):
            pass


class SpoolDeadLetters:
    """The spool folder's ``failed/``: each ``<name>`` with its ``<name>.reason`` beside it (reason first line,
    then ``plugin: P``); :meth:`remove` deletes both."""

    def __init__(self, root: Path) -> None:
        self.folder = root / "failed"

    @property
    def name(self) -> str:
        return str(self.folder)

    def open(self) -> None:
        return None

    def _letters(self) -> list[Path]:
        """The files set aside now (a list taken at once: a file set aside later is not in it)."""
        if not self.folder.is_dir():
            return []
        return [path for path in sorted(self.folder.iterdir())
                if not path.name.endswith(".reason") and not path.name.startswith(".") and path.is_file()]

    def count(self) -> int:
        return len(self._letters())

    def scan(self) -> Iterator[DeadLetter]:
        for path in self._letters():
            try:
                body = path.read_bytes()
            except FileNotFoundError:  # removed meanwhile (another redrive)
                continue
            reason, plugin = _read_reason(path.with_name(path.name + ".reason"))
            yield DeadLetter(body=body, reason=reason, plugin=plugin, where=str(path), handle=path)

    def remove(self, letter: DeadLetter) -> None:
        path: Path = letter.handle
        try:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".reason").unlink(missing_ok=True)
        except OSError as exc:
            raise ConnectorError(f"cannot remove {path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        return None


def _read_reason(path: Path) -> tuple[str | None, str | None]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None, None
    reason = lines[0] if lines else None
    plugin = next((line.partition(":")[2].strip() for line in lines[1:] if line.startswith("plugin:")), None)
    return reason, plugin
