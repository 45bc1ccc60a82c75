"""Where plugin calls run: worker processes by default, which gives sqAPI's semantics.

The processor hands :meth:`PluginRunner.run` a plugin and the calls of a batch, and gets one
``(result, error, seconds)`` per call back, in order.  How a plugin runs is its
``plugin.isolation``:

``process`` (the default)
    Each plugin has a pool of worker processes of its own (:mod:`sqapi.core.worker`), started
    on first use (or ahead, by :meth:`PluginRunner.prestart`) and reused.  A worker runs one call
    at a time, so a plugin written for sqAPI never has two calls running at once in one
    interpreter: a library that is not thread-safe gives the same answers under load as one
    call at a time.  A pool grows, while calls wait, up to ``plugin.concurrency`` workers
    (default: ``processing.workers``).  A worker that crashes (a segfault, ``os.abort()``) fails
    the call it was running; a call past ``plugin.timeout`` has its worker killed (SIGKILL); a
    ``MemoryError`` past ``plugin.max_memory`` retires its worker.  Each is recorded as that
    plugin's failure with its reason, the calls after it go to a fresh worker, and the loader
    keeps going with nothing left behind.
``thread``
    Only for a plugin whose ``config.yml`` says ``thread_safe: true``: calls run on the loader's
    own threads, several at once, with no process boundary (the cheapest, and no protection: a
    crash takes the loader with it, and a call past its timeout is abandoned, not stopped --
    Python cannot kill a thread).

A batch's calls to one plugin go to one worker in one message; the worker answers each call as
it ends, so a timeout is counted per call and a crash costs only the call that caused it.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing.connection
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from sqapi import logs
from sqapi.core.message import Message
from sqapi.core.plugins import PROCESS, Plugin, PluginSet, call_hook
from sqapi.core.worker import WorkerSpec
from sqapi.errors import PluginFailed, PluginTimeout

log = logging.getLogger(__name__)

#: seconds a new worker may take to import its plugin and answer
WORKER_START_TIMEOUT = 120.0
#: seconds a stopping worker gets to close its database before it is killed
WORKER_STOP_TIMEOUT = 5.0


@dataclass
class Call:
    """One plugin call's private arguments: its own copies of the message and metadata, and the data's path."""

    message: Message
    metadata: dict[str, Any]
    path: str


#: a plugin call's result, error and duration (seconds)
Ran = tuple[Any, BaseException | None, float]


class PluginRunner:
    """Runs plugin calls as each plugin's ``isolation`` says; owns the worker processes and threads."""

    def __init__(self, plugins: PluginSet, workers: int = 4) -> None:
        self.plugins = plugins
        self.default_concurrency = max(1, workers)
        self._pools: dict[str, WorkerPool] = {}
        self._pools_lock = threading.Lock()
        self._threads = ThreadCalls()
        self._closed = False
        self._set_up_lock = threading.Lock()
        self._set_up_done: dict[str, Plugin | None] = {}  # plugins on threads whose setup ran (None: it has none)

    @property
    def overdue(self) -> dict[str, int]:
        """Plugin name -> calls on the loader's threads still running past their timeout (``isolation: thread``)."""
        return self._threads.overdue

    def inline(self, plugin: Plugin) -> bool:
        """Whether a call of ``plugin`` runs on the caller's thread (which then cannot do anything meanwhile)."""
        return plugin.isolation != PROCESS and not plugin.timeout

    def prestart(self) -> None:
        """Start one worker of every active process-isolated plugin now, all at once, and wait until they are ready,
        so that the first messages do not wait for a plugin's imports.  A worker that cannot start is left for
        the first call to report."""
        threads = [threading.Thread(target=self._pool(plugin).warm, name=f"sqapi-warm-{plugin.name}", daemon=True)
                   for plugin in self.plugins.active if plugin.isolation == PROCESS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WORKER_START_TIMEOUT)

    def run(self, plugin: Plugin, calls: list[Call], on_slow: Callable[[], None]) -> list[Ran]:
        """Run ``plugin`` once per call, in order; ``(result, error, seconds)`` for each, never raising.

        ``on_slow`` is called once, from this thread, when the calls have taken
        :data:`SLOW_AFTER` seconds and are not done (the processor then records PROCESSING).
        """
        if not calls:
            return []
        if plugin.isolation == PROCESS:
            try:
                pool = self._pool(plugin)
            except RuntimeError as exc:  # closed: sqapi is stopping
                return [(None, PluginFailed(f"plugin {plugin.name}: {exc}", retryable=True), 0.0)] * len(calls)
            return pool.run(calls, on_slow)
        failed = self._set_up(plugin)
        if failed is not None:
            return [(None, failed, 0.0)] * len(calls)
        return self._threads.run(plugin, calls, on_slow)

    def _set_up(self, plugin: Plugin) -> BaseException | None:
        """A plugin on the loader's threads: its ``setup`` hook once in this process, before its first call.
        A setup that raises fails this batch's calls (to be retried) and is tried again with the next."""
        if plugin.name in self._set_up_done:  # every batch after the first: no lock on the way to the call
            return None
        with self._set_up_lock:
            if plugin.name in self._set_up_done:
                return None
            try:
                if call_hook(plugin.module, "setup", config=plugin.config, database=plugin.database):
                    self._set_up_done[plugin.name] = plugin
                else:
                    self._set_up_done[plugin.name] = None
            except Exception as exc:
                log.warning("plugin %s: setup failed: %s", plugin.name, exc)
                return PluginFailed(f"setup failed: {type(exc).__name__}: {exc}", retryable=True)
        return None

    def close(self) -> None:
        """Stop every worker (idle ones at once; a call still running is not waited for), and tear down the
        plugins set up on the loader's threads."""
        with self._pools_lock:
            self._closed = True
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
        with self._set_up_lock:
            set_up, self._set_up_done = [p for p in self._set_up_done.values() if p is not None], {}
        for plugin in set_up:
            try:
                call_hook(plugin.module, "teardown", config=plugin.config, database=plugin.database)
            except Exception:
                log.exception("plugin %s: teardown failed", plugin.name)

    def _pool(self, plugin: Plugin) -> WorkerPool:
        with self._pools_lock:
            pool = self._pools.get(plugin.name)
            if pool is None:
                if self._closed:
                    raise RuntimeError("the plugin runner is closed")
                pool = WorkerPool(plugin, plugin.concurrency or self.default_concurrency)
                self._pools[plugin.name] = pool
            return pool


