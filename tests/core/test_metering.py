"""`Metering` on real SQLite and PostgreSQL (+ Redis bus): rows, counter, checkpoints,
crash recovery, shutdown, reconciliation and concurrency.

Invariant checked throughout: the user's quota counter equals the sum of
`usage_logs.total_tokens` of the period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.accounts import move_tier
from app.core.bus import RESYNC, Bus, LocalBus, RedisBus, Subscription
from app.core.config import MeteringConfig
from app.core.db import create_engine, migrate
from app.core.live import LIMITS_CHANNEL, QuotaPublisher, quota_channel
from app.core.metering import Metering, RequestInfo, Usage, UsageMeter
from app.core.policy import REQUESTS
from app.core.quota import (
    TOKENS,
    Increment,
    QuotaSnapshot,
    add_tokens,
    increment_counters,
    month_period,
    read_counter_state,
    reconcile_tokens,
)
from app.core.security import Secrets
from app.core.tables import (
    UsageStatus,
    instances,
    quota_counters,
    usage_logs,
    webhook_deliveries,
    webhooks,
)
from app.core.users import create_user
from app.core.webhooks import QuotaWarnings, create_endpoint, validate_secret
from tests.conftest import Backend

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

# Checkpoints by tokens only (the time trigger far away), a heartbeat that never
# fires during a test, and quota pushes unthrottled.
# The token limit of each tier the tier moves below go through.
TIER_LIMITS = {"free": 40, "pro": None, "team": 100}
CONFIG = MeteringConfig(
    checkpoint_tokens=5, checkpoint_ms=600_000, push_interval_ms=0, heartbeat_seconds=3600
)


@dataclass
class Env:
    engine: AsyncEngine
    bus: Bus
    publisher: QuotaPublisher
    started: list[Metering] = field(default_factory=list)
    created: list[Metering] = field(default_factory=list)

    def metering(
        self,
        config: MeteringConfig = CONFIG,
        instance_id: str | None = None,
        warnings: QuotaWarnings | None = None,
        tier_limit: Callable[[str], int | None] | None = None,
    ) -> Metering:
        """A metering service, not started (an instance that never registered)."""
        metering = Metering(
            self.engine,
            self.publisher,
            config,
            instance_id=instance_id,
            warnings=warnings,
            tier_limit=tier_limit,
        )
        self.created.append(metering)
        return metering

    async def started_metering(
        self,
        config: MeteringConfig = CONFIG,
        tier_limit: Callable[[str], int | None] | None = None,
    ) -> Metering:
        metering = self.metering(config, tier_limit=tier_limit)
        await metering.start()
        self.started.append(metering)
        return metering

    async def user(self) -> str:
        user = await create_user(
            self.engine, email=f"{uuid.uuid4().hex[:12]}@example.test", password=None, tier="free"
        )
        return user.id


@pytest.fixture
async def env(backend: Backend) -> AsyncIterator[Env]:
    engine = create_engine(backend.database_url)
    await migrate(engine)
    redis_publisher: AsyncRedis | None = None
    bus: Bus
    if backend.redis_url:
        redis_publisher = AsyncRedis.from_url(backend.redis_url)
        bus = RedisBus(backend.redis_url, backend.redis_prefix, publisher=redis_publisher)
    else:
        bus = LocalBus()
    await bus.start()
    publisher = QuotaPublisher(bus, CONFIG.push_interval_ms / 1000)
    env = Env(engine, bus, publisher)
    try:
        yield env
    finally:
        for metering in reversed(env.started):
            await metering.close()
        for metering in env.created:  # connections held by their writers
            await metering.writer.close()
        await publisher.close()
        await bus.close()
        if redis_publisher is not None:
            await redis_publisher.aclose()
        await engine.dispose()


def request(user_id: str, token_limit: int | None = None) -> RequestInfo:
    return RequestInfo(
        request_id=uuid.uuid4().hex,
        user_id=user_id,
        api_key_id=None,
        model="fake-model",
        provider="fake",
        stream=True,
        token_limit=token_limit,
    )


async def row_of(engine: AsyncEngine, row_id: str) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(sa.select(usage_logs).where(usage_logs.c.id == row_id))).one()


async def wait_row(engine: AsyncEngine, row_id: str, ok: Callable[[Any], bool], what: str) -> Any:
    row = None
    for _ in range(500):
        row = await row_of(engine, row_id)
        if ok(row):
            return row
        await asyncio.sleep(0.01)
    raise AssertionError(f"usage row never had {what}: {row}")


async def counter_and_sum(engine: AsyncEngine, user_id: str) -> tuple[int, int]:
    period = month_period(datetime.now(UTC))
    async with engine.connect() as conn:
        used, _ = await read_counter_state(conn, user_id, TOKENS, period)
        total = (
            await conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(usage_logs.c.total_tokens), 0)).where(
                    usage_logs.c.user_id == user_id, usage_logs.c.period == period
                )
            )
        ).scalar_one()
    return used, int(total)


async def assert_counter(engine: AsyncEngine, user_id: str, expected: int) -> None:
    assert await counter_and_sum(engine, user_id) == (expected, expected)


def deliver(meter: UsageMeter, tokens: int) -> None:
    for _ in range(tokens):
        meter.deliver()


async def subscribe_webhook(env: Env, user_id: str, event: str) -> None:
    """An active webhook of the user's that wants `event`."""
    await create_endpoint(
        env.engine,
        Secrets("s" * 40),
        user_id,
        url="https://hooks.example.com/",
        events=[event],
        secret=validate_secret(None),
        active=True,
        max_per_user=5,
    )


