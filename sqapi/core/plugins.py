"""Plugin discovery, loading and checking.

A plugin is a folder (sqAPI's layout)::

    <name>/__init__.py              def execute(config, database, message, metadata, data): ...
    <name>/config.yml               merged over the main config for this plugin only
    <name>/scripts/init.sql         run by the plugin's Database at startup
    <name>/blueprints/*.py          each exposing ``bp = flask.Blueprint(...)``

or an installed module registered under the ``sqapi.plugins`` entry point group.  Folders are
searched in ``plugins/`` of the working directory, in ``plugin_dirs`` from the config, in
``$SQAPI_PLUGIN_DIRS``, and last in sqapi's own ``plugins/`` (the built-ins): the first
folder of a name wins, so a user's plugin replaces a built-in of the same name (with a warning
naming both).

A plugin's ``database`` is a Database of its own: of the type and connection its
``config.yml``'s ``database`` section names, or else of the main one (see
:func:`~sqapi.core.plugin_parts.plugin_database_section`; its module, blueprints and database
are made in :mod:`sqapi.core.plugin_parts`).  Its functions are checked by
:mod:`sqapi.core.hooks`.  How its calls run is its ``plugin.isolation`` (:mod:`sqapi.core.runner`).

Every problem is pinned on its plugin -- a broken import, a wrong ``execute`` signature, a
missing init script, a bad config value -- and recorded as that plugin's ``reason`` while
the others load.  A plugin's optional ``check(config)`` may raise
:class:`~sqapi.errors.PluginNotConfigured` to stay inactive ("unloaded") until configured.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

from sqapi.config import Config, deep_merge, parse_size, read_yaml, substitute_env
from sqapi.core.hooks import HOOKS, call_hook, check_execute, check_hooks
from sqapi.core.plugin_parts import (
    MODULE_PREFIX,
    commits_safely_without_waiting,
    describe_database,
    describe_exception,
    import_plugin_folder,
    load_blueprints,
    plugin_database,
    plugin_database_section,
)
from sqapi.errors import PluginNotConfigured, SqapiError
from sqapi.resources import BUILTIN_PLUGIN_PACKAGE, BUILTIN_PLUGINS

#: re-exported: their homes are sqapi.core.hooks and sqapi.core.plugin_parts
__all__ = ["ACTIVE", "FAILED", "HOOKS", "MODULE_PREFIX", "PROCESS", "PROJECT_PLUGINS", "THREAD", "UNLOADED", "Plugin",
           "PluginSet", "builtin_entry_point", "call_hook", "check_hooks", "commits_safely_without_waiting",
           "discover", "import_plugin_folder", "load_plugins", "plugin_database_section", "plugin_dirs"]

log = logging.getLogger(__name__)

#: sqapi's own built-in plugins (``plugins/`` of a checkout, ``sqapi/builtin_plugins`` of the wheel)
PROJECT_PLUGINS = BUILTIN_PLUGINS
ACTIVE, UNLOADED, FAILED = "active", "unloaded", "failed"
#: ``plugin.isolation``: calls in worker processes (the default), or on the loader's threads (thread-safe only)
PROCESS, THREAD = "process", "thread"


@dataclass
class Plugin:
    """One plugin as loaded: its module, merged config, database and state."""

    name: str
    directory: Path | None
    state: str = ACTIVE
    reason: str | None = None
    module: types.ModuleType | None = None
    config: Config = field(default_factory=Config)
    database: Any = None
    mime_types: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=lambda: ["process"])
    timeout: float | None = None
    version: str | None = None         # ``plugin.version``: recorded with every row and event of its runs
    isolation: str = PROCESS
    thread_safe: bool = False
    concurrency: int | None = None     # worker processes at most (None: processing.workers)
    max_memory: int | None = None      # bytes, per worker process
    database_section: dict[str, Any] | None = None  # what its Database was built from (``type`` included)
    batched: bool = False              # has execute_batch: called once per batch instead of execute per message
    async_commit: bool = False         # its worker processes may commit without waiting for the disk
    entry_point: str | None = None     # ``module:attr`` of a plugin installed as a package
    builtin: bool = False              # shipped with sqapi (in sqapi's own plugins/)
    shadowed: list[str] = field(default_factory=list)  # other plugins of this name, not used
    blueprints: list[Any] = field(default_factory=list)
    blueprint_errors: list[str] = field(default_factory=list)
    requested: bool = False  # named by active_plugins or $PLUGIN (not merely found)
    missing: bool = False    # requested, but no plugin of that name exists

    def accepts(self, mime: str | None) -> bool:
        """True when the plugin takes data of type ``mime`` (an empty filter takes every type)."""
        if not self.mime_types:
            return True
        if not mime:
            return False
        mime = mime.split(";")[0].strip().lower()
        return any(fnmatch.fnmatch(mime, pattern.lower()) for pattern in self.mime_types)

    def fail(self, reason: str) -> None:
        self.state, self.reason = FAILED, reason

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "reason": self.reason,
            "directory": str(self.directory) if self.directory else None,
            "mime_types": list(self.mime_types),
            "after": list(self.after),
            "actions": list(self.actions),
            "timeout": self.timeout,
            "version": self.version,
            "isolation": self.isolation,
            "thread_safe": self.thread_safe,
            "concurrency": self.concurrency,
            "max_memory": self.max_memory,
            "builtin": self.builtin,
            "shadowed": list(self.shadowed),
            "database": describe_database(self.database, self.database_section),
            "blueprint_errors": list(self.blueprint_errors),
        }


@dataclass
class PluginSet:
    """Every plugin found, and the active ones in execution order (``plugin.after`` respected)."""

    plugins: dict[str, Plugin]
    order: list[str]

    @property
    def active(self) -> list[Plugin]:
        return [self.plugins[name] for name in self.order]

    def for_type(self, mime: str | None, action: str = "process") -> list[Plugin]:
        """Active plugins, in order, that take data of type ``mime`` for ``action`` (process or delete)."""
        return [p for p in self.active if action in p.actions and (action != "process" or p.accepts(mime))]

    def failures(self) -> list[Plugin]:
        """Plugins that would run but did not load: a loader must not run without them (it would record messages
        DONE that they never saw).  A plugin left out by active_plugins or $PLUGIN is not one of them."""
        return [p for p in self.plugins.values() if p.state == FAILED]

    def close(self) -> None:
        for plugin in self.plugins.values():
            if plugin.database is not None:
                plugin.database.close()


def plugin_dirs(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> list[Path]:
    """The folders searched for plugin folders, in order, without duplicates.

    sqapi's own built-ins are not among them (they are found through their entry points), not
    even when the working directory is sqapi's checkout."""
    env = os.environ if env is None else env
    candidates = [Path.cwd() / "plugins"]
    candidates += [Path(p) for p in config.get("plugin_dirs") or []]
    candidates += [Path(p) for p in env.get("SQAPI_PLUGIN_DIRS", "").split(os.pathsep) if p]
    builtin = BUILTIN_PLUGINS.resolve()
    seen: list[Path] = []
    for path in candidates:
        resolved = path.resolve()
        if resolved not in seen and resolved != builtin and resolved.is_dir():
            seen.append(resolved)
    return seen


