"""es_indexer: one Elasticsearch document per message, with the official ``elasticsearch`` client.

The document's ``_id`` is the message uuid, so a redelivery overwrites and never duplicates.
Its body holds the message fields, the metadata, the sha256 hash, the mime type and -- when
``pdf_extractor`` ran before it (``plugin.after``) -- the extracted text and page count.  A
message whose body has ``delete_field`` set to ``delete_value`` (by default ``action: delete``)
deletes the document instead.  The index name comes from ``custom.es_indexer.index`` with
``{date}`` and ``{data_type}`` placeholders; the index a uuid went to is kept in the plugin's
``es_documents`` table so a later redelivery or deletion (on another day) finds the same index.

Batching: sqapi calls :func:`execute_batch` once per batch it holds, and acknowledges a message
only after its outcome is recorded, so each call sends its batch's actions in ``_bulk``
requests (of at most ``batch_size`` actions) and answers every message with its own item's
outcome: its result, or the error that fails it alone.  Nothing is acknowledged that is not
indexed.

Failures: 429 / 5xx / connection errors are retried with exponential backoff (``max_retries``,
``backoff``), then the messages still waiting fail with a :class:`~sqapi.errors.ConnectorError`
(retried later); 400 and other refusals of a document are a
:class:`~sqapi.errors.PermanentError` for its message alone.

Shape: ``mappings`` (inline, or the path of a JSON file) is installed by :func:`setup` as the composable index
template ``template_name`` over every index the ``index`` pattern can produce, so new indices get the declared field
types and analyzers (``sqapi es apply-template`` sends a changed one without restarting loaders); ``fields`` moves
metadata keys to document fields (rename, flatten ``a.b``, drop, copy into ``full_text``) as the document is built.
Both are checked when the plugin loads.

Inactive (``sqapi plugins`` says why) until ``custom.es_indexer.hosts`` is set.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import elasticsearch

from sqapi.backoff import exponential
from sqapi.core.calls import Call
from sqapi.core.message import field_map
from sqapi.errors import ConnectorError, PermanentError, PluginNotConfigured

SCRIPTS = Path(__file__).parent / "scripts"

DEFAULTS: dict[str, Any] = {
    "hosts": [],                   # e.g. [http://localhost:9200]; a comma-separated string also works
    "index": "sqapi-{date}",       # placeholders: {date} (UTC, date_format), {data_type} (mime, made index-safe)
    "date_format": "%Y.%m",
    "delete_field": "action",      # body key that asks for deletion ...
    "delete_value": "delete",      # ... when it has this value
    "batch_size": 100,             # most actions in one _bulk request (a larger batch takes several)
    "max_retries": 5,              # retries of 429 / 5xx / connection errors
    "backoff": 0.5,                # first retry delay in seconds; doubles each time
    "max_backoff": 30.0,
    "request_timeout": 30.0,
    "api_key": None,
    "username": None,
    "password": None,
    "verify_certs": True,
    "ca_certs": None,
    "mappings": None,              # the index template's mappings (and settings): inline, or a JSON file's path
    "template_name": "sqapi",      # the composable index template that carries them
    "template_priority": 200,      # above Elasticsearch's built-in templates (100) for the same names
    "fields": {},                  # metadata key -> document field: see FIELD_OPTIONS
}
#: what a ``fields`` entry may say (a plain string is ``{to: <string>}``)
FIELD_OPTIONS = ("to", "drop", "full_text")
#: the field that ``full_text: true`` entries are copied into
FULL_TEXT = "full_text"
#: the fields es_indexer writes itself: no ``fields`` entry may write over them (``metadata.<name>`` may)
OWN_FIELDS = frozenset({"uuid", "data_location", "meta_location", "data_type", "hash_digest", "metadata",
                        "message", "indexed_at", "text", "pages", "text_truncated", FULL_TEXT})
#: the top-level keys of a ``mappings`` given as a template section rather than as a bare mapping
TEMPLATE_SECTIONS = frozenset({"mappings", "settings", "aliases"})
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
    priority = merged["template_priority"]
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise ValueError(f"custom.es_indexer.template_priority must be a whole number, not {priority!r}")
    if not isinstance(merged["template_name"], str) or not merged["template_name"].strip():
        raise ValueError("custom.es_indexer.template_name must be a name (the index template's)")
    merged["template"] = template_section(merged["mappings"])
    merged["field_rules"] = field_rules(merged["fields"])
    merged["metadata_key"] = field_map(config.get("msg_broker") or {})["metadata"]["key"]
    return merged


def check(config: Mapping[str, Any]) -> None:
    if not settings(config)["hosts"]:
        raise PluginNotConfigured("set custom.es_indexer.hosts (e.g. SQAPI_ES_HOSTS=http://localhost:9200 "
                                  "with conf/sqapi.yml)")


#: what setup made for this process: the settings, parsed once, and the indexer with its client
_STATE: dict[str, Any] = {}


def setup(config: Mapping[str, Any]) -> None:
    """Once per process: the settings parsed, the Elasticsearch client made and -- with ``mappings`` -- the index
    template installed, before any document is indexed (a refused template fails the batch with Elasticsearch's
    reason, and setup is tried again with the next one)."""
    options = settings(config)
    client = make_client(options)
    try:
        apply_template(client, options)
    except Exception:
        client.close()
        raise
    _STATE.update(options=options, indexer=BulkIndexer(client, options))


def teardown() -> None:
    """At stop: the client's connections closed."""
    indexer = _STATE.pop("indexer", None)
    _STATE.pop("options", None)
    if indexer is not None:
        indexer.client.close()


