"""Messages in: ``sqapi process`` (now, without a broker) and ``sqapi publish`` (onto the queue)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from sqapi import tracing
from sqapi.app import Sqapi, resolve_connector
from sqapi.cli.base import (
    build_or_exit,
    config_option,
    load,
    main,
    register_plugin_secrets,
)
from sqapi.config import Config
from sqapi.connectors.data import DataStore
from sqapi.connectors.listeners import publisher_for
from sqapi.core.outcome import Action, Delivery, Outcome
from sqapi.core.status import Status
from sqapi.errors import ConfigError, SqapiError


# -- process --------------------------------------------------------------------------------------
def iter_items(items: tuple[str, ...], base_dir: str | None) -> Iterator[tuple[str, bytes | dict[str, Any]]]:
    """(delivery id, raw body) for every message the items name; data files get a message built."""
    for item in items:
        if item == "-":
            text = sys.stdin.read()
            yield from _json_lines("stdin", text)
            continue
        path = Path(item)
        if not path.is_file():
            raise click.ClickException(f"{item}: no such file")
        if path.suffix == ".jsonl":
            yield from _json_lines(item, path.read_text(encoding="utf-8"))
        elif path.suffix == ".json":
            raw = path.read_bytes()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            if isinstance(parsed, list):
                for n, entry in enumerate(parsed, 1):
                    yield f"{item}[{n}]", json.dumps(entry).encode()
            else:
                yield item, raw
        else:
            yield item, message_for_file(path, base_dir)


def _json_lines(name: str, text: str) -> Iterator[tuple[str, bytes]]:
    stripped = text.strip()
    if stripped.startswith("{") and "\n" in stripped:
        try:
            json.loads(stripped)
            yield name, stripped.encode()
            return
        except ValueError:
            pass
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield f"{name}:{n}", line.encode()


def message_for_file(path: Path, base_dir: str | None) -> dict[str, Any]:
    """A message for a data file: a stable uuid from its absolute path, its location under base_dir."""
    absolute = path.resolve()
    location = str(absolute)
    if base_dir:
        base = Path(base_dir).resolve()
        if base in absolute.parents:
            location = str(absolute.relative_to(base))
    return {"uuid_ref": str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, absolute.as_uri())), "data_location": location}


@main.command()
@config_option
@click.option("--attempts", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Attempts per message; retryable failures wait the configured delay between attempts.")
@click.argument("items", nargs=-1, required=True)
@click.pass_context
def process(ctx: click.Context, config_path: str | None, attempts: int, items: tuple[str, ...]) -> None:
    """Process messages now, without a broker; print "<uuid> <STATUS> [reason]" per message.

    \b
    ITEM is one of:
      msg.json     a JSON message (or a JSON list of messages)
      msgs.jsonl   one JSON message per line
      -            messages on standard input (JSON or JSON lines)
      report.pdf   any other file: a message is built for it (uuid from its path)

    Exit status 1 if any message did not end DONE.
    """
    config = load(ctx, config_path, default_level="ERROR")
    app = build_or_exit(config, processing=True)
    register_plugin_secrets(ctx, app)
    app.processor.policy = dataclasses.replace(app.processor.policy, max_attempts=attempts)
    if not app.plugins.active:
        click.echo(f"warning: {no_active_plugin(config, app)}", err=True)
    failed = 0
    try:
        messages = list(iter_items(items, (config.get("data_store") or {}).get("base_dir")))
        show_progress = len(messages) > 1 and sys.stderr.isatty()
        with click.progressbar(length=len(messages), label="processing", file=sys.stderr,
                               hidden=not show_progress) as bar:
            for delivery_id, raw in messages:
                outcome = process_with_retries(app, raw, delivery_id, attempts)
                if show_progress:
                    click.echo("\r\033[K", nl=False, err=True)
                click.echo(outcome.line())
                failed += outcome.status != Status.DONE
                bar.update(1)
    finally:
        app.close()
    if failed:
        sys.exit(1)


def no_active_plugin(config: Config, app: Sqapi) -> str:
    """Why nothing will run: where plugins were looked for, and what was found there."""
    from sqapi.core.plugins import plugin_dirs

    folders = ", ".join(str(p) for p in plugin_dirs(config)) or "none (no plugins/ here, no plugin_dirs)"
    found = ", ".join(f"{p.name} ({p.state}{': ' + p.reason if p.reason else ''})"
                      for p in app.plugins.plugins.values()) or "none"
    return (f"no active plugin: messages end DONE without any plugin run. Looked in plugin folders: {folders}; "
            f"and in installed packages (entry point group sqapi.plugins, sqapi's built-ins included). "
            f"Found: {found}. See `sqapi plugins`.")


def process_with_retries(app: Sqapi, raw: bytes | dict[str, Any], delivery_id: str, attempts: int) -> Outcome:
    attempt = 1
    while True:
        outcome = app.process(raw, Delivery(id=delivery_id, attempt=attempt))
        if outcome.action is not Action.RETRY or attempt >= attempts:
            return outcome
        time.sleep(outcome.delay)
        attempt += 1


# -- publish --------------------------------------------------------------------------------------
def upload_to_data_store(config: Config, local: Path, object_ref: str) -> str:
    """Put ``local`` into the configured data store as ``object_ref``; returns the data_location to publish."""
    section = dict(config.get("data_store") or {})
    store = DataStore(resolve_connector(config, "data_store"), section)
    try:
        return store.upload(str(local), object_ref)
    except NotImplementedError:
        raise click.ClickException(f"--upload is not supported for data_store type '{section.get('type')}'; "
                                   "upload the object yourself and pass --data-location") from None
    except SqapiError as exc:
        raise click.ClickException(f"upload failed: {exc}") from None


def message_from_flags(config: Config, uuid: str | None, data_location: str | None, meta_location: str | None,
                       data_type: str | None, metadata: str | None) -> dict[str, Any]:
    """A body in the configured message format (``msg_broker.message_fields``) from the flags."""
    from sqapi.core.message import field_map

    keys = {name: spec["key"] for name, spec in field_map(config.get("msg_broker") or {}).items()}
    body: dict[str, Any] = {keys["uuid"]: uuid or str(uuidlib.uuid4()), keys["data_location"]: data_location}
    if meta_location:
        body[keys["meta_location"]] = meta_location
    if data_type:
        body[keys["type"]] = data_type
    if metadata:
        try:
            parsed = json.loads(metadata)
        except ValueError as exc:
            raise click.ClickException(f"--metadata is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise click.ClickException("--metadata must be a JSON object")
        body[keys["metadata"]] = parsed
    return body


@main.command()
@config_option
@click.option("--uuid", "uuid_ref", help="The message's uuid (default: a new random one).")
@click.option("--data-location", help="Where the data object is (with --upload: where to put it; default: its "
                                      "file name).")
@click.option("--meta-location", help="Where its metadata is (e.g. a Redis key).")
@click.option("--data-type", help="Its mime type (default: guessed by the loader).")
@click.option("--metadata", help="Metadata carried in the message, a JSON object.")
@click.option("--upload", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Put this file in the configured data store first (disk: copied under base_dir).")
@click.option("--routing-key", help="Override msg_broker.routing_key.")
@click.argument("items", nargs=-1)
@click.pass_context
def publish(ctx: click.Context, config_path: str | None, uuid_ref: str | None, data_location: str | None,
            meta_location: str | None, data_type: str | None, metadata: str | None, upload: Path | None,
            routing_key: str | None, items: tuple[str, ...]) -> None:
    """Publish messages to the configured broker with publisher confirms; print each uuid once confirmed.

    \b
    From flags (one message):
      sqapi publish --upload report.pdf --metadata '{"owner": "ann"}'
      sqapi publish --uuid 42 --data-location reports/42.pdf --meta-location meta:42
    From files (ITEM as for `sqapi process`: msg.json, msgs.jsonl, - for stdin):
      sqapi publish messages.jsonl

    Messages are checked as the loader would parse them before anything is sent.  Exit status 1
    if the broker refuses a message or cannot route it (the uuids printed were published).
    """
    from sqapi.core.message import MessageParser
    from sqapi.errors import MessageError

    config = load(ctx, config_path, default_level="WARNING")
    broker = dict(config.get("msg_broker") or {})
    try:
        publisher = publisher_for(resolve_connector(config, "msg_broker").Listener, broker)
    except NotImplementedError:
        raise click.ClickException(f"msg_broker type '{broker.get('type')}' cannot publish; configure "
                                   "msg_broker.type: rabbitmq or directory") from None
    bodies: list[tuple[str, bytes | dict[str, Any]]] = []
    if upload is not None or data_location or uuid_ref:
        location = data_location or (upload.name if upload is not None else None)
        if not location:
            raise click.ClickException("--data-location (or --upload FILE) is required")
        if upload is not None:
            location = upload_to_data_store(config, upload, location)
        bodies.append(("flags", message_from_flags(config, uuid_ref, location, meta_location, data_type, metadata)))
    elif meta_location or data_type or metadata:
        raise click.ClickException("--data-location (or --upload FILE) is required")
    bodies.extend(iter_items(items, (config.get("data_store") or {}).get("base_dir")))
    if not bodies:
        raise click.ClickException("nothing to publish: give flags (--upload/--data-location) or ITEMs")

    parser = MessageParser(broker)
    ready: list[tuple[str, bytes]] = []
    for name, raw in bodies:
        try:
            parsed = parser.parse(raw, name)
        except MessageError as exc:
            raise click.ClickException(f"{name}: not published, malformed message: {exc}") from None
        ready.append((parsed.uuid, raw if isinstance(raw, bytes) else json.dumps(raw).encode()))

    try:  # traced when tracing is configured: a send span each, its traceparent in the message's headers
        tracing.check(config, config.source)
        provider = tracing.make_provider(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    tracer = provider.get_tracer(tracing.INSTRUMENTATION) if provider is not None else None
    sent_to = dict(broker, routing_key=routing_key) if routing_key else broker
    try:
        publisher.open()
        for uuid, body in ready:
            with tracing.publishing(tracer, sent_to, uuid) as headers:
                publisher.publish(body, message_id=uuid, routing_key=routing_key, headers=headers)
            click.echo(uuid)
    except SqapiError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    finally:
        publisher.close()
        if provider is not None:
            tracing.shutdown(provider)
