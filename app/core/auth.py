"""Resolving a credential to a `Principal`: API keys, our JWTs, external issuers' JWTs.

- `sk-lg-...`: an API key, looked up by its SHA-256; live, unexpired, of a live user.
- a JWT with `iss = "livegate"`: ours, HS256 only, refused once its `jti` is revoked.
- a JWT from a configured issuer (Clerk, WorkOS, any OIDC): verified against the
  issuer's JWKS with its asymmetric algorithm allow-list, mapped by `sub` to a user
  created on first sight.
- `x-user-id` (development only): the named user, created on first sight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import jwt
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.auth_cache import NEUTRAL, AuthCache
from app.core.config import Environment, IssuerConfig, Settings
from app.core.db import single_reads
from app.core.errors import Forbidden, Unauthorized
from app.core.keys import KeyUsageRecorder
from app.core.security import (
    JWT_ISSUER,
    InvalidTokenError,
    Secrets,
    TokenClaims,
    hash_key,
    looks_like_api_key,
    new_id,
)
from app.core.sessions import TokenDenylist
from app.core.strict_json import storable
from app.core.tables import api_keys, external_identities, users
from app.core.upstream_transport import send_bounded
from app.core.users import USER_COLUMNS, User, get_user, normalize_email, row_to_user

logger = logging.getLogger("livegate.auth")

T = TypeVar("T")

DEV_PROVIDER = "dev"
MAX_SUBJECT = 255  # external_identities.subject
# Built once: every request with an API key runs it.
_KEY_HOLDER = (
    sa.select(
        api_keys.c.id.label("key_id"),
        api_keys.c.permissions,
        api_keys.c.expires_at.label("key_expires_at"),
        *USER_COLUMNS,
    )
    .join(users, users.c.id == api_keys.c.user_id)
    .where(
        api_keys.c.key_hash == sa.bindparam("key_hash"),
        api_keys.c.revoked_at.is_(None),
        sa.or_(api_keys.c.expires_at.is_(None), api_keys.c.expires_at > sa.bindparam("now")),
        users.c.deleted_at.is_(None),
    )
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, and with what."""

    user: User
    api_key_id: str | None = None
    # None: a user session (our JWT or an external one), which may do anything the
    # user may; a set: an API key limited to these permissions.
    permissions: frozenset[str] | None = None
    # When the API key expires: a key it creates expires no later.
    key_expires_at: datetime | None = None
    token_id: str | None = None
    token_expires_at: datetime | None = None
    session_id: str | None = None

    @property
    def is_session(self) -> bool:
        return self.api_key_id is None

    def require(self, permission: str) -> None:
        if self.permissions is not None and permission not in self.permissions:
            raise Forbidden(
                f"this API key lacks the `{permission}` permission",
                code="missing_permission",
                details={"required": permission},
            )


