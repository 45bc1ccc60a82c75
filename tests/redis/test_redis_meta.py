"""What only the Redis meta store does, against the real Redis, each test under its own key prefix.

What every meta store does (JSON objects, missing keys, bad values, escapes, outages) is tested once
for all types in tests/contracts/test_meta_store_contract.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from sqapi.connectors.meta import MetaStore
from sqapi.connectors.meta import redis as redis_meta
from sqapi.errors import ConfigError, ConnectorError, PermanentError


@pytest.fixture
def meta(redis_section: dict[str, Any]) -> Iterator[redis_meta.RedisMeta]:
    connection = redis_meta.connect(dict(redis_section))
    yield connection
    connection.close()


def test_metadata_stored_as_a_hash_decodes_the_values_that_are_json(meta: redis_meta.RedisMeta,
                                                                     redis_client: redis.Redis,
                                                                     redis_prefix: str) -> None:
    redis_client.hset(f"{redis_prefix}doc/2", mapping={"title": "Plain text", "pages": "12",
                                                      "author": '{"name": "Ada"}', "draft": "false"})
    assert meta.fetch_metadata("doc/2") == {"title": "Plain text", "pages": 12, "author": {"name": "Ada"},
                                            "draft": False}


def test_a_key_of_another_type_is_a_permanent_error(meta: redis_meta.RedisMeta, redis_client: redis.Redis,
                                                    redis_prefix: str) -> None:
    redis_client.rpush(f"{redis_prefix}listy", "a", "b")
    with pytest.raises(PermanentError, match="neither a JSON string nor a hash"):
        meta.fetch_metadata("listy")


def test_a_url_works_instead_of_host_and_port(redis_server: dict[str, Any], redis_client: redis.Redis,
                                              redis_prefix: str) -> None:
    redis_client.set(f"{redis_prefix}by-url", json.dumps({"via": "url"}))
    section = {"type": "redis", "url": f"redis://{redis_server['host']}:{redis_server['port']}/0",
               "key_prefix": redis_prefix}
    assert redis_meta.fetch_metadata(section, "by-url") == {"via": "url"}


def test_the_meta_store_wrapper_uses_one_client_for_many_lookups(redis_section: dict[str, Any],
                                                                 redis_client: redis.Redis, redis_prefix: str) -> None:
    redis_client.set(f"{redis_prefix}k", json.dumps({"n": 1}))
    store = MetaStore(redis_meta, dict(redis_section))
    store.connect()
    try:
        store.ping()
        client = store._connection.client  # type: ignore[union-attr]
        assert all(store.fetch("k") == {"n": 1} for _ in range(20))
        assert store._connection.client is client  # type: ignore[union-attr]
        created = client.connection_pool._created_connections  # how many sockets were opened
        assert created == 1
    finally:
        store.close()


@pytest.fixture
def acl_user(redis_client: redis.Redis) -> Iterator[tuple[str, str]]:
    """A Redis user with a password of its own (the shared server's default user has none)."""
    name, password = f"sqapi-test-{uuid.uuid4().hex[:8]}", f"right-{uuid.uuid4().hex}"
    redis_client.acl_setuser(name, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"])
    yield name, password
    redis_client.acl_deluser(name)


def test_the_right_password_is_accepted(redis_section: dict[str, Any], redis_client: redis.Redis,
                                        redis_prefix: str, acl_user: tuple[str, str]) -> None:
    redis_client.set(f"{redis_prefix}private", json.dumps({"ok": True}))
    name, password = acl_user
    connection = redis_meta.connect(dict(redis_section, username=name, password=password))
    try:
        assert connection.fetch_metadata("private") == {"ok": True}
    finally:
        connection.close()


def test_a_wrong_password_is_a_connector_error_that_never_shows_the_password(
        redis_section: dict[str, Any], acl_user: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    name, _ = acl_user
    connection = redis_meta.connect(dict(redis_section, username=name, password="wrong-pass-never-shown"))
    try:
        with pytest.raises(ConnectorError) as raised:
            connection.fetch_metadata("private")
        with pytest.raises(ConnectorError):
            connection.ping()
    finally:
        connection.close()
    assert "Redis at redis://" in str(raised.value)
    assert "wrong-pass-never-shown" not in str(raised.value) + caplog.text


def test_an_unreachable_server_is_a_connector_error(redis_section: dict[str, Any]) -> None:
    connection = redis_meta.connect(dict(redis_section, port=1, socket_timeout=1))
    try:
        with pytest.raises(ConnectorError, match="Redis at redis://127.0.0.1:1/0 unavailable"):
            connection.fetch_metadata("anything")
    finally:
        connection.close()


@pytest.mark.parametrize("section, key", [
    ({"type": "redis"}, "meta_store.host"),
    ({"type": "redis", "host": "h", "port": "6379x"}, "meta_store.port"),
    ({"type": "redis", "url": "http://h"}, "meta_store.url"),
    ({"type": "redis", "host": "h", "socket_timeout": 0}, "meta_store.socket_timeout"),
])
def test_a_wrong_section_is_a_config_error_naming_the_key(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        redis_meta.validate_config(section)


def test_a_connection_the_server_dropped_is_reopened_without_an_error(meta: redis_meta.RedisMeta,
                                                                      redis_client: redis.Redis,
                                                                      redis_prefix: str) -> None:
    redis_client.set(f"{redis_prefix}again", json.dumps({"n": 2}))
    assert meta.fetch_metadata("again") == {"n": 2}
    redis_client.client_kill_filter(_id=meta.client.client_id())
    assert meta.fetch_metadata("again") == {"n": 2}
