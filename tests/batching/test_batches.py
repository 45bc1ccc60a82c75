"""Batches of deliveries: shared status writes, the same guarantees as one message at a time."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sqapi.app import Sqapi
from sqapi.core.outcome import Action, Delivery
from sqapi.errors import ConnectorError
from tests.rabbitmq.conftest import declare, depth, listening, publish, wait_until

# each run appends a line to runs.log beside the data: the plugin's side effect
COUNTING = """
import os
def execute(config, database, message, metadata, data):
    with open(os.path.join(os.environ["SQAPI_TEST_DATA"], "runs.log"), "a") as log:
        log.write(message.uuid + "\\n")
    if metadata.get("fail"):
        raise RuntimeError("asked to fail")
    return {"seen": message.uuid}
"""

# what a later plugin sees recorded when it runs: the earlier plugin's row and the message's hash
WITNESS = """
def execute(config, database, message, metadata, data):
    first = database.execute_query(
        "SELECT status FROM message_plugins WHERE uuid = %(uuid)s AND plugin = 'first'", uuid=message.uuid)
    row = database.execute_query("SELECT status, hash_digest FROM messages WHERE uuid = %(uuid)s", uuid=message.uuid)
    return {"first": first[0]["status"] if first else None, "message": row[0]["status"],
            "hash_recorded": row[0]["hash_digest"] == message.hash_digest}
