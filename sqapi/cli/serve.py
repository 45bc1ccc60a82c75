"""Serving: ``sqapi run``, ``sqapi loader`` (and its supervisor), ``sqapi api``; signals and stops in one place."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from sqapi import observe, supervisor
from sqapi.app import Sqapi
from sqapi.cli.base import (
    build_or_exit,
    config_option,
    host_option,
    load,
    log,
    main,
    port_option,
    register_plugin_secrets,
)
from sqapi.config import Config
from sqapi.errors import ConfigError


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
                           max_body_bytes=max(flask_app.config["MAX_CONTENT_LENGTH"],  # the larger limit
                                              flask_app.config["SQAPI_MAX_UPLOAD_BYTES"]))
    except OSError as exc:
        flask_app.health.close()
        raise click.ClickException(f"the API cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    server.on_close = flask_app.health.close
    log.info("API on %s (%s)", server.url,
             "token required: bearer, or sign in at /login" if api_token(app.config)
             else "no token: open to anyone who can reach it")
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
        consuming = bool(listener.consuming)
        return consuming, {"loader_processes": 1, "consuming": 1 if consuming else 0}

    return _StatusHandle(_status_server(metrics.registry, live, app.database.ping, metrics_at), probe)


def _status_server(registry: Any, live: Callable[[], tuple[bool, dict[str, Any]]], ping: Callable[[], Any],
                   metrics_at: tuple[str, int]) -> observe.StatusServer:
    """``/metrics`` and ``/health`` of ``sqapi loader`` served at ``metrics_at``; readiness is ``ping`` answering."""
    try:
        return observe.StatusServer(observe.status_app(registry, live, observe.database_ready(ping)),
                                    *metrics_at).start()
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
    database = database_factory(config)(dict(config["database"]))  # connects on its first ping

    def live() -> tuple[bool, dict[str, Any]]:
        pids = runner.running()
        consuming = observe.consuming_values(registry)
        idle = [pid for pid in pids if consuming.get(str(pid)) != 1]
        return len(pids) == count and not idle, {"loader_processes": len(pids), "expected": count,
                                                 "not_consuming": idle}

    try:
        server = _status_server(registry, live, database.ping, metrics_at)
        try:
            return runner.run()
        finally:
            server.stop()
    finally:
        database.close()
        folder.close()


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
    every route but /health needs "Authorization: Bearer <token>" (or, in a browser, a sign-in at
    /login with the token).  Stops on SIGTERM or Ctrl-C.
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
