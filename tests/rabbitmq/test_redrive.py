"""``sqapi redrive`` as an operator runs it: loaders (``sqapi loader`` subprocesses) on the real RabbitMQ, the
status database in the real PostgreSQL (a schema per test), the redrive a subprocess too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.rabbitmq.conftest import SQAPI, Loaders, count, declare, depth, message, publish, wait_until

FAILING = 10
TOTAL = 100

# fails (retryable) on messages whose metadata says "fail", until a file "fixed" appears in its working directory
FLAKY_PLUGIN = '''
import os


def execute(config, database, message, metadata, data):
    database.execute_query("INSERT INTO plugin_runs (uuid, plugin) VALUES (%(uuid)s, 'flaky')", uuid=message.uuid)
    if metadata.get("fail") and not os.path.exists("fixed"):
        raise RuntimeError("flaky is broken for this one")
    return {"ok": True}
'''

OTHER_PLUGIN = '''
def execute(config, database, message, metadata, data):
    database.execute_query("INSERT INTO plugin_runs (uuid, plugin) VALUES (%(uuid)s, 'other')", uuid=message.uuid)
    return {"ok": True}
'''

RUNS_INIT = "CREATE TABLE IF NOT EXISTS plugin_runs (uuid TEXT NOT NULL, plugin TEXT NOT NULL);\n"


@pytest.fixture
def setup(workdir: Path, broker: dict[str, Any], pg_section: dict[str, Any], write_plugin: Callable[..., Path],
          write_data: Callable[[str, bytes | str], str], status_db: Callable[[str], list[dict[str, Any]]],
          loaders: Loaders) -> Iterator[Path]:
    """100 messages processed by a loader: ``flaky`` failed 10 of them for good (their dead letters in
    ``sqapi.dead``), ``other`` did all 100; then ``flaky`` is fixed and the loader stopped."""
    write_plugin("flaky", FLAKY_PLUGIN, init_sql=RUNS_INIT)
    write_plugin("other", OTHER_PLUGIN, init_sql=RUNS_INIT)
    write_data("item.txt", "hello")
    config = workdir / "sqapi.yml"
    config.write_text(yaml.safe_dump({
        "msg_broker": {**broker, "retry": {"max_attempts": 2, "initial_delay": 0.2, "max_delay": 0.5}},
        "database": pg_section, "active_plugins": ["flaky", "other"]}), encoding="utf-8")
    declare(broker["vhost"], broker)
    loader = loaders.start(config)
    publish(broker["vhost"], [message(n, fail=n < FAILING) for n in range(TOTAL)])
    wait_until(lambda: count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status IN ('DONE', 'FAILED')")
               == TOTAL, timeout=120, what="every message DONE or FAILED")
    loader.signal(signal.SIGTERM)
    assert loader.wait() == 0
    assert count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status = 'FAILED'") == FAILING
    assert depth(broker["vhost"], "sqapi.dead") == FAILING
    (workdir / "fixed").touch()
    status_db("DELETE FROM plugin_runs RETURNING uuid")
    yield config


def sqapi(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SQAPI, *args], cwd=workdir, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))


def runs(status_db: Callable[[str], list[dict[str, Any]]]) -> list[tuple[str, str]]:
    return sorted((row["plugin"], row["uuid"]) for row in status_db("SELECT uuid, plugin FROM plugin_runs"))


def process_all(loaders: Loaders, config: Path, status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    loader = loaders.start(config)
    wait_until(lambda: count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status = 'DONE'") == TOTAL,
               timeout=120, what="every message DONE")
    wait_until(lambda: depth_of_main(config) == 0, what="the queue drained")
    loader.signal(signal.SIGTERM)
    assert loader.wait() == 0


def depth_of_main(config: Path) -> int:
    broker = yaml.safe_load(config.read_text())["msg_broker"]
    return depth(broker["vhost"], "sqapi")


FAILED_UUIDS = [("flaky", f"msg-{n}") for n in range(FAILING)]


def test_redrive_of_a_fixed_plugin_runs_it_exactly_for_its_failures_and_empties_the_dead_letters(
        setup: Path, workdir: Path, vhost: str, loaders: Loaders,
        status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    done = sqapi(workdir, "redrive", "-c", str(setup), "--plugin", "flaky", "--status", "FAILED")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == FAILING and all("re-published from sqapi.dead" in line for line in lines), done.stdout
    assert "10 selected, re-published 10 (10 from dead letters)" in done.stderr
    assert depth(vhost, "sqapi.dead") == 0
    assert depth(vhost, "sqapi") == FAILING
    # reopened: RETRY, attempts from 1 again (the policy allows 2: a used-up count would give up at once)
    rows = status_db("SELECT status, attempts, info FROM messages WHERE uuid = 'msg-3'")
    assert rows[0]["status"] == "RETRY" and rows[0]["attempts"] == 0
    assert rows[0]["info"].startswith("redrive: re-published")
    history = status_db("SELECT status, info FROM message_events WHERE uuid = 'msg-3' ORDER BY id")
    assert history[-1]["status"] == "RETRY" and history[-1]["info"].startswith(
        "redrive: re-publishing at ") and "(was FAILED: gave up after 2 attempts: plugin flaky:" in history[-1]["info"]

    process_all(loaders, setup, status_db)
    assert runs(status_db) == sorted(FAILED_UUIDS)  # flaky 10 times, other never
    assert depth(vhost, "sqapi.dead") == 0

    again = sqapi(workdir, "redrive", "-c", str(setup), "--plugin", "flaky", "--status", "FAILED")
    assert again.returncode == 0 and again.stdout == "", again.stdout


# runs `sqapi redrive ARGS...` and SIGKILLs it right after the 5th call of the step named in argv[1] returned:
# the kill lands at that exact point of the 5th message (no timing involved)
KILLED_REDRIVE = """
import os, signal, sys
import sqapi.redrive
from sqapi.connectors.listeners._amqp import Publisher
from sqapi.connectors.listeners._dead_letters import AmqpDeadLetters

