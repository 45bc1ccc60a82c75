"""The one place where a config ``type`` becomes code.

``resolve("data", "swift")`` imports :mod:`sqapi.connectors.data.swift`.  A type may
also be an installed package's entry point (group ``sqapi.connectors.<topic>``) or a
fully qualified name: ``mypkg.store`` (a module) or ``mypkg.store:attr``.
An unknown type is a :class:`~sqapi.errors.ConfigError` listing the types available.

It is also the one place that looks at what a connector written elsewhere offers (sqAPI's
connectors are modules whose functions are optional): :func:`validate_section`,
:func:`database`, :func:`where`, :func:`missing_methods`, :func:`status_tables_found`,
:func:`open_status_database`, :func:`listener_class`, :func:`try_lock`, :func:`has_history`.  Core, the
builder and the command line call these, never ``getattr`` on a connector.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import pkgutil
from collections.abc import Iterator
from importlib import metadata
from types import ModuleType
from typing import Any

from sqapi.errors import ConfigError, SqapiError

#: config topic -> connector package under sqapi.connectors
TOPIC_PACKAGES = {
    "data_store": "data",
    "meta_store": "meta",
    "msg_broker": "listeners",
    "database": "db",
}


def builtin_types(package: str) -> list[str]:
    """The connector types shipped in ``sqapi.connectors.<package>``: one module per type."""
    pkg = importlib.import_module(f"sqapi.connectors.{package}")
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def available_types(package: str) -> list[str]:
    return sorted(set(builtin_types(package)) | set(entry_points(f"sqapi.connectors.{package}")))


def resolve(topic: str, kind: str, source: str | None = None) -> Any:
    """Return the module (or object) implementing connector ``kind`` for config topic ``topic``."""
    package = TOPIC_PACKAGES[topic]
    key = f"{topic}.type"
    if ":" in kind or "." in kind:
        return _import_qualified(kind, key, source)
    if kind in builtin_types(package):
        return _import(f"sqapi.connectors.{package}.{kind}", key, source)
    eps = entry_points(f"sqapi.connectors.{package}")
    if kind in eps:
        try:
            return eps[kind].load()
        except Exception as exc:
            raise ConfigError(key, f"the entry point for type '{kind}' failed to load ({exc})",
                              f"reinstall the package that provides it ({eps[kind].value})", source) from None
    choices = available_types(package)
    hint = difflib.get_close_matches(kind, choices, n=1)
    fix = f"use one of: {', '.join(choices)}"
    if hint:
        fix = f"did you mean '{hint[0]}'? ({fix})"
    raise ConfigError(key, f"unknown type '{kind}'", fix, source)


def _import(module_name: str, key: str, source: str | None) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(key, f"module '{module_name}' not found", "check the spelling and that its "
                              "package is installed", source) from None
        raise ConfigError(key, f"'{module_name}' needs the package '{exc.name}', which is not installed",
                          f"pip install {exc.name}", source) from None


def _import_qualified(kind: str, key: str, source: str | None) -> Any:
    module_name, _, attr = kind.partition(":")
    module = _import(module_name, key, source)
    if not attr:
        return module
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(key, f"'{module_name}' has no attribute '{attr}'",
                          f"name an attribute that exists in {module_name}", source) from None


# -- what a connector offers -----------------------------------------------------------------------
def validate_section(module: Any, section: dict[str, Any]) -> None:
    """The connector's own ``validate_config(section)``, when it has one (raises ConfigError)."""
    validate = getattr(module, "validate_config", None)
    if callable(validate):
        validate(section)


def database(section: dict[str, Any], source: str | None = None, pinned: bool = False) -> Any:
    """A ``Database`` of ``section['type']``, checked by that type's ``validate_config``.  ``pinned``: for one
    thread calling one plugin at a time (a plugin worker process) -- one connection, kept, where the type can."""
    module = resolve("database", str(section.get("type")), source=source)
    validate_section(module, section)
    made = module.Database(section)
    pin = getattr(made, "pin", None)
    if pinned and callable(pin):
        pin()
    return made


