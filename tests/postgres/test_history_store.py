"""The history (message_events) as every status database type writes it, and ``sqapi prune`` -- written once, run
against SQLite and the real PostgreSQL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from sqapi import registry
from sqapi.app import Sqapi
from sqapi.core.outcome import Delivery
from sqapi.history import prune
from tests.postgres.test_database_contract import TYPES, message

SQAPI = str(Path(sys.executable).with_name("sqapi"))
LONG_AGO = "2020-01-01T00:00:00.000+00:00"


@pytest.fixture(params=TYPES)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The status database of each type, its core schema made."""
    section = {"type": "sqlite", "path": str(tmp_path / "status.db")} if request.param == "sqlite" \
        else dict(request.getfixturevalue("pg_section"))
    db = registry.resolve("database", section["type"]).Database(section)
    db.initialize_message_table()
    yield db
    db.close()


def events(database: Any, uuid: str) -> list[tuple[Any, ...]]:
    return [(e["attempt"], e["plugin"], e["status"], e["info"], e["version"]) for e in database.get_history(uuid)]


def test_every_plugin_outcome_and_every_attempts_outcome_is_an_event(database: Any) -> None:
    m = message("h-1")
    database.record_attempt(m, "QUERYING")
    database.update_messages([(m, "PROCESSING", None)])  # in between: no event
    database.record_progress([], [{"uuid": "h-1", "plugin": "a", "status": "FAILED", "info": "boom",
                                   "duration_ms": 2.5, "version": "1"},
                                  {"uuid": "h-1", "plugin": "b", "status": "DONE", "duration_ms": 1.0,
                                   "result": '{"n": 1}', "version": None}])
    database.record_progress([(m, "RETRY", "attempt 1 of 3 failed")], [])
    database.record_attempt(m, "QUERYING")
    database.record_progress([(m, "DONE", None)], [{"uuid": "h-1", "plugin": "a", "status": "DONE",
                                                    "duration_ms": 3.0, "version": "2"}], last=True)
    assert events(database, "h-1") == [
        (1, "a", "FAILED", "boom", "1"), (1, "b", "DONE", None, None),
        (1, None, "RETRY", "attempt 1 of 3 failed", None),
        (2, "a", "DONE", None, "2"), (2, None, "DONE", None, None)]
    history = database.get_history("h-1")
    assert {e["loader"] for e in history} == {f"{socket.gethostname()}:{os.getpid()}"}
    assert history[0]["duration_ms"] == 2.5 and isinstance(history[0]["at"], str)
    rows = {r["plugin"]: r for r in database.get_plugin_rows("h-1")}
    assert (rows["a"]["status"], rows["a"]["version"], rows["a"]["attempts"]) == ("DONE", "2", 2)
    assert rows["b"]["version"] is None


def test_the_one_row_writes_record_their_event_too(database: Any) -> None:
    m = message("h-2")
    database.record_attempt(m, "QUERYING")
    database.update_plugin("h-2", "a", "FAILED", "nope", 1.5, version="3")
    database.update_message(m, "FAILED", "gave up")
    database.update_message(m, "VALIDATING")  # not an attempt's outcome: no event
    assert events(database, "h-2") == [(1, "a", "FAILED", "nope", "3"), (1, None, "FAILED", "gave up", None)]


def test_forgetting_plugin_rows_keeps_their_history(database: Any) -> None:
    m = message("h-3")
    database.record_attempt(m, "QUERYING")
    database.update_plugin("h-3", "a", "DONE")
    database.forget_plugin_rows(["h-3"])  # new data under the uuid: the plugin rows are void, the past is not
    assert database.get_plugin_rows("h-3") == [] and events(database, "h-3") == [(1, "a", "DONE", None, None)]


def _finished(database: Any, uuid: str, status: str, long_ago: bool) -> None:
    m = message(uuid)
    database.record_attempt(m, "QUERYING")
    database.update_plugin(uuid, "a", "DONE" if status == "DONE" else "FAILED")
    database.update_message(m, status, None)
    if long_ago:
        database.execute_query("UPDATE message_events SET at = %(t)s WHERE uuid = %(u)s", t=LONG_AGO, u=uuid)
        database.execute_query("UPDATE messages SET updated_at = %(t)s WHERE uuid = %(u)s", t=LONG_AGO, u=uuid)


