"""webhook: tells each configured URL what happened to a message, signed, after every other plugin.

Runs last (``plugin.after: ['*']``) and POSTs one JSON notification per URL::

    {"delivery_id": "...", "event": "message.processed", "uuid": "...", "data_type": "application/pdf",
     "hash_digest": "...", "plugins": {"pdf_extractor": {"status": "DONE", "info": null}, ...},
     "metadata": {...only the keys in metadata_fields...}}

Signed as the Standard Webhooks specification says (https://www.standardwebhooks.com):
``webhook-id`` (the delivery id), ``webhook-timestamp`` (seconds since the epoch, at each attempt)
and ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` -- one ``v1,``
signature per secret, separated by spaces, so receivers keep verifying while a secret is
rotated.  A secret written ``whsec_<base64>`` is the key those bytes encode; any other secret is
used as it is (its UTF-8 bytes are the key).  Receivers refuse a timestamp too far from their
clock, so a captured notification cannot be replayed later.  ``legacy_signature: true`` adds the
old ``X-Sqapi-Signature: sha256=<hex HMAC-SHA256 of the body>`` (keyed with the first secret as
written; it has no timestamp and can be replayed) for receivers not moved yet.  Every request
also carries ``X-Sqapi-Delivery: <delivery id>`` and ``X-Sqapi-Event`` -- and, when tracing is on
(docs/configuration.md, ``tracing``), the W3C ``traceparent`` of the plugin call's span, so the
receiver's work joins the message's trace.  The delivery id is a
uuid5 of (message uuid, data hash, URL): the same for every retry and redelivery of the same
notification, so a receiver can drop repeats.

Safety (:mod:`sqapi.connectors.guard`, shared with the ``http`` data store): a URL must be
http(s) without user info, its host and port must be in ``allow_hosts`` (default: the host and
port of each configured URL); its name is resolved and refused when any address is private,
loopback, link-local, multicast or reserved, unless ``allow_private_addresses: true`` or an
``allow_hosts`` entry you wrote names that host with its port; the request then goes to the
address that was checked (no second lookup), and redirects are not followed.  Timeouts,
connection errors, 408, 429 and 5xx are retried with exponential backoff, then raised as
:class:`~sqapi.errors.ConnectorError` (the message is retried later and only the unfinished
plugins run again); a refused URL, a redirect or another 4xx is a
:class:`~sqapi.errors.PermanentError`.  Secrets are never logged; URLs are logged without their
query string.

Inactive (``sqapi plugins`` says why) until ``custom.webhook.urls`` and ``secret`` are set.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import sys
import time
import uuid as uuidlib
from collections.abc import Mapping
from typing import Any

import requests

from sqapi.backoff import exponential
from sqapi.config import url_for_logs
from sqapi.connectors.guard import HostGuard, PrivatePolicy, parse_target
from sqapi.errors import ConfigError, ConnectorError, PermanentError, PluginNotConfigured

DEFAULTS: dict[str, Any] = {
    "urls": [],                       # where notifications go
    "secret": "",                     # signing secret(s): whsec_<base64> or plain; a list while rotating
    "legacy_signature": False,        # also send X-Sqapi-Signature (body only: replayable)
    "allow_hosts": [],                # host, host:port or host:* (patterns); empty: host:port of each url
    "allow_private_addresses": False,
    "callback_field": None,           # body key of a per-message URL (checked like the others)
    "metadata_fields": [],            # metadata keys included in the notification
    "timeout": 10.0,                  # seconds, connect and read
    "max_retries": 3,
    "backoff": 0.5,                   # first retry delay in seconds; doubles each time
    "max_backoff": 30.0,
}
SIGNATURE_HEADER = "X-Sqapi-Signature"
DELIVERY_HEADER = "X-Sqapi-Delivery"
SECRET_PREFIX = "whsec_"
EVENT = "message.processed"
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}

log = logging.getLogger(__name__)


def settings(config: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**DEFAULTS, **(((config.get("custom") or {}).get("webhook")) or {})}
    for key in ("urls", "allow_hosts", "metadata_fields"):
        value = merged[key]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        merged[key] = [str(v) for v in value or []]
    merged["secrets"] = signing_secrets(merged["secret"])
    merged["allow_hosts_derived"] = not merged["allow_hosts"]
    if merged["allow_hosts_derived"]:
        merged["allow_hosts"] = sorted(_host_and_port(url) for url in merged["urls"])
    return merged


def _host_and_port(url: str) -> str:
    """``host:port`` of ``url`` for the default allow-list (a URL that does not parse allows nothing)."""
    try:
        target = parse_target(url)
    except PermanentError:
        return "invalid.invalid:1"  # matches nothing; check() refuses the URL itself with its reason
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"{host}:{target.port}"


def signing_secrets(value: Any) -> list[str]:
    """The secrets ``custom.webhook.secret`` holds: a list, one string, or ``whsec_`` ones separated by spaces."""
    if isinstance(value, list | tuple):
        return [str(v) for v in value if v not in (None, "")]
    if value in (None, ""):
        return []
    text = str(value)
    parts = text.split()
    if len(parts) > 1 and all(part.startswith(SECRET_PREFIX) for part in parts):
        return parts
    return [text]


def signing_key(secret: str) -> bytes:
    """The HMAC key of ``secret``: the bytes a ``whsec_<base64>`` secret encodes, else its UTF-8 bytes."""
    if not secret.startswith(SECRET_PREFIX):
        return secret.encode("utf-8")
    encoded = secret[len(SECRET_PREFIX):]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a whsec_ secret must hold base64 after the prefix") from None
    if not key:
        raise ValueError("a whsec_ secret must hold a key after the prefix")
    return key


def host_guard(options: Mapping[str, Any], source: str | None = None) -> HostGuard:
    """The guard of ``allow_hosts``: private addresses only when allowed outright or named with their port
    in an ``allow_hosts`` the operator wrote (the default one, taken from ``urls``, names nothing)."""
    private: PrivatePolicy = ("allow" if options["allow_private_addresses"]
                              else "refuse" if options.get("allow_hosts_derived") else "named")
    return HostGuard(options["allow_hosts"], setting="custom.webhook.allow_hosts", private=private,
                     subject="webhook URL", source=source,
                     private_hint="custom.webhook.allow_private_addresses allows it, or an entry of "
                                  "custom.webhook.allow_hosts naming the host with its port")


def check(config: Any) -> None:
    options = settings(config)
    source = getattr(config, "source", None)
    if not options["urls"]:
        raise PluginNotConfigured("set custom.webhook.urls (e.g. SQAPI_WEBHOOK_URLS with conf/sqapi.yml)")
    if not options["secrets"]:
        raise PluginNotConfigured("set custom.webhook.secret (e.g. SQAPI_WEBHOOK_SECRET) to sign notifications")
    for position, secret in enumerate(options["secrets"], 1):
        try:
            signing_key(secret)
        except ValueError as exc:  # the message never holds the secret
            raise ConfigError("custom.webhook.secret", f"secret {position}: {exc}",
                              "write whsec_ and the base64 of the key, or a secret without the prefix",
                              source) from None
    if not isinstance(options["legacy_signature"], bool):
        raise ConfigError("custom.webhook.legacy_signature", "must be true or false",
                          "set custom.webhook.legacy_signature: true to also send X-Sqapi-Signature", source)
    guard = host_guard(options, source)
    for url in options["urls"]:
        try:
            guard.check(url)
        except PermanentError as exc:
            raise ConfigError("custom.webhook.urls", str(exc), "add its host and port to custom.webhook.allow_hosts "
                              "or fix the URL", source) from None


def execute(config: Any, database: Any, message: Any, metadata: dict[str, Any], data: io.BufferedReader) \
        -> dict[str, Any]:
    options = settings(config)
    urls = list(options["urls"])
    field = options["callback_field"]
    if field and (message.body or {}).get(field):
        urls.append(str(message.body[field]))
    deliveries: list[dict[str, Any]] = []
    failures: list[Exception] = []
    for url in urls:
        delivery_id = delivery_id_for(message.uuid, message.hash_digest, url)
        body = notification_body(message, metadata, options, delivery_id)
        try:
            status = deliver(url, body, delivery_id, options)
            deliveries.append({"url": url_for_logs(url), "delivery_id": delivery_id, "status": status})
        except (PermanentError, ConnectorError) as exc:
            failures.append(exc)
            deliveries.append({"url": url_for_logs(url), "delivery_id": delivery_id, "error": str(exc)})
    if failures:
        retryable = [f for f in failures if isinstance(f, ConnectorError)]
        reasons = "; ".join(str(f) for f in failures)
        # a retry re-sends to every URL (with the same delivery ids): receivers drop repeats
        raise (ConnectorError(reasons) if retryable else PermanentError(reasons))
    return {"deliveries": deliveries}


def delivery_id_for(uuid: str, hash_digest: str | None, url: str) -> str:
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"sqapi-webhook:{uuid}:{hash_digest}:{url}"))


def notification_body(message: Any, metadata: Mapping[str, Any], options: Mapping[str, Any],
                      delivery_id: str) -> bytes:
    payload = {
        "delivery_id": delivery_id,
        "event": EVENT,
        "uuid": message.uuid,
        "data_type": message.type,
        "hash_digest": message.hash_digest,
        "plugins": {name: {"status": s.get("status"), "info": s.get("info")}
                    for name, s in (getattr(message, "plugin_statuses", None) or {}).items()},
        "metadata": {key: metadata[key] for key in options["metadata_fields"] if key in metadata},
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")


def timestamp() -> int:
    """Seconds since the epoch for ``webhook-timestamp`` (a function, so tests can move the clock)."""
    return int(time.time())


def standard_signature(delivery_id: str, sent_at: int, body: bytes, secrets: list[str]) -> str:
    """``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` per secret, space-separated."""
    content = f"{delivery_id}.{sent_at}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(signing_key(secret), content, hashlib.sha256).digest()).decode()
                    for secret in secrets)


def legacy_signature(body: bytes, secret: str) -> str:
    """``X-Sqapi-Signature``: ``sha256=`` and the hex HMAC-SHA256 of ``body`` keyed with ``secret`` as written."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def signature_headers(delivery_id: str, body: bytes, options: Mapping[str, Any], sent_at: int) -> dict[str, str]:
    """The signing headers of one attempt sent at ``sent_at``."""
    headers = {"webhook-id": delivery_id, "webhook-timestamp": str(sent_at),
               "webhook-signature": standard_signature(delivery_id, sent_at, body, options["secrets"])}
    if options["legacy_signature"]:
        headers[SIGNATURE_HEADER] = legacy_signature(body, options["secrets"][0])
    return headers


def trace_headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the trace the call runs in; ``{}`` when tracing is off.

    sqapi runs a traced plugin call in its span's context, in a worker process too; with tracing off
    nothing has imported OpenTelemetry and nothing is imported here either."""
    if "opentelemetry.context" not in sys.modules:
        return {}
    from sqapi.core.tracing import current_headers

    return current_headers()


def deliver(url: str, body: bytes, delivery_id: str, options: Mapping[str, Any]) -> int:
    """POST ``body`` to ``url`` with retries; returns the HTTP status of the accepted delivery."""
    guard = host_guard(options)
    guard.check(url)  # a URL that is not allowed is refused before any attempt
    shown = url_for_logs(url)
    retries = int(options["max_retries"])
    problem = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(exponential(attempt, float(options["backoff"]), float(options["max_backoff"])))
        headers = {"Content-Type": "application/json", "User-Agent": "sqapi-webhook", DELIVERY_HEADER: delivery_id,
                   "X-Sqapi-Event": EVENT, **trace_headers(),
                   **signature_headers(delivery_id, body, options, timestamp())}
        try:
            response, _ = guard.request("POST", url, headers=headers, data=body, timeout=float(options["timeout"]))
        except requests.Timeout:
            problem = f"timed out after {options['timeout']}s"
        except requests.ConnectionError as exc:
            problem = f"connection failed: {type(exc).__name__}"
        else:
            with response:
                status = response.status_code
            if 200 <= status < 300:
                log.info("webhook %s delivered to %s (%s)", delivery_id, shown, status)
                return status
            if 300 <= status < 400:
                raise PermanentError(f"webhook {shown} answered {status} (redirect not followed)")
            if status not in RETRYABLE_STATUS:
                raise PermanentError(f"webhook {shown} refused the notification ({status})")
            problem = f"answered {status}"
        log.warning("webhook %s to %s %s (attempt %d of %d)", delivery_id, shown, problem, attempt + 1, retries + 1)
    raise ConnectorError(f"webhook {shown} {problem} on every attempt ({retries + 1})")
