"""What sqapi makes of a plugin's folder beside its config: its module, its blueprints, its database.

* :func:`import_plugin_folder` imports ``<folder>/__init__.py`` as ``sqapi_plugins.<name>``;
* its ``blueprints/*.py`` are imported and their ``bp`` kept, for the API to mount (a blueprint
  that fails is recorded on its plugin, which still runs);
* its Database is built from exactly the ``database`` section it names
  (:func:`plugin_database_section`), its init script run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import traceback
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqapi.config import deep_merge, init_script_of
from sqapi.errors import ConfigError

if TYPE_CHECKING:
    from sqapi.core.plugins import Plugin

log = logging.getLogger(__name__)

MODULE_PREFIX = "sqapi_plugins"
#: where a database section says which server: a plugin naming one of these gets exactly its own
_WHERE_KEYS = ("connection", "dsn", "url", "embedded", "path", "hosts")


def import_plugin_folder(name: str, directory: Path) -> types.ModuleType:
    """Import the plugin folder ``directory`` as module ``sqapi_plugins.<name>`` (replacing one of that name)."""
    if MODULE_PREFIX not in sys.modules:
        package = types.ModuleType(MODULE_PREFIX)
        package.__path__ = []
        sys.modules[MODULE_PREFIX] = package
    module_name = f"{MODULE_PREFIX}.{name}"
    for loaded in [m for m in sys.modules if m == module_name or m.startswith(module_name + ".")]:
        del sys.modules[loaded]  # a plugin of the same name loaded earlier from another folder
    spec = importlib.util.spec_from_file_location(module_name, directory / "__init__.py",
                                                  submodule_search_locations=[str(directory)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def plugin_database_section(main: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """The ``database`` section of a plugin's Database: exactly what the plugin names, never a mix of two servers.

    * The plugin's ``config.yml`` names no database: the main one (without its init script,
      which is the core's).
    * It names another ``type``: its own section alone (an ``elasticsearch`` database takes
      nothing from a PostgreSQL one).
    * The same type, with where to connect (``connection``, ``dsn``, ``url``, ``embedded``,
      ``path``, ``hosts``): the main section's other settings (pool, timeouts, schema) with the
      plugin's connection alone -- the main connection's host or password never leaks into it.
    * The same type with only other settings: those merged over the main section.
    """
    if not isinstance(own, Mapping):
        raise ValueError(f"database in the plugin's config.yml must be a mapping, not {type(own).__name__}")
    own_type = own.get("type")
    if own_type and own_type != main.get("type"):
        return dict(own)
    base = {k: v for k, v in main.items() if k not in ("init", "scripts")}
    same_server = not any(own.get(key) is not None for key in _WHERE_KEYS)
    if not same_server:
        base = {k: v for k, v in base.items() if k not in _WHERE_KEYS}
    section = deep_merge(base, own)
    section["type"] = own_type or main.get("type")
    return section


def commits_safely_without_waiting(main: Mapping[str, Any], own: Mapping[str, Any]) -> bool:
    """Whether a plugin's calls may commit their writes without waiting for the disk (``synchronous_commit: off``).

    True for a plugin whose writes go to the status database's own PostgreSQL, neither config
    saying otherwise: a call returns before sqapi records it DONE, and that record's commit waits
    for the disk -- which makes every earlier commit of the server durable too (one WAL, written
    in order).  So nothing is recorded DONE whose plugin rows a crash could lose, and a plugin
    writing a row per message does not wait for a disk flush per message.  Only the plugin's
    worker processes use it: writes made elsewhere (its blueprints in the API) wait as usual.
    """
    if own.get("type") not in (None, main.get("type")) or main.get("type") not in ("postgres", "postgresql"):
        return False
    if any(own.get(key) is not None for key in _WHERE_KEYS):
        return False
    return main.get("synchronous_commit") is None and own.get("synchronous_commit") is None


def plugin_database(plugin: Plugin, own: Mapping[str, Any], make_database: Callable[[dict[str, Any]], Any]) \
        -> Any:
    """The plugin's Database, its init script run: ``scripts/init.sql`` or the one its own config names."""
    section = dict(plugin.config.get("database") or {})
    named = init_script_of(own.get("database") or {})
    section.pop("scripts", None)
    section.pop("init", None)
    if named:
        base = plugin.directory or Path.cwd()
        script = Path(named) if os.path.isabs(named) else base / named
        if not script.exists():
            raise ConfigError("database.init", f"init script '{named}' not found", f"create {script} or remove "
                              "the key", plugin.config.source)
        section["init"] = str(script)
    elif plugin.directory is not None and (plugin.directory / "scripts" / "init.sql").exists():
        section["init"] = str(plugin.directory / "scripts" / "init.sql")
    database = make_database(section)
    plugin.database_section = {k: v for k, v in section.items() if k != "init"}
    try:
        database.initialize_database()
    except BaseException:
        database.close()
        raise
    return database


def describe_database(database: Any, section: dict[str, Any] | None = None) -> str | None:
    """Where a plugin's Database is (never a password), for ``sqapi plugins``."""
    from sqapi import registry  # what a database type may say of itself is looked up there

    return registry.where(database, section or {}) or None


def load_blueprints(plugin: Plugin) -> None:
    """Import the plugin's ``blueprints/*.py`` (or ``api.blueprints_directory``) and keep each ``bp``; one that
    fails is recorded in ``plugin.blueprint_errors`` and logged, and the plugin still runs."""
    if plugin.directory is None:
        return
    folder = ((plugin.config.get("api") or {}).get("blueprints_directory")) or "blueprints"
    directory = plugin.directory / str(folder)
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("__"):
            continue
        # no dots in the module name: sqAPI blueprints are written Blueprint(__name__, __name__), and
        # Flask refuses blueprint names with dots
        name = f"{MODULE_PREFIX}__{plugin.name}__{folder}__{path.stem}".replace("-", "_").replace(".", "_")
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            bp = getattr(module, "bp", None)
            if bp is None or not hasattr(bp, "register"):
                raise TypeError("does not expose bp = flask.Blueprint(...)")
            plugin.blueprints.append(bp)
        except Exception as exc:
            sys.modules.pop(name, None)
            message = f"blueprint {path.name}: {describe_exception(exc)}"
            plugin.blueprint_errors.append(message)
            log.error("plugin %s: %s", plugin.name, message)


def describe_exception(exc: BaseException) -> str:
    """What a plugin's own code raised, for its ``reason``: the exception and the file and line it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    place = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{place}"
