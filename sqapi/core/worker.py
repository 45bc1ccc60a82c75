"""The plugin worker process: one plugin, loaded once, called one message at a time.

:class:`~sqapi.core.runner.PluginRunner` starts these (``plugin.isolation: process``, the
default) as ``python -m sqapi.core.worker FD``, a fresh interpreter in the loader's working
directory and environment, and talks to each over a socket (``FD``, framed and pickled by
:class:`multiprocessing.connection.Connection`):

* it sends a :class:`WorkerSpec` first; the worker loads the plugin's module
  and builds its Database from the spec, then answers ``("ready", pid)`` or
  ``("failed", reason)``;
* ``("run", [(seq, call), ...])``: the calls join the worker's queue; it runs them one after the
  other and answers each -- ``("done", seq, result, seconds, ended_at)`` or ``("error", seq,
  reason, retryable, traceback, seconds, ended_at, recycle)`` -- in ``("answers", [...])``: the
  answers of quick calls go together (at most :data:`FLUSH_COUNT`, none held longer than
  :data:`FLUSH_AFTER` seconds, even while the next call runs).  With ``recycle`` (a
  ``MemoryError``) it exits after answering, since its heap may be in no state to go on.  A
  :class:`~sqapi.core.calls.BatchCall` (a plugin with ``execute_batch``) is one call whose
  result is a :class:`~sqapi.core.calls.BatchAnswer`: each item's result, or its error in words;
* ``("withdraw",)``: the calls queued and not yet started are given back at once --
  ``("withdrawn", [seq, ...])`` -- even while a call runs (a reader thread answers);
* ``("stop",)``: it ends after the call it is running; the socket closing ends it at once.

The worker ignores SIGINT and SIGTERM (Ctrl-C and a loader's SIGTERM reach the whole process
group; the runner stops its workers once in-flight calls have ended), and ends as soon as its
loader is gone -- even in the middle of a call that never returns -- so no worker outlives the
loader.  ``plugin.max_memory`` becomes the
worker's ``RLIMIT_DATA``: an allocation past it raises ``MemoryError`` in Python code, or kills
a C library's process -- either way the call is recorded as the plugin's failure.
"""

from __future__ import annotations

import collections
import importlib
import logging
import os
import pickle
import resource
import signal
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sqapi import logs
from sqapi.core.calls import BatchAnswer, BatchCall
from sqapi.core.hooks import call_hook, run_execute, run_execute_batch
from sqapi.errors import describe_error, is_retryable

log = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    """Everything a worker needs to load one plugin as the loader did."""

    name: str
    directory: str | None           # the plugin's folder, or None for an entry point
    entry_point: str | None         # ``module:attr`` of an entry-point plugin
    config: dict[str, Any]          # the plugin's merged config (a Config)
    database: dict[str, Any] | None  # its Database's section, ``type`` included; None: no database
    max_memory: int | None          # bytes (RLIMIT_DATA)
    sys_path: list[str] = field(default_factory=list)  # the loader's: an installed plugin imports as there
    log_level: str = "INFO"
    json_logs: bool = False
    secrets: list[str] = field(default_factory=list)


