"""Navi's Stripe subscription: `/api/subscription`, checkout, portal and Stripe's webhook.

Livegate talks to a fake Stripe API on loopback (tests/fake_stripe.py) through the real
`stripe` library; webhook payloads are signed here the way Stripe signs them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from app.core.billing import open_billing
from app.core.config import ConfigError, StripeConfig
from app.core.tables import subscriptions, users, webhook_events
from app.core.users import create_user
from tests.api.test_clerk_webhook import quota_socket, recv_json
from tests.conftest import Account, Livegate, StartLivegate
from tests.fake_stripe import FakeStripe, start_fake_stripe

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

SECRET_KEY = "sk_test_livegate_" + "k" * 24
WEBHOOK_SECRET = "whsec_livegate_stripe_test_secret"
PRICE = "price_navi_pro_monthly"
WEBHOOK = "/api/subscription/webhook"
WAIT = 10  # seconds: the bound on every wait
PRO_TOKENS, FREE_TOKENS = 20_000_000, 1_000_000


# --- helpers ---------------------------------------------------------------------


@pytest.fixture
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    fake, server = await start_fake_stripe(SECRET_KEY)
    try:
        yield fake
    finally:
        await server.stop()


def stripe_config(api_base: str) -> StripeConfig:
    return StripeConfig(
        price_id=PRICE,
        success_url="navi://subscription/success",
        cancel_url="navi://subscription/cancel",
        portal_return_url="navi://settings",
        api_base=api_base,
    )


@pytest.fixture
async def livegate(start_livegate: StartLivegate, fake_stripe: FakeStripe) -> Livegate:
    return await start_livegate(
        stripe=stripe_config(fake_stripe.api_base),
        stripe_secret_key=SECRET_KEY,
        stripe_webhook_secret=WEBHOOK_SECRET,
    )


def sign(payload: str | bytes, *, secret: str = WEBHOOK_SECRET, at: int | None = None) -> str:
    """A `Stripe-Signature` header: HMAC-SHA256 of "<t>.<payload>" under the secret."""
    timestamp = int(time.time()) if at is None else at
    body = payload if isinstance(payload, bytes) else payload.encode()
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def event(
    event_type: str,
    obj: dict[str, Any],
    *,
    created: int | None = None,
    event_id: str | None = None,
) -> str:
    return json.dumps(
        {
            "id": event_id or f"evt_{uuid.uuid4().hex[:24]}",
            "object": "event",
            "api_version": "2026-10-28.endive",
            "created": int(time.time()) if created is None else created,
            "type": event_type,
            "livemode": False,
            "pending_webhooks": 1,
            "data": {"object": obj},
        }
    )


def subscription_obj(
    sub_id: str,
    customer: str,
    status: str = "active",
    *,
    period_end: int | None = None,
    legacy: bool = False,
    user_id: str | None = None,
) -> dict[str, Any]:
    """A subscription as Stripe sends it; `legacy`: the period on the subscription itself."""
    obj: dict[str, Any] = {
        "id": sub_id,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "cancel_at_period_end": False,
        "metadata": {"user_id": user_id} if user_id else {},
        "items": {
            "object": "list",
            "data": [{"id": "si_1", "object": "subscription_item", "price": {"id": PRICE}}],
        },
    }
    if period_end is not None:
        if legacy:
            obj["current_period_end"] = period_end
        else:
            obj["items"]["data"][0]["current_period_end"] = period_end
    return obj


def checkout_obj(
    user_id: str | None,
    customer: str,
    sub_id: str,
    *,
    payment_status: str = "paid",
    mode: str = "subscription",
) -> dict[str, Any]:
    return {
        "id": f"cs_test_{uuid.uuid4().hex}",
        "object": "checkout.session",
        "mode": mode,
        "status": "complete",
        "payment_status": payment_status,
        "customer": customer,
        "subscription": sub_id,
        "client_reference_id": user_id,
        "metadata": {"user_id": user_id} if user_id else {},
    }


def invoice_obj(customer: str, sub_id: str, *, legacy: bool = False) -> dict[str, Any]:
    """An invoice of `sub_id`: before API 2025-03-31 `subscription`, since `parent`."""
    obj: dict[str, Any] = {
        "id": f"in_{uuid.uuid4().hex[:24]}",
        "object": "invoice",
        "customer": customer,
        "billing_reason": "subscription_cycle",
    }
    if legacy:
        obj["subscription"] = sub_id
    else:
        obj["parent"] = {
            "type": "subscription_details",
            "subscription_details": {"subscription": sub_id, "metadata": {}},
        }
    return obj


async def post_webhook(
    livegate: Livegate, body: str | bytes, headers: dict[str, Any] | None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        return await http.post(
            WEBHOOK,
            content=body.encode() if isinstance(body, str) else body,
            headers={"content-type": "application/json", **(headers or {})},
        )


async def deliver(livegate: Livegate, body: str, **signing: Any) -> httpx.Response:
    return await post_webhook(livegate, body, {"stripe-signature": sign(body, **signing)})


def assert_outcome(response: httpx.Response, outcome: str) -> None:
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True, "received": True, "outcome": outcome}


def assert_navi_error(
    response: httpx.Response, status: int, code: str, reason: str | None = None
) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if reason is not None:
        assert body["error"]["reason"] == reason


async def call(
    livegate: Livegate, method: str, path: str, token: str | None, **headers: str
) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        return await http.request(method, path, headers=headers)


async def get_subscription(livegate: Livegate, account: Account) -> dict[str, Any]:
    response = await call(livegate, "GET", "/api/subscription", account.token)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"success", "subscription"} and body["success"] is True
    assert set(body["subscription"]) == {"tier", "status", "periodEnd"}
    return body["subscription"]  # type: ignore[no-any-return]


async def checkout(livegate: Livegate, account: Account) -> httpx.Response:
    return await call(livegate, "POST", "/api/subscription/checkout", account.token)


async def stored(livegate: Livegate, user_id: str) -> Any:
    async with livegate.services.engine.connect() as conn:
        return (
            await conn.execute(sa.select(subscriptions).where(subscriptions.c.user_id == user_id))
        ).first()


async def tier_of(livegate: Livegate, user_id: str) -> str:
    async with livegate.services.engine.connect() as conn:
        tier: str = (
            await conn.execute(sa.select(users.c.tier).where(users.c.id == user_id))
        ).scalar_one()
    return tier


async def remembered(livegate: Livegate, event_id: str) -> bool:
    async with livegate.services.engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(webhook_events).where(
                    webhook_events.c.source == "stripe", webhook_events.c.event_id == event_id
                )
            )
        ).first()
    return row is not None


def new_sub_id() -> str:
    return f"sub_{uuid.uuid4().hex[:24]}"


async def subscribe(
    livegate: Livegate, account: Account, created: int | None = None
) -> tuple[str, str]:
    """Checkout through the API, then Stripe's `checkout.session.completed`."""
    response = await checkout(livegate, account)
    assert response.status_code == 200, response.text
    customer = (await stored(livegate, account.user.id)).stripe_customer_id
    sub_id = new_sub_id()
    body = event(
        "checkout.session.completed",
        checkout_obj(account.user.id, customer, sub_id),
        created=created,
    )
    assert_outcome(await deliver(livegate, body), "processed")
    return customer, sub_id


