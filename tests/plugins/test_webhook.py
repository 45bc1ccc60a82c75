"""webhook against a real HTTP receiver on 127.0.0.1 (tests/plugins/receiver.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from sqapi.app import Sqapi
from sqapi.errors import ConnectorError, PermanentError
from sqapi.testing import run_plugin
from tests.plugins.conftest import PLUGINS, SECRET, webhook_settings
from tests.plugins.receiver import WebhookReceiver

PLUGIN = PLUGINS / "webhook"
STATUSES = {"pdf_extractor": {"status": "FAILED", "info": "encrypted PDF"}, "es_indexer": {"status": "DONE",
                                                                                           "info": None}}


def config(receiver: WebhookReceiver, **extra: Any) -> dict[str, Any]:
    return {"custom": {"webhook": webhook_settings(receiver, **extra)}}


def notify(tmp_path: Path, receiver: WebhookReceiver, **extra: Any) -> Any:
    return run_plugin(PLUGIN, b"data", tmp_path, metadata={"owner": "ops", "secret_note": "x"},
                      config=config(receiver, metadata_fields=["owner"], **extra), uuid="m-1",
                      type="application/pdf", plugin_statuses=STATUSES)


def test_the_receiver_gets_one_signed_notification_with_every_plugins_status(
        tmp_path: Path, receiver: WebhookReceiver) -> None:
    run = notify(tmp_path, receiver)

    assert len(receiver.received) == 1
    got = receiver.received[0]
    # a plain secret is the key as it stands (its UTF-8 bytes); the specification's own library verifies
    assert Webhook(SECRET.encode()).verify(got.body, got.headers) == json.loads(got.body)
    assert "x-sqapi-signature" not in got.headers  # the legacy signature only when asked for
    payload = json.loads(got.body)
    assert payload["uuid"] == "m-1" and payload["data_type"] == "application/pdf"
    assert payload["hash_digest"] == run.message.hash_digest
    assert payload["plugins"] == STATUSES
    assert payload["metadata"] == {"owner": "ops"}
    assert payload["delivery_id"] == got.headers["x-sqapi-delivery"] == run.result["deliveries"][0]["delivery_id"]
    assert got.headers["webhook-id"] == payload["delivery_id"]


def test_the_legacy_signature_is_added_when_asked_for(tmp_path: Path, receiver: WebhookReceiver) -> None:
    notify(tmp_path, receiver, legacy_signature=True)
    got = receiver.received[0]
    assert got.headers["x-sqapi-signature"] == "sha256=" + hmac.new(SECRET.encode(), got.body,
                                                                     hashlib.sha256).hexdigest()
    Webhook(SECRET.encode()).verify(got.body, got.headers)


def test_5xx_answers_are_retried_with_the_same_delivery_id(tmp_path: Path, receiver: WebhookReceiver) -> None:
    receiver.statuses = [500, 503]
    notify(tmp_path, receiver)
    assert len(receiver.received) == 3
    assert len({r.headers["x-sqapi-delivery"] for r in receiver.received}) == 1
    assert len({r.body for r in receiver.received}) == 1


def test_a_receiver_failing_every_retry_is_a_retryable_connector_error(
        tmp_path: Path, receiver: WebhookReceiver) -> None:
    receiver.statuses = [502] * 10
    with pytest.raises(ConnectorError, match="502 on every attempt"):
        notify(tmp_path, receiver, max_retries=1)


def test_a_slow_receiver_times_out_and_is_retried(tmp_path: Path, receiver: WebhookReceiver) -> None:
    receiver.delay = 0.5
    with pytest.raises(ConnectorError, match="timed out"):
        notify(tmp_path, receiver, timeout=0.1, max_retries=1)
    assert len(receiver.received) == 2


def test_a_redirect_is_not_followed(tmp_path: Path, receiver: WebhookReceiver) -> None:
    receiver.redirect_to = "http://169.254.169.254/latest/meta-data"
    with pytest.raises(PermanentError, match="302 \\(redirect not followed\\)"):
        notify(tmp_path, receiver)
    assert len(receiver.received) == 1


def test_a_loopback_address_is_refused_unless_explicitly_allowed(tmp_path: Path, receiver: WebhookReceiver) -> None:
    with pytest.raises(PermanentError, match="resolves to 127.0.0.1, a private, loopback"):
        notify(tmp_path, receiver, allow_private_addresses=False)
    assert receiver.received == []


def test_a_name_resolving_to_loopback_is_refused_after_resolution(tmp_path: Path, receiver: WebhookReceiver) -> None:
    url = receiver.url.replace("127.0.0.1", "localhost")
    with pytest.raises(PermanentError, match="'http://localhost:[0-9]+/hook' refused: localhost resolves to"):
        run_plugin(PLUGIN, b"data", tmp_path, config={"custom": {"webhook": {"urls": [url], "secret": SECRET}}})
    assert receiver.received == []


@pytest.mark.parametrize("url, reason", [("http://127.0.0.1:99999999/hook?token=t0k", "bad port"),
                                         ("http://user:pw@127.0.0.1:1/hook?token=t0k", "user info")])
def test_a_malformed_url_is_refused_permanently_without_its_credentials(tmp_path: Path, url: str,
                                                                        reason: str) -> None:
    from sqapi.testing import load_plugin
    plugin = load_plugin(PLUGIN, tmp_path, config={"custom": {"webhook": {
        "urls": ["http://127.0.0.1:1/hook"], "secret": SECRET, "allow_private_addresses": True}}})
    module: Any = plugin.module
    with pytest.raises(PermanentError, match=f"'http://127.0.0.1:[0-9]+/hook' refused: {reason}") as info:
        module.host_guard(module.settings(plugin.config)).check(url)
    assert "pw" not in str(info.value) and "t0k" not in str(info.value)


def test_a_callback_url_outside_the_allow_list_is_refused(tmp_path: Path, receiver: WebhookReceiver) -> None:
    with pytest.raises(PermanentError, match="host evil.example is not in custom.webhook.allow_hosts"):
        run_plugin(PLUGIN, b"data", tmp_path, config=config(receiver, callback_field="callback"),
                   body={"callback": "https://evil.example/steal"})
    assert len(receiver.received) == 1  # the configured URL was still told


def test_a_configured_url_outside_the_allow_list_fails_the_plugin_at_load(
        make_app: Callable[..., Sqapi], receiver: WebhookReceiver) -> None:
    app = make_app({"active_plugins": ["webhook"],
                    "custom": {"webhook": webhook_settings(receiver, allow_hosts=["hooks.example.com"])}})
    plugin = app.plugins.plugins["webhook"]
    assert plugin.state == "failed" and "not in custom.webhook.allow_hosts" in (plugin.reason or "")


@pytest.mark.parametrize("settings, missing", [({}, "custom.webhook.urls"),
                                               ({"urls": ["https://hooks.example.com/x"]}, "custom.webhook.secret")])
def test_without_urls_or_secret_the_webhook_stays_unloaded_and_says_why(
        make_app: Callable[..., Sqapi], settings: dict[str, Any], missing: str) -> None:
    app = make_app({"active_plugins": ["webhook"], "custom": {"webhook": settings}})
    plugin = app.plugins.plugins["webhook"]
    assert plugin.state == "unloaded" and missing in (plugin.reason or "")


def test_the_secret_never_reaches_the_logs(tmp_path: Path, receiver: WebhookReceiver,
                                           caplog: pytest.LogCaptureFixture) -> None:
    receiver.statuses = [500]
    caplog.set_level(logging.DEBUG)
    notify(tmp_path, receiver)
    assert caplog.records and SECRET not in caplog.text


def _port(receiver: WebhookReceiver) -> int:
    return int(receiver.server.server_address[1])


@pytest.fixture
def canary() -> Iterator[WebhookReceiver]:
    """A second receiver that must be told nothing."""
    server = WebhookReceiver().start()
    yield server
    server.stop()


def test_an_allow_hosts_entry_without_a_port_allows_only_the_default_port(
        make_app: Callable[..., Sqapi], receiver: WebhookReceiver) -> None:
    app = make_app({"active_plugins": ["webhook"],
                    "custom": {"webhook": webhook_settings(receiver, allow_hosts=["127.0.0.1"])}})
    plugin = app.plugins.plugins["webhook"]
    assert plugin.state == "failed"
    assert f"port {_port(receiver)} of host 127.0.0.1 is not in custom.webhook.allow_hosts" in (plugin.reason or "")


def test_a_loopback_receiver_named_with_its_port_needs_no_allow_private_addresses(
        tmp_path: Path, receiver: WebhookReceiver) -> None:
    notify(tmp_path, receiver, allow_private_addresses=False, allow_hosts=[f"127.0.0.1:{_port(receiver)}"])
    assert len(receiver.received) == 1


def test_a_callback_to_another_port_of_the_configured_host_is_refused_and_never_sent(
        tmp_path: Path, receiver: WebhookReceiver, canary: WebhookReceiver) -> None:
    with pytest.raises(PermanentError, match=f"port {_port(canary)} of host 127.0.0.1 is not in "
                                             "custom.webhook.allow_hosts"):
        run_plugin(PLUGIN, b"data", tmp_path, config=config(receiver, callback_field="callback"),
                   body={"callback": canary.url})
    assert canary.received == [] and len(receiver.received) == 1


def test_a_callback_url_with_a_backslash_never_reaches_the_port_written_before_it(
        tmp_path: Path, receiver: WebhookReceiver, canary: WebhookReceiver) -> None:
    callback = f"http://127.0.0.1:{_port(canary)}\\@127.0.0.1:{_port(receiver)}/hook"
    with pytest.raises(PermanentError, match="refused: a backslash in the host part"):
        run_plugin(PLUGIN, b"data", tmp_path, config=config(receiver, callback_field="callback"),
                   body={"callback": callback})
    assert canary.received == [] and len(receiver.received) == 1


def test_a_redirect_to_another_receiver_is_not_followed(tmp_path: Path, receiver: WebhookReceiver,
                                                        canary: WebhookReceiver) -> None:
    receiver.redirect_to = canary.url
    with pytest.raises(PermanentError, match="redirect not followed"):
        notify(tmp_path, receiver, allow_hosts=[f"127.0.0.1:{_port(receiver)}", f"127.0.0.1:{_port(canary)}"])
    assert canary.received == []
