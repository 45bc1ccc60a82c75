"""Status databases: where every message's and every plugin's outcome is recorded.

A database module (``sqapi/connectors/db/<type>.py``, selected by ``database.type``)
provides ``class Database(config: dict)`` with sqAPI's methods:

* ``initialize_database()`` -- connect and run the configured init script (``database.init``;
  for a plugin, its ``scripts/init.sql``).
* ``initialize_message_table()`` -- run the core schema (``scripts/init.sql``).
* ``execute_script(path, **kwargs)`` / ``execute_query(query, **kwargs)`` -- SQL with psycopg2
  named parameters ``%(name)s``; row-returning statements give a list of dicts, others ``[]``.
* ``update_message(message, status, info=None)``.
* ``ping()`` and ``close()``.
* optionally ``has_status_tables()`` -- whether the core tables exist, creating nothing (no
  file, schema or table); after it, the Database only reads.  ``sqapi status``/``messages``
  use it, and ``describe()`` (where the database is, never a password) for their messages.

The constructor does no I/O.  Driver errors leave as :class:`~sqapi.errors.ConnectorError`.
:class:`StatusStore` holds the status queries every type shares: a connector inherits it and
provides ``execute_query`` and ``transaction()``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqapi.config import init_script_of  # noqa: F401  (re-exported: connectors and sqAPI code import it here)
from sqapi.core.results import OMITTED, dump_result, result_was_omitted  # noqa: F401  (re-exported)
from sqapi.core.status import FINAL_STATUSES, MESSAGE_STATUSES, Status  # noqa: F401  (MESSAGE_STATUSES re-exported)
from sqapi.errors import PermanentError
from sqapi.resources import CORE_SCRIPTS  # the folder holding the core schema (re-exported)
from sqapi.times import utc_text

#: The tables of the core schema.
STATUS_TABLES = ("messages", "message_plugins")
#: The message statuses recorded in ``message_events`` (plugin NULL) as they are written: those that end an attempt.
#: The in-between ones (QUERYING, PROCESSING) are not: the plugin events and the outcome tell the attempt's story.
EVENT_STATUSES = FINAL_STATUSES


_DOLLAR_QUOTE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


class ScriptNotFound(PermanentError):
    """An SQL script named to ``execute_script`` does not exist (or cannot be read); names its path."""


#: statements that change the schema: a script holding one takes the schema lock (PostgreSQL)
_DDL = re.compile(r"\s*(?:CREATE|ALTER|DROP|COMMENT|GRANT|REVOKE|DO|REINDEX|CLUSTER|SECURITY\s+LABEL)\b",
                  re.IGNORECASE)
_NAMED_PARAMETER = re.compile(r"%\((\w+)\)s")


@dataclass(frozen=True)
class Statement:
    """One statement of a script: its text, the ``%(name)s`` parameters it uses, whether it is DDL."""

    number: int
    text: str
    parameters: frozenset[str]
    ddl: bool


@dataclass(frozen=True)
class Script:
    """An SQL script, split once: what ``execute_script`` runs."""

    path: str
    statements: tuple[Statement, ...]

    @property
    def ddl(self) -> bool:
        return any(statement.ddl for statement in self.statements)


_SCRIPTS: dict[str, tuple[tuple[int, int], Script]] = {}
_SCRIPTS_LOCK = threading.Lock()


def load_script(path: str | os.PathLike[str]) -> Script:
    """The script at ``path``, read and split once and reused until the file changes (size or mtime).

    A plugin calls ``execute_script`` on every message: this makes the call cost one ``stat``
    instead of a read and a parse.  Raises :class:`ScriptNotFound` naming the path.
    """
    key = os.fspath(path)
    try:
        info = os.stat(key)
        stamp = (info.st_mtime_ns, info.st_size)
        with _SCRIPTS_LOCK:
            cached = _SCRIPTS.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with open(key, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ScriptNotFound(f"SQL script {key} cannot be read: {reason}") from None
    statements = tuple(Statement(number, statement, frozenset(_NAMED_PARAMETER.findall(statement)),
                                 bool(_DDL.match(statement)))
                       for number, statement in enumerate(split_statements(text), start=1))
    script = Script(key, statements)
    with _SCRIPTS_LOCK:
        _SCRIPTS[key] = (stamp, script)
    return script


_LOADER: tuple[int, str] | None = None


def loader_name() -> str:
    """Who writes a status: ``host:pid`` of this process (``message_events.loader``)."""
    global _LOADER
    pid = os.getpid()
    if _LOADER is None or _LOADER[0] != pid:  # computed once per process (a fork gets its own)
        _LOADER = (pid, f"{socket.gethostname()}:{pid}")
    return _LOADER[1]


def in_params(values: Sequence[Any], prefix: str = "u") -> tuple[str, dict[str, Any]]:
    """``values`` as named parameters for ``IN (...)``: the placeholders (``%(u0)s, %(u1)s``) and their params."""
    params = {f"{prefix}{i}": value for i, value in enumerate(values)}
    return ", ".join(f"%({name})s" for name in params), params


def utcnow() -> str:
    """Now as ISO 8601 UTC with milliseconds: sorts as it reads, in SQLite text and PostgreSQL alike."""
    return utc_text(datetime.now(UTC))


class Database(Protocol):
    config: dict[str, Any]

    def initialize_database(self) -> None: ...

    def initialize_message_table(self) -> None: ...

    def execute_script(self, path: str, **kwargs: Any) -> list[dict[str, Any]]: ...

    def execute_query(self, query: str, **kwargs: Any) -> list[dict[str, Any]]: ...

    def update_message(self, message: Any, status: str, info: str | None = None) -> None: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class KeyedLocks:
    """One lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}

    @contextmanager
    def hold(self, key: str, wait: bool = True) -> Iterator[bool]:
        """Hold ``key``'s lock; yields True, or (``wait=False``) False at once when another holds it."""
        with self._guard:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            if lock.acquire(blocking=wait):
                try:
                    yield True
                finally:
                    lock.release()
            else:
                yield False
        finally:
            with self._guard:
                users[0] -= 1
                if users[0] == 0:
                    del self._locks[key]