def iso(at: int) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@asynccontextmanager
async def refused_tier_changes(livegate: Livegate, user_id: str) -> AsyncIterator[None]:
    """A real failure inside the database: a trigger refuses any change of this user's tier."""
    assert user_id.replace("-", "").isalnum()  # inlined below: DDL takes no parameters
    name = f"refuse_tier_{uuid.uuid4().hex[:12]}"
    if livegate.services.engine.dialect.name == "sqlite":
        create = [
            f"CREATE TRIGGER {name} BEFORE UPDATE OF tier ON users WHEN OLD.id = '{user_id}' "
            "BEGIN SELECT RAISE(ABORT, 'tier changes are refused'); END"
        ]
        drop = [f"DROP TRIGGER {name}"]
    else:
        create = [
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'tier changes are refused'; END $$",
            f"CREATE TRIGGER {name} BEFORE UPDATE OF tier ON users FOR EACH ROW "
            f"WHEN (OLD.id = '{user_id}') EXECUTE FUNCTION {name}()",
        ]
        drop = [f"DROP TRIGGER {name} ON users", f"DROP FUNCTION {name}()"]
    async with livegate.services.engine.begin() as conn:
        for statement in create:
            await conn.execute(sa.text(statement))
    try:
        yield
    finally:
        async with livegate.services.engine.begin() as conn:
            for statement in drop:
                await conn.execute(sa.text(statement))


async def wait_for_lock_wait(livegate: Livegate, statement: str, task: asyncio.Task[Any]) -> None:
    """Until a PostgreSQL session waits on a lock in a statement starting `statement`."""
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE :statement"
    )
    async with asyncio.timeout(WAIT):
        while True:
            async with livegate.services.engine.connect() as conn:
                waiting = (await conn.execute(query, {"statement": f"{statement}%"})).scalar_one()
            if waiting:
                return
            assert not task.done(), "the delivery ended without waiting on the lock"
            await asyncio.sleep(0.02)


# --- GET /api/subscription, authentication, configuration -----------------------


async def test_without_a_subscription_the_users_tier_is_active(livegate: Livegate):
    free = await livegate.account(tier="free")
    response = await call(livegate, "GET", "/api/subscription", free.token)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "success": True,
        "subscription": {"tier": "free", "status": "active", "periodEnd": None},
    }
    enterprise = await livegate.account(tier="enterprise")
    assert await get_subscription(livegate, enterprise) == {
        "tier": "enterprise",
        "status": "active",
        "periodEnd": None,
    }


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/subscription"),
        ("POST", "/api/subscription/checkout"),
        ("POST", "/api/subscription/portal"),
    ],
)
async def test_the_user_routes_need_a_bearer_token(
    livegate: Livegate, fake_stripe: FakeStripe, method: str, path: str
):
    for token in (None, "not-a-valid-token"):
        assert_navi_error(await call(livegate, method, path, token), 401, "UNAUTHORIZED")
    assert fake_stripe.calls == []


@pytest.mark.parametrize("path", ["/api/subscription/checkout", "/api/subscription/portal"])
async def test_billing_pages_need_a_user_session_not_an_api_key(
    livegate: Livegate, fake_stripe: FakeStripe, path: str
):
    account = await livegate.account()
    response = await call(livegate, "POST", path, None, **{"X-API-Key": account.api_key})
    assert_navi_error(response, 401, "UNAUTHORIZED")
    assert fake_stripe.calls == []
    # An API key may still read the subscription.
    response = await call(
        livegate, "GET", "/api/subscription", None, **{"X-API-Key": account.api_key}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "config",
    ["nothing", "section-only", "keys-only", "no-webhook-secret", "no-secret-key"],
)
async def test_without_stripe_configured_billing_is_503(
    start_livegate: StartLivegate, fake_stripe: FakeStripe, config: str
):
    section = stripe_config(fake_stripe.api_base)
    overrides: dict[str, Any] = {
        "nothing": {},
        "section-only": {"stripe": section},
        "keys-only": {"stripe_secret_key": SECRET_KEY, "stripe_webhook_secret": WEBHOOK_SECRET},
        "no-webhook-secret": {"stripe": section, "stripe_secret_key": SECRET_KEY},
        "no-secret-key": {"stripe": section, "stripe_webhook_secret": WEBHOOK_SECRET},
    }[config]
    livegate = await start_livegate(**overrides)
    account = await livegate.account()
    for path in ("/api/subscription/checkout", "/api/subscription/portal"):
        response = await call(livegate, "POST", path, account.token)
        assert_navi_error(response, 503, "SERVICE_UNAVAILABLE", "billing_not_configured")
    body = event("customer.subscription.updated", subscription_obj(new_sub_id(), "cus_x"))
    assert_navi_error(
        await deliver(livegate, body), 503, "SERVICE_UNAVAILABLE", "billing_not_configured"
    )
    assert fake_stripe.calls == []
    # Reading the subscription needs no Stripe: everyone is on their tier.
    assert await get_subscription(livegate, account) == {
        "tier": "free",
        "status": "active",
        "periodEnd": None,
    }


