"""The mime type sqapi records: metadata first, then libmagic, corrected by a text file's extension.

Real libmagic on real files.  Where a rule exists to undo a libmagic guess, the test first checks
that libmagic really makes that guess on the sample, so it keeps proving the rule.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from sqapi.core.content import guess_mime, mime_type

# Wrapped the way READMEs are: each line of the first paragraph holds one comma, which is all
# libmagic's CSV test looks at.
README = """\
sqapi listens on a message queue, and for each message it receives
it fetches the data object, stores the metadata next to it and then
hands both to every plugin that accepts the data's type, where one is
a plain Python function, found in a folder next to its configuration
and its scripts. It declares the mime types it accepts, the database
tables it needs and the function to call. Every outcome is recorded,
so a message that failed once is retried, and one that keeps failing
goes to a dead-letter queue, where an operator can look at it. If a
plugin raises, the processor catches it and the listener decides
whether the message is acknowledged, retried or dead-lettered.

Configuration lives in one YAML file with defaults for everything, so
a single process runs on a laptop without any services at all, while
a cluster swaps in RabbitMQ, PostgreSQL, Redis and Swift by changing
the type of each section.

The rest of this document describes the message format, the plugin
interface and the command line.
"""

CSV = """\
id,name,city,joined
1,Alice,Paris,2021-03-04
2,Bob,Berlin,2022-07-19
3,Carol,Rome,2023-01-30
4,Dave,Oslo,2024-11-02
"""

JSON = '{\n  "name": "sqapi",\n  "plugins": ["a", "b"],\n  "retries": {"max": 3}\n}\n'

HTML = "<!DOCTYPE html>\n<html><head><title>Notes</title></head><body><p>Hello.</p></body></html>\n"


def png_bytes() -> bytes:
    """A valid 1x1 RGB PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
            + chunk(b"IEND", b""))


def write(directory: Path, name: str, content: str | bytes) -> str:
    path = directory / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return str(path)


def test_libmagic_takes_the_readme_sample_for_csv(tmp_path: Path) -> None:
    # the premise of the prose tests below: without the correction this prose would be text/csv
    assert guess_mime(write(tmp_path, "README", README)) == "text/csv"


def test_english_prose_without_an_extension_is_text_plain(tmp_path: Path) -> None:
    assert mime_type(write(tmp_path, "README", README)) == "text/plain"


def test_english_prose_named_txt_is_text_plain(tmp_path: Path) -> None:
    path = write(tmp_path, "data", README)
    assert mime_type(path, location="docs/README.txt") == "text/plain"


def test_a_real_csv_named_csv_is_text_csv(tmp_path: Path) -> None:
    assert mime_type(write(tmp_path, "people.csv", CSV)) == "text/csv"


def test_a_real_csv_without_an_extension_is_text_plain(tmp_path: Path) -> None:
    assert guess_mime(write(tmp_path, "people", CSV)) == "text/csv"
    assert mime_type(write(tmp_path, "people", CSV)) == "text/plain"


def test_prose_named_md_becomes_text_markdown(tmp_path: Path) -> None:
    assert mime_type(write(tmp_path, "README.md", README)) == "text/markdown"
    assert mime_type(write(tmp_path, "notes.MD", "# Notes\n\nA short note.\n")) == "text/markdown"


def test_json_named_json_is_application_json(tmp_path: Path) -> None:
    assert mime_type(write(tmp_path, "config.json", JSON)) == "application/json"


def test_yaml_named_yml_or_yaml_is_application_yaml(tmp_path: Path) -> None:
    # neither Python's table nor Debian's /etc/mime.types knows YAML; libmagic says text/plain
    yaml_text = "name: sqapi\nplugins:\n  - a\n  - b\n"
    assert mime_type(write(tmp_path, "config.yml", yaml_text)) == "application/yaml"
    assert mime_type(write(tmp_path, "config.yaml", yaml_text)) == "application/yaml"


def test_c_source_named_c_keeps_the_type_libmagic_gives_it(tmp_path: Path) -> None:
    # Python's own table maps .c to text/plain, a host's /etc/mime.types to text/x-csrc
    path = write(tmp_path, "main.c", "#include <stdio.h>\n\nint main(void) {\n    return 0;\n}\n")
    assert guess_mime(path) == "text/x-c"
    assert mime_type(path) == "text/x-c"


