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
it ends, so a timeout is counted per call and a crash costs only the call that caused it.  A
plugin with ``execute_batch`` is run once for the batch's calls (a
:class:`~sqapi.core.calls.BatchCall`, one job wherever it runs), and each call gets its item's
outcome back (:func:`per_item`).

The runner is the front: the worker processes are :mod:`sqapi.core.pool` (how many, which is
free), :mod:`sqapi.core.dispatch` (one batch's calls over them: shares, answers, timeouts) and
:mod:`sqapi.core.worker_process` (starting, killing and reaping one); the loader's threads are
:mod:`sqapi.core.threads`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from sqapi.config import DEFAULT_WORKERS
from sqapi.core.calls import SLOW_AFTER, BatchAnswer, BatchCall, Call, Job, Ran
from sqapi.core.dispatch import MAX_SHARE, NEAR_MEMORY_CAP, PENDING_POLL
from sqapi.core.hooks import call_hook
from sqapi.core.plugins import PROCESS, Plugin, PluginSet
from sqapi.core.pool import QUICK_CALL, WorkerPool
from sqapi.core.threads import ThreadCalls
from sqapi.core.worker_process import WORKER_START_TIMEOUT, WORKER_STOP_TIMEOUT
from sqapi.errors import PluginFailed

__all__ = ["MAX_SHARE", "NEAR_MEMORY_CAP", "PENDING_POLL", "QUICK_CALL", "SLOW_AFTER", "WORKER_START_TIMEOUT",
           "WORKER_STOP_TIMEOUT", "Call", "PluginRunner", "Ran", "ThreadCalls", "WorkerPool"]

log = logging.getLogger(__name__)


class PluginRunner:
    """Runs plugin calls as each plugin's ``isolation`` says; owns the worker processes and threads."""

    def __init__(self, plugins: PluginSet, workers: int = DEFAULT_WORKERS) -> None:
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

        A plugin with ``execute_batch`` runs once for all the calls (one job: one worker, one
        timeout); each call then gets its item's outcome, and a share of the time.  ``on_slow`` is
        called once, from this thread, when the calls have taken :data:`SLOW_AFTER` seconds and
        are not done (the processor then records PROCESSING).
        """
        if not calls:
            return []
        if not plugin.batched:
            return self._run(plugin, calls, on_slow)
        [ran] = self._run(plugin, [BatchCall(calls)], on_slow)
        return per_item(ran, len(calls))

    def _run(self, plugin: Plugin, calls: Sequence[Job], on_slow: Callable[[], None]) -> list[Ran]:
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


def per_item(ran: Ran, count: int) -> list[Ran]:
    """An ``execute_batch`` call's outcome as ``count`` calls' own: each item's result or exception (or the whole
    call's error, for every item), each with an equal share of the call's time."""
    result, error, seconds = ran
    share = seconds / count
    if error is not None:
        return [(None, error, share)] * count
    if isinstance(result, BatchAnswer):  # from a worker process: errors came as words
        return [(outcome[1], None, share) if outcome[0] == "done"
                else (None, PluginFailed(outcome[1], outcome[2], outcome[3]), share) for outcome in result.outcomes]
    return [(None, outcome, share) if isinstance(outcome, BaseException) else (outcome, None, share)
            for outcome in result]