# --- checkout and portal ---------------------------------------------------------


async def test_checkout_creates_the_customer_once_then_reuses_it(
    livegate: Livegate, fake_stripe: FakeStripe
):
    account = await livegate.account()
    first = await checkout(livegate, account)
    assert first.status_code == 200, first.text
    assert set(first.json()) == {"success", "url"} and first.json()["success"] is True
    assert first.json()["url"].startswith("https://checkout.stripe.test/c/pay/cs_test_")

    [created] = fake_stripe.calls_to("/v1/customers")
    assert created.form == {"email": account.user.email, "metadata[user_id]": account.user.id}
    assert created.headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert created.headers.get("idempotency-key")
    row = await stored(livegate, account.user.id)
    assert row.stripe_customer_id.startswith("cus_")
    assert row.status is None  # nothing is granted before Stripe says the checkout is done

    [session] = fake_stripe.calls_to("/v1/checkout/sessions")
    assert session.form == {
        "mode": "subscription",
        "customer": row.stripe_customer_id,
        "line_items[0][price]": PRICE,
        "line_items[0][quantity]": "1",
        "client_reference_id": account.user.id,
        "metadata[user_id]": account.user.id,
        "subscription_data[metadata][user_id]": account.user.id,
        "success_url": "navi://subscription/success",
        "cancel_url": "navi://subscription/cancel",
    }

    second = await checkout(livegate, account)
    assert second.status_code == 200, second.text
    assert second.json()["url"] != first.json()["url"]
    assert len(fake_stripe.calls_to("/v1/customers")) == 1
    sessions = fake_stripe.calls_to("/v1/checkout/sessions")
    assert [s.form["customer"] for s in sessions] == [row.stripe_customer_id] * 2
    assert (await tier_of(livegate, account.user.id)) == "free"


async def test_concurrent_checkouts_keep_one_customer(livegate: Livegate, fake_stripe: FakeStripe):
    account = await livegate.account()
    responses = await asyncio.gather(*(checkout(livegate, account) for _ in range(4)))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    row = await stored(livegate, account.user.id)
    customers = {s.form["customer"] for s in fake_stripe.calls_to("/v1/checkout/sessions")}
    assert customers == {row.stripe_customer_id}
    # Every request to create one carried the same key, so Stripe made one customer.
    keys = {c.headers.get("idempotency-key") for c in fake_stripe.calls_to("/v1/customers")}
    assert len(keys) == 1 and None not in keys, keys
    assert [c["id"] for c in fake_stripe.made_of("customer")] == [row.stripe_customer_id]


@pytest.mark.parametrize("status", ["active", "trialing", "past_due"])
async def test_checkout_is_refused_while_subscribed(
    livegate: Livegate, fake_stripe: FakeStripe, status: str
):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    updated = event("customer.subscription.updated", subscription_obj(sub_id, customer, status))
    assert_outcome(await deliver(livegate, updated), "processed")
    sessions = len(fake_stripe.calls_to("/v1/checkout/sessions"))
    response = await checkout(livegate, account)
    assert_navi_error(response, 409, "CONFLICT", "already_subscribed")
    assert len(fake_stripe.calls_to("/v1/checkout/sessions")) == sessions


async def test_after_cancellation_checkout_is_open_again_with_the_same_customer(
    livegate: Livegate, fake_stripe: FakeStripe
):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    deleted = event("customer.subscription.deleted", subscription_obj(sub_id, customer, "canceled"))
    assert_outcome(await deliver(livegate, deleted), "processed")
    response = await checkout(livegate, account)
    assert response.status_code == 200, response.text
    assert len(fake_stripe.calls_to("/v1/customers")) == 1
    assert fake_stripe.calls_to("/v1/checkout/sessions")[-1].form["customer"] == customer


async def test_portal_without_a_customer_is_404(livegate: Livegate, fake_stripe: FakeStripe):
    account = await livegate.account()
    response = await call(livegate, "POST", "/api/subscription/portal", account.token)
    assert_navi_error(response, 404, "NOT_FOUND", "no_billing_account")
    assert fake_stripe.calls == []


async def test_portal_opens_for_the_stored_customer(livegate: Livegate, fake_stripe: FakeStripe):
    account = await livegate.account()
    assert (await checkout(livegate, account)).status_code == 200
    customer = (await stored(livegate, account.user.id)).stripe_customer_id
    response = await call(livegate, "POST", "/api/subscription/portal", account.token)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"success", "url"} and response.json()["success"] is True
    assert response.json()["url"].startswith("https://billing.stripe.test/p/session/")
    [portal] = fake_stripe.calls_to("/v1/billing_portal/sessions")
    assert portal.form == {"customer": customer, "return_url": "navi://settings"}
    assert portal.headers["authorization"] == f"Bearer {SECRET_KEY}"


