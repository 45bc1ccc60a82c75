"""A STAND-IN FOR ELASTICSEARCH, for tests only: a tiny HTTP server speaking the few endpoints
the official ``elasticsearch`` client calls for the es_indexer plugin.

``GET /`` (cluster info), ``POST /_bulk`` and ``POST /<index>/_bulk`` (index / delete actions,
NDJSON), ``PUT|POST /<index>/_doc/<id>``, ``GET|DELETE /<index>/_doc/<id>`` and
``POST /<index pattern>/_delete_by_query`` (an ``ids`` query).  Every response carries the
``X-Elastic-Product: Elasticsearch`` header the client checks.  Documents live in
``self.indices[index][id]``; ``fail_next`` makes the next bulk requests answer the given
statuses; ``item_status`` makes bulk items of a given id answer a given status.

For the ``elasticsearch`` database type also: ``PUT /<index>`` (create an index; 400 when it
exists), ``POST /<index>/_doc`` (a new id), ``PUT|POST /<index>/_create/<id>`` (409 when the id
exists) and ``GET|POST [/<index pattern>]/_search`` with a ``match_all``, ``match``, ``term`` or
``ids`` query (``size``, ``from``; a missing index is a 404, any other query a 400).  ``seen``
records each request's method, path, query parameters, Authorization header and JSON body;
``require_auth`` (an Authorization header value) makes every other request answer 401;
``fail_next_request`` makes the next requests of any kind answer the given statuses.

Index templates (composable, as ES 8): ``PUT /_index_template/<name>`` is checked the way
Elasticsearch checks one -- ``index_patterns`` present, every field type one ES knows, every
``analyzer`` built in or declared in ``settings.analysis`` -- and refused with ES's 400
``mapper_parsing_exception`` / ``action_request_validation_exception`` otherwise; ``GET`` reads one
back (404 when absent).  Kept in ``self.templates``.  An index made by a bulk request takes the
mappings of the highest-priority template matching its name (``self.mappings[index]``), and then
refuses, per bulk item as ES does (400 ``mapper_parsing_exception``), a document whose value does
not fit a declared field: a non-number in a numeric field, a non-boolean in ``boolean``, an
unparsable ``date``, an object in ``text``/``keyword``, a concrete value where an ``object`` is
mapped; ``dynamic: strict`` refuses an undeclared field (``strict_dynamic_mapping_exception``).
Undeclared fields are otherwise accepted (ES would guess their type; the stand-in does not).
"""

from __future__ import annotations

import fnmatch
import json
import re
import threading
import uuid
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl


