from __future__ import annotations

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
    (b"[1, 2]", "body must be a JSON object, not list", None),
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
