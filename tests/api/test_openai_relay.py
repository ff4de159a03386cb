"""The `/v1` relay through the official OpenAI SDK, to a fake upstream on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

from app.core.config import ProviderConfig
from app.core.db import create_engine
from app.core.tables import usage_logs
from tests.conftest import FAKE_MODEL, Livegate, StartLivegate
from tests.fake_upstream import MALFORMED_ANSWERS, FakeUpstream

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)


async def usage_rows(livegate: Livegate, user_id: str) -> list[sa.Row]:
    async with livegate.services.engine.connect() as conn:
        result = await conn.execute(
            sa.select(usage_logs)
            .where(usage_logs.c.user_id == user_id)
            .order_by(usage_logs.c.started_at)
        )
        return list(result)


async def wait_for_status(livegate: Livegate, user_id: str, status: str) -> sa.Row:
    for _ in range(300):
        rows = await usage_rows(livegate, user_id)
        if rows and rows[-1].status == status:
            return rows[-1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no usage row reached {status!r}: {rows}")


@pytest.fixture(params=["free", "enterprise"], ids=["limited", "unlimited"])
def tier(request: pytest.FixtureRequest) -> str:
    """A tier with limits, whose starts are written before the upstream is called, and
    one without any, whose starts are written while it is called."""
    return str(request.param)


def client(livegate: Livegate, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{livegate.base_url}/v1", api_key=key, max_retries=0)


async def refused_chat(livegate: Livegate, key: str, **extra: Any) -> openai.APIStatusError:
    """The error of a chat that must fail before any answer."""
    with pytest.raises(openai.APIStatusError) as caught:
        await client(livegate, key).chat.completions.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}], **extra
        )
    return caught.value


async def stream_until_error(
    livegate: Livegate, key: str, *, on_token: Callable[[int], None] | None = None
) -> tuple[int, openai.APIError]:
    """The content chunks a stream delivered before the error that ended it."""
    stream = await client(livegate, key).chat.completions.create(
        model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    received = 0
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
                if on_token is not None:
                    on_token(received)
    return received, caught.value


async def test_non_stream_bills_upstream_usage(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str
):
    fake_upstream.script.tokens = 7
    account = await livegate.account(tier)
    result = await client(livegate, account.api_key).chat.completions.create(
        model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert result.choices[0].message.content == "".join(fake_upstream.token(i) for i in range(7))
    assert result.usage is not None and result.usage.completion_tokens == 7
    [row] = await usage_rows(livegate, account.user.id)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("completed", 11, 7)
    assert row.provider == "fake" and row.model == FAKE_MODEL and row.stream == 0


@pytest.mark.parametrize("upstream_usage", ["missing", "not-believed"])
async def test_non_stream_without_a_believed_usage_tells_the_count_billed(
    livegate: Livegate, fake_upstream: FakeUpstream, upstream_usage: str
):
    fake_upstream.script.tokens = 6
    if upstream_usage == "missing":
        fake_upstream.script.report_usage = False
    else:
        fake_upstream.script.prompt_tokens = -1
    account = await livegate.account()
    result = await client(livegate, account.api_key).chat.completions.create(
        model=FAKE_MODEL, messages=[{"role": "user", "content": "count me"}]
    )
    assert result.choices[0].message.content == "".join(fake_upstream.token(i) for i in range(6))
    [row] = await usage_rows(livegate, account.user.id)
    assert row.status == "completed" and row.prompt_tokens > 0 and row.completion_tokens > 0
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (
        row.prompt_tokens,
        row.completion_tokens,
    )
    assert result.usage.total_tokens == row.prompt_tokens + row.completion_tokens
    assert result.id and result.model == FAKE_MODEL  # the rest of the answer as it came


async def test_a_body_past_the_fast_encoder_reaches_the_upstream_as_sent(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    # An integer past 64 bits parses, and the fast JSON encoder refuses it.
    account = await livegate.account()
    seed = 2**70 + 1
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {account.api_key}"},
            content=b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"seed":%d}'
            % (FAKE_MODEL.encode(), seed),
        )
    assert response.status_code == 200, response.text
    assert fake_upstream.requests[-1]["seed"] == seed


async def test_stream_bills_upstream_usage_and_hides_it_unless_asked(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str
):
    fake_upstream.script.tokens = 12
    account = await livegate.account(tier)
    stream = await client(livegate, account.api_key).chat.completions.create(
        model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(fake_upstream.token(i) for i in range(12))
    assert all(c.usage is None for c in chunks)
    # The relay always asks the upstream for its usage.
    assert fake_upstream.requests[-1]["stream_options"] == {"include_usage": True}
    row = await wait_for_status(livegate, account.user.id, "completed")
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (11, 12, 23)


async def test_stream_with_include_usage_gets_upstream_usage_chunk(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    fake_upstream.script.tokens = 5
    account = await livegate.account()
    stream = await client(livegate, account.api_key).chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 5)


async def test_an_upstream_usage_that_is_not_believed_is_replaced_not_forwarded(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    """The client gets one usage chunk, the one billed: not the upstream's nonsense
    followed by Livegate's own count."""
    fake_upstream.script.tokens = 8
    fake_upstream.script.prompt_tokens = -1
    account = await livegate.account()
    stream = await client(livegate, account.api_key).chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "count me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    usages = [chunk.usage async for chunk in stream if chunk.usage is not None]
    row = await wait_for_status(livegate, account.user.id, "completed")
    assert [(u.prompt_tokens, u.completion_tokens) for u in usages] == [
        (row.prompt_tokens, row.completion_tokens)
    ]
    assert row.prompt_tokens > 0 and row.completion_tokens == 8