def execute_batch(config: Any, database: Any, items: list[Call]) -> list[Any]:
    """Index (or delete) the documents of a batch's messages, their actions in ``_bulk`` requests; one outcome per
    item: its result, or the exception that fails it alone."""
    if "indexer" in _STATE:
        return _index(database, items, _STATE["options"], _STATE["indexer"])
    options = settings(config)  # called without setup (a caller of its own): a client for this call alone
    indexer = BulkIndexer(make_client(options), options)
    try:
        return _index(database, items, options, indexer)
    finally:
        indexer.client.close()


def execute(config: Any, database: Any, message: Any, metadata: dict[str, Any], data: io.BufferedReader) \
        -> dict[str, Any]:
    """sqAPI's one call per message, for a caller of its own (sqapi calls :func:`execute_batch`)."""
    [outcome] = execute_batch(config, database, [Call(message, metadata, getattr(data, "name", os.devnull))])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _index(database: Any, items: list[Call], options: Mapping[str, Any], indexer: BulkIndexer) -> list[Any]:
    """Each item's action, sent together, then recorded in ``es_documents``; one outcome per item."""
    outcomes: list[Any] = [None] * len(items)
    actions: list[_Action] = []
    for number, item in enumerate(items):
        try:
            action = _action(number, item, database, options)
            if action is not None:
                actions.append(action)
            else:  # a deletion from an index not known: searched for, on its own
                outcome = indexer.delete_everywhere(item.message.uuid, index_pattern(options["index"]))
                database.execute_script(str(SCRIPTS / "delete_by_uuid.sql"), uuid_ref=item.message.uuid)
                outcomes[number] = {"action": "delete", "id": item.message.uuid, "result": outcome}
        except Exception as exc:  # this message alone
            outcomes[number] = exc
    indexer.bulk(actions)
    for action in actions:
        try:
            outcomes[action.number] = action.error or _recorded(action, items[action.number].message, database)
        except Exception as exc:
            outcomes[action.number] = exc
    return outcomes


def _action(number: int, item: Call, database: Any, options: Mapping[str, Any]) -> _Action | None:
    """The bulk action for one message (``None``: a deletion whose index is not known)."""
    message = item.message
    known = database.execute_script(str(SCRIPTS / "select_by_uuid.sql"), uuid_ref=message.uuid)
    if _wants_delete(message.body or {}, options):
        if not known:
            return None
        return _Action(number, {"delete": {"_index": known[0]["index_name"], "_id": message.uuid}}, None)
    index = known[0]["index_name"] if known else index_name(options, message.type)
    return _Action(number, {"index": {"_index": index, "_id": message.uuid}},
                   build_document(message, item.metadata, options))