def test_prune_removes_only_what_is_older_and_a_dry_run_nothing(database: Any) -> None:
    _finished(database, "old-done", "DONE", long_ago=True)
    _finished(database, "old-failed", "FAILED", long_ago=True)
    _finished(database, "old-retry", "RETRY", long_ago=True)
    _finished(database, "new-done", "DONE", long_ago=False)
    counted = prune(database, timedelta(days=30), messages=True, dry_run=True)
    assert (counted.events, counted.messages, counted.dry_run) == (6, 2, True)
    assert counted.line().startswith("would remove 6 events older than ")
    assert len(database.get_history("old-done")) == 2  # nothing removed
    pruned = prune(database, timedelta(days=30))
    assert (pruned.events, pruned.messages) == (6, 0)
    assert pruned.line().startswith("removed 6 events older than ")
    assert [database.get_history(u) for u in ("old-done", "old-failed", "old-retry")] == [[], [], []]
    assert [e["status"] for e in database.get_history("new-done")] == ["DONE", "DONE"]
    assert {r["uuid"] for r in database.list_messages()} == {"old-done", "old-failed", "old-retry", "new-done"}
    with_messages = prune(database, timedelta(days=30), messages=True)
    assert (with_messages.events, with_messages.messages) == (0, 2)
    assert "2 finished messages (DONE, FAILED)" in with_messages.line()
    # the unfinished one and the recent one stay, with their plugin rows
    assert {r["uuid"] for r in database.list_messages()} == {"old-retry", "new-done"}
    assert database.get_plugin_rows("old-done") == [] and len(database.get_plugin_rows("old-retry")) == 1


def test_prune_with_messages_takes_their_newer_events_too(database: Any) -> None:
    _finished(database, "gone", "DONE", long_ago=True)
    database.update_plugin("gone", "late", "DONE")  # an event newer than the cutoff, of a message that goes
    assert prune(database, timedelta(days=30), messages=True).messages == 1
    assert database.get_history("gone") == [] and database.get_message("gone") is None


