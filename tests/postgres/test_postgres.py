"""What only the PostgreSQL status database does: pooling, error translation, cross-process claims."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sqapi.connectors.db.postgres import Database, QueryError, validate_config
from sqapi.errors import ConfigError, ConnectorError
from tests.services import pg_connect


@pytest.fixture
def database(pg_section: dict[str, Any]) -> Iterator[Database]:
    db = Database(dict(pg_section))
    db.initialize_message_table()
    yield db
    db.close()


def backend_pid(db: Database) -> int:
    return int(db.execute_query("SELECT pg_backend_pid() AS pid")[0]["pid"])


def test_the_constructor_opens_no_connection(pg_section: dict[str, Any]) -> None:
    db = Database(dict(pg_section, connection=dict(pg_section["connection"], port=1)))
    assert db._pool is None  # reaching a closed port would have raised
    db.close()


def test_queries_reuse_pooled_connections_instead_of_opening_one_each(database: Database) -> None:
    assert len({backend_pid(database) for _ in range(30)}) == 1
    pids: set[int] = set()

    def work() -> None:
        for _ in range(20):
            pids.add(backend_pid(database))

    threads = [threading.Thread(target=work) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert 1 <= len(pids) <= database.pool_max


def test_a_transaction_runs_on_one_connection(database: Database) -> None:
    with database.transaction():
        pids = {backend_pid(database) for _ in range(5)}
    assert len(pids) == 1


def test_tables_live_in_the_configured_schema(database: Database, pg_schema: str) -> None:
    rows = database.execute_query("SELECT table_name FROM information_schema.tables WHERE table_schema = "
                                  "%(schema)s ORDER BY table_name", schema=pg_schema)
    assert [r["table_name"] for r in rows] == ["message_events", "message_plugins", "messages"]


def test_a_missing_schema_is_created(pg_section: dict[str, Any], pg_schema: str) -> None:
    fresh = f"{pg_schema}_new"
    db = Database(dict(pg_section, schema=fresh))
    try:
        db.initialize_message_table()
        assert db.execute_query("SELECT current_schema() AS s") == [{"s": fresh}]
    finally:
        db.close()
        conn = pg_connect()
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f'DROP SCHEMA IF EXISTS "{fresh}" CASCADE')
        conn.close()


def test_a_dsn_works_instead_of_the_connection_block(pg_section: dict[str, Any], pg_schema: str) -> None:
    c = pg_section["connection"]
    db = Database({"dsn": f"postgresql://{c['user']}@{c['host']}:{c['port']}/{c['name']}", "schema": pg_schema})
    try:
        db.ping()
        assert db.execute_query("SELECT current_schema() AS s") == [{"s": pg_schema}]
    finally:
        db.close()


def test_bad_sql_in_a_script_names_the_script_and_applies_none_of_it(database: Database, tmp_path: Path) -> None:
    script = tmp_path / "broken.sql"
    script.write_text("CREATE TABLE first_one (id INTEGER);\nCREATE TABEL second_one (id INTEGER);\n")
    with pytest.raises(QueryError) as raised:
        database.execute_script(str(script))
    assert str(script) in str(raised.value) and "statement 2" in str(raised.value)
    assert database.execute_query("SELECT to_regclass('first_one') AS t") == [{"t": None}]


def test_a_bad_query_is_a_query_error_and_the_connection_stays_usable(database: Database) -> None:
    with pytest.raises(QueryError, match="no_such_table"):
        database.execute_query("SELECT * FROM no_such_table")
    assert database.execute_query("SELECT 1 AS one") == [{"one": 1}]


def test_a_killed_connection_is_a_connector_error_and_the_pool_recovers(pg_section: dict[str, Any]) -> None:
    db = Database(dict(pg_section, pool={"min": 1, "max": 1}))
    try:
        pid = backend_pid(db)
        admin = pg_connect()
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", (pid,))
        admin.close()
        time.sleep(0.1)
        with pytest.raises(ConnectorError):
            db.execute_query("SELECT 1 AS one")
        assert backend_pid(db) != pid
    finally:
        db.close()


def test_claims_on_one_uuid_exclude_each_other_across_database_objects(pg_section: dict[str, Any]) -> None:
    # two Database objects stand for two loader processes: only the advisory lock is shared
    first, second = Database(dict(pg_section)), Database(dict(pg_section, claim_timeout=0.3))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with first.claim("shared-uuid"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        with pytest.raises(ConnectorError, match="still being processed by another worker"):
            with second.claim("shared-uuid"):
                pass
        with second.claim("another-uuid"):  # other uuids are free
            pass
        release.set()
        holder.join(10)
        with second.claim("shared-uuid"):  # free once the first let go
            pass
    finally:
        release.set()
        holder.join(10)
        first.close()
        second.close()


def test_claim_attempts_holds_free_uuids_counts_their_attempts_and_gives_the_rows_as_they_were(
        database: Database, pg_section: dict[str, Any]) -> None:
    from sqapi.connectors.db.postgres import _LOCK_UUID
    from sqapi.core.message import Message

    def msg(uuid: str) -> Message:
        return Message(id="d", uuid=uuid, data_location=f"{uuid}.bin")

    done, retry, busy = msg("done"), msg("retry"), msg("busy")
    done.hash_digest = "h1"
    database.record_attempt(done, "QUERYING")
    database.update_message(done, "DONE", "finished")
    database.record_attempt(retry, "QUERYING")
    database.update_message(retry, "RETRY", "not yet")
    other = Database(dict(pg_section))  # another loader process, holding "busy"
    try:
        with other.transaction():
            other.execute_query("SELECT pg_advisory_lock(%(ns)s, hashtext('busy'))", ns=_LOCK_UUID)
            with database.claim_attempts([done, retry, busy, msg("new")], "QUERYING") as recorded:
                assert set(recorded) == {"done", "retry", "new"}  # "busy" is left out, not waited for
                assert recorded["new"] is None
                assert (recorded["done"]["status"], recorded["done"]["hash_digest"], recorded["done"]["attempts"]) \
                    == ("DONE", "h1", 1)
                assert recorded["retry"]["status"] == "RETRY"
                held = database.execute_query("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' "
                                              "AND granted AND pid = pg_backend_pid() AND objsubid = 2")
                assert held[0]["n"] == 3  # on the claim's connection, which queries inside it share
            other.execute_query("SELECT pg_advisory_unlock(%(ns)s, hashtext('busy'))", ns=_LOCK_UUID)
    finally:
        other.close()
    rows = {r["uuid"]: r for r in database.execute_query("SELECT uuid, status, attempts FROM messages")}
    assert {u: (r["status"], r["attempts"]) for u, r in rows.items()} == {
        "done": ("DONE", 2), "retry": ("QUERYING", 2), "new": ("QUERYING", 1)}  # "busy": no attempt counted
    with database.claim_attempts([busy], "QUERYING") as recorded:  # every lock was released
        assert list(recorded) == ["busy"]


def test_batched_writes_keep_quotes_backslashes_and_unicode_intact(database: Database) -> None:
    """Batched rows travel as one JSON text (json_to_recordset): what comes back is what went in."""
    from sqapi.core.message import Message

    awkward = "it's \"quoted\" \\ back\\slash; 100% \u00e9t\u00e9 \u65e5\u672c \U0001f600 $1 %(x)s\n\ttab"
    messages = [Message(id="d", uuid=f"q{i}'\"", data_location=awkward + str(i)) for i in range(3)]
    result = json.dumps({"text": awkward, "n": [1, 2.5, None]})
    with database.claim_attempts(messages, "QUERYING") as recorded:
        assert set(recorded) == {m.uuid for m in messages}
        database.record_progress([(m, "FAILED", awkward) for m in messages],
                                 [{"uuid": m.uuid, "plugin": "p", "status": "DONE", "duration_ms": 1.5,
                                   "result": result, "info": awkward} for m in messages], last=True)
    for i, m in enumerate(messages):
        row = database.get_message(m.uuid)
        assert (row["data_location"], row["info"], row["status"]) == (awkward + str(i), awkward, "FAILED")
        (plugin,) = database.get_plugin_rows(m.uuid)
        assert (plugin["result"], plugin["info"], plugin["duration_ms"]) == (result, awkward, 1.5)


def test_the_final_write_releases_the_claim_only_after_it_is_committed(database: Database) -> None:
    """Another process that takes the uuid next must find the final status: a lock released before the
    COMMIT would let it read the old row.  A deferred trigger (it fires at COMMIT) checks the lock is held."""
    from sqapi.core.message import Message

    database.execute_query("""
        CREATE FUNCTION claim_held_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
                           AND granted AND objsubid = 2) THEN
                RAISE EXCEPTION 'claim released before commit';
            END IF;
            RETURN NULL;
        END $$""")
    database.execute_query("CREATE CONSTRAINT TRIGGER held_at_commit AFTER UPDATE ON messages "
                           "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION claim_held_at_commit()")
    messages = [Message(id="d", uuid=f"u{i}", data_location="x") for i in range(3)]
    with database.claim_many([m.uuid for m in messages]) as held:
        assert held == {"u0", "u1", "u2"}
        database.record_attempts(messages, "QUERYING")
        database.record_progress([(m, "DONE", None) for m in messages],
                                 [{"uuid": m.uuid, "plugin": "p", "status": "DONE"} for m in messages], last=True)
    assert {database.get_message(m.uuid)["status"] for m in messages} == {"DONE"}
    assert database.execute_query("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' "
                                  "AND pid = pg_backend_pid()")[0]["n"] == 0  # and it is released


@pytest.mark.parametrize("section, key", [
    ({"connection": ["h1:5432"]}, "database.connection"),
    ({"embedded": ".sqapi/postgres"}, "database.embedded"),
    ({"connection": {"host": "h", "port": "x"}}, "database.connection.port"),
    ({"connection": {"host": "h"}, "schema": "bad-name;drop"}, "database.schema"),
    ({"connection": {"host": "h"}, "pool": {"min": 5, "max": 2}}, "database.pool"),
    ({"connection": {"host": "h"}, "connect_retry": {"attempts": 0}}, "database.connect_retry.attempts"),
])
def test_a_wrong_section_is_a_config_error_naming_the_key(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(section)


def test_a_script_with_a_dollar_quoted_function_body_runs_whole(database: Database, tmp_path: Path) -> None:
    script = tmp_path / "functions.sql"
    script.write_text("""
        CREATE OR REPLACE FUNCTION add_one(n INTEGER) RETURNS INTEGER AS $body$
        BEGIN
            RETURN n + 1;  -- a semicolon inside the body
        END;
        $body$ LANGUAGE plpgsql;
        SELECT add_one(%(n)s) AS result;
    """)
    assert database.execute_script(str(script), n=41) == [{"result": 42}]


def test_a_row_not_done_now_is_never_reported_done_from_an_older_snapshot() -> None:
    """claim_attempts: the upsert sees the latest row; a DONE in the statement's snapshot may be stale."""
    from sqapi.connectors.db.postgres import _as_it_was

    was = _as_it_was("u", True, "QUERYING", "h", "t", None, 3, "DONE")  # DONE in the snapshot, RETRY since
    assert was is not None and was["status"] != "DONE" and was["attempts"] == 2
    assert _as_it_was("u", True, "QUERYING", "h", "t", None, 2, "RETRY")["status"] == "RETRY"  # type: ignore[index]
    assert _as_it_was("u", True, "DONE", "h", "t", "ok", 2, "DONE")["status"] == "DONE"  # type: ignore[index]
    assert _as_it_was("u", False, "QUERYING", None, None, None, 1, None) is None


