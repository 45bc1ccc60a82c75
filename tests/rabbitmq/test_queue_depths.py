"""The dashboard's queue depths on the real RabbitMQ: the work queue, ``.dead`` and the delay queues, each with
its message and consumer counts from a passive declare (no management plugin)."""

from __future__ import annotations

from typing import Any

import pika

from sqapi.api.queues import queue_depths
from tests.rabbitmq.conftest import connection, declare, message, publish


def test_depths_and_consumers_of_the_work_dead_and_delay_queues(vhost: str, broker: dict[str, Any]) -> None:
    declare(vhost, broker)
    publish(vhost, [message(n) for n in range(3)])
    with connection(vhost) as conn:
        channel = conn.channel()
        channel.basic_publish("sqapi.dead", "sqapi", b"{}", pika.BasicProperties(delivery_mode=2))
        watcher = connection(vhost)
        try:
            watcher.channel().basic_consume("sqapi.dead", lambda *args: None)  # one consumer, prefetch unlimited
            depths = {d.name: d for d in queue_depths(broker)}
        finally:
            watcher.close()
    assert depths["sqapi"].role == "work" and depths["sqapi"].messages == 3 and depths["sqapi"].consumers == 0
    assert depths["sqapi.dead"].role == "dead" and depths["sqapi.dead"].consumers == 1
    delays = [d for d in depths.values() if d.role == "delay"]
    assert delays and all(d.messages is None for d in delays)  # no loader declared them yet: said so, no error
    assert sorted(depths) == sorted({"sqapi", "sqapi.dead", *(d.name for d in delays)})


def test_an_unreachable_broker_is_a_connector_error_without_the_password(vhost: str, broker: dict[str, Any]) -> None:
    import pytest

    from sqapi.errors import ConnectorError

    with pytest.raises(ConnectorError) as raised:
        queue_depths({**broker, "port": 1, "password": "s3cret-pw", "connect_timeout": 1})
    assert "s3cret-pw" not in str(raised.value)
