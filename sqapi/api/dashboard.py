"""What the dashboard (``GET /``) shows, read from the status database with portable SQL."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqapi import registry
from sqapi.connectors.db import in_params
from sqapi.core.status import MESSAGE_STATUSES, Status
from sqapi.redrive import like_pattern
from sqapi.times import parse_moment, utc_text

THROUGHPUT_MINUTES = 15
LATENCY_SAMPLE = 500      # latest runs per plugin that latency percentiles are computed over


@dataclass
class MinuteBucket:
    start: datetime
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def label(self) -> str:
        return self.start.strftime("%H:%M")


@dataclass
class PluginLatency:
    plugin: str
    runs: int
    failed: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def counts_by_status(database: Any) -> dict[str, int]:
    counts = database.count_by_status()
    return {status: int(counts.get(status, 0)) for status in MESSAGE_STATUSES} | \
        {s: int(n) for s, n in counts.items() if s not in MESSAGE_STATUSES}


def throughput(database: Any, now: datetime | None = None, minutes: int = THROUGHPUT_MINUTES) \
        -> list[MinuteBucket]:
    """Messages whose last update (``messages.updated_at``) fell in each of the last ``minutes`` minutes."""
    now = now or datetime.now(UTC)
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    buckets = [MinuteBucket(end - timedelta(minutes=minutes - i)) for i in range(minutes)]
    for bucket in buckets:
        rows = database.execute_query(
            "SELECT status, COUNT(*) AS n FROM messages WHERE updated_at >= %(start)s AND updated_at < %(end)s "
            "GROUP BY status", start=utc_text(bucket.start), end=utc_text(bucket.start + timedelta(minutes=1)))
        bucket.counts = {str(row["status"]): int(row["n"]) for row in rows}
    return buckets


def plugin_latency(database: Any, names: list[str], sample: int = LATENCY_SAMPLE) -> list[PluginLatency]:
    """Latency percentiles over each plugin's latest ``sample`` runs (``message_plugins.duration_ms``)."""
    known = {str(r["plugin"]) for r in database.execute_query("SELECT DISTINCT plugin FROM message_plugins")}
    result = []
    for name in sorted(set(names) | known):
        rows = database.execute_query(
            "SELECT status, duration_ms FROM message_plugins WHERE plugin = %(plugin)s "
            "ORDER BY updated_at DESC LIMIT %(limit)s", plugin=name, limit=sample)
        durations = sorted(float(r["duration_ms"]) for r in rows if r["duration_ms"] is not None)
        result.append(PluginLatency(
            plugin=name, runs=len(rows), failed=sum(1 for r in rows if r["status"] == Status.FAILED),
            p50_ms=_percentile(durations, 0.50), p95_ms=_percentile(durations, 0.95),
            max_ms=durations[-1] if durations else None))
    return result


def decode_result(text: Any) -> Any:
    """``message_plugins.result`` is JSON text; show it as JSON (or as it is when it is not)."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


# -- the message list: filters, search, pages ------------------------------------------------------
PAGE_SIZE, MAX_PAGE_SIZE = 25, 200
FAILURE_RATE_HOURS = 24


def _moment(text: str, name: str) -> str:
    """An ISO 8601 time (a date alone is its midnight, no zone is UTC) as the ISO text the queries compare."""
    try:
        return utc_text(parse_moment(text))
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 time, e.g. 2026-11-30 or 2026-11-30T06:00") from None


@dataclass
class MessageFilter:
    """What the dashboard's message list shows: ``status``, ``plugin`` (one it has a row for), ``since``/``until``
    (on ``updated_at``, both ends included), ``q`` (a uuid, or part of a data/meta location), a page of
    ``limit`` rows after the cursor ``before``/``before_uuid``."""

    status: str | None = None
    plugin: str | None = None
    since: str | None = None
    until: str | None = None
    q: str | None = None
    limit: int = PAGE_SIZE
    before: str | None = None
    before_uuid: str | None = None

    @classmethod
    def from_args(cls, args: Any) -> MessageFilter:
        """From a request's query string (or form); :class:`ValueError` says which value is wrong and why."""
        def text(name: str) -> str | None:
            value = (args.get(name) or "").strip()  # a NUL: refused before (the app's guard, _selection_from)
            return value or None

        status = text("status")
        if status is not None:
            status = status.upper()
            if status not in MESSAGE_STATUSES:
                raise ValueError(f"status must be one of {', '.join(MESSAGE_STATUSES)}")
        raw_limit = text("limit") or str(PAGE_SIZE)
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE_SIZE:
            raise ValueError(f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}")
        since, until, before = text("since"), text("until"), text("before")
        return cls(status=status, plugin=text("plugin"), q=text("q"), limit=int(raw_limit),
                   since=_moment(since, "since") if since else None,
                   until=_moment(until, "until") if until else None,
                   before=_moment(before, "before") if before else None, before_uuid=text("before_uuid"))

    def selection(self) -> dict[str, str]:
        """The filters alone (no page), as query arguments."""
        chosen = {"status": self.status, "plugin": self.plugin, "since": self.since, "until": self.until,
                  "q": self.q}
        return {name: value for name, value in chosen.items() if value}

    @property
    def filtered(self) -> bool:
        return bool(self.selection())


