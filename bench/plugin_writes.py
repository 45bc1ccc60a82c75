#!/usr/bin/env python3
"""A plugin that writes a row per message the sqAPI way, against a no-op plugin, in one run.

    .venv/bin/python bench/plugin_writes.py               # 2,000 messages per case
    .venv/bin/python bench/plugin_writes.py -n 5000 --writers 2

sqAPI plugins record what they found with ``database.execute_script(path, **row)`` on every
message.  This publishes N messages (1 KiB files, metadata in the message) to RabbitMQ once per
case, in a fresh vhost, and drains each queue with ``sqapi loader`` on sqapi's defaults
(``processes: auto``, plugins in worker processes) with status in PostgreSQL (a fresh schema
at --database-url, dropped at the end):

* ``noop``: one plugin that returns at once;
* ``script``: ``--writers`` plugins (default 1), each an unmodified sqAPI-style folder -- a
  ``scripts/init.sql`` creating its table (``TIMESTAMPTZ DEFAULT now()``), and an ``execute``
  calling ``database.execute_script('scripts/insert_item.sql', **row)``.

Each rate is (N - 1) / (last finished - first started), read from the status rows.  The cases
run one after the other on the same machine, so the ratio script / noop is the figure to read.
For each case the CPU time every process used from the first message DONE to the last
(loader, plugin workers, PostgreSQL, RabbitMQ; from /proc) is printed per message: on a
machine whose cores are all busy, that is what the rates come down to.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pika
import psycopg2
import yaml
from common import DEFAULT_DATABASE_URL, HOST, PORT, SQAPI, rabbitmqctl  # bench/common.py (this folder is on sys.path)

NOOP = "def execute(config, database, message, metadata, data):\n    return None\n"
WRITER = textwrap.dedent("""\
    import os

    SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


    def execute(config, database, message, metadata, data):
        size = data.seek(0, os.SEEK_END)
        database.execute_script(os.path.join(SCRIPTS, "insert_item.sql"), uuid_ref=message.uuid,
                                data_size=size, metadata_size=len(metadata))
    """)
INIT = textwrap.dedent("""\
    CREATE TABLE IF NOT EXISTS {table} (
        id            SERIAL PRIMARY KEY,
        uuid_ref      TEXT NOT NULL,
        data_size     BIGINT,
        metadata_size INTEGER,
        created_at    TIMESTAMPTZ DEFAULT now()
    );
    """)
INSERT = "INSERT INTO {table} (uuid_ref, data_size, metadata_size) " \
         "VALUES (%(uuid_ref)s, %(data_size)s, %(metadata_size)s);\n"


def write_plugins(root: Path, case: str, writers: int) -> list[str]:
    names = ["noop"] if case == "noop" else [f"writer{i}" for i in range(1, writers + 1)]
    for name in names:
        folder = root / "plugins" / name
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text(NOOP if name == "noop" else WRITER)
        if name != "noop":
            (folder / "scripts").mkdir()
            (folder / "scripts" / "init.sql").write_text(INIT.format(table=f"items_{name}"))
            (folder / "scripts" / "insert_item.sql").write_text(INSERT.format(table=f"items_{name}"))
    return names


def publish(vhost: str, n: int) -> None:
    from sqapi.connectors.listeners.rabbitmq import BrokerSettings, declare_topology

    connection = pika.BlockingConnection(pika.ConnectionParameters(HOST, PORT, vhost))
    channel = connection.channel()
    declare_topology(channel, BrokerSettings.from_config({"exchange_name": "bench", "routing_key": "bench",
                                                          "queue_name": "sqapi"}))
    for i in range(n):
        body = json.dumps({"uuid_ref": str(uuid.uuid4()), "data_location": f"f{i:06d}.bin",
                           "data_type": "application/octet-stream", "metadata": {"n": i, "source": "bench"}})
        channel.basic_publish("bench", "bench", body.encode(), pika.BasicProperties(delivery_mode=2))
    deadline = time.monotonic() + 120
    while channel.queue_declare("sqapi", passive=True).method.message_count != n:
        if time.monotonic() > deadline:
            raise SystemExit("the queue never held every message")
        time.sleep(0.1)
    connection.close()


def cpu_by_kind() -> dict[str, int]:
    """Clock ticks of user + system CPU used so far, by kind of process (every process this user can read)."""
    ticks: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        kind = ("plugin workers" if "sqapi.core.worker" in command else "sqapi loader" if " loader " in command
                else "PostgreSQL" if command.startswith("postgres") else "RabbitMQ" if "beam.smp" in command
                else "other")
        ticks[f"{kind}:{entry.name}"] = int(fields[11]) + int(fields[12])
    return ticks


def cpu_per_message(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, float]:
    """Microseconds of CPU per message, by kind (processes that started meanwhile count from zero)."""
    spent: dict[str, float] = {}
    for key, ticks in after.items():
        kind = key.split(":", 1)[0]
        spent[kind] = spent.get(kind, 0.0) + (ticks - before.get(key, 0)) / os.sysconf("SC_CLK_TCK") / n * 1e6
    return spent


def run_case(root: Path, case: str, args: argparse.Namespace) -> dict[str, Any]:
    vhost = f"sqapi-bench-{uuid.uuid4().hex[:8]}"
    schema = f"sqapi_bench_{uuid.uuid4().hex[:8]}"
    folder = root / case
    folder.mkdir()
    names = write_plugins(folder, case, args.writers)
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        publish(vhost, args.n)
        config = {
            "msg_broker": {"type": "rabbitmq", "host": HOST, "port": PORT, "vhost": vhost, "exchange_name": "bench",
                           "routing_key": "bench", "queue_name": "sqapi"},
            "data_store": {"type": "disk", "base_dir": str(root / "data")},
            "database": {"type": "postgres", "url": args.database_url, "schema": schema},
            "active_plugins": names,
            "plugin_dirs": [str(folder / "plugins")],
        }
        (folder / "sqapi.yml").write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SQAPI_") and k != "CFG_FILE"}
        cpu_before: dict[str, int] = {}
        counted_from = 0
        with open(folder / "loader.log", "wb") as log:
            loader = subprocess.Popen([SQAPI, "--log-level", "WARNING", "loader", "-c", str(folder / "sqapi.yml")],
                                      cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                deadline = time.monotonic() + args.timeout
                while (done := count(args.database_url, schema, "status = 'DONE'")) < args.n:
                    if done and not cpu_before:  # started and consuming: CPU counts from here, start-up left out
                        cpu_before, counted_from = cpu_by_kind(), done
                    if loader.poll() is not None:
                        raise SystemExit(f"the loader exited; see {folder / 'loader.log'}")
                    if time.monotonic() > deadline:
                        raise SystemExit(f"timed out with {done}/{args.n} DONE")
                    time.sleep(0.2)
                # a run too short to see a first message DONE before the last has no CPU figures
                cpu = cpu_per_message(cpu_before, cpu_by_kind(), args.n - counted_from) if cpu_before else {}
                loader.send_signal(signal.SIGTERM)
                loader.wait(60)
            finally:
                if loader.poll() is None:
                    loader.kill()
        first, last = span(args.database_url, schema)
        rows = sum(count(args.database_url, schema, "true", table=f"items_{name}") for name in names
                   if name != "noop")
        return {"rate": (args.n - 1) / (last - first), "rows": rows, "cpu": cpu}
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)
        with psycopg2.connect(args.database_url) as conn, conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def count(url: str, schema: str, where: str, table: str = "messages") -> int:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (f"{schema}.{table}",))
        if cur.fetchone()[0] is None:
            return 0
        cur.execute(f"SELECT COUNT(*) FROM {schema}.{table} WHERE {where}")
        return int(cur.fetchone()[0])


def span(url: str, schema: str) -> tuple[float, float]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT MIN(created_at), MAX(updated_at) FROM {schema}.messages")
        first, last = cur.fetchone()
    return _seconds(first), _seconds(last)


def _seconds(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else datetime.fromisoformat(str(value)).timestamp()


def cpu_text(cpu: dict[str, float]) -> str:
    if not cpu:
        return "too short a run to split its CPU"
    kinds = ("sqapi loader", "plugin workers", "PostgreSQL", "RabbitMQ")
    return "CPU us/msg: " + ", ".join(f"{kind} {cpu.get(kind, 0.0):.0f}" for kind in kinds) + \
        f", all {sum(cpu.values()):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="messages per case (default 2000)")
    parser.add_argument("--writers", type=int, default=1, help="execute_script plugins in the script case")
    parser.add_argument("--database-url", default=os.environ.get("SQAPI_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sqapi-bench-"))
    try:
        (root / "data").mkdir()
        for i in range(args.n):
            (root / "data" / f"f{i:06d}.bin").write_bytes(os.urandom(1024))
        noop = run_case(root, "noop", args)
        print(f"no-op plugin                  {noop['rate']:8.0f} msgs/s  ({cpu_text(noop['cpu'])})", flush=True)
        script = run_case(root, "script", args)
        print(f"{args.writers} execute_script plugin(s)    {script['rate']:8.0f} msgs/s  ({cpu_text(script['cpu'])}; "
              f"{script['rows']} rows written for {args.n} messages)")
        print(f"ratio script / no-op          {script['rate'] / noop['rate']:8.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
