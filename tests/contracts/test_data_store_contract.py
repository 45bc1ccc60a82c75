"""The data store contract, written once and run against every data store type (disk, http, swift).

What core relies on (``sqapi.core.contracts.DataStore``, ``sqapi/connectors/data/__init__.py``):
``fetch(data_location)`` gives a :class:`~sqapi.core.contracts.LocalCopy` with the object's exact
bytes -- a temporary file under ``processing.temp_dir`` that ``release()`` deletes, streamed, or
the original file that ``release()`` leaves alone; a missing object is ``NotFound`` (retried); a
reference that climbs out of the store is ``AccessDenied`` (never retried); a backend that does not
answer is a ``ConnectorError`` (retried) that shows no secret.  ``sqapi publish --upload`` puts a file
in and its answer fetches it back.  The store is always the one ``sqapi.app.build`` makes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest

from sqapi.app import Sqapi
from sqapi.core.outcome import Action, Delivery
from sqapi.errors import AccessDenied, ConnectorError, NotFound, is_retryable
from tests.contracts.conftest import DATA_TYPES, SECRET, DataBackend

MiB = 1024 * 1024

#: object names that are awkward in paths and URLs: each must name exactly that object in every store
AWKWARD_NAMES = ["a name with spaces.bin", "ünïcødé/名前 ü.bin", "100% sure.bin", "50%20off.bin", "what?#&=.bin"]

UPLOADING_TYPES = ["disk", "swift"]   # the types whose module offers upload() (docs/publishing.md)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def message(data_location: str) -> dict[str, Any]:
    return {"uuid_ref": str(uuid.uuid4()), "data_location": data_location}


def publish_upload(app: Sqapi, local: Path, object_ref: str) -> str:
    """What ``sqapi publish --upload`` does with a file: the data_location it publishes."""
    from sqapi.cli.messages import upload_to_data_store

    return upload_to_data_store(app.config, local, object_ref)


# -- fetching -------------------------------------------------------------------------------------

def test_an_existing_object_is_fetched_with_identical_bytes(
        data_backend: DataBackend, data_app: Callable[..., Sqapi]) -> None:
    content = os.urandom(100_000)
    location = data_backend.put("dir/object.bin", content)
    store = data_app(data_backend.section()).data_store
    local = store.fetch(location)
    try:
        assert Path(local.path).read_bytes() == content
    finally:
        local.release()


def test_a_large_object_is_streamed_to_a_temp_file_under_temp_dir_that_release_removes(
        data_backend: DataBackend, data_app: Callable[..., Sqapi], temp_dir: Path) -> None:
    content = os.urandom(8 * MiB + 17)
    location = data_backend.put("large.bin", content)
    store = data_app(data_backend.section()).data_store
    tracemalloc.start()
    try:
        local = store.fetch(location)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sha256(local.path) == hashlib.sha256(content).hexdigest()
    assert peak < len(content) // 2, f"fetching peaked at {peak} bytes of Python memory: not streamed"
    if local.temporary:  # a copy of a remote object: under processing.temp_dir, gone once released
        assert Path(local.path).parent == temp_dir
        local.release()
        assert not Path(local.path).exists() and list(temp_dir.iterdir()) == []
        local.release()  # twice is harmless
    else:  # the disk store hands out the original: it is read in place and never deleted
        assert list(temp_dir.iterdir()) == []
        local.release()
        assert Path(local.path).read_bytes() == content


def test_each_fetch_has_its_own_local_copy_so_one_release_leaves_the_other_readable(
        data_backend: DataBackend, data_app: Callable[..., Sqapi]) -> None:
    location = data_backend.put("shared.bin", b"read by two messages at once")
    store = data_app(data_backend.section()).data_store
    first, second = store.fetch(location), store.fetch(location)
    first.release()
    try:
        assert Path(second.path).read_bytes() == b"read by two messages at once"
    finally:
        second.release()


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_a_name_with_spaces_unicode_or_percent_signs_fetches_the_object_of_exactly_that_name(
        data_backend: DataBackend, data_app: Callable[..., Sqapi], name: str) -> None:
    location = data_backend.put(name, name.encode())
    data_backend.put("50 off.bin", b"the name %20 would decode to")  # a store that decodes %20 finds this one
    local = data_app(data_backend.section()).data_store.fetch(location)
    try:
        assert Path(local.path).read_bytes() == name.encode()
    finally:
        local.release()


def test_a_message_for_an_existing_object_is_done_with_the_sha256_of_its_bytes(
        data_backend: DataBackend, data_app: Callable[..., Sqapi], temp_dir: Path) -> None:
    content = os.urandom(50_000)
    body = message(data_backend.put("done.bin", content))
    app = data_app(data_backend.section())
    assert app.process(body, Delivery("d1")).status == "DONE"
    rows = app.database.execute_query("SELECT hash_digest FROM messages WHERE uuid = %(uuid)s", uuid=body["uuid_ref"])
    assert rows == [{"hash_digest": hashlib.sha256(content).hexdigest()}]
    assert list(temp_dir.iterdir()) == []  # the processor released its copy


# -- missing objects: retried ---------------------------------------------------------------------

def test_a_missing_object_is_not_found_a_lookup_error_that_core_retries(
        data_backend: DataBackend, data_app: Callable[..., Sqapi], temp_dir: Path) -> None:
    store = data_app(data_backend.section()).data_store
    with pytest.raises(NotFound) as missing:
        store.fetch("not-there-yet.bin")
    assert isinstance(missing.value, LookupError) and is_retryable(missing.value)
    assert "not-there-yet.bin" in str(missing.value)
    assert list(temp_dir.iterdir()) == []


def test_a_message_whose_data_is_missing_is_retried_not_failed(
        data_backend: DataBackend, data_app: Callable[..., Sqapi]) -> None:
    app = data_app(data_backend.section())
    outcome = app.process(message("arrives-later.bin"), Delivery("d1"))
    assert (outcome.status, outcome.action) == ("RETRY", Action.RETRY)
    assert "arrives-later.bin" in str(outcome.reason)


def test_an_object_that_arrives_after_a_miss_is_fetched_by_the_same_store(
        data_backend: DataBackend, data_app: Callable[..., Sqapi]) -> None:
    store = data_app(data_backend.section()).data_store
    with pytest.raises(NotFound):
        store.fetch("late.bin")
    local = store.fetch(data_backend.put("late.bin", b"arrived"))
    try:
        assert Path(local.path).read_bytes() == b"arrived"
    finally:
        local.release()


# -- references that try to escape: refused, never retried ---------------------------------------

def test_a_reference_that_climbs_out_with_dot_dot_is_refused_with_a_clear_error(
        data_backend: DataBackend, data_app: Callable[..., Sqapi]) -> None:
    outside = data_backend.put_outside(b"outside the store")
    store = data_app(data_backend.section()).data_store
    for reference in outside.climbing:
        with pytest.raises(AccessDenied) as refused:
            local = store.fetch(reference)
            local.release()
        assert reference in str(refused.value), f"the refusal should name the reference: {refused.value}"
        assert not is_retryable(refused.value)


def test_an_absolute_or_percent_encoded_reference_never_reaches_outside_the_store(
        data_backend: DataBackend, data_app: Callable[..., Sqapi]) -> None:
    outside = data_backend.put_outside(b"outside the store")
    store = data_app(data_backend.section()).data_store
    for reference in outside.other:
        try:
            local = store.fetch(reference)
        except (AccessDenied, NotFound):
            continue  # refused, or looked up inside the store where no such object is
        content = Path(local.path).read_bytes()
        local.release()
        pytest.fail(f"{reference!r} fetched {content!r}")


def test_a_message_whose_data_location_climbs_out_fails_at_once(
        data_backend: DataBackend, data_app: Callable[..., Sqapi]) -> None:
    climbing = data_backend.put_outside(b"outside the store").climbing[0]
    outcome = data_app(data_backend.section()).process(message(climbing), Delivery("d1"))
    assert (outcome.status, outcome.action) == ("FAILED", Action.DEAD_LETTER)


# -- a backend that does not answer: retried, no secret shown -------------------------------------

def test_an_unreachable_backend_is_a_connector_error_that_shows_no_secret(
        data_backend: DataBackend, data_app: Callable[..., Sqapi], temp_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = data_app(data_backend.unreachable_section()).data_store
    with pytest.raises(ConnectorError) as down:
        store.fetch("object.bin")
    errors: list[BaseException] = [down.value]
    if data_backend.pings:  # /health and `sqapi check` ask ping()
        with pytest.raises(ConnectorError) as ping_down:
            store.ping()
        errors.append(ping_down.value)
    for error in errors:
        assert is_retryable(error) and str(error).strip()
        assert SECRET not in f"{error} {error!r}"
    assert SECRET not in caplog.text
    assert list(temp_dir.iterdir()) == []


def test_ping_passes_when_the_backend_answers(data_backend: DataBackend, data_app: Callable[..., Sqapi]) -> None:
    data_app(data_backend.section()).data_store.ping()


# -- sqapi publish --upload (a type may offer upload(); disk and swift do) -------------------------

@pytest.fixture(params=UPLOADING_TYPES)
def uploading_backend(request: pytest.FixtureRequest) -> DataBackend:
    backend: DataBackend = request.getfixturevalue(f"{request.param}_data_backend")
    return backend


@pytest.fixture(params=[kind for kind in DATA_TYPES if kind not in UPLOADING_TYPES])
def non_uploading_backend(request: pytest.FixtureRequest) -> DataBackend:
    backend: DataBackend = request.getfixturevalue(f"{request.param}_data_backend")
    return backend


@pytest.mark.parametrize("name", ["report.bin", "uploads/ünï cødé 100%.bin"])
def test_a_file_put_in_by_publish_upload_is_fetched_back_by_the_location_it_returns(
        uploading_backend: DataBackend, data_app: Callable[..., Sqapi], tmp_path: Path, name: str) -> None:
    source = tmp_path / "to upload.bin"
    source.write_bytes(os.urandom(300_000))
    app = data_app(uploading_backend.section())
    local = app.data_store.fetch(publish_upload(app, source, name))
    try:
        assert sha256(local.path) == sha256(source)
    finally:
        local.release()


def test_an_upload_that_climbs_out_of_the_store_is_refused(
        uploading_backend: DataBackend, data_app: Callable[..., Sqapi], tmp_path: Path) -> None:
    source = tmp_path / "to upload.bin"
    source.write_bytes(b"must not land outside")
    app = data_app(uploading_backend.section())
    for reference in ("../escaped.bin", "in/../../escaped.bin"):
        with pytest.raises(click.ClickException, match=r"upload failed: .*(refused|outside)") as refused:
            publish_upload(app, source, reference)
        assert reference in refused.value.message


def test_publish_upload_says_plainly_that_a_type_without_upload_takes_no_files(
        non_uploading_backend: DataBackend, data_app: Callable[..., Sqapi], tmp_path: Path) -> None:
    source = tmp_path / "to upload.bin"
    source.write_bytes(b"x")
    app = data_app(non_uploading_backend.section())
    with pytest.raises(click.ClickException, match=f"--upload is not supported for data_store type "
                                                    f"'{non_uploading_backend.kind}'"):
        publish_upload(app, source, "x.bin")
