"""Where sqapi's own files are: inside the installed package, or at the top of a checkout.

The repository keeps sqAPI's layout -- ``scripts/init.sql``, ``plugins/``, ``conf/`` at the
top -- and the wheel carries the same files inside the package (``pyproject.toml`` maps them):

=====================  ============================  ==========================
what                   in a checkout                 in the installed package
=====================  ============================  ==========================
the core schema        ``scripts/init.sql``          ``sqapi/schema/init.sql``
the built-in plugins   ``plugins/<name>/``           ``sqapi/builtin_plugins/<name>/``
config templates       ``conf/sqapi.yml``            ``sqapi/conf/sqapi.yml``
=====================  ============================  ==========================
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _located(inside: str, at_the_top: str) -> Path:
    installed = PACKAGE / inside
    return installed if installed.is_dir() else PACKAGE.parent / at_the_top


CORE_SCRIPTS = _located("schema", "scripts")
BUILTIN_PLUGINS = _located("builtin_plugins", "plugins")
CONF_TEMPLATES = _located("conf", "conf")
#: the package that the ``sqapi.plugins`` entry points of sqapi's own built-ins name
BUILTIN_PLUGIN_PACKAGE = "sqapi.builtin_plugins"