#: seconds calls run before ``on_slow`` is called, and before the calls queued behind a call still running are
#: handed to other workers
SLOW_AFTER = 0.2
#: a plugin whose recent calls took less than this (seconds, on average) gets a batch's calls in shares
QUICK_CALL = 0.005
#: calls sent to a worker at once, at most
MAX_SHARE = 256
#: seconds between looks for a free worker while calls of a batch wait and every worker is busy
PENDING_POLL = 0.05
#: a worker that crashed having used this share of its plugin.max_memory or more says so (an allocation that
#: failed at the cap makes a C library abort; the worker's peak is what it held before the one that failed)
NEAR_MEMORY_CAP = 0.5


# -- worker processes ------------------------------------------------------------------------------
class _Worker:
    """A worker process (``python -m sqapi.core.worker``) and the loader's end of its socket."""

    def __init__(self, process: subprocess.Popen[bytes], conn: Connection) -> None:
        self.process = process
        self.conn = conn

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class _Busy:
    """A call running on a worker: which, and since when."""

    worker: _Worker
    index: int
    started: float


class WorkerPool:
    """The worker processes of one plugin: at most ``size``, each running one call at a time."""

    def __init__(self, plugin: Plugin, size: int) -> None:
        self.plugin = plugin
        self.size = size
        self._idle: list[_Worker] = []
        self._count = 0  # started (or starting) and not yet discarded
        self._cond = threading.Condition()
        self._closed = False
        self.call_seconds = 0.0  # recent calls' duration, averaged: quick plugins get calls in shares

    # -- workers in and out -------------------------------------------------------------------
    def warm(self) -> None:
        """Have one worker ready (errors are left for the first call to report)."""
        try:
            worker = self._acquire()
        except Exception:
            return
        self._release(worker)

    def _acquire(self) -> _Worker:
        """A worker, waiting for one when every worker is busy and the pool is full.  For a quick plugin, a new
        worker starts only when none came free within :data:`SLOW_AFTER`: a quick call frees its worker soon,
        and starting one costs an interpreter and the plugin's imports."""
        waited_since = time.monotonic()
        with self._cond:
            while True:
                if self._closed:
                    raise PluginFailed(f"plugin {self.plugin.name}: sqapi is stopping", retryable=True)
                if self._idle:
                    return self._idle.pop()
                patient = self._count > 0 and self.quick() and time.monotonic() - waited_since < SLOW_AFTER
                if self._count < self.size and not patient:
                    self._count += 1
                    break
                self._cond.wait(SLOW_AFTER if patient else None)
        return self._start_counted()

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
        self._stop(worker)

    def _discard(self, worker: _Worker) -> None:
        """Kill ``worker`` (if it still runs) and free its place for a fresh one."""
        _kill(worker)
        with self._cond:
            self._count -= 1
            self._cond.notify()

    def _start(self) -> _Worker:
        """A fresh interpreter for this plugin (never a fork of the loader, with its threads and connections)."""
        ours, theirs = socket.socketpair()
        try:
            # a session of its own: a kill reaches the programs the plugin started too (see _kill)
            process = subprocess.Popen([sys.executable, "-m", "sqapi.core.worker", str(theirs.fileno())],
                                       pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(),
                                       cwd=os.getcwd(), env=dict(os.environ), start_new_session=True)
        except OSError as exc:
            ours.close()
            raise PluginFailed(f"its worker process could not start: {exc.strerror or exc}", retryable=True) from None
        finally:
            theirs.close()
        parent = Connection(ours.detach())
        worker = _Worker(process, parent)
        try:
            parent.send(_spec_of(self.plugin))
            if not parent.poll(WORKER_START_TIMEOUT):
                raise PluginFailed(f"its worker process did not start within {WORKER_START_TIMEOUT:g}s",
                                   retryable=True)
            answer = parent.recv()
        except (EOFError, OSError):
            _wait(process)
            _kill(worker)
            raise PluginFailed(f"its worker process {_ended(process)} while loading the plugin", retryable=True) \
                from None
        except BaseException:
            _kill(worker)
            raise
        if answer[0] != "ready":
            _kill(worker)
            raise PluginFailed(f"its worker process could not load the plugin: {answer[1]}", retryable=True)
        log.debug("plugin %s: worker process %s started", self.plugin.name, process.pid)
        return worker

    def _take(self, grow: bool) -> _Worker | None:
        """An idle worker, or (``grow``) a new one while the pool is below its size; ``None`` when neither."""
        with self._cond:
            if self._closed:
                raise PluginFailed(f"plugin {self.plugin.name}: sqapi is stopping", retryable=True)
            if self._idle:
                return self._idle.pop()
            if not grow or self._count >= self.size:
                return None
            self._count += 1
        return self._start_counted()

    def _start_counted(self) -> _Worker:
        """Start a worker in the place already counted for it; the place is given back if it cannot start."""
        try:
            return self._start()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    # -- calls ---------------------------------------------------------------------------------
    def run(self, calls: list[Call], on_slow: Callable[[], None]) -> list[Ran]:
        """Run the calls on this plugin's workers, each worker one call at a time; their results in order.

        A plugin whose calls are quick gets them in shares (a few messages for a whole batch, one
        answer per call); a slow one gets them one at a time.  Nothing waits long behind a slow
        call: once a call has run :data:`SLOW_AFTER` seconds, the calls queued behind it on its
        worker are taken back and handed to idle workers, and the pool grows (up to its size).
        """
        return _Batch(self, calls, on_slow).run()

    def quick(self) -> bool:
        return self.call_seconds < QUICK_CALL

    def noted(self, seconds: float) -> None:
        """A call's duration, into the moving average."""
        self.call_seconds += (seconds - self.call_seconds) * 0.2

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for worker in idle:
            self._stop(worker)

    def _stop(self, worker: _Worker) -> None:
        try:
            worker.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        _wait(worker.process)
        _kill(worker)


