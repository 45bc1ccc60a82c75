"""Re-run what did not finish: ``sqapi redrive``, and the dashboard's redrive button.

:func:`redrive` selects messages in the status database (by uuid, status, plugin, time, reason)
and re-publishes each once through the configured broker's publisher, so that the plugins that
did not finish run again (the processor re-runs only the plugins not DONE for the same data).
It also drains what the listener type set aside (RabbitMQ's ``<queue>.dead``, the spool folder's
``failed/``): a dead letter of a selected message is what gets re-published -- its body as first
published -- and it is removed only once that re-publish is confirmed.  Only the letters there
when the run starts are read, all of them before the first re-publish: a message re-published
that fails again at once sets aside a new letter, which stays for the next run.

One redrive or reprocess runs at a time on a status database (:data:`RUN_LOCK`, held for the whole
run: a PostgreSQL advisory lock, a lock file beside a SQLite database); a second one is refused at
once.  A dry run takes no lock and reads no dead letter (it counts them): it changes nothing.

Each message goes through three steps, in this order, so that a run killed at any point and run
again loses nothing:

1. **reopen** its status row: ``RETRY``, ``attempts`` 0 (the retry policy starts counting again:
   a FAILED message that had used up its attempts would otherwise be given up at once), and an
   ``info`` starting with :data:`PENDING` -- only if the row is still as read (a compare-and-set:
   a loader that took it up meanwhile wins); its history (``message_events``) gets that status and
   info, in the same transaction;
2. **publish** it and wait for the broker's confirm, then remove its dead letter, if any;
3. **mark** the row re-published (``info`` starts with :data:`PUBLISHED`) -- only if no loader
   took it up meanwhile.

Every run also selects the rows a killed run left at step 1 or 2 (``RETRY`` with a :data:`PENDING`
info), whatever its selection: each is taken over by the same compare-and-set and published
(again).  A message killed between its confirm and its mark is thus published twice -- the one
window where a redrive repeats itself; the processor runs its plugins once (the second delivery
finds it DONE and is acknowledged) unless the first delivery failed again.  A row marked
re-published is selected by no later run until a loader took it up (``--status RETRY`` selects it
explicitly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

from sqapi.connectors.db import in_params, loader_name, utcnow
from sqapi.core.status import MESSAGE_STATUSES, Status
from sqapi.errors import ConfigError, MessageError, SqapiError
from sqapi.logs import abbreviate
from sqapi.times import as_utc, utc_text

__all__ = ["PENDING", "PUBLISHED", "RUN_LOCK", "Report", "Selection", "SelectionError", "like_pattern", "redrive"]

#: the ``info`` of a row reopened and not yet confirmed re-published
PENDING = "redrive: re-publishing"
#: the ``info`` of a row re-published, until a loader takes it up
PUBLISHED = "redrive: re-published"
#: the lock a redrive or reprocess holds on the status database for its whole run: one at a time
RUN_LOCK = "redrive"
#: statuses a redrive selects when none is given: FAILED; with uuids, FAILED and VALIDATING (not DONE, not in
#: progress, and not RETRY: a message waiting for its retry is published again already -- ``--status RETRY`` takes it)
DEFAULT_STATUSES = (Status.FAILED,)
UUID_STATUSES = (Status.FAILED, Status.VALIDATING)
MAX_INFO_CHARS = 2000


class SelectionError(ValueError):
    """A selection that cannot be right (an unknown status, ``since`` after ``until``, nothing to select by)."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which messages to re-run.  Every criterion given must hold (they combine with AND).

    ``uuids``: these messages only; ``status``: their ``messages.status`` (default FAILED; with
    ``uuids``, FAILED or VALIDATING -- a RETRY row waits for its retry, unless named); ``plugin``: a
    plugin whose row is not DONE; ``since``/``until``: when the message's row last changed (``updated_at``; a datetime
    without a timezone is UTC); ``reason``: a substring (any case) of the message's ``info``, or of
    that plugin's when ``plugin`` is given.
    """

    uuids: tuple[str, ...] = ()
    status: str | None = None
    plugin: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    reason: str | None = None

    def check(self) -> None:
        """Raise :class:`SelectionError` saying what is wrong with this selection."""
        if self.status is not None and self.status.upper() not in MESSAGE_STATUSES:
            raise SelectionError(f"unknown status {self.status!r}; one of: {', '.join(MESSAGE_STATUSES)}")
        if self.status is not None and self.status.upper() == Status.DONE:
            raise SelectionError("a DONE message has nothing left to run; to run a plugin again on messages "
                                 "an older version of it processed, use `sqapi reprocess --plugin P --outdated`")
        if self.since is not None and self.until is not None and as_utc(self.since) > as_utc(self.until):
            raise SelectionError(f"since ({utc_text(self.since)}) is after until ({utc_text(self.until)})")
        if any(not isinstance(u, str) or not u.strip() for u in self.uuids):
            raise SelectionError("a uuid to select is blank")

    def statuses(self) -> tuple[str, ...]:
        if self.status is not None:
            return (self.status.upper(),)
        return tuple(UUID_STATUSES if self.uuids else DEFAULT_STATUSES)


@dataclasses.dataclass
class Report:
    """What a redrive did (or, dry, would do)."""

    selected: list[str] = dataclasses.field(default_factory=list)   # uuids from the status database
    republished: int = 0                                             # messages published again
    from_dead: int = 0                                               # of those, drained from .dead / failed/
    dead_letters: int | None = None                                  # dry run: letters waiting there (not read)
    lines: list[str] = dataclasses.field(default_factory=list)      # one per message: what was / would be done


def like_pattern(text: str) -> str:
    """``text``, lowered, as a LIKE pattern matching it anywhere (``ESCAPE '\\'``); compare with ``LOWER(column)``."""
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def select_rows(database: Any, selection: Selection) -> list[dict[str, Any]]:
    """The ``messages`` rows a selection names, oldest change first -- and every row a killed run left pending."""
    clauses: list[str] = []
    params: dict[str, Any] = {"pending": PENDING + "%", "retry": Status.RETRY}
    listed, names = in_params(selection.statuses(), "s")
    params.update(names)
    clauses.append(f"m.status IN ({listed})")
    # a row re-published by an earlier redrive waits for a loader: only an explicit --status RETRY takes it
    if selection.status is None:
        clauses.append("NOT (m.status = %(retry)s AND COALESCE(m.info, '') LIKE %(published)s)")
        params["published"] = PUBLISHED + "%"
    if selection.uuids:
        listed, uuids = in_params(list(dict.fromkeys(selection.uuids)))
        params.update(uuids)
        clauses.append(f"m.uuid IN ({listed})")
    if selection.since is not None:
        clauses.append("m.updated_at >= %(since)s")
        params["since"] = utc_text(selection.since)
    if selection.until is not None:
        clauses.append("m.updated_at <= %(until)s")
        params["until"] = utc_text(selection.until)
    if selection.plugin:
        params["plugin"] = selection.plugin
        params["done"] = Status.DONE
        plugin_reason = ""
        if selection.reason:
            plugin_reason = (" AND (LOWER(COALESCE(p.info, '')) LIKE %(reason)s ESCAPE '\\' "
                             "OR LOWER(COALESCE(m.info, '')) LIKE %(reason)s ESCAPE '\\')")
        clauses.append("EXISTS (SELECT 1 FROM message_plugins p WHERE p.uuid = m.uuid AND p.plugin = %(plugin)s "
                       f"AND p.status <> %(done)s{plugin_reason})")
    elif selection.reason:
        clauses.append("LOWER(COALESCE(m.info, '')) LIKE %(reason)s ESCAPE '\\'")
    if selection.reason:
        params["reason"] = like_pattern(selection.reason)
    where = " AND ".join(clauses)
    query = (f"SELECT m.* FROM messages m WHERE ({where}) "
             "OR (m.status = %(retry)s AND COALESCE(m.info, '') LIKE %(pending)s) "
             "ORDER BY m.updated_at, m.uuid")
    return database.execute_query(query, **params)


def reopen(database: Any, row: Mapping[str, Any], now: str, verb: str = PENDING) -> str | None:
    """Step 1: the row RETRY, ``attempts`` 0, a pending ``info``, and its history event, in one transaction -- only if
    the row is still as read (status and info: a compare-and-set); that info, or None when the row changed.

    A row a killed run left pending (its info starts with ``verb``) is taken over the same way: its info
    gets this run's time, so that of two takers only the first finds the row as read."""
    was = str(row.get("info") or "")
    if was.startswith(verb):
        info = _retaken(was, verb, now)
    else:
        info = abbreviate(f"{verb} at {now} (was {row['status']}: {was})", MAX_INFO_CHARS)
    with database.transaction():
        changed = database.execute_query(
            "UPDATE messages SET status = %(retry)s, attempts = 0, info = %(info)s, updated_at = %(now)s "
            "WHERE uuid = %(uuid)s AND status = %(status)s AND COALESCE(info, '') = %(was)s RETURNING uuid",
            retry=Status.RETRY, info=info, now=now, uuid=row["uuid"], status=row["status"], was=was)
        if not changed:
            return None
        # the message's history shows it: "redrive: re-publishing at ... (was FAILED: ...)"
        database.execute_query(
            "INSERT INTO message_events (uuid, attempt, status, info, loader, at) "
            "SELECT uuid, attempts, status, info, %(loader)s, %(now)s FROM messages WHERE uuid = %(uuid)s",
            loader=loader_name(), now=now, uuid=row["uuid"])
    return info


