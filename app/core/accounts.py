"""Password accounts: registration, login, profile and password changes, tiers."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.auth_cache import OF_USER
from app.core.errors import BadRequest, Conflict, NotFound, Unauthorized
from app.core.keys import revoke_all_keys
from app.core.live import QuotaPublisher
from app.core.policy import Policy
from app.core.quota import QuotaSnapshot, add_tokens, month_period
from app.core.security import hash_password, verify_password
from app.core.sessions import Sessions, SessionTokens, revoke_refresh_tokens
from app.core.tables import users
from app.core.users import (
    USER_COLUMNS,
    User,
    create_user,
    get_user,
    lock_user,
    normalize_email,
    row_to_user,
)

# `\Z`, not `$`: `$` also matches before a final newline, which would get stored.
_USERNAME = re.compile(r"^[A-Za-z0-9]{3,30}\Z")
# The action limit on wrong passwords (per email and client address).
LOGIN_FAIL = "login_fail"
MAX_PASSWORD = 1024  # argon2 hashes any length; a cap keeps one request from costing much
# A real hash of a password nobody knows (a new one each start), verified when the
# account is unknown or has no password, so that login takes the same time either way.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(32))


@dataclass(frozen=True, slots=True)
class AccountSession:
    user: User
    tokens: SessionTokens


def validate_username(value: object) -> str:
    if not isinstance(value, str) or not _USERNAME.match(value):
        raise BadRequest("username must be 3-30 letters or digits", details={"field": "username"})
    return value


def validate_email(value: object) -> str:
    email = normalize_email(value)
    if email is None:
        raise BadRequest("email must be a valid email address", details={"field": "email"})
    return email


def validate_password(value: object, field: str = "password") -> str:
    if (
        not isinstance(value, str)
        or not 8 <= len(value) <= MAX_PASSWORD
        or not re.search(r"[a-z]", value)
        or not re.search(r"[A-Z]", value)
        or not re.search(r"[0-9]", value)
    ):
        raise BadRequest(
            "password must be at least 8 characters with an uppercase letter, "
            "a lowercase letter and a number",
            details={"field": field},
        )
    return value


async def register(
    engine: AsyncEngine,
    sessions: Sessions,
    *,
    username: str,
    email: str,
    password: str,
    tier: str,
) -> AccountSession:
    user = await create_user(engine, email=email, password=password, tier=tier, username=username)
    return AccountSession(user, await sessions.issue(user.id))


class _PasswordAttempt:
    """One password tried against an account, counted against `login_fail`."""

    __slots__ = ("wrong",)

    def __init__(self) -> None:
        self.wrong = False


@asynccontextmanager
async def _password_attempt(
    policy: Policy, account: str, client_ip: str
) -> AsyncIterator[_PasswordAttempt]:
    """Count one password tried for `account` from `client_ip`; given back on leaving
    unless it was marked wrong.

    Past the `login_fail` limit of wrong passwords for this account from this address,
    even the right one is refused (429) until the window has room again: otherwise
    guessing would go on, and the right guess would still tell itself by its answer.
    Each attempt counts as it begins, so that a burst cannot all begin before any has
    counted; one that is not a wrong password (the right one, or a failure of ours) is
    given back.
    """
    key = f"{account} {client_ip}"
    await policy.limit_action(LOGIN_FAIL, key)
    attempt = _PasswordAttempt()
    try:
        yield attempt
    finally:
        if not attempt.wrong:
            await policy.release_action(LOGIN_FAIL, key)


async def login(
    engine: AsyncEngine,
    sessions: Sessions,
    policy: Policy,
    *,
    email: str,
    password: str,
    client_ip: str,
) -> AccountSession:
    """A new session for the account's password, within the wrong-password limit."""
    email = email.strip().lower()
    async with _password_attempt(policy, email, client_ip) as attempt:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(users.c.password_hash, *USER_COLUMNS).where(
                        users.c.email == email, users.c.deleted_at.is_(None)
                    )
                )
            ).first()
        stored: str | None = row.password_hash if row is not None else None
        # An account without a password (signed up through an identity provider) is
        # never opened by one, whatever it is. Unknown emails count as wrong too:
        # whether one is known must not show in the answers.
        verified = verify_password(stored or _DUMMY_HASH, password[:MAX_PASSWORD])
        attempt.wrong = row is None or not stored or not verified
    if attempt.wrong:
        raise Unauthorized("invalid email or password", code="invalid_credentials")
    user = row_to_user(row)
    return AccountSession(user, await sessions.issue(user.id))


