"""Token quotas on the relay: refusal before relaying, clean mid-stream cut-off, and the
quota the Sokuji routes report, against real servers and a real database."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

from app.core.config import MeteringConfig
from app.core.quota import add_tokens, month_period
from app.core.tables import usage_logs
from tests.conftest import FAKE_MODEL, Account, Livegate, StartLivegate, tiny_tier
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

UNLIMITED = 2**53 - 1
CHECKPOINT_TOKENS = 5  # make_settings' metering.checkpoint_tokens
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


# --- helpers ---------------------------------------------------------------------


def client(livegate: Livegate, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{livegate.base_url}/v1", api_key=key, max_retries=0)


def chat_body(*, stream: bool, include_usage: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": FAKE_MODEL,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


async def post_chat(livegate: Livegate, account: Account, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=10) as http:
        return await http.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {account.api_key}"},
            json=body,
        )


async def stream_lines(
    livegate: Livegate, account: Account, body: dict[str, Any]
) -> tuple[int, list[str]]:
    """The status and the non-empty SSE lines of a streamed chat, read to the end."""
    async with (
        httpx.AsyncClient(base_url=livegate.base_url, timeout=10) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {account.api_key}"},
            json=body,
        ) as response,
    ):
        lines = [line async for line in response.aiter_lines() if line]
        return response.status_code, lines


async def get_json(livegate: Livegate, path: str, token: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=10) as http:
        response = await http.get(path, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


async def usage_rows(livegate: Livegate, user_id: str) -> list[sa.Row[Any]]:
    async with livegate.services.engine.connect() as conn:
        result = await conn.execute(
            sa.select(usage_logs)
            .where(usage_logs.c.user_id == user_id)
            .order_by(usage_logs.c.started_at)
        )
        return list(result)


async def wait_for_rows(
    livegate: Livegate, user_id: str, accept: Callable[[list[sa.Row[Any]]], bool]
) -> list[sa.Row[Any]]:
    rows: list[sa.Row[Any]] = []
    for _ in range(500):
        rows = await usage_rows(livegate, user_id)
        if accept(rows):
            return rows
        await asyncio.sleep(0.02)
    raise AssertionError(f"usage rows never reached the awaited state: {rows}")


async def wait_all_final(livegate: Livegate, user_id: str, count: int) -> list[sa.Row[Any]]:
    return await wait_for_rows(
        livegate,
        user_id,
        lambda rows: len(rows) == count and all(r.status != "streaming" for r in rows),
    )


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


def next_month_start(now: datetime) -> str:
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return f"{year:04d}-{month:02d}-01T00:00:00Z"


def assert_openai_quota_error(response: httpx.Response) -> None:
    assert response.status_code == 402, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "insufficient_quota"
    assert error["type"] == "insufficient_quota"
    assert isinstance(error["message"], str) and error["message"]


def sse_events(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON events of SSE lines, `[DONE]` excluded; every line must be `data:`."""
    assert all(line.startswith("data: ") for line in lines), lines
    return [json.loads(line[len("data: ") :]) for line in lines if line != "data: [DONE]"]


def content_count(events: list[dict[str, Any]]) -> int:
    return sum(
        1 for e in events for c in e.get("choices", []) if (c.get("delta") or {}).get("content")
    )


# --- refusal before relaying ---------------------------------------------------------


