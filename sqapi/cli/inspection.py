"""Looking and setting up: ``sqapi plugins``, ``check``, ``status``, ``messages``, ``init``, ``new-plugin``."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from sqapi import __version__, registry
from sqapi.app import build, connector
from sqapi.cli.base import (
    build_or_exit,
    config_option,
    load,
    main,
    moment_option,
    register_plugin_secrets,
    utc_text,
)
from sqapi.core.status import MESSAGE_STATUSES
from sqapi.errors import SqapiError


# -- inspection -----------------------------------------------------------------------------------
@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def plugins(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """List plugins: active, unloaded (with why) and failed (with the reason), mime types, endpoints."""
    config = load(ctx, config_path, default_level="ERROR")
    app = build_or_exit(config)
    register_plugin_secrets(ctx, app)
    try:
        rows = []
        for plugin in app.plugins.plugins.values():
            row = plugin.describe()
            row["endpoints"] = plugin_endpoints(plugin.blueprints)
            rows.append(row)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        order = {"active": 0, "unloaded": 1, "failed": 2}
        for row in sorted(rows, key=lambda r: (order.get(r["state"], 3), r["name"])):
            mime = ",".join(row["mime_types"]) or "*/*"
            line = f"{row['name']:<20} {row['state']:<9} {mime}"
            if row["endpoints"]:
                line += f"  endpoints: {', '.join(row['endpoints'])}"
            if row["reason"]:
                line += f"  -- {row['reason']}"
            origin = "built-in" if row["builtin"] else (row["directory"] or "installed package")
            line += f"\n{'':<20} from {origin}"
            if row["state"] == "active":
                line += f"; {row['isolation']} isolation" + ("" if row["isolation"] == "thread" else
                                                             f", up to {row['concurrency'] or 'processing.workers'} "
                                                             "worker process(es)")
                if row["database"]:
                    line += f"; database: {row['database']}"
            for other in row["shadowed"]:
                line += f"\n{'':<20} not used (same name): {other}"
            for problem in row["blueprint_errors"]:
                line += f"\n{'':<20} blueprint failed: {problem}"
            click.echo(line)
    finally:
        app.close()


def plugin_endpoints(blueprints: list[Any]) -> list[str]:
    """``"GET /sizes/<uuid_ref>"`` for every route of ``blueprints``, as the API would serve them."""
    from flask import Flask

    flask_app = Flask("sqapi-plugins")
    names = []
    for bp in blueprints:
        try:
            flask_app.register_blueprint(bp)
        except Exception:  # noqa: BLE001 -- not served: the plugin's blueprint errors say why
            continue
        names.append(bp.name + ".")
    endpoints = []
    for rule in sorted(flask_app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint.startswith(tuple(names)):
            methods = ",".join(sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}))
            endpoints.append(f"{methods} {rule.rule}")
    return endpoints


def _component_line(ok: bool, name: str, detail: str) -> str:
    return f"{'ok  ' if ok else 'FAIL'}  {name:<11} {detail}"


@main.command()
@config_option
@click.pass_context
def check(ctx: click.Context, config_path: str | None) -> None:
    """Validate the config and reach every configured system; one line each, exit 1 on any failure."""
    config = load(ctx, config_path, default_level="CRITICAL")
    click.echo(_component_line(True, "config", config.source))
    failures = 0
    for topic in ("database", "msg_broker", "data_store", "meta_store"):
        section = dict(config.get(topic) or {})
        label = f"{section.get('type')}"
        try:
            component = connector(config, topic)
            try:
                component.ping()
                where = registry.where(component, section)
            finally:
                component.close()
            click.echo(_component_line(True, topic, f"{label} at {where}" if where else label))
        except (SqapiError, OSError) as exc:
            failures += 1
            click.echo(_component_line(False, topic, f"{label}: {exc}"))
    if not failures:
        try:
            app = build(config)
        except SqapiError as exc:
            failures += 1
            click.echo(_component_line(False, "plugins", str(exc)))
        else:
            register_plugin_secrets(ctx, app)
            states = [p.state for p in app.plugins.plugins.values()]
            broken = [f"{p.name} ({p.reason})" for p in app.plugins.plugins.values() if p.state == "failed"]
            summary = f"{states.count('active')} active, {states.count('unloaded')} unloaded, " \
                      f"{states.count('failed')} failed"
            click.echo(_component_line(not broken, "plugins", summary + (": " + "; ".join(broken) if broken
                                                                         else "")))
            failures += bool(broken)
            app.close()
    if failures:
        sys.exit(1)


def _open_database(ctx: click.Context, config_path: str | None) -> Any:
    """The status database, only to read: nothing is created (no file, schema or table)."""
    config = load(ctx, config_path, default_level="WARNING")
    try:
        return registry.open_status_database(dict(config["database"]), config.source)
    except registry.NoStatusDatabase as exc:
        raise click.ClickException(str(exc)) from None
    except SqapiError as exc:
        raise click.ClickException(f"cannot read the status database: {exc}") from None


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.argument("uuid")
@click.pass_context
def status(ctx: click.Context, config_path: str | None, as_json: bool, uuid: str) -> None:
    """Show one message's status, each plugin's outcome, then its history: every event of every attempt, oldest
    first (exit 1 if the uuid is unknown)."""
    from sqapi.history import timeline

    database = _open_database(ctx, config_path)
    try:
        row = database.get_message(uuid)
        if row is None:
            click.echo(f"{uuid}: no such message", err=True)
            sys.exit(1)
        plugin_rows = database.get_plugin_rows(uuid)
        try:
            history = registry.history(database, uuid)
        except SqapiError as exc:  # a schema older than message_events: the loader adds it when it starts
            click.echo(f"no history: {exc}", err=True)
            history = []
    finally:
        database.close()
    if as_json:
        click.echo(json.dumps({**row, "plugins": plugin_rows, "history": history}, indent=2, default=str))
        return
    for key in ("uuid", "status", "info", "data_location", "meta_location", "data_type", "hash_digest",
                "attempts", "created_at", "updated_at", "trace_id"):
        click.echo(f"{key:<14} {row.get(key) if row.get(key) is not None else ''}")
    for plugin in plugin_rows:
        took = f"{plugin['duration_ms']:.1f} ms" if plugin.get("duration_ms") is not None else ""
        version = f"version {plugin['version']}  " if plugin.get("version") else ""
        click.echo(f"plugin {plugin['plugin']:<20} {plugin['status']:<8} {took:>10}  {version}"
                   f"{plugin.get('info') or ''}".rstrip())
    if history:
        click.echo("history (oldest first)")
        for line in timeline(history):
            click.echo(f"  {line}")


@main.command()
@config_option
@click.option("--status", "status_filter", type=click.Choice(
    [str(status) for status in MESSAGE_STATUSES], case_sensitive=False),
    help="Only messages with this status.")
@click.option("--plugin", help="Only messages this plugin has a row for (it ran, or failed, on them).")
@click.option("--since", callback=moment_option, help="Only messages updated at or after this time (ISO 8601; UTC "
              "unless it says).")
@click.option("--until", callback=moment_option, help="Only messages updated at or before this time.")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.pass_context
def messages(ctx: click.Context, config_path: str | None, status_filter: str | None, plugin: str | None,
             since: datetime | None, until: datetime | None, limit: int, as_json: bool) -> None:
    """List recent messages, newest first: "<uuid> <STATUS> <updated_at> [info]".

    \b
    Examples:
      sqapi messages --status FAILED --plugin ocr --since 2026-11-30T06:00Z
      sqapi messages --since 2026-11-30 --until 2026-11-30T12:00 --json"""
    if since and until and since > until:
        raise click.BadParameter("--since is after --until", param_hint="--since")
    database = _open_database(ctx, config_path)
    try:
        rows = database.list_messages(status=status_filter.upper() if status_filter else None, plugin=plugin,
                                      limit=limit, since=utc_text(since), until=utc_text(until))
    finally:
        database.close()
    for row in rows:
        if as_json:
            click.echo(json.dumps(row, default=str))
        else:
            click.echo(f"{row['uuid']} {row['status']} {row['updated_at']} {row.get('info') or ''}".rstrip())


@main.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--force", is_flag=True, help="Overwrite an existing sqapi.yml.")
def init(directory: Path, force: bool) -> None:
    """Write a commented production config (DIRECTORY/sqapi.yml) and a plugins/ folder to edit.

    The config is sqapi's production profile -- RabbitMQ, Redis, PostgreSQL, data on disk --
    with every host and secret from an environment variable; `sqapi check -c sqapi.yml` then
    says what it reaches."""
    from sqapi.resources import CONF_TEMPLATES

    target = directory / "sqapi.yml"
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists: edit it, or add --force to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    template = (CONF_TEMPLATES / "sqapi.yml").read_text(encoding="utf-8")
    target.write_text(f"# Written by `sqapi init` (sqapi {__version__}); yours to edit.\n{template}", encoding="utf-8")
    plugins = directory / "plugins"
    plugins.mkdir(exist_ok=True)
    readme = plugins / "README.md"
    if not readme.exists():
        readme.write_text(
            "# Your plugins\n\nOne folder per plugin: `__init__.py` with `execute(config, database, message, "
            "metadata, data)`, and optionally `config.yml`, `scripts/init.sql`, `blueprints/`.\n"
            "`sqapi new-plugin NAME` writes a working one with its test; `sqapi plugins` lists what is found.\n"
            "A plugin here replaces a built-in of the same name.\n", encoding="utf-8")
    click.echo(f"wrote {target} and {plugins}/")
    click.echo(f"next:  sqapi check -c {target}    then    sqapi run -c {target}")


@main.command("new-plugin")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="plugins", show_default=True,
              help="Folder to create the plugin in.")
def new_plugin(name: str, directory: str) -> None:
    """Scaffold a working plugin folder (execute, config.yml, init.sql, blueprint, a test)."""
    from sqapi.scaffold import create_plugin

    try:
        created = create_plugin(name, Path(directory))
    except (ValueError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"created {created}")
    click.echo(f"try it:  python -m pytest {created / 'tests'}")
