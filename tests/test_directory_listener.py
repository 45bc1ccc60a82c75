"""The embedded listener: a spool folder of JSON message files."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

RECORDER = """
from pathlib import Path
def execute(config, database, message, metadata, data):
    database.execute_query("INSERT INTO seen (uuid) VALUES (%(uuid)s)", uuid=message.uuid)
"""


def drop(spool: Path, name: str, body: dict | str) -> None:
    """Publish the way the docs say: write under a hidden name, then rename."""
    spool.mkdir(parents=True, exist_ok=True)
    temporary = spool / f".{name}.tmp"
    temporary.write_text(body if isinstance(body, str) else json.dumps(body))
    os.rename(temporary, spool / name)


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def spool_app(make_app, write_plugin, workdir):
    write_plugin("recorder", RECORDER, init_sql="CREATE TABLE IF NOT EXISTS seen (uuid TEXT);")

    def make(**overrides):
        config = {"active_plugins": ["recorder"], "msg_broker": {"poll_interval": 0.05,
                                                                 "retry": {"initial_delay": 0.2}}}
        config.update(overrides)
        return make_app(config)

    return make


def seen(app) -> list[str]:
    rows = app.plugins.plugins["recorder"].database.execute_query("SELECT uuid FROM seen ORDER BY uuid")
    return [r["uuid"] for r in rows]


def test_dropped_files_are_processed_and_moved_to_done_or_failed(spool_app, write_data, workdir) -> None:
    app = spool_app()
    spool = workdir / "spool"
    location = write_data("a.txt", "x")
    for i in range(5):
        drop(spool, f"m{i}.json", {"uuid_ref": f"u{i}", "data_location": location})
    drop(spool, "broken.json", "{nope")
    drop(spool, "outside.json", {"uuid_ref": "bad", "data_location": "../../etc/passwd"})
    app.create_listener().start_listeners(until_idle=True)
    assert sorted(p.name for p in (spool / "done").iterdir()) == [f"m{i}.json" for i in range(5)]
    assert seen(app) == [f"u{i}" for i in range(5)]
    failed = spool / "failed"
    assert sorted(p.name for p in failed.iterdir()) == ["broken.json", "broken.json.reason", "outside.json",
                                                        "outside.json.reason"]
    assert "not valid JSON" in (failed / "broken.json.reason").read_text()
    assert "outside base_dir" in (failed / "outside.json.reason").read_text()
    assert [p.name for p in spool.glob("*.json")] == []


def test_a_retryable_failure_waits_in_retry_and_succeeds_when_the_data_appears(spool_app, write_data,
                                                                                workdir) -> None:
    app = spool_app()
    spool = workdir / "spool"
    drop(spool, "late.json", {"uuid_ref": "late", "data_location": "late.txt"})
    listener = app.create_listener()
    thread = threading.Thread(target=listener.start_listeners)
    thread.start()
    try:
        wait_for(lambda: any((spool / "retry").glob("2~late.json")))
        assert app.database.get_message("late")["status"] == "RETRY"
        write_data("late.txt", "now here")
        wait_for(lambda: (spool / "done" / "late.json").exists())
    finally:
        listener.stop()
        thread.join(10)
    assert not thread.is_alive()
    row = app.database.get_message("late")
    assert row["status"] == "DONE" and row["attempts"] >= 2


def test_a_message_is_dead_lettered_after_max_attempts(spool_app, workdir) -> None:
    app = spool_app(msg_broker={"poll_interval": 0.05, "retry": {"max_attempts": 3, "initial_delay": 0.05}})
    spool = workdir / "spool"
    drop(spool, "never.json", {"uuid_ref": "never", "data_location": "never.txt"})
    app.create_listener().start_listeners(until_idle=True)
    reason = (spool / "failed" / "never.json.reason").read_text()
    assert "gave up after 3 attempts" in reason and "attempts: 3" in reason
    assert app.database.get_message("never")["status"] == "FAILED"


def test_files_claimed_by_a_loader_that_died_are_picked_up_again(spool_app, write_data, workdir) -> None:
    app = spool_app()
    spool = workdir / "spool"
    location = write_data("a.txt", "x")
    dead = spool / ".processing" / "host-99999-dead"
    dead.mkdir(parents=True)
    (dead / ".lock").touch()
    (dead / "orphan.json").write_text(json.dumps({"uuid_ref": "orphan", "data_location": location}))
    alive = spool / ".processing" / "host-1-alive"
    alive.mkdir(parents=True)
    (alive / "busy.json").write_text(json.dumps({"uuid_ref": "busy", "data_location": location}))
    with open(alive / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # a live loader holds its lock
        app.create_listener().start_listeners(until_idle=True)
        assert (alive / "busy.json").exists()  # left alone
    assert (spool / "done" / "orphan.json").exists()
    assert not dead.exists()
    assert seen(app) == ["orphan"]


def test_two_loaders_on_one_spool_process_each_file_once(spool_app, write_data, workdir) -> None:
    app = spool_app()
    spool = workdir / "spool"
    location = write_data("a.txt", "x")
    for i in range(60):
        drop(spool, f"m{i:02d}.json", {"uuid_ref": f"u{i:02d}", "data_location": location})
    loaders = [app.create_listener() for _ in range(2)]
    threads = [threading.Thread(target=lo.start_listeners, kwargs={"until_idle": True}) for lo in loaders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen(app) == [f"u{i:02d}" for i in range(60)]
    assert len(list((spool / "done").iterdir())) == 60


def test_stop_finishes_in_flight_work_and_leaves_the_rest_waiting(make_app, write_plugin, write_data,
                                                                  workdir) -> None:
    write_plugin("slowish", "import time\ndef execute(config, database, message, metadata, data):\n"
                            "    time.sleep(0.3)\n")
    app = make_app({"active_plugins": ["slowish"], "processing": {"workers": 1},
                    "msg_broker": {"poll_interval": 0.05}})
    spool = workdir / "spool"
    location = write_data("a.txt", "x")
    for i in range(6):
        drop(spool, f"m{i}.json", {"uuid_ref": f"u{i}", "data_location": location})
    listener = app.create_listener()
    thread = threading.Thread(target=listener.start_listeners)
    thread.start()
    wait_for(lambda: any((spool / "done").glob("*.json")) if (spool / "done").exists() else False)
    listener.stop()
    thread.join(10)
    done = {p.name for p in (spool / "done").iterdir()}
    waiting = {p.name for p in spool.glob("*.json")}
    assert done and waiting and done | waiting == {f"m{i}.json" for i in range(6)}
    assert list((spool / ".processing").iterdir()) == []
    assert all(app.database.get_message(f"u{n[1]}")["status"] == "DONE" for n in done)


def test_a_file_whose_handling_raises_goes_back_to_retry_at_once_and_is_handled_again(tmp_path: Path) -> None:
    from sqapi.connectors.listeners.directory import Listener
    from sqapi.core.consumer import Consumer
    from sqapi.core.outcome import Action, Delivery, Outcome

    deliveries: list[Delivery] = []
    seen_in_retry: list[list[str]] = []

    def process(raw: bytes, delivery: Delivery) -> Outcome:
        deliveries.append(delivery)
        if len(deliveries) == 1:
            raise RuntimeError("status database went away")
        seen_in_retry.append(sorted(p.name for p in (tmp_path / "spool" / "retry").iterdir()))
        return Outcome(uuid="m", status="DONE", action=Action.ACK)

    drop(tmp_path / "spool", "m.json", {"uuid_ref": "m", "data_location": "x"})
    def process_batch(items: list[tuple[bytes, Delivery]]) -> list[Outcome]:
        return [process(raw, delivery) for raw, delivery in items]

    listener = Consumer(Listener({"directory": str(tmp_path / "spool"), "poll_interval": 0.05,
                                  "handback_delay": 0.3}), process_batch)  # type: ignore[arg-type]
    started = time.monotonic()
    listener.start_listeners(until_idle=True)
    assert time.monotonic() - started >= 0.3  # it waited the hand-back delay
    assert [d.attempt for d in deliveries] == [1, 2]
    assert seen_in_retry == [[]]  # taken from retry/ for the second try
    assert (tmp_path / "spool" / "done" / "m.json").exists()
    assert [p.name for p in (tmp_path / "spool" / ".processing").iterdir()] == []