async def queued_events(env: Env, user_id: str) -> list[Any]:
    """The webhook deliveries queued for the user's webhooks."""
    async with env.engine.connect() as conn:
        query = (
            sa.select(
                webhook_deliveries.c.event_id,
                webhook_deliveries.c.event,
                webhook_deliveries.c.payload,
            )
            .join(webhooks, webhooks.c.id == webhook_deliveries.c.webhook_id)
            .where(webhooks.c.user_id == user_id)
        )
        return list((await conn.execute(query)).all())


async def quota_subscription(env: Env, user_id: str) -> Subscription:
    sub = await env.bus.subscribe(quota_channel(user_id), maxlen=1000)
    if isinstance(env.bus, RedisBus):
        # Wait until Redis has the subscription, so that no push is missed.
        for _ in range(10):
            await env.bus.publish(quota_channel(user_id), json.dumps({"probe": True}))
            if await sub.get(within=0.5) is not None:
                break
        else:
            raise AssertionError("the quota channel was never subscribed on Redis")
    return sub


async def assert_last_push_is_the_counter(env: Env, sub: Subscription, user_id: str) -> None:
    """The pushes converge on the counter as it now stands: its `used` and `seq`."""
    period = month_period(datetime.now(UTC))
    async with env.engine.connect() as conn:
        used, seq = await read_counter_state(conn, user_id, TOKENS, period)
    seen = []
    while True:
        message = await sub.get(within=5)
        assert isinstance(message, str), f"no push of used={used} seq={seq}; got {seen}"
        pushed = json.loads(message)
        seen.append((pushed.get("used"), pushed.get("seq")))
        if seen[-1] == (used, seq):
            break
    # Nothing older follows it.
    assert await sub.get(within=0.2) is None


# (1) begin, deliver, finish ------------------------------------------------------


async def test_finish_and_discard_keep_the_counter_equal_to_the_rows(env: Env):
    metering = await env.started_metering()
    user = await env.user()
    pushes = await quota_subscription(env, user)

    completed = await metering.begin(request(user), prompt_tokens=10)
    row = await row_of(env.engine, completed.row_id)
    assert (row.status, row.prompt_tokens, row.completion_tokens, row.total_tokens) == (
        UsageStatus.STREAMING,
        10,
        0,
        10,
    )
    assert row.instance_id == metering.instance_id and row.finished_at is None
    await assert_counter(env.engine, user, 10)

    deliver(completed, 12)
    # The upstream's usage is trusted on completion: its prompt count replaces the
    # estimate and its completion count the one we made.
    await completed.finish(UsageStatus.COMPLETED, usage=Usage(11, 12), finish_reason="stop")
    row = await row_of(env.engine, completed.row_id)
    assert (row.status, row.finish_reason, row.error) == ("completed", "stop", None)
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (11, 12, 23)
    assert row.finished_at is not None
    await assert_counter(env.engine, user, 23)
    assert completed not in metering.active

    # Finishing again, or delivering afterwards, changes nothing.
    await completed.finish(UsageStatus.ERROR, usage=Usage(100, 100), error="late")
    completed.deliver(50)
    await asyncio.sleep(0.05)
    row = await row_of(env.engine, completed.row_id)
    assert (row.status, row.total_tokens) == ("completed", 23)

    # A request ended another way bills what was delivered, not the upstream's claim.
    cancelled = await metering.begin(request(user), prompt_tokens=7)
    deliver(cancelled, 3)
    await cancelled.finish(UsageStatus.CANCELLED, usage=Usage(8, 999))
    row = await row_of(env.engine, cancelled.row_id)
    assert (row.status, row.prompt_tokens, row.completion_tokens, row.total_tokens) == (
        "cancelled",
        8,
        3,
        11,
    )
    await assert_counter(env.engine, user, 34)

    # A discarded request bills nothing, and gives back its estimated prompt tokens.
    discarded = await metering.begin(request(user), prompt_tokens=9)
    await assert_counter(env.engine, user, 43)
    await discarded.discard(UsageStatus.ERROR, "upstream said no")
    row = await row_of(env.engine, discarded.row_id)
    assert (row.status, row.error, row.total_tokens) == ("error", "upstream said no", 0)
    await assert_counter(env.engine, user, 34)

    # Every change was pushed; the last push is the counter as it now stands.
    await assert_last_push_is_the_counter(env, pushes, user)


