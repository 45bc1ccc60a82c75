"""``database: {type: elasticsearch, connection: [...]}`` -- a document store for plugins (official client).

Plugins written for sqAPI that store documents keep working: ``create_document(area, body)``
indexes a document and ``fetch_document(area, body, query_clause='match')`` returns the search
hits.  Elasticsearch is never sqapi's status database (that is PostgreSQL or SQLite): it is the
``database`` a plugin's own ``config.yml`` names.

Config (the plugin's ``database`` section, as sqAPI's plugins wrote it)::

    type: elasticsearch
    connection:               # nodes of one cluster; none at all: http://localhost:9200
    - {host: es, port: 9200, user: elasticuser, password: ..., scheme: http, timeout: 2}   # name: ignored
    # or one such mapping, or URLs: "https://user:pass@es:9200" / [http://es1:9200, http://es2:9200]
    hosts: null               # the same as a list of URLs (when connection is not given)
    kwargs: {}                # passed to elasticsearch.Elasticsearch (sniff_on_start, verify_certs, api_key...)
    init: scripts/init.json   # (or sqAPI's scripts.init) run at start when it is a .json file; others are ignored

A port may be a number or a numeric string; a missing one is 9200.  Every node shares one set of
credentials (one client); ``timeout`` (seconds) becomes the client's ``request_timeout`` unless
``kwargs`` sets one.

Requests (``execute_query``, ``execute_script``): a JSON text (or, for ``execute_query``, a dict)
holding one request object or a list of them, run in order; the result is the last one's.

* ``{"index": "docs", "query": {...}, "size": 10, ...}`` -- a search (``index`` may be left out:
  every index); the rest is the search body.  Rows: each hit's ``_source`` plus ``_id`` and ``_index``.
* ``{"method": "PUT", "path": "/docs", "body": {...}, "params": {...}, "ignore": [...]}`` -- any
  other API call (an init script creating an index); ``ignore`` lists error types or statuses that
  count as success (``resource_already_exists_exception`` makes index creation repeatable).  Rows:
  the response object, as one row.

``%(name)s`` in a text stands for the JSON encoding of the keyword argument ``name`` -- a whole
JSON value, written bare (``{"term": {"uuid": %(uuid)s}}``) or quoted (``"%(uuid)s"``): strings
are quoted and escaped, numbers are not, so no value can change the request's structure.  In a
dict, a string that is exactly ``%(name)s`` becomes the value.  Script texts are cached by path
and modification time.

Errors: an unreachable cluster, refused credentials, 429 and 5xx answers are a
:class:`~sqapi.errors.ConnectorError` (retried) naming the hosts; a request the server rejects
(another 4xx) is a :class:`DocumentError` naming the operation and the index.  No message or
log line ever holds a password or an API key.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote, urlsplit
from uuid import UUID

import elasticsearch

from sqapi.connectors.db import init_script_of
from sqapi.errors import ConfigError, ConnectorError, PermanentError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORT = 9200
_SCHEMES = ("http", "https")
#: keys of a node mapping; ``name`` and ``dbname`` (sqAPI's database name) mean nothing here
_NODE_KEYS = ("host", "port", "scheme", "user", "username", "password", "timeout", "path_prefix", "url_prefix",
              "name", "dbname")
#: client keywords carrying credentials (their secret parts never appear in messages)
_AUTH_KWARGS = ("basic_auth", "http_auth", "api_key", "bearer_auth")
#: ``"%(name)s"`` (quoted) or ``%(name)s`` (bare): either way the whole JSON value
_PLACEHOLDER = re.compile(r'"%\((\w+)\)s"|%\((\w+)\)s')
_WHOLE_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE")
_REQUEST_KEYS = ("method", "path", "body", "params", "ignore")
#: statuses meaning "the cluster cannot answer now", not "the request is wrong"
_UNAVAILABLE = (429, 500, 502, 503, 504)


class DocumentError(PermanentError):
    """A request Elasticsearch rejected (bad query, missing index, conflict): names the operation and the index.

    Permanent: the same request would be rejected again.
    """


@lru_cache(maxsize=1)
def client_keywords() -> frozenset[str]:
    """The keyword arguments ``elasticsearch.Elasticsearch`` accepts (``hosts`` is built from ``connection``)."""
    names = inspect.signature(elasticsearch.Elasticsearch.__init__).parameters
    return frozenset(n for n in names if n not in ("self", "hosts") and not n.startswith("_"))


@dataclass(frozen=True)
class _Node:
    scheme: str
    host: str
    port: int
    path_prefix: str = ""

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path_prefix}"

    def mapping(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "host": self.host, "port": self.port, "path_prefix": self.path_prefix}


@dataclass
class _Settings:
    """A ``database`` section made sense of: nodes, one set of credentials, the client's other options."""

    nodes: list[_Node]
    user: str | None = None
    password: str | None = None
    timeout: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)


