"""``data_store: {type: http, ...}`` -- objects fetched over HTTP(S).

Keys:

* ``allowed_hosts`` (required): host names (or ``host:port``) sqapi may fetch from; a
  reference to any other host is refused.  ``['*']`` allows every host -- only for trusted
  publishers.
* ``base_url``: prefix for references that are not absolute URLs.
* ``max_bytes`` (default 1 GiB): larger objects are refused, checked while streaming.
* ``timeout`` (seconds, default 30): for connecting and for each read.
* ``total_timeout`` (seconds, default 600): the whole download; a server that keeps sending a
  trickle of bytes is given up after it (a retryable :class:`~sqapi.errors.ConnectorError`).
* ``headers`` (sent with every request), ``verify`` (TLS).
* ``temp_dir``: where the stream is written (default: the system's temp folder).

404/410 -> :class:`LookupError` (retried: the object may not be there yet); 5xx, 429 and
network errors -> :class:`~sqapi.errors.ConnectorError` (retried); other 4xx, a host not
allowed, or an object over ``max_bytes`` -> :class:`~sqapi.errors.AccessDenied` (not retried).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from sqapi.config import require_keys
from sqapi.errors import AccessDenied, ConfigError, ConnectorError, NotFound

CHUNK = 256 * 1024
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_TOTAL_TIMEOUT = 600.0


def validate_config(config: dict[str, Any]) -> None:
    require_keys(config, "data_store", [("allowed_hosts", list)])
    max_bytes = config.get("max_bytes", DEFAULT_MAX_BYTES)
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ConfigError("data_store.max_bytes", "must be a positive whole number of bytes",
                          "set data_store.max_bytes, e.g. 104857600")
    for name in ("timeout", "total_timeout"):
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
            raise ConfigError(f"data_store.{name}", f"must be a positive number of seconds, not {value!r}",
                              f"set data_store.{name}, e.g. {30 if name == 'timeout' else 600}")


def _url_for(config: dict[str, Any], object_ref: str) -> str:
    if urlsplit(object_ref).scheme in ("http", "https"):
        url = object_ref
    elif config.get("base_url"):
        url = urljoin(str(config["base_url"]).rstrip("/") + "/", object_ref.lstrip("/"))
    else:
        raise AccessDenied(f"'{object_ref}' is not an http(s) URL and data_store.base_url is not set")
    parts = urlsplit(url)
    allowed = [str(h).lower() for h in config.get("allowed_hosts") or []]
    host = (parts.hostname or "").lower()
    host_port = f"{host}:{parts.port}" if parts.port else host
    if "*" not in allowed and host not in allowed and host_port not in allowed:
        raise AccessDenied(f"host '{host_port}' is not in data_store.allowed_hosts")
    return url


def download_to_disk(config: dict[str, Any], object_ref: str) -> str:
    """Stream ``object_ref`` into a new temp file and return its path (the caller deletes it)."""
    url = _url_for(config, object_ref)
    max_bytes = int(config.get("max_bytes", DEFAULT_MAX_BYTES))
    total_timeout = float(config.get("total_timeout") or DEFAULT_TOTAL_TIMEOUT)
    deadline = time.monotonic() + total_timeout
    timeout = min(float(config.get("timeout") or 30), total_timeout)
    try:
        response = requests.get(url, stream=True, timeout=timeout, allow_redirects=False,
                                headers=config.get("headers") or {}, verify=config.get("verify", True))
    except requests.RequestException as exc:
        raise ConnectorError(f"cannot fetch {url}: {type(exc).__name__}") from None
    with response:
        status = response.status_code
        if status in (404, 410):
            raise NotFound(f"{url} answered {status}")
        if status == 429 or status >= 500:
            raise ConnectorError(f"{url} answered {status}")
        if status != 200:
            raise AccessDenied(f"{url} answered {status}")
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise AccessDenied(f"{url} is {declared} bytes, over data_store.max_bytes ({max_bytes})")
        fd, path = tempfile.mkstemp(prefix="sqapi-http-", dir=config.get("temp_dir"))
        try:
            written = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := response.raw.read1(CHUNK, decode_content=True):  # what arrived, up to CHUNK
                    if time.monotonic() > deadline:
                        raise ConnectorError(f"download of {url} did not finish within data_store.total_timeout "
                                             f"({total_timeout:g}s)")
                    written += len(chunk)
                    if written > max_bytes:
                        raise AccessDenied(f"{url} is over data_store.max_bytes ({max_bytes})")
                    out.write(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            os.unlink(path)
            raise ConnectorError(f"download of {url} broke off: {type(exc).__name__}") from None
        except BaseException:
            os.unlink(path)
            raise
    return path