@pytest.mark.parametrize("admitted", [True, False], ids=["limited", "unlimited"])
async def test_a_start_whose_caller_left_while_it_was_queued_counts_nothing(
    env: Env, admitted: bool
):
    metering = await env.started_metering()
    user = await env.user()
    period = month_period(datetime.now(UTC))
    also = [Increment(REQUESTS, f"day:{period}", 1, 50 if admitted else None)]
    async with env.engine.begin() as conn:  # requests counted before: 3
        await increment_counters(conn, user, [Increment(REQUESTS, f"day:{period}", 3)])
    queued, release = asyncio.Event(), asyncio.Event()

    async def admit(conn: Any, quota: Any, counted: Any) -> None:
        queued.set()
        await release.wait()  # the start's transaction waits here, not yet committed

    if admitted:
        caller = asyncio.create_task(metering.begin(request(user), 7, admit, also=also))
        await queued.wait()
        caller.cancel()  # the client left
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
    else:
        # With nothing to admit the start is written beside the upstream call; a caller
        # that gives up on it drops the meter it resolves to.
        starting = metering.begin_beside(request(user), 7, also=also)
        starting.cancel()
    # Ended in the background (the caller is gone); bounded wait.
    for _ in range(500):
        async with env.engine.connect() as conn:
            rows = (
                await conn.execute(sa.select(usage_logs).where(usage_logs.c.user_id == user))
            ).all()
            requests, _ = await read_counter_state(conn, user, REQUESTS, f"day:{period}")
        if rows and rows[0].finished_at is not None and requests == 3:
            break
        await asyncio.sleep(0.01)
    assert [(r.status, r.total_tokens) for r in rows] == [("cancelled", 0)]
    await assert_counter(env.engine, user, 0)
    assert requests == 3, "the request was given back, and only it"


async def move_limit(env: Env, user: str, limit: int | None) -> int:
    """A tier move as `move_tier` makes it (its counter's `seq` moved on), announced by
    the publisher the metering watches; the move's `seq`."""
    period = month_period(datetime.now(UTC))
    async with env.engine.begin() as conn:
        used, seq = await add_tokens(conn, user, period, 0)
    env.publisher.limit_changed(user, QuotaSnapshot(limit, used, period, seq))
    return seq


async def test_an_announced_limit_holds_over_starts_that_read_the_old_one(env: Env):
    metering = await env.started_metering()
    user = await env.user()
    pushes = await quota_subscription(env, user)
    first = await metering.begin(request(user, token_limit=40), prompt_tokens=5)
    assert first.remaining == 35

    moved_at = await move_limit(env, user, None)
    # Taken before `limit_changed` returned: no checkpoint here can go out with 40.
    assert first.remaining is None
    # A request that read its principal before the move starts after it, with 40.
    second = await metering.begin(request(user, token_limit=40), prompt_tokens=5)
    assert second.remaining is None and first.remaining is None
    deliver(second, 5)  # a checkpoint
    await second.finish(UsageStatus.COMPLETED, usage=Usage(5, 5), finish_reason="stop")
    await first.finish(UsageStatus.COMPLETED, usage=Usage(5, 0), finish_reason="stop")

    # With nothing in flight any more, a late start with the old limit still gets the new.
    third = await metering.begin(request(user, token_limit=40), prompt_tokens=5)
    assert third.remaining is None
    await third.finish(UsageStatus.COMPLETED, usage=Usage(5, 0), finish_reason="stop")

    later = []
    while (message := await pushes.get(within=0.3)) is not None:
        assert isinstance(message, str)
        pushed = json.loads(message)
        if pushed.get("type") == "quota" and pushed["seq"] >= moved_at:
            later.append(pushed)
    assert later and all(m["unlimited"] for m in later), later


async def test_a_limit_change_lost_with_the_bus_is_read_afresh_when_it_is_back(env: Env):
    metering = await env.started_metering(tier_limit=TIER_LIMITS.__getitem__)
    moving, staying = await env.user(), await env.user()  # both on "free"
    pushes = await quota_subscription(env, moving)
    moved = await metering.begin(request(moving, token_limit=40), prompt_tokens=5)
    kept = await metering.begin(request(staying, token_limit=40), prompt_tokens=5)
    assert (moved.remaining, kept.remaining) == (35, 35)

    # Up to "pro", announced; then back to "free" while the bus was away: written as
    # every move is (the counter's `seq` moved on), its announcement lost.
    async with env.engine.begin() as conn:
        up = await move_tier(conn, moving, "pro", None)
    assert up is not None
    env.publisher.limit_changed(moving, up)
    assert moved.remaining is None
    async with env.engine.begin() as conn:
        assert await move_tier(conn, moving, "free", 40) is not None
    env.bus._fan_out(LIMITS_CHANNEL, RESYNC)
    for _ in range(500):
        if moved.remaining is not None:
            break
        await asyncio.sleep(0.01)
    assert (moved.remaining, kept.remaining) == (35, 35)
    # A start that read its principal while on "pro" gets the limit read too, and its
    # checkpoints push it.
    late = await metering.begin(request(moving, token_limit=None), prompt_tokens=5)
    assert late.remaining == 30
    deliver(late, 5)
    for meter in (late, moved, kept):
        await meter.finish(UsageStatus.COMPLETED, usage=Usage(5, 0), finish_reason="stop")
    last = None
    while (message := await pushes.get(within=0.3)) is not None:
        assert isinstance(message, str)
        if (pushed := json.loads(message)).get("type") == "quota":
            last = pushed
    assert last is not None and (last["total"], last["unlimited"]) == (40, False), last


