"""One batch's calls over one plugin's worker processes: handed out, answered, timed out, taken back.

:meth:`WorkerPool.run <sqapi.core.pool.WorkerPool.run>` makes a :class:`Dispatch` for the calls of a
batch.  Quick calls go to a worker in shares (one message for several calls), slow ones one at a
time; a worker answers each call as it ends, so a timeout is counted per call and a crash costs
only the call that caused it.  Once a call has run :data:`~sqapi.core.calls.SLOW_AFTER` seconds,
the calls queued behind it are taken back (``withdraw``) and handed to other workers.  A call past
``plugin.timeout`` has its worker killed; a worker that dies fails the call it was running, and
the calls behind it go to another.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing.connection
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from sqapi.core import calls as calls_module
from sqapi.core.calls import Job, Ran
from sqapi.core.worker_process import WorkerProcess, ended, reap
from sqapi.errors import PluginFailed, PluginTimeout

if TYPE_CHECKING:
    from sqapi.core.pool import WorkerPool

log = logging.getLogger(__name__)

#: calls sent to a worker at once, at most
MAX_SHARE = 256
#: seconds between looks for a free worker while calls of a batch wait and every worker is busy
PENDING_POLL = 0.05
#: a worker that crashed having used this share of its plugin.max_memory or more says so (an allocation that
#: failed at the cap makes a C library abort; the worker's peak is what it held before the one that failed)
NEAR_MEMORY_CAP = 0.5


class _Assigned:
    """What one worker is doing for a batch: the calls sent to it, unfinished, in order."""

    def __init__(self, worker: WorkerProcess, started: float) -> None:
        self.worker = worker
        self.queue: collections.deque[int] = collections.deque()
        self.head_started = started  # when the call at the head of the queue started (or was sent)
        self.withdrawing = False


class Dispatch:
    """One :meth:`WorkerPool.run`: hands calls out, takes answers in, kills what runs past its timeout."""

    def __init__(self, pool: WorkerPool, calls: Sequence[Job], on_slow: Callable[[], None]) -> None:
        self.pool = pool
        self.calls = calls
        self.on_slow = on_slow
        self.ran: list[Ran | None] = [None] * len(calls)
        self.pending = collections.deque(range(len(calls)))
        self.assigned: dict[Connection, _Assigned] = {}
        self.timeout = float(pool.plugin.timeout) if pool.plugin.timeout else None
        self.slow_at = time.monotonic() + calls_module.SLOW_AFTER
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
                self.pool.discard(job.worker)
        return [r if r is not None else (None, PluginFailed("not run", retryable=True), 0.0) for r in self.ran]

    # -- out -----------------------------------------------------------------------------------
    def _slow(self, now: float) -> bool:
        return any(job.queue and now - job.head_started >= calls_module.SLOW_AFTER for job in self.assigned.values())

    def _hand_out(self) -> None:
        """Give waiting calls to workers: idle ones, a new one when nothing runs yet or what runs is slow."""
        while self.pending:
            slow = self._slow(time.monotonic())
            try:
                if not self.assigned:
                    worker: WorkerProcess | None = self.pool.acquire()  # waits while other batches use every worker
                else:
                    worker = self.pool.take(grow=self.can_grow and (slow or not self.pool.quick()))
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
            self.pool.discard(job.worker)
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
            take_back_at = job.head_started + calls_module.SLOW_AFTER
            if len(job.queue) > 1 and not job.withdrawing:
                # even when that moment has passed (while on_slow wrote, say): then at once, and the withdrawal
                # below goes out -- skipping it would wait for the slow call to end
                wakes.append(take_back_at)
            elif self.pending and take_back_at > now:
                wakes.append(take_back_at)
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
            elif len(job.queue) > 1 and not job.withdrawing and now - job.head_started >= calls_module.SLOW_AFTER:
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
                        self.pool.discard(job.worker)
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
            self.pool.release(job.worker)
        else:  # a withdrawal is on its way back: wait for its answer (it gives nothing, the queue was empty)
            self.assigned[job.worker.conn] = job

    def _lost(self, job: _Assigned) -> None:
        """The worker died during its call: that call crashed with it; the calls behind it go to another worker."""
        peak = reap(job.worker.process)
        how = ended(job.worker.process)
        cap = self.pool.plugin.max_memory
        if cap and peak is not None and peak >= cap * NEAR_MEMORY_CAP:  # a C library aborts when malloc fails
            how += f", having used {peak >> 20} MiB of its {cap >> 20} MiB memory limit (plugin.max_memory)"
        log.warning("plugin %s: worker process %s %s", self.pool.plugin.name, job.worker.pid, how)
        self._blame(job, PluginFailed(f"its worker process {how} during the call", retryable=True))

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
        self.pool.discard(job.worker)
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