def test_prune_leaves_a_message_reopened_between_its_select_and_its_delete(
        database: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A redrive reopens ``old-1`` right after prune selected it (PostgreSQL: on another connection, committed;
    SQLite, whose prune holds the write lock: in the same transaction): it is not finished any more and stays."""
    import sqapi.history

    for uuid in ("old-1", "old-2"):
        _finished(database, uuid, "FAILED", long_ago=True)
    other = registry.database(dict(database.config)) if database.config["type"] == "postgres" else database
    query = database.execute_query

    def select_then_reopen(sql: str, **params: Any) -> list[dict[str, Any]]:
        rows = query(sql, **params)
        if sql == sqapi.history._SELECT_MESSAGES:
            other.execute_query("UPDATE messages SET status = 'RETRY', info = 'redrive: re-publishing', "
                                "attempts = 0, updated_at = %(t)s WHERE uuid = 'old-1'", t=LONG_AGO)
        return rows

    monkeypatch.setattr(database, "execute_query", select_then_reopen)
    try:
        pruned = prune(database, timedelta(days=30), messages=True)
    finally:
        if other is not database:
            other.close()
    monkeypatch.undo()
    assert pruned.messages == 1
    assert database.get_message("old-2") is None
    kept = database.get_message("old-1")
    assert kept is not None and kept["status"] == "RETRY"
    assert len(database.get_plugin_rows("old-1")) == 1


def test_prune_works_through_more_rows_than_one_batch(database: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqapi.history

    monkeypatch.setattr(sqapi.history, "BATCH", 3)
    for n in range(4):
        _finished(database, f"old-{n}", "DONE", long_ago=True)
    batches: list[int] = []
    assert prune(database, timedelta(hours=1), progress=batches.append).events == 8
    assert batches == [3, 3, 2]


def test_a_table_made_before_the_history_and_the_version_column_gets_them(database: Any) -> None:
    database.execute_query("DROP TABLE message_events")
    database.execute_query("ALTER TABLE message_plugins DROP COLUMN version")
    database.initialize_message_table()
    m = message("h-4")
    database.record_attempt(m, "QUERYING")
    database.update_plugin("h-4", "a", "DONE", version="7")
    assert database.get_plugin_rows("h-4")[0]["version"] == "7"
    assert events(database, "h-4") == [(1, "a", "DONE", None, "7")]


# -- the command ----------------------------------------------------------------------------------------------
def sqapi(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SQAPI, *args], cwd=workdir, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))


def test_sqapi_prune_counts_removes_and_refuses_a_bad_duration(workdir: Path, pg_section: dict[str, Any]) -> None:
    config = workdir / "cfg.yml"
    config.write_text(yaml.safe_dump({"database": pg_section}), encoding="utf-8")
    db = registry.database(dict(pg_section))
    db.initialize_message_table()
    try:
        _finished(db, "old", "DONE", long_ago=True)
        _finished(db, "new", "DONE", long_ago=False)
        dry = sqapi(workdir, "-c", str(config), "prune", "--older-than", "30d", "--messages", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.startswith("would remove 2 events older than ") and "1 finished message " in dry.stdout
        assert len(db.get_history("old")) == 2
        missing = sqapi(workdir, "-c", str(config), "prune")
        assert missing.returncode == 2 and "give --older-than DURATION" in missing.stderr
        bad = sqapi(workdir, "-c", str(config), "prune", "--older-than", "30 days")
        assert bad.returncode == 2 and "must be a duration like 30d, 12h" in bad.stderr
        # the config's retention is the default
        config.write_text(yaml.safe_dump({"database": pg_section, "processing": {"history_retention": "30d"}}))
        done = sqapi(workdir, "-c", str(config), "prune")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("removed 2 events older than ")
        assert db.get_history("old") == [] and len(db.get_history("new")) == 2
        assert db.get_message("old") is not None
    finally:
        db.close()


def test_a_history_retention_that_is_no_duration_stops_startup(workdir: Path) -> None:
    config = workdir / "cfg.yml"
    config.write_text("processing:\n  history_retention: 30\n", encoding="utf-8")
    result = sqapi(workdir, "-c", str(config), "prune")
    assert result.returncode == 1
    assert "processing.history_retention: must be a duration, not 30" in result.stderr
    assert "history_retention: 30d" in result.stderr


# -- plugin versions -----------------------------------------------------------------------------------------
PASS = "def execute(config, database, message, metadata, data):\n    return {'ok': True}\n"


@pytest.mark.parametrize("declared", [{"version": "2.0"}, {"plugin": {"version": "2.0"}}])
def test_a_plugin_declares_its_version_in_config_yml_and_every_run_records_it(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path],
        write_data: Callable[[str, bytes | str], str], declared: dict[str, Any]) -> None:
    write_plugin("versioned", PASS, config=declared)
    write_plugin("plain", PASS)
    app = make_app({"active_plugins": ["versioned", "plain"]})
    assert app.plugins.plugins["versioned"].version == "2.0" and app.plugins.plugins["plain"].version is None
    assert app.plugins.plugins["versioned"].describe()["version"] == "2.0"
    location = write_data("x.txt", "x")
    assert app.process({"uuid_ref": "v-1", "data_location": location}, Delivery(id="d", attempt=1)).status == "DONE"
    rows = {r["plugin"]: r["version"] for r in app.database.get_plugin_rows("v-1")}
    assert rows == {"versioned": "2.0", "plain": None}
    assert {e["plugin"]: e["version"] for e in app.database.get_history("v-1") if e["plugin"]} == rows


@pytest.mark.parametrize(("declared", "reason"), [
    ("version: 1.10\n", "version must be a non-empty string, not 1.1: quote it in config.yml, e.g. version: '1.10'"),
    ("version: '1'\nplugin:\n  version: '2'\n", "config.yml declares two versions, version: '1' and "
                                                 "plugin.version: '2': keep one"),
])
def test_a_version_that_is_no_string_fails_the_plugin_naming_the_fix(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], declared: str, reason: str) -> None:
    write_plugin("versioned", PASS, config=declared)
    app = make_app({"active_plugins": ["versioned"]})
    plugin = app.plugins.plugins["versioned"]
    assert plugin.state == "failed" and plugin.reason is not None and reason in plugin.reason


def test_sqapi_plugins_json_shows_the_version(workdir: Path, write_plugin: Callable[..., Path]) -> None:
    write_plugin("versioned", PASS, config={"version": "3"})
    (workdir / "cfg.yml").write_text("active_plugins: [versioned]\n", encoding="utf-8")
    listed = json.loads(sqapi(workdir, "-c", "cfg.yml", "plugins", "--json").stdout)
    assert {p["name"]: p["version"] for p in listed}["versioned"] == "3"


def test_the_plugin_events_find_their_attempt_by_key_and_never_scan_every_message(pg_section: dict[str, Any]) -> None:
    """The events of a batch's plugin rows look up each message's attempt count by its key: a join was planned as a
    scan of the whole messages table on every batch (the history then cost more the more messages there were)."""
    from sqapi.connectors.db.postgres import _UPDATE_PLUGINS

    db = registry.database(dict(pg_section))
    db.initialize_message_table()
    try:
        db.execute_query("INSERT INTO messages (uuid, status, attempts) SELECT 'm-' || n, 'DONE', 1 "
                         "FROM generate_series(1, 5000) AS n")
        db.execute_query("ANALYZE messages")
        rows = json.dumps([{"n": n, "uuid": f"m-{n}", "plugin": "p", "status": "DONE"} for n in range(1, 21)])
        plan = "\n".join(row["QUERY PLAN"] for row in db.execute_query(
            f"EXPLAIN {_UPDATE_PLUGINS}", now="2026-01-01T00:00:00+00:00", loader="here:1", rows=rows))
        assert "Seq Scan on messages" not in plan and "Index" in plan, plan
    finally:
        db.close()
