"""The status database's behaviour, written once and run against every database type (sqlite, postgres)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sqapi import registry

TYPES = ["sqlite", "postgres"]


@pytest.fixture(params=TYPES)
def database_section(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"type": "sqlite", "path": str(tmp_path / "status.db")}
    section: dict[str, Any] = request.getfixturevalue("pg_section")
    return section


@pytest.fixture
def database(database_section: dict[str, Any]) -> Iterator[Any]:
    db = registry.resolve("database", database_section["type"]).Database(dict(database_section))
    db.initialize_message_table()
    yield db
    db.close()


def message(uuid: str, **fields: Any) -> Any:
    values = {"uuid": uuid, "data_location": f"{uuid}.txt", "meta_location": None, "type": None,
              "hash_digest": None}
    values.update(fields)
    return SimpleNamespace(**values)


def write_script(tmp_path: Path, text: str, name: str = "init.sql") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_execute_query_takes_named_parameters_and_returns_rows_as_dicts(database: Any) -> None:
    database.execute_query("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    database.execute_query("INSERT INTO notes (id, body) VALUES (%(id)s, %(body)s)", id=1, body="it's 100%")
    rows = database.execute_query("SELECT id, body FROM notes WHERE id = %(id)s", id=1)
    assert rows == [{"id": 1, "body": "it's 100%"}]
    assert type(rows[0]) is dict


def test_a_statement_that_returns_no_rows_gives_an_empty_list(database: Any) -> None:
    assert database.execute_query("CREATE TABLE empty_one (id INTEGER)") == []
    assert database.execute_query("SELECT id FROM empty_one") == []


def test_execute_script_runs_every_statement_and_returns_the_rows_of_the_last(database: Any,
                                                                             tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        -- a comment; with a semicolon
        CREATE TABLE IF NOT EXISTS tags (name TEXT PRIMARY KEY, weight INTEGER);
        INSERT INTO tags (name, weight) VALUES (%(name)s, %(weight)s);
        SELECT name, weight FROM tags WHERE weight >= %(weight)s;
    """)
    assert database.execute_script(script, name="a;b", weight=3) == [{"name": "a;b", "weight": 3}]
    assert database.execute_query("SELECT COUNT(*) AS n FROM tags")[0]["n"] == 1


