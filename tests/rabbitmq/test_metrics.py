"""`sqapi loader --metrics-port`: one scrape sums every loader process; health probes for orchestrators."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sqapi import supervisor
from tests.rabbitmq.conftest import Loaders, count, declare, message, publish, rabbitmqctl, wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def promtool() -> str:
    found = shutil.which("promtool") or str(Path(sys.executable).with_name("promtool"))
    if not os.path.exists(found):
        pytest.fail("promtool is missing: `make setup` (scripts/setup.sh) takes it out of Debian's prometheus "
                    "package", pytrace=False)
    return found


def processed(scrape: str) -> dict[str, float]:
    return {sample.labels["status"]: sample.value
            for family in text_string_to_metric_families(scrape) if family.name == "sqapi_messages_processed"
            for sample in family.samples if sample.name == "sqapi_messages_processed_total"}


@pytest.mark.slow
def test_one_scrape_of_a_loader_with_its_default_processes_sums_every_process(
        vhost: str, broker: dict[str, Any], loaders: Loaders, loader_config: Callable[..., Path],
        pg_section: dict[str, Any], status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    declare(vhost, broker)
    path = loader_config(prefetch=20)
    path.write_text(path.read_text() + yaml.safe_dump({"active_plugins": ["record"], "database": pg_section}))
    expected = min(supervisor.AUTO_MAX, len(os.sched_getaffinity(0)))  # processes: auto, the default
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    folders_before = set(Path(tempfile.gettempdir()).glob("sqapi-metrics-*"))
    boss = loaders.start(path, "--metrics-port", str(port))
    wait_until(lambda: boss.output().count("consuming from queue") == expected, timeout=60,
               what=f"{expected} loader process(es) consuming")
    wait_until(lambda: get(f"{base}/health/live")[0] == 200, what="live: every loader process consuming")
    live = json.loads(get(f"{base}/health/live")[1])
    assert live["live"]["loader_processes"] == expected
    status, ready = get(f"{base}/health/ready")
    assert status == 200 and json.loads(ready)["ready"]["database"] == "up"

    publish(vhost, [message(n) for n in range(1000)])
    done = "SELECT COUNT(*) AS n FROM messages WHERE status = 'DONE'"
    wait_until(lambda: count(status_db, done) == 1000, timeout=180, what="1,000 DONE")
    wait_until(lambda: processed(get(f"{base}/metrics")[1].decode()).get("DONE") == 1000,
               what="the scrape to count 1,000")
    status, scrape = get(f"{base}/metrics")
    assert status == 200
    assert processed(scrape.decode()) == {"DONE": 1000.0}
    if expected > 1:  # the work was shared, and the scrape still shows all of it
        runs = status_db("SELECT COUNT(DISTINCT pid) AS n FROM record_runs")
        assert runs[0]["n"] == expected
    checked = subprocess.run([promtool(), "check", "metrics"], input=scrape, capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()

    boss.signal(signal.SIGTERM)
    assert boss.wait(60) == 0
    assert get(f"{base}/health")[0] == 0, "the port still answers after the loader stopped"
    assert set(Path(tempfile.gettempdir()).glob("sqapi-metrics-*")) == folders_before, "left its metrics folder"


def test_a_loader_process_that_is_not_consuming_fails_liveness(
        vhost: str, broker: dict[str, Any], loaders: Loaders, loader_config: Callable[..., Path],
        pg_section: dict[str, Any], status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    declare(vhost, broker)
    path = loader_config(reconnect={"initial_delay": 0.2, "max_delay": 0.5})
    path.write_text(path.read_text() + yaml.safe_dump({"active_plugins": ["record"], "database": pg_section,
                                                      "processing": {"processes": 2}}))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    boss = loaders.start(path, "--metrics-port", str(port))
    wait_until(lambda: get(f"{base}/health/live")[0] == 200, timeout=60, what="live")
    # guest loses the vhost, then the queue goes away: RabbitMQ cancels both consumers, and their reconnects
    # are refused until guest may use the vhost again
    rabbitmqctl("clear_permissions", "-p", vhost, "guest")
    rabbitmqctl("delete_queue", "-p", vhost, "sqapi")
    wait_until(lambda: get(f"{base}/health/live")[0] == 503, what="not live while no process consumes")
    status, body = get(f"{base}/health/live")
    assert json.loads(body)["live"]["not_consuming"], body
    assert get(f"{base}/health/ready")[0] == 200  # the database still answers
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    wait_until(lambda: get(f"{base}/health/live")[0] == 200, timeout=60, what="live again once it consumes")
    boss.signal(signal.SIGTERM)
    assert boss.wait(60) == 0