def _aware(at: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes (stored in UTC).
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


class JwksCache:
    """One issuer's signing keys, fetched on first use and again on an unknown `kid`."""

    REFRESH_EVERY = 3600.0
    MIN_REFETCH = 10.0  # an unknown kid must not make every request hit the issuer

    def __init__(self, http: httpx.AsyncClient, url: str) -> None:
        self._http = http
        self._url = url
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -float("inf")
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        age = time.monotonic() - self._fetched_at
        if (kid not in self._keys or age > self.REFRESH_EVERY) and age > self.MIN_REFETCH:
            await self._refresh()
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        if kid is None or kid not in self._keys:
            raise Unauthorized("token signed with an unknown key", code="invalid_token")
        return self._keys[kid]

    async def _refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._fetched_at <= self.MIN_REFETCH:
                return  # another request refreshed while we waited
            try:
                response, body = await send_bounded(
                    self._http, self._http.build_request("GET", self._url, timeout=10)
                )
                response.raise_for_status()
                keys = jwt.PyJWKSet.from_dict(json.loads(body))
            except (httpx.HTTPError, ValueError, RecursionError, jwt.PyJWTError) as exc:
                logger.warning("fetching JWKS from %s failed: %s", self._url, exc)
                self._fetched_at = time.monotonic()
                return
            self._keys = {k.key_id: k for k in keys.keys if k.key_id}
            if not self._keys and keys.keys:
                self._keys = {"": keys.keys[0]}
            self._fetched_at = time.monotonic()


def _holder(principal: Principal) -> str:
    return principal.user.id


def _user_id(user: User) -> str:
    return user.id


class Authenticator:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        secrets: Secrets,
        denylist: TokenDenylist,
        key_usage: KeyUsageRecorder,
        http: httpx.AsyncClient,
        cache: AuthCache | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._reads = single_reads(engine)
        self._cache = cache
        self._secrets = secrets
        self._denylist = denylist
        self._key_usage = key_usage
        self._issuers = {i.issuer: (i, JwksCache(http, i.jwks_url)) for i in settings.auth.issuers}

    async def authenticate(self, credential: str, *, use: bool = True) -> Principal:
        """The credential's holder, or `Unauthorized`. With `use=False` (a held
        connection checking its credential again), an API key's use is not counted."""
        if looks_like_api_key(credential):
            return await self._api_key(credential, use)
        if (claims := self._secrets.verified(credential)) is not None:
            return await self._own_principal(claims)
        try:
            unverified = jwt.decode(credential, options={"verify_signature": False})
            header = jwt.get_unverified_header(credential)
        except jwt.PyJWTError as exc:
            raise Unauthorized("malformed token", code="invalid_token") from exc
        issuer = unverified.get("iss")
        if issuer == JWT_ISSUER:
            return await self._own_token(credential)
        if isinstance(issuer, str) and issuer in self._issuers:
            config, jwks = self._issuers[issuer]
            return await self._external_token(credential, header, config, jwks)
        raise Unauthorized("token from an unknown issuer", code="invalid_token")

    async def _api_key(self, credential: str, use: bool = True) -> Principal:
        now = datetime.now(UTC)
        key_hash = hash_key(credential)

        async def read() -> Principal | None:
            async with self._reads.connect() as conn:
                row = (await conn.execute(_KEY_HOLDER, {"key_hash": key_hash, "now": now})).first()
            if row is None:
                return None
            return Principal(
                user=row_to_user(row),
                api_key_id=row.key_id,
                permissions=frozenset(row.permissions),
                key_expires_at=_aware(row.key_expires_at),
            )

        principal = await self._read_through(key_hash, read, _holder)
        expires_at = principal.key_expires_at if principal is not None else None
        if principal is None or (expires_at is not None and expires_at <= now):
            raise Unauthorized("invalid, revoked or expired API key", code="invalid_api_key")
        assert principal.api_key_id is not None
        if use:
            self._key_usage.record(principal.api_key_id, now)
        return principal

    async def _own_token(self, credential: str) -> Principal:
        try:
            claims = self._secrets.verify_token(credential)
        except InvalidTokenError as exc:
            raise Unauthorized("invalid or expired token", code="invalid_token") from exc
        return await self._own_principal(claims)

    async def _own_principal(self, claims: TokenClaims) -> Principal:
        """The holder of one of our tokens, verified: unless it was revoked."""
        # The token, or its whole session (logged out, or its refresh token reused).
        session = () if claims.session_id is None else (claims.session_id,)
        if await self._denylist.is_revoked(claims.token_id, *session):
            raise Unauthorized("token has been revoked", code="token_revoked")
        user = await self._user(claims.subject)
        if user.tokens_valid_after is not None and claims.issued_at < user.tokens_valid_after:
            raise Unauthorized("token has been revoked", code="token_revoked")
        return Principal(
            user=user,
            token_id=claims.token_id,
            token_expires_at=claims.expires_at,
            session_id=claims.session_id,
        )

    async def _external_token(
        self, credential: str, header: dict[str, Any], config: IssuerConfig, jwks: JwksCache
    ) -> Principal:
        if header.get("alg") not in config.algorithms:
            raise Unauthorized("token algorithm not allowed", code="invalid_token")
        key = await jwks.key(header.get("kid"))
        try:
            claims = jwt.decode(
                credential,
                key=key.key,
                algorithms=list(config.algorithms),
                issuer=config.issuer,
                audience=config.audience,
                options={
                    "require": ["sub", "exp", "iat", "iss"],
                    "verify_aud": bool(config.audience),
                },
                leeway=5,
            )
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            # TypeError/ValueError: an `alg` that does not fit the key's type.
            raise Unauthorized(f"invalid token: {exc}", code="invalid_token") from exc
        azp = claims.get("azp")
        if config.authorized_parties and azp not in config.authorized_parties:
            raise Unauthorized("token issued for an unauthorized party", code="invalid_token")
        subject = claims["sub"]
        if (
            not isinstance(subject, str)
            or not 0 < len(subject) <= MAX_SUBJECT
            or not storable(subject)
        ):
            raise Unauthorized("token has no usable subject", code="invalid_token")
        user = await self.user_for_identity(
            config.name, subject, email=claims.get("email"), profile=claims
        )
        return Principal(user=user)

    async def _user(self, user_id: str) -> User:
        """A live user by id, from the cache when it holds them."""
        return await self._read_through(
            ("user", user_id), lambda: get_user(self._reads, user_id), _user_id
        )

    def _read_through(
        self, key: Hashable, read: Callable[[], Awaitable[T]], user_of: Callable[[Any], str]
    ) -> Awaitable[T]:
        # Not a coroutine itself: no frame of its own on every request's cache hit.
        return self._cache.read_through(key, read, user_of=user_of) if self._cache else read()

    async def development_user(self, user_id: str) -> Principal:
        """The `x-user-id` header's user; only ever called in development."""
        if self._settings.environment is not Environment.DEVELOPMENT:
            raise Unauthorized("x-user-id authentication is disabled outside development")
        if len(user_id) > MAX_SUBJECT:
            raise Unauthorized(f"x-user-id is longer than {MAX_SUBJECT} characters")
        return Principal(user=await self.user_for_identity(DEV_PROVIDER, user_id))

    async def user_for_identity(
        self,
        provider: str,
        subject: str,
        *,
        email: object = None,
        profile: dict[str, Any] | None = None,
        link_by_email: bool = False,
    ) -> User:
        """The user behind an external identity, created on first sight.

        With `link_by_email` (a source that verified the address, like a signed Clerk
        webhook), an existing account with that email is linked instead of refused.
        """
        lookup = sa.select(external_identities.c.user_id).where(
            external_identities.c.provider == provider, external_identities.c.subject == subject
        )
        async with self._engine.connect() as conn:
            user_id = (await conn.execute(lookup)).scalar()
        if user_id is not None:
            return await get_user(self._engine, user_id)
        profile = profile or {}
        now = datetime.now(UTC)
        created_id = new_id()
        address = normalize_email(email)
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    users.insert().values(
                        id=created_id,
                        # A placeholder on the reserved .invalid domain until one is known.
                        email=address or f"{created_id}@{provider}.invalid".lower(),
                        tier=self._settings.server.default_tier,
                        role="user",
                        first_name=_str(profile.get("given_name") or profile.get("first_name")),
                        last_name=_str(profile.get("family_name") or profile.get("last_name")),
                        image_url=_str(profile.get("picture") or profile.get("image_url")),
                        created_at=now,
                        updated_at=now,
                    ),
                    execution_options={NEUTRAL: True},  # a row added: no entry was read from it
                )
                await conn.execute(
                    external_identities.insert().values(
                        provider=provider, subject=subject, user_id=created_id, created_at=now
                    )
                )
        except IntegrityError:
            # A concurrent first request created it, or the email belongs to a user
            # already.
            async with self._engine.connect() as conn:
                user_id = (await conn.execute(lookup)).scalar()
            if user_id is not None:
                return await get_user(self._engine, user_id)
            if link_by_email and address:
                return await self._link(provider, subject, address)
            raise IdentityConflict(
                "this identity's email belongs to another account", code="identity_conflict"
            ) from None
        return await get_user(self._engine, created_id)

    async def _link(self, provider: str, subject: str, email: str) -> User:
        """Link the identity to the account holding its email, if that is safe.

        Only an account nobody can sign in to otherwise (no password, no other
        identity) is linked: anyone may register an address they do not own, and
        linking to such an account would hand the real owner's identity to them.
        """
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(users.c.id, users.c.password_hash).where(
                        users.c.email == email, users.c.deleted_at.is_(None)
                    )
                )
            ).first()
            others = 0
            if row is not None:
                others = (
                    await conn.execute(
                        sa.select(sa.func.count())
                        .select_from(external_identities)
                        .where(external_identities.c.user_id == row.id)
                    )
                ).scalar_one()
            if row is None or row.password_hash or others:
                raise IdentityConflict(
                    "this identity's email belongs to another account", code="identity_conflict"
                )
            await conn.execute(
                external_identities.insert().values(
                    provider=provider,
                    subject=subject,
                    user_id=row.id,
                    created_at=datetime.now(UTC),
                )
            )
        return await get_user(self._engine, row.id)


class IdentityConflict(Unauthorized):
    """An external identity whose email already belongs to an account it may not join."""


def _str(value: object) -> str | None:
    """A profile field as stored (up to 200 characters); None where there is no text a
    column can hold."""
    return value[:200] if isinstance(value, str) and value and storable(value) else None
