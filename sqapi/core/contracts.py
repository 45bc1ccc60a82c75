"""What core asks of the parts it is given: one Protocol per topic, listing exactly what core calls.

Connectors implement these (``sqapi.connectors.*``); core never imports them.  The app hands the
processor a status store, a data store and a metadata store that satisfy them, and a listener
hands deliveries to the processor.

* :class:`StatusStore` -- the status database (``database.type``): every message's and every
  plugin's status.  ``sqapi.connectors.db.StatusStore`` implements all of it in portable SQL
  (PostgreSQL and SQLite build on it); a database type of your own subclasses it.
* :class:`DataStore` -- brings a message's data object to local disk (:class:`LocalCopy`).
* :class:`MetaStore` -- fetches a message's metadata.
* :class:`Listener` -- delivers messages until stopped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass
class LocalCopy:
    """A data object on local disk; ``temporary`` ones are deleted by :meth:`release`."""

    path: str
    temporary: bool

    def release(self) -> None:
        if self.temporary:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


@runtime_checkable
class StatusStore(Protocol):
    """The status database as the processor uses it.  Rows are dicts; ``message`` is a parsed message."""

    def claim(self, uuid: str) -> AbstractContextManager[Any]:
        """Hold ``uuid`` for one attempt; a second attempt at it waits (raises when it waits too long)."""

    def try_claim(self, uuid: str) -> AbstractContextManager[bool]:
        """:meth:`claim` without waiting: yields whether ``uuid`` is held now."""

    def claim_many(self, uuids: Sequence[str]) -> AbstractContextManager[set[str]]:
        """Hold several uuids for one batch; yields those held (perhaps fewer)."""

    def claim_attempts(self, messages: Sequence[Any], status: str) \
            -> AbstractContextManager[dict[str, dict[str, Any] | None]]:
        """Claim and count an attempt at each message; yields uuid -> its row as it was, for those held."""

    def record_attempt(self, message: Any, status: str) -> dict[str, Any] | None:
        """Count an attempt, set ``status``; the row as it was before (None: a new uuid)."""

    def record_attempts(self, messages: Sequence[Any], status: str) -> list[dict[str, Any] | None]:
        """:meth:`record_attempt` for several messages in one go."""

    def restart_attempts(self, attempts: dict[str, int]) -> None:
        """Set the attempt count of uuids that start over (new data after DONE)."""

    def update_message(self, message: Any, status: str, info: str | None = None) -> None:
        """Set a message's status (and why)."""

    def update_messages(self, updates: Sequence[tuple[Any, str, str | None]]) -> None:
        """:meth:`update_message` for several, in one transaction."""

    def record_progress(self, updates: Sequence[tuple[Any, str, str | None]], rows: Sequence[dict[str, Any]],
                        last: bool = False) -> None:
        """Plugin rows and message statuses in one transaction; ``last``: the claim may end with it."""

    def get_plugin_rows(self, uuid: str) -> list[dict[str, Any]]:
        """Every plugin's latest row for ``uuid``."""

    def forget_plugin_rows(self, uuids: list[str]) -> None:
        """Drop the plugin rows of uuids whose data changed: every plugin runs again."""


class DataStore(Protocol):
    def fetch(self, object_ref: str) -> LocalCopy:
        """Bring ``object_ref`` to local disk (a missing object raises a retryable error)."""


class MetaStore(Protocol):
    def fetch(self, reference: str) -> dict[str, Any]:
        """The metadata ``reference`` names."""


class Listener(Protocol):
    def start_listeners(self) -> None:
        """Deliver messages to the processor until :meth:`stop`."""

    def stop(self) -> None:
        """Stop delivering; in-flight messages finish."""
