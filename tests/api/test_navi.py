"""Navi's surface: the SSE chat on `POST /api/chat` (daily message limit, metering, live
quota), `/api/user`, conversation and message sync, and `/api/health`.

Real servers on loopback (Livegate and the fake upstream), real SQLite or
PostgreSQL+Redis, the `httpx-sse` client for the chat and `websockets` for the quota
socket; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from httpx_sse import aconnect_sse
from websockets.asyncio.client import ClientConnection, connect

from app.core.config import CounterLimit, ProviderConfig, ServerConfig, TierConfig
from app.core.tables import messages, usage_logs, users
from tests.conftest import FAKE_MODEL, Account, Backend, Livegate, StartLivegate
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

WAIT = 10  # seconds: the bound on every wait for something the server should do
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
FREE_LIMIT = 3
ANONYMOUS_LIMIT = 2
# Small daily message limits; every other limit of these tiers is off.
NAVI_TIERS = {
    "free": TierConfig(counters={"chat_messages": CounterLimit(limit=FREE_LIMIT, per="day")}),
    "anonymous": TierConfig(
        counters={"chat_messages": CounterLimit(limit=ANONYMOUS_LIMIT, per="day")}
    ),
}


# --- helpers ---------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def expected_text(fake: FakeUpstream, count: int) -> str:
    return "".join(fake.token(i) for i in range(count))


async def chat_sse(
    livegate: Livegate,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[httpx.Response, list[str]]:
    """A Navi chat read to its end with httpx-sse: the response and every event's data."""
    async with (
        httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http,
        aconnect_sse(http, "POST", "/api/chat", json=body, headers=headers or {}) as source,
    ):
        assert source.response.status_code == 200, await source.response.aread()
        data = [event.data async for event in source.aiter_sse()]
        return source.response, data


def content_of(data: list[str]) -> list[str]:
    """The content of each event before `[DONE]`, which must end the stream."""
    assert data and data[-1] == "[DONE]", data
    assert data.count("[DONE]") == 1
    contents = []
    for item in data[:-1]:
        event = json.loads(item)
        assert set(event) == {"content"}, event
        assert isinstance(event["content"], str) and event["content"]
        contents.append(event["content"])
    return contents


