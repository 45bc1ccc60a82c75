"""es_indexer: one Elasticsearch document per message, with the official ``elasticsearch`` client.

The document's ``_id`` is the message uuid, so a redelivery overwrites and never duplicates.
Its body holds the message fields, the metadata, the sha256 hash, the mime type and -- when
``pdf_extractor`` ran before it (``plugin.after``) -- the extracted text and page count.  A
message whose body has ``delete_field`` set to ``delete_value`` (by default ``action: delete``)
deletes the document instead.  The index name comes from ``custom.es_indexer.index`` with
``{date}`` and ``{data_type}`` placeholders; the index a uuid went to is kept in the plugin's
``es_documents`` table so a later redelivery or deletion (on another day) finds the same index.

Batching: the plugin contract is one call per message, and a message is acknowledged as soon
as the plugin returns, so a document must be indexed before :func:`execute` returns.  Messages
processed at the same time (``processing.workers``) are therefore grouped: each call adds its
action to a shared batch and waits; the batch goes out as one ``_bulk`` request when it holds
``batch_size`` actions or ``batch_wait`` seconds after it was opened, and every call returns
(or raises) with its own item's outcome.  Nothing is acknowledged that is not indexed.

Failures: 429 / 5xx / connection errors are retried with exponential backoff (``max_retries``,
``backoff``), then raised as :class:`~sqapi.errors.ConnectorError` (the message is retried
later); 400 and other refusals of a document are a :class:`~sqapi.errors.PermanentError`.

Inactive (``sqapi plugins`` says why) until ``custom.es_indexer.hosts`` is set.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import elasticsearch

from sqapi.backoff import exponential
from sqapi.errors import ConnectorError, PermanentError, PluginNotConfigured

SCRIPTS = Path(__file__).parent / "scripts"

DEFAULTS: dict[str, Any] = {
    "hosts": [],                   # e.g. [http://localhost:9200]; a comma-separated string also works
    "index": "sqapi-{date}",       # placeholders: {date} (UTC, date_format), {data_type} (mime, made index-safe)
    "date_format": "%Y.%m",
    "delete_field": "action",      # body key that asks for deletion ...
    "delete_value": "delete",      # ... when it has this value
    "batch_size": 100,             # most actions in one _bulk request
    "batch_wait": 0.05,            # seconds a batch stays open for messages processed at the same time
    "max_retries": 5,              # retries of 429 / 5xx / connection errors
    "backoff": 0.5,                # first retry delay in seconds; doubles each time
    "max_backoff": 30.0,
    "request_timeout": 30.0,
    "api_key": None,
    "username": None,
    "password": None,
    "verify_certs": True,
    "ca_certs": None,
}
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
_INDEX_UNSAFE = re.compile(r"[^a-z0-9._-]+")

log = logging.getLogger(__name__)


def settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``custom.es_indexer`` over :data:`DEFAULTS`, with ``hosts`` always a list."""
    merged = {**DEFAULTS, **(((config.get("custom") or {}).get("es_indexer")) or {})}
    hosts = merged["hosts"]
    if isinstance(hosts, str):
        hosts = [h.strip() for h in hosts.split(",") if h.strip()]
    merged["hosts"] = [str(h) for h in hosts or []]
    for key in ("batch_size", "max_retries"):
        if isinstance(merged[key], bool) or not isinstance(merged[key], int) or merged[key] < (key == "batch_size"):
            raise ValueError(f"custom.es_indexer.{key} must be a whole number, not {merged[key]!r}")
    return merged


def check(config: Mapping[str, Any]) -> None:
    if not settings(config)["hosts"]:
        raise PluginNotConfigured("set custom.es_indexer.hosts (e.g. SQAPI_ES_HOSTS=http://localhost:9200 "
                                  "with conf/sqapi.yml)")


#: what setup made for this process: the settings, parsed once, and the indexer with its client
_STATE: dict[str, Any] = {}


def setup(config: Mapping[str, Any]) -> None:
    """Once per process: the settings parsed and the Elasticsearch client made, for every call."""
    options = settings(config)
    _STATE.update(options=options, indexer=_indexer_for(options))


def teardown() -> None:
    """At stop: the client's connections closed."""
    indexer = _STATE.pop("indexer", None)
    _STATE.pop("options", None)
    with _indexers_lock:
        for key in [k for k, v in _indexers.items() if v is indexer]:
            del _indexers[key]
    if indexer is not None:
        indexer.client.close()


