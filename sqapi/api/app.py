"""The Flask application: core endpoints, dashboard, metrics and every plugin's blueprints.

:func:`create_app` is the one factory.  It takes a wired :class:`~sqapi.app.Sqapi` (from
:func:`sqapi.app.build`) and registers, like sqAPI does, each active plugin's blueprints
with ``app.config[name]`` (the plugin's config) and ``app.database[name]`` (its database),
so a blueprint reads ``flask.current_app.config[name]`` and ``current_app.database[name]``.

Endpoints (SPEC section 10; ``docs/api.md`` describes each)::

    GET /                  dashboard (HTML; its pages, sign-in and actions: sqapi.api.console)
    GET /health            each component's state; 200 all up, 503 naming what is down
    GET /plugins           active / unloaded / failed plugins, their blueprints and endpoints
    GET /rules             every URL rule
    GET /messages          ?status=&plugin=&limit=&before=&before_uuid= (newest first, paged)
    POST /messages         publish a JSON message or a multipart upload (stored first); 202
    GET /messages/<uuid>   one message with its per-plugin rows and its history (every attempt's events)
    DELETE /messages/<uuid>          publish sqapi's delete action for it; 202
    GET /messages/<uuid>/data        its data from the data store (mime type, ETag = sha256, Range)
    GET /messages/<uuid>/metadata    the metadata its last attempt used (messages.metadata)
    GET /metrics           Prometheus text format
    GET /openapi.json      the OpenAPI 3.1 document of all of these and of the plugins' endpoints
    GET /openapi           that document rendered as a page

With ``api.token`` set (default: ``$SQAPI_API_TOKEN``), every route but ``/health`` and ``/login``
needs ``Authorization: Bearer <token>`` or the session cookie of a sign-in (``sqapi.api.session``).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Flask, Response, current_app, render_template, request, send_file, url_for
from werkzeug.exceptions import HTTPException

from sqapi import registry, tracing
from sqapi.api import dashboard, openapi, responding, session
from sqapi.api.console import console
from sqapi.api.health import Component, HealthCheck
from sqapi.api.metrics import CONTENT_TYPE, Metrics
from sqapi.api.publishing import DEFAULT_MAX_UPLOAD_BYTES, HttpPublisher, Refused, UploadRequest
from sqapi.app import Sqapi
from sqapi.config import parse_size, secret_values
from sqapi.core.attempt import DELETED
from sqapi.core.status import MESSAGE_STATUSES, Status
from sqapi.errors import AccessDenied, ConnectorError, NotFound

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_LIMIT, MAX_LIMIT = 50, 1000


class SqapiFlask(Flask):
    """Flask with what sqAPI's blueprints expect beside ``config``: ``database`` (and ``plugins``)."""

    database: dict[str, Any]
    sqapi: Sqapi
    publisher: HttpPublisher
    metrics: Metrics
    health: HealthCheck
    registration_errors: dict[str, list[str]]
    sessions: session.Sessions


def _app() -> SqapiFlask:
    return current_app  # type: ignore[return-value]


def api_token(config: Any) -> str:
    """``api.token`` from the config, else ``$SQAPI_API_TOKEN``; empty means no token."""
    token = (config.get("api") or {}).get("token")
    if token in (None, ""):
        token = os.environ.get("SQAPI_API_TOKEN", "")
    return str(token)


