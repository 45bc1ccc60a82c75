"""Data stores: where the object a message refers to lives.

A data store module (``sqapi/connectors/data/<type>.py``, selected by ``data_store.type``)
provides, as in sqAPI::

    def download_to_disk(config: dict, object_ref: str) -> str

``config`` is the ``data_store`` section; the return value is the path of a local file the
plugins read.  Remote stores stream the object into a new temporary file in
``config["temp_dir"]`` (sqapi fills it from ``processing.temp_dir``; unset: the system's), never
the whole object in memory, which sqapi deletes after processing.  A store that hands out the original
file instead (``disk``) sets ``RETURNS_ORIGINAL = True`` and sqapi leaves it alone.

``object_ref`` names exactly one object: spaces, unicode and ``%`` are part of the name, never
decoded.  Every call gives a file of its own.

Errors: a missing object raises :class:`LookupError` (sqapi's :class:`~sqapi.errors.NotFound`),
which is retried; an unreachable system raises :class:`~sqapi.errors.ConnectorError` (retried;
its message never holds a password, key or token); a reference the store refuses -- one that
climbs out of it with ``..`` or an absolute path -- raises :class:`~sqapi.errors.AccessDenied`
(never retried).  ``tests/contracts/test_data_store_contract.py`` checks all of this for every
type; docs/architecture.md sums it up.

Optional: ``connect(config)`` returning an object with ``download_to_disk(object_ref)``,
``ping()`` and ``close()`` (for stores that keep a connection); ``validate_config(config)``
raising :class:`~sqapi.errors.ConfigError` for a wrong section; ``ping(config)``; and
``upload(config, local_path, object_ref) -> str`` returning the data_location that fetches the
file back (used by ``sqapi publish --upload``).
"""

from __future__ import annotations

from typing import Protocol

from sqapi.connectors.store import StoreAdapter
from sqapi.core.contracts import LocalCopy  # noqa: F401  (re-exported: it was defined here)


class DataConnection(Protocol):
    def download_to_disk(self, object_ref: str) -> str: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class DataStore(StoreAdapter):
    """Wraps a data store module (or its ``connect()`` object) behind one interface."""

    topic = "data store"

    def fetch(self, object_ref: str) -> LocalCopy:
        """Bring ``object_ref`` to local disk; errors are translated to sqapi's kinds."""
        path = self.call("download_to_disk", object_ref)
        return LocalCopy(path=path, temporary=not getattr(self.module, "RETURNS_ORIGINAL", False))

    def upload(self, local: str, object_ref: str) -> str:
        """Put the local file ``local`` in the store as ``object_ref``; the data_location to publish.
        :class:`NotImplementedError` for a type that cannot."""
        upload = getattr(self.module, "upload", None)
        if not callable(upload):
            raise NotImplementedError(f"data_store type '{self.kind}' cannot upload")
        return str(upload(self.config, local, object_ref))
