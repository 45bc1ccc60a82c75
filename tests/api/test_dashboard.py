"""The dashboard you act from, through Flask's test client: sign-in, its cookie, CSRF, filters, search, pages,
the JSON the pages poll, a message's page, queue depths of the spool folder."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from flask.testing import FlaskClient

from sqapi.api.app import create_app
from sqapi.app import Sqapi

from .conftest import BASE_CONFIG, Processed, process_samples

TOKEN = "dashboard-t0ken-that-must-stay-secret"
HTML = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture
def guarded(plugin_folders: None, make_app: Callable[..., Sqapi],
            write_data: Callable[[str, bytes | str], str]) -> FlaskClient:
    """A client of an API with ``api.token`` set, after the three sample messages were processed."""
    sqapi = make_app({**BASE_CONFIG, "api": {"token": TOKEN}})
    process_samples(sqapi, write_data)
    return create_app(sqapi).test_client()


def csrf_of(html: str) -> str:
    found = re.search(r'(?:name="csrf_token" value|data-csrf)="([^"]+)"', html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def set_cookie_header(answer: Any) -> str:
    cookies = [c for c in answer.headers.getlist("Set-Cookie") if c.startswith("sqapi_session=")]
    assert len(cookies) == 1, answer.headers
    return str(cookies[0])


def sign_in(client: FlaskClient, next_page: str = "/") -> Any:
    form = client.get(f"/login?next={next_page}")
    return client.post("/login", data={"token": TOKEN, "next": next_page,
                                       "csrf_token": csrf_of(form.get_data(as_text=True))})


# -- signing in ---------------------------------------------------------------------------------------
def test_a_browser_without_a_session_is_sent_to_the_login_form_and_back(guarded: FlaskClient) -> None:
    answer = guarded.get("/dashboard/messages/uuid-bad", headers=HTML)
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/login?next=%2Fdashboard%2Fmessages%2Fuuid-bad"
    assert guarded.get("/dashboard/state").status_code == 401  # a program gets the 401 it always got

    signed = sign_in(guarded, "/dashboard/messages/uuid-bad")
    assert signed.status_code == 303 and signed.headers["Location"] == "/dashboard/messages/uuid-bad"
    page = guarded.get("/dashboard/messages/uuid-bad", headers=HTML)
    assert page.status_code == 200 and "the data starts with" in page.get_data(as_text=True)
    assert guarded.get("/messages").status_code == 200  # the JSON routes accept the session too


def test_the_session_cookie_is_httponly_samesite_strict_and_holds_no_token(guarded: FlaskClient) -> None:
    cookie = set_cookie_header(sign_in(guarded))
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "secure" not in flags  # plain http here: a Secure cookie would never come back
    assert TOKEN not in cookie
    assert guarded.get_cookie("sqapi_session") is not None


def test_over_https_the_session_cookie_is_secure(guarded: FlaskClient) -> None:
    form = guarded.get("/login", base_url="https://localhost")
    answer = guarded.post("/login", base_url="https://localhost",
                          data={"token": TOKEN, "csrf_token": csrf_of(form.get_data(as_text=True))})
    assert answer.status_code == 303
    assert "secure" in [part.strip().lower() for part in set_cookie_header(answer).split(";")]


def test_a_wrong_token_is_refused_without_echoing_it_and_signs_nobody_in(
        guarded: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    form = guarded.get("/login")
    answer = guarded.post("/login", data={"token": "a-wrong-guess-123",
                                          "csrf_token": csrf_of(form.get_data(as_text=True))})
    assert answer.status_code == 401
    assert "not the API token" in answer.get_data(as_text=True)
    assert "a-wrong-guess-123" not in answer.get_data(as_text=True) and "a-wrong-guess-123" not in caplog.text
    assert guarded.get("/messages").status_code == 401
    sign_in(guarded)
    assert TOKEN not in caplog.text


def test_the_login_form_itself_needs_its_csrf_token(guarded: FlaskClient) -> None:
    guarded.get("/login")
    answer = guarded.post("/login", data={"token": TOKEN})
    assert answer.status_code == 403
    assert guarded.get("/messages").status_code == 401


def test_a_tampered_or_foreign_cookie_is_refused(guarded: FlaskClient, plugin_folders: None,
                                                 make_app: Callable[..., Sqapi]) -> None:
    sign_in(guarded)
    cookie = guarded.get_cookie("sqapi_session")
    assert cookie is not None
    guarded.set_cookie("sqapi_session", cookie.value[:-2] + ("AA" if not cookie.value.endswith("AA") else "BB"))
    assert guarded.get("/messages").status_code == 401

    other = create_app(make_app({**BASE_CONFIG, "api": {"token": "another-token"}})).test_client()
    other.set_cookie("sqapi_session", cookie.value)  # signed with a key from another token
    assert other.get("/messages").status_code == 401


def test_logout_ends_the_session(guarded: FlaskClient) -> None:
    sign_in(guarded)
    page = guarded.get("/", headers=HTML)
    assert 'id="logout"' in page.get_data(as_text=True)
    answer = guarded.post("/logout", data={"csrf_token": csrf_of(page.get_data(as_text=True))})
    assert answer.status_code == 303 and answer.headers["Location"] == "/login"
    assert "sqapi_session=;" in set_cookie_header(answer)
    assert guarded.get("/messages").status_code == 401


def test_the_token_never_appears_in_a_url_or_a_page(guarded: FlaskClient) -> None:
    signed = sign_in(guarded, "/?status=FAILED")
    assert TOKEN not in signed.headers["Location"]
    for path in ("/", "/dashboard/messages/uuid-bad", "/login", "/dashboard/state"):
        assert TOKEN not in guarded.get(path, headers=HTML).get_data(as_text=True), path


def test_login_never_sends_anyone_to_another_site(guarded: FlaskClient) -> None:
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example", "evil"):
        assert sign_in(guarded, target).headers["Location"] == "/", target


@pytest.mark.parametrize("control", ["\t", "\n", "\r", "\x7f", "\x01", "\x1f"])
def test_a_next_with_a_control_character_goes_home_not_off_site_nor_to_a_500(
        guarded: FlaskClient, control: str) -> None:
    """A browser strips a tab or newline from a URL: ``/<TAB>/evil.example/`` would be ``//evil.example/``."""
    for target in (f"/{control}/evil.example/", f"/dashboard{control}", f"/{control}"):
        form = guarded.get(f"/login?next={quote(target, safe='')}")
        assert form.status_code == 200 and 'name="next" value="/"' in form.get_data(as_text=True), repr(target)
        answer = sign_in(guarded, target)
        assert answer.status_code == 303 and answer.headers["Location"] == "/", repr(target)
    assert sign_in(guarded, "/dashboard/messages/uuid-bad?x=1").headers["Location"] == \
        "/dashboard/messages/uuid-bad?x=1"  # a path of this site still goes through


