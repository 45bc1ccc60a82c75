"""Acting on messages: ``sqapi redrive`` (re-run what did not finish) and ``sqapi reprocess`` (re-run a plugin
for the messages an older version of it processed).  The work is in :mod:`sqapi.redrive` and
:mod:`sqapi.reprocess`, which the dashboard calls too."""

from __future__ import annotations

import sys
from datetime import datetime

import click

from sqapi.cli.base import config_option, load, main, moment_option
from sqapi.core.status import MESSAGE_STATUSES
from sqapi.errors import SqapiError
from sqapi.redrive import Selection, SelectionError, describe_selection, redrive
from sqapi.reprocess import BATCH_SIZE, reprocess


def _echo_progress(line: str) -> None:
    click.echo(line)


@main.command("redrive")
@config_option
@click.option("--uuid", "uuids", multiple=True, help="This message (repeat for more).")
@click.option("--status", "status", type=click.Choice([str(s) for s in MESSAGE_STATUSES], case_sensitive=False),
              help="Messages with this status. Default: FAILED (with --uuid: FAILED or VALIDATING; a RETRY one "
                   "waits for its retry -- name --status RETRY to take it).")
@click.option("--plugin", help="Messages this plugin did not finish (its row is not DONE).")
@click.option("--since", callback=moment_option, help="Changed at or after this time (ISO 8601; UTC unless it says).")
@click.option("--until", callback=moment_option, help="Changed at or before this time (ISO 8601; UTC unless it says).")
@click.option("--reason", help="Whose reason (status info; the plugin's, with --plugin) contains this text, any case.")
@click.option("--dry-run", is_flag=True, help="Only show what would be re-published, from the status rows; change "
              "nothing and take no dead letter (they are counted, not read).")
@click.pass_context
def redrive_command(ctx: click.Context, config_path: str | None, uuids: tuple[str, ...], status: str | None,
                    plugin: str | None, since: datetime | None, until: datetime | None, reason: str | None,
                    dry_run: bool) -> None:
    """Re-publish messages that did not finish, so that the plugins that did not finish run again.

    \b
    Examples:
      sqapi redrive --plugin ocr --status FAILED --dry-run   what would be re-published
      sqapi redrive --plugin ocr --status FAILED             re-run ocr where it failed
      sqapi redrive --uuid 42 --uuid 43                      these two messages
      sqapi redrive --since 2026-11-30T06:00Z --reason timeout

    Each selected message's status row is reopened (RETRY, its attempts counted from 1 again), the
    message is re-published with publisher confirms -- its dead letter's body when <queue>.dead (or
    the spool's failed/) held one when the run began, which is removed once the re-publish is
    confirmed -- and one line per message says what was done.  A dead letter set aside during the
    run (a re-published message failing again) stays for the next one.

    One redrive or reprocess at a time per status database: a second one exits 1 at once.  Killed
    half-way, run it again: it finishes the rest and loses nothing; a message killed between its
    publish confirm and the mark of its row is published once more (its plugins run again only if
    that first delivery failed).  Exit status 1 on an error.
    """
    config = load(ctx, config_path, default_level="WARNING")
    selection = Selection(uuids=uuids, status=status, plugin=plugin, since=since, until=until, reason=reason)
    try:
        selection.check()
    except SelectionError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"selecting: {describe_selection(selection)}", err=True)
    try:
        report = redrive(config, selection, dry_run=dry_run, progress=_echo_progress)
    except SqapiError as exc:
        click.echo(f"error: {exc} (what was re-published so far stays so: run again to finish)", err=True)
        sys.exit(1)
    if dry_run:
        waiting = "" if report.dead_letters is None else \
            f"; {report.dead_letters} dead letter(s) waiting, counted, not read"
        click.echo(f"{len(report.selected)} selected, would re-publish {report.republished}{waiting}", err=True)
        return
    click.echo(f"{len(report.selected)} selected, re-published {report.republished} ({report.from_dead} from dead "
               "letters)", err=True)


@main.command("reprocess")
@config_option
@click.option("--plugin", required=True, help="The plugin that changed (it must declare a version in config.yml).")
@click.option("--outdated", is_flag=True,
              help="Messages whose row for the plugin holds another version than its current one (required).")
@click.option("--batch-size", type=click.IntRange(1, 100000), default=BATCH_SIZE, show_default=True,
              help="Messages selected and re-published per batch.")
@click.option("--dry-run", is_flag=True, help="Only count what would be re-published; change nothing.")
@click.pass_context
def reprocess_command(ctx: click.Context, config_path: str | None, plugin: str, outdated: bool, batch_size: int,
                      dry_run: bool) -> None:
    """Re-run a plugin, and the plugins that run after it, on messages an older version of it processed.

    \b
    Example, after raising ocr's version in plugins/ocr/config.yml (version: '2'):
      sqapi reprocess --plugin ocr --outdated --dry-run    how many
      sqapi reprocess --plugin ocr --outdated              re-run ocr and what runs after it

    Each outdated message's rows for those plugins are reopened (RETRY) -- the only plugins a
    loader runs again on it -- and the message is re-published with publisher confirms, in
    batches, one progress line per batch.  A message a loader has not taken up yet is not selected
    again.  One redrive or reprocess at a time per status database: a second one exits 1 at once.
    Killed half-way, run it again: it finishes the rest; a message killed between its publish
    confirm and the mark of its row is published once more (its plugins do not run twice: the
    second delivery finds it DONE).
    """
    if not outdated:
        raise click.UsageError("say which messages: --outdated (those an older version of the plugin processed)")
    config = load(ctx, config_path, default_level="WARNING")
    try:
        report = reprocess(config, plugin, batch_size=batch_size, dry_run=dry_run, progress=_echo_progress)
    except SelectionError as exc:
        raise click.UsageError(str(exc)) from None
    except SqapiError as exc:
        click.echo(f"error: {exc} (what was re-published so far stays so: run again to finish)", err=True)
        sys.exit(1)
    done = "would re-publish" if dry_run else "re-published"
    click.echo(f"{report.outdated} outdated, {done} {report.republished}", err=True)
