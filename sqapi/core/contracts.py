"""What core asks of the parts it is given: one Protocol per topic, listing exactly what core calls.

Connectors implement these (``sqapi.connectors.*``); core never imports them.  The app hands the
processor a status store, a data store and a metadata store that satisfy them, and a listener
hands deliveries to the processor.

* :class:`StatusStore` -- the status database (``database.type``): every message's and every
  plugin's status.  ``sqapi.connectors.db.StatusStore`` implements all of it in portable SQL
  (PostgreSQL and SQLite build on it); a database type of your own subclasses it.
* :class:`DataStore` -- brings a message's data object to local disk (:class:`LocalCopy`).
* :class:`MetaStore` -- fetches a message's metadata.
* :class:`Transport` -- a listener type: receives deliveries and settles them as the processor's
  outcomes say; :class:`sqapi.core.consumer.Consumer` drives every one (threads, batches,
  reconnects, stopping).
* :class:`Listener` -- what runs the message loop (a consumer over a transport, or a listener
  written for sqAPI): consumes until stopped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from sqapi.core.consumer import Inbox, Received
    from sqapi.core.outcome import Outcome


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
        """Bring ``object_ref`` to local disk.  Raises :class:`~sqapi.errors.NotFound` for a missing object and
        :class:`~sqapi.errors.ConnectorError` for an unreachable store (both retried),
        :class:`~sqapi.errors.AccessDenied` for a reference that leaves the store (never retried)."""


class MetaStore(Protocol):
    def fetch(self, reference: str) -> dict[str, Any]:
        """The metadata ``reference`` names, a JSON object.  Raises :class:`~sqapi.errors.NotFound` (missing) and
        :class:`~sqapi.errors.ConnectorError` (unreachable), both retried; :class:`~sqapi.errors.PermanentError`
        when what is there is no JSON object (never retried)."""


class Component(Protocol):
    """Any connector, as ``sqapi check`` and the API's health see it."""

    def ping(self) -> None:
        """Raise unless the system behind it answers."""

    def close(self) -> None:
        """Let go of connections."""


class Transport(Protocol):
    """Where deliveries come from and go to.  Called by one :class:`~sqapi.core.consumer.Consumer`:
    :meth:`open`, :meth:`receive`, :meth:`stop_receiving`, :meth:`hand_back` and :meth:`close` from
    its receiving thread; :meth:`settle` from worker threads; :meth:`interrupt` from any thread."""

    def open(self) -> None:
        """Connect and start receiving; :class:`~sqapi.errors.ConnectorError` when the source cannot be
        reached (the consumer tries again after a growing pause)."""

    def receive(self, inbox: Inbox, timeout: float) -> None:
        """Put what arrives within ``timeout`` seconds in the inbox (``inbox.put``), and do what settling
        needs this thread for.  Raises :class:`~sqapi.errors.ConnectorError` when the source is lost.
        After :meth:`stop_receiving` it only waits and settles."""

    def settle(self, received: Sequence[Received], outcomes: Sequence[Outcome | None]) -> None:
        """Act on each outcome: ``ACK`` removes the delivery, ``RETRY`` gives it again after
        ``outcome.delay`` seconds, ``DEAD_LETTER`` sets it aside with ``outcome.reason``; ``None`` (the
        processor itself failed) gives it back to be delivered again.  Never raises for one delivery:
        what cannot be settled is delivered again by the source."""

    def hand_back(self, received: Sequence[Received]) -> None:
        """Deliveries no worker started: back to the source, unchanged (none lost, no attempt counted)."""

    def stop_receiving(self) -> None:
        """No new deliveries from now on (the consumer is stopping)."""

    def interrupt(self) -> None:
        """Make a :meth:`receive` that is waiting return soon (the consumer was told to stop)."""

    def drained(self) -> bool:
        """True when the source is known to hold nothing more, due now or later (``until_idle``)."""

    def close(self) -> None:
        """Disconnect; deliveries not settled are delivered again by the source."""

    def ping(self) -> None:
        """Check that the source is reachable; :class:`~sqapi.errors.ConnectorError` when not."""


class Listener(Protocol):
    """What runs the message loop: ``sqapi loader``, ``sqapi run`` and the API's health call these."""

    consuming: bool

    def start_listeners(self) -> None:
        """Deliver messages to the processor until :meth:`stop`."""

    def stop(self) -> None:
        """Stop delivering; in-flight messages finish."""

    def ping(self) -> None:
        """Check that the message source is reachable."""