def _retaken(was: str, verb: str, now: str) -> str:
    """A pending info taken over at ``now``: ``<verb> at <now>`` and what followed the old time -- never ``was``."""
    found = re.match(re.escape(verb) + r" at \S+", was)
    info = f"{verb} at {now}{was[found.end():]}" if found else abbreviate(f"{verb} at {now} ({was})", MAX_INFO_CHARS)
    return info if info != was else f"{verb} at {now} (again){was[found.end():] if found else ''}"


def mark_published(database: Any, uuid: str, pending_info: str, now: str, pending: str = PENDING,
                   published: str = PUBLISHED) -> None:
    """Step 3: the row says it was re-published -- unless a loader has taken it up since."""
    database.execute_query(
        "UPDATE messages SET info = %(info)s, updated_at = %(now)s "
        "WHERE uuid = %(uuid)s AND status = %(retry)s AND info = %(pending)s",
        info=published + pending_info[len(pending):], now=now, uuid=uuid, retry=Status.RETRY,
        pending=pending_info)


def body_for(broker: Mapping[str, Any], row: Mapping[str, Any]) -> bytes:
    """A message for a status row, in the configured format: its uuid, data and meta locations and type
    (and its metadata, when it came in the message: without a ``meta_location``)."""
    from sqapi.core.message import field_map

    parser = broker.get("parser") or {}
    keys = {name: str(spec["key"]) for name, spec in field_map(broker).items()}
    values: dict[str, Any] = {"uuid": row["uuid"], "data_location": row.get("data_location")}
    if row.get("meta_location"):
        values["meta_location"] = row["meta_location"]
    if row.get("data_type"):
        values["type"] = row["data_type"]
    if row.get("metadata") and not row.get("meta_location"):
        try:
            values["metadata"] = json.loads(row["metadata"])
        except ValueError:
            pass
    if parser.get("type", "json") == "string":
        delimiter = str(parser.get("delimiter", "|"))
        order = [f.strip() for f in str(parser.get("format") or delimiter.join(
            ("uuid", "data_location", "metadata"))).split(delimiter)]
        parts = [json.dumps(values[f]) if f == "metadata" and f in values else str(values.get(f) or "")
                 for f in order]
        return delimiter.join(parts).encode()
    return json.dumps({keys[name]: value for name, value in values.items() if name in keys}).encode()


