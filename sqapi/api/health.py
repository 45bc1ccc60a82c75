"""Component health for ``GET /health``: each system sqapi depends on, pinged with a time limit."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

UP, DOWN = "up", "down"


@dataclass
class Component:
    name: str                 # database, msg_broker, data_store, meta_store
    kind: str                 # the configured type (sqlite, rabbitmq, ...)
    ping: Callable[[], Any]   # raises when the component cannot be used


class HealthCheck:
    """Pings every component at once; a ping that raises or outlasts ``timeout`` seconds is down.

    At most one ping per component is in flight: while a component's previous ping has not
    returned, it is reported down without another ping being queued behind it, so a hanging
    system never uses up the threads that ping the others.
    """

    def __init__(self, components: Iterable[Component], timeout: float = 5.0,
                 mask: Callable[[str], str] = lambda text: text) -> None:
        self.components = list(components)
        self.timeout = timeout
        self.mask = mask
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(self.components)),
                                                               thread_name_prefix="sqapi-health")
        self._lock = threading.Lock()
        self._in_flight: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}

    def check(self) -> dict[str, Any]:
        """``{"status": "up"|"down", "down": [names], "components": {name: {state, type, ...}}}``."""
        started = time.monotonic()
        report: dict[str, dict[str, Any]] = {}
        futures: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}
        with self._lock:
            for component in self.components:
                previous = self._in_flight.get(component.name)
                if previous is not None and not previous.done():
                    report[component.name] = {"state": DOWN, "type": component.kind,
                                              "error": "still checking, previous ping has not returned"}
                    continue
                futures[component.name] = self._in_flight[component.name] = \
                    self._executor.submit(self._ping, component)
        for component in self.components:
            if component.name not in futures:
                continue
            remaining = max(0.0, self.timeout - (time.monotonic() - started))
            try:
                report[component.name] = futures[component.name].result(timeout=remaining)
            except concurrent.futures.TimeoutError:
                report[component.name] = {"state": DOWN, "type": component.kind,
                                          "error": f"no answer within {self.timeout:g}s"}
        report = {c.name: report[c.name] for c in self.components}
        down = [name for name, entry in report.items() if entry["state"] != UP]
        return {"status": DOWN if down else UP, "down": down, "components": report}

    def _ping(self, component: Component) -> dict[str, Any]:
        started = time.monotonic()
        try:
            component.ping()
        except Exception as exc:  # any failure means "down"; the reason is shown, masked of secrets
            text = str(exc) or type(exc).__name__
            return {"state": DOWN, "type": component.kind, "error": self.mask(text)}
        return {"state": UP, "type": component.kind,
                "latency_ms": round((time.monotonic() - started) * 1000.0, 2)}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
