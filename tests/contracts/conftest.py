"""Every store type's real backend behind one small interface, so that each contract test is written once.

A *backend* puts objects where its store type finds them, keeps one object just outside the
store's reach (for the tests that try to climb out to it), and gives a section pointing at a
backend that does not answer.  The store under test is never built here: it is the one
``sqapi.app.build`` makes from the config (registry, ``validate_config``, ``connect``), the very
object the processor calls.

Services are real: Swift on loopback (``scripts/swift_dev.sh start``, run by the session fixture),
Redis at 127.0.0.1:6379, an HTTP server started per test.  One that is missing fails with the
command that starts it (tests/services.py).
"""

from __future__ import annotations

import http.server
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from swiftclient import client as swift_client

from sqapi.app import Sqapi
from tests.services import SWIFT_KEY, SWIFT_USER

DATA_TYPES = ["disk", "http", "swift"]
META_TYPES = ["file", "redis"]

#: a credential each unreachable section carries where its type has one: it must never be shown
SECRET = "s3cret-Pa55word-never-shown"


def dead_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Outside:
    """An object just outside a store's reach, and references that try to reach it."""

    content: bytes
    climbing: list[str]   # with '..' segments: refused (AccessDenied)
    other: list[str]      # absolute or percent-encoded: refused or read inside the store, never the outside object


# -- data stores ----------------------------------------------------------------------------------

class DataBackend:
    kind: str
    #: ``ping()`` can find its backend down (http has no single backend to ask: its ping is a no-op)
    pings = True
    #: ``sqapi publish --upload`` can put files into it
    uploads = False

    def section(self) -> dict[str, Any]:
        """The ``data_store`` section of a store that reaches this backend."""
        raise NotImplementedError

    def put(self, name: str, content: bytes) -> str:
        """Store ``content`` as the object named ``name``; the data_location that names it."""
        raise NotImplementedError

    def put_outside(self, content: bytes) -> Outside:
        raise NotImplementedError

    def unreachable_section(self) -> dict[str, Any]:
        """A section of this type for a backend that does not answer, carrying :data:`SECRET` where it can."""
        raise NotImplementedError