def test_a_batch_naming_one_row_twice_is_written_row_by_row_in_order(database: Database) -> None:
    """One set-based statement cannot update a row twice: such a batch takes the portable path (it once
    recursed between update_plugins and record_progress instead)."""
    from sqapi.core.message import Message

    first, again = Message(id="d", uuid="twice", data_location="a"), Message(id="d", uuid="twice", data_location="b")
    database.update_messages([(first, "QUERYING", None), (again, "DONE", "second wins")])
    row = database.get_message("twice")
    assert (row["status"], row["info"], row["data_location"]) == ("DONE", "second wins", "b")
    database.update_plugins([{"uuid": "twice", "plugin": "p", "status": "FAILED", "info": "first"},
                             {"uuid": "twice", "plugin": "p", "status": "DONE"}])
    (plugin,) = database.get_plugin_rows("twice")
    assert (plugin["status"], plugin["attempts"]) == ("DONE", 2)


def test_a_loader_starting_next_to_a_busy_one_neither_waits_for_nor_deadlocks_with_its_writes(
        database: Database, pg_section: dict[str, Any], pg_schema: str) -> None:
    """Found by bench/throughput.py: a second loader process ran init.sql while the first was writing; its CREATE
    INDEX IF NOT EXISTS locked `messages`, then waited for `message_plugins`, where the writer held a lock and
    next wanted `messages`: deadlock.  An index that exists is now skipped without locking its table."""
    busy = pg_connect()  # the first loader, mid-transaction: plugin rows written, statuses next
    try:
        with busy.cursor() as cursor:
            cursor.execute(f"SET search_path = {pg_schema}")
            cursor.execute("INSERT INTO messages (uuid, status) VALUES ('m-1', 'QUERYING')")
            busy.commit()
            cursor.execute("INSERT INTO message_plugins (uuid, plugin, status) VALUES ('m-1', 'p', 'DONE')")
        starting = Database(dict(pg_section))
        finished = threading.Event()
        errors: list[BaseException] = []

        def start() -> None:
            try:
                starting.initialize_message_table()
            except BaseException as exc:
                errors.append(exc)
            finally:
                finished.set()

        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        try:
            assert finished.wait(10), "initialize_message_table waited for another loader's open transaction"
            assert not errors, errors
            with busy.cursor() as cursor:  # the busy loader goes on as if nothing happened
                cursor.execute("UPDATE messages SET status = 'DONE' WHERE uuid = 'm-1'")
            busy.commit()
        finally:
            busy.rollback()  # frees the starting loader if it is stuck, so the test ends
            thread.join(30)
            starting.close()
    finally:
        busy.close()
    assert database.get_message("m-1")["status"] == "DONE"  # type: ignore[index]


