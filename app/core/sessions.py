"""Sessions: access tokens that can be revoked, and rotating refresh tokens."""

from __future__ import annotations

import asyncio
import functools
import secrets as random
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.auth_cache import AuthCache
from app.core.batching import Batcher
from app.core.db import single_reads
from app.core.errors import Unauthorized
from app.core.security import JWT_LIFETIME, Secrets, hash_key, new_id
from app.core.tables import refresh_tokens, revoked_tokens
from app.core.users import lock_user

if TYPE_CHECKING:
    from redis.asyncio import Redis

REFRESH_LIFETIME = timedelta(days=30)
REFRESH_PREFIX = "rt_"


@dataclass(frozen=True, slots=True)
class SessionTokens:
    user_id: str
    access_token: str
    refresh_token: str
    expires_in: int  # seconds the access token is valid


# The cache's entry for the lookup of one id.
_REVOKED_ENTRY = "revoked:"
_REVOKED_AMONG = sa.select(revoked_tokens.c.jti).where(
    revoked_tokens.c.jti.in_(sa.bindparam("token_ids", expanding=True))
)


class TokenDenylist:
    """Ids of access tokens revoked before they expire, kept until they would have.

    In Redis when configured, otherwise in SQL. With a `cache`, what the lookup of an
    id (a token's, a session's) found is kept there for `CACHED_SECONDS`, and its
    revocation drops that entry on all instances (`AuthCache.forget`): a token used
    again costs no round trip, and a logout holds everywhere within the bus's
    latency, or within `CACHED_SECONDS` should the announcement be lost. Other ids'
    entries stay.
    """

    CACHED_SECONDS = 5.0

    def __init__(
        self,
        engine: AsyncEngine,
        redis: Redis | None,
        prefix: str,
        cache: AuthCache | None = None,
    ) -> None:
        self._engine = engine
        self._reads = single_reads(engine)
        self._redis = redis
        self._prefix = f"{prefix}:revoked:"
        self._cache = cache
        # Every request with a token asks; those asking while a lookup is out share
        # the next one (one MGET or SELECT): the call costs more than what it reads.
        self._lookups: Batcher[tuple[str, ...], bool] = Batcher("revoked-tokens", self._revoked)

    async def revoke(self, token_id: str, expires_at: datetime) -> None:
        ttl = int((expires_at - datetime.now(UTC)).total_seconds()) + 1
        if ttl <= 0:
            return
        if self._redis is not None:
            await self._redis.set(self._prefix + token_id, b"1", ex=ttl)
        else:
            now = datetime.now(UTC)
            async with self._engine.begin() as conn:
                await conn.execute(revoked_tokens.delete().where(revoked_tokens.c.expires_at < now))
                try:
                    async with conn.begin_nested():
                        await conn.execute(
                            revoked_tokens.insert().values(jti=token_id, expires_at=expires_at)
                        )
                except IntegrityError:
                    pass  # revoked twice: already denied
        if self._cache is not None:
            await self._cache.forget(_REVOKED_ENTRY + token_id)

    def is_revoked(self, *ids: str) -> Awaitable[bool]:
        """Whether any of `ids` (a token's id, its session's) was revoked."""
        if self._cache is None:
            return self._lookups.submit(ids)
        return self._cached_revoked(self._cache, ids)

    async def _cached_revoked(self, cache: AuthCache, ids: tuple[str, ...]) -> bool:
        # An entry per id: a revocation names one id to forget.
        missing: list[str] = []
        for token_id in ids:
            kept = cache.get(_REVOKED_ENTRY + token_id)
            if kept:
                return True
            if kept is None:
                missing.append(token_id)
        if not missing:
            return False
        if len(missing) == 1:
            return await self._read_revoked(cache, missing[0])
        # A token and its session, stored together, expire together: their lookups
        # go in one batch (one MGET or SELECT) rather than one after the other.
        found = await asyncio.gather(*(self._read_revoked(cache, t) for t in missing))
        return any(found)

    def _read_revoked(self, cache: AuthCache, token_id: str) -> Awaitable[bool]:
        lookup = functools.partial(self._lookups.submit, (token_id,))
        return cache.read_through(_REVOKED_ENTRY + token_id, lookup, self.CACHED_SECONDS)

    async def _revoked(self, asked: list[tuple[str, ...]]) -> list[bool | Exception]:
        ids = [token_id for ids in asked for token_id in ids]
        if self._redis is not None:
            values = await self._redis.mget([self._prefix + t for t in ids])
            found = {token_id for token_id, value in zip(ids, values, strict=True) if value}
        else:
            async with self._reads.connect() as conn:
                rows = await conn.execute(_REVOKED_AMONG, {"token_ids": ids})
                found = {row.jti for row in rows}
        return [any(token_id in found for token_id in ids) for ids in asked]


