"""Re-run what did not finish: ``sqapi redrive`` and ``sqapi reprocess``, and the dashboard's redrive button.

:func:`redrive` selects messages in the status database (by uuid, status, plugin, time, reason),
reopens their status rows so that the retry policy counts attempts from the start again, and
re-publishes each through the configured broker's publisher; it also drains the messages that
match from where given-up messages are set aside (RabbitMQ's ``<queue>.dead``, the spool
folder's ``failed/``), removing each only after its re-publish is confirmed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqapi.core.status import MESSAGE_STATUSES

__all__ = ["Report", "Selection", "SelectionError", "redrive"]


class SelectionError(ValueError):
    """A selection that cannot be right (an unknown status, ``since`` after ``until``, nothing to select by)."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which messages to re-run.  Every criterion given must hold (they combine with AND).

    ``uuids``: these messages only; ``status``: their ``messages.status``; ``plugin``: a plugin
    whose row is not DONE (with ``status``: whose row has that status); ``since``/``until``: when
    the message's row last changed (``updated_at``); ``reason``: a substring of the message's (or
    that plugin's) ``info``, or of the dead letter's reason.
    """

    uuids: tuple[str, ...] = ()
    status: str | None = None
    plugin: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    reason: str | None = None

    def check(self) -> None:
        """Raise :class:`SelectionError` saying what is wrong with this selection."""
        if self.status is not None and self.status.upper() not in MESSAGE_STATUSES:
            raise SelectionError(f"unknown status {self.status!r}; one of: {', '.join(MESSAGE_STATUSES)}")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise SelectionError(f"since ({self.since.isoformat()}) is after until ({self.until.isoformat()})")


@dataclasses.dataclass
class Report:
    """What a redrive did (or, dry, would do)."""

    selected: list[str] = dataclasses.field(default_factory=list)   # uuids from the status database
    republished: int = 0                                             # messages published again
    from_dead: int = 0                                               # of those, drained from .dead / failed/
    lines: list[str] = dataclasses.field(default_factory=list)      # one per message: what was / would be done


def redrive(config: Mapping[str, Any], selection: Selection, *, dry_run: bool = False,
            progress: Callable[[str], None] | None = None) -> Report:
    """Re-publish the selected messages so that the plugins that did not finish run again.

    ``config`` is sqapi's merged config.  Raises :class:`SelectionError` for a bad selection and
    :class:`sqapi.errors.SqapiError` when the database or the broker cannot be reached.
    """
    selection.check()
    raise NotImplementedError
