"""webhook signatures, checked by the Standard Webhooks specification's own verifier (``standardwebhooks``)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks.webhooks
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from sqapi.app import Sqapi
from sqapi.testing import run_plugin
from tests.plugins.conftest import PLUGINS, SECRET, webhook_settings
from tests.plugins.receiver import Received, WebhookReceiver

PLUGIN = PLUGINS / "webhook"


def whsec() -> str:
    """A fresh secret in the specification's form."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def notify(tmp_path: Path, receiver: WebhookReceiver, **extra: Any) -> Received:
    run_plugin(PLUGIN, b"data", tmp_path, config={"custom": {"webhook": webhook_settings(receiver, **extra)}},
               uuid="m-1", type="text/plain")
    assert len(receiver.received) == 1
    return receiver.received[0]


def test_a_notification_signed_with_a_whsec_secret_verifies_with_the_standard_webhooks_library(
        tmp_path: Path, receiver: WebhookReceiver) -> None:
    secret = whsec()
    got = notify(tmp_path, receiver, secret=secret)
    assert Webhook(secret).verify(got.body, got.headers) == json.loads(got.body)
    assert got.headers["webhook-id"] == json.loads(got.body)["delivery_id"]
    assert got.headers["webhook-signature"].startswith("v1,") and " " not in got.headers["webhook-signature"]


def test_a_tampered_body_fails_verification(tmp_path: Path, receiver: WebhookReceiver) -> None:
    secret = whsec()
    got = notify(tmp_path, receiver, secret=secret)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(secret).verify(got.body.replace(b"m-1", b"m-2"), got.headers)


def test_a_notification_signed_with_another_secret_fails_verification(tmp_path: Path,
                                                                      receiver: WebhookReceiver) -> None:
    got = notify(tmp_path, receiver, secret=whsec())
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(whsec()).verify(got.body, got.headers)


def test_a_notification_replayed_later_is_refused_for_its_stale_timestamp(
        tmp_path: Path, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = whsec()
    got = notify(tmp_path, receiver, secret=secret)
    Webhook(secret).verify(got.body, got.headers)  # accepted when it arrives

    class TenMinutesLater(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Any:
            return datetime.now(tz) + timedelta(minutes=10)

    # the same captured request, verified again ten minutes later: the receiver's clock has moved on
    monkeypatch.setattr(standardwebhooks.webhooks, "datetime", TenMinutesLater)
    with pytest.raises(WebhookVerificationError, match="timestamp too old"):
        Webhook(secret).verify(got.body, got.headers)


def test_a_timestamp_moved_to_look_fresh_breaks_the_signature(tmp_path: Path, receiver: WebhookReceiver) -> None:
    secret = whsec()
    got = notify(tmp_path, receiver, secret=secret)
    moved = {**got.headers, "webhook-timestamp": str(int(got.headers["webhook-timestamp"]) + 1)}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(secret).verify(got.body, moved)


@pytest.mark.parametrize("form", ["list", "spaces"])
def test_with_two_secrets_during_a_rotation_either_one_verifies(tmp_path: Path, receiver: WebhookReceiver,
                                                                form: str) -> None:
    new, old = whsec(), whsec()
    got = notify(tmp_path, receiver, secret=[new, old] if form == "list" else f"{new} {old}")
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    assert Webhook(new).verify(got.body, got.headers) == json.loads(got.body)
    assert Webhook(old).verify(got.body, got.headers) == json.loads(got.body)
    with pytest.raises(WebhookVerificationError):
        Webhook(whsec()).verify(got.body, got.headers)


def test_a_plain_secret_is_the_key_as_written(tmp_path: Path, receiver: WebhookReceiver) -> None:
    got = notify(tmp_path, receiver)  # the fixtures' plain secret
    Webhook(SECRET.encode("utf-8")).verify(got.body, got.headers)
    Webhook("whsec_" + base64.b64encode(SECRET.encode("utf-8")).decode()).verify(got.body, got.headers)


def test_every_retry_is_signed_again_with_the_same_id(tmp_path: Path, receiver: WebhookReceiver) -> None:
    secret = whsec()
    receiver.statuses = [503]
    run_plugin(PLUGIN, b"data", tmp_path, config={"custom": {"webhook": webhook_settings(receiver, secret=secret)}})
    assert len(receiver.received) == 2
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    for got in receiver.received:
        Webhook(secret).verify(got.body, got.headers)


def test_the_legacy_signature_uses_the_first_secret_as_written(tmp_path: Path, receiver: WebhookReceiver) -> None:
    import hashlib
    import hmac

    new, old = whsec(), whsec()
    got = notify(tmp_path, receiver, secret=[new, old], legacy_signature=True)
    assert got.headers["x-sqapi-signature"] == "sha256=" + hmac.new(new.encode(), got.body, hashlib.sha256).hexdigest()
    Webhook(old).verify(got.body, got.headers)


@pytest.mark.parametrize("settings, problem", [
    ({"secret": "whsec_not base64!"}, "custom.webhook.secret: secret 1: a whsec_ secret must hold base64"),
    ({"secret": ["whsec_" + base64.b64encode(b"k" * 24).decode(), "whsec_"]}, "secret 2: a whsec_ secret must hold"),
    ({"legacy_signature": "yes"}, "custom.webhook.legacy_signature: must be true or false"),
])
def test_a_secret_or_legacy_setting_that_cannot_work_fails_the_plugin_at_load_without_showing_the_secret(
        make_app: Callable[..., Sqapi], receiver: WebhookReceiver, settings: dict[str, Any], problem: str) -> None:
    app = make_app({"active_plugins": ["webhook"], "custom": {"webhook": webhook_settings(receiver, **settings)}})
    plugin = app.plugins.plugins["webhook"]
    assert plugin.state == "failed" and problem in (plugin.reason or "")
    assert "not base64!" not in (plugin.reason or "")