@pytest.mark.parametrize("when", ["at its end", "at a checkpoint"])
async def test_a_limit_overtaken_before_its_announcement_came_is_pushed_again(env: Env, when: str):
    """A write of the user's that commits between a tier move and the move's
    announcement pushes the old limit under a newer `seq` than the move's, and devices
    keep the newer: the limit is pushed once more, under a newer `seq` still. Whether
    the request has ended by then, or ends with nothing left to write."""
    metering = await env.started_metering(tier_limit=TIER_LIMITS.__getitem__)
    user = await env.user()  # on "free"
    pushes = await quota_subscription(env, user)
    seen: list[dict[str, Any]] = []

    async def pushed_within(seconds: float) -> dict[str, Any] | None:
        message = await pushes.get(within=seconds)
        if message is None:
            return None
        assert isinstance(message, str)
        seen.append(json.loads(message))
        return seen[-1]

    meter = await metering.begin(request(user, token_limit=40), prompt_tokens=5)
    async with env.engine.begin() as conn:
        moved = await move_tier(conn, user, "pro", None)  # committed, not yet announced
    assert moved is not None
    deliver(meter, 5)
    if when == "at a checkpoint":
        while (pushed := await pushed_within(5)) is not None and pushed.get("used") != 10:
            pass
        assert pushed is not None and pushed["total"] == 40, "no checkpoint pushed"
    else:
        await meter.finish(UsageStatus.COMPLETED, usage=Usage(5, 5), finish_reason="stop")
    env.publisher.limit_changed(user, moved)  # the announcement comes
    if when == "at a checkpoint":
        # Nothing left to write: its end pushes nothing.
        await meter.finish(UsageStatus.COMPLETED, usage=Usage(5, 5), finish_reason="stop")
    # Pushed in the background once the counter moved on: waited for, within a bound.
    while (pushed := await pushed_within(5)) is not None and not (
        pushed.get("unlimited") and pushed["seq"] > moved.seq
    ):
        pass
    while await pushed_within(0.2) is not None:
        pass
    newest = max((m for m in seen if m.get("type") == "quota"), key=lambda m: m["seq"])
    assert newest["seq"] > moved.seq, seen
    assert (newest["unlimited"], newest["used"]) == (True, 10), seen


async def test_a_limit_pushed_again_is_the_one_the_tier_now_gives(env: Env):
    """Moved on again before the first move's announcement came: the limit pushed
    again is the second tier's (read as it is now, not the announced one), and stays
    the newest once the second announcement came."""
    metering = await env.started_metering(tier_limit=TIER_LIMITS.__getitem__)
    user = await env.user()  # on "free"
    pushes = await quota_subscription(env, user)
    meter = await metering.begin(request(user, token_limit=40), prompt_tokens=5)
    async with env.engine.begin() as conn:
        to_pro = await move_tier(conn, user, "pro", None)
    await meter.finish(UsageStatus.COMPLETED, usage=Usage(5, 5), finish_reason="stop")
    async with env.engine.begin() as conn:
        to_team = await move_tier(conn, user, "team", 100)
    assert to_pro is not None and to_team is not None
    env.publisher.limit_changed(user, to_pro)
    seen: list[dict[str, Any]] = []
    while (message := await pushes.get(within=5)) is not None:
        assert isinstance(message, str)
        seen.append(json.loads(message))
        if seen[-1].get("seq", 0) > to_team.seq:
            break
    env.publisher.limit_changed(user, to_team)
    while (message := await pushes.get(within=0.2)) is not None:
        assert isinstance(message, str)
        seen.append(json.loads(message))
    newest = max((m for m in seen if m.get("type") == "quota"), key=lambda m: m["seq"])
    assert (newest["total"], newest["used"]) == (100, 10), seen
    assert newest["seq"] > to_team.seq, seen


async def test_the_limit_pushed_again_is_the_one_later_checkpoints_carry(env: Env):
    """The tier read to push a limit again may be newer than any change announced
    yet: the requests in flight take it, and their checkpoints do not push the
    announced one over it."""
    metering = await env.started_metering(tier_limit=TIER_LIMITS.__getitem__)
    user = await env.user()  # on "free"
    pushes = await quota_subscription(env, user)
    meter = await metering.begin(request(user, token_limit=40), prompt_tokens=5)
    async with env.engine.begin() as conn:
        to_pro = await move_tier(conn, user, "pro", None)
    assert to_pro is not None
    deliver(meter, 5)  # a checkpoint, pushed with 40 over the move to "pro"
    await wait_row(env.engine, meter.row_id, lambda r: r.completion_tokens == 5, "5 tokens")
    async with env.engine.begin() as conn:
        assert await move_tier(conn, user, "team", 100) is not None  # not yet announced
    env.publisher.limit_changed(user, to_pro)
    while (message := await pushes.get(within=5)) is not None:
        assert isinstance(message, str)
        if json.loads(message).get("total") == 100:
            break
    assert message is not None, "the limit was never pushed again"
    assert meter.remaining == 100 - 10
    deliver(meter, 5)  # the next checkpoint
    while (message := await pushes.get(within=5)) is not None:
        assert isinstance(message, str)
        if (pushed := json.loads(message)).get("used") == 15:
            break
    assert message is not None, "the checkpoint was never pushed"
    assert pushed["total"] == 100, pushed
    await meter.finish(UsageStatus.COMPLETED, usage=Usage(5, 10), finish_reason="stop")