@dataclasses.dataclass
class Parts:
    """What a redrive works with: the status database, the broker section, its publisher and dead letters."""

    database: Any
    broker: dict[str, Any]
    publisher: Any = None
    dead: Any = None


@contextlib.contextmanager
def open_parts(config: Mapping[str, Any], dry_run: bool = False) -> Iterator[Parts]:
    """The status database (its tables must exist; unless dry, :data:`RUN_LOCK` held on it), and the configured
    broker's publisher (unless dry) and dead letters (when its type can read them back); all closed on exit."""
    from sqapi import registry
    from sqapi.connectors.listeners import dead_letters_for, publisher_for

    source = getattr(config, "source", None)
    broker = dict(config.get("msg_broker") or {})
    listener_class = registry.listener_class(broker, source)
    section = dict(config.get("database") or {})
    database = registry.open_status_database(section, source)
    parts = Parts(database, broker)
    with contextlib.ExitStack() as stack:
        try:
            database.close()  # the check may have opened it read-only (SQLite): the writes below open it again
            if not dry_run:
                if not stack.enter_context(registry.try_lock(database, RUN_LOCK)):
                    where = registry.where(database, section, with_schema=True) or section.get("type")
                    raise SqapiError(f"another redrive or reprocess is running on the status database at {where}: "
                                     "one at a time -- run this again once it has ended")
                try:
                    parts.publisher = publisher_for(listener_class, broker)
                except NotImplementedError:
                    raise ConfigError("msg_broker.type", f"'{broker.get('type')}' cannot publish, so cannot "
                                      "redrive", "configure msg_broker.type: rabbitmq or directory", source) from None
                parts.publisher.open()
            try:
                parts.dead = dead_letters_for(listener_class, broker)
            except NotImplementedError:
                parts.dead = None
            if parts.dead is not None and not dry_run:
                parts.dead.open()
            yield parts
        finally:
            for part in (parts.dead, parts.publisher, database):
                if part is not None:
                    with contextlib.suppress(Exception):  # closing what may be broken already: the cause was raised
                        part.close()


