"""Fixtures: real servers on loopback, real SQLite/PostgreSQL and Redis.

`backend` picks the storage and bus: "sqlite" (SQLite file + in-process bus, the
embedded defaults) or "postgres" (PostgreSQL + Redis, as in production). Tests use
sqlite unless their module parametrizes `backend` indirectly. When the services are
unreachable the postgres variants skip locally and fail under CI (`CI` set).
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from app.api.http_protocol import HttpProtocol
from app.core.config import MeteringConfig, ProviderConfig, ServerConfig, Settings, TierConfig
from app.core.config import _builtin_tiers as builtin_tiers
from app.core.services import Services
from app.core.users import User, create_user, get_or_create_relay_key
from app.main import create_app
from tests.fake_upstream import FakeUpstream, LoopbackServer, start_fake_upstream
from tests.webhook_receiver import Receiver, start_receiver

PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FAKE_MODEL = "fake-model"


def _services_error() -> str | None:
    async def check_pg() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=3)
        await conn.close()

    try:
        asyncio.run(check_pg())
    except Exception as exc:
        return f"PostgreSQL at {PG_ADMIN_URL} unreachable: {exc!r}"
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping()
    except Exception as exc:
        return f"Redis at {REDIS_URL} unreachable: {exc!r}"
    return None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test session, dropped at its end."""
    error = _services_error()
    if error:
        if os.environ.get("CI"):
            pytest.fail(f"CI requires PostgreSQL and Redis: {error}")
        pytest.skip(error)
    name = f"livegate_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    return f"livegate-test-{uuid.uuid4().hex[:8]}"


@dataclass
class Backend:
    name: str
    database_url: str
    redis_url: str | None
    redis_prefix: str


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "postgres":
        return Backend(
            "postgres",
            request.getfixturevalue("postgres_url"),
            REDIS_URL,
            request.getfixturevalue("redis_prefix"),
        )
    return Backend("sqlite", f"sqlite:///{tmp_path}/livegate.db", None, "livegate")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on loopback."""
    recv, server = await start_receiver()
    try:
        yield recv
    finally:
        await server.stop()


@pytest.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    fake, server = await start_fake_upstream()
    try:
        yield fake
    finally:
        fake.release.set()
        fake.finish_release.set()
        await server.stop()


@dataclass
class Account:
    user: User
    token: str
    api_key: str


@dataclass
class Livegate:
    """A running instance: its URL and its services, for set-up and inspection."""

    server: LoopbackServer
    app: Starlette
    settings: Settings

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}"

    @property
    def services(self) -> Services:
        return self.app.state.services  # type: ignore[no-any-return]

    async def account(self, tier: str = "free", email: str | None = None) -> Account:
        svc = self.services
        user = await create_user(
            svc.engine,
            email=email or f"{uuid.uuid4().hex[:10]}@example.test",
            password=None,
            tier=tier,
        )
        api_key = await get_or_create_relay_key(svc.engine, svc.secrets, user.id)
        return Account(user, svc.secrets.issue_token(user.id), api_key)


def make_settings(backend: Backend, upstream: FakeUpstream | None, **overrides: Any) -> Settings:
    # Request rates off unless a test sets them: a suite of fast requests is no abuse.
    tiers = {
        name: tier.model_copy(update={"requests_per_minute": None, "burst": None, "surfaces": {}})
        for name, tier in builtin_tiers().items()
    }
    tiers.update(overrides.pop("tiers", {}))
    providers = (
        [
            ProviderConfig(
                name="fake",
                base_url=upstream.base_url,
                api_key="sk-upstream",
                models=[FAKE_MODEL],
                read_timeout=30,
            )
        ]
        if upstream is not None
        else []
    )
    values: dict[str, Any] = {
        "database_url": backend.database_url,
        "redis_url": backend.redis_url,
        "jwt_secret": "test-secret-" + "x" * 40,
        "providers": providers,
        "tiers": tiers,
        "metering": MeteringConfig(
            checkpoint_tokens=5, checkpoint_ms=10_000, push_interval_ms=0, heartbeat_seconds=10
        ),
        "server": ServerConfig(redis_prefix=backend.redis_prefix, ws_ping_seconds=30),
    }
    values.update(overrides)
    return Settings(**values)


StartLivegate = Callable[..., Awaitable[Livegate]]


@pytest.fixture
async def start_livegate(
    backend: Backend, fake_upstream: FakeUpstream
) -> AsyncIterator[StartLivegate]:
    """Start Livegate instances (all on this test's backend and fake upstream)."""
    running: list[LoopbackServer] = []

    async def start(**overrides: Any) -> Livegate:
        settings = make_settings(backend, fake_upstream, **overrides)
        app = create_app(settings)
        server = LoopbackServer(app, http=HttpProtocol)  # as `python -m app serve`
        await server.start()
        running.append(server)
        return Livegate(server, app, settings)

    try:
        yield start
    finally:
        for server in reversed(running):
            await server.stop()


@pytest.fixture
async def livegate(start_livegate: StartLivegate) -> Livegate:
    return await start_livegate()


# Small tiers for quota tests; every other limit left unlimited.
def tiny_tier(monthly_tokens: int) -> dict[str, TierConfig]:
    return {"tiny": TierConfig(monthly_tokens=monthly_tokens)}


@contextmanager
def statements_matching(engine: AsyncEngine, pattern: re.Pattern[str]) -> Iterator[list[str]]:
    """The statements matching `pattern` that `engine` runs while the block is open."""
    seen: list[str] = []

    def on_execute(*args: Any) -> None:
        if pattern.match(args[2]):
            seen.append(args[2])

    sa.event.listen(engine.sync_engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", on_execute)
