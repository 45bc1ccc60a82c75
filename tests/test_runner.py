"""Plugin calls in worker processes (the default isolation), driven through the processor as the loader does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sqapi.app import Sqapi
from sqapi.core.calls import Call
from sqapi.core.message import Message
from sqapi.core.outcome import Delivery
from sqapi.core.plugins import commits_safely_without_waiting, plugin_database_section

SQAPI = str(Path(sys.executable).with_name("sqapi"))


def body(uuid: str, location: str, **metadata: Any) -> dict[str, Any]:
    return {"uuid_ref": uuid, "data_location": location, "metadata": metadata}


def batch(app: Sqapi, bodies: list[dict[str, Any]]) -> list[Any]:
    return app.processor.process_batch([(b, Delivery(f"d-{b['uuid_ref']}")) for b in bodies])


OVERLAP = '''
import os
import time

RUNNING = [0]


def execute(config, database, message, metadata, data):
    RUNNING[0] += 1
    seen = RUNNING[0]
    time.sleep(0.05)
    RUNNING[0] -= 1
    return {"at_once": seen, "pid": os.getpid()}
'''


def test_a_plugin_knowing_nothing_of_sqapi_never_has_two_calls_at_once_in_one_interpreter(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("overlap", OVERLAP)
    app = make_app({"active_plugins": ["overlap"]})
    location = write_data("a.txt", "x")
    outcomes: list[Any] = []
    threads = [threading.Thread(target=lambda n=n: outcomes.extend(
        batch(app, [body(f"u{n}-{k}", location) for k in range(3)]))) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(outcomes) == 12 and {o.status for o in outcomes} == {"DONE"}
    results = [json.loads(row["result"]) for row in app.database.execute_query(
        "SELECT result FROM message_plugins WHERE plugin = 'overlap'")]
    assert len(results) == 12 and {r["at_once"] for r in results} == {1}
    assert os.getpid() not in {r["pid"] for r in results}  # not in the loader's own interpreter
    assert len({r["pid"] for r in results}) > 1  # several workers took the batches that came at once


def test_plugin_concurrency_bounds_its_worker_processes(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("overlap", OVERLAP, config={"plugin": {"concurrency": 2}})
    app = make_app({"active_plugins": ["overlap"]})
    location = write_data("a.txt", "x")
    threads = [threading.Thread(target=batch, args=(app, [body(f"u{n}-{k}", location) for k in range(2)]))
               for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    pids = {json.loads(row["result"])["pid"] for row in app.database.execute_query(
        "SELECT result FROM message_plugins WHERE plugin = 'overlap'")}
    assert len(pids) == 2


def test_a_call_over_its_memory_cap_fails_alone_and_the_next_runs_on_a_fresh_worker(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("hungry", "import os\ndef execute(config, database, message, metadata, data):\n"
                           "    if metadata.get('eat'):\n        eaten = bytearray(512 * 1024 * 1024)\n"
                           "    return {'pid': os.getpid()}\n", config={"plugin": {"max_memory": "256MB"}})
    app = make_app({"active_plugins": ["hungry"], "msg_broker": {"retry": {"max_attempts": 1}}})
    location = write_data("a.txt", "x")
    first, hungry, after = batch(app, [body("u1", location), body("u2", location, eat=True), body("u3", location)])
    assert (first.status, after.status) == ("DONE", "DONE")
    assert hungry.status == "FAILED" and "MemoryError" in hungry.reason
    assert "over plugin.max_memory, 256 MiB" in hungry.reason
    pids = {uuid: json.loads(app.database.get_plugin_rows(uuid)[0]["result"])["pid"] for uuid in ("u1", "u3")}
    assert pids["u1"] != pids["u3"]  # the worker that ran out of memory was retired


def test_calls_queued_behind_a_slow_one_are_handed_to_another_worker(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("sometimes_slow", "import os, time\ndef execute(config, database, message, metadata, data):\n"
                                   "    time.sleep(float(metadata.get('sleep', 0)))\n"
                                   "    return {'pid': os.getpid()}\n")
    app = make_app({"active_plugins": ["sometimes_slow"]})
    location = write_data("a.txt", "x")
    batch(app, [body("warm", location)])  # quick calls so far: the next batch goes to one worker in one share
    outcomes = batch(app, [body("slow", location, sleep=3)] + [body(f"q{n}", location) for n in range(20)])
    assert {o.status for o in outcomes} == {"DONE"}
    rows = {row["uuid"]: row for row in app.database.execute_query(
        "SELECT uuid, result, updated_at FROM message_plugins WHERE plugin = 'sometimes_slow'")}
    slow_pid = json.loads(rows["slow"]["result"])["pid"]
    quick_pids = {json.loads(rows[f"q{n}"]["result"])["pid"] for n in range(20)}
    assert slow_pid not in quick_pids  # taken back from behind the slow call, run elsewhere
    durations = [row["duration_ms"] for row in app.database.execute_query(
        "SELECT duration_ms FROM message_plugins WHERE uuid LIKE 'q%%'")]
    assert max(durations) < 1000  # none of them waited for the slow call


def test_calls_behind_a_slow_one_are_taken_back_even_when_their_moment_passed_while_the_runner_was_busy(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        workdir: Path) -> None:
    """The moment to take calls back can pass while the runner is not waiting (here: a cold worker's start, then
    on_slow's PROCESSING write); it must still come, not wait for the slow call to end."""
    write_plugin("sometimes_slow", "import os, time\ndef execute(config, database, message, metadata, data):\n"
                                   "    time.sleep(float(metadata.get('sleep', 0)))\n"
                                   "    return {'pid': os.getpid()}\n")
    app = make_app({"active_plugins": ["sometimes_slow"]})
    path = str(workdir / "data" / write_data("a.txt", "x"))
    calls = [Call(Message(id=f"d{n}", uuid=f"u{n}", data_location=path), {"sleep": 3 if n == 0 else 0}, path)
             for n in range(6)]
    ran = app.processor.runner.run(app.plugins.plugins["sometimes_slow"], calls, lambda: time.sleep(0.5))
    assert [error for _result, error, _seconds in ran] == [None] * 6
    pids = [result["pid"] for result, _error, _seconds in ran]
    assert pids[0] not in pids[1:]  # taken back from behind the slow call, run elsewhere
    assert max(seconds for _result, _error, seconds in ran[1:]) < 1


def test_a_result_that_cannot_be_handed_back_fails_its_call_only(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("odd", "import threading\ndef execute(config, database, message, metadata, data):\n"
                        "    return {'lock': threading.Lock()} if metadata.get('odd') else {'ok': True}\n")
    app = make_app({"active_plugins": ["odd"], "msg_broker": {"retry": {"max_attempts": 1}}})
    location = write_data("a.txt", "x")
    good, odd = batch(app, [body("good", location), body("odd", location, odd=True)])
    assert good.status == "DONE"
    assert odd.status == "FAILED" and "its result cannot be handed back" in odd.reason


def test_thread_isolation_is_only_for_a_plugin_that_says_it_is_thread_safe(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path]) -> None:
    write_plugin("unsure", "def execute(config, database, message, metadata, data):\n    pass\n",
                 config={"plugin": {"isolation": "thread"}})
    app = make_app({"active_plugins": []})
    plugin = app.plugins.plugins["unsure"]
    assert plugin.state == "unloaded"  # listed, not run: active_plugins is empty
    from sqapi.errors import PluginLoadError

    with pytest.raises(PluginLoadError, match="declare plugin.thread_safe: true"):
        make_app({"active_plugins": ["unsure"]}).require_plugins()


def test_sqapi_process_records_a_crashing_plugin_goes_on_and_leaves_no_worker(
        workdir: Path, write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("fragile", "import ctypes\ndef execute(config, database, message, metadata, data):\n"
                            "    if metadata.get('crash'):\n        ctypes.string_at(0)\n    return {}\n")
    location = write_data("a.txt", "x")
    lines = "\n".join(json.dumps(body(uuid, location, **extra)) for uuid, extra in
                      (("first", {}), ("crash", {"crash": True}), ("last", {})))
    result = subprocess.run([SQAPI, "process", "-"], cwd=workdir, input=lines, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "first DONE",
        "crash FAILED gave up after 1 attempt: plugin fragile: its worker process crashed (killed by SIGSEGV) "
        "during the call",
        "last DONE"]
    time.sleep(0.5)
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_worker_of(p, workdir)]
    assert leftovers == []


def _is_worker_of(proc: Path, folder: Path) -> bool:
    try:
        return b"sqapi.core.worker" in (proc / "cmdline").read_bytes() and os.readlink(proc / "cwd") == str(folder)
    except OSError:
        return False


def test_a_worker_masks_the_secrets_of_the_config_in_what_the_plugin_logs(
        workdir: Path, write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("leaky", "import logging\ndef execute(config, database, message, metadata, data):\n"
                          "    logging.getLogger('leaky').warning('token is %s', config.plugin['token'])\n",
                 config={"plugin": {"token": "plugin-secret-9f8e7d"}})
    location = write_data("a.txt", "x")
    result = subprocess.run([SQAPI, "--log-level", "WARNING", "process", str(workdir / "data" / location)],
                            cwd=workdir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "token is ***" in result.stderr and "plugin-secret-9f8e7d" not in result.stderr


# -- a plugin's database section ---------------------------------------------------------------------
MAIN = {"type": "postgres", "connection": {"host": "db.example", "user": "sqapi", "password": "main-secret"},
        "pool": {"max": 10}, "schema": "status", "init": "scripts/init.sql"}


def test_a_plugin_naming_no_database_shares_the_main_server_without_waiting_for_the_disk() -> None:
    section = plugin_database_section(MAIN, {})
    assert section["connection"] == MAIN["connection"] and section["schema"] == "status"
    assert "init" not in section  # the core's init script is not the plugin's
    assert commits_safely_without_waiting(MAIN, {}) is True
    assert commits_safely_without_waiting({**MAIN, "synchronous_commit": "on"}, {}) is False
    assert commits_safely_without_waiting(MAIN, {"connection": {"host": "other.example"}}) is False
    assert commits_safely_without_waiting({"type": "sqlite", "path": "x.db"}, {}) is False


def test_a_plugin_naming_its_own_server_gets_nothing_of_the_main_connection() -> None:
    section = plugin_database_section(MAIN, {"connection": {"host": "other.example", "user": "plugin"}})
    assert section["connection"] == {"host": "other.example", "user": "plugin"}  # no main password in it
    assert section["pool"] == {"max": 10}
    section = plugin_database_section(MAIN, {"dsn": "postgresql://plugin@other.example/p"})
    assert "connection" not in section and section["dsn"] == "postgresql://plugin@other.example/p"


def test_a_plugin_naming_another_type_gets_exactly_its_own_section() -> None:
    own = {"type": "elasticsearch", "connection": [{"host": "es", "port": "9200"}], "kwargs": {}}
    assert plugin_database_section(MAIN, own) == own


def test_only_the_plugins_worker_commits_without_waiting_for_the_disk(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("syncs", "def execute(config, database, message, metadata, data):\n"
                          "    return database.execute_query('SHOW synchronous_commit')[0]\n")
    app = make_app({"active_plugins": ["syncs"]})
    assert app.process(body("u1", write_data("a.txt", "x")), Delivery("d")).status == "DONE"
    assert json.loads(app.database.get_plugin_rows("u1")[0]["result"]) == {"synchronous_commit": "off"}
    # the same plugin's Database in the loader (its blueprints in the API) waits for the disk as the server says
    assert app.plugins.plugins["syncs"].database.execute_query("SHOW synchronous_commit") == [
        {"synchronous_commit": "on"}]


COUNTING = '''
import os, time
from pathlib import Path


def execute(config, database, message, metadata, data):
    with open(Path(config.custom["runs"]), "a") as runs:
        runs.write(message.uuid + "\\n")
    if metadata.get("hang"):
        time.sleep(3600)
    if metadata.get("abort"):
        os.abort()
    return {"pid": os.getpid()}
'''


@pytest.mark.parametrize("trouble, reason", [("hang", "timed out after 1.5s (its worker process was killed)"),
                                             ("abort", "its worker process crashed (killed by SIGABRT) during "
                                                       "the call")])
def test_a_call_that_hangs_or_crashes_after_a_quick_one_is_the_one_blamed(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        workdir: Path, trouble: str, reason: str) -> None:
    write_plugin("counting", COUNTING, config={"plugin": {"timeout": 1.5}})
    app = make_app({"active_plugins": ["counting"], "custom": {"runs": str(workdir / "runs.txt")},
                    "msg_broker": {"retry": {"max_attempts": 1}}})
    location = write_data("a.txt", "x")
    batch(app, [body("warm", location)])  # a quick plugin so far: the next calls go to one worker in one share
    quick0, bad, quick2 = batch(app, [body("quick0", location), body("bad", location, **{trouble: True}),
                                      body("quick2", location)])
    assert (quick0.status, quick2.status) == ("DONE", "DONE")
    assert bad.status == "FAILED" and bad.reason == f"gave up after 1 attempt: plugin counting: {reason}"
    runs = (workdir / "runs.txt").read_text().split()
    assert runs.count("quick2") == 1
    if trouble == "hang":  # a hang leaves time for every earlier answer to arrive: nothing runs twice
        assert runs.count("quick0") == 1 and runs.count("bad") == 1


def test_a_timeout_blames_the_running_call_even_when_the_calls_behind_it_were_not_taken_back(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a loaded machine the loader may not take back the calls queued behind a hanging one before the timeout
    (here: never, SLOW_AFTER out of reach).  The oldest unanswered call is the one that hung: it alone fails,
    the one behind it runs once, nothing runs twice."""
    from sqapi.core import calls

    monkeypatch.setattr(calls, "SLOW_AFTER", 3600.0)
    write_plugin("counting", COUNTING, config={"plugin": {"timeout": 1.5}})
    app = make_app({"active_plugins": ["counting"], "custom": {"runs": str(workdir / "runs.txt")},
                    "msg_broker": {"retry": {"max_attempts": 1}}})
    location = write_data("a.txt", "x")
    batch(app, [body("warm", location)])
    quick0, bad, quick2 = batch(app, [body("quick0", location), body("bad", location, hang=True),
                                      body("quick2", location)])
    assert (quick0.status, bad.status, quick2.status) == ("DONE", "FAILED", "DONE")
    assert "timed out after 1.5s (its worker process was killed)" in bad.reason
    runs = (workdir / "runs.txt").read_text().split()
    assert sorted(runs) == ["bad", "quick0", "quick2", "warm"]
