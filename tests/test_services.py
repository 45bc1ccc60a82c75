"""scripts/services.sh -- what `make test` runs to bring PostgreSQL, Redis and RabbitMQ up -- run
on ports of the test's own, so that nothing shared is started, stopped or killed."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import psycopg2
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "services.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def services(state: Path, *args: str, **ports: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SQAPI_SERVICES_STATE": str(state),
           **{f"SQAPI_TEST_{name.upper()}_PORT": str(port) for name, port in ports.items()}}
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"scripts/services.sh {' '.join(args)}: {done.stdout}{done.stderr}"
    return done


def test_redis_is_started_when_down_left_alone_when_up_and_only_what_was_started_is_stopped(
        tmp_path: Path) -> None:
    ours, theirs = free_port(), free_port()
    foreign = subprocess.Popen(["redis-server", "--port", str(theirs), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if answers(theirs):
                break
            time.sleep(0.1)
        state = tmp_path / "state"
        started = services(state, "up", "redis", redis=ours)
        assert f"starting redis-server on 127.0.0.1:{ours}" in started.stdout
        assert subprocess.run(["redis-cli", "-p", str(ours), "ping"], capture_output=True, text=True).stdout == "PONG\n"
        again = services(state, "up", "redis", redis=ours)
        assert f"redis answers on 127.0.0.1:{ours}: left alone" in again.stdout
        running = services(state, "up", "redis", redis=theirs)
        assert f"redis answers on 127.0.0.1:{theirs}: left alone" in running.stdout
        services(state, "down")
        assert not answers(ours), "the redis-server the script started still runs"
        assert answers(theirs), "the script stopped a redis-server it did not start"
        assert answers(6379), "the machine's own Redis must never be touched"
        assert "nothing to stop" in services(state, "down").stdout
    finally:
        foreign.terminate()
        foreign.wait(10)


def test_postgres_gets_a_cluster_of_its_own_on_a_free_port_and_it_is_dropped_afterwards(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    name = f"sqapi_test_{port}"
    try:
        started = services(state, "up", "postgres", pg=port)
        assert "creating PostgreSQL cluster" in started.stdout and name in started.stdout
        with psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres") as conn:
            with conn.cursor() as cur:  # trust authentication on loopback, as the tests expect of 5432
                cur.execute("SHOW port")
                assert cur.fetchone() == (str(port),)
        conn.close()
        assert "left alone" in services(state, "up", "postgres", pg=port).stdout
    finally:
        services(state, "down")
    assert not answers(port)
    clusters = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True).stdout
    assert name not in clusters, clusters
    assert answers(5432), "the machine's own PostgreSQL must never be touched"


@pytest.mark.parametrize("service", ["postgres", "redis", "rabbitmq"])
def test_running_services_are_left_alone(tmp_path: Path, service: str) -> None:
    """What `make test` sees on a machine where the services run already: nothing started, nothing to stop."""
    done = services(tmp_path, "up", service)
    assert "left alone" in done.stdout and "starting" not in done.stdout and "creating" not in done.stdout
    assert not (tmp_path / "started").exists()
