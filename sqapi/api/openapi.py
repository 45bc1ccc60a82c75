"""The OpenAPI 3.1 document of the API, served at ``/openapi.json``.

The core routes are described here by hand, with the JSON Schemas (2020-12, as OpenAPI 3.1 uses)
of what they answer; ``tests/api/test_openapi.py`` checks real answers against them and that
every URL rule the app serves is in the document.  Plugin blueprints are listed from the app's
URL map with what they declare -- path, parameters, methods, the plugin's name -- and no schema,
since a plugin says nothing more about its answers.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask

from sqapi import __version__ as version

_ARGUMENT = re.compile(r"<(?:(?P<converter>[a-zA-Z_][a-zA-Z0-9_]*)(?:\([^)]*\))?:)?(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)>")
_CONVERTER_SCHEMAS: dict[str, dict[str, Any]] = {"int": {"type": "integer"}, "float": {"type": "number"},
                                                  "uuid": {"type": "string", "format": "uuid"}}
_HIDDEN_METHODS = {"HEAD", "OPTIONS"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {"type": "object", "required": ["error", "details"],
              "properties": {"error": {"type": "string"}, "details": {}}},
    "Component": {"type": "object", "required": ["state", "type"],
                  "properties": {"state": {"enum": ["up", "down"]}, "type": {"type": "string"},
                                 "latency_ms": {"type": "number"}, "error": {"type": "string"}}},
    "Health": {"type": "object", "required": ["status", "down", "components"],
               "properties": {"status": {"enum": ["up", "down"]},
                              "down": {"type": "array", "items": {"type": "string"}},
                              "components": {"type": "object", "additionalProperties": _ref("Component")}}},
    "Rule": {"type": "object", "required": ["function", "endpoint", "arguments", "methods"],
             "properties": {"function": {"type": "string"}, "endpoint": {"type": "string"},
                            "arguments": {"type": "array", "items": {"type": "string"}},
                            "methods": {"type": "array", "items": {"type": "string"}}}},
    "Plugin": {"type": "object", "required": ["name", "status", "state", "blueprints", "blueprint_errors"],
               "properties": {"name": {"type": "string"}, "status": {"enum": ["active", "unloaded", "failed"]},
                              "state": {"type": "string"}, "reason": {"type": ["string", "null"]},
                              "error": {"type": "string"},
                              "blueprints": {"type": "array", "items": {"type": "object"}},
                              "blueprint_errors": {"type": "array", "items": {"type": "string"}}}},
    "DashboardState": {
        "type": "object",
        "required": ["now", "counts", "total", "messages", "next", "queues", "failure_rate", "errors"],
        "properties": {
            "now": {"type": "string"}, "total": {"type": "integer"}, "next": {"type": ["string", "null"]},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "errors": {"type": "array", "items": {"type": "string"}},
            "messages": {"type": "array", "items": {
                "type": "object", "required": ["uuid", "status", "attempts", "failed_plugins", "page"],
                "properties": {"uuid": {"type": "string"}, "status": {"type": "string"},
                               "attempts": {"type": "integer"}, "page": {"type": "string"},
                               "failed_plugins": {"type": "array", "items": {"type": "string"}}}}},
            "queues": {"type": "array", "items": {
                "type": "object", "required": ["name", "role", "messages", "consumers"],
                "properties": {"name": {"type": "string"}, "role": {"type": "string"},
                               "messages": {"type": ["integer", "null"]},
                               "consumers": {"type": ["integer", "null"]}}}},
            "failure_rate": {"type": "object", "required": ["hours", "plugins", "source"], "properties": {
                "hours": {"type": "array", "items": {"type": "string"}},
                "source": {"type": ["string", "null"], "description": "the table counted (message_events, or "
                           "message_plugins for a database type that keeps no history); null: the status "
                           "database is unavailable"},
                "plugins": {"type": "array", "items": {
                    "type": "object", "required": ["plugin", "runs", "failed", "rates"],
                    "properties": {"plugin": {"type": "string"},
                                   "runs": {"type": "array", "items": {"type": "integer"}},
                                   "failed": {"type": "array", "items": {"type": "integer"}},
                                   "rates": {"type": "array", "items": {"type": ["number", "null"]}}}}}}}}},
    "MessageRow": {"type": "object", "required": ["uuid", "status"],
                   "properties": {"uuid": {"type": "string"},
                                  "status": {"enum": ["VALIDATING", "QUERYING", "PROCESSING", "DONE", "RETRY",
                                                      "FAILED"]},
                                  "data_location": {"type": ["string", "null"]},
                                  "meta_location": {"type": ["string", "null"]},
                                  "data_type": {"type": ["string", "null"]},
                                  "hash_digest": {"type": ["string", "null"]},
                                  "metadata": {"type": ["object", "null"]},
                                  "info": {"type": ["string", "null"]},
                                  "attempts": {"type": "integer"},
                                  "trace_id": {"type": ["string", "null"], "pattern": "^[0-9a-f]{32}$",
                                               "description": "the OpenTelemetry trace of the last attempt "
                                                              "(null when tracing is off)"},
                                  "created_at": {"type": "string"}, "updated_at": {"type": "string"}}},
    "PluginRow": {"type": "object", "required": ["plugin", "status"],
                  "properties": {"plugin": {"type": "string"}, "status": {"type": "string"},
                                 "info": {"type": ["string", "null"]},
                                 "duration_ms": {"type": ["number", "null"]}, "result": {},
                                 "version": {"type": ["string", "null"],
                                             "description": "the plugin's declared version that produced the row"},
                                 "attempts": {"type": "integer"}}},
    "Event": {"type": "object", "required": ["id", "attempt", "plugin", "status", "at"],
              "description": "One entry of a message's history: a plugin's outcome in one attempt, or (plugin "
                             "null) the attempt's own outcome (DONE, RETRY or FAILED).",
              "properties": {"id": {"type": "integer"}, "attempt": {"type": ["integer", "null"]},
                             "plugin": {"type": ["string", "null"]}, "status": {"type": "string"},
                             "info": {"type": ["string", "null"]}, "duration_ms": {"type": ["number", "null"]},
                             "version": {"type": ["string", "null"]},
                             "loader": {"type": ["string", "null"], "description": "host:pid that wrote it"},
                             "at": {"type": "string"}}},
    "Message": {"allOf": [_ref("MessageRow"), {
        "type": "object", "required": ["plugins", "failed_plugins", "history"],
        "properties": {"plugins": {"type": "array", "items": _ref("PluginRow")},
                       "failed_plugins": {"type": "array", "items": {"type": "string"}},
                       "history": {"type": "array", "items": _ref("Event"),
                                   "description": "every attempt's events, oldest first"}}}]},
    "MessagePage": {"type": "object", "required": ["messages", "count", "next"],
                    "properties": {"messages": {"type": "array", "items": _ref("MessageRow")},
                                   "count": {"type": "integer", "minimum": 0},
                                   "next": {"type": ["string", "null"]}}},
    "SqapiMessage": {"type": "object", "description": "A sqAPI message; keys as msg_broker.message_fields says "
                                                      "(defaults shown), matched case-insensitively.",
                     "properties": {"uuid_ref": {"type": ["string", "integer"]},
                                    "data_location": {"type": "string"}, "meta_location": {"type": "string"},
                                    "data_type": {"type": "string"},
                                    "metadata": {"type": ["object", "string"]},
                                    "action": {"enum": ["process", "delete"]}}},
    "Upload": {"type": "object", "required": ["file"],
               "properties": {"file": {"type": "string", "contentMediaType": "application/octet-stream"},
                              "uuid_ref": {"type": "string"}, "data_location": {"type": "string"},
                              "data_type": {"type": "string"}, "meta_location": {"type": "string"},
                              "metadata": {"type": "string", "contentMediaType": "application/json"}}},
    "Accepted": {"type": "object", "required": ["uuid", "status_url", "data_location", "action"],
                 "properties": {"uuid": {"type": "string"}, "status_url": {"type": "string"},
                                "data_location": {"type": "string"}, "action": {"enum": ["process", "delete"]}}},
}

_UUID = {"name": "uuid", "in": "path", "required": True, "schema": {"type": "string"}}
_REFUSED = {"400": _error("not JSON, not UTF-8, no file in a multipart post, its metadata no JSON"),
            "409": _error("an upload's data_location holds other content"),
            "413": _error("over api.max_body_bytes, api.max_upload_bytes or msg_broker.max_body_bytes"),
            "415": _error("neither application/json nor multipart/form-data"),
            "422": _error("refused by the loader's message parser (the reason says why)"),
            "501": _error("the data store cannot store uploads, or the listener type cannot publish"),
            "503": _error("the broker or the data store is down, or did not confirm")}


def _core_paths() -> dict[str, dict[str, Any]]:
    return {
        "/health": {"get": {"summary": "Each component's state", "operationId": "health", "security": [],
                            "responses": {"200": _json(_ref("Health"), "all up"),
                                          "503": _json(_ref("Health"), "one or more down")}}},
        "/plugins": {"get": {"summary": "Active, unloaded and failed plugins", "operationId": "plugins",
                             "responses": {"200": _json({"type": "array", "items": _ref("Plugin")}, "the plugins")}}},
        "/rules": {"get": {"summary": "Every URL rule", "operationId": "rules",
                           "responses": {"200": _json({"type": "array", "items": _ref("Rule")}, "the rules")}}},
        "/messages": {
            "get": {"summary": "Messages, newest first, paged", "operationId": "list_messages",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string"}},
                        {"name": "plugin", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                    "maximum": 1000}},
                        {"name": "before", "in": "query", "schema": {"type": "string"}},
                        {"name": "before_uuid", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": _json(_ref("MessagePage"), "a page of messages"),
                                  "400": _error("a bad parameter")}},
            "post": {"summary": "Publish a message (JSON) or an upload (multipart, stored first)",
                     "operationId": "post_message",
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": _ref("SqapiMessage")},
                         "multipart/form-data": {"schema": _ref("Upload")}}},
                     "responses": {"202": {**_json(_ref("Accepted"), "published (confirmed by the broker)"),
                                           "headers": {"Location": {"schema": {"type": "string"}}}},
                                   **_REFUSED}}},
        "/messages/{uuid}": {
            "get": {"summary": "One message with its per-plugin rows and its history", "operationId": "message",
                    "parameters": [_UUID],
                    "responses": {"200": _json(_ref("Message"), "the message"), "404": _error("unknown uuid")}},
            "delete": {"summary": "Publish sqapi's delete action for the message", "operationId": "delete_message",
                       "parameters": [_UUID],
                       "responses": {"202": _json(_ref("Accepted"), "published"),
                                     **{k: v for k, v in _REFUSED.items() if k in ("422", "501", "503")}}}},
        "/messages/{uuid}/data": {"get": {
            "summary": "The message's data from the data store (Range, ETag = sha256)", "operationId": "message_data",
            "parameters": [_UUID, {"name": "Range", "in": "header", "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "the data, with its mime type", "content": {"*/*": {}},
                        "headers": {"ETag": {"schema": {"type": "string"}},
                                    "Content-Length": {"schema": {"type": "integer"}}}},
                "206": {"description": "the requested range", "content": {"*/*": {}}},
                "304": {"description": "not modified (If-None-Match)"},
                "404": _error("unknown uuid, deleted, or not in the data store"),
                "416": {"description": "the range is not satisfiable"}}}},
        "/messages/{uuid}/metadata": {"get": {
            "summary": "The metadata the message's last attempt used", "operationId": "message_metadata",
            "parameters": [_UUID],
            "responses": {"200": _json({"type": "object"}, "the metadata"),
                          "404": _error("unknown uuid, or no metadata recorded yet")}}},
        "/metrics": {"get": {"summary": "Prometheus text format", "operationId": "metrics",
                             "responses": {"200": {"description": "the metrics",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi",
                                  "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")}}},
        "/openapi": {"get": {"summary": "This document, rendered as a page", "operationId": "openapi_page",
                             "responses": {"200": {"description": "HTML",
                                                   "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        **_dashboard_paths(),
    }


_HTML = {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}
_FILTERS = [{"name": name, "in": "query", "schema": {"type": "string"}}
            for name in ("status", "plugin", "since", "until", "q", "limit", "before", "before_uuid")]
_FORM = {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
    "type": "object", "required": ["csrf_token"],
    "properties": {name: {"type": "string"} for name in
                   ("csrf_token", "uuid", "status", "plugin", "since", "until", "q", "reason", "confirm")}}}}}
_SEE_OTHER = {"description": "done: on to the next page (Location)"}


def _dashboard_paths() -> dict[str, dict[str, Any]]:
    """The dashboard's pages, the JSON they poll, its redrive action and sign-in (``sqapi.api.console``)."""
    return {
        "/": {"get": {"summary": "The dashboard: counts, queues, failure rates, the filtered message list",
                      "operationId": "index", "parameters": _FILTERS,
                      "responses": {"200": _HTML, "400": _error("a bad filter")}}},
        "/dashboard/state": {"get": {
            "summary": "What the dashboard shows, as JSON (the page polls it)", "operationId": "dashboard_state",
            "parameters": _FILTERS,
            "responses": {"200": _json(_ref("DashboardState"), "counts, queues, failure rates, a page of messages"),
                          "400": _error("a bad filter")}}},
        "/dashboard/messages/{uuid}": {"get": {
            "summary": "One message's page: status, plugin results, timeline, data and metadata, redrive",
            "operationId": "message_page", "parameters": [_UUID],
            "responses": {"200": _HTML, "404": {**_HTML, "description": "unknown uuid (HTML)"}}}},
        "/dashboard/redrive": {"post": {
            "summary": "Redrive a message (uuid) or a filtered selection: a dry run to confirm, then with "
                       "confirm=yes the redrive", "operationId": "dashboard_redrive", "requestBody": _FORM,
            "responses": {"200": _HTML, "303": _SEE_OTHER, "400": {**_HTML, "description": "a bad selection"},
                          "403": _error("the CSRF token is missing or wrong"),
                          "503": {**_HTML, "description": "the database or the broker cannot be reached"}}}},
        "/login": {
            "get": {"summary": "The sign-in form", "operationId": "login_form", "security": [],
                    "parameters": [{"name": "next", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": _HTML}},
            "post": {"summary": "Sign in with the API token: sets the session cookie", "operationId": "login",
                     "security": [], "requestBody": {"required": True, "content": {
                         "application/x-www-form-urlencoded": {"schema": {
                             "type": "object", "required": ["csrf_token", "token"],
                             "properties": {"csrf_token": {"type": "string"}, "token": {"type": "string"},
                                            "next": {"type": "string"}}}}}},
                     "responses": {"303": _SEE_OTHER, "401": {**_HTML, "description": "not the token"},
                                   "403": _error("the CSRF token is missing or wrong")}}},
        "/logout": {"post": {"summary": "Sign out: removes the session cookie", "operationId": "logout",
                             "requestBody": _FORM,
                             "responses": {"303": _SEE_OTHER, "403": _error("the CSRF token is missing or wrong")}}},
    }


def openapi_path(rule: str) -> str:
    """A werkzeug rule as an OpenAPI path: ``/x/<int:n>`` -> ``/x/{n}``."""
    return _ARGUMENT.sub(lambda m: "{" + m.group("name") + "}", rule)


def document(app: Flask, plugin_of: dict[str, str], token_required: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``; ``plugin_of`` maps blueprint names to their plugin's name."""
    paths = _core_paths()
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        blueprint = rule.endpoint.rpartition(".")[0]
        if rule.endpoint == "static" or blueprint in ("core", "console"):
            continue
        path = paths.setdefault(openapi_path(rule.rule), {})
        parameters = [{"name": m.group("name"), "in": "path", "required": True,
                       "schema": _CONVERTER_SCHEMAS.get(m.group("converter") or "", {"type": "string"})}
                      for m in _ARGUMENT.finditer(rule.rule)]
        plugin = plugin_of.get(blueprint)
        for method in sorted((rule.methods or set()) - _HIDDEN_METHODS):
            path[method.lower()] = {
                "summary": f"{rule.endpoint} (plugin {plugin})" if plugin else rule.endpoint,
                "operationId": rule.endpoint + ("" if method == "GET" else f".{method.lower()}"),
                "tags": [plugin or blueprint or "other"],
                "parameters": parameters,
                "responses": {"default": {"description": "as the plugin's blueprint answers (it declares no schema)"}},
            }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "sqapi", "version": version,
                 "description": "sqapi's HTTP API: health, plugins, message status, publishing over HTTP, "
                                "each message's data and metadata, metrics, and every plugin's endpoints."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
    if token_required:
        doc["security"] = [{"bearer": []}]
        for item in paths.values():
            for operation in item.values():
                if operation.get("security") != []:
                    operation["responses"].setdefault("401", _error("no API token, or a wrong one "
                                                                     "(Authorization: Bearer <api.token>)"))
    else:
        for item in paths.values():
            for operation in item.values():
                operation.pop("security", None)
    return doc
