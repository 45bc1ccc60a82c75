"""Every attempt's history (message_events) over the real broker and the real PostgreSQL: retries, late data, a
loader restart, and how ``sqapi status`` and ``GET /messages/<uuid>`` show it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sqapi.api.app import create_app
from sqapi.app import Sqapi
from tests.rabbitmq.conftest import (
    SQAPI,
    Loaders,
    declare,
    depth,
    listening,
    message,
    publish,
    wait_until,
)

#: fails its first ``fail_times`` runs on a message (metadata), then passes; counts its runs in its own table
FLAKY = '''
def execute(config, database, message, metadata, data):
    database.execute_query("INSERT INTO flaky_runs (uuid) VALUES (%(uuid)s)", uuid=message.uuid)
    runs = database.execute_query("SELECT COUNT(*) AS n FROM flaky_runs WHERE uuid = %(uuid)s",
                                  uuid=message.uuid)[0]["n"]
    if runs <= int(metadata.get("fail_times", 0)):
        raise RuntimeError(f"flaky run {runs} failed")
    return {"runs": runs}
'''
FLAKY_INIT = "CREATE TABLE IF NOT EXISTS flaky_runs (uuid TEXT NOT NULL);\n"


@pytest.fixture
def flaky(write_plugin: Callable[..., Path], write_data: Callable[[str, bytes | str], str]) -> Path:
    write_data("item.txt", "hello")
    return write_plugin("flaky", FLAKY, config={"version": "1.4"}, init_sql=FLAKY_INIT)


@pytest.fixture
def app(make_app: Callable[..., Sqapi], broker: dict[str, Any], pg_section: dict[str, Any], flaky: Path) \
        -> Callable[..., Sqapi]:
    def make(**broker_overrides: Any) -> Sqapi:
        section = {**broker, **broker_overrides}
        built = make_app({"msg_broker": section, "active_plugins": ["flaky"], "database": pg_section})
        declare(broker["vhost"], section)
        return built

    return make


def status_of(app: Sqapi, uuid: str) -> dict[str, Any]:
    return app.database.get_message(uuid) or {}


def test_a_plugin_failing_twice_then_passing_leaves_three_attempts_in_the_history(
        app: Callable[..., Sqapi], vhost: str) -> None:
    sqapi = app()
    publish(vhost, [message("flaky", fail_times=2), message("steady")])
    with listening(sqapi):
        wait_until(lambda: status_of(sqapi, "msg-flaky").get("status") == "DONE", what="DONE on the third attempt")
        wait_until(lambda: status_of(sqapi, "msg-steady").get("status") == "DONE", what="the other one DONE")
    history = sqapi.database.get_history("msg-flaky")
    me = f"{socket.gethostname()}:{os.getpid()}"  # the loader ran in this process
    assert [(e["attempt"], e["plugin"], e["status"]) for e in history] == [
        (1, "flaky", "FAILED"), (1, None, "RETRY"),
        (2, "flaky", "FAILED"), (2, None, "RETRY"),
        (3, "flaky", "DONE"), (3, None, "DONE")]
    plugin_events = [e for e in history if e["plugin"]]
    assert [e["info"] for e in plugin_events] == ["RuntimeError: flaky run 1 failed",
                                                  "RuntimeError: flaky run 2 failed", None]
    assert all(e["version"] == "1.4" and e["duration_ms"] is not None for e in plugin_events)
    assert all(e["loader"] == me for e in history)
    assert [e["id"] for e in history] == sorted(e["id"] for e in history)
    assert history[1]["info"].startswith("attempt 1 of 3 failed, retrying in")
    assert [e["at"] for e in history] == sorted(e["at"] for e in history)
    # message_plugins keeps the latest row only -- with the version that ran -- and the history the rest
    [row] = sqapi.database.get_plugin_rows("msg-flaky")
    assert (row["status"], row["version"], row["attempts"]) == ("DONE", "1.4", 3)
    steady = sqapi.database.get_history("msg-steady")
    assert [(e["attempt"], e["plugin"], e["status"], e["version"]) for e in steady] == [
        (1, "flaky", "DONE", "1.4"), (1, None, "DONE", None)]
    # the API answers the same timeline
    client = create_app(sqapi).test_client()
    body = client.get("/messages/msg-flaky").get_json()
    assert [(e["attempt"], e["plugin"], e["status"]) for e in body["history"]] == \
        [(e["attempt"], e["plugin"], e["status"]) for e in history]
    assert body["plugins"][0]["version"] == "1.4"


def test_data_that_appears_late_shows_one_retry_per_attempt_then_done(
        app: Callable[..., Sqapi], vhost: str, write_data: Callable[[str, bytes | str], str]) -> None:
    # a second between attempts: time enough to see the second attempt fail before the data comes
    sqapi = app(retry={"max_attempts": 5, "initial_delay": 1.0, "multiplier": 1.0, "max_delay": 1.0})
    publish(vhost, [message("late", data_location="late.txt")])
    with listening(sqapi):
        wait_until(lambda: status_of(sqapi, "msg-late").get("attempts") == 2
                   and status_of(sqapi, "msg-late").get("status") == "RETRY", what="the second attempt to fail")
        write_data("late.txt", "here now")
        wait_until(lambda: status_of(sqapi, "msg-late").get("status") == "DONE", what="DONE once the data is there")
    attempts = status_of(sqapi, "msg-late")["attempts"]
    assert attempts >= 3
    history = sqapi.database.get_history("msg-late")
    outcomes = [(e["attempt"], e["status"]) for e in history if e["plugin"] is None]
    assert outcomes == [(n, "RETRY") for n in range(1, attempts)] + [(attempts, "DONE")]
    assert all("data: " in e["info"] and "late.txt" in e["info"] for e in history if e["status"] == "RETRY")
    assert [(e["attempt"], e["plugin"], e["status"]) for e in history if e["plugin"]] == [(attempts, "flaky", "DONE")]
    assert depth(vhost, "sqapi.dead") == 0


@pytest.mark.slow
def test_the_history_survives_a_loader_restart_and_sqapi_status_shows_it(
        vhost: str, broker: dict[str, Any], pg_section: dict[str, Any], flaky: Path, workdir: Path,
        loaders: Loaders) -> None:
    section = {**broker, "retry": {"max_attempts": 3, "initial_delay": 3.0, "multiplier": 1.0, "max_delay": 3.0}}
    config = workdir / "loader.yml"
    config.write_text(yaml.safe_dump({"msg_broker": section, "active_plugins": ["flaky"], "database": pg_section,
                                      "processing": {"processes": 1}}), encoding="utf-8")
    declare(vhost, section)

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SQAPI, "-c", str(config), "status", "msg-restart", *args], cwd=workdir,
                              capture_output=True, text=True, timeout=60, env=dict(os.environ))

    publish(vhost, [message("restart", fail_times=1)])
    first = loaders.start(config)
    wait_until(lambda: '"status": "RETRY"' in status("--json").stdout, timeout=60, what="the first attempt's RETRY")
    first.signal(signal.SIGTERM)  # the retry waits in its delay queue while no loader runs
    assert first.wait() == 0
    second = loaders.start(config)
    wait_until(lambda: '"status": "DONE"' in status("--json").stdout, timeout=60, what="DONE by the second loader")
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    shown = json.loads(status("--json").stdout)
    host = socket.gethostname()
    assert [(e["attempt"], e["plugin"], e["status"], e["loader"]) for e in shown["history"]] == [
        (1, "flaky", "FAILED", f"{host}:{first.process.pid}"), (1, None, "RETRY", f"{host}:{first.process.pid}"),
        (2, "flaky", "DONE", f"{host}:{second.process.pid}"), (2, None, "DONE", f"{host}:{second.process.pid}")]
    text = status().stdout
    lines = text.splitlines()
    assert lines[lines.index("history (oldest first)") - 1].split()[:3] == ["plugin", "flaky", "DONE"]
    timeline = lines[lines.index("history (oldest first)") + 1:]
    assert len(timeline) == 4
    assert "attempt 1" in timeline[0] and "plugin flaky" in timeline[0] and "FAILED" in timeline[0]
    assert "version 1.4" in timeline[0] and f"by {host}:{first.process.pid}" in timeline[0]
    assert "flaky run 1 failed" in timeline[0]
    assert "attempt 2" in timeline[3] and "message" in timeline[3] and "DONE" in timeline[3]
