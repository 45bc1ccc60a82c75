"""``sqapi check -c conf/sqapi.yml`` against the real PostgreSQL and Redis: one line each, naming what is down."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sqapi.cli import main

PRODUCTION = Path(__file__).resolve().parents[2] / "conf" / "sqapi.yml"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def production_env(workdir: Path, postgres_server: dict[str, Any], redis_server: dict[str, Any],
                   pg_schema: str) -> dict[str, str]:
    return {"SQAPI_PG_HOST": str(postgres_server["host"]), "SQAPI_PG_PORT": str(postgres_server["port"]),
            "SQAPI_PG_USER": str(postgres_server["user"]), "SQAPI_PG_DATABASE": str(postgres_server["name"]),
            "SQAPI_PG_SCHEMA": pg_schema, "SQAPI_REDIS_HOST": str(redis_server["host"]),
            "SQAPI_REDIS_PORT": str(redis_server["port"]), "SQAPI_DATA_DIR": str(workdir / "data")}


def lines_of(output: str) -> dict[str, str]:
    return {line.split()[1]: line for line in output.splitlines() if len(line.split()) > 1}


def check(env: dict[str, str]) -> tuple[int, dict[str, str], str]:
    result = CliRunner().invoke(main, ["check", "-c", str(PRODUCTION)], env=env)
    return result.exit_code, lines_of(result.output), result.output


def test_check_reaches_postgres_and_redis_with_the_production_profile(production_env: dict[str, str]) -> None:
    _, lines, _ = check(production_env)
    pg = f"{production_env['SQAPI_PG_HOST']}:{production_env['SQAPI_PG_PORT']}/{production_env['SQAPI_PG_DATABASE']}"
    redis = f"{production_env['SQAPI_REDIS_HOST']}:{production_env['SQAPI_REDIS_PORT']}"
    assert lines["database"].startswith("ok") and f"postgres at {pg}" in lines["database"]  # where, not just what
    assert lines["meta_store"].startswith("ok") and f"redis at {redis}" in lines["meta_store"]
    assert lines["data_store"].startswith("ok") and production_env["SQAPI_DATA_DIR"] in lines["data_store"]


def test_check_says_postgres_is_down_without_showing_its_password(production_env: dict[str, str]) -> None:
    port = closed_port()
    code, lines, output = check(dict(production_env, SQAPI_PG_PORT=str(port), SQAPI_PG_PASSWORD="pg-secret-pw"))
    assert code == 1
    assert lines["database"].startswith("FAIL") and f":{port}/" in lines["database"]
    assert lines["meta_store"].startswith("ok")
    assert "pg-secret-pw" not in output


def test_check_says_redis_is_down_without_showing_its_password(production_env: dict[str, str]) -> None:
    port = closed_port()
    code, lines, output = check(dict(production_env, SQAPI_REDIS_PORT=str(port),
                                     SQAPI_REDIS_PASSWORD="redis-secret-pw"))
    assert code == 1
    assert lines["meta_store"].startswith("FAIL") and f"redis://127.0.0.1:{port}/0" in lines["meta_store"]
    assert lines["database"].startswith("ok")
    assert "redis-secret-pw" not in output


def test_messages_on_a_schema_without_status_tables_says_so_and_creates_nothing(production_env: dict[str, str],
                                                                                pg_schema: str) -> None:
    from tests.services import pg_connect

    missing = pg_schema + "_absent"
    env = {**production_env, "SQAPI_PG_SCHEMA": missing}
    for args in (["messages"], ["status", "x"]):
        result = CliRunner().invoke(main, ["-c", str(PRODUCTION), *args], env=env)
        assert result.exit_code == 1
        assert "no status database at" in result.output and "run sqapi process/run first" in result.output
    conn = pg_connect()
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (missing,))
            assert cursor.fetchall() == []
            cursor.execute("SELECT 1 FROM information_schema.tables WHERE table_schema = %s", (pg_schema,))
            assert cursor.fetchall() == []
        result = CliRunner().invoke(main, ["-c", str(PRODUCTION), "messages"], env=production_env)
        assert result.exit_code == 1 and "no status database at" in result.output
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM information_schema.tables WHERE table_schema = %s", (pg_schema,))
            assert cursor.fetchall() == []
    finally:
        conn.close()
