"""`QuotaPublisher`: the first push goes out at once, later ones coalesce, latest wins."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from redis.asyncio import Redis as AsyncRedis

from app.core.bus import RESYNC, LocalBus, RedisBus, Subscription
from app.core.live import LIMITS_CHANNEL, LimitChange, QuotaPublisher, newer, quota_channel
from app.core.quota import QuotaSnapshot

USER = "user-1"


def snap(seq: int, period: str = "2025-03", limit: int | None = 1000) -> QuotaSnapshot:
    return QuotaSnapshot(limit=limit, used=10 * seq, period=period, seq=seq)


async def published(sub: Subscription, quiet: float = 0.3) -> list[dict[str, object]]:
    """The messages `sub` receives until it has been quiet for `quiet` seconds."""
    messages = []
    while (message := await sub.get(within=quiet)) is not None:
        assert isinstance(message, str)
        messages.append(json.loads(message))
    return messages


async def wait_for_seq(sub: Subscription, seq: int) -> list[dict[str, object]]:
    """Every message up to and including the one with `seq`."""
    messages: list[dict[str, object]] = []
    while not messages or messages[-1]["seq"] != seq:
        message = await sub.get(within=5)
        assert message is not None, f"seq {seq} never published; got {messages}"
        assert isinstance(message, str)
        messages.append(json.loads(message))
    return messages


@pytest.fixture
def bus() -> LocalBus:
    return LocalBus()


async def test_newer_orders_by_period_then_seq():
    assert newer(None, snap(3)) == snap(3)
    assert newer(snap(3), snap(4)) == snap(4)
    assert newer(snap(4), snap(3)) == snap(4)
    # A new period starts its seq again: its first snapshot beats the old period's last.
    assert newer(snap(900, "2025-03"), snap(1, "2025-04")) == snap(1, "2025-04")
    assert newer(snap(1, "2025-04"), snap(900, "2025-03")) == snap(1, "2025-04")
    assert newer(snap(7, "2025-12"), snap(1, "2026-01")) == snap(1, "2026-01")
    assert newer(snap(2, "2025-10"), snap(8, "2025-09")) == snap(2, "2025-10")


async def test_first_push_is_published_at_once_and_the_next_waits(bus: LocalBus):
    sub = await bus.subscribe(quota_channel(USER), maxlen=100)
    publisher = QuotaPublisher(bus, interval=30)
    try:
        publisher.push(USER, snap(1))
        message = await sub.get(within=5)
        assert isinstance(message, str)
        assert json.loads(message) == {
            "type": "quota",
            "total": 1000,
            "used": 10,
            "remaining": 990,
            "resetDate": "2025-04-01T00:00:00Z",
            "unlimited": False,
            "seq": 1,
        }
        # Within the (long) interval the next change is held back...
        publisher.push(USER, snap(2))
        assert await sub.get(within=0.2) is None
    finally:
        # ...and close() sends it without waiting the interval out.
        await publisher.close()
    assert [m["seq"] for m in await published(sub)] == [2]


async def test_rapid_pushes_coalesce_to_the_latest(bus: LocalBus):
    sub = await bus.subscribe(quota_channel(USER), maxlen=100)
    publisher = QuotaPublisher(bus, interval=0.2)
    try:
        for seq in range(1, 51):
            publisher.push(USER, snap(seq))
        messages = await wait_for_seq(sub, 50)
        # Pushed before the publisher ran: one publish, at once, of the newest.
        assert [m["seq"] for m in messages] == [50]
        assert messages[-1]["used"] == 500
        assert await published(sub) == []
    finally:
        await publisher.close()
    assert await published(sub) == []


async def test_pending_keeps_the_newest_not_the_last_pushed(bus: LocalBus):
    sub = await bus.subscribe(quota_channel(USER), maxlen=100)
    publisher = QuotaPublisher(bus, interval=30)
    try:
        publisher.push(USER, snap(5))
        assert [m["seq"] for m in await wait_for_seq(sub, 5)] == [5]
        # Concurrent meters of one user may push out of order.
        publisher.push(USER, snap(9))
        publisher.push(USER, snap(7))
    finally:
        await publisher.close()
    assert [m["seq"] for m in await published(sub)] == [9]

    publisher = QuotaPublisher(bus, interval=30)
    try:
        publisher.push(USER, snap(40, "2025-03"))
        await wait_for_seq(sub, 40)
        publisher.push(USER, snap(41, "2025-03"))
        publisher.push(USER, snap(1, "2025-04"))  # the month rolled over
        publisher.push(USER, snap(42, "2025-03"))  # a late checkpoint of last month
    finally:
        await publisher.close()
    [message] = await published(sub)
    assert (message["seq"], message["resetDate"]) == (1, "2025-05-01T00:00:00Z")


async def test_users_are_throttled_independently(bus: LocalBus):
    subs = {user: await bus.subscribe(quota_channel(user), maxlen=100) for user in "abc"}
    publisher = QuotaPublisher(bus, interval=30)
    try:
        for user in "abc":
            publisher.push(user, snap(1))
        for sub in subs.values():
            # Each user's first push goes out at once, whatever the others do.
            assert [m["seq"] for m in await wait_for_seq(sub, 1)] == [1]
        for user in "abc":
            publisher.push(user, snap(2))  # inside each user's interval: held back
        for sub in subs.values():
            assert await sub.get(within=0.1) is None
    finally:
        await publisher.close()
    for sub in subs.values():
        assert [m["seq"] for m in await published(sub)] == [2]


async def test_close_publishes_what_is_pending_for_every_user(bus: LocalBus):
    subs = {user: await bus.subscribe(quota_channel(user), maxlen=100) for user in "ab"}
    publisher = QuotaPublisher(bus, interval=30)
    publisher.push("a", snap(1))
    publisher.push("b", snap(1))
    await wait_for_seq(subs["a"], 1)
    await wait_for_seq(subs["b"], 1)
    for seq in range(2, 6):
        publisher.push("a", snap(seq))
    publisher.push("b", snap(2))
    await publisher.close()
    assert [m["seq"] for m in await published(subs["a"])] == [5]
    assert [m["seq"] for m in await published(subs["b"])] == [2]


async def test_close_publishes_a_first_push_whose_task_has_not_run_yet(bus: LocalBus):
    sub = await bus.subscribe(quota_channel(USER), maxlen=100)
    publisher = QuotaPublisher(bus, interval=30)
    publisher.push(USER, snap(1))
    await publisher.close()
    assert [m["seq"] for m in await published(sub)] == [1]


async def test_a_failing_bus_never_fails_the_push(caplog: pytest.LogCaptureFixture):
    # A real Redis client pointed at a port nobody listens on: every publish fails.
    dead = "redis://127.0.0.1:1/0"
    dead_client = AsyncRedis.from_url(dead)
    failing = RedisBus(dead, "livegate-test", publisher=dead_client)
    publisher = QuotaPublisher(failing, interval=0.01)
    try:
        with caplog.at_level(logging.ERROR, logger="livegate.live"):
            publisher.push(USER, snap(1))
            for _ in range(500):
                if any("quota push" in r.message for r in caplog.records):
                    break
                await asyncio.sleep(0.01)
            publisher.push(USER, snap(2))
            for _ in range(500):
                if len([r for r in caplog.records if "quota push" in r.message]) >= 2:
                    break
                await asyncio.sleep(0.01)
            failures = [r for r in caplog.records if "quota push" in r.message]
            assert len(failures) >= 2, "both the first push and the next one were tried"
            publisher.push(USER, snap(3))
            await publisher.close()
    finally:
        await failing.close()
        await dead_client.aclose()


class BatchRecordingBus(LocalBus):
    """A local bus that also records how publishes reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    async def publish_many(self, messages: list[tuple[str, str]]) -> None:
        self.batches.append(len(messages))
        await super().publish_many(messages)