_CLAIMS_GUARD = threading.Lock()


#: how a new status meets an existing ``messages`` row: what the message does not say is kept
ON_MESSAGE_CONFLICT = """ON CONFLICT (uuid) DO UPDATE SET
    data_location = COALESCE(excluded.data_location, messages.data_location),
    meta_location = COALESCE(excluded.meta_location, messages.meta_location),
    data_type = COALESCE(excluded.data_type, messages.data_type),
    hash_digest = COALESCE(excluded.hash_digest, messages.hash_digest),
    metadata = COALESCE(excluded.metadata, messages.metadata),
    trace_id = COALESCE(excluded.trace_id, messages.trace_id),
    status = excluded.status,
    info = excluded.info,
    attempts = messages.attempts + excluded.attempts,
    updated_at = excluded.updated_at
"""

_UPSERT_MESSAGE = f"""
INSERT INTO messages (uuid, data_location, meta_location, data_type, hash_digest, metadata, trace_id, status,
                      info, attempts, created_at, updated_at)
VALUES (%(uuid)s, %(data_location)s, %(meta_location)s, %(data_type)s, %(hash_digest)s, %(metadata)s, %(trace_id)s,
        %(status)s, %(info)s, %(attempts)s, %(now)s, %(now)s)
{ON_MESSAGE_CONFLICT}"""

#: how a plugin's new outcome meets its existing row: replaced, the attempt counted
ON_PLUGIN_CONFLICT = """ON CONFLICT (uuid, plugin) DO UPDATE SET
    status = excluded.status,
    info = excluded.info,
    duration_ms = excluded.duration_ms,
    result = excluded.result,
    version = excluded.version,
    attempts = message_plugins.attempts + 1,
    updated_at = excluded.updated_at
"""

