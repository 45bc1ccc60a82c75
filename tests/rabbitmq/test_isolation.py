"""Plugins written the sqAPI way, under ``sqapi loader`` on the real broker and PostgreSQL: isolation in processes.

A plugin that is not thread-safe gives right answers under load; plugins that segfault, abort,
busy-loop or sleep for ever fail with their own reasons while the other messages finish, and
the loader process itself is untouched.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.rabbitmq.conftest import Loaders, count, declare, depth, publish, wait_until

#: module-level state set up lazily and used across the call, as plugins written for one call at a time do:
#: two calls at once in one interpreter corrupt it (a half-built table, another call's text)
NOT_THREAD_SAFE = '''
import time

TABLE = None
CURRENT = None


def table():
    global TABLE
    if TABLE is None:
        TABLE = {}
        for code in range(ord("a"), ord("z") + 1):  # built slowly, visible half-built to another thread
            TABLE[chr(code)] = chr(code).upper()
            time.sleep(0.0005)
    return TABLE


def execute(config, database, message, metadata, data):
    global CURRENT
    CURRENT = data.read().decode()
    time.sleep(0.002)
    return {"upper": "".join(table().get(c, "?") for c in CURRENT)}
'''

HAZARD = '''
import ctypes
import os
import time


def execute(config, database, message, metadata, data):
    what = metadata.get("hazard")
    if what == "segfault":
        ctypes.string_at(0)
    elif what == "abort":
        os.abort()
    elif what == "busy":
        while True:
            pass
    elif what == "sleep":
        time.sleep(3600)
    elif what == "nap":
        time.sleep(0.5)
    return {"ok": os.getpid()}
'''

TIMEOUT = 2.0


def write_config(workdir: Path, broker: dict[str, Any], pg_section: dict[str, Any], plugin: str,
                 **broker_overrides: Any) -> Path:
    path = workdir / "loader.yml"
    path.write_text(yaml.safe_dump({"msg_broker": {**broker, **broker_overrides}, "database": pg_section,
                                    "active_plugins": [plugin], "processing": {"processes": 1, "workers": 4}}))
    return path


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no thread count for {pid}")


def body(uuid: str, location: str, **metadata: Any) -> dict[str, Any]:
    return {"uuid_ref": uuid, "data_location": location, "metadata": metadata}


@pytest.mark.slow
def test_a_plugin_that_is_not_thread_safe_gives_every_message_its_own_answer_under_the_loader(
        workdir: Path, write_plugin: Callable[..., Path], write_data: Callable[[str, bytes | str], str],
        vhost: str, broker: dict[str, Any], pg_section: dict[str, Any], loaders: Loaders,
        status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    write_plugin("letters", NOT_THREAD_SAFE)  # no config.yml: it knows nothing of sqapi
    words = ["".join(chr(ord("a") + (n * 7 + k) % 26) for k in range(5 + n % 7)) for n in range(200)]
    locations = [write_data(f"w{n}.txt", word) for n, word in enumerate(words)]
    declare(vhost, broker)
    loader = loaders.start(write_config(workdir, broker, pg_section, "letters", batch_size=8))
    wait_until(lambda: "consuming from queue" in loader.output(), what="the loader consuming")
    publish(vhost, [body(f"w-{n}", location) for n, location in enumerate(locations)])
    wait_until(lambda: count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status = 'DONE'") == 200,
               timeout=180, what="200 DONE")
    rows = status_db("SELECT uuid, result FROM message_plugins WHERE plugin = 'letters'")
    answers = {row["uuid"]: json.loads(row["result"])["upper"] for row in rows}
    assert answers == {f"w-{n}": word.upper() for n, word in enumerate(words)}
    loader.signal(signal.SIGTERM)
    assert loader.wait() == 0


@pytest.mark.slow
def test_plugins_that_crash_or_hang_fail_alone_within_their_timeout_and_the_loader_is_untouched(
        workdir: Path, write_plugin: Callable[..., Path], write_data: Callable[[str, bytes | str], str],
        vhost: str, broker: dict[str, Any], pg_section: dict[str, Any], loaders: Loaders,
        status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    write_plugin("hazard", HAZARD, config={"plugin": {"timeout": TIMEOUT}})
    location = write_data("item.txt", "hello")
    declare(vhost, broker)
    config = write_config(workdir, broker, pg_section, "hazard", batch_size=4, retry={"max_attempts": 1})
    loader = loaders.start(config)
    wait_until(lambda: "consuming from queue" in loader.output(), what="the loader consuming")
    pid = loader.process.pid
    # warm up as the fault phase will run: slow calls, so that every worker thread of the listener starts
    publish(vhost, [body(f"nap-{n}", location, hazard="nap") for n in range(16)]
            + [body(f"warm-{n}", location) for n in range(24)])
    done = "SELECT COUNT(*) AS n FROM messages WHERE status = 'DONE'"
    wait_until(lambda: count(status_db, done) == 40, timeout=60, what="the warm-up DONE")
    threads_before = threads_of(pid)
    hazards = ["segfault", "abort", "busy", "sleep"]
    publish(vhost, [body(f"bad-{what}", location, hazard=what) for what in hazards]
            + [body(f"ok-{n}", location) for n in range(100)])
    wait_until(lambda: count(status_db, done) == 140, timeout=120, what="the 100 other messages DONE")
    wait_until(lambda: count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status = 'FAILED'") == 4,
               timeout=60, what="the 4 hazards FAILED")
    failed = {row["uuid"]: row for row in status_db(
        "SELECT uuid, info, EXTRACT(EPOCH FROM updated_at - created_at) AS took FROM messages "
        "WHERE status = 'FAILED'")}
    assert set(failed) == {f"bad-{what}" for what in hazards}
    assert "plugin hazard: its worker process crashed (killed by SIGSEGV)" in failed["bad-segfault"]["info"]
    assert "plugin hazard: its worker process crashed (killed by SIGABRT)" in failed["bad-abort"]["info"]
    for what in ("busy", "sleep"):
        assert f"plugin hazard: timed out after {TIMEOUT:g}s (its worker process was killed)" \
            in failed[f"bad-{what}"]["info"]
    assert all(float(row["took"]) <= TIMEOUT + 2 for row in failed.values()), failed
    assert depth(vhost, "sqapi.dead") == 4 and depth(vhost, "sqapi") == 0
    # the loader is the same process, with the same threads; no worker is left spinning
    assert loader.process.poll() is None and threads_of(pid) == threads_before
    time.sleep(0.5)
    assert busy_workers(pid) == []
    loader.signal(signal.SIGTERM)
    assert loader.wait() == 0


def busy_workers(loader: int) -> list[int]:
    """Descendants of the loader that used CPU in the last half second."""
    def descendants(pid: int) -> list[int]:
        try:
            children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []
        return children + [d for child in children for d in descendants(child)]

    def cpu(pid: int) -> int:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return int(fields[11]) + int(fields[12])

    before = {pid: cpu(pid) for pid in descendants(loader)}
    time.sleep(0.5)
    return [pid for pid, ticks in before.items() if os.path.exists(f"/proc/{pid}") and cpu(pid) - ticks > 10]
