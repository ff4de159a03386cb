"""Navi's Pro subscription through Stripe: Checkout, the billing portal, Stripe's webhooks.

One row of `subscriptions` per user keeps the Stripe customer, the current subscription,
its status and period end. Stripe's webhooks are the only source of that state; each
event is applied at most once (by its id, in `webhook_events`) and wholly or not at all,
and an event older than the last one applied (`event_at`) never rolls the state back;
nor, in that event's second, does one saying less than it did. An ended subscription
(canceled, incomplete_expired) stays ended. The subscription moves the user between the
default tier and `[stripe] tier`, never away from any other tier (one an administrator
chose), and every move pushes the new quota to the user's devices.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeGuard

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.accounts import move_tier
from app.core.config import ConfigError, Settings, StripeConfig
from app.core.db import dialect_insert
from app.core.errors import ApiError, BadRequest, Conflict, NotFound, UpstreamError
from app.core.live import QuotaPublisher
from app.core.quota import QuotaSnapshot
from app.core.strict_json import parse_json
from app.core.tables import MAX_EVENT_ID, subscriptions, users, webhook_events
from app.core.users import User

logger = logging.getLogger("livegate.billing")
SOURCE = "stripe"

# Statuses that grant the subscription's tier (past_due: Stripe is still retrying the
# payment, so access continues) and those that take it back. Any other status
# (`incomplete`: the first payment is pending) leaves the tier as it is.
GRANTING = frozenset({"active", "trialing", "past_due"})
REVOKING = frozenset({"canceled", "unpaid", "incomplete_expired", "paused"})
# Ends: Stripe never brings such a subscription back (a new checkout makes a new one).
TERMINAL = frozenset({"canceled", "incomplete_expired"})
# How far along its life a subscription is. Stripe stamps events in whole seconds and
# sends them in any order, so within one second a status of an earlier stage is older
# news (`created` saying incomplete, after `updated` said active). The other live
# statuses (active, past_due, unpaid, paused) move back and forth: one stage.
_STAGES = {"incomplete": 0, "trialing": 1}
_LIVE_STAGE = 2
# The statuses the spec names; the others are shown as the nearest of them.
_SHOWN_AS = {
    "active": "active",
    "trialing": "trialing",
    "past_due": "past_due",
    "canceled": "canceled",
    "unpaid": "past_due",
    "incomplete_expired": "canceled",
    "paused": "canceled",
}
STRIPE_TIMEOUT = 30.0  # seconds for one call to Stripe's API
STRIPE_RETRIES = 2  # safe: the library sends an idempotency key with every POST


class BillingError(ApiError):
    """A billing failure. Navi's envelope takes `code` from the status; `reason` says which."""

    def __init__(self, message: str) -> None:
        super().__init__(message, details={"reason": self.code})


class BillingNotConfigured(BillingError):
    status_code = 503
    code = "billing_not_configured"


class AlreadySubscribed(BillingError, Conflict):
    code = "already_subscribed"


class NoBillingAccount(BillingError, NotFound):
    code = "no_billing_account"


class StripeFailed(BillingError, UpstreamError):
    code = "stripe_error"


class InvalidSignature(BillingError, BadRequest):
    code = "invalid_signature"


class InvalidEvent(BillingError, BadRequest):
    code = "invalid_event"


class Outcome(enum.StrEnum):
    PROCESSED = "processed"
    DUPLICATE = "duplicate"  # this event id was processed before: acknowledged, not applied
    # A type we do not act on, or news of a subscription no longer ours or ended.
    IGNORED = "ignored"
    # Older than the last event applied to the user's subscription, or of its second
    # and a step back from what that said.
    STALE = "stale"
    UNKNOWN_CUSTOMER = "unknown_customer"  # no user of ours is this Stripe customer


@dataclass(frozen=True, slots=True)
class SubscriptionView:
    tier: str
    status: str
    period_end: datetime | None


