"""The relay's start written beside the upstream call, when that start fails: the
upstream's answer is hung up on and nothing is billed. A stream closed at its first
read."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.auth import Principal
from app.core.formats import ContentFormat, OpenAIFormat
from app.core.metering import Metering
from app.core.policy import Policy
from app.core.ratelimit import LocalRateLimiter
from app.core.relay import Relay, RequestContext, parse_chat_request
from app.core.routing import ModelRouter
from app.core.tables import UsageStatus, usage_logs
from app.core.upstream_transport import AiohttpTransport
from app.core.users import create_user
from tests.conftest import FAKE_MODEL, Backend, make_settings
from tests.core.test_metering import CONFIG, Env, env
from tests.core.test_usage_writer_faults import CommitAnswerCutter, cutter
from tests.fake_upstream import FakeUpstream

__all__ = ["cutter", "env"]  # the fixtures

pytestmark = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


async def test_a_start_lost_beside_an_answered_stream_hangs_up_and_bills_nothing(
    backend: Backend,
    env: Env,
    cutter: tuple[CommitAnswerCutter, AsyncEngine],
    fake_upstream: FakeUpstream,
):
    """An unlimited user's start goes beside the upstream call; here its answer is lost
    (committed unbeknown) while the upstream has begun to stream."""
    proxy, engine = cutter
    settings = make_settings(backend, fake_upstream)
    metering = Metering(engine, env.publisher, CONFIG)
    upstream = AiohttpTransport(httpx.Limits(max_connections=10))
    router = ModelRouter(settings.providers, settings.models, upstream)
    relay = Relay(settings, router, metering, Policy(settings, engine, LocalRateLimiter()))
    user = await create_user(
        env.engine, email="beside@example.test", password=None, tier="enterprise"
    )
    fake_upstream.script.hold_after = 2  # two tokens, then the stream waits
    chat = parse_chat_request(
        {"model": FAKE_MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    proxy.statement = b"WITH inserted AS (INSERT INTO usage_logs"
    try:
        with pytest.raises(sa.exc.DBAPIError):
            await relay.open_stream(
                Principal(user), chat, RequestContext("req-beside"), OpenAIFormat(False)
            )
        assert proxy.cut == 1
        for _ in range(500):
            if fake_upstream.streams and fake_upstream.streams[-1].closed_early:
                break
            await asyncio.sleep(0.01)
        assert fake_upstream.streams[-1].closed_early
    finally:
        await metering.close()  # waits for the clean-up of the failed start
        await upstream.aclose()
    async with env.engine.connect() as conn:
        query = sa.select(usage_logs).where(usage_logs.c.request_id == "req-beside")
        [row] = (await conn.execute(query)).all()
    assert (row.status, row.total_tokens) == (UsageStatus.ERROR, 0)


async def test_a_stream_yields_at_its_first_read_even_with_nothing_to_send(
    backend: Backend, env: Env, fake_upstream: FakeUpstream
):
    """Navi's format sends nothing for a role-only first event. A caller whose client
    left must still be able to close the stream there, not wait for the next event."""
    settings = make_settings(backend, fake_upstream)
    metering = await env.started_metering()
    upstream = AiohttpTransport(httpx.Limits(max_connections=10))
    router = ModelRouter(settings.providers, settings.models, upstream)
    relay = Relay(settings, router, metering, Policy(settings, env.engine, LocalRateLimiter()))
    user = await create_user(
        env.engine, email="first-read@example.test", password=None, tier="free"
    )
    fake_upstream.script.hold_after = 0  # the role event, then nothing until released
    chat = parse_chat_request(
        {"model": FAKE_MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    try:
        stream = await relay.open_stream(
            Principal(user), chat, RequestContext("req-first-read"), ContentFormat()
        )
        try:
            async with asyncio.timeout(10):
                assert await anext(stream) == b""
        finally:
            await stream.aclose()
        for _ in range(500):
            if fake_upstream.streams[-1].closed_early:
                break
            await asyncio.sleep(0.01)
        assert fake_upstream.streams[-1].closed_early
    finally:
        fake_upstream.release.set()
        await upstream.aclose()
    async with env.engine.connect() as conn:
        query = sa.select(usage_logs).where(usage_logs.c.request_id == "req-first-read")
        [row] = (await conn.execute(query)).all()
    assert (row.status, row.completion_tokens) == (UsageStatus.CANCELLED, 0)
