"""Bad input under ``sqapi loader`` on the real broker and PostgreSQL: refused at once, nothing else lost.

Blank and non-string uuids, deeply nested bodies, lone surrogates, NUL characters and 5 MB bodies
go to the dead-letter queue with their reason on their first delivery; the good messages beside
them are all processed, each once, in batches that never fall back to one message at a time;
the loader's memory and its log lines stay bounded.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.rabbitmq.conftest import Loaders, count, declare, depth, message, publish, take_all, wait_until

FIVE_MB = 5 * 1024 * 1024


def bad_bodies() -> dict[str, bytes]:
    """Every kind of body the loader must refuse, by name."""
    def body(**fields: Any) -> bytes:
        return json.dumps({"data_location": "item.txt", **fields}).encode()

    bodies = {f"blank-{n}": body(uuid_ref="   ") for n in range(40)}
    bodies.update({
        "object-uuid": body(uuid_ref={"id": 0}), "list-uuid": body(uuid_ref=[0]), "true-uuid": body(uuid_ref=True),
        "fraction-uuid": body(uuid_ref=1.5),
        "deep": b'{"uuid_ref": "deep", "data_location": "item.txt", "m": ' + b"[" * 10000 + b"]" * 10000 + b"}",
        "surrogate": b'{"uuid_ref": "surrogate", "data_location": "item.txt", "note": "\\ud800"}',
        "nul": b'{"uuid_ref": "nul", "data_location": "item.txt", "metadata": {"k": "a\\u0000b"}}',
        "not-utf8": b'{"uuid_ref": "x\xff", "data_location": "item.txt"}',
        "list-body": b"[1, 2, 3]",
    })
    bodies.update({f"huge-{n}": body(uuid_ref=f"huge-{n}", pad="x" * FIVE_MB) for n in range(12)})
    bodies["huge-location"] = b'{"uuid_ref": "huge-location", "data_location": "' + b"d" * 600_000 + b'"}'
    return bodies


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_bad_bodies_are_dead_lettered_on_first_delivery_and_every_good_message_runs_once(
        workdir: Path, vhost: str, broker: dict[str, Any], pg_section: dict[str, Any], loaders: Loaders,
        status_db: Callable[[str], list[dict[str, Any]]]) -> None:
    declare(vhost, broker)
    config = workdir / "loader.yml"
    config.write_text(yaml.safe_dump({"msg_broker": broker, "database": pg_section, "active_plugins": ["record"],
                                      "processing": {"processes": 1}}))
    loader = loaders.start(config)
    wait_until(lambda: "consuming from queue" in loader.output(), what="the loader consuming")
    bad = bad_bodies()
    good = [message(n) for n in range(200)]
    mixed: list[bytes | dict[str, Any]] = []
    for n, body in enumerate(bad.values()):  # the bad ones scattered among the good, so batches mix them
        mixed += [good[n * 3 % 200], body] if n < len(good) else [body]
    mixed += [m for m in good if m not in mixed]
    publish(vhost, mixed)
    wait_until(lambda: count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status = 'DONE'") == 200,
               timeout=120, what="the 200 good messages DONE")
    wait_until(lambda: depth(vhost, "sqapi.dead") == len(bad), timeout=60, what="every bad body dead-lettered")
    assert depth(vhost, "sqapi") == 0
    dead = take_all(vhost, "sqapi.dead")
    headers = [properties.headers for properties, _body in dead]
    assert all(h["x-sqapi-reason"].startswith("malformed message") for h in headers)
    assert all(h["x-sqapi-attempts"] == 1 for h in headers)  # refused on the first delivery, never retried
    assert all(len(h["x-sqapi-reason"]) < 300 for h in headers)  # no reason quotes a huge value
    reasons = " | ".join(h["x-sqapi-reason"] for h in headers)
    for expected in ("uuid_ref is blank", "must be a string or a whole number, not an object", "not a list",
                     "not true or false", "not a number with a fraction", "nests deeper than 64 levels",
                     "lone UTF-16 surrogate", "NUL character", "not UTF-8", "body must be a JSON object",
                     "larger than msg_broker.max_body_bytes", "data_location is 600000 characters long"):
        assert expected in reasons, expected
    assert sorted(len(body) for _p, body in dead) == sorted(len(b) for b in bad.values())  # each kept whole
    # every good message ran its plugin exactly once; no bad one ran it or took another's uuid
    runs = status_db("SELECT uuid, COUNT(*) AS n FROM record_runs GROUP BY uuid")
    assert sorted(r["uuid"] for r in runs) == sorted(f"msg-{n}" for n in range(200))
    assert all(r["n"] == 1 for r in runs)
    assert count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE uuid LIKE 'queue#%' OR uuid LIKE 'sqapi#%'") \
        == 0
    output = loader.output()
    assert "processing them one by one" not in output  # a bad body never broke its batch
    assert "Traceback" not in output
    assert max(len(line) for line in output.splitlines()) < 4000  # bounded log lines
    assert peak_rss_mib(loader.process.pid) < 300  # thirteen 5 MB bodies passed through it
    loader.signal(signal.SIGTERM)
    assert loader.wait() == 0