def _recorded(action: _Action, message: Any, database: Any) -> dict[str, Any]:
    """A done action recorded in ``es_documents`` (or taken out of it); the message's result."""
    if action.source is None:
        database.execute_script(str(SCRIPTS / "delete_by_uuid.sql"), uuid_ref=message.uuid)
        return {"action": "delete", "id": message.uuid, "result": action.result or ""}
    index = action.header["index"]["_index"]
    database.execute_script(str(SCRIPTS / "upsert_document.sql"), uuid_ref=message.uuid, index_name=index,
                            hash_digest=message.hash_digest, indexed_at=action.source["indexed_at"])
    return {"action": "index", "index": index, "id": message.uuid, "result": action.result or ""}


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


def build_document(message: Any, metadata: Mapping[str, Any], options: Mapping[str, Any] | None = None) \
        -> dict[str, Any]:
    """The document of one message; ``options["field_rules"]`` (from ``fields``) shape its metadata."""
    rules: list[FieldRule] = list((options or {}).get("field_rules") or [])
    kept, moved, full_text = shape_metadata(metadata, rules)
    body = dict(message.body or {})
    if rules:  # the body's own copy of the metadata would index again what fields moved or dropped
        metadata_key = str((options or {}).get("metadata_key") or "metadata").lower()
        body = {k: v for k, v in body.items() if str(k).lower() != metadata_key}
    document: dict[str, Any] = {
        "uuid": message.uuid,
        "data_location": message.data_location,
        "meta_location": message.meta_location,
        "data_type": message.type,
        "hash_digest": message.hash_digest,
        "metadata": kept,
        "message": body,
        "indexed_at": datetime.now(UTC).isoformat(),
    }
    for field, value in moved.items():
        _put(document, field, value)
    if full_text:
        document[FULL_TEXT] = "\n".join(full_text)
    extracted = (message.results or {}).get("pdf_extractor")
    if isinstance(extracted, Mapping):
        document["text"] = extracted.get("text")
        document["pages"] = extracted.get("pages")
        document["text_truncated"] = bool(extracted.get("truncated"))
    return document


# -- the client and its bulk requests ----------------------------------------------------------

@dataclass
class _Action:
    """One document's action in a bulk request, and its outcome."""

    number: int                      # its item in the batch
    header: dict[str, Any]
    source: dict[str, Any] | None    # the document to index; None: a deletion
    result: str | None = None        # ES's result: "created", "updated", "deleted", "not_found"
    error: Exception | None = None


class BulkIndexer:
    """Sends actions in ``_bulk`` requests of at most ``batch_size``, retrying what ES answers 429 / 5xx to."""

    def __init__(self, client: Any, options: Mapping[str, Any]) -> None:
        self.client = client
        self.batch_size = int(options["batch_size"])
        self.max_retries = int(options["max_retries"])
        self.backoff = float(options["backoff"])
        self.max_backoff = float(options["max_backoff"])

    def bulk(self, actions: list[_Action]) -> None:
        """Send every action; each ends with its ``result`` or its ``error``."""
        for start in range(0, len(actions), self.batch_size):
            self._send(actions[start:start + self.batch_size])

    def _send(self, batch: list[_Action]) -> None:
        try:
            remaining = batch
            for attempt in range(self.max_retries + 1):
                remaining = self._send_once(remaining, last=attempt == self.max_retries)
                if not remaining:
                    return
                self._sleep(attempt)
        except Exception as exc:  # one failure for the whole request: every action still open gets it
            for action in batch:
                if action.result is None and action.error is None:
                    action.error = exc

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
            elif status in RETRYABLE_STATUS and not last:
                retry.append(action)
            elif status in RETRYABLE_STATUS:
                action.error = ConnectorError(f"Elasticsearch answered {status} for document "
                                              f"{outcome.get('_id')} to every retry")
            else:
                action.error = PermanentError(f"Elasticsearch refused document {outcome.get('_id')} ({status}): "
                                              f"{_reason(outcome)}")
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


# -- the index template and the document's shape --------------------------------------------------

