"""Plugin folders written for sqAPI, dropped in unmodified: PostgreSQL SQL in their scripts and blueprints.

They run on the embedded default (sqapi's own PostgreSQL) and on a PostgreSQL server alike.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from sqapi.api.app import create_app
from sqapi.app import Sqapi
from sqapi.core.outcome import Delivery
from sqapi.core.plugins import PROJECT_PLUGINS
from tests.services import pg_connect

SQAPI = str(Path(sys.executable).with_name("sqapi"))

VISITS = '''
import os

SQL_SCRIPT_DIR = os.path.join(os.path.dirname(__file__), "scripts")


def execute(config, database, message, metadata, data):
    size = len(data.read())
    database.execute_script(os.path.join(SQL_SCRIPT_DIR, "insert_visit.sql"), uuid_ref=message.uuid,
                            data_type=message.type, size=size, x=float(metadata.get("x", 0)),
                            y=float(metadata.get("y", 0)))
    return {"size": size}
'''

VISITS_FILES = {
    "scripts/init.sql": """
        CREATE EXTENSION IF NOT EXISTS cube;

        CREATE TABLE IF NOT EXISTS visits (
            id          SERIAL PRIMARY KEY,
            uuid_ref    TEXT NOT NULL,
            data_type   TEXT,
            size        BIGINT,
            position    cube,
            created_at  TIMESTAMPTZ DEFAULT now()
        );

        CREATE INDEX IF NOT EXISTS visits_created_at_idx ON visits (created_at DESC);
    """,
    "scripts/insert_visit.sql": """
        INSERT INTO visits (uuid_ref, data_type, size, position)
        VALUES (%(uuid_ref)s, %(data_type)s, %(size)s, cube(ARRAY[%(x)s, %(y)s]::float8[]));
    """,
    "scripts/select_latest_per_type.sql": """
        -- the newest visit of each data type on a given day
        SELECT DISTINCT ON (data_type) data_type, uuid_ref, size
        FROM visits
        WHERE created_at BETWEEN %(day)s::date AND %(day)s::date + interval '1 day'
        ORDER BY data_type, created_at DESC, id DESC;
    """,
    "scripts/select_nearest.sql": """
        SELECT uuid_ref FROM visits ORDER BY position <-> cube(ARRAY[%(x)s, %(y)s]::float8[]) LIMIT 1;
    """,
    "blueprints/visits.py": """
        import os

        from flask import Blueprint, current_app, request

        from sqapi.api import responding

        bp = Blueprint(__name__, __name__, url_prefix='/visits')


        def script(name):
            return os.path.join(current_app.config.get('visits').plugin.get('directory'), 'scripts', name)


        @bp.route('/latest', methods=['GET'])
        def latest():
            rows = current_app.database.get('visits').execute_script(script('select_latest_per_type.sql'),
                                                                     day=request.args['day'])
            return responding.ok(rows) if rows else responding.no_content([])


        @bp.route('/nearest', methods=['GET'])
        def nearest():
            rows = current_app.database.get('visits').execute_script(
                script('select_nearest.sql'), x=float(request.args['x']), y=float(request.args['y']))
            return responding.ok(rows[0])
    """,
}


@pytest.fixture(params=["embedded", "server"])
def database_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The status database: sqapi's embedded PostgreSQL (the default), or the PostgreSQL server on 5432."""
    if request.param == "embedded":
        return {}
    return {"database": request.getfixturevalue("pg_section")}


def today(app: Sqapi) -> str:
    return str(app.database.execute_query("SELECT current_date::text AS day")[0]["day"])


