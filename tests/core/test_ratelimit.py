"""GCRA: `LocalRateLimiter` and `RedisRateLimiter` (the Lua script on the server's clock).

Exactness is checked with rates whose refill is far too slow to add a token during a
test (one an hour), so counts are exact whatever the machine's speed. The refill
arithmetic itself is checked on `_decide` with a simulated clock, and on the real
limiters only through bounds derived from the rate (never a wall-clock deadline).
The Redis variants run against the real server at `REDIS_URL`; they skip locally and
fail under CI when it is unreachable, like the postgres backends.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.core.ratelimit import (
    Decision,
    LocalRateLimiter,
    Rate,
    RateLimiter,
    RedisRateLimiter,
    _decide,
)
from tests.conftest import REDIS_URL

HOUR = 3600.0
SLOW = Rate(limit=1, period=HOUR, burst=60)  # 60 at once, then one an hour

MakeLimiter = Callable[[], Awaitable[RateLimiter]]


@pytest.fixture(params=["local", "redis"])
def limiter_kind(request: pytest.FixtureRequest) -> str | None:
    """None for in-process, else a Redis key prefix of this test's own.

    A sync fixture, so that `postgres_url` (which skips locally and fails under CI
    when PostgreSQL or Redis is unreachable) runs outside the event loop.
    """
    if request.param == "local":
        return None
    request.getfixturevalue("postgres_url")
    return f"{request.getfixturevalue('redis_prefix')}-rl-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def redis_clients() -> AsyncIterator[list[Redis]]:
    """Separate Redis clients (separate connection pools), closed at the end."""
    clients: list[Redis] = []
    yield clients
    for client in clients:
        await client.aclose()


@pytest.fixture
async def make_limiter(
    limiter_kind: str | None, redis_clients: list[Redis]
) -> AsyncIterator[MakeLimiter]:
    """A limiter of this test's kind. Redis ones each get a client of their own but
    share the prefix, as instances of one deployment do; local ones share nothing."""

    async def make() -> RateLimiter:
        if limiter_kind is None:
            return LocalRateLimiter()
        client = new_redis()
        redis_clients.append(client)
        return RedisRateLimiter(client, limiter_kind)

    yield make


@pytest.fixture
def redis_prefix_only(request: pytest.FixtureRequest) -> str:
    """A Redis key prefix of this test's own (sync: see `limiter_kind`)."""
    request.getfixturevalue("postgres_url")
    return f"{request.getfixturevalue('redis_prefix')}-rl-{uuid.uuid4().hex[:8]}"


def new_redis() -> Redis:
    # A pool big enough for 200 calls in flight: redis-py's default pool holds 100 and
    # refuses (MaxConnectionsError) past that instead of waiting.
    return Redis.from_url(REDIS_URL, max_connections=256)


def key() -> str:
    return f"user:{uuid.uuid4().hex}"


def assert_admitted_sequence(decisions: list[Decision], rate: Rate) -> None:
    """Exactly `burst` admitted, counting down burst-1..0; every refusal consistent."""
    allowed = [d for d in decisions if d.allowed]
    denied = [d for d in decisions if not d.allowed]
    assert len(allowed) == rate.burst, (len(allowed), len(denied))
    assert sorted(d.remaining for d in allowed) == list(range(rate.burst))
    interval = rate.interval_ms / 1000
    for d in decisions:
        assert d.limit == rate.burst
        assert d.window == pytest.approx(rate.window)
    for d in allowed:
        assert d.retry_after == 0
        # The bucket is full again after one interval per admitted request.
        used = rate.burst - d.remaining
        assert used * interval - 60 < d.reset_after <= used * interval + 0.001
    for d in denied:
        assert d.remaining == 0
        # The next token comes one interval after the first admission, not earlier.
        assert interval - 60 < d.retry_after <= interval + 0.001
        assert d.retry_after > 0
        assert d.retry_after_seconds >= 1
        # A full bucket is `burst` intervals away (less the time since the first hit).
        assert rate.burst * interval - 60 < d.reset_after <= rate.burst * interval + 0.001


# --- exactness under concurrency ------------------------------------------------------


async def test_200_concurrent_hits_admit_exactly_the_burst(make_limiter: MakeLimiter):
    limiter = await make_limiter()
    k = key()
    decisions = await asyncio.gather(*(limiter.hit(k, SLOW) for _ in range(200)))
    assert_admitted_sequence(list(decisions), SLOW)
    assert sum(d.allowed for d in decisions) == 60
    # Still full: refusals did not move the bucket, and nothing else gets through.
    again = await limiter.hit(k, SLOW)
    assert not again.allowed and again.remaining == 0


