"""How much waits in the message broker, for the dashboard: per queue, its depth and its consumers.

What a listener type shows is its own (:meth:`~sqapi.connectors.listeners.Transport.queue_depths`: RabbitMQ's
work, ``.dead`` and delay queues, asked within ``msg_broker.confirm_timeout``; the spool folder's files
waiting, claimed, to retry and failed; nothing for any other type).  :class:`QueueWatch` asks one question
at a time: every open page polls, and while the broker is slow to answer the other polls get the last
answer at once instead of each holding an API thread on a connection of its own.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from sqapi import registry
from sqapi.connectors.listeners import queue_depths_for
from sqapi.connectors.listeners._queue_depths import QueueDepth
from sqapi.errors import SqapiError

__all__ = ["QueueDepth", "QueueWatch", "queue_depths"]


def queue_depths(broker: dict[str, Any]) -> list[QueueDepth]:
    """The depths of the ``msg_broker`` section's queues; :class:`~sqapi.errors.ConnectorError` when the broker
    cannot be asked (or does not answer in time)."""
    return queue_depths_for(registry.listener_class(broker), broker)


class QueueWatch:
    """:func:`queue_depths`, one question to the broker at a time: a caller that finds one in flight gets the
    last answer (and why it is not a fresh one) without waiting."""

    def __init__(self) -> None:
        self._asking = threading.Lock()
        self._last: tuple[float, list[QueueDepth], str | None] | None = None

    def read(self, broker: dict[str, Any]) -> tuple[list[QueueDepth], str | None]:
        """The depths and ``None``, or what is known and an error to show."""
        if not self._asking.acquire(blocking=False):
            last = self._last
            since = f" (the depths shown are {time.monotonic() - last[0]:.0f}s old)" if last and last[1] else ""
            return (last[1] if last else []), "still waiting for the broker's answer to the previous look" + since
        try:
            try:
                depths: list[QueueDepth] = queue_depths(broker)
                error = None
            except (SqapiError, OSError) as exc:  # a broker that cannot be asked, a type that is wrong
                depths, error = [], str(exc)
            self._last = (time.monotonic(), depths, error)
            return depths, error
        finally:
            self._asking.release()
