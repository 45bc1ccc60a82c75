"""``data_store: {type: swift, ...}`` -- objects kept in OpenStack Swift.

Keys of the ``data_store`` section (sqAPI's names):

* ``auth_url`` (required): e.g. ``http://127.0.0.1:8080/auth/v1.0`` (tempauth) or a Keystone
  URL such as ``https://keystone.example:5000/v3``.
* ``access_key_id`` (required): the user, e.g. ``test:tester`` (v1) or a Keystone user name.
* ``secret_access_key`` (required): the key or password.  Never logged, never in an error.
* ``auth_version`` (default ``'1'``): ``'1'``, ``'2'`` or ``'3'``; 2 and 3 need
  python-keystoneclient and usually ``os_options``.
* ``os_options`` (dict): passed through to swiftclient as is, e.g. ``{project_name: demo,
  user_domain_name: Default, project_domain_name: Default, region_name: RegionOne}``.
* ``containers`` (list): the containers an object is looked up in, in order.  Empty or absent:
  every container of the account, in the account's (alphabetical) order, listed anew on
  every lookup.
* ``insecure`` (default false): do not verify TLS certificates.
* ``temp_dir``: where downloads are written (default: the system's temp folder).
* ``timeout`` (seconds, default 30): for each HTTP request (connect and each read).
* ``retries`` (default 1): swiftclient's own retries of one request, kept low so that an
  outage surfaces fast; sqapi's processor retries the message itself.

Object references: if ``object_ref`` contains a ``/`` and its first segment names one of the
containers (the configured ones, or the account's when none are configured), it is read as
``container/object name`` and looked up there only.  Otherwise the whole reference is the
object name, looked up in each container in turn; the first hit wins.  Leading slashes are
ignored.  A reference with a ``.`` or ``..`` segment is refused: HTTP clients resolve those
before Swift sees the path, so ``incoming/../private/x`` would read another container.

Errors (nothing of swiftclient, requests or urllib3 escapes this module):

* the object is in none of the containers -> :class:`~sqapi.errors.NotFound` (a
  :class:`LookupError`; retried, as it may not have arrived yet);
* login refused (401/403), connection refused, timeouts, 5xx, 429, a broken-off or corrupt
  download -> :class:`~sqapi.errors.ConnectorError` (retried);
* an empty reference, one with a ``.`` or ``..`` segment, or another 4xx answer ->
  :class:`~sqapi.errors.AccessDenied` (not retried);
* a wrong section -> :class:`~sqapi.errors.ConfigError` from :func:`connect` /
  :func:`validate_config`, before any I/O.

A failed download never leaves its temporary file behind.

Secrets: this module puts neither the key nor a token in a message or log line, and sets
swiftclient's header redaction to reveal no prefix of them either (a process-wide setting of
swiftclient).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqapi.config import url_for_logs
from sqapi.errors import AccessDenied, ConfigError, ConnectorError, NotFound, SqapiError

try:
    from swiftclient import client as swift_client
    from swiftclient.exceptions import ClientException
except ImportError as _exc:  # pragma: no cover - depends on the installation
    raise ImportError("data_store type 'swift' needs python-swiftclient: "
                      "pip install python-swiftclient") from _exc

log = logging.getLogger(__name__)

#: Bytes read from Swift and written to the temp file at a time.
CHUNK_SIZE = 256 * 1024
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 1
TOPIC = "data_store"
_AUTH_VERSIONS = {"1": "1.0", "1.0": "1.0", "2": "2.0", "2.0": "2.0", "3": "3"}
_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,16}")
_MD5_HEX = re.compile(r"[0-9a-f]{32}")
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")

# swiftclient logs failed requests (at INFO) with auth headers cut to a prefix; reveal none.
swift_client.logger_settings["reveal_sensitive_prefix"] = 0


@dataclass(frozen=True)
class SwiftSettings:
    """The validated ``data_store`` section; ``repr`` leaves out the key and ``os_options``."""

    auth_url: str
    user: str
    key: str = field(repr=False)
    auth_version: str = "1.0"
    os_options: dict[str, Any] = field(default_factory=dict, repr=False)
    containers: tuple[str, ...] = ()
    insecure: bool = False
    temp_dir: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES


def _bool(config: Mapping[str, Any], name: str, default: bool) -> bool:
    value = config.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"{TOPIC}.{name}", "must be true or false", f"set {TOPIC}.{name} to true or false")


def _required_str(config: Mapping[str, Any], name: str) -> str:
    value = config.get(name)
    if value is None or value == "":
        raise ConfigError(f"{TOPIC}.{name}", "missing", f"set {TOPIC}.{name}")
    if not isinstance(value, str):
        raise ConfigError(f"{TOPIC}.{name}", "must be a string", f"set {TOPIC}.{name} to a string")
    return value


def parse_settings(config: Mapping[str, Any]) -> SwiftSettings:
    """Validate the ``data_store`` section; raise :class:`ConfigError` naming the key and the fix.

    Does no I/O.  Error messages never contain ``secret_access_key`` or ``os_options`` values.
    """
    auth_url = _required_str(config, "auth_url")
    parts = urlsplit(auth_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{TOPIC}.auth_url", "must be an http(s) URL",
                          f"set {TOPIC}.auth_url, e.g. http://127.0.0.1:8080/auth/v1.0")
    user = _required_str(config, "access_key_id")
    key = _required_str(config, "secret_access_key")

    raw_version = config.get("auth_version", "1")
    version = _AUTH_VERSIONS.get(str(raw_version if raw_version not in (None, "") else "1").strip())
    if version is None:
        raise ConfigError(f"{TOPIC}.auth_version", f"'{raw_version}' is not supported",
                          f"set {TOPIC}.auth_version to '1' (tempauth/swauth) or '3' (Keystone)")
    if version != "1.0" and importlib.util.find_spec("keystoneclient") is None:
        raise ConfigError(f"{TOPIC}.auth_version", f"auth version {version} needs python-keystoneclient",
                          "pip install python-keystoneclient, or use auth_version '1'")

    os_options = config.get("os_options") or {}
    if not isinstance(os_options, Mapping):
        raise ConfigError(f"{TOPIC}.os_options", "must be a mapping",
                          f"set {TOPIC}.os_options to a mapping such as {{project_name: demo}}")

    containers_raw = config.get("containers") or []
    if isinstance(containers_raw, str):
        containers_raw = [containers_raw]
    if not isinstance(containers_raw, list | tuple) or not all(
            isinstance(c, str) and c and "/" not in c for c in containers_raw):
        raise ConfigError(f"{TOPIC}.containers", "must be a list of container names (without '/')",
                          f"set {TOPIC}.containers, e.g. [incoming, archive], or leave it out to search all")

    timeout = config.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"{TOPIC}.timeout", "must be a positive number of seconds",
                          f"set {TOPIC}.timeout, e.g. 30")
    retries = config.get("retries", DEFAULT_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"{TOPIC}.retries", "must be a whole number >= 0", f"set {TOPIC}.retries, e.g. 1")
    temp_dir = config.get("temp_dir") or None
    if temp_dir is not None and not isinstance(temp_dir, str):
        raise ConfigError(f"{TOPIC}.temp_dir", "must be a directory path",
                          f"set {TOPIC}.temp_dir to a directory")

    return SwiftSettings(
        auth_url=auth_url, user=user, key=key, auth_version=version, os_options=dict(os_options),
        containers=tuple(containers_raw), insecure=_bool(config, "insecure", False), temp_dir=temp_dir,
        timeout=float(timeout), retries=retries,
    )


def validate_config(config: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for a ``data_store`` section this module cannot work with."""
    parse_settings(config)


