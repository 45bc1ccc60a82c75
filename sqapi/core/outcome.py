"""What the processor tells a listener to do with a delivery, and the retry policy behind it.

One policy decides "retry this message or give up": :class:`RetryPolicy`.  Listeners only
act on the :class:`Outcome` the processor returns -- ack, redeliver after ``delay``, or
dead-letter -- and never write status themselves.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqapi.backoff import exponential


class Action(enum.Enum):
    ACK = "ack"                  # done (or already done): remove the delivery
    RETRY = "retry"              # redeliver after Outcome.delay seconds
    DEAD_LETTER = "dead_letter"  # give up: keep the delivery aside with its reason


@dataclass(frozen=True)
class Delivery:
    """One delivery of a message: its id at the source and which attempt this is (1-based).

    ``trace_context``: the publisher's W3C trace context as it came (``traceparent``, ``tracestate``), when the
    source carries one (RabbitMQ headers)."""

    id: str
    attempt: int = 1
    trace_context: Mapping[str, str] | None = field(default=None, hash=False, compare=False)


@dataclass
class Outcome:
    uuid: str | None
    status: str                 # the message's final status for this attempt: DONE, RETRY or FAILED
    action: Action
    reason: str | None = None
    plugin: str | None = None   # the plugin that failed, when one did
    delay: float = 0.0
    attempt: int = 1
    skipped: bool = False       # already DONE with the same data: no plugin ran
    counted: bool = True        # False: nothing was tried (the status database was down): the next delivery
                                # keeps this attempt's number, so an outage does not use up the retries

    def line(self) -> str:
        """``<uuid> <STATUS> [reason]``, as ``sqapi process`` prints it."""
        text = f"{self.uuid or '-'} {self.status}"
        if self.reason:
            text += f" {self.reason}"
        return text


@dataclass(frozen=True)
class RetryPolicy:
    """Growing delays between attempts, up to ``max_attempts`` attempts in all."""

    max_attempts: int = 5
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0

    @classmethod
    def from_config(cls, broker: Mapping[str, Any]) -> RetryPolicy:
        retry = broker.get("retry") or {}
        return cls(
            max_attempts=int(retry.get("max_attempts", cls.max_attempts)),
            initial_delay=float(retry.get("initial_delay", cls.initial_delay)),
            multiplier=float(retry.get("multiplier", cls.multiplier)),
            max_delay=float(retry.get("max_delay", cls.max_delay)),
        )

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait before the attempt after ``attempt``."""
        return exponential(attempt, self.initial_delay, self.max_delay, self.multiplier)

    def may_retry(self, attempt: int) -> bool:
        return attempt < self.max_attempts