# -- CSRF ---------------------------------------------------------------------------------------------
def test_actions_with_the_cookie_but_without_the_csrf_token_are_refused(guarded: FlaskClient) -> None:
    sign_in(guarded)
    refused = guarded.post("/dashboard/redrive", data={"uuid": "uuid-bad"})
    assert refused.status_code == 403 and "CSRF" in refused.get_json()["details"]
    wrong = guarded.post("/dashboard/redrive", data={"uuid": "uuid-bad", "csrf_token": "not-the-one"})
    assert wrong.status_code == 403
    publish = guarded.post("/messages", json={"data_location": "one.txt"})  # any POST made with the cookie
    assert publish.status_code == 403
    delete = guarded.delete("/messages/uuid-bad")
    assert delete.status_code == 403
    assert guarded.post("/logout").status_code == 403


def test_the_csrf_token_may_come_in_a_header(guarded: FlaskClient) -> None:
    sign_in(guarded)
    csrf = csrf_of(guarded.get("/", headers=HTML).get_data(as_text=True))
    answer = guarded.post("/messages", json={"data_location": "one.txt"}, headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 202


def test_bearer_token_clients_need_no_csrf_token(guarded: FlaskClient) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert guarded.post("/messages", json={"data_location": "one.txt"}, headers=bearer).status_code == 202
    assert guarded.get("/dashboard/state", headers=bearer).status_code == 200


def test_without_a_token_the_dashboard_actions_still_need_the_csrf_token(processed: Processed) -> None:
    client = processed.client
    assert client.post("/dashboard/redrive", data={"uuid": "uuid-bad"}).status_code == 403
    assert client.post("/messages", json={"data_location": "one.txt"}).status_code == 202  # API clients as before


# -- the overview: filters, search, pages, the JSON it polls ------------------------------------------
def uuids(client: FlaskClient, query: str) -> list[str]:
    answer = client.get(f"/dashboard/state?{query}")
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return sorted(m["uuid"] for m in answer.get_json()["messages"])


def test_the_state_json_has_counts_messages_queues_and_failure_rates(processed: Processed) -> None:
    state = processed.client.get("/dashboard/state").get_json()
    assert state["counts"]["DONE"] == 2 and state["counts"]["FAILED"] == 1 and state["total"] == 3
    bad = next(m for m in state["messages"] if m["uuid"] == "uuid-bad")
    assert bad["failed_plugins"] == ["picky"] and "the data starts with" in bad["info"]
    assert bad["page"] == "/dashboard/messages/uuid-bad"
    picky = next(p for p in state["failure_rate"]["plugins"] if p["plugin"] == "picky")
    assert sum(picky["runs"]) == 3 and sum(picky["failed"]) == 1
    assert picky["runs"][-1] == 3 and picky["rates"][-1] == pytest.approx(1 / 3)  # all in the current hour
    assert len(state["failure_rate"]["hours"]) == 24 and state["failure_rate"]["source"] == "message_events"
    assert state["errors"] == []


def test_a_status_database_that_is_down_shows_as_down_not_as_no_history(
        processed: Processed, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqapi import registry

    assert registry.has_history(processed.sqapi.database)  # sqapi's types keep every attempt
    assert not registry.has_history(object())              # one that offers no get_history keeps none
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))                         # a port nothing answers on: the database is down
    port = listener.getsockname()[1]
    listener.close()
    down = registry.database({"type": "postgres", "schema": "sqapi_down", "connect_retry": {"attempts": 1},
                              "connection": {"host": "127.0.0.1", "port": port, "user": "postgres",
                                             "dbname": "postgres"}})
    monkeypatch.setattr(processed.sqapi, "database", down)
    try:
        state = processed.client.get("/dashboard/state").get_json()
        page = processed.client.get("/").get_data(as_text=True)
    finally:
        down.close()
    assert any(error.startswith("status database unavailable") for error in state["errors"]), state["errors"]
    assert state["failure_rate"]["source"] is None  # not "message_plugins": that would say "no history"
    assert "not known: the status database is unavailable" in page and "from message_plugins" not in page


