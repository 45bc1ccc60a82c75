"""``data_store: {type: disk, base_dir: /srv/data}`` -- files on a local or mounted file system.

``object_ref`` is a path relative to ``base_dir`` (or an absolute path inside it).  With a
``base_dir`` set, references that escape it -- through ``..``, an absolute path or a
symlink -- are refused.  The original file is handed to the plugins (read-only use), so no
copy is made.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from sqapi.connectors.confine import resolve_inside
from sqapi.errors import AccessDenied, ConfigError, ConnectorError

RETURNS_ORIGINAL = True


def validate_config(config: dict[str, Any]) -> None:
    check_base_dir(config, "data_store")


def check_base_dir(config: dict[str, Any], topic: str) -> None:
    """``base_dir`` is a folder name (a string) or null."""
    base = config.get("base_dir")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{topic}.base_dir", f"must be a folder path, not {base!r}",
                          f"set {topic}.base_dir to a folder (quote it if it looks like a number) or remove it")


def download_to_disk(config: dict[str, Any], object_ref: str) -> str:
    """Path of the file ``object_ref`` names; :class:`LookupError` when it does not exist."""
    return resolve_inside(config.get("base_dir"), object_ref)


def ping(config: dict[str, Any]) -> None:
    base = config.get("base_dir")
    if base and not os.path.isdir(base):
        raise ConnectorError(f"base_dir '{base}' is not a readable folder")
    if base and not os.access(base, os.R_OK | os.X_OK):
        raise ConnectorError(f"base_dir '{base}' is not readable")


def upload(config: dict[str, Any], local_path: str, object_ref: str) -> str:
    """Copy ``local_path`` to ``object_ref`` under ``base_dir`` (atomically); returns the data_location.

    An identical file already there is accepted; a different one is refused (never overwritten).
    """
    base = Path(str(config.get("base_dir") or ".")).resolve()
    target = (base / object_ref).resolve()
    if base not in target.parents:
        raise AccessDenied(f"'{object_ref}' is outside data_store.base_dir ({base})")
    if target.exists():
        if _same_content(target, Path(local_path)):
            return object_ref
        raise AccessDenied(f"{target} exists with other content; choose another data_location")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    shutil.copyfile(local_path, partial)
    os.replace(partial, target)
    return object_ref


def _same_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as left, open(b, "rb") as right:
        while True:
            chunk = left.read(1 << 20)
            if chunk != right.read(1 << 20):
                return False
            if not chunk:
                return True
