"""The ``sqapi`` command line.  ``sqapi --help`` and ``sqapi COMMAND --help`` explain each command."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from sqapi import __version__, logs, observe, supervisor
from sqapi.app import Sqapi, build, resolve_connector
from sqapi.config import Config, load_config, secret_values, url_for_logs
from sqapi.core.outcome import Action, Delivery, Outcome
from sqapi.core.status import MESSAGE_STATUSES, Status
from sqapi.errors import ConfigError, SqapiError

log = logging.getLogger("sqapi")

CONFIG_HELP = "Config file (YAML), merged over the embedded default. Default: $CFG_FILE, else the embedded default."


@dataclasses.dataclass
class Options:
    config: str | None = None
    log_level: str | None = None
    json_logs: bool = False
    secret_filter: logs.SecretFilter | None = None


LOG_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)
LOG_LEVEL_HELP = "How much to log (to stderr). Default: INFO (ERROR for process: its status lines say it)."
JSON_LOGS_HELP = "Log one JSON object per line."


def _set_log_level(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(Options).log_level = value


def _set_json_logs(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Options).json_logs = True


def logging_options(func: Any) -> Any:
    """``--log-level`` and ``--json-logs`` on a subcommand; given there, they win over the group's."""
    func = click.option("--json-logs", is_flag=True, expose_value=False, callback=_set_json_logs,
                        help=JSON_LOGS_HELP)(func)
    return click.option("--log-level", type=LOG_LEVELS, default=None, expose_value=False, callback=_set_log_level,
                        help=LOG_LEVEL_HELP)(func)


def config_option(func: Any) -> Any:
    """``-c/--config``, plus the logging options: every command that reads a config takes all three."""
    func = logging_options(func)
    return click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None,
                        help=CONFIG_HELP)(func)


def load(ctx: click.Context, config_path: str | None, default_level: str = "INFO") -> Config:
    """Set up logging and read the config; a wrong config ends the command with its one-line reason."""
    options: Options = ctx.ensure_object(Options)
    options.secret_filter = logs.configure(options.log_level or default_level, options.json_logs)
    try:
        config = load_config(config_path or options.config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    options.secret_filter.secrets = sorted(secret_values(config), key=len, reverse=True)
    return config


def register_plugin_secrets(ctx: click.Context, app: Sqapi) -> None:
    """Mask in every log record the secrets of each plugin's own ``config.yml`` too.

    :func:`load` gives the log filter the main config's secrets; a plugin's ``config.yml`` is merged
    only when :func:`~sqapi.app.build` loads the plugins, so call this right after every ``build``
    (``run``, ``loader``, ``process``, ``api``, ``plugins``, ``check``) before anything runs a plugin.
    """
    options: Options = ctx.ensure_object(Options)
    if options.secret_filter is None:
        return
    for plugin in app.plugins.plugins.values():
        options.secret_filter.add(secret_values(plugin.config or {}))


def build_or_exit(config: Config, processing: bool = False) -> Sqapi:
    """Build sqapi; with ``processing``, also refuse to start when a requested plugin failed to load."""
    try:
        app = build(config)
        if processing:
            try:
                app.require_plugins()
            except SqapiError:
                app.close()
                raise
        return app
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except SqapiError as exc:
        raise click.ClickException(f"startup failed: {exc}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sqapi")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=CONFIG_HELP)
@click.option("--log-level", type=LOG_LEVELS, default=None, help=LOG_LEVEL_HELP)
@click.option("--json-logs", is_flag=True, help=JSON_LOGS_HELP)
@click.pass_context
def main(ctx: click.Context, config_path: str | None, log_level: str | None, json_logs: bool) -> None:
    """sqapi: receive messages that point at data, run plugins on the data, record every outcome.

    \b
    Quick tour (on the embedded default: spool folder, local files, a PostgreSQL sqapi runs itself):
      sqapi process samples/messages.jsonl   process messages now, one status line each
      sqapi run                              consume the spool folder (.sqapi/spool) and serve the API
      sqapi api                              only the API: dashboard on http://127.0.0.1:5000/
      sqapi plugins                          which plugins are active, and why others are not
      sqapi messages --status FAILED         what failed, and why
      sqapi status UUID                      one message with each plugin's outcome
      sqapi check                            reach every configured system
      sqapi init [DIR]                       write a production config to edit, and a plugins/ folder
      sqapi new-plugin NAME                  scaffold a working plugin with its test
    """
    ctx.obj = Options(config=config_path, log_level=log_level, json_logs=json_logs)


