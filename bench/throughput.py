#!/usr/bin/env python3
"""End-to-end throughput of ``sqapi loader`` on RabbitMQ against a plain pika consumer (the ceiling).

    .venv/bin/python bench/throughput.py                 # 5,000 messages
    .venv/bin/python bench/throughput.py -n 20000        # the memory check: a 20,000 backlog

In a fresh vhost (created and deleted with rabbitmqctl), N messages are published once to an
exchange that routes each to two queues: ``sqapi`` and ``plain``.  Each message refers to its own
1 KiB file and carries its metadata.  Then, one after the other, so they never share the CPU:

* the plain consumer (a subprocess: pika, prefetch 100, reads the file, acks each, no database)
  drains ``plain``;
* ``sqapi loader`` (a subprocess with sqapi's defaults -- ``processes: auto``, one loader process
  per CPU up to 4 -- one no-op plugin, status recorded in PostgreSQL: a fresh schema at
  --database-url, or SQLite with --sqlite) drains ``sqapi``.

Each rate is (N - 1) / (last finished - first started), i.e. without process start-up.  The
loader's peak RSS is the kernel's high-water mark (VmHWM) read just before it is stopped.
``--processes 1`` measures one loader process alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pika
import yaml
from common import (  # bench/common.py (this folder is on sys.path)
    DEFAULT_DATABASE_URL,
    HOST,
    NOOP_PLUGIN,
    PORT,
    SQAPI,
    params,
    rabbitmqctl,
)


# -- the plain consumer (run as a subprocess of this script) ------------------------------------------
def plain_consumer(vhost: str, queue: str, base: str, n: int) -> None:
    connection = pika.BlockingConnection(params(vhost))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=100)
    seen = 0
    first = 0.0

    def on_message(ch: Any, method: Any, _properties: Any, body: bytes) -> None:
        nonlocal seen, first
        if not seen:
            first = time.time()
        message = json.loads(body)
        with open(os.path.join(base, message["data_location"]), "rb") as data:
            data.read()
        ch.basic_ack(method.delivery_tag)
        seen += 1
        if seen == n:
            ch.stop_consuming()

    channel.basic_consume(queue, on_message)
    channel.start_consuming()
    print(json.dumps({"first": first, "last": time.time(), "cpu": time.process_time()}))
    connection.close()


# -- the run --------------------------------------------------------------------------------------------
def prepare(root: Path, n: int) -> list[bytes]:
    data = root / "data"
    data.mkdir()
    bodies = []
    for i in range(n):
        name = f"f{i:06d}.bin"
        (data / name).write_bytes(os.urandom(1024))
        bodies.append(json.dumps({"uuid_ref": str(uuid.uuid4()), "data_location": name,
                                  "data_type": "application/octet-stream",
                                  "metadata": {"n": i, "source": "bench"}}).encode())
    plugin = root / "plugins" / "noop"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(NOOP_PLUGIN)
    return bodies


def publish(vhost: str, bodies: list[bytes]) -> None:
    connection = pika.BlockingConnection(params(vhost))
    channel = connection.channel()
    channel.exchange_declare("bench", "direct", durable=True)
    channel.queue_declare("plain", durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind("plain", "bench", "bench")
    for body in bodies:  # no confirms here: the queue depths are checked below
        channel.basic_publish("bench", "bench", body, pika.BasicProperties(delivery_mode=2))
    connection.close()


def depth(vhost: str, queue: str) -> int:
    connection = pika.BlockingConnection(params(vhost))
    count = int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    connection.close()
    return count


def wait_for_depth(vhost: str, queue: str, expected: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while depth(vhost, queue) != expected:
        if time.monotonic() > deadline:
            raise SystemExit(f"queue {queue} never reached {expected} messages")
        time.sleep(0.2)


def rss_kib(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # it has just exited
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def family(pids: list[int]) -> list[int]:
    """The given processes and their children (a supervising ``sqapi loader``'s loader processes)."""
    found = []
    for pid in pids:
        found.append(pid)
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            pass
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def run_loader(root: Path, vhost: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    config = {
        "msg_broker": {"type": "rabbitmq", "host": HOST, "port": PORT, "vhost": vhost, "exchange_name": "bench",
                       "exchange_type": "direct", "routing_key": "bench", "queue_name": "sqapi",
                       **({"prefetch": args.prefetch} if args.prefetch else {}),
                       **({"batch_size": args.batch_size} if args.batch_size else {})},
        "data_store": {"type": "disk", "base_dir": str(root / "data")},
        "database": {"type": "sqlite", "path": str(root / "status.db")},
        "active_plugins": ["noop"],
        "plugin_dirs": [str(root / "plugins")],
        "processing": {"workers": args.workers, "plugin_timeout": args.plugin_timeout,
                       **({"processes": args.processes} if args.processes else {})},
    }
    if not args.sqlite:
        config["database"] = {"type": "postgres", "url": args.database_url, "schema": args.schema}
        if args.synchronous_commit:
            config["database"]["synchronous_commit"] = args.synchronous_commit
    (root / "sqapi.yml").write_text(yaml.safe_dump(config))
    log = open(root / "loader.log", "wb")  # noqa: SIM115 -- closed below
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQAPI_") and k != "CFG_FILE"}
    processes = [subprocess.Popen([SQAPI, "--log-level", args.log_level, "loader", "-c", str(root / "sqapi.yml")],
                                  cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
                 for _ in range(args.loaders)]
    peak_sampled = 0
    deadline = time.monotonic() + args.timeout
    done = 0
    try:
        while True:
            if any(p.poll() is not None for p in processes):
                raise SystemExit(f"a loader exited; see {root / 'loader.log'}")
            peak_sampled = max([peak_sampled] + [rss_kib(pid, "VmRSS") for pid in family([p.pid for p in processes])])
            done = count_done(root, args)
            if done >= n:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out with {done}/{n} DONE")
            time.sleep(0.2)
        everyone = family([p.pid for p in processes])
        peaks = [rss_kib(pid, "VmHWM") for pid in everyone]
        peak = max([peak_sampled] + peaks)
        cpu = sum(cpu_seconds(pid) for pid in everyone)
        # a supervising `sqapi loader` has its loader processes as children; a plain one is its own
        ran = len(everyone) - len(processes) if len(everyone) > len(processes) else len(processes)
        for p in processes:
            p.send_signal(signal.SIGTERM)
        exit_code = max(p.wait(60) for p in processes)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
        log.close()
    first, last = times(root, args)
    return {"first": first, "last": last, "peak_rss_kib": peak, "total_rss_kib": sum(peaks), "exit_code": exit_code,
            "cpu": cpu, "processes": ran}


def count_done(root: Path, args: argparse.Namespace) -> int:
    if not args.sqlite:
        import psycopg2  # only when benchmarking PostgreSQL

        with psycopg2.connect(args.database_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (f"{args.schema}.messages",))
            if cur.fetchone()[0] is None:
                return 0
            cur.execute(f"SELECT COUNT(*) FROM {args.schema}.messages WHERE status = 'DONE'")
            return int(cur.fetchone()[0])
    path = root / "status.db"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=30) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM messages WHERE status = 'DONE'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def times(root: Path, args: argparse.Namespace) -> tuple[float, float]:
    query = "SELECT MIN(created_at), MAX(updated_at) FROM messages"
    if not args.sqlite:
        import psycopg2

        with psycopg2.connect(args.database_url) as conn, conn.cursor() as cur:
            cur.execute(query.replace("FROM messages", f"FROM {args.schema}.messages"))
            row = cur.fetchone()
    else:
        with sqlite3.connect(root / "status.db") as conn:
            row = conn.execute(query).fetchone()
    return iso(str(row[0])), iso(str(row[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="messages (default 5000)")
    parser.add_argument("--workers", type=int, default=4, help="sqapi processing.workers (default 4)")
    parser.add_argument("--loaders", type=int, default=1, help="sqapi loader commands started (default 1)")
    parser.add_argument("--processes", type=int,
                        help="processing.processes: loader processes each sqapi loader runs (default: sqapi's "
                             "own, auto: one per CPU, up to 4)")
    parser.add_argument("--plugin-timeout", type=float, default=300,
                        help="processing.plugin_timeout; 0 runs plugins in the worker thread (default 300)")
    parser.add_argument("--prefetch", type=int, help="sqapi msg_broker.prefetch (default: sqapi's)")
    parser.add_argument("--batch-size", type=int, help="sqapi msg_broker.batch_size (default: sqapi's)")
    parser.add_argument("--log-level", default="WARNING", help="the loader's --log-level (default WARNING)")
    parser.add_argument("--database-url", default=os.environ.get("SQAPI_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
                        help=f"PostgreSQL for the status (a fresh schema, dropped at the end; default "
                             f"$SQAPI_BENCH_DATABASE_URL or {DEFAULT_DATABASE_URL})")
    parser.add_argument("--sqlite", action="store_true", help="record status in SQLite instead of PostgreSQL")
    parser.add_argument("--synchronous-commit", choices=["on", "off"],
                        help="PostgreSQL: database.synchronous_commit (default: the server's)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--plain-consumer", nargs=4, metavar=("VHOST", "QUEUE", "BASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_consumer:
        vhost, queue, base, n = args.plain_consumer
        plain_consumer(vhost, queue, base, int(n))
        return

    n = args.n
    vhost = f"sqapi-bench-{uuid.uuid4().hex[:8]}"
    args.schema = f"sqapi_bench_{uuid.uuid4().hex[:8]}"   # PostgreSQL: a fresh schema, dropped at the end
    root = Path(tempfile.mkdtemp(prefix="sqapi-bench-"))
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        bodies = prepare(root, n)
        # the loader declares its own topology; declare it now so the publish reaches both queues
        from sqapi.connectors.listeners.rabbitmq import BrokerSettings, declare_topology

        connection = pika.BlockingConnection(params(vhost))
        declare_topology(connection.channel(), BrokerSettings.from_config(
            {"exchange_name": "bench", "routing_key": "bench", "queue_name": "sqapi"}))
        connection.close()
        publish(vhost, bodies)
        wait_for_depth(vhost, "plain", n)
        wait_for_depth(vhost, "sqapi", n)
        print(f"{n} messages of 1 KiB files published to 'plain' and 'sqapi' in vhost {vhost}", flush=True)

        out = subprocess.run([sys.executable, __file__, "--plain-consumer", vhost, "plain", str(root / "data"),
                              str(n)], check=True, capture_output=True, text=True).stdout
        plain = json.loads(out)
        plain_rate = (n - 1) / (plain["last"] - plain["first"])
        print(f"plain pika consumer   {plain_rate:8.0f} msgs/s  (prefetch 100, reads the file, ack each; "
              f"{plain['cpu'] * 1e6 / n:.0f} us CPU/msg)", flush=True)

        loader = run_loader(root, vhost, n, args)
        sqapi_rate = (n - 1) / (loader["last"] - loader["first"])
        database = "SQLite" if args.sqlite else "PostgreSQL"
        ran = loader["processes"]
        print(f"sqapi loader x{args.loaders}       {sqapi_rate:8.0f} msgs/s  ({ran} loader process"
              f"{'es' if ran > 1 else ''}{'' if args.processes else ' (processes: auto)'}, {args.workers} workers, "
              f"prefetch {args.prefetch or 'default'}, batch size {args.batch_size or 'default'}, "
              f"status in {database}, 1 no-op plugin; "
              f"{loader['cpu'] * 1e6 / n:.0f} us CPU/msg incl. start-up)")
        print(f"ratio sqapi / plain   {sqapi_rate / plain_rate:8.2f}")
        print(f"loader peak RSS       {loader['peak_rss_kib'] / 1024:8.1f} MiB  (VmHWM of the largest loader process, "
              f"backlog of {n}; {loader['total_rss_kib'] / 1024:.1f} MiB for all of them and any "
              f"supervisor together)")
        print(f"loader exit on SIGTERM: {loader['exit_code']}; left in queue 'sqapi': {depth(vhost, 'sqapi')}")
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)
        if not args.sqlite:
            import psycopg2

            with psycopg2.connect(args.database_url) as conn, conn.cursor() as cur:
                cur.execute(f"DROP SCHEMA IF EXISTS {args.schema} CASCADE")
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
