"""Messages: parsing a body into the logical fields sqapi works with.

The body is a JSON object (``msg_broker.parser.type: json``, the default) or a delimited
string (``type: string`` with ``format: 'uuid|data_location|metadata'`` and ``delimiter``).
Logical fields map to body keys through ``msg_broker.message_fields`` (sqAPI's format
``{field: {key: body_key, required: bool}}``); keys match case-insensitively.
"""

from __future__ import annotations

import copy
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

    def copy(self, results: dict[str, Any] | None = None,
             plugin_statuses: dict[str, dict[str, Any]] | None = None) -> Message:
        """A private copy: nothing a plugin changes in it reaches the original.

        ``results`` / ``plugin_statuses``: taken as they are (already private) instead of copies of this one's.
        """
        return Message(self.id, self.uuid, self.data_location, self.meta_location, self.type,
                       private_copy(self.metadata), private_copy(self.body), self.hash_digest, self.action,
                       private_copy(self.results) if results is None else results,
                       private_copy(self.plugin_statuses) if plugin_statuses is None else plugin_statuses)

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

    def parse(self, raw: bytes | str | Mapping[str, Any], delivery_id: str) -> Message:
        """Parse ``raw``; :class:`MessageError` (with the uuid when known) says what is wrong."""
        body = self.parse_body(raw)
        lowered = {str(k).lower(): v for k, v in body.items()}

        def value(name: str) -> Any:
            return lowered.get(self._lookup[name])

        uuid = value("uuid")
        uuid = str(uuid).strip() if uuid not in (None, "") else None
        if uuid is not None and (len(uuid) > MAX_UUID_LENGTH or not uuid.isprintable()):  # NUL is not printable
            raise MessageError(f"{self.fields['uuid']['key']} is longer than {MAX_UUID_LENGTH} characters "
                               "or not printable")
        missing = [self.fields[name]["key"] for name, spec in self.fields.items()
                   if spec.get("required") and value(name) in (None, "")]
        if missing:
            raise MessageError(f"missing required field{'s' if len(missing) > 1 else ''}: {', '.join(missing)}",
                               uuid=uuid)
        assert uuid is not None or not self.fields["uuid"].get("required")
        metadata = value("metadata")
        if isinstance(metadata, str) and metadata.strip():
            try:
                metadata = json.loads(metadata)
            except json.JSONDecodeError as exc:
                raise MessageError(f"{self.fields['metadata']['key']} is not valid JSON ({exc.msg})",
                                   uuid=uuid) from None
        elif isinstance(metadata, str):
            metadata = None
        if metadata is not None and not isinstance(metadata, dict):
            raise MessageError(f"{self.fields['metadata']['key']} must be a JSON object, not "
                               f"{type(metadata).__name__}", uuid=uuid)
        for name in ("data_location", "meta_location", "type"):
            found = value(name)
            if found is not None and not isinstance(found, str):
                raise MessageError(f"{self.fields[name]['key']} must be a string", uuid=uuid)
            if isinstance(found, str) and "\x00" in found:
                raise MessageError(f"{self.fields[name]['key']} contains a NUL character", uuid=uuid)
        action = str(value("action") or "process").lower()
        if action not in ACTIONS:
            raise MessageError(f"{self.fields['action']['key']} must be one of {', '.join(ACTIONS)}, not "
                               f"{value('action')!r}", uuid=uuid)
        return Message(
            id=delivery_id,
            action=action,
            uuid=uuid or delivery_id,
            data_location=value("data_location"),
            meta_location=value("meta_location") or None,
            type=(value("type") or None),
            metadata=metadata,
            body=body,
        )

    def parse_body(self, raw: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(raw, Mapping):
            return dict(raw)
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MessageError(f"body is not UTF-8 text (bad byte at {exc.start})") from None
        if self.kind == "string":
            return self._parse_delimited(raw)
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise MessageError(f"body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")\
                from None
        if not isinstance(body, dict):
            raise MessageError(f"body must be a JSON object, not {type(body).__name__}")
        return body

    def _parse_delimited(self, raw: str) -> dict[str, Any]:
        parts = raw.strip().split(self.delimiter, maxsplit=len(self.format) - 1)
        body: dict[str, Any] = {}
        for name, part in zip(self.format, parts, strict=False):
            key = self.fields[name]["key"] if name in self.fields else name
            body[key] = part
        return body
