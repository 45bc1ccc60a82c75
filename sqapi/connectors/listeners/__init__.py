"""Listeners: where messages come from.

A listener module (``sqapi/connectors/listeners/<type>.py``, selected by ``msg_broker.type``)
provides ``class Listener(config: dict, process_message)``:

* ``config`` is the ``msg_broker`` section;
* ``process_message(raw, delivery: Delivery) -> Outcome`` is the processor's entry point;
  the listener acts on the outcome -- ``ACK`` removes the delivery, ``RETRY`` redelivers it
  after ``outcome.delay`` seconds, ``DEAD_LETTER`` sets it aside with ``outcome.reason``;
* ``start_listeners()`` blocks, consuming until ``stop()`` is called (from a signal handler
  or another thread); in-flight messages are finished or handed back, never lost;
* ``ping()`` (optional) checks that the source is reachable.

A listener that subclasses :class:`BatchListener` also takes ``process_batch(items: list[(raw,
Delivery)]) -> list[Outcome]`` (keyword ``process_batch``): several deliveries processed together
with shared status writes, one outcome each, every one recorded before it returns.  A listener
written for sqAPI -- ``Listener(config, process_message)`` -- works unchanged: it is given
``process_message`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqapi.core.outcome import Delivery, Outcome

ProcessMessage = Callable[[bytes | str | Mapping[str, Any], Delivery], Outcome]
ProcessBatch = Callable[[list[tuple[bytes | str | Mapping[str, Any], Delivery]]], list[Outcome]]


class BatchListener:
    """Marks a listener class whose constructor takes ``process_batch`` (and ``workers``) besides
    ``process_message``: ``Listener(config, process_message, workers=None, process_batch=None)``."""

    def __init__(self, config: dict[str, Any], process_message: ProcessMessage, workers: int | None = None,
                 process_batch: ProcessBatch | None = None) -> None:
        raise NotImplementedError  # the listener's own constructor takes these


def make_listener(listener_class: Any, config: dict[str, Any], process_message: ProcessMessage,
                  process_batch: ProcessBatch) -> Any:
    """An instance of a listener type: batches for a :class:`BatchListener`, sqAPI's two arguments otherwise."""
    if isinstance(listener_class, type) and issubclass(listener_class, BatchListener):
        return listener_class(config, process_message, process_batch=process_batch)
    return listener_class(config, process_message)