"""


def body(uuid: str, data: str = "item.txt", **metadata: Any) -> bytes:
    return json.dumps({"uuid_ref": uuid, "data_location": data, "data_type": "text/plain",
                       "metadata": metadata}).encode()


def runs(workdir: Path) -> list[str]:
    log = workdir / "data" / "runs.log"
    return log.read_text().split() if log.exists() else []


@pytest.fixture
def counting_app(make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path],
                 write_data: Callable[..., str], workdir: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Callable[..., Sqapi]:
    write_plugin("counting", COUNTING)
    write_data("item.txt", "hello")
    monkeypatch.setenv("SQAPI_TEST_DATA", str(workdir / "data"))

    def make(**overrides: Any) -> Sqapi:
        return make_app({"active_plugins": ["counting"], "msg_broker": {"retry": {"max_attempts": 3}}, **overrides})

    return make


def test_a_batch_ends_every_message_done_with_one_plugin_run_each(counting_app: Callable[..., Sqapi],
                                                                 workdir: Path) -> None:
    app = counting_app()
    outcomes = app.processor.process_batch([(body(f"u-{n}"), Delivery(f"d-{n}")) for n in range(10)])
    assert [(o.uuid, o.status, o.action) for o in outcomes] == [(f"u-{n}", "DONE", Action.ACK) for n in range(10)]
    assert sorted(runs(workdir)) == sorted(f"u-{n}" for n in range(10))
    assert app.database.count_by_status() == {"DONE": 10}
    assert all(app.database.get_plugin_rows(f"u-{n}")[0]["status"] == "DONE" for n in range(10))


def test_a_uuid_twice_in_one_batch_runs_its_plugin_once(counting_app: Callable[..., Sqapi], workdir: Path) -> None:
    app = counting_app()
    outcomes = app.processor.process_batch([(body("u-dup"), Delivery("d-1")), (body("u-other"), Delivery("d-2")),
                                            (body("u-dup"), Delivery("d-3"))])
    assert [(o.status, o.skipped) for o in outcomes] == [("DONE", False), ("DONE", False), ("DONE", True)]
    assert sorted(runs(workdir)) == ["u-dup", "u-other"]
    assert app.database.get_message("u-dup")["attempts"] == 2


def test_a_redelivered_batch_of_done_messages_runs_no_plugin(counting_app: Callable[..., Sqapi],
                                                            workdir: Path) -> None:
    app = counting_app()
    items = [(body(f"u-{n}"), Delivery(f"d-{n}")) for n in range(5)]
    app.processor.process_batch(items)
    again = app.processor.process_batch(items)
    assert all(o.status == "DONE" and o.skipped for o in again)
    assert len(runs(workdir)) == 5


def test_a_malformed_message_in_a_batch_is_dead_lettered_and_the_others_are_done(
        counting_app: Callable[..., Sqapi]) -> None:
    app = counting_app()
    outcomes = app.processor.process_batch([(body("u-1"), Delivery("d-1")), (b"{not json", Delivery("d-2")),
                                            (body("u-3"), Delivery("d-3"))])
    assert [o.action for o in outcomes] == [Action.ACK, Action.DEAD_LETTER, Action.ACK]
    assert "malformed" in (outcomes[1].reason or "")


def test_one_failing_message_in_a_batch_is_retried_and_the_others_are_done(counting_app: Callable[..., Sqapi],
                                                                          write_data: Callable[..., str]) -> None:
    app = counting_app()
    outcomes = app.processor.process_batch([(body("u-ok"), Delivery("d-1")),
                                            (body("u-bad", fail=True), Delivery("d-2")),
                                            (body("u-gone", "missing.txt"), Delivery("d-3"))])
    assert [(o.status, o.action) for o in outcomes] == [("DONE", Action.ACK), ("RETRY", Action.RETRY),
                                                        ("RETRY", Action.RETRY)]
    assert outcomes[1].plugin == "counting" and "asked to fail" in (outcomes[1].reason or "")
    assert [app.database.get_message(u)["status"] for u in ("u-ok", "u-bad", "u-gone")] == ["DONE", "RETRY", "RETRY"]


def test_a_plugins_done_and_the_hash_are_recorded_before_the_next_plugin_runs_in_a_batch(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("first", "def execute(config, database, message, metadata, data):\n    return {'n': 1}\n")
    write_plugin("second", WITNESS, config={"plugin": {"after": ["first"]}})
    write_data("item.txt", "hello")
    app = make_app({"active_plugins": ["first", "second"]})
    outcomes = app.processor.process_batch([(body(f"u-{n}"), Delivery(f"d-{n}")) for n in range(4)])
    assert {o.status for o in outcomes} == {"DONE"}
    for n in range(4):
        rows = {row["plugin"]: row for row in app.database.get_plugin_rows(f"u-{n}")}
        assert json.loads(rows["second"]["result"]) == {"first": "DONE", "message": "PROCESSING",
                                                        "hash_recorded": True}


def test_a_batch_writes_its_status_in_as_many_statements_as_one_message(counting_app: Callable[..., Sqapi]) -> None:
    app = counting_app()
    database = app.database
    calls: list[str] = []
    for name in ("execute_query", "execute_many"):
        original = getattr(database, name)

        def counted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(database, name, counted)
    app.process(body("u-alone"), Delivery("d-alone"))
    alone = len(calls)
    calls.clear()
    app.processor.process_batch([(body(f"u-{n}"), Delivery(f"d-{n}")) for n in range(20)])
    assert len(calls) <= alone


def test_a_batch_whose_status_write_fails_is_processed_again_one_by_one(counting_app: Callable[..., Sqapi]) -> None:
    app = counting_app()
    original = app.database.record_progress
    failed: list[int] = []

    def fails_once(updates: Any, rows: Any, last: bool = False) -> None:
        if rows and not failed:  # the batch's first plugin rows
            failed.append(len(rows))
            raise ConnectorError("database went away for a moment")
        original(updates, rows, last)

    app.database.record_progress = fails_once
    outcomes = app.processor.process_batch([(body(f"u-{n}"), Delivery(f"d-{n}")) for n in range(3)])
    assert failed == [3]
    assert [o.status for o in outcomes] == ["DONE"] * 3
    assert app.database.count_by_status() == {"DONE": 3}


# -- PostgreSQL: claims across threads and processes ---------------------------------------------------------------
def test_twenty_threads_of_batches_sharing_one_uuid_run_its_plugin_once_on_postgres(
        counting_app: Callable[..., Sqapi], pg_section: dict[str, Any], workdir: Path) -> None:
    app = counting_app(database=pg_section)
    start = threading.Barrier(20)
    outcomes: list[Any] = []

    def worker(n: int) -> None:
        start.wait()
        outcomes.extend(app.processor.process_batch([(body(f"u-{n}-a"), Delivery(f"d-{n}-a")),
                                                     (body("u-hot"), Delivery(f"d-{n}")),
                                                     (body(f"u-{n}-b"), Delivery(f"d-{n}-b"))]))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == 60 and {o.status for o in outcomes} == {"DONE"}
    assert runs(workdir).count("u-hot") == 1 and len(runs(workdir)) == 41
    assert app.database.get_message("u-hot")["attempts"] == 20


def test_a_uuid_another_process_holds_waits_for_it_while_the_rest_of_the_batch_goes_on(
        counting_app: Callable[..., Sqapi], pg_section: dict[str, Any], workdir: Path) -> None:
    from sqapi.connectors.db.postgres import Database

    app = counting_app(database=pg_section)
    other = Database(dict(pg_section))  # another worker process's connection
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with other.claim("u-busy"):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(30)
    with app.database.claim_many(["u-busy", "u-free"]) as held:
        assert held == {"u-free"}
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    outcomes = app.processor.process_batch([(body("u-busy"), Delivery("d-1")), (body("u-free"), Delivery("d-2"))])
    holder.join(30)
    other.close()
    assert [o.status for o in outcomes] == ["DONE", "DONE"]
    assert time.monotonic() - started >= 0.2  # u-busy waited for the other process
    assert sorted(runs(workdir)) == ["u-busy", "u-free"]


# -- the RabbitMQ listener hands its workers batches ----------------------------------------------------------------
def test_the_rabbitmq_listener_processes_a_backlog_in_batches_and_acks_every_message(
        counting_app: Callable[..., Sqapi], broker: dict[str, Any], vhost: str) -> None:
    app = counting_app(msg_broker={**broker, "batch_size": 8, "prefetch": 40})
    declare(vhost, broker)
    sizes: list[int] = []
    original = app.processor.process_batch

    def spied(items: Any) -> Any:
        sizes.append(len(items))
        return original(items)

    app.processor.process_batch = spied  # type: ignore[method-assign]
    publish(vhost, [body(f"u-{n}") for n in range(60)])
    with listening(app):
        wait_until(lambda: app.database.count_by_status().get("DONE", 0) == 60, what="60 DONE")
        wait_until(lambda: depth(vhost, "sqapi") == 0, what="an empty queue")
    assert sum(sizes) == 60 and max(sizes) <= 8 and max(sizes) > 1


# -- plugin calls with a timeout run on reused daemon threads ------------------------------------------------------
THREAD_PLUGIN = """
import threading, time
def execute(config, database, message, metadata, data):
    if metadata.get("hang"):
        time.sleep(2)
    return {"thread": threading.get_ident(), "daemon": threading.current_thread().daemon}
