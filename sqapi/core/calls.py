"""What the processor hands the runner for one plugin, and what comes back.

A :class:`Call` is one message's private arguments.  The runner answers each call with a
:data:`Ran`: ``(result, error, seconds)``.  A plugin with ``execute_batch`` gets the calls of a
batch as one :class:`BatchCall` (its ``items``), and answers it with one outcome per item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Any

from sqapi.core.message import Message

#: seconds calls run before the runner's ``on_slow`` is called, and before the calls queued behind a call still
#: running are handed to other workers (read as ``calls.SLOW_AFTER`` where used, so a test can change it)
SLOW_AFTER = 0.2

#: a plugin call's result, error and duration (seconds)
Ran = tuple[Any, BaseException | None, float]


@dataclass
class Call:
    """One plugin call's private arguments: its own copies of the message and metadata, and the data's path.

    Each item an ``execute_batch`` hook gets is one of these."""

    message: Message
    metadata: dict[str, Any]
    path: str
    #: the W3C trace context of the call's plugin span (``traceparent``), when tracing is on: the call runs in it
    #: (a worker process too), so a plugin's outgoing requests can carry it
    trace_context: dict[str, str] | None = None

    def open(self) -> IO[bytes]:
        """The data as a binary file object (what ``execute`` gets as ``data``); the caller closes it."""
        return open(self.path, "rb")


@dataclass
class BatchCall:
    """One ``execute_batch`` call: the calls of a batch, in order, run as one (one worker, one timeout)."""

    items: list[Call]


#: what a runner runs at once: one message's call, or a batch plugin's whole batch
Job = Call | BatchCall


@dataclass
class BatchAnswer:
    """A :class:`BatchCall`'s outcomes as a worker process hands them back, per item and in order:
    ``("done", result)`` or ``("error", reason, retryable, traceback)`` (an exception need not pickle)."""

    outcomes: list[tuple[Any, ...]]
