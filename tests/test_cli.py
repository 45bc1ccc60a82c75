"""The sqapi command, run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SQAPI = str(Path(sys.executable).parent / "sqapi")


def sqapi(*args: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SQAPI, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def samples(workdir: Path, monkeypatch) -> Path:
    """A copy of the bundled samples, run from a folder of its own on the embedded default."""
    shutil.copytree(ROOT / "samples", workdir / "samples")
    for name in ("SQAPI_DATA_DIR", "SQAPI_SPOOL_DIR", "SQAPI_EMBEDDED_DIR", "SQAPI_DB_SCHEMA"):
        monkeypatch.delenv(name)
    return workdir


def postgres_servers_of(folder: Path) -> list[str]:
    """The PostgreSQL server processes whose data folder is under ``folder``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"postgres") and any(str(folder).encode() in arg for arg in cmdline):
            found.append(proc.name)
    return found


def test_process_prints_every_sample_done_and_a_second_run_runs_no_plugin_again(samples: Path) -> None:
    first = sqapi("process", "samples/messages.jsonl", cwd=samples)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    expected = len((samples / "samples" / "messages.jsonl").read_text().splitlines())
    assert len(lines) == expected and all(line.split()[1] == "DONE" for line in lines)
    assert (samples / ".sqapi" / "postgres" / "data" / "PG_VERSION").exists()  # its own embedded PostgreSQL
    assert postgres_servers_of(samples) == []  # stopped when the command ended
    second = sqapi("process", "samples/messages.jsonl", cwd=samples)
    assert second.returncode == 0
    assert all(line.endswith("DONE already done, no plugin run again") for line in second.stdout.splitlines())
    assert len(second.stdout.splitlines()) == expected
    assert postgres_servers_of(samples) == []


def test_process_gives_one_clear_line_per_bad_message_and_exits_1(workdir: Path, write_plugin, write_data,
                                                                  status_db) -> None:
    write_plugin("keeper", "def execute(config, database, message, metadata, data):\n"
                           "    database.execute_query('INSERT INTO kept (uuid) VALUES (%(u)s)', u=message.uuid)\n",
                 init_sql="CREATE TABLE IF NOT EXISTS kept (uuid TEXT);")
    write_plugin("raiser", "def execute(config, database, message, metadata, data):\n"
                           "    raise ValueError('cannot read this')\n")
    good = write_data("good.txt", "fine")
    (workdir / "malformed.json").write_text("{not json")
    (workdir / "no_location.json").write_text('{"uuid_ref": "no-location"}')
    (workdir / "outside.json").write_text('{"uuid_ref": "outside", "data_location": "../../etc/hostname"}')
    (workdir / "raises.json").write_text(json.dumps({"uuid_ref": "raises", "data_location": good}))
    (workdir / "cfg.yml").write_text("active_plugins: [keeper, raiser]\n")
    result = sqapi("-c", "cfg.yml", "process", "malformed.json", "no_location.json", "outside.json",
                   "raises.json", cwd=workdir)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "- FAILED malformed message (malformed.json): body is not valid JSON (Expecting property name enclosed "
        "in double quotes at line 1 column 2)",
        "no-location FAILED malformed message: missing required field: data_location",
        "outside FAILED data: data_location '../../etc/hostname' is outside base_dir "
        "(set data_store.base_dir or $SQAPI_DATA_DIR to a folder that holds it)",
        "raises FAILED gave up after 1 attempt: plugin raiser: ValueError: cannot read this",
    ]
    status = sqapi("-c", "cfg.yml", "status", "raises", "--json", cwd=workdir)
    row = json.loads(status.stdout)
    assert row["status"] == "FAILED"
    assert {p["plugin"]: p["status"] for p in row["plugins"]} == {"keeper": "DONE", "raiser": "FAILED"}
    failed = sqapi("-c", "cfg.yml", "messages", "--status", "FAILED", cwd=workdir).stdout
    assert {line.split()[0] for line in failed.splitlines()} == {"no-location", "outside", "raises"}
    assert status_db("SELECT uuid FROM kept") == [("raises",)]  # the other plugin's work is intact
    # narrowed by plugin and by time (the rows were all written within the last hour, none in the future)
    by_plugin = sqapi("-c", "cfg.yml", "messages", "--plugin", "raiser", cwd=workdir).stdout
    assert [line.split()[:2] for line in by_plugin.splitlines()] == [["raises", "FAILED"]]
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    recent = sqapi("-c", "cfg.yml", "messages", "--status", "FAILED", "--since", hour_ago, cwd=workdir).stdout
    assert len(recent.splitlines()) == 3
    assert sqapi("-c", "cfg.yml", "messages", "--until", hour_ago, cwd=workdir).stdout == ""
    backwards = sqapi("-c", "cfg.yml", "messages", "--since", "2030-01-01", "--until", "2029-01-01", cwd=workdir)
    assert backwards.returncode == 2 and "--since is after --until" in backwards.stderr


