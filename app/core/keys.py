"""API keys: creation (shown once), listing masked, updates, revocation, usage tracking."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.auth_cache import NEUTRAL, OF_USER
from app.core.errors import BadRequest, NotFound
from app.core.pagination import Page
from app.core.security import generate_api_key, new_id
from app.core.tables import KeyKind, api_keys

logger = logging.getLogger("livegate.keys")

PERMISSIONS = frozenset(
    {
        "ai:read",
        "ai:write",
        "usage:read",
        "webhooks:read",
        "webhooks:write",
        "keys:read",
        "keys:write",
    }
)
DEFAULT_PERMISSIONS = ("ai:read", "ai:write", "usage:read")
DEFAULT_EXPIRY_DAYS = 90
MAX_EXPIRY_DAYS = 3650


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str | None
    mask: str
    permissions: list[str]
    created_at: datetime
    updated_at: datetime | None
    expires_at: datetime | None
    last_used_at: datetime | None
    usage_count: int


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    plaintext: str  # returned once, never stored


def _key(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        mask=row.key_mask,
        permissions=list(row.permissions),
        created_at=row.created_at,
        updated_at=row.updated_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        usage_count=int(row.usage_count),
    )


def validate_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise BadRequest(
            "`name` must be a non-empty string of at most 200 characters", details={"field": "name"}
        )
    return value.strip()


def validate_permissions(value: object) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise BadRequest(
            "`permissions` must be a non-empty array of strings", details={"field": "permissions"}
        )
    unknown = sorted(set(value) - PERMISSIONS)
    if unknown:
        raise BadRequest(
            f"unknown permissions: {', '.join(unknown)}",
            details={"field": "permissions", "allowed": sorted(PERMISSIONS)},
        )
    return sorted(set(value))


def validate_expiry_days(value: object) -> int:
    if value is None:
        return DEFAULT_EXPIRY_DAYS
    if type(value) is not int or not 1 <= value <= MAX_EXPIRY_DAYS:
        raise BadRequest(
            f"`expires_in` must be a whole number of days from 1 to {MAX_EXPIRY_DAYS}",
            details={"field": "expires_in"},
        )
    return value


_OWNED_LIVE = (api_keys.c.kind == KeyKind.USER, api_keys.c.revoked_at.is_(None))


async def create_key(
    engine: AsyncEngine,
    user_id: str,
    name: str,
    permissions: list[str],
    expires_in_days: int,
    not_after: datetime | None = None,
) -> CreatedKey:
    """A new key; with `not_after` (the expiry of the key creating it), expiring no
    later than that."""
    issued = generate_api_key()
    now = datetime.now(UTC)
    expires_at = now + timedelta(days=expires_in_days)
    if not_after is not None:
        expires_at = min(expires_at, not_after)
    key_id = f"key_{new_id()}"
    async with engine.begin() as conn:
        await conn.execute(
            api_keys.insert().values(
                id=key_id,
                user_id=user_id,
                kind=KeyKind.USER,
                name=name,
                key_hash=issued.hash,
                key_mask=issued.mask,
                permissions=permissions,
                created_at=now,
                expires_at=expires_at,
            ),
            execution_options={NEUTRAL: True},  # a row added: no entry was read from it
        )
    return CreatedKey(key=await get_key(engine, user_id, key_id), plaintext=issued.plaintext)


async def list_keys(
    engine: AsyncEngine, user_id: str, page: Page | None = None
) -> tuple[list[ApiKey], int]:
    """The user's live keys, newest first unless `page` says otherwise; and their count."""
    owned = (api_keys.c.user_id == user_id, *_OWNED_LIVE)
    order = (
        api_keys.c.created_at.asc()
        if page and not page.descending
        else api_keys.c.created_at.desc()
    )
    query = sa.select(api_keys).where(*owned).order_by(order, api_keys.c.id)
    if page is not None:
        query = query.limit(page.size).offset(page.offset)
    async with engine.connect() as conn:
        rows = [_key(r) for r in await conn.execute(query)]
        total = (
            await conn.execute(sa.select(sa.func.count()).select_from(api_keys).where(*owned))
        ).scalar_one()
    return rows, int(total)


async def get_key(engine: AsyncEngine, user_id: str, key_id: str) -> ApiKey:
    """The caller's own live key; another user's key is indistinguishable from none."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(api_keys).where(
                    api_keys.c.id == key_id, api_keys.c.user_id == user_id, *_OWNED_LIVE
                )
            )
        ).first()
    if row is None:
        raise NotFound("API key not found")
    return _key(row)


async def update_key(
    engine: AsyncEngine,
    user_id: str,
    key_id: str,
    *,
    name: str | None,
    permissions: list[str] | None,
) -> ApiKey:
    values: dict[str, object] = {"updated_at": datetime.now(UTC)}
    if name is not None:
        values["name"] = name
    if permissions is not None:
        values["permissions"] = permissions
    async with engine.begin() as conn:
        result = await conn.execute(
            api_keys.update()
            .where(api_keys.c.id == key_id, api_keys.c.user_id == user_id, *_OWNED_LIVE)
            .values(**values),
            execution_options={OF_USER: user_id},
        )
    if result.rowcount == 0:
        raise NotFound("API key not found")
    return await get_key(engine, user_id, key_id)


async def revoke_key(engine: AsyncEngine, user_id: str, key_id: str) -> None:
    """Soft delete: refused from the next request on, kept for the audit trail."""
    async with engine.begin() as conn:
        result = await conn.execute(
            api_keys.update()
            .where(api_keys.c.id == key_id, api_keys.c.user_id == user_id, *_OWNED_LIVE)
            .values(revoked_at=datetime.now(UTC)),
            execution_options={OF_USER: user_id},
        )
    if result.rowcount == 0:
        raise NotFound("API key not found")


async def revoke_all_keys(engine: AsyncEngine, user_id: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            api_keys.update()
            .where(api_keys.c.user_id == user_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC)),
            execution_options={OF_USER: user_id},
        )


class KeyUsageRecorder:
    """Counts key uses in memory and writes them in batches.

    A request must not wait on a write just to bump `usage_count`; the batch is
    written every `interval` seconds and at shutdown, as increments, so instances
    sharing the database add up.
    """

    def __init__(self, engine: AsyncEngine, interval: float = 2.0) -> None:
        self._engine = engine
        self._interval = interval
        self._pending: dict[str, tuple[int, datetime]] = {}
        self._task: asyncio.Task[None] | None = None

    def record(self, key_id: str, at: datetime) -> None:
        count, _ = self._pending.get(key_id, (0, at))
        self._pending[key_id] = (count + 1, at)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="key-usage-flush")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:
                logger.exception("writing API key usage failed")

    async def flush(self) -> None:
        batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            # Usage statistics: nothing a cached principal holds changes.
            async with self._engine.begin() as conn:
                conn = await conn.execution_options(**{NEUTRAL: True})
                for key_id, (count, last_used) in batch.items():
                    await conn.execute(
                        api_keys.update()
                        .where(api_keys.c.id == key_id)
                        .values(
                            usage_count=api_keys.c.usage_count + count,
                            last_used_at=sa.func.coalesce(
                                sa.case(
                                    (api_keys.c.last_used_at > last_used, api_keys.c.last_used_at),
                                    else_=last_used,
                                ),
                                last_used,
                            ),
                        )
                    )
        except BaseException:
            # Kept for the next try; also when cancelled (a shutdown: `close` flushes
            # again), else the counts would be lost.
            for key_id, (count, last_used) in batch.items():
                pending, _ = self._pending.get(key_id, (0, last_used))
                self._pending[key_id] = (pending + count, last_used)
            raise
