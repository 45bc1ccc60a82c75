"""A STAND-IN FOR ELASTICSEARCH, for tests only: a tiny HTTP server speaking the few endpoints
the official ``elasticsearch`` client calls for the es_indexer plugin.

``GET /`` (cluster info), ``POST /_bulk`` and ``POST /<index>/_bulk`` (index / delete actions,
NDJSON), ``PUT|POST /<index>/_doc/<id>``, ``GET|DELETE /<index>/_doc/<id>`` and
``POST /<index pattern>/_delete_by_query`` (an ``ids`` query).  Every response carries the
``X-Elastic-Product: Elasticsearch`` header the client checks.  Documents live in
``self.indices[index][id]``; ``fail_next`` makes the next bulk requests answer the given
statuses; ``item_status`` makes bulk items of a given id answer a given status.
"""

from __future__ import annotations

import fnmatch
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ElasticsearchStandIn:
    def __init__(self) -> None:
        self.indices: dict[str, dict[str, dict[str, Any]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.bulk_sizes: list[int] = []
        self.fail_next: list[int] = []
        self.item_status: dict[str, list[int]] = {}
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
                path = self.path.split("?")[0]
                parts = [p for p in path.split("/") if p]
                body = self._body()
                with standin.lock:
                    standin.requests.append((self.command, path))
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
        return 400, {"error": {"type": "illegal_argument_exception", "reason": f"stand-in has no {parts}"},
                     "status": 400}

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
            index, doc_id = meta.get("_index") or default_index, meta["_id"]
            forced = self.item_status.get(doc_id)
            if forced:
                status = forced.pop(0)
                items.append({kind: {"_index": index, "_id": doc_id, "status": status,
                                     "error": {"type": "standin_error", "reason": f"told to answer {status}"}}})
                continue
            docs = self.indices.setdefault(index, {})
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