def test_process_builds_a_message_for_a_data_file_and_reads_stdin(workdir: Path, write_data) -> None:
    location = write_data("doc.txt", "some text")
    result = sqapi("process", str(workdir / "data" / location), cwd=workdir)
    assert result.returncode == 0 and result.stdout.split()[1] == "DONE"
    uuid = result.stdout.split()[0]
    assert json.loads(sqapi("status", uuid, "--json", cwd=workdir).stdout)["data_location"] == "doc.txt"
    lines = "\n".join(json.dumps({"uuid_ref": f"in-{i}", "data_location": location}) for i in range(3))
    piped = sqapi("process", "-", cwd=workdir, stdin=lines)
    assert [line.split()[:2] for line in piped.stdout.splitlines()] == [[f"in-{i}", "DONE"] for i in range(3)]


def test_plugins_lists_active_unloaded_and_failed_plugins_with_reasons(workdir: Path, write_plugin) -> None:
    write_plugin("broken", "import nowhere_to_be_found\n")
    write_plugin("idle", "def execute(config, database, message, metadata, data):\n    pass\n")
    (workdir / "cfg.yml").write_text("active_plugins: [sizes, broken]\n")
    output = sqapi("-c", "cfg.yml", "plugins", cwd=workdir).stdout
    lines = {line.split()[0]: line for line in output.splitlines() if line.strip()}
    assert "active" in lines["sizes"]
    assert "endpoints: GET /sizes/<uuid_ref>, GET /sizes/larger/<int:size>" in lines["sizes"]
    assert "unloaded" in lines["idle"] and "not in active_plugins" in lines["idle"]
    assert "failed" in lines["broken"] and "No module named 'nowhere_to_be_found'" in lines["broken"]


def test_check_reports_each_system_and_fails_when_one_is_unreachable(workdir: Path) -> None:
    ok = sqapi("check", cwd=workdir)
    assert ok.returncode == 0, ok.stdout
    assert [line.split()[:2] for line in ok.stdout.splitlines()] == [
        ["ok", "config"], ["ok", "database"], ["ok", "msg_broker"], ["ok", "data_store"], ["ok", "meta_store"],
        ["ok", "plugins"]]
    assert "postgres at the embedded PostgreSQL in " in ok.stdout and "directory at " in ok.stdout
    (workdir / "bad.yml").write_text("data_store:\n  type: disk\n  base_dir: /nonexistent/place\n")
    bad = sqapi("-c", "bad.yml", "check", cwd=workdir)
    assert bad.returncode == 1
    assert "FAIL  data_store  disk: base_dir '/nonexistent/place' is not a readable folder" in bad.stdout


def test_a_wrong_config_stops_with_one_line_naming_file_key_and_fix(workdir: Path) -> None:
    (workdir / "typo.yml").write_text("data_store:\n  type: dsik\n")
    result = sqapi("-c", "typo.yml", "process", "x.json", cwd=workdir)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "Error: typo.yml: data_store.type: unknown type 'dsik'. Fix: did you mean 'disk'? "
        f"(use one of: {', '.join(sorted(p.stem for p in (ROOT / 'sqapi/connectors/data').glob('[!_]*.py')))})"]


def test_status_of_an_unknown_uuid_exits_1(workdir: Path) -> None:
    from sqapi.app import build
    from sqapi.config import load_config

    build(load_config()).close()  # the status tables, empty
    result = sqapi("status", "nope", cwd=workdir)
    assert result.returncode == 1 and "no such message" in result.stderr


def test_secrets_never_reach_the_logs(workdir: Path, write_plugin, write_data) -> None:
    write_plugin("leaky", "import logging\ndef execute(config, database, message, metadata, data):\n"
                          "    logging.getLogger('leaky').error('connecting with %s', config.custom['password'])\n")
    (workdir / "cfg.yml").write_text("active_plugins: [leaky]\ncustom:\n  password: hunter2-very-secret\n")
    location = write_data("a.txt", "x")
    (workdir / "m.json").write_text(json.dumps({"uuid_ref": "s", "data_location": location}))
    result = sqapi("-c", "cfg.yml", "--json-logs", "--log-level", "INFO", "process", "m.json", cwd=workdir)
    assert "hunter2-very-secret" not in result.stderr + result.stdout
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(r["message"] == "connecting with ***" and r["logger"] == "leaky" for r in records)


