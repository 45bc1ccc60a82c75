"""The listener contract, written once and run against every listener type sqapi ships.

Each type is driven by the same consumer (sqapi.core.consumer); what differs is only where a
message waits: a RabbitMQ queue (real broker, a vhost of the test's own), a spool folder, or the
in-memory test listener.  A :class:`Source` per type publishes with that type's own publisher and
says what waits there and what was set aside, so every test below reads the same for each.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sqapi.app import Sqapi
from sqapi.connectors.listeners import publisher_for
from sqapi.connectors.listeners.directory import FAILED, RETRY
from sqapi.connectors.listeners.directory import Listener as SpoolListener
from sqapi.core.consumer import Consumer
from sqapi.errors import ConnectorError
from tests.rabbitmq.conftest import RECORD_INIT, RECORD_PLUGIN, depth, take_all, wait_until
from tests.rabbitmq.conftest import broker as broker  # noqa: F401  (fixtures, used by name)
from tests.rabbitmq.conftest import rabbitmq_up as rabbitmq_up  # noqa: F401
from tests.rabbitmq.conftest import vhost as vhost  # noqa: F401

TYPES = ["memory", "directory", "rabbitmq"]
RETRY_POLICY = {"max_attempts": 3, "initial_delay": 0.2, "multiplier": 2.0, "max_delay": 1.0}


class Source:
    """Where one listener type's messages wait, as a test sees it."""

    def __init__(self, section: dict[str, Any]) -> None:
        self.section = section
        self.consumer: Consumer | None = None

    def bind(self, consumer: Any) -> None:
        self.consumer = consumer

    def publish(self, body: dict[str, Any] | bytes) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        publisher = publisher_for(SpoolListener if self.section["type"] == "directory" else self._rabbit(),
                                  self.section)
        publisher.open()
        try:
            publisher.publish(raw, message_id=body.get("uuid_ref") if isinstance(body, dict) else None)
        finally:
            publisher.close()

    @staticmethod
    def _rabbit() -> Any:
        from sqapi.connectors.listeners.rabbitmq import Listener

        return Listener

    def waiting(self) -> int:
        """Deliveries at the source that no consumer settled."""
        raise NotImplementedError

    def set_aside(self) -> list[str]:
        """The reasons of what was dead-lettered."""
        raise NotImplementedError


class MemorySource(Source):
    def publish(self, body: dict[str, Any] | bytes) -> None:
        assert self.consumer is not None, "the in-memory listener exists only with its consumer"
        self.consumer.transport.publish(body)

    def waiting(self) -> int:
        assert self.consumer is not None
        return int(self.consumer.transport._unsettled)

    def set_aside(self) -> list[str]:
        assert self.consumer is not None
        return [d.reason or "" for d in self.consumer.transport.dead]


class SpoolSource(Source):
    @property
    def root(self) -> Path:
        return Path(self.section["directory"])

    def waiting(self) -> int:
        return len(list(self.root.glob("*.json"))) + len(list((self.root / RETRY).glob("*")))

    def set_aside(self) -> list[str]:
        return [p.read_text().splitlines()[0] for p in sorted((self.root / FAILED).glob("*.reason"))]


class RabbitSource(Source):
    def __init__(self, section: dict[str, Any]) -> None:
        super().__init__(section)
        self.dead: list[str] = []   # taken off the .dead queue so far

    def waiting(self) -> int:
        delays = [q for q in _queues(self.section["vhost"]) if ".delay." in q]
        return depth(self.section["vhost"], "sqapi") + sum(depth(self.section["vhost"], q) for q in delays)

    def set_aside(self) -> list[str]:
        self.dead += [str((p.headers or {}).get("x-sqapi-reason")) for p, _ in take_all(self.section["vhost"],
                                                                                         "sqapi.dead")]
        return self.dead


def _queues(vhost: str) -> list[str]:
    from tests.rabbitmq.conftest import queue_types

    return list(queue_types(vhost))


@pytest.fixture(params=TYPES)
def source(request: pytest.FixtureRequest, workdir: Path) -> Source:
    kind = request.param
    if kind == "rabbitmq":
        section = dict(request.getfixturevalue("broker"), retry=RETRY_POLICY)
        return RabbitSource(section)
    if kind == "directory":
        return SpoolSource({"type": "directory", "directory": str(workdir / "spool"), "poll_interval": 0.05,
                            "retry": RETRY_POLICY})
    return MemorySource({"type": "memory", "retry": RETRY_POLICY})


@pytest.fixture
def app(source: Source, make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path],
        write_data: Callable[[str, bytes | str], str]) -> Sqapi:
    write_plugin("record", RECORD_PLUGIN, init_sql=RECORD_INIT)
    write_data("item.txt", "hello")
    return make_app({"msg_broker": source.section, "active_plugins": ["record"]})