def test_a_sqapi_style_plugin_init_script_works_unchanged(database_section: dict[str, Any], tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        CREATE TABLE IF NOT EXISTS items (
            uuid_ref VARCHAR(255) PRIMARY KEY,
            title VARCHAR(255),
            size BIGINT,
            created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
        );
        CREATE INDEX IF NOT EXISTS items_title ON items (title);
    """)
    db = registry.resolve("database", database_section["type"]).Database(dict(database_section, init=script))
    try:
        db.initialize_database()
        db.initialize_database()  # a second start finds everything in place
        insert = ("INSERT INTO items (uuid_ref, title, size) VALUES (%(uuid_ref)s, %(title)s, %(size)s) "
                  "ON CONFLICT (uuid_ref) DO NOTHING")
        db.execute_query(insert, uuid_ref="u-1", title="report", size=10)
        db.execute_query(insert, uuid_ref="u-1", title="again", size=11)
        rows = db.execute_query("SELECT uuid_ref, title, size FROM items")
    finally:
        db.close()
    assert rows == [{"uuid_ref": "u-1", "title": "report", "size": 10}]


def test_update_message_creates_the_row_then_updates_it(database: Any) -> None:
    database.update_message(message("m-1", meta_location="meta/1"), "QUERYING")
    database.update_message(message("m-1", hash_digest="abc"), "FAILED", "data: not found")
    row = database.get_message("m-1")
    assert (row["status"], row["info"], row["meta_location"], row["hash_digest"]) == \
        ("FAILED", "data: not found", "meta/1", "abc")
    assert row["created_at"] <= row["updated_at"]
    assert database.get_message("nobody") is None


def test_record_attempt_gives_the_row_as_it_was_and_counts_every_attempt(database: Any) -> None:
    assert database.record_attempt(message("m-2"), "VALIDATING") is None
    database.update_message(message("m-2", hash_digest="h1"), "RETRY", "metadata: not found")
    previous = database.record_attempt(message("m-2"), "VALIDATING")
    assert (previous["status"], previous["info"], previous["attempts"]) == ("RETRY", "metadata: not found", 1)
    row = database.get_message("m-2")
    assert (row["status"], row["attempts"], row["hash_digest"]) == ("VALIDATING", 2, "h1")


def test_record_attempt_keeps_a_done_message_done(database: Any) -> None:
    database.record_attempt(message("m-3"), "VALIDATING")
    database.update_message(message("m-3"), "DONE")
    previous = database.record_attempt(message("m-3"), "VALIDATING")
    assert previous["status"] == "DONE"
    row = database.get_message("m-3")
    assert (row["status"], row["attempts"]) == ("DONE", 2)


def test_update_plugin_records_each_plugins_outcome_and_counts_its_runs(database: Any) -> None:
    database.update_message(message("m-4"), "PROCESSING")
    database.update_plugin("m-4", "indexer", "FAILED", "boom", 12.5)
    database.update_plugin("m-4", "indexer", "DONE", None, 3.0, '{"ok": true}')
    database.update_plugin("m-4", "archiver", "DONE", None, 1.0)
    rows = {row["plugin"]: row for row in database.get_plugin_rows("m-4")}
    assert sorted(rows) == ["archiver", "indexer"]
    assert (rows["indexer"]["status"], rows["indexer"]["attempts"], rows["indexer"]["result"],
            rows["indexer"]["duration_ms"]) == ("DONE", 2, '{"ok": true}', 3.0)


def test_list_messages_pages_newest_first_and_filters_by_status(database: Any) -> None:
    for n in range(5):
        database.update_message(message(f"p-{n}"), "DONE" if n % 2 == 0 else "FAILED")
        time.sleep(0.003)  # distinct updated_at values
    first = database.list_messages(limit=2)
    assert [r["uuid"] for r in first] == ["p-4", "p-3"]
    second = database.list_messages(limit=2, before=first[-1]["updated_at"])
    assert [r["uuid"] for r in second] == ["p-2", "p-1"]
    assert [r["uuid"] for r in database.list_messages(status="FAILED")] == ["p-3", "p-1"]


def test_list_messages_pages_by_updated_at_and_uuid_without_skipping_ties(database: Any) -> None:
    for n in range(4):
        database.update_message(message(f"tie-{n}"), "DONE")
    database.execute_query("UPDATE messages SET updated_at = %(t)s", t="2026-01-01T00:00:00.000+00:00")
    first = database.list_messages(limit=2)
    assert [r["uuid"] for r in first] == ["tie-0", "tie-1"]
    rest = database.list_messages(limit=5, before=first[-1]["updated_at"], before_uuid=first[-1]["uuid"])
    assert [r["uuid"] for r in rest] == ["tie-2", "tie-3"]


def test_list_messages_filters_by_plugin(database: Any) -> None:
    database.update_message(message("q-1"), "DONE")
    database.update_message(message("q-2"), "DONE")
    database.update_plugin("q-2", "indexer", "DONE")
    assert [r["uuid"] for r in database.list_messages(plugin="indexer")] == ["q-2"]


def test_count_by_status_counts_messages_per_status(database: Any) -> None:
    for uuid, status in [("c-1", "DONE"), ("c-2", "DONE"), ("c-3", "FAILED"), ("c-4", "RETRY")]:
        database.update_message(message(uuid), status)
    assert database.count_by_status() == {"DONE": 2, "FAILED": 1, "RETRY": 1}


def test_a_transaction_rolls_back_everything_when_it_fails(database: Any) -> None:
    database.update_message(message("t-0"), "DONE")
    with pytest.raises(RuntimeError):
        with database.transaction():
            database.update_message(message("t-1"), "DONE")
            with database.transaction():  # nested: joins the outer one
                database.update_message(message("t-0"), "FAILED", "should not stay")
            raise RuntimeError("abort")
    assert database.get_message("t-1") is None
    assert database.get_message("t-0")["status"] == "DONE"


def test_a_transaction_commits_when_it_ends_well(database: Any) -> None:
    with database.transaction():
        database.update_message(message("t-2"), "DONE")
        database.update_plugin("t-2", "p", "DONE")
    assert database.get_message("t-2")["status"] == "DONE"
    assert [r["plugin"] for r in database.get_plugin_rows("t-2")] == ["p"]


def test_a_claim_on_one_uuid_lets_one_thread_in_at_a_time(database: Any) -> None:
    inside, most = [0], [0]
    guard = threading.Lock()
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            with database.claim("same-uuid"):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.005)
                with guard:
                    inside[0] -= 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert most[0] == 1