async def post(
    livegate: Livegate,
    path: str,
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    all_headers = {**(bearer(token) if token else {}), **(headers or {})}
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http:
        return await http.post(path, json=body, headers=all_headers)


async def get(
    livegate: Livegate, path: str, token: str | None = None, **params: Any
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http:
        return await http.get(path, params=params, headers=bearer(token) if token else {})


async def delete(livegate: Livegate, path: str, token: str, **params: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http:
        return await http.delete(path, params=params, headers=bearer(token))


def assert_navi_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"success", "error"}, body
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True, body
    return body  # type: ignore[no-any-return]


async def usage_rows(livegate: Livegate, **where: str) -> list[sa.Row[Any]]:
    query = sa.select(usage_logs).order_by(usage_logs.c.started_at)
    for column, value in where.items():
        query = query.where(usage_logs.c[column] == value)
    async with livegate.services.engine.connect() as conn:
        return list(await conn.execute(query))


async def wait_for_rows(
    livegate: Livegate, accept: Callable[[list[sa.Row[Any]]], bool], **where: str
) -> list[sa.Row[Any]]:
    rows: list[sa.Row[Any]] = []
    for _ in range(500):
        rows = await usage_rows(livegate, **where)
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


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        message = await ws.recv()
    assert isinstance(message, str)
    decoded = json.loads(message)
    assert isinstance(decoded, dict)
    return decoded


async def recv_quota_until(
    ws: ClientConnection, done: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """Quota messages up to and including the first one `done` accepts (bounded)."""
    received: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(WAIT):
            while True:
                message = await recv_json(ws)
                if message.get("type") != "quota":
                    continue
                received.append(message)
                if done(message):
                    return received
    except TimeoutError:
        raise AssertionError(f"no awaited quota message within {WAIT}s; got {received}") from None


def next_utc_midnight(at: datetime) -> int:
    day = datetime(at.year, at.month, at.day, tzinfo=UTC)
    return int((day + timedelta(days=1)).timestamp())


def daily_limit_body(limit: int, reset_at: int) -> dict[str, Any]:
    return {
        "success": False,
        "error": {
            "code": "DAILY_LIMIT_REACHED",
            "message": f"You've used all {limit} messages for today. Come back tomorrow!",
            "remaining": 0,
            "resetAt": reset_at,
        },
    }


def random_ip() -> str:
    raw = uuid.uuid4().bytes
    return f"10.{raw[0]}.{raw[1]}.{raw[2] or 1}"


@pytest.fixture
def peer_is_the_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Leave the client address to Livegate (`trusted_proxies`), as production does:
    the harness's uvicorn would otherwise rewrite it from X-Forwarded-For itself."""
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "192.0.2.1")
    yield


# --- the chat stream ----------------------------------------------------------------


async def test_chat_streams_content_events_ending_with_done(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    fake_upstream.script.tokens = 6
    response, data = await chat_sse(
        livegate, {"message": "What is the capital of France?"}, bearer(account.token)
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    contents = content_of(data)
    assert len(contents) == 6
    assert "".join(contents) == expected_text(fake_upstream, 6)

    # The upstream got one user message, streamed, for the default chat model.
    sent = fake_upstream.requests[-1]
    assert sent["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert sent["stream"] is True
    assert sent["model"] == FAKE_MODEL


async def test_history_is_forwarded_as_prior_messages(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    history = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help you?"},
    ]
    _, data = await chat_sse(
        livegate,
        {"message": "What is the capital of France?", "history": history},
        bearer(account.token),
    )
    assert "".join(content_of(data)) == expected_text(fake_upstream, 8)
    assert fake_upstream.requests[-1]["messages"] == [
        *history,
        {"role": "user", "content": "What is the capital of France?"},
    ]


@pytest.mark.parametrize("chat_model", [None, "second-model"])
async def test_chat_uses_the_configured_chat_model_or_the_first(
    start_livegate: StartLivegate,
    fake_upstream: FakeUpstream,
    backend: Backend,
    chat_model: str | None,
):
    provider = ProviderConfig(
        name="fake",
        base_url=fake_upstream.base_url,
        api_key="sk-upstream",
        models=["first-model", "second-model"],
        read_timeout=30,
    )
    livegate = await start_livegate(
        providers=[provider],
        server=ServerConfig(redis_prefix=backend.redis_prefix, chat_model=chat_model),
    )
    account = await livegate.account()
    _, data = await chat_sse(livegate, {"message": "hi"}, bearer(account.token))
    content_of(data)
    expected = chat_model or "first-model"
    assert fake_upstream.requests[-1]["model"] == expected
    [row] = await wait_for_rows(livegate, all_final(1), user_id=account.user.id)
    assert row.model == expected


async def test_chat_is_metered_with_the_upstream_usage(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    fake_upstream.script.tokens = 9
    fake_upstream.script.prompt_tokens = 13
    request_id = uuid.uuid4().hex
    _, data = await chat_sse(
        livegate,
        {"message": "hello there"},
        {**bearer(account.token), "X-Request-Id": request_id},
    )
    assert len(content_of(data)) == 9
    [row] = await wait_for_rows(livegate, all_final(1), user_id=account.user.id)
    assert (row.status, row.finish_reason, row.error) == ("completed", "stop", None)
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (13, 9, 22)
    assert row.request_id == request_id
    assert row.stream == 1
    assert (row.model, row.provider) == (FAKE_MODEL, "fake")
    # The token quota counts it too.
    quota = (await get(livegate, "/api/usage/quota", account.token)).json()
    assert quota["used"] == 22


async def test_quota_socket_ticks_while_the_chat_streams(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    fake_upstream.script.tokens = 20
    fake_upstream.script.hold_after = 10  # the upstream waits after 10 tokens
    received: list[str] = []

    async def read_chat() -> None:
        async with (
            httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http,
            aconnect_sse(
                http, "POST", "/api/chat", json={"message": "hi"}, headers=bearer(account.token)
            ) as source,
        ):
            assert source.response.status_code == 200
            async for event in source.aiter_sse():
                received.append(event.data)

    async with connect(
        f"{livegate.ws_url}/ws/quota",
        additional_headers=bearer(account.token),
        open_timeout=WAIT,
    ) as ws:
        first = await recv_json(ws)
        assert first["type"] == "quota" and first["used"] == 0
        reader = asyncio.create_task(read_chat())
        try:
            await wait_until(lambda: len(received) >= 10, "10 content events")
            # Mid-stream: the 10 delivered tokens are checkpointed...
            [row] = await wait_for_rows(
                livegate,
                lambda rows: len(rows) == 1 and rows[0].completion_tokens == 10,
                user_id=account.user.id,
            )
            assert row.status == "streaming"
            # ...and the socket shows them while the chat is still open.
            ticks = await recv_quota_until(ws, lambda m: m["used"] == row.total_tokens)
            assert not reader.done()
            assert len(received) == 10
            used = [m["used"] for m in ticks]
            assert used == sorted(used) and used[-1] > 10
            fake_upstream.release.set()
            async with asyncio.timeout(WAIT):
                await reader
        finally:
            reader.cancel()
        assert "".join(content_of(received)) == expected_text(fake_upstream, 20)
        [row] = await wait_for_rows(livegate, all_final(1), user_id=account.user.id)
        assert (row.status, row.prompt_tokens, row.completion_tokens) == ("completed", 11, 20)
        await recv_quota_until(ws, lambda m: m["used"] == 31)


async def test_client_disconnect_bills_exactly_the_delivered_events(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    fake_upstream.script.tokens = 20
    fake_upstream.script.hold_after = 4
    delivered = 0
    async with (
        httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http,
        aconnect_sse(
            http, "POST", "/api/chat", json={"message": "hi"}, headers=bearer(account.token)
        ) as source,
    ):
        async for event in source.aiter_sse():
            assert set(json.loads(event.data)) == {"content"}
            delivered += 1
            if delivered == 4:
                break  # the client goes away while the upstream holds
    [row] = await wait_for_rows(livegate, all_final(1), user_id=account.user.id)
    assert row.status == "cancelled"
    assert row.completion_tokens == 4
    assert row.total_tokens == row.prompt_tokens + 4
    await wait_until(lambda: fake_upstream.streams[-1].closed_early, "upstream closed")
    assert not fake_upstream.streams[-1].finished
    quota = (await get(livegate, "/api/usage/quota", account.token)).json()
    assert quota["used"] == row.total_tokens


async def test_a_client_gone_before_the_first_event_is_not_counted_nor_billed(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(tiers=NAVI_TIERS)
    account = await livegate.account()
    fake_upstream.script.hold_start = True
    try:
        async with httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http:
            request = asyncio.create_task(
                http.post("/api/chat", json={"message": "hi"}, headers=bearer(account.token))
            )
            await wait_until(lambda: bool(fake_upstream.streams), "upstream called")
            request.cancel()  # the client leaves while the upstream is still silent
            with pytest.raises(asyncio.CancelledError):
                await request
        [row] = await wait_for_rows(livegate, all_final(1), user_id=account.user.id)
        assert (row.status, row.completion_tokens) == ("cancelled", 0)
    finally:
        fake_upstream.release.set()
    await wait_until(lambda: fake_upstream.streams[0].closed_early, "upstream closed")
    assert fake_upstream.streams[0].sent_tokens == 0
    # The message is given back (after the row ends: wait for it).
    for _ in range(WAIT * 50):
        if await chat_messages_used(livegate, account.user.id) == 0:
            break
        await asyncio.sleep(0.02)
    assert await chat_messages_used(livegate, account.user.id) == 0
    fake_upstream.script.hold_start = False
    content_of((await chat_sse(livegate, {"message": "hi"}, bearer(account.token)))[1])
    assert await chat_messages_used(livegate, account.user.id) == 1


async def chat_messages_used(livegate: Livegate, user_id: str) -> int:
    usage = await livegate.services.policy.counter_usage(user_id, "free", "chat_messages")
    return usage.used


async def test_anonymous_chat_is_metered_to_the_anonymous_user(
    start_livegate: StartLivegate,
    fake_upstream: FakeUpstream,
    backend: Backend,
    peer_is_the_client: None,
):
    server = ServerConfig(redis_prefix=backend.redis_prefix, trusted_proxies=["127.0.0.1/32"])
    livegate = await start_livegate(tiers=NAVI_TIERS, server=server)
    request_id = uuid.uuid4().hex
    fake_upstream.script.tokens = 5
    _, data = await chat_sse(
        livegate,
        {"message": "hi"},
        {"X-Request-Id": request_id, "X-Forwarded-For": random_ip()},
    )
    assert "".join(content_of(data)) == expected_text(fake_upstream, 5)
    [row] = await wait_for_rows(livegate, all_final(1), request_id=request_id)
    assert row.user_id == "anonymous"
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("completed", 11, 5)


# --- the daily message limit --------------------------------------------------------


async def test_daily_limit_refuses_the_fourth_message(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(tiers=NAVI_TIERS)
    account = await livegate.account()
    before = datetime.now(UTC)
    for remaining in range(FREE_LIMIT - 1, -1, -1):
        response, data = await chat_sse(livegate, {"message": "hi"}, bearer(account.token))
        content_of(data)
        assert response.headers["x-ratelimit-remaining"] == str(remaining)
        assert int(response.headers["x-ratelimit-reset"]) in {
            next_utc_midnight(before),
            next_utc_midnight(datetime.now(UTC)),
        }
    assert len(fake_upstream.requests) == FREE_LIMIT

    refused = await post(livegate, "/api/chat", {"message": "one more"}, account.token)
    after = datetime.now(UTC)
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert body["error"]["resetAt"] in {next_utc_midnight(before), next_utc_midnight(after)}
    assert body == daily_limit_body(FREE_LIMIT, body["error"]["resetAt"])
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.headers["x-ratelimit-reset"] == str(body["error"]["resetAt"])
    # Refused before the upstream, and nothing billed for it.
    assert len(fake_upstream.requests) == FREE_LIMIT
    rows = await wait_for_rows(livegate, all_final(FREE_LIMIT), user_id=account.user.id)
    assert all(r.status == "completed" for r in rows)

    # The limit is the user's: another user still chats.
    other = await livegate.account()
    _, data = await chat_sse(livegate, {"message": "hi"}, bearer(other.token))
    content_of(data)


async def test_daily_limit_headers_survive_a_request_rate(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    # As the built-in free tier: a request rate beside the daily message limit (a rate
    # far from reached here).
    tiers = {
        "free": TierConfig(
            requests_per_minute=600,
            burst=600,
            counters={"chat_messages": CounterLimit(limit=FREE_LIMIT, per="day")},
        )
    }
    livegate = await start_livegate(tiers=tiers)
    account = await livegate.account()
    before = datetime.now(UTC)
    response, data = await chat_sse(livegate, {"message": "hi"}, bearer(account.token))
    content_of(data)
    midnight = {next_utc_midnight(before), next_utc_midnight(datetime.now(UTC))}
    assert response.headers["x-ratelimit-remaining"] == str(FREE_LIMIT - 1)
    assert int(response.headers["x-ratelimit-reset"]) in midnight
    for _ in range(FREE_LIMIT - 1):
        await chat_sse(livegate, {"message": "hi"}, bearer(account.token))
    refused = await post(livegate, "/api/chat", {"message": "hi"}, account.token)
    assert refused.status_code == 429
    assert refused.json()["error"]["remaining"] == 0
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert int(refused.headers["x-ratelimit-reset"]) in midnight


async def test_pro_tier_has_no_daily_message_limit(livegate: Livegate, fake_upstream: FakeUpstream):
    account = await livegate.account(tier="pro")
    fake_upstream.script.tokens = 1
    for _ in range(25):  # more than the free tier's 20
        response, data = await chat_sse(livegate, {"message": "hi"}, bearer(account.token))
        assert content_of(data) == [fake_upstream.token(0)]
        assert "x-ratelimit-remaining" not in response.headers


async def test_free_tier_allows_twenty_messages_a_day(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    fake_upstream.script.tokens = 1
    for remaining in range(19, -1, -1):
        response, data = await chat_sse(livegate, {"message": "hi"}, bearer(account.token))
        content_of(data)
        assert response.headers["x-ratelimit-remaining"] == str(remaining)
    refused = await post(livegate, "/api/chat", {"message": "hi"}, account.token)
    assert refused.status_code == 429
    assert refused.json() == daily_limit_body(20, refused.json()["error"]["resetAt"])


async def test_anonymous_callers_are_limited_per_client_ip(
    start_livegate: StartLivegate,
    fake_upstream: FakeUpstream,
    backend: Backend,
    peer_is_the_client: None,
):
    server = ServerConfig(redis_prefix=backend.redis_prefix, trusted_proxies=["127.0.0.1/32"])
    livegate = await start_livegate(tiers=NAVI_TIERS, server=server)
    first_ip, second_ip = random_ip(), random_ip()
    for remaining in range(ANONYMOUS_LIMIT - 1, -1, -1):
        response, data = await chat_sse(livegate, {"message": "hi"}, {"X-Forwarded-For": first_ip})
        content_of(data)
        assert response.headers["x-ratelimit-remaining"] == str(remaining)
    refused = await post(
        livegate, "/api/chat", {"message": "hi"}, headers={"X-Forwarded-For": first_ip}
    )
    assert refused.status_code == 429
    assert refused.json() == daily_limit_body(ANONYMOUS_LIMIT, refused.json()["error"]["resetAt"])
    assert len(fake_upstream.requests) == ANONYMOUS_LIMIT

    # Another address has its own allowance.
    _, data = await chat_sse(livegate, {"message": "hi"}, {"X-Forwarded-For": second_ip})
    content_of(data)
    # A signed-in user behind the refused address is counted as themselves.
    account = await livegate.account()
    _, data = await chat_sse(
        livegate, {"message": "hi"}, {**bearer(account.token), "X-Forwarded-For": first_ip}
    )
    content_of(data)


async def test_forwarded_hops_are_read_as_addresses(
    start_livegate: StartLivegate,
    fake_upstream: FakeUpstream,
    backend: Backend,
    peer_is_the_client: None,
):
    server = ServerConfig(
        redis_prefix=backend.redis_prefix, trusted_proxies=["127.0.0.1/32", "172.31.0.0/16"]
    )
    livegate = await start_livegate(tiers=NAVI_TIERS, server=server)

    async def remaining(forwarded: str) -> str:
        response, data = await chat_sse(livegate, {"message": "hi"}, {"X-Forwarded-For": forwarded})
        content_of(data)
        return response.headers["x-ratelimit-remaining"]

    # One client, however a proxy spells its address: with a port, IPv4-mapped.
    client = random_ip()
    assert await remaining(f"{client}:4711") == "1"
    assert await remaining(f"::ffff:{client}") == "0"
    refused = await post(
        livegate, "/api/chat", {"message": "hi"}, headers={"X-Forwarded-For": client}
    )
    assert refused.status_code == 429
    # A hop that is no address (too long for any counter, too) is not the client: the
    # trusted proxy that passed it on is.
    raw = uuid.uuid4().bytes
    proxy = f"172.31.{raw[0]}.{raw[1] or 1}"
    assert await remaining(f"{'x' * 80}, {proxy}") == "1"
    assert await remaining(proxy) == "0"


async def test_failed_upstream_does_not_use_up_a_message(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(tiers=NAVI_TIERS)
    account = await livegate.account()
    fake_upstream.script.status = 503
    failed = await post(livegate, "/api/chat", {"message": "hi"}, account.token)
    assert failed.status_code == 502, failed.text
    assert failed.json()["success"] is False
    assert fake_upstream.requests  # it was tried

    fake_upstream.script.status = 200
    remaining = []
    for _ in range(FREE_LIMIT):
        response, data = await chat_sse(livegate, {"message": "hi"}, bearer(account.token))
        content_of(data)
        remaining.append(response.headers["x-ratelimit-remaining"])
    assert remaining == [str(n) for n in range(FREE_LIMIT - 1, -1, -1)]
    refused = await post(livegate, "/api/chat", {"message": "hi"}, account.token)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "DAILY_LIMIT_REACHED"

    rows = await wait_for_rows(livegate, all_final(FREE_LIMIT + 1), user_id=account.user.id)
    assert [r.status for r in rows] == ["error"] + ["completed"] * FREE_LIMIT
    assert rows[0].total_tokens == 0


async def test_monthly_request_quota_is_not_reported_as_todays_messages(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    tiers = {
        "free": TierConfig(
            monthly_requests=2,
            counters={"chat_messages": CounterLimit(limit=20, per="day")},
        )
    }
    livegate = await start_livegate(tiers=tiers)
    account = await livegate.account()
    for _ in range(2):
        _, data = await chat_sse(livegate, {"message": "hi"}, bearer(account.token))
        content_of(data)
    refused = await post(livegate, "/api/chat", {"message": "hi"}, account.token)
    assert refused.status_code == 429
    assert len(fake_upstream.requests) == 2
    error = refused.json()["error"]
    # Two messages of twenty were sent today: the refusal is the monthly request quota's.
    assert "today" not in error["message"] and "tomorrow" not in error["message"]


async def test_upstream_failing_mid_stream_ends_with_an_error_event(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    fake_upstream.script.tokens = 10
    fake_upstream.script.fail_after = 3
    _, data = await chat_sse(livegate, {"message": "hi"}, bearer(account.token))
    events = [json.loads(item) for item in data]
    assert [e["content"] for e in events[:3]] == [fake_upstream.token(i) for i in range(3)]
    assert len(events) == 4
    assert set(events[3]) == {"error"}
    assert events[3]["error"]["code"] == "INTERNAL_ERROR"
    [row] = await wait_for_rows(livegate, all_final(1), user_id=account.user.id)
    assert (row.status, row.completion_tokens) == ("error", 3)


# --- chat errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [{}, {"message": ""}, {"message": "   "}, {"message": 42}, {"history": []}],
    ids=["empty-object", "empty", "blank", "number", "history-only"],
)
async def test_missing_message_is_400_bad_request(
    livegate: Livegate, fake_upstream: FakeUpstream, body: dict[str, Any]
):
    account = await livegate.account()
    for token in (account.token, None):
        response = await post(livegate, "/api/chat", body, token)
        error = assert_navi_error(response, 400, "BAD_REQUEST")
        assert error["message"] == "Message is required"
    assert fake_upstream.requests == []


@pytest.mark.parametrize(
    "history",
    ["not a list", [{"role": "robot", "content": "x"}], [{"role": "user"}]],
    ids=["string", "bad-role", "no-content"],
)
async def test_malformed_history_is_400(
    livegate: Livegate, fake_upstream: FakeUpstream, history: Any
):
    account = await livegate.account()
    response = await post(
        livegate, "/api/chat", {"message": "hi", "history": history}, account.token
    )
    assert_navi_error(response, 400, "BAD_REQUEST")
    assert fake_upstream.requests == []


async def test_invalid_bearer_is_401_unauthorized(livegate: Livegate, fake_upstream: FakeUpstream):
    for token in ("not-a-token", "sk-lg-" + "0" * 40):
        response = await post(livegate, "/api/chat", {"message": "hi"}, token)
        assert_navi_error(response, 401, "UNAUTHORIZED")
    assert fake_upstream.requests == []


# --- /api/user and /api/health ---------------------------------------------------


async def test_user_shape(livegate: Livegate):
    account = await livegate.account()
    async with livegate.services.engine.begin() as conn:
        await conn.execute(
            users.update()
            .where(users.c.id == account.user.id)
            .values(first_name="John", last_name="Doe", image_url="https://img.example/p.png")
        )
    body = ok(await get(livegate, "/api/user", account.token))
    assert body == {
        "success": True,
        "user": {
            "id": account.user.id,
            "email": account.user.email,
            "firstName": "John",
            "lastName": "Doe",
            "profilePictureUrl": "https://img.example/p.png",
        },
    }


async def test_user_requires_auth(livegate: Livegate):
    assert_navi_error(await get(livegate, "/api/user"), 401, "UNAUTHORIZED")
    assert_navi_error(await get(livegate, "/api/user", "bad-token"), 401, "UNAUTHORIZED")


async def test_health(livegate: Livegate):
    response = await get(livegate, "/api/health")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"status", "timestamp"}
    assert body["status"] == "ok"
    assert ISO_Z.match(body["timestamp"])
    stamp = datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=5)


# --- conversations ------------------------------------------------------------------


async def create_conversation(
    livegate: Livegate, account: Account, conversation_id: str, title: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"id": conversation_id}
    if title is not None:
        body["title"] = title
    response = ok(await post(livegate, "/api/conversations", body, account.token))
    assert set(response) == {"success", "conversation"}
    conversation = response["conversation"]
    assert set(conversation) == {"id", "title", "createdAt", "updatedAt"}
    assert ISO_Z.match(conversation["createdAt"]) and ISO_Z.match(conversation["updatedAt"])
    return conversation  # type: ignore[no-any-return]


async def list_conversations(livegate: Livegate, account: Account, **params: Any) -> dict[str, Any]:
    body = ok(await get(livegate, "/api/conversations", account.token, **params))
    assert set(body) == {"success", "conversations", "total"}
    return body


async def save(
    livegate: Livegate, account: Account, conversation_id: str, batch: list[dict[str, str]]
) -> httpx.Response:
    return await post(
        livegate,
        "/api/messages",
        {"conversationId": conversation_id, "messages": batch},
        account.token,
    )


def batch_of(count: int, prefix: str = "m", start: int = 0) -> list[dict[str, str]]:
    return [
        {
            "id": f"{prefix}{i}",
            "role": "user" if i % 2 == 0 else "assistant",
            "content": f"content {prefix}{i}",
        }
        for i in range(start, start + count)
    ]


async def message_rows(livegate: Livegate, user_id: str, conversation_id: str) -> list[sa.Row[Any]]:
    async with livegate.services.engine.connect() as conn:
        return list(
            await conn.execute(
                sa.select(messages).where(
                    messages.c.user_id == user_id, messages.c.conversation_id == conversation_id
                )
            )
        )


async def test_create_conversation_with_client_id_is_idempotent(livegate: Livegate):
    account = await livegate.account()
    created = await create_conversation(livegate, account, "conv_abc123", "Chat about Paris")
    assert created["id"] == "conv_abc123"
    assert created["title"] == "Chat about Paris"
    assert created["createdAt"] == created["updatedAt"]

    again = await create_conversation(livegate, account, "conv_abc123", "Another title")
    assert again == created
    listed = await list_conversations(livegate, account)
    assert listed["total"] == 1
    assert listed["conversations"] == [created]

    untitled = await create_conversation(livegate, account, "conv_untitled")
    assert untitled["title"] == "New Conversation"


async def test_list_conversations_pages_newest_first(livegate: Livegate):
    account = await livegate.account()
    for cid in ("c1", "c2", "c3"):
        await create_conversation(livegate, account, cid, f"title {cid}")
    listed = await list_conversations(livegate, account)
    assert [c["id"] for c in listed["conversations"]] == ["c3", "c2", "c1"]
    assert listed["total"] == 3

    # Saving messages makes a conversation the most recently updated.
    assert ok(await save(livegate, account, "c1", batch_of(1)))["savedCount"] == 1
    listed = await list_conversations(livegate, account)
    assert [c["id"] for c in listed["conversations"]] == ["c1", "c3", "c2"]

    page = await list_conversations(livegate, account, limit=2)
    assert [c["id"] for c in page["conversations"]] == ["c1", "c3"]
    assert page["total"] == 3
    page = await list_conversations(livegate, account, limit=2, offset=2)
    assert [c["id"] for c in page["conversations"]] == ["c2"]
    assert page["total"] == 3
    page = await list_conversations(livegate, account, offset=10)
    assert page["conversations"] == [] and page["total"] == 3


async def test_delete_conversation_cascades_to_its_messages(livegate: Livegate):
    account = await livegate.account()
    await create_conversation(livegate, account, "doomed")
    await create_conversation(livegate, account, "kept")
    assert ok(await save(livegate, account, "doomed", batch_of(3, "d")))["savedCount"] == 3
    assert ok(await save(livegate, account, "kept", batch_of(2, "k")))["savedCount"] == 2
    assert len(await message_rows(livegate, account.user.id, "doomed")) == 3

    assert ok(await delete(livegate, "/api/conversations", account.token, id="doomed")) == {
        "success": True
    }
    assert await message_rows(livegate, account.user.id, "doomed") == []
    assert_navi_error(
        await get(livegate, "/api/messages", account.token, conversationId="doomed"),
        404,
        "NOT_FOUND",
    )
    listed = await list_conversations(livegate, account)
    assert [c["id"] for c in listed["conversations"]] == ["kept"] and listed["total"] == 1
    # The other conversation keeps its messages.
    kept = ok(await get(livegate, "/api/messages", account.token, conversationId="kept"))
    assert [m["id"] for m in kept["messages"]] == ["k0", "k1"]

    # Deleting again, or what never existed, is 404; re-creating starts empty.
    assert_navi_error(
        await delete(livegate, "/api/conversations", account.token, id="doomed"), 404, "NOT_FOUND"
    )
    await create_conversation(livegate, account, "doomed")
    again = ok(await get(livegate, "/api/messages", account.token, conversationId="doomed"))
    assert again["messages"] == []


async def test_devices_saving_the_same_messages_at_once_both_succeed(livegate: Livegate):
    # Two devices syncing one conversation send the same ids in different orders:
    # written in the order sent, PostgreSQL found them deadlocked and one got a 500.
    account = await livegate.account()
    await create_conversation(livegate, account, "synced")
    batch = batch_of(200, "s")
    for _ in range(3):
        first, second = await asyncio.gather(
            save(livegate, account, "synced", batch),
            save(livegate, account, "synced", batch[::-1]),
        )
        assert ok(first)["savedCount"] == ok(second)["savedCount"] == 200
    assert len(await message_rows(livegate, account.user.id, "synced")) == 200


async def test_conversations_are_private_to_their_user(livegate: Livegate):
    owner = await livegate.account()
    stranger = await livegate.account()
    mine = await create_conversation(livegate, owner, "shared-id", "Mine")
    assert ok(await save(livegate, owner, "shared-id", batch_of(2)))["savedCount"] == 2

    # The stranger sees nothing of it and cannot touch it.
    assert (await list_conversations(livegate, stranger))["total"] == 0
    assert_navi_error(
        await get(livegate, "/api/messages", stranger.token, conversationId="shared-id"),
        404,
        "NOT_FOUND",
    )
    assert_navi_error(await save(livegate, stranger, "shared-id", batch_of(1)), 404, "NOT_FOUND")
    assert_navi_error(
        await delete(livegate, "/api/conversations", stranger.token, id="shared-id"),
        404,
        "NOT_FOUND",
    )

    # The same ids are the stranger's own, independently.
    theirs = await create_conversation(livegate, stranger, "shared-id", "Theirs")
    assert theirs["title"] == "Theirs"
    changed = [{"id": "m0", "role": "user", "content": "the stranger's own m0"}]
    assert ok(await save(livegate, stranger, "shared-id", changed))["savedCount"] == 1
    assert ok(await delete(livegate, "/api/conversations", stranger.token, id="shared-id"))

    # The owner's conversation and messages are untouched.
    listed = await list_conversations(livegate, owner)
    assert listed["conversations"][0]["title"] == "Mine"
    assert listed["conversations"][0]["createdAt"] == mine["createdAt"]
    got = ok(await get(livegate, "/api/messages", owner.token, conversationId="shared-id"))
    assert [(m["id"], m["content"]) for m in got["messages"]] == [
        ("m0", "content m0"),
        ("m1", "content m1"),
    ]


async def test_conversation_routes_require_auth(livegate: Livegate):
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http:
        responses = [
            await http.get("/api/conversations"),
            await http.post("/api/conversations", json={"id": "x"}),
            await http.delete("/api/conversations", params={"id": "x"}),
            await http.get("/api/messages", params={"conversationId": "x"}),
            await http.post("/api/messages", json={"conversationId": "x", "messages": []}),
        ]
    for response in responses:
        assert_navi_error(response, 401, "UNAUTHORIZED")


# --- messages -------------------------------------------------------------------------


async def test_messages_are_listed_in_order_with_paging(livegate: Livegate):
    account = await livegate.account()
    await create_conversation(livegate, account, "conv")
    empty = ok(await get(livegate, "/api/messages", account.token, conversationId="conv"))
    assert empty == {"success": True, "messages": []}

    assert ok(await save(livegate, account, "conv", batch_of(3))) == {
        "success": True,
        "savedCount": 3,
    }
    assert ok(await save(livegate, account, "conv", batch_of(2, start=3)))["savedCount"] == 2

    listed = ok(await get(livegate, "/api/messages", account.token, conversationId="conv"))
    assert set(listed) == {"success", "messages"}
    got = listed["messages"]
    assert [m["id"] for m in got] == ["m0", "m1", "m2", "m3", "m4"]
    for message in got:
        assert set(message) == {"id", "conversationId", "role", "content", "createdAt"}
        assert message["conversationId"] == "conv"
        assert ISO_Z.match(message["createdAt"])
    assert got[0] == {
        "id": "m0",
        "conversationId": "conv",
        "role": "user",
        "content": "content m0",
        "createdAt": got[0]["createdAt"],
    }
    assert got[1]["role"] == "assistant"

    page = ok(
        await get(
            livegate, "/api/messages", account.token, conversationId="conv", limit=2, offset=1
        )
    )
    assert [m["id"] for m in page["messages"]] == ["m1", "m2"]
    page = ok(await get(livegate, "/api/messages", account.token, conversationId="conv", offset=4))
    assert [m["id"] for m in page["messages"]] == ["m4"]


async def test_saving_is_idempotent_on_message_id(livegate: Livegate):
    account = await livegate.account()
    await create_conversation(livegate, account, "conv")
    batch = batch_of(4)
    assert ok(await save(livegate, account, "conv", batch))["savedCount"] == 4
    first = ok(await get(livegate, "/api/messages", account.token, conversationId="conv"))
    assert ok(await save(livegate, account, "conv", batch))["savedCount"] == 4
    assert len(await message_rows(livegate, account.user.id, "conv")) == 4
    again = ok(await get(livegate, "/api/messages", account.token, conversationId="conv"))
    assert again == first

    # A re-post with changed content updates the message in place.
    edited = [{"id": "m1", "role": "assistant", "content": "edited answer"}]
    assert ok(await save(livegate, account, "conv", edited))["savedCount"] == 1
    rows = await message_rows(livegate, account.user.id, "conv")
    assert len(rows) == 4
    after = ok(await get(livegate, "/api/messages", account.token, conversationId="conv"))
    assert [m["id"] for m in after["messages"]] == ["m0", "m1", "m2", "m3"]
    assert after["messages"][1]["content"] == "edited answer"
    assert after["messages"][1]["createdAt"] == first["messages"][1]["createdAt"]
    assert [m["content"] for i, m in enumerate(after["messages"]) if i != 1] == [
        "content m0",
        "content m2",
        "content m3",
    ]


async def test_a_batch_of_500_is_accepted_and_501_refused(livegate: Livegate):
    account = await livegate.account()
    await create_conversation(livegate, account, "big")
    refused = await save(livegate, account, "big", batch_of(501))
    assert_navi_error(refused, 400, "BAD_REQUEST")
    assert await message_rows(livegate, account.user.id, "big") == []
    assert ok(await save(livegate, account, "big", batch_of(500)))["savedCount"] == 500
    assert len(await message_rows(livegate, account.user.id, "big")) == 500
    # The batch keeps the order it was sent in.
    listed = ok(
        await get(livegate, "/api/messages", account.token, conversationId="big", limit=1000)
    )
    assert [m["id"] for m in listed["messages"]] == [f"m{i}" for i in range(500)]
    default = ok(await get(livegate, "/api/messages", account.token, conversationId="big"))
    assert [m["id"] for m in default["messages"]] == [f"m{i}" for i in range(100)]


async def test_saving_a_message_id_of_another_conversation_leaves_that_one_alone(
    livegate: Livegate,
):
    account = await livegate.account()
    await create_conversation(livegate, account, "first")
    await create_conversation(livegate, account, "second")
    original = [{"id": "msg_1", "role": "user", "content": "in the first conversation"}]
    assert ok(await save(livegate, account, "first", original))["savedCount"] == 1
    reused = [{"id": "msg_1", "role": "user", "content": "in the second conversation"}]
    response = await save(livegate, account, "second", reused)
    # Refused whole, in the Navi envelope: an id names one message in one conversation.
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "CONFLICT"
    first = ok(await get(livegate, "/api/messages", account.token, conversationId="first"))
    assert [m["content"] for m in first["messages"]] == ["in the first conversation"]
    second = ok(await get(livegate, "/api/messages", account.token, conversationId="second"))
    assert second["messages"] == []


async def test_saving_into_a_missing_conversation_is_404(livegate: Livegate):
    account = await livegate.account()
    assert_navi_error(await save(livegate, account, "nowhere", batch_of(1)), 404, "NOT_FOUND")
    assert await message_rows(livegate, account.user.id, "nowhere") == []


INVALID_SAVES: dict[str, dict[str, Any]] = {
    "no-conversation-id": {"messages": batch_of(1)},
    "empty-conversation-id": {"conversationId": "", "messages": batch_of(1)},
    "long-conversation-id": {"conversationId": "c" * 129, "messages": batch_of(1)},
    "no-messages": {"conversationId": "conv"},
    "empty-messages": {"conversationId": "conv", "messages": []},
    "messages-object": {"conversationId": "conv", "messages": {"id": "m0"}},
    "bad-role": {
        "conversationId": "conv",
        "messages": [{"id": "m0", "role": "robot", "content": "x"}],
    },
    "no-id": {"conversationId": "conv", "messages": [{"role": "user", "content": "x"}]},
    "content-number": {
        "conversationId": "conv",
        "messages": [{"id": "m0", "role": "user", "content": 5}],
    },
    "message-string": {"conversationId": "conv", "messages": ["hello"]},
}


@pytest.mark.parametrize("case", sorted(INVALID_SAVES))
async def test_invalid_save_is_400(livegate: Livegate, case: str):
    account = await livegate.account()
    await create_conversation(livegate, account, "conv")
    response = await post(livegate, "/api/messages", INVALID_SAVES[case], account.token)
    assert_navi_error(response, 400, "BAD_REQUEST")
    assert await message_rows(livegate, account.user.id, "conv") == []


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/messages", {}),
        ("/api/messages", {"conversationId": ""}),
        ("/api/messages", {"conversationId": "conv", "limit": "abc"}),
        ("/api/messages", {"conversationId": "conv", "offset": "1.5"}),
        ("/api/messages", {"conversationId": "conv", "limit": "0"}),
        ("/api/messages", {"conversationId": "conv", "limit": "1001"}),
        ("/api/conversations", {"limit": "ten"}),
        ("/api/conversations", {"offset": "-1"}),
        ("/api/conversations", {"limit": "201"}),
        ("/api/conversations", {"offset": "+1"}),
        ("/api/conversations", {"limit": "\uff11"}),
    ],
    ids=[
        "messages-no-conversation",
        "messages-empty-conversation",
        "messages-limit-text",
        "messages-offset-fraction",
        "messages-limit-zero",
        "messages-limit-too-big",
        "conversations-limit-text",
        "conversations-offset-negative",
        "conversations-limit-too-big",
        "conversations-offset-signed",
        "conversations-limit-fullwidth-digit",
    ],
)
async def test_invalid_listing_is_400(livegate: Livegate, path: str, params: dict[str, str]):
    account = await livegate.account()
    await create_conversation(livegate, account, "conv")
    assert_navi_error(await get(livegate, path, account.token, **params), 400, "BAD_REQUEST")


@pytest.mark.parametrize(
    "body",
    [{}, {"id": ""}, {"id": 7}, {"id": "c", "title": 5}, {"id": "c", "title": "t" * 501}],
    ids=["no-id", "empty-id", "number-id", "number-title", "long-title"],
)
async def test_invalid_conversation_create_is_400(livegate: Livegate, body: dict[str, Any]):
    account = await livegate.account()
    response = await post(livegate, "/api/conversations", body, account.token)
    assert_navi_error(response, 400, "BAD_REQUEST")
    assert (await list_conversations(livegate, account))["total"] == 0


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "10", "offset": str(10**30)},
        {"limit": "10", "offset": str(2**63)},
        {"limit": str(10**30)},
    ],
    ids=["offset-huge", "offset-past-bigint", "limit-huge"],
)
async def test_huge_paging_numbers_are_400_not_500(livegate: Livegate, query: dict[str, str]):
    account = await livegate.account()
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.get(
            "/api/conversations",
            params=query,
            headers={"Authorization": f"Bearer {account.token}"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "BAD_REQUEST"
