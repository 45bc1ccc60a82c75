"""What a redrive does to the status database, on SQLite and the real PostgreSQL: its selection by time, the
reopen's compare-and-set and transaction, and the lock that lets one redrive or reprocess run at a time."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sqapi import registry
from sqapi.errors import SqapiError
from sqapi.redrive import PENDING, RUN_LOCK, Selection, reopen, select_rows
from sqapi.times import utc_text
from tests.postgres.test_database_contract import TYPES, message

AT = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)


@pytest.fixture(params=TYPES)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The status database of each type, its core schema made."""
    section = {"type": "sqlite", "path": str(tmp_path / "status.db")} if request.param == "sqlite" \
        else dict(request.getfixturevalue("pg_section"))
    db = registry.database(section)
    db.initialize_message_table()
    yield db
    db.close()


def _failed(database: Any, uuid: str, at: str = "2026-11-30T06:00:00.000+00:00") -> dict[str, Any]:
    m = message(uuid)
    database.record_attempt(m, "QUERYING")
    database.update_message(m, "FAILED", "gave up")
    database.execute_query("UPDATE messages SET updated_at = %(at)s WHERE uuid = %(uuid)s", at=at, uuid=uuid)
    return database.get_message(uuid)


def test_a_row_changed_at_exactly_since_or_until_is_selected(database: Any) -> None:
    _failed(database, "at-until", at=utc_text(AT))  # as the database writes it: 07:00:00.000+00:00
    _failed(database, "after", at="2026-11-30T07:00:00.001+00:00")
    assert [r["uuid"] for r in select_rows(database, Selection(until=AT))] == ["at-until"]
    assert [r["uuid"] for r in select_rows(database, Selection(since=AT))] == ["at-until", "after"]
    assert [r["uuid"] for r in select_rows(database, Selection(since=AT, until=AT))] == ["at-until"]


def test_a_pending_row_a_loader_finished_since_it_was_read_is_not_taken_over(database: Any) -> None:
    row = _failed(database, "m1")
    assert reopen(database, row, "2026-11-30T07:00:00.000+00:00") is not None  # then the run is killed
    pending = select_rows(database, Selection())[0]
    assert pending["info"].startswith(PENDING)
    database.update_message(message("m1"), "DONE", None)  # a loader got the first publish and finished it
    assert reopen(database, pending, "2026-11-30T07:05:00.000+00:00") is None
    assert database.get_message("m1")["status"] == "DONE"


def test_of_two_takers_of_one_pending_row_only_the_first_gets_it(database: Any) -> None:
    row = _failed(database, "m1")
    reopen(database, row, "2026-11-30T07:00:00.000+00:00")
    pending = select_rows(database, Selection())[0]  # two runs read the same pending row
    first = reopen(database, pending, "2026-11-30T07:05:00.000+00:00")
    assert first is not None and first.startswith(f"{PENDING} at 2026-11-30T07:05:00.000+00:00 (was FAILED: ")
    assert reopen(database, pending, "2026-11-30T07:05:00.000+00:00") is None  # the same moment, even
    assert database.get_message("m1")["info"] == first


def test_a_reopen_whose_history_event_fails_changes_nothing(database: Any) -> None:
    row = _failed(database, "m1")
    database.execute_query("ALTER TABLE message_events RENAME TO message_events_away")
    with pytest.raises((SqapiError, sqlite3.Error)):
        reopen(database, row, "2026-11-30T07:00:00.000+00:00")
    database.execute_query("ALTER TABLE message_events_away RENAME TO message_events")
    after = database.get_message("m1")
    assert (after["status"], after["info"]) == ("FAILED", "gave up")


HOLDER = """
import json, sys
from sqapi import registry
db = registry.database(json.loads(sys.argv[1]))
with registry.try_lock(db, sys.argv[2]) as held:
    print(held, flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held_elsewhere(database: Any) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the run lock of the same status database, until its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps(database.config), RUN_LOCK],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        yield holder
    finally:
        if holder.poll() is None:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(timeout=30)


def test_the_run_lock_is_seen_by_another_process_and_let_go_with_it(
        database: Any, held_elsewhere: subprocess.Popen[str]) -> None:
    with registry.try_lock(database, RUN_LOCK) as held:
        assert held is False
    with registry.try_lock(database, "another name") as held:
        assert held is True
    assert held_elsewhere.stdin is not None
    held_elsewhere.stdin.close()
    assert held_elsewhere.wait(timeout=30) == 0
    with registry.try_lock(database, RUN_LOCK) as held:
        assert held is True
        with registry.try_lock(database, RUN_LOCK) as again:  # in one process too
            assert again is False
