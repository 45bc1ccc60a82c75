"""What only the disk and http data stores do: disk confinement and symlinks, HTTP limits and status codes.

What every data and meta store does is tested once for all types in tests/contracts/.
"""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sqapi.connectors.data import DataStore, disk
from sqapi.connectors.data import http as http_store
from sqapi.errors import AccessDenied, ConfigError, ConnectorError, NotFound


@pytest.fixture
def base(tmp_path: Path) -> Path:
    root = tmp_path / "base"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("inside")
    (tmp_path / "secret.txt").write_text("outside")
    return root


def test_disk_hands_out_the_original_file_inside_base_dir(base: Path) -> None:
    store = DataStore(disk, {"type": "disk", "base_dir": str(base)})
    local = store.fetch("sub/a.txt")
    assert Path(local.path) == base / "sub" / "a.txt" and not local.temporary
    local.release()
    assert (base / "sub" / "a.txt").exists()  # the original is never deleted


@pytest.mark.parametrize("reference", ["../secret.txt", "sub/../../secret.txt", "link-out", "ABS",
                                       "dir-out/secret.txt", "sub/./../../secret.txt", "sub//../../secret.txt"])
def test_disk_refuses_references_that_escape_base_dir(base: Path, reference: str) -> None:
    os.symlink(base.parent / "secret.txt", base / "link-out")
    os.symlink(base.parent, base / "dir-out")  # a symlinked folder part way down the reference
    if reference == "ABS":
        reference = str(base.parent / "secret.txt")
    with pytest.raises(AccessDenied, match="outside base_dir"):
        disk.download_to_disk({"base_dir": str(base)}, reference)


def test_disk_follows_symlinks_that_stay_inside_and_absolute_paths_inside(base: Path) -> None:
    os.symlink(base / "sub" / "a.txt", base / "link-in")
    assert Path(disk.download_to_disk({"base_dir": str(base)}, "link-in")).read_text() == "inside"
    assert disk.download_to_disk({"base_dir": str(base)}, str(base / "sub" / "a.txt")).endswith("a.txt")


def test_disk_refuses_a_folder(base: Path) -> None:
    with pytest.raises(AccessDenied, match="not a regular file"):
        disk.download_to_disk({"base_dir": str(base)}, "sub")


# -- HTTP: a real server on loopback ------------------------------------------------------------
BLOB = os.urandom(3 * 1024 * 1024 + 17)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        if self.path == "/blob":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BLOB)))
            self.end_headers()
            self.wfile.write(BLOB)
        elif self.path == "/chunked-big":
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"x" * 65536)
        elif self.path == "/trickle":  # 40 bytes, one every 50 ms: each read is quick, the whole is slow
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass  # the client gave up
        elif self.path == "/boom":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/secret":
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def temp_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tmp"
    path.mkdir()
    return path


def test_http_refuses_hosts_not_allowed(server: str) -> None:
    with pytest.raises(AccessDenied, match="not in data_store.allowed_hosts"):
        http_store.download_to_disk({"allowed_hosts": ["example.org"]}, f"http://{server}/blob")


def test_http_refuses_objects_over_max_bytes_and_leaves_no_temp_file(server: str, temp_dir: Path) -> None:
    config = {"allowed_hosts": [server], "max_bytes": 1024 * 1024, "temp_dir": str(temp_dir)}
    with pytest.raises(AccessDenied, match="max_bytes"):
        http_store.download_to_disk(config, f"http://{server}/blob")  # declared length
    with pytest.raises(AccessDenied, match="max_bytes"):
        http_store.download_to_disk(config, f"http://{server}/chunked-big")  # counted while streaming
    assert list(temp_dir.iterdir()) == []


def test_http_maps_status_codes_to_retry_or_refusal(server: str) -> None:
    config = {"allowed_hosts": [server]}
    with pytest.raises(NotFound):
        http_store.download_to_disk(config, f"http://{server}/missing")
    with pytest.raises(ConnectorError, match="503"):
        http_store.download_to_disk(config, f"http://{server}/boom")
    with pytest.raises(AccessDenied, match="403"):
        http_store.download_to_disk(config, f"http://{server}/secret")


def test_a_reference_outside_base_dir_says_which_setting_to_change(base: Path) -> None:
    from sqapi.connectors.meta import file as meta_file

    with pytest.raises(AccessDenied) as data_error:
        disk.download_to_disk({"base_dir": str(base)}, "../secret.txt")
    assert str(data_error.value).endswith(
        "is outside base_dir (set data_store.base_dir or $SQAPI_DATA_DIR to a folder that holds it)")
    with pytest.raises(AccessDenied) as meta_error:
        meta_file.fetch_metadata({"base_dir": str(base)}, "../secret.json")
    assert str(meta_error.value).endswith(
        "is outside base_dir (set meta_store.base_dir or $SQAPI_DATA_DIR to a folder that holds it)")


def test_http_gives_up_a_download_that_trickles_past_total_timeout(server: str, temp_dir: Path) -> None:
    config = {"allowed_hosts": [server], "temp_dir": str(temp_dir), "timeout": 5, "total_timeout": 0.5}
    with pytest.raises(ConnectorError, match=r"did not finish within data_store.total_timeout \(0.5s\)"):
        http_store.download_to_disk(config, f"http://{server}/trickle")
    assert list(temp_dir.iterdir()) == []


def test_http_finishes_a_slow_download_within_total_timeout(server: str, temp_dir: Path) -> None:
    config = {"allowed_hosts": [server], "temp_dir": str(temp_dir), "total_timeout": 30}
    path = http_store.download_to_disk(config, f"http://{server}/trickle")
    assert Path(path).read_bytes() == b"x" * 40
    os.unlink(path)


def test_http_total_timeout_must_be_a_positive_number() -> None:
    with pytest.raises(ConfigError, match="data_store.total_timeout"):
        http_store.validate_config({"allowed_hosts": ["*"], "total_timeout": "soon"})


def test_http_errors_show_the_url_without_its_query_or_user_info(server: str) -> None:
    with pytest.raises(NotFound) as missing:
        http_store.download_to_disk({"allowed_hosts": [server]}, f"http://{server}/missing?token=t0ps3cret")
    assert str(missing.value) == f"http://{server}/missing answered 404"
    with pytest.raises(ConnectorError) as unreachable:
        http_store.download_to_disk({"allowed_hosts": ["127.0.0.1:9"], "timeout": 2}, "http://127.0.0.1:9/x?sig=abc")
    assert "sig=abc" not in str(unreachable.value)
