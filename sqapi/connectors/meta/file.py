"""``meta_store: {type: file, base_dir: ...}`` -- metadata as JSON files on disk.

``meta_location`` names a JSON file holding one object, relative to ``base_dir`` (and
confined to it, as for the ``disk`` data store).  This is the embedded default; metadata
embedded in the message is used before any store is asked.
"""

from __future__ import annotations

import json
import os
from typing import Any

from sqapi.connectors.confine import resolve_inside
from sqapi.connectors.data.disk import check_base_dir
from sqapi.errors import ConnectorError, PermanentError


def validate_config(config: dict[str, Any]) -> None:
    check_base_dir(config, "meta_store")


def fetch_metadata(config: dict[str, Any], reference: str) -> dict[str, Any]:
    path = resolve_inside(config.get("base_dir"), reference, what="meta_location")
    try:
        with open(path, encoding="utf-8") as handle:
            found = json.load(handle)
    except json.JSONDecodeError as exc:
        raise PermanentError(f"metadata file '{reference}' is not valid JSON ({exc.msg}, line {exc.lineno})")\
            from None
    if not isinstance(found, dict):
        raise PermanentError(f"metadata file '{reference}' holds a {type(found).__name__}, not an object")
    return found


def ping(config: dict[str, Any]) -> None:
    base = config.get("base_dir")
    if base and not os.path.isdir(base):
        raise ConnectorError(f"base_dir '{base}' is not a readable folder")