class _Assigned:
    """What one worker is doing for a batch: the calls sent to it, unfinished, in order."""

    def __init__(self, worker: _Worker, started: float) -> None:
        self.worker = worker
        self.queue: collections.deque[int] = collections.deque()
        self.head_started = started  # when the call at the head of the queue started (or was sent)
        self.withdrawing = False


class _Batch:
    """One :meth:`WorkerPool.run`: hands calls out, takes answers in, kills what runs past its timeout."""

    def __init__(self, pool: WorkerPool, calls: list[Call], on_slow: Callable[[], None]) -> None:
        self.pool = pool
        self.calls = calls
        self.on_slow = on_slow
        self.ran: list[Ran | None] = [None] * len(calls)
        self.pending = collections.deque(range(len(calls)))
        self.assigned: dict[Connection, _Assigned] = {}
        self.timeout = float(pool.plugin.timeout) if pool.plugin.timeout else None
        self.slow_at = time.monotonic() + SLOW_AFTER
        self.can_grow = True
        self.careful = False  # after a crash that could not be pinned on one call: one call per worker at a time

    def run(self) -> list[Ran]:
        try:
            while self.pending or self.assigned:
                self._hand_out()
                if self.assigned:
                    self._take_in()
        finally:
            for job in self.assigned.values():  # only when interrupted: their calls' outcome is unknown
                self.pool._discard(job.worker)
        return [r if r is not None else (None, PluginFailed("not run", retryable=True), 0.0) for r in self.ran]

    # -- out -----------------------------------------------------------------------------------
    def _slow(self, now: float) -> bool:
        return any(job.queue and now - job.head_started >= SLOW_AFTER for job in self.assigned.values())

    def _hand_out(self) -> None:
        """Give waiting calls to workers: idle ones, a new one when nothing runs yet or what runs is slow."""
        while self.pending:
            slow = self._slow(time.monotonic())
            try:
                if not self.assigned:
                    worker: _Worker | None = self.pool._acquire()  # waits while other batches use every worker
                else:
                    worker = self.pool._take(grow=self.can_grow and (slow or not self.pool.quick()))
            except PluginFailed as exc:
                if self.assigned:  # the workers running go on; no more of them
                    self.can_grow = False
                    return
                for index in self.pending:
                    self.ran[index] = (None, exc, 0.0)
                self.pending.clear()
                return
            if worker is None:
                return
            self._send(_Assigned(worker, time.monotonic()))

    def _share(self) -> int:
        """How many calls a worker gets at once: quick calls in shares of what waits, slow ones one by one."""
        if self.careful or not self.pool.quick() or self._slow(time.monotonic()):
            return 1
        workers = max(1, len(self.assigned) + 1)
        return max(1, min(MAX_SHARE, -(-len(self.pending) // workers)))

    def _send(self, job: _Assigned) -> None:
        share = [self.pending.popleft() for _ in range(min(self._share(), len(self.pending)))]
        try:
            job.worker.conn.send(("run", [(index, self.calls[index]) for index in share]))
        except (OSError, ValueError):  # it died while idle: none of these ran; another worker takes them
            self.pending.extendleft(reversed(share))
            self.pool._discard(job.worker)
            return
        if not job.queue:
            job.head_started = time.monotonic()
        job.queue.extend(share)
        self.assigned[job.worker.conn] = job

    # -- in ------------------------------------------------------------------------------------
    def _take_in(self) -> None:
        """Wait for answers (or for the next thing to do: a timeout, a call to take back, a worker to come free)."""
        now = time.monotonic()
        wakes = [self.slow_at]
        for job in self.assigned.values():
            if not job.queue:
                continue  # only a withdrawal's answer to come: wait for it
            if self.timeout is not None:
                wakes.append(job.head_started + self.timeout)
            take_back = len(job.queue) > 1 and not job.withdrawing
            if (take_back or self.pending) and job.head_started + SLOW_AFTER > now:
                wakes.append(job.head_started + SLOW_AFTER)
        if self.pending:  # a worker another batch frees, or one to start: look again soon
            wakes.append(now + PENDING_POLL)
        wake = min(wakes)
        ready = multiprocessing.connection.wait(list(self.assigned), None if wake == float("inf")
                                                else max(0.0, wake - now))
        for conn in ready:
            job = self.assigned[conn]  # type: ignore[index]
            self._answers(job)
        now = time.monotonic()
        for job in list(self.assigned.values()):
            if self.timeout is not None and job.queue and now >= job.head_started + self.timeout:
                self._timed_out(job)
            elif len(job.queue) > 1 and not job.withdrawing and now - job.head_started >= SLOW_AFTER:
                try:  # the calls behind a slow one go back, to be handed to other workers
                    job.worker.conn.send(("withdraw",))
                    job.withdrawing = True
                except (OSError, ValueError):
                    pass  # it is dying: its answers (or their absence) will say
        if now >= self.slow_at and (self.pending or self.assigned):
            self.on_slow()
            self.slow_at = float("inf")

    def _answers(self, job: _Assigned) -> None:
        """Every answer the worker has sent so far (without waiting for more)."""
        while True:
            try:
                message = job.worker.conn.recv()
            except Exception:  # the socket closed (the worker died), or what came is not an answer
                self._lost(job)
                return
            if message[0] == "withdrawn":
                taken = set(message[1])
                job.queue = collections.deque(i for i in job.queue if i not in taken)
                self.pending.extendleft(sorted(taken, reverse=True))
                job.withdrawing = False
            else:
                for answer in message[1]:
                    kind, index = answer[0], answer[1]
                    if job.queue and job.queue[0] == index:
                        job.queue.popleft()
                    self.ran[index] = _ran_of(answer)
                    self.pool.noted(answer[3] if kind == "done" else answer[5])
                    job.head_started = answer[4] if kind == "done" else answer[6]
                    if kind == "error" and answer[7]:  # retired (MemoryError): it exits by itself
                        self._give_back(job)
                        self.pool._discard(job.worker)
                        return
            if not job.queue:
                self._finished(job)
                return
            if not job.worker.conn.poll(0):
                return

    def _finished(self, job: _Assigned) -> None:
        """A worker whose calls are all answered: more calls if any wait, else back to the pool."""
        del self.assigned[job.worker.conn]
        if self.pending and not job.withdrawing:
            job.head_started = time.monotonic()
            self._send(job)
        elif not job.withdrawing:
            self.pool._release(job.worker)
        else:  # a withdrawal is on its way back: wait for its answer (it gives nothing, the queue was empty)
            self.assigned[job.worker.conn] = job

    def _lost(self, job: _Assigned) -> None:
        """The worker died during its call: that call crashed with it; the calls behind it go to another worker."""
        peak = _reap(job.worker.process)
        ended = _ended(job.worker.process)
        cap = self.pool.plugin.max_memory
        if cap and peak is not None and peak >= cap * NEAR_MEMORY_CAP:  # a C library aborts when malloc fails
            ended += f", having used {peak >> 20} MiB of its {cap >> 20} MiB memory limit (plugin.max_memory)"
        log.warning("plugin %s: worker process %s %s", self.pool.plugin.name, job.worker.pid, ended)
        self._blame(job, PluginFailed(f"its worker process {ended} during the call", retryable=True))

    def _timed_out(self, job: _Assigned) -> None:
        assert self.timeout is not None
        log.warning("plugin %s: a call ran past its timeout of %gs: killing worker process %s",
                    self.pool.plugin.name, self.timeout, job.worker.pid)
        # The worker runs its calls in order and sends a finished call's answer within FLUSH_AFTER even while
        # the next one runs, so the oldest unanswered call is the one that ran this long: blamed alone, even
        # when the calls queued behind it were not taken back in time (a loaded machine); they go back.
        self._blame(job, PluginTimeout(f"timed out after {self.timeout:g}s (its worker process was killed)"),
                    running_known=True)

    def _blame(self, job: _Assigned, error: BaseException, running_known: bool = False) -> None:
        """Record ``error`` for the call the lost worker was running, and give the others back.

        With several calls unanswered after a crash, which one it was running is not known for
        sure -- the worker may have held the answers of calls it had finished -- so none is blamed:
        they all go back, and the rest of the batch runs one call per worker at a time, where a
        crash or a hang can only be the call's own.  ``running_known``: it is the oldest unanswered
        one (a timeout: the worker was alive to send every earlier answer)."""
        self.pool._discard(job.worker)
        if len(job.queue) == 1 or (running_known and job.queue):
            head = job.queue.popleft()
            self.ran[head] = (None, error, time.monotonic() - job.head_started)
        elif job.queue:
            self.careful = True
            log.warning("plugin %s: %d calls were unanswered; running them one at a time to find the one at fault",
                        self.pool.plugin.name, len(job.queue))
        self._give_back(job)

    def _give_back(self, job: _Assigned) -> None:
        """The calls a lost worker had not started, back to wait for another."""
        self.assigned.pop(job.worker.conn, None)
        self.pending.extendleft(reversed(job.queue))
        job.queue.clear()


def _ran_of(answer: tuple[Any, ...]) -> Ran:
    if answer[0] == "done":
        _kind, _index, result, seconds, _ended_at = answer
        return result, None, seconds
    _kind, _index, reason, retryable, details, seconds, _ended_at, _recycle = answer
    return None, PluginFailed(reason, retryable, details), seconds


def _reap(process: subprocess.Popen[bytes]) -> int | None:
    """Reap a worker whose socket closed (killed first if it has not ended within WORKER_STOP_TIMEOUT); the most
    memory it held (bytes), when the system says."""
    if process.returncode is not None:
        return None
    deadline = time.monotonic() + WORKER_STOP_TIMEOUT
    try:
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                return int(usage.ru_maxrss) * 1024
            if time.monotonic() > deadline:
                process.kill()
                deadline = float("inf")
            time.sleep(0.005)
    except ChildProcessError:  # reaped already
        _wait(process)
        return None


def _wait(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(WORKER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass


def _kill(worker: _Worker) -> None:
    """SIGKILL the worker and everything it started (its process group), then reap it."""
    try:
        os.killpg(worker.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if worker.process.poll() is None:
        worker.process.kill()
    _wait(worker.process)
    worker.conn.close()


def _ended(process: subprocess.Popen[bytes]) -> str:
    code = process.poll()
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"crashed (killed by {name})"
    return f"exited with status {code}"


def _spec_of(plugin: Plugin) -> WorkerSpec:
    level, json_logs, secrets = logs.current_settings()
    return WorkerSpec(
        name=plugin.name,
        directory=str(plugin.directory) if plugin.directory is not None and plugin.entry_point is None else None,
        entry_point=plugin.entry_point,
        config=plugin.config,
        database=None if plugin.database_section is None else {
            **plugin.database_section, **({"synchronous_commit": "off"} if plugin.async_commit else {})},
        max_memory=plugin.max_memory,
        sys_path=list(sys.path),
        log_level=level,
        json_logs=json_logs,
        secrets=secrets,
    )


# -- the loader's own threads (isolation: thread) -----------------------------------------------------
class _DaemonThreads:
    """Daemon threads running calls handed to :meth:`submit`; idle ones are reused, one starts when none is idle.

    A thread stuck in a call (a plugin past its timeout) is simply not idle: it never delays a
    later call.  Threads idle for ``idle_seconds`` end.
    """

    def __init__(self, name: str, idle_seconds: float = 60.0) -> None:
        self.name = name
        self.idle_seconds = idle_seconds
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._started = 0

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1  # that thread is taken: it will pick this call
                start = False
            else:
                self._started += 1
                start = True
        self._calls.put(call)
        if start:
            threading.Thread(target=self._serve, name=f"{self.name}-{self._started}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                call = self._calls.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0 and self._calls.empty():
                        self._idle -= 1
                        return
                continue  # a call was handed to this idle thread just now
            call()
            with self._lock:
                self._idle += 1


class ThreadCalls:
    """Plugin calls on the loader's threads (``isolation: thread``)."""

    def __init__(self) -> None:
        self.overdue: dict[str, int] = {}
        self._overdue_lock = threading.Lock()
        self._threads = _DaemonThreads("sqapi-plugin")

    def run(self, plugin: Plugin, calls: list[Call], on_slow: Callable[[], None]) -> list[Ran]:
        """Run calls until one is past its timeout (that one included): one after the other on one daemon thread.

        Python cannot kill a thread, so a call past ``plugin.timeout`` is abandoned -- counted in
        ``overdue`` until it returns, its thread running nothing else -- and the calls after it go
        to another thread.  Without a timeout the calls run on the caller's thread.
        """
        if not plugin.timeout:
            return [_timed(plugin, call) for call in calls]
        ran: list[Ran] = []
        slow_at = [time.monotonic() + SLOW_AFTER]
        while len(ran) < len(calls):
            ran.extend(self._some(plugin, calls[len(ran):], on_slow, slow_at))
        return ran

    def _some(self, plugin: Plugin, calls: list[Call], on_slow: Callable[[], None], slow_at: list[float]) \
            -> list[Ran]:
        timeout = float(plugin.timeout or 0)
        done: list[Ran] = []            # filled by the daemon thread, in order
        starts = [time.monotonic()]     # starts[i]: when call i started (set with done[i - 1])
        guard = threading.Lock()
        finished = threading.Event()    # the daemon thread ran every call, or stopped
        abandoned = [False]

        def target() -> None:
            try:
                for index, call in enumerate(calls):
                    try:
                        ran = _timed(plugin, call)
                    except BaseException as exc:  # SystemExit and the like: handed to the caller as a failure
                        ran = (None, exc, time.monotonic() - starts[index])
                    with guard:
                        if abandoned[0]:  # this call was given up: the caller runs the rest elsewhere
                            self._overdue_changed(plugin.name, -1)
                            return
                        done.append(ran)
                        starts.append(time.monotonic())
            finally:
                finished.set()

        self._threads.submit(target)
        while True:  # wakes when every call is done, when the running one's time is up, or for on_slow
            with guard:
                count = len(done)
                if count == len(calls):
                    return list(done)
                deadline = starts[count] + timeout
                if time.monotonic() >= deadline:
                    abandoned[0] = True
                    self._overdue_changed(plugin.name, +1)  # under the guard: its -1 cannot come first
                    taken = list(done)
                    break
            if time.monotonic() >= slow_at[0]:
                on_slow()
                slow_at[0] = float("inf")
            wake = min(deadline, slow_at[0])
            finished.wait(max(0.0, wake - time.monotonic()))
        return taken + [(None, PluginTimeout(f"timed out after {timeout:g}s"), time.monotonic() - starts[count])]

    def _overdue_changed(self, name: str, delta: int) -> None:
        with self._overdue_lock:
            self.overdue[name] = self.overdue.get(name, 0) + delta
            if self.overdue[name] <= 0:
                del self.overdue[name]
            still = self.overdue.get(name, 0)
        if delta > 0:
            log.warning("plugin %s is still running past its timeout (%d call(s) overdue)", name, still)


def _timed(plugin: Plugin, call: Call) -> Ran:
    started = time.monotonic()
    try:
        assert plugin.module is not None
        with open(call.path, "rb") as data:
            result = plugin.module.execute(plugin.config, plugin.database, call.message, call.metadata, data)
    except (Exception, SystemExit) as exc:  # a plugin calling sys.exit() fails; it does not end the worker
        return None, exc, time.monotonic() - started
    return result, None, time.monotonic() - started
