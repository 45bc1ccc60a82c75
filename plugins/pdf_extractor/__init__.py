"""pdf_extractor: the text of every page of a PDF, with PDFium (through pypdfium2).

Stores page count, character count and text in the plugin's ``pdf_texts`` table (one row per
message uuid; a redelivery replaces it) and returns ``{"pages", "chars", "text", "truncated"}``
so plugins declaring ``plugin.after: [pdf_extractor]`` find it in
``message.results['pdf_extractor']``.  Pages are separated by a form feed (``\\f``), as
``pdftotext`` does.  Serves ``GET /pdf_extractor/<uuid>`` (JSON) and
``GET /pdf_extractor/<uuid>/text`` (plain text).

A PDF that cannot give text is a permanent failure with its reason, checked in the order
cheapest first so that nothing large is ever held in memory:

* larger than ``max_bytes`` -> refused before it is read;
* no ``%PDF-`` header -> "not a PDF"; no ``%%EOF`` near the end -> "truncated";
* compressed streams inflating past ``max_inflated_bytes`` -> "decompression bomb" (counted
  chunk by chunk while inflating, never stored);
* PDFium refuses it -> "encrypted" (a password is needed) or "corrupt";
* more than ``max_pages`` pages -> refused before any page is read;
* no text on any page -> "no text layer (image-only or scanned PDF?)";
* still running after ``max_seconds`` -> stopped between pages.

Text beyond ``max_chars`` is cut off (``truncated: true``), which bounds memory and result size.
PDFium is not thread-safe, so extraction is serialised within a process: the plugin runs in
worker processes (sqapi's default isolation), which extract in parallel, one PDF each.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import re
import threading
import time
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pypdfium2 as pdfium

from sqapi.errors import ConnectorError, PermanentError

SCRIPTS = Path(__file__).parent / "scripts"

DEFAULTS: dict[str, Any] = {
    "max_bytes": 100 * 1024 * 1024,           # larger files are refused unread
    "max_pages": 2000,
    "max_chars": 5_000_000,                   # extracted text is cut off here (truncated: true)
    "max_inflated_bytes": 512 * 1024 * 1024,  # total size of all inflated (FlateDecode) streams
    "max_seconds": None,                      # default: 90% of plugin.timeout
}
PAGE_SEPARATOR = "\f"
_STREAM = re.compile(rb"stream(?:\r\n|\n|\r)")
_INFLATE_CHUNK = 1 << 20

log = logging.getLogger(__name__)

# PDFium keeps global state and is not thread-safe: one extraction at a time per process.
_pdfium_lock = threading.Lock()


def settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The extractor's settings: ``custom.pdf_extractor`` over :data:`DEFAULTS`."""
    own = ((config.get("custom") or {}).get("pdf_extractor")) or {}
    merged = {**DEFAULTS, **own}
    if merged["max_seconds"] is None:
        timeout = (config.get("plugin") or {}).get("timeout")
        merged["max_seconds"] = 0.9 * float(timeout) if timeout else 300.0
    for key in DEFAULTS:
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"custom.pdf_extractor.{key} must be a positive number, not {value!r}")
    return merged


def check(config: Mapping[str, Any]) -> None:
    settings(config)  # a wrong limit fails the plugin at load, naming the key


def execute(config: Any, database: Any, message: Any, metadata: dict[str, Any], data: io.BufferedReader) \
        -> dict[str, Any]:
    limits = settings(config)
    extracted = extract(data, limits)
    row = {
        "uuid_ref": message.uuid,
        "hash_digest": message.hash_digest,
        "pages": extracted["pages"],
        "chars": extracted["chars"],
        "truncated": int(extracted["truncated"]),
        "text": extracted["text"],
        "extracted_at": datetime.now(UTC).isoformat(),
    }
    database.execute_script(str(SCRIPTS / "upsert_text.sql"), **row)
    log.debug("extracted %d pages, %d chars from %s", extracted["pages"], extracted["chars"], message.uuid)
    return extracted


def extract(data: io.BufferedIOBase | io.BufferedReader, limits: Mapping[str, Any]) -> dict[str, Any]:
    """Check and extract one PDF; raises PermanentError with the reason when it cannot give text."""
    size = data.seek(0, os.SEEK_END)
    if size > limits["max_bytes"]:
        raise PermanentError(f"PDF too large: {size} bytes, limit custom.pdf_extractor.max_bytes is "
                             f"{limits['max_bytes']}")
    if size == 0:
        raise PermanentError("not a PDF: the file is empty")
    data.seek(0)
    with _view(data, size) as view:
        if view.find(b"%PDF-", 0, min(size, 1024)) < 0:
            raise PermanentError("not a PDF: no %PDF- header in its first 1024 bytes")
        if view.rfind(b"%%EOF", max(0, size - 4096)) < 0:
            raise PermanentError("truncated PDF: no %%EOF marker at its end")
        inflated = inflated_size(view, limits["max_inflated_bytes"])
        log.debug("compressed streams inflate to %d bytes", inflated)
        deadline = time.monotonic() + float(limits["max_seconds"])
        if not _pdfium_lock.acquire(timeout=float(limits["max_seconds"])):
            raise ConnectorError("PDFium is busy with another document (still running after its time limit)")
        try:
            return _extract_pages(_source(data, view), limits, deadline)
        finally:
            _pdfium_lock.release()