def main(conn: Connection) -> None:
    """The worker process's life: the spec, the plugin loaded, then calls until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    try:
        spec: WorkerSpec = conn.recv()
    except (EOFError, OSError):
        return
    from sqapi.config import secret_values

    # the loader's secrets, and this plugin's own (from its config.yml) even where the loader did not add them
    logs.configure(spec.log_level, spec.json_logs).add([*spec.secrets, *secret_values(spec.config)])
    sys.path[:] = spec.sys_path or sys.path
    if spec.max_memory:
        resource.setrlimit(resource.RLIMIT_DATA, (spec.max_memory, spec.max_memory))
    from sqapi.config import Config

    config = spec.config if isinstance(spec.config, Config) else Config(spec.config)
    try:
        module = _load_module(spec)
        database = _make_database(spec)
        set_up = call_hook(module, "setup", config=config, database=database)
    except BaseException as exc:  # anything the plugin's import, its database or its setup raised: the loader says it
        conn.send(("failed", describe_error(exc)))
        return
    conn.send(("ready", os.getpid()))
    try:
        _serve(conn, spec, config, module, database)
    finally:
        try:
            if set_up:
                call_hook(module, "teardown", config=config, database=database)
        except BaseException:  # a teardown that fails costs nothing but its log line
            logging.getLogger(__name__).exception("plugin %s: teardown failed", spec.name)
        if database is not None:
            database.close()


class _Inbox:
    """Calls received and not yet started.  A reader thread fills it while the main thread runs calls, so the
    loader can take back calls queued behind a slow one (``withdraw``) while it runs."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.calls: collections.deque[tuple[int, Any]] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.send_lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self.send_lock:
            self.conn.send(message)

    def read(self) -> None:
        """The reader thread: calls in, withdrawals answered at once, stop or a closed socket ends the worker."""
        while True:
            try:
                request = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the loader is gone: nothing to answer to, whatever the main thread is doing
            if request[0] == "run":
                with self.cond:
                    self.calls.extend(request[1])
                    self.cond.notify()
            elif request[0] == "withdraw":
                with self.cond:
                    taken = [seq for seq, _call in self.calls]
                    self.calls.clear()
                self.send(("withdrawn", taken))
            else:
                with self.cond:
                    self.stopping = True
                    self.cond.notify()
                return

    def send_all(self, replies: list[tuple[Any, ...]]) -> None:
        try:
            self.send(("answers", replies))
        except (pickle.PicklingError, TypeError, AttributeError, ValueError, RecursionError):
            # a result that does not pickle fails its call; the others go back as they are
            self.send(("answers", [_picklable(reply) for reply in replies]))

    def next(self) -> tuple[int, Any] | None:
        """The next call, waiting for one; ``None`` once told to stop."""
        with self.cond:
            while not self.calls and not self.stopping:
                self.cond.wait()
            return self.calls.popleft() if self.calls else None

    def next_nowait(self) -> tuple[int, Any] | None:
        with self.cond:
            return self.calls.popleft() if self.calls and not self.stopping else None


#: answers of quick calls go back together: at most FLUSH_COUNT at once, none held longer than FLUSH_AFTER seconds
#: (a flusher thread sends them even while the next call runs), all of them as soon as no call waits
FLUSH_COUNT = 32
FLUSH_AFTER = 0.002


class _Outbox:
    """Answers held for a moment, so that a batch of quick calls costs a few messages instead of one per call."""

    def __init__(self, inbox: _Inbox) -> None:
        self.inbox = inbox
        self.held: list[tuple[Any, ...]] = []
        self.since = 0.0
        self.cond = threading.Condition()

    def add(self, reply: tuple[Any, ...]) -> None:
        with self.cond:
            if not self.held:
                self.since = time.monotonic()
                self.cond.notify()
            self.held.append(reply)
            if len(self.held) >= FLUSH_COUNT:
                self._send()

    def flush(self) -> None:
        with self.cond:
            self._send()

    def _send(self) -> None:
        if self.held:
            held, self.held = self.held, []
            self.inbox.send_all(held)

    def run(self) -> None:
        """The flusher thread: nothing stays held longer than FLUSH_AFTER, whatever the main thread is running."""
        with self.cond:
            while True:
                if not self.held:
                    self.cond.wait()
                    continue
                due = self.since + FLUSH_AFTER - time.monotonic()
                if due <= 0:
                    self._send()
                else:
                    self.cond.wait(due)