def create_app(sqapi: Sqapi, listener: Any = None) -> SqapiFlask:
    """The Flask app for a wired sqapi; ``listener`` is the running one (``sqapi run``), if any.

    Appends the app's :class:`~sqapi.api.metrics.Metrics` to ``sqapi.processor.hooks``, so
    what this process processes shows in ``/metrics``.
    """
    config = sqapi.config
    section = config.get("api") or {}
    app = SqapiFlask(__name__)
    app.request_class = UploadRequest
    app.url_map.strict_slashes = False
    max_body = parse_size(section.get("max_body_bytes"), "api.max_body_bytes") or DEFAULT_MAX_BODY_BYTES
    app.config["MAX_CONTENT_LENGTH"] = max_body
    app.config["MAX_FORM_MEMORY_SIZE"] = max_body  # each non-file field of an upload (e.g. its metadata)
    app.config["SQAPI_MAX_UPLOAD_BYTES"] = \
        parse_size(section.get("max_upload_bytes"), "api.max_upload_bytes") or DEFAULT_MAX_UPLOAD_BYTES
    app.config["SQAPI_TEMP_DIR"] = (config.get("processing") or {}).get("temp_dir")
    app.sqapi = sqapi
    app.publisher = HttpPublisher(config, sqapi.data_store, sqapi.tracer_provider.get_tracer(tracing.INSTRUMENTATION)
                                  if sqapi.tracer_provider is not None else None)
    app.database = {}
    app.registration_errors = {}
    app.metrics = Metrics(sqapi.database)
    sqapi.processor.hooks.append(app.metrics)

    secrets = sorted(secret_values(config), key=len, reverse=True)

    def mask(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    app.health = HealthCheck(_components(sqapi, listener), timeout=float(section.get("health_timeout", 5.0)),
                             mask=mask)

    token = api_token(config)
    app.config["SQAPI_TOKEN_REQUIRED"] = bool(token)
    app.sessions = session.install(app, token, section.get("secure_cookie", "auto"))
    _install_error_handlers(app)
    _refuse_nul_characters(app)
    app.register_blueprint(core)
    app.register_blueprint(console)
    _register_plugin_blueprints(app, sqapi)
    return app


# -- wiring ---------------------------------------------------------------------------------------
def _components(sqapi: Sqapi, listener: Any) -> list[Component]:
    config = sqapi.config

    def kind(topic: str) -> str:
        return str((config.get(topic) or {}).get("type"))

    components = [Component("database", kind("database"), sqapi.database.ping)]
    broker_ping: Any
    try:
        broker = listener if listener is not None else sqapi.create_listener()
        broker_ping = broker.ping
    except Exception as exc:  # a broker that cannot even be built is reported as down, not a crash
        problem = exc

        def broker_ping() -> None:
            raise problem

    components.append(Component("msg_broker", kind("msg_broker"), broker_ping))
    components.append(Component("data_store", kind("data_store"), sqapi.data_store.ping))
    components.append(Component("meta_store", kind("meta_store"), sqapi.meta_store.ping))
    return components


def _install_error_handlers(app: SqapiFlask) -> None:
    @app.errorhandler(ConnectorError)
    def unavailable(exc: ConnectorError) -> Response:
        return responding.respond({"error": "service unavailable", "details": str(exc)}, 503)

    @app.errorhandler(Refused)
    def refused(exc: Refused) -> Response:
        return responding.respond({"error": "not published", "details": exc.reason}, exc.status)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        answer = responding.respond({"error": (exc.name or "error").lower(), "details": exc.description},
                                    exc.code or 500)
        for name, value in exc.get_headers():  # a 405's Allow, a 416's Content-Range, ...
            if name.lower() != "content-type":
                answer.headers[name] = value
        return answer


def _refuse_nul_characters(app: SqapiFlask) -> None:
    """A NUL character in the path or the query is a 400: no uuid, status or plugin name holds one (text columns
    cannot store it), and the database driver refuses to send it."""
    @app.before_request
    def no_nul() -> Response | None:
        if "\x00" in request.path or any("\x00" in key or "\x00" in value
                                           for key, value in request.args.items(multi=True)):
            return responding.respond({"error": "bad request", "details": "the path or the query holds a NUL "
                                       "character (no uuid, status or name holds one)"}, 400)
        return None


def _register_plugin_blueprints(app: SqapiFlask, sqapi: Sqapi) -> None:
    for plugin in sqapi.plugins.active:
        app.config[plugin.name] = plugin.config
        app.database[plugin.name] = plugin.database if plugin.database is not None else sqapi.database
        for bp in plugin.blueprints:
            try:
                app.register_blueprint(bp)
            except Exception as exc:  # e.g. two plugins' blueprints share a name: keep serving the rest
                problem = f"blueprint {bp.name}: not registered: {exc}"
                app.registration_errors.setdefault(plugin.name, []).append(problem)
                log.error("plugin %s: %s", plugin.name, problem)


# -- core endpoints -------------------------------------------------------------------------------
core = Blueprint("core", __name__)


@core.route("/health", methods=["GET"])
def health() -> Response:
    report = _app().health.check()
    return responding.respond(report, 200 if report["status"] == "up" else 503)


def url_rules() -> list[dict[str, Any]]:
    """Every URL rule, in sqAPI's ``/rules`` format (``function``, ``endpoint``, ``arguments``, ``methods``)."""
    rules = []
    for rule in sorted(_app().url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        rules.append({
            "function": rule.endpoint,
            "endpoint": rule.rule,
            "arguments": sorted(rule.arguments),
            "methods": sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}),
        })
    return rules


