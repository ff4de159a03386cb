"""AnkiLingoFlash: per-user records and the flashcard generation counter."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypedDict

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.auth import Principal
from app.core.db import dialect_insert
from app.core.errors import BadRequest, Forbidden, Unauthorized
from app.core.policy import Policy, QuotaExhausted, WindowUsage
from app.core.security import hash_key
from app.core.tables import (
    MAX_ANKI_USER_EMAIL,
    MAX_ANKI_USER_NAME,
    anki_users,
    external_identities,
)

GENERATIONS = "flashcard_generations"
REGENERATIONS = "flashcard_regenerations"
_USER_ID = re.compile(r"^[A-Za-z0-9_.@:-]{1,255}\Z")  # `$` would pass a final newline


@dataclass(frozen=True, slots=True)
class AnkiUser:
    user_id: str
    user_name: str | None
    user_email: str | None
    flashcard_count: int
    generation_limit: int | None
    regeneration_limit: int | None


def validate_user_id(value: object) -> str:
    if not isinstance(value, str) or not _USER_ID.match(value):
        raise BadRequest("Invalid user ID")
    return value


def validate_user_name(value: object) -> str | None:
    return _profile_text(value, "userName", MAX_ANKI_USER_NAME)


def validate_user_email(value: object) -> str | None:
    """Only its type and length: the extension's copy of the Google profile's address,
    never mailed or signed in with, so it is given back exactly as it was sent."""
    return _profile_text(value, "userEmail", MAX_ANKI_USER_EMAIL)


def _profile_text(value: object, field: str, longest: int) -> str | None:
    # Refused, not shortened: a shortened address or name would be returned as if
    # it had been saved as sent.
    if value is not None and (not isinstance(value, str) or len(value) > longest):
        raise BadRequest(f"{field} must be a string of at most {longest} characters, or null")
    return value


class ProfileChanges(TypedDict, total=False):
    """The profile fields a save sets; a field left out keeps its stored value."""

    user_name: str | None
    user_email: str | None


@dataclass(frozen=True, slots=True)
class AnkiCaller:
    """Whom a request acts for, checked: the Anki user id, its tier, and who is counted.

    Secured, generations are counted for the signed-in person, so one person with a
    Google id and a Livegate id has one allowance, not one per id. In open mode the
    only identity is the claimed id itself.
    """

    user_id: str
    tier: str
    counter_subject: str


class Anki:
    def __init__(
        self, engine: AsyncEngine, policy: Policy, open_mode: bool, identity_providers: list[str]
    ) -> None:
        self._engine = engine
        self._policy = policy
        self.open_mode = open_mode
        self._providers = identity_providers

    async def authorize(
        self, principal: Principal | None, user_id: str, default_tier: str, permission: str
    ) -> AnkiCaller:
        """Unless in open mode, the caller must be `user_id`: as our user, or by an
        external identity (e.g. Google) of theirs with that subject; an API key must
        hold `permission`."""
        if self.open_mode:
            tier = principal.user.tier if principal is not None else default_tier
            # Kept apart from Livegate user ids: anyone may claim any id here.
            return AnkiCaller(user_id, tier, _open_subject(user_id))
        if principal is None:
            raise Unauthorized("sign in to act for this user", code="missing_token")
        principal.require(permission)
        caller = AnkiCaller(user_id, principal.user.tier, principal.user.id)
        if principal.user.id == user_id:
            return caller
        async with self._engine.connect() as conn:
            linked = await conn.execute(
                sa.select(external_identities.c.subject).where(
                    external_identities.c.user_id == principal.user.id,
                    external_identities.c.subject == user_id,
                    external_identities.c.provider.in_(self._providers),
                )
            )
            if linked.first() is None:
                raise Forbidden("this token does not belong to that user ID")
        return caller

    async def limits(self, tier: str) -> tuple[int | None, int | None]:
        config = self._policy.tier(tier).counters
        generations, regenerations = config.get(GENERATIONS), config.get(REGENERATIONS)
        return (
            generations.limit if generations else None,
            regenerations.limit if regenerations else None,
        )

    async def user(self, caller: AnkiCaller) -> AnkiUser:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(sa.select(anki_users).where(anki_users.c.id == caller.user_id))
            ).first()
        usage = await self._policy.counter_usage(caller.counter_subject, caller.tier, GENERATIONS)
        generation_limit, regeneration_limit = await self.limits(caller.tier)
        return AnkiUser(
            user_id=caller.user_id,
            user_name=row.user_name if row else None,
            user_email=row.user_email if row else None,
            flashcard_count=usage.used,
            generation_limit=generation_limit,
            regeneration_limit=regeneration_limit,
        )

    async def save_user(self, caller: AnkiCaller, changes: ProfileChanges) -> AnkiUser:
        now = datetime.now(UTC)
        insert = dialect_insert(self._engine)
        stmt = insert(anki_users).values(
            id=caller.user_id, created_at=now, updated_at=now, **changes
        )
        updates = {column: stmt.excluded[column] for column in changes}
        async with self._engine.begin() as conn:
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[anki_users.c.id], set_={**updates, "updated_at": now}
                )
            )
        return await self.user(caller)

    async def can_generate(self, caller: AnkiCaller, own_credits: bool) -> bool:
        if own_credits:
            return True  # the user pays their provider directly: no free-tier limit
        usage = await self._policy.counter_usage(caller.counter_subject, caller.tier, GENERATIONS)
        return usage.remaining is None or usage.remaining > 0

    async def count_generation(self, caller: AnkiCaller) -> WindowUsage | None:
        """One more generation, atomically; None when the limit is already reached."""
        try:
            return await self._policy.consume_counter(
                caller.counter_subject, caller.tier, GENERATIONS
            )
        except QuotaExhausted:
            return None


def _open_subject(user_id: str) -> str:
    """The counters' subject of an open-mode id: within the column's 64 characters.

    A longer id (ids go up to 255) is hashed; `#` is in no id, so a hashed subject is
    never another id's.
    """
    subject = f"anki:{user_id}"
    return subject if len(subject) <= 64 else f"anki:#{hash_key(user_id)[:58]}"
