"""How much waits in the message broker, for the dashboard: per queue, its depth and its consumers.

* RabbitMQ: the work queue, its ``.dead`` queue and every delay queue the retry policy uses, each
  asked with a passive ``queue.declare`` (it answers both numbers; no management plugin needed).
* The spool folder (``directory``): files waiting, claimed (being processed), waiting for a retry,
  and in ``failed/`` (dead-lettered).  A folder has no consumer count.
* Any other broker (``memory``, an outside type): nothing to show.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqapi.errors import ConnectorError

log = logging.getLogger(__name__)


@dataclass
class QueueDepth:
    name: str
    role: str                   # work, dead, delay; waiting, processing, retry, failed (spool)
    messages: int | None        # None: the queue does not exist (yet)
    consumers: int | None       # None: not known for this broker


def queue_depths(broker: dict[str, Any]) -> list[QueueDepth]:
    """The depths of the ``msg_broker`` section's queues; :class:`ConnectorError` when the broker cannot be asked."""
    kind = str(broker.get("type") or "")
    if kind == "rabbitmq":
        return _rabbitmq(broker)
    if kind == "directory":
        return _spool(broker)
    return []


def _rabbitmq(broker: dict[str, Any]) -> list[QueueDepth]:
    import pika.exceptions

    from sqapi.connectors.listeners._amqp import BrokerSettings, connect, retry_delays_ms
    from sqapi.core.outcome import RetryPolicy

    settings = BrokerSettings.from_config(broker)
    wanted = [(settings.queue_name, "work"), (settings.dead_letter_name, "dead")]
    wanted += [(settings.delay_queue_name(ms), "delay") for ms in retry_delays_ms(RetryPolicy.from_config(broker))]
    depths = []
    connection = connect(settings)
    try:
        channel = connection.channel()
        for name, role in wanted:
            try:
                declared = channel.queue_declare(name, passive=True).method
                depths.append(QueueDepth(name, role, int(declared.message_count), int(declared.consumer_count)))
            except pika.exceptions.ChannelClosedByBroker:  # 404: not declared yet (no loader has started)
                depths.append(QueueDepth(name, role, None, None))
                channel = connection.channel()
    except pika.exceptions.AMQPError as exc:
        raise ConnectorError(f"RabbitMQ at {settings.where()}: {exc.__class__.__name__}") from None
    finally:
        try:
            connection.close()
        except pika.exceptions.AMQPError:
            pass
    return depths


def _count(folder: Path, wanted: Any) -> int:
    try:
        with os.scandir(folder) as entries:
            return sum(1 for entry in entries if wanted(entry))
    except FileNotFoundError:
        return 0


def _spool(broker: dict[str, Any]) -> list[QueueDepth]:
    from sqapi.connectors.listeners.directory import FAILED, PROCESSING, RETRY

    root = Path(str(broker.get("directory") or ".sqapi/spool"))

    def message_file(entry: os.DirEntry[str]) -> bool:
        return entry.is_file() and not entry.name.startswith(".")

    waiting = _count(root, lambda e: message_file(e) and e.name.endswith(".json"))
    claimed = 0
    try:
        with os.scandir(root / PROCESSING) as owners:
            claimed = sum(_count(Path(owner.path), message_file) for owner in owners if owner.is_dir())
    except FileNotFoundError:
        pass
    retry = _count(root / RETRY, message_file)
    failed = _count(root / FAILED, lambda e: message_file(e) and not e.name.endswith(".reason"))
    return [QueueDepth(str(root), "waiting", waiting, None),
            QueueDepth(str(root / PROCESSING), "processing", claimed, None),
            QueueDepth(str(root / RETRY), "retry", retry, None),
            QueueDepth(str(root / FAILED), "failed", failed, None)]