def test_filters_select_by_status_plugin_and_time(processed: Processed) -> None:
    client = processed.client
    assert uuids(client, "status=FAILED") == ["uuid-bad"]
    assert uuids(client, "status=done") == ["uuid-one", "uuid-two"]
    assert uuids(client, "plugin=picky") == ["uuid-bad", "uuid-one", "uuid-two"]
    assert uuids(client, "plugin=nobody") == []
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="seconds")
    in_an_hour = (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="seconds")
    assert len(uuids(client, f"since={hour_ago}".replace("+", "%2B"))) == 3
    assert uuids(client, f"since={in_an_hour}".replace("+", "%2B")) == []
    assert uuids(client, f"until={hour_ago}".replace("+", "%2B")) == []
    assert uuids(client, "status=FAILED&since=2000-01-01") == ["uuid-bad"]


def test_search_finds_a_message_by_uuid_or_by_location(processed: Processed) -> None:
    client = processed.client
    assert uuids(client, "q=uuid-two") == ["uuid-two"]
    assert uuids(client, "q=BAD.TXT") == ["uuid-bad"]  # part of its data_location, any case
    assert uuids(client, "q=.txt") == ["uuid-bad", "uuid-one", "uuid-two"]
    assert uuids(client, "q=%25") == []  # a LIKE wildcard is searched for as itself
    assert uuids(client, "q=no-such-thing") == []


def test_bad_filters_are_400_naming_what_is_wrong(processed: Processed) -> None:
    for query, words in (("status=LOST", "status must be one of"), ("since=yesterday", "since must be an ISO 8601"),
                         ("limit=0", "limit must be"), ("until=13/13/13", "until must be"),
                         ("q=%00", "holds a NUL character"), ("plugin=a%00b", "holds a NUL character"),
                         ("since=9999-12-31T23:59:59-23:00", "since must be")):
        answer = processed.client.get(f"/dashboard/state?{query}")
        assert answer.status_code == 400 and words in answer.get_json()["details"], query
        assert processed.client.get(f"/?{query}").status_code == 400


