"""Fixtures for tests against the real RabbitMQ on 127.0.0.1:5672, each test in its own vhost.

A vhost is created with ``rabbitmqctl add_vhost`` / ``set_permissions`` and deleted with
``rabbitmqctl delete_vhost`` afterwards, so tests never see each other's queues.

That node is shared -- other test runs on the machine use it at the same time -- so no test stops,
restarts or kills it: a test that takes its broker down asks for ``own_rabbitmq``, a node of its
own on free ports (bench/rabbit_node.py), started for it and removed after it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import psycopg2
import psycopg2.errors
import psycopg2.extras
import pytest
import yaml

from bench.rabbit_node import RabbitNode, missing_tools
from sqapi.app import Sqapi
from tests.services import pg_connect

HOST, PORT = "127.0.0.1", 5672
START = "rabbitmq-server -detached"
SQAPI = str(Path(sys.executable).with_name("sqapi"))

RECORD_PLUGIN = '''
import os
import time

from sqapi.errors import PermanentError


def loader_pid():
    """The loader process this call runs for: the parent of the plugin worker process, if it runs in one."""
    pid = os.getpid()
    while b"sqapi.core.worker" in open(f"/proc/{pid}/cmdline", "rb").read():
        pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    return pid


def execute(config, database, message, metadata, data):
    """Logs each run, sleeps or fails as the metadata says, then records its side effect once."""
    earlier = database.execute_query("SELECT COUNT(*) AS n FROM record_runs WHERE uuid = %(uuid)s",
                                     uuid=message.uuid)[0]["n"]
    database.execute_query(
        "INSERT INTO record_runs (uuid, pid, worker, started) VALUES (%(uuid)s, %(pid)s, %(worker)s, %(started)s)",
        uuid=message.uuid, pid=loader_pid(), worker=os.getpid(), started=time.time())
    time.sleep(float(metadata.get("sleep", 0)))
    if not earlier:
        time.sleep(float(metadata.get("sleep_first_run", 0)))
    if metadata.get("fail"):
        raise RuntimeError("this message always fails")
    if metadata.get("refuse"):
        raise PermanentError("refused for good")
    database.execute_query(
        "INSERT INTO record_effects (uuid, size) VALUES (%(uuid)s, %(size)s) ON CONFLICT (uuid) DO NOTHING",
        uuid=message.uuid, size=len(data.read()))
    return {"ok": True}
'''

RECORD_INIT = '''
CREATE TABLE IF NOT EXISTS record_runs (uuid TEXT NOT NULL, pid INTEGER NOT NULL, worker INTEGER NOT NULL,
                                       started DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS record_effects (uuid TEXT PRIMARY KEY, size INTEGER NOT NULL);
'''


def rabbitmqctl(*args: str) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not installed: install the rabbitmq-server package", pytrace=False)
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed ({done.stderr.strip() or done.stdout.strip()}); "
                    f"is RabbitMQ running? Start it with `{START}`", pytrace=False)


@pytest.fixture(scope="session")
def rabbitmq_up() -> None:
    try:
        socket.create_connection((HOST, PORT), timeout=3).close()
    except OSError as exc:
        pytest.fail(f"RabbitMQ is not reachable on {HOST}:{PORT} ({exc}); start it with `{START}`", pytrace=False)


@pytest.fixture
def vhost(rabbitmq_up: None) -> Iterator[str]:
    """A fresh vhost for this test, guest allowed everything in it; deleted afterwards."""
    name = f"sqapi-test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on at the moment, on loopback, all different."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((HOST, 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


@pytest.fixture
def own_rabbitmq() -> Iterator[RabbitNode]:
    """A RabbitMQ node of this test's own (``sqapi-test-<random>@localhost`` on free AMQP and distribution
    ports, data, logs and Erlang cookie in a temporary folder), for a test that stops or restarts its
    broker.  Stopped and its folder removed afterwards, also when the test fails; a node that cannot be
    started fails the test with the command that starts it."""
    missing = missing_tools()
    if missing:
        pytest.fail(f"{', '.join(map(str, missing))} missing: install the rabbitmq-server package", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="sqapi-test-rabbitmq-"))
    made: list[RabbitNode] = []
    try:
        yield start_own_node(root, made)
    finally:
        for node in made:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


def start_own_node(root: Path, made: list[RabbitNode], attempts: int = 3) -> RabbitNode:
    """A node started on ports that were free a moment ago -- on others when one was taken meanwhile."""
    while True:
        node = RabbitNode(root, f"sqapi-test-{uuid.uuid4().hex[:12]}", *free_ports(2))
        made.append(node)
        node.prepare()
        try:
            node.start()
            return node
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            failed = str(exc)
        attempts -= 1
        if attempts == 0 or not ("eaddrinuse" in failed or "dist_port_already_used" in failed):
            pytest.fail(f"{failed}\nThis test's RabbitMQ node did not start. It was started with:\n"
                        f"{node.start_command()}", pytrace=False)
        node.stop()


def broker_section(vhost: str, port: int = PORT) -> dict[str, Any]:
    """The msg_broker section for a vhost on the node at ``port``: small delays so retries are quick."""
    return {
        "type": "rabbitmq", "host": HOST, "port": port, "vhost": vhost, "user": "guest", "password": "guest",
        "exchange_name": "sqapi", "exchange_type": "direct", "routing_key": "sqapi", "queue_name": "sqapi",
        "durable": True, "quorum": True, "delivery_limit": 10, "prefetch": 20, "heartbeat": 10,
        "retry": {"max_attempts": 3, "initial_delay": 0.3, "multiplier": 2.0, "max_delay": 5.0},
        "reconnect": {"initial_delay": 0.2, "max_delay": 2.0},
    }


@pytest.fixture
def broker(vhost: str) -> dict[str, Any]:
    """The msg_broker section for this test's vhost on the shared node."""
    return broker_section(vhost)