async def test_an_upstreams_overlong_finish_reason_or_nul_in_an_error_still_ends_the_row(
    env: Env,
):
    """The upstream picks a stream's finish reason and the text of its errors; neither
    may keep the row from ending (PostgreSQL refuses a NUL, and text past a column)."""
    metering = await env.started_metering()
    user = await env.user()
    completed = await metering.begin(request(user), prompt_tokens=4)
    deliver(completed, 3)
    reason = "content_filter_" + "x" * 40
    await completed.finish(UsageStatus.COMPLETED, usage=Usage(4, 3), finish_reason=reason)
    row = await row_of(env.engine, completed.row_id)
    assert (row.status, row.finish_reason, row.total_tokens) == ("completed", reason[:32], 7)

    failed = await metering.begin(request(user), prompt_tokens=5)
    deliver(failed, 2)
    await failed.finish(UsageStatus.ERROR, error="provider error mid-stream: bad\x00byte")
    row = await row_of(env.engine, failed.row_id)
    assert (row.status, row.error, row.total_tokens) == (
        "error",
        "provider error mid-stream: bad\ufffdbyte",
        7,
    )
    await assert_counter(env.engine, user, 14)


async def test_a_lone_surrogate_in_an_upstreams_error_still_ends_the_row(env: Env):
    """A JSON `\\ud800` escape in an upstream's error decodes to text neither database
    driver can encode: it is stored replaced, and the row ends all the same."""
    metering = await env.started_metering()
    user = await env.user()
    failed = await metering.begin(request(user), prompt_tokens=5)
    deliver(failed, 2)
    await failed.finish(UsageStatus.ERROR, error="provider error mid-stream: bad\ud800text")
    row = await row_of(env.engine, failed.row_id)
    assert (row.status, row.error, row.total_tokens) == (
        "error",
        "provider error mid-stream: bad?text",
        7,
    )
    await assert_counter(env.engine, user, 7)


async def test_discard_after_checkpoints_gives_everything_back(env: Env):
    metering = await env.started_metering()
    user = await env.user()
    meter = await metering.begin(request(user), prompt_tokens=6)
    deliver(meter, 12)
    await wait_row(env.engine, meter.row_id, lambda r: r.completion_tokens >= 10, "a checkpoint")
    await meter.discard(UsageStatus.ERROR, "nothing reached the client")
    row = await row_of(env.engine, meter.row_id)
    assert (row.status, row.total_tokens) == ("error", 0)
    await assert_counter(env.engine, user, 0)


async def test_remaining_counts_tokens_not_yet_checkpointed(env: Env):
    metering = await env.started_metering()
    user = await env.user()
    other = await metering.begin(request(user, token_limit=100), prompt_tokens=30)
    await other.finish(UsageStatus.COMPLETED)

    meter = await metering.begin(request(user, token_limit=100), prompt_tokens=10)
    assert meter.remaining == 60 and not meter.exhausted_after(0) and meter.exhausted_after(60)
    deliver(meter, 3)  # below the checkpoint: only in memory
    assert meter.remaining == 57
    deliver(meter, 57)
    assert meter.remaining == 0 and meter.exhausted_after(0)
    await meter.finish(UsageStatus.COMPLETED)
    await assert_counter(env.engine, user, 100)

    unlimited = await metering.begin(request(user, token_limit=None), prompt_tokens=1)
    assert unlimited.remaining is None and not unlimited.exhausted_after(10**9)
    await unlimited.finish(UsageStatus.COMPLETED)


async def test_a_users_requests_in_flight_share_what_is_left(env: Env):
    """Each counts what the others delivered and have not written; as they write, end
    or are discarded, what is left stays the limit less all they bill, and once all
    have ended nothing of them is kept."""
    metering = await env.started_metering()
    user = await env.user()
    a = await metering.begin(request(user, token_limit=100), prompt_tokens=10)
    b = await metering.begin(request(user, token_limit=100), prompt_tokens=5)
    assert a.remaining == b.remaining == 85
    deliver(a, 3)  # below the checkpoint: only in memory
    assert a.remaining == b.remaining == 82
    deliver(b, 4)
    assert a.remaining == b.remaining == 78
    deliver(a, 10)  # past it: written
    await wait_row(env.engine, a.row_id, lambda r: r.completion_tokens == 13, "a's checkpoint")
    assert a.remaining == b.remaining == 68
    # Billed as the upstream counted: 12 + 20 instead of 10 + 13.
    await a.finish(UsageStatus.COMPLETED, usage=Usage(12, 20))
    assert b.remaining == 100 - 32 - 5 - 4
    await b.discard(UsageStatus.ERROR, "failed")  # gives everything back
    other = await metering.begin(request(user, token_limit=100), prompt_tokens=1)
    assert other.remaining == 100 - 32 - 1
    await other.finish(UsageStatus.COMPLETED)
    await assert_counter(env.engine, user, 33)
    assert metering.unwritten_tokens(user, other.period) == 0
    assert not metering._in_flight


# (2) checkpoints -----------------------------------------------------------------


