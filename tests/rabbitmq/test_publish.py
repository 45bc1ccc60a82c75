"""``sqapi publish`` against the real broker: confirmed, persistent, in the configured format."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from sqapi.cli import main
from tests.rabbitmq.conftest import declare, depth, take_all


def run(config: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["publish", "-c", str(config), *args], catch_exceptions=False)


def test_publish_uploads_a_file_to_the_disk_store_and_publishes_a_persistent_message(
        workdir: Path, vhost: str, loader_config: Callable[..., Path]) -> None:
    config = loader_config()
    source = workdir / "report.txt"
    source.write_text("quarterly numbers")
    result = run(config, "--upload", str(source), "--data-location", "in/report.txt", "--uuid", "r-1",
                 "--metadata", '{"owner": "ann"}', "--data-type", "text/plain")
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["r-1"]
    assert (workdir / "data" / "in" / "report.txt").read_text() == "quarterly numbers"
    [(properties, body)] = take_all(vhost, "sqapi")
    assert properties.delivery_mode == 2 and properties.message_id == "r-1"
    assert json.loads(body) == {"uuid_ref": "r-1", "data_location": "in/report.txt", "data_type": "text/plain",
                                "metadata": {"owner": "ann"}}


def test_publish_sends_every_message_of_a_jsonl_file_and_prints_their_uuids(
        workdir: Path, vhost: str, loader_config: Callable[..., Path]) -> None:
    lines = [json.dumps({"uuid_ref": f"u{n}", "data_location": "x.txt"}) for n in range(5)]
    (workdir / "batch.jsonl").write_text("\n".join(lines) + "\n")
    result = run(loader_config(), str(workdir / "batch.jsonl"))
    assert result.exit_code == 0, result.output
    assert result.output.split() == [f"u{n}" for n in range(5)]
    assert depth(vhost, "sqapi") == 5


def test_publish_exits_nonzero_when_the_message_cannot_be_routed(
        workdir: Path, vhost: str, loader_config: Callable[..., Path]) -> None:
    result = CliRunner().invoke(
        main, ["publish", "-c", str(loader_config()), "--data-location", "x.txt", "--routing-key", "nowhere"])
    assert result.exit_code == 1
    assert "unroutable" in result.stderr
    assert result.stdout == ""


def test_publish_refuses_a_malformed_message_before_sending_anything(
        workdir: Path, vhost: str, broker: dict[str, Any], loader_config: Callable[..., Path]) -> None:
    declare(vhost, broker)
    good = json.dumps({"uuid_ref": "ok", "data_location": "x.txt"})
    (workdir / "mixed.jsonl").write_text(good + "\n" + json.dumps({"uuid_ref": "no-location"}) + "\n")
    result = run(loader_config(), str(workdir / "mixed.jsonl"))
    assert result.exit_code != 0
    assert "malformed" in result.output and "data_location" in result.output
    assert depth(vhost, "sqapi") == 0
