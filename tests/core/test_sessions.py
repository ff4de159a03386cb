"""`TokenDenylist`: lookups asked for together share one query, in Redis or in SQL; kept
in the auth cache until any revocation, on any instance."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.auth_cache import AuthCache
from app.core.bus import Bus, LocalBus, RedisBus
from app.core.db import create_engine, migrate
from app.core.sessions import TokenDenylist
from app.core.tables import revoked_tokens
from tests.conftest import REDIS_URL, statements_matching


@dataclass
class Store:
    kind: str  # "redis", "sqlite" or "postgres"
    database_url: str
    redis_prefix: str | None = None


@pytest.fixture(params=["redis", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Where revocations live. A sync fixture: `postgres_url` skips locally (and fails
    under CI) outside the event loop when the services are away."""
    sqlite_url = f"sqlite:///{tmp_path}/livegate.db"
    if request.param == "sqlite":
        return Store("sqlite", sqlite_url)
    postgres_url = request.getfixturevalue("postgres_url")
    if request.param == "postgres":
        return Store("postgres", postgres_url)
    prefix = f"{request.getfixturevalue('redis_prefix')}-deny-{uuid.uuid4().hex[:8]}"
    return Store("redis", sqlite_url, prefix)


@dataclass
class Denylist:
    denylist: TokenDenylist
    engine: AsyncEngine
    redis: Redis | None
    prefix: str


@pytest.fixture
async def env(store: Store) -> AsyncIterator[Denylist]:
    engine = create_engine(store.database_url)
    await migrate(engine)
    redis = Redis.from_url(REDIS_URL) if store.redis_prefix else None
    try:
        prefix = store.redis_prefix or "unused"
        yield Denylist(TokenDenylist(engine, redis, prefix), engine, redis, prefix)
    finally:
        if redis is not None:
            await redis.aclose()
        await engine.dispose()


async def test_revoked_tokens_are_told_apart_when_asked_about_together(env: Denylist):
    tokens = [uuid.uuid4().hex for _ in range(60)]
    revoked = set(tokens[::3])
    later = datetime.now(UTC) + timedelta(minutes=10)
    for token in revoked:
        await env.denylist.revoke(token, later)
    before = await lookups(env) if env.redis is not None else 0
    answers = await asyncio.gather(*(env.denylist.is_revoked(token) for token in tokens))
    assert answers == [token in revoked for token in tokens]
    if env.redis is not None:
        # Sixty questions, a handful of MGETs: the first alone, the rest together.
        assert 1 <= await lookups(env) - before < len(tokens) // 4


async def test_a_token_revoked_after_a_lookup_is_refused_at_the_next(env: Denylist):
    token = uuid.uuid4().hex
    assert not await env.denylist.is_revoked(token)
    await env.denylist.revoke(token, datetime.now(UTC) + timedelta(minutes=10))
    assert await env.denylist.is_revoked(token)
    if env.redis is not None:
        # Kept no longer than the token would have lived.
        ttl = await env.redis.ttl(f"{env.prefix}:revoked:{token}")
        assert 0 < ttl <= 601


async def lookups(env: Denylist) -> int:
    assert env.redis is not None
    stats = await env.redis.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


@asynccontextmanager
async def cached_denylist(store: Store, env: Denylist) -> AsyncIterator[TokenDenylist]:
    """A denylist whose lookups are kept in an instance's `AuthCache`, on a bus of its
    own (through Redis when the store is Redis, as in production)."""
    bus: Bus = (
        RedisBus(REDIS_URL, env.prefix, publisher=env.redis)
        if env.redis is not None
        else LocalBus()
    )
    await bus.start()
    cache = AuthCache(bus)
    await cache.start(env.engine)
    try:
        yield TokenDenylist(env.engine, env.redis, env.prefix, cache)
    finally:
        await cache.close()
        await bus.close()


async def revoke_behind_its_back(env: Denylist, token: str) -> None:
    if env.redis is not None:
        await env.redis.set(f"{env.prefix}:revoked:{token}", b"1", ex=600)
        return
    async with env.engine.begin() as conn:
        expires_at = datetime.now(UTC) + timedelta(minutes=10)
        await conn.execute(revoked_tokens.insert().values(jti=token, expires_at=expires_at))


