"""One worker for every listener type: it takes what a transport receives, forms batches, runs the
processor and hands every outcome back to the transport.

A listener type is a thin transport (:class:`sqapi.core.contracts.Transport`): it opens, receives
deliveries into the :class:`Inbox`, settles each one as its outcome says (ack, retry later,
dead-letter), hands back what was never started, and closes.  Everything else is here, once, for
every type: worker threads, batch sizes, reconnecting with backoff after the source is lost, and
stopping gracefully (no new deliveries, unstarted ones handed back, running ones finished and
settled).

Scheduling.  A delivery that arrives while no worker runs starts one at once: a lone message never
waits for a batch to fill.  A worker takes whatever waits, up to a batch cut to take about
``BATCH_SECONDS`` at the time per message measured so far (:meth:`Inbox.batch_limit`), so quick
plugins share their status writes across a full batch and slow ones hold few messages each.  One
worker runs while it keeps a core busy -- workers running at once only contend for the GIL then;
another starts (up to ``workers``) while deliveries wait and the running ones mostly wait themselves
(database round trips, slow plugins) or took nothing for ``STUCK_SECONDS`` (see
:meth:`Consumer._watch`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqapi.backoff import exponential
from sqapi.config import DEFAULT_WORKERS
from sqapi.core.outcome import Delivery, Outcome
from sqapi.errors import ConnectorError

if TYPE_CHECKING:
    from sqapi.core.contracts import Transport

log = logging.getLogger(__name__)

STUCK_SECONDS = 0.05   # deliveries waited this long while no worker took a batch: start another
CPU_BOUND = 0.8        # ... or this process used less than this share of a core meanwhile
BATCH_SECONDS = 0.5    # batches are cut to take about this long
BATCH_SIZE = 128       # msg_broker.batch_size: deliveries in one batch at most
POLL_SECONDS = 0.5     # longest a transport's receive waits before the consumer looks at stop again
RECONNECT_INITIAL = 0.5  # seconds before opening a lost source again (msg_broker.reconnect.initial_delay) ...
RECONNECT_MAX = 30.0     # ... doubling (with jitter) up to this (msg_broker.reconnect.max_delay)

ProcessBatch = Callable[[list[tuple[bytes | str | Mapping[str, Any], Delivery]]], list[Outcome]]


@dataclass
class Received:
    """A delivery as a transport received it; ``handle`` is the transport's own (a delivery tag and its
    session, a claimed file, ...) and means nothing to the consumer."""

    body: bytes
    delivery: Delivery
    handle: Any = None


class Inbox:
    """Deliveries waiting for a worker: what a transport sees of the consumer.

    A transport calls :meth:`put` for every delivery it receives (from its receiving thread) and
    may read :meth:`outstanding` to take no more than the consumer can use."""

    def __init__(self, workers: int, batch_size: int, start_worker: Callable[[], None]) -> None:
        self.workers = max(1, workers)
        self.batch_size = max(1, batch_size)
        self._start_worker = start_worker
        self._cond = threading.Condition()
        self._waiting: collections.deque[Received] = collections.deque()
        self._outstanding = 0           # put and not settled yet (waiting + running)
        self.running = 0                # workers taking from the inbox
        self.accepting = True           # False while stopping: deliveries wait to be handed back
        self.per_message: float | None = None  # seconds a delivery took, a moving average
        self.last_take = time.monotonic()
        self.needs_watch = threading.Event()   # deliveries wait behind a running worker

    def put(self, received: Received) -> None:
        """A delivery to process; a worker starts at once when none runs."""
        with self._cond:
            self._waiting.append(received)
            self._outstanding += 1
            if not self.accepting or self.running >= self.workers:
                return
            if self.running:  # the running one takes it, unless it is stuck: see Consumer._watch
                self.needs_watch.set()
                return
            self.running += 1
        self._start_worker()

    def outstanding(self) -> int:
        """Deliveries put and not settled yet."""
        with self._cond:
            return self._outstanding

    def take_waiting(self) -> list[Received]:
        """Deliveries no worker has started, removed (to be handed back to the source)."""
        with self._cond:
            taken = list(self._waiting)
            self._waiting.clear()
            self._outstanding -= len(taken)
            self._cond.notify_all()
        return taken

    # -- the consumer's side --------------------------------------------------------------------
    def batch_limit(self) -> int:
        """``batch_size``, cut so a batch takes about ``BATCH_SECONDS`` (1 until a delivery was timed)."""
        if self.per_message is None:
            return 1
        return max(1, min(self.batch_size, int(BATCH_SECONDS / max(self.per_message, 1e-6))))

    def take_batch(self) -> list[Received]:
        """The next batch for a running worker; empty (and the worker no longer counted) when none waits."""
        with self._cond:
            if not self._waiting or not self.accepting:
                self.running -= 1
                self._cond.notify_all()
                return []
            batch = [self._waiting.popleft() for _ in range(min(self.batch_limit(), len(self._waiting)))]
            self.last_take = time.monotonic()
            return batch

    def done(self, batch: Sequence[Received], seconds: float) -> None:
        """A batch settled after ``seconds``."""
        per_message = seconds / max(1, len(batch))
        with self._cond:
            # a moving average: one slow message does not shrink batches for long, one quick one not grow them
            self.per_message = per_message if self.per_message is None \
                else 0.7 * self.per_message + 0.3 * per_message
            self._outstanding -= len(batch)
            self._cond.notify_all()

    def _room_for_another(self) -> bool:
        """Deliveries wait while fewer than ``workers`` run (and at least one does); under the lock."""
        return bool(self._waiting) and self.accepting and 0 < self.running < self.workers

    def another_worker(self, cpu_share: float) -> bool:
        """Whether to start one more worker now (counted as running when so)."""
        with self._cond:
            if not self._room_for_another():
                return False
            stuck = time.monotonic() - self.last_take >= STUCK_SECONDS
            if not stuck and cpu_share >= CPU_BOUND:
                return False
            self.running += 1
            return True

    def not_started(self) -> None:
        """A worker counted as running could not start."""
        with self._cond:
            self.running -= 1
            self._cond.notify_all()

    def waiting(self) -> bool:
        """Deliveries wait while fewer than ``workers`` run (and at least one does)."""
        with self._cond:
            return self._room_for_another()

    def wait_idle(self) -> None:
        """Until no worker runs."""
        with self._cond:
            self._cond.wait_for(lambda: self.running == 0)


class Consumer:
    """Drives a transport: what ``app.create_listener()`` returns for every listener type of sqapi's.

    :meth:`start_listeners` blocks until :meth:`stop` (from a signal handler or another thread):
    it opens the transport, reopens it with backoff when it is lost, and on stop finishes what
    runs.  ``consuming`` says whether deliveries are coming in (``sqapi loader``'s liveness);
    ``sessions`` counts the opens."""

    def __init__(self, transport: Transport, process_batch: ProcessBatch, workers: int = DEFAULT_WORKERS,
                 batch_size: int = BATCH_SIZE, reconnect_initial: float = RECONNECT_INITIAL,
                 reconnect_max: float = RECONNECT_MAX) -> None:
        self.transport = transport
        self.process_batch = process_batch
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.sessions = 0
        self.consuming = False
        self.inbox = Inbox(workers, batch_size, self._start_worker)
        self._stop = threading.Event()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # -- the listener contract --------------------------------------------------------------------
    def ping(self) -> None:
        self.transport.ping()

    def close(self) -> None:
        """Let go of the transport (:meth:`start_listeners` closes it itself when it ends)."""
        self.transport.close()

    def stop(self) -> None:
        """Stop receiving; running deliveries finish and are settled, unstarted ones are handed back."""
        self._stop.set()
        self.inbox.accepting = False   # workers take no new batch from now on
        self.transport.interrupt()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start_listeners(self, until_idle: bool = False) -> None:
        """Consume until :meth:`stop` -- or, with ``until_idle``, until the source holds nothing more and
        every delivery settled.  A lost source is opened again after a growing pause."""
        failures = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(self.inbox.workers, thread_name_prefix="sqapi-worker")
        watcher = threading.Thread(target=self._watch, name="sqapi-watch", daemon=True)
        watcher.start()
        try:
            while not self._stop.is_set():
                try:
                    self.transport.open()
                except ConnectorError as exc:
                    failures += 1
                    self._pause(failures, exc, "cannot be opened")
                    continue
                self.sessions += 1
                failures = 0
                try:
                    self._consume(until_idle)
                    return
                except ConnectorError as exc:
                    self.consuming = False
                    self._after_loss()
                    failures += 1
                    self._pause(failures, exc, "was lost")
                finally:
                    self.consuming = False
                    self.transport.close()
        finally:
            self._stop.set()
            self.inbox.needs_watch.set()  # the watcher ends
            self._pool.shutdown(wait=True)
            watcher.join()
            log.info("listener stopped")

    @contextlib.contextmanager
    def running(self) -> Iterator[Consumer]:
        """:meth:`start_listeners` in a thread for the block; stopped (and joined) at its end."""
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.start_listeners()
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=run, name="sqapi-listener", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop()
            thread.join(60)
        if thread.is_alive():
            raise RuntimeError("the listener did not stop within 60s")
        if errors:
            raise errors[0]

    # -- receiving --------------------------------------------------------------------------------
    def _consume(self, until_idle: bool) -> None:
        self.consuming = True
        self.inbox.accepting = not self._stop.is_set()
        while not self._stop.is_set():
            self.transport.receive(self.inbox, POLL_SECONDS)
            if until_idle and not self.inbox.outstanding() and self.transport.drained():
                break
        self.consuming = False
        # stopping: nothing new comes in; what no worker started goes back; what runs finishes and is settled
        self.transport.stop_receiving()
        self.inbox.accepting = False
        self.transport.hand_back(self.inbox.take_waiting())
        while self.inbox.running or self.inbox.outstanding():
            self.transport.receive(self.inbox, 0.2)  # settles what must be settled on this thread
            self.transport.hand_back(self.inbox.take_waiting())

    def _after_loss(self) -> None:
        """The source is gone: what waits is dropped (the source gives it again), running workers finish
        (their outcomes are recorded; the source redelivers them, which is harmless) before it reopens,
        so this loader never works on one message twice at once."""
        self.inbox.accepting = False
        self.transport.hand_back(self.inbox.take_waiting())
        self.inbox.wait_idle()
        self.inbox.accepting = not self._stop.is_set()

    def _pause(self, failures: int, exc: ConnectorError, what: str) -> None:
        if self._stop.is_set():
            return
        delay = exponential(failures, self.reconnect_initial, self.reconnect_max, jitter=True)
        log.warning("the message source %s (%s); trying again in %.1fs", what, exc, delay)
        self._stop.wait(delay)

    # -- workers ----------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        assert self._pool is not None
        try:
            self._pool.submit(self._work)
        except RuntimeError:  # shutting down: the delivery is handed back with the waiting ones
            self.inbox.not_started()

    def _work(self) -> None:
        """Take batches until none waits; hand each batch's outcomes to the transport."""
        while True:
            batch = self.inbox.take_batch()
            if not batch:
                return
            started = time.monotonic()
            outcomes = self._process(batch)
            try:
                self.transport.settle(batch, outcomes)
            except Exception:  # the source redelivers what was not settled
                log.exception("settling %d deliveries failed", len(batch))
            self.inbox.done(batch, time.monotonic() - started)

    def _process(self, batch: list[Received]) -> list[Outcome | None]:
        try:
            return list(self.process_batch([(r.body, r.delivery) for r in batch]))
        except BaseException:  # the processor promises not to raise; if it does (even SystemExit), hand back
            log.exception("processing a batch of %d deliveries raised", len(batch))
            return [None] * len(batch)

    def _watch(self) -> None:
        """While deliveries wait behind running workers, start another when the running ones leave the CPU
        idle or took nothing for ``STUCK_SECONDS``; looked at every ``STUCK_SECONDS``."""
        while True:
            self.inbox.needs_watch.wait()
            if self._stop.is_set():
                return
            self.inbox.needs_watch.clear()
            while self.inbox.waiting():
                since, cpu_since = time.monotonic(), time.process_time()
                if self._stop.wait(STUCK_SECONDS):
                    return
                cpu_share = (time.process_time() - cpu_since) / max(1e-6, time.monotonic() - since)
                if self.inbox.another_worker(cpu_share):
                    self._start_worker()
