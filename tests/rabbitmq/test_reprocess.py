"""``sqapi reprocess --plugin P --outdated`` as an operator runs it: a loader subprocess on the real RabbitMQ,
the status database in the real PostgreSQL (a schema per test), the reprocess a subprocess too."""

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

TOTAL = 50

RUN_PLUGIN = '''
def execute(config, database, message, metadata, data):
    database.execute_query("INSERT INTO plugin_runs (uuid, plugin) VALUES (%(uuid)s, %(plugin)s)",
                           uuid=message.uuid, plugin=config.plugin.name)
    return {"ok": True}
'''
RUNS_INIT = "CREATE TABLE IF NOT EXISTS plugin_runs (uuid TEXT NOT NULL, plugin TEXT NOT NULL);\n"

Query = Callable[[str], list[dict[str, Any]]]


@pytest.fixture
def setup(workdir: Path, broker: dict[str, Any], pg_section: dict[str, Any], write_plugin: Callable[..., Path],
          write_data: Callable[[str, bytes | str], str], status_db: Query, loaders: Loaders) -> Iterator[Path]:
    """50 messages DONE by ocr (version 1), index (after ocr), summary (after index) and thumbs (on its own);
    then ocr's version raised to 2."""
    write_plugin("ocr", RUN_PLUGIN, config={"version": "1"}, init_sql=RUNS_INIT)
    write_plugin("index", RUN_PLUGIN, config={"plugin": {"after": ["ocr"]}}, init_sql=RUNS_INIT)
    write_plugin("summary", RUN_PLUGIN, config={"plugin": {"after": ["index"]}}, init_sql=RUNS_INIT)
    write_plugin("thumbs", RUN_PLUGIN, config={"version": "7"}, init_sql=RUNS_INIT)
    write_data("item.txt", "hello")
    config = workdir / "sqapi.yml"
    config.write_text(yaml.safe_dump({"msg_broker": broker, "database": pg_section,
                                      "active_plugins": ["ocr", "index", "summary", "thumbs"]}), encoding="utf-8")
    declare(broker["vhost"], broker)
    process_all(loaders, config, status_db, lambda: publish(broker["vhost"], [message(n) for n in range(TOTAL)]))
    assert count(status_db, "SELECT COUNT(*) AS n FROM message_plugins WHERE plugin = 'ocr' AND version = '1'") \
        == TOTAL
    (workdir / "plugins" / "ocr" / "config.yml").write_text("version: '2'\n", encoding="utf-8")
    status_db("DELETE FROM plugin_runs RETURNING uuid")
    yield config


def process_all(loaders: Loaders, config: Path, status_db: Query, before: Callable[[], None] = lambda: None) -> None:
    vhost = yaml.safe_load(config.read_text())["msg_broker"]["vhost"]
    loader = loaders.start(config)
    before()
    wait_until(lambda: depth(vhost, "sqapi") == 0 and count(
        status_db, "SELECT COUNT(*) AS n FROM messages WHERE status = 'DONE'") == TOTAL,
        timeout=120, what="every message DONE and the queue drained")
    loader.signal(signal.SIGTERM)
    assert loader.wait() == 0


def sqapi(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SQAPI, *args], cwd=workdir, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))


def runs_by_plugin(status_db: Query) -> dict[str, int]:
    return {row["plugin"]: int(row["n"])
            for row in status_db("SELECT plugin, COUNT(*) AS n FROM plugin_runs GROUP BY plugin")}


def test_reprocess_after_a_version_bump_reruns_the_plugin_and_those_after_it_once_then_nothing(
        setup: Path, workdir: Path, vhost: str, loaders: Loaders, status_db: Query) -> None:
    done = sqapi(workdir, "reprocess", "-c", str(setup), "--plugin", "ocr", "--outdated", "--batch-size", "20")
    assert done.returncode == 0, done.stderr
    assert "50 message(s) processed by another version of ocr than 2; re-running ocr, index, summary" in done.stdout
    assert "batch 3: re-published 10 of 10 (50 of 50)" in done.stdout
    assert depth(vhost, "sqapi") == TOTAL
    # not yet taken up by a loader: a second call selects none of them again
    waiting = sqapi(workdir, "reprocess", "-c", str(setup), "--plugin", "ocr", "--outdated")
    assert waiting.returncode == 0 and "0 outdated, re-published 0" in waiting.stderr, waiting.stderr
    assert depth(vhost, "sqapi") == TOTAL

    process_all(loaders, setup, status_db)
    assert runs_by_plugin(status_db) == {"ocr": TOTAL, "index": TOTAL, "summary": TOTAL}  # thumbs: never
    assert count(status_db, "SELECT COUNT(*) AS n FROM message_plugins WHERE plugin = 'ocr' AND version = '2' "
                            "AND status = 'DONE'") == TOTAL
    again = sqapi(workdir, "reprocess", "-c", str(setup), "--plugin", "ocr", "--outdated")
    assert again.returncode == 0 and "0 outdated, re-published 0" in again.stderr, again.stderr
    assert depth(vhost, "sqapi") == 0