def test_pages_follow_each_other_and_cover_every_message_once(
        processed: Processed, write_data: Callable[[str, bytes | str], str]) -> None:
    process_samples_more(processed, write_data, 4)
    processed.sqapi.database.execute_query("UPDATE messages SET updated_at = %(t)s WHERE uuid LIKE 'uuid-more%%'",
                                           t="2024-05-01T10:00:00.000+00:00")
    seen: list[str] = []
    url: str | None = "/dashboard/state?limit=2&q=uuid"
    pages = 0
    while url:
        state = processed.client.get(url.replace("/?", "/dashboard/state?")).get_json()
        seen += [m["uuid"] for m in state["messages"]]
        url = state["next"]
        pages += 1
        if url:
            assert parse_qs(urlsplit(url).query)["q"] == ["uuid"]  # the filters stay on every page
    assert len(seen) == len(set(seen)) == 7 and pages == 4


def test_a_later_page_links_back_to_the_newest_and_its_rows_stay_put(processed: Processed) -> None:
    first = processed.client.get("/?limit=2", headers=HTML).get_data(as_text=True)
    older = re.search(r'href="([^"]+)" id="next-page"', first)
    assert older
    second = processed.client.get(older.group(1).replace("&amp;", "&"), headers=HTML).get_data(as_text=True)
    assert 'id="first-page"' in second and 'data-frozen="1"' in second
    assert second.count('class="uuid"') == 1


def process_samples_more(processed: Processed, write_data: Callable[[str, bytes | str], str], n: int) -> None:
    from sqapi.core.outcome import Delivery

    for i in range(n):
        location = write_data(f"more-{i}.txt", f"more {i}")
        processed.sqapi.process({"uuid_ref": f"uuid-more-{i}", "data_location": location}, Delivery(id=f"more-{i}"))


def test_every_uuid_on_the_overview_links_to_its_page(processed: Processed) -> None:
    html = processed.client.get("/").get_data(as_text=True)
    for uuid in ("uuid-one", "uuid-two", "uuid-bad"):
        assert f'href="/dashboard/messages/{uuid}"' in html
    assert 'id="redrive-selection"' not in html  # no filter, no selection to redrive
    filtered = processed.client.get("/?status=FAILED").get_data(as_text=True)
    assert 'id="redrive-selection"' in filtered and 'name="status" value="FAILED"' in filtered


def test_the_message_page_shows_results_locations_and_a_redrive_button(processed: Processed) -> None:
    answer = processed.client.get("/dashboard/messages/uuid-bad")
    html = answer.get_data(as_text=True)
    assert answer.status_code == 200
    assert 'id="message-status">FAILED<' in html
    assert "the data starts with" in html and "picky" in html and "counter" in html
    assert 'href="/messages/uuid-bad/data"' in html and 'href="/messages/uuid-bad/metadata"' in html
    assert "bad.txt" in html
    assert 'id="redrive-form"' in html and 'name="uuid" value="uuid-bad"' in html and csrf_of(html)
    assert 'data-message-url="/messages/uuid-bad"' in html  # what its script polls
    timeline = html[html.index('id="history-rows"'):]
    assert timeline.index(">picky<") < timeline.index(">the message<")  # the plugin failed, then the attempt did
    assert "script-src 'self'" in answer.headers["Content-Security-Policy"]
    assert processed.client.get("/dashboard/messages/nobody").status_code == 404
    assert processed.client.get("/dashboard/messages/no%00body").status_code == 400  # the app's NUL guard


def test_the_message_page_shows_the_trace_id_when_the_row_has_one(processed: Processed) -> None:
    has_column = any("trace_id" in row for row in processed.sqapi.database.execute_query(
        "SELECT * FROM messages WHERE uuid = 'uuid-one'"))
    if not has_column:  # the column comes with tracing; the page must work either way
        processed.sqapi.database.execute_query("ALTER TABLE messages ADD COLUMN trace_id TEXT")
    processed.sqapi.database.execute_query("UPDATE messages SET trace_id = 'abc123def456' WHERE uuid = 'uuid-one'")
    html = processed.client.get("/dashboard/messages/uuid-one").get_data(as_text=True)
    assert 'id="trace-id">abc123def456<' in html
    assert 'id="trace-id"' not in processed.client.get("/dashboard/messages/uuid-two").get_data(as_text=True)


