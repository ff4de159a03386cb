"""The policy engine on a real database: AI request quotas per day/week/month, named
counters, per-action limits, and the calendar windows they are counted in.

Request quotas and counters are conditional SQL increments, so their limits must hold
exactly under concurrency on SQLite and on PostgreSQL; action limits run on the
in-process limiter (sqlite) or on Redis (postgres).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.config import ActionLimit, CounterLimit, TierConfig
from app.core.db import create_engine, migrate
from app.core.errors import RateLimited
from app.core.policy import REQUESTS, Policy, QuotaExhausted, WindowUsage
from app.core.quota import Increment, period_window
from app.core.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from app.core.tables import quota_counters
from tests.conftest import Backend, make_settings

BOTH = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

MakePolicy = Callable[..., Policy]


@dataclass
class PolicyEnv:
    engine: AsyncEngine
    limiter: RateLimiter
    backend: Backend

    def policy(self, tiers: dict[str, TierConfig] | None = None, **overrides: Any) -> Policy:
        settings = make_settings(self.backend, None, tiers=tiers or {}, **overrides)
        return Policy(settings, self.engine, self.limiter)


@pytest.fixture
async def env(backend: Backend) -> AsyncIterator[PolicyEnv]:
    engine = create_engine(backend.database_url)
    await migrate(engine)
    redis: Redis | None = None
    limiter: RateLimiter
    if backend.redis_url:
        redis = Redis.from_url(backend.redis_url, max_connections=256)
        limiter = RedisRateLimiter(redis, f"{backend.redis_prefix}-policy-{uuid.uuid4().hex[:8]}")
    else:
        limiter = LocalRateLimiter()
    try:
        yield PolicyEnv(engine, limiter, backend)
    finally:
        if redis is not None:
            await redis.aclose()
        await engine.dispose()


def subject() -> str:
    return uuid.uuid4().hex


def windows(usage: dict[str, WindowUsage]) -> dict[str, int]:
    return {window: u.used for window, u in usage.items()}


async def outcomes(calls: list[Any]) -> tuple[list[Any], list[BaseException]]:
    """Run the calls at once; the results and the exceptions, apart."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    return ok, failed


def resets_now() -> dict[str, set[datetime | None]]:
    """Each window's reset instant, as of now (a set: the test may straddle midnight)."""
    return {
        window: {period_window(per, datetime.now(UTC))[1]}
        for window, per in (("daily", "day"), ("weekly", "week"), ("monthly", "month"))
    }


# --- period_window ---------------------------------------------------------------------


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("per", "now", "key", "reset"),
    [
        (
            "minute",
            utc(2025, 3, 9, 14, 7, 42, 123456),
            "n:202503091407",
            utc(2025, 3, 9, 14, 8),
        ),
        ("minute", utc(2025, 12, 31, 23, 59, 59), "n:202512312359", utc(2026, 1, 1)),
        ("hour", utc(2025, 3, 9, 14, 7, 42), "h:2025030914", utc(2025, 3, 9, 15)),
        ("hour", utc(2025, 3, 9, 23, 0), "h:2025030923", utc(2025, 3, 10)),
        ("day", utc(2025, 3, 9, 0, 0), "d:2025-03-09", utc(2025, 3, 10)),
        ("day", utc(2025, 3, 9, 23, 59, 59, 999999), "d:2025-03-09", utc(2025, 3, 10)),
        ("day", utc(2024, 2, 28, 12), "d:2024-02-28", utc(2024, 2, 29)),
        ("day", utc(2025, 12, 31, 12), "d:2025-12-31", utc(2026, 1, 1)),
        # ISO weeks, Monday 00:00 UTC to Monday 00:00 UTC.
        ("week", utc(2025, 3, 9, 23, 59), "w:2025-W10", utc(2025, 3, 10)),  # a Sunday
        ("week", utc(2025, 3, 10, 0, 0), "w:2025-W11", utc(2025, 3, 17)),  # a Monday
        ("week", utc(2025, 3, 12, 8), "w:2025-W11", utc(2025, 3, 17)),  # a Wednesday
        ("week", utc(2024, 12, 30, 9), "w:2025-W01", utc(2025, 1, 6)),  # ISO year ahead
        ("week", utc(2021, 1, 3, 9), "w:2020-W53", utc(2021, 1, 4)),  # ISO year behind
        ("month", utc(2025, 3, 31, 23, 59, 59), "m:2025-03", utc(2025, 4, 1)),
        ("month", utc(2025, 12, 1), "m:2025-12", utc(2026, 1, 1)),  # December -> January
        ("month", utc(2024, 2, 29, 12), "m:2024-02", utc(2024, 3, 1)),
        ("lifetime", utc(2025, 3, 9), "all", None),
    ],
)
def test_period_window(per: str, now: datetime, key: str, reset: datetime | None):
    assert period_window(per, now) == (key, reset)


