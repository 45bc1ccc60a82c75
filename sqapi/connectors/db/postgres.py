"""``database: {type: postgres, ...}`` -- the status database (psycopg2): a server, or one sqapi runs itself.

Config (the ``database`` section; sqAPI's ``connection`` block, or a ``dsn``/``url``)::

    type: postgres
    connection: {host: localhost, port: 5432, user: postgres, password: ..., name: sqapi, timeout: 5}
    dsn: null                 # or "postgresql://user:pass@host:5432/db" (wins over connection)
    embedded: {directory: .sqapi/postgres, database: postgres}   # when neither connection.host nor dsn is given
    schema: null              # tables live in this schema (created when missing); search_path is just it
    pool: {min: 1, max: 10, timeout: 30}       # opened at start / at most (kept for reuse) / seconds to wait
    connect_retry: {attempts: 5, delay: 1.0, max_delay: 10.0}   # at startup, while unreachable
    claim_timeout: 300        # seconds an attempt waits for another attempt at the same uuid
    statement_timeout: null   # seconds; null: the server's
    synchronous_commit: null  # null: the server's (on); off trades crash durability of the last writes for speed

With neither ``connection.host`` nor ``dsn``, the database is the embedded PostgreSQL of
``embedded.directory`` (see :mod:`sqapi.connectors.db._embedded`): started on first use,
shared by every sqapi process of that folder, stopped when the last one exits.

Connections come from one :class:`psycopg2.pool.ThreadedConnectionPool` per Database; a thread
waits (``pool.timeout``) for a free connection rather than failing.  :meth:`Database.transaction`
binds one pooled connection to the calling thread, so every statement inside it (nested
transactions included) runs on it and commits or rolls back together.

Guarantee for concurrent duplicates: :meth:`Database.claim` takes a session-level advisory lock
on the uuid for the whole attempt, on the connection bound to the attempt's thread.  Every
process on the same database sees it, so attempts at one uuid run one at a time: the first
records DONE, the later ones find DONE with the same hash and run no plugin again.  A crashed
process's lock dies with its connection.  :meth:`Database.record_attempt` is itself safe
without the claim: ``INSERT ... ON CONFLICT DO NOTHING`` then ``SELECT ... FOR UPDATE`` makes
one ``messages`` row per uuid and counts every attempt.

Errors: an unreachable server or a lost connection is a :class:`~sqapi.errors.ConnectorError`
(retried); an SQL error (bad statement, constraint violation) is a :class:`QueryError` naming
the script or query.  No message ever holds the password.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import psycopg2.pool

from sqapi.backoff import exponential
from sqapi.connectors.db import (
    EVENT_STATUSES,
    ON_MESSAGE_CONFLICT,
    ON_PLUGIN_CONFLICT,
    STATUS_TABLES,
    StatusStore,
    load_script,
    loader_name,
    metadata_text,
    utcnow,
)
from sqapi.connectors.db import _embedded as embedded_server
from sqapi.core.status import Status
from sqapi.errors import ConfigError, ConnectorError, SqapiError

log = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PARAMETER = re.compile(r"%\(\w+\)s|%%")
#: ``CREATE [UNIQUE] INDEX IF NOT EXISTS name ON ...``: PostgreSQL locks the table against writes (SHARE) before it
#: looks for the index, so a loader starting next to busy ones would wait behind their writes -- and, holding the
#: lock of an earlier statement of its script, deadlock with them.  execute_script skips it when the index is there.
_CREATE_INDEX_IF_NOT_EXISTS = re.compile(
    r'\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?IF\s+NOT\s+EXISTS\s+("(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
    r'\s+ON\s+(?:ONLY\s+)?(?!\S*\.)',  # not on a table in another schema: to_regclass looks in ours
    re.IGNORECASE)
#: ``ALTER TABLE name ADD [COLUMN] IF NOT EXISTS column ...`` (one ADD, unquoted names): PostgreSQL takes the
#: table's ACCESS EXCLUSIVE lock before it looks for the column -- the same wait and deadlock as above, worse.
#: execute_script skips it when the column is there.
_ADD_COLUMN_IF_NOT_EXISTS = re.compile(
    r'\s*ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?([A-Za-z_][\w$]*)\s+'
    r'ADD\s+(?:COLUMN\s+)?IF\s+NOT\s+EXISTS\s+([A-Za-z_][\w$]*)\s',
    re.IGNORECASE)
#: advisory lock namespaces (the two-int key space): schema set-up, and one lock per message uuid
_LOCK_INIT, _LOCK_UUID = 0x5A9A, 0x5A9B
#: the namespace of :meth:`Database.try_lock`'s named locks (keyed by schema and name)
_LOCK_NAMED = 0x5A9C


class _Pool(psycopg2.pool.ThreadedConnectionPool):
    """Opens ``minconn`` connections at start and keeps every one handed back (up to ``maxconn``) for reuse.

    psycopg2's pool closes a returned connection once ``minconn`` are idle, which under
    concurrent load would mean a new connection for most queries.
    """

    def __init__(self, minconn: int, maxconn: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(minconn, maxconn, *args, **kwargs)
        self.minconn = maxconn


class QueryError(SqapiError):
    """An SQL statement the server rejected (syntax, missing table, constraint); names the script or query."""


@dataclass(frozen=True)
class Settings:
    """The ``database`` section of type postgres, checked and typed once: the one place of each default.

    :func:`validate_config` is :meth:`from_config` with the result dropped; :class:`Database` keeps it."""

    dsn: str | None = None
    connection: dict[str, Any] = field(default_factory=dict)
    embedded: dict[str, Any] | None = None
    schema: str | None = None
    timeout: float = 10.0
    pool_min: int = 1
    pool_max: int = 10
    pool_timeout: float = 30.0
    connect_attempts: int = 5
    connect_delay: float = 1.0
    connect_max_delay: float = 10.0
    claim_timeout: float = 300.0
    statement_timeout_ms: int | None = None
    synchronous_commit: str | None = None   # None: the server's

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Settings:
        def fail(key: str, problem: str, fix: str) -> None:
            raise ConfigError(f"database.{key}", problem, fix)

        dsn = config.get("dsn") or config.get("url")
        connection = config.get("connection")
        if connection is not None and not isinstance(connection, dict):
            fail("connection", f"must be a mapping, not {type(connection).__name__}",
                 "write connection: {host: ..., port: ..., user: ..., name: ...} (a list of hosts is the form of "
                 "type: elasticsearch)")
        if dsn is not None and not isinstance(dsn, str):
            fail("dsn", "must be a string", "write dsn: postgresql://user@host:5432/dbname")
        embedded = config.get("embedded")
        if embedded is not None and not (isinstance(embedded, dict)
                                         and isinstance(embedded.get("directory") or "", str)):
            fail("embedded", f"must be a mapping like {{directory: .sqapi/postgres}}, not {embedded!r}",
                 "write embedded: {directory: FOLDER}, or give connection.host / dsn for a server")
        name = (embedded or {}).get("database")
        if name is not None and not (isinstance(name, str) and _IDENTIFIER.fullmatch(name)):
            fail("embedded.database", f"{name!r} is not a plain identifier", "use letters, digits and underscores")
        port = (connection or {}).get("port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
            fail("connection.port", f"must be a whole number, not {port!r}", "set it to the server's port, e.g. 5432")
        schema = config.get("schema") or None
        if schema is not None and not (isinstance(schema, str) and _IDENTIFIER.fullmatch(schema)):
            fail("schema", f"{schema!r} is not a plain identifier", "use letters, digits and underscores")
        pool = _section(config, "pool")
        low, high = pool.get("min", cls.pool_min), pool.get("max", cls.pool_max)
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high and high >= 1):
            fail("pool", f"min {low!r} / max {high!r} are not whole numbers with 0 <= min <= max, max >= 1",
                 "set pool.min and pool.max, e.g. {min: 1, max: 10}")
        retry = _section(config, "connect_retry")
        attempts = retry.get("attempts", cls.connect_attempts)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            fail("connect_retry.attempts", f"must be a whole number >= 1, not {attempts!r}", "set it to e.g. 5")
        sync = config.get("synchronous_commit")
        if sync is not None and not (isinstance(sync, bool) or sync in ("on", "off", "local", "remote_write",
                                                                          "remote_apply")):
            fail("synchronous_commit", f"{sync!r} is not a PostgreSQL synchronous_commit value", "use on or off")
        seconds = {"connect_retry.delay": retry.get("delay", cls.connect_delay),
                   "connect_retry.max_delay": retry.get("max_delay", cls.connect_max_delay),
                   "pool.timeout": pool.get("timeout", cls.pool_timeout),
                   "claim_timeout": config.get("claim_timeout", cls.claim_timeout)}
        for key, value in seconds.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                fail(key, f"must be a number of seconds >= 0, not {value!r}", f"set database.{key}")
        statement_timeout = config.get("statement_timeout")
        connection = dict(connection or {})
        return cls(
            dsn=dsn or None, connection=connection, embedded=dict(embedded) if embedded is not None else None,
            schema=schema, timeout=float(connection.get("timeout") or config.get("timeout") or cls.timeout),
            pool_min=int(low), pool_max=int(high), pool_timeout=float(seconds["pool.timeout"]),
            connect_attempts=int(attempts), connect_delay=float(seconds["connect_retry.delay"]),
            connect_max_delay=float(seconds["connect_retry.max_delay"]),
            claim_timeout=float(seconds["claim_timeout"]),
            statement_timeout_ms=int(float(statement_timeout) * 1000) if statement_timeout else None,
            synchronous_commit=None if sync is None else ("on" if sync is True else "off" if sync is False
                                                          else str(sync)))


def validate_config(config: dict[str, Any]) -> None:
    Settings.from_config(config)


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return dict(value) if isinstance(value, dict) else {}


def _status_row(row: dict[str, Any]) -> dict[str, Any]:
    """Timestamps as the ISO text :func:`utcnow` writes, so status rows read alike on every database type."""
    return {k: utcnow_text(v) if isinstance(v, datetime) else v for k, v in row.items()}


def utcnow_text(value: datetime) -> str:
    return (value.astimezone(UTC) if value.tzinfo else value).isoformat(timespec="milliseconds")


#: rows execute_many sends in one query string
_BATCH_PAGE = 1000

#: the messages of a batch, from one JSON text (json_to_recordset: one quoted string for psycopg2, not an array
#: element each)
_INPUT = """input AS (
    SELECT * FROM json_to_recordset(%(rows)s::json)
        AS t(uuid text, data_location text, meta_location text, data_type text, hash_digest text)
)"""


def _count_attempts(where: str, returning: str) -> str:
    """The CTE counting an attempt at each message of ``input`` (``where``: which): a new row in ``status``; a
    DONE row stays DONE (info and hash kept), any other takes ``status``."""
    return f"""counted AS (
    INSERT INTO messages AS m (uuid, data_location, meta_location, data_type, hash_digest, status, attempts,
                               created_at, updated_at)
    SELECT uuid, data_location, meta_location, data_type, hash_digest, %(status)s, 1,
           %(now)s::timestamptz, %(now)s::timestamptz FROM input
    {where}
    ON CONFLICT (uuid) DO UPDATE SET
        attempts = m.attempts + 1,
        status = CASE WHEN m.status = 'DONE' THEN m.status ELSE excluded.status END,
        info = CASE WHEN m.status = 'DONE' THEN m.info ELSE NULL END,
        data_location = COALESCE(excluded.data_location, m.data_location),
        meta_location = COALESCE(excluded.meta_location, m.meta_location),
        data_type = COALESCE(excluded.data_type, m.data_type),
        updated_at = excluded.updated_at
    RETURNING {returning}
)"""


#: record_attempts: the old rows (locked) and, in the same statement, every attempt counted
_RECORD_ATTEMPTS = f"""
WITH {_INPUT}, old AS (
    SELECT m.* FROM messages m WHERE m.uuid = ANY(ARRAY(SELECT uuid FROM input)) FOR UPDATE OF m
), {_count_attempts("", "1")}
SELECT old.* FROM old
"""

#: update_messages: several messages' statuses in one statement (distinct uuids); as StatusStore's upsert.  The
#: statuses that end an attempt go to the history (message_events) in the same statement.
_UPDATE_MESSAGES = f"""
WITH written AS (
    INSERT INTO messages (uuid, data_location, meta_location, data_type, hash_digest, metadata, trace_id, status,
                          info, attempts, created_at, updated_at)
    SELECT uuid, data_location, meta_location, data_type, hash_digest, metadata, trace_id, status, info, 0,
           %(now)s::timestamptz, %(now)s::timestamptz
    FROM json_to_recordset(%(rows)s::json)
        AS t(uuid text, data_location text, meta_location text, data_type text, hash_digest text, metadata text,
             trace_id text, status text, info text)
    {ON_MESSAGE_CONFLICT.rstrip()}
    RETURNING uuid, attempts, status, info
)
INSERT INTO message_events (uuid, attempt, status, info, loader, at)
SELECT uuid, attempts, status, info, %(loader)s, %(now)s::timestamptz FROM written
WHERE status IN ({", ".join(f"'{s}'" for s in EVENT_STATUSES)})"""

#: update_plugins: several plugin rows in one statement (distinct (uuid, plugin) pairs), each also an event of the
#: history (its attempt: the message's count, which the attempt's claim set -- a probe of its key per row; a join
#: would be planned as a scan of every message)
_UPDATE_PLUGINS = f"""
WITH input AS (
    SELECT * FROM json_to_recordset(%(rows)s::json)
        AS t(n int, uuid text, plugin text, status text, info text, duration_ms float8, result text, version text)
), events AS (
    INSERT INTO message_events (uuid, attempt, plugin, status, info, duration_ms, version, loader, at)
    SELECT i.uuid, (SELECT m.attempts FROM messages m WHERE m.uuid = i.uuid), i.plugin, i.status, i.info,
           i.duration_ms, i.version, %(loader)s, %(now)s::timestamptz
    FROM input i ORDER BY i.n  -- ids in the order of the rows given
)
INSERT INTO message_plugins (uuid, plugin, status, info, duration_ms, result, version, attempts, updated_at)
SELECT uuid, plugin, status, info, duration_ms, result, version, 1, %(now)s::timestamptz FROM input
{ON_PLUGIN_CONFLICT}"""

#: claim_attempts: take each uuid's advisory lock, and for those taken count the attempt, in one statement.  The
#: rows as they were come from the upsert itself (it sees the latest committed row, whatever this statement's
#: snapshot): xmax <> 0 marks a row that existed; a DONE row stays DONE and keeps its hash.  ``old`` (the
#: snapshot) only supplies the earlier status of rows that were not DONE.
_CLAIM_ATTEMPTS = f"""
WITH {_INPUT}, old AS (
    SELECT uuid, status FROM messages WHERE uuid = ANY(ARRAY(SELECT uuid FROM input))
), {_count_attempts("WHERE pg_try_advisory_lock(%(ns)s, hashtext(uuid))",
                    "m.uuid, (m.xmax <> 0) AS existed, m.status, m.hash_digest, m.data_type, m.info, m.attempts")}
