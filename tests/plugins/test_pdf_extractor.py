"""pdf_extractor as a plain function (sqapi.testing.run_plugin) and its blueprint."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from flask import Flask

from sqapi.errors import PermanentError
from sqapi.testing import load_plugin, run_plugin
from tests.plugins.conftest import PLUGINS, make_pdf

PLUGIN = PLUGINS / "pdf_extractor"
PAGES = ["First page: alpha beta\nsecond line (with parens)", "Second page: gamma", "Third page: delta epsilon"]


def limits(**values: object) -> dict[str, object]:
    return {"custom": {"pdf_extractor": values}}


@pytest.mark.parametrize("compress", [False, True])
def test_the_text_of_every_page_is_extracted_and_stored(tmp_path: Path, compress: bool) -> None:
    run = run_plugin(PLUGIN, make_pdf.build_pdf(PAGES, compress=compress), tmp_path, uuid="doc-1")

    assert run.result["pages"] == 3
    assert run.result["text"].split("\f") == PAGES
    assert run.result["chars"] == len(run.result["text"])
    assert run.result["truncated"] is False
    rows = run.database.execute_query("SELECT pages, chars, text, hash_digest FROM pdf_texts WHERE uuid_ref = 'doc-1'")
    assert rows == [{"pages": 3, "chars": run.result["chars"], "text": run.result["text"],
                     "hash_digest": run.message.hash_digest}]


def test_a_second_extraction_of_the_same_uuid_replaces_its_row(tmp_path: Path) -> None:
    plugin = load_plugin(PLUGIN, tmp_path)
    for text in ("old text", "new text"):
        run_plugin(PLUGIN, make_pdf.build_pdf([text]), tmp_path, uuid="same")
    rows = plugin.database.execute_query("SELECT text FROM pdf_texts")
    assert rows == [{"text": "new text"}]


BROKEN = {
    "encrypted": (make_pdf.build_encrypted_pdf(), "encrypted PDF"),
    "truncated": (make_pdf.build_pdf(PAGES)[:400], "truncated PDF"),
    "not a pdf": (b"this is plain text, labelled as a PDF\n" * 20, "not a PDF"),
    "empty file": (b"", "not a PDF"),
    "corrupt": (b"%PDF-1.4\n" + b"\x00garbage\xff" * 200 + b"\n%%EOF\n", "corrupt PDF"),
    "image only": (make_pdf.build_image_only_pdf(), "no text layer"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_pdf_is_a_permanent_failure_with_its_reason(tmp_path: Path, kind: str) -> None:
    data, reason = BROKEN[kind]
    with pytest.raises(PermanentError, match=reason):
        run_plugin(PLUGIN, data, tmp_path)


def test_a_decompression_bomb_is_refused_while_inflating_with_bounded_memory(tmp_path: Path) -> None:
    bomb = make_pdf.build_bomb_pdf(64 << 20)
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(PermanentError, match="decompression bomb"):
            run_plugin(PLUGIN, bomb, tmp_path, config=limits(max_inflated_bytes=16 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_a_pdf_larger_than_max_bytes_is_refused_unread(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="too large.*max_bytes"):
        run_plugin(PLUGIN, make_pdf.build_pdf(PAGES), tmp_path, config=limits(max_bytes=100))


def test_a_pdf_with_more_pages_than_max_pages_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="too many pages: 3.*max_pages"):
        run_plugin(PLUGIN, make_pdf.build_pdf(PAGES), tmp_path, config=limits(max_pages=2))


def test_text_beyond_max_chars_is_cut_off_and_marked_truncated(tmp_path: Path) -> None:
    run = run_plugin(PLUGIN, make_pdf.build_pdf(PAGES), tmp_path, config=limits(max_chars=30))
    assert run.result["truncated"] is True
    assert run.result["text"] == PAGES[0][:30]


def test_a_wrong_limit_fails_the_plugin_at_load_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="custom.pdf_extractor.max_pages"):
        load_plugin(PLUGIN, tmp_path, limits(max_pages="many"))


def test_the_blueprint_serves_a_documents_text_by_uuid(tmp_path: Path) -> None:
    run = run_plugin(PLUGIN, make_pdf.build_pdf(PAGES), tmp_path, uuid="doc-7")
    app = Flask(__name__)
    app.config["pdf_extractor"] = run.plugin.config
    app.database = {"pdf_extractor": run.database}  # type: ignore[attr-defined]
    for bp in run.plugin.blueprints:
        app.register_blueprint(bp)
    client = app.test_client()

    document = client.get("/pdf_extractor/doc-7").get_json()
    assert document["pages"] == 3 and document["text"].split("\f") == PAGES
    text = client.get("/pdf_extractor/doc-7/text")
    assert text.mimetype == "text/plain" and text.get_data(as_text=True).split("\f") == PAGES
    assert client.get("/pdf_extractor/unknown").status_code == 404
