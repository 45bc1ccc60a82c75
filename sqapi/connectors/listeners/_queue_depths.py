"""How much waits where a listener type receives messages -- per queue, its depth and its consumers -- for the
dashboard (:meth:`~sqapi.connectors.listeners.Transport.queue_depths`).

* RabbitMQ: the work queue, its ``.dead`` queue and every delay queue the retry policy uses, each
  asked with a passive ``queue.declare`` (it answers both numbers; no management plugin needed),
  all within one :func:`~sqapi.connectors.listeners._amqp.deadline` of ``msg_broker.confirm_timeout``:
  a broker that stops answering gives a :class:`~sqapi.errors.ConnectorError`, not a wait for ever.
* The spool folder: files waiting, claimed (being processed), waiting for a retry, and in
  ``failed/`` (dead-lettered).  A folder has no consumer count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika.exceptions

from sqapi.connectors.listeners._amqp import (
    BrokerSettings,
    BrokerStalled,
    abandon,
    connect,
    deadline,
    describe,
    retry_delays_ms,
)
from sqapi.core.outcome import RetryPolicy
from sqapi.errors import ConnectorError

__all__ = ["QueueDepth", "amqp_queue_depths", "spool_queue_depths"]


@dataclass
class QueueDepth:
    name: str
    role: str                   # work, dead, delay; waiting, processing, retry, failed (spool)
    messages: int | None        # None: the queue does not exist (yet)
    consumers: int | None       # None: not known for this listener type


def amqp_queue_depths(config: Mapping[str, Any]) -> list[QueueDepth]:
    """The ``msg_broker`` section's RabbitMQ queues; :class:`ConnectorError` (never the password) when the broker
    cannot be reached or does not answer within ``confirm_timeout``."""
    settings = BrokerSettings.from_config(config)
    wanted = [(settings.queue_name, "work"), (settings.dead_letter_name, "dead")]
    wanted += [(settings.delay_queue_name(ms), "delay") for ms in retry_delays_ms(RetryPolicy.from_config(config))]
    depths = []
    connection = connect(settings)
    stalled = False
    try:
        with deadline(connection, settings.confirm_timeout, "the passive declares of the queue depths"):
            channel = connection.channel()
            for name, role in wanted:
                try:
                    declared = channel.queue_declare(name, passive=True).method
                    depths.append(QueueDepth(name, role, int(declared.message_count), int(declared.consumer_count)))
                except pika.exceptions.ChannelClosedByBroker:  # 404: not declared yet (no loader has started)
                    depths.append(QueueDepth(name, role, None, None))
                    channel = connection.channel()
    except BrokerStalled as exc:
        stalled = True
        raise ConnectorError(f"RabbitMQ at {settings.where()}: {exc}") from None
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise ConnectorError(f"RabbitMQ at {settings.where()}: {describe(exc)}") from None
    finally:
        _close(connection, settings, stalled)
    return depths


def _close(connection: Any, settings: BrokerSettings, stalled: bool) -> None:
    """Close without waiting on a broker that stopped answering: dropped at once (a late answer is never read)."""
    if stalled:
        abandon(connection)
        return
    try:
        if connection.is_open:
            with deadline(connection, settings.confirm_timeout, "closing the connection"):
                connection.close()
    except BrokerStalled:
        abandon(connection)
    except (pika.exceptions.AMQPError, OSError):
        pass


def _count(folder: Path, wanted: Callable[[os.DirEntry[str]], bool]) -> int:
    try:
        with os.scandir(folder) as entries:
            return sum(1 for entry in entries if wanted(entry))
    except FileNotFoundError:
        return 0


def spool_queue_depths(root: Path, processing: str, retry: str, failed: str) -> list[QueueDepth]:
    """The spool folder ``root``: files waiting, claimed under ``processing/<owner>/``, in ``retry/`` and in
    ``failed/`` (each without its ``.reason``); hidden (half-written) files are not counted."""
    def message_file(entry: os.DirEntry[str]) -> bool:
        return entry.is_file() and not entry.name.startswith(".")

    waiting = _count(root, lambda e: message_file(e) and e.name.endswith(".json"))
    claimed = 0
    try:
        with os.scandir(root / processing) as owners:
            claimed = sum(_count(Path(owner.path), message_file) for owner in owners if owner.is_dir())
    except FileNotFoundError:
        pass
    return [QueueDepth(str(root), "waiting", waiting, None),
            QueueDepth(str(root / processing), "processing", claimed, None),
            QueueDepth(str(root / retry), "retry", _count(root / retry, message_file), None),
            QueueDepth(str(root / failed), "failed",
                       _count(root / failed, lambda e: message_file(e) and not e.name.endswith(".reason")), None)]
