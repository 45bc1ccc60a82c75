from __future__ import annotations

from pathlib import Path

import pytest

from sqapi.connectors.db.sqlite import Database, translate


def test_psycopg2_named_parameters_are_translated() -> None:
    assert translate("SELECT %(a)s, '100%%' WHERE b = %(b_2)s") == "SELECT :a, '100%' WHERE b = :b_2"


def test_an_sqapi_style_script_runs_unchanged_and_returns_rows(tmp_path: Path) -> None:
    (tmp_path / "init.sql").write_text("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER);\n"
                                       "-- a comment; with a semicolon\nCREATE INDEX t_n ON t (n);")
    (tmp_path / "insert.sql").write_text("INSERT INTO t (id, n) VALUES (%(id)s, %(n)s);")
    (tmp_path / "select.sql").write_text("SELECT id, n FROM t WHERE n >= %(n)s ORDER BY n;")
    db = Database({"path": str(tmp_path / "x.db"), "init": str(tmp_path / "init.sql")})
    db.initialize_database()
    for i in range(3):
        assert db.execute_script(str(tmp_path / "insert.sql"), id=f"r{i}", n=i, unused="ignored") == []
    assert db.execute_script(str(tmp_path / "select.sql"), n=1) == [{"id": "r1", "n": 1}, {"id": "r2", "n": 2}]
    db.close()


def test_the_sqlite_variant_of_a_script_is_preferred(tmp_path: Path) -> None:
    (tmp_path / "init.sql").write_text("CREATE TABLE t (x TIMESTAMPTZ DEFAULT now());")  # PostgreSQL only
    (tmp_path / "init.sqlite.sql").write_text("CREATE TABLE t (x TEXT);")
    db = Database({"path": str(tmp_path / "x.db"), "init": str(tmp_path / "init.sql")})
    db.initialize_database()
    assert db.execute_query("SELECT name FROM sqlite_master WHERE type = 'table'") == [{"name": "t"}]


def test_a_failed_transaction_leaves_nothing_behind(tmp_path: Path) -> None:
    db = Database({"path": str(tmp_path / "x.db")})
    db.execute_query("CREATE TABLE t (x INTEGER)")
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.execute_query("INSERT INTO t VALUES (%(x)s)", x=1)
            raise RuntimeError("boom")
    assert db.execute_query("SELECT COUNT(*) AS n FROM t") == [{"n": 0}]


def test_the_core_schema_is_created_and_can_be_created_again(tmp_path: Path) -> None:
    db = Database({"path": str(tmp_path / "x.db")})
    db.initialize_message_table()
    db.initialize_message_table()
    columns = {r["name"] for r in db.execute_query("PRAGMA table_info(messages)")}
    assert {"uuid", "data_location", "meta_location", "data_type", "hash_digest", "status", "info", "attempts",
            "created_at", "updated_at"} <= columns
    plugin_columns = {r["name"] for r in db.execute_query("PRAGMA table_info(message_plugins)")}
    assert {"uuid", "plugin", "status", "info", "duration_ms", "result", "attempts", "updated_at"} <= plugin_columns


def test_a_messages_table_made_before_the_metadata_column_gets_it_and_keeps_the_last_attempts(tmp_path: Path) -> None:
    from types import SimpleNamespace

    db = Database({"path": str(tmp_path / "old.db")})
    db.execute_query("CREATE TABLE messages (uuid TEXT PRIMARY KEY, data_location TEXT, meta_location TEXT, "
                     "data_type TEXT, hash_digest TEXT, status TEXT NOT NULL, info TEXT, "
                     "attempts INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)")
    db.initialize_message_table()
    assert "metadata" in {r["name"] for r in db.execute_query("PRAGMA table_info(messages)")}
    message = SimpleNamespace(uuid="u", data_location="d", meta_location=None, type=None, hash_digest=None,
                              metadata={"k": "v"})
    db.update_message(message, "DONE")
    db.update_message(SimpleNamespace(**{**vars(message), "metadata": None}), "RETRY")  # not fetched this time
    assert db.execute_query("SELECT metadata FROM messages WHERE uuid = 'u'") == [{"metadata": '{"k": "v"}'}]
