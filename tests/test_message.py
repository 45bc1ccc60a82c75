from __future__ import annotations

import json

import pytest

from sqapi.core.message import MessageParser
from sqapi.errors import MessageError

DEFAULT = MessageParser({})


def test_a_json_body_in_sqapi_format_gives_every_logical_field() -> None:
    message = DEFAULT.parse(b'{"uuid_ref": "u1", "data_location": "a/b.txt", "meta_location": "m1", '
                            b'"data_type": "text/plain", "metadata": {"k": 1}, "extra": true}', "d1")
    assert (message.id, message.uuid, message.data_location, message.meta_location, message.type) == \
        ("d1", "u1", "a/b.txt", "m1", "text/plain")
    assert message.metadata == {"k": 1}
    assert message.body["extra"] is True
    assert message.hash_digest is None and message.results == {}


def test_body_keys_match_case_insensitively() -> None:
    message = DEFAULT.parse('{"UUID_REF": "u2", "Data_Location": "x"}', "d")
    assert (message.uuid, message.data_location) == ("u2", "x")


def test_message_fields_map_logical_fields_to_other_keys() -> None:
    parser = MessageParser({"message_fields": {"uuid": {"key": "id", "required": True},
                                               "data_location": {"key": "path"},
                                               "type": "mime"}})
    message = parser.parse('{"id": "u3", "path": "p", "mime": "image/png"}', "d")
    assert (message.uuid, message.data_location, message.type) == ("u3", "p", "image/png")


def test_metadata_may_be_a_json_string() -> None:
    message = DEFAULT.parse({"uuid_ref": "u", "data_location": "x", "metadata": '{"a": [1, 2]}'}, "d")
    assert message.metadata == {"a": [1, 2]}


def test_a_delimited_string_body_is_parsed_by_its_format() -> None:
    parser = MessageParser({"parser": {"type": "string", "format": "uuid;data_location;metadata",
                                       "delimiter": ";"}})
    message = parser.parse(b'u4;dir/file.bin;{"x": "a;b"}', "d")
    assert (message.uuid, message.data_location, message.metadata) == ("u4", "dir/file.bin", {"x": "a;b"})


@pytest.mark.parametrize(("raw", "reason", "uuid"), [
    (b"{nope", "body is not valid JSON", None),
    (b"[1, 2]", "body must be a JSON object, not a list", None),
    (b"\xff\xfe", "body is not UTF-8", None),
    (b'{"data_location": "x"}', "missing required field: uuid_ref", None),
    (b'{"uuid_ref": "u5"}', "missing required field: data_location", "u5"),
    (b'{"other": 1}', "missing required fields: uuid_ref, data_location", None),
    (b'{"uuid_ref": "u6", "data_location": "x", "metadata": "{bad"}', "metadata is not valid JSON", "u6"),
    (b'{"uuid_ref": "u7", "data_location": "x", "metadata": [1]}', "metadata must be a JSON object", "u7"),
    (b'{"uuid_ref": "u8", "data_location": 5}', "data_location must be a string", "u8"),
])
def test_a_bad_message_is_refused_with_a_reason_naming_the_problem(raw: bytes, reason: str, uuid: str | None) -> None:
    with pytest.raises(MessageError) as info:
        DEFAULT.parse(raw, "d")
    assert reason in str(info.value)
    assert info.value.uuid == uuid


def test_plugins_get_a_copy_that_does_not_share_state() -> None:
    message = DEFAULT.parse({"uuid_ref": "u", "data_location": "x", "metadata": {"a": {"b": 1}}}, "d")
    clone = message.copy()
    clone.metadata["a"]["b"] = 2  # type: ignore[index]
    assert message.metadata == {"a": {"b": 1}}
    assert clone.uuid_ref == "u" and clone.data_type is None