@pytest.mark.parametrize("status", [400, 401, 500])
async def test_stripe_failures_are_502_and_never_show_the_key(
    livegate: Livegate, fake_stripe: FakeStripe, caplog: pytest.LogCaptureFixture, status: int
):
    caplog.set_level(logging.DEBUG)
    account = await livegate.account()
    assert (await checkout(livegate, account)).status_code == 200  # a stored customer
    fresh = await livegate.account()
    fake_stripe.status = status
    for who, path in [
        (account, "/api/subscription/checkout"),  # the session fails
        (fresh, "/api/subscription/checkout"),  # the customer fails
        (account, "/api/subscription/portal"),
    ]:
        response = await call(livegate, "POST", path, who.token)
        assert_navi_error(response, 502, "UPSTREAM_ERROR", "stripe_error")
        assert SECRET_KEY not in response.text
    assert (await stored(livegate, fresh.user.id)) is None
    assert "stripe" in caplog.text.lower()
    assert SECRET_KEY not in caplog.text and SECRET_KEY[-8:] not in caplog.text


async def test_unreachable_stripe_is_502(start_livegate: StartLivegate):
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        livegate = await start_livegate(
            stripe=stripe_config(f"http://127.0.0.1:{closed.getsockname()[1]}"),
            stripe_secret_key=SECRET_KEY,
            stripe_webhook_secret=WEBHOOK_SECRET,
        )
        account = await livegate.account()
        response = await checkout(livegate, account)
    assert_navi_error(response, 502, "UPSTREAM_ERROR", "stripe_error")
    assert SECRET_KEY not in response.text


async def test_a_stripe_tier_that_is_not_configured_fails_at_start_up(livegate: Livegate):
    svc = livegate.services
    settings = svc.settings.model_copy(
        update={"stripe": svc.settings.stripe.model_copy(update={"tier": "platinum"})}
    )
    with pytest.raises(ConfigError, match="platinum"):
        open_billing(settings, svc.engine, svc.publisher)


# --- webhook: signatures ---------------------------------------------------------


def _signed_by(secret: str) -> Any:
    return lambda body: {"stripe-signature": sign(body, secret=secret)}


SIGNATURE_CASES: dict[str, Any] = {
    "wrong-secret": _signed_by("whsec_someone_else"),
    "tampered": lambda body: {"stripe-signature": sign(body.replace("past_due", "active"))},
    "missing": lambda body: {},
    "empty": lambda body: {"stripe-signature": ""},
    "garbage": lambda body: {"stripe-signature": "nonsense"},
    "no-timestamp": lambda body: {"stripe-signature": sign(body).split(",", 1)[1]},
    "bad-timestamp": lambda body: {"stripe-signature": "t=soon," + sign(body).split(",", 1)[1]},
    "other-scheme": lambda body: {"stripe-signature": sign(body).replace("v1=", "v0=")},
    "stale": lambda body: {"stripe-signature": sign(body, at=int(time.time()) - 600)},
    "non-ascii": lambda body: {"stripe-signature": b"t=1700000000,v1=\xe9\xe9"},
}


@pytest.mark.parametrize("case", list(SIGNATURE_CASES))
async def test_bad_signatures_are_400_and_change_nothing(livegate: Livegate, case: str):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    event_id = f"evt_{uuid.uuid4().hex[:24]}"
    body = event(
        "customer.subscription.updated",
        subscription_obj(sub_id, customer, "past_due"),
        event_id=event_id,
    )
    response = await post_webhook(livegate, body, SIGNATURE_CASES[case](body))
    assert_navi_error(response, 400, "BAD_REQUEST", "invalid_signature")
    assert not await remembered(livegate, event_id)
    assert (await stored(livegate, account.user.id)).status == "active"


async def test_a_body_that_is_not_utf8_is_400(livegate: Livegate):
    body = b'{"id": "evt_\xff"}'
    response = await post_webhook(livegate, body, {"stripe-signature": sign(body)})
    assert_navi_error(response, 400, "BAD_REQUEST", "invalid_signature")


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "[1, 2]",
        json.dumps({"type": "customer.subscription.updated", "created": 1, "data": {"object": {}}}),
        json.dumps({"id": "evt_1", "type": "customer.subscription.updated", "created": 1}),
        json.dumps({"id": "evt_1", "type": "x", "created": "yesterday", "data": {"object": {}}}),
        json.dumps({"id": "evt_1", "type": "x", "created": 2**63, "data": {"object": {}}}),
    ],
    ids=["not-json", "array", "no-id", "no-object", "bad-created", "created-overflows"],
)
async def test_signed_but_malformed_payloads_are_400(livegate: Livegate, payload: str):
    response = await post_webhook(livegate, payload, {"stripe-signature": sign(payload)})
    assert_navi_error(response, 400, "BAD_REQUEST", "invalid_event")


async def test_a_refused_event_is_not_remembered_and_its_retry_applies(livegate: Livegate):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    event_id = f"evt_{uuid.uuid4().hex[:24]}"
    broken = subscription_obj(sub_id, customer)
    del broken["status"]
    body = event("customer.subscription.updated", broken, event_id=event_id)
    assert_navi_error(await deliver(livegate, body), 400, "BAD_REQUEST", "invalid_event")
    assert not await remembered(livegate, event_id)
    fixed = event(
        "customer.subscription.updated",
        subscription_obj(sub_id, customer, "trialing"),
        event_id=event_id,
    )
    assert_outcome(await deliver(livegate, fixed), "processed")
    assert (await stored(livegate, account.user.id)).status == "trialing"


