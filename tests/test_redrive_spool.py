"""Redrive on the embedded default (spool folder, embedded PostgreSQL): the messages set aside in ``failed/``
go back to the spool and run again -- through :func:`sqapi.redrive.redrive`, which the dashboard calls."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sqapi.app import Sqapi
from sqapi.redrive import Selection, SelectionError, redrive

PICKY = """
import os
from sqapi.errors import PermanentError

def execute(config, database, message, metadata, data):
    database.execute_query("INSERT INTO runs (uuid) VALUES (%(uuid)s)", uuid=message.uuid)
    if metadata.get("picky") and not os.path.exists("fixed"):
        raise PermanentError("picky refuses this one")
"""


def drain(app: Sqapi, spool: Path, expected: Callable[[], bool]) -> None:
    with app.create_listener().running():
        from tests.test_directory_listener import wait_for

        wait_for(expected)


def runs(app: Sqapi) -> list[str]:
    rows = app.plugins.plugins["picky"].database.execute_query("SELECT uuid FROM runs ORDER BY uuid")
    return [r["uuid"] for r in rows]


@pytest.mark.parametrize("database", ["embedded PostgreSQL", "sqlite"])
def test_a_redrive_sends_failed_spool_files_back_once_and_only_the_failures_run_again(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        workdir: Path, database: str) -> None:
    write_plugin("picky", PICKY, init_sql="CREATE TABLE IF NOT EXISTS runs (uuid TEXT);")
    overrides: dict[str, Any] = {"active_plugins": ["picky"], "msg_broker": {"poll_interval": 0.05}}
    if database == "sqlite":
        overrides["database"] = {"type": "sqlite", "path": str(workdir / "status.db")}
    app = make_app(overrides)
    location = write_data("a.txt", "x")
    spool = workdir / "spool"
    spool.mkdir(exist_ok=True)
    for n in range(6):
        body = {"uuid_ref": f"m{n}", "data_location": location, "metadata": {"picky": n % 2 == 0}}
        (spool / f"m{n}.json").write_text(json.dumps(body))
    failed = spool / "failed"
    drain(app, spool, lambda: len(list(failed.glob("*.json"))) == 3 and len(list((spool / "done").glob("*"))) == 3)
    assert sorted(p.name for p in failed.glob("*.reason")) == ["m0.json.reason", "m2.json.reason", "m4.json.reason"]

    dry = redrive(app.config, Selection(status="failed", reason="REFUSES"), dry_run=True)
    # a dry run reads no dead letter, only counts them
    assert sorted(dry.selected) == ["m0", "m2", "m4"]
    assert (dry.republished, dry.from_dead, dry.dead_letters) == (3, 0, 3)
    assert len(list(failed.glob("*.json"))) == 3 and not list(spool.glob("*.json"))

    (workdir / "fixed").touch()
    lines: list[str] = []
    report = redrive(app.config, Selection(plugin="picky"), progress=lines.append)
    assert (report.republished, report.from_dead) == (3, 3) and len(lines) == 3
    assert not list(failed.iterdir())  # the files and their .reason removed
    assert len(list(spool.glob("*.json"))) == 3
    drain(app, spool, lambda: app.database.count_by_status() == {"DONE": 6})
    # the failures ran once more (once failing, once fixed), the others once in all
    assert Counter(runs(app)) == {"m0": 2, "m1": 1, "m2": 2, "m3": 1, "m4": 2, "m5": 1}
    assert redrive(app.config, Selection(plugin="picky")).selected == []


def test_a_selection_that_cannot_be_right_is_refused_before_anything_is_opened(make_config: Any) -> None:
    config = make_config({})
    for selection, says in [(Selection(status="NOPE"), "unknown status 'NOPE'"),
                            (Selection(since=_at(2), until=_at(1)), "is after until"),
                            (Selection(status="DONE"), "sqapi reprocess")]:
        try:
            redrive(config, selection)
        except SelectionError as exc:
            assert says in str(exc)
        else:
            raise AssertionError(f"{selection} was accepted")


def _at(day: int) -> Any:
    from datetime import datetime

    return datetime(2026, 11, day)


def test_a_row_that_changed_since_it_was_selected_is_not_reopened(
        make_app: Callable[..., Sqapi], write_plugin: Callable[..., Path], write_data: Callable[..., str],
        workdir: Path) -> None:
    from sqapi.core.outcome import Delivery
    from sqapi.redrive import reopen

    write_plugin("picky", PICKY, init_sql="CREATE TABLE IF NOT EXISTS runs (uuid TEXT);")
    app = make_app({"active_plugins": ["picky"]})
    location = write_data("a.txt", "x")
    app.process({"uuid_ref": "m1", "data_location": location, "metadata": {"picky": True}}, Delivery(id="1"))
    selected = app.database.get_message("m1")
    assert selected["status"] == "FAILED"
    (workdir / "fixed").touch()
    app.process({"uuid_ref": "m1", "data_location": location}, Delivery(id="2"))  # a loader got to it first
    assert reopen(app.database, selected, "2026-11-30T06:00:00+00:00") is None
    assert app.database.get_message("m1")["status"] == "DONE"
    assert app.database.get_message("m1")["attempts"] == 2
