"""What the processor hands the runner for one plugin, and what comes back.

A :class:`Call` is one message's private arguments.  The runner answers each call with a
:data:`Ran`: ``(result, error, seconds)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqapi.core.message import Message

#: seconds calls run before the runner's ``on_slow`` is called, and before the calls queued behind a call still
#: running are handed to other workers (read as ``calls.SLOW_AFTER`` where used, so a test can change it)
SLOW_AFTER = 0.2

#: a plugin call's result, error and duration (seconds)
Ran = tuple[Any, BaseException | None, float]


@dataclass
class Call:
    """One plugin call's private arguments: its own copies of the message and metadata, and the data's path."""

    message: Message
    metadata: dict[str, Any]
    path: str
