"""What only the Swift data store does, against a real single-node OpenStack Swift on 127.0.0.1.

What every data store does (bytes, streaming, missing objects, escapes, outages, upload) is tested
once for all types in tests/contracts/test_data_store_contract.py.

The session fixture ``swift_auth_url`` (tests/services.py) runs ``scripts/swift_dev.sh start``
(installs and starts Swift when it is not running yet; a no-op when it is).  If that fails the
tests FAIL -- they are never skipped.  Each test works in fresh containers with random names,
removed afterwards.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
import traceback
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from swiftclient import client as swift_client

from sqapi.connectors.data import swift
from sqapi.errors import AccessDenied, ConfigError, ConnectorError, NotFound
from tests.services import SWIFT_KEY, SWIFT_PROXY_PORT, SWIFT_SCRIPT, SWIFT_USER

PROXY_PORT = SWIFT_PROXY_PORT
USER = SWIFT_USER
KEY = SWIFT_KEY
SCRIPT = SWIFT_SCRIPT
MiB = 1024 * 1024


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def container(swift_containers: Callable[[], str]) -> str:
    return swift_containers()


@pytest.fixture
def config(swift_auth_url: str, tmp_path: Path) -> dict[str, Any]:
    """A ``data_store`` section as sqapi hands it over; downloads land in an empty ``tmp_path/dl``."""
    temp_dir = tmp_path / "dl"
    temp_dir.mkdir()
    return {
        "type": "swift",
        "auth_url": swift_auth_url,
        "access_key_id": USER,
        "secret_access_key": KEY,
        "auth_version": "1",
        "temp_dir": str(temp_dir),
        "timeout": 10,
        "retries": 1,
    }


def dead_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CuttingProxy:
    """A TCP proxy in front of Swift that drops each connection after ``cut_after`` response bytes."""

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.cuts = 0
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.cut_after), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._stop.set()
        self.server.close()


# -- tests -------------------------------------------------------------------------------------

def test_the_dev_script_reports_swift_up_when_it_is_running(swift_auth_url: str) -> None:
    started = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10, "start should be a quick no-op when Swift already runs"
    assert subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, timeout=60).returncode == 0


def test_an_object_is_streamed_to_a_temp_file_with_identical_bytes(
        swift_admin: swift_client.Connection, container: str, config: dict[str, Any]) -> None:
    payload = os.urandom(4 * MiB + 17)
    swift_admin.put_object(container, "dir/big.bin", payload)
    store = swift.connect({**config, "containers": [container]})
    try:
        tracemalloc.start()
        try:
            path = store.download_to_disk(f"{container}/dir/big.bin")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        store.close()
    try:
        assert Path(path).parent == Path(config["temp_dir"])
        assert path.endswith(".bin")
        assert Path(path).read_bytes() == payload
        assert peak < len(payload) // 2, f"download peaked at {peak} bytes of Python memory: not streamed"
    finally:
        os.unlink(path)


def test_an_object_is_found_in_the_second_of_the_listed_containers(
        swift_admin: swift_client.Connection, swift_containers: Callable[[], str], config: dict[str, Any]) -> None:
    first, second = swift_containers(), swift_containers()
    swift_admin.put_object(second, "only-here.txt", b"second container")
    path = swift.download_to_disk({**config, "containers": [first, second]}, "only-here.txt")
    try:
        assert Path(path).read_bytes() == b"second container"
    finally:
        os.unlink(path)


def test_a_container_prefix_names_the_container_to_look_in(
        swift_admin: swift_client.Connection, swift_containers: Callable[[], str], config: dict[str, Any]) -> None:
    first, second = swift_containers(), swift_containers()
    swift_admin.put_object(first, "same.txt", b"first")
    swift_admin.put_object(second, "same.txt", b"second")
    path = swift.download_to_disk({**config, "containers": [first, second]}, f"{second}/same.txt")
    try:
        assert Path(path).read_bytes() == b"second"
    finally:
        os.unlink(path)


def test_with_no_containers_listed_all_containers_are_searched(
        swift_admin: swift_client.Connection, swift_containers: Callable[[], str], config: dict[str, Any]) -> None:
    swift_containers()
    holder = swift_containers()
    name = f"anywhere-{uuid.uuid4().hex}.txt"
    swift_admin.put_object(holder, name, b"found by listing")
    for section in ({**config}, {**config, "containers": []}):
        for ref in (name, f"{holder}/{name}"):
            path = swift.download_to_disk(section, ref)
            try:
                assert Path(path).read_bytes() == b"found by listing"
            finally:
                os.unlink(path)


def test_a_missing_container_counts_as_a_missing_object(config: dict[str, Any]) -> None:
    with pytest.raises(NotFound):
        swift.download_to_disk({**config, "containers": [f"sqapi-absent-{uuid.uuid4().hex}"]}, "x.txt")


def test_a_wrong_key_raises_connector_error_whose_message_does_not_contain_the_key(
        container: str, config: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    wrong_key = f"wrong-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    store = swift.connect({**config, "secret_access_key": wrong_key, "containers": [container]})
    for action in (lambda: store.download_to_disk("anything.txt"), store.ping):
        with pytest.raises(ConnectorError) as caught:
            action()
        assert "refused" in str(caught.value) and "401" in str(caught.value)
        assert wrong_key not in str(caught.value)
        assert wrong_key not in "".join(traceback.format_exception(caught.value))
    store.close()
    assert wrong_key not in caplog.text
    assert wrong_key not in repr(store) and wrong_key not in repr(store.settings)


def test_no_token_appears_in_log_lines(
        swift_admin: swift_client.Connection, container: str, config: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = swift.connect({**config, "containers": [container]})
    with pytest.raises(NotFound):
        store.download_to_disk("missing.txt")
    token = store._connection().token  # the token this store logged in with
    store.close()
    assert token and token not in caplog.text


def test_ping_succeeds_against_the_running_swift(config: dict[str, Any]) -> None:
    with swift.connect(config) as store:
        store.ping()
    swift.ping(config)


def test_ping_fails_against_a_dead_port(config: dict[str, Any]) -> None:
    port = dead_port()
    store = swift.connect({**config, "auth_url": f"http://127.0.0.1:{port}/auth/v1.0"})
    started = time.monotonic()
    with pytest.raises(ConnectorError) as caught:
        store.ping()
    assert time.monotonic() - started < 15, "an outage must surface fast"
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert KEY not in str(caught.value)
    store.close()


def test_partial_temp_files_are_not_left_behind_on_failure(
        swift_admin: swift_client.Connection, container: str, config: dict[str, Any]) -> None:
    swift_admin.put_object(container, "big.bin", os.urandom(4 * MiB))
    proxy = CuttingProxy(PROXY_PORT, cut_after=512 * 1024)
    try:
        section = {**config, "auth_url": f"http://127.0.0.1:{proxy.port}/auth/v1.0", "containers": [container]}
        with swift.connect(section) as store:
            with pytest.raises(ConnectorError):
                store.download_to_disk("big.bin")
    finally:
        proxy.close()
    assert proxy.cuts >= 1, "the proxy should have broken off the download"
    assert list(Path(config["temp_dir"]).iterdir()) == []


def test_an_unwritable_temp_dir_raises_connector_error_and_leaves_nothing(
        swift_admin: swift_client.Connection, container: str, config: dict[str, Any], tmp_path: Path) -> None:
    swift_admin.put_object(container, "a.txt", b"data")
    missing_dir = tmp_path / "does-not-exist"
    with pytest.raises(ConnectorError):
        swift.download_to_disk({**config, "containers": [container], "temp_dir": str(missing_dir)}, "a.txt")
    assert not missing_dir.exists()


def test_a_wrong_section_raises_config_error_before_any_io() -> None:
    with pytest.raises(ConfigError) as caught:
        swift.connect({"auth_url": "http://127.0.0.1:1/auth/v1.0", "access_key_id": USER})
    assert "secret_access_key" in str(caught.value)
    with pytest.raises(ConfigError):
        swift.validate_config({"auth_url": "ftp://x", "access_key_id": USER, "secret_access_key": "s3cr3t"})
    with pytest.raises(ConfigError) as caught:
        swift.validate_config({"auth_url": "http://h/auth/v1.0", "access_key_id": USER,
                               "secret_access_key": "s3cr3t-value", "containers": "a/b"})
    assert "s3cr3t-value" not in str(caught.value)


def test_an_uploaded_file_can_be_downloaded_again_by_the_reference_upload_returns(
        container: str, config: dict[str, Any], swift_admin: swift_client.Connection, tmp_path: Path) -> None:
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(300_000))
    config = {**config, "containers": [container]}
    ref = swift.upload(config, str(source), "reports/upload.bin")
    assert ref == f"{container}/reports/upload.bin"
    assert swift_admin.head_object(container, "reports/upload.bin")["content-length"] == "300000"
    path = swift.download_to_disk(config, ref)
    try:
        assert Path(path).read_bytes() == source.read_bytes()
    finally:
        os.unlink(path)


def test_upload_without_configured_containers_is_refused_with_the_fix(config: dict[str, Any], tmp_path: Path) -> None:
    source = tmp_path / "x.bin"
    source.write_bytes(b"x")
    with pytest.raises(AccessDenied, match="set data_store.containers"):
        swift.upload({**config, "containers": []}, str(source), "x.bin")
