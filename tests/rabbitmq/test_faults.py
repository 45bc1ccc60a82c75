"""Faults against the real broker: killed loaders, a broker restart, competing loaders, SIGTERM.

The status database is the real PostgreSQL (a schema per test), as in production.  The broker restart
happens on a RabbitMQ node of the test's own (``own_rabbitmq``), never on the shared one.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.rabbit_node import RabbitNode
from sqapi import supervisor
from sqapi.app import Sqapi
from tests.rabbitmq.conftest import (
    Loaders,
    broker_section,
    count,
    declare,
    depth,
    listening,
    message,
    publish,
    wait_until,
)


def consuming(loader: Any) -> bool:
    return "consuming from queue" in loader.output()


@pytest.fixture
def config(loader_config: Callable[..., Path], workdir: Path, pg_section: dict[str, Any]) -> Callable[..., Path]:
    def write(**broker: Any) -> Path:
        path = loader_config(**broker)
        # one loader process per command unless a test asks for more (processes: auto would run one per CPU)
        text = path.read_text() + yaml.safe_dump({"active_plugins": ["record"], "database": pg_section,
                                                  "processing": {"processes": 1}})
        path.write_text(text)
        return path

    return write


@pytest.mark.slow
def test_a_loader_killed_mid_message_loses_nothing_and_the_side_effect_happens_once(
        vhost: str, broker: dict[str, Any], loaders: Loaders, config: Callable[..., Path],
        status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    declare(vhost, broker)
    cfg = config()
    publish(vhost, [message("slow", sleep_first_run=60)] + [message(n) for n in range(5)])
    first = loaders.start(cfg)
    wait_until(lambda: status_db("SELECT 1 FROM record_runs WHERE uuid = 'msg-slow'"), what="the slow plugin")
    first.signal(signal.SIGKILL)
    first.wait()
    second = loaders.start(cfg)
    wait_until(lambda: count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status = 'DONE'") == 6,
               timeout=60, what="all six DONE after the kill")
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    runs = status_db("SELECT uuid, COUNT(*) AS n FROM record_runs GROUP BY uuid")
    assert {r["uuid"]: r["n"] for r in runs}["msg-slow"] == 2      # started, killed, redelivered, finished
    effects = status_db("SELECT uuid FROM record_effects")
    assert sorted(r["uuid"] for r in effects) == sorted(["msg-slow"] + [f"msg-{n}" for n in range(5)])
    assert depth(vhost, "sqapi") == 0 and depth(vhost, "sqapi.dead") == 0


@pytest.mark.slow
def test_two_loaders_on_one_queue_share_the_work_and_process_every_uuid_once(
        vhost: str, broker: dict[str, Any], loaders: Loaders, config: Callable[..., Path],
        status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    declare(vhost, broker)
    cfg = config(prefetch=10)
    started = [loaders.start(cfg), loaders.start(cfg)]
    wait_until(lambda: all(consuming(loader) for loader in started), what="both loaders consuming")
    total = 200
    publish(vhost, [message(n) for n in range(total)])
    wait_until(lambda: count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status = 'DONE'") == total,
               timeout=120, what=f"{total} DONE")
    for loader in started:
        loader.signal(signal.SIGTERM)
    assert [loader.wait() for loader in started] == [0, 0]
    assert count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE attempts = 1") == total
    runs = status_db("SELECT uuid, COUNT(*) AS n, MIN(pid) AS pid FROM record_runs GROUP BY uuid")
    assert len(runs) == total and all(r["n"] == 1 for r in runs)
    assert len({r["pid"] for r in runs}) == 2, "one loader did all the work"
    assert count(status_db, "SELECT COUNT(*) AS n FROM record_effects") == total
    assert depth(vhost, "sqapi") == 0


@pytest.mark.slow
def test_one_loader_command_with_two_processes_shares_the_work_survives_a_killed_process_and_stops_on_sigterm(
        vhost: str, broker: dict[str, Any], loaders: Loaders, config: Callable[..., Path],
        status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    declare(vhost, broker)
    boss = loaders.start(config(prefetch=10), "--processes", "2")
    wait_until(lambda: boss.output().count("consuming from queue") == 2, what="two loader processes consuming")
    total = 200
    publish(vhost, [message(n) for n in range(total)])
    done = "SELECT COUNT(*) AS n FROM messages WHERE status = 'DONE'"
    wait_until(lambda: count(status_db, done) == total, timeout=120, what=f"{total} DONE")
    workers = {r["pid"] for r in status_db("SELECT DISTINCT pid FROM record_runs")}
    assert len(workers) == 2 and boss.process.pid not in workers, "the two loader processes share the work"
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "was killed by SIGKILL; starting another" in boss.output()
               and boss.output().count("consuming from queue") == 3, what="a new loader process")
    publish(vhost, [message(n) for n in range(total, total + 100)])
    wait_until(lambda: count(status_db, done) == total + 100, timeout=120, what="the next 100 DONE")
    boss.signal(signal.SIGTERM)
    assert boss.wait() == 0
    runs = status_db("SELECT uuid, COUNT(*) AS n FROM record_runs GROUP BY uuid")
    assert len(runs) == total + 100 and all(r["n"] == 1 for r in runs)
    assert depth(vhost, "sqapi") == 0
    alive = [pid for pid in {r["pid"] for r in status_db("SELECT DISTINCT pid FROM record_runs")}
             if os.path.exists(f"/proc/{pid}") and "sqapi" in open(f"/proc/{pid}/cmdline").read()]
    assert alive == [], "loader processes outlived their supervisor"
    workers = {r["worker"] for r in status_db("SELECT DISTINCT worker FROM record_runs")}
    assert workers and not any(os.path.exists(f"/proc/{pid}") for pid in workers), "plugin workers outlived it"


@pytest.mark.slow
def test_by_default_one_loader_command_runs_one_process_per_cpu_on_rabbitmq_with_postgres(
        vhost: str, broker: dict[str, Any], loaders: Loaders, config: Callable[..., Path],
        status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    declare(vhost, broker)
    path = config(prefetch=10)
    settings = yaml.safe_load(path.read_text())
    del settings["processing"]  # the default: processes: auto
    path.write_text(yaml.safe_dump(settings))
    expected = min(supervisor.AUTO_MAX, len(os.sched_getaffinity(0)))
    boss = loaders.start(path)
    wait_until(lambda: boss.output().count("consuming from queue") == expected,
               what=f"{expected} loader process(es) consuming")
    if expected > 1:
        assert f"running {expected} loader processes (processing.processes: auto, " in boss.output()
    publish(vhost, [message(n) for n in range(100)])
    done = "SELECT COUNT(*) AS n FROM messages WHERE status = 'DONE'"
    wait_until(lambda: count(status_db, done) == 100, timeout=120, what="100 DONE")
    boss.signal(signal.SIGTERM)
    assert boss.wait() == 0
    assert boss.output().count("consuming from queue") == expected, "no process was started beyond the count"
    runs = status_db("SELECT uuid, COUNT(*) AS n FROM record_runs GROUP BY uuid")
    assert len(runs) == 100 and all(r["n"] == 1 for r in runs)


@pytest.mark.slow
def test_sigterm_finishes_in_flight_work_requeues_the_rest_and_exits_zero(
        vhost: str, broker: dict[str, Any], loaders: Loaders, config: Callable[..., Path],
        status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    declare(vhost, broker)
    cfg = config(workers=2, prefetch=4)
    publish(vhost, [message(n, sleep=1) for n in range(8)])
    first = loaders.start(cfg)
    wait_until(lambda: status_db("SELECT 1 FROM record_runs"), what="the first plugin run")
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0, first.output()
    done = count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status = 'DONE'")
    assert 1 <= done < 8
    assert count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status <> 'DONE'") == 0, \
        "a message was left half-processed"
    assert depth(vhost, "sqapi") == 8 - done, "a message was lost or acked without being processed"
    second = loaders.start(cfg)
    wait_until(lambda: count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status = 'DONE'") == 8,
               timeout=60, what="the rest DONE by the next loader")
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0
    runs = status_db("SELECT uuid, COUNT(*) AS n FROM record_runs GROUP BY uuid")
    assert len(runs) == 8 and all(r["n"] == 1 for r in runs), "a finished message ran again"


@pytest.mark.slow
def test_the_loader_resumes_by_itself_after_rabbitmq_restarts_mid_run(
        make_app: Callable[..., Sqapi], own_rabbitmq: RabbitNode, record_plugin: Path,
        pg_section: dict[str, Any],
        write_data: Callable[[str, bytes | str], str]) -> None:
    write_data("item.txt", "hello")
    node, vhost = own_rabbitmq, "/"  # the node is this test's alone: its default vhost is too
    broker = {**broker_section(vhost, node.port), "prefetch": 4}
    app = make_app({"msg_broker": broker, "active_plugins": ["record"], "database": pg_section})
    declare(vhost, broker)
    total = 30
    publish(vhost, [message(n, sleep=0.3) for n in range(20)], port=node.port)

    def done() -> int:
        return app.database.count_by_status().get("DONE", 0)

    with listening(app) as listener:
        wait_until(lambda: done() >= 2, what="the first messages DONE")
        node.ctl("stop_app")
        node.ctl("start_app")
        publish(vhost, [message(n) for n in range(20, total)], port=node.port)  # published after the restart
        wait_until(lambda: done() == total, timeout=60, what="every message DONE after the restart")
    assert listener.sessions >= 2, "the loader never reconnected"
    assert depth(vhost, "sqapi", port=node.port) == 0
    effects = app.database.execute_query("SELECT COUNT(*) AS n FROM record_effects")
    assert effects[0]["n"] == total
