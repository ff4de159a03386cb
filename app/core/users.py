"""Users, their relay keys, and resolving a bearer credential to a user."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.auth_cache import NEUTRAL
from app.core.db import dialect_insert
from app.core.errors import BadRequest, Conflict, Unauthorized
from app.core.security import Secrets, generate_api_key, hash_password, new_id
from app.core.strict_json import storable
from app.core.tables import KeyKind, api_keys, users, webhooks

ROLES = ("user", "admin", "super_admin")
RELAY_KEY_PERMISSIONS = ["ai:read", "ai:write", "usage:read"]
# `\Z`, not `$`: `$` also matches before a final newline, which would get stored.
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+\Z")
MAX_EMAIL = 320  # users.email


def normalize_email(value: object) -> str | None:
    """`value` as `users.email` holds it (trimmed, lowercased), or None if it is not a
    usable address."""
    # Checked as stored: lowercasing can lengthen a string ("İ" becomes two characters).
    email = value.strip().lower() if isinstance(value, str) else ""
    return email if len(email) <= MAX_EMAIL and _EMAIL.match(email) and storable(email) else None


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    username: str | None
    tier: str
    role: str
    first_name: str | None
    last_name: str | None
    image_url: str | None
    created_at: datetime
    updated_at: datetime
    # Access tokens issued before this (a password change) are refused.
    tokens_valid_after: datetime | None = None
    # Whether any active outbound webhook may want this user's events: read with the
    # user, so requests of the many users without one skip looking for subscribers.
    has_webhooks: bool = False


USER_COLUMNS = (
    users.c.id,
    users.c.email,
    users.c.username,
    users.c.tier,
    users.c.role,
    users.c.first_name,
    users.c.last_name,
    users.c.image_url,
    users.c.created_at,
    users.c.updated_at,
    users.c.tokens_valid_after,
    sa.exists()
    .where(webhooks.c.user_id == users.c.id, webhooks.c.active.is_(True))
    .label("has_webhooks"),
)


def row_to_user(row: Any) -> User:
    m = row._mapping
    return User(**{c.name: m[c.name] for c in USER_COLUMNS})


async def create_user(
    engine: AsyncEngine,
    *,
    email: str,
    password: str | None,
    tier: str,
    role: str = "user",
    username: str | None = None,
    first_name: str | None = None,
    last_name: str | None = None,
) -> User:
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise BadRequest("invalid email address", details={"field": "email"})
    if role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}", details={"field": "role"})
    now = datetime.now(UTC)
    values = {
        "id": new_id(),
        "email": email,
        "username": username,
        "password_hash": hash_password(password) if password else None,
        "tier": tier,
        "role": role,
        "first_name": first_name,
        "last_name": last_name,
        "created_at": now,
        "updated_at": now,
    }
    try:
        async with engine.begin() as conn:
            # A row added: no lookup found it, so nothing kept was read from it.
            await conn.execute(users.insert().values(**values), execution_options={NEUTRAL: True})
    except IntegrityError as exc:
        raise Conflict("a user with this email or username already exists") from exc
    return await get_user(engine, str(values["id"]))


async def lock_user(conn: AsyncConnection, user_id: str) -> None:
    """Hold the user's row until the transaction ends, so transactions that first lock
    one user run one after another: a write takes the row's lock on PostgreSQL and the
    database's write lock on SQLite (where `FOR UPDATE` does nothing). What such a
    transaction reads afterwards stays true until it commits."""
    await conn.execute(
        users.update().where(users.c.id == user_id).values(updated_at=users.c.updated_at),
        execution_options={NEUTRAL: True},  # the row is written as it was
    )


async def get_user(engine: AsyncEngine, user_id: str) -> User:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(*USER_COLUMNS).where(users.c.id == user_id, users.c.deleted_at.is_(None))
            )
        ).first()
    if row is None:
        raise Unauthorized("user not found or deleted")
    return row_to_user(row)


async def get_or_create_relay_key(engine: AsyncEngine, secrets: Secrets, user_id: str) -> str:
    """The user's one relay key; created on first call, the same key on every later one."""
    select_live = sa.select(api_keys.c.key_ciphertext).where(
        api_keys.c.user_id == user_id,
        api_keys.c.kind == KeyKind.RELAY,
        api_keys.c.revoked_at.is_(None),
    )
    async with engine.connect() as conn:
        ciphertext = (await conn.execute(select_live)).scalar()
    if ciphertext is not None:
        return secrets.decrypt(ciphertext)
    issued = generate_api_key()
    try:
        async with engine.begin() as conn:
            await conn.execute(
                api_keys.insert().values(
                    id=new_id(),
                    user_id=user_id,
                    kind=KeyKind.RELAY,
                    name="relay",
                    key_hash=issued.hash,
                    key_mask=issued.mask,
                    key_ciphertext=secrets.encrypt(issued.plaintext),
                    permissions=RELAY_KEY_PERMISSIONS,
                    created_at=datetime.now(UTC),
                ),
                execution_options={NEUTRAL: True},  # a row added: no entry was read from it
            )
    except IntegrityError:
        # A concurrent call created it first (the partial unique index); return that one.
        async with engine.connect() as conn:
            ciphertext = (await conn.execute(select_live)).scalar_one()
        return secrets.decrypt(ciphertext)
    return issued.plaintext


# The account anonymous callers' relayed requests are metered to; it cannot log in.
ANONYMOUS_USER_ID = "anonymous"


async def anonymous_user(engine: AsyncEngine, tier: str) -> User:
    """The anonymous account, created on first use."""
    now = datetime.now(UTC)
    insert = dialect_insert(engine)
    async with engine.begin() as conn:
        await conn.execute(
            insert(users)
            .values(
                id=ANONYMOUS_USER_ID,
                email="anonymous@livegate.invalid",
                tier=tier,
                role="user",
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=[users.c.id])
        )
    return await get_user(engine, ANONYMOUS_USER_ID)