def test_a_script_still_creates_an_index_that_is_missing(database: Database, tmp_path: Path) -> None:
    database.execute_query("DROP INDEX messages_updated_at")
    database.initialize_message_table()
    assert database.execute_query("SELECT to_regclass('messages_updated_at') IS NOT NULL AS found")[0]["found"]
    script = tmp_path / "init.sql"
    script.write_text('CREATE TABLE IF NOT EXISTS t (x int);\nCREATE UNIQUE INDEX IF NOT EXISTS "T x" ON t (x);\n'
                      'CREATE UNIQUE INDEX IF NOT EXISTS "T x" ON t (x);\n')
    database.execute_script(str(script))
    assert database.execute_query("""SELECT to_regclass('"T x"') IS NOT NULL AS found""")[0]["found"]


def test_a_deadlock_is_a_connector_error_saying_so_not_an_unavailable_server(
        database: Database, pg_section: dict[str, Any]) -> None:
    database.execute_query("INSERT INTO messages (uuid, status) VALUES ('a', 'DONE'), ('b', 'DONE')")
    other = Database(dict(pg_section))
    first_locked, errors = threading.Event(), []
    pids: dict[str, tuple[int, int]] = {}

    def lock(db: Database, mine: str, theirs: str, ready: threading.Event | None) -> None:
        before = 0
        try:
            with db.transaction():
                before = backend_pid(db)
                db.execute_query("UPDATE messages SET info = 'x' WHERE uuid = %(u)s", u=mine)
                if ready is not None:
                    ready.set()
                else:
                    first_locked.wait(10)
                time.sleep(0.2)
                db.execute_query("UPDATE messages SET info = 'y' WHERE uuid = %(u)s", u=theirs)
        except BaseException as exc:
            errors.append(exc)
            with db.transaction():  # the same connection goes on: a deadlock only aborted the transaction
                pids[mine] = (before, backend_pid(db))

    threads = [threading.Thread(target=lock, args=(database, "a", "b", first_locked)),
               threading.Thread(target=lock, args=(other, "b", "a", None))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    other.close()
    assert len(errors) == 1 and isinstance(errors[0], ConnectorError)
    assert "deadlock detected" in str(errors[0]) and "aborted the transaction" in str(errors[0])
    assert "unavailable" not in str(errors[0])
    [(before, after)] = pids.values()
    assert before == after, "the connection was dropped after a deadlock"


def test_the_settings_are_read_once_with_one_default_each() -> None:
    from sqapi.connectors.db.postgres import Database, Settings

    settings = Settings.from_config({"type": "postgres", "connection": {"host": "db.example", "timeout": 4},
                                     "pool": {"max": 3}, "synchronous_commit": False, "statement_timeout": 2.5})
    assert (settings.pool_min, settings.pool_max, settings.timeout) == (Settings.pool_min, 3, 4.0)
    assert (settings.synchronous_commit, settings.statement_timeout_ms) == ("off", 2500)
    database = Database({"type": "postgres", "connection": {"host": "db.example"}})  # no I/O until used
    assert (database.pool_max, database.claim_timeout, database.connect_attempts) == \
        (Settings.pool_max, Settings.claim_timeout, Settings.connect_attempts)