async def subscription_for(engine: AsyncEngine, user: User) -> SubscriptionView:
    """What `GET /api/subscription` shows; a user without a subscription is on `active`."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(subscriptions.c.status, subscriptions.c.period_end).where(
                    subscriptions.c.user_id == user.id
                )
            )
        ).first()
    shown = _SHOWN_AS.get(row.status) if row is not None and row.status else None
    if row is None or shown is None:
        return SubscriptionView(user.tier, "active", None)
    return SubscriptionView(user.tier, shown, row.period_end)


def open_billing(
    settings: Settings, engine: AsyncEngine, publisher: QuotaPublisher
) -> Billing | None:
    """Billing if `[stripe]` and both Stripe secrets are set; otherwise None (routes: 503)."""
    config = settings.stripe
    secret_key = _secret(settings.stripe_secret_key)
    webhook_secret = _secret(settings.stripe_webhook_secret)
    if config is None or secret_key is None or webhook_secret is None:
        missing = [
            name
            for name, value in (
                ("[stripe]", config),
                ("STRIPE_SECRET_KEY", secret_key),
                ("STRIPE_WEBHOOK_SECRET", webhook_secret),
            )
            if value is None
        ]
        if len(missing) < 3:  # some of it is set: say why billing is still off
            logger.warning("Stripe billing is off: %s not set", ", ".join(missing))
        return None
    if config.tier not in settings.tiers:
        raise ConfigError(f"[stripe] tier {config.tier!r} is not a configured tier")
    return Billing(settings, config, engine, publisher, secret_key, webhook_secret)


def require(billing: Billing | None) -> Billing:
    if billing is None:
        raise BillingNotConfigured("subscriptions are not configured on this server")
    return billing


@dataclass(frozen=True, slots=True)
class _Event:
    id: str
    type: str
    created: int
    obj: dict[str, Any]


class _Kind(enum.Enum):
    CHECKOUT = "checkout"
    SUBSCRIPTION = "subscription"
    INVOICE_PAID = "invoice_paid"
    INVOICE_FAILED = "invoice_failed"


@dataclass(frozen=True, slots=True)
class _Change:
    """What one event says about a user's subscription."""

    kind: _Kind
    subscription: str
    customer: str | None
    user_hint: str | None  # our user id, from the metadata we gave Stripe
    status: str | None = None
    period_end: datetime | None = None


# A user and the quota their new tier gives, pushed to their devices once committed.
_Push = tuple[str, QuotaSnapshot]


