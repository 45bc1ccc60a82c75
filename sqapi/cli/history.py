"""Keeping the history in bounds: ``sqapi prune``."""

from __future__ import annotations

import sys

import click

from sqapi.cli.base import config_option, load, main
from sqapi.cli.inspection import _open_database
from sqapi.config import parse_duration
from sqapi.errors import SqapiError


@main.command()
@config_option
@click.option("--older-than", "older_than", metavar="DURATION",
              help="Remove what is older than this: 30d, 12h, 45m, 90s, 2w.  Default: processing.history_retention.")
@click.option("--messages", "with_messages", is_flag=True,
              help="Also remove finished messages (DONE, FAILED) last updated before then, with their plugin rows "
                   "and history (a later delivery of one is processed as new).")
@click.option("--dry-run", is_flag=True, help="Count what would be removed; remove nothing.")
@click.pass_context
def prune(ctx: click.Context, config_path: str | None, older_than: str | None, with_messages: bool,
          dry_run: bool) -> None:
    """Remove history events (message_events) older than DURATION, and print what was removed.

    \b
      sqapi prune --older-than 30d              events of attempts more than 30 days old
      sqapi prune --older-than 90d --messages   and the messages finished before then
      sqapi prune --older-than 30d --dry-run    only count

    Each message's current status and plugin rows stay (unless --messages).  Deletes in batches,
    each committed: an interrupted prune keeps what it removed, and the next run removes the rest.
    """
    from sqapi.history import prune as prune_history

    config = load(ctx, config_path, default_level="WARNING")
    text = older_than or (config.get("processing") or {}).get("history_retention")
    if not text:
        raise click.UsageError("give --older-than DURATION (e.g. 30d), or set processing.history_retention")
    try:
        age = parse_duration(text, "--older-than" if older_than else "processing.history_retention")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    database = _open_database(ctx, config_path)
    database.close()  # reopened for writing by the first statement (the check above only reads)
    removed = 0

    def progress(rows: int) -> None:
        nonlocal removed
        removed += rows
        if _interactive():
            click.echo(f"\r\033[K{removed} rows removed so far", nl=False, err=True)

    try:
        report = prune_history(database, age, messages=with_messages, dry_run=dry_run, progress=progress)
    except SqapiError as exc:
        hint = " (no message_events table yet? start the loader once with this version of sqapi: it adds it)" \
            if "message_events" in str(exc) else ""
        raise click.ClickException(f"prune failed: {exc}{hint}") from None
    finally:
        database.close()
    if removed and _interactive():
        click.echo("\r\033[K", nl=False, err=True)
    click.echo(report.line())


def _interactive() -> bool:
    return sys.stderr.isatty()