def template_section(value: Any) -> dict[str, Any] | None:
    """``mappings`` as the index template's ``template`` section (``None``: no template to install).

    ``value`` is a mapping (``properties``, ``dynamic``, ...), or an object of ``mappings`` / ``settings`` /
    ``aliases`` (the analyzers live in ``settings.analysis``), or the path of a JSON file holding either."""
    where = "custom.es_indexer.mappings"
    if value is None or value == {} or value == "":
        return None
    if isinstance(value, str | os.PathLike):
        path = Path(value).expanduser()
        where = f"{where} ({path})"
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            relative = "" if path.is_absolute() else f" (a relative path is read from the working directory: " \
                                                     f"{path.absolute()})"
            raise ValueError(f"{where} cannot be read: {exc.strerror or exc}{relative}") from None
        except ValueError as exc:
            raise ValueError(f"{where} is not JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an Elasticsearch mapping (an object with properties) or the path of a "
                         f"JSON file holding one, not {type(value).__name__}")
    if TEMPLATE_SECTIONS & set(value):
        others = sorted(set(value) - TEMPLATE_SECTIONS)
        if others:
            raise ValueError(f"{where} mixes template sections ({', '.join(sorted(TEMPLATE_SECTIONS & set(value)))})"
                             f" with mapping keys ({', '.join(others)}): put the mapping under 'mappings'")
        section = {key: value[key] for key in sorted(value)}
    else:
        section = {"mappings": dict(value)}
    for key, part in section.items():
        if not isinstance(part, Mapping):
            raise ValueError(f"{where}: '{key}' must be an object, not {type(part).__name__}")
    if not isinstance((section.get("mappings") or {}).get("properties", {}), Mapping):
        raise ValueError(f"{where}: 'properties' must be an object of field name -> field mapping")
    return json.loads(json.dumps(section))  # plain JSON: what is sent, and a copy the caller cannot change


