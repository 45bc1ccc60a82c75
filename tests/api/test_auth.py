"""The bearer token: every route but /health needs it when set; bodies are capped."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from sqapi.api.app import create_app
from sqapi.app import Sqapi

from .conftest import BASE_CONFIG

TOKEN = "t0ken-that-must-stay-secret"


@pytest.fixture
def guarded(plugin_folders: None, make_app: Callable[..., Sqapi]) -> Sqapi:
    return make_app({**BASE_CONFIG, "api": {"token": TOKEN, "max_body_bytes": 1000}})


def test_without_the_token_messages_answers_401(guarded: Sqapi) -> None:
    answer = create_app(guarded).test_client().get("/messages")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in answer.get_data(as_text=True)


def test_with_the_token_every_route_answers(guarded: Sqapi) -> None:
    client = create_app(guarded).test_client()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/", "/plugins", "/rules", "/messages", "/metrics", "/sizes/larger/0"):
        assert client.get(path, headers=headers).status_code == 200, path


def test_a_wrong_token_or_scheme_is_401_on_every_guarded_route(guarded: Sqapi) -> None:
    client = create_app(guarded).test_client()
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}, {}):
        for path in ("/", "/plugins", "/rules", "/messages", "/messages/x", "/metrics", "/sizes/larger/0"):
            assert client.get(path, headers=headers).status_code == 401, (path, headers)


def test_health_stays_open_with_a_token(guarded: Sqapi) -> None:
    assert create_app(guarded).test_client().get("/health").status_code == 200


def test_the_token_can_come_from_the_environment(plugin_folders: None, make_app: Callable[..., Sqapi],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQAPI_API_TOKEN", TOKEN)
    client = create_app(make_app(BASE_CONFIG)).test_client()
    assert client.get("/messages").status_code == 401
    assert client.get("/messages", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_without_a_token_the_api_is_open(plugin_folders: None, make_app: Callable[..., Sqapi]) -> None:
    assert create_app(make_app(BASE_CONFIG)).test_client().get("/messages").status_code == 200


def test_the_token_is_never_logged(guarded: Sqapi, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = create_app(guarded).test_client()
    client.get("/messages", headers={"Authorization": "Bearer wrong"})
    client.get("/messages", headers={"Authorization": f"Bearer {TOKEN}"})
    assert TOKEN not in caplog.text


def test_request_bodies_over_the_cap_are_refused_with_413(guarded: Sqapi) -> None:
    client = create_app(guarded).test_client()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/echo", data=b"x" * 999, headers=headers).get_json()["bytes"] == 999
    answer = client.post("/echo", data=b"x" * 5000, headers=headers)
    assert answer.status_code == 413
    assert answer.get_json()["error"] == "request entity too large"