def test_a_sqapi_plugin_with_postgresql_sql_records_and_serves_its_rows(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        database_section: dict[str, Any]) -> None:
    write_plugin("visits", VISITS, files=VISITS_FILES)  # no config.yml: a plugin that knows nothing of sqapi
    app = make_app({"active_plugins": ["visits"], **database_section})
    for n, (name, content, x) in enumerate([("a.txt", "first words", 1), ("b.json", '{"k": 1}', 5),
                                            ("c.txt", "later words, longer", 9)]):
        body = {"uuid_ref": f"v{n}", "data_location": write_data(name, content), "metadata": {"x": x, "y": 0}}
        assert app.process(body, Delivery(f"d{n}")).status == "DONE"
    client = create_app(app).test_client()
    latest = client.get(f"/visits/latest?day={today(app)}")
    assert latest.status_code == 200
    assert {row["data_type"]: row["uuid_ref"] for row in latest.get_json()} == {
        "text/plain": "v2", "application/json": "v1"}  # DISTINCT ON keeps the newest of each type
    assert client.get("/visits/latest?day=2001-01-01").status_code == 204
    assert client.get("/visits/nearest?x=4.6&y=0").get_json() == {"uuid_ref": "v1"}  # cube's distance


def test_a_sqapi_plugin_runs_on_the_embedded_default_from_the_command_line(
        workdir: Path, write_plugin: Callable[..., Path], write_data: Callable[..., str],
        status_db: Callable[[str], list[tuple[Any, ...]]]) -> None:
    write_plugin("visits", VISITS, files=VISITS_FILES)
    location = write_data("a.txt", "some words")
    result = subprocess.run([SQAPI, "process", str(workdir / "data" / location)], cwd=workdir, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1] == "DONE"
    assert status_db("SELECT uuid_ref, size FROM visits") == [(result.stdout.split()[0], 10)]
    assert status_db("SELECT plugin, status FROM message_plugins ORDER BY plugin") == [
        ("pdf_extractor", "DONE"), ("sizes", "DONE"), ("visits", "DONE")] or \
        ("visits", "DONE") in status_db("SELECT plugin, status FROM message_plugins")


def test_a_plugin_script_that_is_missing_fails_naming_the_plugin_and_the_script(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("careless", "def execute(config, database, message, metadata, data):\n"
                             "    database.execute_script('/nowhere/insert_item.sql', uuid_ref=message.uuid)\n")
    app = make_app({"active_plugins": ["careless"]})
    outcome = app.process({"uuid_ref": "m1", "data_location": write_data("a.txt", "x")}, Delivery("d"))
    assert outcome.status == "FAILED" and outcome.plugin == "careless"  # a missing file is not retried
    assert outcome.reason == ("plugin careless: SQL script /nowhere/insert_item.sql cannot be read: "
                              "No such file or directory")


# -- the schema lock: only around DDL ---------------------------------------------------------------------
@pytest.fixture
def schema_lock_held(make_app: Callable[..., Sqapi]) -> Iterator[tuple[Sqapi, Callable[[], None]]]:
    """A sqapi, another session holding the schema lock that DDL scripts take, and what releases it."""
    from sqapi.connectors.db.postgres import _LOCK_INIT

    app = make_app({"active_plugins": []})
    other = psycopg2.connect(**app.database._params)
    other.autocommit = False
    with other.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_INIT,))
    yield app, other.rollback
    other.rollback()
    other.close()


def test_a_per_message_script_does_not_wait_for_the_schema_lock(
        schema_lock_held: tuple[Sqapi, Callable[[], None]], tmp_path: Path) -> None:
    database = schema_lock_held[0].database
    database.execute_query("CREATE TABLE items (uuid_ref TEXT, n INTEGER)")
    insert = tmp_path / "insert_item.sql"
    insert.write_text("INSERT INTO items (uuid_ref, n) VALUES (%(uuid_ref)s, %(n)s);")
    two = tmp_path / "two_statements.sql"
    two.write_text("INSERT INTO items VALUES (%(uuid_ref)s, 1);\nSELECT count(*) AS n FROM items;")
    done = threading.Event()

    def write() -> None:
        database.execute_script(str(insert), uuid_ref="u1", n=1)
        database.execute_script(str(two), uuid_ref="u2")
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(10), "a per-message write waited for the schema lock"
    assert database.execute_query("SELECT count(*) AS n FROM items")[0]["n"] == 2


