"""Helpers for testing plugins as plain functions, with sqapi's own loading and database.

::

    from sqapi.testing import run_plugin

    def test_it(tmp_path):
        run = run_plugin("plugins/sizes", data=b"abc", metadata={"a": 1}, tmp_path=tmp_path)
        assert run.result == {"metadata_size": 1, "data_size": 3}

The plugin is loaded exactly as the loader would (its ``config.yml`` merged, its init script
run against a fresh SQLite database, its ``execute`` signature checked), then called once.
"""

from __future__ import annotations

import io
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqapi.config import Config, deep_merge, load_config
from sqapi.connectors.db.sqlite import Database
from sqapi.core.content import guess_mime, sha256_of
from sqapi.core.message import Message
from sqapi.core.plugins import ACTIVE, Plugin, _load_one


@dataclass
class PluginRun:
    plugin: Plugin
    message: Message
    result: Any
    database: Any


def load_plugin(directory: str | Path, tmp_path: Path, config: dict[str, Any] | None = None) -> Plugin:
    """Load the plugin folder ``directory`` against a SQLite database in ``tmp_path``."""
    directory = Path(directory).resolve()
    main = load_config(env={})
    merged = Config(deep_merge(main, {"database": {"type": "sqlite", "path": str(tmp_path / "plugin.db")},
                                      **(config or {})}))
    plugin = Plugin(name=directory.name, directory=directory)
    _load_one(plugin, merged, lambda section: Database(section))
    if plugin.state != ACTIVE:
        raise AssertionError(f"plugin {plugin.name} did not load: {plugin.reason}")
    return plugin


def run_plugin(directory: str | Path, data: bytes, tmp_path: Path, metadata: dict[str, Any] | None = None,
               config: dict[str, Any] | None = None, results: dict[str, Any] | None = None,
               **fields: Any) -> PluginRun:
    """Load the plugin and call its ``execute`` once on ``data``; returns what it returned and its database."""
    plugin = load_plugin(directory, tmp_path, config)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    message = Message(id="test", uuid=fields.pop("uuid", str(uuidlib.uuid4())),
                      data_location=fields.pop("data_location", str(path)), metadata=metadata,
                      body=fields.pop("body", {}), results=dict(results or {}), **fields)
    message.hash_digest = sha256_of(str(path))
    message.type = message.type or guess_mime(str(path))
    assert plugin.module is not None
    with open(path, "rb") as handle:
        result = plugin.module.execute(plugin.config, plugin.database, message, dict(metadata or {}),
                                       io.BufferedReader(handle))
    return PluginRun(plugin=plugin, message=message, result=result, database=plugin.database)
