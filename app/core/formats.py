"""How a relayed stream is written to a client: the OpenAI wire format, or plain text.

The relay decides what happens (forward, cut at the quota, fail, finish) and counts
what was delivered; a format only decides the bytes. `OpenAIFormat` forwards the
upstream's own bytes untouched; `ContentFormat` writes `data: {"content": "..."}`
events (Navi's chat).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Protocol

from app.core.errors import ApiError
from app.core.metering import Usage
from app.core.providers import StreamChunk

SSE_DONE = b"data: [DONE]\n\n"


def sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class StreamFormat(Protocol):
    def encode(self, chunks: Sequence[StreamChunk]) -> bytes:
        """The bytes for upstream chunks (those of one read: one write to the client)."""

    def cut(self, meta: dict[str, Any], usage: Usage) -> list[bytes]:
        """The clean end of a stream cut at the quota."""

    def error(self, exc: ApiError) -> bytes:
        """A failure after the stream started (no status code can say it any more)."""

    def finish(
        self, meta: dict[str, Any], counted: Usage, upstream_usage: Usage | None
    ) -> list[bytes]:
        """The end of a stream the upstream completed."""


class OpenAIFormat:
    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage

    def encode(self, chunks: Sequence[StreamChunk]) -> bytes:
        # The usage chunk: we asked for it; the client may not have. One whose usage is
        # not believed goes to no one: the client gets the count billed, at the end.
        data = [
            c.data
            for c in chunks
            if not c.usage_only or (self.include_usage and c.usage is not None)
        ]
        # One join for the whole read: the upstream's bytes, framed again as they came.
        return b"data: " + b"\n\ndata: ".join(data) + b"\n\n" if data else b""

    def cut(self, meta: dict[str, Any], usage: Usage) -> list[bytes]:
        out = [
            sse(_dumps(_chunk_event(meta, [{"index": 0, "delta": {}, "finish_reason": "length"}])))
        ]
        if self.include_usage:
            out.append(sse(_dumps(_usage_event(meta, usage))))
        out.append(SSE_DONE)
        return out

    def error(self, exc: ApiError) -> bytes:
        return sse(
            _dumps({"error": {"message": exc.message, "type": exc.openai_type, "code": exc.code}})
        )

    def finish(
        self, meta: dict[str, Any], counted: Usage, upstream_usage: Usage | None
    ) -> list[bytes]:
        if self.include_usage and upstream_usage is None:
            return [sse(_dumps(_usage_event(meta, counted))), SSE_DONE]
        return [SSE_DONE]


class ContentFormat:
    """`data: {"content": "..."}` per delta, then `data: [DONE]`."""

    def encode(self, chunks: Sequence[StreamChunk]) -> bytes:
        return b"".join([sse(_dumps({"content": c.text})) for c in chunks if c.text])

    def cut(self, meta: dict[str, Any], usage: Usage) -> list[bytes]:
        return [SSE_DONE]

    def error(self, exc: ApiError) -> bytes:
        return sse(_dumps({"error": {"code": "INTERNAL_ERROR", "message": exc.message}}))

    def finish(
        self, meta: dict[str, Any], counted: Usage, upstream_usage: Usage | None
    ) -> list[bytes]:
        return [SSE_DONE]


def _chunk_event(meta: dict[str, Any], choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": meta.get("id", ""),
        "object": "chat.completion.chunk",
        "created": meta.get("created", int(time.time())),
        "model": meta.get("model", ""),
        "choices": choices,
    }


def _usage_object(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _usage_event(meta: dict[str, Any], usage: Usage) -> dict[str, Any]:
    return {**_chunk_event(meta, []), "usage": _usage_object(usage)}


def with_usage(answer: bytes, usage: Usage) -> bytes:
    """A whole answer's body carrying `usage`, the count billed, in place of what the
    upstream sent for it (nothing, or counts not believed).

    Only for such answers: any other is forwarded as the upstream's bytes. One that
    cannot be encoded again (nested past the standard library's reach, say) is
    forwarded as it came, billed all the same.
    """
    try:
        body = json.loads(answer)
        body["usage"] = _usage_object(usage)
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return answer
