"""``database: {type: sqlite, path: .sqapi/sqapi.db}`` -- the embedded status database.

Takes the same ``%(name)s`` scripts as PostgreSQL (placeholders are translated to SQLite's
``:name``), and prefers ``init.sqlite.sql`` over ``init.sql`` when both exist beside each
other.  One connection per Database, shared by the worker threads behind a lock, in WAL
mode so that other processes (``sqapi status``, the API) read while the loader writes.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqapi.config import require_keys
from sqapi.connectors.db import STATUS_TABLES, StatusStore, load_script
from sqapi.errors import ConnectorError, SqapiError

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


@lru_cache(maxsize=512)
def translate(query: str) -> str:
    """psycopg2's ``%(name)s`` to SQLite's ``:name``; ``%%`` to ``%``."""
    return _PLACEHOLDER.sub(r":\1", query).replace("%%", "%")


def sqlite_variant(path: str | Path) -> Path:
    """``x.sqlite.sql`` beside ``x.sql`` when it exists, else ``path`` itself."""
    path = Path(path)
    variant = path.with_name(path.name[: -len(".sql")] + ".sqlite.sql") if path.name.endswith(".sql") else path
    return variant if variant.exists() else path


class QueryError(SqapiError):
    """A statement SQLite rejected; names the script and the statement."""


def validate_config(config: dict[str, Any]) -> None:
    require_keys(config, "database", [("path", str)])


class Database(StatusStore):
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.path = str(config.get("path") or ":memory:")
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._depth = 0

    # -- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        if self._conn is not None:
            return
        if self.path != ":memory:":
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConnectorError(f"cannot open SQLite database '{self.path}': {exc.strerror or exc}") from None
        try:
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as exc:
            raise ConnectorError(f"cannot open SQLite database '{self.path}': {exc}") from None
        self._conn = conn

    def describe(self) -> str:
        return self.path

    def has_status_tables(self) -> bool:
        """Whether the file exists and holds the core tables; opens it read-only, creating nothing."""
        if self._conn is not None:
            self.close()
        if self.path == ":memory:" or not Path(self.path).is_file():
            return False
        try:
            conn = sqlite3.connect(f"{Path(self.path).resolve().as_uri()}?mode=ro", uri=True, timeout=30,
                                   check_same_thread=False, isolation_level=None)
            conn.row_factory = sqlite3.Row
            found = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as exc:
            raise ConnectorError(f"cannot read SQLite database '{self.path}': {exc}") from None
        self._conn = conn
        return set(STATUS_TABLES) <= found

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def ping(self) -> None:
        self.connect()
        self.execute_query("SELECT 1 AS ok")

    # -- sqAPI's contract ---------------------------------------------------------------------
    def initialize_message_table(self) -> None:
        """The core schema, and the columns later releases added to a ``messages`` made before them
        (SQLite has no ``ADD COLUMN IF NOT EXISTS``)."""
        super().initialize_message_table()
        columns = {row["name"] for row in self.execute_query("PRAGMA table_info(messages)")}
        if "metadata" not in columns:
            self.execute_query("ALTER TABLE messages ADD COLUMN metadata TEXT")
        if "trace_id" not in columns:
            self.execute_query("ALTER TABLE messages ADD COLUMN trace_id TEXT")
        if "version" not in {row["name"] for row in self.execute_query("PRAGMA table_info(message_plugins)")}:
            self.execute_query("ALTER TABLE message_plugins ADD COLUMN version TEXT")

    def execute_script(self, path: str, **kwargs: Any) -> list[dict[str, Any]]:
        """Run every statement of the script at ``path``; the rows of the last one that returns rows.

        SQLite does not speak PostgreSQL: a statement it rejects is reported with the script's path,
        the statement's number and its first line (a plugin written for PostgreSQL belongs on the
        default, PostgreSQL database)."""
        script = load_script(sqlite_variant(path))
        rows: list[dict[str, Any]] = []
        with self.transaction():
            for statement in script.statements:
                params = {k: v for k, v in kwargs.items() if k in statement.parameters}
                try:
                    result = self._execute(statement.text, params)
                except sqlite3.Error as exc:
                    first = statement.text.strip().splitlines()[0][:120]
                    raise QueryError(f"SQL error in script {script.path}, statement {statement.number} [{first}]: "
                                     f"{exc} (SQLite; this statement may be PostgreSQL's dialect)") from None
                if result is not None:
                    rows = result
        return rows

    def execute_query(self, query: str, **kwargs: Any) -> list[dict[str, Any]]:
        return self._execute(query, kwargs) or []

    def execute_many(self, query: str, rows: Sequence[dict[str, Any]]) -> None:
        """One statement for each parameter set, in one transaction (``executemany``)."""
        with self.transaction():
            assert self._conn is not None
            try:
                self._conn.executemany(translate(query), rows)
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "unable to open" in str(exc):
                    raise ConnectorError(f"SQLite database '{self.path}' unavailable: {exc}") from None
                raise

    def _execute(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Rows for a row-returning statement, ``None`` for any other."""
        self.connect()
        assert self._conn is not None
        with self._lock:
            try:
                cursor = self._conn.execute(translate(query), params)
                if cursor.description is None:
                    return None
                return [dict(row) for row in cursor.fetchall()]
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "unable to open" in str(exc):
                    raise ConnectorError(f"SQLite database '{self.path}' unavailable: {exc}") from None
                raise

    @contextmanager
    def try_lock(self, name: str) -> Iterator[bool]:
        """Hold the lock ``name`` of this database file, seen by every process: ``flock`` on ``<path>.<name>.lock``
        beside it, let go when the block ends or the process dies.  Yields False at once when another holds it."""
        if self.path == ":memory:":
            with super().try_lock(name) as held:
                yield held
            return
        path = f"{self.path}.{name}.lock"
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConnectorError(f"cannot open the lock file '{path}': {exc.strerror or exc}") from None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(handle)  # lets the lock go

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group statements atomically (nests: only the outermost commits)."""
        self.connect()
        assert self._conn is not None
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._conn.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._conn.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error:  # e.g. disk full: end the transaction, or every later BEGIN fails
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
