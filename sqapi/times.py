"""Times as operators type them and as the status tables store them: one parser, one formatter.

The status database writes every time as ISO 8601 UTC text with milliseconds
(``2026-11-30T06:00:00.000+00:00``, :func:`sqapi.connectors.db.utcnow`): text that sorts as it
reads, so SQLite compares it as text and PostgreSQL as a time alike.  A time compared with those
columns must be written the same way (:func:`utc_text`): ``07:00:00+00:00`` sorts after
``07:00:00.000+00:00`` as text, and a row at exactly that moment would be missed.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["as_utc", "parse_moment", "utc_text"]


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive one is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_moment(text: str) -> datetime:
    """An ISO 8601 date or time (``2026-11-30``, ``2026-11-30T06:00``, with an offset or ``Z``) as an aware
    datetime; a date alone is its midnight, no offset is UTC.  :class:`ValueError` says what is wrong."""
    try:
        return as_utc(datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00")))
    except (ValueError, OverflowError):
        raise ValueError(f"not a date or time: {text!r} (use ISO 8601, e.g. 2026-11-30T06:00Z)") from None


def utc_text(moment: datetime) -> str:
    """``moment`` as the status tables write times: ISO 8601 UTC, milliseconds (naive is UTC)."""
    return as_utc(moment).isoformat(timespec="milliseconds")