def test_period_window_reads_other_time_zones_in_utc():
    # 01:30 on Monday in UTC+2 is still Sunday 23:30 UTC.
    at = datetime(2025, 3, 10, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert period_window("day", at) == ("d:2025-03-09", utc(2025, 3, 10))
    assert period_window("week", at) == ("w:2025-W10", utc(2025, 3, 10))
    assert period_window("hour", at) == ("h:2025030923", utc(2025, 3, 10))
    assert period_window("minute", at)[1] == utc(2025, 3, 9, 23, 31)
    # 23:30 on 31 December in UTC-5 is already January in UTC.
    new_year = datetime(2025, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert period_window("month", new_year) == ("m:2026-01", utc(2026, 2, 1))


def test_period_window_resets_are_after_now_and_windows_are_contiguous():
    now = utc(2025, 3, 9, 14, 7, 42)
    for per in ("minute", "hour", "day", "week", "month"):
        key, reset = period_window(per, now)
        assert reset is not None and reset > now
        # The instant of the reset opens the next window; the one before closes this one.
        assert period_window(per, reset)[0] != key
        assert period_window(per, reset - timedelta(microseconds=1))[0] == key


def test_period_window_refuses_unknown_periods():
    with pytest.raises(ValueError, match="fortnight"):
        period_window("fortnight", utc(2025, 1, 1))


@pytest.mark.parametrize(
    "per",
    [
        "minute",
        "hour",
        "day",
        "week",
        "month",
        "lifetime",
    ],
)
def test_period_keys_fit_the_counter_column(per: str):
    length = quota_counters.c.period.type.length
    assert len(period_window(per, utc(2025, 12, 31, 23, 59, 59))[0]) <= length


# --- AI request quotas ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_request_windows_are_the_calendar_windows_of_each_utc_day(env: PolicyEnv) -> None:
    policy = env.policy()
    # The last instant of a week, month and year, then the first of the next ones.
    for at in (utc(2025, 12, 31, 23, 59, 59, 999999), utc(2026, 1, 1), utc(2026, 1, 1, 18)):
        expected = tuple(period_window(per, at) for per in ("day", "week", "month"))
        assert policy._request_windows(at) == expected


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_request_increments_are_the_tiers_limits_in_todays_windows(env: PolicyEnv) -> None:
    policy = env.policy({"q": TierConfig(daily_requests=5, monthly_requests=90)})

    def expected(at: datetime) -> tuple[Increment, ...]:
        limits = (5, None, 90)
        return tuple(
            Increment(REQUESTS, period_window(per, at)[0], 1, limit)
            for per, limit in zip(("day", "week", "month"), limits, strict=True)
        )

    now = datetime.now(UTC)
    assert policy.ai_request_increments("q") == expected(now)
    assert policy.ai_request_increments("free") != expected(now)  # each tier its own
    # Kept from a day that has passed (a server running over midnight): made again.
    yesterday = now - timedelta(days=1)
    policy._request_windows(yesterday)
    policy._increments["q"] = expected(yesterday)
    assert policy.ai_request_increments("q") == expected(datetime.now(UTC))


@BOTH
async def test_100_concurrent_requests_admit_exactly_the_daily_limit(env: PolicyEnv):
    policy = env.policy({"q": TierConfig(daily_requests=60)})
    who = subject()
    ok, failed = await outcomes([policy.consume_ai_request(who, "q") for _ in range(100)])
    assert len(ok) == 60 and len(failed) == 40
    assert all(isinstance(e, QuotaExhausted) for e in failed), failed
    assert {e.window for e in failed} == {"daily"}  # type: ignore[attr-defined]
    # Each admitted call saw its own count: 1..60, no two alike.
    assert sorted(u["daily"].used for u in ok) == list(range(1, 61))
    usage = await policy.ai_request_usage(who, "q")
    assert windows(usage) == {"daily": 60, "weekly": 60, "monthly": 60}
    assert usage["daily"].remaining == 0
    # Nothing more gets through afterwards.
    with pytest.raises(QuotaExhausted):
        await policy.consume_ai_request(who, "q")


@BOTH
@pytest.mark.parametrize(
    ("tight", "tier"),
    [
        ("weekly", TierConfig(daily_requests=100, weekly_requests=3, monthly_requests=100)),
        ("monthly", TierConfig(daily_requests=100, weekly_requests=100, monthly_requests=3)),
        ("daily", TierConfig(daily_requests=3, weekly_requests=100, monthly_requests=100)),
    ],
)
async def test_the_tightest_window_refuses_and_refusals_count_nowhere(
    env: PolicyEnv, tight: str, tier: TierConfig
):
    policy = env.policy({"q": tier})
    who = subject()
    for n in range(1, 4):
        usage = await policy.consume_ai_request(who, "q")
        assert windows(usage) == {"daily": n, "weekly": n, "monthly": n}
    for _ in range(5):
        with pytest.raises(QuotaExhausted) as caught:
            await policy.consume_ai_request(who, "q")
        refusal = caught.value
        assert refusal.window == tight
        assert str(refusal) == f"{tight.capitalize()} request limit reached"
        assert (refusal.usage.used, refusal.usage.limit) == (3, 3)
        assert refusal.status_code == 429 and refusal.code == "quota_exceeded"
    # All or none: the refused calls left every window where it was.
    assert windows(await policy.ai_request_usage(who, "q")) == {
        "daily": 3,
        "weekly": 3,
        "monthly": 3,
    }


@BOTH
async def test_concurrent_refusals_by_a_later_window_count_nowhere(env: PolicyEnv):
    policy = env.policy({"q": TierConfig(daily_requests=1000, weekly_requests=10)})
    who = subject()
    ok, failed = await outcomes([policy.consume_ai_request(who, "q") for _ in range(50)])
    assert len(ok) == 10 and len(failed) == 40
    assert {e.window for e in failed} == {"weekly"}  # type: ignore[attr-defined]
    usage = await policy.ai_request_usage(who, "q")
    assert windows(usage) == {"daily": 10, "weekly": 10, "monthly": 10}
    assert usage["daily"].remaining == 990
    assert usage["monthly"].limit is None and usage["monthly"].remaining is None


@BOTH
async def test_refusal_details_and_retry_after(env: PolicyEnv):
    policy = env.policy({"q": TierConfig(daily_requests=1)})
    who = subject()
    await policy.consume_ai_request(who, "q")
    with pytest.raises(QuotaExhausted) as caught:
        await policy.consume_ai_request(who, "q")
    refusal = caught.value
    _, midnight = period_window("day", datetime.now(UTC))
    assert midnight is not None
    assert refusal.details == {
        "window": "daily",
        "used": 1,
        "limit": 1,
        "resetAt": int(midnight.timestamp()),
    }
    retry = int(refusal.headers["Retry-After"])
    assert 1 <= retry <= 86_400
    # The seconds until the daily window resets, not some fixed figure.
    seconds_to_midnight = (midnight - datetime.now(UTC)).total_seconds()
    assert seconds_to_midnight - 5 <= retry <= seconds_to_midnight + 1


@BOTH
async def test_refund_gives_one_request_back(env: PolicyEnv):
    policy = env.policy({"q": TierConfig(daily_requests=2, weekly_requests=5)})
    who = subject()
    started = datetime.now(UTC)
    await policy.consume_ai_request(who, "q")
    await policy.consume_ai_request(who, "q")
    with pytest.raises(QuotaExhausted):
        await policy.consume_ai_request(who, "q")

    await policy.refund_ai_request(who, started)
    assert windows(await policy.ai_request_usage(who, "q")) == {
        "daily": 1,
        "weekly": 1,
        "monthly": 1,
    }
    # The refunded request can be made again, and only that one.
    await policy.consume_ai_request(who, "q")
    with pytest.raises(QuotaExhausted):
        await policy.consume_ai_request(who, "q")


@BOTH
async def test_refund_is_counted_in_the_windows_of_the_request(env: PolicyEnv):
    """A refund gives the request back to the day it was made in, not the current one."""
    policy = env.policy({"q": TierConfig(daily_requests=5)})
    who = subject()
    await policy.consume_ai_request(who, "q")
    yesterday = datetime.now(UTC) - timedelta(days=1)
    await policy.refund_ai_request(who, yesterday)
    assert (await policy.ai_request_usage(who, "q"))["daily"].used == 1


@BOTH
async def test_request_usage_reports_used_limit_and_reset(env: PolicyEnv):
    policy = env.policy({"q": TierConfig(daily_requests=5, weekly_requests=20)})
    who = subject()
    before = resets_now()
    fresh = await policy.ai_request_usage(who, "q")
    assert windows(fresh) == {"daily": 0, "weekly": 0, "monthly": 0}
    for _ in range(3):
        await policy.consume_ai_request(who, "q")
    usage = await policy.ai_request_usage(who, "q")
    after = resets_now()
    assert list(usage) == ["daily", "weekly", "monthly"]
    assert (usage["daily"].used, usage["daily"].limit, usage["daily"].remaining) == (3, 5, 2)
    assert (usage["weekly"].used, usage["weekly"].limit, usage["weekly"].remaining) == (3, 20, 17)
    assert (usage["monthly"].used, usage["monthly"].limit) == (3, None)
    for window, u in usage.items():
        assert u.reset_at in before[window] | after[window]
    # Another subject's usage is its own.
    assert windows(await policy.ai_request_usage(subject(), "q")) == {
        "daily": 0,
        "weekly": 0,
        "monthly": 0,
    }


@BOTH
async def test_builtin_free_tier_request_quotas(env: PolicyEnv):
    """The Playground's free tier: 50 a day, 350 a week, 1500 a month."""
    policy = env.policy()
    usage = await policy.ai_request_usage(subject(), "free")
    assert {w: u.limit for w, u in usage.items()} == {
        "daily": 50,
        "weekly": 350,
        "monthly": 1500,
    }


# --- named counters --------------------------------------------------------------------


COUNTERS = TierConfig(
    counters={
        "generations": CounterLimit(limit=3, per="lifetime"),
        "messages": CounterLimit(limit=2, per="day"),
        "big": CounterLimit(limit=100, per="day"),
        "nothing": CounterLimit(limit=0, per="day"),
        "endless": CounterLimit(limit=None, per="day"),
    }
)


@BOTH
async def test_lifetime_counter_up_to_its_limit(env: PolicyEnv):
    policy = env.policy({"c": COUNTERS})
    who = subject()
    for n in (1, 2, 3):
        usage = await policy.consume_counter(who, "c", "generations")
        assert (usage.used, usage.limit, usage.reset_at) == (n, 3, None)
    with pytest.raises(QuotaExhausted) as caught:
        await policy.consume_counter(who, "c", "generations")
    refusal = caught.value
    assert refusal.window == "lifetime"
    assert str(refusal) == "Limit of 3 generations reached"
    assert refusal.details == {"window": "lifetime", "used": 3, "limit": 3, "resetAt": None}
    assert "Retry-After" not in refusal.headers  # it never comes back
    usage = await policy.counter_usage(who, "c", "generations")
    assert (usage.used, usage.limit, usage.remaining) == (3, 3, 0)


@BOTH
async def test_daily_counter_up_to_its_limit(env: PolicyEnv):
    policy = env.policy({"c": COUNTERS})
    who = subject()
    assert (await policy.consume_counter(who, "c", "messages")).used == 1
    second = await policy.consume_counter(who, "c", "messages")
    assert (second.used, second.remaining) == (2, 0)
    assert second.reset_at in {period_window("day", datetime.now(UTC))[1]} | {
        period_window("day", datetime.now(UTC) - timedelta(seconds=5))[1]
    }
    with pytest.raises(QuotaExhausted) as caught:
        await policy.consume_counter(who, "c", "messages")
    assert caught.value.window == "day"
    assert 1 <= int(caught.value.headers["Retry-After"]) <= 86_400
    # Counters of one name are per subject, and names do not share a count.
    assert (await policy.consume_counter(subject(), "c", "messages")).used == 1
    assert (await policy.consume_counter(who, "c", "generations")).used == 1
    # Nor with the AI request quota of the same subject.
    assert windows(await policy.ai_request_usage(who, "c")) == {
        "daily": 0,
        "weekly": 0,
        "monthly": 0,
    }


@BOTH
async def test_100_concurrent_consumes_at_95_of_100_admit_exactly_5(env: PolicyEnv):
    policy = env.policy({"c": COUNTERS})
    who = subject()
    assert (await policy.consume_counter(who, "c", "big", amount=95)).used == 95
    ok, failed = await outcomes([policy.consume_counter(who, "c", "big") for _ in range(100)])
    assert len(ok) == 5 and len(failed) == 95
    assert all(isinstance(e, QuotaExhausted) for e in failed), failed[:3]
    assert sorted(u.used for u in ok) == [96, 97, 98, 99, 100]
    assert (await policy.counter_usage(who, "c", "big")).used == 100


@BOTH
async def test_refund_counter_gives_one_back(env: PolicyEnv):
    policy = env.policy({"c": COUNTERS})
    who = subject()
    await policy.consume_counter(who, "c", "messages")
    await policy.consume_counter(who, "c", "messages")
    with pytest.raises(QuotaExhausted):
        await policy.consume_counter(who, "c", "messages")
    await policy.refund_counter(who, "c", "messages", datetime.now(UTC))
    assert (await policy.counter_usage(who, "c", "messages")).used == 1
    assert (await policy.consume_counter(who, "c", "messages")).used == 2
    with pytest.raises(QuotaExhausted):
        await policy.consume_counter(who, "c", "messages")


@BOTH
async def test_refunds_never_go_below_zero_nor_into_another_window(env: PolicyEnv):
    policy = env.policy({"c": COUNTERS})
    who = subject()
    # A refund for a window never counted in (yesterday) changes nothing today.
    await policy.refund_counter(who, "c", "messages", datetime.now(UTC) - timedelta(days=1))
    await policy.refund_counter(who, "c", "messages", datetime.now(UTC))
    assert (await policy.counter_usage(who, "c", "messages")).used == 0
    await policy.consume_counter(who, "c", "messages")
    await policy.consume_counter(who, "c", "messages")
    with pytest.raises(QuotaExhausted):
        await policy.consume_counter(who, "c", "messages")


@BOTH
async def test_an_amount_that_does_not_fit_is_refused_whole(env: PolicyEnv):
    policy = env.policy({"c": COUNTERS})
    who = subject()
    await policy.consume_counter(who, "c", "big", amount=98)
    with pytest.raises(QuotaExhausted):
        await policy.consume_counter(who, "c", "big", amount=3)
    assert (await policy.counter_usage(who, "c", "big")).used == 98  # nothing partial
    assert (await policy.consume_counter(who, "c", "big", amount=2)).used == 100
    with pytest.raises(QuotaExhausted):
        await policy.consume_counter(subject(), "c", "big", amount=101)  # over on its own


@BOTH
async def test_unlimited_and_zero_counters(env: PolicyEnv):
    policy = env.policy({"c": COUNTERS})
    who = subject()
    # Not configured at all: unlimited, counted for life.
    for _ in range(3):
        await policy.consume_counter(who, "c", "unconfigured", amount=1_000_000)
    usage = await policy.counter_usage(who, "c", "unconfigured")
    assert (usage.used, usage.limit, usage.remaining, usage.reset_at) == (
        3_000_000,
        None,
        None,
        None,
    )
    # Configured without a limit: unlimited too, even under concurrency.
    ok, failed = await outcomes([policy.consume_counter(who, "c", "endless") for _ in range(30)])
    assert (len(ok), failed) == (30, [])
    assert (await policy.counter_usage(who, "c", "endless")).used == 30
    # A limit of zero refuses the first.
    with pytest.raises(QuotaExhausted):
        await policy.consume_counter(who, "c", "nothing")
    assert (await policy.counter_usage(who, "c", "nothing")).used == 0


@BOTH
async def test_builtin_free_tier_counters(env: PolicyEnv):
    """Navi's 20 chat messages a day, AnkiLingoFlash's 100 generations for life."""
    policy = env.policy()
    who = subject()
    await policy.consume_counter(who, "free", "chat_messages", amount=20)
    with pytest.raises(QuotaExhausted) as caught:
        await policy.consume_counter(who, "free", "chat_messages")
    assert caught.value.window == "day"
    await policy.consume_counter(who, "free", "flashcard_generations", amount=100)
    with pytest.raises(QuotaExhausted) as caught:
        await policy.consume_counter(who, "free", "flashcard_generations")
    assert caught.value.window == "lifetime"
    # `pro` has no chat message limit.
    await policy.consume_counter(who, "pro", "chat_messages", amount=21)


@BOTH
@pytest.mark.parametrize("per", ["hour", "week", "month"])
async def test_counters_of_every_period(env: PolicyEnv, per: str):
    policy = env.policy({"c": TierConfig(counters={"x": CounterLimit(limit=2, per=per)})})
    who = subject()
    first = await policy.consume_counter(who, "c", "x")
    assert first.reset_at is not None and first.reset_at > datetime.now(UTC)
    await policy.consume_counter(who, "c", "x")
    with pytest.raises(QuotaExhausted) as caught:
        await policy.consume_counter(who, "c", "x")
    assert caught.value.window == per


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        "postgres",
    ],
    indirect=True,
)
async def test_per_minute_counter(env: PolicyEnv):
    policy = env.policy({"c": TierConfig(counters={"x": CounterLimit(limit=2, per="minute")})})
    who = subject()
    await policy.consume_counter(who, "c", "x")
    await policy.consume_counter(who, "c", "x")
    # A minute may turn between the calls; then the third is admitted in the new one.
    try:
        third = await policy.consume_counter(who, "c", "x")
    except QuotaExhausted as refusal:
        assert refusal.window == "minute"
    else:
        assert third.used == 1