def execute(config: Any, database: Any, message: Any, metadata: dict[str, Any], data: io.BufferedReader) \
        -> dict[str, Any]:
    if "indexer" in _STATE:
        options, indexer = _STATE["options"], _STATE["indexer"]
    else:  # called without setup (a caller of its own): made now, and kept like setup's
        options = settings(config)
        indexer = _indexer_for(options)
    body = message.body or {}
    known = database.execute_script(str(SCRIPTS / "select_by_uuid.sql"), uuid_ref=message.uuid)
    if _wants_delete(body, options):
        if known:
            outcome = indexer.submit({"delete": {"_index": known[0]["index_name"], "_id": message.uuid}}, None)
        else:
            outcome = indexer.delete_everywhere(message.uuid, index_pattern(options["index"]))
        database.execute_script(str(SCRIPTS / "delete_by_uuid.sql"), uuid_ref=message.uuid)
        return {"action": "delete", "id": message.uuid, "result": outcome}
    index = known[0]["index_name"] if known else index_name(options, message.type)
    document = build_document(message, metadata)
    outcome = indexer.submit({"index": {"_index": index, "_id": message.uuid}}, document)
    database.execute_script(str(SCRIPTS / "upsert_document.sql"), uuid_ref=message.uuid, index_name=index,
                            hash_digest=message.hash_digest, indexed_at=document["indexed_at"])
    return {"action": "index", "index": index, "id": message.uuid, "result": outcome}


def _wants_delete(body: Mapping[str, Any], options: Mapping[str, Any]) -> bool:
    wanted = str(options["delete_field"]).lower()
    for key, value in body.items():
        if str(key).lower() == wanted:
            return str(value).lower() == str(options["delete_value"]).lower()
    return False


def index_name(options: Mapping[str, Any], data_type: str | None, now: datetime | None = None) -> str:
    """The index for a new document: the ``index`` pattern filled in and made a valid index name."""
    now = now or datetime.now(UTC)
    mime = _INDEX_UNSAFE.sub("-", (data_type or "unknown").split(";")[0].strip().lower())
    name = str(options["index"]).format(date=now.strftime(str(options["date_format"])), data_type=mime)
    name = _INDEX_UNSAFE.sub("-", name.lower()).lstrip("-_.+")
    if not name:
        raise PermanentError(f"index pattern {options['index']!r} gives an empty index name")
    return name


def index_pattern(pattern: str) -> str:
    """The wildcard matching every index the ``index`` pattern can produce (for deleting an unknown one)."""
    return re.sub(r"\{[^}]*\}", "*", pattern).lower()


def build_document(message: Any, metadata: Mapping[str, Any]) -> dict[str, Any]:
    document: dict[str, Any] = {
        "uuid": message.uuid,
        "data_location": message.data_location,
        "meta_location": message.meta_location,
        "data_type": message.type,
        "hash_digest": message.hash_digest,
        "metadata": dict(metadata),
        "message": {k: v for k, v in (message.body or {}).items()},
        "indexed_at": datetime.now(UTC).isoformat(),
    }
    extracted = (message.results or {}).get("pdf_extractor")
    if isinstance(extracted, Mapping):
        document["text"] = extracted.get("text")
        document["pages"] = extracted.get("pages")
        document["text_truncated"] = bool(extracted.get("truncated"))
    return document


# -- the shared client and batches --------------------------------------------------------------

@dataclass
class _Action:
    header: dict[str, Any]
    source: dict[str, Any] | None
    done: threading.Event = field(default_factory=threading.Event)
    taken: bool = False
    result: str | None = None
    error: Exception | None = None


