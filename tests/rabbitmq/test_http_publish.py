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