@pytest.fixture
def consuming(app: Sqapi, source: Source) -> Iterator[Callable[[], Any]]:
    """Start a consumer for the block (the source bound to it); stopped at the end of the test."""
    running: list[Any] = []

    def start() -> Any:
        consumer = app.create_listener()
        source.bind(consumer)
        context = consumer.running()
        context.__enter__()
        running.append(context)
        return consumer

    yield start
    for context in reversed(running):
        context.__exit__(None, None, None)


def message(n: int | str, **metadata: Any) -> dict[str, Any]:
    return {"uuid_ref": f"msg-{n}", "data_location": "item.txt", "data_type": "text/plain", "metadata": metadata}


def runs(app: Sqapi) -> dict[str, int]:
    rows = app.plugins.plugins["record"].database.execute_query(
        "SELECT uuid, COUNT(*) AS n FROM record_runs GROUP BY uuid")
    return {r["uuid"]: int(r["n"]) for r in rows}


def done(app: Sqapi) -> int:
    return app.database.count_by_status().get("DONE", 0)


def test_every_published_message_is_processed_once_and_leaves_the_source(
        app: Sqapi, source: Source, consuming: Callable[[], Any]) -> None:
    consuming()
    for n in range(30):
        source.publish(message(n))
    wait_until(lambda: done(app) == 30, what="30 messages DONE")
    assert runs(app) == {f"msg-{n}": 1 for n in range(30)}
    wait_until(lambda: source.waiting() == 0, what="the source empty")
    assert source.set_aside() == []


def test_a_retried_message_comes_back_as_the_next_attempt_after_its_delay(
        app: Sqapi, source: Source, consuming: Callable[[], Any],
        write_data: Callable[[str, bytes | str], str]) -> None:
    consuming()
    source.publish({**message("late"), "data_location": "late.txt"})
    wait_until(lambda: (app.database.get_message("msg-late") or {}).get("status") == "RETRY",
               what="the first attempt: RETRY, its data not there yet")
    write_data("late.txt", "here now")
    wait_until(lambda: done(app) == 1, what="the retry DONE")
    assert app.database.get_message("msg-late")["attempts"] == 2
    wait_until(lambda: source.waiting() == 0, what="the source empty")


def test_what_cannot_be_processed_is_set_aside_with_its_reason_and_the_rest_goes_on(
        app: Sqapi, source: Source, consuming: Callable[[], Any]) -> None:
    consuming()
    source.publish(b"{not json")
    source.publish(message("poison", fail=True))
    source.publish(message("fine"))
    wait_until(lambda: len(source.set_aside()) == 2 and done(app) == 1,
               what="both bad messages set aside, the good one DONE")
    reasons = source.set_aside()
    assert any(r.startswith("malformed message") for r in reasons), reasons
    assert any("gave up after 3 attempts" in r and "always fails" in r for r in reasons), reasons


@pytest.mark.parametrize("source", ["directory", "rabbitmq"], indirect=True)  # memory keeps nothing across consumers
def test_stopping_hands_back_what_was_not_started_and_a_next_consumer_finishes_it_all(
        app: Sqapi, source: Source, consuming: Callable[[], Any]) -> None:
    first = consuming()
    for n in range(12):
        source.publish(message(n, sleep=0.2))
    wait_until(lambda: done(app) >= 1, what="the first message DONE")
    first.stop()
    wait_until(lambda: not first.consuming and first.inbox.outstanding() == 0, what="the first consumer stopped")
    finished = done(app)
    assert finished < 12, "everything finished before the stop: the test proves nothing"
    assert app.database.count_by_status().get("DONE", 0) + source.waiting() == 12, "a message was lost"
    consuming()
    wait_until(lambda: done(app) == 12, timeout=60, what="the rest DONE by the next consumer")
    assert runs(app) == {f"msg-{n}": 1 for n in range(12)}, "a message ran twice or not at all"


@pytest.mark.parametrize("source", ["directory", "rabbitmq"], indirect=True)
def test_ping_says_when_the_source_cannot_be_reached_without_its_secrets(source: Source, workdir: Path) -> None:
    from sqapi.connectors.listeners import make_listener

    if isinstance(source, SpoolSource):
        (workdir / "blocked").write_text("a file where the spool folder should be")
        section = {**source.section, "directory": str(workdir / "blocked" / "spool")}
    else:
        section = {**source.section, "port": 1, "password": "s3cret-pw"}
    listener = make_listener(SpoolListener if isinstance(source, SpoolSource) else Source._rabbit(), section,
                             lambda *_: None, lambda *_: [])  # type: ignore[arg-type,return-value]
    with pytest.raises(ConnectorError) as caught:
        listener.ping()
    assert "s3cret-pw" not in str(caught.value)
    make_listener(SpoolListener if isinstance(source, SpoolSource) else Source._rabbit(), source.section,
                  lambda *_: None, lambda *_: []).ping()  # type: ignore[arg-type,return-value]
