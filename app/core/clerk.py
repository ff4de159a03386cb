"""Clerk's user webhooks (Svix-signed): users created, updated and deleted at Clerk."""

from __future__ import annotations

import enum
import logging
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from app.core.accounts import delete_user, set_tier
from app.core.auth import MAX_SUBJECT, IdentityConflict
from app.core.auth_cache import OF_USER
from app.core.errors import ApiError, BadRequest
from app.core.services import Services
from app.core.strict_json import parse_json
from app.core.tables import MAX_EVENT_ID, external_identities, users, webhook_events
from app.core.users import normalize_email

logger = logging.getLogger("livegate.clerk")
SOURCE = "clerk"


class WebhookNotConfigured(ApiError):
    status_code = 503
    code = "webhook_not_configured"


class Outcome(enum.StrEnum):
    PROCESSED = "processed"
    DUPLICATE = "duplicate"  # this svix-id was processed before: acknowledged, not applied
    IGNORED = "ignored"  # an event type we do not act on
    CONFLICT = "conflict"  # the user's email belongs to an account it may not join


def verify(secret: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """The event, if the Svix signature and its timestamp (5 minutes) check out."""
    # Imported on first use: the Svix SDK holds ~9 MiB, and most servers get no Clerk events.
    from svix.webhooks import Webhook, WebhookVerificationError

    try:
        Webhook(secret).verify(body, headers)
    except (WebhookVerificationError, ValueError) as exc:
        # ValueError: a malformed signature header or a body that is not UTF-8.
        raise BadRequest(f"invalid webhook signature: {exc}", code="invalid_signature") from exc
    event = parse_json(body)
    if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
        raise BadRequest("webhook payload must be an object with `data`")
    return event


async def handle_webhook(svc: Services, body: bytes, headers: dict[str, str]) -> Outcome:
    secret = svc.settings.clerk_webhook_signing_secret
    if secret is None:
        raise WebhookNotConfigured("CLERK_WEBHOOK_SIGNING_SECRET is not set")
    event = verify(secret.get_secret_value(), body, headers)
    # svix also accepts the Standard Webhooks names; the replay key must follow it.
    event_id = headers.get("svix-id") or headers.get("webhook-id") or ""
    if len(event_id) > MAX_EVENT_ID:
        raise BadRequest(f"webhook id is longer than {MAX_EVENT_ID} characters")
    try:
        async with svc.engine.begin() as conn:
            await conn.execute(
                webhook_events.insert().values(
                    source=SOURCE, event_id=event_id, received_at=datetime.now(UTC)
                )
            )
    except IntegrityError:
        return Outcome.DUPLICATE
    try:
        return await _apply(svc, str(event.get("type", "")), event["data"])
    except Exception:
        # Forget the delivery so Clerk's retry is processed, not taken for a replay.
        async with svc.engine.begin() as conn:
            await conn.execute(
                webhook_events.delete().where(
                    webhook_events.c.source == SOURCE, webhook_events.c.event_id == event_id
                )
            )
        raise


async def _apply(svc: Services, event_type: str, data: dict[str, Any]) -> Outcome:
    clerk_id = data.get("id")
    if not isinstance(clerk_id, str) or not 0 < len(clerk_id) <= MAX_SUBJECT:
        raise BadRequest("webhook event has no usable user id")
    provider = svc.settings.auth.clerk_provider
    if event_type == "user.deleted":
        user_id = await _linked_user(svc, provider, clerk_id)
        if user_id is not None:
            await delete_user(svc.engine, user_id)
        return Outcome.PROCESSED
    if event_type not in ("user.created", "user.updated"):
        return Outcome.IGNORED
    email = _primary_email(data)
    try:
        user = await svc.authenticator.user_for_identity(
            provider, clerk_id, email=email, profile={}, link_by_email=True
        )
    except IdentityConflict:
        # Acknowledged (Clerk would retry forever) but not applied: an administrator
        # must decide whether this Clerk user owns the existing account.
        logger.warning("clerk user %s: email belongs to an existing account; not linked", clerk_id)
        return Outcome.CONFLICT
    values: dict[str, object] = {
        "first_name": _text(data.get("first_name")),
        "last_name": _text(data.get("last_name")),
        "image_url": _text(data.get("image_url"), 2000),
        "updated_at": datetime.now(UTC),
    }
    if email:
        values["email"] = email
    updating = users.update().where(users.c.id == user.id)
    try:
        async with svc.engine.begin() as conn:
            await conn.execute(updating.values(**values), execution_options={OF_USER: user.id})
    except IntegrityError:
        values.pop("email")  # the address belongs to another account: keep ours
        async with svc.engine.begin() as conn:
            await conn.execute(updating.values(**values), execution_options={OF_USER: user.id})
    tier = _tier(data)
    if tier is not None and tier in svc.settings.tiers and tier != user.tier:
        await set_tier(
            svc.engine, svc.publisher, user.id, tier, svc.settings.tier(tier).monthly_tokens
        )
    return Outcome.PROCESSED


async def _linked_user(svc: Services, provider: str, subject: str) -> str | None:
    async with svc.engine.connect() as conn:
        return (
            await conn.execute(
                sa.select(external_identities.c.user_id).where(
                    external_identities.c.provider == provider,
                    external_identities.c.subject == subject,
                )
            )
        ).scalar()


def _primary_email(data: dict[str, Any]) -> str | None:
    """The primary address (else the first), as stored; None if it is not usable."""
    listed = data.get("email_addresses")
    addresses = [a for a in listed if isinstance(a, dict)] if isinstance(listed, list) else []
    primary = data.get("primary_email_address_id")
    chosen = next((a for a in addresses if a.get("id") == primary), None) or next(
        iter(addresses), None
    )
    return normalize_email(chosen.get("email_address")) if chosen else None


def _tier(data: dict[str, Any]) -> str | None:
    # Where Clerk apps usually keep the plan: public metadata `tier` or `subscription`.
    metadata = data.get("public_metadata")
    if not isinstance(metadata, dict):
        return None
    tier = metadata.get("tier") or metadata.get("subscription")
    return tier if isinstance(tier, str) else None


def _text(value: object, limit: int = 200) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None