_UPSERT_PLUGIN = f"""
INSERT INTO message_plugins (uuid, plugin, status, info, duration_ms, result, version, attempts, updated_at)
VALUES (%(uuid)s, %(plugin)s, %(status)s, %(info)s, %(duration_ms)s, %(result)s, %(version)s, 1, %(now)s)
{ON_PLUGIN_CONFLICT}"""

#: a plugin row's event (run after its upsert; the attempt is the message's count)
_PLUGIN_EVENT = """
INSERT INTO message_events (uuid, attempt, plugin, status, info, duration_ms, version, loader, at)
SELECT %(uuid)s, attempts, %(plugin)s, %(status)s, %(info)s, %(duration_ms)s, %(version)s, %(loader)s, %(now)s
FROM messages WHERE uuid = %(uuid)s"""

#: a message status's event (run after its upsert), for the statuses that end an attempt
_MESSAGE_EVENT = f"""
INSERT INTO message_events (uuid, attempt, status, info, loader, at)
SELECT uuid, attempts, status, info, %(loader)s, %(now)s FROM messages
WHERE uuid = %(uuid)s AND status IN ({", ".join(f"'{s}'" for s in EVENT_STATUSES)})"""

#: a message's history, oldest first (one uuid's writes are serialised by its claim: ``id`` orders them)
HISTORY_QUERY = """
SELECT id, attempt, plugin, status, info, duration_ms, version, loader, at FROM message_events
WHERE uuid = %(uuid)s ORDER BY id"""


