"""Request rates and AI request quotas over HTTP, against real servers: exact counts
under concurrency (one instance, and two sharing Redis), the rate-limit headers of each
surface, each surface's 429 envelope, anonymous callers limited by client IP (with
`X-Forwarded-For` believed only from trusted proxies), and the daily/weekly/monthly
request quotas of the relay as `/api/auth/me` reports them.

Request rates in these tests refill at one a minute at most, so no token comes back
while a test runs: counts are exact whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from app.core.config import RateOverride, ServerConfig, TierConfig
from tests.conftest import FAKE_MODEL, Account, Backend, Livegate, StartLivegate
from tests.fake_upstream import FakeUpstream

BOTH = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
POSTGRES = pytest.mark.parametrize("backend", ["postgres"], indirect=True)

EPOCH = re.compile(r"^\d{10}$")
ISO_MILLIS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
RATE_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit",
    "ratelimit-policy",
)


# --- helpers ---------------------------------------------------------------------


def rate_tier(per_minute: int, burst: int, **extra: Any) -> dict[str, TierConfig]:
    return {"t": TierConfig(requests_per_minute=per_minute, burst=burst, **extra)}


def http(livegate: Livegate, connections: int = 100) -> httpx.AsyncClient:
    """A client with `connections` requests in flight at most (httpx's default: 100)."""
    return httpx.AsyncClient(
        base_url=livegate.base_url,
        timeout=30,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get(
    livegate: Livegate, path: str, token: str | None = None, **headers: str
) -> httpx.Response:
    all_headers = {**(bearer(token) if token else {}), **headers}
    async with http(livegate) as client:
        return await client.get(path, headers=all_headers)


def parse_structured(value: str) -> dict[str, str]:
    """`"tier";r=3;t=60` -> {"name": "tier", "r": "3", "t": "60"}."""
    name, *params = value.split(";")
    return {"name": name, **dict(p.split("=", 1) for p in params)}


def assert_rate_headers(response: httpx.Response, *, limit: int, remaining: int) -> None:
    h = response.headers
    assert int(h["x-ratelimit-limit"]) == limit, dict(h)
    assert int(h["x-ratelimit-remaining"]) == remaining, dict(h)
    policy = parse_structured(h["ratelimit-policy"])
    assert policy["name"] == '"tier"'
    assert int(policy["q"]) == limit
    current = parse_structured(h["ratelimit"])
    assert current["name"] == '"tier"'
    assert int(current["r"]) == remaining
    assert int(current["t"]) >= 0


def assert_sokuji_429(response: httpx.Response) -> int:
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["error"] == "Too many requests"
    retry = int(response.headers["retry-after"])
    assert body["retryAfter"] == retry >= 1
    assert isinstance(body["retryAfter"], int)
    return retry


def assert_openai_429(response: httpx.Response, code: str = "rate_limited") -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "rate_limit_error"
    assert error["code"] == code
    assert error["param"] is None
    assert isinstance(error["message"], str) and error["message"]
    assert int(response.headers["retry-after"]) >= 1


def assert_playground_429(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert set(body) == {"success", "error", "timestamp"}
    assert body["success"] is False
    assert ISO_MILLIS.match(body["timestamp"])
    error = body["error"]
    assert set(error) == {"message", "code", "details"}
    assert error["code"] == "RATE_LIMIT_EXCEEDED"
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)
    retry = int(response.headers["retry-after"])
    assert retry >= 1
    assert error["details"].get("retryAfter") == retry


async def burst_of(
    livegate: Livegate, path: str, token: str | None, count: int, connections: int = 100
) -> list[httpx.Response]:
    """`count` requests at once (at most `connections` of them in flight)."""
    async with http(livegate, connections) as client:
        headers = bearer(token) if token else {}
        return list(
            await asyncio.gather(*(client.get(path, headers=headers) for _ in range(count)))
        )


def assert_exactly_admitted(responses: list[httpx.Response], admitted: int, limit: int) -> None:
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: admitted, 429: len(responses) - admitted}, statuses
    ok = [r for r in responses if r.status_code == 200]
    # Each admitted request saw its own place in the bucket: limit-1 .. 0, once each.
    assert sorted(int(r.headers["x-ratelimit-remaining"]) for r in ok) == list(range(limit))
    for r in responses:
        assert int(r.headers["x-ratelimit-limit"]) == limit
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["x-ratelimit-remaining"]) == 0
            retry = assert_sokuji_429(r)
            assert retry <= 60  # one interval at 1/min


