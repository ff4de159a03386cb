"""Sokuji's user routes (`/api/user/profile`, `/api/user/api-key`) and authentication."""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa

from app.core.security import Secrets
from app.core.tables import api_keys, users
from app.core.users import create_user
from tests.conftest import FAKE_MODEL, Livegate

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
PROTECTED = ["/api/user/profile", "/api/user/api-key", "/api/usage/quota"]


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def get(livegate: Livegate, path: str, headers: dict[str, str] | None = None):
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        return await http.get(path, headers=headers or {})


async def key_rows(livegate: Livegate, user_id: str) -> list[sa.Row]:
    async with livegate.services.engine.connect() as conn:
        result = await conn.execute(sa.select(api_keys).where(api_keys.c.user_id == user_id))
        return list(result)


async def new_user_token(livegate: Livegate, **fields: Any) -> tuple[str, str]:
    """A user with no relay key yet: (user id, JWT)."""
    user = await create_user(
        livegate.services.engine,
        email=f"{uuid.uuid4().hex[:10]}@example.test",
        password=None,
        tier=fields.pop("tier", "free"),
        **fields,
    )
    return user.id, livegate.services.secrets.issue_token(user.id)


def assert_sokuji_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body.get("details", {}), dict)
    return body  # type: ignore[no-any-return]


# --- /api/user/api-key ------------------------------------------------------------


async def test_api_key_is_created_once_and_returned_again(livegate: Livegate):
    user_id, token = await new_user_token(livegate)
    assert await key_rows(livegate, user_id) == []
    first = await get(livegate, "/api/user/api-key", bearer(token))
    assert first.status_code == 200, first.text
    body = first.json()
    assert set(body) == {"apiKey", "provider"}
    assert body["provider"] == "kizunaai"
    assert body["apiKey"].startswith("sk-lg-")
    for _ in range(3):
        again = await get(livegate, "/api/user/api-key", bearer(token))
        assert again.status_code == 200
        assert again.json() == body
    # A new token for the same user sees the same key too.
    other_token = livegate.services.secrets.issue_token(user_id)
    assert (await get(livegate, "/api/user/api-key", bearer(other_token))).json() == body
    assert len(await key_rows(livegate, user_id)) == 1


async def test_concurrent_first_calls_return_one_key(livegate: Livegate):
    # An unlimited tier, so the burst is not cut short by a rate limit.
    user_id, token = await new_user_token(livegate, tier="enterprise")
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=60) as http:
        responses = await asyncio.gather(
            *(http.get("/api/user/api-key", headers=bearer(token)) for _ in range(20))
        )
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    keys = {r.json()["apiKey"] for r in responses}
    assert len(keys) == 1
    rows = await key_rows(livegate, user_id)
    assert len(rows) == 1
    assert rows[0].key_hash == hashlib.sha256(keys.pop().encode()).hexdigest()


async def test_different_users_get_different_keys(livegate: Livegate):
    _, token_a = await new_user_token(livegate)
    _, token_b = await new_user_token(livegate)
    key_a = (await get(livegate, "/api/user/api-key", bearer(token_a))).json()["apiKey"]
    key_b = (await get(livegate, "/api/user/api-key", bearer(token_b))).json()["apiKey"]
    assert key_a != key_b


async def test_relay_key_authenticates_v1_and_quota(livegate: Livegate):
    user_id, token = await new_user_token(livegate)
    key = (await get(livegate, "/api/user/api-key", bearer(token))).json()["apiKey"]

    models = await get(livegate, "/v1/models", bearer(key))
    assert models.status_code == 200, models.text
    assert models.json()["object"] == "list"
    assert [m["id"] for m in models.json()["data"]] == [FAKE_MODEL]

    quota = await get(livegate, "/api/usage/quota", bearer(key))
    assert quota.status_code == 200, quota.text
    assert quota.json()["total"] == livegate.settings.tiers["free"].monthly_tokens
    assert quota.json()["used"] == 0

    # The key resolves to its owner: the profile it opens is this user's.
    profile = await get(livegate, "/api/user/profile", bearer(key))
    assert profile.json()["user"]["id"] == user_id


