"""Re-run a plugin after it changed: ``sqapi reprocess --plugin P --outdated``.

A plugin declares a ``version`` in its ``config.yml``; ``message_plugins.version`` records the one
that ran.  :func:`reprocess` takes the messages whose row for P holds another version (or none),
in batches ordered by uuid, and for each: reopens its status row (as :mod:`sqapi.redrive` does,
with :data:`PENDING`), sets the rows of P and of every plugin that runs after it (``after``,
transitively) to RETRY -- the only plugins a loader then runs, since it re-runs only plugins not
DONE for the same data -- publishes the message, and marks its row re-published.

Resumable: a killed run, run again, selects the messages not yet re-published (the row of P still
holds the old version and the message is not marked re-published) -- those it left half-done
included, taken over by :func:`~sqapi.redrive.reopen`'s compare-and-set -- and nothing else; once
a loader has run P on a message, its row holds the new version and no later run selects it.  A
message killed between its publish confirm and its mark is published once more (the one repeat).
It holds :data:`~sqapi.redrive.RUN_LOCK` like a redrive: one redrive or reprocess at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from sqapi.config import Config
from sqapi.connectors.db import in_params, utcnow
from sqapi.core.status import Status
from sqapi.redrive import SelectionError, body_for, mark_published, open_parts, reopen

__all__ = ["PENDING", "PUBLISHED", "ReprocessReport", "reprocess"]

PENDING = "reprocess: re-publishing"
PUBLISHED = "reprocess: re-published"
BATCH_SIZE = 100
#: a message a loader is at: left for a later run
IN_PROGRESS = (Status.VALIDATING, Status.QUERYING, Status.PROCESSING)


@dataclasses.dataclass
class ReprocessReport:
    plugin: str
    version: str
    rerun: list[str]                       # the plugin and those that run after it, in execution order
    outdated: int = 0                      # messages selected when the run started
    republished: int = 0
    lines: list[str] = dataclasses.field(default_factory=list)


def plugins_to_rerun(config: Mapping[str, Any], name: str) -> tuple[str, list[str]]:
    """``name``'s declared version, and ``name`` with every active plugin that runs after it, in execution order."""
    from sqapi.app import database_factory
    from sqapi.core.plugins import load_plugins

    main = config if isinstance(config, Config) else Config(config)
    plugins = load_plugins(main, database_factory(main))
    try:
        plugin = plugins.plugins.get(name)
        if plugin is None or plugin.name not in plugins.order:
            state = "not found" if plugin is None else f"{plugin.state}: {plugin.reason}"
            raise SelectionError(f"plugin {name!r} is not active ({state}); active: {', '.join(plugins.order)}")
        if plugin.version is None:
            raise SelectionError(f"plugin {name!r} declares no version: --outdated compares the version that ran "
                                 f"with the current one; add `version: '1'` to {plugin.directory}/config.yml")
        active = {p.name: p for p in plugins.active}

        def runs_after(other: str) -> list[str]:
            after = active[other].after
            if "*" in after:
                return [n for n, p in active.items() if n != other and "*" not in p.after]
            return after

        rerun = {name}
        grew = True
        while grew:
            grew = False
            for other in active:
                if other not in rerun and rerun & set(runs_after(other)):
                    rerun.add(other)
                    grew = True
        return plugin.version, [n for n in plugins.order if n in rerun]
    finally:
        plugins.close()


def _outdated_where() -> str:
    return ("FROM messages m JOIN message_plugins p ON p.uuid = m.uuid AND p.plugin = %(plugin)s "
            "WHERE (p.version IS NULL OR p.version <> %(version)s) "
            "AND m.status NOT IN (%(validating)s, %(querying)s, %(processing)s) "
            "AND NOT (m.status = %(retry)s AND COALESCE(m.info, '') LIKE %(published)s)")


def _params(plugin: str, version: str) -> dict[str, Any]:
    return {"plugin": plugin, "version": version, "validating": Status.VALIDATING, "querying": Status.QUERYING,
            "processing": Status.PROCESSING, "retry": Status.RETRY, "published": PUBLISHED + "%"}


def reprocess(config: Mapping[str, Any], plugin: str, *, batch_size: int = BATCH_SIZE, dry_run: bool = False,
              progress: Callable[[str], None] | None = None) -> ReprocessReport:
    """Re-run ``plugin`` (and the plugins after it) on every message an older version of it processed.

    Raises :class:`~sqapi.redrive.SelectionError` for a plugin that is not active or declares no
    version, :class:`~sqapi.errors.SqapiError` when the database or broker fails (run again to finish).
    """
    if batch_size < 1:
        raise SelectionError(f"batch size must be at least 1, not {batch_size}")
    version, rerun = plugins_to_rerun(config, plugin)
    report = ReprocessReport(plugin=plugin, version=version, rerun=rerun)

    def say(line: str) -> None:
        report.lines.append(line)
        if progress is not None:
            progress(line)

    params = _params(plugin, version)
    with open_parts(config, dry_run=dry_run) as parts:
        database = parts.database
        report.outdated = int(database.execute_query(f"SELECT COUNT(*) AS n {_outdated_where()}", **params)[0]["n"])
        say(f"{report.outdated} message(s) processed by another version of {plugin} than {version}; "
            f"{'would re-run' if dry_run else 're-running'} {', '.join(rerun)}")
        last = ""
        batch_no = 0
        while True:
            rows = database.execute_query(
                f"SELECT m.*, p.version AS plugin_version {_outdated_where()} AND m.uuid > %(last)s "
                "ORDER BY m.uuid LIMIT %(limit)s", **params, last=last, limit=batch_size)
            if not rows:
                break
            batch_no += 1
            last = rows[-1]["uuid"]
            done = 0
            for row in rows:
                if dry_run or _republish(parts, row, rerun, version):
                    done += 1
            report.republished += done
            say(f"batch {batch_no}: {'would re-publish' if dry_run else 're-published'} {done} of {len(rows)} "
                f"({report.republished} of {report.outdated})")
    return report


def _republish(parts: Any, row: Mapping[str, Any], rerun: list[str], version: str) -> bool:
    """Reopen the row and the rerun plugins' rows (one transaction), publish, mark; False if the row changed."""
    database, uuid = parts.database, str(row["uuid"])
    if not row.get("data_location"):
        return False
    now = utcnow()
    info = f"{row.get('plugin_version') or 'no version'} -> {version}"
    with database.transaction():
        pending = reopen(database, row, now, verb=PENDING)
        if pending is None:
            return False
        listed, names = in_params(rerun, "r")
        database.execute_query(
            f"UPDATE message_plugins SET status = %(retry)s, info = %(info)s, updated_at = %(now)s "
            f"WHERE uuid = %(uuid)s AND plugin IN ({listed})",
            retry=Status.RETRY, info=f"reprocess: {info}", now=now, uuid=uuid, **names)
    parts.publisher.publish(body_for(parts.broker, row), message_id=uuid)
    mark_published(database, uuid, pending, utcnow(), pending=PENDING, published=PUBLISHED)
    return True
