"""Prometheus metrics: one :class:`Metrics` per API app, in its own ``CollectorRegistry``.

Two sources:

* the status database, read at every scrape, so that ``sqapi_messages{status}`` always
  equals what the database holds (whichever process did the work);
* the processor of this process, observed through :class:`~sqapi.core.processor.ProcessorHooks`:
  plugin durations, plugin failures by kind, messages in flight, retries and dead-letters.

Label values are bounded: failures are labelled by the kind of error (an exception's type
name, ``timeout``), never by the message text, and each plugin keeps at most
:data:`MAX_REASONS_PER_PLUGIN` kinds (more are counted as ``other``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sqapi.core.outcome import Action, Outcome
from sqapi.core.status import MESSAGE_STATUSES, Status

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REASONS_PER_PLUGIN = 20
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_TYPE_PREFIX = re.compile(r"^([A-Za-z_][\w.]{0,79}):\s")


def failure_kind(reason: str | None) -> str:
    """A bounded label for a failure reason: the exception type name, ``timeout`` or ``error``."""
    if not reason:
        return "error"
    if reason.startswith("timed out after"):
        return "timeout"
    match = _TYPE_PREFIX.match(reason)
    return match.group(1).rsplit(".", 1)[-1] if match else "error"


class DatabaseCollector(Collector):
    """Message and plugin-row counts straight from the status database, at scrape time."""

    def __init__(self, database: Any) -> None:
        self.database = database

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("sqapi_status_database_up", "1 when the status database answered this scrape")
        try:
            counts = self.database.count_by_status()
            plugin_rows = self.database.execute_query(
                "SELECT plugin, status, COUNT(*) AS n FROM message_plugins GROUP BY plugin, status")
        except Exception as exc:  # a scrape must answer even with the database down
            log.warning("metrics: status database unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        messages = GaugeMetricFamily("sqapi_messages", "Messages in the status database by status",
                                     labels=["status"])
        for status in sorted(set(MESSAGE_STATUSES) | set(counts)):
            messages.add_metric([status], counts.get(status, 0))
        yield messages
        plugins = GaugeMetricFamily("sqapi_plugin_messages",
                                    "Per-plugin outcomes in the status database (message_plugins rows)",
                                    labels=["plugin", "status"])
        for row in plugin_rows:
            plugins.add_metric([str(row["plugin"]), str(row["status"])], int(row["n"]))
        yield plugins


class ProcessMetrics:
    """What this process's processor does, as a :class:`~sqapi.core.processor.ProcessorHooks`.

    In prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set when the process
    started: a loader process under ``sqapi loader``'s supervisor, see :mod:`sqapi.observe`) the
    values go to that folder and the supervisor's scrape adds up every process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.in_flight = Gauge("sqapi_messages_in_flight", "Messages being processed now",
                               registry=self.registry, multiprocess_mode="livesum")
        self.processed = Counter("sqapi_messages_processed", "Deliveries processed, by outcome",
                                 ["status"], registry=self.registry)
        self.message_duration = Histogram("sqapi_message_duration_seconds", "Time to process one delivery",
                                          ["status"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.plugin_duration = Histogram("sqapi_plugin_duration_seconds", "Time one plugin took on one message",
                                         ["plugin", "status"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.plugin_failures = Counter("sqapi_plugin_failures", "Plugin failures by kind of error",
                                       ["plugin", "reason"], registry=self.registry)
        self.retries = Counter("sqapi_retries", "Deliveries scheduled for another attempt", registry=self.registry)
        self.dead_letters = Counter("sqapi_dead_letters", "Deliveries given up on (dead-lettered)",
                                    registry=self.registry)
        self._reasons: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    # -- ProcessorHooks -----------------------------------------------------------------------
    def message_started(self) -> None:
        self.in_flight.inc()

    def message_finished(self, outcome: Outcome, seconds: float) -> None:
        self.in_flight.dec()
        self.processed.labels(outcome.status).inc()
        self.message_duration.labels(outcome.status).observe(seconds)
        if outcome.action is Action.RETRY:
            self.retries.inc()
        elif outcome.action is Action.DEAD_LETTER:
            self.dead_letters.inc()

    def plugin_finished(self, plugin: str, status: str, seconds: float, reason: str | None) -> None:
        self.plugin_duration.labels(plugin, status).observe(seconds)
        if status != Status.DONE:
            self.plugin_failures.labels(plugin, self._bounded_kind(plugin, reason)).inc()

    def _bounded_kind(self, plugin: str, reason: str | None) -> str:
        kind = failure_kind(reason)
        with self._lock:
            seen = self._reasons.setdefault(plugin, set())
            if kind not in seen:
                if len(seen) >= MAX_REASONS_PER_PLUGIN:
                    return "other"
                seen.add(kind)
        return kind

    # -- exposition ---------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)


class Metrics(ProcessMetrics):
    """The API's metrics: the status database's counts at every scrape, and this process's processing."""

    def __init__(self, database: Any) -> None:
        super().__init__()
        self.registry.register(DatabaseCollector(database))
