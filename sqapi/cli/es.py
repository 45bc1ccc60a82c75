"""Elasticsearch: ``sqapi es apply-template``, the es_indexer's index template sent without restarting loaders."""

from __future__ import annotations

import json
from typing import Any

import click

from sqapi.cli.base import build_or_exit, config_option, load, main, register_plugin_secrets
from sqapi.errors import SqapiError

PLUGIN = "es_indexer"


@main.group()
def es() -> None:
    """The Elasticsearch index the es_indexer plugin writes to."""


@es.command("apply-template")
@config_option
@click.option("--show", is_flag=True, help="Print the template that would be sent, and send nothing.")
@click.pass_context
def apply_template(ctx: click.Context, config_path: str | None, show: bool) -> None:
    """Send es_indexer's index template (custom.es_indexer.mappings) to Elasticsearch.

    Edit the config the loaders read, then run this: running loaders keep indexing, indices created from now on
    (the next `sqapi-{date}`) get the new field types and analyzers, and a loader that restarts installs the same
    template.  Existing indices keep their mapping.  Exits 1 with Elasticsearch's reason when it refuses the template.
    """
    config = load(ctx, config_path, default_level="WARNING")
    app = build_or_exit(config)
    register_plugin_secrets(ctx, app)
    try:
        plugin = app.plugins.plugins.get(PLUGIN)
        if plugin is None:
            raise click.ClickException(f"{PLUGIN} is not among this config's plugins: add it to active_plugins "
                                       "(or unset $PLUGIN)")
        if plugin.state != "active" or plugin.module is None:
            raise click.ClickException(f"{PLUGIN} is {plugin.state}: {plugin.reason}")
        module: Any = plugin.module
        options = module.settings(plugin.config)
        template = module.index_template(options)
        if template is None:
            raise click.ClickException(f"no template to apply: set custom.{PLUGIN}.mappings (inline, or the path of "
                                       "a JSON file)")
        if show:
            click.echo(json.dumps({"name": options["template_name"], **template}, indent=2))
            return
        client = module.make_client(options)
        try:
            sent = module.apply_template(client, options)
        except SqapiError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            client.close()
        click.echo(f"index template {sent['name']!r} applied to {', '.join(sent['index_patterns'])} "
                   f"(priority {sent['priority']}): indices created from now on get it; existing ones keep their "
                   "mapping")
    finally:
        app.close()
