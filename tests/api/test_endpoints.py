"""The core endpoints through Flask's test client, after real messages went through the processor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sqapi.api.app import create_app
from sqapi.app import Sqapi

from .conftest import BASE_CONFIG, Processed, process_samples


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def point_nowhere(database: Any, workdir: Path) -> None:
    """Make the status database unreachable: a server socket where none listens."""
    database.close()
    database.embedded = None
    database._params = {"host": str(workdir / "no-server-here"), "port": 5432, "user": "postgres",
                        "dbname": "postgres"}
    database.connect_attempts = 1


# -- /health --------------------------------------------------------------------------------------
def test_health_is_200_with_every_component_up(processed: Processed) -> None:
    answer = processed.client.get("/health")
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["status"] == "up" and body["down"] == []
    assert set(body["components"]) == {"database", "msg_broker", "data_store", "meta_store"}
    assert all(c["state"] == "up" for c in body["components"].values())
    assert body["components"]["database"]["type"] == "postgres"


def test_health_is_503_naming_the_database_when_it_is_down(processed: Processed, workdir: Path) -> None:
    point_nowhere(processed.sqapi.database, workdir)

    answer = processed.client.get("/health")

    assert answer.status_code == 503
    body = answer.get_json()
    assert body["status"] == "down"
    assert body["down"] == ["database"]
    assert body["components"]["database"]["state"] == "down"
    assert body["components"]["database"]["error"]
    assert body["components"]["data_store"]["state"] == "up"


def test_health_is_503_naming_the_broker_when_its_spool_cannot_be_used(
        plugin_folders: None, make_app: Callable[..., Sqapi], workdir: Path) -> None:
    (workdir / "blocked").write_text("a file, not a folder")
    sqapi = make_app({"msg_broker": {"directory": str(workdir / "blocked" / "spool")}})
    answer = create_app(sqapi).test_client().get("/health")
    assert answer.status_code == 503
    assert answer.get_json()["down"] == ["msg_broker"]


# -- /messages --------------------------------------------------------------------------------------
def test_failed_messages_are_listed_with_their_reason(processed: Processed) -> None:
    answer = processed.client.get("/messages?status=FAILED")
    assert answer.status_code == 200
    rows = answer.get_json()["messages"]
    assert [r["uuid"] for r in rows] == ["uuid-bad"]
    assert "plugin picky" in rows[0]["info"] and "starts with 'bad'" in rows[0]["info"]


def test_status_filter_is_case_insensitive_and_done_lists_the_good_ones(processed: Processed) -> None:
    rows = processed.client.get("/messages?status=done").get_json()["messages"]
    assert sorted(r["uuid"] for r in rows) == ["uuid-one", "uuid-two"]


def test_messages_can_be_filtered_by_plugin(processed: Processed) -> None:
    rows = processed.client.get("/messages?plugin=picky").get_json()["messages"]
    assert len(rows) == 3
    assert processed.client.get("/messages?plugin=nobody").get_json()["messages"] == []


def test_a_message_shows_which_plugin_failed_and_why(processed: Processed) -> None:
    answer = processed.client.get("/messages/uuid-bad")
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["status"] == "FAILED"
    assert body["failed_plugins"] == ["picky"]
    by_plugin = {p["plugin"]: p for p in body["plugins"]}
    assert by_plugin["picky"]["status"] == "FAILED"
    assert "ValueError" in by_plugin["picky"]["info"]
    assert by_plugin["counter"]["status"] == "DONE"
    assert by_plugin["counter"]["result"] == {"bytes": len("bad data")}


def test_an_unknown_message_is_404(processed: Processed) -> None:
    answer = processed.client.get("/messages/no-such-uuid")
    assert answer.status_code == 404
    assert "no-such-uuid" in answer.get_json()["details"]


def test_bad_filters_are_400_with_the_accepted_values(processed: Processed) -> None:
    answer = processed.client.get("/messages?status=LOST")
    assert answer.status_code == 400 and "FAILED" in answer.get_json()["details"]
    assert processed.client.get("/messages?limit=0").status_code == 400
    assert processed.client.get("/messages?limit=lots").status_code == 400


@pytest.mark.parametrize("path", ["/messages?plugin=%00", "/messages?status=DONE&x%00=1", "/messages/%00",
                                  "/messages/a%00b/data", "/messages/a%00b/metadata", "/dashboard/messages/a%00b"])
def test_a_nul_character_in_the_path_or_query_is_400_not_a_crash(processed: Processed, path: str) -> None:
    answer = processed.client.get(path)
    assert answer.status_code == 400 and "NUL character" in answer.get_json()["details"]
    assert processed.client.delete("/messages/a%00b").status_code == 400


def test_pages_cover_every_message_once_even_when_they_share_an_updated_at(
        processed: Processed, write_data: Callable[[str, bytes | str], str]) -> None:
    for n in range(4):
        location = write_data(f"more-{n}.txt", f"more {n}")
        processed.sqapi.process({"uuid_ref": f"uuid-more-{n}", "data_location": location}, _delivery(n))
    processed.sqapi.database.execute_query("UPDATE messages SET updated_at = %(t)s", t="2024-05-01T10:00:00.000+00:00")

    seen: list[str] = []
    url: str | None = "/messages?limit=2"
    while url:
        body = processed.client.get(url).get_json()
        seen += [row["uuid"] for row in body["messages"]]
        url = body["next"]
    assert len(seen) == len(set(seen)) == 7


def _delivery(n: int) -> Any:
    from sqapi.core.outcome import Delivery

    return Delivery(id=f"more-{n}")


# -- /plugins and /rules ------------------------------------------------------------------------------
def test_plugins_lists_a_plugin_that_failed_to_import_with_its_reason(processed: Processed) -> None:
    plugins = {p["name"]: p for p in processed.client.get("/plugins").get_json()}
    assert plugins["broken"]["status"] == "failed"
    assert "a_module_that_does_not_exist" in plugins["broken"]["error"]
    assert plugins["counter"]["status"] == "active" and plugins["counter"]["blueprints"] == []


def test_plugins_reports_a_broken_blueprint_and_still_serves_the_others(processed: Processed) -> None:
    echo = {p["name"]: p for p in processed.client.get("/plugins").get_json()}["echo"]
    assert echo["status"] == "active"
    assert len(echo["blueprint_errors"]) == 1
    assert "broken.py" in echo["blueprint_errors"][0] and "cannot be imported" in echo["blueprint_errors"][0]
    [blueprint] = echo["blueprints"]
    assert blueprint["package"] == "echo" and blueprint["url_prefix"] == "/echo"
    assert [e["endpoint"] for e in blueprint["endpoints"]] == ["/echo"]


def test_the_sizes_plugin_blueprint_is_served_with_its_own_database(processed: Processed) -> None:
    sizes = {p["name"]: p for p in processed.client.get("/plugins").get_json()}["sizes"]
    assert sorted(e["endpoint"] for bp in sizes["blueprints"] for e in bp["endpoints"]) == \
        ["/sizes/<uuid_ref>", "/sizes/larger/<int:size>"]
    answer = processed.client.get("/sizes/uuid-one")
    assert answer.status_code == 200
    assert answer.get_json()["data_size"] == len("hello")
    larger = processed.client.get("/sizes/larger/5").get_json()
    assert [row["uuid_ref"] for row in larger] == ["uuid-bad"]


def test_a_plugin_blueprint_reads_its_config_through_current_app(processed: Processed) -> None:
    answer = processed.client.post("/echo", data=b"12345")
    assert answer.status_code == 200
    assert answer.get_json() == {"bytes": 5, "plugin": "echo"}


def test_rules_lists_core_and_plugin_routes(processed: Processed) -> None:
    rules = {r["endpoint"]: r for r in processed.client.get("/rules").get_json()}
    for path in ("/", "/health", "/plugins", "/rules", "/messages", "/messages/<uuid>", "/metrics",
                 "/sizes/<uuid_ref>", "/echo"):
        assert path in rules, path
    assert rules["/messages/<uuid>"]["arguments"] == ["uuid"]
    assert rules["/echo"]["methods"] == ["POST"]
    assert rules["/health"]["function"] == "core.health"


# -- /metrics -----------------------------------------------------------------------------------------
def test_metrics_message_counts_match_the_database(processed: Processed) -> None:
    answer = processed.client.get("/metrics")
    assert answer.status_code == 200
    assert answer.content_type.startswith("text/plain")
    samples = metric_samples(answer.get_data(as_text=True))
    counts = processed.sqapi.database.count_by_status()
    assert counts == {"DONE": 2, "FAILED": 1}
    for status in ("DONE", "FAILED", "RETRY", "PROCESSING"):
        assert samples[("sqapi_messages", (("status", status),))] == counts.get(status, 0)
    assert samples[("sqapi_status_database_up", ())] == 1


def test_metrics_count_plugin_durations_failures_and_dead_letters(processed: Processed) -> None:
    samples = metric_samples(processed.client.get("/metrics").get_data(as_text=True))
    assert samples[("sqapi_plugin_duration_seconds_count", (("plugin", "counter"), ("status", "DONE")))] == 3
    assert samples[("sqapi_plugin_duration_seconds_count", (("plugin", "picky"), ("status", "FAILED")))] == 1
    assert samples[("sqapi_plugin_failures_total", (("plugin", "picky"), ("reason", "ValueError")))] == 1
    assert samples[("sqapi_dead_letters_total", ())] == 1
    assert samples[("sqapi_retries_total", ())] == 0
    assert samples[("sqapi_messages_in_flight", ())] == 0
    assert samples[("sqapi_messages_processed_total", (("status", "DONE"),))] == 2
    assert samples[("sqapi_plugin_messages", (("plugin", "picky"), ("status", "FAILED")))] == 1


def test_retries_are_counted(plugin_folders: None, make_app: Callable[..., Sqapi],
                             write_data: Callable[[str, bytes | str], str]) -> None:
    sqapi = make_app({"msg_broker": {"retry": {"max_attempts": 3}}})
    app = create_app(sqapi)
    process_samples(sqapi, write_data)
    samples = metric_samples(app.test_client().get("/metrics").get_data(as_text=True))
    assert samples[("sqapi_retries_total", ())] == 1
    assert samples[("sqapi_dead_letters_total", ())] == 0
    assert samples[("sqapi_messages", (("status", "RETRY"),))] == 1


def test_each_app_has_its_own_metrics_registry(processed: Processed) -> None:
    other = create_app(processed.sqapi)
    samples = metric_samples(other.test_client().get("/metrics").get_data(as_text=True))
    assert samples[("sqapi_dead_letters_total", ())] == 0  # it saw no processing
    assert samples[("sqapi_messages", (("status", "FAILED"),))] == 1  # but reads the same database


# -- dashboard ----------------------------------------------------------------------------------------
def test_the_dashboard_shows_counts_failures_and_latency_without_outside_resources(processed: Processed) -> None:
    answer = processed.client.get("/")
    assert answer.status_code == 200 and answer.mimetype == "text/html"
    html = answer.get_data(as_text=True)
    assert 'id="count-DONE">2<' in html and 'id="count-FAILED">1<' in html and 'id="count-total">3<' in html
    assert "uuid-bad" in html and "the data starts with" in html
    assert "counter" in html and "p95" in html
    assert 'http-equiv="refresh"' not in html  # live updates come from its script, not from reloading
    assert '<script src="/static/dashboard.js"' in html
    import re
    external = re.findall(r"""(?:src|href|action)\s*=\s*["']?(?:https?:)?//""", html)
    assert external == []  # nothing loaded from elsewhere (page text may mention URLs)
    policy = answer.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy


def test_the_dashboard_still_answers_with_the_database_down(processed: Processed, workdir: Path) -> None:
    point_nowhere(processed.sqapi.database, workdir)
    answer = processed.client.get("/")
    assert answer.status_code == 200
    assert "database</strong> (postgres) is down" in answer.get_data(as_text=True)


def test_an_app_with_no_messages_yet_renders_every_page(plugin_folders: None, make_app: Callable[..., Sqapi]) -> None:
    client = create_app(make_app(BASE_CONFIG)).test_client()
    for path in ("/", "/health", "/plugins", "/rules", "/messages", "/metrics"):
        assert client.get(path).status_code == 200, path
    assert "No messages yet" in client.get("/").get_data(as_text=True)
