"""HealthCheck: a ping that hangs makes only its own component down, and is never queued twice."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from sqapi.api.health import Component, HealthCheck


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def test_a_hanging_ping_keeps_one_ping_in_flight_and_the_others_stay_up(release: threading.Event) -> None:
    calls: list[str] = []

    def hanging() -> None:
        calls.append("hanging")
        release.wait(30)

    components = [Component("database", "sqlite", hanging)] + [
        Component(name, "x", lambda: None) for name in ("msg_broker", "data_store", "meta_store")]
    health = HealthCheck(components, timeout=0.2)
    try:
        first = health.check()
        assert first["down"] == ["database"]
        assert first["components"]["database"]["error"] == "no answer within 0.2s"
        for _ in range(6):
            report = health.check()
            assert report["down"] == ["database"]
            assert report["components"]["database"]["error"] == "still checking, previous ping has not returned"
            assert all(report["components"][n]["state"] == "up" for n in ("msg_broker", "data_store", "meta_store"))
        assert calls == ["hanging"]
        release.set()
        for _ in range(50):
            if health.check()["status"] == "up":
                break
        else:
            pytest.fail("the component did not come back up once its ping returned")
        assert len(calls) >= 2
    finally:
        health.close()
