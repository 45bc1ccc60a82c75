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

The bomb check reads the PDF by hand, so it is a fast path, not the guarantee: the guarantee
is ``plugin.max_memory`` (config.yml), the worker's hard memory limit, which holds whatever
shape a PDF takes.  Past it, a ``MemoryError`` in Python becomes :class:`OverMemoryLimit`
(permanent, and the worker is replaced); PDFium itself aborts its process when an allocation
fails, which sqapi records as the worker's crash and retries like any crash.
"""

from __future__ import annotations

import binascii
import contextlib
import io
import itertools
import logging
import mmap
import os
import re
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
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
_STREAM = re.compile(rb"stream(?<!endstream)")  # the literal first keeps the search fast
_END_OF_LINE = re.compile(rb"\r\n?|\n")
_WHITE_SPACE = b"\x00\t\n\x0c\r "
_HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]{4}")
_INFLATE_CHUNK = 1 << 20
_FIRST_CHUNK = 1 << 12
_MAX_LAYERS = 4  # filters of one stream that the bomb check undoes, e.g. [/ASCIIHexDecode /FlateDecode]

log = logging.getLogger(__name__)

# PDFium keeps global state and is not thread-safe: one extraction at a time per process.
_pdfium_lock = threading.Lock()


class OverMemoryLimit(PermanentError, MemoryError):
    """A PDF that needs more memory than its worker may use (``plugin.max_memory``).

    A ``MemoryError``, so the worker that raised it is replaced (its heap may be in no state to
    go on), and a :class:`PermanentError`, so it is not retried: the same PDF needs the same
    memory every time."""


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
    with _memory_limit():  # the text of a large PDF is copied on its way to the database
        _store(database, message, extracted)
    return extracted


def _store(database: Any, message: Any, extracted: Mapping[str, Any]) -> None:
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


def extract(data: io.BufferedIOBase | io.BufferedReader, limits: Mapping[str, Any]) -> dict[str, Any]:
    """Check and extract one PDF; raises PermanentError with the reason when it cannot give text.

    A ``MemoryError`` (past ``plugin.max_memory``) is raised again as :class:`OverMemoryLimit`."""
    with _memory_limit():
        return _checked_extract(data, limits)


@contextlib.contextmanager
def _memory_limit() -> Iterator[None]:
    """A ``MemoryError`` inside becomes :class:`OverMemoryLimit`: permanent, and its worker is replaced."""
    try:
        yield
    except OverMemoryLimit:
        raise
    except MemoryError as exc:
        detail = f" ({exc})" if str(exc) else ""
        raise OverMemoryLimit(f"over the memory limit: this PDF needs more memory than its worker may use "
                              f"(plugin.max_memory){detail}") from None


def _checked_extract(data: io.BufferedIOBase | io.BufferedReader, limits: Mapping[str, Any]) -> dict[str, Any]:
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
    bomb costs a bounded amount of memory and stops at the limit.  A stream's data starts on
    the line after its ``stream`` keyword, whatever else that line holds (as PDFium reads it),
    and is inflated until its zlib data ends, ``endstream`` bytes inside it or not.  Layers of
    hex (``/ASCIIHexDecode``) and zlib over one another are undone and every inflated layer is
    counted, as PDFium holds each.  Streams that are neither (images, fonts stored raw, other
    filters) are skipped and broken ones left to PDFium: ``plugin.max_memory`` bounds those.
    """
    budget = _Budget(limit, readable=2 * len(view) + _INFLATE_CHUNK)
    start = 0
    end = -1
    while (keyword := _STREAM.search(view, start)) is not None:
        line = _END_OF_LINE.search(view, keyword.end())
        if line is None:
            break
        start = line.end()  # the next keyword is looked for from here: one line, one stream
        if end < start:  # else the endstream found for an earlier stream is also the first after this one
            end = view.find(b"endstream", start)
            end = len(view) if end < 0 else end
        try:
            for _ in _undo_filters(_chunks_from(view, start, end, budget), budget):
                pass
        except zlib.error:
            continue  # counted up to where it broke
    return budget.total


class _Budget:
    """Inflated bytes counted against the limit (PermanentError once past it), and the bytes of the file the check
    may read in all: reading on past ``endstream`` must not make it read the file over and over."""

    def __init__(self, limit: int, readable: int) -> None:
        self.limit = limit
        self.total = 0
        self.readable = readable

    def count(self, size: int) -> None:
        self.total += size
        if self.total > self.limit:
            raise PermanentError(f"decompression bomb: compressed streams inflate past {self.limit} bytes "
                                 "(custom.pdf_extractor.max_inflated_bytes)")


def _chunks_from(view: Any, start: int, end: int, budget: _Budget) -> Iterator[bytes]:
    """The bytes of ``view`` from ``start``: a small first chunk, up to ``end`` (the next ``endstream``, where
    the stream most likely ends), then on to the end of the file for a reader that wants more -- while the
    budget of bytes to read lasts (past it, the memory limit stands alone)."""
    position, size = start, _FIRST_CHUNK
    while position < len(view) and budget.readable > 0:
        stop = min(len(view), position + size)
        if position < end < stop:
            stop = end
        budget.readable -= stop - position
        yield view[position:stop]
        position, size = stop, min(2 * size, _INFLATE_CHUNK)


def _undo_filters(chunks: Iterator[bytes], budget: _Budget) -> Iterator[bytes]:
    """``chunks`` with the zlib and hex layers they open with undone; nothing when none is zlib (zlib.error when
    a zlib layer is broken)."""
    inflating = False
    for _ in range(_MAX_LAYERS):
        head, chunks = _peek(chunks, 8)
        if _is_zlib(head):
            chunks, inflating = _inflate(chunks, budget), True
        elif _HEX_DIGITS.match(head.translate(None, _WHITE_SPACE)):
            chunks = _unhex(chunks)
        else:
            break
    return chunks if inflating else iter(())


def _peek(chunks: Iterator[bytes], size: int) -> tuple[bytes, Iterator[bytes]]:
    """The first ``size`` bytes of ``chunks`` (fewer when they end first) and all of ``chunks`` again."""
    taken: list[bytes] = []
    length = 0
    for chunk in chunks:
        taken.append(chunk)
        length += len(chunk)
        if length >= size:
            break
    head = b"".join(taken)
    return head[:size], itertools.chain([head], chunks)


def _is_zlib(head: bytes) -> bool:
    """A zlib header: deflate, a window of at most 32 KiB, and its check bits right."""
    return len(head) >= 2 and head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and ((head[0] << 8) | head[1]) % 31 == 0


def _inflate(chunks: Iterator[bytes], budget: _Budget) -> Iterator[bytes]:
    """The inflated ``chunks``, counted, a chunk at a time, until the zlib data ends (zlib.error when broken)."""
    inflater = zlib.decompressobj()
    for chunk in chunks:
        pending = chunk
        while pending and not inflater.eof:
            out = inflater.decompress(pending, _INFLATE_CHUNK)
            budget.count(len(out))
            yield out
            pending = inflater.unconsumed_tail
        if inflater.eof:
            return


def _unhex(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """ASCIIHexDecode a chunk at a time: white space skipped, up to ``>`` or the first character that is not hex."""
    odd = b""
    for chunk in chunks:
        digits = odd + chunk.translate(None, _WHITE_SPACE)
        closing = digits.find(b">")
        if closing >= 0:
            digits = digits[:closing]
        even = len(digits) - len(digits) % 2
        try:
            yield binascii.unhexlify(digits[:even])
        except binascii.Error:
            return
        odd = digits[even:]
        if closing >= 0:
            return


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
