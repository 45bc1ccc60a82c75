"""The dashboard's queue depths on the real RabbitMQ: the work queue, ``.dead`` and the delay queues, each with
its message and consumer counts from a passive declare (no management plugin); a broker that stalls or is down
gives the queue panel an answer within msg_broker.confirm_timeout, and one question at a time."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import pika
import pytest

from sqapi.api.app import create_app
from sqapi.api.queues import QueueWatch, queue_depths
from sqapi.app import Sqapi
from sqapi.errors import ConnectorError
from tests.rabbitmq.conftest import HOST, PORT, connection, declare, message, publish


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
    with pytest.raises(ConnectorError) as raised:
        queue_depths({**broker, "port": 1, "password": "s3cret-pw", "connect_timeout": 1})
    assert "s3cret-pw" not in str(raised.value)


QUEUE_DECLARE = (50).to_bytes(2, "big") + (10).to_bytes(2, "big")  # AMQP class queue, method declare


class StallingProxy:
    """A TCP proxy in front of the test's RabbitMQ that relays both ways until a client sends a ``queue.declare``;
    from then on the broker's answers are held back: a broker that stopped answering (a node recovering, a
    network that drops one direction), as its client sees it.  Closed: every connection drops."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stalled = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection((HOST, PORT))
            self.sockets += [client, upstream]
            threading.Thread(target=self._to_broker, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._to_client, args=(upstream, client), daemon=True).start()

    def _to_broker(self, client: socket.socket, upstream: socket.socket) -> None:
        pending, header = b"", True
        while chunk := _recv(client):
            pending += chunk
            if header and len(pending) >= 8:  # "AMQP" 0 0 9 1
                pending, header = pending[8:], False
            while not header and len(pending) >= 7 and len(pending) >= 8 + int.from_bytes(pending[3:7], "big"):
                size = int.from_bytes(pending[3:7], "big")
                if pending[0] == 1 and pending[7:11] == QUEUE_DECLARE:  # a method frame: queue.declare
                    self.stalled.set()  # before it reaches the broker: its answer is never relayed
                pending = pending[8 + size:]
            try:
                upstream.sendall(chunk)
            except OSError:
                return

    def _to_client(self, upstream: socket.socket, client: socket.socket) -> None:
        while chunk := _recv(upstream):
            if not self.stalled.is_set():
                try:
                    client.sendall(chunk)
                except OSError:
                    return

    def close(self) -> None:
        self.server.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


@pytest.fixture
def stalling() -> Any:
    proxy = StallingProxy()
    yield proxy
    proxy.close()


def test_a_broker_that_stops_answering_is_a_connector_error_within_confirm_timeout(
        vhost: str, broker: dict[str, Any], stalling: StallingProxy) -> None:
    """The passive declare's answer never comes: bounded by confirm_timeout (the listeners' deadline), the look is
    an error naming what did not answer, not a wait for ever."""
    declare(vhost, broker)
    with pytest.raises(ConnectorError) as raised:
        queue_depths({**broker, "port": stalling.port, "confirm_timeout": 1})
    assert stalling.stalled.is_set()
    assert f"RabbitMQ at {HOST}:{stalling.port}" in str(raised.value)
    assert "did not answer the passive declares of the queue depths within 1s" in str(raised.value)


def test_while_the_broker_is_slow_other_polls_get_the_last_answer_without_waiting(
        vhost: str, broker: dict[str, Any], stalling: StallingProxy) -> None:
    declare(vhost, broker)
    watch = QueueWatch()
    section = {**broker, "port": stalling.port, "confirm_timeout": 60}
    answers: list[tuple[list[Any], str | None]] = []
    first = threading.Thread(target=lambda: answers.append(watch.read(section)))
    first.start()
    try:
        assert stalling.stalled.wait(30), "the first look never asked the broker"
        shown, why = watch.read(section)  # a second poll meanwhile
        assert first.is_alive(), "the first look should still be waiting for its answer"
    finally:
        stalling.close()  # the connection drops: the first look ends
        first.join(30)
    assert shown == [] and why == "still waiting for the broker's answer to the previous look"
    [(depths, error)] = answers
    assert depths == [] and error is not None and error.startswith(f"RabbitMQ at {HOST}:{stalling.port}")


@pytest.fixture
def dashboard_app(make_app: Callable[..., Sqapi], broker: dict[str, Any]) -> Callable[..., Any]:
    def make(**broker_overrides: Any) -> Any:
        return create_app(make_app({"msg_broker": {**broker, **broker_overrides}, "active_plugins": []}))

    return make


def test_the_dashboard_queue_panel_says_a_stalled_broker_did_not_answer(
        vhost: str, broker: dict[str, Any], dashboard_app: Callable[..., Any], stalling: StallingProxy) -> None:
    declare(vhost, broker)
    client = dashboard_app(port=stalling.port, confirm_timeout=1).test_client()
    state = client.get("/dashboard/state").get_json()
    assert state["queues"] == []
    assert any(e.startswith(f"message broker: RabbitMQ at {HOST}:{stalling.port}") and "did not answer" in e
               for e in state["errors"]), state["errors"]


def test_the_dashboard_queue_panel_says_a_down_broker_is_unreachable(
        vhost: str, dashboard_app: Callable[..., Any]) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # a port nothing answers on: the broker is down
    port = listener.getsockname()[1]
    listener.close()
    client = dashboard_app(port=port, password="s3cret-pw").test_client()
    state = client.get("/dashboard/state").get_json()
    assert state["queues"] == []
    assert any(e.startswith("message broker: RabbitMQ at") and "unreachable" in e for e in state["errors"]), \
        state["errors"]
    assert "s3cret-pw" not in str(state)