@pytest.fixture
def record_plugin(write_plugin: Callable[..., Path]) -> Path:
    return write_plugin("record", RECORD_PLUGIN, init_sql=RECORD_INIT)


def connection(vhost: str, port: int = PORT) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters(HOST, port, vhost, heartbeat=30))


def publish(vhost: str, bodies: list[bytes | dict[str, Any]], routing_key: str = "sqapi", port: int = PORT) -> None:
    """Publish with confirms, as a plain pika publisher would (the exchange must exist)."""
    with connection(vhost, port) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        for body in bodies:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            channel.basic_publish("sqapi", routing_key, raw, pika.BasicProperties(delivery_mode=2), mandatory=True)


def declare(vhost: str, broker: dict[str, Any]) -> None:
    """Declare the ``broker`` section's topology in ``vhost`` on the node the section names (its port)."""
    from sqapi.connectors.listeners.rabbitmq import BrokerSettings, declare_topology

    with connection(vhost, int(broker.get("port", PORT))) as conn:
        declare_topology(conn.channel(), BrokerSettings.from_config(broker))


def depth(vhost: str, queue: str, port: int = PORT) -> int:
    with connection(vhost, port) as conn:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)


def take_all(vhost: str, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    taken = []
    with connection(vhost) as conn:
        channel = conn.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((properties, body))


def queue_types(vhost: str) -> dict[str, tuple[str, str]]:
    """Every queue of the vhost: name -> (type, its arguments as rabbitmqctl prints them)."""
    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--no-table-headers",
                             "name", "type", "arguments"], capture_output=True, text=True, timeout=60)
    if listed.returncode != 0:
        pytest.fail(f"rabbitmqctl list_queues failed: {listed.stderr.strip()}; start RabbitMQ with `{START}`",
                    pytrace=False)
    rows = [line.split("\t") for line in listed.stdout.splitlines() if line.strip()]
    return {row[0]: (row[1], row[2] if len(row) > 2 else "") for row in rows}


@contextmanager
def queue_unresponsive(vhost: str, queue: str) -> Iterator[None]:
    """The quorum queue's Raft server suspended -- alive, answering nothing, as a queue whose node is
    recovering looks to a publisher (a confirm that never comes); resumed on exit.  Only this test's
    vhost's queue on the shared node is touched."""
    lookup = (f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"{vhost}">>, queue, <<"{queue}">>)), '
              '{Name, _} = amqqueue:get_pid(Q), ')
    rabbitmqctl("eval", lookup + "sys:suspend(whereis(Name)).")
    try:
        yield
    finally:
        rabbitmqctl("eval", lookup + "sys:resume(whereis(Name)).")


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def message(n: int | str, data_location: str = "item.txt", **metadata: Any) -> dict[str, Any]:
    return {"uuid_ref": f"msg-{n}", "data_location": data_location, "data_type": "text/plain",
            "metadata": metadata}


@contextmanager
def listening(app: Sqapi) -> Iterator[Any]:
    """The app's listener consuming in a thread; stopped (and joined) on exit, its errors raised."""
    with app.create_listener().running() as listener:
        yield listener


@dataclass
class Loader:
    """A ``sqapi loader`` subprocess."""

    process: subprocess.Popen[bytes]
    log: Path

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Loaders:
    workdir: Path
    started: list[Loader] = field(default_factory=list)

    def start(self, config: Path, *options: str) -> Loader:
        log = self.workdir / f"loader-{len(self.started) + 1}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([SQAPI, "--log-level", "INFO", "loader", "-c", str(config), *options],
                                       cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
        loader = Loader(process, log)
        self.started.append(loader)
        return loader


@pytest.fixture
def loaders(workdir: Path) -> Iterator[Loaders]:
    """Start ``sqapi loader`` subprocesses; any still running at the end are killed."""
    made = Loaders(workdir)
    yield made
    for loader in made.started:
        if loader.process.poll() is None:
            loader.process.send_signal(signal.SIGKILL)
            loader.process.wait(10)


@pytest.fixture
def loader_config(workdir: Path, broker: dict[str, Any]) -> Callable[..., Path]:
    def write(**broker_overrides: Any) -> Path:
        path = workdir / "loader.yml"
        path.write_text(yaml.safe_dump({"msg_broker": {**broker, **broker_overrides}}), encoding="utf-8")
        return path

    return write


@pytest.fixture
def status_db(pg_section: dict[str, Any], record_plugin: Path, write_data: Callable[[str, bytes | str], str]) \
        -> Iterator[Callable[[str], list[dict[str, Any]]]]:
    """Queries on the status database (this test's PostgreSQL schema) the loaders write."""
    write_data("item.txt", "hello")
    conn = pg_connect()
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f'SET search_path TO "{pg_section["schema"]}"')

    def query(sql: str) -> list[dict[str, Any]]:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cursor:
            try:
                cursor.execute(sql)
            except psycopg2.errors.UndefinedTable:
                return []
            return [dict(row) for row in cursor.fetchall()]

    yield query
    conn.close()


def count(query: Callable[[str], list[dict[str, Any]]], sql: str) -> int:
    rows = query(sql)
    return int(rows[0]["n"]) if rows else 0
