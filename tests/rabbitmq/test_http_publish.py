"""POST /messages on RabbitMQ (a vhost of its own): confirmed onto the queue, consumed to DONE, served back;
what is refused never reaches the queue."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sqapi.api.app import create_app
from sqapi.app import Sqapi
from tests.api.conftest import start_server as start_server  # noqa: F401  (a fixture, used by name)
from tests.api.test_publishing import MALFORMED, PDF, fresh

from .conftest import declare, depth, listening, wait_until

TOKEN = "rabbit-http-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def rabbit_app(make_app: Callable[..., Sqapi], broker: dict[str, Any], vhost: str) -> Sqapi:
    app = make_app({"msg_broker": {**broker, "retry": {"max_attempts": 1}}, "active_plugins": ["pdf_extractor"],
                    "api": {"token": TOKEN, "max_body_bytes": 4096, "max_upload_bytes": "64KiB"}})
    declare(vhost, broker)
    return app


def test_posted_messages_are_confirmed_onto_the_queue_consumed_and_served_back(
        rabbit_app: Sqapi, vhost: str, write_data: Callable[[str, bytes | str], str]) -> None:
    client = create_app(rabbit_app).test_client()
    location = write_data("plain.txt", "plain text over rabbit\n")
    posted = client.post("/messages", headers=AUTH, json={"uuid_ref": "rabbit-json", "data_location": location})
    assert posted.status_code == 202, posted.get_data(as_text=True)
    uploaded = client.post("/messages", headers=AUTH, content_type="multipart/form-data",
                           data={"file": (io.BytesIO(PDF), "report.pdf"), "uuid_ref": "rabbit-pdf"})
    assert uploaded.status_code == 202, uploaded.get_data(as_text=True)
    assert depth(vhost, "sqapi") == 2  # both confirmed before the 202

    def finished() -> bool:
        rows = [client.get(f"/messages/{u}", headers=AUTH).get_json() or {} for u in ("rabbit-json", "rabbit-pdf")]
        return all(row.get("status") == "DONE" for row in rows)

    with listening(rabbit_app):
        wait_until(finished, what="both posted messages DONE")
    pdf = client.get("/messages/rabbit-pdf/data", headers=AUTH)
    assert hashlib.sha256(pdf.data).hexdigest() == hashlib.sha256(PDF).hexdigest()
    part = client.get("/messages/rabbit-pdf/data", headers={**AUTH, "Range": "bytes=0-7"})
    assert (part.status_code, part.data) == (206, PDF[:8])
    assert client.get("/messages/rabbit-json/data", headers=AUTH).data == b"plain text over rabbit\n"
    assert "Page one" in client.get("/pdf_extractor/rabbit-pdf/text", headers=AUTH).get_data(as_text=True)

    assert client.delete("/messages/rabbit-pdf", headers=AUTH).status_code == 202
    assert depth(vhost, "sqapi") == 1


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_a_refused_post_leaves_the_queue_empty(case: str, rabbit_app: Sqapi, vhost: str, workdir: Path) -> None:
    request, code, reason = MALFORMED[case]
    answer = create_app(rabbit_app).test_client().post("/messages", headers=AUTH, **fresh(request))
    assert answer.status_code == code, answer.get_data(as_text=True)
    assert reason in answer.get_json()["details"]
    assert depth(vhost, "sqapi") == 0


def test_without_the_token_nothing_reaches_the_queue(rabbit_app: Sqapi, vhost: str) -> None:
    client = create_app(rabbit_app).test_client()
    assert client.post("/messages", json={"uuid_ref": "a", "data_location": "x"}).status_code == 401
    assert client.delete("/messages/a").status_code == 401
    assert depth(vhost, "sqapi") == 0


def test_over_the_wire_a_json_post_and_a_pdf_upload_end_done_indexed_and_served_back(
        broker: dict[str, Any], vhost: str, pg_section: dict[str, Any], es: Any, workdir: Path,
        write_config: Callable[..., Path], start_server: Callable[..., Any]) -> None:
    """``sqapi run`` (waitress and the loader in one process) on RabbitMQ and PostgreSQL, with the pdf_extractor
    and the es_indexer (against the STAND-IN FOR ELASTICSEARCH, tests/plugins/es_standin.py)."""
    import requests

    from tests.plugins.conftest import es_settings

    (workdir / "data").mkdir(exist_ok=True)
    (workdir / "data" / "posted.pdf").write_bytes(PDF)
    config = write_config({"msg_broker": {**broker, "retry": {"max_attempts": 1}}, "database": pg_section,
                           "active_plugins": ["pdf_extractor", "es_indexer"],
                           "custom": {"es_indexer": es_settings(es)}, "api": {"token": TOKEN}})
    server = start_server("run", "-c", str(config))
    posted = requests.post(server.url + "/messages", headers=AUTH, timeout=30,
                           json={"uuid_ref": "wire-json", "data_location": "posted.pdf"})
    uploaded = requests.post(server.url + "/messages", headers=AUTH, timeout=30,
                             files={"file": ("report.pdf", io.BytesIO(PDF))}, data={"uuid_ref": "wire-pdf"})
    assert (posted.status_code, uploaded.status_code) == (202, 202), (posted.text, uploaded.text)

    def finished(uuid: str) -> bool:
        answer = server.get(f"/messages/{uuid}", headers=AUTH)
        return answer.status_code == 200 and answer.json()["status"] in ("DONE", "FAILED")

    for uuid in ("wire-json", "wire-pdf"):
        wait_until(lambda u=uuid: finished(u), timeout=60, what=f"{uuid} finished")  # type: ignore[misc]
        assert server.get(f"/messages/{uuid}", headers=AUTH).json()["status"] == "DONE"
        assert "Page two: its text is extracted by pdf_extractor." in es.document(uuid)["text"]
        whole = server.get(f"/messages/{uuid}/data", headers=AUTH)
        assert hashlib.sha256(whole.content).hexdigest() == hashlib.sha256(PDF).hexdigest()
        part = server.get(f"/messages/{uuid}/data", headers={**AUTH, "Range": "bytes=5-24"})
        assert part.status_code == 206 and part.content == PDF[5:25]
    assert depth(vhost, "sqapi") == 0
    assert server.stop() == 0, "".join(server.stderr)