def test_markup_in_a_reason_is_shown_as_text(processed: Processed) -> None:
    processed.sqapi.database.execute_query(
        "UPDATE messages SET info = '<script>alert(1)</script>' WHERE uuid = 'uuid-bad'")
    for path in ("/", "/dashboard/messages/uuid-bad"):
        html = processed.client.get(path).get_data(as_text=True)
        assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_the_spool_folder_shows_files_waiting_and_failed(processed: Processed, workdir: Path) -> None:
    spool = workdir / "spool"
    (spool / "failed").mkdir(parents=True, exist_ok=True)
    (spool / "waiting-1.json").write_text(json.dumps({"data_location": "one.txt"}))
    (spool / "waiting-2.json").write_text(json.dumps({"data_location": "two.txt"}))
    (spool / ".half-written.json.tmp").write_text("{")
    (spool / "failed" / "gone.json").write_text("{}")
    (spool / "failed" / "gone.json.reason").write_text("plugin picky: ...")
    queues = {q["role"]: q for q in processed.client.get("/dashboard/state").get_json()["queues"]}
    assert queues["waiting"]["messages"] == 2 and queues["failed"]["messages"] == 1
    assert queues["retry"]["messages"] == 0 and queues["waiting"]["consumers"] is None


# -- redrive from the dashboard (embedded default: the spool folder) -----------------------------------
def spool_bodies(workdir: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted((workdir / "spool").glob("*.json"))]


def test_the_redrive_button_asks_first_then_republishes_the_message(processed: Processed, workdir: Path) -> None:
    client = processed.client
    page = client.get("/dashboard/messages/uuid-bad").get_data(as_text=True)
    asked = client.post("/dashboard/redrive", data={"uuid": "uuid-bad", "csrf_token": csrf_of(page)})
    html = asked.get_data(as_text=True)
    assert asked.status_code == 200 and 'id="confirm-redrive"' in html
    assert "<strong>1</strong> message(s) would run again" in html and "uuid-bad" in html
    assert spool_bodies(workdir) == []  # asking changed nothing
    assert processed.sqapi.database.get_message("uuid-bad")["status"] == "FAILED"

    confirmed = client.post("/dashboard/redrive", data={"uuid": "uuid-bad", "confirm": "yes",
                                                        "csrf_token": csrf_of(html)})
    assert confirmed.status_code == 303
    assert confirmed.headers["Location"] == "/dashboard/messages/uuid-bad?redriven=1"
    assert [body["uuid_ref"] for body in spool_bodies(workdir)] == ["uuid-bad"]
    notice = client.get(confirmed.headers["Location"]).get_data(as_text=True)
    assert 'id="redrive-notice"' in notice


def test_a_filtered_selection_is_redriven_after_its_confirmation(processed: Processed, workdir: Path) -> None:
    client = processed.client
    csrf = csrf_of(client.get("/?status=FAILED").get_data(as_text=True))
    asked = client.post("/dashboard/redrive", data={"status": "FAILED", "plugin": "picky", "csrf_token": csrf})
    html = asked.get_data(as_text=True)
    assert asked.status_code == 200 and "<strong>1</strong> message(s) would run again" in html
    assert 'name="plugin" value="picky"' in html  # the confirmation carries the same selection
    done = client.post("/dashboard/redrive", data={"status": "FAILED", "plugin": "picky", "confirm": "yes",
                                                   "csrf_token": csrf})
    assert done.status_code == 200 and "1 message(s) re-published" in done.get_data(as_text=True)
    assert [body["uuid_ref"] for body in spool_bodies(workdir)] == ["uuid-bad"]


def button_selection(client: FlaskClient, query: str) -> tuple[list[str], str]:
    """What the list's redrive button (its form, as the page has it) would redrive, and the confirmation page."""
    page = client.get(f"/?{query}").get_data(as_text=True)
    form = re.search(r'<form[^>]*id="redrive-selection">(.*?)</form>', page, re.S)
    assert form, "the filtered list has no redrive button"
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form.group(1)))
    answer = client.post("/dashboard/redrive", data=fields)  # no confirm: what it would do
    html = answer.get_data(as_text=True)
    assert answer.status_code == 200, html
    return sorted(re.findall(r'<a href="/dashboard/messages/([^"]+)"><code>', html)), html