async def test_exhausted_quota_is_402_before_anything_is_relayed(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(tiers=tiny_tier(10))
    account = await livegate.account(tier="tiny")
    fake_upstream.script.tokens = 8
    # The first request is allowed (nothing used yet) and uses more than the quota.
    first = await post_chat(livegate, account, chat_body(stream=False))
    assert first.status_code == 200, first.text
    assert len(fake_upstream.requests) == 1
    quota = await get_json(livegate, "/api/usage/quota", account.token)
    assert quota["used"] >= quota["total"] == 10
    assert quota["remaining"] == 0

    for body in (
        chat_body(stream=False),
        chat_body(stream=True),
        chat_body(stream=True, include_usage=True),
    ):
        assert_openai_quota_error(await post_chat(livegate, account, body))

    async with client(livegate, account.api_key) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.chat.completions.create(
                model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
    assert caught.value.status_code == 402
    assert caught.value.code == "insufficient_quota"

    # Nothing was relayed and nothing more was billed.
    assert len(fake_upstream.requests) == 1
    assert await get_json(livegate, "/api/usage/quota", account.token) == quota
    rows = await wait_all_final(livegate, account.user.id, 1)
    assert sum(r.total_tokens for r in rows) == quota["used"]


async def test_quota_of_one_user_does_not_refuse_another(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(tiers=tiny_tier(10))
    spent = await livegate.account(tier="tiny")
    fresh = await livegate.account(tier="tiny")
    fake_upstream.script.tokens = 8
    assert (await post_chat(livegate, spent, chat_body(stream=False))).status_code == 200
    assert_openai_quota_error(await post_chat(livegate, spent, chat_body(stream=False)))
    response = await post_chat(livegate, fresh, chat_body(stream=False))
    assert response.status_code == 200, response.text
    assert len(fake_upstream.requests) == 2


# --- cut-off mid-stream -----------------------------------------------------------


@pytest.mark.parametrize("meta_on_first_only", [False, True])
async def test_the_cut_chunk_carries_the_upstreams_id_created_and_model(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream, meta_on_first_only: bool
) -> None:
    livegate = await start_livegate(tiers=tiny_tier(40))
    account = await livegate.account(tier="tiny")
    fake_upstream.script.tokens = 200
    fake_upstream.script.hold_after = 100
    fake_upstream.script.meta_on_first_only = meta_on_first_only

    status, lines = await stream_lines(livegate, account, chat_body(stream=True))
    assert status == 200
    events = sse_events(lines)
    first, final = events[0], events[-1]
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    assert first["id"].startswith("chatcmpl-")
    assert (final["id"], final["created"], final["model"]) == (
        first["id"],
        first["created"],
        first["model"],
    )


async def test_stream_exhausting_quota_ends_cleanly_with_length(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    limit = 40
    livegate = await start_livegate(tiers=tiny_tier(limit))
    account = await livegate.account(tier="tiny")
    fake_upstream.script.tokens = 200
    # The upstream cannot finish on its own: only the relay's cut-off ends this stream.
    fake_upstream.script.hold_after = 100

    status, lines = await stream_lines(livegate, account, chat_body(stream=True))
    assert status == 200
    assert lines[-1] == "data: [DONE]"
    assert lines.count("data: [DONE]") == 1
    events = sse_events(lines)
    assert not any("error" in e for e in events), events
    final = events[-1]
    assert final["object"] == "chat.completion.chunk"
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    assert all(c["finish_reason"] is None for e in events[:-1] for c in e["choices"])
    assert all("usage" not in e or e["usage"] is None for e in events)  # not asked for
    delivered = content_count(events)
    assert 0 < delivered < 100

    [row] = await wait_all_final(livegate, account.user.id, 1)
    assert (row.status, row.finish_reason) == ("completed", "quota_exhausted")
    assert row.error is None
    assert row.completion_tokens == delivered  # billed exactly what reached the client
    # A single stream stops exactly at the limit: no overshoot at all.
    assert row.total_tokens == limit

    quota = await get_json(livegate, "/api/usage/quota", account.token)
    assert quota["used"] == row.total_tokens
    assert quota["used"] <= limit + CHECKPOINT_TOKENS
    assert quota["remaining"] == 0

    # The relay hung up on the upstream instead of letting it run on.
    await wait_until(lambda: fake_upstream.streams[-1].closed_early, "upstream closed")
    assert not fake_upstream.streams[-1].finished

    # And the next request is refused without reaching the upstream.
    assert_openai_quota_error(await post_chat(livegate, account, chat_body(stream=True)))
    assert len(fake_upstream.requests) == 1


async def test_stream_cut_off_iterates_cleanly_in_the_sdk_with_usage(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    limit = 40
    livegate = await start_livegate(tiers=tiny_tier(limit))
    account = await livegate.account(tier="tiny")
    fake_upstream.script.tokens = 200
    fake_upstream.script.hold_after = 100

    async with client(livegate, account.api_key) as sdk:
        stream = await sdk.chat.completions.create(
            model=FAKE_MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]

    usage_chunk, finish_chunk = chunks[-1], chunks[-2]
    assert finish_chunk.choices and finish_chunk.choices[0].finish_reason == "length"
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    delivered = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert text == "".join(fake_upstream.token(i) for i in range(delivered))

    [row] = await wait_all_final(livegate, account.user.id, 1)
    assert (row.status, row.finish_reason) == ("completed", "quota_exhausted")
    assert row.completion_tokens == delivered
    assert (
        usage_chunk.usage.prompt_tokens,
        usage_chunk.usage.completion_tokens,
        usage_chunk.usage.total_tokens,
    ) == (row.prompt_tokens, row.completion_tokens, row.total_tokens)
    assert limit <= row.total_tokens <= limit + CHECKPOINT_TOKENS


async def test_stream_started_with_little_quota_left_stops_within_one_checkpoint(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    limit = 60
    livegate = await start_livegate(tiers=tiny_tier(limit))
    account = await livegate.account(tier="tiny")
    # First request: well under the limit, completes normally.
    fake_upstream.script.tokens = 20
    status, lines = await stream_lines(livegate, account, chat_body(stream=True))
    assert status == 200 and lines[-1] == "data: [DONE]"
    assert sse_events(lines)[-1]["choices"][0]["finish_reason"] == "stop"
    used_before = (await get_json(livegate, "/api/usage/quota", account.token))["used"]
    assert used_before == 11 + 20 < limit

    # Second request: the rest of the quota runs out mid-way.
    fake_upstream.script.tokens = 200
    fake_upstream.script.hold_after = 100
    status, lines = await stream_lines(livegate, account, chat_body(stream=True))
    assert status == 200 and lines[-1] == "data: [DONE]"
    events = sse_events(lines)
    assert events[-1]["choices"][0]["finish_reason"] == "length"

    rows = await wait_all_final(livegate, account.user.id, 2)
    assert [(r.status, r.finish_reason) for r in rows] == [
        ("completed", "stop"),
        ("completed", "quota_exhausted"),
    ]
    assert rows[1].completion_tokens == content_count(events)
    used = (await get_json(livegate, "/api/usage/quota", account.token))["used"]
    assert used == sum(r.total_tokens for r in rows)
    assert limit <= used <= limit + CHECKPOINT_TOKENS


async def test_parallel_streams_of_one_user_share_what_is_left(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    """Ten streams admitted together, whose tokens then all arrive at once: what one
    delivers is gone for the others before it is written, not spent again by each."""
    limit = 200
    livegate = await start_livegate(tiers=tiny_tier(limit))
    account = await livegate.account(tier="tiny")
    fake_upstream.script.tokens = 60
    fake_upstream.script.hold_start = True  # every stream admitted before any token
    streams = [
        asyncio.create_task(stream_lines(livegate, account, chat_body(stream=True)))
        for _ in range(10)
    ]
    await wait_until(lambda: len(fake_upstream.streams) == 10, "ten streams started")
    prompts = (await get_json(livegate, "/api/usage/quota", account.token))["used"]
    fake_upstream.release.set()
    results = await asyncio.gather(*streams)
    assert [status for status, _ in results] == [200] * 10
    delivered = [content_count(sse_events(lines)) for _, lines in results]
    # What the prompts left, and no more (each stream alone would have taken 60 of it).
    left = limit - prompts
    assert left - CHECKPOINT_TOKENS <= sum(delivered) <= left, delivered
    rows = await wait_all_final(livegate, account.user.id, 10)
    assert sum(r.completion_tokens for r in rows) == sum(delivered)
    used = (await get_json(livegate, "/api/usage/quota", account.token))["used"]
    assert used == sum(r.total_tokens for r in rows)


async def test_a_request_is_refused_for_tokens_delivered_but_not_yet_written(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    """Admission counts what streams in flight on the instance have delivered, not
    only what their checkpoints wrote."""
    unhurried = MeteringConfig(
        checkpoint_tokens=1000, checkpoint_ms=60_000, push_interval_ms=0, heartbeat_seconds=10
    )
    livegate = await start_livegate(tiers=tiny_tier(100), metering=unhurried)
    account = await livegate.account(tier="tiny")
    fake_upstream.script.tokens = 200
    fake_upstream.script.hold_after = 92
    headers = {"Authorization": f"Bearer {account.api_key}"}
    async with (
        httpx.AsyncClient(base_url=livegate.base_url, timeout=10) as http,
        http.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=headers
        ) as response,
    ):
        received = 0
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                received += content_count([json.loads(line[6:])])
            if received == 92:
                break
        [row] = await usage_rows(livegate, account.user.id)
        assert row.completion_tokens == 0  # nothing written yet
        refused = await post_chat(livegate, account, chat_body(stream=False))
        assert_openai_quota_error(refused)
        fake_upstream.release.set()


async def test_a_finish_after_the_quota_was_overrun_meanwhile_ends_the_stream(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    """Another request overran the quota while this stream ran: a last batch without
    tokens (only the finish) has nothing to cut, and the stream ends as it came."""
    livegate = await start_livegate(tiers=tiny_tier(40))
    account = await livegate.account(tier="tiny")
    fake_upstream.script.tokens = 2 * CHECKPOINT_TOKENS
    fake_upstream.script.hold_after = CHECKPOINT_TOKENS
    fake_upstream.script.hold_finish = True
    streaming = asyncio.create_task(stream_lines(livegate, account, chat_body(stream=True)))
    await wait_until(
        lambda: fake_upstream.streams and len(livegate.services.metering.active) == 1, "held"
    )
    [meter] = livegate.services.metering.active
    await wait_until(lambda: meter.completion_tokens == CHECKPOINT_TOKENS, "first tokens delivered")
    # The overrun, as another instance's request would write it.
    async with livegate.services.engine.begin() as conn:
        await add_tokens(conn, account.user.id, month_period(datetime.now(UTC)), 100)
    fake_upstream.release.set()
    # The next checkpoint brings the overrun counter back: no quota left at all.
    await wait_until(lambda: (meter.remaining or 0) < 0, "the overrun seen")
    fake_upstream.finish_release.set()

    status, lines = await streaming
    assert status == 200 and lines[-1] == "data: [DONE]"
    events = sse_events(lines)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert content_count(events) == 2 * CHECKPOINT_TOKENS
    [row] = await wait_all_final(livegate, account.user.id, 1)
    assert (row.status, row.finish_reason, row.completion_tokens) == (
        "completed",
        "stop",
        2 * CHECKPOINT_TOKENS,
    )


async def test_a_cut_bills_what_was_delivered_over_the_upstreams_usage_so_far(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    """An upstream that reports its usage on every token's event: the last one taken
    before the cut counts fewer tokens than were delivered by the cut's own batch."""
    livegate = await start_livegate(tiers=tiny_tier(40))
    account = await livegate.account(tier="tiny")
    fake_upstream.script.tokens = 200
    fake_upstream.script.hold_after = 20
    fake_upstream.script.usage_every_token = True
    body = chat_body(stream=True, include_usage=True)
    streaming = asyncio.create_task(stream_lines(livegate, account, body))
    await wait_until(lambda: len(livegate.services.metering.active) == 1, "stream started")
    [meter] = livegate.services.metering.active
    await wait_until(lambda: meter.completion_tokens == 20, "the first tokens delivered")
    fake_upstream.release.set()  # the rest in a read or a few: the cut comes mid-read

    status, lines = await streaming
    assert status == 200 and lines[-1] == "data: [DONE]"
    events = sse_events(lines)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    delivered = content_count(events)
    [row] = await wait_all_final(livegate, account.user.id, 1)
    assert (row.status, row.finish_reason) == ("completed", "quota_exhausted")
    assert (row.prompt_tokens, row.completion_tokens) == (
        fake_upstream.script.prompt_tokens,
        delivered,
    )
    assert events[-1]["usage"] == {
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.total_tokens,
    }


# --- what the Sokuji routes report --------------------------------------------------


async def test_reported_quota_is_the_sum_of_usage_logs(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(tiers=tiny_tier(100_000))
    account = await livegate.account(tier="tiny")
    before = datetime.now(UTC)

    # A mix of outcomes: non-streamed, streamed, cut by the client, failed upstream.
    fake_upstream.script.tokens = 7
    assert (await post_chat(livegate, account, chat_body(stream=False))).status_code == 200
    fake_upstream.script.tokens = 12
    status, _ = await stream_lines(livegate, account, chat_body(stream=True, include_usage=True))
    assert status == 200
    fake_upstream.script.tokens = 10
    fake_upstream.script.fail_after = 3
    status, _ = await stream_lines(livegate, account, chat_body(stream=True))
    assert status == 200
    fake_upstream.script.fail_after = None
    fake_upstream.script.status = 503
    assert (await post_chat(livegate, account, chat_body(stream=True))).status_code == 502
    fake_upstream.script.status = 200

    rows = await wait_all_final(livegate, account.user.id, 4)
    assert sorted(r.status for r in rows) == ["completed", "completed", "error", "error"]
    billed = sum(r.total_tokens for r in rows)
    assert billed > 11 + 7 + 11 + 12  # the failed stream bills what it delivered

    quota = await get_json(livegate, "/api/usage/quota", account.token)
    profile = await get_json(livegate, "/api/user/profile", account.token)
    after = datetime.now(UTC)

    assert set(quota) == {"total", "used", "remaining", "resetDate"}
    assert quota["used"] == billed
    assert quota["total"] == 100_000
    assert quota["remaining"] == 100_000 - billed
    assert quota["resetDate"] in {next_month_start(before), next_month_start(after)}

    assert set(profile) == {"user", "quota"}
    assert profile["quota"] == quota
    user = profile["user"]
    assert set(user) == {
        "id",
        "email",
        "firstName",
        "lastName",
        "imageUrl",
        "subscription",
        "createdAt",
        "updatedAt",
    }
    assert user["id"] == account.user.id
    assert user["email"] == account.user.email
    assert user["subscription"] == "tiny"
    assert ISO_Z.match(user["createdAt"]) and ISO_Z.match(user["updatedAt"])

    # The relay key reads the same quota as the JWT.
    assert await get_json(livegate, "/api/usage/quota", account.api_key) == quota


async def test_fresh_user_quota_and_profile(livegate: Livegate):
    account = await livegate.account()
    now = datetime.now(UTC)
    quota = await get_json(livegate, "/api/usage/quota", account.token)
    profile = await get_json(livegate, "/api/user/profile", account.token)
    assert quota["resetDate"] in {next_month_start(now), next_month_start(datetime.now(UTC))}
    assert {k: quota[k] for k in ("total", "used", "remaining")} == {
        "total": 1_000_000,
        "used": 0,
        "remaining": 1_000_000,
    }
    assert profile["quota"] == quota
    assert profile["user"]["subscription"] == "free"


@pytest.mark.parametrize("path", ["/api/usage/quota", "/api/user/profile"])
async def test_quota_routes_require_auth(livegate: Livegate, path: str):
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=10) as http:
        missing = await http.get(path)
        bad = await http.get(path, headers={"Authorization": "Bearer nope"})
    for response in (missing, bad):
        assert response.status_code == 401
        body = response.json()
        assert isinstance(body["error"], str)  # the Sokuji envelope


# --- unlimited tier ---------------------------------------------------------------


async def test_unlimited_tier_reports_max_safe_integer_and_is_never_refused(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account(tier="enterprise")
    fresh = await get_json(livegate, "/api/usage/quota", account.token)
    assert (fresh["total"], fresh["used"], fresh["remaining"]) == (UNLIMITED, 0, UNLIMITED)
    profile = await get_json(livegate, "/api/user/profile", account.token)
    assert profile["quota"] == fresh

    # More usage than any finite tier allows, written to the real counter.
    huge = 10**12
    async with livegate.services.engine.begin() as conn:
        await add_tokens(conn, account.user.id, month_period(datetime.now(UTC)), huge)

    fake_upstream.script.tokens = 200
    status, lines = await stream_lines(livegate, account, chat_body(stream=True))
    assert status == 200 and lines[-1] == "data: [DONE]"
    events = sse_events(lines)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert content_count(events) == 200
    fake_upstream.script.tokens = 3
    for body in (chat_body(stream=False), chat_body(stream=True)):
        response = await post_chat(livegate, account, body)
        assert response.status_code == 200, response.text

    rows = await wait_all_final(livegate, account.user.id, 3)
    assert rows[0].finish_reason == "stop" and rows[0].total_tokens == 11 + 200
    assert all(r.status == "completed" for r in rows)
    quota = await get_json(livegate, "/api/usage/quota", account.token)
    assert quota["total"] == UNLIMITED
    assert quota["used"] == huge + sum(r.total_tokens for r in rows)
    assert quota["remaining"] == UNLIMITED - quota["used"] > 0
    assert len(fake_upstream.requests) == 3


async def test_answer_ending_exactly_at_the_limit_is_not_cut(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    account_prompt = 5  # the relay's estimate for chat_body's one short message
    fake_upstream.script.tokens = 35
    livegate = await start_livegate(tiers=tiny_tier(account_prompt + 35))
    account = await livegate.account(tier="tiny")
    status, lines = await stream_lines(livegate, account, chat_body(stream=True))
    assert status == 200
    events = sse_events(lines)
    assert content_count(events) == 35
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    [row] = await wait_all_final(livegate, account.user.id, 1)
    assert (row.status, row.finish_reason) == ("completed", "stop")
    # The upstream's own usage is billed, not the estimate.
    assert (row.prompt_tokens, row.completion_tokens) == (11, 35)


async def test_prompt_larger_than_the_remaining_quota_is_402_up_front(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(tiers=tiny_tier(40))
    account = await livegate.account(tier="tiny")
    body = chat_body(stream=True)
    body["messages"] = [{"role": "user", "content": "x" * 400}]  # ~100 tokens estimated
    response = await post_chat(livegate, account, body)
    assert_openai_quota_error(response)
    assert fake_upstream.requests == []
    quota = await get_json(livegate, "/api/usage/quota", account.token)
    assert quota["used"] == 0


async def test_whole_answer_near_the_limit_is_capped_to_the_quota_left(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(tiers=tiny_tier(100))
    account = await livegate.account(tier="tiny")
    body = chat_body(stream=False)
    body["max_tokens"] = 100_000
    response = await post_chat(livegate, account, body)
    assert response.status_code == 200
    # The estimate for the prompt is 5 tokens: 95 may still be spent on the answer.
    assert fake_upstream.requests[-1]["max_tokens"] == 95
    # Far from the limit a request goes out as the client sent it.
    roomy = await start_livegate()
    other = await roomy.account()
    await post_chat(roomy, other, chat_body(stream=False))
    assert "max_tokens" not in fake_upstream.requests[-1]