async def test_two_redis_limiters_sharing_a_prefix_admit_exactly_the_burst_in_total(
    redis_prefix_only: str, redis_clients: list[Redis]
):
    first, second = new_redis(), new_redis()
    redis_clients.extend([first, second])
    a = RedisRateLimiter(first, redis_prefix_only)
    b = RedisRateLimiter(second, redis_prefix_only)
    k = key()
    hits = [(a if i % 2 else b).hit(k, SLOW) for i in range(200)]
    decisions = list(await asyncio.gather(*hits))
    assert_admitted_sequence(decisions, SLOW)
    by_a = sum(d.allowed for d in decisions[1::2])
    by_b = sum(d.allowed for d in decisions[0::2])
    assert by_a + by_b == 60
    # Either one sees the shared, empty bucket afterwards.
    assert not (await a.hit(k, SLOW)).allowed
    assert not (await b.hit(k, SLOW)).allowed


async def test_redis_limiters_with_different_prefixes_do_not_share(
    redis_prefix_only: str, redis_clients: list[Redis]
):
    client = new_redis()
    redis_clients.append(client)
    rate = Rate(limit=1, period=HOUR, burst=2)
    a = RedisRateLimiter(client, redis_prefix_only)
    b = RedisRateLimiter(client, redis_prefix_only + "-other")
    k = key()
    assert [(await a.hit(k, rate)).allowed for _ in range(3)] == [True, True, False]
    assert (await b.hit(k, rate)).allowed


async def test_sequential_hits_count_down_then_refuse(make_limiter: MakeLimiter):
    limiter = await make_limiter()
    k = key()
    decisions = [await limiter.hit(k, SLOW) for _ in range(65)]
    assert [d.remaining for d in decisions[:60]] == list(range(59, -1, -1))
    assert all(d.allowed for d in decisions[:60])
    assert not any(d.allowed for d in decisions[60:])
    assert_admitted_sequence(decisions, SLOW)
    # The reset grows by one interval per admitted request.
    resets = [d.reset_after for d in decisions[:60]]
    for i, reset in enumerate(resets):
        assert reset == pytest.approx((i + 1) * HOUR, abs=30)


async def test_keys_are_separate_buckets(make_limiter: MakeLimiter):
    limiter = await make_limiter()
    rate = Rate(limit=1, period=HOUR, burst=3)
    a, b = key(), key()
    assert [(await limiter.hit(a, rate)).allowed for _ in range(4)] == [True, True, True, False]
    fresh = await limiter.hit(b, rate)
    assert fresh.allowed and fresh.remaining == 2


async def test_a_released_window_event_no_longer_counts(make_limiter: MakeLimiter):
    limiter = await make_limiter()
    k = key()
    assert [(await limiter.hit_window(k, 2, 600)).allowed for _ in range(3)] == [
        True,
        True,
        False,
    ]
    await limiter.release_window(k)
    assert [(await limiter.hit_window(k, 2, 600)).allowed for _ in range(2)] == [True, False]
    await limiter.release_window(key())  # nothing recorded there: nothing to take back


async def test_burst_then_one_per_interval(make_limiter: MakeLimiter):
    """A burst of 3 at once; refused after; the refusal names a wait of at most one
    interval, and once that wait has passed exactly one more is admitted (a partial
    interval later would not make two)."""
    limiter = await make_limiter()
    rate = Rate(limit=60, period=60, burst=3)  # one a second
    k = key()
    burst = [await limiter.hit(k, rate) for _ in range(3)]
    assert [d.allowed for d in burst] == [True, True, True]
    assert [d.remaining for d in burst] == [2, 1, 0]
    refused = await limiter.hit(k, rate)
    assert not refused.allowed
    assert 0 < refused.retry_after <= 1.001
    assert refused.retry_after_seconds == 1

    await asyncio.sleep(refused.retry_after + 0.01)
    admitted: Decision | None = None
    for _ in range(100):  # bounded: the wait named above has passed
        admitted = await limiter.hit(k, rate)
        if admitted.allowed:
            break
        await asyncio.sleep(0.01)
    assert admitted is not None and admitted.allowed
    # Tokens never vanish: if the admission left one, the next hit gets it; if it
    # left none, a refusal names a wait of at most one interval.
    after = await limiter.hit(k, rate)
    if admitted.remaining >= 1:
        assert after.allowed
    if not after.allowed:
        assert 0 < after.retry_after <= 1.001


