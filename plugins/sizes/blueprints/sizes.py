"""HTTP endpoints of the sizes plugin."""

from __future__ import annotations

import os

from flask import Blueprint, current_app

from sqapi.api import responding

bp = Blueprint("sizes", __name__, url_prefix="/sizes")


def _script(name: str) -> str:
    return os.path.join(current_app.config["sizes"].plugin["directory"], "scripts", name)


@bp.route("/<uuid_ref>", methods=["GET"])
def get_sizes(uuid_ref: str):  # type: ignore[no-untyped-def]
    rows = current_app.database["sizes"].execute_script(_script("select_by_uuid.sql"), uuid_ref=uuid_ref)
    return responding.ok(rows[0]) if rows else responding.not_found(f"no sizes recorded for {uuid_ref}")


@bp.route("/larger/<int:size>", methods=["GET"])
def get_larger(size: int):  # type: ignore[no-untyped-def]
    rows = current_app.database["sizes"].execute_script(_script("select_larger_than.sql"), data_size=size)
    return responding.ok(rows)
