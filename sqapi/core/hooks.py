"""What a plugin's functions must look like, checked when it loads, and calling them.

sqAPI's ``execute(config, database, message, metadata, data)`` is called positionally, once per
message.  The optional hooks (:data:`HOOKS`) are called with keyword arguments, each getting
only those it names (pluggy's manner), so a hook names what it needs in any order and sqapi may
offer more later without breaking it:

``setup`` / ``teardown``
    once in each process that runs the plugin's calls, before the first / at stop;
``execute_batch``
    instead of ``execute``, once per batch the processor holds: ``items`` is a list of
    :class:`~sqapi.core.calls.Call` (``message``, ``metadata``, ``path``, ``open()``) and it
    returns one outcome per item, in order -- a result, or an exception for that item alone.

A hook naming something sqapi does not hand fails its plugin when it loads, not on first use;
so does a plugin with neither ``execute`` nor ``execute_batch``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

from sqapi.core.calls import BatchCall, Call

#: sqapi's optional plugin hooks beside sqAPI's ``execute``, and the keyword arguments each may name
HOOKS: dict[str, tuple[str, ...]] = {
    "setup": ("config", "database", "logger"),     # once per process that runs the plugin's calls, before the first
    "teardown": ("config", "database", "logger"),  # once at stop in each process whose setup ran
    "execute_batch": ("config", "database", "logger", "items"),  # once per batch, instead of execute per message
}
#: what a hook must name (or take as ``**kwargs``)
REQUIRED: dict[str, tuple[str, ...]] = {"execute_batch": ("items",)}
EXECUTE = "execute(config, database, message, metadata, data)"


def check_hooks(module: types.ModuleType) -> None:
    """Each hook the plugin defines takes only keyword arguments it may name (checked at load, not on first use)."""
    for name, allowed in HOOKS.items():
        hook = getattr(module, name, None)
        if hook is None:
            continue
        if not callable(hook):
            raise TypeError(f"{name} is not a function")
        signature = inspect.signature(hook)
        for parameter in signature.parameters.values():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                continue
            if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY) or (
                    parameter.name not in allowed and parameter.default is inspect.Parameter.empty):
                raise TypeError(f"{name}{signature}: '{parameter.name}' is not something sqapi "
                                f"hands a hook; {name} may name {', '.join(allowed)} (by name, in any order)")
        takes_all, names = _names(hook)
        missing = [key for key in REQUIRED.get(name, ()) if not takes_all and key not in names]
        if missing:
            raise TypeError(f"{name}{signature} does not name {', '.join(missing)}: sqapi hands the batch's messages "
                            f"as {missing[0]} (by name)")


def check_execute(module: types.ModuleType) -> None:
    """The plugin has sqAPI's ``execute``, callable with five arguments, or an ``execute_batch`` instead."""
    execute = getattr(module, "execute", None)
    if execute is None and getattr(module, "execute_batch", None) is not None:
        return  # a batch plugin need not have execute too (check_hooks checks execute_batch)
    if not callable(execute):
        raise TypeError(f"has no function {EXECUTE} (nor execute_batch(items))")
    try:
        inspect.signature(execute).bind(None, None, None, None, None)
    except TypeError:
        raise TypeError(f"execute{inspect.signature(execute)} cannot be called as {EXECUTE}") from None


def call_hook(module: types.ModuleType | None, name: str, **available: Any) -> bool:
    """Call hook ``name`` of ``module`` with the arguments it names; False when the plugin has none.

    A hook naming ``logger`` gets the plugin module's own logger (``logging.getLogger(module.__name__)``)."""
    hook = getattr(module, name, None) if module is not None else None
    if hook is None:
        return False
    _call(module, hook, available)
    return True


def run_execute(module: types.ModuleType, config: Any, database: Any, call: Call) -> Any:
    """sqAPI's call: ``execute(config, database, message, metadata, data)`` with the data opened for it -- in the
    call's trace context when tracing is on (so a plugin's outgoing requests carry its ``traceparent``)."""
    if call.trace_context:
        from sqapi.core.tracing import running_in  # imported only when tracing is on

        with running_in(call.trace_context), open(call.path, "rb") as data:
            return module.execute(config, database, call.message, call.metadata, data)
    with open(call.path, "rb") as data:
        return module.execute(config, database, call.message, call.metadata, data)


def run_execute_batch(module: types.ModuleType, config: Any, database: Any, batch: BatchCall) -> list[Any]:
    """Call ``execute_batch`` with the arguments it names; its outcomes, one per item, in order (a result, or an
    exception instance for that item).  Anything but one outcome per item is a ``TypeError`` for the whole call."""
    outcomes = _call(module, module.execute_batch, {"config": config, "database": database,
                                                    "items": list(batch.items)})
    if not isinstance(outcomes, list | tuple) or len(outcomes) != len(batch.items):
        got = f"{len(outcomes)} outcomes" if isinstance(outcomes, list | tuple) else type(outcomes).__name__
        raise TypeError(f"execute_batch returned {got} for {len(batch.items)} items: it must return a list of one "
                        "result (or exception) per item, in order")
    return list(outcomes)


def _call(module: types.ModuleType | None, hook: Callable[..., Any], available: dict[str, Any]) -> Any:
    takes_all, names = _names(hook)
    if (takes_all or "logger" in names) and "logger" not in available:
        available["logger"] = logging.getLogger(getattr(module, "__name__", None) or "sqapi.plugins")
    return hook(**{key: value for key, value in available.items() if takes_all or key in names})


@functools.lru_cache(maxsize=256)
def _names(hook: Callable[..., Any]) -> tuple[bool, frozenset[str]]:
    """Whether ``hook`` takes ``**kwargs``, and the keyword arguments it names (read once per function)."""
    parameters = inspect.signature(hook).parameters
    return (any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()),
            frozenset(name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL))