class Billing:
    def __init__(
        self,
        settings: Settings,
        config: StripeConfig,
        engine: AsyncEngine,
        publisher: QuotaPublisher,
        secret_key: str,
        webhook_secret: str,
    ) -> None:
        self._settings = settings
        self._config = config
        self._engine = engine
        self._publisher = publisher
        self._webhook_secret = webhook_secret
        # Imported here, with Stripe configured: the SDK holds ~6 MiB once loaded.
        import stripe

        self._http = stripe.HTTPXClient(timeout=STRIPE_TIMEOUT)
        self._client = stripe.StripeClient(
            secret_key,
            base_addresses={"api": config.api_base} if config.api_base else None,
            http_client=self._http,
            max_network_retries=STRIPE_RETRIES,
        )

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    # --- checkout and portal ---------------------------------------------------------

    async def checkout(self, user: User) -> str:
        """A Checkout Session's URL that subscribes the user to the configured price."""
        row = await self._row(user.id)
        if row is not None and row.status in GRANTING:
            raise AlreadySubscribed(
                "you already have a subscription; manage it in the billing portal"
            )
        customer = row.stripe_customer_id if row is not None else None
        if customer is None:
            customer = await self._store_customer(user.id, await self._create_customer(user))
        with _stripe_errors("create the checkout session"):
            session = await self._client.v1.checkout.sessions.create_async(
                {
                    "mode": "subscription",
                    "customer": customer,
                    "line_items": [{"price": self._config.price_id, "quantity": 1}],
                    "client_reference_id": user.id,
                    "metadata": {"user_id": user.id},
                    "subscription_data": {"metadata": {"user_id": user.id}},
                    "success_url": self._config.success_url,
                    "cancel_url": self._config.cancel_url,
                }
            )
        if not session.url:
            raise StripeFailed("Stripe returned a checkout session without a URL")
        return session.url

    async def portal(self, user: User) -> str:
        """A billing-portal session's URL for the user's Stripe customer."""
        row = await self._row(user.id)
        if row is None or row.stripe_customer_id is None:
            raise NoBillingAccount("no billing account yet: subscribe first")
        with _stripe_errors("create the billing portal session"):
            session = await self._client.v1.billing_portal.sessions.create_async(
                {"customer": row.stripe_customer_id, "return_url": self._config.portal_return_url}
            )
        return session.url

    async def _row(self, user_id: str) -> Any:
        async with self._engine.connect() as conn:
            return (
                await conn.execute(
                    sa.select(subscriptions).where(subscriptions.c.user_id == user_id)
                )
            ).first()

    async def _create_customer(self, user: User) -> str:
        # The key makes a retry (or a concurrent checkout) within Stripe's 24 hours get
        # the same customer back instead of a second one; the email is in it because
        # Stripe refuses a key reused with other parameters.
        key = hashlib.sha256(f"{user.id}\n{user.email}".encode()).hexdigest()[:32]
        with _stripe_errors("create the customer"):
            customer = await self._client.v1.customers.create_async(
                {"email": user.email, "metadata": {"user_id": user.id}},
                {"idempotency_key": f"livegate-customer-{key}"},
            )
        return customer.id

    async def _store_customer(self, user_id: str, customer: str) -> str:
        """Keep `customer` unless the user has one already; the one kept is returned."""
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            await _ensure_row(conn, user_id, now)
            await conn.execute(
                subscriptions.update()
                .where(
                    subscriptions.c.user_id == user_id,
                    subscriptions.c.stripe_customer_id.is_(None),
                )
                .values(stripe_customer_id=customer, updated_at=now)
            )
            stored: str = (
                await conn.execute(
                    sa.select(subscriptions.c.stripe_customer_id).where(
                        subscriptions.c.user_id == user_id
                    )
                )
            ).scalar_one()
        return stored

    # --- webhooks --------------------------------------------------------------------

    async def handle_webhook(self, body: bytes, signature: str | None) -> Outcome:
        """Apply one of Stripe's events: all of it, or (on any failure) none of it.

        The event's id, the subscription's row and the user's tier are written in one
        transaction, so an error or a cancellation anywhere leaves none of them and
        Stripe's retry is applied in full, never taken for a replay. The user's devices
        hear of a new tier only once it is committed.
        """
        event = self._verify(body, signature)
        change = _change(event)  # a malformed event is refused before it is remembered
        async with self._engine.begin() as conn:
            if not await _remember(conn, event.id):
                return Outcome.DUPLICATE
            outcome, push = await self._apply(conn, event, change)
        if push is not None:
            self._publisher.limit_changed(*push)
        return outcome

    def _verify(self, body: bytes, signature: str | None) -> _Event:
        """The event, if its `Stripe-Signature` (and its 5-minute timestamp) check out."""
        import stripe

        try:
            stripe.WebhookSignature.verify_header(
                body, signature, self._webhook_secret, stripe.Webhook.DEFAULT_TOLERANCE
            )
        except stripe.SignatureVerificationError as exc:
            raise InvalidSignature(f"invalid Stripe signature: {exc.user_message}") from exc
        except (ValueError, TypeError) as exc:
            # ValueError: a body that is not UTF-8; TypeError: a signature that is not
            # ASCII (compare_digest refuses such strings).
            raise InvalidSignature("invalid Stripe signature or body encoding") from exc
        try:
            payload = parse_json(body)
        except BadRequest as exc:
            raise InvalidEvent(f"webhook payload is not JSON: {exc.message}") from exc
        if not isinstance(payload, dict):
            raise InvalidEvent("webhook payload must be an event object")
        event_id, event_type, created = (
            payload.get("id"),
            payload.get("type"),
            payload.get("created"),
        )
        data = payload.get("data")
        obj = data.get("object") if isinstance(data, dict) else None
        if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID:
            raise InvalidEvent("webhook event has no `id`")
        if not isinstance(event_type, str) or not isinstance(obj, dict):
            raise InvalidEvent("webhook event needs a `type` and a `data.object`")
        if not _is_time(created):
            raise InvalidEvent("webhook event needs a `created` time")
        return _Event(event_id, event_type, created, obj)

    async def _apply(
        self, conn: AsyncConnection, event: _Event, change: _Change | None
    ) -> tuple[Outcome, _Push | None]:
        if change is None:
            return Outcome.IGNORED, None
        user_id = await _user_for(conn, change)
        if user_id is None:
            logger.warning(
                "stripe event %s (%s): customer %s is none of our users",
                event.id,
                event.type,
                change.customer,
            )
            return Outcome.UNKNOWN_CUSTOMER, None
        return await self._record(conn, user_id, event.created, change)

    async def _record(
        self, conn: AsyncConnection, user_id: str, created: int, change: _Change
    ) -> tuple[Outcome, _Push | None]:
        """Apply `change` to the user's row and tier; the outcome and the quota to push."""
        now = datetime.now(UTC)
        # Two events for one user never both read the old row: on SQLite the write lock
        # is held since the event id's insert, on PostgreSQL FOR UPDATE takes the row
        # (which the insert before it makes sure exists).
        await _ensure_row(conn, user_id, now)
        row = (
            await conn.execute(
                sa.select(subscriptions).where(subscriptions.c.user_id == user_id).with_for_update()
            )
        ).one()
        if row.event_at is not None and created < row.event_at:
            return Outcome.STALE, None
        values = _transition(row, change)
        if values is None:
            return Outcome.IGNORED, None
        if _steps_back(row, created, change):
            return Outcome.STALE, None
        # A checkout only infers the status; it must not hide the subscription's
        # own events (sent around the same second, in any order) as older news.
        if change.kind is not _Kind.CHECKOUT:
            values["event_at"] = max(created, row.event_at or 0)
        if change.customer is not None and row.stripe_customer_id is None:
            values["stripe_customer_id"] = change.customer
        push = await self._move_tier(conn, row, values.get("status", row.status), values)
        await conn.execute(
            subscriptions.update()
            .where(subscriptions.c.user_id == user_id)
            .values(**values, updated_at=now)
        )
        return Outcome.PROCESSED, push

    async def _move_tier(
        self, conn: AsyncConnection, row: Any, status: str | None, values: dict[str, Any]
    ) -> _Push | None:
        """Move the user's tier as `status` implies; `values` gets the row's new `tier`.

        The row's `tier` is the tier this subscription moved the user to, if it did:
        only that move is ever undone, so a tier an administrator set stays.
        """
        default = self._settings.server.default_tier
        user_tier: str = (
            await conn.execute(sa.select(users.c.tier).where(users.c.id == row.user_id))
        ).scalar_one()
        target: str | None = None
        if status in GRANTING:
            if user_tier == default and self._config.tier != default:
                target = self._config.tier
        elif status in REVOKING:
            if row.tier is not None and user_tier == row.tier and row.tier != default:
                target = default
            values["tier"] = None  # the subscription no longer holds any tier it gave
        if target is None:
            return None
        # Only from the tier read above: an administrator's change since then wins.
        quota = await move_tier(
            conn,
            row.user_id,
            target,
            self._settings.tier(target).monthly_tokens,
            expected=user_tier,
        )
        if quota is None:
            return None
        if status in GRANTING:
            values["tier"] = target
        return row.user_id, quota


