"""`AuthCache`: principals (and token denylist lookups) served from memory until a
change to users, keys or webhooks or a revocation, on this instance or another (through
the bus); bypassed while the bus is down. Two in-process instances share PostgreSQL
and Redis where the test says so."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager

import httpx
import pytest
import sqlalchemy as sa
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.accounts import set_tier
from app.core.auth_cache import AuthCache
from app.core.bus import LocalBus, RedisBus
from app.core.db import create_engine
from app.core.tables import users, webhooks
from app.core.webhooks import Event, enqueue
from tests.api.test_api_keys import call, create_key, models
from tests.api.test_auth import assert_playground_error, me, refresh, register
from tests.api.test_webhooks import FAST, create_webhook
from tests.conftest import Livegate, StartLivegate, statements_matching
from tests.webhook_receiver import WAIT, Receiver

# The lookup of a presented key (by its hash), not the key management's own reads.
KEY_READ = re.compile(r"^\s*SELECT\b.*\bapi_keys\.key_hash = ", re.IGNORECASE | re.DOTALL)


def key_reads(engine: AsyncEngine) -> AbstractContextManager[list[str]]:
    """The API-key lookups `engine` runs while the block is open."""
    return statements_matching(engine, KEY_READ)


async def status(livegate: Livegate, key: str) -> int:
    return (await models(livegate, key)).status_code


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_key_is_read_once_then_served_from_memory(livegate: Livegate):
    account = await livegate.account()
    with key_reads(livegate.services.engine) as reads:
        assert [await status(livegate, account.api_key) for _ in range(3)] == [200] * 3
    assert len(reads) == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_change_to_one_user_drops_their_entries_alone(
    start_livegate: StartLivegate, receiver: Receiver
):
    """A key revoked, a webhook added, a profile changed: what was read for that user
    is read afresh, everyone else's stays (with many users, changes come all the time)."""
    livegate = await start_livegate(webhooks=FAST)
    account = await livegate.account()
    other = await livegate.account()
    session = await register(livegate)
    created = await create_key(livegate, other.token)
    changes: list[tuple[Callable[[], Awaitable[object]], str | None]] = [
        # The other user's new key revoked: their relay key is read again.
        (
            lambda: call(livegate, "DELETE", f"/api/v1/api-keys/{created['id']}", other.token),
            other.api_key,
        ),
        (lambda: create_webhook(livegate, other.token, receiver.url), other.api_key),
        (
            lambda: call(
                livegate,
                "PUT",
                "/api/auth/profile",
                session["token"],
                json={"username": "renamed"},
            ),
            None,
        ),
    ]
    for change, read_again in changes:
        for key in (account.api_key, other.api_key):
            assert await status(livegate, key) == 200
        assert (await me(livegate, session["token"])).status_code == 200
        with key_reads(livegate.services.engine) as reads:
            changed = await change()
            assert not isinstance(changed, httpx.Response) or changed.is_success, changed.text
            assert await status(livegate, account.api_key) == 200
        assert reads == [], "another user's key is still served from memory"
        if read_again is not None:
            with key_reads(livegate.services.engine) as reads:
                assert await status(livegate, read_again) == 200
            assert len(reads) == 1
    # The session's user was read afresh too.
    assert (await me(livegate, session["token"])).json()["data"]["username"] == "renamed"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_write_naming_no_user_still_empties_the_cache(livegate: Livegate):
    """The safe side: a write to users, keys or webhooks that does not say whose
    principals it changes (a new code path, an administrator's script) may change
    anyone's."""
    account = await livegate.account()
    other = await livegate.account()
    assert await status(livegate, account.api_key) == 200
    with key_reads(livegate.services.engine) as reads:
        async with livegate.services.engine.begin() as conn:
            await conn.execute(
                sa.update(users).where(users.c.id == other.user.id).values(first_name="Ada")
            )
        assert await status(livegate, account.api_key) == 200
    assert len(reads) == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_key_usage_statistics_leave_the_cache_alone(livegate: Livegate):
    account = await livegate.account()
    assert await status(livegate, account.api_key) == 200
    with key_reads(livegate.services.engine) as reads:
        await livegate.services.key_usage.flush()
        assert await status(livegate, account.api_key) == 200
    assert reads == []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_user_or_key_added_leaves_the_cache_alone(livegate: Livegate):
    """Nothing kept was read from a row just added: sign-ups and new keys, which a
    busy deployment sees all the time, keep every instance's cache warm."""
    account = await livegate.account()
    assert await status(livegate, account.api_key) == 200
    with key_reads(livegate.services.engine) as reads:
        other = await register(livegate)
        await create_key(livegate, other["token"])
        assert await status(livegate, account.api_key) == 200
    assert reads == []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_token_refresh_leaves_the_cache_alone(livegate: Livegate):
    """A refresh takes the user's lock, a write that changes nothing: refreshes come
    all the time, and each would otherwise empty every instance's cache."""
    account = await livegate.account()
    session = await register(livegate)
    assert await status(livegate, account.api_key) == 200
    with key_reads(livegate.services.engine) as reads:
        refreshed = await refresh(livegate, session["refresh_token"])
        assert refreshed.status_code == 200, refreshed.text
        assert await status(livegate, account.api_key) == 200
    assert reads == []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_change_made_under_the_users_lock_still_empties_the_cache(livegate: Livegate):
    """Only the lock is neutral, not the transaction that takes it: a password change
    locks the user, then refuses the tokens issued before it."""
    account = await register(livegate)
    assert (await me(livegate, account["token"])).status_code == 200  # kept
    changed = await call(
        livegate,
        "PUT",
        "/api/auth/password",
        account["token"],
        json={"oldPassword": account["password"], "newPassword": "Another-pa55word"},
    )
    assert changed.status_code == 200, changed.text
    assert_playground_error(await me(livegate, account["token"]), 401, "AUTHENTICATION_ERROR")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_webhook_delivery_leaves_the_cache_alone(
    start_livegate: StartLivegate, receiver: Receiver
):
    livegate = await start_livegate(webhooks=FAST)
    account = await livegate.account()
    webhook = await create_webhook(livegate, account.token, receiver.url)
    assert await status(livegate, account.api_key) == 200
    with key_reads(livegate.services.engine) as reads:
        async with livegate.services.engine.begin() as conn:
            queued = await enqueue(conn, account.user.id, Event.TASK_COMPLETED, dict)
        assert queued == 1
        await receiver.wait_for(1)
        recorded = sa.select(webhooks.c.last_delivery_at).where(webhooks.c.id == webhook["id"])
        async with asyncio.timeout(WAIT):  # recorded after the receiver answered
            while True:
                async with livegate.services.engine.connect() as conn:
                    if await conn.scalar(recorded) is not None:
                        break
                await asyncio.sleep(0.02)
        assert await status(livegate, account.api_key) == 200
    assert reads == []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_logout_leaves_the_other_principals_cached(livegate: Livegate):
    account = await livegate.account()
    leaving, staying = await register(livegate), await register(livegate)
    for token in (leaving["token"], staying["token"]):
        assert (await me(livegate, token)).status_code == 200
    assert await status(livegate, account.api_key) == 200

    with key_reads(livegate.services.engine) as reads:
        logout = await call(livegate, "POST", "/api/auth/logout", leaving["token"])
        assert logout.status_code == 200
        assert await status(livegate, account.api_key) == 200
    assert reads == []
    assert_playground_error(await me(livegate, leaving["token"]), 401, "AUTHENTICATION_ERROR")
    assert (await me(livegate, staying["token"])).status_code == 200


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_key_revoked_on_one_instance_is_refused_by_the_other(
    start_livegate: StartLivegate,
):
    a, b = await start_livegate(), await start_livegate()
    account = await a.account()
    key = await create_key(a, account.token)
    with key_reads(b.services.engine) as reads:
        assert [await status(b, key["key"]) for _ in range(2)] == [200, 200]
    assert len(reads) == 1, "B serves the key from its cache"
    revoked = await call(a, "DELETE", f"/api/v1/api-keys/{key['id']}", account.token)
    assert revoked.status_code == 200
    # B hears of it through Redis: within the bus's latency, well under this bound.
    for _ in range(200):
        if await status(b, key["key"]) == 401:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the revoked key still works on the other instance")
    assert await status(a, key["key"]) == 401


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_user_changed_on_one_instance_is_read_afresh_by_the_other_alone(
    start_livegate: StartLivegate,
):
    a, b = await start_livegate(), await start_livegate()
    moving, staying = await a.account(), await a.account()
    authenticate = b.services.authenticator.authenticate
    for key in (moving.api_key, staying.api_key):
        assert (await authenticate(key)).user.tier == "free"
    svc = a.services
    await set_tier(
        svc.engine, svc.publisher, moving.user.id, "pro", svc.settings.tier("pro").monthly_tokens
    )
    # B hears of it through Redis: within the bus's latency, well under this bound.
    for _ in range(200):
        if (await authenticate(moving.api_key)).user.tier == "pro":
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the other instance still holds the old tier")
    with key_reads(b.services.engine) as reads:
        assert (await authenticate(staying.api_key)).user.tier == "free"
    assert reads == [], "the other user's key is still served from memory"


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_session_logged_out_on_one_instance_is_refused_by_the_other(
    start_livegate: StartLivegate,
):
    a = await start_livegate()
    b = await start_livegate()
    account = await register(a)
    token = account["token"]
    # B has looked the token up, and keeps what it found.
    assert [(await me(b, token)).status_code for _ in range(2)] == [200, 200]
    b.services.sessions.denylist.CACHED_SECONDS = 3600  # only the announcement tells B

    assert (await call(a, "POST", "/api/auth/logout", token)).status_code == 200
    assert_playground_error(await me(a, token), 401, "AUTHENTICATION_ERROR")
    # B hears of it through Redis: within the bus's latency, well under this bound.
    for _ in range(200):
        if (await me(b, token)).status_code == 401:
            break
        await asyncio.sleep(0.01)
    assert_playground_error(await me(b, token), 401, "AUTHENTICATION_ERROR")