SELECT counted.*, old.status AS old_status FROM counted LEFT JOIN old ON old.uuid = counted.uuid
"""


class _Bound:
    """The connection a thread is using, and how deep in transactions / claims it is."""

    def __init__(self, conn: Any, pinned: bool = False) -> None:
        self.conn = conn
        self.depth = 0
        self.broken = False
        self.held: list[str] = []  # uuids whose advisory locks this connection holds for a claim
        self.pinned = pinned       # kept by its thread between statements (see Database.pin)

    @property
    def busy(self) -> bool:
        """Inside a transaction or a claim (a pinned connection between statements is not)."""
        return not self.pinned or self.depth > 0 or bool(self.held)


class Database(StatusStore):
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        settings = Settings.from_config(config)
        connection = settings.connection
        self._dsn: str | None = settings.dsn
        self._params: dict[str, Any] = {}
        #: the folder of the embedded server, when neither a dsn nor a host names a server
        self.embedded: Path | None = None
        if not self._dsn and not connection.get("host"):
            embedded = settings.embedded or {}
            self.embedded = Path(embedded.get("directory") or ".sqapi/postgres").absolute()
            #: the embedded server's database this one uses (created on first use when not the default one)
            self.embedded_database = str(embedded.get("database") or embedded_server.DBNAME)
            self._params = dict(embedded_server.Layout(self.embedded).connection(), dbname=self.embedded_database)
        elif not self._dsn:
            self._params = {"host": connection.get("host") or "localhost", "port": int(connection.get("port") or 5432),
                            "dbname": connection.get("name") or connection.get("dbname") or "postgres",
                            "user": connection.get("user") or None, "password": connection.get("password") or None}
        self._params = {k: v for k, v in self._params.items() if v is not None}
        self._password = str(connection.get("password") or "") or _dsn_password(self._dsn)
        self.timeout = settings.timeout
        self.schema: str | None = settings.schema
        self.pool_min, self.pool_max, self.pool_timeout = settings.pool_min, settings.pool_max, settings.pool_timeout
        self.connect_attempts = settings.connect_attempts
        self.connect_delay, self.connect_max_delay = settings.connect_delay, settings.connect_max_delay
        self.claim_timeout = settings.claim_timeout
        self.statement_timeout_ms = settings.statement_timeout_ms
        self.synchronous_commit = settings.synchronous_commit
        self._pool: _Pool | None = None
        self._read_only = False  # set by has_status_tables(): never create the schema
        self._slots = threading.BoundedSemaphore(self.pool_max)
        self._pool_lock = threading.Lock()
        self._local = threading.local()

    # -- where -----------------------------------------------------------------------------------
    def describe(self) -> str:
        """Where this database is, for messages: never the password."""
        if self.embedded is not None:
            named = self.embedded_database != embedded_server.DBNAME
            return f"the embedded PostgreSQL in {self.embedded}" + (f" (database {self.embedded_database})"
                                                                   if named else "")
        if self._dsn:
            parts = urlsplit(self._dsn) if "://" in self._dsn else None
            if parts is not None:
                where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"
                return f"{where} as {parts.username}" if parts.username else where
            return "the configured dsn"
        params = self._params
        return f"{params['host']}:{params['port']}/{params['dbname']}" + (f" as {params['user']}"
                                                                            if params.get("user") else "")

    def _scrub(self, text: str) -> str:
        text = "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())
        if self._password:
            text = text.replace(self._password, "***")
        if self._dsn and "://" in self._dsn:
            text = text.replace(self._dsn, "<dsn>")
        return text

    # -- connection ---------------------------------------------------------------------------
    def connect(self, attempts: int | None = None) -> None:
        """Open the pool; while the server is unreachable retry with growing delays, then raise ConnectorError."""
        if self._pool is not None:
            return
        with self._pool_lock:
            if self._pool is not None:
                return
            attempts = attempts or self.connect_attempts
            if self.embedded is not None:  # started (or joined) here: the constructor does no I/O
                self._params = self._embedded_connection()
            options = []
            if self.schema:
                options.append(f"-c search_path={self.schema}")
            if self.statement_timeout_ms:
                options.append(f"-c statement_timeout={self.statement_timeout_ms}")
            if self.synchronous_commit:
                options.append(f"-c synchronous_commit={self.synchronous_commit}")
            kwargs: dict[str, Any] = dict(self._params, connect_timeout=max(1, round(self.timeout)),
                                          application_name="sqapi")
            if options:
                kwargs["options"] = " ".join(options)
            for attempt in range(1, attempts + 1):
                try:
                    args = (self._dsn,) if self._dsn else ()
                    pool = _Pool(self.pool_min, self.pool_max, *args, **kwargs)
                    try:  # with pool.min 0 nothing was opened yet: prove the server answers
                        pool.putconn(pool.getconn())
                    except BaseException:
                        pool.closeall()
                        raise
                    break
                except psycopg2.Error as exc:
                    reason = self._scrub(str(exc)) or type(exc).__name__
                    if attempt == attempts:
                        raise ConnectorError(
                            f"cannot reach PostgreSQL at {self.describe()} after {attempts} attempt"
                            f"{'s' if attempts > 1 else ''}: {reason.rstrip('?.')}. Check that it is running and that "
                            f"database.connection (or database.dsn) and the credentials are right") from None
                    delay = exponential(attempt, self.connect_delay, self.connect_max_delay)
                    log.warning("PostgreSQL at %s unreachable (attempt %d of %d), retrying in %gs: %s",
                                self.describe(), attempt, attempts, delay, reason)
                    time.sleep(delay)
            self._pool = pool
        if self.schema and not self._read_only:
            self._ensure_schema()

    def _embedded_connection(self) -> dict[str, Any]:
        """Start (or join) the embedded server; its connection parameters, the database created if needed."""
        assert self.embedded is not None
        params = embedded_server.ensure_running(self.embedded).connection()
        if self.embedded_database != params["dbname"]:
            embedded_server.ensure_database(params, self.embedded_database)
        return dict(params, dbname=self.embedded_database)

    def has_status_tables(self) -> bool:
        """Whether the core tables exist in the configured schema, creating nothing (not even the schema, nor an
        embedded server's folder: an embedded server that was never set up has no tables)."""
        self._read_only = True
        if self.embedded is not None and not embedded_server.Layout(self.embedded).initialized():
            return False
        self.connect(attempts=1)
        rows = self.execute_query("SELECT to_regclass(t) IS NOT NULL AS found FROM unnest(%(names)s::text[]) AS t",
                                  names=list(STATUS_TABLES))
        return bool(rows) and all(row["found"] for row in rows)

    def _ensure_schema(self) -> None:
        with self.transaction():
            if not self.execute_query("SELECT 1 AS found FROM pg_namespace WHERE nspname = %(schema)s",
                                      schema=self.schema):
                self.execute_query("SELECT pg_advisory_xact_lock(%(ns)s, 0)", ns=_LOCK_INIT)
                self.execute_query(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.closeall()  # pinned connections too
                self._pool = None
        bound: _Bound | None = getattr(self._local, "bound", None)
        if bound is not None and bound.pinned:
            self._local.bound = None
            self._slots.release()

    def ping(self) -> None:
        self.connect(attempts=1)
        self.execute_query("SELECT 1 AS ok")

    def _checkout(self) -> Any:
        self.connect()
        if not self._slots.acquire(timeout=self.pool_timeout):
            raise ConnectorError(f"no free PostgreSQL connection within {self.pool_timeout:g}s "
                                 f"(database.pool.max is {self.pool_max})")
        try:
            assert self._pool is not None
            try:
                conn = self._pool.getconn()
            except psycopg2.OperationalError:
                if self.embedded is None:
                    raise
                embedded_server.ensure_running(self.embedded)  # it died (killed, out of memory): start another
                conn = self._pool.getconn()
            if not conn.autocommit:  # one round trip per statement; transactions say BEGIN themselves
                conn.autocommit = True
            return conn
        except (psycopg2.Error, psycopg2.pool.PoolError, ConnectorError) as exc:
            self._slots.release()
            if isinstance(exc, ConnectorError):
                raise
            raise ConnectorError(f"PostgreSQL at {self.describe()} unavailable: {self._scrub(str(exc))}") from None

    def _checkin(self, bound: _Bound) -> None:
        conn = bound.conn
        broken = bound.broken or conn.closed
        if not broken and conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            try:
                self._command(bound, "ROLLBACK")
            except psycopg2.Error:
                broken = True
        try:
            if self._pool is not None:
                self._pool.putconn(conn, close=bool(broken))
            else:
                conn.close()
        finally:
            self._slots.release()

    def pin(self) -> None:
        """Keep one connection for the calling thread between statements, instead of one from the pool for each.

        For a thread that is the Database's only user, one statement at a time -- a plugin's worker
        process -- this saves the pool's locking on every statement.  Statements outside a
        transaction still commit one by one.  A pinned connection that breaks is replaced."""
        self._local.pin = True

    @contextmanager
    def _bound(self) -> Iterator[_Bound]:
        """The connection bound to this thread, checking one out (and back in) when there is none."""
        bound: _Bound | None = getattr(self._local, "bound", None)
        if bound is not None and bound.pinned and not bound.busy and (bound.broken or bound.conn.closed):
            self._local.bound = None  # a broken pinned connection: give it back (closed), pin another
            self._checkin(bound)
            bound = None
        if bound is not None:
            yield bound
            return
        if getattr(self._local, "pin", False):
            bound = self._local.bound = _Bound(self._checkout(), pinned=True)
            yield bound
            return
        bound = _Bound(self._checkout())
        self._local.bound = bound
        try:
            yield bound
        finally:
            self._local.bound = None
            self._checkin(bound)

    def _inside(self) -> bool:
        bound: _Bound | None = getattr(self._local, "bound", None)
        return bound is not None and bound.busy

    # -- transactions and claims --------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group statements atomically on one connection; nested calls join the outermost one."""
        with self._bound() as bound:
            if bound.depth == 0:
                try:
                    self._command(bound, "BEGIN")
                except psycopg2.Error as exc:
                    self._mark(bound, exc)
                    raise self._translate(exc, "BEGIN") from None
            bound.depth += 1
            try:
                yield
            except BaseException:
                bound.depth -= 1
                if bound.depth == 0:
                    self._end(bound, commit=False)
                raise
            bound.depth -= 1
            if bound.depth == 0:
                self._end(bound, commit=True)

    def _end(self, bound: _Bound, commit: bool) -> None:
        if bound.broken or bound.conn.closed:
            if commit:
                raise ConnectorError(f"lost the connection to PostgreSQL at {self.describe()} before commit")
            return
        try:
            self._command(bound, "COMMIT" if commit else "ROLLBACK")
        except psycopg2.Error as exc:
            bound.broken = True
            if commit:
                raise self._translate(exc, "COMMIT") from None

    @contextmanager
    def try_lock(self, name: str) -> Iterator[bool]:
        """Hold the lock ``name`` of this schema, seen by every process on the server: a session advisory lock on
        a connection of its own, kept for the block (a process killed meanwhile lets it go with its connection).
        Yields False at once when another holds it."""
        bound = _Bound(self._checkout())
        try:
            key = {"ns": _LOCK_NAMED, "name": name}
            with bound.conn.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%(ns)s, hashtext(current_schema() || ':' || %(name)s))",
                               key)
                held = bool(cursor.fetchone()[0])
            try:
                yield held
            finally:
                if held and not bound.conn.closed:
                    with bound.conn.cursor() as cursor:
                        cursor.execute("SELECT pg_advisory_unlock(%(ns)s, hashtext(current_schema() || ':' || "
                                       "%(name)s))", key)
        except psycopg2.Error as exc:
            bound.broken = True
            raise self._translate(exc, f"lock {name}") from None
        finally:
            self._checkin(bound)

    @contextmanager
    def claim(self, uuid: str) -> Iterator[None]:
        """Hold ``uuid`` for one attempt, across processes: an advisory lock on this thread's connection.

        Threads of this process wait for each other on an in-process lock; a process waits for
        another process by polling the advisory lock without holding a connection, so waiting
        attempts never starve the pool.  Waiting longer than ``claim_timeout`` raises
        :class:`~sqapi.errors.ConnectorError` (the message is retried later).
        """
        if self._inside():  # inside a transaction or claim already
            yield
            return
        with super().claim(uuid):
            deadline = time.monotonic() + self.claim_timeout
            pause = 0.02
            while True:
                with self._bound() as bound:
                    if self._try_lock(bound, uuid):
                        with self._holding(bound, [uuid]):
                            yield
                        return
                if time.monotonic() >= deadline:
                    raise ConnectorError(f"message {uuid} is still being processed by another worker after "
                                         f"{self.claim_timeout:g}s (database.claim_timeout)")
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    @contextmanager
    def try_claim(self, uuid: str) -> Iterator[bool]:
        """:meth:`claim` without waiting: yields whether ``uuid`` is held (by this call) or busy elsewhere."""
        if self._inside():
            yield True
            return
        with StatusStore.try_claim(self, uuid) as mine:
            if not mine:
                yield False
                return
            with self._bound() as bound:
                if not self._try_lock(bound, uuid):
                    yield False
                    return
                with self._holding(bound, [uuid]):
                    yield True

    @contextmanager
    def claim_many(self, uuids: Sequence[str]) -> Iterator[set[str]]:
        """Hold several uuids for one batch: this process's locks in sorted order, then one statement trying
        every advisory lock.  Yields the uuids held; those another process holds are left out (never waited
        for while holding others), and the processor takes them one by one with :meth:`claim`."""
        wanted = sorted(set(uuids))
        if self._inside():  # inside a transaction or claim already
            yield set(wanted)
            return
        with ExitStack() as local:
            for uuid in wanted:  # this process's own locks (the base class's), as claim() takes them
                local.enter_context(StatusStore.claim(self, uuid))
            yield from self._claim_advisory(wanted)

    @contextmanager
    def claim_attempts(self, messages: Sequence[Any], status: str) -> Iterator[dict[str, dict[str, Any] | None]]:
        """:meth:`claim_many` and :meth:`record_attempts` in one round trip: yields ``{uuid: row as it was}`` for the
        uuids held (``None``: a new message); the others (held by another process) are left out."""
        wanted = sorted({m.uuid for m in messages})
        if self._inside():  # inside a transaction or claim already
            with self.claim_many(wanted) as held:
                chosen = [m for m in messages if m.uuid in held]
                yield dict(zip([m.uuid for m in chosen], self.record_attempts(chosen, status), strict=True))
            return
        with ExitStack() as local:
            for uuid in wanted:  # this process's own locks first, as claim_many takes them
                local.enter_context(StatusStore.claim(self, uuid))
            with self._bound() as bound:
                try:
                    with bound.conn.cursor() as cursor:
                        cursor.execute(_CLAIM_ATTEMPTS, {"ns": _LOCK_UUID, "status": status, "now": utcnow(),
                                                         "rows": _json_rows(messages)})
                        rows = cursor.fetchall()
                except psycopg2.Error as exc:
                    bound.broken = True  # locks taken before the error would outlive it: closing drops them
                    raise self._translate(exc, "claim") from None
                with self._holding(bound, [row[0] for row in rows]):
                    yield {row[0]: _as_it_was(*row) for row in rows}

    def _claim_advisory(self, wanted: list[str]) -> Iterator[set[str]]:
        with self._bound() as bound:
            try:
                with bound.conn.cursor() as cursor:
                    cursor.execute("SELECT u, pg_try_advisory_lock(%(ns)s, hashtext(u)) FROM unnest(%(uuids)s::text[]) "
                                   "AS u", {"ns": _LOCK_UUID, "uuids": wanted})
                    held = [row[0] for row in cursor.fetchall() if row[1]]
            except psycopg2.Error as exc:
                self._mark(bound, exc)
                raise self._translate(exc, "claim") from None
            with self._holding(bound, held):
                yield set(held)

    @contextmanager
    def _holding(self, bound: _Bound, uuids: list[str]) -> Iterator[None]:
        """The claim's advisory locks on ``bound``, taken: released at the end -- unless the claim's final
        write already released them after its commit (:meth:`record_progress` with ``last``)."""
        bound.held = list(uuids)
        try:
            yield
        finally:
            self._unlock_uuids(bound, bound.held)
            bound.held = []

    def _unlock_uuids(self, bound: _Bound, uuids: list[str]) -> None:
        if not uuids or bound.broken or bound.conn.closed:
            return  # nothing held, or the locks went with the session
        try:
            if bound.conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                self._command(bound, "ROLLBACK")
            with bound.conn.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%(ns)s, hashtext(u)) FROM unnest(%(uuids)s::text[]) AS u",
                               {"ns": _LOCK_UUID, "uuids": uuids})
        except psycopg2.Error:
            bound.broken = True  # closing the connection releases the locks

    def _try_lock(self, bound: _Bound, uuid: str) -> bool:
        try:
            with bound.conn.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%(ns)s, hashtext(%(uuid)s))",
                               {"ns": _LOCK_UUID, "uuid": uuid})
                row = cursor.fetchone()
        except psycopg2.Error as exc:
            self._mark(bound, exc)
            raise self._translate(exc, "claim") from None
        return bool(row and row[0])

    # -- sqAPI's contract ---------------------------------------------------------------------
    def execute_script(self, path: str, **kwargs: Any) -> list[dict[str, Any]]:
        """Run the script at ``path``; the rows of its last statement that returns rows.

        A script of one statement costs what :meth:`execute_query` costs (one round trip); the
        file is read and split once (:func:`~sqapi.connectors.db.load_script`).  Several
        statements run in one transaction.  Only a script that changes the schema (DDL) takes the
        database-wide schema lock, so that processes creating the same tables at once do not
        collide in the catalog: a plugin's per-message writes never wait for each other on it.
        """
        script = load_script(path)
        if len(script.statements) == 1 and not script.ddl:
            statement = script.statements[0]
            with self._bound():
                return self._run(statement.text, {k: v for k, v in kwargs.items() if k in statement.parameters},
                                 f"script {path}, statement 1") or []
        rows: list[dict[str, Any]] = []
        with self.transaction():
            if script.ddl:
                self._run("SELECT pg_advisory_xact_lock(%(ns)s, 0)", {"ns": _LOCK_INIT}, "schema lock")
            for statement in script.statements:
                where = f"script {path}, statement {statement.number}"
                index = _CREATE_INDEX_IF_NOT_EXISTS.match(statement.text) if statement.ddl else None
                if index and self._run("SELECT to_regclass(%(name)s) IS NOT NULL AS found", {"name": index.group(1)},
                                       where)[0]["found"]:  # type: ignore[index]
                    continue  # there already: do not lock its table (see _CREATE_INDEX_IF_NOT_EXISTS)
                if statement.ddl and self._column_there(statement.text, where):
                    continue  # there already: do not lock its table (see _ADD_COLUMN_IF_NOT_EXISTS)
                result = self._run(statement.text, {k: v for k, v in kwargs.items() if k in statement.parameters},
                                   where)
                if result is not None:
                    rows = result
        return rows

    def _column_there(self, statement: str, where: str) -> bool:
        """Whether ``statement`` adds one column ``IF NOT EXISTS`` that the table (in our schema) already has."""
        found = _ADD_COLUMN_IF_NOT_EXISTS.match(statement)
        if found is None or len(re.findall(r"\bADD\b", statement, re.IGNORECASE)) != 1:
            return False
        rows = self._run("SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = "
                         "current_schema() AND table_name = %(table)s AND column_name = %(column)s) AS found",
                         {"table": found.group(1).lower(), "column": found.group(2).lower()}, where)
        return bool(rows and rows[0]["found"])

    def execute_query(self, query: str, **kwargs: Any) -> list[dict[str, Any]]:
        """One statement: inside the thread's transaction when there is one, else committed on its own."""
        with self._bound():
            return self._run(query, kwargs, "query") or []

    @staticmethod
    def _command(bound: _Bound, command: str) -> None:
        with bound.conn.cursor() as cursor:
            cursor.execute(command)

    def _run(self, statement: str, params: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
        """Rows for a row-returning statement, ``None`` for any other; on this thread's connection."""
        bound: _Bound | None = getattr(self._local, "bound", None)
        assert bound is not None, "_run outside a transaction"
        # psycopg2 reads %-escapes only when given parameters; give them whenever the text uses them
        args = params if _PARAMETER.search(statement) else None
        try:
            with bound.conn.cursor() as cursor:
                cursor.execute(statement, args)
                if cursor.description is None:
                    return None
                names = [column.name for column in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        except psycopg2.Error as exc:
            self._mark(bound, exc)
            raise self._translate(exc, where, statement) from None
        except KeyError as exc:
            raise QueryError(f"{where}: no value given for parameter %({exc.args[0]})s") from None

    def _mark(self, bound: _Bound, exc: psycopg2.Error) -> None:
        """A connection that failed this way is not used again (a deadlock only aborted its transaction)."""
        if isinstance(exc, psycopg2.errors.TransactionRollbackError) and not bound.conn.closed:
            return
        if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError) or bound.conn.closed:
            bound.broken = True

    def _translate(self, exc: psycopg2.Error, where: str, statement: str = "") -> SqapiError:
        reason = self._scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if isinstance(exc, psycopg2.errors.TransactionRollbackError):  # deadlock, serialization: try again later
            return ConnectorError(f"PostgreSQL at {self.describe()} aborted the transaction ({where}): {reason}")
        if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError) \
                and not isinstance(exc, psycopg2.errors.QueryCanceled):
            return ConnectorError(f"PostgreSQL at {self.describe()} unavailable ({where}): {reason}")
        first = statement.strip().splitlines()[0][:120] if statement.strip() else ""
        return QueryError(f"SQL error in {where}: {reason}" + (f" [{first}]" if first and where == "query" else ""))

    # -- status queries (PostgreSQL-specific where concurrency needs it) ----------------------
    def record_attempt(self, message: Any, status: str) -> dict[str, Any] | None:
        """Start an attempt: one row per uuid however many workers race, each attempt counted."""
        now = utcnow()
        with self.transaction():
            created = self.execute_query(
                "INSERT INTO messages (uuid, data_location, meta_location, data_type, hash_digest, status, "
                "attempts, created_at, updated_at) VALUES (%(uuid)s, %(data_location)s, %(meta_location)s, "
                "%(data_type)s, %(hash_digest)s, %(status)s, 1, %(now)s, %(now)s) "
                "ON CONFLICT (uuid) DO NOTHING RETURNING uuid",
                uuid=message.uuid, data_location=getattr(message, "data_location", None),
                meta_location=getattr(message, "meta_location", None), data_type=getattr(message, "type", None),
                hash_digest=getattr(message, "hash_digest", None), status=status, now=now)
            if created:
                return None
            rows = self.execute_query("SELECT * FROM messages WHERE uuid = %(uuid)s FOR UPDATE", uuid=message.uuid)
            previous = _status_row(rows[0])
            new_status = Status.DONE if previous["status"] == Status.DONE else status
            self.execute_query(
                "UPDATE messages SET attempts = attempts + 1, status = %(status)s, "
                "info = CASE WHEN %(status)s = 'DONE' THEN info ELSE NULL END, "
                "data_location = COALESCE(%(data_location)s, data_location), "
                "meta_location = COALESCE(%(meta_location)s, meta_location), "
                "data_type = COALESCE(%(data_type)s, data_type), updated_at = %(now)s WHERE uuid = %(uuid)s",
                uuid=message.uuid, status=new_status, data_location=getattr(message, "data_location", None),
                meta_location=getattr(message, "meta_location", None), data_type=getattr(message, "type", None),
                now=now)
        return previous

    def record_attempts(self, messages: Sequence[Any], status: str) -> list[dict[str, Any] | None]:
        """Several attempts (distinct uuids, claimed) in one statement: the rows as they were, each attempt counted."""
        if len(messages) == 1:
            return [self.record_attempt(messages[0], status)]
        rows = self.execute_query(_RECORD_ATTEMPTS, status=status, now=utcnow(), rows=_json_rows(messages))
        found = {row["uuid"]: _status_row(row) for row in rows}
        return [found.get(m.uuid) for m in messages]

    def update_messages(self, updates: Sequence[tuple[Any, str, str | None]]) -> None:
        """Several messages' statuses in one set-based statement: one parse and plan, not one per row."""
        self.record_progress(updates, [])

    def update_plugins(self, rows: Sequence[dict[str, Any]]) -> None:
        """Several plugin rows in one set-based statement."""
        self.record_progress([], rows)

    def record_progress(self, updates: Sequence[tuple[Any, str, str | None]], rows: Sequence[dict[str, Any]],
                        last: bool = False) -> None:
        """Plugin rows, then message statuses, one set-based statement each, sent in one round trip (the server
        runs them as one transaction); with ``last``, the claim's advisory locks are released in it too."""
        if len({m.uuid for m, _s, _i in updates}) < len(updates) \
                or len({(row["uuid"], row["plugin"]) for row in rows}) < len(rows):
            # one statement cannot update a row twice: the portable statements, a row at a time, in order
            # (StatusStore's own update_* -- this class's would come straight back here)
            with self.transaction():
                StatusStore.update_plugins(self, rows)
                StatusStore.update_messages(self, updates)
            return
        statements: list[tuple[str, dict[str, Any]]] = []
        now = utcnow()
        # rows go as one JSON text (json_to_recordset): psycopg2 quotes one string, not each array element
        if rows:
            statements.append((_UPDATE_PLUGINS, {"now": now, "loader": loader_name(), "rows": json.dumps([
                {"n": n, "uuid": row["uuid"], "plugin": row["plugin"], "status": row["status"], "info": row.get("info"),
                 "duration_ms": row.get("duration_ms"), "result": row.get("result"), "version": row.get("version")}
                for n, row in enumerate(rows)])}))
        if updates:
            statements.append((_UPDATE_MESSAGES, {"now": now, "loader": loader_name(), "rows": _json_rows(
                [m for m, _s, _i in updates],
                [{"status": status, "info": info, "metadata": metadata_text(m),
                  "trace_id": getattr(m, "trace_id", None)} for m, status, info in updates])}))
        if not statements:
            return
        with self._bound() as bound:
            release = list(bound.held) if last and bound.depth == 0 else []
            if release:  # unlocked only once the writes are committed: the next holder must see them
                statements = [("BEGIN", {}), *statements, ("COMMIT", {}), (
                    "SELECT pg_advisory_unlock(%(ns)s, hashtext(u)) FROM unnest(%(uuids)s::text[]) AS u",
                    {"ns": _LOCK_UUID, "uuids": release})]
            try:
                with bound.conn.cursor() as cursor:
                    cursor.execute(b";\n".join(cursor.mogrify(query, params or None) for query, params in statements))
            except psycopg2.Error as exc:
                self._mark(bound, exc)
                raise self._translate(exc, "query", _UPDATE_PLUGINS if rows else _UPDATE_MESSAGES) from None
            if release:
                bound.held = []

    def execute_many(self, query: str, rows: Sequence[dict[str, Any]]) -> None:
        """One statement per parameter set, sent together (``execute_batch``) in one transaction.

        Up to ``_BATCH_PAGE`` rows go in one query string, which the server runs as one implicit
        transaction: one round trip, no BEGIN/COMMIT of its own."""
        one_page = len(rows) <= _BATCH_PAGE
        with contextlib.nullcontext() if one_page else self.transaction(), self._bound() as bound:
            try:
                with bound.conn.cursor() as cursor:
                    psycopg2.extras.execute_batch(cursor, query, rows, page_size=_BATCH_PAGE)
            except psycopg2.Error as exc:
                self._mark(bound, exc)
                raise self._translate(exc, "query", query) from None

    def get_message(self, uuid: str) -> dict[str, Any] | None:
        row = super().get_message(uuid)
        return _status_row(row) if row is not None else None

    def get_plugin_rows(self, uuid: str) -> list[dict[str, Any]]:
        return [_status_row(row) for row in super().get_plugin_rows(uuid)]

    def get_history(self, uuid: str) -> list[dict[str, Any]]:
        return [_status_row(row) for row in super().get_history(uuid)]

    def list_messages(self, status: str | None = None, plugin: str | None = None, limit: int = 100,
                      before: str | None = None, before_uuid: str | None = None, since: str | None = None,
                      until: str | None = None) -> list[dict[str, Any]]:
        rows = super().list_messages(status, plugin, limit, before, before_uuid, since, until)
        return [_status_row(row) for row in rows]