async def test_stream_without_upstream_usage_counts_delivered_tokens(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    fake_upstream.script.tokens = 9
    fake_upstream.script.report_usage = False
    account = await livegate.account()
    stream = await client(livegate, account.api_key).chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "count me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    row = await wait_for_status(livegate, account.user.id, "completed")
    assert row.completion_tokens == 9
    # The client asked for usage, so the relay reports its own count.
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == row.prompt_tokens > 0


async def test_disconnect_after_k_chunks_bills_exactly_k(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str
):
    fake_upstream.script.tokens = 50
    fake_upstream.script.hold_after = 4
    account = await livegate.account(tier)
    received = 0
    async with (
        httpx.AsyncClient(base_url=livegate.base_url) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {account.api_key}"},
            json={
                "model": FAKE_MODEL,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
        ) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"content"' in line:
                received += 1
                if received == 4:
                    break
    row = await wait_for_status(livegate, account.user.id, "cancelled")
    assert row.completion_tokens == received == 4
    # The relay hung up on the upstream instead of letting it run on.
    for _ in range(200):
        if fake_upstream.streams[-1].closed_early:
            break
        await asyncio.sleep(0.01)
    assert fake_upstream.streams[-1].closed_early
    assert not fake_upstream.streams[-1].finished


async def test_upstream_failure_before_stream_is_502_and_not_billed(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str
):
    fake_upstream.script.status = 503
    account = await livegate.account(tier)
    error = await refused_chat(livegate, account.api_key, stream=True)
    assert error.status_code == 502
    assert "503" in error.message
    row = await wait_for_status(livegate, account.user.id, "error")
    assert row.total_tokens == 0
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        quota = await http.get(
            "/api/usage/quota", headers={"Authorization": f"Bearer {account.token}"}
        )
    assert quota.json()["used"] == 0
    # The request is given back too, to every window.
    windows = await livegate.services.policy.ai_request_usage(account.user.id, tier)
    assert {name: usage.used for name, usage in windows.items()} == dict.fromkeys(windows, 0)
    assert windows


@pytest.mark.parametrize(("upstream_status", "status"), [(400, 400), (503, 502)])
async def test_an_upstream_error_quoting_a_lone_surrogate_is_relayed_and_ends_the_row(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str, upstream_status: int, status: int
):
    """`\\ud800` in the upstream's message decodes to a lone surrogate, which no UTF-8
    encoder takes: the client still gets the error, and the row still ends."""
    fake_upstream.script.status = upstream_status
    fake_upstream.script.error_body = b'{"error": {"message": "bad \\ud800 thing"}}'
    account = await livegate.account(tier)
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {account.api_key}"},
        )
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert message == f"provider fake answered {upstream_status}: bad ? thing"
    row = await wait_for_status(livegate, account.user.id, "error")
    assert (row.error, row.total_tokens) == (message, 0)


async def test_an_upstream_error_body_nested_too_deep_to_parse_is_a_502(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str
):
    fake_upstream.script.status = 503
    fake_upstream.script.error_body = b"[" * 100_000 + b"]" * 100_000
    account = await livegate.account(tier)
    error = await refused_chat(livegate, account.api_key)
    assert error.status_code == 502
    assert error.message.endswith(" - provider fake answered 503")
    row = await wait_for_status(livegate, account.user.id, "error")
    assert row.total_tokens == 0


async def test_a_stream_event_nested_too_deep_to_parse_ends_the_stream_with_an_error(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str
):
    fake_upstream.script.tokens = 3
    fake_upstream.script.finish_event = (
        b'{"choices": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    )
    account = await livegate.account(tier)
    received, error = await stream_until_error(livegate, account.api_key)
    assert error.message == "provider sent a malformed stream event"
    row = await wait_for_status(livegate, account.user.id, "error")
    assert row.completion_tokens == received == 3


@pytest.mark.parametrize(
    ("retry_after", "retries"),
    [("¹".encode(), 1), ("€".encode(), 0), (b"9" * 20, 0)],
    ids=["superscript-digit", "not-latin-1", "too-long"],
)
async def test_an_upstream_429_with_a_retry_after_that_is_no_delay_is_a_429_without_it(
    start_livegate: StartLivegate,
    fake_upstream: FakeUpstream,
    tier: str,
    retry_after: bytes,
    retries: int,
):
    """Only a delay in ASCII digits is waited for and passed on; anything else is left
    out, not a 500 (a retry that could not read it, a header Starlette cannot send)."""
    provider = ProviderConfig(
        name="fake",
        base_url=fake_upstream.base_url,
        api_key="sk-upstream",
        models=[FAKE_MODEL],
        max_retries=retries,
    )
    livegate = await start_livegate(providers=[provider])
    fake_upstream.script.status = 429
    fake_upstream.script.error_headers = {"Retry-After": retry_after}
    account = await livegate.account(tier)
    with pytest.raises(openai.RateLimitError) as caught:
        await client(livegate, account.api_key).chat.completions.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert "retry-after" not in caught.value.response.headers
    assert len(fake_upstream.requests) == retries + 1
    row = await wait_for_status(livegate, account.user.id, "error")
    assert row.total_tokens == 0


@pytest.mark.parametrize("answer", MALFORMED_ANSWERS.values(), ids=MALFORMED_ANSWERS.keys())
async def test_a_whole_answer_of_the_wrong_shape_is_a_502_and_not_billed(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str, answer: dict[str, Any]
):
    """`choices` not a list of objects each with a `message` object is the provider's
    fault, as for Anthropic: a 502, never an internal error, and nothing billed."""
    fake_upstream.script.answer = answer
    account = await livegate.account(tier)
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {account.api_key}"},
        )
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert (error["type"], error["message"]) == (
        "upstream_error",
        "provider fake sent a malformed response",
    )
    row = await wait_for_status(livegate, account.user.id, "error")
    assert (row.error, row.total_tokens) == (error["message"], 0)


async def test_a_last_event_with_a_number_out_of_range_still_ends_the_stream(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str
):
    """-1e400 is skipped unread when the event is metered; reading the id, created and
    model of the last event for the usage chunk must not trip on it either."""
    fake_upstream.script.tokens = 2
    fake_upstream.script.report_usage = False  # the finish event is the last one
    fake_upstream.script.finish_event = (
        b'{"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",'
        b' "choices": [{"index": 0, "delta": {}, "finish_reason": "stop",'
        b' "logprobs": {"content": [{"token": "b", "logprob": -1e400}]}}]}'
    )
    account = await livegate.account(tier)
    stream = await client(livegate, account.api_key).chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 2
    assert (chunks[-1].id, chunks[-1].created, chunks[-1].model) == ("chatcmpl-x", 1, "m")
    row = await wait_for_status(livegate, account.user.id, "completed")
    assert row.completion_tokens == 2


async def test_upstream_failure_mid_stream_bills_delivered_and_reports_error(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str
):
    fake_upstream.script.tokens = 10
    fake_upstream.script.fail_after = 3
    account = await livegate.account(tier)
    stream = await client(livegate, account.api_key).chat.completions.create(
        model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    received = 0
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
    assert received == 3
    row = await wait_for_status(livegate, account.user.id, "error")
    assert row.completion_tokens == 3


async def test_unreachable_upstream_is_502(start_livegate: StartLivegate, tier: str):
    dead = ProviderConfig(name="dead", base_url="http://127.0.0.1:9/v1", models=[FAKE_MODEL])
    livegate = await start_livegate(providers=[dead])
    account = await livegate.account(tier)
    error = await refused_chat(livegate, account.api_key)
    assert error.status_code == 502


async def test_non_stream_disconnect_cancels_upstream_and_bills_nothing(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str
):
    fake_upstream.script.hold_after = 0
    account = await livegate.account(tier)
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        request = asyncio.create_task(
            http.post(
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {account.api_key}"},
                json={"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
        )
        for _ in range(500):
            if fake_upstream.streams:
                break
            await asyncio.sleep(0.01)
        request.cancel()  # the client hangs up while the upstream is still thinking
        with pytest.raises(asyncio.CancelledError):
            await request
    row = await wait_for_status(livegate, account.user.id, "cancelled")
    assert row.total_tokens == 0
    for _ in range(500):
        if fake_upstream.streams[-1].closed_early:
            break
        await asyncio.sleep(0.01)
    assert fake_upstream.streams[-1].closed_early


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": FAKE_MODEL, "stream": True}),
        ("/api/v1/ai/chat", {"model": FAKE_MODEL, "stream": True}),
    ],
    ids=["openai", "playground"],
)
async def test_a_client_gone_before_the_first_event_is_billed_nothing_of_the_stream(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str, path: str, body: dict[str, Any]
):
    """Nothing is sent to a client that left while the upstream was still silent:
    the stream is dropped at once, not relayed, and billed, in full once it comes."""
    fake_upstream.script.hold_start = True
    fake_upstream.script.tokens = 30
    account = await livegate.account(tier)
    try:
        async with httpx.AsyncClient(base_url=livegate.base_url) as http:
            request = asyncio.create_task(
                http.post(
                    path,
                    headers={"Authorization": f"Bearer {account.api_key}"},
                    json={**body, "messages": [{"role": "user", "content": "hi"}]},
                )
            )
            for _ in range(500):
                if fake_upstream.streams:
                    break
                await asyncio.sleep(0.01)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
        row = await wait_for_status(livegate, account.user.id, "cancelled")
        assert (row.completion_tokens, row.total_tokens) == (0, row.prompt_tokens)
    finally:
        fake_upstream.release.set()
    for _ in range(500):
        if fake_upstream.streams[-1].closed_early:
            break
        await asyncio.sleep(0.01)
    assert fake_upstream.streams[-1].closed_early
    assert fake_upstream.streams[-1].sent_tokens == 0


async def test_stream_cut_by_server_shutdown_is_interrupted(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream, tier: str
):
    livegate = await start_livegate()
    fake_upstream.script.tokens = 50
    fake_upstream.script.hold_after = 3
    account = await livegate.account(tier)
    received = 0

    async def consume() -> None:
        nonlocal received
        stream = await client(livegate, account.api_key).chat.completions.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1

    consumer = asyncio.create_task(consume())
    for _ in range(500):
        if received == 3:
            break
        await asyncio.sleep(0.01)
    engine_url = livegate.settings.database_url
    await livegate.server.stop()  # graceful timeout passes, then uvicorn cancels the stream
    with pytest.raises(openai.APIError):
        await consumer
    engine = create_engine(engine_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(usage_logs).where(usage_logs.c.user_id == account.user.id)
                )
            ).one()
    finally:
        await engine.dispose()
    assert (row.status, row.completion_tokens) == ("interrupted", 3)


async def _with_response_limit(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
) -> Livegate:
    provider = ProviderConfig(
        name="fake",
        base_url=fake_upstream.base_url,
        api_key="sk-upstream",
        models=[FAKE_MODEL],
        max_response_bytes=65_536,
        max_retries=0,
    )
    return await start_livegate(providers=[provider])


async def test_a_whole_answer_past_the_response_limit_is_a_502_and_not_billed(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream, tier: str
):
    """The answer is never read past the provider's `max_response_bytes`."""
    livegate = await _with_response_limit(start_livegate, fake_upstream)
    fake_upstream.script.answer = {
        "id": "x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a" * 70_000}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    account = await livegate.account(tier)
    error = await refused_chat(livegate, account.api_key)
    assert error.status_code == 502
    assert error.message.endswith(" - provider fake sent a response over 65536 bytes")
    row = await wait_for_status(livegate, account.user.id, "error")
    assert row.total_tokens == 0


async def test_a_stream_event_past_the_response_limit_ends_the_stream_with_an_error(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream, tier: str
):
    """An event that never ends is not buffered without bound; what was delivered
    before it is billed."""
    livegate = await _with_response_limit(start_livegate, fake_upstream)
    fake_upstream.script.tokens = 3
    fake_upstream.script.report_usage = False
    fake_upstream.script.hold_finish = True  # the tokens reach the client first
    fake_upstream.script.finish_event = b'{"choices": [], "x": "' + b"a" * 70_000 + b'"}'
    account = await livegate.account(tier)

    def release_after_three(received: int) -> None:
        if received == 3:
            fake_upstream.finish_release.set()

    received, error = await stream_until_error(
        livegate, account.api_key, on_token=release_after_three
    )
    assert error.message == "provider sent an event over 65536 bytes"
    row = await wait_for_status(livegate, account.user.id, "error")
    assert row.completion_tokens == received == 3


async def test_an_error_answer_is_read_only_as_far_as_its_message_needs(
    livegate: Livegate, fake_upstream: FakeUpstream, tier: str
):
    """An error body past 64 KiB is not read: the status alone makes the message."""
    fake_upstream.script.status = 500
    fake_upstream.script.error_body = (
        b'{"error": {"message": "long story", "padding": "' + b"a" * 70_000 + b'"}}'
    )
    account = await livegate.account(tier)
    error = await refused_chat(livegate, account.api_key)
    assert error.status_code == 502
    assert error.message.endswith(" - provider fake answered 500")
