"""The Playground's `/api/v1/webhooks` and the deliveries they receive.

CRUD in the documented shapes and envelope; `ai.task.completed` / `ai.task.failed`
for relayed requests and `quota.warning` when a quota reaches a configured share,
signed the Standard Webhooks way (verified here with the svix library), retried on
failure, never delivered twice across instances. A real receiver on loopback
records what arrives.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from base64 import b64encode
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from svix.webhooks import Webhook

from app.core.config import TierConfig, WebhooksConfig
from app.core.tables import usage_logs, webhook_deliveries
from app.core.webhooks import Event, enqueue
from tests.api.test_ai import ISO_MS, assert_error, call
from tests.conftest import FAKE_MODEL, Backend, Livegate, StartLivegate
from tests.fake_upstream import FakeUpstream
from tests.webhook_receiver import WAIT, Delivery, Receiver

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

HI = [{"role": "user", "content": "hello"}]
ALL_EVENTS = ["ai.task.completed", "ai.task.failed", "quota.warning"]
FAST = WebhooksConfig(
    allow_private_networks=True, poll_seconds=0.05, retry_schedule_seconds=[0.05, 0.05]
)


async def create_webhook(
    livegate: Livegate, token: str, url: str, events: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    response = await call(
        livegate,
        "POST",
        "/api/v1/webhooks",
        token,
        json={"url": url, "events": events or ALL_EVENTS, **extra},
    )
    assert response.status_code == 201, response.text
    return response.json()["data"]["webhook"]  # type: ignore[no-any-return]


def verify(delivery: Delivery, secret: str) -> dict[str, Any]:
    """Raises unless the signature is right (svix checks it and the timestamp)."""
    Webhook(secret).verify(delivery.body, delivery.headers)
    return delivery.json


async def chat(livegate: Livegate, token: str, **body: Any) -> httpx.Response:
    return await call(livegate, "POST", "/api/v1/ai/chat", token, json={"messages": HI, **body})


# --- CRUD -------------------------------------------------------------------------


async def test_create_list_get_update_delete_in_the_documented_shapes(
    start_livegate: StartLivegate,
) -> None:
    livegate = await start_livegate()
    account = await livegate.account()

    response = await call(
        livegate,
        "POST",
        "/api/v1/webhooks",
        account.token,
        json={"url": "https://hooks.example.com/a", "events": ["ai.task.completed"]},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["success"] is True and body["message"] == "Webhook created successfully"
    created = body["data"]["webhook"]
    assert set(created) == {
        "id",
        "url",
        "events",
        "secret",
        "active",
        "created_at",
        "last_delivery",
    }
    assert created["id"].startswith("wh-")
    assert created["url"] == "https://hooks.example.com/a"
    assert created["events"] == ["ai.task.completed"]
    assert created["secret"].startswith("whsec_")
    assert created["active"] is True and created["last_delivery"] is None
    assert ISO_MS.match(created["created_at"])

    listed = await call(livegate, "GET", "/api/v1/webhooks", account.token)
    assert listed.status_code == 200
    data = listed.json()["data"]
    assert [w["id"] for w in data["webhooks"]] == [created["id"]]
    assert "secret" not in data["webhooks"][0]
    assert data["pagination"]["total"] == 1 and data["pagination"]["page"] == 1

    detail = await call(livegate, "GET", f"/api/v1/webhooks/{created['id']}", account.token)
    assert detail.json()["data"]["webhook"]["events"] == ["ai.task.completed"]

    updated = await call(
        livegate,
        "PUT",
        f"/api/v1/webhooks/{created['id']}",
        account.token,
        json={"url": "https://hooks.example.com/b", "events": ALL_EVENTS, "active": False},
    )
    assert updated.status_code == 200, updated.text
    shape = updated.json()["data"]["webhook"]
    assert set(shape) == {"id", "url", "events", "active", "updated_at"}
    assert shape["url"] == "https://hooks.example.com/b"
    assert sorted(shape["events"]) == sorted(ALL_EVENTS)
    assert shape["active"] is False
    assert updated.json()["message"] == "Webhook updated successfully"

    deleted = await call(livegate, "DELETE", f"/api/v1/webhooks/{created['id']}", account.token)
    assert deleted.status_code == 200
    assert deleted.json()["message"] == "Webhook deleted successfully"
    gone = await call(livegate, "GET", f"/api/v1/webhooks/{created['id']}", account.token)
    assert_error(gone, 404, "NOT_FOUND")


async def test_another_users_webhook_is_not_found(start_livegate: StartLivegate) -> None:
    livegate = await start_livegate()
    owner, other = await livegate.account(), await livegate.account()
    webhook = await create_webhook(livegate, owner.token, "https://hooks.example.com/x")
    path = f"/api/v1/webhooks/{webhook['id']}"
    for method, body in (("GET", None), ("PUT", {"active": False}), ("DELETE", None)):
        assert_error(await call(livegate, method, path, other.token, json=body), 404, "NOT_FOUND")
    listed = await call(livegate, "GET", "/api/v1/webhooks", other.token)
    assert listed.json()["data"]["webhooks"] == []
    still = await call(livegate, "GET", path, owner.token)
    assert still.json()["data"]["webhook"]["active"] is True


@pytest.mark.parametrize(
    "body",
    [
        {"events": ALL_EVENTS},
        {"url": "ftp://hooks.example.com/", "events": ALL_EVENTS},
        {"url": "not a url", "events": ALL_EVENTS},
        {"url": "https://user:pw@hooks.example.com/", "events": ALL_EVENTS},
        {"url": "http://127.0.0.1:9/", "events": ALL_EVENTS},
        {"url": "http://10.0.0.5/", "events": ALL_EVENTS},
        {"url": "http://169.254.169.254/latest/meta-data", "events": ALL_EVENTS},
        {"url": "http://[::1]/", "events": ALL_EVENTS},
        {"url": "http://localhost:8000/", "events": ALL_EVENTS},
        {"url": "http://xn--/", "events": ALL_EVENTS},
        {"url": "https://xn--zz.example.com/hook", "events": ALL_EVENTS},
        {"url": "https://hooks.example.com/", "events": []},
        {"url": "https://hooks.example.com/", "events": ["ai.task.exploded"]},
        {"url": "https://hooks.example.com/", "events": "ai.task.completed"},
        {"url": "https://hooks.example.com/", "events": ALL_EVENTS, "secret": "short"},
        {"url": "https://hooks.example.com/", "events": ALL_EVENTS, "secret": "whsec_!!!notb64!!!"},
        {"url": "https://hooks.example.com/", "events": ALL_EVENTS, "active": "yes"},
    ],
)
async def test_bad_input_is_a_validation_error(
    start_livegate: StartLivegate, body: dict[str, Any]
) -> None:
    livegate = await start_livegate()
    account = await livegate.account()
    response = await call(livegate, "POST", "/api/v1/webhooks", account.token, json=body)
    assert_error(response, 400, "VALIDATION_ERROR")


async def test_updates_are_validated_too(start_livegate: StartLivegate) -> None:
    livegate = await start_livegate()
    account = await livegate.account()
    webhook = await create_webhook(livegate, account.token, "https://hooks.example.com/x")
    path = f"/api/v1/webhooks/{webhook['id']}"
    for body in ({}, {"url": "http://127.0.0.1/"}, {"events": []}, {"secret": None}):
        assert_error(
            await call(livegate, "PUT", path, account.token, json=body), 400, "VALIDATION_ERROR"
        )


async def test_authentication_and_permissions(start_livegate: StartLivegate) -> None:
    livegate = await start_livegate()
    account = await livegate.account()
    assert_error(await call(livegate, "GET", "/api/v1/webhooks"), 401, "AUTHENTICATION_ERROR")

    async def key(permissions: list[str]) -> str:
        response = await call(
            livegate,
            "POST",
            "/api/v1/api-keys",
            account.token,
            json={"name": "k", "permissions": permissions},
        )
        return response.json()["data"]["api_key"]["key"]  # type: ignore[no-any-return]

    ai_only = await key(["ai:read", "ai:write"])
    writer = await key(["webhooks:write"])
    denied = await call(
        livegate,
        "POST",
        "/api/v1/webhooks",
        ai_only,
        json={"url": "https://hooks.example.com/", "events": ALL_EVENTS},
    )
    assert_error(denied, 403, "AUTHORIZATION_ERROR")
    assert_error(
        await call(livegate, "GET", "/api/v1/webhooks", ai_only), 403, "AUTHORIZATION_ERROR"
    )
    await create_webhook(livegate, writer, "https://hooks.example.com/")
    # A key that manages webhooks sees them.
    listed = await call(livegate, "GET", "/api/v1/webhooks", writer)
    assert listed.status_code == 200 and len(listed.json()["data"]["webhooks"]) == 1


async def test_webhooks_per_user_are_capped(start_livegate: StartLivegate) -> None:
    livegate = await start_livegate(webhooks=WebhooksConfig(max_per_user=2))
    account = await livegate.account()
    for _ in range(2):
        await create_webhook(livegate, account.token, "https://hooks.example.com/")
    response = await call(
        livegate,
        "POST",
        "/api/v1/webhooks",
        account.token,
        json={"url": "https://hooks.example.com/", "events": ALL_EVENTS},
    )
    assert response.status_code == 409
    assert response.json()["success"] is False


async def test_the_cap_holds_for_concurrent_creations(start_livegate: StartLivegate) -> None:
    livegate = await start_livegate(webhooks=WebhooksConfig(max_per_user=2))
    account = await livegate.account()
    body = {"url": "https://hooks.example.com/", "events": ALL_EVENTS}
    responses = await asyncio.gather(
        *(call(livegate, "POST", "/api/v1/webhooks", account.token, json=body) for _ in range(12))
    )
    assert sorted(r.status_code for r in responses) == [201] * 2 + [409] * 10
    listed = await call(livegate, "GET", "/api/v1/webhooks", account.token)
    assert len(listed.json()["data"]["webhooks"]) == 2


# --- deliveries -------------------------------------------------------------------


async def test_a_completed_task_is_delivered_signed(
    start_livegate: StartLivegate, receiver: Receiver
) -> None:
    livegate = await start_livegate(webhooks=FAST)
    account = await livegate.account()
    webhook = await create_webhook(livegate, account.token, receiver.url)

    answer = await chat(livegate, account.token)
    assert answer.status_code == 200, answer.text
    [delivery] = await receiver.wait_for(1)
    payload = verify(delivery, webhook["secret"])
    assert payload["event"] == "ai.task.completed"
    data = payload["data"]
    assert data["status"] == "completed" and data["user_id"] == account.user.id
    assert ISO_MS.match(data["timestamp"])
    assert data["result"]["choices"] == answer.json()["data"]["choices"]
    assert data["result"]["usage"] == answer.json()["data"]["usage"]
    async with livegate.services.engine.connect() as conn:
        row_ids = (await conn.execute(sa.select(usage_logs.c.id))).scalars().all()
    assert data["task_id"] in row_ids
    assert delivery.headers["webhook-id"].startswith("evt_")
    assert delivery.headers["content-type"] == "application/json"

    async def delivered() -> str | None:
        listed = await call(livegate, "GET", "/api/v1/webhooks", account.token)
        return listed.json()["data"]["webhooks"][0]["last_delivery"]  # type: ignore[no-any-return]

    for _ in range(200):
        if await delivered():
            break
        await asyncio.sleep(0.05)
    assert ISO_MS.match(await delivered() or "")


async def test_a_stream_completes_with_its_usage(
    start_livegate: StartLivegate, receiver: Receiver, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script.tokens = 6
    livegate = await start_livegate(webhooks=FAST)
    account = await livegate.account()
    webhook = await create_webhook(livegate, account.token, receiver.url, ["ai.task.completed"])
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=WAIT) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": FAKE_MODEL, "messages": HI, "stream": True},
            headers={"Authorization": f"Bearer {account.api_key}"},
        )
    assert response.status_code == 200 and "[DONE]" in response.text
    [delivery] = await receiver.wait_for(1)
    data = verify(delivery, webhook["secret"])["data"]
    assert data["result"]["usage"]["completion_tokens"] == 6
    assert data["result"]["choices"][0]["finish_reason"] == "stop"


async def test_a_failed_task_is_delivered(
    start_livegate: StartLivegate, receiver: Receiver, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script.status = 400
    livegate = await start_livegate(webhooks=FAST)
    account = await livegate.account()
    webhook = await create_webhook(livegate, account.token, receiver.url, ["ai.task.failed"])
    response = await chat(livegate, account.token)
    assert response.status_code >= 400
    [delivery] = await receiver.wait_for(1)
    payload = verify(delivery, webhook["secret"])
    assert payload["event"] == "ai.task.failed"
    assert payload["data"]["status"] == "failed" and payload["data"]["error"]


async def test_only_subscribed_and_active_webhooks_receive(
    start_livegate: StartLivegate, receiver: Receiver
) -> None:
    livegate = await start_livegate(webhooks=FAST)
    account, stranger = await livegate.account(), await livegate.account()
    await create_webhook(livegate, account.token, receiver.url + "?failed", ["ai.task.failed"])
    await create_webhook(livegate, account.token, receiver.url + "?off", active=False)
    await create_webhook(livegate, stranger.token, receiver.url + "?stranger")
    wanted = await create_webhook(livegate, account.token, receiver.url + "?on")
    assert (await chat(livegate, account.token)).status_code == 200
    [delivery] = await receiver.wait_for(1)
    assert verify(delivery, wanted["secret"])["event"] == "ai.task.completed"
    await asyncio.sleep(0.5)  # room for a wrong delivery to arrive
    assert len(receiver.received) == 1


async def test_a_secret_of_the_users_own_signs_with_its_bytes(
    start_livegate: StartLivegate, receiver: Receiver
) -> None:
    livegate = await start_livegate(webhooks=FAST)
    account = await livegate.account()
    secret = "your-webhook-secret-of-old"
    webhook = await create_webhook(livegate, account.token, receiver.url, secret=secret)
    assert webhook["secret"] == secret
    await chat(livegate, account.token)
    [delivery] = await receiver.wait_for(1)
    signed = f"{delivery.headers['webhook-id']}.{delivery.headers['webhook-timestamp']}."
    mac = hmac.new(secret.encode(), (signed + delivery.body).encode(), hashlib.sha256).digest()
    assert delivery.headers["webhook-signature"] == "v1," + b64encode(mac).decode()


async def test_failed_deliveries_are_retried_then_given_up(
    start_livegate: StartLivegate, receiver: Receiver
) -> None:
    livegate = await start_livegate(webhooks=FAST)
    account = await livegate.account()
    webhook = await create_webhook(livegate, account.token, receiver.url, ["ai.task.completed"])

    receiver.statuses = [500, 503]  # the third attempt succeeds
    await chat(livegate, account.token)
    first = await receiver.wait_for(3)
    assert len({d.headers["webhook-id"] for d in first}) == 1
    assert len({d.body for d in first}) == 1  # every retry carries the same bytes

    receiver.statuses = [500, 500, 500, 500]  # more than the schedule allows
    await chat(livegate, account.token)
    await receiver.wait_for(6)
    await asyncio.sleep(0.5)  # a fourth attempt would come now
    assert len(receiver.received) == 6
    async with livegate.services.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(webhook_deliveries.c.status, webhook_deliveries.c.attempts)
                .where(webhook_deliveries.c.webhook_id == webhook["id"])
                .order_by(webhook_deliveries.c.created_at)
            )
        ).all()
    assert [(r.status, r.attempts) for r in rows] == [("delivered", 3), ("failed", 3)]


async def test_quota_warning_when_a_daily_quota_reaches_ninety_and_a_hundred_percent(
    start_livegate: StartLivegate, receiver: Receiver
) -> None:
    tier = TierConfig(daily_requests=10)
    livegate = await start_livegate(webhooks=FAST, tiers={"small": tier})
    account = await livegate.account(tier="small")
    webhook = await create_webhook(livegate, account.token, receiver.url, ["quota.warning"])
    for _ in range(8):
        assert (await chat(livegate, account.token)).status_code == 200
    await asyncio.sleep(0.3)
    assert receiver.received == []
    assert (await chat(livegate, account.token)).status_code == 200
    [ninety] = await receiver.wait_for(1)
    data = verify(ninety, webhook["secret"])["data"]
    assert (data["quota_type"], data["used"], data["limit"], data["percentage"]) == (
        "daily",
        9,
        10,
        90,
    )
    assert (await chat(livegate, account.token)).status_code == 200
    deliveries = await receiver.wait_for(2)
    assert verify(deliveries[1], webhook["secret"])["data"]["percentage"] == 100
    assert (await chat(livegate, account.token)).status_code == 429
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 2  # a refused request warns no more


async def test_two_instances_deliver_each_event_once(
    start_livegate: StartLivegate, receiver: Receiver
) -> None:
    first = await start_livegate(webhooks=FAST)
    second = await start_livegate(webhooks=FAST)
    account = await first.account()
    await create_webhook(first, account.token, receiver.url, ["ai.task.completed"])
    answers = await asyncio.gather(
        *(chat(first if i % 2 else second, account.token) for i in range(12))
    )
    assert all(a.status_code == 200 for a in answers)
    await receiver.wait_for(12)
    await asyncio.sleep(0.5)
    ids = [d.headers["webhook-id"] for d in receiver.received]
    assert len(ids) == 12 and len(set(ids)) == 12


async def test_deleting_a_webhook_drops_what_it_had_not_received(
    start_livegate: StartLivegate, receiver: Receiver
) -> None:
    slow = WebhooksConfig(
        allow_private_networks=True, poll_seconds=0.05, retry_schedule_seconds=[60]
    )
    livegate = await start_livegate(webhooks=slow)
    account = await livegate.account()
    webhook = await create_webhook(livegate, account.token, receiver.url, ["ai.task.completed"])
    receiver.statuses = [500]
    await chat(livegate, account.token)
    await receiver.wait_for(1)

    async def waiting() -> int | None:
        async with livegate.services.engine.connect() as conn:
            return await conn.scalar(
                sa.select(sa.func.count())
                .select_from(webhook_deliveries)
                .where(
                    webhook_deliveries.c.webhook_id == webhook["id"],
                    webhook_deliveries.c.status == "pending",
                )
            )

    assert await waiting() == 1  # its retry is a minute away
    await call(livegate, "DELETE", f"/api/v1/webhooks/{webhook['id']}", account.token)
    assert await waiting() == 0


async def test_a_webhook_deleted_while_an_event_is_queued_for_it_leaves_nothing(
    start_livegate: StartLivegate, backend: Backend
) -> None:
    if backend.name != "postgres":
        pytest.skip("SQLite runs one writer at a time: the two cannot overlap")
    livegate = await start_livegate()
    account = await livegate.account()
    webhook = await create_webhook(livegate, account.token, "https://hooks.example.com/")
    engine = livegate.services.engine
    async with engine.connect() as queueing:
        # An event queued for the webhook, not yet committed (a request finishing) ...
        transaction = await queueing.begin()
        queued = await enqueue(queueing, account.user.id, Event.TASK_COMPLETED, dict)
        assert queued == 1
        path = f"/api/v1/webhooks/{webhook['id']}"
        deleting = asyncio.create_task(call(livegate, "DELETE", path, account.token))
        # ... while the user deletes the webhook: the delete waits for it.
        async with asyncio.timeout(10):
            while not await lock_waits(livegate):
                assert not deleting.done(), (await deleting).text
                await asyncio.sleep(0.02)
        await transaction.commit()
    response = await deleting
    assert response.status_code == 200, response.text
    assert await deliveries_of(livegate, webhook["id"]) == []


async def lock_waits(livegate: Livegate) -> int:
    async with livegate.services.engine.connect() as conn:
        waiting = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return int(waiting or 0)


async def deliveries_of(livegate: Livegate, webhook_id: str) -> list[Any]:
    async with livegate.services.engine.connect() as conn:
        result = await conn.execute(
            sa.select(webhook_deliveries).where(webhook_deliveries.c.webhook_id == webhook_id)
        )
        return list(result)


async def test_a_target_too_slow_to_answer_is_a_failed_attempt(
    start_livegate: StartLivegate, receiver: Receiver
) -> None:
    config = WebhooksConfig(
        allow_private_networks=True,
        poll_seconds=0.05,
        timeout_seconds=0.3,
        retry_schedule_seconds=[0.2],
    )
    livegate = await start_livegate(webhooks=config)
    account = await livegate.account()
    webhook = await create_webhook(livegate, account.token, receiver.url, ["ai.task.completed"])
    receiver.delays = [5.0]  # far past the deadline; the retry is answered at once
    await chat(livegate, account.token)
    first, retry = await receiver.wait_for(2)
    assert first.body == retry.body
    for _ in range(100):
        [row] = await deliveries_of(livegate, webhook["id"])
        if row.status == "delivered":
            break
        await asyncio.sleep(0.05)
    assert (row.status, row.attempts) == ("delivered", 2)


async def test_a_deactivated_webhook_gets_no_retries_until_active_again(
    start_livegate: StartLivegate, receiver: Receiver
) -> None:
    config = WebhooksConfig(
        allow_private_networks=True, poll_seconds=0.05, retry_schedule_seconds=[0.2, 0.2]
    )
    livegate = await start_livegate(webhooks=config)
    account = await livegate.account()
    webhook = await create_webhook(livegate, account.token, receiver.url, ["ai.task.completed"])
    path = f"/api/v1/webhooks/{webhook['id']}"
    receiver.statuses = [500]
    await chat(livegate, account.token)
    await receiver.wait_for(1)
    await call(livegate, "PUT", path, account.token, json={"active": False})
    await asyncio.sleep(0.8)  # the retry was due after 0.2 s
    assert len(receiver.received) == 1
    await call(livegate, "PUT", path, account.token, json={"active": True})
    deliveries = await receiver.wait_for(2)
    assert deliveries[0].body == deliveries[1].body