async def update_profile(
    engine: AsyncEngine, user_id: str, *, username: str | None, email: str | None
) -> User:
    values: dict[str, object] = {"updated_at": datetime.now(UTC)}
    if username is not None:
        values["username"] = username
    if email is not None:
        values["email"] = email
    try:
        async with engine.begin() as conn:
            await conn.execute(
                users.update().where(users.c.id == user_id).values(**values),
                execution_options={OF_USER: user_id},
            )
    except IntegrityError as exc:
        raise Conflict("this email or username is taken") from exc
    return await get_user(engine, user_id)


async def change_password(
    engine: AsyncEngine, policy: Policy, user: User, *, old: str, new: str, client_ip: str
) -> None:
    """Replace the password; every session of the user, on every device, ends: their
    refresh tokens are revoked, and access tokens issued before the change refused.

    Wrong current passwords are limited as wrong logins are, for the user from this
    address: a stolen session must not become a way to guess the password without
    limit. Counted by user, not email: the session could change the email at will.
    """
    async with _password_attempt(policy, f"user:{user.id}", client_ip) as attempt:
        async with engine.connect() as conn:
            stored = (
                await conn.execute(sa.select(users.c.password_hash).where(users.c.id == user.id))
            ).scalar()
        attempt.wrong = not stored or not verify_password(stored, old[:MAX_PASSWORD])
    if attempt.wrong:
        raise Unauthorized("current password is incorrect", code="invalid_credentials")
    new_hash = hash_password(new)
    async with engine.begin() as conn:
        # One transaction under the user's lock: a refresh runs wholly before it (its
        # access token predates the change) or after (its refresh token is revoked).
        await lock_user(conn, user.id)
        now = datetime.now(UTC)
        await conn.execute(
            users.update()
            .where(users.c.id == user.id)
            .values(password_hash=new_hash, updated_at=now, tokens_valid_after=now),
            execution_options={OF_USER: user.id},
        )
        await revoke_refresh_tokens(conn, user.id, now)


async def set_tier(
    engine: AsyncEngine, publisher: QuotaPublisher, user_id: str, tier: str, limit: int | None
) -> User:
    """Move a user to `tier` and push the quota it implies to their devices at once."""
    async with engine.begin() as conn:
        snapshot = await move_tier(conn, user_id, tier, limit)
        if snapshot is None:
            raise NotFound("user not found")
    publisher.limit_changed(user_id, snapshot)
    return await get_user(engine, user_id)


async def move_tier(
    conn: AsyncConnection,
    user_id: str,
    tier: str,
    limit: int | None,
    *,
    expected: str | None = None,
) -> QuotaSnapshot | None:
    """Move a live user to `tier` within the caller's transaction (only from `expected`,
    if given); the quota snapshot to push once it commits, None if no user moved.

    The caller pushes the snapshot only after its commit: devices must never hear of a
    tier a rollback took back.
    """
    now = datetime.now(UTC)
    period = month_period(now)
    moving = users.update().where(users.c.id == user_id, users.c.deleted_at.is_(None))
    if expected is not None:
        moving = moving.where(users.c.tier == expected)
    result = await conn.execute(
        moving.values(tier=tier, updated_at=now), execution_options={OF_USER: user_id}
    )
    if result.rowcount == 0:
        return None
    # A zero increment still advances `seq`, so devices accept the new limit.
    used, seq = await add_tokens(conn, user_id, period, 0)
    return QuotaSnapshot(limit, used, period, seq)


async def update_user_admin(
    engine: AsyncEngine,
    publisher: QuotaPublisher,
    user_id: str,
    *,
    tier: str | None,
    role: str | None,
    token_limit: int | None,
) -> User:
    if role is not None:
        async with engine.begin() as conn:
            result = await conn.execute(
                users.update()
                .where(users.c.id == user_id, users.c.deleted_at.is_(None))
                .values(role=role, updated_at=datetime.now(UTC)),
                execution_options={OF_USER: user_id},
            )
        if result.rowcount == 0:
            raise NotFound("user not found")
    if tier is not None:
        return await set_tier(engine, publisher, user_id, tier, token_limit)
    return await get_user(engine, user_id)


async def delete_user(engine: AsyncEngine, user_id: str) -> None:
    """Soft delete: the user and all their keys and sessions stop working at once."""
    async with engine.begin() as conn:
        await lock_user(conn, user_id)
        now = datetime.now(UTC)
        await conn.execute(
            users.update()
            .where(users.c.id == user_id, users.c.deleted_at.is_(None))
            .values(deleted_at=now),
            execution_options={OF_USER: user_id},
        )
        await revoke_refresh_tokens(conn, user_id, now)
    await revoke_all_keys(engine, user_id)
