"""``msg_broker: {type: memory}`` -- an in-memory listener for tests, with a ``join()``.

Like Dramatiq's stub broker: messages are put in with :meth:`Listener.publish`, the consumer
takes them in batches (as it does from RabbitMQ), and :meth:`Listener.join` returns once every
message published so far has settled -- acknowledged, dead-lettered, or given up on after its
retries -- so a test waits for exactly that instead of polling with sleeps.  Retries wait their
``outcome.delay`` (``msg_broker.retry``: keep delays small in tests); dead letters are kept in
:attr:`Listener.dead` with their reason.  Nothing is kept across processes: not for production.

    app = make_app({"msg_broker": {"type": "memory"}})
    with app.create_listener().running() as consumer:
        broker = consumer.transport
        broker.publish({"uuid_ref": "a", "data_location": "a.txt"})
        broker.join()
    assert broker.acked == ["a"]
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqapi.connectors.listeners import Inbox, Received, Transport
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


class Listener(Transport):
    """Published messages, handed to the consumer until it stops; :meth:`join` waits until they settle."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.acked: list[str | None] = []          # uuids acknowledged, in order
        self.dead: list[DeadLetter] = []
        self.outcomes: list[Outcome] = []
        self._due: list[_Due] = []                 # a heap: ready now, or waiting out a retry delay
        self._seq = itertools.count()
        self._unsettled = 0
        self._cond = threading.Condition()
        self._receiving = True
        self._interrupted = False

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

    # -- the transport ---------------------------------------------------------------------------
    def receive(self, inbox: Inbox, timeout: float) -> None:
        with self._cond:
            now = time.monotonic()
            ready: list[_Due] = []
            while self._receiving and self._due and self._due[0].at <= now:
                ready.append(heapq.heappop(self._due))
            if not ready and not self._interrupted:
                wait = timeout if not (self._receiving and self._due) else min(timeout, self._due[0].at - now)
                self._cond.wait(max(0.0, wait))
            self._interrupted = False
        for due in ready:
            inbox.put(Received(due.body, Delivery(id=f"memory#{due.seq}", attempt=due.attempt), due))

    def settle(self, received: Sequence[Received], outcomes: Sequence[Outcome | None]) -> None:
        for item, outcome in zip(received, outcomes, strict=True):
            if outcome is None:
                self.hand_back([item])
            else:
                self._settle(item.handle, outcome)

    def hand_back(self, received: Sequence[Received]) -> None:
        with self._cond:
            for item in received:
                heapq.heappush(self._due, item.handle)
            self._cond.notify_all()

    def stop_receiving(self) -> None:
        with self._cond:
            self._receiving = False

    def interrupt(self) -> None:
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def drained(self) -> bool:
        with self._cond:
            return not self._unsettled

    # -- inside --------------------------------------------------------------------------------
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