async def test_stored_key_has_no_plaintext(livegate: Livegate):
    user_id, token = await new_user_token(livegate)
    key = (await get(livegate, "/api/user/api-key", bearer(token))).json()["apiKey"]
    [row] = await key_rows(livegate, user_id)
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert row.key_mask == key[:7] + "..." + key[-4:]
    assert row.key_ciphertext is not None
    assert row.key_ciphertext != key
    assert key not in row.key_ciphertext
    assert key.removeprefix("sk-lg-") not in row.key_ciphertext
    assert row.revoked_at is None
    assert row.kind == "relay"
    # No column of the row holds the key in clear.
    assert all(key not in str(value) for value in row)
    # The ciphertext opens only with the server secret.
    assert livegate.services.secrets.decrypt(row.key_ciphertext) == key
    with pytest.raises(RuntimeError):
        Secrets("some-other-secret-" + "z" * 40).decrypt(row.key_ciphertext)


async def test_revoked_relay_key_is_replaced_by_a_new_one(livegate: Livegate):
    account = await livegate.account()
    async with livegate.services.engine.begin() as conn:
        await conn.execute(
            api_keys.update()
            .where(api_keys.c.user_id == account.user.id)
            .values(revoked_at=datetime.now(UTC))
        )
    fresh = await get(livegate, "/api/user/api-key", bearer(account.token))
    assert fresh.status_code == 200
    new_key = fresh.json()["apiKey"]
    assert new_key.startswith("sk-lg-") and new_key != account.api_key
    assert (await get(livegate, "/v1/models", bearer(new_key))).status_code == 200
    assert (await get(livegate, "/v1/models", bearer(account.api_key))).status_code == 401


# --- /api/user/profile ------------------------------------------------------------


