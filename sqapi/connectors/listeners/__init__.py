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

A listener may also take ``process_batch(items: list[(raw, Delivery)]) -> list[Outcome]``
(keyword ``process_batch``): several deliveries processed together with shared status writes,
one outcome each, every one recorded before it returns.  ``Sqapi.create_listener`` passes it
when the listener's constructor names it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqapi.core.outcome import Delivery, Outcome

ProcessMessage = Callable[[bytes | str | Mapping[str, Any], Delivery], Outcome]
ProcessBatch = Callable[[list[tuple[bytes | str | Mapping[str, Any], Delivery]]], list[Outcome]]
