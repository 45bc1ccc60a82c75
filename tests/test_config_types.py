"""Values of the wrong type stop the command with one line naming the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli import sqapi

WRONG = [
    ("data_store:\n  type: disk\n  base_dir: 123\n", "data_store.base_dir"),
    ("meta_store:\n  type: file\n  base_dir: [a]\n", "meta_store.base_dir"),
    ("msg_broker:\n  type: directory\n  poll_interval: soon\n", "msg_broker.poll_interval"),
    ("msg_broker:\n  type: directory\n  poll_interval: 0\n", "msg_broker.poll_interval"),
    ("msg_broker:\n  type: directory\n  workers: 2.5\n", "msg_broker.workers"),
    ("msg_broker:\n  type: directory\n  directory: 7\n", "msg_broker.directory"),
    ("api:\n  port: abc\n", "api.port"),
    ("api:\n  port: 70000\n", "api.port"),
    ("api:\n  host: 12\n", "api.host"),
    ("api:\n  token: [x]\n", "api.token"),
    ("api:\n  secure_cookie: sometimes\n", "api.secure_cookie"),
]


@pytest.mark.parametrize("command", ["check", "process"])
@pytest.mark.parametrize(("content", "key"), WRONG)
def test_a_value_of_the_wrong_type_stops_with_one_line_naming_file_key_and_fix(
        workdir: Path, write_data, command: str, content: str, key: str) -> None:
    (workdir / "wrong.yml").write_text(content)
    args = ["process", write_data("x.txt", "x")] if command == "process" else ["check"]
    result = sqapi("-c", "wrong.yml", *args, cwd=workdir)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    naming = [line for line in output.splitlines() if "wrong.yml" in line and key in line and "Fix:" in line]
    assert len(naming) == 1, output


UNKNOWN = [
    ("processing:\n  wrokers: 4\n", "processing.wrokers", "did you mean 'workers'?"),
    ("api:\n  tokn: abc\n", "api.tokn", "did you mean 'token'?"),
    ("msg_broker:\n  type: directory\n  retry:\n    max_atempts: 3\n", "msg_broker.retry.max_atempts",
     "did you mean 'max_attempts'?"),
    ("processing:\n  colour: blue\n", "processing.colour", "known keys: workers, processes"),
]


@pytest.mark.parametrize(("content", "key", "fix"), UNKNOWN)
def test_an_unknown_key_of_a_section_sqapi_owns_is_refused_with_a_suggestion(
        workdir: Path, content: str, key: str, fix: str) -> None:
    (workdir / "typo.yml").write_text(content)
    result = sqapi("-c", "typo.yml", "check", cwd=workdir)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    [line] = [line for line in output.splitlines() if "typo.yml" in line and key in line]
    assert "unknown key" in line and fix in line


def test_processing_temp_dir_is_where_remote_data_stores_stream(make_app, tmp_path: Path) -> None:
    app = make_app({"processing": {"temp_dir": str(tmp_path / "spill")}})
    assert app.data_store.config["temp_dir"] == str(tmp_path / "spill")
    own = make_app({"processing": {"temp_dir": str(tmp_path / "spill")},
                    "data_store": {"type": "disk", "temp_dir": str(tmp_path / "mine")}})
    assert own.data_store.config["temp_dir"] == str(tmp_path / "mine")  # the store's own setting wins


def test_a_database_type_that_cannot_hold_the_status_is_refused_at_start(make_app) -> None:
    from sqapi.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        make_app({"database": {"type": "elasticsearch", "hosts": ["http://127.0.0.1:9"]}})
    message = str(caught.value)
    assert "database.type" in message and "cannot hold sqapi's status" in message
    assert "claim_attempts" in message and "record_attempt" in message  # what it lacks, by name