def _transition(row: Any, change: _Change) -> dict[str, Any] | None:
    """The columns `change` sets; None if it is about a subscription the user is not on,
    or about one that has ended."""
    current = row.stripe_subscription_id
    if change.subscription == current and row.status in TERMINAL:
        return None
    other = current is not None and change.subscription != current
    if change.kind is _Kind.SUBSCRIPTION:
        # A new subscription that grants replaces the current one; news of any other
        # (an old subscription ending, a second one abandoned) changes nothing.
        if other and change.status not in GRANTING:
            return None
        values: dict[str, Any] = {
            "stripe_subscription_id": change.subscription,
            "status": change.status,
        }
        if change.period_end is not None:
            values["period_end"] = change.period_end
        return values
    if change.kind is _Kind.CHECKOUT:
        if not other and row.status is not None:
            return {}  # the subscription's own events have said more than a checkout can
        if other and row.status in GRANTING:
            logger.warning(
                "user %s completed a checkout while subscribed (%s, then %s)",
                row.user_id,
                current,
                change.subscription,
            )
        return {
            "stripe_subscription_id": change.subscription,
            "status": change.status,
            "period_end": None,
        }
    if other:
        return None
    if change.kind is _Kind.INVOICE_PAID:
        if row.status in (None, "past_due", "unpaid", "incomplete"):
            return {"stripe_subscription_id": change.subscription, "status": "active"}
        return {}
    # An invoice failed: a running subscription is now past due; a first payment
    # failing leaves a subscription that never started `incomplete`.
    if row.status in ("active", "trialing", "past_due"):
        return {"status": "past_due"}
    if row.status is None:
        return {"stripe_subscription_id": change.subscription, "status": "incomplete"}
    return {}


