"""The metadata store contract, written once and run against every meta store type (file, redis).

What core relies on (``sqapi.core.contracts.MetaStore``, ``sqapi/connectors/meta/__init__.py``):
``fetch(meta_location)`` gives the JSON object stored there as a dict; a missing reference is
``NotFound`` (retried); JSON that is no object, or text that is no JSON, is a ``PermanentError``
(never retried); a reference never reaches metadata outside the store; a backend that does not
answer is a ``ConnectorError`` (retried) that shows no secret.  The store is always the one
``sqapi.app.build`` makes.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from sqapi.app import Sqapi
from sqapi.core.outcome import Action, Delivery
from sqapi.errors import AccessDenied, ConnectorError, NotFound, PermanentError, is_retryable
from tests.contracts.conftest import SECRET, MetaBackend

METADATA = {"title": "Report ü", "pages": 3, "tags": ["a", "b"], "nested": {"ok": True}, "none": None}

#: references awkward in paths and keys: each must name exactly that metadata in every store
AWKWARD_REFERENCES = ["a name with spaces.json", "ünïcødé/名前 ü.json", "100% sure.json", "50%20off.json",
                      "what?#&=.json"]


def message(data_location: str, meta_location: str) -> dict[str, Any]:
    return {"uuid_ref": str(uuid.uuid4()), "data_location": data_location, "meta_location": meta_location}


def test_an_existing_json_object_is_fetched_as_the_same_dict(
        meta_backend: MetaBackend, meta_app: Callable[..., Sqapi]) -> None:
    reference = meta_backend.put("doc/1.json", json.dumps(METADATA))
    assert meta_app(meta_backend.section()).meta_store.fetch(reference) == METADATA


@pytest.mark.parametrize("reference", AWKWARD_REFERENCES)
def test_a_reference_with_spaces_unicode_or_percent_signs_names_exactly_that_metadata(
        meta_backend: MetaBackend, meta_app: Callable[..., Sqapi], reference: str) -> None:
    meta_backend.put(reference, json.dumps({"name": reference}))
    meta_backend.put("50 off.json", json.dumps({"name": "what %20 would decode to"}))
    assert meta_app(meta_backend.section()).meta_store.fetch(reference) == {"name": reference}


def test_a_message_with_a_meta_location_is_processed_with_that_metadata(
        meta_backend: MetaBackend, meta_app: Callable[..., Sqapi], write_data: Callable[[str, str], str]) -> None:
    body = message(write_data("doc.txt", "text"), meta_backend.put("doc.json", json.dumps(METADATA)))
    app = meta_app(meta_backend.section())
    assert app.process(body, Delivery("d1")).status == "DONE"


# -- missing metadata: retried --------------------------------------------------------------------

def test_a_missing_reference_is_not_found_a_lookup_error_that_core_retries(
        meta_backend: MetaBackend, meta_app: Callable[..., Sqapi]) -> None:
    with pytest.raises(NotFound) as missing:
        meta_app(meta_backend.section()).meta_store.fetch("not-there-yet.json")
    assert isinstance(missing.value, LookupError) and is_retryable(missing.value)
    assert "not-there-yet.json" in str(missing.value)


def test_a_message_whose_metadata_is_missing_is_retried_not_failed(
        meta_backend: MetaBackend, meta_app: Callable[..., Sqapi], write_data: Callable[[str, str], str]) -> None:
    app = meta_app(meta_backend.section())
    outcome = app.process(message(write_data("doc.txt", "text"), "arrives-later.json"), Delivery("d1"))
    assert (outcome.status, outcome.action) == ("RETRY", Action.RETRY)
    assert "arrives-later.json" in str(outcome.reason)


def test_metadata_that_arrives_after_a_miss_is_fetched_by_the_same_store(
        meta_backend: MetaBackend, meta_app: Callable[..., Sqapi]) -> None:
    store = meta_app(meta_backend.section()).meta_store
    with pytest.raises(NotFound):
        store.fetch("late.json")
    assert store.fetch(meta_backend.put("late.json", '{"late": true}')) == {"late": True}


# -- what is no JSON object: failed at once -------------------------------------------------------

@pytest.mark.parametrize("stored", ["[1, 2]", '"a string"', "3", "null", "true"])
def test_json_that_is_not_an_object_is_a_permanent_error(
        meta_backend: MetaBackend, meta_app: Callable[..., Sqapi], stored: str) -> None:
    reference = meta_backend.put("odd.json", stored)
    with pytest.raises(PermanentError) as refused:
        meta_app(meta_backend.section()).meta_store.fetch(reference)
    assert "odd.json" in str(refused.value) and "not an object" in str(refused.value)
    assert not is_retryable(refused.value)


@pytest.mark.parametrize("stored", ["{", "not json at all", ""])
def test_text_that_is_not_json_is_a_permanent_error(
        meta_backend: MetaBackend, meta_app: Callable[..., Sqapi], stored: str) -> None:
    reference = meta_backend.put("broken.json", stored)
    with pytest.raises(PermanentError) as refused:
        meta_app(meta_backend.section()).meta_store.fetch(reference)
    assert "broken.json" in str(refused.value) and "not valid JSON" in str(refused.value)
    assert not is_retryable(refused.value)


def test_a_message_whose_metadata_is_not_an_object_fails_at_once(
        meta_backend: MetaBackend, meta_app: Callable[..., Sqapi], write_data: Callable[[str, str], str]) -> None:
    body = message(write_data("doc.txt", "text"), meta_backend.put("list.json", "[1, 2]"))
    outcome = meta_app(meta_backend.section()).process(body, Delivery("d1"))
    assert (outcome.status, outcome.action) == ("FAILED", Action.DEAD_LETTER)


# -- references that try to escape ----------------------------------------------------------------

def test_a_reference_never_reaches_metadata_outside_the_store(
        meta_backend: MetaBackend, meta_app: Callable[..., Sqapi]) -> None:
    references = meta_backend.put_outside('{"outside": true}')
    store = meta_app(meta_backend.section()).meta_store
    for reference in references:
        try:
            found = store.fetch(reference)
        except AccessDenied as refused:  # a path store refuses it, naming it
            assert reference in str(refused) and not is_retryable(refused)
        except NotFound:  # a key store looks it up inside its own key space, where it is not
            pass
        else:
            pytest.fail(f"{reference!r} fetched {found!r}")


# -- a backend that does not answer: retried, no secret shown -------------------------------------

def test_an_unreachable_backend_is_a_connector_error_that_shows_no_secret(
        meta_backend: MetaBackend, meta_app: Callable[..., Sqapi], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = meta_app(meta_backend.unreachable_section()).meta_store
    with pytest.raises(ConnectorError) as down:
        store.fetch("doc.json")
    with pytest.raises(ConnectorError) as ping_down:  # what /health and `sqapi check` ask
        store.ping()
    for error in (down.value, ping_down.value):
        assert is_retryable(error) and str(error).strip()
        assert SECRET not in f"{error} {error!r}"
    assert SECRET not in caplog.text


def test_ping_passes_when_the_backend_answers(meta_backend: MetaBackend, meta_app: Callable[..., Sqapi]) -> None:
    meta_app(meta_backend.section()).meta_store.ping()