def find_messages(database: Any, wanted: MessageFilter) -> tuple[list[dict[str, Any]], dict[str, str] | None]:
    """One page of messages, newest ``updated_at`` first, each with ``failed_plugins``; and the cursor of the
    next page (``None`` on the last)."""
    clauses: list[str] = []
    params: dict[str, Any] = {"limit": wanted.limit}
    if wanted.status:
        clauses.append("m.status = %(status)s")
        params["status"] = wanted.status
    if wanted.plugin:
        clauses.append("EXISTS (SELECT 1 FROM message_plugins p WHERE p.uuid = m.uuid AND p.plugin = %(plugin)s)")
        params["plugin"] = wanted.plugin
    if wanted.since:
        clauses.append("m.updated_at >= %(since)s")
        params["since"] = wanted.since
    if wanted.until:  # both ends included, as redrive and `sqapi messages` select
        clauses.append("m.updated_at <= %(until)s")
        params["until"] = wanted.until
    if wanted.q:
        clauses.append("(m.uuid = %(q)s OR LOWER(m.uuid) LIKE %(pattern)s ESCAPE '\\' "
                       "OR LOWER(m.data_location) LIKE %(pattern)s ESCAPE '\\' "
                       "OR LOWER(m.meta_location) LIKE %(pattern)s ESCAPE '\\')")
        params.update(q=wanted.q, pattern=like_pattern(wanted.q))
    if wanted.before and wanted.before_uuid:
        clauses.append("(m.updated_at < %(before)s OR (m.updated_at = %(before)s AND m.uuid > %(before_uuid)s))")
        params.update(before=wanted.before, before_uuid=wanted.before_uuid)
    elif wanted.before:
        clauses.append("m.updated_at < %(before)s")
        params["before"] = wanted.before
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = database.execute_query(
        "SELECT m.uuid, m.status, m.info, m.attempts, m.data_location, m.meta_location, m.data_type, "
        f"m.created_at, m.updated_at FROM messages m {where} ORDER BY m.updated_at DESC, m.uuid "
        "LIMIT %(limit)s", **params)
    failed: dict[str, list[str]] = {}
    if rows:
        placeholders, names = in_params([row["uuid"] for row in rows])
        for row in database.execute_query(
                f"SELECT uuid, plugin FROM message_plugins WHERE status = %(failed)s AND uuid IN ({placeholders}) "
                "ORDER BY plugin", failed=Status.FAILED, **names):
            failed.setdefault(str(row["uuid"]), []).append(str(row["plugin"]))
    for row in rows:
        row["failed_plugins"] = failed.get(str(row["uuid"]), [])
    cursor = None
    if len(rows) == wanted.limit:
        last = rows[-1]
        moment = last["updated_at"]
        cursor = {"before": moment.isoformat() if isinstance(moment, datetime) else str(moment),
                  "before_uuid": str(last["uuid"])}
    return rows, cursor


# -- failure rate per plugin over time ------------------------------------------------------------
@dataclass
class FailureRate:
    """One plugin's runs and failures in each hour of the window (oldest hour first)."""

    plugin: str
    runs: list[int]
    failed: list[int]

    @property
    def rates(self) -> list[float | None]:
        return [f / r if r else None for r, f in zip(self.runs, self.failed, strict=True)]


def _history_source(database: Any) -> tuple[str, str]:
    """(table, its time column): every attempt (``message_events``) when the database type keeps it (the
    registry says), else the latest run of each plugin (``message_plugins``)."""
    if registry.has_history(database):
        return "message_events", "at"
    return "message_plugins", "updated_at"


def failure_rates(database: Any, now: datetime | None = None, hours: int = FAILURE_RATE_HOURS) \
        -> tuple[list[datetime], list[FailureRate], str]:
    """Runs and failures per plugin per hour over the last ``hours`` hours, in one query: the hours'
    starts, a :class:`FailureRate` per plugin, and the table counted."""
    now = now or datetime.now(UTC)
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    starts = [end - timedelta(hours=hours - i) for i in range(hours)]
    table, column = _history_source(database)
    params: dict[str, Any] = {f"h{i}": utc_text(start) for i, start in enumerate(starts)}
    params.update(end=utc_text(end), failed=Status.FAILED)
    columns = []
    for i in range(hours):
        upper = f"%(h{i + 1})s" if i + 1 < hours else "%(end)s"
        inside = f"{column} >= %(h{i})s AND {column} < {upper}"
        columns.append(f"SUM(CASE WHEN {inside} THEN 1 ELSE 0 END) AS r{i}")
        columns.append(f"SUM(CASE WHEN {inside} AND status = %(failed)s THEN 1 ELSE 0 END) AS f{i}")
    rows = database.execute_query(
        f"SELECT plugin, {', '.join(columns)} FROM {table} WHERE plugin IS NOT NULL "
        f"AND {column} >= %(h0)s AND {column} < %(end)s "
        "GROUP BY plugin ORDER BY plugin", **params)
    rates = [FailureRate(str(row["plugin"]), [int(row[f"r{i}"] or 0) for i in range(hours)],
                         [int(row[f"f{i}"] or 0) for i in range(hours)]) for row in rows]
    return starts, rates, table
