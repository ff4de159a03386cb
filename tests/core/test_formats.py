"""`with_usage`: a whole answer told the count billed, or forwarded as it came."""

from __future__ import annotations

import json

from app.core.formats import with_usage
from app.core.metering import Usage


def test_the_usage_billed_replaces_the_upstreams_and_the_rest_stays():
    answer = json.dumps(
        {"id": "x", "choices": [{"message": {"content": "héllo"}}], "usage": {"prompt_tokens": -1}},
        ensure_ascii=False,
    ).encode()
    body = json.loads(with_usage(answer, Usage(prompt_tokens=5, completion_tokens=2)))
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert body["choices"] == [{"message": {"content": "héllo"}}] and body["id"] == "x"


def test_an_answer_that_cannot_be_encoded_again_is_forwarded_as_it_came():
    usage = Usage(prompt_tokens=5, completion_tokens=2)
    # Nested past what the standard library reads back; and a lone surrogate escape,
    # which reads but does not encode as UTF-8.
    deep = b'{"choices": [], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    surrogate = b'{"choices": [], "x": "\\ud800"}'
    for answer in (deep, surrogate):
        assert with_usage(answer, usage) == answer