async def test_checkpoint_after_checkpoint_tokens(env: Env):
    metering = await env.started_metering()
    user = await env.user()
    meter = await metering.begin(request(user), prompt_tokens=4)

    deliver(meter, CONFIG.checkpoint_tokens - 1)
    await asyncio.sleep(0.1)
    row = await row_of(env.engine, meter.row_id)
    assert row.completion_tokens == 0, "checkpointed before checkpoint_tokens"

    meter.deliver()
    row = await wait_row(env.engine, meter.row_id, lambda r: r.completion_tokens >= 5, "5 tokens")
    assert row.status == "streaming" and row.finished_at is None
    assert row.total_tokens == row.prompt_tokens + row.completion_tokens
    used, total = await counter_and_sum(env.engine, user)
    assert used == total == 4 + row.completion_tokens

    deliver(meter, 7)
    row = await wait_row(env.engine, meter.row_id, lambda r: r.completion_tokens >= 10, "10 tokens")
    assert row.status == "streaming"
    used, total = await counter_and_sum(env.engine, user)
    assert used == total == 4 + row.completion_tokens

    await meter.finish(UsageStatus.COMPLETED)
    await assert_counter(env.engine, user, 16)


async def test_checkpoint_after_checkpoint_ms(env: Env):
    config = CONFIG.model_copy(update={"checkpoint_tokens": 1000, "checkpoint_ms": 10})
    metering = await env.started_metering(config)
    user = await env.user()
    meter = await metering.begin(request(user), prompt_tokens=2)
    meter.deliver()
    await asyncio.sleep(0.05)  # let checkpoint_ms pass; the next token is due
    meter.deliver()
    row = await wait_row(env.engine, meter.row_id, lambda r: r.completion_tokens >= 2, "2 tokens")
    assert row.status == "streaming"
    await assert_counter(env.engine, user, 4)
    await meter.finish(UsageStatus.COMPLETED)


async def test_stream_ending_before_its_checkpoint_ran_writes_no_checkpoint(env: Env):
    """An unpaced upstream's whole answer arrives in one read: the checkpoint it made
    due has not started when the stream ends, and the final write alone counts it."""
    metering = await env.started_metering()
    user = await env.user()
    meter = await metering.begin(request(user), prompt_tokens=3)
    statuses: list[str] = []
    write = metering.writer.write

    async def recorded(usage: Any) -> Any:
        statuses.append(str(usage.row.get("status", "streaming")))
        return await write(usage)

    metering.writer.write = recorded  # type: ignore[method-assign]

    deliver(meter, 3 * CONFIG.checkpoint_tokens)  # a checkpoint is due, not yet run
    await meter.finish(UsageStatus.COMPLETED)

    assert statuses == ["completed"], f"writes after the start: {statuses}"
    await assert_counter(env.engine, user, 3 + 3 * CONFIG.checkpoint_tokens)
    row = await row_of(env.engine, meter.row_id)
    assert row.status == "completed" and row.completion_tokens == 3 * CONFIG.checkpoint_tokens


# (3) crash recovery --------------------------------------------------------------


async def checkpointed_stream(env: Env, metering: Metering, user: str) -> UsageMeter:
    """A stream of `metering`: 6 prompt tokens, 7 delivered, checkpointed at 5."""
    meter = await metering.begin(request(user), prompt_tokens=6)
    deliver(meter, 5)
    await wait_row(env.engine, meter.row_id, lambda r: r.completion_tokens == 5, "the checkpoint")
    deliver(meter, 2)  # not due: only in memory
    return meter


async def test_sweep_finalizes_rows_of_an_instance_that_never_beat(env: Env):
    user = await env.user()
    # An instance that wrote rows and then vanished without a trace in `instances`.
    crashed = env.metering(instance_id=f"crashed-{uuid.uuid4().hex[:8]}")
    done = await crashed.begin(request(user), prompt_tokens=3)
    await done.finish(UsageStatus.COMPLETED)
    lost = await checkpointed_stream(env, crashed, user)
    await assert_counter(env.engine, user, 3 + 11)

    # A live instance with a stream of its own, checkpointed too.
    live = await env.started_metering()
    running = await checkpointed_stream(env, live, user)

    # A fresh instance sweeps when it starts.
    survivor = await env.started_metering()
    row = await row_of(env.engine, lost.row_id)
    assert (row.status, row.error) == (
        "interrupted",
        "instance stopped before the request finished",
    )
    assert row.finished_at is not None
    # The last checkpoint's tokens, which the counter already held.
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (6, 5, 11)
    assert (await row_of(env.engine, done.row_id)).status == "completed"
    # The live instance's stream is left alone, by the start sweep and by later ones.
    assert (await row_of(env.engine, running.row_id)).status == "streaming"
    await survivor.sweep_interrupted()
    assert (await row_of(env.engine, running.row_id)).status == "streaming"
    await assert_counter(env.engine, user, 3 + 11 + 11)

    await running.finish(UsageStatus.COMPLETED)
    await assert_counter(env.engine, user, 3 + 11 + 13)


async def test_a_swept_request_is_a_failed_task_for_the_users_webhooks(env: Env):
    user = await env.user()
    await subscribe_webhook(env, user, "ai.task.failed")
    crashed = env.metering(instance_id=f"crashed-{uuid.uuid4().hex[:8]}")
    lost = await checkpointed_stream(env, crashed, user)
    await env.started_metering()  # sweeps at start
    rows = await queued_events(env, user)
    expected = [(f"evt_{lost.row_id}_failed", "ai.task.failed")]
    assert [(r.event_id, r.event) for r in rows] == expected
    data = json.loads(rows[0].payload)["data"]
    assert (data["task_id"], data["status"], data["user_id"]) == (lost.row_id, "failed", user)


