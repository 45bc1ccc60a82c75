"""The one builder that wires sqapi together: config -> connectors -> plugins -> processor.

Nothing happens at import time; :func:`build` connects in a clear order (database first:
without it nothing can be recorded) and :meth:`Sqapi.close` closes what it opened.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqapi import registry, tracing
from sqapi.config import DEFAULT_WORKERS, Config
from sqapi.connectors.data import DataStore
from sqapi.connectors.db import CORE_SCRIPTS, init_script_of
from sqapi.connectors.listeners import SqapiListener, make_listener
from sqapi.connectors.meta import MetaStore
from sqapi.core.consumer import Consumer
from sqapi.core.contracts import Component, StatusStore
from sqapi.core.outcome import Delivery, Outcome
from sqapi.core.plugins import PluginSet, load_plugins
from sqapi.core.processor import Processor
from sqapi.errors import ConfigError, PluginLoadError

log = logging.getLogger(__name__)


def resolve_connector(config: Config, topic: str) -> Any:
    """The module for ``config[topic].type``, after its own ``validate_config`` accepted the section."""
    section = config.get(topic) or {}
    kind = str(section.get("type"))
    module = registry.resolve(topic, kind, source=config.source)
    try:
        registry.validate_section(module, section)
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.problem, exc.fix, config.source) from None
    return module


def validate(config: Config) -> None:
    """Every check that needs no network: connector types resolve and accept their sections."""
    for topic in registry.TOPIC_PACKAGES:
        resolve_connector(config, topic)
    tracing.check(config, config.source)
    init = init_script_of(config.get("database") or {})
    if init and not Path(init).exists():
        raise ConfigError("database.init", f"init script '{init}' not found", "create it or remove the key",
                          config.source)
    if not (CORE_SCRIPTS / "init.sql").exists():
        raise ConfigError("database", f"the core schema {CORE_SCRIPTS / 'init.sql'} is missing",
                          "run sqapi from its source tree (pip install -e .)", config.source)


def broker_section(config: Config) -> dict[str, Any]:
    """The ``msg_broker`` section, its ``workers`` defaulting to ``processing.workers``."""
    section = dict(config["msg_broker"])
    section.setdefault("workers", (config.get("processing") or {}).get("workers", DEFAULT_WORKERS))
    return section


def connector(config: Config, topic: str) -> Component:
    """One connector of ``config[topic]`` on its own, ready to ``ping()`` (for ``sqapi check``)."""
    module = resolve_connector(config, topic)
    section = dict(config[topic])
    if topic == "database":
        return cast(Component, module.Database(section))
    if topic == "msg_broker":
        return make_listener(module.Listener, broker_section(config), _refuse, _refuse)
    store = (DataStore if topic == "data_store" else MetaStore)(module, section)
    store.connect()
    return store


def _refuse(*_args: Any) -> Any:
    raise RuntimeError("a listener made to be checked processes nothing")


def database_factory(config: Config) -> Callable[[dict[str, Any]], Any]:
    """Builds a Database for any ``database`` section: of the section's own ``type`` (a plugin's may name another
    than the main one), checked by that type's ``validate_config``."""
    main_type = str((config.get("database") or {}).get("type"))

    def make(section: dict[str, Any]) -> Any:
        return registry.database(dict(section, type=str(section.get("type") or main_type)), config.source)

    return make


