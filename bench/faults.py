#!/usr/bin/env python3
"""Fault figures for ``sqapi loader``: crashes, a RabbitMQ cluster failover, fuzzed bodies, plugins that hang or crash.

    .venv/bin/python bench/faults.py                        # every scenario, full size (minutes)
    .venv/bin/python bench/faults.py --messages 500         # a quick check: every scenario scaled down
    .venv/bin/python bench/faults.py --scenario cluster --keep

Run by hand, on loopback only.  It never touches the machine's shared services: it starts its
own RabbitMQ node(s), PostgreSQL cluster and Redis on ports of its own (``--port-base``, default
15700: AMQP base..base+2, Erlang distribution base+10..base+12, PostgreSQL base+20, Redis
base+21), refuses to start when one of them is taken, and stops and removes all of it at the
end -- on failure and Ctrl-C too.  It needs root (or the postgres and rabbitmq tools' rights):
``pg_createcluster`` makes the PostgreSQL cluster.

Scenarios (N = ``--messages``, default 10,000); each runs ``sqapi loader`` subprocesses
(``processing.processes: 1`` each) with two drop-in plugins of its own: ``record`` writes a row
per run (uuid, loader pid) to a table before it does its work, ``hazard`` (plugins scenario)
hangs or crashes when the message's metadata says so.

* ``crash``: N messages, 3 loaders on one node; a random loader SIGKILLed every ``--kill-every``
  seconds (and started again) until 90 % are DONE, the RabbitMQ node SIGKILLed at 30 % DONE and
  PostgreSQL crashed (``stop -m immediate``) at 60 %, each restarted after ``--outage`` seconds.
  Half the messages take their metadata from Redis; one in 100 fails its first plugin run, so
  retries (through sqapi's delay queues) are under way when the faults strike.
* ``cluster``: a 3-node RabbitMQ cluster; one loader per node; N messages published (with
  confirms) while the loaders consume; the quorum queue's leader node SIGKILLed at 30 % DONE and
  the new leader's node at 65 %, each restarted after ``--outage`` seconds.  Half from Redis; one
  in 100 fails its first run, one in 100 has its data file written ``--late`` seconds after it
  was published (both retried), and a refused body follows every 100th (dead-lettered).
* ``fuzz``: 2N refused bodies (blank and non-string uuids, 10,000-deep nesting, lone
  surrogates, NUL characters, invalid UTF-8, non-object JSON, random bytes, 5 MB bodies, a 5 MB
  and a 900 KB data_location) among N/10 good ones, 3 loaders.
* ``plugins``: N/5 good messages and a few hazards each: a plugin call that sleeps past
  ``plugin.timeout``, one that busy-loops past it, ``os.abort()``, a segfault, ``os._exit``.

For each it prints what was published, what ended DONE, what was lost, plugin runs repeated
(at-least-once delivery allows some after a SIGKILL), dead letters with and without a reason,
loader kills/restarts, the loaders' peak RSS and the time to drain; then one table.  The exit
status is 1 when a message was lost, a DONE message's plugins never ran, a bad body was not
dead-lettered with a reason, or something dead-lettered had no reason.  See docs/faults.md.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg2
import redis
import yaml
from rabbit_node import (  # bench/rabbit_node.py (this folder is on sys.path)
    LOCAL,
    RabbitNode,
    missing_tools,
    pid_gone,
    run_tool,
)

SQAPI = os.environ.get("SQAPI_BIN") or str(Path(sys.executable).with_name("sqapi"))
QUEUE = "sqapi"
DEAD = f"{QUEUE}.dead"
KIND_HEADER = "x-faults-kind"
REASON_HEADER = "x-sqapi-reason"
ATTEMPTS_HEADER = "x-sqapi-attempts"
FIVE_MB = 5 * 1024 * 1024
DEEP = 10_000
HAZARD_TIMEOUT = 2.0
MAX_ATTEMPTS = 5      # msg_broker.retry.max_attempts: sqapi's default
SCENARIOS = ("crash", "cluster", "fuzz", "plugins")

RECORD_PLUGIN = '''\
"""Records each run -- uuid, the loader process, the worker process -- before it does its work."""
import os
import time


def loader_pid():
    """The loader this call runs for: the parent of the plugin worker process."""
    pid = os.getpid()
    while b"sqapi.core.worker" in open(f"/proc/{pid}/cmdline", "rb").read():
        pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    return pid


def execute(config, database, message, metadata, data):
    database.execute_query(
        "INSERT INTO fault_runs (uuid, plugin, loader, worker) VALUES (%(uuid)s, 'record', %(loader)s, %(worker)s)",
        uuid=message.uuid, loader=loader_pid(), worker=os.getpid())
    if metadata.get("fail_first"):  # a transient failure: the message goes through a retry delay queue once
        runs = database.execute_query("SELECT COUNT(*) AS n FROM fault_runs WHERE uuid = %(uuid)s AND "
                                      "plugin = 'record'", uuid=message.uuid)[0]["n"]
        if runs == 1:
            raise RuntimeError("fails on its first run")
    pause = float((config.custom.get("faults") or {}).get("plugin_ms") or 0) / 1000
    if pause:
        time.sleep(pause)
    return {"size": len(data.read())}
'''

HAZARD_PLUGIN = '''\
"""Hangs, busy-loops or crashes when the message's metadata says so; records each run first."""
import ctypes
import os
import time


def execute(config, database, message, metadata, data):
    database.execute_query(
        "INSERT INTO fault_runs (uuid, plugin, loader, worker) VALUES (%(uuid)s, 'hazard', %(loader)s, %(worker)s)",
        uuid=message.uuid, loader=os.getppid(), worker=os.getpid())
    what = metadata.get("hazard")
    if what == "hang":
        time.sleep(3600)
    elif what == "busy":
        while True:
            pass
    elif what == "abort":
        os.abort()
    elif what == "segfault":
        ctypes.string_at(0)
    elif what == "exit":
        os._exit(3)
    return {"ok": True}
