"""Serving the API with waitress (a production WSGI server), stoppable from another thread.

``sqapi api`` serves in the foreground; ``sqapi run`` serves in a thread beside the listener.
:meth:`ApiServer.stop` makes the serving loop close every socket and return, so both commands
stop cleanly on SIGTERM.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from waitress import wasyncore
from waitress.server import create_server

from sqapi.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 5000
POLL_SECONDS = 0.2  # how soon a stop request is noticed by the serving loop


def listen_address(config: Any) -> tuple[str, int]:
    """``api.host`` and ``api.port`` from the config (port 0 picks a free one)."""
    section = config.get("api") or {}
    host = str(section.get("host") or DEFAULT_HOST)
    port = section.get("port", DEFAULT_PORT)
    try:
        number = int(port)
    except (TypeError, ValueError):
        raise ConfigError("api.port", f"'{port}' is not a port number", "set a number from 0 to 65535",
                          getattr(config, "source", None)) from None
    if not 0 <= number <= 65535:
        raise ConfigError("api.port", f"{number} is out of range", "set a number from 0 to 65535",
                          getattr(config, "source", None))
    return host, number


class ApiServer:
    """A waitress server bound at construction (so a taken port fails at once) and served by :meth:`serve`."""

    def __init__(self, app: Any, host: str, port: int, threads: int = 4, max_body_bytes: int | None = None) \
            -> None:
        options: dict[str, Any] = {"host": host, "port": port, "threads": threads, "ident": "sqapi"}
        if max_body_bytes:
            options["max_request_body_size"] = max_body_bytes
        self._server = create_server(app, **options)
        self._map: dict[int, Any] = getattr(self._server, "map", None) or self._server._map  # type: ignore[union-attr]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_close: Callable[[], None] | None = None  # run once the server has stopped

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the server listens, as (host, port) pairs with the real port."""
        effective = getattr(self._server, "effective_listen", None)
        if effective:
            return [(str(h), int(p)) for h, p in effective]
        return [(str(self._server.effective_host), int(self._server.effective_port))]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        host, port = self.addresses[0]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve(self) -> None:
        """Serve until :meth:`stop`; then close every socket and finish the worker threads."""
        log.info("API listening on %s", ", ".join(f"{h}:{p}" for h, p in self.addresses))
        try:
            while not self._stop.is_set():
                wasyncore.loop(timeout=POLL_SECONDS, map=self._map, use_poll=True, count=1)
        finally:
            wasyncore.close_all(self._map)
            self._server.task_dispatcher.shutdown(timeout=5)
            if self.on_close is not None:
                self.on_close()
            log.info("API stopped")

    def start(self) -> threading.Thread:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve, name="sqapi-api", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, wait: float | None = 10.0) -> None:
        """Ask the serving loop to stop (safe from signal handlers and other threads)."""
        self._stop.set()
        if self._thread is not None and wait is not None and self._thread is not threading.current_thread():
            self._thread.join(wait)
