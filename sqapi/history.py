"""A message's history (``message_events``): how it reads, and how old events are let go.

The status database writes the history itself, in the same statements as the status rows
(:mod:`sqapi.connectors.db`): one event per plugin outcome of every attempt -- with the attempt's
number, the plugin's declared ``version``, its duration and which loader (``host:pid``) wrote it
-- and one per attempt's own outcome (``plugin`` NULL: DONE, RETRY or FAILED).  ``message_plugins``
keeps only each plugin's latest row; the events keep every one.

This module is what reads and trims it, for ``sqapi status`` (:func:`timeline`) and ``sqapi
prune`` (:func:`prune`): portable SQL on any status database (PostgreSQL, SQLite).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqapi.connectors.db import in_params
from sqapi.core.status import Status
from sqapi.times import utc_text

#: the message statuses ``sqapi prune --messages`` removes: work that will not run again by itself
FINISHED = (Status.DONE, Status.FAILED)
#: rows one DELETE removes at most: a long prune holds no lock for long, and a killed one has done its part
BATCH = 5000

_COUNT_EVENTS = "SELECT COUNT(*) AS n FROM message_events WHERE at < %(cutoff)s"
#: by the table's key (uuid, id), the rows found by ``at``
_DELETE_EVENTS = ("DELETE FROM message_events WHERE (uuid, id) IN "
                  "(SELECT uuid, id FROM message_events WHERE at < %(cutoff)s LIMIT %(batch)s) RETURNING id")
_FINISHED = f"status IN ({', '.join(repr(str(s)) for s in FINISHED)}) AND updated_at < %(cutoff)s"
_COUNT_MESSAGES = f"SELECT COUNT(*) AS n FROM messages WHERE {_FINISHED}"
_SELECT_MESSAGES = f"SELECT uuid FROM messages WHERE {_FINISHED} LIMIT %(batch)s"


@dataclass(frozen=True)
class Pruned:
    """What :func:`prune` removed (or, with ``dry_run``, would remove)."""

    cutoff: str
    events: int
    messages: int
    dry_run: bool

    def line(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        text = f"{verb} {self.events} event{'s' if self.events != 1 else ''} older than {self.cutoff}"
        if self.messages:
            text += (f", and {self.messages} finished message{'s' if self.messages != 1 else ''} (DONE, FAILED) "
                     f"last updated before then, with their plugin rows and history")
        return text


def cutoff_of(older_than: timedelta, now: datetime | None = None) -> str:
    """``now - older_than`` as the ISO 8601 UTC text the status database writes (it compares and sorts alike)."""
    return utc_text((now or datetime.now(UTC)) - older_than)


def prune(database: Any, older_than: timedelta, messages: bool = False, dry_run: bool = False,
          now: datetime | None = None, progress: Callable[[int], None] | None = None) -> Pruned:
    """Remove the events older than ``older_than``; with ``messages``, also the finished messages (DONE, FAILED)
    last updated before then, with their plugin rows and events.  ``dry_run`` counts and removes nothing.

    Deletes in batches of :data:`BATCH` rows, each committed on its own: a prune that is stopped
    keeps what it did, and the next one removes the rest.  ``progress`` is told of every batch
    (rows removed)."""
    cutoff = cutoff_of(older_than, now)
    if dry_run:
        events = _count(database, _COUNT_EVENTS, cutoff)
        found = _count(database, _COUNT_MESSAGES, cutoff) if messages else 0
        return Pruned(cutoff, events, found, dry_run=True)
    events = _delete(database, _DELETE_EVENTS, cutoff, progress)
    removed = _delete_messages(database, cutoff, progress) if messages else 0
    return Pruned(cutoff, events, removed, dry_run=False)


def _count(database: Any, query: str, cutoff: str) -> int:
    rows = database.execute_query(query, cutoff=cutoff)
    return int(rows[0]["n"]) if rows else 0


def _delete(database: Any, query: str, cutoff: str, progress: Callable[[int], None] | None) -> int:
    total = 0
    while True:
        removed = len(database.execute_query(query, cutoff=cutoff, batch=BATCH))
        total += removed
        if progress is not None and removed:
            progress(removed)
        if removed < BATCH:
            return total


def _delete_messages(database: Any, cutoff: str, progress: Callable[[int], None] | None) -> int:
    """Finished messages last updated before ``cutoff``, a batch per transaction: each with its events (the table
    has no foreign key, to keep its writes cheap) and its plugin rows (``ON DELETE CASCADE``).

    The DELETE repeats the condition: a message reopened (a redrive) or taken up by a loader between the
    SELECT and the DELETE is no longer finished and stays, its events with it."""
    total = 0
    while True:
        with database.transaction():
            found = [row["uuid"] for row in database.execute_query(_SELECT_MESSAGES, cutoff=cutoff, batch=BATCH)]
            uuids: list[str] = []
            if found:
                listed, names = in_params(found)
                uuids = [row["uuid"] for row in database.execute_query(
                    f"DELETE FROM messages WHERE uuid IN ({listed}) AND {_FINISHED} RETURNING uuid",
                    cutoff=cutoff, **names)]
            if uuids:
                listed, names = in_params(uuids)
                database.execute_query(f"DELETE FROM message_events WHERE uuid IN ({listed})", **names)
        total += len(uuids)
        if progress is not None and uuids:
            progress(len(uuids))
        if len(found) < BATCH:
            return total


def timeline(events: Sequence[dict[str, Any]]) -> list[str]:
    """One line per event, oldest first: when, the attempt, whose (a plugin, or the message), the status,
    how long, the plugin's version, which loader, why."""
    lines = []
    for event in events:
        whose = f"plugin {event['plugin']}" if event.get("plugin") else "message"
        took = f"{event['duration_ms']:.1f} ms" if event.get("duration_ms") is not None else ""
        attempt = f"attempt {event['attempt']}" if event.get("attempt") is not None else "attempt ?"
        details = [part for part in (f"version {event['version']}" if event.get("version") else "",
                                     f"by {event['loader']}" if event.get("loader") else "",
                                     event.get("info") or "") if part]
        lines.append(f"{event['at']!s:<29} {attempt:<10} {whose:<27} {event['status']:<8} {took:>10}  "
                     f"{'; '.join(details)}".rstrip())
    return lines
