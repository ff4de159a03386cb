"""Reading upstream SSE streams: event framing and the metering facts of each chunk."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from app.core.config import ProviderConfig
from app.core.errors import UpstreamError
from app.core.providers import MAX_TOKEN_COUNT, OpenAIProvider, iter_sse_batches, parse_chunk
from app.core.upstream_transport import AiohttpTransport
from tests.fake_upstream import FakeUpstream


async def reads(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def batches(*parts: bytes, limit: int = 1 << 20) -> list[list[bytes]]:
    return [batch async for batch in iter_sse_batches(reads(*parts), limit)]


async def test_events_split_anywhere_across_reads_come_out_whole() -> None:
    stream = b'data: {"a":1}\n\ndata: {"b":2}\r\n\r\n: a comment\n\nevent: x\ndata:[DONE]\n\n'
    whole = await batches(stream)
    assert whole == [[b'{"a":1}', b'{"b":2}', b"[DONE]"]]
    for cut in range(1, len(stream)):
        split = await batches(stream[:cut], stream[cut:])
        assert [event for batch in split for event in batch] == whole[0], cut


async def test_events_read_a_byte_at_a_time_come_out_whole() -> None:
    stream = (
        b'data: {"a":1}\n\ndata: {"b":2}\r\n\r\n: a comment\n\ndata: x\r\ndata: y\n\r\n'
        b"data: [DONE]\n\ndata: tail\r\n"
    )
    split = await batches(*(stream[i : i + 1] for i in range(len(stream))))
    assert split == [[b'{"a":1}'], [b'{"b":2}'], [b"x\ny"], [b"[DONE]"], [b"tail"]]


@pytest.mark.parametrize("reads", [1, 3, 40], ids=["in-one-read", "in-3-reads", "in-40-reads"])
async def test_an_event_past_the_limit_is_an_upstream_error(reads: int) -> None:
    event = b"data: " + b"a" * 4000
    size = -(-len(event) // reads)
    parts = [b"data: 1\n\n"] + [event[i : i + size] for i in range(0, len(event), size)]
    with pytest.raises(UpstreamError, match=r"^provider sent an event over 3000 bytes$"):
        await batches(*parts, limit=3000)
    with pytest.raises(UpstreamError, match=r"^provider sent an event over 3000 bytes$"):
        await batches(*parts, b"\n\n", limit=3000)  # ended, in the read that ends it
    # At the limit, the event comes out whole.
    assert await batches(*parts, b"\n\n", limit=len(event)) == [[b"1"], [b"a" * 4000]]


async def test_an_event_that_never_ends_is_refused_while_it_comes() -> None:
    async def endless() -> AsyncIterator[bytes]:
        yield b"data: "
        while True:
            yield b"a" * 100

    async with asyncio.timeout(10):
        with pytest.raises(UpstreamError):
            async for _ in iter_sse_batches(endless(), 1000):
                pass


@pytest.mark.parametrize("size", [None, 10, 1], ids=["one-read", "10-byte-reads", "bytewise"])
async def test_the_event_size_limit_counts_crlfs_as_lfs_however_the_event_is_split(
    size: int | None,
) -> None:
    stream = b"data: x\r\n" * 100 + b"\r\n"
    length = len(b"data: x\n" * 100) - 1  # the event read as LF, without its end
    parts = [stream] if size is None else [stream[i : i + size] for i in range(0, 902, size)]
    [[data]] = await batches(*parts, limit=length)
    assert data == b"\n".join([b"x"] * 100)
    with pytest.raises(UpstreamError):
        await batches(*parts, limit=length - 1)


async def test_one_batch_per_read_that_completed_events() -> None:
    assert await batches(b"data: 1\n\ndata: 2\n\nda", b"ta: 3\n", b"\n") == [
        [b"1", b"2"],
        [b"3"],
    ]


async def test_multi_line_data_is_joined_and_an_unterminated_last_event_is_kept() -> None:
    assert await batches(b"data: line one\ndata: line two\n\ndata: tail\n") == [
        [b"line one\nline two"],
        [b"tail"],
    ]


def test_a_content_delta_counts_one_token_and_keeps_the_upstream_bytes() -> None:
    data = (
        b'{"id":"c1","created":7,"model":"m","choices":[{"index":0,'
        b'"delta":{"content":"Hi"},"finish_reason":null}]}'
    )
    chunk = parse_chunk(data)
    assert chunk.data is data
    assert (chunk.tokens, chunk.text, chunk.finish_reason) == (1, "Hi", None)
    assert chunk.meta == {"id": "c1", "created": 7, "model": "m"}
    assert not chunk.usage_only


def test_the_usage_chunk_carries_the_upstream_counts() -> None:
    chunk = parse_chunk(b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}')
    assert chunk.usage_only and chunk.tokens == 0
    assert chunk.usage is not None
    assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (5, 9)


@pytest.mark.parametrize(
    "count", [-1, -100, 1.5, True, "5", None, 2**31, 2**64], ids=lambda c: repr(c)
)
@pytest.mark.parametrize("field", ["prompt_tokens", "completion_tokens"])
def test_a_usage_with_a_count_that_is_no_token_count_is_not_believed(
    field: str, count: object
) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 9, field: count}
    # json, not orjson: the latter refuses integers past 64 bits, as an upstream may not.
    chunk = parse_chunk(json.dumps({"choices": [], "usage": usage}).encode())
    assert chunk.usage_only and chunk.usage is None


def test_the_largest_token_count_believed() -> None:
    usage = {"prompt_tokens": 0, "completion_tokens": MAX_TOKEN_COUNT}
    chunk = parse_chunk(orjson.dumps({"choices": [], "usage": usage}))
    assert chunk.usage is not None
    assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (0, MAX_TOKEN_COUNT)


@pytest.mark.parametrize(
    ("delta", "tokens"),
    [
        ({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}, 1),
        ({"reasoning_content": "hm"}, 1),
        ({"refusal": "no"}, 1),
        ({"role": "assistant"}, 0),
        ({"content": ""}, 0),
        ({"content": [{"type": "text", "text": "Hi"}]}, 1),  # parts: a token, no text
        (None, 0),
    ],
)
def test_what_a_delta_counts(delta: object, tokens: int) -> None:
    event = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "system_fingerprint": "fp",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
    }
    chunk = parse_chunk(orjson.dumps(event))
    assert (chunk.tokens, chunk.text, chunk.finish_reason) == (tokens, "", None)


def test_every_choice_counts_and_the_last_finish_reason_wins() -> None:
    chunk = parse_chunk(
        b'{"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"},'
        b'{"index":1,"delta":{"content":"b"},"finish_reason":"length"}]}'
    )
    assert (chunk.tokens, chunk.text, chunk.finish_reason) == (2, "a", "length")


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b"[1,2]",
        b'{"error":{"message":"boom"}}',
        b'{"error":null}',
        b'{"choices":5}',
        b'{"choices":[5]}',
        b'{"choices":[{"delta":"text"}]}',
        b'{"choices":[{"delta":{},"finish_reason":7}]}',
    ],
)
def test_malformed_or_error_events_are_upstream_errors(data: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_chunk(data)


@pytest.mark.parametrize("read", ["to its end", "in part"])
async def test_a_stream_closes_its_own_readers(fake_upstream: FakeUpstream, read: str) -> None:
    """Whether read to `[DONE]` or closed mid-way, a stream leaves no async generator
    half-read: the event loop would close each later with a task of its own."""
    firstiter, finalizer = sys.get_asyncgen_hooks()
    left_to_the_loop: list[str] = []

    def finalize(agen: Any) -> None:
        left_to_the_loop.append(agen.__qualname__)
        if finalizer is not None:
            finalizer(agen)

    # Hooks are taken by each generator when first iterated: set before the stream.
    sys.set_asyncgen_hooks(firstiter, finalize)
    transport = AiohttpTransport(httpx.Limits(max_connections=2))
    try:
        config = ProviderConfig(name="fake", base_url=fake_upstream.base_url, models=["m"])
        provider = OpenAIProvider(config, transport)
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        stream = await provider.open_stream(body)
        events = aiter(stream)
        tokens = 0
        async for batch in events:
            tokens += sum(chunk.tokens for chunk in batch)
            if read == "in part":
                break
        await events.aclose()  # type: ignore[attr-defined]
        await stream.aclose()
        del events, stream
        gc.collect()
    finally:
        sys.set_asyncgen_hooks(firstiter, finalizer)
        await transport.aclose()
    assert tokens >= 1
    assert left_to_the_loop == []