'''

RUNS_TABLE = """CREATE TABLE IF NOT EXISTS fault_runs (
    uuid   TEXT NOT NULL,
    plugin TEXT NOT NULL,
    loader INTEGER NOT NULL,
    worker INTEGER NOT NULL,
    at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
"""


class Refused(Exception):
    """The script will not start (a port taken, a tool missing): nothing of the machine's was touched."""


# -- things to stop at the end -----------------------------------------------------------------------------
class Cleanup:
    """What was started, stopped in reverse order once: at the end, on an error, Ctrl-C, SIGTERM or exit."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, Callable[[], None]]] = []
        self.lock = threading.Lock()
        self.ran = False

    def push(self, what: str, action: Callable[[], None]) -> None:
        self.actions.append((what, action))

    def run(self) -> None:
        with self.lock:
            if self.ran:
                return
            self.ran = True
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut it short
                signal.signal(number, signal.SIG_IGN)
        for what, action in reversed(self.actions):
            try:
                action()
            except Exception as exc:  # keep stopping the rest
                print(f"cleanup: {what} failed: {exc}", file=sys.stderr, flush=True)


def on_signal(number: int, _frame: Any) -> None:
    raise SystemExit(128 + number)


def port_free(port: int) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT of an earlier run is no owner
        probe.bind((LOCAL, port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


# -- services of our own -----------------------------------------------------------------------------------
class Postgres:
    """A PostgreSQL cluster of ours (``pg_createcluster``), its data in our folder."""

    def __init__(self, root: Path, port: int, base: int) -> None:
        versions = sorted((p.name for p in Path("/usr/lib/postgresql").glob("*") if (p / "bin" / "postgres").exists()),
                          key=lambda v: float(v))
        if not versions or not shutil.which("pg_createcluster"):
            raise Refused("PostgreSQL server binaries and postgresql-common (pg_createcluster) are needed")
        self.version = versions[-1]
        self.name = f"sqapi_faults_{base}"
        self.port = port
        self.folder = root / "postgres"
        self.log = root / "postgres-tools.log"
        self.created = False

    def check(self) -> None:
        if Path(f"/etc/postgresql/{self.version}/{self.name}").exists():
            raise Refused(f"a PostgreSQL cluster {self.version}/{self.name} exists already (an earlier run killed "
                          f"hard?): remove it with `pg_dropcluster {self.version} {self.name} --stop`")

    def create(self) -> None:
        self.folder.mkdir()
        shutil.chown(self.folder, "postgres", "postgres")
        run_tool(["pg_createcluster", "--port", str(self.port), "-d", str(self.folder / "data"),
                  "-l", str(self.folder / "server.log"), "-o", "max_connections=400",
                  self.version, self.name, "--", "--auth-local=trust", "--auth-host=trust"], self.log)
        self.created = True

    def ctl(self, *args: str) -> None:
        run_tool(["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, *args], self.log)

    def start(self) -> None:
        self.ctl("start")
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg2.connect(self.url("postgres"), connect_timeout=3).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def crash(self) -> None:
        self.ctl("stop", "-m", "immediate")

    def drop(self) -> None:
        if self.created:
            run_tool(["pg_dropcluster", self.version, self.name, "--stop"], self.log, check=False)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@{LOCAL}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        conn = psycopg2.connect(self.url("postgres"))
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
            cursor.execute(f"CREATE DATABASE {name}")
        conn.close()
        url = self.url(name)
        with psycopg2.connect(url) as conn, conn.cursor() as cursor:
            cursor.execute(RUNS_TABLE)
        return url


class Redis:
    def __init__(self, root: Path, port: int) -> None:
        self.port = port
        self.folder = root / "redis"
        self.pidfile = self.folder / "redis.pid"
        self.started = False

    def start(self) -> None:
        if not shutil.which("redis-server"):
            raise Refused("redis-server is not installed")
        self.folder.mkdir()
        run_tool(["redis-server", "--port", str(self.port), "--bind", LOCAL, "--save", "", "--appendonly", "no",
                  "--daemonize", "yes", "--pidfile", str(self.pidfile), "--dir", str(self.folder),
                  "--logfile", str(self.folder / "redis.log")], self.folder / "tools.log")
        self.started = True
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def client(self) -> redis.Redis:
        return redis.Redis(host=LOCAL, port=self.port, socket_timeout=10)

    def stop(self) -> None:
        if not self.started:
            return
        try:
            self.client().shutdown(nosave=True)
        except redis.exceptions.ConnectionError:  # it closed the connection as it went: the normal answer
            pass
        try:
            pid = int(self.pidfile.read_text())
        except (OSError, ValueError):
            return
        if not pid_gone(pid, 10) and f":{self.port}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)


@dataclass
class Services:
    root: Path
    base: int
    cleanup: Cleanup
    nodes: list[RabbitNode] = field(default_factory=list)
    postgres: Postgres | None = None
    redis: Redis | None = None
    clustered: bool = False

    def ports(self) -> dict[int, str]:
        wanted = {self.base + i: f"RabbitMQ AMQP (node {'abc'[i]})" for i in range(3)}
        wanted.update({self.base + 10 + i: f"Erlang distribution (node {'abc'[i]})" for i in range(3)})
        wanted[self.base + 20] = "PostgreSQL"
        wanted[self.base + 21] = "Redis"
        return wanted

    def check(self) -> None:
        taken = [f"{port} ({what})" for port, what in self.ports().items() if not port_free(port)]
        if taken:
            raise Refused(f"ports taken on {LOCAL}: {', '.join(taken)}; choose others with --port-base")
        missing = missing_tools()
        if missing:
            raise Refused(f"{', '.join(map(str, missing))} missing: install the rabbitmq-server package")

    def start(self) -> None:
        """Our first RabbitMQ node, PostgreSQL and Redis (the cluster's other nodes come with its scenario)."""
        self.postgres = Postgres(self.root, self.base + 20, self.base)
        self.postgres.check()
        self.redis = Redis(self.root, self.base + 21)
        node = self.add_node(0)
        say(f"starting RabbitMQ {node.name} on {LOCAL}:{node.port}")
        node.start()
        say(f"starting PostgreSQL {self.postgres.version}/{self.postgres.name} on {LOCAL}:{self.postgres.port}")
        self.cleanup.push("drop the PostgreSQL cluster", self.postgres.drop)
        self.postgres.create()
        self.postgres.start()
        say(f"starting Redis on {LOCAL}:{self.redis.port}")
        self.cleanup.push("stop Redis", self.redis.stop)
        self.redis.start()

    def add_node(self, index: int) -> RabbitNode:
        node = RabbitNode(self.root, f"sqapi-faults-{self.base}-{'abc'[index]}", self.base + index,
                          self.base + 10 + index)
        node.prepare()  # the first one also writes the Erlang cookie the others share (a cluster needs it)
        self.nodes.append(node)
        self.cleanup.push(f"stop RabbitMQ {node.name}", node.stop)
        return node

    def cluster(self) -> None:
        """Nodes b and c, joined to a: a 3-node cluster."""
        if self.clustered:
            return
        first = self.nodes[0]
        for index in (1, 2):
            node = self.add_node(index)
            say(f"starting RabbitMQ {node.name} on {LOCAL}:{node.port} and joining it to {first.name}")
            node.start()
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        self.clustered = True

    def vhost(self, name: str) -> None:
        first = self.nodes[0]
        first.ctl("add_vhost", name)
        first.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")

    def drop_vhost(self, name: str) -> None:
        for node in self.nodes:
            if node.running and node.ctl("delete_vhost", name, check=False).returncode == 0:
                return


# -- output ------------------------------------------------------------------------------------------------
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:7.1f}s] {text}", flush=True)


# -- messages ----------------------------------------------------------------------------------------------
@dataclass
class Outgoing:
    body: bytes
    message_id: str
    kind: str          # "good", or the kind of bad body


def good_message(scenario: str, n: int, files: int, from_redis: bool, **metadata: Any) -> Outgoing:
    uuid = f"{scenario}-good-{n}"
    body: dict[str, Any] = {"uuid_ref": uuid, "data_location": f"f{n % files:06d}.txt", "data_type": "text/plain"}
    if from_redis:
        body["meta_location"] = f"meta/{n}"
    else:
        body["metadata"] = {"n": n, **metadata}
    return Outgoing(json.dumps(body).encode(), uuid, "good")


def bad_message(kind: str, n: int, rng: random.Random, scenario: str = "fuzz") -> Outgoing:
    """One body of the given kind, which the loader must refuse on its first delivery."""
    uuid = f"{scenario}-bad-{n}"
    where = '"data_location": "f000000.txt"'

    def obj(**fields: Any) -> bytes:
        return json.dumps({"data_location": "f000000.txt", **fields}).encode()

    variant = n % 3
    if kind == "blank-uuid":
        body = obj(uuid_ref=["", "   ", "\t\n "][variant])
    elif kind == "object-uuid":
        body = obj(uuid_ref={"id": n})
    elif kind == "list-uuid":
        body = obj(uuid_ref=[n])
    elif kind == "true-uuid":
        body = obj(uuid_ref=True)
    elif kind == "fraction-uuid":
        body = obj(uuid_ref=n + 0.5)
    elif kind == "deep-nesting":
        nested = ("[" * DEEP + "]" * DEEP) if variant else ('{"a":' * DEEP + "1" + "}" * DEEP)
        body = f'{{"uuid_ref": "{uuid}", {where}, "metadata": {{"m": {nested}}}}}'.encode()
    elif kind == "lone-surrogate":
        body = [f'{{"uuid_ref": "{uuid}", {where}, "metadata": {{"note": "x\\ud800y"}}}}',
                f'{{"uuid_ref": "{uuid}\\udfff", {where}}}',
                f'{{"uuid_ref": "{uuid}", "data_location": "f\\udbff.txt"}}'][variant].encode()
    elif kind == "nul":
        body = [f'{{"uuid_ref": "{uuid}", {where}, "metadata": {{"k": "a\\u0000b"}}}}'.encode(),
                f'{{"uuid_ref": "{uuid}\\u0000", {where}}}'.encode(),
                f'{{"uuid_ref": "{uuid}", {where}, "metadata": {{"k": "a'.encode() + b"\0" + b'b"}}'][variant]
    elif kind == "invalid-utf8":
        junk = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80"][n % 5]
        body = f'{{"uuid_ref": "{uuid}'.encode() + junk + f'", {where}}}'.encode()
    elif kind == "non-object-json":
        body = [b"[1, 2, 3]", b"42", b'"text"', b"null", b"true", b"[]", b"1.5e3"][n % 7]
    elif kind == "random-bytes":
        body = rng.randbytes(rng.randint(0, 4096))
    elif kind == "5mb-body":
        body = obj(uuid_ref=uuid, pad="x" * FIVE_MB)
    elif kind == "5mb-data-location":
        body = obj(uuid_ref=uuid, data_location="d" * FIVE_MB)
    elif kind == "900kb-data-location":
        body = obj(uuid_ref=uuid, data_location="d" * 900_000)
    else:
        raise ValueError(kind)
    return Outgoing(body, f"{scenario}-bad-{n}", kind)


BAD_KINDS = ("blank-uuid", "object-uuid", "list-uuid", "true-uuid", "fraction-uuid", "deep-nesting",
             "lone-surrogate", "nul", "invalid-utf8", "non-object-json", "random-bytes")
HUGE_KINDS = ("5mb-body", "5mb-data-location", "900kb-data-location")


def fuzz_plan(bad: int, good: int, scale: float, rng: random.Random) -> list[tuple[str, int]]:
    """(kind, number) for every body to publish, good ones scattered among the bad."""
    huge = {kind: max(2, round(20 * scale)) for kind in HUGE_KINDS}  # 5 MB bodies are few: they cost the broker
    left = bad - sum(huge.values())
    kinds = [kind for kind, count in huge.items() for _ in range(count)]
    kinds += [BAD_KINDS[i % len(BAD_KINDS)] for i in range(max(0, left))]
    plan = [(kind, n) for n, kind in enumerate(kinds)] + [("good", n) for n in range(good)]
    rng.shuffle(plan)
    return plan


@dataclass
class Published:
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    ids: dict[str, str] = field(default_factory=dict)   # message id -> kind
    republished: int = 0      # sent again after a lost connection or a nack: the broker may hold two copies
    reconnects: int = 0
    seconds: float = 0.0


def publish(ports: list[int], vhost: str, items: Iterable[Outgoing], published: Published,
            stop: threading.Event | None = None, first: int = 0) -> None:
    """Publish each body with publisher confirms; on a lost connection, reconnect (the next node) and send again."""
    started = time.monotonic()
    index = first
    connection: pika.BlockingConnection | None = None
    channel: Any = None
    failures = 0
    try:
        for item in items:
            properties = pika.BasicProperties(delivery_mode=2, message_id=item.message_id,
                                              headers={KIND_HEADER: item.kind})
            while True:
                if stop is not None and stop.is_set():
                    return
                try:
                    if channel is None:
                        connection = pika.BlockingConnection(pika.ConnectionParameters(
                            LOCAL, ports[index % len(ports)], vhost, heartbeat=30, socket_timeout=10,
                            blocked_connection_timeout=60, connection_attempts=1))
                        channel = connection.channel()
                        channel.confirm_delivery()
                    channel.basic_publish("sqapi", "sqapi", item.body, properties, mandatory=True)
                    failures = 0
                    break
                except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
                    published.republished += 1
                    time.sleep(0.2)
                except (pika.exceptions.AMQPError, OSError) as exc:
                    failures += 1
                    if failures > 600:
                        raise RuntimeError(f"publishing failed for good: {type(exc).__name__}: {exc}") from None
                    if connection is not None:
                        try:
                            connection.close()
                        except (pika.exceptions.AMQPError, OSError):
                            pass
                    connection, channel = None, None
                    index += 1
                    published.reconnects += 1
                    published.republished += 1
                    time.sleep(0.2)
            published.by_kind[item.kind] += 1
            published.ids[item.message_id] = item.kind
    finally:
        if connection is not None and connection.is_open:
            connection.close()
        published.seconds = time.monotonic() - started


def declare(port: int, vhost: str, broker: dict[str, Any]) -> None:
    from sqapi.connectors.listeners.rabbitmq import BrokerSettings, declare_topology

    connection = pika.BlockingConnection(pika.ConnectionParameters(LOCAL, port, vhost))
    declare_topology(connection.channel(), BrokerSettings.from_config(broker))
    connection.close()


def depths(ports: list[int], vhost: str, names: list[str]) -> dict[str, int | None]:
    """Ready messages per queue (None: no node could say), asked of the first node that answers.

    Queue by queue: a classic queue whose node is down answers NOT_FOUND while the others still answer."""
    found: dict[str, int | None] = dict.fromkeys(names)
    for port in ports:
        try:
            connection = pika.BlockingConnection(pika.ConnectionParameters(
                LOCAL, port, vhost, socket_timeout=3, blocked_connection_timeout=10, connection_attempts=1))
        except (pika.exceptions.AMQPError, OSError):
            continue
        try:
            for name in names:
                if found[name] is not None:
                    continue
                try:
                    channel = connection.channel()
                    found[name] = int(channel.queue_declare(name, passive=True).method.message_count)
                    channel.close()
                except pika.exceptions.ChannelClosed:
                    pass
        except (pika.exceptions.AMQPError, OSError):
            pass
        finally:
            if connection.is_open:
                connection.close()
        if all(value is not None for value in found.values()):
            break
    return found


@dataclass
class DeadLetter:
    message_id: str | None
    kind: str | None
    reason: str | None
    attempts: int | None
    broker_death: bool   # dead-lettered by RabbitMQ itself (x-death: the quorum delivery limit)


def take_dead_letters(ports: list[int], vhost: str) -> list[DeadLetter]:
    """Consume the whole dead-letter queue (headers only are kept)."""
    for port in ports:
        try:
            connection = pika.BlockingConnection(pika.ConnectionParameters(LOCAL, port, vhost, heartbeat=60))
        except (pika.exceptions.AMQPError, OSError):
            continue
        taken: list[DeadLetter] = []
        channel = connection.channel()
        channel.basic_qos(prefetch_count=500)
        for method, properties, _body in channel.consume(DEAD, inactivity_timeout=3):
            if method is None:
                break
            headers = properties.headers or {}
            reason = headers.get(REASON_HEADER)
            kind = headers.get(KIND_HEADER)
            taken.append(DeadLetter(
                properties.message_id,
                kind.decode(errors="replace") if isinstance(kind, bytes) else kind,
                reason.decode(errors="replace") if isinstance(reason, bytes) else reason,
                int(headers[ATTEMPTS_HEADER]) if isinstance(headers.get(ATTEMPTS_HEADER), int) else None,
                "x-death" in headers))
            channel.basic_ack(method.delivery_tag)
        channel.cancel()
        connection.close()
        return taken
    raise RuntimeError("no RabbitMQ node answered to read the dead letters")


# -- the status database -----------------------------------------------------------------------------------
def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg2.connect(url, connect_timeout=3) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        found = cursor.fetchall()
    conn.close()
    return found


def count_done(url: str) -> int | None:
    try:
        return int(rows(url, "SELECT COUNT(*) FROM messages WHERE status = 'DONE'")[0][0])
    except psycopg2.errors.UndefinedTable:
        return 0
    except psycopg2.Error:   # PostgreSQL is down (on purpose): keep the last count
        return None


# -- the loaders -------------------------------------------------------------------------------------------
def kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Child processes of every thread of ``pid`` (plugin workers are started from worker threads)."""
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                found += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return found


def handles_sigterm(pid: int) -> bool:
    """Whether the process has installed a SIGTERM handler (its SigCgt mask)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except OSError:
        pass
    return False


def is_plugin_worker(pid: int) -> bool:
    try:
        return b"sqapi.core.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class Slot:
    number: int
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None


class Loaders:
    """``sqapi loader`` subprocesses: started, killed, restarted, watched (exits, peak RSS), stopped."""

    def __init__(self, folder: Path, configs: list[Path], log_level: str, note: Callable[[str], None]) -> None:
        self.folder = folder
        self.slots = [Slot(n + 1, config, folder / f"loader-{n + 1}.log") for n, config in enumerate(configs)]
        self.log_level = log_level
        self.note = note
        self.kills = 0
        self.restarts = 0
        self.unexpected: list[str] = []
        self.peak_loader_kib = 0
        self.peak_worker_kib = 0
        self.workers_seen: set[int] = set()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SQAPI_") and k != "CFG_FILE"}

    def start_all(self) -> None:
        for slot in self.slots:
            self.start(slot)

    def start(self, slot: Slot) -> None:
        with open(slot.log, "ab") as out:
            out.write(f"--- bench/faults.py: loader {slot.number} started ---\n".encode())
            out.flush()
            slot.process = subprocess.Popen([SQAPI, "--log-level", self.log_level, "loader", "-c", str(slot.config)],
                                            cwd=self.folder, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        slot.restart_at = None

    def running(self) -> list[Slot]:
        return [s for s in self.slots if s.process is not None and s.process.poll() is None]

    def kill(self, slot: Slot, restart_after: float) -> None:
        assert slot.process is not None
        self.sample()
        slot.process.send_signal(signal.SIGKILL)
        slot.process.wait()
        self.kills += 1
        slot.restart_at = time.monotonic() + restart_after
        self.note(f"SIGKILL loader {slot.number} (pid {slot.process.pid})")

    def tick(self) -> None:
        """Restart the killed ones that are due and any that exited by itself (counted: it should not)."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None:
                continue
            code = slot.process.poll()
            if code is None:
                continue
            if slot.restart_at is None:
                tail = slot.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                self.unexpected.append(f"loader {slot.number} exited with {code}: {tail[0][:200]}")
                self.note(f"loader {slot.number} exited by itself with {code}; starting it again")
                slot.restart_at = now + 1.0
            if now >= slot.restart_at:
                self.start(slot)
                self.restarts += 1
        self.sample()

    def sample(self) -> None:
        for slot in self.running():
            assert slot.process is not None
            self.peak_loader_kib = max(self.peak_loader_kib, kib(slot.process.pid, "VmHWM"))
            for child in children(slot.process.pid):
                if is_plugin_worker(child):
                    self.workers_seen.add(child)
                    self.peak_worker_kib = max(self.peak_worker_kib, kib(child, "VmHWM"))

    def stop(self) -> list[int]:
        """SIGTERM every loader (each finishes its in-flight messages); their exit codes."""
        self.sample()
        running = self.running()
        for slot in running:  # one just started may not handle SIGTERM yet: it would die of it, not stop
            assert slot.process is not None
            deadline = time.monotonic() + 60
            while not handles_sigterm(slot.process.pid) and slot.process.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
        for slot in running:
            assert slot.process is not None
            slot.process.send_signal(signal.SIGTERM)
        codes = []
        for slot in running:
            assert slot.process is not None
            try:
                codes.append(slot.process.wait(90))
            except subprocess.TimeoutExpired:
                slot.process.kill()
                codes.append(slot.process.wait())
        for slot in self.slots:
            slot.restart_at = None
        return codes

    def kill_all(self) -> None:
        for slot in self.running():
            assert slot.process is not None
            slot.process.kill()
            slot.process.wait()

    def leftover_workers(self) -> list[int]:
        time.sleep(1.0)  # a worker notices its loader is gone within half a second
        return [pid for pid in self.workers_seen if is_plugin_worker(pid) and not pid_gone(pid, 0)]

    def logs(self) -> str:
        return "\n".join(s.log.read_text(errors="replace") for s in self.slots if s.log.exists())


# -- one scenario ------------------------------------------------------------------------------------------
@dataclass
class Fault:
    at: float                        # fraction of the good messages DONE when it starts
    what: str
    action: Callable[[], None]
    thread: threading.Thread | None = None
    error: BaseException | None = None
    started: float = 0.0
    ended: float = 0.0


@dataclass
class Figures:
    scenario: str
    good: int = 0
    bad: int = 0
    done: int = 0
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    done_not_run: int = 0
    repeated: int = 0                 # (uuid, plugin) run more than once
    extra_runs: int = 0
    repeated_by_plugin: collections.Counter[str] = field(default_factory=collections.Counter)
    repeated_examples: list[str] = field(default_factory=list)
    bad_runs: int = 0                 # plugin runs for bodies that should have been refused
    dead_with_reason: int = 0
    dead_without_reason: int = 0
    good_dead: int = 0
    bad_not_dead: int = 0
    bad_first_delivery: int = 0
    bad_not_dead_examples: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)   # how the messages meant to be retried ended
    reasons: dict[str, collections.Counter[str]] = field(default_factory=dict)   # kind -> reason -> count
    kills: int = 0
    restarts: int = 0
    unexpected_exits: int = 0
    reconnects: int = 0
    exit_codes: list[int] = field(default_factory=list)
    leftover_workers: int = 0
    peak_loader_mib: float = 0.0
    peak_worker_mib: float = 0.0
    drain_seconds: float = 0.0
    faults: list[str] = field(default_factory=list)
    left_in_queues: dict[str, int] = field(default_factory=dict)
    log_errors: list[str] = field(default_factory=list)
    published: Published | None = None
    complete: bool = False

    def failed(self) -> list[str]:
        why = []
        if self.lost:
            why.append(f"{self.lost} good message(s) lost")
        if self.done_not_run:
            why.append(f"{self.done_not_run} DONE message(s) whose plugins never ran")
        if self.bad_not_dead:
            why.append(f"{self.bad_not_dead} bad body(ies) not dead-lettered")
        if self.dead_without_reason:
            why.append(f"{self.dead_without_reason} dead letter(s) without a reason")
        if self.bad_runs:
            why.append(f"{self.bad_runs} plugin run(s) for refused bodies")
        return why


class Scenario:
    """One scenario's vhost, database, loaders, faults and figures."""

    def __init__(self, name: str, services: Services, args: argparse.Namespace, files: int) -> None:
        self.name = name
        self.services = services
        self.args = args
        self.files = files
        self.folder = services.root / name
        self.folder.mkdir()
        self.vhost = f"faults-{name}"
        self.figures = Figures(name)
        self.started = time.monotonic()
        self.plugins = ["record"]
        self.hazards: set[str] = set()     # uuids whose plugin crashes or hangs (plugins scenario)
        self.fail_first: set[str] = set()  # uuids whose record plugin fails on its first run
        self.late: set[str] = set()        # uuids whose data file is written after they were published (cluster)
        self.good_ids: set[str] = set()
        assert services.postgres is not None
        self.db = services.postgres.create_database(f"faults_{name}")
        services.vhost(self.vhost)
        self.plugin_dir = self.write_plugins()
        self.broker = {
            "type": "rabbitmq", "host": LOCAL, "vhost": self.vhost, "user": "guest", "password": "guest",
            "exchange_name": "sqapi", "exchange_type": "direct", "routing_key": "sqapi", "queue_name": QUEUE,
            "heartbeat": 10,
            "retry": {"max_attempts": MAX_ATTEMPTS, "initial_delay": 0.2, "multiplier": 2.0, "max_delay": 2.0},
            "reconnect": {"initial_delay": 0.2, "max_delay": 2.0},
        }

    def note(self, text: str) -> None:
        say(f"{self.name}: {text}")

    def fault_note(self, text: str) -> None:
        self.figures.faults.append(f"{time.monotonic() - self.started:6.1f}s {text}")
        self.note(text)

    def write_plugins(self) -> Path:
        folder = self.folder / "plugins"
        record = folder / "record"
        (record / "scripts").mkdir(parents=True)
        (record / "__init__.py").write_text(RECORD_PLUGIN)
        (record / "scripts" / "init.sql").write_text(RUNS_TABLE)
        hazard = folder / "hazard"
        hazard.mkdir()
        (hazard / "__init__.py").write_text(HAZARD_PLUGIN)
        (hazard / "config.yml").write_text(yaml.safe_dump({"plugin": {"timeout": HAZARD_TIMEOUT}}))
        return folder

    def config(self, port: int) -> Path:
        assert self.services.redis is not None
        config = {
            "msg_broker": {**self.broker, "port": port},
            "data_store": {"type": "disk", "base_dir": str(self.services.root / "data")},
            "meta_store": {"type": "redis", "host": LOCAL, "port": self.services.redis.port,
                           "key_prefix": f"{self.name}:"},
            "database": {"type": "postgres", "dsn": self.db},
            "active_plugins": self.plugins,
            "plugin_dirs": [str(self.plugin_dir)],
            "processing": {"processes": 1},
            "custom": {"faults": {"plugin_ms": self.args.plugin_ms}},
        }
        path = self.folder / f"loader-{port}.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def redis_metadata(self, numbers: Iterable[int]) -> None:
        assert self.services.redis is not None
        client = self.services.redis.client()
        pipe = client.pipeline(transaction=False)
        for n in numbers:
            pipe.set(f"{self.name}:meta/{n}", json.dumps({"n": n, "source": "redis"}))
        pipe.execute()
        client.close()

    def expected_runs(self, uuid: str, plugin: str) -> int:
        return 2 if uuid in self.fail_first and plugin == "record" else 1

    # -- the drive ------------------------------------------------------------------------------------------
    def drive(self, loaders: Loaders, ports: list[int], good: int, expected_dead: int, faults: list[Fault],
              kill_every: float = 0.0, publishing: threading.Thread | None = None) -> None:
        """Start the loaders, inject the faults as the DONE count passes their marks, wait until drained."""
        rng = random.Random(self.args.seed)
        self.started = start = time.monotonic()
        loaders.start_all()
        pending = list(faults)
        current: Fault | None = None
        next_kill = start + kill_every if kill_every else float("inf")
        done = dead = 0
        last_change, last_seen = start, (-1, -1)
        last_print = 0.0
        while True:
            now = time.monotonic()
            loaders.tick()
            counted = count_done(self.db)
            done = done if counted is None else counted
            seen = depths(ports, self.vhost, [QUEUE, DEAD])
            dead_now = seen[DEAD]
            if dead_now is not None:
                dead = dead_now
            if current is not None and current.thread is not None and not current.thread.is_alive():
                current.ended = now
                if current.error is not None:
                    raise RuntimeError(f"fault '{current.what}' failed: {current.error}") from current.error
                current = None
            if current is None and pending and done >= pending[0].at * good:
                current = pending.pop(0)
                current.started = now
                current.thread = threading.Thread(target=self._run_fault, args=(current,), daemon=True)
                current.thread.start()
            if now >= next_kill and done < 0.9 * good:
                running = loaders.running()
                if running:
                    loaders.kill(rng.choice(running), self.args.restart_after)
                next_kill = now + kill_every
            publishing_done = publishing is None or not publishing.is_alive()
            quiet = current is None and not pending and publishing_done
            if quiet and done >= good and dead >= expected_dead and seen[QUEUE] == 0:
                self.figures.complete = True
                break
            if (done, dead) != last_seen:
                last_seen, last_change = (done, dead), now
            if quiet and now - last_change > self.args.stall:
                self.note(f"nothing moved for {self.args.stall:g}s: stopping the wait "
                          f"({done}/{good} DONE, {dead}/{expected_dead} dead-lettered)")
                break
            if now - start > self.args.timeout:
                self.note(f"timed out after {self.args.timeout:g}s ({done}/{good} DONE)")
                break
            if now - last_print >= 5:
                last_print = now
                queued = "?" if seen[QUEUE] is None else seen[QUEUE]
                self.note(f"{done}/{good} DONE, {dead}/{expected_dead} dead-lettered, {queued} ready in queue, "
                          f"{len(loaders.running())}/{len(loaders.slots)} loaders up, {loaders.kills} killed")
            time.sleep(0.2)
        self.figures.drain_seconds = time.monotonic() - start
        self.note(f"drained in {self.figures.drain_seconds:.1f}s" if self.figures.complete
                  else f"stopped waiting after {self.figures.drain_seconds:.1f}s")

    def _run_fault(self, fault: Fault) -> None:
        try:
            fault.action()
        except BaseException as exc:  # reported by the drive
            fault.error = exc

    # -- the figures ----------------------------------------------------------------------------------------
    def conclude(self, loaders: Loaders, ports: list[int], published: Published) -> Figures:
        fig = self.figures
        fig.exit_codes = loaders.stop()
        fig.leftover_workers = len(loaders.leftover_workers())
        fig.kills, fig.restarts, fig.unexpected_exits = loaders.kills, loaders.restarts, len(loaders.unexpected)
        fig.peak_loader_mib = loaders.peak_loader_kib / 1024
        fig.peak_worker_mib = loaders.peak_worker_kib / 1024
        fig.published = published
        fig.good = published.by_kind["good"]
        fig.bad = sum(n for kind, n in published.by_kind.items() if kind != "good")
        good_ids = {mid for mid, kind in published.ids.items() if kind == "good"}
        bad_ids = {mid for mid, kind in published.ids.items() if kind != "good"}
        statuses: dict[str, str] = {uuid: status for uuid, status in rows(self.db, "SELECT uuid, status FROM messages")}
        runs: dict[tuple[str, str], int] = {(u, p): int(n) for u, p, n in rows(
            self.db, "SELECT uuid, plugin, COUNT(*) FROM fault_runs GROUP BY uuid, plugin")}
        done_ids = {u for u in good_ids if statuses.get(u) == "DONE"}
        fig.done = len(done_ids)
        lost = sorted(good_ids - done_ids)
        fig.lost = len(lost)
        for name, chosen in (("failing their first run", self.fail_first), ("with late data", self.late)):
            if chosen:
                fig.retried.append(f"{name}: {len(chosen & done_ids)} of {len(chosen)} DONE")
        fig.lost_examples = [f"{u} ({statuses.get(u, 'no status row')})" for u in lost[:5]]
        every_done = {u for u, s in statuses.items() if s == "DONE"}
        fig.done_not_run = sum(1 for u in every_done if any(runs.get((u, p), 0) == 0 for p in self.plugins))
        # by design, a hazard's own plugin runs once per attempt (up to max_attempts) and a fail-first one twice
        repeated = [(key, n - self.expected_runs(*key)) for key, n in runs.items()
                    if key[0] not in self.hazards or key[1] != "hazard"]
        repeated = [(key, extra) for key, extra in repeated if extra > 0]
        fig.repeated = len(repeated)
        fig.extra_runs = sum(extra for _key, extra in repeated)
        fig.repeated_by_plugin = collections.Counter(key[1] for key, _n in repeated)
        for (uuid, plugin), _n in sorted(repeated)[:3]:  # what the runs of a few of them looked like
            history = rows(self.db, "SELECT loader, worker, to_char(at, 'HH24:MI:SS.MS') FROM fault_runs "
                                    f"WHERE uuid = '{uuid}' AND plugin = '{plugin}' ORDER BY at")
            fig.repeated_examples.append(f"{uuid} {plugin}: " + ", ".join(
                f"{at} loader {loader} worker {worker}" for loader, worker, at in history))
        fig.bad_runs = sum(n for (u, _p), n in runs.items() if u in bad_ids and u not in self.hazards)
        dead = take_dead_letters(ports, self.vhost)
        dead_ids = {d.message_id for d in dead}
        fig.dead_with_reason = sum(1 for d in dead if d.reason)
        fig.dead_without_reason = sum(1 for d in dead if not d.reason)
        fig.good_dead = sum(1 for d in dead if d.message_id in good_ids and d.message_id not in self.hazards)
        fig.bad_not_dead = len(bad_ids - dead_ids)
        fig.bad_not_dead_examples = [f"{mid} ({published.ids[mid]})" for mid in sorted(bad_ids - dead_ids)[:5]]
        fig.bad_first_delivery = sum(1 for d in dead if d.message_id in bad_ids and d.attempts == 1)
        for d in dead:
            kind = "hazard: " + (d.kind or "?") if d.message_id in self.hazards else (d.kind or "?")
            reason = d.reason or ("(no reason; RabbitMQ's x-death)" if d.broker_death else "(no reason)")
            reason = re.sub(r"\b(fuzz|crash|cluster|plugins)-(good|bad)-[\w-]*\d+", "<uuid>", reason)
            reason = re.sub(r"\b(at|line|column|char) \d+", r"\1 N", reason)  # where in the body: one kind
            fig.reasons.setdefault(kind, collections.Counter())[reason[:110]] += 1
        node = next(n for n in self.services.nodes if n.running)
        listed = node.ctl("list_queues", "-p", self.vhost, "name", "messages", "--formatter", "json", check=False)
        try:
            fig.left_in_queues = {q["name"]: int(q["messages"]) for q in json.loads(listed.stdout or "[]")
                                  if q["name"] != DEAD and int(q["messages"] or 0)}
        except (ValueError, KeyError, TypeError):
            fig.left_in_queues = {"(could not list the queues)": -1}
        text = loaders.logs()
        fig.reconnects = text.count("RabbitMQ connection lost or refused")
        fig.log_errors = log_errors(text) + [f"(exited by itself) {u}" for u in loaders.unexpected[:5]]
        self.services.drop_vhost(self.vhost)
        return fig


LOG_LINE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL)\s+(\S+): (.*)$")


def log_errors(text: str, most: int = 6) -> list[str]:
    """The loaders' ERROR and CRITICAL lines, alike ones counted together (pika's own are only counted: each
    lost connection logs several)."""
    kinds: collections.Counter[str] = collections.Counter()
    pika_lines = 0
    for line in text.splitlines():
        found = LOG_LINE.match(line)
        if found is None:
            continue
        level, logger, message = found.groups()
        if logger.startswith("pika"):
            pika_lines += 1
            continue
        message = re.sub(r"\b(fuzz|crash|cluster|plugins)-(good|bad)-[\w-]*\d+", "<uuid>", message)
        kinds[f"{level} {logger}: {re.sub(r'[0-9]+', 'N', message)[:150]}"] += 1
    found_lines = [f"{count:6d} x {kind}" for kind, count in kinds.most_common(most)]
    if len(kinds) > most:
        found_lines.append(f"       ... and {len(kinds) - most} other kinds of line")
    if pika_lines:
        found_lines.append(f"{pika_lines:6d} x ERROR lines of pika's own (lost or refused connections)")
    return found_lines


# -- the scenarios -----------------------------------------------------------------------------------------
def scenario_crash(services: Services, args: argparse.Namespace, files: int) -> Figures:
    s = Scenario("crash", services, args, files)
    node = services.nodes[0]
    assert services.postgres is not None
    n = args.messages
    s.redis_metadata(range(1, n, 2))
    declare(node.port, s.vhost, s.broker)
    published = Published()

    def bodies() -> Iterator[Outgoing]:
        """One in 100 fails its first run, so retries (delay queues) cross the faults too."""
        for i in range(n):
            if i % 100 == 50:
                s.fail_first.add(f"crash-good-{i}")
                yield good_message("crash", i, files, False, fail_first=True)
            else:
                yield good_message("crash", i, files, i % 2 == 1)

    s.note(f"publishing {n} messages (odd ones' metadata in Redis, one in 100 failing its first run)")
    publish([node.port], s.vhost, bodies(), published)
    s.note(f"published {published.by_kind['good']} in {published.seconds:.1f}s; starting 3 loaders")
    loaders = Loaders(s.folder, [s.config(node.port)] * 3, args.log_level, s.fault_note)

    def rabbit_crash() -> None:
        s.fault_note(f"SIGKILL RabbitMQ node {node.name}")
        node.kill()
        time.sleep(args.outage)
        node.start()
        s.fault_note("RabbitMQ node started again")

    def postgres_crash() -> None:
        assert services.postgres is not None
        s.fault_note("PostgreSQL stopped with -m immediate (a crash)")
        services.postgres.crash()
        time.sleep(args.outage)
        services.postgres.start()
        s.fault_note("PostgreSQL started again")

    faults = [Fault(0.3, "RabbitMQ crash", rabbit_crash), Fault(0.6, "PostgreSQL crash", postgres_crash)]
    try:
        s.drive(loaders, [node.port], n, 0, faults, kill_every=args.kill_every)
        return s.conclude(loaders, [node.port], published)
    finally:
        loaders.kill_all()


def scenario_cluster(services: Services, args: argparse.Namespace, files: int) -> Figures:
    services.cluster()
    s = Scenario("cluster", services, args, files)
    nodes = services.nodes
    ports = [node.port for node in nodes]
    n = args.messages
    s.redis_metadata(range(1, n, 2))
    declare(nodes[0].port, s.vhost, s.broker)  # as the first loader would: the queue's leader starts on node a
    loaders = Loaders(s.folder, [s.config(node.port) for node in nodes], args.log_level, s.fault_note)
    bad = n // 100
    rng = random.Random(args.seed)

    late_folder = services.root / "data" / "late"
    late_folder.mkdir(exist_ok=True)
    timers: list[threading.Timer] = []

    def bodies() -> Iterator[Outgoing]:
        """The good messages -- one in 100 failing its first run, one in 100 whose data file is written only
        ``--late`` seconds after it was published (both retried) -- and a refused body after every 100th
        (dead-lettered): retries and dead letters go on during the failovers."""
        for i in range(n):
            if i % 100 == 50:
                s.fail_first.add(f"cluster-good-{i}")
                yield good_message("cluster", i, files, False, fail_first=True)
            elif i % 100 == 25:
                s.late.add(f"cluster-good-{i}")
                body = {"uuid_ref": f"cluster-good-{i}", "data_location": f"late/{i}.txt", "data_type": "text/plain",
                        "metadata": {"n": i, "late": True}}
                timer = threading.Timer(args.late, (late_folder / f"{i}.txt").write_text, args=(f"late {i}\n",))
                timer.daemon = True
                timers.append(timer)
                yield Outgoing(json.dumps(body).encode(), f"cluster-good-{i}", "good")
                timer.start()
            else:
                yield good_message("cluster", i, files, i % 2 == 1)
            if i % 100 == 99:
                yield bad_message(BAD_KINDS[(i // 100) % len(BAD_KINDS)], i // 100, rng, "cluster")

    published = Published()
    publishing = threading.Thread(target=publish, args=(ports, s.vhost, bodies(), published),
                                  kwargs={"first": 2}, daemon=True, name="publisher")

    def leader() -> RabbitNode:
        for node in nodes:
            if not node.running:
                continue
            listed = node.ctl("list_queues", "-p", s.vhost, "name", "leader", "--formatter", "json", check=False)
            try:
                name = next(q["leader"] for q in json.loads(listed.stdout) if q["name"] == QUEUE)
            except (ValueError, StopIteration, KeyError):
                continue
            return next(node for node in nodes if node.name == name)
        raise RuntimeError("no node could say which is the quorum queue's leader")

    def kill_leader() -> None:
        victim = leader()
        s.fault_note(f"SIGKILL the quorum queue's leader, RabbitMQ node {victim.name}")
        victim.kill()
        time.sleep(args.outage)
        s.fault_note(f"the queue's leader is now node {leader().name}; starting node {victim.name} again")
        victim.start()
        s.fault_note(f"node {victim.name} is back")

    faults = [Fault(0.3, "leader killed", kill_leader), Fault(0.65, "leader killed", kill_leader)]
    s.note(f"publishing {n} messages (one in 100 failing its first run, one in 100 whose data comes "
           f"{args.late:g}s late) and {bad} refused bodies through node c while 3 loaders (one per node) consume")
    publishing.start()
    try:
        s.drive(loaders, ports, n, bad, faults, publishing=publishing)
        publishing.join(5)
        s.note(f"published {sum(published.by_kind.values())} in {published.seconds:.1f}s "
               f"({published.reconnects} publisher reconnects, {published.republished} sent again)")
        return s.conclude(loaders, ports, published)
    finally:
        loaders.kill_all()


def scenario_fuzz(services: Services, args: argparse.Namespace, files: int) -> Figures:
    s = Scenario("fuzz", services, args, files)
    node = services.nodes[0]
    rng = random.Random(args.seed)
    bad, good = 2 * args.messages, max(1, args.messages // 10)
    plan = fuzz_plan(bad, good, args.messages / 10_000, rng)
    declare(node.port, s.vhost, s.broker)

    def bodies() -> Iterator[Outgoing]:
        for kind, number in plan:
            yield good_message("fuzz", number, files, False) if kind == "good" else bad_message(kind, number, rng)

    published = Published()
    s.note(f"publishing {bad} bad bodies among {good} good ones")
    publish([node.port], s.vhost, bodies(), published)
    s.note(f"published {sum(published.by_kind.values())} in {published.seconds:.1f}s: "
           + ", ".join(f"{kind} {count}" for kind, count in sorted(published.by_kind.items())))
    loaders = Loaders(s.folder, [s.config(node.port)] * 3, args.log_level, s.fault_note)
    try:
        s.drive(loaders, [node.port], good, bad, [])
        return s.conclude(loaders, [node.port], published)
    finally:
        loaders.kill_all()


def scenario_plugins(services: Services, args: argparse.Namespace, files: int) -> Figures:
    s = Scenario("plugins", services, args, files)
    s.plugins = ["record", "hazard"]
    node = services.nodes[0]
    good = max(1, args.messages // 5)
    scale = args.messages / 10_000
    counts = {"hang": max(1, round(20 * scale)), "busy": max(1, round(5 * scale)), "abort": max(1, round(20 * scale)),
              "segfault": max(1, round(20 * scale)), "exit": max(1, round(10 * scale))}
    items = [good_message("plugins", i, files, False) for i in range(good)]
    for kind, count in counts.items():
        for i in range(count):
            item = good_message("plugins", 0, files, False, hazard=kind)
            uuid = f"plugins-bad-{kind}-{i}"
            body = json.loads(item.body)
            body["uuid_ref"] = uuid
            items.append(Outgoing(json.dumps(body).encode(), uuid, kind))
            s.hazards.add(uuid)
    random.Random(args.seed).shuffle(items)
    declare(node.port, s.vhost, s.broker)
    published = Published()
    s.note(f"publishing {good} good messages and hazards: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    publish([node.port], s.vhost, items, published)
    loaders = Loaders(s.folder, [s.config(node.port)] * 3, args.log_level, s.fault_note)
    try:
        s.drive(loaders, [node.port], good, sum(counts.values()), [])
        return s.conclude(loaders, [node.port], published)
    finally:
        loaders.kill_all()


RUNNERS: dict[str, Callable[[Services, argparse.Namespace, int], Figures]] = {
    "crash": scenario_crash, "cluster": scenario_cluster, "fuzz": scenario_fuzz, "plugins": scenario_plugins}


# -- printing ----------------------------------------------------------------------------------------------
def report(fig: Figures) -> None:
    print(f"\n== {fig.scenario} ==", flush=True)
    pub = fig.published
    lines = [
        ("published good / bad", f"{fig.good} / {fig.bad}" + (
            f" ({pub.republished} sent again after a failure)" if pub and pub.republished else "")),
        ("good DONE", str(fig.done) + (f" ({'; '.join(fig.retried)})" if fig.retried else "")),
        ("lost (good never DONE)", str(fig.lost) + (f": {', '.join(fig.lost_examples)}" if fig.lost else "")),
        ("DONE but a plugin never ran", str(fig.done_not_run)),
        ("plugin runs repeated", f"{fig.repeated} (uuid, plugin) pairs, {fig.extra_runs} extra runs" + (
            " (" + ", ".join(f"{p} {n}" for p, n in sorted(fig.repeated_by_plugin.items())) + ")"
            if fig.repeated else "")),
        ("plugin runs for refused bodies", str(fig.bad_runs)),
        ("dead-lettered with a reason", str(fig.dead_with_reason) + (
            f" ({fig.bad_first_delivery} on their first delivery)" if fig.scenario == "fuzz" else "")),
        ("dead-lettered without a reason", str(fig.dead_without_reason)),
        ("good messages dead-lettered", str(fig.good_dead)),
        ("bad bodies not dead-lettered", str(fig.bad_not_dead) + (
            f": {', '.join(fig.bad_not_dead_examples)}" if fig.bad_not_dead else "")),
        ("loader SIGKILLs / restarts", f"{fig.kills} / {fig.restarts}"),
        ("loader exits not caused by us", str(fig.unexpected_exits)),
        ("loader reconnects to RabbitMQ", str(fig.reconnects)),
        ("loader exit codes on SIGTERM", ", ".join(map(str, fig.exit_codes)) or "-"),
        ("plugin workers left running", str(fig.leftover_workers)),
        ("peak RSS (VmHWM), loader / plugin worker", f"{fig.peak_loader_mib:.1f} / {fig.peak_worker_mib:.1f} MiB"),
        ("time to drain", f"{fig.drain_seconds:.1f}s" + ("" if fig.complete else " (did not drain)")),
        ("left in queues", ", ".join(f"{k} {v}" for k, v in fig.left_in_queues.items()) or "nothing"),
    ]
    for name, value in lines:
        print(f"  {name:<42} {value}")
    if fig.repeated_examples:
        print("  runs of a few repeated ones (time, loader pid, plugin worker pid):")
        for line in fig.repeated_examples:
            print(f"    {line}")
    if fig.faults:
        print("  faults:")
        for line in fig.faults:
            print(f"    {line}")
    if fig.reasons:
        print("  dead letters by kind (count: reason):")
        for kind in sorted(fig.reasons):
            for reason, count in fig.reasons[kind].most_common(3):
                print(f"    {kind:<24} {count:6d}: {reason}")
            if len(fig.reasons[kind]) > 3:
                print(f"    {'':<24} {'':6} ... {len(fig.reasons[kind]) - 3} other reason texts")
    if fig.log_errors:
        print("  loader log, ERROR lines (digits as N):")
        for line in fig.log_errors:
            print(f"    {line}")
    print(flush=True)


def table(figures: list[Figures]) -> None:
    rows_ = [
        ("messages published (good / bad)", lambda f: f"{f.good} / {f.bad}"),
        ("good DONE", lambda f: str(f.done)),
        ("lost", lambda f: str(f.lost)),
        ("DONE, plugins never ran", lambda f: str(f.done_not_run)),
        ("plugin runs repeated (uuids)", lambda f: str(f.repeated)),
        ("dead-lettered with a reason", lambda f: str(f.dead_with_reason)),
        ("dead-lettered without a reason", lambda f: str(f.dead_without_reason)),
        ("bad not dead-lettered", lambda f: str(f.bad_not_dead)),
        ("loader kills / restarts", lambda f: f"{f.kills} / {f.restarts}"),
        ("loader exits not ours", lambda f: str(f.unexpected_exits)),
        ("peak RSS loader (MiB)", lambda f: f"{f.peak_loader_mib:.1f}"),
        ("time to drain (s)", lambda f: f"{f.drain_seconds:.1f}" + ("" if f.complete else "!")),
    ]
    width = 2 + max(len(text) for text in [f.scenario for f in figures]
                    + [value(f) for _name, value in rows_ for f in figures])
    print(f"{'summary':<34}" + "".join(f"{f.scenario:>{width}}" for f in figures))
    for name, value in rows_:
        print(f"{name:<34}" + "".join(f"{value(f):>{width}}" for f in figures))
    print(flush=True)


# -- main --------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--messages", type=int, default=10_000,
                        help="N: crash and cluster publish N, fuzz 2N bad among N/10 good, plugins N/5 (default 10000)")
    parser.add_argument("--port-base", type=int, default=15700,
                        help="first of the ports of our own services (default 15700; see above)")
    parser.add_argument("--kill-every", type=float, default=2.0, help="crash: seconds between loader SIGKILLs")
    parser.add_argument("--restart-after", type=float, default=0.5, help="crash: seconds before a killed loader "
                                                                         "is started again")
    parser.add_argument("--outage", type=float, default=5.0,
                        help="seconds a crashed RabbitMQ node or PostgreSQL stays down (default 5)")
    parser.add_argument("--late", type=float, default=1.5,
                        help="cluster: seconds after its publication that a late message's data file is written")
    parser.add_argument("--plugin-ms", type=float, default=1.0, help="milliseconds the record plugin takes per run")
    parser.add_argument("--stall", type=float, default=30.0,
                        help="stop waiting for a scenario to drain after nothing moved for this long (seconds)")
    parser.add_argument("--timeout", type=float, default=900.0, help="most seconds one scenario may take")
    parser.add_argument("--log-level", default="WARNING", help="the loaders' --log-level (default WARNING)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, configs)")
    args = parser.parse_args()
    chosen = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    # the cluster goes last: its nodes b and c join node a, which the other scenarios use alone
    chosen.sort(key=lambda name: name == "cluster")

    cleanup = Cleanup()
    atexit.register(cleanup.run)
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, on_signal)
    root = Path(tempfile.mkdtemp(prefix="sqapi-faults-"))
    root.chmod(0o755)  # PostgreSQL runs as user postgres and keeps its data in here
    if args.keep:
        cleanup.push("say where the folder is", lambda: print(f"kept {root}", flush=True))
    else:
        cleanup.push("remove the temporary folder", lambda: shutil.rmtree(root, ignore_errors=True))
    services = Services(root, args.port_base, cleanup)
    figures: list[Figures] = []
    try:
        services.check()
        say(f"working in {root}; scenarios: {', '.join(chosen)}; N = {args.messages}")
        services.start()
        files = max(1, args.messages)
        (root / "data").mkdir()
        for i in range(files):
            (root / "data" / f"f{i:06d}.txt").write_text(f"item {i}\n")
        for name in chosen:
            say(f"--- scenario {name} ---")
            fig = RUNNERS[name](services, args, files)
            report(fig)
            figures.append(fig)
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopping everything this script started", file=sys.stderr, flush=True)
        return 130
    finally:
        if len(figures) > 1:
            table(figures)
        say("stopping the services of this run")
        cleanup.run()
    failures = [f"{fig.scenario}: {why}" for fig in figures for why in fig.failed()]
    for line in failures:
        print(f"FAILED {line}")
    if not failures:
        print("no message lost, every DONE message's plugins ran, every bad body dead-lettered with a reason")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
