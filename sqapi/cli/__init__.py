"""The ``sqapi`` command line.  ``sqapi --help`` and ``sqapi COMMAND --help`` explain each command.

``base`` holds the command group and what every command shares; the commands live by job --
``serve`` (run, loader, api), ``messages`` (process, publish), ``inspection`` (plugins, check,
status, messages, init, new-plugin), ``history`` (prune), ``operate`` (redrive, reprocess), ``es``
(es apply-template) -- and register themselves on the group when imported here.
"""

from __future__ import annotations

from sqapi.cli import es, history, inspection, messages, operate, serve  # noqa: F401  (each registers its commands on main)
from sqapi.cli.base import Options, main, register_plugin_secrets

__all__ = ["Options", "main", "register_plugin_secrets"]
