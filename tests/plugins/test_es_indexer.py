"""es_indexer against a stand-in for Elasticsearch (tests/plugins/es_standin.py), through the official client."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sqapi.app import Sqapi
from sqapi.errors import ConnectorError, PermanentError
from sqapi.testing import run_plugin
from tests.plugins.conftest import PLUGINS, es_settings
from tests.plugins.es_standin import ElasticsearchStandIn
from tests.test_runner import batch, body

PLUGIN = PLUGINS / "es_indexer"
EXTRACTED = {"pdf_extractor": {"pages": 2, "chars": 11, "text": "hello\fworld", "truncated": False}}


def config(es: ElasticsearchStandIn, **extra: Any) -> dict[str, Any]:
    return {"custom": {"es_indexer": es_settings(es, **extra)}}


def test_a_message_becomes_one_document_with_its_uuid_as_id_and_the_extracted_text(
        tmp_path: Path, es: ElasticsearchStandIn) -> None:
    run = run_plugin(PLUGIN, b"%PDF-1.4 ...", tmp_path, metadata={"owner": "ops"}, config=config(es),
                     results=EXTRACTED, uuid="u-1", type="application/pdf", body={"uuid_ref": "u-1", "x": 1})

    index = f"sqapi-{datetime.now(UTC):%Y.%m}"
    assert run.result == {"action": "index", "index": index, "id": "u-1", "result": "created"}
    document = es.indices[index]["u-1"]
    assert document["text"] == "hello\fworld" and document["pages"] == 2
    assert document["metadata"] == {"owner": "ops"}
    assert document["hash_digest"] == run.message.hash_digest and document["data_type"] == "application/pdf"
    assert document["message"] == {"uuid_ref": "u-1", "x": 1}


def test_a_redelivered_message_overwrites_its_document_in_the_index_it_first_went_to(
        tmp_path: Path, es: ElasticsearchStandIn) -> None:
    run_plugin(PLUGIN, b"one", tmp_path, config=config(es, index="docs-{data_type}"), uuid="u-2",
               type="text/plain")
    again = run_plugin(PLUGIN, b"two", tmp_path, config=config(es, index="docs-{data_type}"), uuid="u-2",
                       type="application/json")

    assert again.result["index"] == "docs-text-plain" and again.result["result"] == "updated"
    assert es.count() == 1


def test_a_message_asking_for_deletion_deletes_the_document(tmp_path: Path, es: ElasticsearchStandIn) -> None:
    run_plugin(PLUGIN, b"one", tmp_path, config=config(es), uuid="u-3")
    deleted = run_plugin(PLUGIN, b"one", tmp_path, config=config(es), uuid="u-3",
                         body={"uuid_ref": "u-3", "Action": "DELETE"})
    assert deleted.result["action"] == "delete" and deleted.result["result"] == "deleted"
    assert es.count() == 0


def test_deleting_a_document_of_unknown_index_searches_every_index_of_the_pattern(
        tmp_path: Path, es: ElasticsearchStandIn) -> None:
    es.indices["sqapi-2001.01"] = {"u-4": {"text": "old"}}
    deleted = run_plugin(PLUGIN, b"x", tmp_path, config=config(es), uuid="u-4", body={"action": "delete"})
    assert deleted.result["result"] == "deleted"
    assert ("POST", "/sqapi-*/_delete_by_query") in es.requests and es.count() == 0


def indexer_app(make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, **extra: Any) -> Sqapi:
    return make_app({"active_plugins": ["es_indexer"], "msg_broker": {"retry": {"max_attempts": 2}},
                     **config(es, **extra)})


def test_a_batch_of_messages_is_indexed_in_one_bulk_request(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, write_data: Callable[..., str]) -> None:
    app = indexer_app(make_app, es)
    location = write_data("a.txt", "x")
    outcomes = batch(app, [body(f"batch-{n}", location) for n in range(3)])
    assert [o.status for o in outcomes] == ["DONE"] * 3
    assert es.bulk_sizes == [3] and es.count() == 3  # one request for the batch, not one per message
    for n in range(3):
        [row] = app.database.get_plugin_rows(f"batch-{n}")
        assert json.loads(row["result"])["id"] == f"batch-{n}"


def test_a_batch_larger_than_batch_size_goes_in_several_bulk_requests(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, write_data: Callable[..., str]) -> None:
    app = indexer_app(make_app, es, batch_size=2)
    location = write_data("a.txt", "x")
    outcomes = batch(app, [body(f"big-{n}", location) for n in range(5)])
    assert [o.status for o in outcomes] == ["DONE"] * 5
    assert es.bulk_sizes == [2, 2, 1] and es.count() == 5


def test_a_document_refused_in_a_batch_fails_its_message_alone(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, write_data: Callable[..., str]) -> None:
    app = indexer_app(make_app, es)
    es.item_status["bad"] = [400]
    es.item_status["busy"] = [429, 503, 503]  # past max_retries: retried later, alone
    location = write_data("a.txt", "x")
    first, bad, busy, last = batch(app, [body(name, location) for name in ("first", "bad", "busy", "last")])
    assert (first.status, last.status) == ("DONE", "DONE")
    assert bad.status == "FAILED" and "refused document bad (400)" in (bad.reason or "")
    assert busy.status == "RETRY" and "answered 503 for document busy to every retry" in (busy.reason or "")
    assert es.bulk_sizes == [4, 1, 1] and es.count() == 2
    assert [r["uuid_ref"] for r in app.database.execute_query(
        "SELECT uuid_ref FROM es_documents ORDER BY uuid_ref")] == ["first", "last"]


def test_a_batch_mixing_deletions_and_documents_shares_one_request(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, write_data: Callable[..., str]) -> None:
    app = indexer_app(make_app, es)
    location = write_data("a.txt", "x")
    batch(app, [body("old", location)])
    outcomes = batch(app, [{**body("old", location), "action": "delete"}, body("new", location)])
    assert [o.status for o in outcomes] == ["DONE", "DONE"]
    assert es.bulk_sizes == [1, 2] and es.count() == 1
    assert [r["uuid_ref"] for r in app.database.execute_query("SELECT uuid_ref FROM es_documents")] == ["new"]


def test_429_and_5xx_answers_are_retried_with_backoff(tmp_path: Path, es: ElasticsearchStandIn) -> None:
    es.fail_next = [429, 503]
    run = run_plugin(PLUGIN, b"x", tmp_path, config=config(es), uuid="u-5")
    assert run.result["result"] == "created"
    assert len([r for r in es.requests if r[1] == "/_bulk"]) == 3 and es.bulk_sizes == [1]


def test_a_server_failing_every_retry_is_a_retryable_connector_error(tmp_path: Path, es: ElasticsearchStandIn) \
        -> None:
    es.fail_next = [503, 503, 503]
    with pytest.raises(ConnectorError, match="503"):
        run_plugin(PLUGIN, b"x", tmp_path, config=config(es), uuid="u-6")


def test_a_refused_document_is_a_permanent_failure(tmp_path: Path, es: ElasticsearchStandIn) -> None:
    es.item_status["u-7"] = [400]
    with pytest.raises(PermanentError, match="refused document u-7 \\(400\\)"):
        run_plugin(PLUGIN, b"x", tmp_path, config=config(es), uuid="u-7")


def test_a_bad_request_is_a_permanent_failure(tmp_path: Path, es: ElasticsearchStandIn) -> None:
    es.fail_next = [400]
    with pytest.raises(PermanentError, match="400"):
        run_plugin(PLUGIN, b"x", tmp_path, config=config(es), uuid="u-8")


def test_an_unreachable_elasticsearch_is_a_retryable_connector_error(tmp_path: Path) -> None:
    with pytest.raises(ConnectorError, match="unreachable"):
        run_plugin(PLUGIN, b"x", tmp_path, uuid="u-9",
                   config={"custom": {"es_indexer": {"hosts": "http://127.0.0.1:9", "backoff": 0.01,
                                                     "max_retries": 1}}})


def test_without_hosts_the_indexer_stays_unloaded_and_says_why(make_app: Callable[..., Sqapi]) -> None:
    app = make_app({"active_plugins": ["es_indexer"]})
    plugin = app.plugins.plugins["es_indexer"]
    assert plugin.state == "unloaded" and "custom.es_indexer.hosts" in (plugin.reason or "")


def test_the_client_is_made_once_by_setup_and_closed_by_teardown(
        tmp_path: Path, es: ElasticsearchStandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    import elasticsearch

    made: list[object] = []
    closed: list[object] = []
    real_init, real_close = elasticsearch.Elasticsearch.__init__, elasticsearch.Elasticsearch.close

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        real_init(self, *args, **kwargs)

    def close(self: Any) -> None:
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(elasticsearch.Elasticsearch, "__init__", init)
    monkeypatch.setattr(elasticsearch.Elasticsearch, "close", close)
    run = run_plugin(PLUGIN, b"x", tmp_path, config=config(es, request_timeout=7), uuid="u-9", type="text/plain")
    assert run.result["result"] == "created"
    assert len(made) == 1 and closed == made  # run_plugin runs setup and teardown around the call, as sqapi does
    assert not run.plugin.module._STATE  # type: ignore[union-attr]
