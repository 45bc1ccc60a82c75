"""The optional execute_batch hook: one call per batch the processor holds, one outcome per message."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sqapi.app import Sqapi
from sqapi.errors import PluginLoadError
from tests.test_runner import batch, body

#: each call appends a line to custom.log: its pid and the uuids of its items
BATCHED = '''
import json
import os


def execute(config, database, message, metadata, data):
    raise AssertionError("a plugin with execute_batch is never called per message")


def execute_batch(items, config, logger):
    with open(config.custom["log"], "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "uuids": [item.message.uuid for item in items]}) + "\\n")
    outcomes = []
    for item in items:
        with item.open() as data:
            size = len(data.read())
        outcomes.append({"uuid": item.message.uuid, "size": size, "tag": item.metadata.get("tag"),
                         "first": item.message.results.get("first"), "logger": logger.name})
    return outcomes
'''

ISOLATIONS = {
    "process": {"concurrency": 1},
    "thread": {"isolation": "thread", "thread_safe": True, "timeout": 30},
    "inline": {"isolation": "thread", "thread_safe": True},  # no timeout: on the caller's thread
}


def calls_of(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def result_of(app: Sqapi, uuid: str, plugin: str) -> dict[str, Any]:
    [row] = [r for r in app.database.get_plugin_rows(uuid) if r["plugin"] == plugin]
    return {**row, "result": json.loads(row["result"]) if row["result"] else None}


@pytest.mark.parametrize("isolation", list(ISOLATIONS))
def test_a_plugin_with_execute_batch_gets_each_batch_in_one_call_and_each_message_its_own_row(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        workdir: Path, isolation: str) -> None:
    log = workdir / "calls.jsonl"
    write_plugin("batched", BATCHED, config={"plugin": ISOLATIONS[isolation]})
    app = make_app({"active_plugins": ["batched"], "custom": {"log": str(log)}})
    location = write_data("a.txt", "four")

    first = batch(app, [body(f"a{n}", location, tag=n) for n in range(5)])
    second = batch(app, [body(f"b{n}", location) for n in range(3)])

    assert {o.status for o in first + second} == {"DONE"}
    calls = calls_of(log)
    assert [len(c["uuids"]) for c in calls] == [5, 3]  # one call per batch, every message in it
    assert calls[0]["uuids"] == [f"a{n}" for n in range(5)]  # in the batch's order
    assert (calls[0]["pid"] == os.getpid()) == (isolation != "process")
    for n in range(5):
        row = result_of(app, f"a{n}", "batched")
        assert row["status"] == "DONE" and row["duration_ms"] is not None
        assert row["result"] == {"uuid": f"a{n}", "size": 4, "tag": n, "first": None,
                                 "logger": "sqapi_plugins.batched"}


def test_a_batch_plugin_after_another_gets_each_messages_own_results(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        workdir: Path) -> None:
    write_plugin("first", "def execute(config, database, message, metadata, data):\n"
                          "    return {'n': metadata['n']}\n")
    write_plugin("batched", BATCHED, config={"plugin": {"after": ["first"]}})
    app = make_app({"active_plugins": ["first", "batched"], "custom": {"log": str(workdir / "calls.jsonl")}})
    location = write_data("a.txt", "x")
    outcomes = batch(app, [body(f"m{n}", location, n=n) for n in range(3)])
    assert {o.status for o in outcomes} == {"DONE"}
    assert [result_of(app, f"m{n}", "batched")["result"]["first"] for n in range(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]


PICKY = '''
from sqapi.errors import PermanentError


def execute_batch(items):
    outcomes = []
    for item in items:
        kind = item.metadata.get("fail")
        if kind == "retry":
            outcomes.append(ConnectionError("index not reachable for " + item.message.uuid))
        elif kind == "permanent":
            outcomes.append(PermanentError("refused " + item.message.uuid))
        else:
            outcomes.append({"ok": item.message.uuid})
    return outcomes
'''


@pytest.mark.parametrize("isolation", list(ISOLATIONS))
def test_an_item_answered_with_an_exception_fails_that_message_alone(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        isolation: str) -> None:
    write_plugin("picky", PICKY, config={"plugin": ISOLATIONS[isolation]})
    app = make_app({"active_plugins": ["picky"], "msg_broker": {"retry": {"max_attempts": 3}}})
    location = write_data("a.txt", "x")
    good, retry, permanent, last = batch(app, [body("good", location), body("retry", location, fail="retry"),
                                               body("permanent", location, fail="permanent"), body("last", location)])
    assert (good.status, last.status) == ("DONE", "DONE")
    assert retry.status == "RETRY" and retry.plugin == "picky"
    assert "ConnectionError: index not reachable for retry" in (retry.reason or "")
    assert permanent.status == "FAILED" and "refused permanent" in (permanent.reason or "")
    assert result_of(app, "good", "picky")["result"] == {"ok": "good"}
    assert result_of(app, "retry", "picky")["status"] == "FAILED"


@pytest.mark.parametrize(("source", "reason"), [
    ("def execute_batch(items):\n    raise ConnectionError('bulk endpoint down')\n",
     "ConnectionError: bulk endpoint down"),
    ("def execute_batch(items):\n    return [None]\n",
     "TypeError: execute_batch returned 1 outcomes for 3 items: it must return a list of one result"),
    ("def execute_batch(items):\n    return None\n", "TypeError: execute_batch returned NoneType for 3 items"),
])
@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_an_execute_batch_that_raises_or_miscounts_fails_every_message_of_its_batch(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        source: str, reason: str, isolation: str) -> None:
    write_plugin("whole", source, config={"plugin": ISOLATIONS[isolation]})
    app = make_app({"active_plugins": ["whole"], "msg_broker": {"retry": {"max_attempts": 2}}})
    location = write_data("a.txt", "x")
    outcomes = batch(app, [body(f"m{n}", location) for n in range(3)])
    assert {o.status for o in outcomes} == {"RETRY"}
    assert all(reason in (o.reason or "") for o in outcomes), [o.reason for o in outcomes]


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_batch_past_its_timeout_fails_each_of_its_messages_and_the_next_batch_runs(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        isolation: str) -> None:
    write_plugin("sleepy", "import time\ndef execute_batch(items):\n"
                           "    time.sleep(max(item.metadata.get('sleep', 0) for item in items))\n"
                           "    return [{'n': len(items)}] * len(items)\n",
                 config={"plugin": {**ISOLATIONS[isolation], "timeout": 1}})
    app = make_app({"active_plugins": ["sleepy"], "msg_broker": {"retry": {"max_attempts": 1}}})
    location = write_data("a.txt", "x")
    hung = batch(app, [body("h1", location, sleep=5), body("h2", location)])
    assert [o.status for o in hung] == ["FAILED", "FAILED"]
    assert all("timed out after 1s" in (o.reason or "") for o in hung)
    after = batch(app, [body("n1", location), body("n2", location)])
    assert [o.status for o in after] == ["DONE", "DONE"]
    assert result_of(app, "n1", "sleepy")["result"] == {"n": 2}


def test_an_item_whose_result_cannot_be_handed_back_fails_alone(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("odd", "import threading\ndef execute_batch(items):\n"
                        "    return [{'lock': threading.Lock()} if i.metadata.get('odd') else {'ok': 1}\n"
                        "            for i in items]\n")
    app = make_app({"active_plugins": ["odd"], "msg_broker": {"retry": {"max_attempts": 1}}})
    location = write_data("a.txt", "x")
    good, odd = batch(app, [body("good", location), body("odd", location, odd=True)])
    assert good.status == "DONE"
    assert odd.status == "FAILED" and "its result cannot be handed back" in (odd.reason or "")


@pytest.mark.parametrize(("source", "complaint"), [
    ("def execute_batch(config, messages):\n    return []\n",
     "execute_batch(config, messages): 'messages' is not something sqapi hands a hook; execute_batch may name "
     "config, database, logger, items"),
    ("def execute_batch(config, database):\n    return []\n",
     "execute_batch(config, database) does not name items"),
    ("def execute_batch(*items):\n    return []\n", "execute_batch(*items): 'items' is not something"),
    ("execute_batch = [1]\n", "execute_batch is not a function"),
    ("def run(items):\n    return []\n",
     "has no function execute(config, database, message, metadata, data) (nor execute_batch(items))"),
])
def test_a_batch_hook_of_the_wrong_shape_fails_the_plugin_at_load_naming_it(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], source: str, complaint: str) -> None:
    write_plugin("wrongly", source)
    with pytest.raises(PluginLoadError) as caught:
        make_app({"active_plugins": ["wrongly"]}).require_plugins()
    assert "plugin 'wrongly'" in str(caught.value) and complaint in str(caught.value)


def test_a_batch_hook_taking_any_keywords_gets_the_items(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("loose", "def execute_batch(**given):\n"
                          "    return [{'given': sorted(given)} for _ in given['items']]\n")
    app = make_app({"active_plugins": ["loose"]})
    [outcome] = batch(app, [body("m", write_data("a.txt", "x"))])
    assert outcome.status == "DONE"
    assert result_of(app, "m", "loose")["result"] == {"given": ["config", "database", "items", "logger"]}
