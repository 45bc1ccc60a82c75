"""Plugin calls on the loader's own threads (``isolation: thread``, thread-safe plugins only).

The cheapest way to run a call, and no protection: a crash takes the loader with it, and a call
past ``plugin.timeout`` is abandoned, not stopped (Python cannot kill a thread) -- counted in
:attr:`ThreadCalls.overdue` until it returns.  Without a timeout the calls run on the caller's
thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from sqapi.core import calls as calls_module
from sqapi.core.calls import BatchCall, Job, Ran
from sqapi.core.hooks import run_execute, run_execute_batch
from sqapi.core.plugins import Plugin
from sqapi.errors import PluginTimeout

log = logging.getLogger(__name__)


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

    def run(self, plugin: Plugin, calls: Sequence[Job], on_slow: Callable[[], None]) -> list[Ran]:
        """Run calls until one is past its timeout (that one included): one after the other on one daemon thread.

        Python cannot kill a thread, so a call past ``plugin.timeout`` is abandoned -- counted in
        ``overdue`` until it returns, its thread running nothing else -- and the calls after it go
        to another thread.  Without a timeout the calls run on the caller's thread.
        """
        if not plugin.timeout:
            return [_timed(plugin, call) for call in calls]
        ran: list[Ran] = []
        slow_at = [time.monotonic() + calls_module.SLOW_AFTER]
        while len(ran) < len(calls):
            ran.extend(self._some(plugin, calls[len(ran):], on_slow, slow_at))
        return ran

    def _some(self, plugin: Plugin, calls: Sequence[Job], on_slow: Callable[[], None], slow_at: list[float]) \
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


def _timed(plugin: Plugin, call: Job) -> Ran:
    started = time.monotonic()
    try:
        assert plugin.module is not None
        if isinstance(call, BatchCall):  # its result: one outcome per item (a result or an exception)
            result = run_execute_batch(plugin.module, plugin.config, plugin.database, call)
        else:
            result = run_execute(plugin.module, plugin.config, plugin.database, call)
    except (Exception, SystemExit) as exc:  # a plugin calling sys.exit() fails; it does not end the worker
        return None, exc, time.monotonic() - started
    return result, None, time.monotonic() - started
