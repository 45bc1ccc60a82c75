"""Optional plugin hooks beside sqAPI's execute: setup once per process that runs the calls, teardown at stop."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from sqapi.app import Sqapi
from tests.test_runner import batch, body

HOOKED = '''
import os

STATE = {}


def setup(config):
    STATE["greeting"] = config.custom["greeting"]
    with open(config.custom["log"], "a") as log:
        log.write(f"setup {os.getpid()}\\n")


def teardown(database):
    with open(STATE["log"], "a") as log:
        log.write(f"teardown {os.getpid()} {database is not None}\\n")


def execute(config, database, message, metadata, data):
    STATE["log"] = config.custom["log"]
    with open(config.custom["log"], "a") as log:
        log.write(f"execute {os.getpid()}\\n")
    return {"greeting": STATE.get("greeting")}
'''


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_setup_runs_once_per_process_before_the_calls_and_teardown_once_at_stop(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        workdir: Path, isolation: str) -> None:
    log = workdir / "hooks.log"
    write_plugin("hooked", HOOKED, config={"plugin": {"isolation": isolation, "concurrency": 1,
                                                      "thread_safe": isolation == "thread"}})
    app = make_app({"active_plugins": ["hooked"], "custom": {"greeting": "hello", "log": str(log)}})
    location = write_data("a.txt", "x")
    outcomes = batch(app, [body(f"m{n}", location) for n in range(5)])
    assert {o.status for o in outcomes} == {"DONE"}
    results = [row["result"] for n in range(5) for row in app.database.get_plugin_rows(f"m{n}")]
    assert all('"greeting": "hello"' in r for r in results), results  # setup ran before every call
    app.close()
    lines = [line.split() for line in log.read_text().splitlines()]
    setups = [pid for kind, pid, *_ in lines if kind == "setup"]
    executes = {pid for kind, pid, *_ in lines if kind == "execute"}
    teardowns = [(pid, rest) for kind, pid, *rest in lines if kind == "teardown"]
    assert len(setups) == 1 and executes == set(setups)  # one process ran the calls, set up once
    assert lines[0][0] == "setup" and teardowns == [(setups[0], ["True"])] and lines[-1][0] == "teardown"
    assert (setups[0] == str(os.getpid())) == (isolation == "thread")


@pytest.mark.parametrize(("hook", "complaint"), [
    ("def setup(conf):\n    pass\n", "setup(conf): 'conf' is not something sqapi hands a hook; setup may name "
                                     "config, database"),
    ("def teardown(*args):\n    pass\n", "teardown(*args): 'args' is not something"),
    ("setup = 3\n", "setup is not a function"),
])
def test_a_hook_that_names_what_sqapi_does_not_hand_fails_the_plugin_at_load(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], hook: str, complaint: str) -> None:
    from sqapi.errors import PluginLoadError

    write_plugin("broken", "def execute(config, database, message, metadata, data):\n    return {}\n" + hook)
    with pytest.raises(PluginLoadError) as caught:
        app = make_app({"active_plugins": ["broken"]})
        app.require_plugins()
    assert "broken" in str(caught.value) and complaint in str(caught.value)


def test_a_setup_that_fails_fails_the_calls_to_be_retried_and_names_the_reason(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("flaky", "def setup():\n    raise ConnectionError('index not reachable')\n"
                          "def execute(config, database, message, metadata, data):\n    return {}\n",
                 config={"plugin": {"concurrency": 1}})
    app = make_app({"active_plugins": ["flaky"], "msg_broker": {"retry": {"max_attempts": 2}}})
    [outcome] = batch(app, [body("m", write_data("a.txt", "x"))])
    assert outcome.status == "RETRY" and "index not reachable" in (outcome.reason or "")


def test_hooks_are_optional_and_a_plugin_without_them_runs_as_before(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("plain", "def execute(config, database, message, metadata, data):\n    return {'ok': 1}\n")
    app = make_app({"active_plugins": ["plain"]})
    [outcome] = batch(app, [body("m", write_data("a.txt", "x"))])
    assert outcome.status == "DONE"
