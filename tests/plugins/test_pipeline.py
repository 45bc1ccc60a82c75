"""The three built-in plugins together, through the processor (make_app(...).process)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from sqapi.app import Sqapi
from sqapi.core.outcome import Delivery
from tests.plugins.conftest import SECRET, es_settings, make_pdf, webhook_settings
from tests.plugins.es_standin import ElasticsearchStandIn
from tests.plugins.receiver import WebhookReceiver

PAGES = ["Quarterly report\nrevenue went up", "Second page: costs went down", "Third page: the end"]
THREE = ["pdf_extractor", "es_indexer", "webhook"]


@pytest.fixture
def pipeline(make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, receiver: WebhookReceiver) -> Sqapi:
    app = make_app({"active_plugins": THREE,
                    "custom": {"es_indexer": es_settings(es, index="docs-{data_type}"),
                               "webhook": webhook_settings(receiver, metadata_fields=["title"], max_retries=1)}})
    assert [p.name for p in app.plugins.active] == THREE
    return app


def message(write_data: Callable[[str, bytes], str], uuid: str, content: bytes) -> dict[str, Any]:
    return {"uuid_ref": uuid, "data_location": write_data(f"{uuid}.pdf", content),
            "metadata": {"title": "Q3", "internal": "no"}}


def plugin_rows(app: Sqapi, uuid: str) -> dict[str, dict[str, Any]]:
    return {row["plugin"]: row for row in app.database.get_plugin_rows(uuid)}


def test_a_pdf_goes_in_and_comes_out_extracted_indexed_and_notified(
        pipeline: Sqapi, write_data: Callable[[str, bytes], str], es: ElasticsearchStandIn,
        receiver: WebhookReceiver) -> None:
    outcome = pipeline.process(message(write_data, "pdf-1", make_pdf.build_pdf(PAGES)), Delivery("d1", 1))

    assert outcome.status == "DONE"
    extracted = json.loads(plugin_rows(pipeline, "pdf-1")["pdf_extractor"]["result"])
    assert extracted["pages"] == 3 and extracted["text"].split("\f") == PAGES
    document = es.indices["docs-application-pdf"]["pdf-1"]
    assert document["text"] == extracted["text"] and document["pages"] == 3
    assert len(receiver.received) == 1
    got = receiver.received[0]
    import standardwebhooks

    standardwebhooks.Webhook(SECRET.encode()).verify(got.body, got.headers)  # raises unless signed with SECRET
    payload = json.loads(got.body)
    assert payload["plugins"] == {"pdf_extractor": {"status": "DONE", "info": None},
                                  "es_indexer": {"status": "DONE", "info": None}}
    assert payload["metadata"] == {"title": "Q3"} and payload["data_type"] == "application/pdf"


BROKEN = {
    "encrypted": (make_pdf.build_encrypted_pdf(), "encrypted PDF"),
    "truncated": (make_pdf.build_pdf(PAGES)[:400], "truncated PDF"),
    "not a pdf": (b"just text, labelled application/pdf\n" * 40, "not a PDF"),
    "image only": (make_pdf.build_image_only_pdf(), "no text layer"),
    "bomb": (make_pdf.build_bomb_pdf(24 << 20), "decompression bomb"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_pdf_fails_the_extractor_with_its_reason_and_the_webhook_reports_it(
        make_app: Callable[..., Sqapi], write_data: Callable[[str, bytes], str], es: ElasticsearchStandIn,
        receiver: WebhookReceiver, kind: str) -> None:
    app = make_app({"active_plugins": THREE,
                    "custom": {"pdf_extractor": {"max_inflated_bytes": 8 << 20}, "es_indexer": es_settings(es),
                               "webhook": webhook_settings(receiver)}})
    content, reason = BROKEN[kind]
    raw = {"uuid_ref": "bad-1", "data_location": write_data("bad.pdf", content), "data_type": "application/pdf"}

    outcome = app.process(raw, Delivery("d1", 1))

    assert outcome.status == "FAILED" and outcome.plugin == "pdf_extractor"
    rows = plugin_rows(app, "bad-1")
    assert rows["pdf_extractor"]["status"] == "FAILED" and reason in rows["pdf_extractor"]["info"]
    assert rows["webhook"]["status"] == "DONE"
    reported = json.loads(receiver.received[0].body)["plugins"]["pdf_extractor"]
    assert reported["status"] == "FAILED" and reason in reported["info"]


def test_a_message_delivered_twice_is_indexed_once_and_notified_once(
        pipeline: Sqapi, write_data: Callable[[str, bytes], str], es: ElasticsearchStandIn,
        receiver: WebhookReceiver) -> None:
    raw = message(write_data, "pdf-2", make_pdf.build_pdf(PAGES))
    first = pipeline.process(raw, Delivery("d1", 1))
    second = pipeline.process(raw, Delivery("d2", 1))

    assert first.status == second.status == "DONE" and second.skipped
    assert es.count() == 1 and len(receiver.received) == 1


def test_a_notification_that_failed_is_sent_again_with_the_same_delivery_id_and_nothing_else_reruns(
        pipeline: Sqapi, write_data: Callable[[str, bytes], str], es: ElasticsearchStandIn,
        receiver: WebhookReceiver) -> None:
    raw = message(write_data, "pdf-3", make_pdf.build_pdf(PAGES))
    receiver.statuses = [503, 503]  # both attempts of the first delivery
    first = pipeline.process(raw, Delivery("d1", 1))
    assert first.status == "RETRY" and first.plugin == "webhook"
    bulks = len(es.bulk_sizes)

    second = pipeline.process(raw, Delivery("d1", 2))

    assert second.status == "DONE"
    assert len(es.bulk_sizes) == bulks  # the indexer finished the first time: not run again
    assert len(receiver.received) == 3
    assert len({r.headers["x-sqapi-delivery"] for r in receiver.received}) == 1


def test_a_plugin_after_star_runs_after_every_other_plugin(make_app: Callable[..., Sqapi],
                                                           write_plugin: Callable[..., Any],
                                                           receiver: WebhookReceiver) -> None:
    write_plugin("zz_last_by_name", "def execute(config, database, message, metadata, data):\n    return {}\n")
    app = make_app({"active_plugins": ["webhook", "zz_last_by_name", "pdf_extractor"],
                    "custom": {"webhook": webhook_settings(receiver)}})
    assert [p.name for p in app.plugins.active] == ["pdf_extractor", "zz_last_by_name", "webhook"]


def test_a_delete_message_removes_the_indexed_document_without_fetching_data_and_the_pdf_can_come_back(
        pipeline: Sqapi, write_data: Callable[[str, bytes], str], es: ElasticsearchStandIn,
        receiver: WebhookReceiver, workdir: Any) -> None:
    raw = message(write_data, "pdf-del", make_pdf.build_pdf(PAGES))
    assert pipeline.process(raw, Delivery("d1", 1)).status == "DONE"
    assert es.count() == 1
    (workdir / "data" / "pdf-del.pdf").unlink()  # the object is gone: a deletion must not need it

    deleted = pipeline.process({**raw, "action": "delete"}, Delivery("d2", 1))

    assert (deleted.status, deleted.reason) == ("DONE", "deleted")
    assert es.count() == 0
    rows = plugin_rows(pipeline, "pdf-del")
    assert rows["pdf_extractor"]["attempts"] == 1  # not run for the deletion
    assert rows["es_indexer"]["attempts"] == 2 and json.loads(rows["es_indexer"]["result"])["action"] == "delete"
    assert len(receiver.received) == 2
    again = message(write_data, "pdf-del", make_pdf.build_pdf(PAGES))
    back = pipeline.process(again, Delivery("d3", 1))
    assert back.status == "DONE" and not back.skipped and es.count() == 1


def test_the_webhook_waits_while_the_indexer_will_be_retried_and_reports_the_final_outcome(
        pipeline: Sqapi, write_data: Callable[[str, bytes], str], es: ElasticsearchStandIn,
        receiver: WebhookReceiver) -> None:
    raw = message(write_data, "pdf-wait", make_pdf.build_pdf(PAGES))
    es.fail_next = [503, 503, 503]  # every try of the indexer's first attempt

    first = pipeline.process(raw, Delivery("d1", 1))

    assert first.status == "RETRY" and first.plugin == "es_indexer"
    rows = plugin_rows(pipeline, "pdf-wait")
    assert rows["webhook"]["status"] == "RETRY" and "waits for es_indexer" in rows["webhook"]["info"]
    assert receiver.received == []
    second = pipeline.process(raw, Delivery("d1", 2))
    assert second.status == "DONE"
    assert len(receiver.received) == 1
    assert json.loads(receiver.received[0].body)["plugins"]["es_indexer"]["status"] == "DONE"


def test_on_the_last_attempt_the_webhook_reports_the_failure_it_would_otherwise_wait_for(
        make_app: Callable[..., Sqapi], write_data: Callable[[str, bytes], str], es: ElasticsearchStandIn,
        receiver: WebhookReceiver) -> None:
    app = make_app({"active_plugins": THREE, "msg_broker": {"retry": {"max_attempts": 1}},
                    "custom": {"es_indexer": es_settings(es), "webhook": webhook_settings(receiver)}})
    es.fail_next = [503, 503, 503]
    outcome = app.process(message(write_data, "pdf-last", make_pdf.build_pdf(PAGES)), Delivery("d1", 1))
    assert outcome.status == "FAILED" and outcome.plugin == "es_indexer"
    reported = json.loads(receiver.received[0].body)["plugins"]["es_indexer"]
    assert reported["status"] == "FAILED"
