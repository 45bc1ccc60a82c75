"""The worker processes of one plugin (``isolation: process``): how many, which is free, which to replace.

A pool starts workers on first use (or ahead, :meth:`WorkerPool.warm`) and reuses them; it grows,
while calls wait, up to its size (``plugin.concurrency``, default ``processing.workers``).  A
worker runs one call at a time.  How one batch's calls are handed to the workers, answered,
timed out or taken back is :class:`~sqapi.core.dispatch.Dispatch`'s job; the pool only lends
workers out (:meth:`~WorkerPool.acquire`, :meth:`~WorkerPool.take`) and takes them back
(:meth:`~WorkerPool.release`, or :meth:`~WorkerPool.discard` for one that died or was killed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from sqapi.core import calls as calls_module
from sqapi.core.calls import Job, Ran
from sqapi.core.dispatch import Dispatch
from sqapi.core.plugins import Plugin
from sqapi.core.worker_process import WorkerProcess, kill, start_worker, stop_worker
from sqapi.errors import PluginFailed

#: a plugin whose recent calls took less than this (seconds, on average) gets a batch's calls in shares
QUICK_CALL = 0.005


class WorkerPool:
    """The worker processes of one plugin: at most ``size``, each running one call at a time."""

    def __init__(self, plugin: Plugin, size: int) -> None:
        self.plugin = plugin
        self.size = size
        self._idle: list[WorkerProcess] = []
        self._count = 0  # started (or starting) and not yet discarded
        self._cond = threading.Condition()
        self._closed = False
        self.call_seconds = 0.0  # recent calls' duration, averaged: quick plugins get calls in shares

    # -- workers in and out -------------------------------------------------------------------
    def warm(self) -> None:
        """Have one worker ready (errors are left for the first call to report)."""
        try:
            worker = self.acquire()
        except Exception:
            return
        self.release(worker)

    def acquire(self) -> WorkerProcess:
        """A worker, waiting for one when every worker is busy and the pool is full.  For a quick plugin, a new
        worker starts only when none came free within :data:`~sqapi.core.calls.SLOW_AFTER`: a quick call frees
        its worker soon, and starting one costs an interpreter and the plugin's imports."""
        waited_since = time.monotonic()
        slow_after = calls_module.SLOW_AFTER
        with self._cond:
            while True:
                if self._closed:
                    raise PluginFailed(f"plugin {self.plugin.name}: sqapi is stopping", retryable=True)
                if self._idle:
                    return self._idle.pop()
                patient = self._count > 0 and self.quick() and time.monotonic() - waited_since < slow_after
                if self._count < self.size and not patient:
                    self._count += 1
                    break
                self._cond.wait(slow_after if patient else None)
        return self._start_counted()

    def take(self, grow: bool) -> WorkerProcess | None:
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

    def release(self, worker: WorkerProcess) -> None:
        """A worker done with its calls, back to wait for more (stopped when the pool is closed)."""
        with self._cond:
            if not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
        stop_worker(worker)

    def discard(self, worker: WorkerProcess) -> None:
        """Kill ``worker`` (if it still runs) and free its place for a fresh one."""
        kill(worker)
        with self._cond:
            self._count -= 1
            self._cond.notify()

    def _start_counted(self) -> WorkerProcess:
        """Start a worker in the place already counted for it; the place is given back if it cannot start."""
        try:
            return start_worker(self.plugin)
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    # -- calls ---------------------------------------------------------------------------------
    def run(self, calls: Sequence[Job], on_slow: Callable[[], None]) -> list[Ran]:
        """Run the calls on this plugin's workers, each worker one call at a time; their results in order.

        A plugin whose calls are quick gets them in shares (a few messages for a whole batch, one
        answer per call); a slow one gets them one at a time.  Nothing waits long behind a slow
        call: once a call has run :data:`~sqapi.core.calls.SLOW_AFTER` seconds, the calls queued
        behind it on its worker are taken back and handed to idle workers, and the pool grows (up
        to its size).
        """
        return Dispatch(self, calls, on_slow).run()

    def quick(self) -> bool:
        return self.call_seconds < QUICK_CALL

    def noted(self, seconds: float) -> None:
        """A call's duration, into the moving average."""
        self.call_seconds += (seconds - self.call_seconds) * 0.2

    def close(self) -> None:
        """Stop the idle workers now; busy ones are stopped when their batch gives them back."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for worker in idle:
            stop_worker(worker)
