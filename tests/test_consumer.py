"""The one consumer every listener type runs under: batch sizes, scheduling, stopping, reopening."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from sqapi.connectors.listeners import Inbox, Received, Transport
from sqapi.core.consumer import Consumer
from sqapi.core.outcome import Action, Delivery, Outcome
from sqapi.errors import ConnectorError


@pytest.mark.parametrize("per_message, expected", [
    (None, 1),        # nothing measured yet: one delivery, so a slow first plugin holds up no other
    (0.0001, 128),    # quick: full batches (batch_size)
    (0.05, 10),       # 50 ms each: as many as fit in BATCH_SECONDS (0.5 s)
    (2.0, 1),         # slower than BATCH_SECONDS: one at a time
])
def test_batches_are_cut_to_the_measured_time_per_message(per_message: float | None, expected: int) -> None:
    inbox = Inbox(workers=4, batch_size=128, start_worker=lambda: None)
    inbox.per_message = per_message
    assert inbox.batch_limit() == expected


class Scripted(Transport):
    """A transport that hands out what a test queues and records what happens to it -- in memory, on purpose:
    this tests the consumer's own rules; every real type runs the listener contract (tests/contracts)."""

    def __init__(self, bodies: list[bytes], lose_after: int | None = None) -> None:
        super().__init__({})
        self.bodies = list(bodies)
        self.lose_after = lose_after
        self.opens = 0
        self.received = 0
        self.settled: list[tuple[bytes, Outcome | None]] = []
        self.handed_back: list[bytes] = []
        self.closed = 0
        self.changed = threading.Condition()

    def open(self) -> None:
        self.opens += 1
        if self.opens == 1 and self.lose_after == 0:
            raise ConnectorError("not there yet")

    def receive(self, inbox: Inbox, timeout: float) -> None:
        if self.lose_after is not None and self.received >= self.lose_after and self.opens == 1:
            raise ConnectorError("connection lost")
        with self.changed:
            if not self.bodies:
                self.changed.wait(min(timeout, 0.05))
                return
            body = self.bodies.pop(0)
            self.changed.notify_all()
        self.received += 1
        inbox.put(Received(body, Delivery(id=body.decode()), body))

    def settle(self, received: Sequence[Received], outcomes: Sequence[Outcome | None]) -> None:
        with self.changed:
            self.settled.extend((r.body, o) for r, o in zip(received, outcomes, strict=True))
            self.changed.notify_all()

    def hand_back(self, received: Sequence[Received]) -> None:
        self.handed_back.extend(r.body for r in received)

    def drained(self) -> bool:
        return not self.bodies

    def close(self) -> None:
        self.closed += 1


def ack_all(items: list[tuple[bytes, Delivery]]) -> list[Outcome]:
    return [Outcome(uuid=str(raw), status="DONE", action=Action.ACK) for raw, _ in items]


def test_until_idle_settles_every_delivery_once_and_closes_the_transport() -> None:
    transport = Scripted([f"m{n}".encode() for n in range(50)])
    Consumer(transport, ack_all, workers=3).start_listeners(until_idle=True)
    assert sorted(body for body, _ in transport.settled) == sorted(f"m{n}".encode() for n in range(50))
    assert transport.handed_back == [] and transport.closed == 1


def test_a_processor_that_raises_hands_its_batch_back_as_none_and_the_consumer_goes_on() -> None:
    calls = []

    def flaky(items: list[tuple[bytes, Delivery]]) -> list[Outcome]:
        calls.append(len(items))
        if len(calls) == 1:
            raise SystemExit("the processor broke")
        return ack_all(items)

    transport = Scripted([b"a", b"b"])
    Consumer(transport, flaky, workers=1).start_listeners(until_idle=True)
    assert transport.settled[0] == (b"a", None)       # given back to the source to deliver again
    assert transport.settled[1][1] is not None and transport.settled[1][1].action is Action.ACK


def test_stopping_hands_back_what_no_worker_started_and_finishes_what_runs() -> None:
    started, release = threading.Event(), threading.Event()

    def slow(items: list[tuple[bytes, Delivery]]) -> list[Outcome]:
        started.set()
        release.wait(60)
        return ack_all(items)

    transport = Scripted([b"first", b"second", b"third"])
    consumer = Consumer(transport, slow, workers=1)
    with consumer.running():
        assert started.wait(10)
        with transport.changed:
            transport.changed.wait_for(lambda: not transport.bodies, 10)
        consumer.stop()
        release.set()
    assert [body for body, _ in transport.settled] == [b"first"]
    assert sorted(transport.handed_back) == [b"second", b"third"]


def test_a_lost_source_is_opened_again_and_a_source_not_there_yet_is_waited_for() -> None:
    transport = Scripted([b"a", b"b", b"c"], lose_after=1)
    consumer = Consumer(transport, ack_all, workers=1, reconnect_initial=0.01, reconnect_max=0.02)
    consumer.start_listeners(until_idle=True)
    assert consumer.sessions == 2 and transport.closed == 2
    assert sorted(body for body, _ in transport.settled) == [b"a", b"b", b"c"]

    transport = Scripted([b"x"], lose_after=0)
    consumer = Consumer(transport, ack_all, workers=1, reconnect_initial=0.01, reconnect_max=0.02)
    consumer.start_listeners(until_idle=True)
    assert transport.opens == 2 and consumer.sessions == 1 and [b for b, _ in transport.settled] == [b"x"]
