"""Messages: parsing a body into the logical fields sqapi works with.

The body is a JSON object (``msg_broker.parser.type: json``, the default) or a delimited
string (``type: string`` with ``format: 'uuid|data_location|metadata'`` and ``delimiter``).
Logical fields map to body keys through ``msg_broker.message_fields`` (sqAPI's format
``{field: {key: body_key, required: bool}}``); keys match case-insensitively.

A body is refused -- a :class:`~sqapi.errors.MessageError`, never retried -- when it is larger
than ``msg_broker.max_body_bytes``, is not UTF-8, is not a JSON object, nests deeper than
:data:`MAX_DEPTH`, or holds a string no database can store (a NUL character, a lone UTF-16
surrogate).  A message's identity is strict: the uuid is a non-empty string (surrounding
blanks stripped) or a whole number (written in decimal), at most :data:`MAX_UUID_LENGTH`
characters, printable; anything else (an object, a list, ``true``, ``1.5``) is refused.  A
uuid that is not required and absent is the body's sha256 (``sha256:<hex>``), so two
different bodies never share one and a redelivered body keeps its own.  ``data_location``,
``meta_location`` and ``data_type`` are strings of at most :data:`MAX_FIELD_LENGTH`
characters: what is stored and logged stays bounded.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqapi.errors import MessageError

LOGICAL_FIELDS: dict[str, dict[str, Any]] = {
    "uuid": {"key": "uuid_ref", "required": True},
    "data_location": {"key": "data_location", "required": True},
    "meta_location": {"key": "meta_location", "required": False},
    "type": {"key": "data_type", "required": False},
    "metadata": {"key": "metadata", "required": False},
    "action": {"key": "action", "required": False},
}
ACTIONS = ("process", "delete")
MAX_UUID_LENGTH = 255
#: characters at most in data_location, meta_location and data_type
MAX_FIELD_LENGTH = 4096
#: nesting of objects and lists in a body, at most
MAX_DEPTH = 64
#: bytes in a body, at most, unless msg_broker.max_body_bytes says otherwise
MAX_BODY_BYTES = 1 << 20


_IMMUTABLE = (str, int, float, bool, type(None))


def private_copy(value: Any) -> Any:
    """A deep copy, fast for what messages hold (JSON-like dicts, lists and scalars); anything else is deep-copied."""
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is dict:
        return {k: v if type(v) in _IMMUTABLE else private_copy(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _IMMUTABLE else private_copy(v) for v in value]
    return copy.deepcopy(value)


@dataclass
class Message:
    """One message as the plugins see it.

    ``id`` identifies this delivery (a spool file, a broker delivery); ``uuid`` the message
    itself, across redeliveries.  ``results`` holds the returned dicts of the plugins this one
    runs after; ``plugin_statuses`` the outcome of every plugin run before it in this attempt.
    """

    id: str
    uuid: str
    data_location: str
    meta_location: str | None = None
    type: str | None = None
    metadata: dict[str, Any] | None = None
    body: dict[str, Any] = field(default_factory=dict)
    hash_digest: str | None = None
    action: str = "process"
    results: dict[str, Any] = field(default_factory=dict)
    plugin_statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the OpenTelemetry trace of this attempt (32 hex digits), when tracing is on; recorded with its status
    trace_id: str | None = None

    def copy(self, results: dict[str, Any] | None = None,
             plugin_statuses: dict[str, dict[str, Any]] | None = None) -> Message:
        """A private copy: nothing a plugin changes in it reaches the original.

        ``results`` / ``plugin_statuses``: taken as they are (already private) instead of copies of this one's.
        """
        return Message(self.id, self.uuid, self.data_location, self.meta_location, self.type,
                       private_copy(self.metadata), private_copy(self.body), self.hash_digest, self.action,
                       private_copy(self.results) if results is None else results,
                       private_copy(self.plugin_statuses) if plugin_statuses is None else plugin_statuses,
                       self.trace_id)

    # sqAPI plugins read these names too
    @property
    def uuid_ref(self) -> str:
        return self.uuid

    @property
    def data_type(self) -> str | None:
        return self.type


def field_map(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The logical-field -> ``{key, required}`` map from ``msg_broker.message_fields`` over the defaults."""
    fields = {name: dict(spec) for name, spec in LOGICAL_FIELDS.items()}
    for name, spec in (config.get("message_fields") or {}).items():
        if isinstance(spec, str):
            spec = {"key": spec}
        if not isinstance(spec, Mapping):
            continue
        entry = fields.setdefault(str(name), {"key": str(name), "required": False})
        entry.update({k: v for k, v in spec.items() if k in ("key", "required")})
    return fields