class BulkIndexer:
    """Groups the actions of concurrent calls into ``_bulk`` requests; each caller waits for its own item."""

    def __init__(self, client: Any, options: Mapping[str, Any]) -> None:
        self.client = client
        self.batch_size = int(options["batch_size"])
        self.batch_wait = float(options["batch_wait"])
        self.max_retries = int(options["max_retries"])
        self.backoff = float(options["backoff"])
        self.max_backoff = float(options["max_backoff"])
        self._pending: list[_Action] = []
        self._opened = 0.0
        self._ready = threading.Condition()

    def submit(self, header: dict[str, Any], source: dict[str, Any] | None) -> str:
        """Index or delete one document through a bulk request; returns ES's result ("created", "updated"...)."""
        action = _Action(header, source)
        batch: list[_Action] = []
        with self._ready:
            if not self._pending:
                self._opened = time.monotonic()
            self._pending.append(action)
            if len(self._pending) >= self.batch_size:
                batch = self._take()
            else:
                while not action.taken:
                    remaining = self._opened + self.batch_wait - time.monotonic()
                    if remaining <= 0:
                        batch = self._take()
                        break
                    self._ready.wait(remaining)
        if batch:
            self._send(batch)
        action.done.wait()
        if action.error is not None:
            raise action.error
        return action.result or ""

    def _take(self) -> list[_Action]:
        batch, self._pending = self._pending, []
        for action in batch:
            action.taken = True
        self._ready.notify_all()
        return batch

    def _send(self, batch: list[_Action]) -> None:
        try:
            remaining = batch
            for attempt in range(self.max_retries + 1):
                remaining = self._send_once(remaining, last=attempt == self.max_retries)
                if not remaining:
                    return
                self._sleep(attempt)
        except Exception as exc:  # one failure for the whole request: every caller gets it
            for action in batch:
                if not action.done.is_set():
                    action.error = exc
                    action.done.set()

    def _send_once(self, batch: list[_Action], last: bool) -> list[_Action]:
        """One bulk request; returns the actions to try again (429 / 5xx), finishes the others."""
        operations: list[dict[str, Any]] = []
        for action in batch:
            operations.append(action.header)
            if action.source is not None:
                operations.append(action.source)
        try:
            response = self.client.bulk(operations=operations)
        except elasticsearch.ApiError as exc:
            if exc.status_code in RETRYABLE_STATUS:
                if last:
                    raise ConnectorError(f"Elasticsearch answered {exc.status_code} to every retry") from None
                log.warning("bulk request answered %s, retrying", exc.status_code)
                return batch
            if exc.status_code in (401, 403):
                raise ConnectorError(f"Elasticsearch refused the credentials ({exc.status_code})") from None
            raise PermanentError(f"Elasticsearch refused the bulk request ({exc.status_code}): "
                                 f"{_reason(exc.body)}") from None
        except (elasticsearch.TransportError, elasticsearch.UnsupportedProductError) as exc:
            if last:
                raise ConnectorError(f"Elasticsearch unreachable: {type(exc).__name__}: {exc}") from None
            log.warning("bulk request failed (%s), retrying", type(exc).__name__)
            return batch
        retry: list[_Action] = []
        for action, item in zip(batch, response["items"], strict=True):
            (kind, outcome), = item.items()
            status = int(outcome.get("status", 500))
            if 200 <= status < 300 or (kind == "delete" and status == 404):
                action.result = outcome.get("result")
                action.done.set()
            elif status in RETRYABLE_STATUS and not last:
                retry.append(action)
            elif status in RETRYABLE_STATUS:
                action.error = ConnectorError(f"Elasticsearch answered {status} for document "
                                              f"{outcome.get('_id')} to every retry")
                action.done.set()
            else:
                action.error = PermanentError(f"Elasticsearch refused document {outcome.get('_id')} ({status}): "
                                              f"{_reason(outcome)}")
                action.done.set()
        return retry

    def delete_everywhere(self, uuid: str, pattern: str) -> str:
        """Delete the document ``uuid`` from every index matching ``pattern`` (its index is not known)."""
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.delete_by_query(index=pattern, query={"ids": {"values": [uuid]}},
                                                       ignore_unavailable=True, allow_no_indices=True,
                                                       refresh=True)
                return "deleted" if response.get("deleted") else "not_found"
            except elasticsearch.ApiError as exc:
                if exc.status_code not in RETRYABLE_STATUS:
                    raise PermanentError(f"Elasticsearch refused the deletion ({exc.status_code}): "
                                         f"{_reason(exc.body)}") from None
            except elasticsearch.TransportError as exc:
                log.warning("delete_by_query failed (%s), retrying", type(exc).__name__)
            if attempt < self.max_retries:
                self._sleep(attempt)
        raise ConnectorError("Elasticsearch did not accept the deletion after every retry")

    def _sleep(self, attempt: int) -> None:
        time.sleep(exponential(attempt + 1, self.backoff, self.max_backoff))


def _reason(body: Any) -> str:
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            return f"{error.get('type')}: {error.get('reason')}"
        if error:
            return str(error)
    return str(body)[:200]


# One client (and batch) per distinct connection setting, made on first use and shared by the
# plugin's calls: concurrent messages can only share a bulk request through a shared batcher.
_indexers: dict[tuple[Any, ...], BulkIndexer] = {}
_indexers_lock = threading.Lock()
_CONNECTION_KEYS = ("hosts", "api_key", "username", "password", "verify_certs", "ca_certs", "request_timeout",
                    "batch_size", "batch_wait", "max_retries", "backoff", "max_backoff")


def _indexer_for(options: Mapping[str, Any]) -> BulkIndexer:
    key = tuple(str(options[k]) for k in _CONNECTION_KEYS)
    with _indexers_lock:
        indexer = _indexers.get(key)
        if indexer is None:
            indexer = BulkIndexer(make_client(options), options)
            _indexers[key] = indexer
        return indexer


def make_client(options: Mapping[str, Any]) -> Any:
    kwargs: dict[str, Any] = {
        "request_timeout": float(options["request_timeout"]),
        "max_retries": 0,                 # retries (with backoff) are ours, see BulkIndexer
        "retry_on_timeout": False,
        "verify_certs": bool(options["verify_certs"]),
    }
    if options.get("ca_certs"):
        kwargs["ca_certs"] = options["ca_certs"]
    if options.get("api_key"):
        kwargs["api_key"] = options["api_key"]
    elif options.get("username"):
        kwargs["basic_auth"] = (options["username"], options.get("password") or "")
    return elasticsearch.Elasticsearch(options["hosts"], **kwargs)