def _json_rows(messages: Sequence[Any], extra: Sequence[dict[str, Any]] | None = None) -> str:
    """Messages' columns as a JSON array of objects, for ``json_to_recordset``."""
    return json.dumps([{"uuid": m.uuid, "data_location": getattr(m, "data_location", None),
                        "meta_location": getattr(m, "meta_location", None), "data_type": getattr(m, "type", None),
                        "hash_digest": getattr(m, "hash_digest", None), **(extra[i] if extra else {})}
                       for i, m in enumerate(messages)])


def _as_it_was(uuid: str, existed: bool, status: str, hash_digest: str | None, data_type: str | None,
               info: str | None, attempts: int, old_status: str | None) -> dict[str, Any] | None:
    """A ``_CLAIM_ATTEMPTS`` row as the message's row was before the attempt (``None``: there was none).

    What the processor needs of it: status (DONE kept as it was; others from the statement's
    snapshot), hash, data type, info, attempts."""
    if not existed:
        return None
    # not DONE now means not DONE before (a DONE row stays DONE): the snapshot's DONE would be stale
    earlier = old_status if old_status not in (None, Status.DONE) else status
    return {"uuid": uuid, "status": status if status == Status.DONE else earlier,
            "hash_digest": hash_digest, "data_type": data_type, "info": info, "attempts": attempts - 1}


def _dsn_password(dsn: str | None) -> str:
    if not dsn:
        return ""
    if "://" in dsn:
        return urlsplit(dsn).password or ""
    found = re.search(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn)
    return found.group(1).strip("'") if found else ""