def test_a_schema_script_waits_for_the_schema_lock(schema_lock_held: tuple[Sqapi, Callable[[], None]],
                                                  tmp_path: Path) -> None:
    app, release = schema_lock_held
    ddl = tmp_path / "init.sql"
    ddl.write_text("CREATE TABLE IF NOT EXISTS things (x INTEGER);")
    done = threading.Event()
    threading.Thread(target=lambda: (app.database.execute_script(str(ddl)), done.set()), daemon=True).start()
    assert not done.wait(1.0), "a schema (DDL) script ran without the schema lock"
    release()
    assert done.wait(10), "the schema script did not run once the lock was free"


def test_a_script_changed_on_disk_is_read_again(make_app: Callable[..., Sqapi], tmp_path: Path) -> None:
    database = make_app({"active_plugins": []}).database
    script = tmp_path / "answer.sql"
    script.write_text("SELECT 1 AS answer;")
    assert database.execute_script(str(script)) == [{"answer": 1}]
    script.write_text("SELECT 42 AS answer, 'changed' AS why;")
    assert database.execute_script(str(script)) == [{"answer": 42, "why": "changed"}]


# -- names and databases as sqAPI had them ------------------------------------------------------------------
SQAPI_SIZES = '''
import os

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def execute(config, database, message, metadata, data):
    database.execute_script(os.path.join(SCRIPTS, "insert_item.sql"), uuid_ref=message.uuid,
                            size=len(data.read()))
'''