def builtin_entry_point(ep: importlib_metadata.EntryPoint) -> bool:
    """An entry point of sqapi's own built-in plugins (``sqapi.builtin_plugins.<name>``)."""
    return ep.module.startswith(BUILTIN_PLUGIN_PACKAGE + ".")


def discover(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, Plugin]:
    """Every plugin folder and entry point; the first of a name wins, the others are named in a warning.

    In order: plugin folders (see :func:`plugin_dirs`), then plugins installed as packages
    (the ``sqapi.plugins`` entry point group), then sqapi's own built-ins -- registered in the
    same group, and loaded from their folder like any plugin folder."""
    found: dict[str, Plugin] = {}
    for folder in plugin_dirs(config, env):
        for child in sorted(folder.iterdir()):
            if not child.is_dir() or child.name.startswith((".", "_")) or not (child / "__init__.py").exists():
                continue
            if child.name in found:
                _shadow(found[child.name], str(child))
                continue
            found[child.name] = Plugin(name=child.name, directory=child)
    entry_points = list(importlib_metadata.entry_points(group="sqapi.plugins"))
    for ep in [ep for ep in entry_points if not builtin_entry_point(ep)]:
        existing = found.get(ep.name)
        if existing is not None:
            _shadow(existing, f"the installed package's entry point {ep.value}")
            continue
        plugin = Plugin(name=ep.name, directory=None, entry_point=ep.value)
        try:
            module = ep.load()
            plugin.module = module
            plugin.directory = Path(module.__file__).parent if getattr(module, "__file__", None) else None
        except Exception as exc:
            plugin.fail(f"entry point {ep.value} failed to load: {type(exc).__name__}: {exc}")
        found[ep.name] = plugin
    for ep in [ep for ep in entry_points if builtin_entry_point(ep)]:
        directory = BUILTIN_PLUGINS / ep.module.rpartition(".")[2]
        if ep.name in found:
            _shadow(found[ep.name], str(directory.resolve()))
        elif (directory / "__init__.py").exists():
            found[ep.name] = Plugin(name=ep.name, directory=directory.resolve(), builtin=True)
        else:
            log.warning("built-in plugin %s: its folder %s is missing (a broken install?)", ep.name, directory)
    return found