def validate_config(config: dict[str, Any]) -> None:
    """Raise :class:`~sqapi.errors.ConfigError` (naming the key) for a ``database`` section that cannot work."""
    _settings(config)


def _fail(key: str, problem: str, fix: str) -> NoReturn:
    raise ConfigError(f"database.{key}", problem, fix)


def _settings(config: Mapping[str, Any]) -> _Settings:
    connection, key = config.get("connection"), "connection"
    if config.get("hosts") is not None:
        if connection is not None:
            _fail("hosts", "given together with connection", "keep one of them")
        connection, key = config["hosts"], "hosts"
    if connection is not None and not isinstance(connection, list | dict | str):
        _fail(key, f"must be a list of nodes, one node or a URL, not {type(connection).__name__}",
              "write e.g. [{host: es, port: 9200}] or http://es:9200")
    entries = [] if connection is None else connection if isinstance(connection, list) else [connection]
    nodes: list[_Node] = []
    credentials: list[tuple[str, str | None]] = []
    timeouts: list[float] = []
    for number, entry in enumerate(entries):
        where = f"{key}[{number}]" if isinstance(connection, list) else key
        if isinstance(entry, str):
            node, user, password = _url_node(entry, where)
        elif isinstance(entry, dict):
            node, user, password, timeout = _mapping_node(entry, where)
            if timeout is not None:
                timeouts.append(timeout)
        else:
            _fail(where, f"must be a URL or a mapping, not {type(entry).__name__}",
                  "write http://es:9200 or {host: es, port: 9200}")
        nodes.append(node)
        if user is not None:
            credentials.append((user, password))
    secrets = [password for _user, password in credentials if password]
    if len(set(credentials)) > 1:
        _fail(key, "the nodes give different credentials", "one client uses one set: give every node the same "
              "user and password")
    settings = _Settings(nodes=nodes, secrets=secrets)
    if credentials:
        settings.user, settings.password = credentials[0]
    timeout = config.get("timeout")
    if timeout is not None:
        timeouts.append(_seconds(timeout, "timeout"))
    settings.timeout = timeouts[0] if timeouts else None
    settings.kwargs = _client_kwargs(config.get("kwargs"), settings)
    if not nodes and "cloud_id" not in settings.kwargs:
        settings.nodes = [_Node("http", "localhost", DEFAULT_PORT)]
    return settings


def _url_node(text: str, where: str) -> tuple[_Node, str | None, str | None]:
    """A node from a URL (``http://`` when no scheme is written); credentials in it come apart from the node."""
    url = text.strip() if "://" in text else f"http://{text.strip()}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        _fail(where, f"{_redacted(text)!r} is not a URL with a valid port", "write e.g. http://es:9200")
    if parts.scheme.lower() not in _SCHEMES:
        _fail(where, f"scheme {parts.scheme!r} is neither http nor https", "write e.g. http://es:9200")
    if not parts.hostname:
        _fail(where, f"{_redacted(text)!r} names no host", "write e.g. http://es:9200")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    node = _Node(parts.scheme.lower(), parts.hostname or "", port or DEFAULT_PORT, parts.path.rstrip("/"))
    return node, user, password


