"""The ``elasticsearch`` database type against the stand-in for Elasticsearch (tests/plugins/es_standin.py),
through the official client."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sqapi.connectors.db.elasticsearch import Database, DocumentError, validate_config
from sqapi.errors import ConfigError, ConnectorError, PermanentError
from tests.plugins.es_standin import ElasticsearchStandIn

PASSWORD = "elastic-pass-6f1d"


@pytest.fixture
def db(es: ElasticsearchStandIn) -> Iterator[Database]:
    database = Database({"type": "elasticsearch", "connection": es.url})
    yield database
    database.close()


def port_of(es: ElasticsearchStandIn) -> str:
    return es.url.rsplit(":", 1)[1]


def sqapi_connection(port: str, password: str = PASSWORD) -> dict[str, Any]:
    """A plugin's database section as sqAPI's config.yml wrote it (the port a string)."""
    return {"type": "elasticsearch", "kwargs": {},
            "connection": [{"name": "elasticsearch", "port": port, "user": "elasticuser", "host": "127.0.0.1",
                            "password": password, "timeout": 2}]}


def a_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- documents -----------------------------------------------------------------------------------

def test_a_document_created_is_fetched_by_a_match_query(es: ElasticsearchStandIn, db: Database) -> None:
    doc_id = db.create_document("docs", {"title": "hello world", "owner": "ops"})
    db.create_document("docs", {"title": "something else", "owner": "dev"})

    hits = db.fetch_document("docs", {"title": "hello"})

    assert es.indices["docs"][doc_id] == {"title": "hello world", "owner": "ops"}
    assert [(hit["_id"], hit["_index"], hit["_source"]) for hit in hits] == \
        [(doc_id, "docs", {"title": "hello world", "owner": "ops"})]
    assert es.seen[-1]["body"] == {"query": {"match": {"title": "hello"}}}


def test_fetch_document_uses_the_query_clause_it_is_given(es: ElasticsearchStandIn, db: Database) -> None:
    db.create_document("docs", {"owner": "ops team"}, id="a")
    db.create_document("docs", {"owner": "ops"}, id="b")
    hits = db.fetch_document("docs", {"owner": "ops"}, query_clause="term")
    assert [hit["_id"] for hit in hits] == ["b"]


def test_a_document_created_with_an_id_is_read_back_deleted_and_then_gone(db: Database) -> None:
    assert db.create_document("docs", {"n": 1}, id="u-1") == "u-1"
    assert db.get_document("docs", "u-1") == {"n": 1}
    assert db.delete_document("docs", "u-1") is True
    assert db.get_document("docs", "u-1") is None
    assert db.delete_document("docs", "u-1") is False


def test_creating_again_with_the_same_id_replaces_the_document(es: ElasticsearchStandIn, db: Database) -> None:
    db.create_document("docs", {"n": 1}, id="u-2")
    db.create_document("docs", {"n": 2}, id="u-2")
    assert es.indices["docs"] == {"u-2": {"n": 2}}


def test_refresh_asks_elasticsearch_to_make_the_document_searchable_at_once(
        es: ElasticsearchStandIn, db: Database) -> None:
    db.create_document("docs", {"n": 1}, refresh=True)
    assert es.seen[-1]["method"] == "POST" and es.seen[-1]["path"] == "/docs/_doc"
    assert es.seen[-1]["params"].get("refresh") == "true"
    db.create_document("docs", {"n": 2})
    assert "refresh" not in es.seen[-1]["params"]


def test_kind_create_refuses_an_existing_id_as_a_document_error(es: ElasticsearchStandIn, db: Database) -> None:
    db.create_document("docs", {"n": 1}, kind="_create", id="u-3")
    with pytest.raises(DocumentError, match=r"create_document on index docs \(409\)") as raised:
        db.create_document("docs", {"n": 2}, kind="_create", id="u-3")
    assert isinstance(raised.value, PermanentError)
    assert es.indices["docs"]["u-3"] == {"n": 1}


def test_an_old_document_type_is_indexed_as_doc_with_a_warning(
        es: ElasticsearchStandIn, db: Database, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        doc_id = db.create_document("docs", {"n": 1}, kind="article")
    assert es.indices["docs"][doc_id] == {"n": 1}
    assert "no document type 'article'" in caplog.text


# -- connection ----------------------------------------------------------------------------------

def test_a_sqapi_style_connection_list_sends_user_and_password_as_basic_auth(es: ElasticsearchStandIn) -> None:
    es.require_auth = basic("elasticuser", PASSWORD)
    database = Database(sqapi_connection(port_of(es)))
    database.initialize_database()
    database.create_document("docs", {"n": 1}, id="x")

    assert {seen["authorization"] for seen in es.seen} == {basic("elasticuser", PASSWORD)}
    assert es.indices["docs"]["x"] == {"n": 1}
    assert database.describe() == f"http://127.0.0.1:{port_of(es)} as elasticuser"
    database.close()


def test_credentials_in_a_url_go_as_basic_auth_and_never_into_describe(es: ElasticsearchStandIn) -> None:
    database = Database({"connection": f"http://reader:{PASSWORD}@127.0.0.1:{port_of(es)}"})
    database.ping()
    assert es.seen[-1]["authorization"] == basic("reader", PASSWORD)
    assert PASSWORD not in database.describe() and "reader" in database.describe()
    database.close()


def test_the_constructor_does_no_io(es: ElasticsearchStandIn) -> None:
    Database({"connection": es.url})
    Database({"connection": f"http://127.0.0.1:{a_closed_port()}"})
    assert es.seen == []


def test_an_unreachable_cluster_is_a_connector_error_naming_the_hosts_but_not_the_password(
        caplog: pytest.LogCaptureFixture) -> None:
    port = a_closed_port()
    database = Database(sqapi_connection(str(port)))
    with caplog.at_level(logging.DEBUG), pytest.raises(ConnectorError) as raised:
        database.initialize_database()
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "unreachable" in message
    assert PASSWORD not in message and PASSWORD not in caplog.text
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_refused_credentials_are_a_connector_error_without_the_password(es: ElasticsearchStandIn) -> None:
    es.require_auth = basic("elasticuser", "the-right-one")
    database = Database(sqapi_connection(port_of(es)))
    with pytest.raises(ConnectorError, match=r"refused the credentials \(401\)") as raised:
        database.create_document("docs", {"n": 1})
    assert PASSWORD not in str(raised.value) and "elasticuser" in str(raised.value)


def test_a_server_error_is_a_retryable_connector_error(es: ElasticsearchStandIn, db: Database) -> None:
    es.fail_next_request = [500]
    with pytest.raises(ConnectorError, match="answered 500 to fetch_document on index docs"):
        db.fetch_document("docs", {"n": 1})


def test_a_rejected_request_is_a_document_error_naming_the_operation_and_the_index(db: Database) -> None:
    with pytest.raises(DocumentError, match=r"fetch_document on index missing \(404\).*index_not_found"):
        db.fetch_document("missing", {"n": 1})
    db.create_document("docs", {"n": 1})
    with pytest.raises(DocumentError, match=r"fetch_document on index docs \(400\).*no_such_clause"):
        db.fetch_document("docs", {"n": 1}, query_clause="no_such_clause")


# -- queries and scripts ------------------------------------------------------------------------

def test_execute_query_fills_placeholders_with_json_values_and_returns_the_sources(
        es: ElasticsearchStandIn, db: Database) -> None:
    db.create_document("docs", {"owner": "ops", "n": 1}, id="a")
    db.create_document("docs", {"owner": "ops", "n": 2}, id="b")
    db.create_document("docs", {"owner": "dev", "n": 3}, id="c")

    rows = db.execute_query('{"index": "docs", "query": {"term": {"owner": %(owner)s}}, "size": %(size)s}',
                            owner="ops", size=1)

    assert es.seen[-1]["body"] == {"query": {"term": {"owner": "ops"}}, "size": 1}
    assert rows == [{"owner": "ops", "n": 1, "_id": "a", "_index": "docs"}]


def test_a_quoted_placeholder_is_replaced_as_a_whole_value(es: ElasticsearchStandIn, db: Database) -> None:
    db.create_document("docs", {"n": 7}, id="a")
    rows = db.execute_query('{"index": "docs", "query": {"term": {"n": "%(n)s"}}}', n=7)
    assert es.seen[-1]["body"] == {"query": {"term": {"n": 7}}}
    assert [row["_id"] for row in rows] == ["a"]


def test_a_value_trying_to_break_out_of_its_string_stays_one_string(es: ElasticsearchStandIn, db: Database) -> None:
    db.create_document("docs", {"owner": "ops"}, id="a")
    evil = 'ops"}}, "query": {"match_all": {}}, "x": {"y": "'

    rows = db.execute_query('{"index": "docs", "query": {"term": {"owner": %(owner)s}}}', owner=evil)

    assert es.seen[-1]["body"] == {"query": {"term": {"owner": evil}}}
    assert rows == []


def test_execute_query_takes_a_dict_whose_placeholder_strings_become_the_values(
        es: ElasticsearchStandIn, db: Database) -> None:
    db.create_document("docs", {"tags": ["a", "b"]}, id="x")
    rows = db.execute_query({"index": "docs", "query": {"ids": {"values": "%(ids)s"}}, "note": "%(ids)s!"},
                            ids=["x", "y"])
    assert es.seen[-1]["body"] == {"query": {"ids": {"values": ["x", "y"]}}, "note": "%(ids)s!"}
    assert rows == [{"tags": ["a", "b"], "_id": "x", "_index": "docs"}]


def test_a_placeholder_without_a_value_is_a_document_error_naming_it(es: ElasticsearchStandIn, db: Database) -> None:
    with pytest.raises(DocumentError, match=r"no value given for placeholder %\(owner\)s"):
        db.execute_query('{"index": "docs", "query": {"term": {"owner": %(owner)s}}}')
    assert es.seen == []


def test_a_placeholder_inside_a_longer_string_is_refused_as_invalid_json(db: Database) -> None:
    with pytest.raises(DocumentError, match="not valid JSON once its placeholders are filled"):
        db.execute_query('{"index": "docs", "query": {"term": {"owner": "team-%(owner)s"}}}', owner="ops")


def test_execute_script_runs_a_json_file_and_reads_it_again_once_it_changes(
        es: ElasticsearchStandIn, db: Database, tmp_path: Path) -> None:
    db.create_document("docs", {"owner": "ops"}, id="a")
    db.create_document("docs", {"owner": "dev"}, id="b")
    script = tmp_path / "by_owner.json"
    script.write_text('{"index": "docs", "query": {"term": {"owner": %(owner)s}}}', encoding="utf-8")
    assert [row["_id"] for row in db.execute_script(str(script), owner="ops")] == ["a"]

    script.write_text('{"index": "docs", "query": {"match_all": {}}}', encoding="utf-8")
    stat = script.stat()
    os.utime(script, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert sorted(row["_id"] for row in db.execute_script(str(script), owner="ops")) == ["a", "b"]


def test_a_missing_script_is_an_error_naming_its_path(es: ElasticsearchStandIn, db: Database, tmp_path: Path) -> None:
    missing = tmp_path / "scripts" / "nothing.json"
    with pytest.raises(ConfigError, match="nothing.json") as raised:
        db.execute_script(str(missing))
    assert str(missing) in str(raised.value)
    assert es.seen == []


def test_initialize_database_runs_a_json_init_script_and_can_run_it_again(
        es: ElasticsearchStandIn, tmp_path: Path) -> None:
    script = tmp_path / "init.json"
    mappings = {"properties": {"owner": {"type": "keyword"}}}
    script.write_text(json.dumps([{"method": "PUT", "path": "/docs", "body": {"mappings": mappings},
                                   "ignore": ["resource_already_exists_exception"]}]), encoding="utf-8")
    database = Database({"connection": es.url, "init": str(script)})
    database.initialize_database()
    database.initialize_database()

    assert es.mappings == {"docs": mappings}
    assert [(seen["method"], seen["path"]) for seen in es.seen] == [("GET", "/"), ("PUT", "/docs")] * 2
    database.close()


def test_an_sql_init_script_is_left_alone(es: ElasticsearchStandIn, tmp_path: Path) -> None:
    script = tmp_path / "init.sql"
    script.write_text("CREATE TABLE x (y TEXT);", encoding="utf-8")
    database = Database({"connection": es.url, "scripts": {"init": str(script)}})
    database.initialize_database()
    assert [(seen["method"], seen["path"]) for seen in es.seen] == [("GET", "/")]


def test_elasticsearch_cannot_be_the_status_database(db: Database) -> None:
    with pytest.raises(ConfigError, match="cannot be sqapi's status database.*postgres"):
        db.initialize_message_table()


# -- configuration --------------------------------------------------------------------------------

@pytest.mark.parametrize(("section", "described"), [
    ({}, "http://localhost:9200"),
    ({"connection": "es.example:9201"}, "http://es.example:9201"),
    ({"connection": "https://es.example"}, "https://es.example:9200"),
    ({"connection": {"host": "es", "port": "9300", "scheme": "https"}}, "https://es:9300"),
    ({"connection": ["http://a:9200", "http://b:9200"]}, "http://a:9200, http://b:9200"),
    ({"hosts": ["http://a:9200"]}, "http://a:9200"),
    ({"connection": [{"host": "a", "user": "u", "password": PASSWORD}, {"host": "b", "user": "u",
                                                                         "password": PASSWORD}]},
     "http://a:9200, http://b:9200 as u"),
    ({"connection": "http://u:p%40ss@es:9200/prefix/"}, "http://es:9200/prefix as u"),
])
def test_every_connection_shape_is_accepted(section: dict[str, Any], described: str) -> None:
    validate_config(section)
    assert Database(section).describe() == described


@pytest.mark.parametrize(("section", "key"), [
    ({"connection": 42}, "database.connection"),
    ({"connection": [42]}, "database.connection[0]"),
    ({"connection": [{"port": 9200}]}, "database.connection[0].host"),
    ({"connection": [{"host": "es", "port": "ninety"}]}, "database.connection[0].port"),
    ({"connection": {"host": "es", "port": True}}, "database.connection.port"),
    ({"connection": {"host": "es", "scheme": "ftp"}}, "database.connection.scheme"),
    ({"connection": {"host": "es", "pasword": "x"}}, "database.connection.pasword"),
    ({"connection": {"host": "es", "password": "x"}}, "database.connection.password"),
    ({"connection": {"host": "es", "timeout": "soon"}}, "database.connection.timeout"),
    ({"connection": "ftp://es:21"}, "database.connection"),
    ({"connection": [{"host": "a", "user": "u", "password": "1"}, {"host": "b", "user": "u", "password": "2"}]},
     "database.connection"),
    ({"hosts": 5}, "database.hosts"),
    ({"hosts": ["http://a:9200"], "connection": "http://b:9200"}, "database.hosts"),
    ({"kwargs": ["sniff_on_start"]}, "database.kwargs"),
    ({"kwargs": {"sniff_on_strat": True}}, "database.kwargs.sniff_on_strat"),
    ({"kwargs": {"hosts": ["http://a:9200"]}}, "database.kwargs.hosts"),
    ({"connection": {"host": "es", "user": "u"}, "kwargs": {"api_key": "k"}}, "database.kwargs.api_key"),
])
def test_validate_config_rejects_a_bad_shape_naming_the_key(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        validate_config(section)
    assert raised.value.key == key


def test_an_unknown_client_keyword_is_named_with_the_likely_one() -> None:
    with pytest.raises(ConfigError, match="did you mean sniff_on_start"):
        validate_config({"kwargs": {"sniff_on_strat": True}})


def test_client_keywords_reach_the_client() -> None:
    database = Database({"connection": "http://es:9200", "kwargs": {"max_retries": 7, "retry_on_timeout": True}})
    database.connect()
    assert database._client is not None
    assert database._client._max_retries == 7 and database._client._retry_on_timeout is True
    database.close()


def test_a_password_in_a_bad_url_stays_out_of_the_error() -> None:
    with pytest.raises(ConfigError) as raised:
        validate_config({"connection": f"http://u:{PASSWORD}@es:99999"})
    assert raised.value.key == "database.connection" and PASSWORD not in str(raised.value)