def test_new_plugin_scaffolds_a_plugin_whose_own_test_passes(workdir: Path) -> None:
    result = sqapi("new-plugin", "word_count", cwd=workdir)
    assert result.returncode == 0, result.stderr
    folder = workdir / "plugins" / "word_count"
    assert (folder / "__init__.py").exists() and (folder / "scripts" / "init.sql").exists()
    # as a plugin author runs it: no sqapi variables, so sqapi.testing starts an embedded PostgreSQL of its own
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQAPI_")}
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                           str(workdir / "author-tmp"), str(folder / "tests")],
                          cwd=workdir, capture_output=True, text=True, timeout=180, env=env)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "2 passed" in test.stdout
    assert (workdir / "author-tmp" / "sqapi-postgres" / "data" / "PG_VERSION").exists()  # one for the session
    assert postgres_servers_of(workdir) == []  # stopped when the test run ended
    listed = sqapi("plugins", cwd=workdir).stdout
    assert any(line.startswith("word_count") and "active" in line for line in listed.splitlines())
    again = sqapi("new-plugin", "word_count", cwd=workdir)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_run_consumes_the_spool_and_exits_0_on_sigterm(workdir: Path, write_data) -> None:
    location = write_data("a.txt", "x")
    spool = workdir / "spool"
    spool.mkdir()
    (spool / "m1.json").write_text(json.dumps({"uuid_ref": "r1", "data_location": location}))
    process = subprocess.Popen([SQAPI, "run"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (spool / "done" / "m1.json").exists():
            assert time.monotonic() < deadline, "the spool file was not processed"
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        (spool / "m2.json").write_text(json.dumps({"uuid_ref": "r2", "data_location": location}))
        while not (spool / "done" / "m2.json").exists():
            assert time.monotonic() < deadline, "the second file was not processed"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "finishing in-flight messages" in stderr


def test_log_options_work_after_the_command_name_and_win_over_the_ones_before(workdir: Path, write_data) -> None:
    (workdir / "m.json").write_text(json.dumps({"uuid_ref": "logged", "data_location": write_data("a.txt", "x")}))
    quiet = sqapi("process", "m.json", cwd=workdir)
    debug = sqapi("--log-level", "ERROR", "process", "--log-level", "DEBUG", "m.json", cwd=workdir)
    assert quiet.returncode == 0 and debug.returncode == 0, debug.stderr
    assert quiet.stderr == ""
    assert " INFO    sqapi.core.processor: logged DONE" in debug.stderr  # DEBUG won over ERROR


def test_check_takes_json_logs_after_the_command_name(workdir: Path) -> None:
    result = sqapi("check", "--json-logs", "--log-level", "DEBUG", cwd=workdir)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records and all(r["level"] in ("DEBUG", "INFO", "WARNING") for r in records)


@pytest.mark.parametrize("command", [["status", "some-uuid"], ["messages"]])
def test_status_and_messages_without_a_database_say_so_and_create_nothing(workdir: Path, command) -> None:
    result = sqapi(*command, cwd=workdir, env={"SQAPI_EMBEDDED_DIR": str(workdir / "db")})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"Error: no status database at the embedded PostgreSQL in {workdir / 'db'} (schema ")
    assert not (workdir / "db").exists()


def test_status_and_messages_on_a_database_without_status_tables_change_nothing(workdir: Path, status_db,
                                                                                status_schema) -> None:
    status_db(f'CREATE SCHEMA "{status_schema}"')
    status_db("CREATE TABLE unrelated (x INTEGER)")
    result = sqapi("messages", cwd=workdir, env={"SQAPI_DB_SCHEMA": "never_created"})
    assert result.returncode == 1
    assert "(schema never_created): run sqapi process/run first" in result.stderr
    assert status_db("SELECT 1 FROM pg_namespace WHERE nspname = 'never_created'") == []
    result = sqapi("messages", cwd=workdir)
    assert result.returncode == 1 and f"(schema {status_schema}): run sqapi process/run first" in result.stderr
    assert status_db(f"SELECT tablename FROM pg_tables WHERE schemaname = '{status_schema}'") == [("unrelated",)]


def test_plugins_json_lists_each_endpoint_with_its_methods(workdir: Path, write_plugin) -> None:
    write_plugin("hooks", "def execute(config, database, message, metadata, data):\n    pass\n", files={
        "blueprints/hooks.py": "from flask import Blueprint\n"
                               "bp = Blueprint('hooks', __name__, url_prefix='/hooks')\n"
                               "@bp.route('/<name>', methods=['GET', 'POST'])\n"
                               "def hook(name):\n    return name\n"
                               "@bp.route('/')\n"
                               "def index():\n    return ''\n"})
    (workdir / "cfg.yml").write_text("active_plugins: [hooks]\n")
    result = sqapi("-c", "cfg.yml", "plugins", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["hooks"]["endpoints"] == ["GET /hooks/", "GET,POST /hooks/<name>"]


def test_process_of_a_file_outside_base_dir_says_how_to_fix_it(workdir: Path) -> None:
    (workdir / "elsewhere.txt").write_text("x")
    result = sqapi("process", "elsewhere.txt", cwd=workdir)
    assert result.returncode == 1
    assert result.stdout.strip().endswith(f"data_location '{workdir / 'elsewhere.txt'}' is outside base_dir "
                                          "(set data_store.base_dir or $SQAPI_DATA_DIR to a folder that holds it)")


def test_process_with_no_active_plugin_says_so_and_where_it_looked(samples: Path) -> None:
    (samples / "sqapi.yml").write_text("active_plugins: []\n")
    done = sqapi("-c", "sqapi.yml", "process", "samples/data/hello.txt", cwd=samples)
    assert done.returncode == 0, done.stderr
    assert " DONE" in done.stdout
    warning = done.stderr
    assert "warning: no active plugin: messages end DONE without any plugin run" in warning
    assert str(samples / "plugins") in warning  # the folder it looked in
    assert "entry point group sqapi.plugins" in warning
    assert "pdf_extractor (unloaded: not in active_plugins)" in warning
    # with a plugin active, no warning
    done = sqapi("process", "samples/data/hello.txt", cwd=samples)
    assert "no active plugin" not in done.stderr


def test_init_writes_a_production_config_that_loads_and_a_plugins_folder(tmp_path: Path) -> None:
    from sqapi.config import load_config

    done = sqapi("init", "deploy", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = tmp_path / "deploy" / "sqapi.yml"
    assert (tmp_path / "deploy" / "plugins").is_dir()
    assert "sqapi new-plugin NAME" in (tmp_path / "deploy" / "plugins" / "README.md").read_text()
    text = written.read_text()
    assert text.startswith("# Written by `sqapi init`") and "SQAPI_RABBITMQ_PASSWORD" in text
    config = load_config(str(written))
    assert config.msg_broker.type == "rabbitmq" and config.database.type == "postgres"
    written.write_text("# mine\n")
    again = sqapi("init", "deploy", cwd=tmp_path)
    assert again.returncode == 1 and "exists" in again.stderr
    assert written.read_text() == "# mine\n"  # never overwritten without --force
    assert sqapi("init", "deploy", "--force", cwd=tmp_path).returncode == 0
    assert written.read_text().startswith("# Written by `sqapi init`")


def test_publish_writes_to_the_spool_folder_and_a_loader_processes_it(
        write_config: Callable[..., Path], make_app: Callable[..., Any], workdir: Path) -> None:
    """The embedded default's listener can be published to, as RabbitMQ can: whole files, renamed in."""
    from click.testing import CliRunner

    from sqapi.cli import main

    (workdir / "data").mkdir(exist_ok=True)
    (workdir / "data" / "a.txt").write_text("hello")
    broker = {"type": "directory", "directory": str(workdir / "spool"), "poll_interval": 0.05}
    config = write_config({"msg_broker": broker})
    published = CliRunner().invoke(main, ["publish", "-c", str(config), "--uuid", "../odd uuid",
                                          "--data-location", "a.txt"], catch_exceptions=False)
    assert published.exit_code == 0, published.output
    assert published.output.strip() == "../odd uuid"
    [written] = list((workdir / "spool").glob("*.json"))
    assert written.name.startswith("_odd_uuid-")  # in the spool folder, never a path out of it
    assert json.loads(written.read_text())["uuid_ref"] == "../odd uuid"
    assert not list((workdir / "spool").glob(".*"))  # no half-written file left behind
    app = make_app({"msg_broker": broker})
    app.create_listener().start_listeners(until_idle=True)
    assert app.database.get_message("../odd uuid")["status"] == "DONE"