class _view:
    """A read-only memory map of the file (or its bytes, for objects without a file descriptor)."""

    def __init__(self, data: Any, size: int) -> None:
        self.data = data
        self.size = size
        self.map: mmap.mmap | None = None

    def __enter__(self) -> Any:
        try:
            self.map = mmap.mmap(self.data.fileno(), 0, access=mmap.ACCESS_READ)
            return self.map
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            self.data.seek(0)
            return self.data.read(self.size)

    def __exit__(self, *exc: Any) -> None:
        if self.map is not None:
            self.map.close()


def _source(data: Any, view: Any) -> str | bytes:
    """The file's path when it has one (PDFium then reads it on demand), else its bytes."""
    name = getattr(data, "name", None)
    if isinstance(name, str) and os.path.isfile(name):
        return name
    return bytes(view)


def inflated_size(view: Any, limit: int) -> int:
    """Total inflated size of the zlib streams in ``view``; PermanentError as soon as it passes ``limit``.

    Streams are inflated a chunk at a time and the output is only counted, so a decompression
    bomb costs a bounded amount of memory and stops at the limit.  Streams that are not zlib
    data (images, fonts stored raw) are skipped; broken ones are left to PDFium.
    """
    total = 0
    for match in _STREAM.finditer(view):
        start = match.end()
        if view[max(0, match.start() - 3):match.start()] == b"end":
            continue
        header = view[start:start + 2]
        if len(header) < 2 or header[0] & 0x0F != 8 or ((header[0] << 8) | header[1]) % 31:
            continue
        end = view.find(b"endstream", start)
        end = len(view) if end < 0 else end
        inflater = zlib.decompressobj()
        position = start
        try:
            while position < end and not inflater.eof:
                pending = view[position:min(end, position + _INFLATE_CHUNK)]
                position += len(pending)
                while pending and not inflater.eof:
                    total += len(inflater.decompress(pending, _INFLATE_CHUNK))
                    if total > limit:
                        raise PermanentError(f"decompression bomb: compressed streams inflate past "
                                             f"{limit} bytes (custom.pdf_extractor.max_inflated_bytes)")
                    pending = inflater.unconsumed_tail
        except zlib.error:
            continue
    return total


def _extract_pages(content: str | bytes, limits: Mapping[str, Any], deadline: float) -> dict[str, Any]:
    try:
        document = pdfium.PdfDocument(content)
    except pdfium.PdfiumError as exc:
        raise PermanentError(_explain(exc)) from None
    try:
        pages = len(document)
        if pages > limits["max_pages"]:
            raise PermanentError(f"too many pages: {pages}, limit custom.pdf_extractor.max_pages is "
                                 f"{limits['max_pages']}")
        if pages == 0:
            raise PermanentError("empty PDF: it has no pages")
        budget = int(limits["max_chars"])
        texts: list[str] = []
        truncated = False
        for index in range(pages):
            if time.monotonic() > deadline:
                raise PermanentError(f"extraction stopped at page {index + 1} of {pages}: longer than "
                                     f"{limits['max_seconds']:g}s (custom.pdf_extractor.max_seconds)")
            if budget <= 0:
                truncated = True
                break
            text, truncated = _page_text(document, index, budget)
            texts.append(text)
            budget -= len(text) + len(PAGE_SEPARATOR)
            if truncated:
                break
        text = PAGE_SEPARATOR.join(texts)
        if not text.strip():
            raise PermanentError(f"no text layer: none of its {pages} pages has extractable text "
                                 "(image-only or scanned PDF?)")
        return {"pages": pages, "chars": len(text), "text": text, "truncated": truncated}
    except pdfium.PdfiumError as exc:
        raise PermanentError(_explain(exc)) from None
    finally:
        document.close()


def _page_text(document: Any, index: int, budget: int) -> tuple[str, bool]:
    page = document[index]
    try:
        textpage = page.get_textpage()
        try:
            count = textpage.count_chars()
            # normalising only shortens the text, so twice the budget always covers it
            wanted = min(count, 2 * budget)
            raw = textpage.get_text_range(0, wanted)
        finally:
            textpage.close()
    finally:
        page.close()
    # PDFium ends lines with \r\n; NUL cannot be stored in PostgreSQL text
    text = raw.replace("\r\n", "\n").replace("\x00", "")
    return text[:budget], wanted < count or len(text) > budget


def _explain(exc: Exception) -> str:
    detail = str(exc)
    if "password" in detail.lower() or "security" in detail.lower():
        return f"encrypted PDF: it needs a password or a security handler PDFium lacks ({detail})"
    if "format" in detail.lower():
        return f"corrupt PDF: PDFium cannot parse it ({detail})"
    return f"unreadable PDF: {detail}"
