"""What the data and meta store adapters share: a connector module, or the object its ``connect()`` made."""

from __future__ import annotations

from typing import Any

from sqapi.errors import ConnectorError, NotFound, SqapiError


class StoreAdapter:
    """Calls a store module's function (``fn(config, ref)``), or the same method of its connection.

    ``topic`` names the store in error messages.  Errors are translated to sqapi's kinds:
    sqapi's own pass through, any :class:`LookupError` becomes :class:`NotFound` (retried),
    anything else :class:`ConnectorError` (retried).
    """

    topic = "store"

    def __init__(self, module: Any, config: dict[str, Any]) -> None:
        self.module = module
        self.config = config
        self.kind = str(config.get("type"))
        self._connection: Any = None

    def connect(self) -> None:
        if hasattr(self.module, "connect"):
            self._connection = self.module.connect(self.config)

    def call(self, function: str, reference: str) -> Any:
        try:
            if self._connection is not None:
                return getattr(self._connection, function)(reference)
            return getattr(self.module, function)(self.config, reference)
        except SqapiError:
            raise
        except LookupError as exc:
            raise NotFound(str(exc) or f"{reference} not found") from exc
        except Exception as exc:
            raise ConnectorError(f"{self.topic} '{self.kind}' failed: {type(exc).__name__}: {exc}") from exc

    def ping(self) -> None:
        if self._connection is not None:
            self._connection.ping()
        elif hasattr(self.module, "ping"):
            self.module.ping(self.config)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
