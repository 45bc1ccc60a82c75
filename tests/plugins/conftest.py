"""Fixtures of the built-in plugins' tests: PDFs, the Elasticsearch stand-in, a webhook receiver."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.plugins.es_standin import ElasticsearchStandIn
from tests.plugins.receiver import WebhookReceiver

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins"
SECRET = "test-shared-secret"


def _load_make_pdf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sqapi_samples_make_pdf", ROOT / "samples" / "make_pdf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


make_pdf = _load_make_pdf()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver().start()
    yield server
    server.stop()


def es_settings(es: ElasticsearchStandIn, **extra: Any) -> dict[str, Any]:
    return {"hosts": [es.url], "backoff": 0.01, "max_retries": 2, **extra}


def webhook_settings(receiver: WebhookReceiver, **extra: Any) -> dict[str, Any]:
    # the receiver runs on loopback, which the webhook refuses unless told otherwise
    return {"urls": [receiver.url], "secret": SECRET, "allow_private_addresses": True, "backoff": 0.01,
            "timeout": 2, **extra}
