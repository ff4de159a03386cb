"""Strict JSON for request bodies."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from app.core.errors import BadRequest


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# Built once: `json.loads` with hooks builds a decoder and its scanner on every call,
# which cost more than the parse of a typical request body.
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)

# A \uD800-\uDFFF escape: only such bodies can hold a lone surrogate. Looked for in
# the decoded text: in a UTF-16 or -32 body an escape's bytes are not side by side.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


# Deeper nesting is refused: what parses must encode again, and encoders give up
# sooner than Python's parser does (orjson past 254 levels, `json.dumps` some way
# before the recursion limit that bounds the parser).
MAX_DEPTH = 128


def parse_json(body: bytes) -> Any:
    """Strict JSON: no NaN/Infinity, no overflowing numbers, no lone surrogates, no NUL,
    no nesting past `MAX_DEPTH`.

    Each of those parses in Python but cannot be encoded again (to the upstream, or
    into a database), so it is refused here as the client's error.
    """
    try:
        # As `json.loads` reads bytes: UTF-8, -16 or -32, told apart by the first bytes.
        # Strictly, unlike `json.loads`: a raw (unescaped) surrogate is no valid text.
        encoding = json.detect_encoding(body)
        text = body.decode(encoding)
        value = _DECODER.decode(text)
    except UnicodeDecodeError as exc:
        name = encoding.upper().removesuffix("-SIG")  # UTF-8-SIG: UTF-8 after a BOM
        raise BadRequest(f"request body is not valid {name}") from exc
    except RecursionError as exc:
        raise BadRequest("request body is nested too deeply") from exc
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    # Each level opens a bracket: a body with few of them cannot be deep.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise BadRequest("request body is nested too deeply")
    if _SURROGATE_ESCAPE.search(text) and _any_string(value, _lone_surrogate):
        raise BadRequest("request body contains an unpaired UTF-16 surrogate escape")
    # Valid JSON, but no text column of PostgreSQL can hold it.
    if "\\u0000" in text and _any_string(value, lambda string: "\x00" in string):
        raise BadRequest("request body contains a NUL character (\\u0000)")
    return value


def storable(text: str) -> bool:
    """Whether a text column can hold `text`: no NUL (PostgreSQL refuses it) and no lone
    surrogate (no encoding can write it). For text parsed by others, such as JWT claims."""
    return "\x00" not in text and not _lone_surrogate(text)


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _any_string(value: Any, test: Callable[[str], bool]) -> bool:
    """Whether any string in `value`, keys included, passes `test`."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if test(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels deep in `value`."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    pop, push = stack.pop, stack.append
    while stack:
        item, depth = pop()
        # Exact types (what the parser makes): half the time of isinstance checks.
        for child in item.values() if type(item) is dict else item:
            kind = type(child)
            if kind is dict or kind is list:
                if depth >= limit:
                    return True
                push((child, depth + 1))
    return False
