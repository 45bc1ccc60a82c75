"""Messages in over HTTP: ``POST /messages`` and ``DELETE /messages/<uuid>``, as ``sqapi publish`` does.

A body is checked by the loader's own :class:`~sqapi.core.message.MessageParser` (the
``msg_broker`` section) before anything is published; what it refuses raises :class:`Refused`
with the HTTP status and the reason, and nothing reaches the broker.  An upload is stored in the
configured data store first (``DataStore.upload``, as ``sqapi publish --upload``), streamed to a
temporary file on the way in (:class:`UploadRequest`), never held in memory.  Each publication
opens the configured listener type's publisher (:func:`sqapi.connectors.listeners.publisher_for`:
RabbitMQ with publisher confirms, or the spool folder), publishes, and closes it.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import uuid as uuidlib
from collections.abc import Mapping
from typing import IO, Any

from flask import Request, current_app
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.utils import secure_filename

from sqapi import tracing
from sqapi.app import resolve_connector
from sqapi.config import Config
from sqapi.connectors.data import DataStore
from sqapi.connectors.listeners import publisher_for
from sqapi.core.message import Message, MessageParser, field_map
from sqapi.errors import AccessDenied, MessageError, SqapiError

#: bytes of a multipart upload (the file and its fields), unless ``api.max_upload_bytes`` says otherwise
DEFAULT_MAX_UPLOAD_BYTES = 1 << 30
#: the multipart field that carries the data file
FILE_FIELD = "file"


class Refused(Exception):
    """A request that is not published: ``status`` is its HTTP status, ``reason`` says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class UploadRequest(Request):
    """Flask's request, with uploaded files streamed to a named temporary file in ``processing.temp_dir``
    (the system's when unset) instead of memory; werkzeug closes (and so deletes) it after the request."""

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> IO[bytes]:
        temp_dir = current_app.config.get("SQAPI_TEMP_DIR") if current_app else None
        return tempfile.NamedTemporaryFile("wb+", dir=temp_dir or None, prefix="sqapi-upload-")


