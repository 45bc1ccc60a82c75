"""JSON responses for blueprints, with sqAPI's helper names (``ok``, ``no_content``, ...)."""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from flask import Response


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    return str(value)


def respond(data: Any, status: int) -> Response:
    return Response(json.dumps(data, default=_default), status=status, mimetype="application/json")


def ok(data: Any) -> Response:
    return respond(data, 200)


def no_content(details: Any = None) -> Response:
    """sqAPI's "nothing found" answer.  204 carries no body by definition, so none is sent."""
    return Response(status=204)


def not_found(details: Any) -> Response:
    return respond({"error": "not found", "details": details}, 404)


def invalid_request(details: Any) -> Response:
    return respond({"error": "the request was not complete", "details": details}, 400)


def server_failure(details: Any) -> Response:
    return respond({"error": "internal error", "details": details}, 500)


def not_impl(details: Any) -> Response:
    return respond({"error": "not implemented", "details": details}, 501)