owner, name = {"publish": (Publisher, "publish"), "remove": (AmqpDeadLetters, "remove"),
               "mark": (sqapi.redrive, "mark_published")}[sys.argv[1]]
original, calls = getattr(owner, name), []

def step(*args, **kwargs):
    original(*args, **kwargs)
    calls.append(1)
    if len(calls) == 5:
        os.kill(os.getpid(), signal.SIGKILL)

setattr(owner, name, step if owner is sqapi.redrive else lambda self, *a, **k: step(self, *a, **k))
from sqapi.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("killed_after", ["publish", "remove", "mark"])
def test_a_redrive_killed_half_way_and_run_again_loses_nothing_and_runs_nothing_twice(
        setup: Path, workdir: Path, vhost: str, loaders: Loaders,
        status_db: Callable[[str], list[dict[str, Any]]], killed_after: str) -> None:
    """Killed after the 5th message's confirm (before its dead letter is removed), after its removal (before its
    row is marked), or after its mark (between messages)."""
    first = subprocess.run([sys.executable, "-c", KILLED_REDRIVE, killed_after, "redrive", "-c", str(setup),
                            "--plugin", "flaky", "--status", "FAILED"], cwd=workdir, capture_output=True, text=True,
                           timeout=120, env=dict(os.environ))
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert len(first.stdout.splitlines()) == 4  # the 5th message's line never came
    assert depth(vhost, "sqapi.dead") == FAILING - 4 - (killed_after != "publish")

    second = sqapi(workdir, "redrive", "-c", str(setup), "--plugin", "flaky", "--status", "FAILED")
    assert second.returncode == 0, second.stderr
    assert len(second.stdout.splitlines()) == FAILING - 4 - (killed_after == "mark")
    assert depth(vhost, "sqapi.dead") == 0
    assert {row["uuid"] for row in status_db("SELECT uuid FROM messages WHERE status = 'RETRY' "
                                             "AND info LIKE 'redrive: re-published%'")} \
        == {uuid for _, uuid in FAILED_UUIDS}
    # the 5th is published twice only when the kill fell between its confirm and its mark
    assert depth(vhost, "sqapi") == FAILING + (killed_after != "mark")

    process_all(loaders, setup, status_db)
    assert runs(status_db) == sorted(FAILED_UUIDS)  # each failure run once more, nothing else
    assert depth(vhost, "sqapi.dead") == 0


def test_a_dry_run_shows_what_it_would_do_and_changes_nothing(
        setup: Path, workdir: Path, vhost: str, status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    before = status_db("SELECT uuid, status, info, attempts, updated_at FROM messages ORDER BY uuid")
    done = sqapi(workdir, "redrive", "-c", str(setup), "--plugin", "flaky", "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == FAILING and all("FAILED: would re-publish from sqapi.dead" in line for line in lines)
    assert status_db("SELECT uuid, status, info, attempts, updated_at FROM messages ORDER BY uuid") == before
    assert depth(vhost, "sqapi.dead") == FAILING
    assert depth(vhost, "sqapi") == 0


def test_a_selection_by_uuid_and_reason_takes_only_those(
        setup: Path, workdir: Path, vhost: str, status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    done = sqapi(workdir, "redrive", "-c", str(setup), "--uuid", "msg-1", "--uuid", "msg-2", "--uuid", "msg-50",
                 "--reason", "BROKEN FOR THIS")
    assert done.returncode == 0, done.stderr
    assert sorted(line.split()[0] for line in done.stdout.splitlines()) == ["msg-1", "msg-2"]  # msg-50 is DONE
    assert depth(vhost, "sqapi.dead") == FAILING - 2
    nothing = sqapi(workdir, "redrive", "-c", str(setup), "--reason", "no failure says this")
    assert nothing.returncode == 0 and nothing.stdout == ""
    assert depth(vhost, "sqapi.dead") == FAILING - 2


@pytest.mark.parametrize(("args", "says"), [
    (["--status", "BOGUS"], "'BOGUS' is not one of"),
    (["--status", "DONE"], "sqapi reprocess"),
    (["--since", "2026-12-01", "--until", "2026-11-01"], "is after until"),
    (["--since", "yesterday"], "not a date or time"),
])
def test_a_bad_selection_is_refused_with_a_clear_error(
        setup: Path, workdir: Path, vhost: str, args: list[str], says: str) -> None:
    done = sqapi(workdir, "redrive", "-c", str(setup), *args)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert depth(vhost, "sqapi.dead") == FAILING
