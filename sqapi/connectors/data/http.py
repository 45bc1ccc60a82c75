"""``data_store: {type: http, ...}`` -- objects fetched over HTTP(S).

Keys:

* ``allowed_hosts`` (required): where sqapi may fetch from; a URL for anything else is refused.
  Each entry is ``host`` (the scheme's default port only: 80 for http, 443 for https),
  ``host:port`` (that port) or ``host:*`` (every port); the host may be a name, an IPv4
  address, ``[IPv6]`` or a ``*``/``?`` pattern (``*.example.com``).  ``['*']`` allows every host
  on the default ports and ``['*:*']`` on every port -- only for trusted publishers.  Loopback,
  private, link-local, multicast, unspecified and reserved addresses are refused after the name
  is resolved, unless an entry names that host without a wildcard and with its port number
  (``127.0.0.1:8080``, ``files.internal:9000``).  See :mod:`sqapi.connectors.guard`.
* ``base_url``: where references that are not absolute URLs live.  Such a reference is an object
  name: it is percent-encoded (``/`` kept) and appended to ``base_url``, so ``100% sure.pdf`` or
  ``50%20off.pdf`` fetch the objects of exactly those names; a ``.`` or ``..`` segment is refused
  (it would lead out of ``base_url``).  Leading slashes are ignored.  An absolute URL is fetched
  as it is, wherever ``allowed_hosts`` allows.
* ``max_redirects`` (default 5): redirects (301, 302, 303, 307, 308) followed, each target checked
  like the first URL; the configured ``headers`` go to the first URL's host and port only, and a
  redirect from https to http is refused.  0: a redirect is refused.
* ``max_bytes`` (default 1 GiB): larger objects are refused, checked while streaming.
* ``timeout`` (seconds, default 30): for connecting and for each read.
* ``total_timeout`` (seconds, default 600): the whole download; a server that keeps sending a
  trickle of bytes is given up after it (a retryable :class:`~sqapi.errors.ConnectorError`).
* ``headers`` (sent with every request to the first URL's origin), ``verify`` (TLS).
* ``temp_dir``: where the stream is written (default: the system's temp folder).

The request goes to exactly the host, port and address that were checked (the URL is parsed
once, the way the sender reads it; no second DNS lookup; no proxy from the environment).

404/410 -> :class:`LookupError` (retried: the object may not be there yet); 5xx, 429, network
errors and a name that does not resolve -> :class:`~sqapi.errors.ConnectorError` (retried); other
4xx, a URL, host, port, address or redirect not allowed, or an object over ``max_bytes`` ->
:class:`~sqapi.errors.AccessDenied` (not retried).  Messages show URLs without user info or query.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any
from urllib.parse import quote, urlsplit

import requests
import urllib3

from sqapi.config import require_keys
from sqapi.connectors.guard import HostGuard, shown_url
from sqapi.errors import AccessDenied, ConfigError, ConnectorError, NotFound

CHUNK = 256 * 1024
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_TOTAL_TIMEOUT = 600.0
DEFAULT_MAX_REDIRECTS = 5


def validate_config(config: dict[str, Any]) -> None:
    require_keys(config, "data_store", [("allowed_hosts", list)])
    host_guard(config)  # each entry is host, host:port or host:*
    max_bytes = config.get("max_bytes", DEFAULT_MAX_BYTES)
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ConfigError("data_store.max_bytes", "must be a positive whole number of bytes",
                          "set data_store.max_bytes, e.g. 104857600")
    max_redirects = config.get("max_redirects", DEFAULT_MAX_REDIRECTS)
    if isinstance(max_redirects, bool) or not isinstance(max_redirects, int) or max_redirects < 0:
        raise ConfigError("data_store.max_redirects", f"must be a whole number, 0 or more, not {max_redirects!r}",
                          f"set data_store.max_redirects, e.g. {DEFAULT_MAX_REDIRECTS}")
    for name in ("timeout", "total_timeout"):
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
            raise ConfigError(f"data_store.{name}", f"must be a positive number of seconds, not {value!r}",
                              f"set data_store.{name}, e.g. {30 if name == 'timeout' else 600}")


def host_guard(config: dict[str, Any]) -> HostGuard:
    """The guard of ``allowed_hosts``: private addresses only for a host named with its port."""
    return HostGuard(config.get("allowed_hosts") or [], setting="data_store.allowed_hosts", private="named")


def _url_for(config: dict[str, Any], object_ref: str) -> str:
    """An absolute URL as it is; else the object name ``object_ref`` under ``base_url``, percent-encoded."""
    if urlsplit(object_ref).scheme in ("http", "https"):
        return object_ref
    if not config.get("base_url"):
        raise AccessDenied(f"'{shown_url(object_ref)}' is not an http(s) URL and data_store.base_url is not set")
    name = object_ref.lstrip("/")
    if any(part in (".", "..") for part in name.split("/")):
        raise AccessDenied(f"'{object_ref}' refused: a '.' or '..' segment would lead out of data_store.base_url")
    return str(config["base_url"]).rstrip("/") + "/" + quote(name, safe="/")


def download_to_disk(config: dict[str, Any], object_ref: str) -> str:
    """Stream ``object_ref`` into a new temp file and return its path (the caller deletes it)."""
    url = _url_for(config, object_ref)
    guard = host_guard(config)
    max_bytes = int(config.get("max_bytes", DEFAULT_MAX_BYTES))
    total_timeout = float(config.get("total_timeout") or DEFAULT_TOTAL_TIMEOUT)
    deadline = time.monotonic() + total_timeout
    timeout = min(float(config.get("timeout") or 30), total_timeout)
    try:
        response, target = guard.request("GET", url, headers=config.get("headers") or {}, timeout=timeout,
                                         verify=config.get("verify", True), stream=True,
                                         max_redirects=int(config.get("max_redirects", DEFAULT_MAX_REDIRECTS)))
    except requests.RequestException as exc:
        raise ConnectorError(f"cannot fetch {shown_url(url)}: {type(exc).__name__}") from None
    shown = target.shown
    with response:
        status = response.status_code
        if status in (404, 410):
            raise NotFound(f"{shown} answered {status}")
        if status == 429 or status >= 500:
            raise ConnectorError(f"{shown} answered {status}")
        if status != 200:
            raise AccessDenied(f"{shown} answered {status}")
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise AccessDenied(f"{shown} is {declared} bytes, over data_store.max_bytes ({max_bytes})")
        fd, path = tempfile.mkstemp(prefix="sqapi-http-", dir=config.get("temp_dir"))
        try:
            written = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := response.raw.read1(CHUNK, decode_content=True):  # what arrived, up to CHUNK
                    if time.monotonic() > deadline:
                        raise ConnectorError(f"download of {shown} did not finish within data_store.total_timeout "
                                             f"({total_timeout:g}s)")
                    written += len(chunk)
                    if written > max_bytes:
                        raise AccessDenied(f"{shown} is over data_store.max_bytes ({max_bytes})")
                    out.write(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            os.unlink(path)
            raise ConnectorError(f"download of {shown} broke off: {type(exc).__name__}") from None
        except BaseException:
            os.unlink(path)
            raise
    return path
