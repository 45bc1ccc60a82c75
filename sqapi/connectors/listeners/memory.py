"""``msg_broker: {type: memory}`` -- an in-memory listener for tests, with a ``join()``.

Like Dramatiq's stub broker: messages are put in with :meth:`Listener.publish`, the listener
hands them to the processor in batches (as the RabbitMQ listener does), and :meth:`Listener.join`
returns once every message published so far has settled -- acknowledged, dead-lettered, or
given up on after its retries -- so a test waits for exactly that instead of polling with
sleeps.  Retries wait their ``outcome.delay`` (``msg_broker.retry``: keep delays small in
tests); dead letters are kept in :attr:`Listener.dead` with their reason.  Nothing is kept
across processes: not for production.

    app = make_app({"msg_broker": {"type": "memory"}})
    with app.create_listener().running() as listener:
        listener.publish({"uuid_ref": "a", "data_location": "a.txt"})
        listener.join()
    assert listener.acked == ["a"]
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqapi.connectors.listeners import BatchListener, ProcessBatch, ProcessMessage
from sqapi.core.outcome import Action, Delivery, Outcome


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    body: bytes = field(compare=False)
    attempt: int = field(compare=False)


@dataclass
class DeadLetter:
    body: bytes
    reason: str | None
    plugin: str | None
    attempts: int


class Listener(BatchListener):
    """Hands published messages to the processor until :meth:`stop`; :meth:`join` waits until they settle."""

    def __init__(self, config: dict[str, Any], process_message: ProcessMessage, workers: int | None = None,
                 process_batch: ProcessBatch | None = None) -> None:
        self.process_message = process_message
        self.process_batch = process_batch
        self.batch_size = max(1, int(config.get("batch_size") or 128))
        self.acked: list[str | None] = []          # uuids acknowledged, in order
        self.dead: list[DeadLetter] = []
        self.outcomes: list[Outcome] = []
        self.consuming = False
        self._due: list[_Due] = []                 # a heap: ready now, or waiting out a retry delay
        self._seq = itertools.count()
        self._unsettled = 0
        self._cond = threading.Condition()
        self._stop = False

    # -- for the test -------------------------------------------------------------------------
    def publish(self, body: bytes | str | Mapping[str, Any]) -> None:
        raw = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str) else
                                                    json.dumps(body).encode())
        with self._cond:
            heapq.heappush(self._due, _Due(time.monotonic(), next(self._seq), raw, 1))
            self._unsettled += 1
            self._cond.notify_all()

    def join(self, timeout: float = 30.0) -> None:
        """Return once every message published so far has settled; TimeoutError after ``timeout`` seconds."""
        self.wait_until(lambda: not self._unsettled, timeout,
                        lambda: f"{self._unsettled} message(s) still unsettled after {timeout:g}s")

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 30.0,
                   what: Callable[[], str] = lambda: "the condition") -> None:
        """Wait (woken by every outcome, not by polling) until ``predicate()`` holds; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(what())
                self._cond.wait(left)

    @contextlib.contextmanager
    def running(self) -> Iterator[Listener]:
        """:meth:`start_listeners` in a thread for the block; stopped (and joined) at its end."""
        thread = threading.Thread(target=self.start_listeners, name="sqapi-memory-listener", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop()
            thread.join(30)

    # -- the listener contract -----------------------------------------------------------------
    def start_listeners(self) -> None:
        self.consuming = True
        try:
            while True:
                batch = self._take()
                if batch is None:
                    return
                items: list[tuple[bytes | str | Mapping[str, Any], Delivery]] = [
                    (due.body, Delivery(id=f"memory#{due.seq}", attempt=due.attempt)) for due in batch]
                if self.process_batch is not None:
                    outcomes = list(self.process_batch(items))
                else:
                    outcomes = [self.process_message(raw, delivery) for raw, delivery in items]
                for due, outcome in zip(batch, outcomes, strict=True):
                    self._settle(due, outcome)
        finally:
            self.consuming = False

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def ping(self) -> None:
        return None

    # -- inside --------------------------------------------------------------------------------
    def _take(self) -> list[_Due] | None:
        with self._cond:
            while True:
                if self._stop:
                    return None
                now = time.monotonic()
                if self._due and self._due[0].at <= now:
                    batch: list[_Due] = []
                    while self._due and self._due[0].at <= now and len(batch) < self.batch_size:
                        batch.append(heapq.heappop(self._due))
                    return batch
                self._cond.wait(self._due[0].at - now if self._due else None)

    def _settle(self, due: _Due, outcome: Outcome) -> None:
        with self._cond:
            self.outcomes.append(outcome)
            if outcome.action is Action.RETRY:
                attempt = outcome.attempt + 1 if outcome.counted else outcome.attempt
                heapq.heappush(self._due, _Due(time.monotonic() + outcome.delay, next(self._seq), due.body, attempt))
            else:
                if outcome.action is Action.ACK:
                    self.acked.append(outcome.uuid)
                else:
                    self.dead.append(DeadLetter(due.body, outcome.reason, outcome.plugin, outcome.attempt))
                self._unsettled -= 1
            self._cond.notify_all()