async def test_a_created_time_past_the_calendar_is_400_and_changes_nothing(livegate: Livegate):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    body = event(
        "customer.subscription.updated",
        subscription_obj(sub_id, customer, "past_due"),
        created=2**63,  # one past what a BIGINT holds
    )
    assert_navi_error(await deliver(livegate, body), 400, "BAD_REQUEST", "invalid_event")
    assert (await stored(livegate, account.user.id)).status == "active"


# --- webhook: the subscription's life ----------------------------------------------


async def test_checkout_then_subscription_update_gives_pro_with_its_period_end(
    livegate: Livegate,
):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    row = await stored(livegate, account.user.id)
    assert (row.stripe_subscription_id, row.status, row.tier) == (sub_id, "active", "pro")
    assert row.stripe_customer_id == customer
    assert await tier_of(livegate, account.user.id) == "pro"
    assert await get_subscription(livegate, account) == {
        "tier": "pro",
        "status": "active",
        "periodEnd": None,
    }
    period_end = int(time.time()) + 30 * 86400
    body = event(
        "customer.subscription.updated",
        subscription_obj(sub_id, customer, "active", period_end=period_end),
    )
    assert_outcome(await deliver(livegate, body), "processed")
    assert await get_subscription(livegate, account) == {
        "tier": "pro",
        "status": "active",
        "periodEnd": iso(period_end),
    }


async def test_the_period_end_of_older_api_versions_is_read_too(livegate: Livegate):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    period_end = int(time.time()) + 7 * 86400
    body = event(
        "customer.subscription.updated",
        subscription_obj(sub_id, customer, "trialing", period_end=period_end, legacy=True),
    )
    assert_outcome(await deliver(livegate, body), "processed")
    assert await get_subscription(livegate, account) == {
        "tier": "pro",
        "status": "trialing",
        "periodEnd": iso(period_end),
    }


async def test_deletion_returns_the_user_to_the_default_tier(livegate: Livegate):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    period_end = int(time.time()) + 86400
    body = event(
        "customer.subscription.deleted",
        subscription_obj(sub_id, customer, "canceled", period_end=period_end),
    )
    assert_outcome(await deliver(livegate, body), "processed")
    assert await tier_of(livegate, account.user.id) == "free"
    assert await get_subscription(livegate, account) == {
        "tier": "free",
        "status": "canceled",
        "periodEnd": iso(period_end),
    }


@pytest.mark.parametrize("status", ["unpaid", "incomplete_expired"])
async def test_other_ends_also_return_the_default_tier(livegate: Livegate, status: str):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    body = event("customer.subscription.updated", subscription_obj(sub_id, customer, status))
    assert_outcome(await deliver(livegate, body), "processed")
    assert await tier_of(livegate, account.user.id) == "free"
    shown = {"unpaid": "past_due", "incomplete_expired": "canceled"}[status]
    assert (await get_subscription(livegate, account))["status"] == shown


@pytest.mark.parametrize("legacy", [False, True], ids=["parent", "legacy"])
async def test_a_failed_payment_is_past_due_and_a_paid_one_active_again(
    livegate: Livegate, legacy: bool
):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    failed = event("invoice.payment_failed", invoice_obj(customer, sub_id, legacy=legacy))
    assert_outcome(await deliver(livegate, failed), "processed")
    assert await get_subscription(livegate, account) == {
        "tier": "pro",  # Stripe is still retrying: access continues
        "status": "past_due",
        "periodEnd": None,
    }
    paid = event("invoice.payment_succeeded", invoice_obj(customer, sub_id, legacy=legacy))
    assert_outcome(await deliver(livegate, paid), "processed")
    assert (await get_subscription(livegate, account))["status"] == "active"
    assert await tier_of(livegate, account.user.id) == "pro"


async def test_a_paid_invoice_does_not_end_a_trial(livegate: Livegate):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    trial = event("customer.subscription.updated", subscription_obj(sub_id, customer, "trialing"))
    assert_outcome(await deliver(livegate, trial), "processed")
    paid = event("invoice.payment_succeeded", invoice_obj(customer, sub_id))
    assert_outcome(await deliver(livegate, paid), "processed")
    assert (await stored(livegate, account.user.id)).status == "trialing"


async def test_an_admin_set_tier_is_never_changed_by_the_subscription(livegate: Livegate):
    account = await livegate.account(tier="enterprise")
    customer, sub_id = await subscribe(livegate, account)
    assert await tier_of(livegate, account.user.id) == "enterprise"  # not "downgraded" to pro
    deleted = event("customer.subscription.deleted", subscription_obj(sub_id, customer, "canceled"))
    assert_outcome(await deliver(livegate, deleted), "processed")
    assert await tier_of(livegate, account.user.id) == "enterprise"
    assert await get_subscription(livegate, account) == {
        "tier": "enterprise",
        "status": "canceled",
        "periodEnd": None,
    }


async def test_a_user_an_admin_put_on_pro_keeps_it_after_subscribing_and_cancelling(
    livegate: Livegate,
):
    account = await livegate.account(tier="pro")
    customer, sub_id = await subscribe(livegate, account)
    assert (await stored(livegate, account.user.id)).tier is None  # the subscription moved nothing
    deleted = event("customer.subscription.deleted", subscription_obj(sub_id, customer, "canceled"))
    assert_outcome(await deliver(livegate, deleted), "processed")
    assert await tier_of(livegate, account.user.id) == "pro"