async def test_a_revocation_forgets_the_cached_lookup_of_its_id_alone(store: Store, env: Denylist):
    async with cached_denylist(store, env) as denylist:
        token, session = uuid.uuid4().hex, uuid.uuid4().hex
        other = uuid.uuid4().hex
        assert not await denylist.is_revoked(token, session)
        assert not await denylist.is_revoked(other)
        # Answered from the cache: revocations written around the denylist go unseen.
        await revoke_behind_its_back(env, token)
        await revoke_behind_its_back(env, other)
        assert not await denylist.is_revoked(token, session)
        # A revocation through the denylist forgets what was kept for its id, and
        # nothing else: `token`'s lookup is still the kept one.
        await denylist.revoke(session, datetime.now(UTC) + timedelta(minutes=10))
        assert await denylist.is_revoked(token, session)
        assert not await denylist.is_revoked(token)
        assert not await denylist.is_revoked(other)
        # A revoked answer is kept too, and stays right.
        assert await denylist.is_revoked(token, session)
        await denylist.revoke(other, datetime.now(UTC) + timedelta(minutes=10))
        assert await denylist.is_revoked(other)


@pytest.mark.parametrize("store", ["redis"], indirect=True)  # how instances share them
async def test_a_revocation_on_one_instance_clears_that_lookup_on_the_others(
    store: Store, env: Denylist
):
    async with cached_denylist(store, env) as here, cached_denylist(store, env) as there:
        here.CACHED_SECONDS = 3600  # only the announcement can make it look again
        token, other = uuid.uuid4().hex, uuid.uuid4().hex
        assert not await here.is_revoked(token)
        assert not await here.is_revoked(other)
        await revoke_behind_its_back(env, other)
        await there.revoke(token, datetime.now(UTC) + timedelta(minutes=10))
        for _ in range(500):  # within the bus's latency; bounded
            if await here.is_revoked(token):
                break
            await asyncio.sleep(0.01)
        assert await here.is_revoked(token)
        # The announcement named `token`: what was kept for another id stays.
        assert not await here.is_revoked(other)


async def test_a_revocation_whose_announcement_was_lost_holds_within_the_bound(
    store: Store, env: Denylist
):
    async with cached_denylist(store, env) as denylist:
        denylist.CACHED_SECONDS = 0.3  # 5 s in production
        token = uuid.uuid4().hex
        assert not await denylist.is_revoked(token)
        # Revoked by another instance whose announcement never arrived.
        await revoke_behind_its_back(env, token)
        for _ in range(300):  # bounded: the lookup is made again once the bound passed
            if await denylist.is_revoked(token):
                break
            await asyncio.sleep(0.01)
        assert await denylist.is_revoked(token)


# The denylist's reads of `revoked_tokens`.
REVOKED_READ = re.compile(r"^\s*SELECT\b.*\brevoked_tokens\b", re.IGNORECASE | re.DOTALL)


async def test_a_token_and_its_session_missing_from_the_cache_are_looked_up_together(
    store: Store, env: Denylist
):
    """Kept together, they expire together: one MGET or SELECT for both, not two in a
    row (every `CACHED_SECONDS`, for every token in use)."""

    async def lookups_made(*ids: str) -> tuple[bool, int]:
        before = await lookups(env) if env.redis is not None else 0
        with statements_matching(env.engine, REVOKED_READ) as reads:
            revoked = await denylist.is_revoked(*ids)
        after = await lookups(env) if env.redis is not None else 0
        return revoked, after - before + len(reads)

    async with cached_denylist(store, env) as denylist:
        token, session = uuid.uuid4().hex, uuid.uuid4().hex
        assert await lookups_made(token, session) == (False, 1)
        assert await lookups_made(token, session) == (False, 0)  # both kept
        logged_out_token, logged_out = uuid.uuid4().hex, uuid.uuid4().hex
        await revoke_behind_its_back(env, logged_out)
        assert await lookups_made(logged_out_token, logged_out) == (True, 1)
        # One kept, one not: only the other is looked up.
        assert await lookups_made(token, uuid.uuid4().hex) == (False, 1)