class _Parser:
    """The uuid of a dead letter's body, as the loader parses it (None: malformed, no uuid)."""

    def __init__(self, broker: Mapping[str, Any]) -> None:
        from sqapi.core.message import MessageParser

        self.parser = MessageParser(broker)

    def uuid_of(self, body: bytes) -> str | None:
        try:
            return self.parser.parse(body, "dead letter").uuid
        except MessageError as exc:
            return exc.uuid


def redrive(config: Mapping[str, Any], selection: Selection, *, dry_run: bool = False,
            progress: Callable[[str], None] | None = None) -> Report:
    """Re-publish the selected messages so that the plugins that did not finish run again.

    ``config`` is sqapi's merged config.  Raises :class:`SelectionError` for a bad selection and
    :class:`sqapi.errors.SqapiError` when the database or the broker cannot be reached (what was
    done until then is kept; run again to finish).  ``progress`` gets each line as it is done.
    """
    selection.check()
    report = Report()

    def say(line: str) -> None:
        report.lines.append(line)
        if progress is not None:
            progress(line)

    with open_parts(config, dry_run=dry_run) as parts:
        rows = {row["uuid"]: row for row in select_rows(parts.database, selection)}
        report.selected = list(rows)
        if dry_run:
            _dry_run(parts, rows, report, say)
            return report
        # the dead letters of selected messages, every one read before the first re-publish and only those there
        # when the scan began: a letter set aside after it (a re-published message failing again) is never taken
        letters: dict[str, Any] = {}
        copies: dict[str, list[Any]] = {}
        if parts.dead is not None:
            parser = _Parser(parts.broker)
            for letter in parts.dead.scan():
                uuid = parser.uuid_of(letter.body)
                if uuid is None or uuid not in rows:
                    continue  # not selected: returned to where it was when the scan closes
                if uuid in letters:
                    copies.setdefault(uuid, []).append(letter)
                else:
                    letters[uuid] = letter
        for uuid, row in rows.items():
            letter = letters.get(uuid)
            if letter is None and not row.get("data_location"):
                say(f"{uuid}: skipped, its row has no data_location to publish (and no dead letter holds it)")
                continue
            now = utcnow()
            pending = reopen(parts.database, row, now)
            if pending is None:
                say(f"{uuid}: skipped, its status changed since it was selected")
                continue  # its letters are returned when the scan closes
            if letter is not None:
                parts.publisher.publish(letter.body, message_id=uuid)
                parts.dead.remove(letter)
                for copy in copies.get(uuid, ()):  # set aside before this run began: the message is on its way
                    parts.dead.remove(copy)
                    say(f"{uuid}: removed another copy from {copy.where}")
                report.from_dead += 1
            else:
                parts.publisher.publish(body_for(parts.broker, row), message_id=uuid)
            mark_published(parts.database, uuid, pending, utcnow())
            say(f"{uuid} {row['status']}: re-published from {letter.where if letter else 'its status row'}")
            report.republished += 1
    return report


def _dry_run(parts: Parts, rows: Mapping[str, Mapping[str, Any]], report: Report, say: Callable[[str], None]) -> None:
    """What a run would do, from the status rows alone: no dead letter is read (RabbitMQ would count each
    return against a quorum queue's delivery limit), only counted."""
    where = None
    if parts.dead is not None:
        report.dead_letters = parts.dead.count()
        where = parts.dead.name
    for uuid, row in rows.items():
        if where is None:
            source = "from its status row" if row.get("data_location") else None
        elif row.get("data_location"):
            source = f"from {where} if it holds its dead letter, else from its status row"
        else:
            source = f"from {where} if it holds its dead letter (its row has no data_location)"
        if source is None:
            say(f"{uuid}: would skip, its row has no data_location to publish")
            continue
        say(f"{uuid} {row['status']}: would re-publish {source}")
        report.republished += 1


def describe_selection(selection: Selection) -> str:
    parts: list[str] = [f"status {'/'.join(selection.statuses())}"]
    if selection.uuids:
        parts.append(f"{len(selection.uuids)} uuid(s)")
    if selection.plugin:
        parts.append(f"plugin {selection.plugin} not DONE")
    if selection.since:
        parts.append(f"since {utc_text(selection.since)}")
    if selection.until:
        parts.append(f"until {utc_text(selection.until)}")
    if selection.reason:
        parts.append(f"reason contains {selection.reason!r}")
    return ", ".join(parts)