class HttpPublisher:
    """Checks, stores and publishes the messages posted to the API, for one wired sqapi's ``config``."""

    def __init__(self, config: Config, data_store: DataStore, tracer: Any = None) -> None:
        self.config = config
        #: an OpenTelemetry tracer when tracing is on: each publication is a send span, its traceparent in the headers
        self.tracer = tracer
        self.broker = dict(config.get("msg_broker") or {})
        self.parser = MessageParser(self.broker)
        self.keys = {name: str(spec["key"]) for name, spec in field_map(self.broker).items()}
        self.data_store = data_store
        self.listener_class = resolve_connector(config, "msg_broker").Listener  # checked once, not per post

    # -- bodies -------------------------------------------------------------------------------------
    def from_json(self, raw: bytes) -> tuple[Message, bytes]:
        """A posted JSON message, its uuid generated when absent; the parsed message and the body to publish."""
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 or nested too deeply"
            raise Refused(400, f"the body is not valid JSON ({reason})") from None
        if not isinstance(body, dict):
            raise Refused(422, f"the body must be a JSON object (a sqAPI message), not {_kind(body)}")
        self._give_uuid(body)
        return self.check(body)

    def from_text(self, raw: bytes) -> tuple[Message, bytes]:
        """A posted delimited message (``msg_broker.parser.type: string``), published as it came."""
        message = self._parse(raw)
        return message, raw

    def from_upload(self, files: MultiDict[str, FileStorage], form: Mapping[str, str]) -> tuple[Message, bytes]:
        """A multipart upload: the file (field ``file``) stored in the data store, then a message for it.

        The form's other fields are the message's own (by their configured keys: ``uuid_ref``,
        ``data_location`` -- where to store the file, default ``<uuid>/<file name>`` --,
        ``data_type``, ``meta_location``, ``metadata`` -- a JSON object)."""
        upload = files.get(FILE_FIELD)
        if upload is None:
            if len(files) == 1:
                upload = next(iter(files.values()))
            else:
                raise Refused(400, f"no data file: send it as the multipart field '{FILE_FIELD}'")
        # a part without a name (werkzeug gives it None) is no field of the message
        lowered = {name.lower(): value for name, value in form.items() if isinstance(name, str)}
        body: dict[str, Any] = {}
        for name in ("uuid", "data_location", "meta_location", "type"):
            value = lowered.get(self.keys[name].lower())
            if value not in (None, ""):
                body[self.keys[name]] = value
        metadata = lowered.get(self.keys["metadata"].lower())
        if metadata not in (None, ""):
            try:
                body[self.keys["metadata"]] = json.loads(metadata)
            except (ValueError, RecursionError):
                raise Refused(400, f"the field '{self.keys['metadata']}' is not valid JSON") from None
        uuid = self._give_uuid(body)
        name = secure_filename(upload.filename or "") or "data"
        location = body.setdefault(self.keys["data_location"], f"{secure_filename(uuid) or 'upload'}/{name}")
        self.check(body)  # all is well before anything is stored
        stream = upload.stream
        path = getattr(stream, "name", None)
        if not isinstance(path, str) or not os.path.isfile(path):
            # a file werkzeug kept in memory (small, or from a test client): written out once
            with tempfile.NamedTemporaryFile("wb", dir=current_app.config.get("SQAPI_TEMP_DIR") or None,
                                             prefix="sqapi-upload-", delete=False) as copy:
                upload.save(copy)
            path = copy.name
            owned = True
        else:
            stream.flush()
            owned = False
        try:
            stored = self.data_store.upload(path, location)
        except NotImplementedError:
            raise Refused(501, f"data_store type '{self.data_store.kind}' cannot store uploads; upload the object "
                               f"yourself and post a JSON message with its {self.keys['data_location']}") from None
        except AccessDenied as exc:
            raise Refused(409 if "exists" in str(exc) else 422, f"the data store refused the file: {exc}") from None
        except OSError as exc:
            if exc.errno == errno.EEXIST:  # another upload took that location with other content meanwhile
                raise Refused(409, f"the data store refused the file: {exc.strerror or exc}") from None
            if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):  # the location, not the store
                raise Refused(422, f"the data store cannot store a file as that {self.keys['data_location']}: "
                                   f"{exc.strerror or exc}") from None
            raise Refused(503, f"the data store could not store the file: {exc.strerror or exc}") from None
        except SqapiError as exc:
            raise Refused(503, f"the data store could not store the file: {exc}") from None
        finally:
            if owned:
                os.unlink(path)
        body[self.keys["data_location"]] = stored
        return self.check(body)

    def deletion(self, uuid: str, data_location: str | None) -> tuple[Message, bytes]:
        """sqapi's delete action for ``uuid`` (``"action": "delete"``)."""
        body = {self.keys["uuid"]: uuid, self.keys["data_location"]: data_location or uuid,
                self.keys["action"]: "delete"}
        return self.check(body)

    def check(self, body: dict[str, Any]) -> tuple[Message, bytes]:
        """Parsed as the loader parses it (422 with the parser's reason if refused); the body as JSON bytes."""
        raw = json.dumps(body).encode()
        return self._parse(raw), raw

    def _parse(self, raw: bytes) -> Message:
        if len(raw) > self.parser.max_body_bytes:
            raise Refused(413, f"the message is {len(raw)} bytes, over msg_broker.max_body_bytes "
                               f"({self.parser.max_body_bytes})")
        try:
            return self.parser.parse(raw, "http")
        except MessageError as exc:
            raise Refused(422, f"malformed message: {exc}") from None

    def _give_uuid(self, body: dict[str, Any]) -> str:
        key = self.keys["uuid"]
        for name, value in body.items():
            if str(name).lower() == key.lower():
                return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
        body[key] = str(uuidlib.uuid4())
        return str(body[key])

    # -- publishing ---------------------------------------------------------------------------------
    def publish(self, message: Message, raw: bytes, trace_context: Mapping[str, str] | None = None) -> None:
        """Publish ``raw`` to the configured broker, confirmed; :class:`Refused` (503/501) when it cannot.

        ``trace_context``: the request's W3C headers (``traceparent``), which the send span continues."""
        try:
            publisher = publisher_for(self.listener_class, self.broker)
        except NotImplementedError:
            raise Refused(501, f"msg_broker type '{self.broker.get('type')}' cannot publish") from None
        try:
            publisher.open()
            with tracing.publishing(self.tracer, self.broker, message.uuid, trace_context) as headers:
                publisher.publish(raw, message_id=message.uuid, headers=headers)
        except Exception as exc:  # the broker's own errors (a stalled confirm, too) all mean: not published
            raise Refused(503, f"not published: {exc}") from None
        finally:
            publisher.close()


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
