#!/usr/bin/env python3
"""Unloaded latency, publish to DONE: ``sqapi loader`` against a plain pika consumer doing one INSERT.

    .venv/bin/python bench/latency.py                  # 300 messages each, one at a time
    .venv/bin/python bench/latency.py -n 1000 --gap 0.02

One message at a time -- published with a confirm, then waited for -- so nothing queues and no
batch forms: what a lone message waits.  The moment a message is done is taken from PostgreSQL
itself: a trigger on the status table (sqapi's ``messages`` turning DONE, the plain consumer's
row being inserted) sends a NOTIFY at commit, which this script LISTENs for.  So both sides are
measured the same way, to the commit of their row.

* the plain consumer (a subprocess): pika, prefetch 100, reads the 1 KiB file the message names,
  INSERTs one row (autocommit), acks;
* ``sqapi loader`` (a subprocess, sqapi's defaults -- ``processes: auto`` -- one no-op plugin,
  status in PostgreSQL: a fresh schema at --database-url).

Both take from the same kind of queue (``--queue-type``: quorum, sqapi's default, or classic): a
quorum queue hands a message out only once it is replicated and on disk, which a lone message
waits for on either side.

They run one after the other in a fresh vhost (created and deleted with rabbitmqctl), each after
``--warmup`` messages not counted.  Prints p50, p90, p99 and the mean for each, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import psycopg2
import psycopg2.extensions
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

CHANNEL = "sqapi_bench_done"


# -- the plain consumer (a subprocess of this script) -----------------------------------------------------
def plain_consumer(vhost: str, base: str, database_url: str, schema: str) -> None:
    db = psycopg2.connect(database_url)
    db.autocommit = True
    cursor = db.cursor()
    connection = pika.BlockingConnection(params(vhost))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=100)

    def on_message(ch: Any, method: Any, _properties: Any, body: bytes) -> None:
        message = json.loads(body)
        with open(os.path.join(base, message["data_location"]), "rb") as handle:
            handle.read()
        cursor.execute(f"INSERT INTO {schema}.plain_done (uuid) VALUES (%s)", (message["uuid_ref"],))
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume("plain", on_message)
    signal.signal(signal.SIGTERM, lambda *_: channel.stop_consuming())
    channel.start_consuming()


# -- the measurement ------------------------------------------------------------------------------------
def listen(database_url: str) -> Any:
    conn = psycopg2.connect(database_url)
    conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    conn.cursor().execute(f"LISTEN {CHANNEL}")
    return conn


def wait_for(conn: Any, uuid_ref: str, timeout: float) -> float | None:
    """When the NOTIFY for ``uuid_ref`` came (time.perf_counter), or None after ``timeout``."""
    deadline = time.perf_counter() + timeout
    while True:
        conn.poll()
        while conn.notifies:
            if conn.notifies.pop(0).payload == uuid_ref:
                return time.perf_counter()
        left = deadline - time.perf_counter()
        if left <= 0:
            return None
        select.select([conn], [], [], left)


def measure(vhost: str, routing_key: str, listener: Any, root: Path, args: argparse.Namespace, label: str) \
        -> list[float]:
    connection = pika.BlockingConnection(params(vhost))
    channel = connection.channel()
    channel.confirm_delivery()
    latencies: list[float] = []
    for n in range(args.warmup + args.n):
        uuid_ref = f"{label}-{n}"
        (root / "data" / f"{uuid_ref}.bin").write_bytes(os.urandom(1024))
        body = json.dumps({"uuid_ref": uuid_ref, "data_location": f"{uuid_ref}.bin", "metadata": {"n": n}})
        started = time.perf_counter()
        channel.basic_publish("bench", routing_key, body.encode(), pika.BasicProperties(delivery_mode=2))
        done = wait_for(listener, uuid_ref, args.timeout)
        if done is None:
            raise SystemExit(f"{label}: {uuid_ref} not done within {args.timeout}s; see {root}")
        if n >= args.warmup:
            latencies.append((done - started) * 1000.0)
        time.sleep(args.gap)
    connection.close()
    return latencies


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def consumers(vhost: str, queue: str) -> int:
    with pika.BlockingConnection(params(vhost)) as connection:
        try:
            return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count)
        except pika.exceptions.ChannelClosedByBroker:  # not declared yet
            return 0


def table_exists(database_url: str, name: str) -> bool:
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (name,))
        return cur.fetchone()[0] is not None


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": statistics.median(ordered), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=300, help="messages measured per consumer (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="messages first, not counted (default 30)")
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between messages (default 0.01)")
    parser.add_argument("--timeout", type=float, default=30.0, help="most seconds one message may take")
    parser.add_argument("--database-url", default=os.environ.get("SQAPI_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum",
                        help="the queue both consumers take from (default quorum, sqapi's default; a quorum "
                             "queue delivers a message once it is replicated and on disk)")
    args = parser.parse_args()

    vhost = f"sqapi-latency-{uuid.uuid4().hex[:8]}"
    schema = f"bench_latency_{uuid.uuid4().hex[:8]}"
    root = Path(tempfile.mkdtemp(prefix="sqapi-latency-"))
    (root / "data").mkdir()
    (root / "plugins" / "noop").mkdir(parents=True)
    (root / "plugins" / "noop" / "__init__.py").write_text(NOOP_PLUGIN)
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    with psycopg2.connect(args.database_url) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
        cur.execute(f"CREATE TABLE {schema}.plain_done (uuid TEXT NOT NULL, at TIMESTAMPTZ DEFAULT now())")
        cur.execute(f"""CREATE FUNCTION {schema}.notify_done() RETURNS trigger LANGUAGE plpgsql AS $$
                        BEGIN PERFORM pg_notify('{CHANNEL}', NEW.uuid); RETURN NEW; END $$""")
        cur.execute(f"CREATE TRIGGER plain_done AFTER INSERT ON {schema}.plain_done "
                    f"FOR EACH ROW EXECUTE FUNCTION {schema}.notify_done()")
    with pika.BlockingConnection(params(vhost)) as connection:
        channel = connection.channel()
        channel.exchange_declare("bench", exchange_type="direct", durable=True)
        channel.queue_declare("plain", durable=True,  # the same kind of queue as sqapi's: a fair comparison
                              arguments={"x-queue-type": "quorum"} if args.queue_type == "quorum" else {})
        channel.queue_bind("plain", "bench", routing_key="plain")
    listener = listen(args.database_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQAPI_") and k != "CFG_FILE"}
    results: dict[str, dict[str, float]] = {}
    try:
        plain = subprocess.Popen([sys.executable, __file__, "--plain", vhost, str(root / "data"), args.database_url,
                                  schema], env=env)
        try:
            wait_until(lambda: consumers(vhost, "plain") == 1, 30, "the plain consumer")
            results["plain pika consumer + one INSERT"] = summary(measure(vhost, "plain", listener, root, args,
                                                                          "plain"))
        finally:
            plain.send_signal(signal.SIGTERM)
            plain.wait(30)

        config = {
            "msg_broker": {"type": "rabbitmq", "host": HOST, "port": PORT, "vhost": vhost, "exchange_name": "bench",
                           "exchange_type": "direct", "routing_key": "sqapi", "queue_name": "sqapi",
                           "quorum": args.queue_type == "quorum"},
            "data_store": {"type": "disk", "base_dir": str(root / "data")},
            "database": {"type": "postgres", "url": args.database_url, "schema": schema},
            "active_plugins": ["noop"],
            "plugin_dirs": [str(root / "plugins")],
        }
        (root / "sqapi.yml").write_text(yaml.safe_dump(config))
        log = open(root / "loader.log", "wb")  # noqa: SIM115 -- closed below
        loader = subprocess.Popen([SQAPI, "--log-level", "WARNING", "loader", "-c", str(root / "sqapi.yml")],
                                  cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until(lambda: table_exists(args.database_url, f"{schema}.messages"), 60, "the status tables")
            with psycopg2.connect(args.database_url) as conn, conn.cursor() as cur:
                cur.execute(f"CREATE TRIGGER sqapi_done AFTER INSERT OR UPDATE OF status ON {schema}.messages "
                            f"FOR EACH ROW WHEN (NEW.status = 'DONE') EXECUTE FUNCTION {schema}.notify_done()")
            wait_until(lambda: consumers(vhost, "sqapi") >= 1, 60, "sqapi loader consuming")
            results["sqapi loader (defaults, no-op plugin)"] = summary(measure(vhost, "sqapi", listener, root, args,
                                                                              "sqapi"))
        finally:
            loader.send_signal(signal.SIGTERM)
            try:
                loader.wait(60)
            except subprocess.TimeoutExpired:
                loader.kill()
            log.close()
    finally:
        listener.close()
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)
        with psycopg2.connect(args.database_url) as conn, conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"unloaded latency, publish to DONE (ms), {args.n} messages one at a time, after {args.warmup} not counted, "
          f"both from a {args.queue_type} queue")
    print(f"{'':42} {'p50':>7} {'p90':>7} {'p99':>7} {'mean':>7}")
    for name, figures in results.items():
        print(f"{name:42} " + " ".join(f"{figures[k]:7.2f}" for k in ("p50", "p90", "p99", "mean")))
    plain_p50 = results["plain pika consumer + one INSERT"]["p50"]
    sqapi_p50 = results["sqapi loader (defaults, no-op plugin)"]["p50"]
    print(f"p50 ratio sqapi / plain: {sqapi_p50 / plain_p50:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--plain":
        plain_consumer(*sys.argv[2:6])
    else:
        main()
