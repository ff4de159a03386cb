"""The per-process resources, created once in the lifespan and closed with it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.anki import Anki
from app.core.auth import Authenticator
from app.core.auth_cache import AuthCache
from app.core.billing import Billing, open_billing
from app.core.bus import Bus, LocalBus, RedisBus
from app.core.config import Settings
from app.core.db import WalCheckpointer, create_engine, migrate
from app.core.keys import KeyUsageRecorder
from app.core.live import QuotaPublisher
from app.core.metering import Metering
from app.core.oauth import OAuthFlow
from app.core.policy import Policy
from app.core.quota import QuotaSnapshot, token_snapshot
from app.core.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from app.core.relay import Relay
from app.core.routing import ModelRouter
from app.core.security import Secrets
from app.core.sessions import Sessions, TokenDenylist
from app.core.upstream_transport import AiohttpTransport
from app.core.users import User, anonymous_user
from app.core.webhooks import QuotaWarnings, WebhookDispatcher

if TYPE_CHECKING:
    from redis.asyncio import Redis


@dataclass(slots=True)
class Services:
    settings: Settings
    engine: AsyncEngine
    secrets: Secrets
    redis: Redis | None
    bus: Bus
    http: httpx.AsyncClient
    router: ModelRouter
    publisher: QuotaPublisher
    metering: Metering
    relay: Relay
    policy: Policy
    sessions: Sessions
    authenticator: Authenticator
    key_usage: KeyUsageRecorder
    anki: Anki
    anonymous: User  # whom anonymous callers' relayed requests are metered to
    oauth: OAuthFlow | None  # Navi's login, when `[oauth]` is configured
    billing: Billing | None  # Navi's Stripe subscription, when Stripe is configured
    webhooks: WebhookDispatcher

    async def token_quota(self, user: User) -> QuotaSnapshot:
        limit = self.settings.tier(user.tier).monthly_tokens
        return await token_snapshot(self.engine, user.id, limit)


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings, *, run_migrations: bool = True
) -> AsyncIterator[Services]:
    """Create every resource, yield them, and release them in reverse order."""
    engine = create_engine(settings.database_url, checkpoint_in_background=True)
    prefix = settings.server.redis_prefix
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(engine.dispose)
        if engine.dialect.name == "sqlite":
            checkpoints = WalCheckpointer(engine)
            checkpoints.start()
            stack.push_async_callback(checkpoints.close)
        if run_migrations:
            await migrate(engine)
        secrets = Secrets.from_settings(settings)

        redis: Redis | None = None
        denylist_redis: Redis | None = None
        bus: Bus
        limiter: RateLimiter
        if settings.redis_url:
            from redis.asyncio import BlockingConnectionPool, Redis

            # Blocking: past the pool size a request waits for a connection instead of
            # failing, so a burst of requests slows down rather than erroring.
            pool = BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=200, timeout=10
            )
            redis = Redis(connection_pool=pool)
            stack.push_async_callback(redis.aclose)
            bus = RedisBus(settings.redis_url, prefix, publisher=redis)
            # The rate limiter's and the denylist's calls go one batch at a time, so
            # each holds one connection rather than taking it from the pool for every
            # call (the checkout was ~30 % of redis-py's CPU per call).
            limiter_redis = Redis(connection_pool=pool, single_connection_client=True)
            stack.push_async_callback(limiter_redis.aclose)
            denylist_redis = Redis(connection_pool=pool, single_connection_client=True)
            stack.push_async_callback(denylist_redis.aclose)
            limiter = RedisRateLimiter(limiter_redis, prefix)
        else:
            bus, limiter = LocalBus(), LocalRateLimiter()
        await bus.start()
        stack.push_async_callback(bus.close)

        # Upstream calls go through aiohttp's pool (see upstream_transport), which keeps
        # every connection open for the next request: with fewer kept than streams in
        # flight, each burst past the keep-alive limit would reconnect.
        upstream = AiohttpTransport(httpx.Limits(max_connections=1000))
        # For the other outbound calls (identity providers' keys, OAuth token exchanges).
        http = httpx.AsyncClient(transport=upstream, follow_redirects=False)
        stack.push_async_callback(http.aclose)
        publisher = QuotaPublisher(bus, settings.metering.push_interval_ms / 1000)
        stack.push_async_callback(publisher.close)
        metering = Metering(
            engine,
            publisher,
            settings.metering,
            warnings=QuotaWarnings(settings.webhooks.quota_warning_percents),
            tier_limit=lambda tier: settings.tier(tier).monthly_tokens,
        )
        await metering.start()
        stack.push_async_callback(metering.close)
        key_usage = KeyUsageRecorder(engine)
        await key_usage.start()
        stack.push_async_callback(key_usage.close)
        dispatcher = WebhookDispatcher(engine, secrets, settings.webhooks)
        await dispatcher.start()
        stack.push_async_callback(dispatcher.close)

        billing = open_billing(settings, engine, publisher)
        if billing is not None:
            stack.push_async_callback(billing.close)

        auth_cache = AuthCache(bus)
        await auth_cache.start(engine)
        stack.push_async_callback(auth_cache.close)
        denylist = TokenDenylist(engine, denylist_redis, prefix, auth_cache)
        sessions = Sessions(engine, secrets, denylist)
        authenticator = Authenticator(
            settings, engine, secrets, denylist, key_usage, http, cache=auth_cache
        )
        router = ModelRouter(settings.providers, settings.models, upstream)
        policy = Policy(settings, engine, limiter)
        yield Services(
            settings=settings,
            engine=engine,
            secrets=secrets,
            redis=redis,
            bus=bus,
            http=http,
            router=router,
            publisher=publisher,
            metering=metering,
            relay=Relay(settings, router, metering, policy),
            policy=policy,
            sessions=sessions,
            authenticator=authenticator,
            key_usage=key_usage,
            anki=Anki(engine, policy, settings.anki.open_mode, settings.anki.identity_providers),
            anonymous=await anonymous_user(engine, settings.anonymous_tier),
            oauth=(
                OAuthFlow(settings.oauth, engine, http, sessions, authenticator)
                if settings.oauth
                else None
            ),
            billing=billing,
            webhooks=dispatcher,
        )
