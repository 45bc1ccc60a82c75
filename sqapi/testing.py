"""Helpers for testing a plugin as a plain function, with sqapi's own loading and database.

::

    from sqapi.testing import blueprint_client, run_plugin

    def test_it(tmp_path):
        run = run_plugin("plugins/sizes", data=b"abc", metadata={"a": 1}, tmp_path=tmp_path)
        assert run.result == {"metadata_size": 1, "data_size": 3}
        assert run.database.execute_query("SELECT data_size FROM sizes") == [{"data_size": 3}]

    def test_its_endpoint(tmp_path):
        run = run_plugin("plugins/sizes", data=b"abc", tmp_path=tmp_path, uuid="u1")
        client = blueprint_client(run.plugin)
        assert client.get("/sizes/u1").get_json()["data_size"] == 3

The plugin is loaded exactly as the loader loads it -- its ``config.yml`` merged over sqapi's
embedded default (and ``config``), its ``execute`` signature checked, its init script run --
against a PostgreSQL database: the embedded server sqapi runs itself (no server to install),
one per test session (in the folder above pytest's ``tmp_path``, or ``$SQAPI_EMBEDDED_DIR``),
in a database of each ``tmp_path``'s own: the loads of one test share their tables, and tests
never see each other's rows (nor each other's extensions).
``run_plugin`` then calls ``execute`` once, in the test's own process, so that a debugger
and coverage see it (the loader runs it in a worker process; the arguments are the same).
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from sqapi.app import database_factory
from sqapi.config import Config, deep_merge, load_config
from sqapi.core.calls import BatchCall, Call
from sqapi.core.content import mime_type, sha256_of
from sqapi.core.hooks import call_hook, run_execute_batch
from sqapi.core.message import Message
from sqapi.core.plugins import ACTIVE, Plugin, _load_one


@dataclass
class PluginRun:
    plugin: Plugin
    message: Message
    result: Any
    database: Any


def test_database(tmp_path: Path) -> dict[str, Any]:
    """A ``database`` section for the database of ``tmp_path`` (one per test) in the session's embedded PostgreSQL.

    A database, not a schema: an extension a plugin creates (``CREATE EXTENSION cube``) lives in
    the database it was created in, and each test needs its own."""
    folder = Path(tmp_path).resolve()
    directory = os.environ.get("SQAPI_EMBEDDED_DIR") or str(folder.parent / "sqapi-postgres")
    return {"type": "postgres", "schema": None,
            "embedded": {"directory": directory,
                         "database": f"plugin_test_{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}"}}


test_database.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test for pytest to collect


def load_plugin(directory: str | Path, tmp_path: Path, config: dict[str, Any] | None = None) -> Plugin:
    """Load the plugin folder ``directory`` as the loader would, on a fresh schema of the embedded PostgreSQL.

    ``config`` is merged over sqapi's embedded default first (``custom``, ``plugin``, a
    ``database`` section of your own...)."""
    directory = Path(directory).resolve()
    main = load_config(env={})
    merged = Config(deep_merge(deep_merge(main, {"database": test_database(tmp_path)}), config or {}))
    plugin = Plugin(name=directory.name, directory=directory)
    _load_one(plugin, merged, database_factory(merged))
    if plugin.state != ACTIVE:
        raise AssertionError(f"plugin {plugin.name} did not load: {plugin.reason}")
    return plugin


def run_plugin(directory: str | Path, data: bytes, tmp_path: Path, metadata: dict[str, Any] | None = None,
               config: dict[str, Any] | None = None, results: dict[str, Any] | None = None,
               **fields: Any) -> PluginRun:
    """Load the plugin and call its ``execute`` once on ``data`` -- between its ``setup`` and ``teardown``
    hooks, when it has them, as sqapi would; returns what it returned and its database.  A plugin with
    ``execute_batch`` gets a batch of one item, and its item's outcome is returned (or raised).

    ``fields`` set the message's own (``uuid``, ``type``, ``data_location``, ``body``...);
    ``results`` are the earlier plugins' results it receives (``message.results``)."""
    plugin = load_plugin(directory, tmp_path, config)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    message = Message(id="test", uuid=fields.pop("uuid", str(uuidlib.uuid4())),
                      data_location=fields.pop("data_location", str(path)), metadata=metadata,
                      body=fields.pop("body", {}), results=dict(results or {}), **fields)
    message.hash_digest = sha256_of(str(path))
    message.type = message.type or mime_type(str(path), message.data_location, metadata)
    assert plugin.module is not None
    hooks = {"config": plugin.config, "database": plugin.database}
    set_up = call_hook(plugin.module, "setup", **hooks)
    try:
        if plugin.batched:  # as sqapi calls it: a batch, here of one
            [result] = run_execute_batch(plugin.module, plugin.config, plugin.database,
                                         BatchCall([Call(message, dict(metadata or {}), str(path))]))
            if isinstance(result, BaseException):
                raise result
        else:
            with open(path, "rb") as handle:
                result = plugin.module.execute(plugin.config, plugin.database, message, dict(metadata or {}),
                                               io.BufferedReader(handle))
    finally:
        if set_up:
            call_hook(plugin.module, "teardown", **hooks)
    return PluginRun(plugin=plugin, message=message, result=result, database=plugin.database)


def blueprint_client(*plugins: Plugin) -> FlaskClient:
    """A Flask test client serving these plugins' blueprints as ``sqapi api`` does.

    ``current_app.config[name]`` is the plugin's config and ``current_app.database[name]`` its
    database, as in the API; a blueprint that failed to import is an ``AssertionError`` here."""
    app = Flask("sqapi-plugin-test")
    app.database = {}  # type: ignore[attr-defined]
    for plugin in plugins:
        if plugin.blueprint_errors:
            raise AssertionError(f"plugin {plugin.name}: {'; '.join(plugin.blueprint_errors)}")
        app.config[plugin.name] = plugin.config
        app.database[plugin.name] = plugin.database  # type: ignore[attr-defined]
        for bp in plugin.blueprints:
            app.register_blueprint(bp)
    return app.test_client()
