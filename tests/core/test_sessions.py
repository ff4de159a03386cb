"""`TokenDenylist` on Redis: lookups asked for together share one MGET."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.core.db import create_engine
from app.core.sessions import TokenDenylist
from tests.conftest import REDIS_URL


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A Redis key prefix of this test's own (sync: `postgres_url` skips or fails
    outside the event loop when the services are away)."""
    request.getfixturevalue("postgres_url")
    return f"{request.getfixturevalue('redis_prefix')}-deny-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


async def test_revoked_tokens_are_told_apart_when_asked_about_together(
    prefix: str, redis: Redis, tmp_path: Path
):
    engine = create_engine(f"sqlite:///{tmp_path}/unused.db")  # the Redis path reads no SQL
    try:
        denylist = TokenDenylist(engine, redis, prefix)
        tokens = [uuid.uuid4().hex for _ in range(60)]
        revoked = set(tokens[::3])
        later = datetime.now(UTC) + timedelta(minutes=10)
        for token in revoked:
            await denylist.revoke(token, later)
        calls_before = await mget_calls(redis)
        answers = await asyncio.gather(*(denylist.is_revoked(token) for token in tokens))
        calls = await mget_calls(redis) - calls_before
    finally:
        await engine.dispose()
    assert answers == [token in revoked for token in tokens]
    assert 1 <= calls < len(tokens) // 4
    # Kept no longer than the token would have lived.
    ttl = await redis.ttl(f"{prefix}:revoked:{tokens[0]}")
    assert 0 < ttl <= 601


async def mget_calls(client: Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))