class DiskBackend(DataBackend):
    kind = "disk"
    uploads = True

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.root = tmp_path / "store"
        self.root.mkdir()

    def section(self) -> dict[str, Any]:
        return {"type": "disk", "base_dir": str(self.root)}

    def put(self, name: str, content: bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return name

    def put_outside(self, content: bytes) -> Outside:
        outside = self.tmp_path / "outside.bin"
        outside.write_bytes(content)
        return Outside(content, climbing=["../outside.bin", "sub/../../outside.bin"],
                       other=[str(outside), "%2e%2e/outside.bin"])

    def unreachable_section(self) -> dict[str, Any]:
        return {"type": "disk", "base_dir": str(self.tmp_path / "unmounted")}


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class HttpBackend(DataBackend):
    """A real HTTP server on loopback serving a folder; the store's ``base_url`` is its ``/files/``."""

    kind = "http"
    pings = False

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.site = tmp_path / "site"
        self.root = self.site / "files"
        self.root.mkdir(parents=True)
        site = str(self.site)

        class Files(_QuietFiles):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=site, **kwargs)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
        self.hostport = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def section(self) -> dict[str, Any]:
        return {"type": "http", "allowed_hosts": [self.hostport], "base_url": f"http://{self.hostport}/files/",
                "timeout": 10}

    def put(self, name: str, content: bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return name

    def put_outside(self, content: bytes) -> Outside:
        (self.site / "outside.bin").write_bytes(content)  # served at /outside.bin, beside base_url's /files/
        return Outside(content, climbing=["../outside.bin", "sub/../../outside.bin"],
                       other=["/outside.bin", "%2e%2e/outside.bin"])

    def unreachable_section(self) -> dict[str, Any]:
        port = dead_port()
        return {"type": "http", "allowed_hosts": [f"127.0.0.1:{port}"], "base_url": f"http://127.0.0.1:{port}/",
                "headers": {"Authorization": f"Bearer {SECRET}"}, "timeout": 2}


class SwiftBackend(DataBackend):
    """A fresh container on the real Swift; the store is configured with it alone."""

    kind = "swift"
    uploads = True

    def __init__(self, auth_url: str, admin: swift_client.Connection, containers: Callable[[], str]) -> None:
        self.auth_url = auth_url
        self.admin = admin
        self.containers = containers
        self.container = containers()

    def section(self) -> dict[str, Any]:
        return {"type": "swift", "auth_url": self.auth_url, "access_key_id": SWIFT_USER,
                "secret_access_key": SWIFT_KEY, "containers": [self.container], "timeout": 10, "retries": 1}

    def put(self, name: str, content: bytes) -> str:
        self.admin.put_object(self.container, name, content)
        return name

    def put_outside(self, content: bytes) -> Outside:
        other = self.containers()  # of the same account, but not one the store is configured with
        self.admin.put_object(other, "outside.bin", content)
        return Outside(content, climbing=[f"../{other}/outside.bin", f"{self.container}/../{other}/outside.bin"],
                       other=[f"/{other}/outside.bin", f"%2e%2e/{other}/outside.bin"])

    def unreachable_section(self) -> dict[str, Any]:
        return {"type": "swift", "auth_url": f"http://127.0.0.1:{dead_port()}/auth/v1.0",
                "access_key_id": SWIFT_USER, "secret_access_key": SECRET, "containers": [self.container],
                "timeout": 2, "retries": 0}


@pytest.fixture
def disk_data_backend(tmp_path: Path) -> DataBackend:
    return DiskBackend(tmp_path)


@pytest.fixture
def http_data_backend(tmp_path: Path) -> Iterator[DataBackend]:
    backend = HttpBackend(tmp_path)
    yield backend
    backend.close()


@pytest.fixture
def swift_data_backend(swift_auth_url: str, swift_admin: swift_client.Connection,
                       swift_containers: Callable[[], str]) -> DataBackend:
    return SwiftBackend(swift_auth_url, swift_admin, swift_containers)


@pytest.fixture(params=DATA_TYPES)
def data_backend(request: pytest.FixtureRequest) -> DataBackend:
    backend: DataBackend = request.getfixturevalue(f"{request.param}_data_backend")
    return backend


@pytest.fixture
def temp_dir(tmp_path: Path) -> Path:
    """``processing.temp_dir``: where remote stores stream objects to."""
    path = tmp_path / "sqapi-tmp"
    path.mkdir()
    return path


@pytest.fixture
def data_app(make_app: Callable[..., Sqapi], temp_dir: Path) -> Callable[[dict[str, Any]], Sqapi]:
    """A sqapi built from the config, as ``sqapi run`` builds it, with ``section`` as its data store."""

    def build(section: dict[str, Any]) -> Sqapi:
        return make_app({"data_store": section, "processing": {"temp_dir": str(temp_dir)}, "active_plugins": []})

    return build


# -- meta stores ----------------------------------------------------------------------------------

class MetaBackend:
    kind: str

    def section(self) -> dict[str, Any]:
        raise NotImplementedError

    def put(self, reference: str, text: str) -> str:
        """Store ``text`` (JSON or not) at ``reference``; the meta_location that names it."""
        raise NotImplementedError

    def put_outside(self, text: str) -> list[str]:
        """Metadata outside the store's reach; references that try to reach it."""
        raise NotImplementedError

    def unreachable_section(self) -> dict[str, Any]:
        raise NotImplementedError


class FileBackend(MetaBackend):
    kind = "file"

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.root = tmp_path / "meta"
        self.root.mkdir()

    def section(self) -> dict[str, Any]:
        return {"type": "file", "base_dir": str(self.root)}

    def put(self, reference: str, text: str) -> str:
        path = self.root / reference
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return reference

    def put_outside(self, text: str) -> list[str]:
        outside = self.tmp_path / "outside.json"
        outside.write_text(text, encoding="utf-8")
        return ["../outside.json", "sub/../../outside.json", str(outside), "%2e%2e/outside.json"]

    def unreachable_section(self) -> dict[str, Any]:
        return {"type": "file", "base_dir": str(self.tmp_path / "unmounted")}


class RedisBackend(MetaBackend):
    """Keys under this test's own prefix (``key_prefix``) on the real Redis."""

    kind = "redis"

    def __init__(self, section: dict[str, Any], client: redis.Redis, prefix: str) -> None:
        self._section = section
        self.client = client
        self.prefix = prefix
        self.outside_keys: list[str] = []

    def section(self) -> dict[str, Any]:
        return dict(self._section)

    def put(self, reference: str, text: str) -> str:
        self.client.set(self.prefix + reference, text.encode("utf-8"))
        return reference

    def put_outside(self, text: str) -> list[str]:
        key = f"sqapi-test-outside-{uuid.uuid4().hex[:12]}"  # no prefix: out of the store's reach
        self.client.set(key, text.encode("utf-8"))
        self.outside_keys.append(key)
        return [key, f"../{key}", f"/{key}", f"{self.prefix}{key}"]

    def unreachable_section(self) -> dict[str, Any]:
        return {"type": "redis", "url": f"redis://:{SECRET}@127.0.0.1:{dead_port()}/0", "key_prefix": self.prefix,
                "socket_timeout": 1, "retries": 0}

    def close(self) -> None:
        if self.outside_keys:
            self.client.delete(*self.outside_keys)


@pytest.fixture
def file_meta_backend(tmp_path: Path) -> MetaBackend:
    return FileBackend(tmp_path)


@pytest.fixture
def redis_meta_backend(redis_section: dict[str, Any], redis_client: redis.Redis,
                       redis_prefix: str) -> Iterator[MetaBackend]:
    backend = RedisBackend(redis_section, redis_client, redis_prefix)
    yield backend
    backend.close()


@pytest.fixture(params=META_TYPES)
def meta_backend(request: pytest.FixtureRequest) -> MetaBackend:
    backend: MetaBackend = request.getfixturevalue(f"{request.param}_meta_backend")
    return backend


@pytest.fixture
def meta_app(make_app: Callable[..., Sqapi]) -> Callable[[dict[str, Any]], Sqapi]:
    """A sqapi built from the config, as ``sqapi run`` builds it, with ``section`` as its meta store."""

    def build(section: dict[str, Any]) -> Sqapi:
        return make_app({"meta_store": section, "active_plugins": []})

    return build