async def test_a_tier_an_admin_set_after_subscribing_survives_the_deletion(livegate: Livegate):
    svc = livegate.services
    admin_user = await create_user(
        svc.engine,
        email=f"admin-{uuid.uuid4().hex[:8]}@example.test",
        password=None,
        tier="free",
        role="admin",
    )
    admin_token = svc.secrets.issue_token(admin_user.id)
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        response = await http.patch(
            f"/api/admin/users/{account.user.id}",
            json={"tier": "enterprise"},
            headers={"Authorization": f"Bearer {admin_token}"},
        )
    assert response.status_code == 200, response.text
    deleted = event("customer.subscription.deleted", subscription_obj(sub_id, customer, "canceled"))
    assert_outcome(await deliver(livegate, deleted), "processed")
    assert await tier_of(livegate, account.user.id) == "enterprise"


async def test_tier_changes_push_the_new_quota_at_once(livegate: Livegate):
    account = await livegate.account()
    assert (await checkout(livegate, account)).status_code == 200
    customer = (await stored(livegate, account.user.id)).stripe_customer_id
    sub_id = new_sub_id()
    async with quota_socket(livegate, account.token) as ws:
        first = await recv_json(ws)
        assert first["total"] == FREE_TOKENS
        completed = event(
            "checkout.session.completed", checkout_obj(account.user.id, customer, sub_id)
        )
        assert_outcome(await deliver(livegate, completed), "processed")
        upgraded = await recv_json(ws)
        assert upgraded["type"] == "quota"
        assert upgraded["total"] == PRO_TOKENS
        assert upgraded["seq"] > first["seq"]
        deleted = event(
            "customer.subscription.deleted", subscription_obj(sub_id, customer, "canceled")
        )
        assert_outcome(await deliver(livegate, deleted), "processed")
        downgraded = await recv_json(ws)
        assert downgraded["total"] == FREE_TOKENS
        assert downgraded["seq"] > upgraded["seq"]


# --- webhook: all of an event or none of it -------------------------------------------


@pytest.mark.parametrize("move", ["upgrade", "downgrade"])
async def test_a_tier_change_that_fails_leaves_nothing_and_the_retry_applies_all(
    livegate: Livegate, move: str
):
    account = await livegate.account()
    if move == "upgrade":
        assert (await checkout(livegate, account)).status_code == 200
        customer, sub_id = (
            (await stored(livegate, account.user.id)).stripe_customer_id,
            new_sub_id(),
        )
        obj = checkout_obj(account.user.id, customer, sub_id)
        body = event("checkout.session.completed", obj, event_id=f"evt_{uuid.uuid4().hex[:24]}")
        before, after = (None, None, "free"), ("active", "pro", "pro")
    else:
        customer, sub_id = await subscribe(livegate, account)
        obj = subscription_obj(sub_id, customer, "canceled")
        body = event("customer.subscription.deleted", obj, event_id=f"evt_{uuid.uuid4().hex[:24]}")
        before, after = ("active", "pro", "pro"), ("canceled", None, "free")
    event_id = json.loads(body)["id"]

    async def state() -> tuple[str | None, str | None, str]:
        row = await stored(livegate, account.user.id)
        return row.status, row.tier, await tier_of(livegate, account.user.id)

    async with refused_tier_changes(livegate, account.user.id):
        response = await deliver(livegate, body)
    assert response.status_code == 500, response.text
    # Neither the event id nor the subscription's row: Stripe's retry must see it all anew.
    assert not await remembered(livegate, event_id)
    assert await state() == before
    assert_outcome(await deliver(livegate, body), "processed")
    assert await state() == after
    assert_outcome(await deliver(livegate, body), "duplicate")