def _shadow(used: Plugin, other: str) -> None:
    used.shadowed.append(other)
    what = "the built-in plugin" if other.startswith(str(PROJECT_PLUGINS.resolve())) else "the plugin"
    log.warning("plugin %s in %s is used; %s of the same name in %s is not", used.name, used.directory or
                used.entry_point, what, other)


def load_plugins(config: Config, make_database: Callable[[dict[str, Any]], Any],
                 env: Mapping[str, str] | None = None) -> PluginSet:
    """Discover, select, load and check plugins; ``make_database(section)`` builds a plugin's Database."""
    env = os.environ if env is None else env
    found = discover(config, env)
    only = env.get("PLUGIN")
    wanted: list[str] | None = [only] if only else config.get("active_plugins")
    if wanted is not None:
        for name in wanted:
            if name not in found:
                dirs = ", ".join(str(d) for d in plugin_dirs(config, env)) or "(no plugin folders)"
                found[name] = Plugin(name=name, directory=None, state=FAILED, missing=True,
                                     reason=f"listed as active but not found in {dirs}")
            found[name].requested = True
        for name, plugin in found.items():
            if name not in wanted and plugin.state == ACTIVE:
                plugin.state = UNLOADED
                plugin.reason = "PLUGIN selects another plugin" if only else "not in active_plugins"
    for plugin in found.values():
        if plugin.state == ACTIVE:
            _load_one(plugin, config, make_database)
    order = _execution_order([p for p in found.values() if p.state == ACTIVE])
    for plugin in found.values():
        if plugin.state == FAILED:
            log.error("plugin %s failed to load: %s", plugin.name, plugin.reason)
        elif plugin.state == UNLOADED:
            log.info("plugin %s not loaded: %s", plugin.name, plugin.reason)
    return PluginSet(plugins=found, order=order)


def _load_one(plugin: Plugin, main: Config, make_database: Callable[[dict[str, Any]], Any]) -> None:
    where = f"plugin '{plugin.name}' ({plugin.directory or 'entry point'})"
    try:
        own = _own_config(plugin)
        plugin.config = _merged_config(main, own, plugin)
        if plugin.module is None:
            assert plugin.directory is not None
            plugin.module = import_plugin_folder(plugin.name, plugin.directory)
        check_execute(plugin.module)
        check_hooks(plugin.module)
        plugin.batched = getattr(plugin.module, "execute_batch", None) is not None
        section = plugin.config.get("plugin") or {}
        plugin.mime_types = _mime_types(plugin.config)
        plugin.after = _string_list(section.get("after"), "plugin.after")
        plugin.actions = _string_list(section.get("actions"), "plugin.actions") or ["process"]
        unknown = sorted(set(plugin.actions) - {"process", "delete"})
        if unknown:
            raise ValueError(f"plugin.actions may hold process and delete, not {', '.join(unknown)}")
        timeout = section.get("timeout", (main.get("processing") or {}).get("plugin_timeout"))
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                    or timeout < 0):
            raise ValueError(f"plugin.timeout must be a number of seconds, not {timeout!r}")
        plugin.timeout = float(timeout) if timeout else None
        plugin.version = _version(own)
        _isolation(plugin, section)
        check = getattr(plugin.module, "check", None)
        if callable(check):
            check(plugin.config)
        plugin.database = plugin_database(plugin, own, make_database)
        plugin.async_commit = commits_safely_without_waiting(main.get("database") or {}, own.get("database") or {})
    except PluginNotConfigured as exc:
        plugin.state, plugin.reason = UNLOADED, f"not configured: {exc}"
        return
    except (SqapiError, ValueError, TypeError, OSError, yaml.YAMLError) as exc:
        plugin.fail(f"{where}: {exc}")
        return
    except Exception as exc:  # a plugin's own code raised at import or check time
        plugin.fail(f"{where}: {describe_exception(exc)}")
        return
    load_blueprints(plugin)


