"""Publishing over real HTTP: ``sqapi run`` (waitress, the spool folder, PostgreSQL) takes a PDF upload,
processes it and serves it back; its limits and its token hold on the wire too."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from .conftest import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "samples"))
from make_pdf import SAMPLE_PAGES, build_pdf  # noqa: E402  (samples/ is no package: its path goes first)

TOKEN = "wire-token-456"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PDF = build_pdf(SAMPLE_PAGES)


@pytest.fixture
def server(write_config: Callable[..., Path], start_server: Callable[..., Server],
           monkeypatch: pytest.MonkeyPatch) -> Server:
    monkeypatch.setenv("SQAPI_API_TOKEN", TOKEN)
    config = write_config({"active_plugins": ["pdf_extractor"], "msg_broker": {"retry": {"max_attempts": 1}},
                           "api": {"max_upload_bytes": "256KiB"}})
    return start_server("run", "-c", str(config))


def wait_for_status(server: Server, uuid: str, seconds: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + seconds
    row: dict[str, object] = {}
    while time.monotonic() < deadline:
        answer = server.get(f"/messages/{uuid}", headers=AUTH)
        if answer.status_code == 200:
            row = answer.json()
            if row["status"] in ("DONE", "FAILED"):
                return row
        time.sleep(0.2)
    raise AssertionError(f"{uuid} not finished: {row}\n{''.join(server.stderr)}")


def test_a_pdf_posted_to_sqapi_run_ends_done_and_comes_back_byte_for_byte(server: Server, workdir: Path) -> None:
    answer = requests.post(server.url + "/messages", headers=AUTH, timeout=30,
                           files={"file": ("report.pdf", PDF, "application/pdf")},
                           data={"metadata": json.dumps({"owner": "ann"})})
    assert answer.status_code == 202, answer.text
    uuid = answer.json()["uuid"]
    row = wait_for_status(server, uuid)
    assert row["status"] == "DONE", row

    data = server.get(f"/messages/{uuid}/data", headers=AUTH)
    assert data.status_code == 200
    assert hashlib.sha256(data.content).hexdigest() == hashlib.sha256(PDF).hexdigest() == row["hash_digest"]
    assert data.headers["Content-Type"] == "application/pdf"
    assert data.headers["Content-Length"] == str(len(PDF))
    part = server.get(f"/messages/{uuid}/data", headers={**AUTH, "Range": f"bytes={len(PDF) - 100}-"})
    assert part.status_code == 206
    assert part.content == PDF[-100:]
    text = server.get(f"/pdf_extractor/{uuid}/text", headers=AUTH)
    assert text.status_code == 200
    assert "Page three: it is indexed for search" in text.text
    assert server.stop() == 0, "".join(server.stderr)


def test_the_wire_refuses_an_oversized_upload_and_a_missing_token(server: Server, workdir: Path) -> None:
    assert requests.post(server.url + "/messages", timeout=30,
                         json={"uuid_ref": "a", "data_location": "x"}).status_code == 401
    big = requests.post(server.url + "/messages", headers=AUTH, timeout=30,
                        files={"file": ("big.bin", b"x" * 300_000, "application/octet-stream")})
    assert big.status_code == 413
    assert list((workdir / "data").iterdir()) == []
    spool = workdir / "spool"
    assert not spool.is_dir() or list(spool.glob("*.json")) == []
    assert server.stop() == 0, "".join(server.stderr)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc: not Linux?")


def test_a_200_mib_upload_processed_and_downloaded_stays_out_of_memory(
        write_config: Callable[..., Path], start_server: Callable[..., Server], workdir: Path) -> None:
    """``sqapi run``: the API and the loader in one process -- the upload streamed to the data store, the loader's
    hash and mime guess, and the download all stream: the process's peak memory barely moves."""
    size = 200 << 20
    big = workdir / "big.bin"
    digest = hashlib.sha256()
    with open(big, "wb") as handle:
        for n in range(size >> 20):
            chunk = hashlib.sha256(str(n).encode()).digest() * (1 << 15)
            digest.update(chunk)
            handle.write(chunk)
    config = write_config({"active_plugins": [], "api": {"max_upload_bytes": "256MiB"}})
    server = start_server("run", "-c", str(config))
    assert server.get("/health").status_code == 200
    before = peak_rss_kib(server.process.pid)
    with open(big, "rb") as handle:
        answer = requests.post(server.url + "/messages", timeout=300, files={"file": ("big.bin", handle)},
                               data={"uuid_ref": "big"})
    assert answer.status_code == 202, answer.text
    assert (workdir / "data" / "big" / "big.bin").stat().st_size == size
    row = wait_for_status(server, "big", seconds=120)
    assert row["status"] == "DONE" and row["hash_digest"] == digest.hexdigest(), row
    downloaded = hashlib.sha256()
    with requests.get(server.url + "/messages/big/data", timeout=300, stream=True) as got:
        assert got.status_code == 200 and got.headers["ETag"].strip('"') == digest.hexdigest()
        for chunk in got.iter_content(1 << 20):
            downloaded.update(chunk)
    assert downloaded.hexdigest() == digest.hexdigest()
    grown = peak_rss_kib(server.process.pid) - before
    assert grown < 32 * 1024, f"peak memory grew by {grown} KiB for a {size >> 20} MiB upload, its processing " \
                              "and its download"
    assert server.stop() == 0, "".join(server.stderr)