def index_template(options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The composable index template that ``mappings`` makes (``None`` without ``mappings``)."""
    if options.get("template") is None:
        return None
    return {"index_patterns": [index_pattern(str(options["index"]))], "priority": int(options["template_priority"]),
            "template": options["template"], "_meta": {"managed_by": "sqapi es_indexer"}}


def apply_template(client: Any, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """Install (or replace) the index template of ``options``; returns what was sent (``None``: no ``mappings``).

    Raises :class:`~sqapi.errors.PermanentError` with Elasticsearch's reason when it refuses the template, and
    :class:`~sqapi.errors.ConnectorError` when it cannot be reached or refuses the credentials."""
    template = index_template(options)
    if template is None:
        return None
    name = str(options["template_name"])
    try:
        client.indices.put_index_template(name=name, index_patterns=template["index_patterns"],
                                          priority=template["priority"], template=template["template"],
                                          meta=template["_meta"])
    except elasticsearch.ApiError as exc:
        if exc.status_code in (401, 403):
            raise ConnectorError(f"Elasticsearch refused the credentials ({exc.status_code})") from None
        if exc.status_code in RETRYABLE_STATUS:
            raise ConnectorError(f"Elasticsearch answered {exc.status_code} to index template {name!r}") from None
        raise PermanentError(f"Elasticsearch refused index template {name!r} ({exc.status_code}): "
                             f"{_reason(exc.body)}") from None
    except (elasticsearch.TransportError, elasticsearch.UnsupportedProductError) as exc:
        raise ConnectorError(f"Elasticsearch unreachable: {type(exc).__name__}: {exc}") from None
    log.info("index template %r installed for %s", name, ", ".join(template["index_patterns"]))
    return {"name": name, **template}


@dataclass(frozen=True)
class FieldRule:
    """One ``fields`` entry: where a metadata value goes in the document."""

    source: str              # the metadata key, or a dotted path into nested objects (``author.name``)
    to: str | None = None    # the document field it moves to (dotted: nested); None: it stays in ``metadata``
    drop: bool = False       # taken out of the document (still copied to full_text when that is asked too)
    full_text: bool = False  # its text also copied into the document's ``full_text`` field


def field_rules(fields: Any) -> list[FieldRule]:
    """``custom.es_indexer.fields`` checked: each entry a field name or ``{to, drop, full_text}``."""
    if fields is None or fields == {}:
        return []
    if not isinstance(fields, Mapping):
        raise ValueError("custom.es_indexer.fields must map metadata keys to document fields "
                         f"(e.g. {{title: name}}), not {type(fields).__name__}")
    rules: list[FieldRule] = []
    targets: dict[str, str] = {}
    for source, spec in fields.items():
        where = f"custom.es_indexer.fields.{source}"
        if not isinstance(source, str) or not source.strip(".") or ".." in source:
            raise ValueError(f"custom.es_indexer.fields: {source!r} is not a metadata key")
        if isinstance(spec, str):
            spec = {"to": spec}
        if not isinstance(spec, Mapping) or not spec:
            raise ValueError(f"{where} must be a document field name or an object of {', '.join(FIELD_OPTIONS)}, "
                             f"not {spec!r}")
        unknown = sorted(str(k) for k in spec if k not in FIELD_OPTIONS)
        if unknown:
            raise ValueError(f"{where}: unknown option {', '.join(map(repr, unknown))} "
                             f"(an entry may say {', '.join(FIELD_OPTIONS)})")
        to, drop, full_text = spec.get("to"), spec.get("drop", False), spec.get("full_text", False)
        for name, flag in (("drop", drop), ("full_text", full_text)):
            if not isinstance(flag, bool):
                raise ValueError(f"{where}.{name} must be true or false, not {flag!r}")
        if to is not None:
            if not isinstance(to, str) or not to.strip(".") or ".." in to or to.startswith(".") or to.endswith("."):
                raise ValueError(f"{where}.to must be a document field name (dotted for a nested one), not {to!r}")
            if drop:
                raise ValueError(f"{where} says both to and drop: a dropped key goes nowhere")
            head = to.split(".")[0]
            if head in OWN_FIELDS and not (head == "metadata" and "." in to):
                raise ValueError(f"{where}.to: {to!r} is a field es_indexer writes itself "
                                 f"({', '.join(sorted(OWN_FIELDS))}); metadata.<name> is allowed")
            if to in targets:
                raise ValueError(f"{where}.to: {targets[to]} already goes to {to!r}")
            targets[to] = source
        elif not drop and not full_text:
            raise ValueError(f"{where} says nothing to do: give to, drop: true or full_text: true")
        rules.append(FieldRule(source, to, drop, full_text))
    return rules


_MISSING = object()


def shape_metadata(metadata: Mapping[str, Any], rules: list[FieldRule]) \
        -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``metadata`` through ``rules``: what stays in ``metadata``, the fields moved out of it (document field ->
    value) and the texts for ``full_text``.  Every rule reads the metadata as it came, so their order does not
    matter; a key that is not there is skipped."""
    if not rules:
        return dict(metadata), {}, []
    kept: dict[str, Any] = copy.deepcopy(dict(metadata))
    moved: dict[str, Any] = {}
    texts: list[str] = []
    for rule in rules:
        value = _lookup(metadata, rule.source)
        if value is _MISSING:
            continue
        if rule.full_text:
            texts.extend(_texts(value))
        if rule.to is not None:
            moved[rule.to] = value
        if rule.to is not None or rule.drop:
            _remove(kept, rule.source)
    return kept, moved, texts


def _lookup(obj: Any, path: str) -> Any:
    """``obj[path]``, else ``obj[head][rest]`` for ``head.rest`` (a literal dotted key wins)."""
    if not isinstance(obj, Mapping):
        return _MISSING
    if path in obj:
        return obj[path]
    head, dot, rest = path.partition(".")
    return _lookup(obj[head], rest) if dot and head in obj else _MISSING


def _remove(obj: dict[str, Any], path: str) -> None:
    """Take ``path`` out of ``obj``, and the objects it leaves empty."""
    if path in obj:
        del obj[path]
        return
    head, dot, rest = path.partition(".")
    if dot and isinstance(obj.get(head), dict):
        _remove(obj[head], rest)
        if not obj[head]:
            del obj[head]


def _put(document: dict[str, Any], field: str, value: Any) -> None:
    """``document[a][b] = value`` for ``a.b``, making the objects on the way."""
    *parents, last = field.split(".")
    target = document
    for name in parents:
        if not isinstance(target.get(name), dict):
            target[name] = {}
        target = target[name]
    target[last] = value


def _texts(value: Any) -> list[str]:
    """The text of a value for ``full_text``: strings as they are, numbers written out, lists and objects item by
    item, nothing for null."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [text for item in value.values() for text in _texts(item)]
    if isinstance(value, list | tuple):
        return [text for item in value for text in _texts(item)]
    return [value if isinstance(value, str) else json.dumps(value)]


# -- the client ---------------------------------------------------------------------------------

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