"""


def test_thread_isolated_calls_with_a_timeout_reuse_an_idle_daemon_thread_but_never_one_still_running(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str]) -> None:
    write_plugin("threads", THREAD_PLUGIN, config={"plugin": {"timeout": 0.3, "thread_safe": True,
                                                             "isolation": "thread"}})
    write_data("item.txt", "hello")
    app = make_app({"active_plugins": ["threads"]})

    def thread_of(uuid: str) -> Any:
        return json.loads(app.database.get_plugin_rows(uuid)[0]["result"] or "null")

    for n in range(3):
        assert app.process(body(f"u-{n}"), Delivery(f"d-{n}")).status == "DONE"
    used = {thread_of(f"u-{n}")["thread"] for n in range(3)}
    assert len(used) == 1 and thread_of("u-0")["daemon"] is True
    started = time.monotonic()
    hung = app.process(body("u-hang", hang=True), Delivery("d-hang"))
    after = app.process(body("u-after"), Delivery("d-after"))
    assert hung.status == "RETRY" and "timed out" in (hung.reason or "")
    assert after.status == "DONE" and time.monotonic() - started < 1.5  # not held up by the abandoned call
    assert app.processor.overdue == {"threads": 1}


def test_a_batch_of_status_writes_on_postgres_is_all_or_nothing(pg_section: dict[str, Any]) -> None:
    from sqapi.connectors.db.postgres import Database
    from sqapi.core.message import Message

    database = Database(dict(pg_section))
    database.initialize_message_table()
    try:
        good, bad = Message("d-1", "u-good", "a.txt"), Message("d-2", "u-bad", "b.txt")
        with pytest.raises(Exception, match="status"):
            database.update_messages([(good, "DONE", None), (bad, None, None)])  # type: ignore[list-item]
        assert database.get_message("u-good") is None
        database.update_messages([(good, "DONE", None), (bad, "RETRY", "later")])
        assert [database.get_message(u)["status"] for u in ("u-good", "u-bad")] == ["DONE", "RETRY"]
    finally:
        database.close()


def test_a_thread_isolated_plugin_past_its_timeout_in_a_batch_fails_only_its_message_and_no_call_runs_twice(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_plugin("slow", COUNTING.replace('    if metadata.get("fail")', '    if metadata.get("hang"):\n'
                                          '        import time; time.sleep(1.5)\n    if metadata.get("fail")'),
                 config={"plugin": {"timeout": 0.3, "thread_safe": True, "isolation": "thread"}})
    write_data("item.txt", "hello")
    monkeypatch.setenv("SQAPI_TEST_DATA", str(workdir / "data"))
    app = make_app({"active_plugins": ["slow"]})
    items = [(body("u-1"), Delivery("d-1")), (body("u-hang", hang=True), Delivery("d-2")),
             (body("u-3"), Delivery("d-3")), (body("u-4"), Delivery("d-4"))]
    started = time.monotonic()
    outcomes = app.processor.process_batch(items)
    assert time.monotonic() - started < 1.2  # the calls after the hung one did not wait for it
    assert [o.status for o in outcomes] == ["DONE", "RETRY", "DONE", "DONE"]
    assert "timed out after 0.3s" in (outcomes[1].reason or "")
    assert app.processor.overdue == {"slow": 1}
    wait_until(lambda: not app.processor.overdue, timeout=5, what="the hung call to return")
    assert sorted(runs(workdir)) == ["u-1", "u-3", "u-4", "u-hang"]


CONCURRENCY_PLUGIN = """
import threading, time
LOCK = threading.Lock()
NOW = [0]
def execute(config, database, message, metadata, data):
    with LOCK:
        NOW[0] += 1
        seen = NOW[0]
    time.sleep(0.3)
    with LOCK:
        NOW[0] -= 1
    return {"concurrent": seen}