def _isolation(plugin: Plugin, section: Mapping[str, Any]) -> None:
    """``plugin.isolation``, ``thread_safe``, ``concurrency`` and ``max_memory``, checked."""
    thread_safe = section.get("thread_safe", False)
    if not isinstance(thread_safe, bool):
        raise ValueError(f"plugin.thread_safe must be true or false, not {thread_safe!r}")
    isolation = section.get("isolation", PROCESS)
    if isolation not in (PROCESS, THREAD):
        raise ValueError(f"plugin.isolation must be {PROCESS} or {THREAD}, not {isolation!r}")
    if isolation == THREAD and not thread_safe:
        raise ValueError("plugin.isolation: thread runs several calls at once on the loader's threads, which only a "
                         "thread-safe plugin can take: declare plugin.thread_safe: true, or leave isolation: process")
    concurrency = section.get("concurrency")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise ValueError(f"plugin.concurrency must be a whole number of at least 1, not {concurrency!r}")
    plugin.isolation, plugin.thread_safe, plugin.concurrency = isolation, thread_safe, concurrency
    plugin.max_memory = parse_size(section.get("max_memory"), "plugin.max_memory")
    if plugin.max_memory is not None and isolation == THREAD:
        raise ValueError("plugin.max_memory caps a worker process's memory: it needs isolation: process")


def _version(own: Mapping[str, Any]) -> str | None:
    """The version the plugin's own ``config.yml`` declares (``version:``, or ``plugin: {version: ...}``), if any.

    A string: YAML reads ``1.10`` as the number 1.1, so a number is refused rather than guessed at.
    Only the plugin's own file counts: the main config's ``plugin`` section is no plugin's version."""
    section = own.get("plugin")
    top, nested = own.get("version"), section.get("version") if isinstance(section, dict) else None
    if top is not None and nested is not None and top != nested:
        raise ValueError(f"config.yml declares two versions, version: {top!r} and plugin.version: {nested!r}: keep one")
    value = top if top is not None else nested
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"version must be a non-empty string, not {value!r}: quote it in config.yml, "
                         f"e.g. version: '1.10'")
    return value.strip()


def _own_config(plugin: Plugin) -> dict[str, Any]:
    if plugin.directory is None or not (plugin.directory / "config.yml").exists():
        return {}
    path = plugin.directory / "config.yml"
    return substitute_env(read_yaml(path), str(path))


def _merged_config(main: Config, own: Mapping[str, Any], plugin: Plugin) -> Config:
    merged = deep_merge(main, own)
    merged["plugin"] = dict(merged.get("plugin") or {})
    merged["plugin"].update(name=plugin.name, directory=str(plugin.directory) if plugin.directory else None)
    merged["database"] = plugin_database_section(main.get("database") or {}, own.get("database") or {})
    config = Config(merged)
    config.source = str(plugin.directory / "config.yml") if plugin.directory else main.source
    return config


def _mime_types(config: Mapping[str, Any]) -> list[str]:
    section = config.get("plugin") or {}
    if section.get("mime_types") is not None:
        return _string_list(section.get("mime_types"), "plugin.mime_types")
    return _string_list((config.get("msg_broker") or {}).get("supported_mime"), "msg_broker.supported_mime")


def _string_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{key} must be a list of strings, not {value!r}")


def _execution_order(active: Iterable[Plugin]) -> list[str]:
    """Names in an order where each plugin comes after those in its ``after``; a cycle fails its members.

    ``after: ['*']`` means after every other active plugin that does not say ``'*'`` itself.
    """
    plugins = {p.name: p for p in active}

    def dependencies(name: str) -> list[str]:
        if "*" in plugins[name].after:
            return sorted(n for n, p in plugins.items() if n != name and "*" not in p.after)
        return plugins[name].after
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> bool:
        if state.get(name) == "done":
            return True
        if state.get(name) == "visiting":
            cycle = path[path.index(name):] + [name]
            for member in cycle:
                plugins[member].fail(f"plugin.after makes a cycle: {' -> '.join(cycle)}")
            return False
        state[name] = "visiting"
        ok = True
        for dependency in dependencies(name):
            if dependency in plugins and not visit(dependency, path + [name]):
                ok = False
        state[name] = "done"
        if ok and plugins[name].state == ACTIVE:
            order.append(name)
        return ok

    for name in sorted(plugins):
        visit(name, [])
    return [name for name in order if plugins[name].state == ACTIVE]
