#!/usr/bin/env python3
"""The cost of one plugin call, by ``plugin.isolation``: a worker process against the loader's own threads.

    .venv/bin/python bench/plugin_calls.py            # 5,000 calls per case
    .venv/bin/python bench/plugin_calls.py -n 20000

A no-op plugin is loaded as the loader loads it (sqapi's builder, on the embedded PostgreSQL in
a temporary folder), then :meth:`PluginRunner.run` -- what the processor calls for each plugin
of a batch -- runs it over batches of 1 and of 100 calls:

* ``process``: the default, a call at a time on the plugin's worker process(es);
* ``thread``: ``isolation: thread`` with a timeout, each batch on a reused daemon thread;
* ``inline``: ``isolation: thread`` without a timeout, on the caller's thread (no isolation at all).

Printed per case: wall-clock microseconds per call, and CPU microseconds per call of the
caller plus its worker processes (user + system, from /proc).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

NOOP = "def execute(config, database, message, metadata, data):\n    return None\n"


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def children(pid: int) -> list[int]:
    """Descendants of ``pid`` (the fork server and the workers it forked)."""
    try:
        direct = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return direct + [d for child in direct for d in children(child)]


def measure(root: Path, isolation: str, timeout: float, batch: int, n: int) -> tuple[float, float]:
    from sqapi.app import build
    from sqapi.config import load_config
    from sqapi.core.message import Message
    from sqapi.core.runner import Call

    folder = root / "plugins" / "noop"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text(NOOP)
    plugin_section = {"timeout": timeout} if isolation == "process" else \
        {"timeout": timeout, "thread_safe": True, "isolation": "thread"}
    (folder / "config.yml").write_text(yaml.safe_dump({"plugin": plugin_section}))
    (root / "data.bin").write_bytes(os.urandom(1024))
    (root / "sqapi.yml").write_text(yaml.safe_dump({"active_plugins": ["noop"], "plugin_dirs": [str(root / "plugins")],
                                                    "database": {"embedded": {"directory": str(root / "pg")}}}))
    app = build(load_config(root / "sqapi.yml"))
    try:
        plugin = app.plugins.plugins["noop"]
        calls = [Call(Message(id=f"d{i}", uuid=f"u{i}", data_location="data.bin", body={"n": i},
                              metadata={"n": i, "source": "bench"}), {"n": i, "source": "bench"},
                      str(root / "data.bin")) for i in range(batch)]
        app.processor.runner.run(plugin, calls, lambda: None)  # warm: the worker started, the plugin imported
        me = os.getpid()
        before = {pid: cpu_ticks(pid) for pid in [me, *children(me)]}
        started = time.perf_counter()
        for _ in range(n // batch):
            app.processor.runner.run(plugin, calls, lambda: None)
        wall = time.perf_counter() - started
        after = {pid: cpu_ticks(pid) for pid in [me, *children(me)]}
        ticks = sum(after[pid] - before.get(pid, 0) for pid in after)
        done = (n // batch) * batch
        return wall / done * 1e6, ticks / os.sysconf("SC_CLK_TCK") / done * 1e6
    finally:
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="calls per case (default 5000)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sqapi-bench-calls-"))
    os.chdir(root)
    try:
        print(f"{'isolation':<10} {'batch':>5} {'wall us/call':>13} {'CPU us/call':>12}")
        for isolation, timeout in (("process", 300.0), ("thread", 300.0), ("inline", 0.0)):
            for batch in (1, 100):
                case = root / f"{isolation}-{batch}"
                case.mkdir()
                wall, cpu = measure(case, "process" if isolation == "process" else "thread", timeout, batch, args.n)
                print(f"{isolation:<10} {batch:>5} {wall:13.1f} {cpu:12.1f}", flush=True)
    finally:
        os.chdir("/")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
