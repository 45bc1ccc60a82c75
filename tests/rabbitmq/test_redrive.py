"""``sqapi redrive`` as an operator runs it: loaders (``sqapi loader`` subprocesses) on the real RabbitMQ, the
status database in the real PostgreSQL (a schema per test), the redrive a subprocess too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.rabbitmq.conftest import (
    SQAPI,
    Loaders,
    connection,
    count,
    declare,
    depth,
    message,
    publish,
    take_all,
    wait_until,
)

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
    assert len(lines) == FAILING and all(
        "FAILED: would re-publish from sqapi.dead if it holds its dead letter, else from its status row" in line
        for line in lines), done.stdout
    assert "10 selected, would re-publish 10; 10 dead letter(s) waiting, counted, not read" in done.stderr
    assert status_db("SELECT uuid, status, info, attempts, updated_at FROM messages ORDER BY uuid") == before
    assert depth(vhost, "sqapi.dead") == FAILING
    assert depth(vhost, "sqapi") == 0
    # no letter was ever delivered (and returned): a quorum queue counts each return against its delivery limit
    assert all(not (properties.headers or {}).get("x-delivery-count")
               for properties, _ in take_all(vhost, "sqapi.dead"))


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


def test_a_uuid_waiting_for_its_retry_is_selected_only_by_an_explicit_status_retry(
        setup: Path, workdir: Path, vhost: str, status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    status_db("UPDATE messages SET status = 'RETRY', info = 'attempt 1 of 2 failed' WHERE uuid = 'msg-3' "
              "RETURNING uuid")  # its retry waits in the delay queue: publishing it again would make two
    waiting = sqapi(workdir, "redrive", "-c", str(setup), "--uuid", "msg-3")
    assert waiting.returncode == 0 and waiting.stdout == "", waiting.stdout
    named = sqapi(workdir, "redrive", "-c", str(setup), "--uuid", "msg-3", "--status", "RETRY")
    assert named.returncode == 0 and named.stdout.startswith("msg-3 RETRY: re-published"), named.stdout
    assert depth(vhost, "sqapi") == 1


# runs `sqapi redrive ARGS...` (argv[2:]); right after its first re-publish is confirmed, that message "fails again
# at once": a new dead letter of it (its body, a reason header) is published to sqapi.dead -- as a loader would
FAILS_AGAIN = """
import json, sys
import pika
from sqapi.connectors.listeners._amqp import Publisher

broker, original, calls = json.loads(sys.argv[1]), Publisher.publish, []

def publish(self, body, *args, **kwargs):
    original(self, body, *args, **kwargs)
    calls.append(body)
    if len(calls) == 1:
        params = pika.ConnectionParameters(broker["host"], broker["port"], broker["vhost"],
                                           pika.PlainCredentials(broker["user"], broker["password"]))
        with pika.BlockingConnection(params) as conn:
            channel = conn.channel()
            channel.confirm_delivery()
            channel.basic_publish("", "sqapi.dead", body, pika.BasicProperties(
                delivery_mode=2, headers={"x-sqapi-reason": "failed again"}), mandatory=True)

Publisher.publish = publish
from sqapi.cli import main
main(sys.argv[2:])
"""


def test_a_dead_letter_set_aside_while_a_redrive_runs_stays_for_the_next_one(
        setup: Path, workdir: Path, vhost: str, broker: dict[str, Any]) -> None:
    done = subprocess.run([sys.executable, "-c", FAILS_AGAIN, json.dumps(broker), "redrive", "-c", str(setup),
                           "--plugin", "flaky", "--status", "FAILED"], cwd=workdir, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert "10 selected, re-published 10 (10 from dead letters)" in done.stderr
    assert "another copy" not in done.stdout
    first = done.stdout.split()[0]
    left = take_all(vhost, "sqapi.dead")
    assert [(json.loads(body)["uuid_ref"], (properties.headers or {}).get("x-sqapi-reason"))
            for properties, body in left] == [(first, "failed again")]
    assert depth(vhost, "sqapi") == FAILING


# runs `sqapi redrive ARGS...` and pauses it after its 4th reopen (that message's row reopened, not yet published)
# until a file "go" appears in its working directory; it writes "paused" when it gets there
PAUSED_REDRIVE = """
import os, sys, time
import sqapi.redrive

original, calls = sqapi.redrive.reopen, []

def reopen(*args, **kwargs):
    result = original(*args, **kwargs)
    calls.append(1)
    if len(calls) == 4:
        open("paused", "w").close()
        while not os.path.exists("go"):
            time.sleep(0.05)
    return result

sqapi.redrive.reopen = reopen
from sqapi.cli import main
main(sys.argv[1:])
"""


def test_a_second_redrive_while_one_runs_is_refused_and_nothing_is_published_twice(
        setup: Path, workdir: Path, vhost: str, status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    first = subprocess.Popen([sys.executable, "-c", PAUSED_REDRIVE, "redrive", "-c", str(setup), "--plugin",
                              "flaky", "--status", "FAILED"], cwd=workdir, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        wait_until(lambda: (workdir / "paused").exists() or first.poll() is not None, timeout=120,
                   what="the first redrive paused half-way")
        assert first.poll() is None, first.communicate()
        # a second one -- a second terminal, a dashboard button clicked twice -- and a reprocess
        second = sqapi(workdir, "redrive", "-c", str(setup), "--plugin", "flaky", "--status", "FAILED")
        assert second.returncode == 1 and "another redrive or reprocess is running" in second.stderr, second.stderr
        assert second.stdout == ""
        dry = sqapi(workdir, "redrive", "-c", str(setup), "--plugin", "flaky", "--dry-run")  # a look is allowed
        assert dry.returncode == 0, dry.stderr
        assert depth(vhost, "sqapi") == 3
    finally:
        (workdir / "go").touch()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert len(out.splitlines()) == FAILING
    assert depth(vhost, "sqapi") == FAILING and depth(vhost, "sqapi.dead") == 0
    assert count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status = 'RETRY' "
                            "AND info LIKE 'redrive: re-published%'") == FAILING


def set_aside(vhost: str, bodies: list[dict[str, Any]]) -> None:
    """Dead letters, straight into ``sqapi.dead`` (the default exchange), confirmed."""
    with connection(vhost) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish("", "sqapi.dead", json.dumps(body).encode(), mandatory=True)


def test_a_scan_of_the_dead_letters_reads_only_those_there_when_it_began(vhost: str, broker: dict[str, Any]) -> None:
    from sqapi.connectors.listeners._dead_letters import AmqpDeadLetters

    declare(vhost, broker)
    set_aside(vhost, [message(n) for n in range(3)])
    letters = AmqpDeadLetters(broker)
    letters.open()
    try:
        read = []
        for letter in letters.scan():
            read.append(json.loads(letter.body)["uuid_ref"])
            if len(read) == 1:
                set_aside(vhost, [message("late")])
        assert read == ["msg-0", "msg-1", "msg-2"]
        assert letters.count() == 1  # the late one; the three read are held
    finally:
        letters.close()
    assert depth(vhost, "sqapi.dead") == 4


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