# --- action limits ---------------------------------------------------------------------


@BOTH
async def test_otp_send_three_per_email(env: PolicyEnv):
    policy = env.policy()
    email = f"{uuid.uuid4().hex[:8]}@example.test"
    decisions = [await policy.limit_action("otp_send", email) for _ in range(3)]
    assert [d.remaining for d in decisions] == [2, 1, 0]
    with pytest.raises(RateLimited) as caught:
        await policy.limit_action("otp_send", email)
    refusal = caught.value
    assert refusal.status_code == 429
    assert refusal.details == {"action": "otp_send", "scope": "email"}
    assert "otp_send" in refusal.message
    retry = int(refusal.headers["Retry-After"])
    assert 1 <= retry <= 600
    # The scope value is case-insensitive: the same address, differently spelt.
    with pytest.raises(RateLimited):
        await policy.limit_action("otp_send", email.upper())
    # Another address has its own three.
    other = f"{uuid.uuid4().hex[:8]}@example.test"
    for _ in range(3):
        await policy.limit_action("otp_send", other.title())
    with pytest.raises(RateLimited):
        await policy.limit_action("otp_send", other)


@BOTH
async def test_otp_send_ip_ten_per_address(env: PolicyEnv):
    policy = env.policy()
    ip = f"198.51.100.{uuid.uuid4().int % 250 + 1}-{uuid.uuid4().hex[:6]}"
    for n in range(10):
        assert (await policy.limit_action("otp_send_ip", ip)).remaining == 9 - n
    with pytest.raises(RateLimited) as caught:
        await policy.limit_action("otp_send_ip", ip)
    assert caught.value.details == {"action": "otp_send_ip", "scope": "ip"}
    # The per-email action with the same value is a separate bucket.
    await policy.limit_action("otp_send", ip)


@BOTH
async def test_concurrent_actions_admit_exactly_the_limit(env: PolicyEnv):
    policy = env.policy(actions={"burst": ActionLimit(limit=7, window_seconds=3600)})
    scope = uuid.uuid4().hex
    ok, failed = await outcomes([policy.limit_action("burst", scope) for _ in range(50)])
    assert len(ok) == 7 and len(failed) == 43
    assert all(isinstance(e, RateLimited) for e in failed)


@BOTH
async def test_otp_send_holds_three_in_any_ten_minutes(env: PolicyEnv):
    """The spec: 3 per 10 minutes by email. After three sends, the next may only go
    out once ten minutes have passed since the first."""
    policy = env.policy()
    email = f"{uuid.uuid4().hex[:8]}@example.test"
    for _ in range(3):
        await policy.limit_action("otp_send", email)
    with pytest.raises(RateLimited) as caught:
        await policy.limit_action("otp_send", email)
    assert int(caught.value.headers["Retry-After"]) >= 600 - 30
