"""The Playground's AI routes: `/api/v1/ai/chat` (whole and streamed), `/generate`,
`/models` with pricing, `/usage` reports with filters, the paginated `/api/v1/usage`
list, and the permissions each needs.

Real servers on loopback (Livegate and the fake upstream), real SQLite or
PostgreSQL+Redis; httpx and httpx-sse as clients.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from httpx_sse import aconnect_sse
from openai.types.chat import ChatCompletionChunk

from app.core.config import ModelRoute, Price, ProviderConfig
from app.core.tables import usage_logs
from tests.conftest import FAKE_MODEL, Livegate, StartLivegate
from tests.fake_upstream import MALFORMED_ANSWERS, FakeUpstream

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

WAIT = 10  # seconds: the bound on every wait for something the server should do
ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
HI = [{"role": "user", "content": "Hello, how are you?"}]
MODEL_B = "fake-model-b"
PRICE_A = Price(prompt=500, completion=1500)  # USD per million tokens
PRICE_B = Price(prompt=1000, completion=2000)
DEFAULTS = {"max_tokens": 1000, "temperature": 0.7, "top_p": 0.9}


# --- helpers ---------------------------------------------------------------------


def auth(credential: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"} if credential else {}


async def call(
    livegate: Livegate,
    method: str,
    path: str,
    credential: str | None = None,
    *,
    json: Any = None,
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http:
        return await http.request(
            method,
            path,
            json=json,
            params=params,
            headers={**auth(credential), **(headers or {})},
        )


def assert_ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"success", "data", "timestamp"}, body
    assert body["success"] is True
    assert ISO_MS.match(body["timestamp"])
    return body["data"]  # type: ignore[no-any-return]


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"success", "error", "timestamp"}, body
    assert body["success"] is False
    assert set(body["error"]) == {"message", "code", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def priced_provider(fake: FakeUpstream) -> ProviderConfig:
    return ProviderConfig(
        name="fake",
        base_url=fake.base_url,
        api_key="sk-upstream",
        models=[FAKE_MODEL, MODEL_B],
        read_timeout=30,
        prices={FAKE_MODEL: PRICE_A, MODEL_B: PRICE_B},
    )


def cost(price: Price, prompt: int, completion: int) -> float:
    return (prompt * price.prompt + completion * price.completion) / 1_000_000


def text_of(fake: FakeUpstream, count: int) -> str:
    return "".join(fake.token(i) for i in range(count))


async def create_key(livegate: Livegate, token: str, permissions: list[str]) -> str:
    response = await call(
        livegate,
        "POST",
        "/api/v1/api-keys",
        token,
        json={"name": "scoped", "permissions": permissions},
    )
    assert response.status_code == 201, response.text
    return response.json()["data"]["api_key"]["key"]  # type: ignore[no-any-return]


async def usage_rows(livegate: Livegate, user_id: str) -> list[sa.Row[Any]]:
    async with livegate.services.engine.connect() as conn:
        return list(
            await conn.execute(
                sa.select(usage_logs)
                .where(usage_logs.c.user_id == user_id)
                .order_by(usage_logs.c.started_at)
            )
        )


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


def all_final(count: int) -> Callable[[list[sa.Row[Any]]], bool]:
    return lambda rows: len(rows) == count and all(r.status != "streaming" for r in rows)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


# --- chat ------------------------------------------------------------------------


async def test_chat_answers_in_the_playground_shape(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    fake_upstream.script.tokens = 6
    before = int(datetime.now(UTC).timestamp())
    data = assert_ok(
        await call(livegate, "POST", "/api/v1/ai/chat", account.token, json={"messages": HI})
    )
    assert set(data) == {"id", "model", "choices", "usage", "created"}
    assert isinstance(data["id"], str) and data["id"]
    assert data["model"] == FAKE_MODEL
    assert data["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": text_of(fake_upstream, 6)},
            "finish_reason": "stop",
        }
    ]
    assert data["usage"] == {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}
    assert before - 5 <= data["created"] <= int(datetime.now(UTC).timestamp()) + 5

    [row] = await wait_for_rows(livegate, account.user.id, all_final(1))
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("completed", 11, 6)
    assert row.stream == 0


async def test_chat_sends_the_documented_defaults_upstream(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    assert_ok(await call(livegate, "POST", "/api/v1/ai/chat", account.token, json={"messages": HI}))
    sent = fake_upstream.requests[-1]
    assert {k: sent[k] for k in DEFAULTS} == DEFAULTS
    assert sent["stream"] is False
    assert sent["model"] == FAKE_MODEL
    assert sent["messages"] == HI


async def test_chat_client_values_override_the_defaults(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I'm doing well, thank you!"},
        {"role": "user", "content": "What's the weather like today?"},
    ]
    body = {
        "messages": conversation,
        "model": FAKE_MODEL,
        "max_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.5,
        "stream": False,
    }
    assert_ok(await call(livegate, "POST", "/api/v1/ai/chat", account.token, json=body))
    sent = fake_upstream.requests[-1]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (50, 0.2, 0.5)
    assert sent["messages"] == conversation
    # Zero is a value, not an absence.
    body = {"messages": HI, "temperature": 0, "top_p": 0}
    assert_ok(await call(livegate, "POST", "/api/v1/ai/chat", account.token, json=body))
    sent = fake_upstream.requests[-1]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"]) == (0, 0, 1000)


async def test_chat_stream_is_sse_of_openai_chunks_with_usage(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    fake_upstream.script.tokens = 7
    async with (
        httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http,
        aconnect_sse(
            http,
            "POST",
            "/api/v1/ai/chat",
            json={"messages": HI, "stream": True},
            headers=auth(account.token),
        ) as source,
    ):
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        data = [event.data async for event in source.aiter_sse()]
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    chunks = [ChatCompletionChunk.model_validate(json.loads(d)) for d in data[:-1]]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == text_of(fake_upstream, 7)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (11, 7)
    assert usage_chunk.usage.total_tokens == 18

    sent = fake_upstream.requests[-1]
    assert sent["stream"] is True
    assert {k: sent[k] for k in DEFAULTS} == DEFAULTS
    [row] = await wait_for_rows(livegate, account.user.id, all_final(1))
    assert (row.status, row.stream, row.total_tokens) == ("completed", 1, 18)


async def test_chat_stream_client_disconnect_is_finalized(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    fake_upstream.script.tokens = 20
    fake_upstream.script.hold_after = 3
    delivered = 0
    async with (
        httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http,
        aconnect_sse(
            http,
            "POST",
            "/api/v1/ai/chat",
            json={"messages": HI, "stream": True},
            headers=auth(account.token),
        ) as source,
    ):
        async for event in source.aiter_sse():
            chunk = json.loads(event.data)
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                delivered += 1
                if delivered == 3:
                    break
    [row] = await wait_for_rows(livegate, account.user.id, all_final(1))
    assert (row.status, row.completion_tokens) == ("cancelled", 3)
    await wait_until(lambda: fake_upstream.streams[-1].closed_early, "upstream closed")


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 5},
        {"temperature": "hot"},
        {"temperature": -0.1},
        {"temperature": True},
        {"top_p": 1.5},
        {"top_p": "all"},
        {"max_tokens": 0},
        {"max_tokens": "many"},
        {"messages": []},
        {"messages": "hello"},
        {"stream": "yes"},
    ],
    ids=[
        "temperature-5",
        "temperature-hot",
        "temperature-negative",
        "temperature-bool",
        "top-p-above-1",
        "top-p-text",
        "max-tokens-zero",
        "max-tokens-text",
        "messages-empty",
        "messages-string",
        "stream-text",
    ],
)
async def test_invalid_chat_is_400_validation_error(
    livegate: Livegate, fake_upstream: FakeUpstream, change: dict[str, Any]
):
    account = await livegate.account()
    body = {"messages": HI, **change}
    error = assert_error(
        await call(livegate, "POST", "/api/v1/ai/chat", account.token, json=body),
        400,
        "VALIDATION_ERROR",
    )
    if "temperature" in change:
        assert error["details"]["field"] == "temperature"
    assert fake_upstream.requests == []


async def test_unknown_model_is_404(livegate: Livegate, fake_upstream: FakeUpstream):
    account = await livegate.account()
    body = {"messages": HI, "model": "minimax"}
    assert_error(
        await call(livegate, "POST", "/api/v1/ai/chat", account.token, json=body),
        404,
        "NOT_FOUND",
    )
    assert fake_upstream.requests == []


async def test_upstream_failure_is_service_unavailable_and_not_billed(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    fake_upstream.script.status = 503
    assert_error(
        await call(livegate, "POST", "/api/v1/ai/chat", account.token, json={"messages": HI}),
        502,
        "SERVICE_UNAVAILABLE",
    )
    [row] = await wait_for_rows(livegate, account.user.id, all_final(1))
    assert (row.status, row.total_tokens) == ("error", 0)
    quota = assert_ok(await call(livegate, "GET", "/api/v1/ai/usage", account.token))["quota"]
    assert quota["daily"]["used"] == 0  # the failed request was given back


# --- generate ----------------------------------------------------------------------


async def test_generate_answers_text_choices(livegate: Livegate, fake_upstream: FakeUpstream):
    account = await livegate.account()
    fake_upstream.script.tokens = 5
    body = {
        "prompt": "Write a short story about artificial intelligence",
        "model": FAKE_MODEL,
        "max_tokens": 500,
        "temperature": 0.8,
        "top_p": 0.95,
        "n": 2,
        "stop": ["\n\n", "END"],
    }
    data = assert_ok(await call(livegate, "POST", "/api/v1/ai/generate", account.token, json=body))
    assert set(data) == {"id", "model", "choices", "usage"}
    assert data["model"] == FAKE_MODEL
    assert isinstance(data["id"], str) and data["id"]
    assert data["choices"] == [
        {"text": text_of(fake_upstream, 5), "index": 0, "finish_reason": "stop"}
    ]
    assert data["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}

    sent = fake_upstream.requests[-1]
    assert sent["messages"] == [{"role": "user", "content": body["prompt"]}]
    assert "prompt" not in sent
    assert (sent["n"], sent["stop"], sent["max_tokens"]) == (2, ["\n\n", "END"], 500)
    assert (sent["temperature"], sent["top_p"], sent["stream"]) == (0.8, 0.95, False)


@pytest.mark.parametrize("answer", MALFORMED_ANSWERS.values(), ids=MALFORMED_ANSWERS.keys())
async def test_generate_of_an_answer_of_the_wrong_shape_is_a_502_and_not_billed(
    livegate: Livegate, fake_upstream: FakeUpstream, answer: dict[str, Any]
):
    account = await livegate.account()
    fake_upstream.script.answer = answer
    body = {"prompt": "Say hi", "model": FAKE_MODEL}
    assert_error(
        await call(livegate, "POST", "/api/v1/ai/generate", account.token, json=body),
        502,
        "SERVICE_UNAVAILABLE",
    )
    [row] = await wait_for_rows(livegate, account.user.id, all_final(1))
    assert (row.status, row.error, row.total_tokens) == (
        "error",
        "provider fake sent a malformed response",
        0,
    )


async def test_generate_defaults_and_single_stop(livegate: Livegate, fake_upstream: FakeUpstream):
    account = await livegate.account()
    body = {"prompt": "Say hi", "stop": "END"}
    assert_ok(await call(livegate, "POST", "/api/v1/ai/generate", account.token, json=body))
    sent = fake_upstream.requests[-1]
    assert {k: sent[k] for k in DEFAULTS} == DEFAULTS
    assert sent["stop"] == "END"
    assert sent["model"] == FAKE_MODEL
    assert "n" not in sent


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": ""},
        {"prompt": "   "},
        {"prompt": 5},
        {"prompt": "x", "n": 0},
        {"prompt": "x", "n": 11},
        {"prompt": "x", "n": "2"},
        {"prompt": "x", "n": 1.5},
        {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
        {"prompt": "x", "stop": 7},
        {"prompt": "x", "temperature": 3},
    ],
    ids=[
        "no-prompt",
        "empty-prompt",
        "blank-prompt",
        "number-prompt",
        "n-zero",
        "n-eleven",
        "n-text",
        "n-fraction",
        "five-stops",
        "stop-number",
        "temperature-3",
    ],
)
async def test_invalid_generate_is_400(
    livegate: Livegate, fake_upstream: FakeUpstream, body: dict[str, Any]
):
    account = await livegate.account()
    assert_error(
        await call(livegate, "POST", "/api/v1/ai/generate", account.token, json=body),
        400,
        "VALIDATION_ERROR",
    )
    assert fake_upstream.requests == []


# --- models ---------------------------------------------------------------------------


async def test_models_with_pricing(start_livegate: StartLivegate, fake_upstream: FakeUpstream):
    alias = ModelRoute(
        name="minimax",
        targets=[f"fake:{FAKE_MODEL}"],
        description="Advanced language model for various tasks",
        max_tokens=4096,
    )
    livegate = await start_livegate(providers=[priced_provider(fake_upstream)], models=[alias])
    account = await livegate.account()
    data = assert_ok(await call(livegate, "GET", "/api/v1/ai/models", account.token))
    assert set(data) == {"models"}
    listed = {m["id"]: m for m in data["models"]}
    assert list(listed) == ["minimax", FAKE_MODEL, MODEL_B]
    for model in data["models"]:
        assert set(model) == {
            "id",
            "name",
            "description",
            "max_tokens",
            "supported_endpoints",
            "pricing",
        }
        assert model["supported_endpoints"] == ["chat", "generate"]
    assert listed["minimax"]["description"] == "Advanced language model for various tasks"
    assert listed["minimax"]["max_tokens"] == 4096
    # USD per 1k tokens from the per-million prices: 1500/M is 1.5/1k.
    assert listed["minimax"]["pricing"]["per_1k_tokens"] == 1.5
    assert listed[FAKE_MODEL]["pricing"] == {
        "per_1k_tokens": 1.5,
        "prompt_per_1k_tokens": 0.5,
        "completion_per_1k_tokens": 1.5,
    }
    assert listed[MODEL_B]["pricing"]["per_1k_tokens"] == 2.0
    assert listed[MODEL_B]["pricing"]["prompt_per_1k_tokens"] == 1.0

    # The alias serves chats.
    body = {"messages": HI, "model": "minimax"}
    chat = assert_ok(await call(livegate, "POST", "/api/v1/ai/chat", account.token, json=body))
    assert fake_upstream.requests[-1]["model"] == FAKE_MODEL
    assert chat["choices"][0]["message"]["content"] == text_of(fake_upstream, 8)


async def test_unpriced_models_cost_nothing(livegate: Livegate):
    account = await livegate.account()
    data = assert_ok(await call(livegate, "GET", "/api/v1/ai/models", account.api_key))
    [model] = data["models"]
    assert model["id"] == FAKE_MODEL
    assert model["pricing"]["per_1k_tokens"] == 0.0


# --- usage reports --------------------------------------------------------------------


async def make_usage(
    livegate: Livegate, fake: FakeUpstream, credential: str
) -> tuple[datetime, datetime]:
    """Two chats on model A (8 tokens each) and one generation on model B (4 tokens)."""
    before = datetime.now(UTC)
    fake.script.tokens = 8
    for _ in range(2):
        assert_ok(
            await call(
                livegate,
                "POST",
                "/api/v1/ai/chat",
                credential,
                json={"messages": HI, "model": FAKE_MODEL},
                headers={"X-Device-Id": "device-1", "X-Platform": "web"},
            )
        )
    fake.script.tokens = 4
    assert_ok(
        await call(
            livegate,
            "POST",
            "/api/v1/ai/generate",
            credential,
            json={"prompt": "hi", "model": MODEL_B},
        )
    )
    return before, datetime.now(UTC)


async def test_usage_totals_by_model_and_date(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(providers=[priced_provider(fake_upstream)])
    account = await livegate.account()
    before, after = await make_usage(livegate, fake_upstream, account.token)
    await wait_for_rows(livegate, account.user.id, all_final(3))

    cost_a = cost(PRICE_A, 11, 8)
    cost_b = cost(PRICE_B, 11, 4)
    data = assert_ok(await call(livegate, "GET", "/api/v1/ai/usage", account.token))
    assert set(data) == {"usage", "quota"}
    usage = data["usage"]
    assert set(usage) == {
        "total_requests",
        "total_tokens",
        "total_cost",
        "by_model",
        "by_date",
        "start_date",
        "end_date",
    }
    assert usage["total_requests"] == 3
    assert usage["total_tokens"] == 2 * 19 + 15
    assert usage["total_cost"] == pytest.approx(2 * cost_a + cost_b)
    assert set(usage["by_model"]) == {FAKE_MODEL, MODEL_B}
    assert usage["by_model"][FAKE_MODEL]["requests"] == 2
    assert usage["by_model"][FAKE_MODEL]["tokens"] == 38
    assert usage["by_model"][FAKE_MODEL]["cost"] == pytest.approx(2 * cost_a)
    assert usage["by_model"][MODEL_B] == {
        "requests": 1,
        "tokens": 15,
        "cost": pytest.approx(cost_b),
    }
    [day] = usage["by_date"]
    assert day["date"] in {before.date().isoformat(), after.date().isoformat()}
    assert (day["requests"], day["tokens"]) == (3, 53)
    assert day["cost"] == pytest.approx(2 * cost_a + cost_b)
    # The default range: the last 30 days up to now.
    start, end = (
        datetime.strptime(usage[k], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        for k in ("start_date", "end_date")
    )
    assert end - start == timedelta(days=30)
    assert before - timedelta(seconds=5) <= end <= datetime.now(UTC) + timedelta(seconds=5)

    assert data["quota"] == {
        "daily": {"used": 3, "limit": 50},
        "weekly": {"used": 3, "limit": 350},
        "monthly": {"used": 3, "limit": 1500},
    }

    # Each usage row carries its cost.
    rows = await usage_rows(livegate, account.user.id)
    assert [r.cost for r in rows] == pytest.approx([cost_a, cost_a, cost_b])


async def test_usage_filters_by_model_and_dates(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(providers=[priced_provider(fake_upstream)])
    account = await livegate.account()
    before, after = await make_usage(livegate, fake_upstream, account.token)
    await wait_for_rows(livegate, account.user.id, all_final(3))

    async def usage(**params: str) -> dict[str, Any]:
        data = assert_ok(
            await call(livegate, "GET", "/api/v1/ai/usage", account.token, params=params)
        )
        return data["usage"]  # type: ignore[no-any-return]

    only_b = await usage(model=MODEL_B)
    assert (only_b["total_requests"], only_b["total_tokens"]) == (1, 15)
    assert only_b["total_cost"] == pytest.approx(cost(PRICE_B, 11, 4))
    assert set(only_b["by_model"]) == {MODEL_B}
    assert [(d["requests"], d["tokens"]) for d in only_b["by_date"]] == [(1, 15)]
    nothing = await usage(model="no-such-model")
    assert (nothing["total_requests"], nothing["by_model"], nothing["by_date"]) == (0, {}, [])

    past = await usage(start_date="2020-01-01", end_date="2020-01-31")
    assert past["total_requests"] == 0
    assert past["total_tokens"] == 0
    assert past["total_cost"] == 0
    assert past["by_model"] == {} and past["by_date"] == []
    # A day's end_date includes that whole day.
    assert past["start_date"] == "2020-01-01T00:00:00.000Z"
    assert past["end_date"] == "2020-02-01T00:00:00.000Z"

    today = before.date().isoformat()
    todays = await usage(start_date=today, end_date=after.date().isoformat())
    assert todays["total_requests"] == 3
    since = await usage(start_date=(before - timedelta(minutes=1)).isoformat())
    assert since["total_requests"] == 3
    until = await usage(end_date=(before - timedelta(days=1)).date().isoformat())
    assert until["total_requests"] == 0


@pytest.mark.parametrize(
    "params",
    [
        {"start_date": "notadate"},
        {"end_date": "2020-13-01"},
        {"start_date": "2020-02-01", "end_date": "2020-01-01"},
        {"start_date": "2020-01-01", "end_date": "2022-01-01"},
        {"start_date": "2999-01-01"},
    ],
    ids=["garbage", "bad-month", "reversed", "over-a-year", "future-start"],
)
async def test_bad_usage_dates_are_400(livegate: Livegate, params: dict[str, str]):
    account = await livegate.account()
    assert_error(
        await call(livegate, "GET", "/api/v1/ai/usage", account.token, params=params),
        400,
        "VALIDATION_ERROR",
    )


async def test_usage_is_the_callers_own(start_livegate: StartLivegate, fake_upstream: FakeUpstream):
    livegate = await start_livegate(providers=[priced_provider(fake_upstream)])
    account = await livegate.account()
    other = await livegate.account()
    await make_usage(livegate, fake_upstream, account.token)
    data = assert_ok(await call(livegate, "GET", "/api/v1/ai/usage", other.token))
    assert data["usage"]["total_requests"] == 0
    assert data["quota"]["daily"] == {"used": 0, "limit": 50}
    listed = assert_ok(await call(livegate, "GET", "/api/v1/usage", other.token))
    assert listed["items"] == [] and listed["pagination"]["total"] == 0


# --- the usage list -------------------------------------------------------------------


async def test_usage_list_is_paginated_and_sorted(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(providers=[priced_provider(fake_upstream)])
    account = await livegate.account()
    await make_usage(livegate, fake_upstream, account.token)
    await wait_for_rows(livegate, account.user.id, all_final(3))

    async def page(**params: Any) -> dict[str, Any]:
        return assert_ok(
            await call(livegate, "GET", "/api/v1/usage", account.api_key, params=params)
        )

    everything = await page()
    assert set(everything) == {"items", "pagination"}
    assert everything["pagination"] == {
        "page": 1,
        "limit": 20,
        "total": 3,
        "pages": 1,
        "has_next": False,
        "has_prev": False,
    }
    items = everything["items"]
    assert [i["model"] for i in items] == [MODEL_B, FAKE_MODEL, FAKE_MODEL]  # newest first
    newest = items[0]
    assert set(newest) == {
        "id",
        "request_id",
        "model",
        "provider",
        "status",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost",
        "stream",
        "device_id",
        "platform",
        "started_at",
        "finished_at",
    }
    assert (newest["provider"], newest["status"], newest["finish_reason"]) == (
        "fake",
        "completed",
        "stop",
    )
    assert (newest["prompt_tokens"], newest["completion_tokens"], newest["total_tokens"]) == (
        11,
        4,
        15,
    )
    assert newest["cost"] == pytest.approx(cost(PRICE_B, 11, 4))
    assert newest["stream"] is False
    assert ISO_MS.match(newest["started_at"]) and ISO_MS.match(newest["finished_at"])
    assert (items[1]["device_id"], items[1]["platform"]) == ("device-1", "web")
    assert (newest["device_id"], newest["platform"]) == (None, None)
    started = [i["started_at"] for i in items]
    assert started == sorted(started, reverse=True)

    ascending = await page(sort="asc")
    assert [i["id"] for i in ascending["items"]] == [i["id"] for i in reversed(items)]
    assert (await page(sort="desc"))["items"] == items

    first = await page(page=1, limit=2)
    assert [i["id"] for i in first["items"]] == [i["id"] for i in items[:2]]
    assert first["pagination"] == {
        "page": 1,
        "limit": 2,
        "total": 3,
        "pages": 2,
        "has_next": True,
        "has_prev": False,
    }
    second = await page(page=2, limit=2)
    assert [i["id"] for i in second["items"]] == [items[2]["id"]]
    assert second["pagination"] == {
        "page": 2,
        "limit": 2,
        "total": 3,
        "pages": 2,
        "has_next": False,
        "has_prev": True,
    }
    beyond = await page(page=5, limit=2)
    assert beyond["items"] == []
    assert (beyond["pagination"]["has_next"], beyond["pagination"]["has_prev"]) == (False, True)
    last_asc = await page(page=2, limit=2, sort="asc")
    assert [i["id"] for i in last_asc["items"]] == [items[0]["id"]]


async def test_empty_usage_list(livegate: Livegate):
    account = await livegate.account()
    data = assert_ok(await call(livegate, "GET", "/api/v1/usage", account.token))
    assert data == {
        "items": [],
        "pagination": {
            "page": 1,
            "limit": 20,
            "total": 0,
            "pages": 0,
            "has_next": False,
            "has_prev": False,
        },
    }


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "101"},
        {"limit": "0"},
        {"limit": "abc"},
        {"page": "0"},
        {"page": "-1"},
        {"page": "two"},
        {"page": "+1"},
        {"limit": "1_0"},
        {"limit": " 10"},
        {"page": "\u0663"},
        {"sort": "sideways"},
    ],
    ids=[
        "limit-101",
        "limit-0",
        "limit-text",
        "page-0",
        "page-negative",
        "page-text",
        "page-signed",
        "limit-underscore",
        "limit-space",
        "page-arabic-digit",
        "sort",
    ],
)
async def test_bad_usage_list_params_are_400(livegate: Livegate, params: dict[str, str]):
    account = await livegate.account()
    assert_error(
        await call(livegate, "GET", "/api/v1/usage", account.token, params=params),
        400,
        "VALIDATION_ERROR",
    )


async def test_usage_list_limit_100_is_allowed(livegate: Livegate):
    account = await livegate.account()
    data = assert_ok(
        await call(livegate, "GET", "/api/v1/usage", account.token, params={"limit": "100"})
    )
    assert data["pagination"]["limit"] == 100


# --- permissions ---------------------------------------------------------------------


async def test_api_key_permissions_are_enforced(livegate: Livegate, fake_upstream: FakeUpstream):
    account = await livegate.account()
    read_only = await create_key(livegate, account.token, ["ai:read"])
    write_only = await create_key(livegate, account.token, ["ai:write"])
    usage_only = await create_key(livegate, account.token, ["usage:read"])
    chat_body = {"messages": HI}
    generate_body = {"prompt": "hi"}

    # Without ai:write: no chat, no generation, and nothing reaches the upstream.
    for key in (read_only, usage_only):
        for path, body in (("/api/v1/ai/chat", chat_body), ("/api/v1/ai/generate", generate_body)):
            error = assert_error(
                await call(livegate, "POST", path, key, json=body), 403, "AUTHORIZATION_ERROR"
            )
            assert error["details"]["required"] == "ai:write"
    assert fake_upstream.requests == []

    # Without usage:read: no usage report, no usage list.
    for key in (read_only, write_only):
        for path in ("/api/v1/ai/usage", "/api/v1/usage"):
            error = assert_error(await call(livegate, "GET", path, key), 403, "AUTHORIZATION_ERROR")
            assert error["details"]["required"] == "usage:read"
    # Without ai:read: no model list.
    for key in (write_only, usage_only):
        assert_error(
            await call(livegate, "GET", "/api/v1/ai/models", key), 403, "AUTHORIZATION_ERROR"
        )

    # Each key does what it may, by either header.
    assert_ok(await call(livegate, "POST", "/api/v1/ai/chat", write_only, json=chat_body))
    assert_ok(
        await call(
            livegate,
            "POST",
            "/api/v1/ai/generate",
            json=generate_body,
            headers={"X-API-Key": write_only},
        )
    )
    assert_ok(await call(livegate, "GET", "/api/v1/ai/models", read_only))
    report = assert_ok(await call(livegate, "GET", "/api/v1/ai/usage", usage_only))
    assert report["usage"]["total_requests"] == 2
    listed = assert_ok(await call(livegate, "GET", "/api/v1/usage", usage_only))
    assert listed["pagination"]["total"] == 2


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/ai/chat"),
        ("POST", "/api/v1/ai/generate"),
        ("GET", "/api/v1/ai/models"),
        ("GET", "/api/v1/ai/usage"),
        ("GET", "/api/v1/usage"),
    ],
)
async def test_ai_routes_require_authentication(
    livegate: Livegate, fake_upstream: FakeUpstream, method: str, path: str
):
    body = {"messages": HI, "prompt": "hi"} if method == "POST" else None
    for credential in (None, "not-a-token", f"sk-lg-{uuid.uuid4().hex}"):
        assert_error(
            await call(livegate, method, path, credential, json=body), 401, "AUTHENTICATION_ERROR"
        )
    assert fake_upstream.requests == []


@pytest.mark.parametrize("page", [str(10**30), str(2**62), "0", "-1"])
async def test_huge_or_bad_page_numbers_are_400_not_500(livegate: Livegate, page: str):
    account = await livegate.account()
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.get(
            "/api/v1/usage",
            params={"page": page},
            headers={"Authorization": f"Bearer {account.token}"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


@pytest.mark.parametrize(
    "end_date",
    [
        "9999-12-31",
        "0001-01-01",
        # In range as written, out of range in UTC.
        "9999-12-31T23:00:00-01:00",
        "0001-01-01T00:30:00+01:00",
    ],
)
async def test_dates_at_the_calendar_edges_are_400_not_500(livegate: Livegate, end_date: str):
    account = await livegate.account()
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.get(
            "/api/v1/ai/usage",
            params={"end_date": end_date},
            headers={"Authorization": f"Bearer {account.token}"},
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert error["message"] == "`end_date` is out of range"