async def test_the_cache_is_neither_read_nor_filled_while_the_bus_is_down(
    postgres_url: str,
):
    dead = "redis://127.0.0.1:1/0"
    client = AsyncRedis.from_url(dead)
    bus = RedisBus(dead, "livegate-test-auth", publisher=client, max_backoff=0.05)
    await bus.start()  # gives up waiting after a while; the reader keeps retrying
    cache = AuthCache(bus)
    engine = create_engine(postgres_url)
    await cache.start(engine)
    try:
        assert not cache.usable
        cache.put("k", "v", cache.generation)
        assert cache.get("k") is None
    finally:
        await cache.close()
        await bus.close()
        await client.aclose()
        await engine.dispose()


async def test_a_read_that_began_before_an_invalidation_is_not_stored(postgres_url: str):
    bus = LocalBus()
    cache = AuthCache(bus)
    engine = create_engine(postgres_url)
    await cache.start(engine)
    try:
        began = cache.generation
        cache.invalidate()  # a change committed while the read was in flight
        cache.put("k", "old", began)
        assert cache.get("k") is None
        cache.put("k", "new", cache.generation)
        assert cache.get("k") == "new"
    finally:
        await cache.close()
        await engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_callers_missing_a_key_together_share_one_read(livegate: Livegate):
    """A cold start: every request in flight presents the same key at once."""
    account = await livegate.account()
    authenticator = livegate.services.authenticator
    with key_reads(livegate.services.engine) as reads:
        principals = await asyncio.gather(
            *(authenticator.authenticate(account.api_key) for _ in range(20))
        )
    assert len(reads) == 1
    assert {p.user.id for p in principals} == {account.user.id}
    with key_reads(livegate.services.engine) as reads:  # stored for those who come later
        await authenticator.authenticate(account.api_key)
    assert reads == []


