"""es_indexer's index template (``mappings``) and document shape (``fields``), and ``sqapi es apply-template``,
against the STAND-IN for Elasticsearch (tests/plugins/es_standin.py), through the app's processor."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sqapi.app import Sqapi
from tests.plugins.conftest import es_settings
from tests.plugins.es_standin import ElasticsearchStandIn
from tests.test_cli import sqapi
from tests.test_runner import batch, body

MAPPINGS = {"properties": {"name": {"type": "text", "analyzer": "folding"}, "size": {"type": "long"},
                           "full_text": {"type": "text"}, "uuid": {"type": "keyword"}}}
SETTINGS = {"analysis": {"analyzer": {"folding": {"type": "custom", "tokenizer": "standard",
                                                  "filter": ["lowercase", "asciifolding"]}}}}
INDEX = f"sqapi-{datetime.now(UTC):%Y.%m}"


def indexer_config(es: ElasticsearchStandIn, **extra: Any) -> dict[str, Any]:
    return {"active_plugins": ["es_indexer"], "msg_broker": {"retry": {"max_attempts": 2}},
            "custom": {"es_indexer": es_settings(es, **extra)}}


def bodies_sent(es: ElasticsearchStandIn, method: str, path: str) -> list[Any]:
    return [r["body"] for r in es.seen if (r["method"], r["path"]) == (method, path)]


# -- the index template ------------------------------------------------------------------------------------------

def test_the_declared_mappings_and_analyzers_are_installed_as_an_index_template_before_any_document(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, write_data: Callable[..., str]) -> None:
    app = make_app(indexer_config(es, mappings={"mappings": MAPPINGS, "settings": SETTINGS}))
    [outcome] = batch(app, [body("t-1", write_data("a.txt", "x"))])

    assert outcome.status == "DONE"
    assert bodies_sent(es, "PUT", "/_index_template/sqapi") == [{
        "index_patterns": ["sqapi-*"], "priority": 200, "template": {"mappings": MAPPINGS, "settings": SETTINGS},
        "_meta": {"managed_by": "sqapi es_indexer"}}]
    paths = [path for _, path in es.requests]
    assert paths.index("/_index_template/sqapi") < paths.index("/_bulk")
    assert es.mappings[INDEX] == MAPPINGS  # the new index took the template's mappings


def test_mappings_from_a_json_file_cover_the_configured_index_pattern(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, write_data: Callable[..., str],
        workdir: Path) -> None:
    (workdir / "mapping.json").write_text(json.dumps(MAPPINGS | {"dynamic": "strict"}), encoding="utf-8")
    app = make_app(indexer_config(es, mappings=str(workdir / "mapping.json"), index="docs-{data_type}",
                                  template_name="docs", template_priority=300))
    batch(app, [body("t-2", write_data("a.txt", "x"))])

    [sent] = bodies_sent(es, "PUT", "/_index_template/docs")
    assert sent["index_patterns"] == ["docs-*"] and sent["priority"] == 300
    assert sent["template"] == {"mappings": MAPPINGS | {"dynamic": "strict"}}


def test_without_mappings_no_template_is_sent(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, write_data: Callable[..., str]) -> None:
    app = make_app(indexer_config(es))
    assert batch(app, [body("t-3", write_data("a.txt", "x"))])[0].status == "DONE"
    assert not [r for r in es.requests if r[1].startswith("/_index_template")] and not es.templates


def test_a_template_elasticsearch_refuses_indexes_nothing_and_the_message_says_why(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, write_data: Callable[..., str]) -> None:
    app = make_app(indexer_config(es, mappings={"properties": {"size": {"type": "lonk"}}}))
    [outcome] = batch(app, [body("t-4", write_data("a.txt", "x"))])

    assert outcome.status in ("RETRY", "FAILED")
    assert "refused index template 'sqapi' (400)" in (outcome.reason or "")
    assert "No handler for type [lonk] declared on field [size]" in (outcome.reason or "")
    assert es.count() == 0 and ("POST", "/_bulk") not in es.requests


# -- the document's shape ------------------------------------------------------------------------------------------

def test_fields_rename_flatten_drop_and_copy_metadata_into_full_text(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, write_data: Callable[..., str]) -> None:
    fields = {"title": "name",                                   # rename
              "author.name": "author",                           # flatten a nested key
              "owner.id": "metadata.owner_id",                   # flatten, kept under metadata
              "secret": {"drop": True},                          # drop
              "abstract": {"full_text": True},                   # kept, and copied into full_text
              "notes": {"drop": True, "full_text": True},        # only in full_text
              "tags": {"to": "labels", "full_text": True},       # moved, and copied
              "absent": {"to": "nowhere"}}                       # not in this message: nothing
    app = make_app(indexer_config(es, fields=fields))
    metadata = {"title": "Crème brûlée", "author": {"name": "Ann", "email": "ann@example.org"},
                "owner": {"id": 7}, "secret": "s3cr3t-value", "abstract": "about desserts",
                "notes": "see page 2", "tags": ["food", "french"], "other": 1}
    [outcome] = batch(app, [body("f-1", write_data("a.txt", "x"), **metadata)])

    assert outcome.status == "DONE"
    document = es.indices[INDEX]["f-1"]  # the source exactly as the bulk request carried it
    assert document["name"] == "Crème brûlée" and document["author"] == "Ann" and document["labels"] == [
        "food", "french"]
    assert document["metadata"] == {"author": {"email": "ann@example.org"}, "owner_id": 7,
                                    "abstract": "about desserts", "other": 1}
    assert document["full_text"] == "about desserts\nsee page 2\nfood\nfrench"
    assert "nowhere" not in document
    assert "s3cr3t-value" not in json.dumps(document)  # not in metadata, nor in the message body's copy of it
    assert document["message"] == {"uuid_ref": "f-1", "data_location": "a.txt"}


def test_without_fields_the_document_keeps_its_shape(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, write_data: Callable[..., str]) -> None:
    app = make_app(indexer_config(es))
    batch(app, [body("f-2", write_data("a.txt", "x"), title="T", author={"name": "Ann"})])
    document = es.indices[INDEX]["f-2"]
    assert document["metadata"] == {"title": "T", "author": {"name": "Ann"}} and "full_text" not in document
    assert document["message"]["metadata"] == {"title": "T", "author": {"name": "Ann"}}


def test_a_document_that_does_not_fit_the_mapping_fails_its_message_alone_with_elasticsearchs_reason(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, write_data: Callable[..., str]) -> None:
    app = make_app(indexer_config(es, mappings={"mappings": MAPPINGS, "settings": SETTINGS}, fields={"size": "size"}))
    location = write_data("a.txt", "x")
    first, bad, last = batch(app, [body("m-1", location, size=12), body("m-2", location, size="big"),
                                   body("m-3", location, size="34")])

    assert (first.status, last.status) == ("DONE", "DONE")
    assert bad.status == "FAILED"
    assert ("refused document m-2 (400): mapper_parsing_exception: failed to parse field [size] of type [long] in "
            "document with id 'm-2'. Preview of field's value: 'big'") in (bad.reason or "")
    assert sorted(es.indices[INDEX]) == ["m-1", "m-3"]
    [row] = [r for r in app.database.get_plugin_rows("m-2")]
    assert row["status"] == "FAILED" and "mapper_parsing_exception" in (row["info"] or row.get("reason") or "")


def test_a_strict_mapping_refuses_a_field_it_does_not_declare_and_dropping_it_fits(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, write_data: Callable[..., str]) -> None:
    strict = {"properties": {"metadata": {"type": "object", "dynamic": "strict",
                                          "properties": {"kept": {"type": "keyword"}}}}}
    location = write_data("a.txt", "x")
    app = make_app(indexer_config(es, mappings=strict))
    [refused] = batch(app, [body("s-1", location, kept="a", extra="b")])
    assert refused.status == "FAILED" and "strict_dynamic_mapping_exception" in (refused.reason or "")
    assert "dynamic introduction of [extra] within [metadata] is not allowed" in (refused.reason or "")

    dropping = make_app(indexer_config(es, mappings=strict, fields={"extra": {"drop": True}}))
    [fits] = batch(dropping, [body("s-2", location, kept="a", extra="b")])
    assert fits.status == "DONE" and es.indices[INDEX]["s-2"]["metadata"] == {"kept": "a"}


@pytest.mark.parametrize(("custom", "message"), [
    ({"fields": {"title": {"rename": "name"}}},
     "custom.es_indexer.fields.title: unknown option 'rename' (an entry may say to, drop, full_text)"),
    ({"fields": {"title": {"to": "name", "drop": True}}}, "custom.es_indexer.fields.title says both to and drop"),
    ({"fields": {"title": "uuid"}}, "custom.es_indexer.fields.title.to: 'uuid' is a field es_indexer writes itself"),
    ({"fields": {"a": "x", "b": "x"}}, "custom.es_indexer.fields.b.to: a already goes to 'x'"),
    ({"fields": {"title": {"full_text": "yes"}}}, "custom.es_indexer.fields.title.full_text must be true or false"),
    ({"fields": ["title"]}, "custom.es_indexer.fields must map metadata keys to document fields"),
    ({"mappings": ["size"]}, "custom.es_indexer.mappings must be an Elasticsearch mapping"),
    ({"mappings": {"mappings": {}, "properties": {}}}, "mixes template sections (mappings) with mapping keys"),
    ({"mappings": "no-such-mapping.json"}, "custom.es_indexer.mappings (no-such-mapping.json) cannot be read"),
])
def test_a_wrong_mappings_or_fields_fails_the_plugin_at_load_naming_the_key(
        make_app: Callable[..., Sqapi], es: ElasticsearchStandIn, custom: dict[str, Any], message: str) -> None:
    app = make_app(indexer_config(es, **custom))
    plugin = app.plugins.plugins["es_indexer"]
    assert plugin.state == "failed"
    assert "plugin 'es_indexer'" in (plugin.reason or "") and message in (plugin.reason or "")
    assert es.requests == []  # refused before anything was sent


# -- sqapi es apply-template -----------------------------------------------------------------------------------

def test_apply_template_sends_the_changed_template_and_exits_1_with_the_reason_when_refused(
        write_config: Callable[..., Path], es: ElasticsearchStandIn, workdir: Path) -> None:
    changed = {"properties": {**MAPPINGS["properties"], "size": {"type": "double"}}}
    (workdir / "mapping.json").write_text(json.dumps({"mappings": changed, "settings": SETTINGS}), encoding="utf-8")
    config = write_config(indexer_config(es, mappings=str(workdir / "mapping.json")))

    shown = sqapi("es", "apply-template", "--show", "-c", str(config), cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["template"]["mappings"] == changed and es.requests == []

    applied = sqapi("es", "apply-template", "-c", str(config), cwd=workdir)
    assert applied.returncode == 0, applied.stderr
    assert "index template 'sqapi' applied to sqapi-*" in applied.stdout
    assert bodies_sent(es, "PUT", "/_index_template/sqapi") == [{
        "index_patterns": ["sqapi-*"], "priority": 200, "template": {"mappings": changed, "settings": SETTINGS},
        "_meta": {"managed_by": "sqapi es_indexer"}}]
    assert es.templates["sqapi"]["template"]["mappings"]["properties"]["size"] == {"type": "double"}

    (workdir / "mapping.json").write_text(json.dumps({"properties": {"name": {"type": "text", "analyzer": "nope"}}}),
                                          encoding="utf-8")
    refused = sqapi("es", "apply-template", "-c", str(config), cwd=workdir)
    assert refused.returncode == 1
    assert "Elasticsearch refused index template 'sqapi' (400): mapper_parsing_exception: Failed to parse " \
           "mapping: analyzer [nope] has not been configured in mappings" in refused.stderr
    assert es.templates["sqapi"]["template"]["mappings"] == changed  # the refused one replaced nothing


def test_apply_template_without_mappings_or_an_active_indexer_says_what_to_set(
        write_config: Callable[..., Path], es: ElasticsearchStandIn, workdir: Path) -> None:
    no_mappings = sqapi("es", "apply-template", "-c", str(write_config(indexer_config(es))), cwd=workdir)
    assert no_mappings.returncode == 1 and "set custom.es_indexer.mappings" in no_mappings.stderr
    no_hosts = sqapi("es", "apply-template", "-c", str(write_config({"active_plugins": ["es_indexer"]}, "b.yml")),
                     cwd=workdir)
    assert no_hosts.returncode == 1 and "custom.es_indexer.hosts" in no_hosts.stderr
    assert es.requests == []
