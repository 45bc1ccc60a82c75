"""Shared fixtures: an isolated sqapi on the embedded default (spool folder, local files, embedded PostgreSQL).

Each test gets its own folder (data, spool, plugins), its own schema in one embedded PostgreSQL
server shared by the whole session (a server per test would cost an initdb each), and an
environment with none of the user's sqapi variables, so tests never see each other's state.
"""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import yaml

from sqapi.app import Sqapi, build
from sqapi.config import Config, load_config
from tests.browser import browser, chromium  # noqa: F401 (fixtures, used by name)
from tests.services import (  # noqa: F401 (fixtures, used by name)
    pg_schema,
    pg_section,
    postgres_server,
    redis_client,
    redis_prefix,
    redis_section,
    redis_server,
    swift_admin,
    swift_auth_url,
    swift_containers,
)

SQAPI_ENV = ("CFG_FILE", "PLUGIN", "SQAPI_PLUGIN_DIRS", "SQAPI_DATA_DIR", "SQAPI_SPOOL_DIR", "SQAPI_DB",
             "SQAPI_API_TOKEN", "SQAPI_EMBEDDED_DIR", "SQAPI_DB_SCHEMA", "SQAPI_PDF_MAX_MEMORY")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SQAPI_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the session's embedded PostgreSQL (started by the first test that connects)."""
    return tmp_path_factory.mktemp("embedded-postgres")


@pytest.fixture
def status_schema(embedded_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This test's schema in the embedded PostgreSQL ($SQAPI_DB_SCHEMA), dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    monkeypatch.setenv("SQAPI_EMBEDDED_DIR", str(embedded_dir))
    monkeypatch.setenv("SQAPI_DB_SCHEMA", name)
    yield name
    from sqapi.connectors.db import _embedded

    if (embedded_dir / "keeper.pid").exists():  # a test that never connected started no server
        conn = psycopg2.connect(**_embedded.ensure_running(embedded_dir).connection())
        conn.autocommit = True
        with conn, conn.cursor() as cursor:
            cursor.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        conn.close()


@pytest.fixture
def status_db(status_schema: str, embedded_dir: Path) -> Callable[[str], list[tuple[Any, ...]]]:
    """Run one SQL statement in this test's schema of the embedded PostgreSQL; its rows."""
    from sqapi.connectors.db import _embedded

    def query(sql: str) -> list[tuple[Any, ...]]:
        conn = psycopg2.connect(**_embedded.ensure_running(embedded_dir).connection(),
                                options=f"-c search_path={status_schema}")
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()

    return query


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status_schema: str) -> Path:
    """A fresh working directory with data/, plugins/ and the sqapi env pointing into it."""
    for name in ("data", "plugins"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SQAPI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SQAPI_SPOOL_DIR", str(tmp_path / "spool"))
    return tmp_path


@pytest.fixture
def write_config(workdir: Path) -> Callable[..., Path]:
    """Write a YAML config file (merged over the embedded default when loaded); returns its path."""

    def write(content: dict[str, Any] | str, name: str = "sqapi.yml") -> Path:
        path = workdir / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content), encoding="utf-8")
        return path

    return write


@pytest.fixture
def make_config(write_config: Callable[..., Path]) -> Callable[..., Config]:
    def make(overrides: dict[str, Any] | None = None) -> Config:
        return load_config(write_config(overrides or {}))

    return make


@pytest.fixture
def write_plugin(workdir: Path) -> Callable[..., Path]:
    """Create a plugin folder in the test's plugins/ from source text (and optional config / init.sql)."""

    def write(name: str, source: str, config: dict[str, Any] | str | None = None, init_sql: str | None = None,
              files: dict[str, str] | None = None) -> Path:
        folder = workdir / "plugins" / name
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text(textwrap.dedent(source), encoding="utf-8")
        if config is not None:
            text = config if isinstance(config, str) else yaml.safe_dump(config)
            (folder / "config.yml").write_text(text, encoding="utf-8")
        if init_sql is not None:
            (folder / "scripts").mkdir()
            (folder / "scripts" / "init.sql").write_text(textwrap.dedent(init_sql), encoding="utf-8")
        for relative, text in (files or {}).items():
            path = folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text), encoding="utf-8")
        return folder

    return write


@pytest.fixture
def make_app(make_config: Callable[..., Config]) -> Iterator[Callable[..., Sqapi]]:
    """Build a wired sqapi from config overrides; closed at the end of the test."""
    built: list[Sqapi] = []

    def make(overrides: dict[str, Any] | None = None) -> Sqapi:
        app = build(make_config(overrides))
        built.append(app)
        return app

    yield make
    for app in built:
        app.close()


@pytest.fixture
def write_data(workdir: Path) -> Callable[[str, bytes | str], str]:
    """Write a data file under data/ and return its data_location (relative to base_dir)."""

    def write(relative: str, content: bytes | str) -> str:
        path = workdir / "data" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return relative

    return write


@pytest.fixture
def es() -> Iterator[Any]:
    """A STAND-IN FOR ELASTICSEARCH (tests/plugins/es_standin.py), on a free loopback port for this test."""
    from tests.plugins.es_standin import ElasticsearchStandIn

    server = ElasticsearchStandIn().start()
    yield server
    server.stop()