def _mapping_node(entry: dict[str, Any], where: str) -> tuple[_Node, str | None, str | None, float | None]:
    unknown = sorted(str(k) for k in entry if k not in _NODE_KEYS)
    if unknown:
        _fail(f"{where}.{unknown[0]}", "is not a node setting", f"use {', '.join(_NODE_KEYS[:8])}")
    host = entry.get("host")
    if not isinstance(host, str) or not host.strip():
        _fail(f"{where}.host", f"must be a host name, not {host!r}", "set it, e.g. host: es")
    port = entry.get("port", DEFAULT_PORT)
    if isinstance(port, str) and port.strip().isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        _fail(f"{where}.port", f"must be a port number, not {port!r}", "set it to the cluster's port, e.g. 9200")
    scheme = entry.get("scheme") or "http"
    if not isinstance(scheme, str) or scheme.lower() not in _SCHEMES:
        _fail(f"{where}.scheme", f"{scheme!r} is neither http nor https", "write scheme: http or scheme: https")
    prefix = entry.get("path_prefix") or entry.get("url_prefix") or ""
    if not isinstance(prefix, str):
        _fail(f"{where}.path_prefix", f"must be a path, not {prefix!r}", "write e.g. path_prefix: /es")
    user = entry.get("user") if entry.get("user") is not None else entry.get("username")
    password = entry.get("password")
    if user is not None and not isinstance(user, str | int):
        _fail(f"{where}.user", "must be a user name", "write user: elasticuser")
    if password is not None and not isinstance(password, str | int):
        _fail(f"{where}.password", "must be a string", "quote it in the YAML")
    if password is not None and user is None:
        _fail(f"{where}.password", "given without a user", "set user too")
    timeout = entry.get("timeout")
    node = _Node(scheme.lower(), host.strip(), int(port), ("/" + prefix.strip("/")) if prefix.strip("/") else "")
    return (node, None if user is None else str(user), None if password is None else str(password),
            None if timeout is None else _seconds(timeout, f"{where}.timeout"))


def _seconds(value: Any, key: str) -> float:
    try:
        seconds = float(value) if not isinstance(value, bool) else -1.0
    except (TypeError, ValueError):
        seconds = -1.0
    if seconds <= 0:
        _fail(key, f"must be a number of seconds > 0, not {value!r}", "set it to e.g. 10")
    return seconds


def _client_kwargs(kwargs: Any, settings: _Settings) -> dict[str, Any]:
    """``kwargs`` checked against the client's signature; credential lists from YAML become tuples."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        _fail("kwargs", f"must be a mapping of client options, not {type(kwargs).__name__}",
              "write e.g. kwargs: {sniff_on_start: true}")
    known = client_keywords()
    options: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name == "hosts":
            _fail("kwargs.hosts", "the nodes are not a client option here", "list them under database.connection")
        if name not in known:
            hint = difflib.get_close_matches(str(name), sorted(known), n=1)
            _fail(f"kwargs.{name}", "is not a keyword argument of elasticsearch.Elasticsearch",
                  f"did you mean {hint[0]}?" if hint else "remove it (see the client's documentation)")
        if name in ("basic_auth", "http_auth", "api_key") and isinstance(value, list):
            value = tuple(value)
        options[name] = value
    given = [name for name in _AUTH_KWARGS if options.get(name) is not None]
    if given and settings.user is not None:
        _fail(f"kwargs.{given[0]}", "credentials given twice (the connection has a user too)", "keep one of them")
    if options.get("cloud_id") is not None and settings.nodes:
        _fail("kwargs.cloud_id", "given together with connection nodes", "keep one of them")
    for name in given:
        settings.secrets.extend(_secret_parts(options[name]))
    return options


def _secret_parts(value: Any) -> list[str]:
    if isinstance(value, tuple):
        return [str(part) for part in value[1:] if part]
    if isinstance(value, str) and ":" in value:  # http_auth "user:password"
        return [value.partition(":")[2], value]
    return [str(value)] if value else []


def _redacted(url: str) -> str:
    """A URL without its user information (the password may be in it)."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)


# -- requests ----------------------------------------------------------------------------------

