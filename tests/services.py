"""Fixtures for the real PostgreSQL, Redis and OpenStack Swift on loopback, each test isolated.

PostgreSQL: a fresh schema per test (dropped after).  Redis: a random key prefix per test
(its keys deleted after).  Swift: fresh, randomly named containers (deleted after), on the
single-node Swift that ``scripts/swift_dev.sh start`` runs (started by the session fixture when
it is not up).  An unreachable server is a loud failure naming the command that starts it,
never a skip.  Import the fixtures into a folder's ``conftest.py``.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
from swiftclient import client as swift_client

PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = ('redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
               "--dir /var/lib/redis --logfile /var/log/redis/ci.log")

PG_CONNECTION = {"host": os.environ.get("SQAPI_TEST_PG_HOST", "127.0.0.1"),
                 "port": int(os.environ.get("SQAPI_TEST_PG_PORT", "5432")),
                 "user": os.environ.get("SQAPI_TEST_PG_USER", "postgres"),
                 "name": os.environ.get("SQAPI_TEST_PG_DATABASE", "postgres")}
REDIS_HOST = os.environ.get("SQAPI_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("SQAPI_TEST_REDIS_PORT", "6379"))

REPO = Path(__file__).resolve().parents[1]
SWIFT_SCRIPT = REPO / "scripts" / "swift_dev.sh"
SWIFT_PROXY_PORT = int(os.environ.get("SQAPI_SWIFT_PROXY_PORT", "8080"))
SWIFT_AUTH_URL = f"http://127.0.0.1:{SWIFT_PROXY_PORT}/auth/v1.0"
SWIFT_USER = "test:tester"   # scripts/swift_dev.sh's tempauth user
SWIFT_KEY = "testing"


def pg_connect() -> Any:
    c = PG_CONNECTION
    return psycopg2.connect(host=c["host"], port=c["port"], user=c["user"], dbname=c["name"], connect_timeout=3)


@pytest.fixture(scope="session")
def postgres_server() -> dict[str, Any]:
    """The shared PostgreSQL's connection settings, once it answered."""
    try:
        pg_connect().close()
    except psycopg2.Error as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_CONNECTION['host']}:{PG_CONNECTION['port']} "
                    f"({' '.join(str(exc).split())}). Start it with: {PG_START}", pytrace=False)
    return dict(PG_CONNECTION)


@pytest.fixture
def pg_schema(postgres_server: dict[str, Any]) -> Iterator[str]:
    """A fresh, empty schema for this test only."""
    name = f"sqapi_test_{uuid.uuid4().hex[:12]}"
    conn = pg_connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(f'CREATE SCHEMA "{name}"')
        yield name
    finally:
        with conn.cursor() as cursor:
            cursor.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        conn.close()


@pytest.fixture
def pg_section(postgres_server: dict[str, Any], pg_schema: str) -> dict[str, Any]:
    """A ``database`` section for the real PostgreSQL, in this test's schema."""
    return {"type": "postgres", "connection": dict(postgres_server), "schema": pg_schema,
            "pool": {"min": 1, "max": 8, "timeout": 30}, "connect_retry": {"attempts": 1}}


@pytest.fixture(scope="session")
def redis_server() -> dict[str, Any]:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT} ({exc}). Start it with: {REDIS_START}",
                    pytrace=False)
    finally:
        client.close()
    return {"host": REDIS_HOST, "port": REDIS_PORT}


@pytest.fixture
def redis_client(redis_server: dict[str, Any]) -> Iterator[redis.Redis]:
    client = redis.Redis(host=redis_server["host"], port=redis_server["port"], socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted after the test."""
    prefix = f"sqapi-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def redis_section(redis_server: dict[str, Any], redis_prefix: str) -> dict[str, Any]:
    """A ``meta_store`` section for the real Redis, under this test's prefix."""
    return {"type": "redis", "host": redis_server["host"], "port": redis_server["port"], "db": 0,
            "key_prefix": redis_prefix, "socket_timeout": 5}


@pytest.fixture(scope="session")
def swift_auth_url() -> str:
    """A running Swift: starts it with scripts/swift_dev.sh when needed; fails loudly if it cannot."""
    command = ["bash", str(SWIFT_SCRIPT), "start"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`bash scripts/swift_dev.sh start` did not finish in {exc.timeout}s; run it by hand "
                    f"to see why: cd {REPO} && bash scripts/swift_dev.sh start", pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"could not start Swift (exit {done.returncode}). Run it by hand: "
                    f"cd {REPO} && bash scripts/swift_dev.sh start\n--- stdout ---\n{done.stdout}"
                    f"\n--- stderr ---\n{done.stderr}", pytrace=False)
    return SWIFT_AUTH_URL


@pytest.fixture
def swift_admin(swift_auth_url: str) -> Iterator[swift_client.Connection]:
    """A plain swiftclient connection for setting up objects (not the code under test)."""
    conn = swift_client.Connection(authurl=swift_auth_url, user=SWIFT_USER, key=SWIFT_KEY, retries=2)
    yield conn
    conn.close()


@pytest.fixture
def swift_containers(swift_admin: swift_client.Connection) -> Iterator[Callable[[], str]]:
    """Creates fresh, randomly named containers and deletes them (and their objects) afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"sqapi-test-{uuid.uuid4().hex[:12]}"
        swift_admin.put_container(name)
        made.append(name)
        return name

    yield make
    for name in made:
        try:
            _, objects = swift_admin.get_container(name, full_listing=True)
            for obj in objects:
                swift_admin.delete_object(name, obj["name"])
            swift_admin.delete_container(name)
        except swift_client.ClientException as exc:
            if exc.http_status != 404:
                raise
