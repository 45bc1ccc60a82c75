"""One message's attempt inside a batch, and what to record of it.

:class:`Work` is what the processor knows of one message while it runs: the row as it was, the
attempt's number, the local data, the plugins to run and what they gave.  The status written at
the end follows from it (:func:`conclude`, :func:`fail`): DONE, RETRY while attempts remain, else
FAILED.  :class:`Progress` holds the PROCESSING status of a batch until it is written -- with
the first plugin rows, or on its own once a plugin call takes long.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from sqapi.core.contracts import LocalCopy, StatusStore
from sqapi.core.message import Message
from sqapi.core.outcome import Action, Delivery, Outcome, RetryPolicy
from sqapi.core.plugins import Plugin
from sqapi.core.status import Status
from sqapi.errors import describe_error as describe
from sqapi.logs import abbreviate

log = logging.getLogger(__name__)

VALIDATING, QUERYING, PROCESSING = Status.VALIDATING, Status.QUERYING, Status.PROCESSING
DONE, RETRY, FAILED = Status.DONE, Status.RETRY, Status.FAILED
PROCESS, DELETE = "process", "delete"  # message actions (msg_broker.message_fields.action)
DELETED = "deleted"  # hash_digest of a deleted message: equal to no data's sha256
#: characters of a reason stored in a status row (``info``) at most: longer ones keep their start, length and hash
MAX_REASON_CHARS = 2000


@dataclass
class PluginFailure:
    """A plugin that failed on a message: the first one named is the outcome's ``plugin``."""

    plugin: str
    reason: str
    retryable: bool


#: a status to record: (message, status, info)
Update = tuple[Message, str, str | None]


@dataclass(eq=False)
class Work:
    """One message's attempt inside a batch."""

    index: int
    delivery: Delivery
    message: Message
    previous: dict[str, Any] | None = None
    attempt: int = 1  # this attempt's number, as the status row counts them (see attempt_number)
    local: LocalCopy | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str = os.devnull
    resume: bool = False
    may_retry: bool = False
    plugins: list[Plugin] = field(default_factory=list)
    done_before: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)
    retrying: set[str] = field(default_factory=set)  # plugins that failed and will be retried
    final: tuple[Message, str, str | None] | None = None  # the status to record
    outcome: Outcome | None = None
    span: Any = None  # the message's process span, when tracing is on (sqapi.core.tracing)


def attempt_number(delivery: Delivery, previous: dict[str, Any] | None) -> int:
    """This attempt's number as the ``attempts`` column counts it, so that "attempt N of M" and "gave up after N
    attempts" say what the status row says.

    Every attempt counts, a redelivery after a crash included; the delivery's own count (the
    listener's retry header, or file name) is the floor.  Finished work starts a new count: the
    DONE row's attempts are those of the work it finished."""
    if previous is None or previous["status"] == DONE:
        return delivery.attempt
    return max(delivery.attempt, int(previous.get("attempts") or 0) + 1)


class Progress:
    """A batch's PROCESSING status (with each message's data hash), until it is written.

    Written with the first plugin rows, or by :meth:`write` while a plugin call takes long; the
    final statuses supersede it.  Only the batch's worker thread uses it.
    """

    def __init__(self, database: StatusStore, running: list[Work]) -> None:
        self.database = database
        self.pending: list[Update] = [(w.message, PROCESSING, None) for w in running]

    def take(self) -> list[Update]:
        pending, self.pending = self.pending, []
        return pending

    def write(self) -> None:
        """Write it now; on failure keep it, to go with the next write."""
        updates = self.take()
        if not updates:
            return
        try:
            self.database.update_messages(updates)
        except Exception as exc:  # the next write says whether the database is back
            self.pending = updates
            log.warning("could not record PROCESSING for %d message(s): %s", len(updates), describe(exc))


def conclude(w: Work, policy: RetryPolicy) -> None:
    """Set the outcome of an attempt whose plugins have run, and the status to record."""
    if not w.failures:
        info = "deleted" if w.message.action == DELETE else None
        w.final = (w.message, DONE, info)
        w.outcome = Outcome(w.message.uuid, DONE, Action.ACK, reason=info, attempt=w.attempt)
        return
    reason = "; ".join(f"plugin {f.plugin}: {f.reason}" for f in w.failures)
    fail(w, reason, any(f.retryable for f in w.failures), w.failures[0].plugin, policy)


def fail(w: Work, reason: str, retryable: bool, plugin: str | None, policy: RetryPolicy) -> None:
    """Set the outcome of a failed attempt, and the status to record: RETRY while attempts remain, else FAILED."""
    attempt, message = w.attempt, w.message
    reason = abbreviate(reason, MAX_REASON_CHARS)  # stored and logged: a plugin's exception may hold anything
    if retryable and policy.may_retry(attempt):
        delay = policy.delay_for(attempt)
        info = f"attempt {attempt} of {policy.max_attempts} failed, retrying in {delay:g}s: {reason}"
        w.final = (message, RETRY, info)
        w.outcome = Outcome(message.uuid, RETRY, Action.RETRY, reason=reason, plugin=plugin, delay=delay,
                            attempt=attempt)
        return
    if retryable:
        reason = f"gave up after {attempt} attempt{'s' if attempt > 1 else ''}: {reason}"
    w.final = (message, FAILED, reason)
    w.outcome = Outcome(message.uuid, FAILED, Action.DEAD_LETTER, reason=reason, plugin=plugin, attempt=attempt)