def test_the_redrive_button_selects_what_the_list_shows(
        processed: Processed, write_data: Callable[[str, bytes | str], str]) -> None:
    """Status and time as the list has them, ``until`` included at both: a message changed at exactly ``until``
    is listed and redriven (the list's ``until`` used to exclude it while redrive took it)."""
    from sqapi.core.outcome import Delivery

    for name in ("bad2", "bad3"):
        location = write_data(f"{name}.txt", f"bad data of {name}")
        outcome = processed.sqapi.process(json.dumps({"uuid_ref": f"uuid-{name}", "data_location": location}),
                                          Delivery(id=name))
        assert outcome.status == "FAILED"
    for uuid, at in (("uuid-bad2", "2026-11-29T05:00:00+00:00"),       # at since
                     ("uuid-bad", "2026-11-29T06:00:00+00:00"),        # at until
                     ("uuid-bad3", "2026-11-29T06:00:00.001+00:00")):  # just after until
        processed.sqapi.database.execute_query("UPDATE messages SET updated_at = %(at)s WHERE uuid = %(uuid)s",
                                               at=at, uuid=uuid)
    client = processed.client
    query = "status=FAILED&since=2026-11-29T05:00&until=2026-11-29T06:00"
    listed = uuids(client, query)
    assert listed == ["uuid-bad", "uuid-bad2"]
    selected, html = button_selection(client, query)
    assert selected == listed
    assert 'id="redrive-differs"' not in html  # nothing to tell: the same messages

    # where a redrive must select otherwise, the confirmation says so plainly
    listed = uuids(client, "plugin=picky")
    assert listed == ["uuid-bad", "uuid-bad2", "uuid-bad3", "uuid-one", "uuid-two"]
    selected, html = button_selection(client, "plugin=picky")
    assert selected == ["uuid-bad", "uuid-bad2", "uuid-bad3"]
    differs = re.search(r'<div id="redrive-differs">(.*?)</div>', html, re.S)
    assert differs, html
    assert "takes its FAILED ones only" in differs.group(1)
    assert "those whose picky did not finish" in differs.group(1)


def test_a_search_selects_the_messages_it_finds_for_a_redrive(processed: Processed) -> None:
    client = processed.client
    csrf = csrf_of(client.get("/").get_data(as_text=True))
    found = client.post("/dashboard/redrive", data={"q": "bad.txt", "csrf_token": csrf}).get_data(as_text=True)
    assert "<strong>1</strong> message(s) would run again" in found and "uuid-bad" in found
    nothing = client.post("/dashboard/redrive", data={"q": "no-such-file", "csrf_token": csrf})
    assert nothing.status_code == 400 and "finds no message" in nothing.get_data(as_text=True)


def test_a_selection_that_cannot_be_right_is_400_saying_why(processed: Processed, workdir: Path) -> None:
    client = processed.client
    csrf = csrf_of(client.get("/").get_data(as_text=True))
    for form, words in (({}, "nothing selected"), ({"status": "DONE"}, "nothing left to run"),
                        ({"since": "soon"}, "since must be an ISO 8601"),
                        ({"since": "2026-01-02", "until": "2026-01-01"}, "is after until"),
                        ({"uuid": "uuid-\x00bad"}, "NUL character")):
        answer = client.post("/dashboard/redrive", data={**form, "csrf_token": csrf, "confirm": "yes"})
        assert answer.status_code == 400 and words in answer.get_data(as_text=True), form
    assert spool_bodies(workdir) == []


def test_a_signed_in_browser_uploads_with_the_csrf_header_and_is_refused_without_it(guarded: FlaskClient) -> None:
    import io

    sign_in(guarded)
    csrf = csrf_of(guarded.get("/", headers=HTML).get_data(as_text=True))
    upload = {"file": (io.BytesIO(b"x" * 3_000_000), "big.txt")}  # over max_body_bytes: streamed, not parsed early
    refused = guarded.post("/messages", data=upload, content_type="multipart/form-data")
    assert refused.status_code == 403
    upload = {"file": (io.BytesIO(b"x" * 3_000_000), "big.txt")}
    answer = guarded.post("/messages", data=upload, content_type="multipart/form-data",
                          headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 202, answer.get_data(as_text=True)


def test_behind_a_proxy_that_ends_tls_the_cookie_can_be_made_secure(
        plugin_folders: None, make_app: Callable[..., Sqapi]) -> None:
    client = create_app(make_app({**BASE_CONFIG, "api": {"token": TOKEN, "secure_cookie": True}})).test_client()
    answer = sign_in(client)  # plain http, as the proxy forwards it
    assert answer.status_code == 303
    assert "secure" in [part.strip().lower() for part in set_cookie_header(answer).split(";")]
