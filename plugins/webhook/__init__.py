"""webhook: tells each configured URL what happened to a message, signed, after every other plugin.

Runs last (``plugin.after: ['*']``) and POSTs one JSON notification per URL::

    {"delivery_id": "...", "event": "message.processed", "uuid": "...", "data_type": "application/pdf",
     "hash_digest": "...", "plugins": {"pdf_extractor": {"status": "DONE", "info": null}, ...},
     "metadata": {...only the keys in metadata_fields...}}

Headers: ``X-Sqapi-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes with the shared
secret>``, ``X-Sqapi-Delivery: <delivery id>`` and ``X-Sqapi-Event``.  The delivery id is a
uuid5 of (message uuid, data hash, URL): the same for every retry and redelivery of the same
notification, so a receiver can drop repeats.

Safety: a URL must be http(s) and its host must match ``allow_hosts`` (default: the hosts of
the configured ``urls``); its name is resolved and refused when any address is private,
loopback, link-local, multicast or reserved, unless ``allow_private_addresses: true``; the
request then goes to the address that was checked (no second lookup), and redirects are not
followed.  Timeouts, connection errors, 408, 429 and 5xx are retried with exponential backoff,
then raised as :class:`~sqapi.errors.ConnectorError` (the message is retried later and only the
unfinished plugins run again); a refused URL, a redirect or another 4xx is a
:class:`~sqapi.errors.PermanentError`.  The secret is never logged; URLs are logged without
their query string.

Inactive (``sqapi plugins`` says why) until ``custom.webhook.urls`` and ``secret`` are set.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import socket
import time
import uuid as uuidlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from sqapi.config import url_for_logs
from sqapi.errors import ConfigError, ConnectorError, PermanentError, PluginNotConfigured

DEFAULTS: dict[str, Any] = {
    "urls": [],                       # where notifications go
    "secret": "",                     # shared HMAC-SHA256 secret
    "allow_hosts": [],                # host patterns (fnmatch); empty: the hosts of urls
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
    if not merged["allow_hosts"]:
        merged["allow_hosts"] = sorted({urlsplit(url).hostname or "" for url in merged["urls"]} - {""})
    return merged


def check(config: Any) -> None:
    options = settings(config)
    if not options["urls"]:
        raise PluginNotConfigured("set custom.webhook.urls (e.g. SQAPI_WEBHOOK_URLS with conf/sqapi.yml)")
    if not options["secret"]:
        raise PluginNotConfigured("set custom.webhook.secret (e.g. SQAPI_WEBHOOK_SECRET) to sign notifications")
    for url in options["urls"]:
        try:
            allowed_url(url, options)
        except PermanentError as exc:
            raise ConfigError("custom.webhook.urls", str(exc), "add its host to custom.webhook.allow_hosts or "
                              "fix the URL", getattr(config, "source", None)) from None


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


def sign(body: bytes, secret: str) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def allowed_url(url: str, options: Mapping[str, Any]) -> tuple[str, str, int]:
    """(scheme, host, port) of ``url`` when its scheme and host are allowed; PermanentError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PermanentError(f"webhook URL {url_for_logs(url)!r} refused: only http(s) URLs with a host")
    host = parts.hostname.lower()
    if not any(fnmatch.fnmatch(host, pattern.lower()) for pattern in options["allow_hosts"]):
        raise PermanentError(f"webhook URL {url_for_logs(url)!r} refused: host {host} is not in "
                             "custom.webhook.allow_hosts")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise PermanentError(f"webhook URL {url_for_logs(url)!r} refused: bad port") from None
    return parts.scheme, host, port


#: IPv6 prefixes that lead to IPv4 space (NAT64, RFC 6052 / 8215): never a webhook's own address
_TRANSLATED = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def globally_reachable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is a public unicast address (not private, shared 100.64/10, loopback, NAT64, ...)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in network for network in _TRANSLATED):
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return globally_reachable(embedded)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback
                                 or ip.is_link_local or ip.is_private)


def resolve_allowed(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to, after checking every address ``host`` resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectorError(f"webhook host {host} does not resolve: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if not globally_reachable(ip):
                raise PermanentError(f"webhook host {host} refused: it resolves to {ip}, a private, loopback, "
                                     "link-local or otherwise not globally reachable address "
                                     "(custom.webhook.allow_private_addresses allows it)")
    return addresses[0]


class _PinnedHostAdapter(HTTPAdapter):
    """Connects to the checked address while TLS still verifies the certificate of the host name."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = self._hostname
        kwargs["assert_hostname"] = self._hostname
        super().init_poolmanager(*args, **kwargs)


def deliver(url: str, body: bytes, delivery_id: str, options: Mapping[str, Any]) -> int:
    """POST ``body`` to ``url`` with retries; returns the HTTP status of the accepted delivery."""
    scheme, host, port = allowed_url(url, options)
    parts = urlsplit(url)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "sqapi-webhook",
        SIGNATURE_HEADER: sign(body, str(options["secret"])),
        DELIVERY_HEADER: delivery_id,
        "X-Sqapi-Event": EVENT,
        "Host": parts.netloc.rsplit("@", 1)[-1],
    }
    retries = int(options["max_retries"])
    problem = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(float(options["max_backoff"]), float(options["backoff"]) * 2 ** (attempt - 1)))
        address = resolve_allowed(host, port, bool(options["allow_private_addresses"]))
        netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        target = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
        with requests.Session() as session:
            session.trust_env = False  # no proxy from the environment: the checked address is the one used
            session.mount(f"{scheme}://", _PinnedHostAdapter(host))
            try:
                response = session.post(target, data=body, headers=headers, timeout=float(options["timeout"]),
                                        allow_redirects=False)
            except requests.Timeout:
                problem = f"timed out after {options['timeout']}s"
            except requests.ConnectionError as exc:
                problem = f"connection failed: {type(exc).__name__}"
            else:
                status = response.status_code
                if 200 <= status < 300:
                    log.info("webhook %s delivered to %s (%s)", delivery_id, url_for_logs(url), status)
                    return status
                if 300 <= status < 400:
                    raise PermanentError(f"webhook {url_for_logs(url)} answered {status} (redirect not followed)")
                if status not in RETRYABLE_STATUS:
                    raise PermanentError(f"webhook {url_for_logs(url)} refused the notification ({status})")
                problem = f"answered {status}"
        log.warning("webhook %s to %s %s (attempt %d of %d)", delivery_id, url_for_logs(url), problem, attempt + 1,
                    retries + 1)
    raise ConnectorError(f"webhook {url_for_logs(url)} {problem} on every attempt ({retries + 1})")
