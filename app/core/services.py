"""The per-process resources, created once in the lifespan and closed with it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.bus import Bus, create_bus
from app.core.config import Settings
from app.core.db import create_engine, migrate
from app.core.live import QuotaPublisher
from app.core.metering import Metering
from app.core.providers import ProviderRegistry
from app.core.quota import QuotaSnapshot, token_snapshot
from app.core.relay import Relay
from app.core.security import Secrets
from app.core.users import User


@dataclass(slots=True)
class Services:
    settings: Settings
    engine: AsyncEngine
    secrets: Secrets
    bus: Bus
    http: httpx.AsyncClient
    providers: ProviderRegistry
    publisher: QuotaPublisher
    metering: Metering
    relay: Relay

    async def token_quota(self, user: User) -> QuotaSnapshot:
        return await token_snapshot(
            self.engine, user.id, self.settings.tier(user.tier).monthly_tokens
        )


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings, *, run_migrations: bool = True
) -> AsyncIterator[Services]:
    """Create every resource, yield them, and release them in reverse order."""
    engine = create_engine(settings.database_url)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(engine.dispose)
        if run_migrations:
            await migrate(engine)
        secrets = Secrets.from_settings(settings)
        bus = create_bus(settings.redis_url, settings.server.redis_prefix)
        await bus.start()
        stack.push_async_callback(bus.close)
        http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
            follow_redirects=False,
        )
        stack.push_async_callback(http.aclose)
        publisher = QuotaPublisher(bus, settings.metering.push_interval_ms / 1000)
        stack.push_async_callback(publisher.close)
        metering = Metering(engine, publisher, settings.metering)
        await metering.start()
        stack.push_async_callback(metering.close)
        providers = ProviderRegistry.from_config(settings.providers, http)
        yield Services(
            settings=settings,
            engine=engine,
            secrets=secrets,
            bus=bus,
            http=http,
            providers=providers,
            publisher=publisher,
            metering=metering,
            relay=Relay(settings, engine, providers, metering),
        )