async def cache_on_local_bus(postgres_url: str) -> tuple[AuthCache, AsyncEngine]:
    cache = AuthCache(LocalBus())
    engine = create_engine(postgres_url)
    await cache.start(engine)
    return cache, engine


async def test_a_caller_leaving_a_shared_read_does_not_end_it_for_the_others(
    postgres_url: str,
):
    cache, engine = await cache_on_local_bus(postgres_url)
    release = asyncio.Event()
    calls: list[int] = []

    async def read() -> str:
        calls.append(1)
        await release.wait()
        return "value"

    try:
        first = asyncio.create_task(cache.read_through("k", read))
        second = asyncio.create_task(cache.read_through("k", read))
        await asyncio.sleep(0)
        first.cancel()
        release.set()
        assert await second == "value"
        assert first.cancelled()
        assert calls == [1]
        assert cache.get("k") == "value"
    finally:
        await cache.close()
        await engine.dispose()


@pytest.mark.parametrize("change", ["invalidation", "forget", "user"])
async def test_a_read_that_began_before_a_change_is_not_shared_after_it(
    postgres_url: str, change: str
):
    cache, engine = await cache_on_local_bus(postgres_url)
    release = asyncio.Event()
    values = iter(["old", "new"])

    async def read() -> str:
        value = next(values)
        await release.wait()
        return value

    def user_of(value: str) -> str:
        return "u"

    try:
        before = asyncio.create_task(cache.read_through("k", read, user_of=user_of))
        await asyncio.sleep(0)
        # A change committed, a revocation, or a change to the user the entry is
        # read for (known only once read), while the first read was in flight.
        if change == "invalidation":
            cache.invalidate()
        elif change == "forget":
            await cache.forget("k")
        else:
            cache.invalidate_user("u")
        after = asyncio.create_task(cache.read_through("k", read, user_of=user_of))
        await asyncio.sleep(0)
        release.set()
        assert (await before, await after) == ("old", "new")
        assert cache.get("k") == "new"
    finally:
        await cache.close()
        await engine.dispose()


