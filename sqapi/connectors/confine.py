"""Confining references to a base folder (shared by the ``disk`` data store and ``file`` meta store)."""

from __future__ import annotations

import functools
import os
import stat

from sqapi.errors import AccessDenied, ConnectorError, NotFound


@functools.lru_cache(maxsize=64)
def _real_base(base_dir: str) -> str:
    """``base_dir`` with symlinks resolved (cached: it is resolved for every message otherwise)."""
    return os.path.realpath(base_dir)


def _plain_path_inside(base: str, reference: str) -> str | None:
    """The fast path: a relative ``reference`` to a regular file, with no ``..``, ``.``, empty or symlinked
    part, is ``base/reference`` as it stands (``base`` is real), found with one ``lstat`` per part instead
    of resolving every folder from the root.  ``None`` when it is not that plain (the full check decides)."""
    if reference.startswith("/"):
        return None
    parts = reference.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    path = base
    for part in parts:
        path = os.path.join(path, part)
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return None
        if stat.S_ISLNK(mode):
            return None
    return path if stat.S_ISREG(mode) else None


def resolve_inside(base_dir: str | None, reference: str, what: str = "data_location") -> str:
    """The real path of ``reference`` (relative to ``base_dir``), refused when it escapes ``base_dir``.

    ``..`` segments, absolute paths and symlinks are all judged by where they finally lead:
    the resolved path must lie inside the resolved ``base_dir``.  Without a ``base_dir`` any
    path is accepted.  Raises :class:`AccessDenied` (permanent), :class:`NotFound` (retryable) or,
    when ``base_dir`` itself is gone (a volume not mounted), :class:`ConnectorError` (retryable).
    """
    if not reference or "\x00" in reference:
        raise AccessDenied(f"{what} is empty or contains a NUL byte")
    if reference.startswith("file://"):
        reference = reference[len("file://"):]
    topic = "meta_store" if what == "meta_location" else "data_store"
    if base_dir:
        base = _real_base(str(base_dir))
        plain = _plain_path_inside(base, reference)
        if plain is not None:
            return plain
        real = os.path.realpath(reference if os.path.isabs(reference) else os.path.join(base, reference))
        if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
            raise AccessDenied(f"{what} '{reference}' is outside base_dir "
                               f"(set {topic}.base_dir or $SQAPI_DATA_DIR to a folder that holds it)")
    else:
        real = os.path.realpath(reference)
    try:
        mode = os.stat(real).st_mode
    except (FileNotFoundError, NotADirectoryError):
        if base_dir and not os.path.isdir(base_dir):  # checked only on a miss: the common path stays one stat
            raise ConnectorError(f"{topic}.base_dir '{base_dir}' is not a readable folder (not mounted?), "
                                 f"so {what} '{reference}' cannot be read") from None
        raise NotFound(f"{what} '{reference}' does not exist") from None
    except OSError as exc:
        raise AccessDenied(f"{what} '{reference}' cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise AccessDenied(f"{what} '{reference}' is not a regular file")
    return real
