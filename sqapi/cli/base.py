"""The ``sqapi`` command group and what every command shares: options, loading the config, building the app."""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime
from typing import Any

import click

from sqapi import __version__, logs
from sqapi.app import Sqapi, build
from sqapi.config import Config, load_config, secret_values
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
      sqapi status UUID                      one message with each plugin's outcome and its history
      sqapi prune --older-than 30d           let go of history older than 30 days
      sqapi redrive --plugin P --status FAILED   re-run P where it failed (also from <queue>.dead)
      sqapi reprocess --plugin P --outdated  re-run P (and what runs after it) where an older P ran
      sqapi check                            reach every configured system
      sqapi es apply-template                send es_indexer's changed index template to Elasticsearch
      sqapi init [DIR]                       write a production config to edit, and a plugins/ folder
      sqapi new-plugin NAME                  scaffold a working plugin with its test
    """
    ctx.obj = Options(config=config_path, log_level=log_level, json_logs=json_logs)




def host_option(func: Any) -> Any:
    return click.option("--host", default=None, help="Address the API listens on. Default: api.host.")(func)


def port_option(func: Any) -> Any:
    return click.option("--port", type=click.IntRange(0, 65535), default=None,
                        help="Port the API listens on (0: any free port). Default: api.port.")(func)


def moment_option(_ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """A click callback: an ISO 8601 date or time (naive is UTC) as an aware datetime."""
    from sqapi.times import parse_moment

    if value is None:
        return None
    try:
        return parse_moment(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def utc_text(moment: datetime | None) -> str | None:
    """``moment`` as the status tables write times (ISO 8601 UTC, milliseconds); None stays None."""
    from sqapi.times import utc_text as text

    return None if moment is None else text(moment)