@dataclass
class Sqapi:
    """A wired sqapi instance: what ``sqapi run``, ``loader``, ``process`` and the API share."""

    config: Config
    database: Any
    data_store: DataStore
    meta_store: MetaStore
    plugins: PluginSet
    processor: Processor
    _closers: list[Callable[[], None]] = field(default_factory=list)
    #: the OpenTelemetry tracer provider when tracing is on (``POST /messages`` traces its publications with it)
    tracer_provider: Any = None

    def process(self, raw: bytes | str | Mapping[str, Any], delivery: Delivery) -> Outcome:
        return self.processor.process(raw, delivery)

    def require_plugins(self) -> None:
        """Refuse to process when a plugin named in active_plugins or $PLUGIN failed to load.

        Processing without it would record messages DONE that it never saw, and a redelivery
        would then skip them for good.
        """
        failed = self.plugins.failures()
        if failed:
            reasons = "; ".join(f"{p.name}: {p.reason}" for p in failed)
            raise PluginLoadError(f"plugin{'s' if len(failed) > 1 else ''} failed to load, so nothing is processed "
                                  f"({reasons}). Fix the plugin, or leave it out with active_plugins")
        if not self.plugins.order:
            log.warning("no active plugin: messages will be recorded DONE without any plugin running")

    def create_listener(self) -> Consumer | SqapiListener:
        """What consumes ``msg_broker``: a :class:`~sqapi.core.consumer.Consumer` driving the type's transport
        (sqAPI's kind of listener adapted)."""
        return make_listener(resolve_connector(self.config, "msg_broker").Listener, broker_section(self.config),
                             self.processor.process, self.processor.process_batch)

    def close(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except Exception:  # closing is best effort: one failure must not keep others open
                log.exception("error while closing")
        self._closers.clear()


def _require_status_store(database: Any, kind: str, source: str) -> None:
    """The status database must be a :class:`~sqapi.core.contracts.StatusStore`; said at start, not mid-message."""
    if isinstance(database, StatusStore):
        return
    missing = registry.missing_methods(database, StatusStore)
    database.close()
    raise ConfigError("database.type", f"type '{kind}' cannot hold sqapi's status: it has no {', '.join(missing)}",
                      "use postgres or sqlite for the status database (a type of your own subclasses "
                      "sqapi.connectors.db.StatusStore); other types serve plugins only", source)


def build(config: Config, tracer_provider: Any = None) -> Sqapi:
    """Validate, connect the database, load plugins, connect the stores, build the processor.

    ``tracer_provider``: an OpenTelemetry tracer provider to trace with (tests give one with an in-memory
    exporter); by default the one the config asks for (:mod:`sqapi.tracing`), or none: tracing off."""
    validate(config)
    make_database = database_factory(config)
    database_section = dict(config["database"])
    init = init_script_of(database_section)
    if init:
        database_section["init"] = os.path.abspath(init)
    database = make_database(database_section)
    _require_status_store(database, str(database_section.get("type")), config.source)
    closers: list[Callable[[], None]] = [database.close]
    try:
        database.initialize_database()
        database.initialize_message_table()
        plugins = load_plugins(config, make_database)
        closers.append(plugins.close)
        _refuse_unknown_plugin_names(config, plugins)
        store_section = dict(config["data_store"])
        temp_dir = (config.get("processing") or {}).get("temp_dir")
        if temp_dir and not store_section.get("temp_dir"):  # where remote stores stream data, unless they say
            store_section["temp_dir"] = temp_dir
        data_store = DataStore(resolve_connector(config, "data_store"), store_section)
        data_store.connect()
        closers.append(data_store.close)
        meta_store = MetaStore(resolve_connector(config, "meta_store"), dict(config["meta_store"]))
        meta_store.connect()
        closers.append(meta_store.close)
        if tracer_provider is None:
            tracer_provider = tracing.make_provider(config)
            if tracer_provider is not None:
                closers.append(functools.partial(tracing.shutdown, tracer_provider))
                tracing.install(tracer_provider)
        processor = Processor(config, database, data_store, meta_store, plugins, tracing=tracing.message_tracing(
            config, tracer_provider) if tracer_provider is not None else None)
        closers.append(processor.close)
    except BaseException:
        for close in reversed(closers):
            close()
        raise
    return Sqapi(config, database, data_store, meta_store, plugins, processor, closers, tracer_provider)


def _refuse_unknown_plugin_names(config: Config, plugins: PluginSet) -> None:
    """A name in active_plugins or $PLUGIN that matches no plugin is a typo: stop with the names available."""
    missing = sorted(p.name for p in plugins.plugins.values() if p.missing)
    if not missing:
        return
    available = sorted(p.name for p in plugins.plugins.values() if not p.missing)
    hints = [hint for name in missing for hint in difflib.get_close_matches(name, available, n=1)]
    fix = f"use one of: {', '.join(available) or '(no plugins found)'}"
    if hints:
        fix = f"did you mean {', '.join(repr(h) for h in hints)}? ({fix})"
    key = "$PLUGIN" if os.environ.get("PLUGIN") else "active_plugins"
    raise ConfigError(key, f"no plugin named {', '.join(repr(m) for m in missing)}", fix, config.source)