# Anonymous callers get the `anonymous` tier (the default tier if there is none);
# signed-in `free` users a different burst, to tell the two apart.
ANONYMOUS_TIERS = {
    "anonymous": TierConfig(requests_per_minute=1, burst=5),
    "free": TierConfig(requests_per_minute=1, burst=7),
}


@pytest.fixture
def isolated_server(backend: Backend) -> ServerConfig:
    """A Redis prefix of this test's own: IP buckets (`ip:127.0.0.1`) would otherwise
    be shared with every other postgres test of the session."""
    return ServerConfig(redis_prefix=f"{backend.redis_prefix}-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def peer_is_the_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the test server see the TCP peer as the client, as production does.

    The CLI runs uvicorn with `proxy_headers=False`; the test harness's uvicorn keeps
    the default, which rewrites the client from `X-Forwarded-For` for 127.0.0.1.
    Trusting no host here (a TEST-NET address) leaves that decision to Livegate.
    """
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "192.0.2.1")
    yield


# --- exact counts under concurrency ---------------------------------------------------


@BOTH
async def test_200_concurrent_requests_admit_exactly_the_burst(start_livegate: StartLivegate):
    livegate = await start_livegate(tiers=rate_tier(1, 60))
    account = await livegate.account(tier="t")
    responses = await burst_of(livegate, "/api/usage/quota", account.token, 200)
    assert_exactly_admitted(responses, 60, 60)
    # The limit holds afterwards too.
    assert_sokuji_429(await get(livegate, "/api/usage/quota", account.token))


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        "postgres",
    ],
    indirect=True,
)
async def test_200_requests_in_flight_at_once_still_admit_exactly_the_burst(
    start_livegate: StartLivegate,
):
    livegate = await start_livegate(tiers=rate_tier(1, 60))
    account = await livegate.account(tier="t")
    responses = await burst_of(livegate, "/api/usage/quota", account.token, 200, 250)
    assert_exactly_admitted(responses, 60, 60)


@POSTGRES
async def test_two_instances_share_one_limit(start_livegate: StartLivegate):
    first = await start_livegate(tiers=rate_tier(1, 60))
    second = await start_livegate(tiers=rate_tier(1, 60))
    account = await first.account(tier="t")
    split = await asyncio.gather(
        burst_of(first, "/api/usage/quota", account.token, 100),
        burst_of(second, "/api/usage/quota", account.token, 100),
    )
    responses = split[0] + split[1]
    assert_exactly_admitted(responses, 60, 60)
    # Both instances now refuse that user.
    for livegate in (first, second):
        assert_sokuji_429(await get(livegate, "/api/usage/quota", account.token))

    # Taking turns, one bucket counts down across both instances.
    other = await second.account(tier="t")
    remaining = []
    for livegate in (first, second, first, second):
        response = await get(livegate, "/api/usage/quota", other.token)
        assert response.status_code == 200
        remaining.append(int(response.headers["x-ratelimit-remaining"]))
    assert remaining == [59, 58, 57, 56]


@BOTH
async def test_users_have_separate_buckets(start_livegate: StartLivegate):
    livegate = await start_livegate(tiers=rate_tier(1, 3))
    spent, fresh = await livegate.account(tier="t"), await livegate.account(tier="t")
    for _ in range(3):
        assert (await get(livegate, "/api/usage/quota", spent.token)).status_code == 200
    assert_sokuji_429(await get(livegate, "/api/usage/quota", spent.token))
    response = await get(livegate, "/api/usage/quota", fresh.token)
    assert response.status_code == 200
    assert_rate_headers(response, limit=3, remaining=2)
    # A user's JWT and relay key are the same caller.
    assert_sokuji_429(await get(livegate, "/api/usage/quota", spent.api_key))


# --- headers and envelopes, per surface -----------------------------------------------


@BOTH
async def test_sokuji_headers_count_down_to_a_429(start_livegate: StartLivegate):
    livegate = await start_livegate(tiers=rate_tier(1, 5))
    account = await livegate.account(tier="t")
    started = time.time()
    responses = [await get(livegate, "/api/usage/quota", account.token) for _ in range(5)]
    refused = await get(livegate, "/api/usage/quota", account.token)
    ended = time.time()
    elapsed = ended - started

    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        assert_rate_headers(response, limit=5, remaining=4 - i)
        # Epoch seconds of the moment the bucket is full again: one minute per request
        # admitted so far, counted from the first.
        reset = response.headers["x-ratelimit-reset"]
        assert EPOCH.match(reset)
        full_in = 60 * (i + 1)
        assert started + full_in - elapsed - 1 <= int(reset) <= ended + full_in + 1
        assert parse_structured(response.headers["ratelimit-policy"])["w"] == "300"
        t = int(parse_structured(response.headers["ratelimit"])["t"])
        assert full_in - elapsed - 1 <= t <= full_in
        assert "x-ratelimit-endpoint" not in response.headers
        assert "x-ratelimit-identifier" not in response.headers
        assert "retry-after" not in response.headers

    retry = assert_sokuji_429(refused)
    # The next token comes one interval (60 s) after the first request was admitted.
    assert math.ceil(60 - elapsed) <= retry <= 60
    assert_rate_headers(refused, limit=5, remaining=0)
    assert EPOCH.match(refused.headers["x-ratelimit-reset"])
    body = refused.json()
    assert set(body) == {"error", "retryAfter", "details"}
    assert body["details"]["code"] == "rate_limited"


@BOTH
async def test_openai_surface_headers_and_429(start_livegate: StartLivegate):
    livegate = await start_livegate(tiers=rate_tier(1, 2))
    account = await livegate.account(tier="t")
    first = await get(livegate, "/v1/models", account.api_key)
    assert first.status_code == 200, first.text
    assert first.json()["data"][0]["id"] == FAKE_MODEL
    assert_rate_headers(first, limit=2, remaining=1)
    assert EPOCH.match(first.headers["x-ratelimit-reset"])
    assert "x-ratelimit-endpoint" not in first.headers
    assert (await get(livegate, "/v1/models", account.api_key)).status_code == 200
    refused = await get(livegate, "/v1/models", account.api_key)
    assert_openai_429(refused)
    assert_rate_headers(refused, limit=2, remaining=0)
    assert EPOCH.match(refused.headers["x-ratelimit-reset"])


@BOTH
async def test_openai_chat_is_refused_before_the_upstream(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(tiers=rate_tier(1, 1))
    account = await livegate.account(tier="t")
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with http(livegate) as client:
        ok = await client.post("/v1/chat/completions", headers=bearer(account.api_key), json=body)
        refused = await client.post(
            "/v1/chat/completions", headers=bearer(account.api_key), json=body
        )
    assert ok.status_code == 200, ok.text
    assert_openai_429(refused)
    assert len(fake_upstream.requests) == 1


@BOTH
async def test_playground_surface_headers_and_429(start_livegate: StartLivegate):
    livegate = await start_livegate(tiers=rate_tier(1, 3))
    account = await livegate.account(tier="t")
    started = time.time()
    responses = [await get(livegate, "/api/v1/api-keys", account.token) for _ in range(3)]
    ended = time.time()
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        assert response.json()["success"] is True
        assert_rate_headers(response, limit=3, remaining=2 - i)
        h = response.headers
        assert h["x-ratelimit-endpoint"] == "api-keys"
        assert h["x-ratelimit-identifier"] == "user"
        # The Playground's reset: an ISO time with milliseconds, a minute per request on.
        reset = h["x-ratelimit-reset"]
        assert ISO_MILLIS.match(reset), reset
        at = datetime.fromisoformat(reset.replace("Z", "+00:00")).timestamp()
        full_in = 60 * (i + 1)
        assert started + full_in - (ended - started) - 2 <= at <= ended + full_in + 1

    refused = await get(livegate, "/api/v1/api-keys", account.token)
    assert_playground_429(refused)
    assert_rate_headers(refused, limit=3, remaining=0)
    assert refused.headers["x-ratelimit-endpoint"] == "api-keys"
    assert refused.headers["x-ratelimit-identifier"] == "user"
    assert ISO_MILLIS.match(refused.headers["x-ratelimit-reset"])
    assert refused.json()["error"]["details"]["reason"] == "rate_limited"

    # /api/auth/me is the Playground's too: same envelope (and the same bucket).
    assert_playground_429(await get(livegate, "/api/auth/me", account.token))


@BOTH
async def test_retry_after_names_when_the_next_request_is_admitted(
    start_livegate: StartLivegate,
):
    """At 30/min (one every 2 s) with a burst of 2: the third is refused with a
    `Retry-After` of at most 2 s, and a request made once that has passed is admitted."""
    livegate = await start_livegate(tiers=rate_tier(30, 2))
    account = await livegate.account(tier="t")
    async with http(livegate) as client:
        statuses = [
            (await client.get("/api/usage/quota", headers=bearer(account.token))).status_code
            for _ in range(2)
        ]
        refused = await client.get("/api/usage/quota", headers=bearer(account.token))
        assert statuses == [200, 200]
        retry = assert_sokuji_429(refused)
        assert 1 <= retry <= 2
        await asyncio.sleep(retry)
        admitted = await client.get("/api/usage/quota", headers=bearer(account.token))
    assert admitted.status_code == 200, admitted.text
    assert_rate_headers(admitted, limit=2, remaining=0)


@BOTH
async def test_a_surface_override_is_its_own_bucket(start_livegate: StartLivegate):
    """Without an override every surface shares the caller's bucket; the Playground's
    own rate (`basic`: 30/min beside Sokuji's 60) is counted apart."""
    tiers = rate_tier(1, 3, surfaces={"playground": RateOverride(requests_per_minute=1, burst=2)})
    livegate = await start_livegate(tiers=tiers)
    account = await livegate.account(tier="t")
    # Sokuji and OpenAI paths draw on one bucket of 3.
    assert (await get(livegate, "/api/usage/quota", account.token)).status_code == 200
    assert (await get(livegate, "/v1/models", account.api_key)).status_code == 200
    third = await get(livegate, "/api/usage/quota", account.token)
    assert_rate_headers(third, limit=3, remaining=0)
    assert_openai_429(await get(livegate, "/v1/models", account.api_key))
    # The Playground's bucket of 2 is untouched by all that.
    first = await get(livegate, "/api/v1/api-keys", account.token)
    assert first.status_code == 200
    assert_rate_headers(first, limit=2, remaining=1)
    assert (await get(livegate, "/api/auth/me", account.token)).status_code == 200
    assert_playground_429(await get(livegate, "/api/v1/api-keys", account.token))


@BOTH
async def test_a_zero_rate_refuses_everything(start_livegate: StartLivegate):
    livegate = await start_livegate(tiers={"t": TierConfig(requests_per_minute=0)})
    account = await livegate.account(tier="t")
    for _ in range(3):
        retry = assert_sokuji_429(await get(livegate, "/api/usage/quota", account.token))
        assert retry == 60


@BOTH
async def test_an_unlimited_tier_is_never_limited(start_livegate: StartLivegate):
    livegate = await start_livegate(tiers={"t": TierConfig()})
    account = await livegate.account(tier="t")
    responses = await burst_of(livegate, "/api/usage/quota", account.token, 100)
    assert Counter(r.status_code for r in responses) == {200: 100}
    assert not any(name in responses[0].headers for name in RATE_HEADERS)


# --- anonymous callers, by IP ---------------------------------------------------------


@BOTH
async def test_anonymous_callers_are_limited_by_ip_and_401s_count(
    start_livegate: StartLivegate, isolated_server: ServerConfig, peer_is_the_client: None
):
    livegate = await start_livegate(tiers=ANONYMOUS_TIERS, server=isolated_server)
    responses = [await get(livegate, "/api/usage/quota") for _ in range(3)]
    # A bad credential is anonymous too: it cannot be used to guess tokens unlimited.
    responses += [await get(livegate, "/api/usage/quota", "not-a-token") for _ in range(2)]
    for i, response in enumerate(responses):
        assert response.status_code == 401, response.text
        assert_rate_headers(response, limit=5, remaining=4 - i)
    assert_sokuji_429(await get(livegate, "/api/usage/quota"))
    # Anonymous Playground calls say they were counted by IP.
    playground = await get(livegate, "/api/v1/api-keys")
    assert_playground_429(playground)
    assert playground.headers["x-ratelimit-identifier"] == "ip"
    assert playground.headers["x-ratelimit-endpoint"] == "api-keys"
    # A signed-in user from the same address has a bucket (and a tier) of their own.
    account = await livegate.account(tier="free")
    response = await get(livegate, "/api/usage/quota", account.token)
    assert response.status_code == 200
    assert_rate_headers(response, limit=7, remaining=6)


@BOTH
async def test_anonymous_playground_headers_name_the_ip(
    start_livegate: StartLivegate, isolated_server: ServerConfig, peer_is_the_client: None
):
    livegate = await start_livegate(tiers=ANONYMOUS_TIERS, server=isolated_server)
    response = await get(livegate, "/api/auth/me")
    assert response.status_code == 401
    assert response.headers["x-ratelimit-identifier"] == "ip"
    assert_rate_headers(response, limit=5, remaining=4)


@BOTH
async def test_forwarded_for_is_ignored_without_a_trusted_proxy(
    start_livegate: StartLivegate, isolated_server: ServerConfig, peer_is_the_client: None
):
    livegate = await start_livegate(tiers=ANONYMOUS_TIERS, server=isolated_server)
    for i in range(5):
        response = await get(livegate, "/api/usage/quota", **{"X-Forwarded-For": f"203.0.113.{i}"})
        assert response.status_code == 401
        assert_rate_headers(response, limit=5, remaining=4 - i)
    for spoof in ("203.0.113.99", "198.51.100.1, 203.0.113.100", "::1"):
        refused = await get(livegate, "/api/usage/quota", **{"X-Forwarded-For": spoof})
        assert_sokuji_429(refused)


@BOTH
async def test_forwarded_for_from_a_trusted_proxy_separates_clients(
    start_livegate: StartLivegate, backend: Backend, peer_is_the_client: None
):
    server = ServerConfig(
        trusted_proxies=["127.0.0.1/32"],
        redis_prefix=f"{backend.redis_prefix}-{uuid.uuid4().hex[:8]}",
    )
    livegate = await start_livegate(tiers=ANONYMOUS_TIERS, server=server)

    async def anonymous(forwarded: str | None) -> httpx.Response:
        headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
        return await get(livegate, "/api/usage/quota", **headers)

    for _ in range(5):
        assert (await anonymous("203.0.113.7")).status_code == 401
    assert_sokuji_429(await anonymous("203.0.113.7"))
    # Another client behind the same proxy has its own bucket...
    other = await anonymous("203.0.113.8")
    assert other.status_code == 401
    assert_rate_headers(other, limit=5, remaining=4)
    # ...and so does the proxy itself when it forwards nothing.
    own = await anonymous(None)
    assert own.status_code == 401
    assert_rate_headers(own, limit=5, remaining=4)
    # The client is the nearest untrusted hop: addresses a client writes in front of
    # its own are not believed, so they do not escape its bucket.
    assert_sokuji_429(await anonymous("198.51.100.1, 203.0.113.7"))
    assert_sokuji_429(await anonymous("10.9.9.9, 203.0.113.7"))
    # Trusted hops after the client are skipped, the client is still found.
    assert_sokuji_429(await anonymous("203.0.113.7, 127.0.0.1"))


@BOTH
async def test_webhooks_are_never_rate_limited(
    start_livegate: StartLivegate, isolated_server: ServerConfig, peer_is_the_client: None
):
    livegate = await start_livegate(tiers=ANONYMOUS_TIERS, server=isolated_server)
    async with http(livegate) as client:
        responses = [await client.post("/api/auth/webhook/clerk", content=b"{}") for _ in range(12)]
    for response in responses:
        assert response.status_code != 429, response.text
        assert not any(name in response.headers for name in RATE_HEADERS)
    # Nor did they draw on the caller's IP bucket.
    after = await get(livegate, "/api/usage/quota")
    assert after.status_code == 401
    assert_rate_headers(after, limit=5, remaining=4)


# --- AI request quotas through the relay ------------------------------------------------


def chat(stream: bool = False) -> dict[str, Any]:
    return {"model": FAKE_MODEL, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


async def post_chat(livegate: Livegate, account: Account, body: dict[str, Any]) -> httpx.Response:
    async with http(livegate) as client:
        return await client.post("/v1/chat/completions", headers=bearer(account.api_key), json=body)


async def me_quota(livegate: Livegate, account: Account) -> dict[str, Any]:
    response = await get(livegate, "/api/auth/me", account.token)
    assert response.status_code == 200, response.text
    quota = response.json()["data"]["quota"]
    assert isinstance(quota, dict)
    return quota


QUOTA_TIER = {"q": TierConfig(daily_requests=2, weekly_requests=10, monthly_requests=30)}


@BOTH
async def test_daily_request_quota_refuses_before_the_upstream(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(tiers=QUOTA_TIER)
    account = await livegate.account(tier="q")
    assert (await post_chat(livegate, account, chat())).status_code == 200
    assert (await post_chat(livegate, account, chat(stream=True))).status_code == 200
    for body in (chat(), chat(stream=True)):
        refused = await post_chat(livegate, account, body)
        assert_openai_429(refused, code="quota_exceeded")
        assert "daily" in refused.json()["error"]["message"].lower()
    assert len(fake_upstream.requests) == 2
    assert await me_quota(livegate, account) == {
        "daily": {"used": 2, "limit": 2},
        "weekly": {"used": 2, "limit": 10},
        "monthly": {"used": 2, "limit": 30},
    }


@BOTH
async def test_concurrent_chats_admit_exactly_the_daily_quota(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream
):
    livegate = await start_livegate(tiers={"q": TierConfig(daily_requests=5)})
    account = await livegate.account(tier="q")
    async with http(livegate) as client:
        responses = await asyncio.gather(
            *(
                client.post("/v1/chat/completions", headers=bearer(account.api_key), json=chat())
                for _ in range(20)
            )
        )
    assert Counter(r.status_code for r in responses) == {200: 5, 429: 15}
    assert len(fake_upstream.requests) == 5
    assert (await me_quota(livegate, account))["daily"] == {"used": 5, "limit": 5}


@BOTH
@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_failure_gives_the_request_back(
    start_livegate: StartLivegate, fake_upstream: FakeUpstream, stream: bool
):
    livegate = await start_livegate(tiers=QUOTA_TIER)
    account = await livegate.account(tier="q")
    assert (await post_chat(livegate, account, chat())).status_code == 200
    before = await me_quota(livegate, account)
    assert before["daily"] == {"used": 1, "limit": 2}

    fake_upstream.script.status = 503
    failed = await post_chat(livegate, account, chat(stream=stream))
    assert failed.status_code == 502, failed.text
    assert len(fake_upstream.requests) >= 2  # it did reach the upstream (maybe retried)
    assert await me_quota(livegate, account) == before

    # The request given back can be used: the daily quota of 2 still has one left.
    fake_upstream.script.status = 200
    assert (await post_chat(livegate, account, chat())).status_code == 200
    assert_openai_429(await post_chat(livegate, account, chat()), code="quota_exceeded")
    assert (await me_quota(livegate, account))["daily"] == {"used": 2, "limit": 2}


@BOTH
async def test_me_reports_the_free_tier_request_quota(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    """The Playground's example: free is 50 a day, 350 a week, 1500 a month."""
    account = await livegate.account(tier="free")
    assert await me_quota(livegate, account) == {
        "daily": {"used": 0, "limit": 50},
        "weekly": {"used": 0, "limit": 350},
        "monthly": {"used": 0, "limit": 1500},
    }
    for _ in range(3):
        assert (await post_chat(livegate, account, chat())).status_code == 200
    quota = await me_quota(livegate, account)
    assert {w: q["used"] for w, q in quota.items()} == {"daily": 3, "weekly": 3, "monthly": 3}
    # Other users are not charged for it.
    other = await livegate.account(tier="free")
    assert (await me_quota(livegate, other))["daily"]["used"] == 0