def _steps_back(row: Any, created: int, change: _Change) -> bool:
    """Whether `change`, of the second of the last event applied, would take the user's
    subscription back to an earlier stage of its life (see `_STAGES`)."""
    return (
        change.kind is _Kind.SUBSCRIPTION
        and created == row.event_at
        and change.subscription == row.stripe_subscription_id
        and _stage(change.status) < _stage(row.status)
    )


def _stage(status: str | None) -> int:
    if status is None:
        return -1
    if status in TERMINAL:
        return _LIVE_STAGE + 1
    return _STAGES.get(status, _LIVE_STAGE)


def _change(event: _Event) -> _Change | None:
    """What the event says about a subscription, or None if it is not an event we act on."""
    obj = event.obj
    if event.type == "checkout.session.completed":
        if obj.get("mode") != "subscription":
            return None
        paid = obj.get("payment_status") in ("paid", "no_payment_required")
        return _Change(
            _Kind.CHECKOUT,
            _required_id(obj.get("subscription"), "checkout session's `subscription`"),
            _stripe_id(obj.get("customer")),
            _text(obj.get("client_reference_id")) or _metadata_user(obj.get("metadata")),
            status="active" if paid else "incomplete",
        )
    if event.type in (
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    ):
        status = "canceled" if event.type.endswith(".deleted") else obj.get("status")
        if not isinstance(status, str) or not 0 < len(status) <= 32:
            raise InvalidEvent("subscription event has no `status`")
        return _Change(
            _Kind.SUBSCRIPTION,
            _required_id(obj.get("id"), "subscription's `id`"),
            _stripe_id(obj.get("customer")),
            _metadata_user(obj.get("metadata")),
            status=status,
            period_end=_period_end(obj),
        )
    if event.type in ("invoice.payment_succeeded", "invoice.payment_failed"):
        subscription, hint = _invoice_subscription(obj)
        if subscription is None:
            return None  # a one-off invoice, not a subscription's
        kind = _Kind.INVOICE_PAID if event.type.endswith("succeeded") else _Kind.INVOICE_FAILED
        return _Change(kind, subscription, _stripe_id(obj.get("customer")), hint)
    return None


