"""The RabbitMQ listener against the real broker: delivery, retries, dead letters, long plugins."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest

from sqapi.app import Sqapi
from sqapi.connectors.listeners.rabbitmq import BrokerSettings, Listener
from sqapi.errors import ConfigError, ConnectorError
from tests.rabbitmq.conftest import (
    connection,
    declare,
    depth,
    listening,
    message,
    publish,
    queue_types,
    queue_unresponsive,
    take_all,
    wait_until,
)


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
    # the delays waited in quorum queues, whose dead-lettering back to the main queue is at-least-once
    delays = {name: kind for name, kind in queue_types(vhost).items() if name.startswith("sqapi.delay.")}
    assert set(delays) == {"sqapi.delay.300ms", "sqapi.delay.600ms", "sqapi.delay.1200ms", "sqapi.delay.5000ms"}
    assert all(kind == "quorum" and "at-least-once" in arguments for kind, arguments in delays.values()), delays


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
    listener = Listener({**broker, "password": "s3cret-pw"})
    with pytest.raises(ConnectorError) as caught:
        listener.ping()
    assert "refused the credentials" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)
    Listener(broker).ping()


def test_settings_take_sqapi_names_and_bound_the_prefetch() -> None:
    settings = BrokerSettings.from_config({"exchange_name": "x", "queue_name": "q", "workers": 8})
    assert settings.exchange_name == "x" and settings.queue_name == "q"
    assert settings.prefetch >= settings.workers
    assert settings.dead_letter_name == "q.dead"


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


def test_a_message_that_cannot_be_set_aside_waits_with_growing_pauses_instead_of_spinning(
        app: Callable[..., Sqapi], vhost: str, broker: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """The dead-letter queue has no leader (its node is down; here: deleted once the listener consumes): the
    message is requeued after pauses, not at once, so it does not use up the main queue's delivery limit; once
    the queue is back it is set aside."""
    import time

    caplog.set_level("WARNING")  # whatever an earlier test's `sqapi` command left the root logger at
    sqapi = app()
    with listening(sqapi) as listener:
        wait_until(lambda: listener.sessions == 1 and "sqapi.delay.5000ms" in queue_types(vhost),
                   what="the listener consuming")
        with connection(vhost) as conn:
            conn.channel().queue_delete("sqapi.dead")
        publish(vhost, [b"not json at all"])
        time.sleep(3)
        assert "sqapi.dead" not in queue_types(vhost)
        declare(vhost, broker)  # at most a few tries in 3 s (0.5, 1, 2 s pauses): no spin
        wait_until(lambda: depth(vhost, "sqapi.dead") == 1, timeout=30, what="the message set aside at last")
    [(properties, _body)] = take_all(vhost, "sqapi.dead")
    assert properties.headers["x-sqapi-reason"].startswith("malformed message")
    pauses = [r.getMessage().rsplit(" ", 1)[1] for r in caplog.records if "could not set message" in r.getMessage()]
    assert pauses[:3] == ["0.5s", "1s", "2s"] and len(pauses) <= 5, pauses  # a handful of tries, not hundreds
    assert depth(vhost, "sqapi") == 0


def test_the_delay_queues_and_a_quorum_dead_letter_queue_exist_before_the_first_retry(
        app: Callable[..., Sqapi], vhost: str) -> None:
    """Declared when the session opens, not on the first retry: a declaration that stalls stalls there."""
    sqapi = app()
    with listening(sqapi):
        wait_until(lambda: "sqapi.delay.5000ms" in queue_types(vhost), what="the delay queues declared")
    types = queue_types(vhost)
    assert types["sqapi.dead"][0] == "quorum"
    assert types["sqapi.delay.300ms"][0] == "quorum" and "reject-publish" in types["sqapi.delay.300ms"][1]
    assert not any(".retry." in name for name in types), types  # classic delay queues only with quorum: false


def test_an_existing_classic_dead_letter_queue_is_kept_and_used(app: Callable[..., Sqapi], vhost: str) -> None:
    with connection(vhost) as conn:  # as an earlier release declared it
        channel = conn.channel()
        channel.exchange_declare("sqapi.dead", exchange_type="fanout", durable=True)
        channel.queue_declare("sqapi.dead", durable=True)
        channel.queue_bind("sqapi.dead", "sqapi.dead")
    sqapi = app()
    publish(vhost, [b"not json", message("fine")])
    with listening(sqapi) as listener:
        wait_until(lambda: depth(vhost, "sqapi.dead") == 1 and done_count(sqapi) == 1, what="set aside, and DONE")
    assert listener.sessions == 1
    assert queue_types(vhost)["sqapi.dead"][0] == "classic"
    [(properties, _body)] = take_all(vhost, "sqapi.dead")
    assert properties.headers["x-sqapi-reason"].startswith("malformed message")


def test_a_confirm_that_never_comes_drops_the_session_and_nothing_is_lost(
        app: Callable[..., Sqapi], vhost: str, write_data: Callable[[str, bytes | str], str],
        caplog: pytest.LogCaptureFixture) -> None:
    """The first delay queue's Raft server answers nothing (a node recovering): the retry's publisher confirm
    never comes.  After confirm_timeout the session is dropped (not waited on for ever) and a new one opens.
    The broker's own channel waits on that queue too and keeps what it was handed until the queue answers
    again; then the stalled message comes back and ends DONE, and so does one published meanwhile."""
    caplog.set_level("WARNING")
    sqapi = app(confirm_timeout=1)
    with listening(sqapi) as listener:
        wait_until(lambda: "sqapi.delay.300ms" in queue_types(vhost), what="the delay queues declared")
        with queue_unresponsive(vhost, "sqapi.delay.300ms"):
            publish(vhost, [message("late", data_location="late.txt")])
            wait_until(lambda: (sqapi.database.get_message("msg-late") or {}).get("status") == "RETRY",
                       what="the first attempt to fail")
            write_data("late.txt", "here now")
            wait_until(lambda: listener.sessions >= 2, what="the stalled session dropped and a new one opened")
            wait_until(lambda: any("did not answer the set-aside of message msg-late within 1s" in r.getMessage()
                                   for r in caplog.records), what="the stall logged with its reason")
            publish(vhost, [message("after")])
        wait_until(lambda: done_count(sqapi) == 2, what="both DONE once the queue answers again")
        wait_until(lambda: depth(vhost, "sqapi") == 0, what="the main queue empty")
    assert statuses(sqapi) == {"msg-late": "DONE", "msg-after": "DONE"}
    assert depth(vhost, "sqapi.dead") == 0


def test_a_huge_attempt_header_neither_overflows_the_delay_nor_stops_the_consumer(
        app: Callable[..., Sqapi], vhost: str) -> None:
    from sqapi.core.outcome import RetryPolicy

    assert RetryPolicy().delay_for(10 ** 6) == RetryPolicy().max_delay
    sqapi = app()
    with connection(vhost) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish("sqapi", "sqapi", json.dumps(message("huge", fail=True)).encode(),
                              pika.BasicProperties(delivery_mode=2, headers={"x-sqapi-attempt": 10 ** 6}))
    publish(vhost, [message("fine")])
    with listening(sqapi):
        wait_until(lambda: depth(vhost, "sqapi.dead") == 1 and done_count(sqapi) == 1,
                   what="the huge-attempt message set aside and the next one DONE")
    [(properties, _body)] = take_all(vhost, "sqapi.dead")
    assert "this message always fails" in properties.headers["x-sqapi-reason"]


def test_queue_and_exchange_names_default_to_sqapi_as_documented() -> None:
    from sqapi.connectors.listeners.rabbitmq import validate_config

    validate_config({"type": "rabbitmq"})  # nothing required beyond the type
    settings = BrokerSettings.from_config({"type": "rabbitmq"})
    assert (settings.queue_name, settings.exchange_name, settings.routing_key) == ("sqapi", "sqapi", "sqapi")
    with pytest.raises(ConfigError) as caught:
        validate_config({"type": "rabbitmq", "queue_name": 7})
    assert caught.value.key == "msg_broker.queue_name"
