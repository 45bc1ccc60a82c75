"""What a plugin's functions must look like, checked when it loads, and calling them.

sqAPI's ``execute(config, database, message, metadata, data)`` is called positionally.  The
optional hooks beside it (:data:`HOOKS`) are called with keyword arguments, each hook getting
only those it names (pluggy's manner), so a hook names what it needs in any order and sqapi may
offer more later without breaking it.  A hook naming something sqapi does not hand fails its
plugin when it loads, not on first use.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

#: sqapi's optional plugin hooks beside sqAPI's ``execute``, and the keyword arguments each may name
HOOKS: dict[str, tuple[str, ...]] = {
    "setup": ("config", "database"),     # once per process that runs the plugin's calls, before the first
    "teardown": ("config", "database"),  # once at stop in each process whose setup ran
}


def check_hooks(module: types.ModuleType) -> None:
    """Each hook the plugin defines takes only keyword arguments it may name (checked at load, not on first use)."""
    for name, allowed in HOOKS.items():
        hook = getattr(module, name, None)
        if hook is None:
            continue
        if not callable(hook):
            raise TypeError(f"{name} is not a function")
        for parameter in inspect.signature(hook).parameters.values():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                continue
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL or (
                    parameter.name not in allowed and parameter.default is inspect.Parameter.empty):
                raise TypeError(f"{name}{inspect.signature(hook)}: '{parameter.name}' is not something sqapi "
                                f"hands a hook; {name} may name {', '.join(allowed)} (by name, in any order)")


def call_hook(module: types.ModuleType | None, name: str, **available: Any) -> bool:
    """Call hook ``name`` of ``module`` with the arguments it names; False when the plugin has none."""
    hook = getattr(module, name, None) if module is not None else None
    if hook is None:
        return False
    parameters = inspect.signature(hook).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    hook(**{key: value for key, value in available.items() if takes_all or key in parameters})
    return True


def check_execute(module: types.ModuleType) -> None:
    execute = getattr(module, "execute", None)
    if not callable(execute):
        raise TypeError("has no function execute(config, database, message, metadata, data)")
    try:
        inspect.signature(execute).bind(None, None, None, None, None)
    except TypeError:
        raise TypeError(f"execute{inspect.signature(execute)} cannot be called as "
                        "execute(config, database, message, metadata, data)") from None

