"""What the processor learns from the data itself: its sha256 and its mime type."""

from __future__ import annotations

import hashlib
import mimetypes
import os
import posixpath
import re
import stat
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import magic

#: bytes read at a time (under the 128 KiB above which each read's buffer would be a fresh mmap)
CHUNK = 64 * 1024

OCTET_STREAM = "application/octet-stream"
EMPTY = "application/x-empty"

#: Extensions whose type Python's built-in table lacks, or that it and the host's /etc/mime.types
#: disagree on, or where either would replace libmagic's right answer by a vaguer one.  Where
#: libmagic has its own label for the format, that label is used, so a file gets the same type
#: whether or not it has a name.
EXTENSION_TYPES: Mapping[str, str] = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".sql": "application/sql",
    ".xml": "text/xml",
    ".js": "application/javascript",
    ".mjs": "application/javascript",
    ".sh": "text/x-shellscript",
    ".c": "text/x-c",
    ".h": "text/x-c",
}

#: Non-``text/*`` types that are still plain text: an extension naming one of these may refine a
#: content sniff that only found "some text".  Anything else (pdf, images, archives...) never can.
TEXT_LIKE_TYPES = frozenset({
    "application/json",
    "application/ld+json",
    "application/geo+json",
    "application/x-ndjson",
    "application/xml",
    "application/xhtml+xml",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/yaml",
    "application/x-yaml",
    "application/toml",
    "application/sql",
    "application/x-sh",
    "application/x-tex",
    "application/x-latex",
    "image/svg+xml",
})

#: libmagic's guesses that ordinary prose sets off, on evidence too thin to keep without an
#: extension to back them: ``text/csv`` (the first lines hold the same number of commas, as
#: wrapped sentences often do), ``text/x-Algol68`` ("(input," anywhere in the text) and
#: HP-GL (the file starts with an upper-case "PA" or "SP", as in "PAM for Debian").
PROSE_MISTAKES = frozenset({"text/csv", "text/x-algol68", "application/vnd.hp-hpgl"})

_TOP_LEVEL_TYPES = ("application", "audio", "font", "example", "haptics", "image", "message", "model",
                    "multipart", "text", "video")
# RFC 6838 section 4.2: type "/" subtype, each a restricted-name of at most 127 characters
_MIME_TYPE = re.compile("(?:" + "|".join(_TOP_LEVEL_TYPES) + r")/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")


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


def mime_type(path: str, location: str | None = None, metadata: Mapping[str, Any] | None = None,
              field: str | None = None) -> str:
    """The mime type sqapi records for the data in the local file ``path``; never raises.

    Decided in this order:

    1. **Metadata.** When ``field`` is set and ``metadata`` has that key (matched
       case-insensitively) whose value is a string that looks like a mime type (``type/subtype``
       with a registered top-level type), that value wins, without its parameters
       (``; charset=...``) and lower-cased.  Any other value (a number, ``"pdf"``, ``""``) is ignored.
    2. **Content.** libmagic reads the file.  A file that is missing, unreadable or not a regular
       file is ``application/octet-stream``; an empty one is ``application/x-empty``.
    3. **Prose mistakes.** libmagic's ``text/csv``, ``text/x-Algol68`` and HP-GL guesses (see
       :data:`PROSE_MISTAKES`) become ``text/plain`` (HP-GL only when libmagic reads the file as
       text, not binary); rule 4 restores ``text/csv`` for a ``.csv`` name.
    4. **Extension.** When the content is text (any ``text/*``), the extension of ``location``'s
       path (for a URL, of the URL's path; without a ``location``, of ``path``) corrects it if
       it names a text format: ``text/*`` or one of :data:`TEXT_LIKE_TYPES`, looked up in
       :data:`EXTENSION_TYPES` and then the :mod:`mimetypes` table.  An extension never
       overrides other content: a ``.pdf`` name on text stays text, a ``.txt`` name on a PNG
       stays ``image/png``, and a compressed name (``.txt.gz``) says nothing.
    """
    declared = _declared_type(metadata, field)
    if declared is not None:
        return declared
    sniffed = _sniffed_type(path)
    if sniffed.lower() in PROSE_MISTAKES and (sniffed.startswith("text/") or _reads_as_text(path)):
        sniffed = "text/plain"
    if sniffed.startswith("text/"):
        named = _extension_type(location if isinstance(location, str) else path)
        if named is not None and (named.startswith("text/") or named in TEXT_LIKE_TYPES):
            return named
    return sniffed


def _declared_type(metadata: Mapping[str, Any] | None, field: str | None) -> str | None:
    """The mime type in ``metadata[field]`` (key matched case-insensitively), if it looks like one."""
    if not isinstance(field, str) or not field or not isinstance(metadata, Mapping):
        return None
    if field in metadata:
        value = metadata[field]
    else:
        wanted = field.casefold()
        keys = [key for key in metadata if isinstance(key, str) and key.casefold() == wanted]
        if not keys:
            return None
        value = metadata[keys[0]]
    if not isinstance(value, str):
        return None
    candidate = value.split(";", 1)[0].strip().lower()
    return candidate if _MIME_TYPE.fullmatch(candidate) else None


def _sniffed_type(path: str) -> str:
    """libmagic's type for a regular file; octet-stream for anything else (a FIFO would block it)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return OCTET_STREAM
    except (OSError, ValueError, TypeError):
        return OCTET_STREAM
    sniffed = guess_mime(path)
    if sniffed.startswith("inode/"):
        return EMPTY if sniffed == "inode/x-empty" else OCTET_STREAM
    return sniffed


def _reads_as_text(path: str) -> bool:
    """Whether libmagic finds a text encoding (not ``binary``) in the file."""
    try:
        return str(magic.Magic(mime_encoding=True).from_file(path)) != "binary"
    except (magic.MagicException, OSError, ValueError):
        return False


def _extension_type(location: str) -> str | None:
    """The mime type (lower-case) the extension of ``location`` names (a path, or a URL's path)."""
    try:
        name = unquote(urlsplit(location).path) if "://" in location else location
    except ValueError:  # e.g. an unbalanced "[" in a URL's host
        return None
    base = posixpath.basename(name)
    extension = posixpath.splitext(base)[1].lower()
    if extension in EXTENSION_TYPES:
        return EXTENSION_TYPES[extension]
    # the leading "/" keeps mimetypes from reading a "name:..." as a URL scheme (data: above all)
    guessed, encoding = mimetypes.guess_type("/" + base, strict=True)
    return guessed.lower() if guessed is not None and encoding is None else None
