"""What the benchmarks under bench/ share: where the broker and the database are, and sqapi's command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pika

HOST, PORT = os.environ.get("RABBITMQ_HOST", "127.0.0.1"), int(os.environ.get("RABBITMQ_PORT", "5672"))
SQAPI = os.environ.get("SQAPI_BIN") or str(Path(sys.executable).with_name("sqapi"))  # another install to compare
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
NOOP_PLUGIN = "def execute(config, database, message, metadata, data):\n    return None\n"


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True)


def params(vhost: str) -> pika.ConnectionParameters:
    return pika.ConnectionParameters(HOST, PORT, vhost, heartbeat=60)