def test_a_users_plugin_named_like_a_built_in_replaces_it_with_a_warning(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    mine = write_plugin("sizes", SQAPI_SIZES, files={
        "scripts/init.sql": "CREATE TABLE IF NOT EXISTS sizes (id SERIAL PRIMARY KEY, uuid_ref TEXT, size BIGINT);",
        "scripts/insert_item.sql": "INSERT INTO sizes (uuid_ref, size) VALUES (%(uuid_ref)s, %(size)s);"})
    with caplog.at_level(logging.WARNING, logger="sqapi.core.plugins"):
        app = make_app({"active_plugins": ["sizes"]})
    plugin = app.plugins.plugins["sizes"]
    assert plugin.directory == mine and not plugin.builtin
    assert plugin.shadowed == [str(PROJECT_PLUGINS.resolve() / "sizes")]
    assert f"plugin sizes in {mine} is used; the built-in plugin of the same name in " \
           f"{PROJECT_PLUGINS.resolve() / 'sizes'} is not" in caplog.text
    assert app.process({"uuid_ref": "s1", "data_location": write_data("a.txt", "12345")}, Delivery("d")).status \
        == "DONE"
    assert app.database.execute_query("SELECT id, uuid_ref, size FROM sizes") == [{"id": 1, "uuid_ref": "s1",
                                                                                   "size": 5}]
    listing = subprocess.run([SQAPI, "plugins"], cwd=workdir, capture_output=True, text=True, timeout=60).stdout
    assert f"from {mine}" in listing and f"not used (same name): {PROJECT_PLUGINS.resolve() / 'sizes'}" in listing


OWN_DATABASE = '''
def execute(config, database, message, metadata, data):
    database.execute_query("INSERT INTO elsewhere (uuid_ref) VALUES (%(u)s)", u=message.uuid)
    return {"database": type(database).__module__}
'''


def test_a_plugins_own_postgres_connection_is_used_exactly(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        pg_section: dict[str, Any]) -> None:
    own = {"type": "postgres", "connection": pg_section["connection"], "schema": pg_section["schema"]}
    write_plugin("elsewhere", OWN_DATABASE, config={"database": own},
                 init_sql="CREATE TABLE IF NOT EXISTS elsewhere (uuid_ref TEXT);")
    app = make_app({"active_plugins": ["elsewhere"]})  # the status database: the embedded one
    assert app.process({"uuid_ref": "e1", "data_location": write_data("a.txt", "x")}, Delivery("d")).status == "DONE"
    with pg_connect() as conn, conn.cursor() as cursor:  # the plugin's rows are on the server it named
        cursor.execute(f'SELECT uuid_ref FROM "{pg_section["schema"]}".elsewhere')
        assert cursor.fetchall() == [("e1",)]
    assert app.database.execute_query("SELECT to_regclass('elsewhere') IS NULL AS absent")[0]["absent"]
    section = app.plugins.plugins["elsewhere"].database_section
    assert section is not None and section["connection"] == pg_section["connection"]
    assert "embedded" not in section  # nothing of the main (embedded) database mixed in


def test_a_plugin_with_an_elasticsearch_database_gets_one(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    from tests.plugins.es_standin import ElasticsearchStandIn

    es = ElasticsearchStandIn().start()
    try:
        host, port = es.url.removeprefix("http://").split(":")
        write_plugin("texts", textwrap.dedent('''
            def execute(config, database, message, metadata, data):
                database.create_document("content", {"uuid": message.uuid, "text": data.read().decode()},
                                         refresh=True)
                return {"hits": len(database.fetch_document("content", {"uuid": message.uuid}))}
            '''), config={"database": {"type": "elasticsearch", "connection": [
                {"name": "elasticsearch", "host": host, "port": port, "timeout": 2}]}})
        app = make_app({"active_plugins": ["texts"]})
        outcome = app.process({"uuid_ref": "t1", "data_location": write_data("a.txt", "hello")}, Delivery("d"))
        assert outcome.status == "DONE", outcome.reason
        assert json.loads(app.database.get_plugin_rows("t1")[0]["result"]) == {"hits": 1}
        stored = [doc for index in es.indices.values() for doc in index.values()]
        assert stored == [{"uuid": "t1", "text": "hello"}]
    finally:
        es.stop()


def test_a_plugin_whose_database_is_unreachable_is_reported_failed_never_pointed_elsewhere(
        workdir: Path, write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("lost", "def execute(config, database, message, metadata, data):\n    pass\n",
                 config={"database": {"type": "postgres", "connection": {"host": "127.0.0.1", "port": 9},
                                      "connect_retry": {"attempts": 1}}})
    (workdir / "cfg.yml").write_text("active_plugins: [lost]\n")
    check = subprocess.run([SQAPI, "-c", "cfg.yml", "check"], cwd=workdir, capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    assert "FAIL  plugins" in check.stdout and "lost (" in check.stdout and "127.0.0.1:9" in check.stdout
    listing = subprocess.run([SQAPI, "-c", "cfg.yml", "plugins"], cwd=workdir, capture_output=True, text=True,
                             timeout=60).stdout
    assert "lost" in listing and "failed" in listing and "cannot reach PostgreSQL at 127.0.0.1:9" in listing
    location = write_data("a.txt", "x")
    processed = subprocess.run([SQAPI, "-c", "cfg.yml", "process", str(workdir / "data" / location)], cwd=workdir,
                               capture_output=True, text=True, timeout=60)
    assert processed.returncode == 1 and processed.stdout == ""  # nothing recorded DONE without it
    assert "plugin failed to load, so nothing is processed (lost: " in processed.stderr


def test_sqapi_testing_gives_each_test_a_database_where_its_extensions_live(
        write_plugin: Callable[..., Path], tmp_path: Path) -> None:
    from sqapi.testing import blueprint_client, run_plugin

    folder = write_plugin("visits", VISITS, files=VISITS_FILES)
    for test in ("first_test", "second_test"):  # as two tests, each with its own tmp_path
        own = tmp_path / test
        own.mkdir()
        run = run_plugin(folder, b"hello", own, metadata={"x": 2, "y": 0}, uuid=f"{test}-v", type="text/plain")
        assert run.database.describe().endswith(")") and "(database plugin_test_" in run.database.describe()
        assert run.database.execute_query("SELECT uuid_ref, size FROM visits") == [{"uuid_ref": f"{test}-v",
                                                                                  "size": 5}]
        client = blueprint_client(run.plugin)
        assert client.get("/visits/nearest?x=2&y=0").get_json() == {"uuid_ref": f"{test}-v"}
