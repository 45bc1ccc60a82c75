"""Write small PDFs from hand-built PDF objects (no PDF library), for the samples, tests and bench.

    python samples/make_pdf.py                 # (re)writes samples/data/report.pdf

``build_pdf(pages)`` returns a valid PDF whose page ``i`` shows the lines of ``pages[i]`` in
Helvetica; the other ``build_*`` functions make the broken kinds the pdf_extractor must
refuse (encrypted, image-only, decompression bomb).  Text is limited to printable ASCII so
what a PDF library extracts can be compared with what was written.
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

SAMPLE = Path(__file__).parent / "data" / "report.pdf"
SAMPLE_PAGES = [
    "sqapi sample report\nPage one: a document arrives on the queue.",
    "Page two: its text is extracted by pdf_extractor.",
    "Page three: it is indexed for search and a webhook is told.",
]


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _text_content(text: str) -> bytes:
    ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
    for line in text.split("\n"):
        ops.append(f"({_escape(line)}) Tj T*")
    ops.append("ET")
    return "\n".join(ops).encode("ascii")


def _stream(content: bytes, compress: bool) -> bytes:
    if compress:
        content = zlib.compress(content)
        return b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(content) + content + b"\nendstream"
    return b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream"


def assemble(objects: list[bytes], trailer_extra: bytes = b"") -> bytes:
    """A PDF file from its objects (object ``i + 1`` is ``objects[i]``; 1 is the catalog) with a correct xref."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R %s>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer_extra,
                                                                               xref)
    return bytes(out)


def _document(contents: list[bytes], trailer_extra: bytes = b"") -> bytes:
    """Catalog (1), pages (2), font (3), then one page object and one content stream per page."""
    count = len(contents)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(count)).encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % count,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, content in enumerate(contents):
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (5 + 2 * i))
        objects.append(content)
    return assemble(objects, trailer_extra)


def build_pdf(pages: list[str], compress: bool = False) -> bytes:
    """A valid PDF with one page per string, each line of a string on its own text line."""
    return _document([_stream(_text_content(text), compress) for text in pages])


def build_image_only_pdf(pages: int = 2) -> bytes:
    """Pages that draw a filled rectangle and carry no text at all (what a scan without OCR looks like)."""
    return _document([_stream(b"0.5 g 72 72 468 648 re f", False) for _ in range(pages)])


def build_encrypted_pdf(text: str = "secret") -> bytes:
    """A PDF with a standard security handler whose user password is not empty: it cannot be opened."""
    encrypt = (b"/Encrypt << /Filter /Standard /V 1 /R 2 /P -44 /O <" + b"ab" * 32 + b"> /U <" + b"cd" * 32
               + b"> >> /ID [<00112233445566778899aabbccddeeff> <00112233445566778899aabbccddeeff>] ")
    return _document([_stream(_text_content(text), False)], trailer_extra=encrypt)


def build_bomb_pdf(inflated_bytes: int) -> bytes:
    """One page whose FlateDecode content stream inflates to ``inflated_bytes`` of spaces."""
    compressor = zlib.compressobj(9)
    chunk = b" " * (1 << 20)
    parts = [compressor.compress(b"BT /F1 12 Tf 72 720 Td (bomb) Tj ET\n")]
    for _ in range(inflated_bytes // len(chunk)):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush())
    data = b"".join(parts)
    content = b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream"
    return _document([content])


# The three shapes below each hide a stream that inflates to ``inflated_bytes`` from a check that
# reads the PDF by hand; PDFium reads all three.  The page content is a text line followed by
# NUL bytes (white space in a content stream), compressed a chunk at a time: a 1 GiB bomb is
# built with a few MiB of memory and is about a thousandth of its inflated size.
_BOMB_TEXT = b"BT /F1 12 Tf 72 720 Td (bomb) Tj ET\n"


def _bomb_content(inflated_bytes: int) -> Iterator[bytes]:
    """``_BOMB_TEXT`` then NUL bytes, ``inflated_bytes`` in all, a MiB at a time."""
    yield _BOMB_TEXT
    chunk = bytes(1 << 20)
    left = inflated_bytes - len(_BOMB_TEXT)
    while left > 0:
        yield chunk[:left]
        left -= len(chunk)


def _deflated_bomb(inflated_bytes: int) -> bytes:
    compressor = zlib.compressobj(9)
    return b"".join([*(compressor.compress(chunk) for chunk in _bomb_content(inflated_bytes)), compressor.flush()])


def _bomb_object(dictionary: bytes, data: bytes, keyword: bytes = b"stream\n") -> bytes:
    return b"<< /Length %d %s >>\n" % (len(data), dictionary) + keyword + data + b"\nendstream"


def build_bomb_pdf_stream_then_space(inflated_bytes: int) -> bytes:
    """A FlateDecode bomb whose ``stream`` keyword is followed by a space before its end of line."""
    data = _deflated_bomb(inflated_bytes)
    return _document([_bomb_object(b"/Filter /FlateDecode", data, keyword=b"stream \n")])


def build_bomb_pdf_hex_then_flate(inflated_bytes: int) -> bytes:
    """A bomb behind the filter chain ``[/ASCIIHexDecode /FlateDecode]``: its stream is the deflate data in hex."""
    compressed = _deflated_bomb(inflated_bytes)
    lines = [compressed[i:i + 32].hex().encode() + b"\n" for i in range(0, len(compressed), 32)]
    return _document([_bomb_object(b"/Filter [/ASCIIHexDecode /FlateDecode]", b"".join(lines) + b">")])


def build_bomb_pdf_endstream_in_stored_block(inflated_bytes: int) -> bytes:
    """A FlateDecode bomb whose deflate data opens with a stored (uncompressed) block holding ``endstream``.

    A reader that finds the end of the stream by its ``endstream`` keyword stops inside the
    data; ``/Length``, which PDFium follows, covers all of it."""
    stored = b"% endstream endobj\n"
    # zlib header (deflate, 32 KiB window), then a stored block: BFINAL 0 and BTYPE 00 padded to a byte, LEN, NLEN
    parts = [b"\x78\xda", b"\x00" + struct.pack("<HH", len(stored), 0xFFFF ^ len(stored)) + stored]
    checksum = zlib.adler32(stored)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate blocks, after the stored one
    for chunk in _bomb_content(inflated_bytes - len(stored)):
        checksum = zlib.adler32(chunk, checksum)
        parts.append(compressor.compress(chunk))
    parts += [compressor.flush(), struct.pack(">I", checksum)]
    return _document([_bomb_object(b"/Filter /FlateDecode", b"".join(parts))])


#: every bomb shape that hides from a hand-written stream scanner, by name
BOMB_SHAPES: dict[str, Callable[[int], bytes]] = {
    "stream keyword then a space": build_bomb_pdf_stream_then_space,
    "ASCIIHexDecode then FlateDecode": build_bomb_pdf_hex_then_flate,
    "endstream inside a stored deflate block": build_bomb_pdf_endstream_in_stored_block,
}


def main(argv: list[str]) -> int:
    target = Path(argv[1]) if len(argv) > 1 else SAMPLE
    target.write_bytes(build_pdf(SAMPLE_PAGES))
    print(f"wrote {target} ({len(SAMPLE_PAGES)} pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