async def test_refused_hits_do_not_delay_the_next_token(make_limiter: MakeLimiter):
    """Hammering an empty bucket must not push its refill further out."""
    limiter = await make_limiter()
    rate = Rate(limit=1, period=HOUR, burst=1)
    k = key()
    assert (await limiter.hit(k, rate)).allowed
    waits = [(await limiter.hit(k, rate)).retry_after for _ in range(20)]
    assert all(0 < w <= HOUR + 0.001 for w in waits)
    # Non-increasing: each refusal names the same instant, seen a little later.
    assert all(later <= earlier + 0.002 for earlier, later in itertools.pairwise(waits))


async def test_burst_of_one(make_limiter: MakeLimiter):
    limiter = await make_limiter()
    one = Rate(limit=1, period=HOUR, burst=1)
    k = key()
    first = await limiter.hit(k, one)
    assert first.allowed and first.remaining == 0
    assert first.reset_after == pytest.approx(HOUR, abs=30)
    second = await limiter.hit(k, one)
    assert not second.allowed
    assert second.retry_after == pytest.approx(HOUR, abs=30)


async def test_redis_bucket_key_and_expiry(redis_prefix_only: str, redis_clients: list[Redis]):
    """State lives under `<prefix>:rl:<key>` and expires when the bucket would be full."""
    client = new_redis()
    redis_clients.append(client)
    limiter = RedisRateLimiter(client, redis_prefix_only)
    k = key()
    rate = Rate(limit=1, period=HOUR, burst=5)
    decision = await limiter.hit(k, rate)
    name = f"{redis_prefix_only}:rl:{k}"
    assert await client.exists(name) == 1
    ttl_ms = await client.pttl(name)
    assert 0 < ttl_ms <= math.ceil(decision.reset_after * 1000) + 2
    assert ttl_ms > (HOUR - 60) * 1000
    # A refusal stores nothing new: the expiry stays that of the last admission.
    for _ in range(4):
        assert (await limiter.hit(k, rate)).allowed
    ttl_full = await client.pttl(name)
    assert not (await limiter.hit(k, rate)).allowed
    assert await client.pttl(name) <= ttl_full
    assert await client.pttl(name) > (5 * HOUR - 60) * 1000


async def test_local_purge_keeps_every_bucket_still_in_use():
    """Over `max_keys` the limiter forgets only full buckets: a used one stays used."""
    limiter = LocalRateLimiter(max_keys=1)
    rate = Rate(limit=1, period=HOUR, burst=2)
    a = key()
    assert (await limiter.hit(a, rate)).allowed
    assert (await limiter.hit(a, rate)).allowed
    for _ in range(5):  # new keys trip the purge
        assert (await limiter.hit(key(), rate)).allowed
    assert not (await limiter.hit(a, rate)).allowed


async def test_local_limiter_memory_stays_bounded():
    """Keys from a flood of callers never grow past ten times `max_keys`."""
    limiter = LocalRateLimiter(max_keys=10)
    rate = Rate(limit=1, period=HOUR, burst=2)
    for _ in range(1000):
        assert (await limiter.hit(key(), rate)).allowed
        assert (await limiter.hit_window(key(), 3, 600)).allowed
    assert len(limiter._tats) <= 100
    assert len(limiter._logs) <= 100


# --- the arithmetic, on a simulated clock ---------------------------------------------


class SimulatedBucket:
    """`_decide` driven by a clock the test sets: the exact refill semantics."""

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self.tat: float | None = None

    def hit(self, now_ms: float) -> Decision:
        decision, new_tat = _decide(now_ms, self.tat, self.rate)
        if new_tat is not None:
            self.tat = new_tat
        return decision


def test_rate_properties():
    rate = Rate(limit=10, period=60, burst=20)
    assert rate.interval_ms == 6000
    assert rate.window == 120


@pytest.mark.parametrize(
    ("retry_after", "seconds"), [(0.0, 1), (0.001, 1), (1.0, 1), (1.001, 2), (59.2, 60)]
)
def test_retry_after_seconds_rounds_up_and_is_at_least_one(retry_after: float, seconds: int):
    assert Decision(False, 1, 1.0, 0, retry_after, retry_after).retry_after_seconds == seconds


