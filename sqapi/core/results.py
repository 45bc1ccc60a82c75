"""A plugin's returned dict as stored in ``message_plugins.result``, and how to tell one that was not kept."""

from __future__ import annotations

import json
from typing import Any

OMITTED = "__sqapi_result_omitted__"


def dump_result(result: Any, limit: int) -> str | None:
    """A plugin's result as JSON text for ``message_plugins.result``.

    A result over ``limit`` bytes (or not JSON) is replaced by a small marker, so that a later
    attempt knows the result was not kept and runs the plugin again when another needs it.
    """
    if result is None:
        return None
    try:
        text = json.dumps(result, default=str)
    except (TypeError, ValueError) as exc:
        return json.dumps({OMITTED: f"not JSON: {type(exc).__name__}"})
    size = len(text.encode())
    return text if size <= limit else json.dumps({OMITTED: f"{size} bytes, over processing.max_result_bytes"})


def result_was_omitted(stored: str | None) -> bool:
    return bool(stored) and OMITTED in stored  # type: ignore[operator]
