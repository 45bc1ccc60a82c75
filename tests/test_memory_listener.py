"""The in-memory listener (msg_broker.type: memory): tests publish, then join() -- no sleep-polling."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sqapi.app import Sqapi

RECORD = '''
def execute(config, database, message, metadata, data):
    if metadata.get("fail"):
        raise RuntimeError("always fails")
    return {"size": len(data.read())}
'''


@pytest.fixture
def app(make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path]) -> Sqapi:
    write_plugin("record", RECORD)
    return make_app({"msg_broker": {"type": "memory", "retry": {"max_attempts": 3, "initial_delay": 0.05,
                                                                "multiplier": 2.0, "max_delay": 1.0}},
                     "active_plugins": ["record"]})


def test_published_messages_are_processed_in_batches_and_join_waits_for_all(
        app: Sqapi, write_data: Callable[[str, bytes | str], str]) -> None:
    location = write_data("a.txt", "hello")
    with app.create_listener().running() as consumer:
        listener = consumer.transport
        for n in range(20):
            listener.publish({"uuid_ref": f"m{n}", "data_location": location})
        listener.join()
    assert sorted(listener.acked) == sorted(f"m{n}" for n in range(20))
    assert app.database.count_by_status() == {"DONE": 20}


def test_a_retry_waits_its_delay_and_join_waits_for_it_too(
        app: Sqapi, write_data: Callable[[str, bytes | str], str]) -> None:
    with app.create_listener().running() as consumer:
        listener = consumer.transport
        listener.publish({"uuid_ref": "late", "data_location": "late.txt"})
        listener.wait_until(lambda: listener.outcomes)  # the first attempt: RETRY, the data is not there yet
        write_data("late.txt", "here now")
        listener.join()
    assert [o.status for o in listener.outcomes] == ["RETRY", "DONE"]
    assert listener.acked == ["late"] and app.database.get_message("late")["attempts"] == 2


def test_what_cannot_be_processed_is_dead_lettered_with_its_reason(
        app: Sqapi, write_data: Callable[[str, bytes | str], str]) -> None:
    location = write_data("a.txt", "hello")
    with app.create_listener().running() as consumer:
        listener = consumer.transport
        listener.publish(b"not json")
        listener.publish({"uuid_ref": "poison", "data_location": location, "metadata": {"fail": True}})
        listener.publish({"uuid_ref": "fine", "data_location": location})
        listener.join()
    reasons = sorted(d.reason or "" for d in listener.dead)
    assert reasons[0].startswith("gave up after 3 attempts") and "always fails" in reasons[0]
    assert reasons[1].startswith("malformed message")
    assert listener.acked == ["fine"]


def test_join_says_what_is_unsettled_when_nothing_consumes(app: Sqapi) -> None:
    listener = app.create_listener().transport
    listener.publish({"uuid_ref": "x", "data_location": "x.txt"})
    with pytest.raises(TimeoutError, match="1 message"):
        listener.join(timeout=0.2)
