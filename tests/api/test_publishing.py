"""Messages in and out over HTTP: POST /messages, DELETE /messages/<uuid>, GET /messages/<uuid>/data and /metadata.

On the embedded default (spool folder, disk data store, PostgreSQL): what is posted lands in the spool
folder, a consumer run until idle processes it, and the API serves its data back.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from sqapi.api.app import SqapiFlask, create_app
from sqapi.app import Sqapi

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "samples"))
from make_pdf import SAMPLE_PAGES, build_pdf  # noqa: E402  (samples/ is no package: its path goes first)

TOKEN = "posting-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PDF = build_pdf(SAMPLE_PAGES)
CONFIG: dict[str, Any] = {"active_plugins": ["pdf_extractor", "counter"],
                          "msg_broker": {"retry": {"max_attempts": 1}},
                          "api": {"token": TOKEN, "max_body_bytes": 4096, "max_upload_bytes": "64KiB"}}
COUNTER = """
def execute(config, database, message, metadata, data):
    return {"bytes": len(data.read())}
"""


@pytest.fixture
def api(make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path]) -> SqapiFlask:
    write_plugin("counter", COUNTER)
    sqapi = make_app(CONFIG)
    assert sorted(p.name for p in sqapi.plugins.active) == ["counter", "pdf_extractor"]
    return create_app(sqapi)


@pytest.fixture
def client(api: SqapiFlask) -> FlaskClient:
    return api.test_client()


def spooled(workdir: Path) -> list[dict[str, Any]]:
    spool = workdir / "spool"
    return [json.loads(p.read_bytes()) for p in sorted(spool.glob("*.json"))] if spool.is_dir() else []


def process_spool(api: SqapiFlask) -> None:
    api.sqapi.create_listener().start_listeners(until_idle=True)


def status(client: FlaskClient, uuid: str) -> dict[str, Any]:
    answer = client.get(f"/messages/{uuid}", headers=AUTH)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return dict(answer.get_json())


def upload(client: FlaskClient, content: bytes = PDF, name: str = "report.pdf", **fields: str) -> TestResponse:
    return client.post("/messages", headers=AUTH, content_type="multipart/form-data",
                       data={"file": (io.BytesIO(content), name), **fields})


# -- in -------------------------------------------------------------------------------------------
def test_a_posted_json_message_is_published_processed_and_its_data_served_back(
        api: SqapiFlask, client: FlaskClient, workdir: Path, write_data: Callable[[str, bytes | str], str]) -> None:
    location = write_data("notes/note.txt", "some text\n" * 100)
    answer = client.post("/messages", headers=AUTH, json={"uuid_ref": "json-1", "data_location": location,
                                                          "metadata": {"owner": "ann"}})
    assert answer.status_code == 202, answer.get_data(as_text=True)
    assert answer.get_json()["uuid"] == "json-1"
    assert answer.get_json()["status_url"] == "/messages/json-1"
    assert answer.headers["Location"] == "/messages/json-1"
    assert spooled(workdir) == [{"uuid_ref": "json-1", "data_location": location, "metadata": {"owner": "ann"}}]

    process_spool(api)
    assert status(client, "json-1")["status"] == "DONE"
    data = client.get("/messages/json-1/data", headers=AUTH)
    assert data.status_code == 200
    assert data.data == (workdir / "data" / location).read_bytes()
    assert data.headers["Content-Type"].startswith("text/plain")
    assert data.headers["Content-Length"] == str(len(data.data))
    assert data.headers["ETag"] == f'"{hashlib.sha256(data.data).hexdigest()}"'


def test_a_json_message_without_a_uuid_gets_one(client: FlaskClient, workdir: Path) -> None:
    answer = client.post("/messages", headers=AUTH, json={"data_location": "x.txt"})
    assert answer.status_code == 202
    uuid = answer.get_json()["uuid"]
    assert len(uuid) == 36
    assert spooled(workdir) == [{"data_location": "x.txt", "uuid_ref": uuid}]


def test_an_uploaded_pdf_is_stored_processed_and_served_back_whole_and_by_range(
        api: SqapiFlask, client: FlaskClient, workdir: Path) -> None:
    answer = upload(client, metadata=json.dumps({"owner": "bob"}), uuid_ref="pdf-1")
    assert answer.status_code == 202, answer.get_data(as_text=True)
    assert answer.get_json()["data_location"] == "pdf-1/report.pdf"
    assert (workdir / "data" / "pdf-1" / "report.pdf").read_bytes() == PDF  # stored first, in the data store
    assert spooled(workdir) == [{"uuid_ref": "pdf-1", "metadata": {"owner": "bob"},
                                 "data_location": "pdf-1/report.pdf"}]

    process_spool(api)
    row = status(client, "pdf-1")
    assert row["status"] == "DONE", row
    assert row["data_type"] == "application/pdf"
    assert {p["plugin"]: p["status"] for p in row["plugins"]} == {"counter": "DONE", "pdf_extractor": "DONE"}

    data = client.get("/messages/pdf-1/data", headers=AUTH)
    assert data.status_code == 200
    assert hashlib.sha256(data.data).hexdigest() == hashlib.sha256(PDF).hexdigest() == row["hash_digest"]
    assert data.headers["Content-Type"] == "application/pdf"
    assert data.headers["Accept-Ranges"] == "bytes"
    part = client.get("/messages/pdf-1/data", headers={**AUTH, "Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.data == PDF[10:100]
    assert part.headers["Content-Range"] == f"bytes 10-99/{len(PDF)}"
    unchanged = client.get("/messages/pdf-1/data", headers={**AUTH, "If-None-Match": data.headers["ETag"]})
    assert unchanged.status_code == 304

    text = client.get("/pdf_extractor/pdf-1/text", headers=AUTH)
    assert text.status_code == 200
    assert "Page two: its text is extracted by pdf_extractor." in text.get_data(as_text=True)


def test_posting_the_same_upload_again_is_harmless(api: SqapiFlask, client: FlaskClient, workdir: Path) -> None:
    assert upload(client, uuid_ref="twice").status_code == 202
    assert upload(client, uuid_ref="twice").status_code == 202  # the same file at the same place: accepted
    assert len(spooled(workdir)) == 2
    process_spool(api)
    row = status(client, "twice")
    assert row["status"] == "DONE"
    assert [p["attempts"] for p in row["plugins"]] == [1, 1]  # the second delivery ran no plugin again
    other = upload(client, content=PDF + b"%changed", uuid_ref="twice")
    assert other.status_code == 409  # other content never overwrites what was stored
    assert "other content" in other.get_json()["details"]


def test_delete_publishes_the_delete_action(api: SqapiFlask, client: FlaskClient, workdir: Path) -> None:
    assert upload(client, uuid_ref="gone").status_code == 202
    process_spool(api)
    answer = client.delete("/messages/gone", headers=AUTH)
    assert answer.status_code == 202
    assert answer.get_json()["action"] == "delete"
    assert spooled(workdir) == [{"uuid_ref": "gone", "data_location": "gone/report.pdf", "action": "delete"}]
    process_spool(api)
    row = status(client, "gone")
    assert (row["status"], row["hash_digest"]) == ("DONE", "deleted")
    assert client.get("/messages/gone/data", headers=AUTH).status_code == 404


def test_data_of_an_unknown_uuid_is_404(client: FlaskClient) -> None:
    assert client.get("/messages/nobody/data", headers=AUTH).status_code == 404
    assert client.get("/messages/nobody/metadata", headers=AUTH).status_code == 404


def test_metadata_is_what_the_last_attempt_fetched_from_the_meta_store(
        api: SqapiFlask, client: FlaskClient, workdir: Path, write_data: Callable[[str, bytes | str], str]) -> None:
    location = write_data("m.txt", "hello")
    meta = write_data("m.meta.json", json.dumps({"owner": "cy", "tags": ["a"]}))
    assert client.post("/messages", headers=AUTH, json={"uuid_ref": "meta-1", "data_location": location,
                                                        "meta_location": meta}).status_code == 202
    assert client.get("/messages/meta-1/metadata", headers=AUTH).status_code == 404  # not processed yet
    process_spool(api)
    (workdir / "data" / meta).write_text(json.dumps({"owner": "changed later"}))
    answer = client.get("/messages/meta-1/metadata", headers=AUTH)
    assert answer.status_code == 200
    assert answer.get_json() == {"owner": "cy", "tags": ["a"]}  # recorded, not fetched again
    assert status(client, "meta-1")["metadata"] == {"owner": "cy", "tags": ["a"]}


def test_metadata_carried_by_an_upload_is_served_back(api: SqapiFlask, client: FlaskClient) -> None:
    assert upload(client, uuid_ref="meta-2", metadata=json.dumps({"owner": "dee", "n": 2})).status_code == 202
    process_spool(api)
    answer = client.get("/messages/meta-2/metadata", headers=AUTH)
    assert (answer.status_code, answer.get_json()) == (200, {"owner": "dee", "n": 2})
    listed = client.get("/messages", headers=AUTH).get_json()["messages"]
    assert [row for row in listed if "metadata" in row] == []  # pages stay small


def test_a_messages_table_made_before_the_metadata_column_gets_it(
        api: SqapiFlask, client: FlaskClient, write_data: Callable[[str, bytes | str], str]) -> None:
    database = api.sqapi.database
    database.execute_query("ALTER TABLE messages DROP COLUMN metadata")
    database.initialize_message_table()
    location = write_data("old.txt", "from before")
    assert client.post("/messages", headers=AUTH, json={"uuid_ref": "old-1", "data_location": location,
                                                        "metadata": {"k": "v"}}).status_code == 202
    process_spool(api)
    assert client.get("/messages/old-1/metadata", headers=AUTH).get_json() == {"k": "v"}


# -- refused --------------------------------------------------------------------------------------
def raw(body: bytes | str, content_type: str = "application/json") -> dict[str, Any]:
    return {"data": body, "content_type": content_type}


def multipart(**fields: Any) -> dict[str, Any]:
    """A multipart request; a field given as ``(bytes, name)`` is a file (a fresh stream at each use: see fresh())."""
    return {"data": fields, "content_type": "multipart/form-data"}


def fresh(request: dict[str, Any]) -> dict[str, Any]:
    """``request`` with a new stream for each file: the test client closes the ones it sent."""
    data = request["data"]
    if isinstance(data, dict):
        data = {k: (io.BytesIO(v[0]), v[1]) if isinstance(v, tuple) else v for k, v in data.items()}
    return {**request, "data": data}


MALFORMED: dict[str, tuple[dict[str, Any], int, str]] = {
    "not JSON": (raw(b"{not json"), 400, "not valid JSON"),
    "not UTF-8": (raw(b'{"uuid_ref": "\xff"}'), 400, "not valid JSON"),
    "JSON not an object": (raw(b'["uuid_ref", "data_location"]'), 422, "must be a JSON object"),
    "missing data_location": (raw(b'{"uuid_ref": "a"}'), 422, "missing required field: data_location"),
    "uuid an object": (raw(b'{"uuid_ref": {"a": 1}, "data_location": "x"}'), 422, "uuid_ref must be"),
    "data_location a number": (raw(b'{"uuid_ref": "a", "data_location": 5}'), 422, "data_location must be"),
    "metadata not an object": (raw(b'{"uuid_ref": "a", "data_location": "x", "metadata": [1]}'), 422,
                               "metadata must be a JSON object"),
    "unknown action": (raw(b'{"uuid_ref": "a", "data_location": "x", "action": "explode"}'), 422,
                       "action must be one of"),
    "body over the limit": (raw(json.dumps({"uuid_ref": "a", "data_location": "x" * 5000})), 413, ""),
    "wrong content type": (raw(b"uuid_ref=a", "application/x-www-form-urlencoded"), 415, "is not accepted"),
    "no content type": (raw(b'{"uuid_ref": "a", "data_location": "x"}', ""), 415, "is not accepted"),
    "multipart without file": (multipart(uuid_ref="a"), 400, "no data file"),
    "metadata not JSON": (multipart(file=(b"%PDF", "a.pdf"), metadata="{owner"), 400,
                          "'metadata' is not valid JSON"),
    "metadata JSON but no object": (multipart(file=(b"%PDF", "a.pdf"), metadata="[1]"), 422,
                                    "metadata must be a JSON object"),
    "upload escaping the data store": (multipart(file=(b"%PDF", "a.pdf"), data_location="../up.pdf"),
                                       422, "outside data_store.base_dir"),
    "upload over the limit": (multipart(file=(b"x" * 70_000, "big.bin")), 413, ""),
    # found by scripts/schemathesis.sh: each was a 500 or a 503 before
    "upload location too long for the file system": (
        multipart(file=(b"%PDF", "a.pdf"), data_location="a" * 300), 422, "File name too long"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_a_malformed_post_is_refused_with_its_reason_and_never_published(case: str, client: FlaskClient,
                                                                       workdir: Path) -> None:
    request, code, reason = MALFORMED[case]
    answer = client.post("/messages", headers=AUTH, **fresh(request))
    assert answer.status_code == code, answer.get_data(as_text=True)
    assert reason in answer.get_json()["details"]
    assert spooled(workdir) == []
    assert not (workdir / "up.pdf").exists()
    assert [p.name for p in (workdir / "data").iterdir()] == []  # nothing stored either


def test_without_the_token_nothing_is_published_or_served(client: FlaskClient, workdir: Path) -> None:
    assert client.post("/messages", json={"uuid_ref": "a", "data_location": "x"}).status_code == 401
    assert client.post("/messages", content_type="multipart/form-data",
                       data={"file": (io.BytesIO(PDF), "r.pdf")}).status_code == 401
    assert client.delete("/messages/a").status_code == 401
    assert client.get("/messages/a/data").status_code == 401
    assert client.get("/messages/a/metadata").status_code == 401
    assert spooled(workdir) == []
    assert [p.name for p in (workdir / "data").iterdir()] == []


@pytest.mark.parametrize(("api", "message"), [
    ({"max_upload_bytes": "lots"}, "api.max_upload_bytes: api.max_upload_bytes must be a size like 512MB"),
    ({"max_uplod_bytes": 3}, "api.max_uplod_bytes: unknown key. Fix: did you mean 'max_upload_bytes'?"),
])
def test_a_wrong_upload_limit_stops_startup_naming_the_key(api: dict[str, Any], message: str,
                                                           make_config: Callable[..., Any]) -> None:
    from sqapi.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        make_config({"api": api})
    assert message in str(refused.value)


def test_what_schemathesis_found_answers_as_documented(client: FlaskClient, workdir: Path) -> None:
    """Inputs scripts/schemathesis.sh found that answered 500, or 401 where 405 is due."""
    listed = client.get("/messages?before=*not-a-time", headers=AUTH)
    assert listed.status_code == 400 and "ISO 8601" in listed.get_json()["details"]
    assert client.get("/messages?before=2026-11-30T03:00:00", headers=AUTH).status_code == 200
    unnamed = client.post("/messages", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"},
                          data=b'--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n'
                               b'--b\r\nContent-Disposition: form-data; name="file"; filename="f.txt"\r\n\r\nhi\r\n'
                               b"--b--\r\n")
    assert unnamed.status_code == 202, unnamed.get_data(as_text=True)  # the nameless part is no field
    for token in ({}, AUTH):
        traced = client.open("/health", method="TRACE", headers=token)
        assert traced.status_code == 405 and "GET" in traced.headers["Allow"]


def test_an_uploaded_pdf_has_its_text_indexed_in_elasticsearch(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], es: Any, workdir: Path) -> None:
    """The whole journey: posted over HTTP, stored, published, processed, its text extracted and indexed (in
    the STAND-IN FOR ELASTICSEARCH of tests/plugins/es_standin.py), and its bytes served back."""
    from tests.plugins.conftest import es_settings

    write_plugin("counter", COUNTER)
    sqapi = make_app({**CONFIG, "active_plugins": ["pdf_extractor", "es_indexer"],
                      "custom": {"es_indexer": es_settings(es)}})
    api = create_app(sqapi)
    client = api.test_client()
    assert upload(client, uuid_ref="indexed-1", metadata=json.dumps({"owner": "ann"})).status_code == 202
    process_spool(api)
    row = status(client, "indexed-1")
    assert row["status"] == "DONE" and {p["plugin"] for p in row["plugins"]} == {"pdf_extractor", "es_indexer"}
    document = es.document("indexed-1")
    assert document is not None, es.indices
    assert "Page two: its text is extracted by pdf_extractor." in document["text"]
    served = client.get("/messages/indexed-1/data", headers=AUTH)
    assert hashlib.sha256(served.data).hexdigest() == hashlib.sha256(PDF).hexdigest()