async def test_profile_shape(livegate: Livegate):
    user_id, token = await new_user_token(
        livegate, tier="premium", first_name="Aiko", last_name="Tanaka"
    )
    response = await get(livegate, "/api/user/profile", bearer(token))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"user", "quota"}
    user = body["user"]
    assert set(user) == {
        "id",
        "email",
        "firstName",
        "lastName",
        "imageUrl",
        "subscription",
        "createdAt",
        "updatedAt",
    }
    assert user["id"] == user_id
    assert user["email"].endswith("@example.test")
    assert (user["firstName"], user["lastName"], user["imageUrl"]) == ("Aiko", "Tanaka", None)
    assert user["subscription"] == "premium"
    assert ISO_Z.match(user["createdAt"]) and ISO_Z.match(user["updatedAt"])
    created = datetime.strptime(user["createdAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=5)

    quota = body["quota"]
    assert set(quota) == {"total", "used", "remaining", "resetDate"}
    assert quota["total"] == 50_000_000
    assert quota["used"] == 0
    assert quota["remaining"] == quota["total"] - quota["used"]
    assert ISO_Z.match(quota["resetDate"])
    reset = datetime.strptime(quota["resetDate"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert reset.day == 1 and reset.hour == 0 and reset > datetime.now(UTC)
    assert reset - datetime.now(UTC) <= timedelta(days=32)

    # /api/usage/quota reports the same quota.
    assert (await get(livegate, "/api/usage/quota", bearer(token))).json() == quota


async def test_profile_never_leaks_secrets(livegate: Livegate):
    account = await livegate.account()
    response = await get(livegate, "/api/user/profile", bearer(account.token))
    assert account.api_key not in response.text
    assert "password" not in response.text.lower()


# --- Refused credentials ------------------------------------------------------------


@pytest.mark.parametrize("path", PROTECTED)
async def test_missing_token_is_401(livegate: Livegate, path: str):
    body = assert_sokuji_error(await get(livegate, path), 401)
    assert body["details"]["code"] == "missing_token"


@pytest.mark.parametrize("path", PROTECTED)
@pytest.mark.parametrize(
    "header",
    [
        "Bearer not-a-jwt",
        "Bearer a.b.c",
        "Bearer sk-lg-doesnotexist",
        "Basic dXNlcjpwYXNz",
        "Bearer",
    ],
    ids=["garbage", "dotted", "unknown-key", "basic-scheme", "empty-bearer"],
)
async def test_invalid_credential_is_401(livegate: Livegate, path: str, header: str):
    assert_sokuji_error(await get(livegate, path, {"Authorization": header}), 401)


@pytest.mark.parametrize("path", PROTECTED)
async def test_expired_token_is_401(livegate: Livegate, path: str):
    account = await livegate.account()
    stale = livegate.services.secrets.issue_token(
        account.user.id, now=datetime.now(UTC) - timedelta(hours=25)
    )
    body = assert_sokuji_error(await get(livegate, path, bearer(stale)), 401)
    assert body["details"]["code"] == "invalid_token"


async def test_token_from_another_secret_is_401(livegate: Livegate):
    account = await livegate.account()
    forged = Secrets("attacker-secret-" + "a" * 40).issue_token(account.user.id)
    assert_sokuji_error(await get(livegate, "/api/user/profile", bearer(forged)), 401)


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "\ud800"},
        {"sub": "a\x00b"},
        {"exp": 1e20},
        {"iat": -1e12},
        {"exp": "99999999999"},
    ],
    ids=["sub-surrogate", "sub-nul", "exp-past-any-date", "iat-before-any-date", "exp-string"],
)
@pytest.mark.parametrize("path", ["/api/user/profile", "/api/usage/quota"])
async def test_a_signed_token_whose_claims_no_lookup_takes_is_401(
    livegate: Livegate, claims: dict[str, Any], path: str
):
    """Only a holder of the secret can sign one; still a 401, on every database."""
    account = await livegate.account()
    now = datetime.now(UTC).timestamp()
    payload = {
        "sub": account.user.id,
        "iat": now,
        "exp": now + 3600,
        "jti": uuid.uuid4().hex,
        "iss": "livegate",
        **claims,
    }
    secret = livegate.services.settings.jwt_secret
    assert secret is not None
    token = jwt.encode(payload, secret.get_secret_value(), algorithm="HS256")
    body = assert_sokuji_error(await get(livegate, path, bearer(token)), 401)
    assert body["details"]["code"] == "invalid_token"


async def test_token_for_an_unknown_user_is_401(livegate: Livegate):
    token = livegate.services.secrets.issue_token(uuid.uuid4().hex)
    assert_sokuji_error(await get(livegate, "/api/user/profile", bearer(token)), 401)


async def test_invalid_key_on_v1_is_401_in_openai_envelope(livegate: Livegate):
    response = await get(livegate, "/v1/models", bearer("sk-lg-doesnotexist"))
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"


async def test_soft_deleted_user_is_refused_on_the_next_request(livegate: Livegate):
    account = await livegate.account()
    assert (await get(livegate, "/v1/models", bearer(account.api_key))).status_code == 200
    assert (await get(livegate, "/api/user/profile", bearer(account.token))).status_code == 200
    async with livegate.services.engine.begin() as conn:
        await conn.execute(
            users.update().where(users.c.id == account.user.id).values(deleted_at=datetime.now(UTC))
        )
    refused = await get(livegate, "/v1/models", bearer(account.api_key))
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    assert_sokuji_error(await get(livegate, "/api/usage/quota", bearer(account.api_key)), 401)
    assert_sokuji_error(await get(livegate, "/api/user/profile", bearer(account.token)), 401)
    assert_sokuji_error(await get(livegate, "/api/user/api-key", bearer(account.token)), 401)


async def test_revoked_key_is_refused_on_the_next_request(livegate: Livegate):
    account = await livegate.account()
    assert (await get(livegate, "/api/usage/quota", bearer(account.api_key))).status_code == 200
    async with livegate.services.engine.begin() as conn:
        await conn.execute(
            api_keys.update()
            .where(api_keys.c.user_id == account.user.id)
            .values(revoked_at=datetime.now(UTC))
        )
    refused = await get(livegate, "/v1/models", bearer(account.api_key))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    body = assert_sokuji_error(
        await get(livegate, "/api/usage/quota", bearer(account.api_key)), 401
    )
    assert body["details"]["code"] == "invalid_api_key"
    # The user's JWT still works: only the key was revoked.
    assert (await get(livegate, "/api/user/profile", bearer(account.token))).status_code == 200


async def test_expired_key_is_refused(livegate: Livegate):
    account = await livegate.account()
    async with livegate.services.engine.begin() as conn:
        await conn.execute(
            api_keys.update()
            .where(api_keys.c.user_id == account.user.id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert (await get(livegate, "/v1/models", bearer(account.api_key))).status_code == 401
