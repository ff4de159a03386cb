"""`parse_json`: the JSON a request body may hold, read as `json.loads` reads bytes."""

from __future__ import annotations

import json

import pytest

from app.core.errors import BadRequest
from app.core.strict_json import MAX_DEPTH, parse_json

BODY = {"model": "m", "messages": [{"role": "user", "content": "héllo ✓"}], "n": 1.5}


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
def test_bodies_in_each_encoding_json_allows_parse_alike(encoding: str) -> None:
    raw = json.dumps(BODY, ensure_ascii=False).encode(encoding)
    assert parse_json(raw) == json.loads(raw) == BODY


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"x": NaN}', "not valid JSON"),
        (b'{"x": -Infinity}', "not valid JSON"),
        (b'{"x": 1e999}', "out of range"),
        (b'{"x": "\xff"}', "not valid UTF-8"),
        (b'{"x": "\\ud800"}', "surrogate"),
        (b'{"x": "a\\u0000b"}', "NUL"),
        # The same in UTF-16 and -32, where an escape's bytes are not side by side.
        ('{"x": "\\ud800"}'.encode("utf-16-le"), "surrogate"),
        ('{"x": "a\\u0000b"}'.encode("utf-16"), "NUL"),
        ('{"x": "a\\u0000b"}'.encode("utf-32-be"), "NUL"),
        # A surrogate as raw bytes, not escaped: no valid UTF-8 or UTF-16.
        (b'{"x": "a\xed\xa0\x80"}', "not valid UTF-8"),
        (
            '{"x": "a'.encode("utf-16-le") + b"\x00\xd8" + '"}'.encode("utf-16-le"),
            "not valid UTF-16-LE",
        ),
        (b"\xef\xbb\xbf" + b'{"x": "\xff"}', "not valid UTF-8"),
        (b'{"x": ', "not valid JSON"),
        (b"[" * 100_000, "nested too deeply"),
        # Parsed, but past what encoders take again.
        (b"[" * 129 + b"]" * 129, "nested too deeply"),
        (b'{"a": ' * 129 + b"1" + b"}" * 129, "nested too deeply"),
        (b'{"x": 1, "y": ' + b"[" * 930 + b"]" * 930 + b"}", "nested too deeply"),
    ],
)
def test_what_cannot_be_encoded_again_is_the_clients_error(raw: bytes, says: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_json(raw)
    assert says in refused.value.message


def test_a_decoder_reused_across_bodies_keeps_no_state() -> None:
    assert parse_json(b'{"a": 1}') == {"a": 1}
    with pytest.raises(BadRequest):
        parse_json(b'{"a": NaN}')
    assert parse_json(b'[1.25, "\\ud83d\\ude00"]') == [1.25, "\U0001f600"]


def test_nesting_up_to_the_limit_and_brackets_in_text_are_fine() -> None:
    deepest = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert parse_json(deepest) is not None
    brackets = b'{"code": "' + b"{[" * 500 + b'", "n": [1, [2]]}'
    assert parse_json(brackets) == {"code": "{[" * 500, "n": [1, [2]]}
    assert parse_json(b'"' + b"[" * 300 + b'"') == "[" * 300
