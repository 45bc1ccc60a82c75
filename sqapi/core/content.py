"""What the processor learns from the data itself: its sha256 and its mime type."""

from __future__ import annotations

import hashlib

import magic

#: bytes read at a time (under the 128 KiB above which each read's buffer would be a fresh mmap)
CHUNK = 64 * 1024


def sha256_of(path: str) -> str:
    """Hex sha256 of the file at ``path``, read in chunks (the file is never held in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def guess_mime(path: str) -> str:
    """The mime type libmagic reads from the file's content (not its name)."""
    try:
        return str(magic.from_file(path, mime=True))
    except (magic.MagicException, OSError):
        return "application/octet-stream"