def _json_value(value: Any) -> Any:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _fill_text(text: str, values: Mapping[str, Any], where: str) -> str:
    """Each placeholder replaced by the JSON encoding of its value (never re-read: values cannot add any)."""

    def encode(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise DocumentError(f"{where}: no value given for placeholder %({name})s")
        try:
            return json.dumps(values[name], default=_json_value, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise DocumentError(f"{where}: the value of %({name})s cannot be written as JSON ({exc})") from None

    return _PLACEHOLDER.sub(encode, text)


def _fill_object(value: Any, values: Mapping[str, Any], where: str) -> Any:
    """A dict request: strings that are exactly ``%(name)s`` become the value; the rest is kept."""
    if isinstance(value, str):
        match = _WHOLE_PLACEHOLDER.fullmatch(value)
        if match is None:
            return value
        if match.group(1) not in values:
            raise DocumentError(f"{where}: no value given for placeholder %({match.group(1)})s")
        return values[match.group(1)]
    if isinstance(value, Mapping):
        return {k: _fill_object(v, values, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_object(v, values, where) for v in value]
    return value


def _requests(query: str | Mapping[str, Any] | list[Any], values: Mapping[str, Any], where: str) \
        -> list[dict[str, Any]]:
    if isinstance(query, str):
        try:
            parsed = json.loads(_fill_text(query, values, where))
        except json.JSONDecodeError as exc:
            raise DocumentError(f"{where} is not valid JSON once its placeholders are filled ({exc.msg} at line "
                                f"{exc.lineno}, column {exc.colno}); a placeholder stands for a whole JSON value") \
                from None
    else:
        parsed = _fill_object(query, values, where)
    found = parsed if isinstance(parsed, list) else [parsed]
    if not found or not all(isinstance(request, dict) for request in found):
        raise DocumentError(f"{where} must hold a request object or a list of them")
    return found


def _row(hit: Mapping[str, Any]) -> dict[str, Any]:
    return {**(hit.get("_source") or {}), "_id": hit.get("_id"), "_index": hit.get("_index")}


@lru_cache(maxsize=256)
def _read_script(path: str, mtime_ns: int) -> str:
    """The script's text; the modification time in the key makes an edited script read again."""
    return Path(path).read_text(encoding="utf-8")


def _script_text(path: str) -> str:
    try:
        return _read_script(path, Path(path).stat().st_mtime_ns)
    except OSError as exc:
        raise ConfigError("script", f"cannot be read ({exc.strerror or type(exc).__name__})",
                          "create it or fix the path", source=path) from None


def _not_a_status_database() -> ConfigError:
    return ConfigError("database.type", "Elasticsearch cannot be sqapi's status database (it holds plugins' "
                       "documents, not message statuses)", "set the main database.type to postgres (or sqlite) "
                       "and name elasticsearch in the database section of the plugins that store documents")


class Database:
    """sqAPI's document methods and sqapi's query contract over one ``elasticsearch.Elasticsearch`` client."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self._settings = _settings(config)
        self._client: elasticsearch.Elasticsearch | None = None
        self._lock = threading.Lock()

    # -- where -----------------------------------------------------------------------------------
    def describe(self) -> str:
        """Where the cluster is, for messages: the node URLs and the user, never a password."""
        where = ", ".join(node.url() for node in self._settings.nodes) or "Elastic Cloud (kwargs.cloud_id)"
        return f"{where} as {self._settings.user}" if self._settings.user else where

    def _scrub(self, text: str) -> str:
        text = " ".join(text.split())
        for secret in sorted(self._settings.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    # -- connection ------------------------------------------------------------------------------
    def connect(self) -> None:
        """Create the client (it connects on the first request, or at once with ``kwargs.sniff_on_start``)."""
        with self._lock:
            if self._client is not None:
                return
            settings = self._settings
            options = dict(settings.kwargs)
            if settings.nodes:
                options["hosts"] = [node.mapping() for node in settings.nodes]
            if settings.user is not None:
                options["basic_auth"] = (settings.user, settings.password or "")
            if settings.timeout is not None and not {"request_timeout", "timeout"} & set(options):
                options["request_timeout"] = settings.timeout
            try:
                self._client = elasticsearch.Elasticsearch(**options)
            except elasticsearch.TransportError as exc:  # sniff_on_start found no node
                raise ConnectorError(f"cannot reach Elasticsearch at {self.describe()}: "
                                     f"{self._scrub(str(exc))}") from None
            except (TypeError, ValueError) as exc:
                raise ConfigError("database.kwargs", f"the client refused its options: {self._scrub(str(exc))}",
                                  "fix database.kwargs (see the client's documentation)") from None
        log.debug("Elasticsearch client for %s", self.describe())

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def ping(self) -> None:
        """Raise :class:`~sqapi.errors.ConnectorError` unless the cluster answers."""
        self._call("ping", None, lambda client: client.info())

    def initialize_database(self) -> None:
        """Connect, ping, and run the init script the config names when it is a JSON file."""
        self.connect()
        self.ping()
        script = init_script_of(self.config)
        if script and script.lower().endswith(".json"):
            self.execute_script(script)

    def initialize_message_table(self) -> None:
        raise _not_a_status_database()

    def has_status_tables(self) -> bool:
        raise _not_a_status_database()

    def update_message(self, message: Any, status: str, info: str | None = None) -> None:
        raise _not_a_status_database()

    # -- sqAPI's document methods ----------------------------------------------------------------
    def create_document(self, area: str, body: Mapping[str, Any], kind: str = "_doc", id: str | None = None,
                        refresh: bool | str = False) -> str:
        """Index ``body`` in index ``area``; returns its id (a new one unless ``id`` is given).

        ``kind`` is sqAPI's document type: ``_doc`` indexes (replacing a document of the same id),
        ``_create`` refuses an existing id (a :class:`DocumentError`).  Elasticsearch 8 has no
        other types, so any other kind indexes as ``_doc``.  ``refresh``: true or ``wait_for``
        makes the document visible to searches before this returns.
        """
        if kind not in ("_doc", "_create"):
            log.warning("Elasticsearch 8 has no document type %r: indexing into %s as _doc", kind, area)
        options: dict[str, Any] = {"index": area, "document": dict(body)}
        if id is not None:
            options["id"] = str(id)
        if refresh:
            options["refresh"] = refresh
        if kind == "_create" and id is not None:
            response = self._call("create_document", area, lambda client: client.create(**options))
        else:
            if kind == "_create":
                options["op_type"] = "create"
            response = self._call("create_document", area, lambda client: client.index(**options))
        return str(response["_id"])

    def fetch_document(self, area: str, body: Mapping[str, Any], query_clause: str = "match") \
            -> list[dict[str, Any]]:
        """Search index ``area`` with ``{query_clause: body}``; the hits as Elasticsearch gives them (as sqAPI)."""
        response = self._call("fetch_document", area,
                              lambda client: client.search(index=area, query={query_clause: dict(body)}))
        return [dict(hit) for hit in response["hits"]["hits"]]

    def get_document(self, area: str, id: str) -> dict[str, Any] | None:
        """The ``_source`` of document ``id`` in index ``area``, or None when there is none."""

        def get(client: elasticsearch.Elasticsearch) -> dict[str, Any] | None:
            try:
                return dict(client.get(index=area, id=str(id))["_source"])
            except elasticsearch.NotFoundError:
                return None

        return self._call("get_document", area, get)

    def delete_document(self, area: str, id: str, refresh: bool | str = False) -> bool:
        """Delete document ``id`` from index ``area``; whether there was one."""

        def delete(client: elasticsearch.Elasticsearch) -> bool:
            try:
                client.delete(index=area, id=str(id), refresh=refresh or None)
            except elasticsearch.NotFoundError:
                return False
            return True

        return self._call("delete_document", area, delete)

    # -- sqapi's query contract ------------------------------------------------------------------
    def execute_query(self, query: str | Mapping[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
        """Run a request (a search, or any API call; see the module's docstring) with ``%(name)s`` filled in."""
        return self._run_all(_requests(query, kwargs, "query"), "query")

    def execute_script(self, path: str, **kwargs: Any) -> list[dict[str, Any]]:
        """:meth:`execute_query` for the JSON file at ``path`` (its text cached until the file changes)."""
        where = f"script {path}"
        return self._run_all(_requests(_script_text(str(path)), kwargs, where), where)

    def _run_all(self, requests: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for request in requests:
            rows = self._api_call(request, where) if "method" in request or "path" in request \
                else self._search(request, where)
        return rows

    def _search(self, request: dict[str, Any], where: str) -> list[dict[str, Any]]:
        body = dict(request)
        index = body.pop("index", None)
        if isinstance(index, list) and all(isinstance(name, str) for name in index):
            index = ",".join(index)
        if index is not None and not isinstance(index, str):
            raise DocumentError(f"{where}: index must be a name or a list of names, not {index!r}")
        response = self._call(f"search ({where})", index,
                              lambda client: client.search(index=index, body=body or None))
        return [_row(hit) for hit in response["hits"]["hits"]]

    def _api_call(self, request: dict[str, Any], where: str) -> list[dict[str, Any]]:
        unknown = sorted(set(request) - set(_REQUEST_KEYS))
        method, path = str(request.get("method") or "GET").upper(), request.get("path")
        ignore = request.get("ignore") or []
        if unknown or method not in _METHODS or not isinstance(path, str) or not path.startswith("/") \
                or not isinstance(ignore, list):
            raise DocumentError(f"{where}: a request is {{\"method\": one of {', '.join(_METHODS)}, \"path\": "
                                f"\"/...\", \"body\", \"params\", \"ignore\": [...]}}, not {sorted(request)}")
        index = path.strip("/").split("/")[0] or None
        body = request.get("body")
        headers = {"accept": "application/json"}
        if body is not None:
            headers["content-type"] = "application/json"

        def send(client: elasticsearch.Elasticsearch) -> Any:
            try:
                return client.perform_request(method, path, params=request.get("params"), headers=headers,
                                              body=body).body
            except elasticsearch.ApiError as exc:
                if exc.status_code in ignore or _error_type(exc) in ignore:
                    log.debug("%s: %s %s answered %s, ignored as told", where, method, path, exc.status_code)
                    return None
                raise

        answer = self._call(f"{method} {path} ({where})", index, send)
        return [dict(answer)] if isinstance(answer, Mapping) else []

    # -- the boundary ----------------------------------------------------------------------------
    def _call(self, operation: str, index: str | None, request: Callable[[elasticsearch.Elasticsearch], T]) -> T:
        """``request(client)``, with the client's errors translated into sqapi's."""
        self.connect()
        client = self._client
        assert client is not None
        try:
            return request(client)
        except elasticsearch.UnsupportedProductError:
            raise ConnectorError(f"{self.describe()} does not answer as Elasticsearch ({operation})") from None
        except elasticsearch.ApiError as exc:
            raise self._translate(exc, operation, index) from None
        except elasticsearch.SerializationError as exc:
            raise DocumentError(f"{operation}{_on(index)}: cannot be written or read as JSON: "
                                f"{self._scrub(str(exc))}") from None
        except elasticsearch.TransportError as exc:
            raise ConnectorError(f"Elasticsearch at {self.describe()} unreachable ({operation}): "
                                 f"{self._scrub(_transport_reason(exc))}") from None

    def _translate(self, exc: elasticsearch.ApiError, operation: str, index: str | None) -> Exception:
        status = exc.status_code
        reason = self._scrub(_error_reason(exc))
        if status in (401, 403):
            return ConnectorError(f"Elasticsearch at {self.describe()} refused the credentials ({status}) for "
                                  f"{operation}{_on(index)}: {reason}. Check the user and password of "
                                  "database.connection (or database.kwargs)")
        if status in _UNAVAILABLE:
            return ConnectorError(f"Elasticsearch at {self.describe()} answered {status} to {operation}"
                                  f"{_on(index)}: {reason}")
        return DocumentError(f"Elasticsearch refused {operation}{_on(index)} ({status}): {reason}")


def _on(index: str | None) -> str:
    return f" on index {index}" if index else ""


def _error_type(exc: elasticsearch.ApiError) -> str | None:
    body = exc.body
    error = body.get("error") if isinstance(body, Mapping) else None
    return str(error.get("type")) if isinstance(error, Mapping) and error.get("type") else None


def _error_reason(exc: elasticsearch.ApiError) -> str:
    body = exc.body
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping):
        return f"{error.get('type')}: {error.get('reason')}"
    return str(error or body or exc.message)


def _transport_reason(exc: elasticsearch.TransportError) -> str:
    """The innermost cause the transport reports (``Connection refused``), not the nesting around it."""
    text = str(exc)
    inner = text.rsplit("caused by:", 1)[-1].strip(" )")
    return f"{type(exc).__name__}: {inner or text}"