async def test_sweep_finalizes_rows_of_an_instance_whose_heartbeat_is_stale(env: Env):
    user = await env.user()
    stale = await env.started_metering()
    lost = await checkpointed_stream(env, stale, user)
    live = await env.started_metering()
    running = await checkpointed_stream(env, live, user)
    await assert_counter(env.engine, user, 22)

    # `stale` stops beating: its last heartbeat is a day old.
    async with env.engine.begin() as conn:
        await conn.execute(
            instances.update()
            .where(instances.c.id == stale.instance_id)
            .values(heartbeat_at=datetime.now(UTC) - timedelta(days=1))
        )

    sweeper = env.metering()
    assert await sweeper.sweep_interrupted() >= 1
    row = await row_of(env.engine, lost.row_id)
    assert (row.status, row.completion_tokens, row.total_tokens) == ("interrupted", 5, 11)
    assert (await row_of(env.engine, running.row_id)).status == "streaming"
    await assert_counter(env.engine, user, 22)
    async with env.engine.connect() as conn:
        ids = set((await conn.execute(sa.select(instances.c.id))).scalars())
    assert stale.instance_id not in ids
    assert live.instance_id in ids

    # A second sweep finds nothing more of these.
    await sweeper.sweep_interrupted()
    assert (await row_of(env.engine, lost.row_id)).finished_at == row.finished_at
    await running.finish(UsageStatus.COMPLETED)


async def test_an_instance_reaped_after_a_pause_registers_again(env: Env):
    user = await env.user()
    fast = CONFIG.model_copy(update={"heartbeat_seconds": 0.05})
    paused = await env.started_metering(fast)
    # It paused (a long GC, a frozen VM) and another instance reaped it...
    async with env.engine.begin() as conn:
        await conn.execute(
            instances.update()
            .where(instances.c.id == paused.instance_id)
            .values(heartbeat_at=datetime.now(UTC) - timedelta(days=1))
        )
    await env.metering().sweep_interrupted()
    # ...then it resumed, and serves a new stream.
    meter = await paused.begin(request(user), prompt_tokens=1)

    registered = False
    for _ in range(100):
        async with env.engine.connect() as conn:
            registered = (
                await conn.execute(
                    sa.select(sa.func.count())
                    .select_from(instances)
                    .where(instances.c.id == paused.instance_id)
                )
            ).scalar_one() == 1
        if registered:
            break
        await asyncio.sleep(0.02)
    status = (await row_of(env.engine, meter.row_id)).status
    await meter.finish(UsageStatus.COMPLETED)
    assert registered, "the resumed instance never registered again"
    assert status == "streaming", "the resumed instance's live stream was swept"


# (4) shutdown --------------------------------------------------------------------


async def test_close_finalizes_active_meters_as_interrupted(env: Env):
    user = await env.user()
    metering = env.metering()
    await metering.start()
    checkpointed = await checkpointed_stream(env, metering, user)
    fresh = await metering.begin(request(user), prompt_tokens=2)
    completed = await metering.begin(request(user), prompt_tokens=4)
    deliver(completed, 1)
    await completed.finish(UsageStatus.COMPLETED)

    await metering.close()

    row = await row_of(env.engine, checkpointed.row_id)
    # Shutdown bills everything delivered, the unflushed tokens too.
    assert (row.status, row.error, row.completion_tokens, row.total_tokens) == (
        "interrupted",
        "server shut down",
        7,
        13,
    )
    assert row.finished_at is not None
    row = await row_of(env.engine, fresh.row_id)
    assert (row.status, row.total_tokens) == ("interrupted", 2)
    assert (await row_of(env.engine, completed.row_id)).status == "completed"
    assert not metering.active
    await assert_counter(env.engine, user, 13 + 2 + 5)
    async with env.engine.connect() as conn:
        ids = set((await conn.execute(sa.select(instances.c.id))).scalars())
    assert metering.instance_id not in ids


# (5) reconciliation --------------------------------------------------------------


async def test_reconcile_repairs_a_counter_edited_by_hand(env: Env):
    metering = await env.started_metering()
    user = await env.user()
    period = month_period(datetime.now(UTC))
    for prompt, completion in [(5, 8), (2, 0), (40, 1)]:
        meter = await metering.begin(request(user), prompt_tokens=prompt)
        deliver(meter, completion)
        await meter.finish(UsageStatus.COMPLETED)
    await assert_counter(env.engine, user, 56)

    where = (quota_counters.c.user_id == user, quota_counters.c.period == period)
    async with env.engine.begin() as conn:
        await conn.execute(quota_counters.update().where(*where).values(used=9999))
    assert await counter_and_sum(env.engine, user) == (9999, 56)
    assert await reconcile_tokens(env.engine, user, period) == 56
    await assert_counter(env.engine, user, 56)

    async with env.engine.begin() as conn:
        await conn.execute(quota_counters.update().where(*where).values(used=-3))
    assert await reconcile_tokens(env.engine, user, period) == 56
    await assert_counter(env.engine, user, 56)

    # A lost counter row is recreated.
    async with env.engine.begin() as conn:
        await conn.execute(quota_counters.delete().where(*where))
    assert await reconcile_tokens(env.engine, user, period) == 56
    await assert_counter(env.engine, user, 56)

    # A consistent counter is left as it is, and metering goes on from it.
    assert await reconcile_tokens(env.engine, user, period) == 56
    meter = await metering.begin(request(user), prompt_tokens=4)
    await meter.finish(UsageStatus.COMPLETED)
    await assert_counter(env.engine, user, 60)

    # A user with no usage reconciles to zero.
    assert await reconcile_tokens(env.engine, await env.user(), period) == 0


