"""Navi's conversation sync: conversations and their messages, per user."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.db import dialect_insert
from app.core.errors import BadRequest, Conflict, NotFound
from app.core.tables import conversations, messages

MAX_ID = 128
MAX_TITLE = 500
MAX_BATCH = 500
ROLES = ("user", "assistant", "system")


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    title: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    conversation_id: str
    role: str
    content: str
    created_at: datetime


def validate_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID:
        raise BadRequest(f"`{field}` must be a non-empty string of at most {MAX_ID} characters")
    return value


def _conversation(row: Any) -> Conversation:
    return Conversation(row.id, row.title, row.created_at, row.updated_at)


async def list_conversations(
    engine: AsyncEngine, user_id: str, limit: int, offset: int
) -> tuple[list[Conversation], int]:
    owned = conversations.c.user_id == user_id
    async with engine.connect() as conn:
        total = (
            await conn.execute(sa.select(sa.func.count()).select_from(conversations).where(owned))
        ).scalar_one()
        rows = await conn.execute(
            sa.select(conversations)
            .where(owned)
            .order_by(conversations.c.updated_at.desc(), conversations.c.id)
            .limit(limit)
            .offset(offset)
        )
        return [_conversation(r) for r in rows], int(total)


async def create_conversation(
    engine: AsyncEngine, user_id: str, conversation_id: str, title: str
) -> Conversation:
    """Create, or return the existing one: a client retrying a create gets the same."""
    now = datetime.now(UTC)
    insert = dialect_insert(engine)
    async with engine.begin() as conn:
        await conn.execute(
            insert(conversations)
            .values(
                user_id=user_id, id=conversation_id, title=title, created_at=now, updated_at=now
            )
            .on_conflict_do_nothing(index_elements=[conversations.c.user_id, conversations.c.id])
        )
        row = (
            await conn.execute(
                sa.select(conversations).where(
                    conversations.c.user_id == user_id, conversations.c.id == conversation_id
                )
            )
        ).one()
    return _conversation(row)


async def delete_conversation(engine: AsyncEngine, user_id: str, conversation_id: str) -> None:
    """Delete a conversation and all of its messages, in one transaction."""
    async with engine.begin() as conn:
        result = await conn.execute(
            conversations.delete().where(
                conversations.c.user_id == user_id, conversations.c.id == conversation_id
            )
        )
        if result.rowcount == 0:
            raise NotFound("conversation not found")
        await conn.execute(
            messages.delete().where(
                messages.c.user_id == user_id, messages.c.conversation_id == conversation_id
            )
        )


async def _require_conversation(conn: Any, user_id: str, conversation_id: str) -> None:
    found = await conn.execute(
        sa.select(conversations.c.id).where(
            conversations.c.user_id == user_id, conversations.c.id == conversation_id
        )
    )
    if found.first() is None:
        raise NotFound("conversation not found")


async def list_messages(
    engine: AsyncEngine, user_id: str, conversation_id: str, limit: int, offset: int
) -> list[Message]:
    async with engine.connect() as conn:
        await _require_conversation(conn, user_id, conversation_id)
        rows = await conn.execute(
            sa.select(messages)
            .where(messages.c.user_id == user_id, messages.c.conversation_id == conversation_id)
            .order_by(messages.c.created_at, messages.c.id)
            .limit(limit)
            .offset(offset)
        )
        return [Message(r.id, r.conversation_id, r.role, r.content, r.created_at) for r in rows]


def validate_messages(value: object) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value or len(value) > MAX_BATCH:
        raise BadRequest(f"`messages` must be an array of 1-{MAX_BATCH} messages")
    checked = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise BadRequest(f"`messages[{i}]` must be an object")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise BadRequest(f"`messages[{i}].role` must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRequest(f"`messages[{i}].content` must be a string")
        checked.append(
            {
                "id": validate_id(item.get("id"), f"messages[{i}].id"),
                "role": role,
                "content": content,
            }
        )
    return checked


async def save_messages(
    engine: AsyncEngine, user_id: str, conversation_id: str, batch: list[dict[str, str]]
) -> int:
    """Upsert by message id: saving the same messages again changes nothing.

    The conversation's row is written first: it takes the row's lock on PostgreSQL
    (the write lock on SQLite), so saves to one conversation and its deletion run one
    after another. The messages are then written in the order of their ids, so two
    saves sharing ids never wait for each other's rows in opposite orders (a deadlock).
    """
    now = datetime.now(UTC)
    insert = dialect_insert(engine)
    async with engine.begin() as conn:
        touched = await conn.execute(
            conversations.update()
            .where(conversations.c.user_id == user_id, conversations.c.id == conversation_id)
            .values(updated_at=now)
        )
        if touched.rowcount == 0:
            raise NotFound("conversation not found")
        # Distinct instants keep a batch in the order it was sent.
        timed = sorted(
            (message["id"], now + timedelta(microseconds=i), message)
            for i, message in enumerate(batch)
        )
        for message_id, created_at, message in timed:
            stmt = insert(messages).values(
                user_id=user_id,
                id=message_id,
                conversation_id=conversation_id,
                role=message["role"],
                content=message["content"],
                created_at=created_at,
            )
            saved = await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[messages.c.user_id, messages.c.id],
                    set_={"role": stmt.excluded.role, "content": stmt.excluded.content},
                    # A message id already used in another conversation is not moved or
                    # overwritten: the whole batch is refused.
                    where=messages.c.conversation_id == stmt.excluded.conversation_id,
                ).returning(messages.c.id)
            )
            if saved.first() is None:
                raise Conflict(
                    f"message {message_id!r} belongs to another conversation",
                    details={"field": "messages"},
                )
    return len(batch)