def _object_ref(object_ref: str) -> str:
    """``object_ref`` without leading slashes; :class:`AccessDenied` when it is empty or has a ``.``/``..``
    segment (requests and urllib3 resolve those, so Swift would be asked for another path)."""
    ref = (object_ref or "").lstrip("/")
    if not ref:
        raise AccessDenied("empty Swift object reference")
    if any(part in (".", "..") for part in ref.split("/")):
        raise AccessDenied(f"Swift object reference '{object_ref}' refused: a '.' or '..' segment would lead "
                           "out of its container")
    return ref


def _temp_suffix(name: str) -> str:
    """The object name's extension if it is short and plain (plugins may look at it), else ''."""
    suffix = os.path.splitext(name)[1]
    return suffix if _SAFE_SUFFIX.fullmatch(suffix) else ""


class SwiftStore:
    """A connection to one Swift account; see the module docstring for config and errors.

    Construction validates the config and does no I/O: the login happens on the first call.
    Safe to share between threads: each thread gets its own swiftclient connection (and token).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.settings = parse_settings(config)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[swift_client.Connection] = []
        self._safe_auth_url = url_for_logs(self.settings.auth_url)

    def __repr__(self) -> str:
        return f"SwiftStore(auth_url={self._safe_auth_url!r}, user={self.settings.user!r})"

    def __enter__(self) -> SwiftStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- public contract -------------------------------------------------------------------

    def download_to_disk(self, object_ref: str) -> str:
        """Stream ``object_ref`` into a NEW temp file and return its path; the caller deletes it.

        The object is read in :data:`CHUNK_SIZE` pieces, never whole in memory, and checked
        against its Content-Length (and MD5 ETag, for plain objects).  Raises
        :class:`NotFound` when no container holds it, :class:`ConnectorError` when Swift cannot
        be reached or refuses the login, :class:`AccessDenied` for an empty reference, one with a
        ``.``/``..`` segment, or another 4xx.  On any failure no temp file is left behind.
        """
        candidates = self._candidates(object_ref)
        for container, name in candidates:
            path = self._download(container, name)
            if path is not None:
                return path
        where = ", ".join(dict.fromkeys(c for c, _ in candidates)) or "(the account has no containers)"
        raise NotFound(f"Swift object '{object_ref}' not found in container(s): {where}")

    def upload(self, local_path: str, object_ref: str) -> str:
        """Stream ``local_path`` into Swift as ``object_ref``; returns the reference to publish.

        ``container/name`` (a configured container) puts it there; a bare name goes into the
        first configured container.  The container is created when missing, and Swift's ETag is
        checked against the file's MD5.  A reference with a ``.``/``..`` segment is refused.
        """
        ref = _object_ref(object_ref)
        first, sep, rest = ref.partition("/")
        if sep and rest and first in self.settings.containers:
            container, name = first, rest
        elif self.settings.containers:
            container, name = self.settings.containers[0], ref
        else:
            raise AccessDenied("set data_store.containers to say which container uploads go to")
        digest = hashlib.md5(usedforsecurity=False)
        with open(local_path, "rb") as source:
            for chunk in iter(lambda: source.read(CHUNK_SIZE), b""):
                digest.update(chunk)
        size = os.path.getsize(local_path)
        what = f"PUT {container}/{name}"
        self._call(f"PUT {container}", lambda conn: conn.put_container(container))
        with open(local_path, "rb") as source:
            etag = self._call(what, lambda conn: conn.put_object(container, name, contents=source,
                                                                 content_length=size, chunk_size=CHUNK_SIZE))
        if str(etag).strip('"').lower() != digest.hexdigest():
            raise ConnectorError(f"Swift {what}: the stored object's ETag does not match the file")
        return f"{container}/{name}"

    def ping(self) -> None:
        """Log in (if needed) and HEAD the account; raise :class:`ConnectorError` if that fails."""
        self._call("HEAD account", lambda conn: conn.head_account())
        log.debug("Swift at %s answers", self._safe_auth_url)

    def close(self) -> None:
        """Close every connection this store opened.  Idempotent; the store can be used again."""
        with self._lock:
            connections, self._connections = self._connections, []
        self._local = threading.local()
        for conn in connections:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing must not fail
                log.debug("ignoring an error while closing a Swift connection", exc_info=False)

    # -- helpers ---------------------------------------------------------------------------

    def _connection(self) -> swift_client.Connection:
        conn: swift_client.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            s = self.settings
            conn = swift_client.Connection(
                authurl=s.auth_url, user=s.user, key=s.key, retries=s.retries,
                auth_version=s.auth_version, os_options=dict(s.os_options), insecure=s.insecure,
                timeout=s.timeout,
            )
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _call(self, what: str, func: Any) -> Any:
        """Run ``func(connection)``; translate whatever it raises into sqapi's errors."""
        try:
            return func(self._connection())
        except SqapiError:
            raise
        except Exception as exc:  # noqa: BLE001 - the module boundary: nothing foreign escapes
            raise self._translate(exc, what) from None

    def _scrub(self, text: str) -> str:
        """``text`` with the key and any current token replaced by ``***`` (belt and braces)."""
        secrets = [self.settings.key]
        for conn in list(self._connections):
            token = getattr(conn, "token", None)
            if isinstance(token, str):
                secrets.append(token)
        for secret in secrets:
            if secret and len(secret) >= 3:
                text = text.replace(secret, "***")
        return text

    def _translate(self, exc: BaseException, what: str) -> SqapiError:
        if isinstance(exc, ClientException):
            status = exc.http_status
            reason = f" {exc.http_reason}" if exc.http_reason else ""
            txn = f" (transaction {exc.transaction_id})" if exc.transaction_id else ""
            is_login = str(exc.msg or "").lower().startswith("auth") or status == 401
            error: SqapiError
            if status is None:
                error = ConnectorError(f"Swift {what} failed: {exc.msg}")
            elif is_login:
                error = ConnectorError(
                    f"Swift login as '{self.settings.user}' at {self._safe_auth_url} was refused during "
                    f"{what}: HTTP {status}{reason}{txn}; check {TOPIC}.access_key_id and "
                    f"{TOPIC}.secret_access_key")
            elif status == 403:
                error = ConnectorError(f"Swift {what} forbidden for user '{self.settings.user}': "
                                       f"HTTP {status}{reason}{txn}; check the user's rights")
            elif status >= 500 or status in (408, 429, 498):
                error = ConnectorError(f"Swift {what} failed: HTTP {status}{reason}{txn}")
            else:
                error = AccessDenied(f"Swift {what} refused: HTTP {status}{reason}{txn}")
        else:
            error = ConnectorError(f"Swift at {self._safe_auth_url} failed during {what}: "
                                   f"{type(exc).__name__}: {exc}")
        scrubbed = self._scrub(str(error))
        if scrubbed != str(error):
            error = type(error)(scrubbed)
        log.info("%s", scrubbed)
        return error

    def _list_containers(self) -> list[str]:
        _, listing = self._call("list containers", lambda conn: conn.get_account(full_listing=True))
        return [str(item["name"]) for item in listing]

    def _candidates(self, object_ref: str) -> list[tuple[str, str]]:
        """The (container, object name) pairs to try for ``object_ref``, in order."""
        ref = _object_ref(object_ref)
        containers: Iterable[str] = self.settings.containers or self._list_containers()
        containers = list(containers)
        first, sep, rest = ref.partition("/")
        if sep and rest and first in containers:
            return [(first, rest)]
        return [(container, ref) for container in containers]

    def _download(self, container: str, name: str) -> str | None:
        """Download ``container/name`` to a temp file; ``None`` when it is not there (404)."""
        what = f"GET {container}/{name}"
        try:
            headers, body = self._connection().get_object(container, name, resp_chunk_size=CHUNK_SIZE)
        except ClientException as exc:
            if exc.http_status == 404:
                log.debug("Swift object %s/%s not there", container, name)
                return None
            raise self._translate(exc, what) from None
        except Exception as exc:  # noqa: BLE001 - the module boundary
            raise self._translate(exc, what) from None

        path = ""
        try:
            try:
                fd, path = tempfile.mkstemp(prefix="sqapi-swift-", suffix=_temp_suffix(name),
                                            dir=self.settings.temp_dir)
            except OSError as exc:
                where = self.settings.temp_dir or tempfile.gettempdir()
                raise ConnectorError(f"cannot create a temp file for {what} in {where}: "
                                     f"{exc.strerror}") from None
            written = 0
            expected_md5 = str(headers.get("etag", "")).strip('"').lower()
            check_md5 = bool(_MD5_HEX.fullmatch(expected_md5)) and not (
                headers.get("x-static-large-object") or headers.get("x-object-manifest"))
            digest = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out:
                for chunk in body:
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise ConnectorError(f"cannot write {what} to {path}: {exc.strerror}") from None
                    written += len(chunk)
                    if check_md5:
                        digest.update(chunk)
            declared = str(headers.get("content-length", ""))
            if declared.isdigit() and int(declared) != written:
                raise ConnectorError(f"Swift {what} broke off after {written} of {declared} bytes")
            if check_md5 and digest.hexdigest() != expected_md5:
                raise ConnectorError(f"Swift {what}: the {written} bytes received do not match its ETag")
        except BaseException as exc:
            _close_quietly(body)
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            if isinstance(exc, SqapiError) or not isinstance(exc, Exception):
                raise
            raise self._translate(exc, what) from None
        log.debug("Swift object %s/%s: %d bytes -> %s", container, name, written, path)
        return path


def _close_quietly(body: Any) -> None:
    try:
        body.close()
    except Exception:  # noqa: BLE001
        pass


def upload(config: Mapping[str, Any], local_path: str, object_ref: str) -> str:
    """Module-level form of :meth:`SwiftStore.upload` (used by ``sqapi publish --upload``)."""
    with SwiftStore(config) as store:
        return store.upload(local_path, object_ref)


def connect(config: Mapping[str, Any]) -> SwiftStore:
    """Build a :class:`SwiftStore` for the ``data_store`` section; validates it, does no I/O."""
    return SwiftStore(config)


def download_to_disk(config: Mapping[str, Any], object_ref: str) -> str:
    """sqAPI-compatible: connect, stream ``object_ref`` to a new temp file, close; return its path."""
    store = connect(config)
    try:
        return store.download_to_disk(object_ref)
    finally:
        store.close()


def ping(config: Mapping[str, Any]) -> None:
    """Connect, check that Swift answers and accepts the login, close; :class:`ConnectorError` if not."""
    store = connect(config)
    try:
        store.ping()
    finally:
        store.close()