# (6) concurrency -----------------------------------------------------------------


async def test_concurrent_meters_of_one_user_keep_the_counter_exact(env: Env):
    metering = await env.started_metering()
    user = await env.user()
    pushes = await quota_subscription(env, user)

    async def stream(i: int) -> int:
        meter = await metering.begin(request(user), prompt_tokens=3 + i % 4)
        for _ in range(20 + i):
            meter.deliver()
            await asyncio.sleep(0)
        if i % 5 == 4:
            await meter.discard(UsageStatus.ERROR, "failed")
            return 0
        status = UsageStatus.CANCELLED if i % 3 == 0 else UsageStatus.COMPLETED
        await meter.finish(status)
        return meter.total_tokens

    billed = await asyncio.gather(*(stream(i) for i in range(20)))
    expected = sum(billed)
    assert expected == sum(3 + i % 4 + 20 + i for i in range(20) if i % 5 != 4)
    await assert_counter(env.engine, user, expected)
    async with env.engine.connect() as conn:
        statuses = list(
            (
                await conn.execute(
                    sa.select(usage_logs.c.status).where(usage_logs.c.user_id == user)
                )
            ).scalars()
        )
    assert len(statuses) == 20 and "streaming" not in statuses

    await assert_last_push_is_the_counter(env, pushes, user)


# (7) an outage as a stream ends ----------------------------------------------------


@contextlib.asynccontextmanager
async def refusing_updates(engine: AsyncEngine, row_id: str) -> AsyncIterator[None]:
    """The database refuses every update of the row while the block runs (a trigger
    raises in its place), whichever of the writer's paths sends it: to the meter, an
    outage as long as the block. Other rows, and `instances`, are written as usual."""
    name = f"refuse_{uuid.uuid4().hex[:12]}"
    if engine.dialect.name == "postgresql":
        create = [
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'database unavailable'; END $$",
            f"CREATE TRIGGER {name} BEFORE UPDATE ON usage_logs FOR EACH ROW "
            f"WHEN (OLD.id = '{row_id}') EXECUTE FUNCTION {name}()",
        ]
        drop = [f"DROP TRIGGER {name} ON usage_logs", f"DROP FUNCTION {name}()"]
    else:
        create = [
            f"CREATE TRIGGER {name} BEFORE UPDATE ON usage_logs FOR EACH ROW "
            f"WHEN OLD.id = '{row_id}' BEGIN SELECT RAISE(ABORT, 'database unavailable'); END"
        ]
        drop = [f"DROP TRIGGER {name}"]
    async with engine.begin() as conn:
        for statement in create:
            await conn.exec_driver_sql(statement)
    try:
        yield
    finally:
        async with engine.begin() as conn:
            for statement in drop:
                await conn.exec_driver_sql(statement)


async def end_in_an_outage(env: Env, metering: Metering, user: str) -> UsageMeter:
    """A stream checkpointed at 10 tokens whose end (the upstream's 11 + 30) fails
    every attempt: its row is left as the checkpoint wrote it."""
    meter = await metering.begin(request(user), prompt_tokens=10)
    deliver(meter, 10)
    await wait_row(env.engine, meter.row_id, lambda r: r.completion_tokens == 10, "10 tokens")
    async with refusing_updates(env.engine, meter.row_id):
        await meter.finish(UsageStatus.COMPLETED, usage=Usage(11, 30), finish_reason="stop")
        row = await row_of(env.engine, meter.row_id)
        assert (row.status, row.total_tokens) == ("streaming", 20)
    return meter


async def assert_ended(env: Env, meter: UsageMeter, user: str) -> None:
    row = await row_of(env.engine, meter.row_id)
    assert (row.status, row.finish_reason) == ("completed", "stop")
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (11, 30, 41)
    assert row.finished_at is not None
    await assert_counter(env.engine, user, 41)
    events = await queued_events(env, user)
    expected = [(f"evt_{meter.row_id}_completed", "ai.task.completed")]
    assert [(e.event_id, e.event) for e in events] == expected


async def test_an_end_that_failed_all_its_attempts_is_written_once_the_database_is_back(
    env: Env,
):
    """The instance lives on through the outage, so no sweep would ever end the row."""
    metering = await env.started_metering(CONFIG.model_copy(update={"heartbeat_seconds": 0.2}))
    user = await env.user()
    await subscribe_webhook(env, user, "ai.task.completed")
    meter = await end_in_an_outage(env, metering, user)
    await wait_row(env.engine, meter.row_id, lambda r: r.status != "streaming", "its end")
    await assert_ended(env, meter, user)


async def test_close_writes_an_end_that_failed_all_its_attempts(env: Env):
    metering = env.metering()  # its heartbeat never fires during the test
    await metering.start()
    user = await env.user()
    await subscribe_webhook(env, user, "ai.task.completed")
    meter = await end_in_an_outage(env, metering, user)
    await metering.close()
    await assert_ended(env, meter, user)
