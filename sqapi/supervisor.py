"""Several loader processes under one ``sqapi loader`` (``processing.processes`` / ``--processes``).

``processes: auto`` (the default) means one per CPU, up to four, on RabbitMQ with PostgreSQL,
and 1 otherwise (see :func:`loader_processes`).

One Python process runs its plugins and its share of pika and psycopg2 under one GIL, so a
loader uses about one core however many worker threads it has.  With ``processes: N`` the
``sqapi loader`` command becomes a small supervisor that starts N loader processes -- each the
same command line with ``$SQAPI_LOADER_PROCESS`` set, its own broker connection, database pool
and plugins -- and keeps them running:

* a loader process that exits (crashed, killed) is started again, after a delay that grows
  while they keep dying within ``QUICK_EXIT`` seconds; after ``MAX_QUICK_EXITS`` such exits in
  a row the supervisor stops the rest and exits non-zero (a broken set-up, not bad luck);
* SIGTERM / SIGINT are passed on: each loader process finishes or requeues its in-flight
  messages and exits 0, then the supervisor exits 0;
* a loader process whose supervisor died (SIGKILL) notices within a second and stops the same
  way, so no orphan keeps consuming.

They are competing consumers on one queue, exactly like loaders started by hand; the
status database keeps one row per uuid and runs each plugin's side effect once whichever
process takes a message.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqapi.backoff import exponential

log = logging.getLogger(__name__)

#: set in each loader process's environment: its number (1..N); such a process runs as a plain loader
CHILD_ENV = "SQAPI_LOADER_PROCESS"
#: ... and the supervisor's pid, which the loader process watches (see watch_parent)
PARENT_ENV = "SQAPI_SUPERVISOR_PID"
QUICK_EXIT = 10.0      # seconds: a loader process that exits sooner than this counts as failing to start
MAX_QUICK_EXITS = 5    # in a row: then the supervisor gives up
POLL = 0.2


#: ``processing.processes: auto`` runs at most this many: each process opens its own broker connection and
#: database pool, and a larger machine is better served by a number the operator chose
AUTO_MAX = 4
#: the built-in connector types with which several loader processes share the work well: a RabbitMQ queue
#: (competing consumers) and PostgreSQL (advisory locks); SQLite takes one writer at a time
_SHARED_BROKERS = ("rabbitmq",)
_SHARED_DATABASES = ("postgres", "postgresql")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, so ``taskset`` and cgroup cpusets count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def loader_processes(config: Any) -> int:
    """How many loader processes ``sqapi loader`` runs: ``processing.processes`` as a number.

    ``auto`` (the default) is one per usable CPU, at most :data:`AUTO_MAX`, when the listener is
    RabbitMQ and the status database PostgreSQL -- the set-up where processes share a queue
    well -- and 1 otherwise (SQLite, the spool folder, a connector of your own)."""
    value = (config.get("processing") or {}).get("processes", "auto")
    if value == "auto":
        broker = str((config.get("msg_broker") or {}).get("type") or "")
        database = str((config.get("database") or {}).get("type") or "")
        if broker in _SHARED_BROKERS and database in _SHARED_DATABASES:
            return min(AUTO_MAX, usable_cpus())
        return 1
    return int(value)


def is_loader_process() -> bool:
    return bool(os.environ.get(CHILD_ENV))


def watch_parent(stop: Any, interval: float = 1.0) -> None:
    """In a loader process: call ``stop()`` once the supervisor that started it is gone.

    The supervisor's pid comes from the environment, so a supervisor that died while this process
    was still starting is noticed too (``getppid()`` then already names another process)."""
    try:
        parent = int(os.environ.get(PARENT_ENV) or os.getppid())
    except ValueError:
        parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.warning("the supervisor (pid %d) is gone: stopping this loader process", parent)
        stop()

    threading.Thread(target=watch, name="sqapi-parent-watch", daemon=True).start()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name
        return f"signal {number}"


@dataclass
class _Slot:
    number: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float = 0.0


class Supervisor:
    """Starts ``count`` copies of this command as loader processes and keeps them running until stopped."""

    def __init__(self, count: int, argv: list[str] | None = None) -> None:
        self.count = count
        self.argv = argv if argv is not None else [sys.executable, "-m", "sqapi", *sys.argv[1:]]
        self.slots = [_Slot(number) for number in range(1, count + 1)]
        self.stopping = False
        self.quick_exits = 0
        self.exit_code = 0
        self.on_exit: Callable[[int], None] | None = None  # called with the pid of a loader process that exited

    def running(self) -> list[int]:
        """The pids of the loader processes running now."""
        return [slot.process.pid for slot in self.slots if slot.process is not None and slot.process.poll() is None]

    def _start(self, slot: _Slot) -> None:
        env = dict(os.environ, **{CHILD_ENV: str(slot.number), PARENT_ENV: str(os.getpid())})
        slot.process = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL)
        slot.started = time.monotonic()
        log.info("started loader process %d of %d (pid %d)", slot.number, self.count, slot.process.pid)
        if self.stopping:  # a stop came in while it was being started: stop() did not see it
            slot.process.send_signal(signal.SIGTERM)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Pass ``signum`` on to every running loader process; they finish in-flight work and exit."""
        self.stopping = True
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                try:
                    slot.process.send_signal(signum)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        """Supervise until stopped and every loader process has exited; the exit status for the command."""
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s: stopping %d loader processes", _signal_name(signum), self.count)
            self.stop(signal.SIGTERM)

        if threading.current_thread() is threading.main_thread():  # (signals reach only the main thread)
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        while True:  # the first round starts every slot (restart_at 0)
            now = time.monotonic()
            alive = 0
            for slot in self.slots:
                if slot.process is None:
                    if not self.stopping and now >= slot.restart_at:
                        self._start(slot)
                        alive += 1
                    continue
                code = slot.process.poll()
                if code is None:
                    alive += 1
                    continue
                self._exited(slot, code, now)
            if self.stopping and alive == 0:
                return self.exit_code
            time.sleep(POLL)

    def _exited(self, slot: _Slot, code: int, now: float) -> None:
        assert slot.process is not None
        pid, slot.process = slot.process.pid, None
        if self.on_exit is not None:
            self.on_exit(pid)
        if self.stopping:  # a stop: dying of the stop signal itself (before its handler was set) is normal too
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                self.exit_code = self.exit_code or (code if code > 0 else 1)
            return
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
        if now - slot.started < QUICK_EXIT:
            self.quick_exits += 1
        else:
            self.quick_exits = 0
        if self.quick_exits >= MAX_QUICK_EXITS:
            log.error("loader process %d (pid %d) %s; %d loader processes exited within %gs of starting in a row: "
                      "giving up (see their errors above)", slot.number, pid, how, self.quick_exits, QUICK_EXIT)
            self.exit_code = code if code > 0 else 1
            self.stop()
            return
        delay = exponential(self.quick_exits, 0.5, 30.0) if self.quick_exits else 0.0
        log.warning("loader process %d (pid %d) %s; starting another%s", slot.number, pid, how,
                    f" in {delay:g}s" if delay else "")
        slot.restart_at = now + delay