async def test_pushes_due_together_reach_the_bus_as_one_batch():
    bus = BatchRecordingBus()
    users = [f"user-{i}" for i in range(50)]
    subs = [await bus.subscribe(quota_channel(u), maxlen=100) for u in users]
    publisher = QuotaPublisher(bus, interval=30)
    for user in users:
        publisher.push(user, snap(1))
        publisher.push(user, snap(2))  # folded into the same publish
    for sub in subs:
        assert [m["seq"] for m in await wait_for_seq(sub, 2)] == [2]
    assert bus.batches == [50]
    await publisher.close()


def nothing() -> None:
    pass


async def test_a_limit_change_is_announced_at_once_even_while_pushes_wait(bus: LocalBus):
    sub = await bus.subscribe(quota_channel(USER), maxlen=100)
    changes: list[LimitChange] = []
    stop_watching = await QuotaPublisher(bus, interval=30).watch_limits(changes.append, nothing)
    publisher = QuotaPublisher(bus, interval=30)
    own: list[LimitChange] = []
    stop_own = await publisher.watch_limits(own.append, nothing)
    try:
        publisher.push(USER, snap(1))
        await wait_for_seq(sub, 1)
        # The user's pushes now wait out the interval; the new limit is announced now.
        publisher.limit_changed(USER, snap(2, limit=None))
        # The publisher's own watchers have it before it returns ...
        assert own == [LimitChange(USER, "2025-03", 2, None)]
        # ... and every other instance's through the bus.
        for _ in range(100):
            if changes:
                break
            await asyncio.sleep(0.01)
        assert changes == [LimitChange(USER, "2025-03", 2, None)]
        assert await sub.get(within=0.1) is None
    finally:
        await publisher.close()
        await stop_watching()
        await stop_own()
    assert own == [LimitChange(USER, "2025-03", 2, None)] * 2  # and again from the bus
    [message] = await published(sub)
    assert (message["seq"], message["unlimited"]) == (2, True)


@pytest.mark.parametrize(
    "text",
    ['["u", "2025-03", 1]', '["u", "2025-03", "1", 5]', '["u", "2025-03", 1, true]', "{", "[]"],
)
async def test_a_malformed_limit_change_is_logged_and_skipped(
    bus: LocalBus, caplog: pytest.LogCaptureFixture, text: str
):
    changes: list[LimitChange] = []
    losses: list[None] = []
    publisher = QuotaPublisher(bus, interval=0)
    stop_watching = await publisher.watch_limits(changes.append, lambda: losses.append(None))
    try:
        with caplog.at_level(logging.WARNING, logger="livegate.live"):
            await bus.publish(LIMITS_CHANNEL, text)
            bus._fan_out(LIMITS_CHANNEL, RESYNC)  # announcements lost: said as such
            await bus.publish(LIMITS_CHANNEL, LimitChange(USER, "2025-03", 4, 70).encode())
        assert changes == [LimitChange(USER, "2025-03", 4, 70)]
        assert losses == [None]
        assert [r.message for r in caplog.records] == [
            f"ignored a malformed message on {LIMITS_CHANNEL}"
        ]
    finally:
        await stop_watching()
        await publisher.close()