# runs `sqapi reprocess ARGS...` and SIGKILLs it right after its 13th publish was confirmed (in its third batch
# of 5, before that message's row is marked): no timing involved
KILLED_REPROCESS = """
import os, signal, sys
from sqapi.connectors.listeners._amqp import Publisher

original, calls = Publisher.publish, []

def publish(self, *args, **kwargs):
    original(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 13:
        os.kill(os.getpid(), signal.SIGKILL)

Publisher.publish = publish
from sqapi.cli import main
main(sys.argv[1:])
"""


def test_a_reprocess_killed_half_way_and_run_again_finishes_the_rest_and_repeats_nothing(
        setup: Path, workdir: Path, vhost: str, loaders: Loaders, status_db: Query) -> None:
    first = subprocess.run([sys.executable, "-c", KILLED_REPROCESS, "reprocess", "-c", str(setup), "--plugin", "ocr",
                            "--outdated", "--batch-size", "5"], cwd=workdir, capture_output=True, text=True,
                           timeout=120, env=dict(os.environ))
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert first.stdout.splitlines()[-1] == "batch 2: re-published 5 of 5 (10 of 50)"
    assert depth(vhost, "sqapi") == 13
    second = sqapi(workdir, "reprocess", "-c", str(setup), "--plugin", "ocr", "--outdated", "--batch-size", "5")
    assert second.returncode == 0, second.stderr
    # the 13th (published, not marked) is published again; the 12 marked ones are not selected again
    assert second.stdout.startswith("38 message(s) processed by another version of ocr"), second.stdout
    assert depth(vhost, "sqapi") == TOTAL + 1

    process_all(loaders, setup, status_db)
    assert runs_by_plugin(status_db) == {"ocr": TOTAL, "index": TOTAL, "summary": TOTAL}  # the duplicate ran nothing
    again = sqapi(workdir, "reprocess", "-c", str(setup), "--plugin", "ocr", "--outdated")
    assert "0 outdated, re-published 0" in again.stderr, again.stderr


def test_a_dry_run_counts_and_changes_nothing_and_bad_requests_are_refused(
        setup: Path, workdir: Path, vhost: str, status_db: Query) -> None:
    before = status_db("SELECT m.uuid, m.status, m.info, p.plugin, p.status AS ps FROM messages m "
                       "JOIN message_plugins p USING (uuid) ORDER BY 1, 4")
    dry = sqapi(workdir, "reprocess", "-c", str(setup), "--plugin", "ocr", "--outdated", "--dry-run")
    assert dry.returncode == 0 and "50 outdated, would re-publish 50" in dry.stderr, dry.stderr
    assert status_db("SELECT m.uuid, m.status, m.info, p.plugin, p.status AS ps FROM messages m "
                     "JOIN message_plugins p USING (uuid) ORDER BY 1, 4") == before
    assert depth(vhost, "sqapi") == 0
    unversioned = sqapi(workdir, "reprocess", "-c", str(setup), "--plugin", "index", "--outdated")
    assert unversioned.returncode == 2 and "declares no version" in unversioned.stderr
    unknown = sqapi(workdir, "reprocess", "-c", str(setup), "--plugin", "nope", "--outdated")
    assert unknown.returncode == 2 and "'nope' is not active" in unknown.stderr
    unsaid = sqapi(workdir, "reprocess", "-c", str(setup), "--plugin", "ocr")
    assert unsaid.returncode == 2 and "--outdated" in unsaid.stderr