class Sessions:
    def __init__(self, engine: AsyncEngine, secrets: Secrets, denylist: TokenDenylist) -> None:
        self._engine = engine
        self._secrets = secrets
        self.denylist = denylist

    def _new_refresh(
        self, user_id: str, family_id: str, now: datetime
    ) -> tuple[str, dict[str, object]]:
        plaintext = REFRESH_PREFIX + random.token_urlsafe(32)
        row = {
            "id": new_id(),
            "user_id": user_id,
            "family_id": family_id,
            "token_hash": hash_key(plaintext),
            "created_at": now,
            "expires_at": now + REFRESH_LIFETIME,
        }
        return plaintext, row

    def _tokens(self, user_id: str, family_id: str, refresh: str, now: datetime) -> SessionTokens:
        return SessionTokens(
            user_id=user_id,
            access_token=self._secrets.issue_token(user_id, now, session_id=family_id),
            refresh_token=refresh,
            expires_in=int(JWT_LIFETIME.total_seconds()),
        )

    async def issue(self, user_id: str) -> SessionTokens:
        """A new session: an access token and the first refresh token of a new family."""
        now = datetime.now(UTC)
        family_id = new_id()
        plaintext, row = self._new_refresh(user_id, family_id, now)
        async with self._engine.begin() as conn:
            await conn.execute(refresh_tokens.insert().values(**row))
        return self._tokens(user_id, family_id, plaintext, now)

    async def refresh(self, refresh_token: str) -> SessionTokens:
        """Spend a refresh token for a new pair; a spent one revokes its whole family.

        The spend and the next token of the family are one transaction, taken under
        the user's lock (`lock_user`) like every revocation: a revocation running at
        the same time either comes first (the spend then finds the token revoked) or
        sees the token the spend issued. Without the lock, on PostgreSQL, the
        revocation's UPDATE, its snapshot taken before the spend commits, would miss
        the new token.
        """
        token_hash = hash_key(refresh_token)
        now = datetime.now(UTC)
        revoked_family: str | None = None
        async with self._engine.begin() as conn:
            holder = (
                await conn.execute(
                    sa.select(refresh_tokens.c.user_id).where(
                        refresh_tokens.c.token_hash == token_hash
                    )
                )
            ).scalar()
            if holder is None:
                raise Unauthorized(
                    "invalid, expired or reused refresh token", code="invalid_refresh"
                )
            await lock_user(conn, holder)
            spent = (
                await conn.execute(
                    refresh_tokens.update()
                    .where(
                        refresh_tokens.c.token_hash == token_hash,
                        refresh_tokens.c.used_at.is_(None),
                        refresh_tokens.c.revoked_at.is_(None),
                        refresh_tokens.c.expires_at > now,
                    )
                    .values(used_at=now)
                    .returning(refresh_tokens.c.user_id, refresh_tokens.c.family_id)
                )
            ).first()
            if spent is not None:
                plaintext, row = self._new_refresh(spent.user_id, spent.family_id, now)
                await conn.execute(refresh_tokens.insert().values(**row))
            else:
                known = (
                    await conn.execute(
                        sa.select(refresh_tokens.c.family_id, refresh_tokens.c.used_at).where(
                            refresh_tokens.c.token_hash == token_hash
                        )
                    )
                ).first()
                if known is not None and known.used_at is not None:
                    # Reuse of a spent token: someone else holds the family. End it.
                    await _revoke_family(conn, known.family_id, now)
                    revoked_family = known.family_id
        if revoked_family is not None:
            await self._end_access(revoked_family, now)
        if spent is None:
            raise Unauthorized("invalid, expired or reused refresh token", code="invalid_refresh")
        return self._tokens(spent.user_id, spent.family_id, plaintext, now)

    async def _end_access(self, family_id: str, now: datetime) -> None:
        """Refuse every access token of the family: each carries the family as `sid`,
        and the newest may still have a day to live."""
        await self.denylist.revoke(family_id, now + JWT_LIFETIME)

    async def logout(
        self, user_id: str, token_id: str, expires_at: datetime, session_id: str | None
    ) -> None:
        """End a session: its access tokens at once, and its refresh tokens with it."""
        await self.denylist.revoke(token_id, expires_at)
        if session_id is not None:
            now = datetime.now(UTC)
            async with self._engine.begin() as conn:
                await lock_user(conn, user_id)
                await _revoke_family(conn, session_id, now)
            await self._end_access(session_id, now)


async def revoke_refresh_tokens(conn: AsyncConnection, user_id: str, now: datetime) -> None:
    """Revoke every refresh token of the user, in the caller's transaction; lock the
    user first (see `Sessions.refresh`)."""
    await conn.execute(
        refresh_tokens.update()
        .where(refresh_tokens.c.user_id == user_id, refresh_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )


async def _revoke_family(conn: AsyncConnection, family_id: str, now: datetime) -> None:
    await conn.execute(
        refresh_tokens.update()
        .where(refresh_tokens.c.family_id == family_id, refresh_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