def test_html_named_txt_is_text_plain(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.txt", HTML)
    assert guess_mime(path) == "text/html"
    assert mime_type(path) == "text/plain"


def test_a_png_named_txt_stays_image_png(tmp_path: Path) -> None:
    assert mime_type(write(tmp_path, "picture.txt", png_bytes())) == "image/png"


def test_a_text_file_named_pdf_stays_text(tmp_path: Path) -> None:
    assert mime_type(write(tmp_path, "report.pdf", "Just a short note.\nNothing more.\n")) == "text/plain"
    assert mime_type(write(tmp_path, "readme.pdf", README)) == "text/plain"


def test_a_compressed_name_says_nothing_about_the_text_inside(tmp_path: Path) -> None:
    path = write(tmp_path, "page", HTML)
    assert mime_type(path, location="archive/page.txt.gz") == "text/html"


def test_prose_mentioning_input_in_parentheses_is_not_algol_68(tmp_path: Path) -> None:
    path = write(tmp_path, "NOTES", "The reader (input, output and errors) is described below.\n\nMore text.\n")
    assert guess_mime(path) == "text/x-Algol68"
    assert mime_type(path) == "text/plain"


def test_prose_starting_with_pa_in_capitals_is_not_hp_graphics_language(tmp_path: Path) -> None:
    path = write(tmp_path, "README.Debian", "PAM for Debian\n--------------\n\nPAM provides a method.\n")
    assert guess_mime(path) == "application/vnd.hp-HPGL"
    assert mime_type(path) == "text/plain"


def test_binary_that_libmagic_calls_hp_graphics_language_does_not_become_text(tmp_path: Path) -> None:
    path = write(tmp_path, "blob.txt", b"PA" + bytes(range(256)) * 8)
    assert mime_type(path) == guess_mime(path) == "application/vnd.hp-HPGL"


def test_the_metadata_field_wins_over_content_and_name(tmp_path: Path) -> None:
    path = write(tmp_path, "picture.txt", png_bytes())
    metadata = {"Content-Type": "Application/PDF; charset=binary", "other": "text/plain"}
    assert mime_type(path, location="picture.txt", metadata=metadata, field="content-type") == "application/pdf"


def test_an_exact_metadata_key_is_preferred_to_one_that_differs_in_case(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.txt", README)
    metadata = {"MIME": "image/png", "mime": "text/markdown"}
    assert mime_type(path, metadata=metadata, field="mime") == "text/markdown"


@pytest.mark.parametrize("value", [42, None, "pdf", "", "   ", "*/*", "2024/05", "text/", ["text/plain"]])
def test_a_metadata_value_that_is_not_a_mime_type_is_ignored(tmp_path: Path, value: Any) -> None:
    path = write(tmp_path, "notes.txt", README)
    assert mime_type(path, metadata={"mime": value}, field="mime") == "text/plain"


def test_metadata_is_ignored_without_a_field_or_without_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.txt", README)
    assert mime_type(path, metadata={"mime": "application/pdf"}) == "text/plain"
    assert mime_type(path, metadata={"mime": "application/pdf"}, field="type") == "text/plain"


def test_an_url_location_uses_the_extension_of_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, "download", HTML)
    assert mime_type(path, location="http://host/a/b/notes.txt?x=1") == "text/plain"
    assert mime_type(path, location="https://host/notes.md#top") == "text/markdown"
    assert mime_type(path, location="http://host/page?name=notes.txt") == "text/html"


def test_the_location_names_the_data_rather_than_the_local_copy(tmp_path: Path) -> None:
    path = write(tmp_path, "tmp1234.txt", README)
    assert mime_type(path, location="s3/people.csv") == "text/csv"


def test_a_missing_file_is_application_octet_stream(tmp_path: Path) -> None:
    assert mime_type(str(tmp_path / "gone.txt")) == "application/octet-stream"


def test_a_directory_or_a_fifo_is_application_octet_stream_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    assert mime_type(str(fifo)) == "application/octet-stream"
    assert mime_type(str(tmp_path)) == "application/octet-stream"


def test_an_empty_file_is_application_x_empty(tmp_path: Path) -> None:
    assert mime_type(write(tmp_path, "empty.txt", b"")) == "application/x-empty"


def test_binary_noise_is_application_octet_stream_whatever_its_name(tmp_path: Path) -> None:
    noise = bytes((i * 7919 + 13) % 256 for i in range(4096))
    assert mime_type(write(tmp_path, "noise.txt", noise)) == "application/octet-stream"
