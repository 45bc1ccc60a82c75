"""Benchmark: messages/s through the processor alone (no broker): disk data, one no-op plugin.

    .venv/bin/python bench/embedded_process.py [--messages 5000] [--workers 4]
    .venv/bin/python bench/embedded_process.py --batch-size 32 --workers 1 \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres

Prints msgs/s for processing and for redeliveries of the same messages (already DONE: no
plugin runs).  Without ``--batch-size``, threads call ``Processor.process`` one message at a
time, as the spool listener does; with it, ``Processor.process_batch`` takes that many at once,
as the RabbitMQ listener does.  Status goes to SQLite, or to PostgreSQL with ``--database-url``
(in a fresh schema, dropped at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqapi.app import build
from sqapi.config import load_config
from sqapi.core.outcome import Delivery, Outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=0, help="0: one message per call (default)")
    parser.add_argument("--database-url", help="record status in PostgreSQL instead of SQLite")
    args = parser.parse_args()
    schema = f"sqapi_bench_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        plugin = root / "plugins" / "noop"
        plugin.mkdir(parents=True)
        (plugin / "__init__.py").write_text(
            "def execute(config, database, message, metadata, data):\n    return None\n")
        payload = os.urandom(1024)
        for i in range(args.messages):
            (root / "data" / f"{i}.bin").write_bytes(payload[:-8] + i.to_bytes(8, "big"))
        database: dict[str, Any] = {"type": "sqlite", "path": str(root / "bench.db")}
        if args.database_url:
            database = {"type": "postgres", "url": args.database_url, "schema": schema}
        config_path = root / "bench.yml"
        config_path.write_text(json.dumps({
            "data_store": {"type": "disk", "base_dir": str(root / "data")},
            "database": database,
            "plugin_dirs": [str(root / "plugins")], "active_plugins": ["noop"],
            "msg_broker": {"type": "directory", "directory": str(root / "spool")},
        }))
        app = build(load_config(config_path))
        try:
            bodies = [json.dumps({"uuid_ref": f"bench-{i}", "data_location": f"{i}.bin",
                                  "data_type": "application/x-bench", "metadata": {"i": i}}).encode()
                      for i in range(args.messages)]
            size = args.batch_size

            def batch(chunk: list[bytes]) -> list[Outcome]:
                return app.processor.process_batch([(b, Delivery("bench")) for b in chunk])

            for label in ("process", "redeliver (already DONE)"):
                started, cpu = time.perf_counter(), time.process_time()
                with ThreadPoolExecutor(args.workers) as pool:
                    if size:
                        chunks = [bodies[i:i + size] for i in range(0, len(bodies), size)]
                        outcomes = [o for done in pool.map(batch, chunks) for o in done]
                    else:
                        outcomes = list(pool.map(lambda b: app.process(b, Delivery("bench")), bodies))
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
                done = sum(o.status == "DONE" for o in outcomes)
                how = f"batches of {size}" if size else "one per call"
                print(f"{label:<26} {args.messages} messages in {seconds:6.2f}s = "
                      f"{args.messages / seconds:8.0f} msgs/s, {cpu * 1e6 / args.messages:4.0f} us CPU/msg here "
                      f"({done} DONE, {args.workers} workers, {how}, {database['type']})",
                      flush=True)
        finally:
            if args.database_url:
                app.database.execute_query(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            app.close()


if __name__ == "__main__":
    main()