class ElasticsearchStandIn:
    def __init__(self) -> None:
        self.indices: dict[str, dict[str, dict[str, Any]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.bulk_sizes: list[int] = []
        self.fail_next: list[int] = []
        self.item_status: dict[str, list[int]] = {}
        self.seen: list[dict[str, Any]] = []
        self.require_auth: str | None = None
        self.fail_next_request: list[int] = []
        self.mappings: dict[str, Any] = {}
        self.templates: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("X-Elastic-Product", "Elasticsearch")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                path, _, query = self.path.partition("?")
                parts = [p for p in path.split("/") if p]
                body = self._body()
                authorization = self.headers.get("Authorization")
                with standin.lock:
                    standin.requests.append((self.command, path))
                    standin.seen.append({"method": self.command, "path": path, "params": dict(parse_qsl(query)),
                                         "authorization": authorization, "body": _json_or_none(body)})
                    if standin.require_auth is not None and authorization != standin.require_auth:
                        status, answer = 401, _error(401, "security_exception", "missing authentication credentials")
                    elif standin.fail_next_request:
                        status = standin.fail_next_request.pop(0)
                        answer = _error(status, "standin_error", f"told to answer {status}")
                    else:
                        status, answer = standin.answer(self.command, parts, body)
                self._reply(status, answer)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> ElasticsearchStandIn:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def document(self, doc_id: str) -> dict[str, Any] | None:
        for docs in self.indices.values():
            if doc_id in docs:
                return docs[doc_id]
        return None

    def count(self) -> int:
        return sum(len(docs) for docs in self.indices.values())

    # -- the endpoints ---------------------------------------------------------------------
    def answer(self, method: str, parts: list[str], body: bytes) -> tuple[int, Any]:
        if not parts:
            return 200, {"name": "standin", "cluster_name": "sqapi-tests", "version": {"number": "8.13.0",
                         "build_flavor": "default"}, "tagline": "You Know, for Search"}
        if parts[-1] == "_bulk":
            if self.fail_next:
                status = self.fail_next.pop(0)
                return status, {"error": {"type": "standin_error", "reason": f"told to answer {status}"},
                                "status": status}
            return self.bulk(parts[0] if len(parts) == 2 else None, body)
        if len(parts) == 2 and parts[1] == "_delete_by_query":
            ids = json.loads(body)["query"]["ids"]["values"]
            deleted = 0
            for index, docs in self.indices.items():
                if fnmatch.fnmatch(index, parts[0]):
                    for doc_id in ids:
                        deleted += docs.pop(doc_id, None) is not None
            return 200, {"deleted": deleted, "failures": []}
        if len(parts) == 3 and parts[1] == "_doc":
            index, doc_id = parts[0], parts[2]
            if method in ("PUT", "POST"):
                created = doc_id not in self.indices.setdefault(index, {})
                self.indices[index][doc_id] = json.loads(body)
                return (201 if created else 200), {"_index": index, "_id": doc_id,
                                                   "result": "created" if created else "updated"}
            if method == "DELETE":
                gone = self.indices.get(index, {}).pop(doc_id, None)
                return (200 if gone else 404), {"_index": index, "_id": doc_id,
                                                "result": "deleted" if gone else "not_found"}
            doc = self.indices.get(index, {}).get(doc_id)
            return (200, {"_index": index, "_id": doc_id, "found": True, "_source": doc}) if doc else \
                (404, {"_index": index, "_id": doc_id, "found": False})
        if len(parts) == 2 and parts[1] == "_doc" and method == "POST":
            index, doc_id = parts[0], uuid.uuid4().hex[:20]
            self.indices.setdefault(index, {})[doc_id] = json.loads(body)
            return 201, {"_index": index, "_id": doc_id, "result": "created"}
        if len(parts) == 3 and parts[1] == "_create" and method in ("PUT", "POST"):
            index, doc_id = parts[0], parts[2]
            if doc_id in self.indices.get(index, {}):
                return 409, _error(409, "version_conflict_engine_exception",
                                   f"[{doc_id}]: version conflict, document already exists")
            self.indices.setdefault(index, {})[doc_id] = json.loads(body)
            return 201, {"_index": index, "_id": doc_id, "result": "created"}
        if parts[-1] == "_search" and len(parts) <= 2 and method in ("GET", "POST"):
            return self.search(parts[0] if len(parts) == 2 else "*", _json_or_none(body) or {})
        if len(parts) == 2 and parts[0] == "_index_template":
            return self.index_template(method, parts[1], _json_or_none(body))
        if len(parts) == 1 and method == "PUT":
            if parts[0] in self.indices:
                return 400, _error(400, "resource_already_exists_exception", f"index [{parts[0]}] already exists")
            self.indices[parts[0]] = {}
            self.mappings[parts[0]] = (_json_or_none(body) or {}).get("mappings")
            return 200, {"acknowledged": True, "shards_acknowledged": True, "index": parts[0]}
        return 400, {"error": {"type": "illegal_argument_exception", "reason": f"stand-in has no {parts}"},
                     "status": 400}

    def index_template(self, method: str, name: str, body: Any) -> tuple[int, Any]:
        if method == "GET":
            if name not in self.templates:
                return 404, _error(404, "resource_not_found_exception", f"index template matching [{name}] not found")
            return 200, {"index_templates": [{"name": name, "index_template": self.templates[name]}]}
        if method == "DELETE":
            return (200, {"acknowledged": True}) if self.templates.pop(name, None) is not None else \
                (404, _error(404, "resource_not_found_exception", f"index_template [{name}] missing"))
        if method not in ("PUT", "POST") or not isinstance(body, dict):
            return 400, _error(400, "parse_exception", "request body is required")
        if not body.get("index_patterns"):
            return 400, _error(400, "action_request_validation_exception",
                               "Validation Failed: 1: index patterns are missing;")
        template = body.get("template") or {}
        problem = _mapping_problem(template.get("mappings") or {}, template.get("settings") or {})
        if problem is not None:
            return 400, {"error": {"type": "mapper_parsing_exception", "reason": f"Failed to parse mapping: {problem}",
                                   "caused_by": {"type": "mapper_parsing_exception", "reason": problem}},
                         "status": 400}
        self.templates[name] = body
        return 200, {"acknowledged": True}

    def create_index_from_templates(self, index: str) -> None:
        """A new index, with the mappings of the highest-priority template whose patterns match its name."""
        self.indices[index] = {}
        matching = [t for t in self.templates.values()
                    if any(fnmatch.fnmatch(index, p) for p in _as_list(t.get("index_patterns")))]
        if matching:
            best = max(matching, key=lambda t: int(t.get("priority") or 0))
            self.mappings[index] = json.loads(json.dumps((best.get("template") or {}).get("mappings") or {}))

    def search(self, pattern: str, request: dict[str, Any]) -> tuple[int, Any]:
        names = pattern.split(",")
        missing = [n for n in names if not any(c in n for c in "*?") and n not in self.indices and n != "_all"]
        if missing:
            return 404, _error(404, "index_not_found_exception", f"no such index [{missing[0]}]")
        query = request.get("query") or {"match_all": {}}
        (kind, clause), = query.items()
        if kind not in ("match_all", "match", "term", "ids"):
            return 400, _error(400, "parsing_exception", f"unknown query [{kind}]")
        hits = [{"_index": index, "_id": doc_id, "_score": 1.0, "_source": doc}
                for index, docs in sorted(self.indices.items())
                if any(n == "_all" or fnmatch.fnmatch(index, n) for n in names)
                for doc_id, doc in docs.items() if _matches(kind, clause, doc_id, doc)]
        start = int(request.get("from", 0))
        page = hits[start:start + int(request.get("size", 10))]
        return 200, {"took": 1, "timed_out": False, "hits": {"total": {"value": len(hits), "relation": "eq"},
                                                             "max_score": 1.0 if hits else None, "hits": page}}

    def bulk(self, default_index: str | None, body: bytes) -> tuple[int, Any]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        items: list[dict[str, Any]] = []
        position = 0
        while position < len(lines):
            (kind, meta), = lines[position].items()
            position += 1
            source = None
            if kind in ("index", "create", "update"):
                source = lines[position]
                position += 1
            index, doc_id = str(meta.get("_index") or default_index), meta["_id"]
            forced = self.item_status.get(doc_id)
            if forced:
                status = forced.pop(0)
                items.append({kind: {"_index": index, "_id": doc_id, "status": status,
                                     "error": {"type": "standin_error", "reason": f"told to answer {status}"}}})
                continue
            if index not in self.indices:
                self.create_index_from_templates(index)
            docs = self.indices[index]
            refused = None if kind == "delete" else _refusal(self.mappings.get(index), source or {}, doc_id)
            if refused is not None:
                items.append({kind: {"_index": index, "_id": doc_id, "status": 400, "error": refused}})
                continue
            if kind == "delete":
                gone = docs.pop(doc_id, None)
                items.append({kind: {"_index": index, "_id": doc_id, "status": 200 if gone else 404,
                                     "result": "deleted" if gone else "not_found"}})
            else:
                created = doc_id not in docs
                docs[doc_id] = source or {}
                items.append({kind: {"_index": index, "_id": doc_id, "status": 201 if created else 200,
                                     "result": "created" if created else "updated"}})
        self.bulk_sizes.append(len(items))
        errors = any(next(iter(i.values()))["status"] >= 300 for i in items)
        return 200, {"took": 1, "errors": errors, "items": items}


def _error(status: int, kind: str, reason: str) -> dict[str, Any]:
    return {"error": {"type": kind, "reason": reason}, "status": status}


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body.strip() else None
    except ValueError:
        return None  # NDJSON (bulk)


def _field(doc: dict[str, Any], path: str) -> list[Any]:
    value: Any = doc
    for name in path.split("."):
        if not isinstance(value, dict) or name not in value:
            return []
        value = value[name]
    return value if isinstance(value, list) else [value]


def _words(value: Any) -> set[str]:
    return set(re.findall(r"\w+", str(value).lower()))


def _matches(kind: str, clause: dict[str, Any], doc_id: str, doc: dict[str, Any]) -> bool:
    """A much simplified Elasticsearch query: match (any word, strings; else equality), term, ids."""
    if kind == "match_all":
        return True
    if kind == "ids":
        return doc_id in clause.get("values", [])
    (path, wanted), = clause.items()
    if isinstance(wanted, dict):
        wanted = wanted.get("query" if kind == "match" else "value")
    values = _field(doc, path)
    if kind == "match" and isinstance(wanted, str):
        return any(_words(wanted) & _words(v) for v in values if isinstance(v, str))
    return wanted in values


# -- mappings, as far as the stand-in checks them -------------------------------------------------

NUMERIC = {"long", "integer", "short", "byte", "double", "float", "half_float", "scaled_float", "unsigned_long"}
FIELD_TYPES = NUMERIC | {"text", "keyword", "boolean", "date", "object", "nested", "binary", "ip", "flattened",
                         "match_only_text", "wildcard", "constant_keyword", "date_nanos", "geo_point"}
BUILTIN_ANALYZERS = {"standard", "simple", "whitespace", "stop", "keyword", "pattern", "fingerprint", "english",
                     "french", "german"}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value] if value else []


def _mapping_problem(mappings: dict[str, Any], settings: dict[str, Any], path: str = "") -> str | None:
    """What Elasticsearch would refuse in a template's mappings (``None``: nothing)."""
    analysis = (settings.get("analysis") or (settings.get("index") or {}).get("analysis") or {})
    declared = set((analysis.get("analyzer") or {}).keys())
    for name, field in (mappings.get("properties") or {}).items():
        full = f"{path}{name}"
        if not isinstance(field, dict):
            return f"Expected map for property [fields] on field [{full}] but got a class java.lang.String"
        kind = field.get("type", "object" if "properties" in field else None)
        if kind is None:
            return f"No type specified for field [{full}]"
        if kind not in FIELD_TYPES:
            return f"No handler for type [{kind}] declared on field [{full}]"
        for key in ("analyzer", "search_analyzer"):
            if key in field and field[key] not in BUILTIN_ANALYZERS | declared:
                return f"analyzer [{field[key]}] has not been configured in mappings"
        if "properties" in field:
            problem = _mapping_problem(field, settings, f"{full}.")
            if problem is not None:
                return problem
    return None


def _refusal(mappings: dict[str, Any] | None, doc: dict[str, Any], doc_id: str) -> dict[str, Any] | None:
    """The bulk item error Elasticsearch gives a document that does not fit ``mappings`` (``None``: it fits)."""
    if not mappings:
        return None
    reason = _misfit(mappings, doc, doc_id, "", mappings.get("dynamic", True))
    if reason is None:
        return None
    kind, text = reason
    return {"type": kind, "reason": text, "caused_by": {"type": "illegal_argument_exception", "reason": text}}


def _misfit(mapping: dict[str, Any], doc: dict[str, Any], doc_id: str, path: str, dynamic: Any) \
        -> tuple[str, str] | None:
    properties = mapping.get("properties") or {}
    dynamic = mapping.get("dynamic", dynamic)
    for name, value in doc.items():
        full = f"{path}{name}"
        field = properties.get(name)
        if field is None:
            if str(dynamic).lower() == "strict":
                return ("strict_dynamic_mapping_exception",
                        f"[1:2] mapping set to strict, dynamic introduction of [{name}] within "
                        f"[{path.rstrip('.') or '_doc'}] is not allowed")
            continue
        for item in value if isinstance(value, list) else [value]:
            problem = _value_misfit(field, item, doc_id, full, dynamic)
            if problem is not None:
                return problem
    return None


def _value_misfit(field: dict[str, Any], value: Any, doc_id: str, full: str, dynamic: Any) -> tuple[str, str] | None:
    if value is None:
        return None
    kind = field.get("type", "object")
    if kind in ("object", "nested"):
        if not isinstance(value, dict):
            return ("mapper_parsing_exception", f"object mapping for [{full}] tried to parse field [{full}] as "
                                                "object, but found a concrete value")
        return _misfit(field, value, doc_id, f"{full}.", dynamic)
    if kind == "flattened":
        return None
    if isinstance(value, dict) or not _fits(kind, value):
        preview = value if not isinstance(value, dict) else "{" + ", ".join(f"{k}={v}" for k, v in value.items()) + "}"
        return ("mapper_parsing_exception", f"failed to parse field [{full}] of type [{kind}] in document with id "
                                            f"'{doc_id}'. Preview of field's value: '{preview}'")
    return None


def _fits(kind: str, value: Any) -> bool:
    if kind in NUMERIC:
        if isinstance(value, bool):
            return False
        if isinstance(value, int | float):
            return True
        try:
            float(str(value))
        except ValueError:
            return False
        return True
    if kind == "boolean":
        return isinstance(value, bool) or value in ("true", "false", "")
    if kind in ("date", "date_nanos"):
        if isinstance(value, int) and not isinstance(value, bool):
            return True
        try:
            datetime.fromisoformat(str(value))
        except ValueError:
            return False
        return True
    return True