def _invoice_subscription(invoice: dict[str, Any]) -> tuple[str | None, str | None]:
    """The invoice's subscription and our user id, in older and newer API versions."""
    # Before API version 2025-03-31: `subscription` and `subscription_details` on the
    # invoice; since: under `parent.subscription_details`.
    details = invoice.get("subscription_details")
    subscription = _stripe_id(invoice.get("subscription"))
    parent = invoice.get("parent")
    if subscription is None and isinstance(parent, dict):
        details = parent.get("subscription_details")
        if isinstance(details, dict):
            subscription = _stripe_id(details.get("subscription"))
    hint = _metadata_user(details.get("metadata")) if isinstance(details, dict) else None
    return subscription, hint


def _period_end(subscription: dict[str, Any]) -> datetime | None:
    # Newer API versions keep the period on each subscription item, older ones on
    # the subscription itself.
    value = subscription.get("current_period_end")
    items = subscription.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    if value is None and isinstance(data, list) and data and isinstance(data[0], dict):
        value = data[0].get("current_period_end")
    if _is_time(value) and value > 0:
        return datetime.fromtimestamp(value, UTC)
    return None


def _is_time(value: object) -> TypeGuard[int]:
    """Whether `value` is a Unix time a datetime and a BIGINT column can both hold
    (before the year 6325)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**37


def _stripe_id(value: object) -> str | None:
    """An id, whether Stripe sent it as a string or as the expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and 0 < len(value) <= 255 else None


def _required_id(value: object, what: str) -> str:
    found = _stripe_id(value)
    if found is None:
        raise InvalidEvent(f"webhook event has no {what}")
    return found


def _metadata_user(metadata: object) -> str | None:
    return _text(metadata.get("user_id")) if isinstance(metadata, dict) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


def _secret(value: SecretStr | None) -> str | None:
    secret = value.get_secret_value() if value is not None else ""
    return secret if secret.strip() else None


async def _remember(conn: AsyncConnection, event_id: str) -> bool:
    """Record the event's id in the caller's transaction; False if it was seen before.

    A concurrent copy of the event waits here for the first one's transaction: it is
    a duplicate if that commits, and applied if that rolls back.
    """
    insert = dialect_insert(conn)
    result = await conn.execute(
        insert(webhook_events)
        .values(source=SOURCE, event_id=event_id, received_at=datetime.now(UTC))
        .on_conflict_do_nothing(index_elements=[webhook_events.c.source, webhook_events.c.event_id])
    )
    return result.rowcount == 1


async def _user_for(conn: AsyncConnection, change: _Change) -> str | None:
    """Our user: the one the customer is stored for, else the one Stripe's metadata names."""
    if change.customer is not None:
        owner = (
            await conn.execute(
                sa.select(subscriptions.c.user_id).where(
                    subscriptions.c.stripe_customer_id == change.customer
                )
            )
        ).scalar()
        if owner is not None:
            return await _live_user(conn, owner)
    if change.user_hint is not None:
        return await _live_user(conn, change.user_hint)
    return None


async def _ensure_row(conn: AsyncConnection, user_id: str, now: datetime) -> None:
    insert = dialect_insert(conn)
    await conn.execute(
        insert(subscriptions)
        .values(user_id=user_id, created_at=now, updated_at=now)
        .on_conflict_do_nothing(index_elements=[subscriptions.c.user_id])
    )


async def _live_user(conn: AsyncConnection, user_id: str) -> str | None:
    found: str | None = (
        await conn.execute(
            sa.select(users.c.id).where(users.c.id == user_id, users.c.deleted_at.is_(None))
        )
    ).scalar()
    return found


@contextlib.contextmanager
def _stripe_errors(action: str) -> Iterator[None]:
    """Stripe's failures as a 502; the log names the error, never the request or a key."""
    import stripe

    try:
        yield
    except stripe.StripeError as exc:
        logger.warning(
            "stripe: could not %s: %s (status %s, code %s, request %s)",
            action,
            type(exc).__name__,
            exc.http_status,
            exc.code,
            exc.request_id,
        )
        raise StripeFailed(f"Stripe could not {action}; try again later") from exc