# -- long-running -------------------------------------------------------------------------------
def api_server(app: Sqapi, listener: Any = None, host: str | None = None, port: int | None = None) -> Any:
    """The API for ``app``, bound to ``api.host``/``api.port`` (or the given ones), not yet serving."""
    from sqapi.api.app import api_token, create_app
    from sqapi.api.server import ApiServer, listen_address

    try:
        config_host, config_port = listen_address(app.config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    host = host or config_host
    port = config_port if port is None else port
    flask_app = create_app(app, listener)
    threads = int((app.config.get("api") or {}).get("threads") or 4)
    try:
        server = ApiServer(flask_app, host, port, threads=threads,
                           max_body_bytes=flask_app.config["MAX_CONTENT_LENGTH"])
    except OSError as exc:
        flask_app.health.close()
        raise click.ClickException(f"the API cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    server.on_close = flask_app.health.close
    log.info("API on %s (%s)", server.url,
             "bearer token required" if api_token(app.config) else "no token: open to anyone who can reach it")
    return server


def serve(app: Sqapi, with_api: bool = False, host: str | None = None, port: int | None = None,
          metrics_at: tuple[str, int] | None = None) -> None:
    """Run the listener (and the API in a thread) until SIGTERM/SIGINT, then stop gracefully (exit 0).

    ``metrics_at``: serve this process's ``/metrics`` and ``/health`` there (see :mod:`sqapi.observe`)."""
    listener = app.create_listener()
    app.processor.runner.prestart()  # plugin workers import their plugins now, not on the first message
    if supervisor.is_loader_process():  # one of several under `sqapi loader --processes N`
        supervisor.watch_parent(listener.stop)
    try:
        server = api_server(app, listener, host, port) if with_api else None
        status = loader_status(app, listener, metrics_at)
    except BaseException:
        app.close()
        raise

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: finishing in-flight messages", signal.Signals(signum).name)
        listener.stop()
        if server is not None:
            server.stop(wait=None)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if server is not None:
            server.start()
        listener.start_listeners()
    finally:
        if server is not None:
            server.stop()
        if status is not None:
            status.stop()
        app.close()


def loader_status(app: Sqapi, listener: Any, metrics_at: tuple[str, int] | None) -> Any:
    """Count this loader process's work for ``/metrics``: into the supervisor's folder when it runs under
    one, or into a registry of its own served at ``metrics_at``; None when there is nothing to serve."""
    from sqapi.api.metrics import ProcessMetrics

    if supervisor.is_loader_process():
        if os.environ.get(observe.MULTIPROC_ENV):  # the supervisor serves the sum
            app.processor.hooks.append(ProcessMetrics())
            observe.ConsumingProbe(listener)
        return None
    if metrics_at is None:
        return None
    metrics = ProcessMetrics()
    app.processor.hooks.append(metrics)
    probe = observe.ConsumingProbe(listener, registry=metrics.registry)

    def live() -> tuple[bool, dict[str, Any]]:
        consuming = bool(getattr(listener, "consuming", True))
        return consuming, {"loader_processes": 1, "consuming": 1 if consuming else 0}

    try:
        return _StatusHandle(observe.StatusServer(
            observe.status_app(metrics.registry, live, observe.database_ready(lambda: app.database.ping)),
            *metrics_at).start(), probe)
    except OSError as exc:
        raise click.ClickException(f"the metrics port cannot listen on {metrics_at[0]}:{metrics_at[1]}: "
                                   f"{exc.strerror or exc}") from None


@dataclasses.dataclass
class _StatusHandle:
    server: Any
    probe: Any

    def stop(self) -> None:
        self.probe.stop()
        self.server.stop()


def supervise(config: Config, count: int, metrics_at: tuple[str, int] | None) -> int:
    """Run ``count`` loader processes; with ``metrics_at``, serve their summed metrics and health there."""
    from sqapi.app import database_factory

    runner = supervisor.Supervisor(count)
    if metrics_at is None:
        return runner.run()
    folder = observe.MultiprocessFolder()
    runner.on_exit = folder.process_gone
    registry = observe.summed_registry(folder.path)

    def live() -> tuple[bool, dict[str, Any]]:
        pids = runner.running()
        consuming = observe.consuming_values(registry)
        idle = [pid for pid in pids if consuming.get(str(pid)) != 1]
        return len(pids) == count and not idle, {"loader_processes": len(pids), "expected": count,
                                                 "not_consuming": idle}

    def database_ping() -> Callable[[], Any]:
        database = database_factory(config)(dict(config["database"]))
        return database.ping

    try:
        server = observe.StatusServer(observe.status_app(registry, live, observe.database_ready(database_ping)),
                                      *metrics_at).start()
    except OSError as exc:
        folder.close()
        raise click.ClickException(f"the metrics port cannot listen on {metrics_at[0]}:{metrics_at[1]}: "
                                   f"{exc.strerror or exc}") from None
    try:
        return runner.run()
    finally:
        server.stop()
        folder.close()


def host_option(func: Any) -> Any:
    return click.option("--host", default=None, help="Address the API listens on. Default: api.host.")(func)


def port_option(func: Any) -> Any:
    return click.option("--port", type=click.IntRange(0, 65535), default=None,
                        help="Port the API listens on (0: any free port). Default: api.port.")(func)


@main.command()
@config_option
@host_option
@port_option
@click.pass_context
def run(ctx: click.Context, config_path: str | None, host: str | None, port: int | None) -> None:
    """Run the loader and the HTTP API until stopped (SIGTERM or Ctrl-C finish in-flight work).

    On the embedded default the loader watches the spool folder .sqapi/spool: drop a JSON
    message file there and it is processed, then moved to done/ or failed/ (with a .reason file).
    The API (dashboard, /health, /messages, /metrics, plugin endpoints) listens on api.host:api.port.
    """
    config = load(ctx, config_path)
    processes = (config.get("processing") or {}).get("processes")
    if isinstance(processes, int) and processes > 1:
        log.warning("processing.processes is %d, but sqapi run uses one process: run `sqapi loader` (several "
                    "processes) and `sqapi api` separately for that", processes)
    app = build_or_exit(config, processing=True)
    register_plugin_secrets(ctx, app)
    serve(app, with_api=True, host=host, port=port)


@main.command()
@config_option
@click.option("--processes", type=click.IntRange(1, 256), default=None,
              help="Loader processes to run (each uses about one core). Default: processing.processes, "
                   "whose default 'auto' is one per CPU (up to 4) on RabbitMQ with PostgreSQL, else 1.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve /metrics (summed over every loader process) and /health, /health/live, /health/ready "
                   "on this port (on processing.metrics_host, 127.0.0.1). Default: processing.metrics_port (off).")
@click.pass_context
def loader(ctx: click.Context, config_path: str | None, processes: int | None, metrics_port: int | None) -> None:
    """Run only the loader (the listener and the plugins), no API.

    With several processes, this process supervises them: it restarts one that dies and passes
    SIGTERM on (each finishes its in-flight messages, then all exit 0).
    """
    config = load(ctx, config_path)
    count = processes or supervisor.loader_processes(config)
    metrics_at = observe.metrics_address(config, metrics_port)
    if count > 1 and not supervisor.is_loader_process():
        chosen = (config.get("processing") or {}).get("processes", "auto")
        log.info("running %d loader processes (%s)", count, "--processes" if processes else
                 f"processing.processes: auto, {supervisor.usable_cpus()} CPUs" if chosen == "auto" else
                 "processing.processes")
        build_or_exit(config, processing=True).close()  # fail once, here, on a bad set-up
        sys.exit(supervise(config, count, metrics_at))
    app = build_or_exit(config, processing=True)
    register_plugin_secrets(ctx, app)
    serve(app, metrics_at=metrics_at)


@main.command()
@config_option
@host_option
@port_option
@click.pass_context
def api(ctx: click.Context, config_path: str | None, host: str | None, port: int | None) -> None:
    """Run only the HTTP API (dashboard, /health, /plugins, /messages, /metrics, plugin endpoints).

    It reads the status database that loaders write; with api.token (or $SQAPI_API_TOKEN) set,
    every route but /health needs "Authorization: Bearer <token>".  Stops on SIGTERM or Ctrl-C.
    """
    app = build_or_exit(load(ctx, config_path))
    register_plugin_secrets(ctx, app)
    try:
        server = api_server(app, None, host, port)
    except BaseException:
        app.close()
        raise

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: stopping the API", signal.Signals(signum).name)
        server.stop(wait=None)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.serve()
    finally:
        app.close()


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
    module = resolve_connector(config, "data_store")
    upload = getattr(module, "upload", None)
    if not callable(upload):
        raise click.ClickException(f"--upload is not supported for data_store type '{section.get('type')}'; "
                                   "upload the object yourself and pass --data-location")
    try:
        return str(upload(section, str(local), object_ref))
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
    module = resolve_connector(config, "msg_broker")
    publisher_class = getattr(module, "Publisher", None)
    if publisher_class is None:
        raise click.ClickException(f"msg_broker type '{broker.get('type')}' cannot publish; configure "
                                   "msg_broker.type: rabbitmq (or drop files in the spool folder)")
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

    publisher = publisher_class(broker)
    try:
        publisher.open()
        for uuid, body in ready:
            publisher.publish(body, message_id=uuid, routing_key=routing_key)
            click.echo(uuid)
    except SqapiError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    finally:
        publisher.close()


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
    from sqapi.connectors.data import DataStore
    from sqapi.connectors.meta import MetaStore

    config = load(ctx, config_path, default_level="CRITICAL")
    click.echo(_component_line(True, "config", config.source))
    failures = 0
    for topic in ("database", "msg_broker", "data_store", "meta_store"):
        section = dict(config.get(topic) or {})
        label = f"{section.get('type')}"
        try:
            module = resolve_connector(config, topic)
            if topic == "database":
                component: Any = module.Database(section)
                component.ping()
            elif topic == "msg_broker":
                component = module.Listener(section, lambda raw, delivery: None)
                if hasattr(component, "ping"):
                    component.ping()
            else:
                component = (DataStore if topic == "data_store" else MetaStore)(module, section)
                component.connect()
                component.ping()
            where = _where(section, component)
            if hasattr(component, "close"):
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


def _where(section: dict[str, Any], component: Any) -> str:
    """Where a checked component is, for ``sqapi check``: what it says of itself, else its section's address
    keys (URLs without user info or query).  Never a password."""
    for source in (component, getattr(component, "settings", None)):
        for name in ("describe", "where"):
            method = getattr(source, name, None)
            if callable(method):
                try:
                    text = method()
                except Exception:  # only a label: the check itself passed
                    continue
                if isinstance(text, str) and text:
                    return text
    url = section.get("url") or section.get("auth_url")
    if url:
        return url_for_logs(str(url))
    if section.get("host"):
        return f"{section['host']}:{section['port']}" if section.get("port") else str(section["host"])
    for key in ("base_dir", "directory", "path"):
        if section.get(key):
            return str(section[key])
    return ""


def _open_database(ctx: click.Context, config_path: str | None) -> Any:
    """The status database, only to read: nothing is created (no file, schema or table)."""
    config = load(ctx, config_path, default_level="WARNING")
    section = dict(config["database"])
    try:
        database = resolve_connector(config, "database").Database(section)
    except SqapiError as exc:
        raise click.ClickException(f"cannot read the status database: {exc}") from None
    has_tables = getattr(database, "has_status_tables", None)
    if has_tables is None:  # a database type that cannot tell: its queries will say what is wrong
        return database
    try:
        found = has_tables()
    except SqapiError as exc:
        database.close()
        raise click.ClickException(f"cannot read the status database: {exc}") from None
    if not found:
        database.close()
        where = database.describe() if hasattr(database, "describe") else section.get("type")
        if getattr(database, "schema", None):
            where = f"{where} (schema {database.schema})"
        raise click.ClickException(f"no status database at {where}: run sqapi process/run first")
    return database


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.argument("uuid")
@click.pass_context
def status(ctx: click.Context, config_path: str | None, as_json: bool, uuid: str) -> None:
    """Show one message's status and each plugin's outcome (exit 1 if the uuid is unknown)."""
    database = _open_database(ctx, config_path)
    try:
        row = database.get_message(uuid)
        if row is None:
            click.echo(f"{uuid}: no such message", err=True)
            sys.exit(1)
        plugin_rows = database.get_plugin_rows(uuid)
    finally:
        database.close()
    if as_json:
        click.echo(json.dumps({**row, "plugins": plugin_rows}, indent=2, default=str))
        return
    for key in ("uuid", "status", "info", "data_location", "meta_location", "data_type", "hash_digest",
                "attempts", "created_at", "updated_at"):
        click.echo(f"{key:<14} {row.get(key) if row.get(key) is not None else ''}")
    for plugin in plugin_rows:
        took = f"{plugin['duration_ms']:.1f} ms" if plugin.get("duration_ms") is not None else ""
        click.echo(f"plugin {plugin['plugin']:<20} {plugin['status']:<8} {took:>10}  {plugin.get('info') or ''}")


@main.command()
@config_option
@click.option("--status", "status_filter", type=click.Choice(
    [str(status) for status in MESSAGE_STATUSES], case_sensitive=False),
    help="Only messages with this status.")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.pass_context
def messages(ctx: click.Context, config_path: str | None, status_filter: str | None, limit: int,
             as_json: bool) -> None:
    """List recent messages, newest first: "<uuid> <STATUS> <updated_at> [info]"."""
    database = _open_database(ctx, config_path)
    try:
        rows = database.list_messages(status=status_filter.upper() if status_filter else None, limit=limit)
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


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