def plugin_list() -> list[dict[str, Any]]:
    """sqAPI's ``/plugins`` entries (``name``, ``status``, ``error``, ``blueprints``) plus sqapi's details."""
    app = _app()
    rules = url_rules()
    registered = app.blueprints
    entries = []
    for plugin in app.sqapi.plugins.plugins.values():
        entry = plugin.describe()
        entry["status"] = plugin.state
        if plugin.reason and plugin.state == "failed":
            entry["error"] = plugin.reason
        entry["blueprint_errors"] = list(plugin.blueprint_errors) + app.registration_errors.get(plugin.name, [])
        blueprints = []
        for bp in plugin.blueprints:
            if not any(bp is served for served in registered.values()):
                continue  # not registered: its error is in blueprint_errors
            blueprints.append({
                "package": bp.name,
                "url_prefix": bp.url_prefix,
                "url_values_defaults": bp.url_values_defaults,
                "endpoints": [r for r in rules if r["function"].startswith(bp.name + ".")],
            })
        entry["blueprints"] = blueprints
        entries.append(entry)
    order = {"active": 0, "unloaded": 1, "failed": 2}
    return sorted(entries, key=lambda e: (order.get(e["state"], 3), e["name"]))


@core.route("/plugins", methods=["GET"])
def plugins() -> Response:
    return responding.ok(plugin_list())


@core.route("/rules", methods=["GET"])
def rules() -> Response:
    return responding.ok(url_rules())