async def test_a_delivery_cancelled_midway_leaves_nothing_and_the_retry_applies_all(
    livegate: Livegate,
):
    svc = livegate.services
    if svc.engine.dialect.name != "postgresql":
        pytest.skip("holding one row's lock needs PostgreSQL; SQLite locks the whole database")
    assert svc.billing is not None
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    event_id = f"evt_{uuid.uuid4().hex[:24]}"
    body = event(
        "customer.subscription.deleted",
        subscription_obj(sub_id, customer, "canceled"),
        event_id=event_id,
    )
    # Another transaction holds the user's row, so the delivery stops at its tier change;
    # it is cancelled there, as a client disconnect or a shutdown would.
    async with svc.engine.connect() as holder:
        await holder.execute(
            sa.text("SELECT 1 FROM users WHERE id = :id FOR NO KEY UPDATE"),
            {"id": account.user.id},
        )
        task = asyncio.create_task(svc.billing.handle_webhook(body.encode(), sign(body)))
        await wait_for_lock_wait(livegate, "UPDATE users", task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await holder.rollback()
    assert not await remembered(livegate, event_id)
    assert (await stored(livegate, account.user.id)).status == "active"
    assert await tier_of(livegate, account.user.id) == "pro"
    assert_outcome(await deliver(livegate, body), "processed")
    assert await tier_of(livegate, account.user.id) == "free"


# --- webhook: replays, order, strangers ----------------------------------------------


async def test_a_replayed_event_is_acknowledged_but_applied_once(livegate: Livegate):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    now = int(time.time())
    failed = event("invoice.payment_failed", invoice_obj(customer, sub_id), created=now)
    paid = event("invoice.payment_succeeded", invoice_obj(customer, sub_id), created=now)
    assert_outcome(await deliver(livegate, failed), "processed")
    assert_outcome(await deliver(livegate, paid), "processed")
    # Applied again, the failure (same `created`, so not older) would make it past due.
    assert_outcome(await deliver(livegate, failed), "duplicate")
    assert (await stored(livegate, account.user.id)).status == "active"


async def test_concurrent_copies_of_one_event_apply_once(livegate: Livegate):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    body = event("invoice.payment_failed", invoice_obj(customer, sub_id))
    responses = await asyncio.gather(*(deliver(livegate, body) for _ in range(5)))
    outcomes = sorted(r.json()["outcome"] for r in responses)
    assert outcomes == ["duplicate"] * 4 + ["processed"], [r.text for r in responses]
    assert (await stored(livegate, account.user.id)).status == "past_due"


async def test_an_older_event_delivered_late_is_ignored(livegate: Livegate):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    now = int(time.time())
    newer = event(
        "customer.subscription.updated",
        subscription_obj(sub_id, customer, "active", period_end=now + 86400 * 30),
        created=now + 10,
    )
    older = event(
        "customer.subscription.updated",
        subscription_obj(sub_id, customer, "unpaid", period_end=now),
        created=now,
    )
    assert_outcome(await deliver(livegate, newer), "processed")
    assert_outcome(await deliver(livegate, older), "stale")
    row = await stored(livegate, account.user.id)
    assert (row.status, row.event_at) == ("active", now + 10)
    assert await tier_of(livegate, account.user.id) == "pro"
    assert (await get_subscription(livegate, account))["periodEnd"] == iso(now + 86400 * 30)


@pytest.mark.parametrize("checkout_first", [True, False], ids=["checkout-first", "sub-first"])
async def test_the_subscriptions_own_status_wins_over_the_checkouts(
    livegate: Livegate, checkout_first: bool
):
    # Stripe sends both around the same second, in any order; the checkout only infers
    # "active", the subscription event knows it is a trial.
    account = await livegate.account()
    assert (await checkout(livegate, account)).status_code == 200
    customer = (await stored(livegate, account.user.id)).stripe_customer_id
    sub_id = new_sub_id()
    now = int(time.time())
    completed = event(
        "checkout.session.completed",
        checkout_obj(account.user.id, customer, sub_id, payment_status="no_payment_required"),
        created=now + 1,
    )
    created = event(
        "customer.subscription.created",
        subscription_obj(sub_id, customer, "trialing"),
        created=now,
    )
    for body in (completed, created) if checkout_first else (created, completed):
        assert_outcome(await deliver(livegate, body), "processed")
    assert await get_subscription(livegate, account) == {
        "tier": "pro",
        "status": "trialing",
        "periodEnd": None,
    }


@pytest.mark.parametrize("later", [0, 5], ids=["same-second", "later"])
@pytest.mark.parametrize("end", ["deleted", "incomplete_expired"])
async def test_an_ended_subscription_is_never_revived(livegate: Livegate, end: str, later: int):
    account = await livegate.account()
    customer, sub_id = await subscribe(livegate, account)
    now = int(time.time())
    if end == "deleted":
        obj = subscription_obj(sub_id, customer, "canceled")
        ended = event("customer.subscription.deleted", obj, created=now)
    else:
        obj = subscription_obj(sub_id, customer, "incomplete_expired")
        ended = event("customer.subscription.updated", obj, created=now)
    assert_outcome(await deliver(livegate, ended), "processed")
    status = (await stored(livegate, account.user.id)).status
    for body in (
        event(
            "customer.subscription.updated",
            subscription_obj(sub_id, customer, "active"),
            created=now + later,
        ),
        event("invoice.payment_succeeded", invoice_obj(customer, sub_id), created=now + later),
    ):
        assert_outcome(await deliver(livegate, body), "ignored")
    row = await stored(livegate, account.user.id)
    assert (row.stripe_subscription_id, row.status, row.tier) == (sub_id, status, None)
    assert await tier_of(livegate, account.user.id) == "free"
    assert (await get_subscription(livegate, account))["status"] == "canceled"


async def test_a_new_subscription_in_the_second_of_a_cancellation_still_grants(
    livegate: Livegate,
):
    account = await livegate.account()
    customer, old_sub = await subscribe(livegate, account)
    now = int(time.time())
    ended = event(
        "customer.subscription.deleted",
        subscription_obj(old_sub, customer, "canceled"),
        created=now,
    )
    assert_outcome(await deliver(livegate, ended), "processed")
    assert await tier_of(livegate, account.user.id) == "free"
    new_sub = new_sub_id()
    created = event(
        "customer.subscription.created",
        subscription_obj(new_sub, customer, "active"),
        created=now,
    )
    assert_outcome(await deliver(livegate, created), "processed")
    row = await stored(livegate, account.user.id)
    assert (row.stripe_subscription_id, row.status, row.tier) == (new_sub, "active", "pro")
    assert await tier_of(livegate, account.user.id) == "pro"


@pytest.mark.parametrize(
    ("ahead", "behind"),
    [("active", "incomplete"), ("trialing", "incomplete"), ("active", "trialing")],
)
async def test_within_one_second_a_status_never_steps_back(
    livegate: Livegate, ahead: str, behind: str
):
    # Stripe stamps a subscription's first events with one second and sends them in
    # any order: `created` (incomplete) may come after `updated` (active).
    account = await livegate.account()
    assert (await checkout(livegate, account)).status_code == 200
    customer = (await stored(livegate, account.user.id)).stripe_customer_id
    sub_id, now = new_sub_id(), int(time.time())
    updated = event(
        "customer.subscription.updated", subscription_obj(sub_id, customer, ahead), created=now
    )
    created = event(
        "customer.subscription.created", subscription_obj(sub_id, customer, behind), created=now
    )
    assert_outcome(await deliver(livegate, updated), "processed")
    assert_outcome(await deliver(livegate, created), "stale")
    row = await stored(livegate, account.user.id)
    assert (row.stripe_subscription_id, row.status, row.tier) == (sub_id, ahead, "pro")
    assert await tier_of(livegate, account.user.id) == "pro"


async def test_within_one_second_a_paid_invoice_is_not_undone_by_incomplete(livegate: Livegate):
    account = await livegate.account()
    assert (await checkout(livegate, account)).status_code == 200
    customer = (await stored(livegate, account.user.id)).stripe_customer_id
    sub_id, now = new_sub_id(), int(time.time())
    paid = event("invoice.payment_succeeded", invoice_obj(customer, sub_id), created=now)
    created = event(
        "customer.subscription.created",
        subscription_obj(sub_id, customer, "incomplete"),
        created=now,
    )
    assert_outcome(await deliver(livegate, paid), "processed")
    assert_outcome(await deliver(livegate, created), "stale")
    assert (await stored(livegate, account.user.id)).status == "active"
    assert await tier_of(livegate, account.user.id) == "pro"


async def test_news_of_an_old_subscription_leaves_the_new_one_alone(livegate: Livegate):
    account = await livegate.account()
    customer, old_sub = await subscribe(livegate, account)
    ended = event("customer.subscription.deleted", subscription_obj(old_sub, customer, "canceled"))
    assert_outcome(await deliver(livegate, ended), "processed")
    new_sub = new_sub_id()
    completed = event(
        "checkout.session.completed", checkout_obj(account.user.id, customer, new_sub)
    )
    assert_outcome(await deliver(livegate, completed), "processed")
    assert await tier_of(livegate, account.user.id) == "pro"
    # A late (but newer-stamped) word about the old subscription, and its last invoice.
    later = int(time.time()) + 5
    for body in (
        event(
            "customer.subscription.updated",
            subscription_obj(old_sub, customer, "canceled"),
            created=later,
        ),
        event("invoice.payment_failed", invoice_obj(customer, old_sub), created=later),
    ):
        assert_outcome(await deliver(livegate, body), "ignored")
    row = await stored(livegate, account.user.id)
    assert (row.stripe_subscription_id, row.status) == (new_sub, "active")
    assert await tier_of(livegate, account.user.id) == "pro"


async def test_a_checkout_maps_its_user_by_client_reference_id(livegate: Livegate):
    # The customer was made elsewhere (not through our checkout): the checkout's
    # client_reference_id names the user, and the customer is kept for later events.
    account = await livegate.account()
    customer, sub_id = f"cus_{uuid.uuid4().hex[:14]}", new_sub_id()
    completed = event("checkout.session.completed", checkout_obj(account.user.id, customer, sub_id))
    assert_outcome(await deliver(livegate, completed), "processed")
    assert (await stored(livegate, account.user.id)).stripe_customer_id == customer
    failed = event("invoice.payment_failed", invoice_obj(customer, sub_id))
    assert_outcome(await deliver(livegate, failed), "processed")
    assert (await get_subscription(livegate, account))["status"] == "past_due"


async def test_a_subscription_maps_its_user_by_metadata(livegate: Livegate):
    account = await livegate.account()
    customer, sub_id = f"cus_{uuid.uuid4().hex[:14]}", new_sub_id()
    body = event(
        "customer.subscription.created",
        subscription_obj(sub_id, customer, "active", user_id=account.user.id),
    )
    assert_outcome(await deliver(livegate, body), "processed")
    assert await tier_of(livegate, account.user.id) == "pro"
    assert (await stored(livegate, account.user.id)).stripe_customer_id == customer


async def test_a_deleted_users_customer_is_never_given_to_the_user_its_metadata_names(
    livegate: Livegate,
):
    """The customer belongs to whom it is stored for. Once that user is deleted, its
    events are for no user of ours: not a 500 for the customer id being taken, and
    not another user's tier moved by an event about someone else's customer."""
    owner, named = await livegate.account(), await livegate.account()
    customer, sub_id = f"cus_{uuid.uuid4().hex[:14]}", new_sub_id()
    created = event(
        "customer.subscription.created",
        subscription_obj(sub_id, customer, "active", user_id=owner.user.id),
    )
    assert_outcome(await deliver(livegate, created), "processed")
    async with livegate.services.engine.begin() as conn:
        await conn.execute(
            users.update().where(users.c.id == owner.user.id).values(deleted_at=datetime.now(UTC))
        )
    updated = event(
        "customer.subscription.updated",
        subscription_obj(new_sub_id(), customer, "active", user_id=named.user.id),
    )
    assert_outcome(await deliver(livegate, updated), "unknown_customer")
    assert await tier_of(livegate, named.user.id) == "free"
    assert await stored(livegate, named.user.id) is None


async def test_events_for_unknown_customers_are_acknowledged(livegate: Livegate):
    for body in (
        event("customer.subscription.updated", subscription_obj(new_sub_id(), "cus_nobody")),
        event("invoice.payment_failed", invoice_obj("cus_nobody", new_sub_id())),
        event(
            "checkout.session.completed",
            checkout_obj("no-such-user", "cus_nobody", new_sub_id()),
        ),
    ):
        assert_outcome(await deliver(livegate, body), "unknown_customer")


@pytest.mark.parametrize(
    ("event_type", "obj"),
    [
        ("customer.created", {"id": "cus_1", "object": "customer"}),
        ("payment_intent.succeeded", {"id": "pi_1", "object": "payment_intent"}),
        ("checkout.session.completed", checkout_obj(None, "cus_1", "sub_1", mode="payment")),
        ("invoice.payment_succeeded", {"id": "in_1", "object": "invoice", "customer": "cus_1"}),
    ],
    ids=["customer", "payment-intent", "payment-checkout", "one-off-invoice"],
)
async def test_events_we_do_not_act_on_are_acknowledged(
    livegate: Livegate, event_type: str, obj: dict[str, Any]
):
    assert_outcome(await deliver(livegate, event(event_type, obj)), "ignored")