class MessageParser:
    """Turns raw bodies into :class:`Message` objects according to ``msg_broker``."""

    def __init__(self, broker_config: Mapping[str, Any]) -> None:
        parser = broker_config.get("parser") or {}
        self.kind = parser.get("type", "json")
        self.delimiter = str(parser.get("delimiter", "|"))
        # the format names the logical fields in order, separated by the same delimiter as the bodies
        default_format = self.delimiter.join(("uuid", "data_location", "metadata"))
        self.format = [f.strip() for f in str(parser.get("format") or default_format).split(self.delimiter)]
        self.fields = field_map(broker_config)
        self._lookup = {name: str(spec["key"]).lower() for name, spec in self.fields.items()}
        self.max_body_bytes = int(broker_config.get("max_body_bytes") or MAX_BODY_BYTES)

    def parse(self, raw: bytes | str | Mapping[str, Any], delivery_id: str) -> Message:
        """Parse ``raw``; :class:`MessageError` (with the uuid when known) says what is wrong."""
        body = self.parse_body(raw)
        lowered = {str(k).lower(): v for k, v in body.items()}

        def value(name: str) -> Any:
            return lowered.get(self._lookup[name])

        uuid = self._uuid(value("uuid"))
        _check_values(body, "body", uuid)  # before anything else walks it
        missing = [self.fields[name]["key"] for name, spec in self.fields.items()
                   if spec.get("required") and value(name) in (None, "")]
        if missing:
            raise MessageError(f"missing required field{'s' if len(missing) > 1 else ''}: {', '.join(missing)}",
                               uuid=uuid)
        if uuid is None:
            if self.fields["uuid"].get("required"):
                raise MessageError(f"{self.fields['uuid']['key']} is blank")
            uuid = "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()  # not the delivery id: ids repeat
        metadata = value("metadata")
        if isinstance(metadata, str) and metadata.strip():
            try:
                metadata = json.loads(metadata)
            except (json.JSONDecodeError, RecursionError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise MessageError(f"{self.fields['metadata']['key']} is not valid JSON ({reason})",
                                   uuid=uuid) from None
            _check_values(metadata, self.fields["metadata"]["key"], uuid)
        elif isinstance(metadata, str):
            metadata = None
        if metadata is not None and not isinstance(metadata, dict):
            raise MessageError(f"{self.fields['metadata']['key']} must be a JSON object, not "
                               f"{type(metadata).__name__}", uuid=uuid)
        for name in ("data_location", "meta_location", "type"):
            found = value(name)
            if found is not None and not isinstance(found, str):
                raise MessageError(f"{self.fields[name]['key']} must be a string, not {type(found).__name__}",
                                   uuid=uuid)
            if isinstance(found, str) and len(found) > MAX_FIELD_LENGTH:
                raise MessageError(f"{self.fields[name]['key']} is {len(found)} characters long, over "
                                   f"{MAX_FIELD_LENGTH}", uuid=uuid)
        action = str(value("action") or "process").lower()
        if action not in ACTIONS:
            raise MessageError(f"{self.fields['action']['key']} must be one of {', '.join(ACTIONS)}", uuid=uuid)
        return Message(
            id=delivery_id,
            action=action,
            uuid=uuid,
            data_location=value("data_location"),
            meta_location=value("meta_location") or None,
            type=(value("type") or None),
            metadata=metadata,
            body=body,
        )

    def _uuid(self, found: Any) -> str | None:
        """The uuid as sqapi records it, ``None`` when absent or blank; refuses what cannot be an identity."""
        key = self.fields["uuid"]["key"]
        if found is None:
            return None
        if isinstance(found, bool) or not isinstance(found, str | int):
            raise MessageError(f"{key} must be a string or a whole number, not {_kind(found)}")
        uuid = str(found).strip()
        if not uuid:
            return None
        if len(uuid) > MAX_UUID_LENGTH or not uuid.isprintable():  # NUL and other controls are not printable
            raise MessageError(f"{key} is longer than {MAX_UUID_LENGTH} characters or not printable")
        return uuid

    def parse_body(self, raw: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
        """The body as a dict: its size, UTF-8 and JSON checked (:meth:`parse` checks its values); else MessageError."""
        if isinstance(raw, Mapping):
            return dict(raw)
        size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
        if size > self.max_body_bytes:
            raise MessageError(f"body is larger than msg_broker.max_body_bytes ({self.max_body_bytes} bytes)")
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MessageError(f"body is not UTF-8 text (bad byte at {exc.start})") from None
        if self.kind == "string":
            return self._parse_delimited(raw)
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise MessageError(f"body is not valid JSON ({exc.msg.removesuffix(' at')} at line {exc.lineno} "
                               f"column {exc.colno})")\
                from None
        except RecursionError:
            raise MessageError(f"body nests deeper than {MAX_DEPTH} levels") from None
        if not isinstance(parsed, dict):
            raise MessageError(f"body must be a JSON object, not {_kind(parsed)}")
        return parsed

    def _parse_delimited(self, raw: str) -> dict[str, Any]:
        parts = raw.strip().split(self.delimiter, maxsplit=len(self.format) - 1)
        body: dict[str, Any] = {}
        for name, part in zip(self.format, parts, strict=False):
            key = self.fields[name]["key"] if name in self.fields else name
            body[key] = part
        return body


def _kind(value: Any) -> str:
    """A JSON value's kind, for refusals (never the value itself: it may be huge)."""
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false", float: "a number with a "
            "fraction", int: "a whole number", type(None): "null"}.get(type(value), type(value).__name__)


def _check_values(value: Any, where: str, uuid: str | None) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings no database stores (NUL, lone surrogates); iterative."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise MessageError(f"{where} nests deeper than {MAX_DEPTH} levels", uuid=uuid)
            children = list(item.keys()) + list(item.values()) if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, str):
            if "\x00" in item:
                raise MessageError(f"{where} holds a NUL character, which no text column stores", uuid=uuid)
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise MessageError(f"{where} holds a lone UTF-16 surrogate, which is not text", uuid=uuid) from None


def _canonical(body: Mapping[str, Any]) -> bytes:
    """A body's canonical JSON: the same body gives the same bytes, whatever its key order."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