def test_simulated_burst_then_exactly_one_per_interval():
    rate = Rate(limit=10, period=10, burst=3)  # one a second, three at once
    bucket = SimulatedBucket(rate)
    t0 = 1_700_000_000_000.0
    burst = [bucket.hit(t0) for _ in range(4)]
    assert [d.allowed for d in burst] == [True, True, True, False]
    assert [d.remaining for d in burst] == [2, 1, 0, 0]
    assert [d.reset_after for d in burst[:3]] == [1.0, 2.0, 3.0]
    assert burst[3].retry_after == 1.0
    assert burst[3].reset_after == 3.0

    # One millisecond early: still refused, and it says so.
    early = bucket.hit(t0 + 999)
    assert not early.allowed
    assert early.retry_after == pytest.approx(0.001)
    # On the dot: one admitted, and only one.
    on_time = bucket.hit(t0 + 1000)
    assert on_time.allowed and on_time.remaining == 0
    refused = bucket.hit(t0 + 1000)
    assert not refused.allowed and refused.retry_after == 1.0

    # Steady state: one per interval forever, never two.
    for n in range(2, 12):
        now = t0 + n * 1000
        assert bucket.hit(now).allowed
        assert not bucket.hit(now).allowed


def test_simulated_partial_refill_and_full_reset():
    rate = Rate(limit=10, period=10, burst=3)
    bucket = SimulatedBucket(rate)
    t0 = 1_700_000_000_000.0
    for _ in range(3):
        assert bucket.hit(t0).allowed
    # Two and a half intervals later two tokens are back, not three.
    first = bucket.hit(t0 + 2500)
    assert first.allowed and first.remaining == 1
    assert bucket.hit(t0 + 2500).allowed
    late = bucket.hit(t0 + 2500)
    assert not late.allowed
    assert late.retry_after == pytest.approx(0.5)
    # Idle for long: the bucket is full (burst), never more than full.
    idle = [bucket.hit(t0 + 3_600_000) for _ in range(4)]
    assert [d.allowed for d in idle] == [True, True, True, False]
    assert idle[0].remaining == 2


def test_simulated_never_more_than_burst_plus_elapsed_intervals():
    """Over any span the admitted count is at most burst + span / interval."""
    rate = Rate(limit=60, period=60, burst=5)  # one a second
    bucket = SimulatedBucket(rate)
    t0 = 1_700_000_000_000.0
    admitted = 0
    for step in range(0, 30_001, 100):  # a hit every 100 ms for 30 s
        if bucket.hit(t0 + step).allowed:
            admitted += 1
    assert admitted == 5 + 30


async def test_local_limiter_matches_the_simulated_arithmetic():
    """The in-process limiter is `_decide` on the real clock: same counts, same waits."""
    limiter = LocalRateLimiter()
    rate = Rate(limit=10, period=HOUR, burst=4)
    k = key()
    real = [await limiter.hit(k, rate) for _ in range(6)]
    bucket = SimulatedBucket(rate)
    simulated = [bucket.hit(1_700_000_000_000.0) for _ in range(6)]
    assert [d.allowed for d in real] == [d.allowed for d in simulated]
    assert [d.remaining for d in real] == [d.remaining for d in simulated]
    for r, s in zip(real, simulated, strict=True):
        assert r.retry_after == pytest.approx(s.retry_after, abs=5)
        assert r.reset_after == pytest.approx(s.reset_after, abs=5)


# --- Redis: decisions asked for together ----------------------------------------------


async def test_redis_hits_asked_together_share_script_calls_and_keep_their_own_buckets(
    redis_prefix_only: str, redis_clients: list[Redis]
):
    client = new_redis()
    redis_clients.append(client)
    limiter = RedisRateLimiter(client, redis_prefix_only)
    small, large = Rate(limit=1, period=HOUR, burst=3), Rate(limit=2, period=HOUR, burst=5)
    asked = [(key(), small) for _ in range(20)] + [(key(), large) for _ in range(20)]
    calls_before = await evalsha_calls(client)
    # Each bucket hit twice in the same moment: both hits land in one call or two.
    decisions = await asyncio.gather(*(limiter.hit(k, r) for k, r in asked for _ in range(2)))
    calls = await evalsha_calls(client) - calls_before
    assert 1 <= calls < len(decisions) // 4
    for i, (_, rate) in enumerate(asked):
        pair = decisions[2 * i : 2 * i + 2]
        assert all(d.allowed and d.limit == rate.burst for d in pair)
        assert sorted(d.remaining for d in pair) == [rate.burst - 2, rate.burst - 1]
        assert max(d.reset_after for d in pair) == pytest.approx(
            2 * rate.interval_ms / 1000, abs=60
        )


async def test_a_redis_failure_reaches_every_hit_asked_together():
    client = Redis.from_url(f"redis://127.0.0.1:{closed_port()}/0", socket_connect_timeout=2)
    try:
        limiter = RedisRateLimiter(client, "unreachable")
        results = await asyncio.gather(
            *(limiter.hit(key(), SLOW) for _ in range(5)), return_exceptions=True
        )
    finally:
        await client.aclose()
    assert all(isinstance(r, RedisConnectionError) for r in results), results


async def evalsha_calls(client: Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