@core.route("/messages", methods=["GET"])
def messages() -> Response:
    status = request.args.get("status") or None
    if status is not None:
        status = status.upper()
        if status not in MESSAGE_STATUSES:
            return responding.invalid_request(f"status must be one of {', '.join(MESSAGE_STATUSES)}")
    raw_limit = request.args.get("limit") or str(DEFAULT_LIMIT)
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        return responding.invalid_request(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    limit = int(raw_limit)
    plugin = request.args.get("plugin") or None
    before = request.args.get("before") or None
    if before is not None:
        try:  # the cursor a "next" link carries: an ISO 8601 time (else the database would refuse it: a 500)
            before = datetime.fromisoformat(before).isoformat()
        except ValueError:
            return responding.invalid_request("before must be an ISO 8601 time, as a page's 'next' link gives")
    before_uuid = request.args.get("before_uuid") or None
    rows = _app().sqapi.database.list_messages(status=status, plugin=plugin, limit=limit, before=before,
                                               before_uuid=before_uuid)
    for row in rows:
        row.pop("metadata", None)  # pages stay small: GET /messages/<uuid>/metadata has it
    body: dict[str, Any] = {"messages": rows, "count": len(rows), "next": None}
    if len(rows) == limit:
        last = rows[-1]
        cursor = last["updated_at"].isoformat() if isinstance(last["updated_at"], datetime) \
            else str(last["updated_at"])
        query = {k: v for k, v in (("status", status), ("plugin", plugin)) if v}
        query.update(limit=str(limit), before=cursor, before_uuid=str(last["uuid"]))
        body["next"] = f"{request.path}?{urlencode(query)}"
    return responding.ok(body)


@core.route("/messages/<uuid>", methods=["GET"])
def message(uuid: str) -> Response:
    database = _app().sqapi.database
    row = database.get_message(uuid)
    if row is None:
        return responding.not_found(f"no message with uuid {uuid}")
    plugin_rows = database.get_plugin_rows(uuid)
    for plugin_row in plugin_rows:
        plugin_row["result"] = dashboard.decode_result(plugin_row.get("result"))
    failed = [p["plugin"] for p in plugin_rows if p["status"] == Status.FAILED]
    row["metadata"] = decode_metadata(row.get("metadata"))
    history = registry.history(database, uuid)
    return responding.ok({**row, "plugins": plugin_rows, "failed_plugins": failed, "history": history})


def decode_metadata(text: Any) -> Any:
    """``messages.metadata`` (JSON text) as the object it holds; ``None`` when there is none."""
    if text in (None, ""):
        return None
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return None


@core.route("/messages", methods=["POST"])
def post_message() -> Response:
    """Publish a message (JSON) or an upload (multipart: the file plus the message's fields); 202."""
    app = _app()
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        request.max_content_length = app.config["SQAPI_MAX_UPLOAD_BYTES"]
        message, raw = app.publisher.from_upload(request.files, request.form)
    elif mimetype == "application/json" or mimetype.endswith("+json"):
        message, raw = app.publisher.from_json(request.get_data(cache=False))
    elif mimetype == "text/plain" and app.publisher.parser.kind == "string":
        message, raw = app.publisher.from_text(request.get_data(cache=False))
    else:
        accepted = "application/json or multipart/form-data"
        if app.publisher.parser.kind == "string":
            accepted += " or text/plain"
        raise Refused(415, f"Content-Type '{mimetype or 'none'}' is not accepted: send {accepted}")
    app.publisher.publish(message, raw, _trace_headers())
    return _accepted(message.uuid, message.data_location, message.action)


def _trace_headers() -> dict[str, str] | None:
    """The request's W3C trace context (``traceparent``, ``tracestate``): a publication continues the caller's trace."""
    found = {name: request.headers[name] for name in ("traceparent", "tracestate") if name in request.headers}
    return found or None


@core.route("/messages/<uuid>", methods=["DELETE"])
def delete_message(uuid: str) -> Response:
    """Publish sqapi's delete action for ``uuid`` (``"action": "delete"``); 202."""
    app = _app()
    row = app.sqapi.database.get_message(uuid)
    message, raw = app.publisher.deletion(uuid, row.get("data_location") if row else None)
    app.publisher.publish(message, raw, _trace_headers())
    return _accepted(message.uuid, message.data_location, message.action)


def _accepted(uuid: str, data_location: str, action: str) -> Response:
    status_url = url_for("core.message", uuid=uuid)
    answer = responding.respond({"uuid": uuid, "status_url": status_url, "data_location": data_location,
                                 "action": action}, 202)
    answer.headers["Location"] = status_url
    return answer


@core.route("/messages/<uuid>/data", methods=["GET"])
def message_data(uuid: str) -> Response:
    """The message's data, streamed from the data store: its mime type, ETag = its sha256, Range requests."""
    app = _app()
    row = app.sqapi.database.get_message(uuid)
    if row is None:
        return responding.not_found(f"no message with uuid {uuid}")
    if row.get("hash_digest") == DELETED:
        return responding.not_found(f"message {uuid} was deleted")
    try:
        local = app.sqapi.data_store.fetch(str(row["data_location"]))
    except (NotFound, AccessDenied) as exc:
        return responding.not_found(f"the data of {uuid} is not in the data store: {exc}")
    try:
        answer = send_file(local.path, mimetype=row.get("data_type") or "application/octet-stream",
                           conditional=True, etag=row.get("hash_digest") or True, max_age=0)
    except BaseException:
        local.release()
        raise
    answer.call_on_close(local.release)  # a temporary copy is deleted once it is sent
    return answer


@core.route("/messages/<uuid>/metadata", methods=["GET"])
def message_metadata(uuid: str) -> Response:
    """The metadata the message's last attempt used (``messages.metadata``); for a row written before sqapi
    kept it, fetched again from the meta store at its ``meta_location``."""
    app = _app()
    row = app.sqapi.database.get_message(uuid)
    if row is None:
        return responding.not_found(f"no message with uuid {uuid}")
    stored = decode_metadata(row.get("metadata"))
    if stored is not None:
        return responding.ok(stored)
    location = row.get("meta_location")
    if not location:
        return responding.not_found(f"no metadata recorded for message {uuid} (not fetched yet) and no "
                                    "meta_location to fetch it from")
    try:
        metadata = app.sqapi.meta_store.fetch(str(location))
    except (NotFound, AccessDenied) as exc:
        return responding.not_found(f"the metadata of {uuid} is not in the meta store: {exc}")
    return responding.ok(metadata)


@core.route("/openapi.json", methods=["GET"])
def openapi_document() -> Response:
    return responding.ok(_openapi())


def _openapi() -> dict[str, Any]:
    app = _app()
    plugin_of = {bp.name: plugin.name for plugin in app.sqapi.plugins.active for bp in plugin.blueprints}
    return openapi.document(app, plugin_of, app.config["SQAPI_TOKEN_REQUIRED"])


@core.route("/openapi", methods=["GET"])
def openapi_page() -> Response:
    """The same document, rendered for people (server-side, nothing loaded from elsewhere)."""
    return Response(render_template("openapi.html", doc=_openapi(), json_url=url_for("core.openapi_document")),
                    status=200, content_type="text/html; charset=utf-8")


@core.route("/metrics", methods=["GET"])
def metrics() -> Response:
    return Response(_app().metrics.render(), status=200, content_type=CONTENT_TYPE)
