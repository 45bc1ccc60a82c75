"""Meta stores: where a message's metadata lives when the message does not carry it.

A meta store module (``sqapi/connectors/meta/<type>.py``, selected by ``meta_store.type``)
provides, as in sqAPI::

    def fetch_metadata(config: dict, reference: str) -> dict

``config`` is the ``meta_store`` section; the result is the JSON object stored at ``reference``
(spaces, unicode and ``%`` are part of the reference, never decoded).  A missing reference raises
:class:`LookupError` (:class:`~sqapi.errors.NotFound`, retried); an unreachable system raises
:class:`~sqapi.errors.ConnectorError` (retried; never showing a password); JSON that is no
object, or no JSON, raises :class:`~sqapi.errors.PermanentError`; a reference never reaches
outside the store (one climbing out of ``base_dir`` is :class:`~sqapi.errors.AccessDenied`).
``tests/contracts/test_meta_store_contract.py`` checks this for every type.

Metadata embedded in the message always wins; the store is asked only when the message has
a ``meta_location`` and no ``metadata``.  Optional: ``connect(config)`` returning an object
with ``fetch_metadata(reference)``, ``ping()`` and ``close()``; ``validate_config(config)``.
"""

from __future__ import annotations

from typing import Any, Protocol

from sqapi.connectors.store import StoreAdapter
from sqapi.errors import PermanentError


class MetaConnection(Protocol):
    def fetch_metadata(self, reference: str) -> dict[str, Any]: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class MetaStore(StoreAdapter):
    """Wraps a meta store module (or its ``connect()`` object) behind one interface."""

    topic = "meta store"

    def fetch(self, reference: str) -> dict[str, Any]:
        found = self.call("fetch_metadata", reference)
        if not isinstance(found, dict):
            raise PermanentError(f"metadata at {reference} is a {type(found).__name__}, not a JSON object")
        return found
