"""HTTP endpoints of the pdf_extractor plugin: a document's extracted text by message uuid."""

from __future__ import annotations

import os

from flask import Blueprint, Response, current_app

from sqapi.api import responding

bp = Blueprint("pdf_extractor", __name__, url_prefix="/pdf_extractor")


def _row(uuid_ref: str) -> dict | None:  # type: ignore[type-arg]
    script = os.path.join(current_app.config["pdf_extractor"].plugin["directory"], "scripts", "select_by_uuid.sql")
    rows = current_app.database["pdf_extractor"].execute_script(script, uuid_ref=uuid_ref)
    return rows[0] if rows else None


@bp.route("/<uuid_ref>", methods=["GET"])
def get_document(uuid_ref: str):  # type: ignore[no-untyped-def]
    row = _row(uuid_ref)
    if row is None:
        return responding.not_found(f"no text extracted for {uuid_ref}")
    row["truncated"] = bool(row["truncated"])
    return responding.ok(row)


@bp.route("/<uuid_ref>/text", methods=["GET"])
def get_text(uuid_ref: str):  # type: ignore[no-untyped-def]
    row = _row(uuid_ref)
    if row is None:
        return responding.not_found(f"no text extracted for {uuid_ref}")
    return Response(row["text"], status=200, mimetype="text/plain")