"""


def test_the_rabbitmq_listener_starts_more_workers_while_the_running_ones_wait_on_slow_plugins(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        broker: dict[str, Any], vhost: str) -> None:
    # thread-safe, on the loader's threads: calls of several workers meet in one interpreter, where it counts them
    write_plugin("sleepy", CONCURRENCY_PLUGIN, config={"plugin": {"thread_safe": True, "isolation": "thread"}})
    write_data("item.txt", "hello")
    app = make_app({"msg_broker": {**broker, "batch_size": 1, "workers": 4}, "active_plugins": ["sleepy"]})
    declare(vhost, broker)
    publish(vhost, [body(f"u-{n}") for n in range(8)])
    with listening(app):
        wait_until(lambda: app.database.count_by_status().get("DONE", 0) == 8, what="8 DONE")
    seen = [json.loads(row["result"])["concurrent"] for row in app.database.execute_query(
        "SELECT result FROM message_plugins WHERE plugin = 'sleepy'")]
    assert len(seen) == 8 and max(seen) > 1


def test_uuids_another_process_holds_are_waited_for_one_by_one_not_asked_for_again_and_again(
        counting_app: Callable[..., Sqapi], pg_section: dict[str, Any], workdir: Path) -> None:
    from sqapi.connectors.db.postgres import _LOCK_UUID, Database

    app = counting_app(database=pg_section)
    other = Database(dict(pg_section))  # stands in for another loader process: its own session's advisory locks
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        lock = "SELECT pg_advisory_lock(%(ns)s, hashtext(%(u)s))"
        unlock = "SELECT pg_advisory_unlock(%(ns)s, hashtext(%(u)s))"
        with other.transaction():  # one pooled connection, one session, for the whole hold
            for uuid in ("u-busy-1", "u-busy-2"):
                other.execute_query(lock, ns=_LOCK_UUID, u=uuid)
            holding.set()
            release.wait(30)
            for uuid in ("u-busy-1", "u-busy-2"):
                other.execute_query(unlock, ns=_LOCK_UUID, u=uuid)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(30)
    calls = []
    claim_attempts = app.database.claim_attempts  # claims and counts the attempts in one round trip

    def counting_claim_attempts(messages: list[Any], status: str) -> Any:
        calls.append([m.uuid for m in messages])
        return claim_attempts(messages, status)

    app.database.claim_attempts = counting_claim_attempts  # type: ignore[method-assign]
    threading.Timer(0.5, release.set).start()
    items = [(body(u), Delivery(f"d-{u}")) for u in ("u-busy-1", "u-busy-2", "u-free")]
    outcomes = app.processor.process_batch(items)
    holder.join(30)
    other.close()
    assert [o.status for o in outcomes] == ["DONE", "DONE", "DONE"]
    assert calls == [["u-busy-1", "u-busy-2", "u-free"]]  # once; the busy ones then waited with claim()
