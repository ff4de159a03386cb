"""Routing through providers: Anthropic translation, fallback chains, retries, prices."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
import sqlalchemy as sa

from app.core.config import ModelRoute, Price, ProviderConfig
from app.core.providers import estimate_prompt_tokens, estimate_tokens
from app.core.tables import usage_logs
from tests.conftest import Livegate, StartLivegate
from tests.fake_upstream import (
    FakeAnthropic,
    FakeUpstream,
    start_fake_anthropic,
    start_fake_upstream,
)


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    fake, server = await start_fake_anthropic()
    try:
        yield fake
    finally:
        await server.stop()


@pytest.fixture
async def second_upstream() -> AsyncIterator[FakeUpstream]:
    fake, server = await start_fake_upstream()
    try:
        yield fake
    finally:
        fake.release.set()
        await server.stop()


def client(livegate: Livegate, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{livegate.base_url}/v1", api_key=key, max_retries=0)


async def final_row(livegate: Livegate, user_id: str) -> sa.Row:
    for _ in range(300):
        async with livegate.services.engine.connect() as conn:
            row = (
                await conn.execute(sa.select(usage_logs).where(usage_logs.c.user_id == user_id))
            ).first()
        if row is not None and row.status != "streaming":
            return row
        await asyncio.sleep(0.02)
    raise AssertionError("usage row never finalized")


def anthropic_provider(fake: FakeAnthropic, **extra: object) -> ProviderConfig:
    return ProviderConfig(
        name="claude",
        kind="anthropic",
        base_url=fake.base_url,
        api_key="sk-ant-test",
        models=["claude-test"],
        **extra,  # type: ignore[arg-type]
    )


async def test_anthropic_non_stream_is_translated_both_ways(
    start_livegate: StartLivegate, fake_anthropic: FakeAnthropic
):
    livegate = await start_livegate(providers=[anthropic_provider(fake_anthropic)])
    account = await livegate.account()
    result = await client(livegate, account.api_key).chat.completions.create(
        model="claude-test",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello in French"},
        ],
        max_tokens=50,
        stop=["END"],
    )
    assert result.choices[0].message.content == "Bonjour le monde"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (17, 3)
    sent = fake_anthropic.requests[-1]
    assert sent["system"] == "Be brief."
    assert sent["messages"] == [{"role": "user", "content": "Say hello in French"}]
    assert sent["max_tokens"] == 50 and sent["stop_sequences"] == ["END"]
    headers = fake_anthropic.headers[-1]
    assert headers["x-api-key"] == "sk-ant-test"
    assert headers["anthropic-version"] == "2023-06-01"
    row = await final_row(livegate, account.user.id)
    assert (row.status, row.provider, row.prompt_tokens, row.completion_tokens) == (
        "completed",
        "claude",
        17,
        3,
    )


async def test_anthropic_stream_is_translated_to_openai_chunks(
    start_livegate: StartLivegate, fake_anthropic: FakeAnthropic
):
    livegate = await start_livegate(providers=[anthropic_provider(fake_anthropic)])
    account = await livegate.account()
    stream = await client(livegate, account.api_key).chat.completions.create(
        model="claude-test",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Bonjour le monde"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (17, 3)
    assert fake_anthropic.requests[-1]["stream"] is True
    row = await final_row(livegate, account.user.id)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("completed", 17, 3)


@pytest.mark.parametrize(
    "counts", [(), ("input_tokens",), ("output_tokens",)], ids=["none", "input", "output"]
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_anthropic_usage_missing_a_count_bills_livegates_own_counts(
    start_livegate: StartLivegate,
    fake_anthropic: FakeAnthropic,
    counts: tuple[str, ...],
    stream: bool,
):
    """As from an OpenAI-compatible upstream: not 0 for the count that was not sent."""
    fake_anthropic.usage_counts = counts
    livegate = await start_livegate(providers=[anthropic_provider(fake_anthropic)])
    account = await livegate.account()
    messages = [{"role": "user", "content": "Say hello in French, with a few more words"}]
    prompt_estimate = estimate_prompt_tokens(messages)
    api = client(livegate, account.api_key)
    if stream:
        chunks = [
            c
            async for c in await api.chat.completions.create(
                model="claude-test",
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            "Bonjour le monde"
        )
        # One usage chunk, with what was billed: the estimate and the delivered deltas.
        usages = [c.usage for c in chunks if c.usage is not None]
        assert [(u.prompt_tokens, u.completion_tokens) for u in usages] == [(prompt_estimate, 3)]
        completion_tokens = 3
    else:
        result = await api.chat.completions.create(
            model="claude-test",
            messages=messages,  # type: ignore[arg-type]
        )
        assert result.choices[0].message.content == "Bonjour le monde"
        completion_tokens = estimate_tokens("Bonjour le monde")
        # The answer tells the counts billed, as a stream's usage chunk does.
        assert result.usage is not None
        assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (
            prompt_estimate,
            completion_tokens,
        )
    row = await final_row(livegate, account.user.id)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == (
        "completed",
        prompt_estimate,
        completion_tokens,
    )
    assert prompt_estimate > 0 and completion_tokens > 0


_START = {"type": "message_start", "message": {"model": "claude-test"}}
_TEXT = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}


@pytest.mark.parametrize(
    ("answer", "events"),
    [
        ({"content": 5}, None),
        ({"content": "Hi"}, None),
        (None, [[1, 2]]),
        (None, ["message_start"]),
        (None, [{"type": "message_start", "message": "claude-test"}]),
        (None, [_START, {"type": "content_block_delta", "delta": "Hi"}]),
        (
            None,
            [_START, {"type": "content_block_delta", "delta": {"type": "text_delta", "text": 5}}],
        ),
        (None, [_START, _TEXT, {"type": "message_delta", "delta": {"stop_reason": ["end_turn"]}}]),
        (None, [_START, _TEXT, {"type": "error", "error": "overloaded"}]),
        (None, [_START, _TEXT, b"[" * 100_000 + b"]" * 100_000]),
    ],
    ids=[
        "content-number",
        "content-text",
        "event-array",
        "event-string",
        "message-string",
        "delta-string",
        "text-number",
        "stop-reason-array",
        "error-string",
        "event-too-deep",
    ],
)
async def test_anthropic_malformed_answer_is_an_upstream_error(
    start_livegate: StartLivegate,
    fake_anthropic: FakeAnthropic,
    answer: object,
    events: list[object] | None,
):
    """An answer or event of the wrong shape is the provider's fault (502 or an error
    event), never an internal error, and its row ends as `error` billing nothing."""
    fake_anthropic.answer, fake_anthropic.events = answer, events
    livegate = await start_livegate(providers=[anthropic_provider(fake_anthropic)])
    account = await livegate.account()
    body = {"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={**body, "stream": events is not None},
            headers={"Authorization": f"Bearer {account.api_key}"},
        )
    row = await final_row(livegate, account.user.id)
    assert row.status == "error"
    assert row.error.startswith("provider"), row.error
    if response.status_code == 200:  # the first events were fine: the error ends the stream
        assert events is not None
        last = json.loads(response.text.rsplit("data: ", 1)[-1])
        assert last["error"]["type"] == "upstream_error"
        # What reached the client is billed, and nothing else.
        assert row.completion_tokens == response.text.count('"content":"Hi"')
    else:
        assert response.status_code == 502, response.text
        assert response.json()["error"]["type"] == "upstream_error"
        assert (row.prompt_tokens, row.completion_tokens) == (0, 0)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_anthropic_error_event_quoting_a_lone_surrogate_ends_the_stream_and_row(
    start_livegate: StartLivegate, fake_anthropic: FakeAnthropic
):
    """`\\udc80` in a mid-stream error decodes to a lone surrogate: the client still gets
    the error event, and the row still ends billing what was delivered."""
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "x\udc80y"}}
    fake_anthropic.events = [_START, _TEXT, error]
    fake_anthropic.event_delay = 0.05  # the error comes after the stream started
    livegate = await start_livegate(providers=[anthropic_provider(fake_anthropic)])
    account = await livegate.account()
    body = {"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={**body, "stream": True},
            headers={"Authorization": f"Bearer {account.api_key}"},
        )
    assert response.status_code == 200
    last = json.loads(response.text.rsplit("data: ", 1)[-1])
    assert last["error"]["message"] == "provider error mid-stream: x?y"
    row = await final_row(livegate, account.user.id)
    assert (row.status, row.error) == ("error", "provider error mid-stream: x?y")
    assert row.completion_tokens == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_fallback_when_first_provider_fails_before_any_token(
    start_livegate: StartLivegate,
    fake_upstream: FakeUpstream,
    second_upstream: FakeUpstream,
    stream: bool,
):
    fake_upstream.script.status = 503
    second_upstream.script.tokens = 4
    providers = [
        ProviderConfig(
            name="primary", base_url=fake_upstream.base_url, models=["m-1"], max_retries=1
        ),
        ProviderConfig(
            name="backup",
            base_url=second_upstream.base_url,
            models=["m-2"],
            max_retries=0,
            prices={"m-2": Price(prompt=1000, completion=2000)},
        ),
    ]
    routes = [ModelRoute(name="smart", targets=["primary:m-1", "backup:m-2"])]
    livegate = await start_livegate(providers=providers, models=routes)
    account = await livegate.account()
    api = client(livegate, account.api_key)
    messages = [{"role": "user", "content": "hi"}]
    if stream:
        chunks = [
            c
            async for c in await api.chat.completions.create(
                model="smart", messages=messages, stream=True
            )
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        result = await api.chat.completions.create(model="smart", messages=messages)
        text = result.choices[0].message.content or ""
    assert text == "".join(second_upstream.token(i) for i in range(4))
    # The primary was tried once and retried once, then the backup answered.
    assert len(fake_upstream.requests) == 2
    assert [r["model"] for r in second_upstream.requests] == ["m-2"]
    row = await final_row(livegate, account.user.id)
    assert (row.model, row.provider, row.upstream_model) == ("smart", "backup", "m-2")
    assert (row.prompt_tokens, row.completion_tokens) == (11, 4)
    assert row.cost == pytest.approx((11 * 1000 + 4 * 2000) / 1_000_000)


async def test_client_errors_are_not_retried_or_passed_along_the_chain(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream, second_upstream: FakeUpstream
):
    fake_upstream.script.status = 400
    providers = [
        ProviderConfig(
            name="primary", base_url=fake_upstream.base_url, models=["m-1"], max_retries=3
        ),
        ProviderConfig(name="backup", base_url=second_upstream.base_url, models=["m-2"]),
    ]
    routes = [ModelRoute(name="smart", targets=["primary:m-1", "backup:m-2"])]
    livegate = await start_livegate(providers=providers, models=routes)
    account = await livegate.account()
    with pytest.raises(openai.BadRequestError):
        await client(livegate, account.api_key).chat.completions.create(
            model="smart", messages=[{"role": "user", "content": "hi"}]
        )
    assert len(fake_upstream.requests) == 1
    assert second_upstream.requests == []
    row = await final_row(livegate, account.user.id)
    assert (row.status, row.total_tokens) == ("error", 0)


async def test_every_target_failing_is_502_and_nothing_is_billed(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream, second_upstream: FakeUpstream
):
    fake_upstream.script.status = 500
    second_upstream.script.status = 503
    providers = [
        ProviderConfig(
            name="primary", base_url=fake_upstream.base_url, models=["m-1"], max_retries=0
        ),
        ProviderConfig(
            name="backup", base_url=second_upstream.base_url, models=["m-2"], max_retries=0
        ),
    ]
    routes = [ModelRoute(name="smart", targets=["primary:m-1", "backup:m-2"])]
    livegate = await start_livegate(providers=providers, models=routes)
    account = await livegate.account()
    with pytest.raises(openai.APIStatusError) as caught:
        await client(livegate, account.api_key).chat.completions.create(
            model="smart", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert caught.value.status_code == 502
    row = await final_row(livegate, account.user.id)
    assert (row.status, row.total_tokens, row.cost) == ("error", 0, 0)
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        me = await http.get("/api/auth/me", headers={"Authorization": f"Bearer {account.token}"})
    # The failed request was given back to the daily quota.
    assert me.json()["data"]["quota"]["daily"]["used"] == 0


async def test_models_lists_aliases_and_direct_models(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    providers = [ProviderConfig(name="p", base_url=fake_upstream.base_url, models=["m-1"])]
    routes = [ModelRoute(name="smart", targets=["p:m-1"], description="the smart one")]
    livegate = await start_livegate(providers=providers, models=routes)
    account = await livegate.account()
    models = await client(livegate, account.api_key).models.list()
    assert {m.id for m in models.data} == {"smart", "m-1"}
