"""The whole pipeline on the production stores: status in PostgreSQL (own schema), metadata in Redis (own prefix)."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from sqapi.app import Sqapi
from sqapi.cli import main
from sqapi.core.outcome import Action, Delivery
from sqapi.errors import ConnectorError

# the plugin's side effect is a row in its own table, created by its sqAPI-style init script
RECORDER = """
    def execute(config, database, message, metadata, data):
        body = data.read()
        database.execute_query("INSERT INTO side_effects (uuid, title) VALUES (%(uuid)s, %(title)s)",
                               uuid=message.uuid, title=metadata.get("title"))
        return {"bytes": len(body), "title": metadata.get("title")}
"""
RECORDER_SQL = """
    CREATE TABLE IF NOT EXISTS side_effects (
        id SERIAL PRIMARY KEY,
        uuid VARCHAR(255) NOT NULL,
        title TEXT
    );
"""


@pytest.fixture
def production_app(make_app: Callable[..., Sqapi], write_plugin: Callable[..., Any], pg_section: dict[str, Any],
                   redis_section: dict[str, Any]) -> Sqapi:
    write_plugin("recorder", RECORDER, init_sql=RECORDER_SQL)
    return make_app({"database": pg_section, "meta_store": redis_section,
                     "active_plugins": ["recorder"],
                     "msg_broker": {"retry": {"max_attempts": 3, "initial_delay": 0.1}}})


def side_effects(app: Sqapi, uuid: str) -> int:
    rows = app.database.execute_query("SELECT COUNT(*) AS n FROM side_effects WHERE uuid = %(uuid)s", uuid=uuid)
    return int(rows[0]["n"])


def body(uuid: str, data: str, meta: str) -> bytes:
    return json.dumps({"uuid_ref": uuid, "data_location": data, "meta_location": meta}).encode()


def test_messages_are_processed_to_done_with_plugin_rows_in_postgres_and_metadata_from_redis(
        production_app: Sqapi, write_data: Callable[..., str], redis_client: redis.Redis, redis_prefix: str) -> None:
    for n in range(3):
        write_data(f"doc-{n}.txt", f"document {n}")
        redis_client.set(f"{redis_prefix}meta/{n}", json.dumps({"title": f"Doc {n}"}))
    outcomes = [production_app.process(body(f"u-{n}", f"doc-{n}.txt", f"meta/{n}"), Delivery(f"d-{n}"))
                for n in range(3)]
    assert [(o.status, o.action) for o in outcomes] == [("DONE", Action.ACK)] * 3
    db = production_app.database
    assert db.count_by_status() == {"DONE": 3}
    [plugin_row] = db.get_plugin_rows("u-1")
    assert (plugin_row["plugin"], plugin_row["status"]) == ("recorder", "DONE")
    assert json.loads(plugin_row["result"]) == {"bytes": 10, "title": "Doc 1"}
    row = db.get_message("u-1")
    assert (row["data_type"], row["meta_location"], len(row["hash_digest"])) == ("text/plain", "meta/1", 64)
    assert [side_effects(production_app, f"u-{n}") for n in range(3)] == [1, 1, 1]


def test_a_redelivered_done_message_runs_no_plugin_again(production_app: Sqapi, write_data: Callable[..., str],
                                                        redis_client: redis.Redis, redis_prefix: str) -> None:
    write_data("once.txt", "only once")
    redis_client.set(f"{redis_prefix}once", json.dumps({"title": "Once"}))
    first = production_app.process(body("u-once", "once.txt", "once"), Delivery("d-1"))
    again = production_app.process(body("u-once", "once.txt", "once"), Delivery("d-2", attempt=2))
    assert (first.status, again.status, again.action, again.skipped) == ("DONE", "DONE", Action.ACK, True)
    assert side_effects(production_app, "u-once") == 1
    assert production_app.database.get_message("u-once")["attempts"] == 2


def test_twenty_threads_processing_one_uuid_make_one_row_and_one_side_effect(
        production_app: Sqapi, write_data: Callable[..., str], redis_client: redis.Redis, redis_prefix: str) -> None:
    write_data("hot.txt", "everyone wants this one")
    redis_client.set(f"{redis_prefix}hot", json.dumps({"title": "Hot"}))
    start = threading.Barrier(20)
    outcomes: list[Any] = []

    def worker(n: int) -> None:
        start.wait()
        outcomes.append(production_app.process(body("u-hot", "hot.txt", "hot"), Delivery(f"d-{n}")))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted({o.status for o in outcomes}) == ["DONE"] and len(outcomes) == 20
    assert sum(not o.skipped for o in outcomes) == 1
    db = production_app.database
    assert db.execute_query("SELECT COUNT(*) AS n FROM messages WHERE uuid = 'u-hot'")[0]["n"] == 1
    assert db.get_message("u-hot")["attempts"] == 20
    assert side_effects(production_app, "u-hot") == 1


def test_twenty_threads_on_distinct_uuids_run_side_by_side(production_app: Sqapi, write_data: Callable[..., str],
                                                          redis_client: redis.Redis, redis_prefix: str) -> None:
    write_data("shared.txt", "shared data")
    redis_client.set(f"{redis_prefix}shared", json.dumps({"title": "Shared"}))
    outcomes: list[Any] = []
    threads = [threading.Thread(target=lambda n=n: outcomes.append(
        production_app.process(body(f"u-par-{n}", "shared.txt", "shared"), Delivery(f"d-{n}")))) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [o.status for o in outcomes] == ["DONE"] * 20
    assert production_app.database.execute_query("SELECT COUNT(*) AS n FROM side_effects")[0]["n"] == 20


def test_metadata_written_to_redis_after_the_first_attempt_is_picked_up_on_retry(
        production_app: Sqapi, write_data: Callable[..., str], redis_client: redis.Redis, redis_prefix: str) -> None:
    write_data("late.txt", "metadata comes later")
    first = production_app.process(body("u-late", "late.txt", "late"), Delivery("d-1", attempt=1))
    assert (first.status, first.action) == ("RETRY", Action.RETRY)
    assert "not found" in (first.reason or "")
    assert production_app.database.get_message("u-late")["status"] == "RETRY"
    redis_client.hset(f"{redis_prefix}late", mapping={"title": "Late", "pages": "3"})
    second = production_app.process(body("u-late", "late.txt", "late"), Delivery("d-1", attempt=2))
    assert (second.status, second.action) == ("DONE", Action.ACK)
    assert production_app.database.execute_query(
        "SELECT title FROM side_effects WHERE uuid = 'u-late'") == [{"title": "Late"}]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_database_at_startup_is_retried_then_a_clear_error_without_the_password(
        make_app: Callable[..., Sqapi], pg_section: dict[str, Any], redis_section: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()
    section = dict(pg_section, connection=dict(pg_section["connection"], port=port, password="pw-never-shown"),
                   connect_retry={"attempts": 3, "delay": 0.05, "max_delay": 0.1})
    caplog.set_level(logging.WARNING)
    with pytest.raises(ConnectorError) as raised:
        make_app({"database": section, "meta_store": redis_section})
    text = str(raised.value)
    assert f"cannot reach PostgreSQL at 127.0.0.1:{port}/" in text and "after 3 attempts" in text
    retries = [r for r in caplog.records if "unreachable (attempt" in r.getMessage()]
    assert len(retries) == 2
    assert "pw-never-shown" not in text + caplog.text


def test_the_cli_exits_with_the_reason_when_the_database_is_unreachable(
        write_config: Callable[..., Any], write_data: Callable[..., str], pg_section: dict[str, Any]) -> None:
    port = closed_port()
    section = dict(pg_section, connection=dict(pg_section["connection"], port=port, password="pw-never-shown"),
                   connect_retry={"attempts": 2, "delay": 0.05})
    config = write_config({"database": section})
    write_data("x.txt", "x")
    result = CliRunner().invoke(main, ["process", "-c", str(config), "data/x.txt"])
    assert result.exit_code == 1
    assert "startup failed: cannot reach PostgreSQL" in result.output
    assert "pw-never-shown" not in result.output


def test_two_loaders_on_one_database_run_a_duplicated_message_once(
        production_app: Sqapi, make_app: Callable[..., Sqapi], pg_section: dict[str, Any],
        redis_section: dict[str, Any], write_data: Callable[..., str], redis_client: redis.Redis,
        redis_prefix: str) -> None:
    # a second build has its own Database objects: only PostgreSQL's lock is shared, as between processes
    other = make_app({"database": pg_section, "meta_store": redis_section, "active_plugins": ["recorder"]})
    write_data("dup.txt", "delivered to both loaders")
    redis_client.set(f"{redis_prefix}dup", json.dumps({"title": "Dup"}))
    start = threading.Barrier(10)
    outcomes: list[Any] = []

    def worker(app: Sqapi, n: int) -> None:
        start.wait()
        outcomes.append(app.process(body("u-dup", "dup.txt", "dup"), Delivery(f"d-{n}")))

    threads = [threading.Thread(target=worker, args=(production_app if n % 2 else other, n)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [o.status for o in outcomes] == ["DONE"] * 10
    assert sum(not o.skipped for o in outcomes) == 1
    assert side_effects(production_app, "u-dup") == 1
