"""PDF decompression bombs through the loader: the bomb check is the fast path, the worker's memory limit the guarantee.

Each bomb shape inflates to 1 GiB from a file of 1-2 MiB and hides from a stream scanner that
reads the PDF naively; PDFium, unbounded, took 2.1 GiB to read each.  Here they run as in
production -- a wired sqapi on the embedded default, pdf_extractor in its worker processes --
and the loader (this pytest process) must not grow while they do.
"""

from __future__ import annotations

import io
import json
import re
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sqapi.app import Sqapi
from sqapi.config import parse_size
from sqapi.core.outcome import Delivery, Outcome
from sqapi.core.plugins import import_plugin_folder
from sqapi.errors import PermanentError, is_retryable
from tests.plugins.conftest import PLUGINS, make_pdf

BOMB_BYTES = 1 << 30
#: how much the loader's peak resident memory may grow while a bomb is processed: the bombs run in a worker
LOADER_GROWTH = 48 << 20
#: what sqapi records when the extractor's worker went over plugin.max_memory: a MemoryError in Python, or
#: PDFium aborting its process when an allocation fails (the runner sees its peak near the cap)
OVER_THE_MEMORY_LIMIT = r"over plugin\.max_memory|over the memory limit|MiB memory limit \(plugin\.max_memory\)"


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """Every bomb shape of samples/make_pdf.py, built once (a few seconds each)."""
    return {shape: build(BOMB_BYTES) for shape, build in make_pdf.BOMB_SHAPES.items()}


@pytest.fixture
def extractor(make_app: Callable[..., Sqapi], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Sqapi]:
    """A sqapi running only pdf_extractor on its own config.yml, with one attempt per message (a failure is final
    at once)."""
    monkeypatch.delenv("SQAPI_PDF_MAX_MEMORY", raising=False)

    def make(**settings: Any) -> Sqapi:
        app = make_app({"active_plugins": ["pdf_extractor"], "msg_broker": {"retry": {"max_attempts": 1}},
                        "custom": {"pdf_extractor": settings}})
        assert [plugin.name for plugin in app.plugins.active] == ["pdf_extractor"]
        return app

    return make


class LoaderPeak:
    """This process's peak resident memory over a block: the kernel's high-water mark, reset at the start."""

    def __init__(self) -> None:
        self.reset = False
        self.before = 0
        self.growth = 0

    def __enter__(self) -> LoaderPeak:
        self.reset = _reset_peak()
        self.before = _status_kib("VmRSS" if self.reset else "VmHWM")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.growth = (_status_kib("VmHWM") - self.before) << 10


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:  # the peak cannot be reset: the growth counted is what passes the peak so far
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def process_pdf(app: Sqapi, write_data: Callable[[str, bytes], str], uuid: str, content: bytes) -> Outcome:
    raw = {"uuid_ref": uuid, "data_location": write_data(f"{uuid}.pdf", content), "data_type": "application/pdf"}
    return app.process(raw, Delivery(f"delivery-{uuid}", 1))


def extractor_row(app: Sqapi, uuid: str) -> dict[str, Any]:
    rows = {row["plugin"]: row for row in app.database.get_plugin_rows(uuid)}
    return rows["pdf_extractor"]


SHAPES = sorted(make_pdf.BOMB_SHAPES)


def test_the_extractor_runs_under_a_memory_limit_by_default(extractor: Callable[..., Sqapi]) -> None:
    plugin = extractor().plugins.active[0]
    assert plugin.isolation == "process"
    assert plugin.max_memory == parse_size("1536MB", "plugin.max_memory")


@pytest.mark.parametrize("shape", SHAPES)
def test_the_bomb_check_counts_every_bomb_shape_in_full(bombs: dict[str, bytes], shape: str) -> None:
    module = import_plugin_folder("pdf_extractor", PLUGINS / "pdf_extractor")
    assert len(bombs[shape]) < 4 << 20
    assert module.inflated_size(bombs[shape], 1 << 40) == BOMB_BYTES


@pytest.mark.parametrize("shape", SHAPES)
def test_every_bomb_shape_fails_the_extractor_at_the_bomb_check_while_the_loader_stays_small(
        extractor: Callable[..., Sqapi], write_data: Callable[[str, bytes], str], bombs: dict[str, bytes],
        shape: str) -> None:
    app = extractor()
    with LoaderPeak() as loader:
        outcome = process_pdf(app, write_data, "bomb", bombs[shape])

    assert (outcome.status, outcome.plugin) == ("FAILED", "pdf_extractor")
    row = extractor_row(app, "bomb")
    assert row["status"] == "FAILED" and "decompression bomb" in row["info"]
    assert loader.growth < LOADER_GROWTH


@pytest.mark.parametrize("shape", SHAPES)
def test_with_the_bomb_check_out_of_the_way_the_memory_limit_fails_every_bomb_shape_and_the_next_pdf_extracts(
        extractor: Callable[..., Sqapi], write_data: Callable[[str, bytes], str], bombs: dict[str, bytes],
        shape: str) -> None:
    app = extractor(max_inflated_bytes=1 << 40)  # the bomb check lets anything through: PDFium gets the bomb
    with LoaderPeak() as loader:
        outcome = process_pdf(app, write_data, "bomb", bombs[shape])

    assert (outcome.status, outcome.plugin) == ("FAILED", "pdf_extractor")
    row = extractor_row(app, "bomb")
    assert row["status"] == "FAILED"
    assert re.search(OVER_THE_MEMORY_LIMIT, row["info"] or ""), row["info"]
    assert loader.growth < LOADER_GROWTH
    after = process_pdf(app, write_data, "after", make_pdf.build_pdf(["the next PDF"]))
    assert after.status == "DONE"  # on a fresh worker


def test_a_long_legitimate_pdf_extracts_under_the_memory_limit(
        extractor: Callable[..., Sqapi], write_data: Callable[[str, bytes], str]) -> None:
    pages = [f"Page {n}: " + " ".join(f"word{n}-{i}" for i in range(300)) for n in range(400)]
    app = extractor()
    outcome = process_pdf(app, write_data, "long", make_pdf.build_pdf(pages, compress=True))

    assert outcome.status == "DONE"
    stored = app.database.execute_query("SELECT pages, text FROM pdf_texts WHERE uuid_ref = 'long'")
    assert [row["pages"] for row in stored] == [400] and stored[0]["text"].split("\f") == pages


def test_a_stream_just_under_the_bomb_check_limit_still_extracts_under_the_memory_limit(
        extractor: Callable[..., Sqapi], write_data: Callable[[str, bytes], str]) -> None:
    # the largest stream the bomb check lets through: PDFium holds about twice it while inflating it
    app = extractor()
    outcome = process_pdf(app, write_data, "big", make_pdf.build_bomb_pdf(500 << 20))

    assert outcome.status == "DONE"
    assert json.loads(extractor_row(app, "big")["result"])["text"].strip() == "bomb"


class _FailsToRead(io.BytesIO):
    def seek(self, *args: Any) -> int:
        raise MemoryError


def test_a_memory_error_while_extracting_is_a_permanent_failure_that_retires_its_worker() -> None:
    module = import_plugin_folder("pdf_extractor", PLUGINS / "pdf_extractor")
    with pytest.raises(PermanentError, match="over the memory limit") as raised:
        module.extract(_FailsToRead(b"%PDF-1.4"), module.settings({}))

    assert isinstance(raised.value, MemoryError)  # the worker retires after a MemoryError
    assert not is_retryable(raised.value)
