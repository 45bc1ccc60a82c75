"""The RabbitMQ listener against the real broker: delivery, retries, dead letters, long plugins."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sqapi.app import Sqapi
from sqapi.connectors.listeners.rabbitmq import BrokerSettings, Listener, backoff
from sqapi.errors import ConnectorError
from tests.rabbitmq.conftest import declare, depth, listening, message, publish, take_all, wait_until


@pytest.fixture
def app(make_app: Callable[..., Sqapi], broker: dict[str, Any], record_plugin: Path,
        write_data: Callable[[str, bytes | str], str]) -> Callable[..., Sqapi]:
    write_data("item.txt", "hello")

    def make(**broker_overrides: Any) -> Sqapi:
        built = make_app({"msg_broker": {**broker, **broker_overrides}, "active_plugins": ["record"]})
        declare(broker["vhost"], {**broker, **broker_overrides})
        return built

    return make


def statuses(app: Sqapi) -> dict[str, str]:
    return {row["uuid"]: row["status"] for row in app.database.list_messages(limit=10000)}


def done_count(app: Sqapi) -> int:
    return app.database.count_by_status().get("DONE", 0)


def test_messages_in_sqapi_json_format_all_end_done_and_the_queue_is_empty(app: Callable[..., Sqapi],
                                                                            vhost: str) -> None:
    sqapi = app()
    publish(vhost, [message(n) for n in range(30)])
    with listening(sqapi):
        wait_until(lambda: done_count(sqapi) == 30, what="30 DONE")
    assert set(statuses(sqapi).values()) == {"DONE"}
    assert depth(vhost, "sqapi") == 0
    plugin_rows = sqapi.database.execute_query("SELECT status, COUNT(*) AS n FROM message_plugins GROUP BY status")
    assert plugin_rows == [{"status": "DONE", "n": 30}]


def test_a_plugin_running_longer_than_two_heartbeats_keeps_the_connection(app: Callable[..., Sqapi],
                                                                          vhost: str) -> None:
    # 8 s is four heartbeat intervals: a plugin run on pika's I/O thread this long loses the connection
    sqapi = app(heartbeat=2)
    publish(vhost, [message("slow", sleep=8), message("quick")])
    with listening(sqapi) as listener:
        wait_until(lambda: done_count(sqapi) == 2, timeout=20, what="both DONE")
    assert listener.sessions == 1, "the connection dropped and was reopened during the long plugin"
    runs = sqapi.database.execute_query("SELECT uuid FROM record_runs ORDER BY uuid")
    assert [r["uuid"] for r in runs] == ["msg-quick", "msg-slow"]
    assert depth(vhost, "sqapi") == 0


def test_a_poison_message_is_retried_with_growing_delays_then_dead_lettered_with_reason_and_plugin(
        app: Callable[..., Sqapi], vhost: str) -> None:
    sqapi = app()
    publish(vhost, [message("poison", fail=True)] + [message(n) for n in range(5)])
    with listening(sqapi):
        wait_until(lambda: depth(vhost, "sqapi.dead") == 1, timeout=20, what="the poison message dead-lettered")
        wait_until(lambda: done_count(sqapi) == 5, what="the others DONE")
    starts = [r["started"] for r in sqapi.database.execute_query(
        "SELECT started FROM record_runs WHERE uuid = 'msg-poison' ORDER BY started")]
    assert len(starts) == 3
    first_gap, second_gap = starts[1] - starts[0], starts[2] - starts[1]
    assert first_gap >= 0.3 and second_gap >= 0.6 and second_gap > first_gap
    [(properties, body)] = take_all(vhost, "sqapi.dead")
    headers = properties.headers
    assert b"msg-poison" in body
    assert "this message always fails" in headers["x-sqapi-reason"]
    assert "gave up after 3 attempts" in headers["x-sqapi-reason"]
    assert headers["x-sqapi-plugin"] == "record"
    assert headers["x-sqapi-attempts"] == 3
    assert statuses(sqapi)["msg-poison"] == "FAILED"
    assert depth(vhost, "sqapi") == 0


def test_a_permanent_plugin_failure_is_dead_lettered_without_retry(app: Callable[..., Sqapi], vhost: str) -> None:
    sqapi = app()
    publish(vhost, [message("refused", refuse=True)])
    with listening(sqapi):
        wait_until(lambda: depth(vhost, "sqapi.dead") == 1, what="dead-lettered")
    [(properties, _body)] = take_all(vhost, "sqapi.dead")
    assert properties.headers["x-sqapi-attempts"] == 1
    assert "refused for good" in properties.headers["x-sqapi-reason"]


def test_malformed_messages_are_dead_lettered_at_once_and_the_consumer_keeps_going(
        app: Callable[..., Sqapi], vhost: str) -> None:
    sqapi = app()
    publish(vhost, [b"this is not json", {"uuid_ref": "no-location"}, message("fine")])
    with listening(sqapi):
        wait_until(lambda: depth(vhost, "sqapi.dead") == 2, what="two dead letters")
        wait_until(lambda: done_count(sqapi) == 1, what="the good one DONE")
    dead = take_all(vhost, "sqapi.dead")
    reasons = sorted(p.headers["x-sqapi-reason"] for p, _ in dead)
    assert all(r.startswith("malformed message") for r in reasons)
    assert any("not valid JSON" in r for r in reasons)
    assert any("data_location" in r for r in reasons)
    assert all(p.headers["x-sqapi-attempts"] == 1 for p, _ in dead)
    row = sqapi.database.get_message("no-location")
    assert row["status"] == "FAILED" and "data_location" in row["info"]


def test_data_that_appears_after_the_first_attempt_is_picked_up_on_retry(
        app: Callable[..., Sqapi], vhost: str, write_data: Callable[[str, bytes | str], str]) -> None:
    sqapi = app()
    publish(vhost, [message("late", data_location="late.txt")])
    with listening(sqapi):
        wait_until(lambda: (sqapi.database.get_message("msg-late") or {}).get("status") == "RETRY",
                   what="the first attempt to fail")
        write_data("late.txt", "here now")
        wait_until(lambda: done_count(sqapi) == 1, what="DONE on retry")
    assert sqapi.database.get_message("msg-late")["attempts"] == 2
    assert depth(vhost, "sqapi.dead") == 0


def test_ping_fails_with_a_clear_error_that_never_shows_the_password(broker: dict[str, Any]) -> None:
    listener = Listener({**broker, "password": "s3cret-pw"}, lambda raw, delivery: None)  # type: ignore[arg-type]
    with pytest.raises(ConnectorError) as caught:
        listener.ping()
    assert "refused the credentials" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)
    Listener(broker, lambda raw, delivery: None).ping()  # type: ignore[arg-type]


def test_settings_take_sqapi_names_and_bound_the_prefetch() -> None:
    settings = BrokerSettings.from_config({"exchange_name": "x", "queue_name": "q", "workers": 8})
    assert settings.exchange_name == "x" and settings.queue_name == "q"
    assert settings.prefetch >= settings.workers
    assert settings.dead_letter_name == "q.dead"


def test_reconnect_backoff_grows_and_is_capped() -> None:
    delays = [backoff(n, initial=0.5, cap=4.0) for n in range(1, 10)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(d <= 4.0 for d in delays)
    assert max(delays[5:]) > 1.0


def test_sqapi_check_reaches_rabbitmq_and_names_it_when_down(
        write_config: Callable[..., Path], broker: dict[str, Any]) -> None:
    from click.testing import CliRunner

    from sqapi.cli import main

    up = CliRunner().invoke(main, ["check", "-c", str(write_config({"msg_broker": broker}))])
    assert "ok    msg_broker  rabbitmq" in up.output, up.output
    down_config = write_config({"msg_broker": {**broker, "port": 1, "password": "s3cret-pw"}})
    down = CliRunner().invoke(main, ["check", "-c", str(down_config)])
    assert down.exit_code == 1
    assert "FAIL  msg_broker  rabbitmq: RabbitMQ at 127.0.0.1:1" in down.output
    assert "s3cret-pw" not in down.output


@pytest.mark.parametrize("per_message, expected", [
    (None, 1),        # nothing measured yet: one delivery, so a slow first plugin holds up no other
    (0.0001, 128),    # quick: full batches (batch_size)
    (0.05, 10),       # 50 ms each: as many as fit in BATCH_SECONDS (0.5 s)
    (2.0, 1),         # slower than BATCH_SECONDS: one at a time
])
def test_batches_are_cut_to_the_measured_time_per_message(per_message: float | None, expected: int) -> None:
    from types import SimpleNamespace

    from sqapi.connectors.listeners.rabbitmq import _Session

    session = SimpleNamespace(per_message=per_message, settings=BrokerSettings.from_config({}))
    assert BrokerSettings.from_config({}).batch_size == 128
    assert _Session.batch_limit(session) == expected  # type: ignore[arg-type]


def test_a_message_that_cannot_be_set_aside_waits_with_growing_pauses_instead_of_spinning(
        app: Callable[..., Sqapi], vhost: str) -> None:
    """The dead-letter queue has no leader (its node is down; here: deleted): the message is requeued after pauses,
    not at once, so it does not use up the main queue's delivery limit; once the queue is back it is set aside."""
    import time

    from tests.rabbitmq.conftest import connection

    sqapi = app()
    with connection(vhost) as conn:
        conn.channel().queue_delete("sqapi.dead")
    publish(vhost, [b"not json at all"])
    with listening(sqapi):
        time.sleep(3)
        with connection(vhost) as conn:  # at most a few tries in 3 s (0.5, 1, 2 s pauses): no spin
            channel = conn.channel()
            channel.queue_declare("sqapi.dead", durable=True)
            channel.queue_bind("sqapi.dead", "sqapi.dead")
        wait_until(lambda: depth(vhost, "sqapi.dead") == 1, timeout=30, what="the message set aside at last")
    [(properties, _body)] = take_all(vhost, "sqapi.dead")
    assert properties.headers["x-sqapi-reason"].startswith("malformed message")
    assert int(properties.headers.get("x-delivery-count", 0)) <= 5  # redelivered a handful of times, not hundreds
    assert depth(vhost, "sqapi") == 0