class StatusStore:
    """The status queries shared by every database type (portable SQL, named parameters)."""

    config: dict[str, Any]

    def connect(self) -> None:
        raise NotImplementedError

    def execute_script(self, path: str, **kwargs: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    def initialize_database(self) -> None:
        """Connect and run the init script the config names (``init`` or sqAPI's ``scripts.init``), if any."""
        self.connect()
        script = init_script_of(self.config)
        if script:
            self.execute_script(script)

    def initialize_message_table(self) -> None:
        """Create the core status tables (``scripts/init.sql``, or the type's variant of it)."""
        self.connect()
        self.execute_script(str(CORE_SCRIPTS / "init.sql"))

    def execute_query(self, query: str, **kwargs: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def claim(self, uuid: str) -> AbstractContextManager[Any]:
        """Hold ``uuid`` for one attempt: a second attempt at the same uuid waits until this one ends.

        The processor wraps each attempt in it, so concurrent duplicates of one message run
        one after the other: the later one finds the earlier one's DONE and runs no plugin
        again.  This default serialises threads of one process; a database shared by several
        processes (PostgreSQL) overrides it with a lock all of them see.
        """
        return self._keyed_locks().hold(uuid)

    def try_claim(self, uuid: str) -> AbstractContextManager[bool]:
        """:meth:`claim` without waiting: yields whether ``uuid`` is now held, False when another attempt holds it."""
        return self._keyed_locks().hold(uuid, wait=False)

    def try_lock(self, name: str) -> AbstractContextManager[bool]:
        """Hold the lock ``name`` for a long operation (``sqapi redrive``): yields True, or False at once when
        another holds it.  This default is seen by the threads of one process; PostgreSQL's and SQLite's are
        seen by every process using the same status database."""
        return self._keyed_locks().hold(f"lock:{name}", wait=False)

    def _keyed_locks(self) -> KeyedLocks:
        with _CLAIMS_GUARD:
            claims = self.__dict__.get("_claims")
            if claims is None:
                claims = self.__dict__["_claims"] = KeyedLocks()
        return claims

    def update_message(self, message: Any, status: str, info: str | None = None) -> None:
        """Record ``status`` (and ``info``) for ``message``; creates the row when it is new.  A status that ends an
        attempt (:data:`EVENT_STATUSES`) is also added to the message's history, in the same transaction."""
        params = _message_params(message, status, info, attempts=0)
        if status not in EVENT_STATUSES:
            self.execute_query(_UPSERT_MESSAGE, **params)
            return
        with self.transaction():
            self.execute_query(_UPSERT_MESSAGE, **params)
            self.execute_query(_MESSAGE_EVENT, **params)

    def execute_many(self, query: str, rows: Sequence[dict[str, Any]]) -> None:
        """Run one statement (returning no rows) for each parameter set in ``rows``, in one transaction."""
        with self.transaction():
            for params in rows:
                self.execute_query(query, **params)

    @contextmanager
    def claim_many(self, uuids: Sequence[str]) -> Iterator[set[str]]:
        """Hold several uuids at once for one batch of attempts; yields the uuids held.

        This default takes this process's per-uuid locks in sorted order (so two batches never
        wait for each other in a cycle) and holds them all.  A database shared by several
        processes may yield fewer: the processor handles the rest one by one with :meth:`claim`.
        """
        with ExitStack() as stack:
            for uuid in sorted(set(uuids)):
                stack.enter_context(self.claim(uuid))
            yield set(uuids)

    @contextmanager
    def claim_attempts(self, messages: Sequence[Any], status: str) -> Iterator[dict[str, dict[str, Any] | None]]:
        """Claim several messages' uuids and count an attempt at each held one; yields uuid -> its row as it was.

        This default is :meth:`claim_many` then :meth:`record_attempts`; PostgreSQL does both in one
        round trip."""
        with self.claim_many([m.uuid for m in messages]) as held:
            mine = [m for m in messages if m.uuid in held]
            rows = self.record_attempts(mine, status) if mine else []
            yield {m.uuid: row for m, row in zip(mine, rows, strict=True)}

    def update_messages(self, updates: Sequence[tuple[Any, str, str | None]]) -> None:
        """Record ``(message, status, info)`` for several messages in one transaction."""
        if len(updates) == 1:
            self.update_message(*updates[0])
        elif updates:
            params = [_message_params(m, s, i, attempts=0) for m, s, i in updates]
            with self.transaction():
                self.execute_many(_UPSERT_MESSAGE, params)
                events = [p for p in params if p["status"] in EVENT_STATUSES]
                if events:
                    self.execute_many(_MESSAGE_EVENT, events)

    def update_plugins(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record several plugin outcomes (dicts of :meth:`update_plugin`'s arguments) in one transaction."""
        if len(rows) == 1:
            self.update_plugin(**rows[0])
        elif rows:
            params = [_plugin_params(**row) for row in rows]
            with self.transaction():
                self.execute_many(_UPSERT_PLUGIN, params)
                self.execute_many(_PLUGIN_EVENT, params)

    def record_progress(self, updates: Sequence[tuple[Any, str, str | None]], rows: Sequence[dict[str, Any]],
                        last: bool = False) -> None:
        """Plugin rows (as :meth:`update_plugins`) and message statuses (as :meth:`update_messages`) in one transaction.

        ``last``: nothing more is written under the current claim; a database may release the
        claim together with this write (PostgreSQL does, saving a round trip).
        """
        if rows and updates:
            with self.transaction():
                self.update_plugins(rows)
                self.update_messages(updates)
        elif rows:
            self.update_plugins(rows)
        elif updates:
            self.update_messages(updates)

    def record_attempts(self, messages: Sequence[Any], status: str) -> list[dict[str, Any] | None]:
        """:meth:`record_attempt` for several messages (distinct uuids) at once: their rows as they were."""
        if len(messages) == 1:
            return [self.record_attempt(messages[0], status)]
        placeholders, names = in_params([m.uuid for m in messages])
        with self.transaction():
            rows = self.execute_query(f"SELECT * FROM messages WHERE uuid IN ({placeholders})", **names)
            found = {row["uuid"]: row for row in rows}
            previous = [found.get(m.uuid) for m in messages]
            now = utcnow()
            done = [{"uuid": m.uuid, "now": now} for m, row in zip(messages, previous, strict=True)
                    if row is not None and row["status"] == Status.DONE]
            fresh = [_message_params(m, status, None, attempts=1) for m, row in zip(messages, previous, strict=True)
                     if row is None or row["status"] != Status.DONE]
            if done:
                self.execute_many(
                    "UPDATE messages SET attempts = attempts + 1, updated_at = %(now)s WHERE uuid = %(uuid)s", done)
            if fresh:
                self.execute_many(_UPSERT_MESSAGE, fresh)
        return previous

    def record_attempt(self, message: Any, status: str) -> dict[str, Any] | None:
        """Start an attempt at ``message``: return its row as it was, count the attempt, set ``status``.

        A message already DONE keeps its DONE status (and info) here; the processor decides,
        once it knows the data's hash, whether there is anything left to do.
        """
        with self.transaction():
            rows = self.execute_query("SELECT * FROM messages WHERE uuid = %(uuid)s", uuid=message.uuid)
            previous = rows[0] if rows else None
            if previous is not None and previous["status"] == Status.DONE:
                self.execute_query(
                    "UPDATE messages SET attempts = attempts + 1, updated_at = %(now)s WHERE uuid = %(uuid)s",
                    uuid=message.uuid, now=utcnow())
            else:
                self.execute_query(_UPSERT_MESSAGE, **_message_params(message, status, None, attempts=1))
        return previous

    def update_plugin(self, uuid: str, plugin: str, status: str, info: str | None = None,
                      duration_ms: float | None = None, result: str | None = None, version: str | None = None) -> None:
        """Record one plugin's outcome for one message (``version``: the plugin's that ran), and add it to the
        message's history, in one transaction."""
        params = _plugin_params(uuid, plugin, status, info, duration_ms, result, version)
        with self.transaction():
            self.execute_query(_UPSERT_PLUGIN, **params)
            self.execute_query(_PLUGIN_EVENT, **params)

    def get_history(self, uuid: str) -> list[dict[str, Any]]:
        """Every event of ``uuid``, oldest first: each plugin outcome of each attempt, and each attempt's outcome."""
        return self.execute_query(HISTORY_QUERY, uuid=uuid)

    def forget_plugin_rows(self, uuids: list[str]) -> None:
        """Delete the plugin rows of ``uuids`` (their data changed: what plugins did with the old data is void)."""
        placeholders, names = in_params(uuids)
        self.execute_query(f"DELETE FROM message_plugins WHERE uuid IN ({placeholders})", **names)

    def restart_attempts(self, attempts: dict[str, int]) -> None:
        """Set the ``attempts`` of these messages (uuid -> count): finished work whose data changed counts anew."""
        self.execute_many("UPDATE messages SET attempts = %(n)s WHERE uuid = %(uuid)s",
                          [{"uuid": uuid, "n": n} for uuid, n in attempts.items()])

    def get_message(self, uuid: str) -> dict[str, Any] | None:
        rows = self.execute_query("SELECT * FROM messages WHERE uuid = %(uuid)s", uuid=uuid)
        return rows[0] if rows else None

    def get_plugin_rows(self, uuid: str) -> list[dict[str, Any]]:
        return self.execute_query(
            "SELECT plugin, status, info, duration_ms, result, version, attempts, updated_at FROM message_plugins "
            "WHERE uuid = %(uuid)s ORDER BY plugin", uuid=uuid)

    def list_messages(self, status: str | None = None, plugin: str | None = None, limit: int = 100,
                      before: str | None = None, before_uuid: str | None = None, since: str | None = None,
                      until: str | None = None) -> list[dict[str, Any]]:
        """Newest first; ``before`` (an ``updated_at`` value) pages further back; ``since``/``until`` (ISO 8601
        UTC, as :func:`utcnow` writes) keep those updated in that span, both ends included.

        Rows are ordered by ``(updated_at DESC, uuid)``; pass the last row's ``updated_at`` and
        ``uuid`` as ``before`` and ``before_uuid`` to get the next page without skipping rows
        that share its ``updated_at``.
        """
        clauses: list[str] = []
        params: dict[str, Any] = {"limit": int(limit)}
        if status:
            clauses.append("m.status = %(status)s")
            params["status"] = status
        if plugin:
            clauses.append("EXISTS (SELECT 1 FROM message_plugins p WHERE p.uuid = m.uuid "
                           "AND p.plugin = %(plugin)s)")
            params["plugin"] = plugin
        if before and before_uuid:
            clauses.append("(m.updated_at < %(before)s OR (m.updated_at = %(before)s AND m.uuid > %(before_uuid)s))")
            params.update(before=before, before_uuid=before_uuid)
        elif before:
            clauses.append("m.updated_at < %(before)s")
            params["before"] = before
        if since:
            clauses.append("m.updated_at >= %(since)s")
            params["since"] = since
        if until:
            clauses.append("m.updated_at <= %(until)s")
            params["until"] = until
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return self.execute_query(
            f"SELECT m.* FROM messages m {where} ORDER BY m.updated_at DESC, m.uuid LIMIT %(limit)s", **params)

    def count_by_status(self) -> dict[str, int]:
        rows = self.execute_query("SELECT status, COUNT(*) AS n FROM messages GROUP BY status")
        return {row["status"]: int(row["n"]) for row in rows}


def metadata_text(message: Any) -> str | None:
    """The message's metadata as JSON text for ``messages.metadata`` (``None``: not known yet, the stored one kept).

    The processor sets ``message.metadata`` when it fetches it, so the final status of an attempt
    records the metadata that attempt used."""
    metadata = getattr(message, "metadata", None)
    if metadata is None:
        return None
    return json.dumps(metadata, default=str)  # ASCII: a lone surrogate from a meta store cannot break the write


def _plugin_params(uuid: str, plugin: str, status: str, info: str | None = None, duration_ms: float | None = None,
                   result: str | None = None, version: str | None = None) -> dict[str, Any]:
    return {"uuid": uuid, "plugin": plugin, "status": status, "info": info, "duration_ms": duration_ms,
            "result": result, "version": version, "loader": loader_name(), "now": utcnow()}


def _message_params(message: Any, status: str, info: str | None, attempts: int) -> dict[str, Any]:
    return {
        "uuid": message.uuid,
        "data_location": getattr(message, "data_location", None),
        "meta_location": getattr(message, "meta_location", None),
        "data_type": getattr(message, "type", None),
        "hash_digest": getattr(message, "hash_digest", None),
        "metadata": metadata_text(message),
        "trace_id": getattr(message, "trace_id", None),
        "status": status,
        "info": info,
        "attempts": attempts,
        "loader": loader_name(),
        "now": utcnow(),
    }


def split_statements(script: str) -> Iterator[str]:
    """Split an SQL script into statements on ``;`` outside quotes, ``$tag$`` bodies and comments."""
    buf: list[str] = []
    quote: str | None = None
    i, n = 0, len(script)
    while i < n:
        ch = script[i]
        if quote:
            buf.append(ch)
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
            buf.append(ch)
        elif ch == "$" and (tag := _DOLLAR_QUOTE.match(script, i)) is not None:
            end = script.find(tag.group(), tag.end())
            stop = n if end == -1 else end + len(tag.group())
            buf.append(script[i:stop])
            i = stop
            continue
        elif ch == "-" and script.startswith("--", i):
            end = script.find("\n", i)
            i = n if end == -1 else end
            continue
        elif ch == "/" and script.startswith("/*", i):
            end = script.find("*/", i + 2)
            i = n if end == -1 else end + 2
            continue
        elif ch == ";":
            statement = "".join(buf).strip()
            if statement:
                yield statement
            buf = []
        else:
            buf.append(ch)
        i += 1
    statement = "".join(buf).strip()
    if statement:
        yield statement
