"""The API served by waitress from ``sqapi api`` and ``sqapi run``, over real HTTP."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import SQAPI_BIN, Server


def wait_for(check: Callable[[], bool], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_sqapi_api_serves_health_over_http_and_exits_0_on_sigterm(plugin_folders: None,
                                                                  start_server: Callable[..., Server]) -> None:
    server = start_server("api")
    answer = server.get("/health")
    assert answer.status_code == 200
    assert answer.json()["status"] == "up"
    assert answer.headers["Server"] == "sqapi"
    assert server.stop() == 0, "".join(server.stderr)


def test_sqapi_api_guards_routes_with_the_token_from_the_environment(
        plugin_folders: None, start_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQAPI_API_TOKEN", "http-token-123")
    server = start_server("api")
    assert server.get("/messages").status_code == 401
    assert server.get("/messages", headers={"Authorization": "Bearer http-token-123"}).status_code == 200
    assert server.get("/health").status_code == 200
    assert server.stop() == 0
    assert "http-token-123" not in "".join(server.stderr)


def test_sqapi_run_processes_spooled_messages_and_serves_them(plugin_folders: None, workdir: Path,
                                                             start_server: Callable[..., Server]) -> None:
    (workdir / "data" / "note.txt").write_text("spooled")
    broken = subprocess.run([SQAPI_BIN, "run", "--port", "0"], cwd=workdir, capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1  # a loader never runs without a plugin that failed to load
    assert "plugin failed to load, so nothing is processed (broken: " in broken.stderr
    import shutil

    shutil.rmtree(workdir / "plugins" / "broken")
    server = start_server("run")
    spool = workdir / "spool"
    spool.mkdir(exist_ok=True)  # the listener may not have created it yet
    (spool / ".msg.json.tmp").write_text(json.dumps({"uuid_ref": "spooled-1", "data_location": "note.txt"}))
    (spool / ".msg.json.tmp").rename(spool / "msg.json")

    def done() -> bool:
        answer = server.get("/messages/spooled-1")
        return answer.status_code == 200 and answer.json()["status"] == "DONE"

    assert wait_for(done), "".join(server.stderr)
    metrics = server.get("/metrics").text
    assert 'sqapi_messages_processed_total{status="DONE"} 1.0' in metrics  # the API saw its own loader's work
    assert server.stop() == 0, "".join(server.stderr)


def test_a_taken_port_is_a_clear_error(plugin_folders: None, start_server: Callable[..., Server],
                                       workdir: Path) -> None:
    server = start_server("api")
    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run([SQAPI_BIN, "api", "--port", port], cwd=workdir, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert server.stop() == 0