def missing_methods(component: Any, protocol: type) -> list[str]:
    """The methods ``protocol`` lists that ``component`` lacks (for an error naming them)."""
    wanted = sorted(name for name, value in vars(protocol).items() if not name.startswith("_") and callable(value))
    return [name for name in wanted if not callable(getattr(component, name, None))]


def status_tables_found(database: Any) -> bool | None:
    """Whether the status tables exist; None when the database type cannot tell."""
    has_tables = getattr(database, "has_status_tables", None)
    return bool(has_tables()) if callable(has_tables) else None


class NoStatusDatabase(SqapiError):
    """The status database holds no status tables: nothing was processed there yet."""


def open_status_database(section: dict[str, Any], source: str | None = None) -> Any:
    """The status database of ``section``, to read (and write) what was processed: its tables must exist --
    nothing is created (no file, schema or table).  :class:`~sqapi.errors.SqapiError` when it cannot be
    reached or holds no status tables; the caller closes it."""
    made = database(section, source)
    try:
        found = status_tables_found(made)  # None: the type cannot tell; its queries will say
    except SqapiError:
        made.close()
        raise
    if found is False:
        made.close()
        where_ = where(made, section, with_schema=True) or section.get("type")
        raise NoStatusDatabase(f"no status database at {where_}: run sqapi process/run first")
    return made


def listener_class(section: dict[str, Any], source: str | None = None) -> Any:
    """The ``Listener`` of the ``msg_broker`` section's type; ConfigError when the type has none."""
    module = resolve("msg_broker", str(section.get("type")), source=source)
    found = getattr(module, "Listener", None)
    if found is None:
        raise ConfigError("msg_broker.type", f"'{section.get('type')}' has no Listener", "", source)
    return found


@contextlib.contextmanager
def try_lock(database: Any, name: str) -> Iterator[bool]:
    """The database's named lock for a long operation (``try_lock(name)``), held for the block: yields whether it
    is held (False: another holds it).  A database type that offers none yields True: nothing to hold."""
    lock = getattr(database, "try_lock", None)
    if not callable(lock):
        yield True
        return
    with lock(name) as held:
        yield bool(held)


def has_history(database: Any) -> bool:
    """Whether the database type keeps every attempt (``message_events``): it does when it offers ``get_history``,
    as :func:`history` reads it.  Asks the type, never the database: one that is down is not mistaken for one
    that keeps no history (the caller's own query then says it is down)."""
    return callable(getattr(database, "get_history", None))


def history(database: Any, uuid: str) -> list[dict[str, Any]]:
    """A message's events, oldest first (``message_events``); empty for a database type that keeps none."""
    get_history = getattr(database, "get_history", None)
    return list(get_history(uuid)) if callable(get_history) else []


def where(component: Any, section: dict[str, Any], with_schema: bool = False) -> str:
    """Where a connector is, for people: what it says of itself (``describe()``/``where()``, on it or on its
    ``settings``), else its section's address keys (URLs without user info or query).  Never a password.
    ``with_schema``: a database's schema too, when it has one."""
    from sqapi.config import url_for_logs

    for source in (component, getattr(component, "settings", None)):
        for name in ("describe", "where"):
            method = getattr(source, name, None)
            if callable(method):
                try:
                    text = method()
                except Exception:  # only a label
                    continue
                if isinstance(text, str) and text:
                    schema = getattr(component, "schema", None) if with_schema else None
                    return f"{text} (schema {schema})" if isinstance(schema, str) and schema else text
    url = section.get("url") or section.get("auth_url")
    if url:
        return url_for_logs(str(url))
    if section.get("host"):
        return f"{section['host']}:{section['port']}" if section.get("port") else str(section["host"])
    for key in ("base_dir", "directory", "path"):
        if section.get(key):
            return str(section[key])
    return ""
