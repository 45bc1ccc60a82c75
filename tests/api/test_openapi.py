"""/openapi.json: an OpenAPI 3.1 document naming every route the app serves, whose schemas real answers match."""

from __future__ import annotations

import io
from typing import Any

import jsonschema
import pytest
from flask.testing import FlaskClient

from sqapi.api.openapi import openapi_path

from .conftest import Processed


@pytest.fixture
def document(processed: Processed) -> dict[str, Any]:
    answer = processed.client.get("/openapi.json")
    assert answer.status_code == 200
    return dict(answer.get_json())


def test_the_document_is_openapi_3_1_with_valid_json_schemas(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "sqapi"
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)  # raises, naming the fault
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert method in ("get", "post", "put", "patch", "delete"), (path, method)
            assert operation["responses"], (path, method)
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == {part[1:-1] for part in path.split("/") if part.startswith("{")}, (path, method)


def test_every_rule_the_app_serves_is_in_the_document(processed: Processed, document: dict[str, Any]) -> None:
    for rule in processed.app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        item = document["paths"].get(openapi_path(rule.rule))
        assert item is not None, rule.rule
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert method.lower() in item, (rule.rule, method)
    echo = document["paths"]["/echo"]["post"]
    assert echo["tags"] == ["echo"]
    assert "plugin echo" in echo["summary"]


def check_answer(document: dict[str, Any], client: FlaskClient, method: str, path: str, template: str,
                 expected: int, **request: Any) -> None:
    """Call ``path``; its status is ``expected`` and documented for ``template``, and its JSON matches the schema."""
    answer = client.open(path, method=method, **request)
    assert answer.status_code == expected, (method, path, answer.get_data(as_text=True))
    responses = document["paths"][template][method.lower()]["responses"]
    assert str(expected) in responses, (method, template, expected)
    content = responses[str(expected)].get("content", {})
    if "application/json" in content:
        schema = {"allOf": [content["application/json"]["schema"]], "components": document["components"]}
        jsonschema.validate(answer.get_json(), schema, cls=jsonschema.Draft202012Validator)
    else:
        assert not answer.is_json or not content, (method, path)


def test_real_answers_match_their_documented_schemas(processed: Processed, document: dict[str, Any],
                                                     write_data: Any) -> None:
    client = processed.client
    done = processed.uuid_with("DONE")
    location = write_data("openapi.txt", "documented")
    cases: list[tuple[str, str, str, int, dict[str, Any]]] = [
        ("GET", "/health", "/health", 200, {}),
        ("GET", "/plugins", "/plugins", 200, {}),
        ("GET", "/rules", "/rules", 200, {}),
        ("GET", "/messages?limit=2", "/messages", 200, {}),
        ("GET", "/messages?limit=0", "/messages", 400, {}),
        ("GET", f"/messages/{done}", "/messages/{uuid}", 200, {}),
        ("GET", "/messages/nobody", "/messages/{uuid}", 404, {}),
        ("GET", f"/messages/{done}/data", "/messages/{uuid}/data", 200, {}),
        ("GET", "/messages/nobody/data", "/messages/{uuid}/data", 404, {}),
        ("GET", f"/messages/{done}/metadata", "/messages/{uuid}/metadata", 404, {}),
        ("POST", "/messages", "/messages", 202, {"json": {"data_location": location}}),
        ("POST", "/messages", "/messages", 202,
         {"content_type": "multipart/form-data", "data": {"file": (io.BytesIO(b"up"), "up.txt")}}),
        ("POST", "/messages", "/messages", 400, {"data": b"{", "content_type": "application/json"}),
        ("POST", "/messages", "/messages", 415, {"data": b"x", "content_type": "text/csv"}),
        ("POST", "/messages", "/messages", 422, {"json": {"uuid_ref": [1], "data_location": "x"}}),
        ("DELETE", f"/messages/{done}", "/messages/{uuid}", 202, {}),
        ("GET", "/metrics", "/metrics", 200, {}),
        ("GET", "/openapi.json", "/openapi.json", 200, {}),
        ("GET", "/", "/", 200, {}),
        ("GET", "/?status=nope", "/", 400, {}),
        ("GET", "/dashboard/state?status=FAILED", "/dashboard/state", 200, {}),
        ("GET", "/dashboard/state?since=yesterday", "/dashboard/state", 400, {}),
        ("GET", f"/dashboard/messages/{done}", "/dashboard/messages/{uuid}", 200, {}),
        ("GET", "/dashboard/messages/nobody", "/dashboard/messages/{uuid}", 404, {}),
        ("GET", "/login", "/login", 200, {}),
    ]
    for method, path, template, expected, request in cases:
        check_answer(document, client, method, path, template, expected, **request)


def test_the_rendered_page_shows_every_operation_of_the_document(processed: Processed,
                                                                 document: dict[str, Any]) -> None:
    page = processed.client.get("/openapi")
    assert page.status_code == 200 and page.content_type.startswith("text/html")
    html = page.get_data(as_text=True)
    operations = [op for item in document["paths"].values() for op in item.values()]
    assert len(operations) > 10
    missing = [op["operationId"] for op in operations if f'id="{op["operationId"]}"' not in html]
    assert missing == []
    assert 'href="/openapi.json"' in html and "<script" not in html
