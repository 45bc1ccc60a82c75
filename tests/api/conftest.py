"""Fixtures for the API tests: a sqapi with a few plugins (one failing, one broken) and messages processed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from sqapi.api.app import SqapiFlask, create_app
from sqapi.app import Sqapi
from sqapi.core.outcome import Delivery, Outcome

PROJECT = Path(__file__).resolve().parents[2]
SQAPI_BIN = str(Path(sys.executable).with_name("sqapi"))

COUNTER = """
def execute(config, database, message, metadata, data):
    return {"bytes": len(data.read())}
"""

PICKY = """
def execute(config, database, message, metadata, data):
    if data.read().startswith(b"bad"):
        raise ValueError("the data starts with 'bad'")
    return {"ok": True}
"""

BROKEN_IMPORT = """
import a_module_that_does_not_exist

def execute(config, database, message, metadata, data):
    return None
"""

ECHO = """
def execute(config, database, message, metadata, data):
    return None
"""

ECHO_BLUEPRINTS = {
    "blueprints/echo.py": """
        from flask import Blueprint, current_app, request
        from flask_cors import cross_origin

        from sqapi.api import responding

        bp = Blueprint("echo", __name__, url_prefix="/echo")


        @bp.route("", methods=["POST"])
        @cross_origin()
        def echo():
            return responding.ok({"bytes": len(request.get_data()),
                                  "plugin": current_app.config["echo"].plugin["name"]})
    """,
    "blueprints/broken.py": """
        raise RuntimeError("this blueprint cannot be imported")
    """,
}


@dataclass
class Processed:
    """A wired sqapi, its Flask app and the outcomes of the messages processed through it."""

    sqapi: Sqapi
    app: SqapiFlask
    outcomes: dict[str, Outcome]

    @property
    def client(self) -> FlaskClient:
        return self.app.test_client()

    def uuid_with(self, status: str) -> str:
        return next(o.uuid for o in self.outcomes.values() if o.status == status and o.uuid)


@pytest.fixture
def plugin_folders(write_plugin: Callable[..., Path]) -> None:
    write_plugin("counter", COUNTER)
    write_plugin("picky", PICKY)
    write_plugin("broken", BROKEN_IMPORT)
    write_plugin("echo", ECHO, files=ECHO_BLUEPRINTS)


BASE_CONFIG: dict[str, Any] = {"msg_broker": {"retry": {"max_attempts": 1}}}


def process_samples(sqapi: Sqapi, write_data: Callable[[str, bytes | str], str]) -> dict[str, Outcome]:
    """Three messages: two good, one that the picky plugin fails on."""
    outcomes = {}
    for name, content in (("one.txt", "hello"), ("two.txt", "world"), ("bad.txt", "bad data")):
        location = write_data(name, content)
        body = {"uuid_ref": f"uuid-{name.split('.')[0]}", "data_location": location}
        outcomes[name] = sqapi.process(json.dumps(body), Delivery(id=name))
    return outcomes


@pytest.fixture
def processed(plugin_folders: None, make_app: Callable[..., Sqapi],
              write_data: Callable[[str, bytes | str], str]) -> Processed:
    sqapi = make_app(BASE_CONFIG)
    app = create_app(sqapi)  # before processing: its metrics observe the processor
    outcomes = process_samples(sqapi, write_data)
    assert [o.status for o in outcomes.values()] == ["DONE", "DONE", "FAILED"]
    return Processed(sqapi, app, outcomes)


# -- a real server in a subprocess ------------------------------------------------------------------
@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    stderr: list[str]

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **kwargs)

    def stop(self) -> int:
        """SIGTERM, then the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@pytest.fixture
def start_server(workdir: Path) -> Iterator[Callable[..., Server]]:
    """Start ``sqapi <command> --port 0`` in the test's folder; returns once it listens."""
    started: list[Server] = []

    def start(command: str = "api", *args: str) -> Server:
        process = subprocess.Popen([SQAPI_BIN, command, "--port", "0", *args], cwd=workdir, env=dict(os.environ),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert process.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        url = None
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"API on (http://\S+)", line)
            if found:
                url = found.group(1)
                break
        if url is None:
            process.kill()
            raise AssertionError(f"sqapi {command} did not start listening:\n{''.join(lines)}")
        server = Server(process, url, lines)
        # keep reading its log, so that a full pipe never blocks the server
        threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        if server.process.stderr is not None:
            server.process.stderr.close()
