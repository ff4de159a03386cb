"""`POST /api/auth/webhook/clerk`: Svix-signed user events from Clerk.

Payloads are signed with the `svix` library itself, never with our own code.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from svix.webhooks import Webhook
from websockets.asyncio.client import ClientConnection, connect

from app.core.config import ServerConfig, _builtin_tiers
from app.core.tables import api_keys, external_identities, users, webhook_events
from tests.conftest import Backend, Livegate, StartLivegate

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

SECRET = "whsec_" + base64.b64encode(b"livegate-clerk-webhook-test-key!").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"some-other-signing-secret-32byte").decode()
PATH = "/api/auth/webhook/clerk"
WAIT = 10  # seconds: the bound on every wait


# --- helpers ---------------------------------------------------------------------


@pytest.fixture
async def livegate(start_livegate: StartLivegate) -> Livegate:
    return await start_livegate(clerk_webhook_signing_secret=SECRET)


def sign(
    body: str,
    *,
    secret: str = SECRET,
    msg_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, str]:
    """The three Svix headers for `body`, signed by the svix library."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    at = at or datetime.now(UTC)
    return {
        "svix-id": msg_id,
        "svix-timestamp": str(int(at.timestamp())),
        "svix-signature": Webhook(secret).sign(msg_id, at, body),
    }