def _serve(conn: Connection, spec: WorkerSpec, config: Any, module: types.ModuleType, database: Any) -> None:
    """Run the calls as they come, one at a time.

    A call that hangs finds the answers of the calls before it sent within FLUSH_AFTER (the
    flusher thread), so the loader blames the right one; a crash can take answers held with it,
    which the loader knows (several calls unanswered) and sorts out by running those calls one by
    one."""
    inbox = _Inbox(conn)
    outbox = _Outbox(inbox)
    threading.Thread(target=inbox.read, name="sqapi-worker-reader", daemon=True).start()
    threading.Thread(target=outbox.run, name="sqapi-worker-flusher", daemon=True).start()
    while True:
        job = inbox.next_nowait()
        if job is None:  # no call waits: send what is held before waiting for one
            outbox.flush()
            job = inbox.next()
            if job is None:
                return
        seq, call = job
        started = time.monotonic()
        recycle = False
        try:
            if isinstance(call, BatchCall):  # execute_batch: one outcome per item, errors as words
                result: Any = BatchAnswer([_item_answer(outcome) for outcome in
                                           run_execute_batch(module, config, database, call)])
            else:
                result = run_execute(module, config, database, call)
            reply: tuple[Any, ...] = ("done", seq, result, time.monotonic() - started, time.monotonic())
        except BaseException as exc:  # SystemExit too: a plugin calling sys.exit() fails, the worker goes on
            recycle = isinstance(exc, MemoryError)
            reason = describe_error(exc)
            if recycle and spec.max_memory:
                reason = f"MemoryError (over plugin.max_memory, {spec.max_memory // (1 << 20)} MiB)"
            reply = ("error", seq, logs.abbreviate(reason), is_retryable(exc), _traceback(exc),
                     time.monotonic() - started, time.monotonic(), recycle)
        outbox.add(reply)
        if recycle:
            outbox.flush()
            return


def _item_answer(outcome: Any) -> tuple[Any, ...]:
    """One item's outcome of an ``execute_batch``, as it goes back: an exception as its reason and traceback."""
    if isinstance(outcome, BaseException):
        return ("error", logs.abbreviate(describe_error(outcome)), is_retryable(outcome), _traceback(outcome))
    return ("done", outcome)


def _traceback(exc: BaseException) -> str:
    return logs.abbreviate("".join(traceback.format_exception(exc)), logs.MAX_TRACEBACK_CHARS)


def _picklable(reply: tuple[Any, ...]) -> tuple[Any, ...]:
    try:
        pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        return reply
    except Exception as exc:
        if reply[0] == "done" and isinstance(reply[2], BatchAnswer):  # only the items that do not pickle fail
            answer = BatchAnswer([_picklable_item(outcome) for outcome in reply[2].outcomes])
            return (*reply[:2], answer, *reply[3:])
        return ("error", reply[1], f"its result cannot be handed back: {describe_error(exc)}", False, "", reply[3],
                reply[4], False)


def _picklable_item(outcome: tuple[Any, ...]) -> tuple[Any, ...]:
    try:
        pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        return outcome
    except Exception as exc:
        return ("error", f"its result cannot be handed back: {describe_error(exc)}", False, "")


def _load_module(spec: WorkerSpec) -> types.ModuleType:
    if spec.directory is not None:
        from sqapi.core.plugin_parts import import_plugin_folder

        return import_plugin_folder(spec.name, Path(spec.directory))
    assert spec.entry_point is not None
    module_name, _, attr = spec.entry_point.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def _make_database(spec: WorkerSpec) -> Any:
    if spec.database is None:
        return None
    from sqapi import registry

    # connects on first use (its init script ran in the loader); one thread calls the plugin, one call at a
    # time: one connection, kept
    return registry.database(dict(spec.database), pinned=True)


def _die_with_parent(interval: float = 0.5) -> None:
    """End this process (at once, whatever it is running) as soon as the loader that started it is gone.

    A watcher thread, not ``PR_SET_PDEATHSIG``: that signal follows the loader's *thread* that
    started the worker, and loader threads come and go."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(70)

    threading.Thread(target=watch, name="sqapi-parent-watch", daemon=True).start()


if __name__ == "__main__":
    main(Connection(int(sys.argv[1])))
