"""What the dashboard (``GET /``) shows, read from the status database with portable SQL."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqapi.core.status import MESSAGE_STATUSES, Status

THROUGHPUT_MINUTES = 15
LATEST_FAILURES = 10
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


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


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
            "GROUP BY status", start=_iso(bucket.start), end=_iso(bucket.start + timedelta(minutes=1)))
        bucket.counts = {str(row["status"]): int(row["n"]) for row in rows}
    return buckets


def latest_failures(database: Any, limit: int = LATEST_FAILURES) -> list[dict[str, Any]]:
    """The newest FAILED messages, each with the plugins that failed on it and why."""
    failures = []
    for row in database.list_messages(status=Status.FAILED, limit=limit):
        plugins = [p for p in database.get_plugin_rows(row["uuid"]) if p["status"] == Status.FAILED]
        failures.append({**row, "failed_plugins": plugins})
    return failures


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