# -- identity: strict, never a delivery id ------------------------------------------------------------
@pytest.mark.parametrize("value, kind", [({"id": 0}, "an object"), ([0], "a list"), (True, "true or false"),
                                         (1.5, "a number with a fraction"), (None, None)])
def test_a_uuid_that_is_not_a_string_or_a_whole_number_is_refused(value: object, kind: str | None) -> None:
    body = json.dumps({"uuid_ref": value, "data_location": "x"}).encode()
    with pytest.raises(MessageError) as info:
        DEFAULT.parse(body, "queue#1")
    expected = f"uuid_ref must be a string or a whole number, not {kind}" if kind else \
        "missing required field: uuid_ref"
    assert str(info.value) == expected and info.value.uuid is None


def test_a_whole_number_uuid_is_written_in_decimal_and_blanks_are_stripped() -> None:
    assert DEFAULT.parse(b'{"uuid_ref": 42, "data_location": "x"}', "d").uuid == "42"
    assert DEFAULT.parse(b'{"uuid_ref": "  u-1 ", "data_location": "x"}', "d").uuid == "u-1"


def test_a_blank_uuid_is_refused_never_replaced_by_the_delivery_id() -> None:
    for blank in ("   ", "\t\n"):
        with pytest.raises(MessageError, match="uuid_ref is blank"):
            DEFAULT.parse(json.dumps({"uuid_ref": blank, "data_location": "x"}).encode(), "queue#7")


def test_an_optional_uuid_that_is_absent_comes_from_the_body_so_two_bodies_never_share_one() -> None:
    parser = MessageParser({"message_fields": {"uuid": {"key": "uuid_ref", "required": False}}})
    first = parser.parse(b'{"data_location": "a"}', "queue#1")
    second = parser.parse(b'{"data_location": "b"}', "queue#1")  # the same delivery tag on another channel
    again = parser.parse(b'{ "data_location" : "a" }', "queue#9")
    assert first.uuid.startswith("sha256:") and first.uuid != second.uuid and first.uuid == again.uuid


# -- bodies no database could store, or too large ------------------------------------------------------
@pytest.mark.parametrize("raw, reason", [
    (b'{"uuid_ref": "u", "data_location": "x", "m": ' + b"[" * 10000 + b"]" * 10000 + b"}",
     "body nests deeper than 64 levels"),
    (b'{"uuid_ref": "u", "data_location": "x", "m": ' + b"[" * 100 + b"]" * 100 + b"}",
     "body nests deeper than 64 levels"),
    (b'{"uuid_ref": "u", "data_location": "x", "note": "\\ud800"}', "body holds a lone UTF-16 surrogate"),
    (b'{"uuid_ref": "u", "data_location": "x", "\\ud800": 1}', "body holds a lone UTF-16 surrogate"),
    (b'{"uuid_ref": "u", "data_location": "x", "metadata": {"k": "a\\u0000b"}}', "body holds a NUL character"),
    (b'{"uuid_ref": "u", "data_location": "' + b"d" * 5000 + b'"}', "data_location is 5000 characters long"),
    (b'"just a string"', "body must be a JSON object, not a string"),
    (b"null", "body must be a JSON object, not null"),
])
def test_a_body_no_database_could_store_is_refused_on_its_first_delivery(raw: bytes, reason: str) -> None:
    with pytest.raises(MessageError) as info:
        DEFAULT.parse(raw, "d")
    assert str(info.value).startswith(reason)
    assert len(str(info.value)) < 200  # the reason never quotes the value


def test_a_body_over_max_body_bytes_is_refused_unparsed() -> None:
    parser = MessageParser({"max_body_bytes": 1000})
    big = json.dumps({"uuid_ref": "u", "data_location": "x" * 2000}).encode()
    with pytest.raises(MessageError, match=r"body is larger than msg_broker.max_body_bytes \(1000 bytes\)"):
        parser.parse(big, "d")
    assert parser.parse(b'{"uuid_ref": "u", "data_location": "x"}', "d").uuid == "u"
