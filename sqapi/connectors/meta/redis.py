"""``meta_store: {type: redis, ...}`` -- metadata kept in Redis at the message's ``meta_location`` key.

Config (the ``meta_store`` section)::

    type: redis
    host: localhost
    port: 6379
    db: 0
    username: null            # Redis 6 ACL user; null: the default user
    password: null
    ssl: false                # or tls: true; ssl_ca_certs: /path/ca.pem to verify the server
    url: null                 # e.g. rediss://:pass@host:6380/0 -- wins over host/port/db/password/ssl
    key_prefix: ''            # prepended to every meta_location
    socket_timeout: 5         # seconds, for connecting and for each command
    retries: 1                # immediate retries of a failed command (a dropped idle connection)

The value at ``key_prefix + meta_location`` is either a string holding one JSON object, or a
hash whose fields become the object's keys (a field value that is valid JSON is decoded, so
``count -> "3"`` gives ``3``; any other value stays a string).  A missing key raises
:class:`~sqapi.errors.NotFound` (retried: the metadata may not have been written yet); an
unreachable server or refused credentials raise :class:`~sqapi.errors.ConnectorError`; a value
that is not a JSON object, or a key of another type, raises :class:`~sqapi.errors.PermanentError`.

:func:`connect` gives one client (with its connection pool) that the loader's threads share.
The password never appears in an error or a log line.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.exceptions
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from sqapi.config import url_for_logs
from sqapi.errors import ConfigError, ConnectorError, NotFound, PermanentError


def validate_config(config: dict[str, Any]) -> None:
    def fail(key: str, problem: str, fix: str) -> None:
        raise ConfigError(f"meta_store.{key}", problem, fix)

    url = config.get("url")
    if url is not None and not (isinstance(url, str) and url.split("://", 1)[0] in ("redis", "rediss", "unix")):
        fail("url", "must be a redis://, rediss:// or unix:// URL", "write url: redis://host:6379/0")
    if not url and not config.get("host"):
        fail("host", "missing (and no url given)", "set meta_store.host or meta_store.url")
    for key in ("port", "db"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            fail(key, f"must be a whole number, not {value!r}", f"set meta_store.{key}")
    timeout = config.get("socket_timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        fail("socket_timeout", f"must be a number of seconds > 0, not {timeout!r}", "set it to e.g. 5")
    prefix = config.get("key_prefix")
    if prefix is not None and not isinstance(prefix, str):
        fail("key_prefix", "must be a string", "quote it: key_prefix: 'sqapi:'")


class RedisMeta:
    """One Redis client (and its connection pool) for the loader's lifetime."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.prefix = str(config.get("key_prefix") or "")
        timeout = float(config.get("socket_timeout") or 5)
        # one quick retry re-opens a connection the server dropped while idle; longer outages are the
        # processor's to retry, with its growing delays, not a reason to hold a worker here
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), int(config.get("retries", 1)))
        common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                                  "decode_responses": False, "health_check_interval": 30, "retry": retry}
        url = config.get("url")
        self._password = str(config.get("password") or "") or (urlsplit(url).password or "" if url else "")
        if url:
            self.where = url_for_logs(url)
            self.client = redis.Redis.from_url(url, **common)
        else:
            host, port, db = str(config.get("host") or "localhost"), int(config.get("port") or 6379), \
                int(config.get("db") or 0)
            use_ssl = bool(config.get("ssl") or config.get("tls"))
            self.where = f"{'rediss' if use_ssl else 'redis'}://{host}:{port}/{db}"
            tls: dict[str, Any] = {}
            if use_ssl:
                tls = {"ssl": True, "ssl_ca_certs": config.get("ssl_ca_certs"),
                       "ssl_cert_reqs": "required" if config.get("ssl_verify", True) else "none"}
            self.client = redis.Redis(host=host, port=port, db=db, username=config.get("username") or None,
                                      password=config.get("password") or None, **tls, **common)

    def _failure(self, exc: Exception) -> ConnectorError:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if self._password:
            reason = reason.replace(self._password, "***")
        return ConnectorError(f"Redis at {self.where} unavailable: {reason}")

    def fetch_metadata(self, reference: str) -> dict[str, Any]:
        key = self.prefix + reference
        try:
            try:
                raw = self.client.get(key)
            except redis.exceptions.ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                return self._from_hash(key, reference)
        except redis.exceptions.ResponseError as exc:
            if _is_auth_error(exc):
                raise self._failure(exc) from None
            raise PermanentError(f"Redis refused reading metadata '{reference}': {exc}") from None
        except redis.exceptions.RedisError as exc:
            raise self._failure(exc) from None
        if raw is None:
            raise NotFound(f"metadata '{reference}' not found in Redis at {self.where}")
        found = _json(raw, reference)
        if not isinstance(found, dict):
            raise PermanentError(f"metadata '{reference}' in Redis holds a JSON {type(found).__name__}, "
                                 "not an object")
        return found

    def _from_hash(self, key: str, reference: str) -> dict[str, Any]:
        if self.client.type(key) != b"hash":
            raise PermanentError(f"metadata '{reference}' in Redis is neither a JSON string nor a hash")
        fields = self.client.hgetall(key)
        if not fields:
            raise NotFound(f"metadata '{reference}' not found in Redis at {self.where}")
        found: dict[str, Any] = {}
        for name, value in fields.items():
            text = _text(value, reference)
            try:
                found[_text(name, reference)] = json.loads(text)
            except ValueError:
                found[_text(name, reference)] = text
        return found

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.exceptions.RedisError as exc:
            raise self._failure(exc) from None

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()


def connect(config: dict[str, Any]) -> RedisMeta:
    """The client the loader keeps; no I/O until the first command."""
    return RedisMeta(config)


def fetch_metadata(config: dict[str, Any], reference: str) -> dict[str, Any]:
    """sqAPI's one-shot form: a client for this call only."""
    meta = RedisMeta(config)
    try:
        return meta.fetch_metadata(reference)
    finally:
        meta.close()


def _is_auth_error(exc: Exception) -> bool:
    text = str(exc).upper()
    return any(word in text for word in ("WRONGPASS", "NOAUTH", "NOPERM", "INVALID PASSWORD"))


def _text(value: bytes | str, reference: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise PermanentError(f"metadata '{reference}' in Redis is not UTF-8 text") from None


def _json(raw: bytes | str, reference: str) -> Any:
    try:
        return json.loads(_text(raw, reference))
    except ValueError as exc:
        raise PermanentError(f"metadata '{reference}' in Redis is not valid JSON ({exc})") from None

