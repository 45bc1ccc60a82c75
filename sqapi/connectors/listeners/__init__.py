"""Listeners: where messages come from.

A listener module (``sqapi/connectors/listeners/<type>.py``, selected by ``msg_broker.type``)
provides ``class Listener``.  Two kinds are accepted:

* a **transport** -- a subclass of :class:`Transport`, built as ``Listener(config)`` from the
  ``msg_broker`` section (sqapi's own: ``rabbitmq``, ``directory``, ``memory``).  It only moves
  deliveries (:class:`sqapi.core.contracts.Transport`: open, receive, settle, hand back, close);
  one :class:`sqapi.core.consumer.Consumer` drives it -- worker threads, batches through the
  processor's ``process_batch``, reconnecting with backoff, stopping gracefully -- the same for
  every type;
* a listener written for **sqAPI** -- ``Listener(config, process_message)`` with
  ``start_listeners()`` (and, optionally, ``stop()`` and ``ping()``).  It runs its own loop and
  calls ``process_message(raw, delivery) -> Outcome``, acting on the outcome (``ACK`` removes
  the delivery, ``RETRY`` gives it again after ``outcome.delay`` seconds, ``DEAD_LETTER`` sets it
  aside with ``outcome.reason``).  :class:`SqapiListener` adapts it; nothing else in sqapi looks
  at what it has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sqapi.config import DEFAULT_WORKERS
from sqapi.core.consumer import (
    BATCH_SIZE,
    RECONNECT_INITIAL,
    RECONNECT_MAX,
    Consumer,
    Inbox,
    ProcessBatch,
    Received,
)
from sqapi.core.outcome import Delivery, Outcome

if TYPE_CHECKING:
    from sqapi.connectors.listeners._dead_letters import DeadLetters
    from sqapi.connectors.listeners._queue_depths import QueueDepth

ProcessMessage = Callable[[bytes | str | Mapping[str, Any], Delivery], Outcome]

__all__ = ["Inbox", "ProcessMessage", "Publisher", "Received", "SqapiListener", "Transport", "dead_letters_for",
           "make_listener", "publisher_for", "queue_depths_for"]


class Transport:
    """Base of sqapi's listener types (see :class:`sqapi.core.contracts.Transport` for the contract);
    the defaults suit a source that needs no connection."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def open(self) -> None:
        return None

    def receive(self, inbox: Inbox, timeout: float) -> None:
        raise NotImplementedError

    def settle(self, received: Sequence[Received], outcomes: Sequence[Outcome | None]) -> None:
        raise NotImplementedError

    def hand_back(self, received: Sequence[Received]) -> None:
        raise NotImplementedError

    def stop_receiving(self) -> None:
        return None

    def interrupt(self) -> None:
        return None

    def drained(self) -> bool:
        return False

    def close(self) -> None:
        return None

    def ping(self) -> None:
        return None

    @classmethod
    def publisher(cls, config: dict[str, Any]) -> Publisher:
        """What ``sqapi publish`` sends messages with; NotImplementedError for a type that cannot."""
        raise NotImplementedError

    @classmethod
    def dead_letters(cls, config: dict[str, Any]) -> DeadLetters:
        """Where this type sets messages aside, read back (``sqapi redrive``); NotImplementedError if it cannot."""
        raise NotImplementedError

    @classmethod
    def queue_depths(cls, config: dict[str, Any]) -> list[QueueDepth]:
        """How much waits in each of this type's queues (the dashboard), asked within a bounded time;
        :class:`~sqapi.errors.ConnectorError` when the source cannot be asked.  Default: nothing to show."""
        return []


class Publisher(Protocol):
    """Puts message bodies where a listener type receives them, each confirmed before ``publish`` returns."""

    def open(self) -> None: ...

    def publish(self, body: bytes, message_id: str | None = None, routing_key: str | None = None,
                headers: dict[str, Any] | None = None) -> None: ...

    def close(self) -> None: ...


class SqapiListener:
    """A listener written for sqAPI (``Listener(config, process_message)``), as sqapi runs listeners."""

    def __init__(self, listener: Any) -> None:
        self.listener = listener

    @property
    def consuming(self) -> bool:
        return bool(getattr(self.listener, "consuming", True))

    def start_listeners(self) -> None:
        self.listener.start_listeners()

    def stop(self) -> None:
        stop = getattr(self.listener, "stop", None)
        if callable(stop):
            stop()

    def ping(self) -> None:
        ping = getattr(self.listener, "ping", None)
        if callable(ping):
            ping()

    def close(self) -> None:
        return None


def publisher_for(listener_class: Any, config: dict[str, Any]) -> Publisher:
    """The publisher of a listener type; NotImplementedError for one that has none (sqAPI's kind among them)."""
    if isinstance(listener_class, type) and issubclass(listener_class, Transport):
        return listener_class.publisher(config)
    raise NotImplementedError


def dead_letters_for(listener_class: Any, config: dict[str, Any]) -> DeadLetters:
    """The messages a listener type set aside; NotImplementedError for one that cannot read them back."""
    if isinstance(listener_class, type) and issubclass(listener_class, Transport):
        return listener_class.dead_letters(config)
    raise NotImplementedError


def queue_depths_for(listener_class: Any, config: dict[str, Any]) -> list[QueueDepth]:
    """The depths of a listener type's queues (``[]`` for a type that shows none, or one not built on Transport)."""
    if isinstance(listener_class, type) and issubclass(listener_class, Transport):
        return listener_class.queue_depths(config)
    return []


def make_listener(listener_class: Any, config: dict[str, Any], process_message: ProcessMessage,
                  process_batch: ProcessBatch) -> Consumer | SqapiListener:
    """What runs a listener type: a :class:`Consumer` over a :class:`Transport`; sqAPI's kind adapted.

    ``config`` is the ``msg_broker`` section; its ``workers`` and ``batch_size`` size the consumer,
    ``reconnect`` its pauses after the source is lost."""
    if isinstance(listener_class, type) and issubclass(listener_class, Transport):
        reconnect = config.get("reconnect") or {}
        return Consumer(listener_class(config), process_batch, workers=int(config.get("workers") or DEFAULT_WORKERS),
                        batch_size=int(config.get("batch_size") or BATCH_SIZE),
                        reconnect_initial=float(reconnect.get("initial_delay", RECONNECT_INITIAL)),
                        reconnect_max=float(reconnect.get("max_delay", RECONNECT_MAX)))
    return SqapiListener(listener_class(config, process_message))