def clerk_user(
    clerk_id: str,
    *,
    email: str | None = None,
    first: str | None = "Aiko",
    last: str | None = "Tanaka",
    image: str | None = "https://img.clerk.test/a.png",
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A user object as Clerk sends it: the primary address is not the first one."""
    email = email or f"{uuid.uuid4().hex[:10]}@example.test"
    return {
        "id": clerk_id,
        "object": "user",
        "email_addresses": [
            {"id": "idn_secondary", "email_address": f"old-{email}"},
            {"id": "idn_primary", "email_address": email},
        ],
        "primary_email_address_id": "idn_primary",
        "first_name": first,
        "last_name": last,
        "image_url": image,
        "public_metadata": metadata or {},
        "created_at": 1_700_000_000_000,
    }


def event(event_type: str, data: dict[str, Any]) -> str:
    return json.dumps({"type": event_type, "object": "event", "data": data})


async def post(
    livegate: Livegate, body: str | bytes, headers: dict[str, str] | None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        return await http.post(
            PATH,
            content=body.encode() if isinstance(body, str) else body,
            headers={"content-type": "application/json", **(headers or {})},
        )


async def deliver(livegate: Livegate, body: str, **signing: Any) -> httpx.Response:
    return await post(livegate, body, sign(body, **signing))


def assert_processed(response: httpx.Response, outcome: str = "processed") -> None:
    assert response.status_code == 200, response.text
    assert response.json() == {"received": True, "outcome": outcome}


def assert_sokuji_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert body["details"]["code"] == code


async def linked_user(livegate: Livegate, clerk_id: str) -> sa.Row[Any] | None:
    async with livegate.services.engine.connect() as conn:
        return (
            await conn.execute(
                sa.select(users)
                .join(external_identities, external_identities.c.user_id == users.c.id)
                .where(
                    external_identities.c.provider == "clerk",
                    external_identities.c.subject == clerk_id,
                )
            )
        ).first()


def new_clerk_id() -> str:
    return f"user_{uuid.uuid4().hex[:24]}"


@asynccontextmanager
async def quota_socket(livegate: Livegate, token: str) -> AsyncIterator[ClientConnection]:
    async with connect(
        f"{livegate.ws_url}/ws/quota?deviceId=d1",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=WAIT,
    ) as ws:
        yield ws


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        message = await ws.recv()
    assert isinstance(message, str)
    decoded = json.loads(message)
    assert isinstance(decoded, dict)
    return decoded


# --- user.created / user.updated / user.deleted ----------------------------------


async def test_user_created_makes_a_linked_user(livegate: Livegate):
    clerk_id = new_clerk_id()
    data = clerk_user(clerk_id, email="Aiko.Tanaka@Example.test")
    assert_processed(await deliver(livegate, event("user.created", data)))

    user = await linked_user(livegate, clerk_id)
    assert user is not None
    assert user.email == "aiko.tanaka@example.test"  # the primary address, not the first
    assert (user.first_name, user.last_name) == ("Aiko", "Tanaka")
    assert user.image_url == "https://img.clerk.test/a.png"
    assert user.tier == "free"
    assert user.deleted_at is None
    assert user.password_hash is None

    # A token for that user opens the profile the webhook filled in.
    token = livegate.services.secrets.issue_token(user.id)
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        profile = await http.get("/api/user/profile", headers={"Authorization": f"Bearer {token}"})
    assert profile.status_code == 200, profile.text
    shown = profile.json()["user"]
    assert (shown["email"], shown["firstName"], shown["lastName"], shown["imageUrl"]) == (
        "aiko.tanaka@example.test",
        "Aiko",
        "Tanaka",
        "https://img.clerk.test/a.png",
    )


async def test_user_updated_changes_fields(livegate: Livegate):
    clerk_id = new_clerk_id()
    assert_processed(await deliver(livegate, event("user.created", clerk_user(clerk_id))))
    before = await linked_user(livegate, clerk_id)
    assert before is not None

    changed = clerk_user(
        clerk_id, email="renamed@example.test", first="Hana", last=None, image=None
    )
    changed["email_addresses"].append({"id": "idn_x", "email_address": "x@example.test"})
    assert_processed(await deliver(livegate, event("user.updated", changed)))
    after = await linked_user(livegate, clerk_id)
    assert after is not None
    assert after.id == before.id  # the same user, updated in place
    assert after.email == "renamed@example.test"
    assert (after.first_name, after.last_name, after.image_url) == ("Hana", None, None)
    assert after.updated_at >= before.updated_at
    async with livegate.services.engine.connect() as conn:
        count = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(external_identities)
                .where(external_identities.c.subject == clerk_id)
            )
        ).scalar_one()
    assert count == 1


async def test_user_updated_for_an_unseen_user_creates_it(livegate: Livegate):
    clerk_id = new_clerk_id()
    assert_processed(await deliver(livegate, event("user.updated", clerk_user(clerk_id))))
    assert await linked_user(livegate, clerk_id) is not None


async def test_tier_change_moves_the_user_and_pushes_the_quota_at_once(livegate: Livegate):
    clerk_id = new_clerk_id()
    assert_processed(await deliver(livegate, event("user.created", clerk_user(clerk_id))))
    user = await linked_user(livegate, clerk_id)
    assert user is not None and user.tier == "free"
    token = livegate.services.secrets.issue_token(user.id)

    async with quota_socket(livegate, token) as ws:
        first = await recv_json(ws)
        assert first["type"] == "quota"
        assert first["total"] == 1_000_000

        upgraded = clerk_user(clerk_id, metadata={"tier": "premium"})
        assert_processed(await deliver(livegate, event("user.updated", upgraded)))
        pushed = await recv_json(ws)
        assert pushed["type"] == "quota"
        assert pushed["total"] == 50_000_000
        assert pushed["remaining"] == 50_000_000 - pushed["used"]
        assert pushed["seq"] > first["seq"]

    moved = await linked_user(livegate, clerk_id)
    assert moved is not None and moved.tier == "premium"
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        profile = await http.get("/api/user/profile", headers={"Authorization": f"Bearer {token}"})
    assert profile.json()["user"]["subscription"] == "premium"
    assert profile.json()["quota"]["total"] == 50_000_000


async def test_subscription_metadata_and_unknown_tiers(livegate: Livegate):
    clerk_id = new_clerk_id()
    assert_processed(await deliver(livegate, event("user.created", clerk_user(clerk_id))))
    # `subscription` is read as well as `tier`.
    data = clerk_user(clerk_id, metadata={"subscription": "basic"})
    assert_processed(await deliver(livegate, event("user.updated", data)))
    user = await linked_user(livegate, clerk_id)
    assert user is not None and user.tier == "basic"
    # A tier that is not configured changes nothing.
    data = clerk_user(clerk_id, metadata={"tier": "platinum"})
    assert_processed(await deliver(livegate, event("user.updated", data)))
    user = await linked_user(livegate, clerk_id)
    assert user is not None and user.tier == "basic"


async def test_user_deleted_soft_deletes_and_revokes_keys(livegate: Livegate):
    clerk_id = new_clerk_id()
    assert_processed(await deliver(livegate, event("user.created", clerk_user(clerk_id))))
    user = await linked_user(livegate, clerk_id)
    assert user is not None
    token = livegate.services.secrets.issue_token(user.id)
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        auth = {"Authorization": f"Bearer {token}"}
        relay_key = (await http.get("/api/user/api-key", headers=auth)).json()["apiKey"]
        created = await http.post("/api/v1/api-keys", headers=auth, json={"name": "mine"})
        assert created.status_code == 201, created.text
        user_key = created.json()["data"]["api_key"]["key"]
        for key in (relay_key, user_key):
            models = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert models.status_code == 200

        deleted = {"id": clerk_id, "object": "user", "deleted": True}
        assert_processed(await deliver(livegate, event("user.deleted", deleted)))

        for key in (relay_key, user_key):
            refused = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "invalid_api_key"
        assert (await http.get("/api/user/profile", headers=auth)).status_code == 401

    row = await linked_user(livegate, clerk_id)
    assert row is not None
    assert row.deleted_at is not None  # soft: the row stays
    async with livegate.services.engine.connect() as conn:
        keys = list(await conn.execute(sa.select(api_keys).where(api_keys.c.user_id == user.id)))
    assert len(keys) == 2
    assert all(k.revoked_at is not None for k in keys)


async def test_user_deleted_for_an_unknown_user_is_acknowledged(livegate: Livegate):
    deleted = {"id": new_clerk_id(), "object": "user", "deleted": True}
    assert_processed(await deliver(livegate, event("user.deleted", deleted)))


async def test_other_event_types_are_ignored(livegate: Livegate):
    clerk_id = new_clerk_id()
    response = await deliver(livegate, event("session.created", {"id": clerk_id}))
    assert_processed(response, "ignored")
    assert await linked_user(livegate, clerk_id) is None


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "user.created", "data": {"first_name": "No id"}},
        {"type": "user.created", "data": "not an object"},
        {"type": "user.created"},
        [1, 2, 3],
        {"type": "user.created", "data": {"id": "u" * 256}},
    ],
    ids=["no-user-id", "data-not-object", "no-data", "not-an-object", "user-id-too-long"],
)
async def test_signed_but_malformed_events_are_400(livegate: Livegate, payload: Any):
    response = await deliver(livegate, json.dumps(payload))
    assert response.status_code == 400, response.text
    assert isinstance(response.json()["error"], str)


async def test_a_webhook_id_longer_than_its_column_is_400(livegate: Livegate):
    clerk_id = new_clerk_id()
    response = await deliver(
        livegate, event("user.created", clerk_user(clerk_id)), msg_id="m" * 256
    )
    assert response.status_code == 400, response.text
    assert "webhook id" in response.json()["error"]
    assert await linked_user(livegate, clerk_id) is None


@pytest.mark.parametrize(
    "addresses",
    [
        5,
        "someone@example.test",
        {"id": "idn_primary"},
        [{"email_address": "x" * 310 + "@example.test"}],
    ],
    ids=["number", "string", "object", "too-long"],
)
async def test_unusable_email_addresses_leave_a_placeholder(livegate: Livegate, addresses: Any):
    clerk_id = new_clerk_id()
    user = clerk_user(clerk_id)
    user["email_addresses"] = addresses
    assert_processed(await deliver(livegate, event("user.created", user)))
    created = await linked_user(livegate, clerk_id)
    assert created is not None
    assert created.email.endswith(".invalid")
    # An update with an unusable address keeps the one stored.
    kept = f"Kept-{uuid.uuid4().hex[:8]}@Example.TEST"
    usable = clerk_user(clerk_id, email=kept)
    assert_processed(await deliver(livegate, event("user.updated", usable)))
    assert_processed(await deliver(livegate, event("user.updated", user)))
    updated = await linked_user(livegate, clerk_id)
    assert updated is not None and updated.email == kept.lower()


async def test_a_failed_delivery_is_not_remembered_as_processed(livegate: Livegate):
    # A delivery that fails is forgotten, so that Clerk's retry (same svix-id) is applied.
    msg_id = f"msg_{uuid.uuid4().hex}"
    bad = event("user.created", {"first_name": "no id"})
    assert (await deliver(livegate, bad, msg_id=msg_id)).status_code == 400
    async with livegate.services.engine.connect() as conn:
        remembered = (
            await conn.execute(sa.select(webhook_events).where(webhook_events.c.event_id == msg_id))
        ).first()
    assert remembered is None


# --- refused deliveries -------------------------------------------------------------


def _tampered(body: str) -> tuple[str, dict[str, str]]:
    headers = sign(body)
    return body.replace("Aiko", "Mallory"), headers


def _wrong_secret(body: str) -> tuple[str, dict[str, str]]:
    return body, sign(body, secret=OTHER_SECRET)


def _stale(body: str) -> tuple[str, dict[str, str]]:
    return body, sign(body, at=datetime.now(UTC) - timedelta(minutes=5, seconds=30))


def _future(body: str) -> tuple[str, dict[str, str]]:
    return body, sign(body, at=datetime.now(UTC) + timedelta(minutes=5, seconds=30))


def _without(header: str) -> Callable[[str], tuple[str, dict[str, str]]]:
    def build(body: str) -> tuple[str, dict[str, str]]:
        headers = sign(body)
        headers.pop(header)
        return body, headers

    return build


def _no_headers(body: str) -> tuple[str, dict[str, str]]:
    return body, {}


def _other_id(body: str) -> tuple[str, dict[str, str]]:
    # A valid signature moved onto another message id.
    headers = sign(body)
    headers["svix-id"] = f"msg_{uuid.uuid4().hex}"
    return body, headers


def _unsigned_version(body: str) -> tuple[str, dict[str, str]]:
    headers = sign(body)
    headers["svix-signature"] = "v2," + headers["svix-signature"].split(",", 1)[1]
    return body, headers


REFUSALS = {
    "tampered-body": _tampered,
    "wrong-secret": _wrong_secret,
    "stale-timestamp": _stale,
    "future-timestamp": _future,
    "missing-svix-id": _without("svix-id"),
    "missing-svix-timestamp": _without("svix-timestamp"),
    "missing-svix-signature": _without("svix-signature"),
    "no-headers": _no_headers,
    "signature-of-another-id": _other_id,
    "unknown-signature-version": _unsigned_version,
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_bad_signatures_are_refused_with_400(livegate: Livegate, case: str):
    clerk_id = new_clerk_id()
    body, headers = REFUSALS[case](event("user.created", clerk_user(clerk_id)))
    response = await post(livegate, body, headers)
    assert_sokuji_error(response, 400, "invalid_signature")
    assert await linked_user(livegate, clerk_id) is None


MALFORMED_SIGNATURES = {
    "no-comma": "garbage",
    "bad-base64-padding": "v1,abc",
    "empty": "",
}


@pytest.mark.parametrize("case", sorted(MALFORMED_SIGNATURES))
async def test_malformed_signature_headers_are_400_not_500(livegate: Livegate, case: str):
    clerk_id = new_clerk_id()
    body = event("user.created", clerk_user(clerk_id))
    headers = sign(body)
    headers["svix-signature"] = MALFORMED_SIGNATURES[case]
    response = await post(livegate, body, headers)
    assert response.status_code == 400, response.text
    assert await linked_user(livegate, clerk_id) is None


async def test_non_utf8_body_is_400_not_500(livegate: Livegate):
    body = b'{"type": "user.created", "data": {"id": "\xff\xfe"}}'
    msg_id, at = f"msg_{uuid.uuid4().hex}", datetime.now(UTC)
    headers = {
        "svix-id": msg_id,
        "svix-timestamp": str(int(at.timestamp())),
        "svix-signature": Webhook(SECRET).sign(msg_id, at, "anything"),
    }
    response = await post(livegate, body, headers)
    assert response.status_code == 400, response.text


# --- replays -----------------------------------------------------------------------------


async def test_a_replayed_delivery_is_acknowledged_but_not_applied(livegate: Livegate):
    clerk_id = new_clerk_id()
    assert_processed(await deliver(livegate, event("user.created", clerk_user(clerk_id))))

    first_update = event("user.updated", clerk_user(clerk_id, first="First"))
    first_headers = sign(first_update)
    assert_processed(await post(livegate, first_update, first_headers))
    later_update = event("user.updated", clerk_user(clerk_id, first="Later"))
    assert_processed(await deliver(livegate, later_update))

    # The same delivery again (same svix-id, same signature, within the tolerance).
    replay = await post(livegate, first_update, first_headers)
    assert_processed(replay, "duplicate")
    user = await linked_user(livegate, clerk_id)
    assert user is not None
    assert user.first_name == "Later"  # not reverted by the replay


async def test_a_replayed_delete_after_recreation_does_not_delete_again(livegate: Livegate):
    clerk_id = new_clerk_id()
    assert_processed(await deliver(livegate, event("user.created", clerk_user(clerk_id))))
    user = await linked_user(livegate, clerk_id)
    assert user is not None
    deleted = event("user.deleted", {"id": clerk_id, "deleted": True})
    headers = sign(deleted)
    assert_processed(await post(livegate, deleted, headers))
    # Restore the user by hand; a replay of the delete must leave it alone.
    async with livegate.services.engine.begin() as conn:
        await conn.execute(users.update().where(users.c.id == user.id).values(deleted_at=None))
    assert_processed(await post(livegate, deleted, headers), "duplicate")
    restored = await linked_user(livegate, clerk_id)
    assert restored is not None and restored.deleted_at is None


async def test_concurrent_copies_of_one_delivery_apply_once(livegate: Livegate):
    clerk_id = new_clerk_id()
    body = event("user.created", clerk_user(clerk_id))
    headers = sign(body)
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        responses = await asyncio.gather(
            *(
                http.post(
                    PATH,
                    content=body.encode(),
                    headers={"content-type": "application/json", **headers},
                )
                for _ in range(5)
            )
        )
    outcomes = sorted(r.json()["outcome"] for r in responses if r.status_code == 200)
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert outcomes == ["duplicate"] * 4 + ["processed"]
    assert await linked_user(livegate, clerk_id) is not None


async def test_deliveries_with_standard_webhook_headers_are_each_applied(livegate: Livegate):
    ids = [new_clerk_id(), new_clerk_id()]
    for clerk_id in ids:
        body = event("user.created", clerk_user(clerk_id))
        headers = {k.replace("svix-", "webhook-"): v for k, v in sign(body).items()}
        assert_processed(await post(livegate, body, headers))
    for clerk_id in ids:
        assert await linked_user(livegate, clerk_id) is not None


# --- configuration and rate limits ---------------------------------------------------


async def test_without_a_secret_the_webhook_is_503(start_livegate: StartLivegate):
    livegate = await start_livegate()  # no CLERK_WEBHOOK_SIGNING_SECRET
    clerk_id = new_clerk_id()
    response = await deliver(livegate, event("user.created", clerk_user(clerk_id)))
    assert_sokuji_error(response, 503, "webhook_not_configured")
    assert await linked_user(livegate, clerk_id) is None


async def test_the_webhook_is_not_rate_limited(start_livegate: StartLivegate, backend: Backend):
    # One request a minute in every tier (anonymous callers' included): the webhook
    # must not count against it.
    strict = {
        name: tier.model_copy(update={"requests_per_minute": 1, "burst": 1, "surfaces": {}})
        for name, tier in _builtin_tiers().items()
    }
    livegate = await start_livegate(
        clerk_webhook_signing_secret=SECRET,
        tiers=strict,
        # A prefix of its own, so this strict limit on 127.0.0.1 stays in this test.
        server=ServerConfig(
            redis_prefix=f"{backend.redis_prefix}-{uuid.uuid4().hex[:6]}", ws_ping_seconds=30
        ),
    )
    clerk_ids = [new_clerk_id() for _ in range(6)]
    for clerk_id in clerk_ids:
        response = await deliver(livegate, event("user.created", clerk_user(clerk_id)))
        assert_processed(response)
        assert "X-RateLimit-Limit" not in response.headers
    for clerk_id in clerk_ids:
        assert await linked_user(livegate, clerk_id) is not None
    # Other anonymous calls are limited: the limit is real.
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        statuses = [
            (
                await http.post("/api/auth/login", json={"email": "a@b.test", "password": "x"})
            ).status_code
            for _ in range(3)
        ]
    assert 429 in statuses, statuses


async def test_an_account_registered_with_the_email_first_is_never_taken_over(
    livegate: Livegate,
):
    """Anyone may register an address they do not own: the Clerk identity of the real
    owner must not be handed to that account."""
    email = f"victim-{uuid.uuid4().hex[:8]}@example.test"
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        squatter = await http.post(
            "/api/auth/register",
            json={
                "username": f"evil{uuid.uuid4().hex[:8]}",
                "email": email,
                "password": "Passw0rdX",
            },
        )
    assert squatter.status_code == 201
    clerk_id = new_clerk_id()
    response = await deliver(livegate, event("user.created", clerk_user(clerk_id, email=email)))
    # Acknowledged, so Clerk does not retry forever, but not applied.
    assert_processed(response, "conflict")
    assert await linked_user(livegate, clerk_id) is None


async def test_a_passwordless_account_with_the_email_is_linked(livegate: Livegate):
    email = f"quiet-{uuid.uuid4().hex[:8]}@example.test"
    existing = await livegate.account(email=email)  # no password, no identity
    clerk_id = new_clerk_id()
    assert_processed(
        await deliver(livegate, event("user.created", clerk_user(clerk_id, email=email)))
    )
    linked = await linked_user(livegate, clerk_id)
    assert linked is not None and linked.id == existing.user.id