async def test_a_read_in_flight_when_its_entry_is_forgotten_is_not_stored(postgres_url: str):
    cache, engine = await cache_on_local_bus(postgres_url)
    release = asyncio.Event()

    async def read() -> str:
        await release.wait()
        return "old"

    try:
        cache.put("other", "kept", cache.generation)
        reading = asyncio.create_task(cache.read_through("k", read))
        await asyncio.sleep(0)
        await cache.forget("k")  # a revocation while the read was in flight
        release.set()
        assert await reading == "old"
        assert cache.get("k") is None
        assert cache.get("other") == "kept"
    finally:
        await cache.close()
        await engine.dispose()


async def test_a_users_change_drops_the_entries_read_for_them_alone(postgres_url: str):
    cache, engine = await cache_on_local_bus(postgres_url)
    try:
        for key, user in (("a-key", "a"), ("a-user", "a"), ("b-key", "b"), ("denied", None)):
            cache.put(key, key, cache.generation, user=user)
        cache.put("a-token", "expiring", cache.generation, max_age=0.01, user="a")
        await asyncio.sleep(0.05)
        assert cache.get("a-token") is None  # expired: dropped from its user's keys too
        cache.put("a-key", "a-key again", cache.generation, user="a")
        cache.invalidate_user("a")
        assert [cache.get(k) for k in ("a-key", "a-user", "b-key", "denied")] == [
            None,
            None,
            "b-key",
            "denied",
        ]
        cache.invalidate_user("a")  # nothing left of theirs: nothing else goes
        assert (cache.get("b-key"), cache.get("denied")) == ("b-key", "denied")
    finally:
        await cache.close()
        await engine.dispose()


async def test_a_full_cache_keeps_its_users_entries_findable(postgres_url: str):
    cache = AuthCache(LocalBus(), max_entries=4)
    engine = create_engine(postgres_url)
    await cache.start(engine)
    try:
        cache.put("a-key", "kept", cache.generation, user="a")
        cache.put("b-key", "kept", cache.generation, user="b")
        for n in range(2):
            cache.put(f"token-{n}", False, cache.generation, max_age=0.01)
        await asyncio.sleep(0.05)
        cache.put("a-user", "kept", cache.generation, user="a")  # full: a sweep
        cache.invalidate_user("a")
        assert (cache.get("a-key"), cache.get("a-user"), cache.get("b-key")) == (
            None,
            None,
            "kept",
        )
    finally:
        await cache.close()
        await engine.dispose()


async def test_entries_past_their_age_make_room_before_live_ones_go(postgres_url: str):
    cache = AuthCache(LocalBus(), max_entries=4)
    engine = create_engine(postgres_url)
    await cache.start(engine)
    try:
        cache.put("principal", "kept", cache.generation)
        for n in range(3):  # lookups of tokens refreshed away: never asked for again
            cache.put(f"token-{n}", False, cache.generation, max_age=0.01)
        await asyncio.sleep(0.05)
        cache.put("new", "kept", cache.generation)  # full: the expired entries go
        assert (cache.get("principal"), cache.get("new")) == ("kept", "kept")
        for n in range(3):
            cache.put(f"live-{n}", "kept", cache.generation)
        # Full of live entries: all go (a full reload is cheaper than tracking use).
        assert cache.get("principal") is None
        assert cache.get("live-2") == "kept"
    finally:
        await cache.close()
        await engine.dispose()


async def test_a_failed_shared_read_fails_every_caller_and_is_not_kept(postgres_url: str):
    cache, engine = await cache_on_local_bus(postgres_url)
    attempts: list[int] = []

    async def read() -> str:
        attempts.append(1)
        await asyncio.sleep(0)
        if len(attempts) == 1:
            raise ConnectionError("database away")
        return "value"

    try:
        outcomes = await asyncio.gather(
            *(cache.read_through("k", read) for _ in range(3)), return_exceptions=True
        )
        assert [type(o) for o in outcomes] == [ConnectionError] * 3
        assert await cache.read_through("k", read) == "value"  # read again, not the error
        assert attempts == [1, 1]
    finally:
        await cache.close()
        await engine.dispose()
