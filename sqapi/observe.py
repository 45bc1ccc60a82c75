"""``sqapi loader``'s own port: ``/metrics`` summed over every loader process, and health probes.

``processing.metrics_port`` (or ``sqapi loader --metrics-port``) switches it on; off by default.

* **Metrics.**  Every loader process counts what its processor does (the counters and
  histograms of :class:`~sqapi.api.metrics.ProcessMetrics`).  With several loader processes,
  ``sqapi loader`` -- the supervisor -- gives them one folder for prometheus-client's
  multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set before they start), and its scrape adds
  them up: ``sqapi_messages_processed_total`` is the sum over every process, restarted ones
  included.  With one process, it serves its own.
* **Health.**  ``/health/live`` answers 200 while every loader process runs and consumes (its
  listener holds a connection and a consumer: ``sqapi_loader_consuming``), 503 otherwise;
  ``/health/ready`` answers 200 while the status database answers a ping; ``/health`` is both.
  Bodies are JSON, saying why.

Served by waitress on ``processing.metrics_host`` (127.0.0.1 by default) in a thread.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONSUMING = "sqapi_loader_consuming"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def metrics_address(config: Any, port: int | None = None) -> tuple[str, int] | None:
    """Where ``sqapi loader`` serves its metrics and health, or None (off)."""
    processing = config.get("processing") or {}
    port = processing.get("metrics_port") if port is None else port
    if port is None or port == "":
        return None
    return str(processing.get("metrics_host") or "127.0.0.1"), int(port)


class MultiprocessFolder:
    """The folder the loader processes write their metrics to; made before they start, removed at the end."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="sqapi-metrics-")
        os.environ[MULTIPROC_ENV] = self.path  # inherited by every loader process the supervisor starts

    def process_gone(self, pid: int) -> None:
        """A loader process exited: its live gauges stop counting (its counters stay in the sum)."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.path)

    def close(self) -> None:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(self.path, ignore_errors=True)


def summed_registry(folder: str) -> Any:
    """A registry whose scrape adds up the metrics every process wrote to ``folder``."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)
    return registry


def consuming_values(registry: Any) -> dict[str, float]:
    """``sqapi_loader_consuming`` per loader process (pid label in multiprocess mode, "" otherwise)."""
    values: dict[str, float] = {}
    for family in registry.collect():
        if family.name == CONSUMING:
            for sample in family.samples:
                values[sample.labels.get("pid", "")] = sample.value
    return values


class ConsumingProbe:
    """In a loader process: sets ``sqapi_loader_consuming`` from its listener once a second."""

    def __init__(self, listener: Any, registry: Any = None) -> None:
        from prometheus_client import Gauge

        kwargs: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.gauge = Gauge(CONSUMING, "1 while this loader process's listener is connected and consuming",
                           multiprocess_mode="liveall", **kwargs)
        self.listener = listener
        self._stop = threading.Event()
        self.gauge.set(0)
        threading.Thread(target=self._run, name="sqapi-consuming-probe", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.gauge.set(1 if self.listener.consuming else 0)

    def stop(self) -> None:
        self._stop.set()
        self.gauge.set(0)


def status_app(registry: Any, live: Callable[[], tuple[bool, dict[str, Any]]],
               ready: Callable[[], tuple[bool, dict[str, Any]]]) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: ``/metrics``, ``/health/live``, ``/health/ready``, ``/health``."""
    from prometheus_client import generate_latest

    def respond(start_response: Callable[..., Any], status: str, body: bytes, content_type: str) -> list[bytes]:
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return respond(start_response, "405 Method Not Allowed", b"GET only\n", "text/plain")
        if path == "/metrics":
            return respond(start_response, "200 OK", generate_latest(registry), CONTENT_TYPE)
        checks = {"/health/live": [("live", live)], "/health/ready": [("ready", ready)],
                  "/health": [("live", live), ("ready", ready)]}.get(path)
        if checks is None:
            return respond(start_response, "404 Not Found", b"/metrics, /health, /health/live, /health/ready\n",
                           "text/plain")
        report: dict[str, Any] = {}
        healthy = True
        for name, check in checks:
            ok, detail = check()
            report[name] = {"ok": ok, **detail}
            healthy = healthy and ok
        body = json.dumps({"status": "up" if healthy else "down", **report}, default=str).encode()
        return respond(start_response, "200 OK" if healthy else "503 Service Unavailable", body, "application/json")

    return app


class StatusServer:
    """``status_app`` served by waitress in a thread."""

    def __init__(self, app: Callable[..., Iterable[bytes]], host: str, port: int) -> None:
        from waitress.server import create_server

        self.server = create_server(app, host=host, port=port, threads=2, clear_untrusted_proxy_headers=True)
        self.host, self.port = host, int(self.server.effective_port)  # type: ignore[union-attr]
        self.thread = threading.Thread(target=self.server.run, name="sqapi-metrics-server", daemon=True)

    def start(self) -> StatusServer:
        self.thread.start()
        log.info("metrics and health on http://%s:%d/metrics and /health", self.host, self.port)
        return self

    def stop(self) -> None:
        self.server.close()
        self.thread.join(5)


def database_ready(ping: Callable[[], Any]) -> Callable[[], tuple[bool, dict[str, Any]]]:
    """Readiness: the status database answers ``ping``."""

    def check() -> tuple[bool, dict[str, Any]]:
        try:
            ping()
        except Exception as exc:  # down, whatever the reason; the message names no secret (connector errors)
            return False, {"database": "down", "error": str(exc) or type(exc).__name__}
        return True, {"database": "up"}

    return check
