"""The Playground's `/api/v1/api-keys`: scoped keys shown once, listed masked, revoked at once.

Also how every route checks the permission it needs when called with a key.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from app.core.tables import api_keys
from tests.conftest import FAKE_MODEL, Account, Livegate
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
KEY_SHAPE = {"id", "name", "key", "permissions", "created_at", "expires_at", "last_used"}
HI = [{"role": "user", "content": "hi"}]
WAIT = 10  # seconds: the bound on every wait for something the server does later


# --- helpers ---------------------------------------------------------------------


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def parse_ms(value: str) -> datetime:
    assert ISO_MS.match(value), value
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def mask(key: str) -> str:
    return f"{key[:7]}...{key[-4:]}"


async def call(
    livegate: Livegate,
    method: str,
    path: str,
    credential: str | None = None,
    *,
    json: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    all_headers = {**(bearer(credential) if credential else {}), **(headers or {})}
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        return await http.request(method, path, json=json, headers=all_headers)


async def create_key(livegate: Livegate, credential: str, **body: Any) -> dict[str, Any]:
    body.setdefault("name", "My Application")
    response = await call(livegate, "POST", "/api/v1/api-keys", credential, json=body)
    assert response.status_code == 201, response.text
    return response.json()["data"]["api_key"]  # type: ignore[no-any-return]


async def key_row(livegate: Livegate, key_id: str) -> sa.Row[Any]:
    async with livegate.services.engine.connect() as conn:
        return (await conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id))).one()


def assert_playground_ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is True
    assert ISO_MS.match(body["timestamp"])
    return body  # type: ignore[no-any-return]


def assert_playground_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"success", "error", "timestamp"}, body
    assert body["success"] is False
    assert set(body["error"]) == {"message", "code", "details"}
    assert body["error"]["code"] == code
    return body["error"]  # type: ignore[no-any-return]


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    return body["error"]  # type: ignore[no-any-return]


async def models(livegate: Livegate, key: str, *, header: str = "Authorization") -> httpx.Response:
    value = f"Bearer {key}" if header == "Authorization" else key
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        return await http.get("/v1/models", headers={header: value})


async def chat(livegate: Livegate, key: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        return await http.post(
            "/v1/chat/completions",
            headers=bearer(key),
            json={"model": FAKE_MODEL, "messages": HI},
        )


# --- create ------------------------------------------------------------------------


async def test_create_shows_the_key_once(livegate: Livegate):
    account = await livegate.account()
    response = await call(
        livegate,
        "POST",
        "/api/v1/api-keys",
        account.token,
        json={"name": "My Application", "permissions": ["ai:read", "ai:write", "usage:read"]},
    )
    body = assert_playground_ok(response, 201)
    assert body["message"] == "API key created successfully"
    assert set(body["data"]) == {"api_key"}
    created = body["data"]["api_key"]
    assert set(created) == KEY_SHAPE
    key = created["key"]
    assert key.startswith("sk-lg-") and len(key) > 30
    assert created["name"] == "My Application"
    assert sorted(created["permissions"]) == ["ai:read", "ai:write", "usage:read"]
    assert created["last_used"] is None
    created_at = parse_ms(created["created_at"])
    assert abs(datetime.now(UTC) - created_at) < timedelta(minutes=5)
    # expires_in defaults to 90 days.
    assert parse_ms(created["expires_at"]) - created_at == timedelta(days=90)

    # The key works at once.
    assert (await models(livegate, key)).status_code == 200

    # Only its hash and mask are stored.
    row = await key_row(livegate, created["id"])
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert row.key_mask == mask(key)
    assert row.key_ciphertext is None
    assert row.kind == "user"
    assert all(key not in str(value) for value in row)

    # It is never shown again: not in the list, not in the detail, not in /me.
    for path in ("/api/v1/api-keys", f"/api/v1/api-keys/{created['id']}", "/api/auth/me"):
        again = await call(livegate, "GET", path, account.token)
        assert again.status_code == 200, again.text
        assert key not in again.text, path
        assert mask(key) in again.text, path


async def test_create_with_custom_expiry_and_default_permissions(livegate: Livegate):
    account = await livegate.account()
    created = await create_key(livegate, account.token, name="Thirty days", expires_in=30)
    assert parse_ms(created["expires_at"]) - parse_ms(created["created_at"]) == timedelta(days=30)
    assert sorted(created["permissions"]) == ["ai:read", "ai:write", "usage:read"]
    longest = await create_key(livegate, account.token, name="Longest", expires_in=3650)
    assert parse_ms(longest["expires_at"]) - parse_ms(longest["created_at"]) == timedelta(days=3650)


async def test_each_key_is_new(livegate: Livegate):
    account = await livegate.account()
    keys = [await create_key(livegate, account.token, name=f"k{i}") for i in range(3)]
    assert len({k["key"] for k in keys}) == 3
    assert len({k["id"] for k in keys}) == 3
    assert account.api_key not in {k["key"] for k in keys}


INVALID_CREATES: dict[str, tuple[dict[str, Any], str]] = {
    "expires-zero": ({"expires_in": 0}, "expires_in"),
    "expires-negative": ({"expires_in": -5}, "expires_in"),
    "expires-too-far": ({"expires_in": 3651}, "expires_in"),
    "expires-string": ({"expires_in": "30"}, "expires_in"),
    "expires-fraction": ({"expires_in": 30.5}, "expires_in"),
    "expires-bool": ({"expires_in": True}, "expires_in"),
    "permission-unknown": ({"permissions": ["ai:read", "ai:admin"]}, "permissions"),
    "permissions-empty": ({"permissions": []}, "permissions"),
    "permissions-string": ({"permissions": "ai:read"}, "permissions"),
    "permissions-numbers": ({"permissions": [1, 2]}, "permissions"),
    "permissions-null": ({"permissions": None}, "permissions"),
    "name-empty": ({"name": ""}, "name"),
    "name-blank": ({"name": "   "}, "name"),
    "name-missing": ({"name": None}, "name"),
    "name-number": ({"name": 7}, "name"),
    "name-too-long": ({"name": "x" * 201}, "name"),
}


@pytest.mark.parametrize("case", sorted(INVALID_CREATES))
async def test_invalid_create_is_400(livegate: Livegate, case: str):
    account = await livegate.account()
    change, field = INVALID_CREATES[case]
    body: dict[str, Any] = {"name": "ok", **change}
    if case == "name-missing":
        body.pop("name")
    response = await call(livegate, "POST", "/api/v1/api-keys", account.token, json=body)
    error = assert_playground_error(response, 400, "VALIDATION_ERROR")
    assert error["details"]["field"] == field
    listed = await call(livegate, "GET", "/api/v1/api-keys", account.token)
    assert listed.json()["data"]["api_keys"] == []


# --- list and detail -----------------------------------------------------------------


async def test_list_is_masked_own_and_without_the_relay_key(livegate: Livegate):
    account = await livegate.account()  # has a relay key already
    other = await livegate.account()
    await create_key(livegate, other.token, name="not yours")
    first = await create_key(livegate, account.token, name="first")
    second = await create_key(livegate, account.token, name="second", permissions=["ai:read"])

    response = await call(livegate, "GET", "/api/v1/api-keys", account.token)
    body = assert_playground_ok(response)
    listed = body["data"]["api_keys"]
    assert [k["id"] for k in listed] == [second["id"], first["id"]]  # newest first
    for entry, created in zip(listed, (second, first), strict=True):
        assert set(entry) == KEY_SHAPE
        assert entry["key"] == mask(created["key"])
        assert len(entry["key"]) == 7 + 3 + 4
        assert entry["key"].startswith("sk-lg-")
        for field in ("name", "permissions", "created_at", "expires_at"):
            assert entry[field] == created[field]
    assert first["key"] not in response.text and second["key"] not in response.text
    # Sokuji's relay key is not one of these keys, neither in full nor masked.
    assert account.api_key not in response.text
    assert mask(account.api_key) not in response.text
    assert "not yours" not in response.text


async def test_detail_counts_usage_flushed_on_demand(livegate: Livegate):
    account = await livegate.account()
    created = await create_key(livegate, account.token)
    path = f"/api/v1/api-keys/{created['id']}"

    fresh = assert_playground_ok(await call(livegate, "GET", path, account.token))
    detail = fresh["data"]["api_key"]
    assert set(detail) == (KEY_SHAPE | {"usage_count"})
    assert (detail["usage_count"], detail["last_used"]) == (0, None)
    assert detail["key"] == mask(created["key"])

    before = datetime.now(UTC) - timedelta(seconds=1)
    for header in ("Authorization", "X-API-Key", "Authorization"):
        assert (await models(livegate, created["key"], header=header)).status_code == 200
    await livegate.services.key_usage.flush()
    detail = assert_playground_ok(await call(livegate, "GET", path, account.token))["data"][
        "api_key"
    ]
    assert detail["usage_count"] == 3
    last_used = parse_ms(detail["last_used"])
    assert before <= last_used <= datetime.now(UTC) + timedelta(seconds=1)
    # The list shows last_used as well.
    listed = (await call(livegate, "GET", "/api/v1/api-keys", account.token)).json()
    assert listed["data"]["api_keys"][0]["last_used"] == detail["last_used"]


async def test_usage_reaches_the_database_without_help(livegate: Livegate):
    account = await livegate.account()
    created = await create_key(livegate, account.token)
    for _ in range(2):
        assert (await models(livegate, created["key"])).status_code == 200
    # The recorder writes its batch every 2 s on its own.
    path = f"/api/v1/api-keys/{created['id']}"
    detail: dict[str, Any] = {}
    async with asyncio.timeout(WAIT):
        while True:
            response = await call(livegate, "GET", path, account.token)
            detail = response.json()["data"]["api_key"]
            if detail["usage_count"] == 2:
                break
            assert detail["usage_count"] < 2, detail
            await asyncio.sleep(0.1)
    assert detail["last_used"] is not None


async def test_a_flush_cancelled_midway_keeps_its_counts(livegate: Livegate):
    # As at shutdown, when the flusher is cancelled in the middle of a write.
    account = await livegate.account()
    created = await create_key(livegate, account.token)
    for _ in range(3):
        assert (await models(livegate, created["key"])).status_code == 200
    recorder = livegate.services.key_usage
    flushing = asyncio.create_task(recorder.flush())
    await asyncio.sleep(0)  # the batch is taken, its write under way
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    await recorder.flush()
    path = f"/api/v1/api-keys/{created['id']}"
    detail = (await call(livegate, "GET", path, account.token)).json()["data"]["api_key"]
    assert detail["usage_count"] == 3


# --- update --------------------------------------------------------------------------


async def test_update_name_and_permissions(livegate: Livegate):
    account = await livegate.account()
    created = await create_key(livegate, account.token)
    path = f"/api/v1/api-keys/{created['id']}"
    response = await call(
        livegate,
        "PUT",
        path,
        account.token,
        json={"name": "Renamed", "permissions": ["usage:read", "webhooks:write"]},
    )
    body = assert_playground_ok(response)
    assert body["message"] == "API key updated successfully"
    updated = body["data"]["api_key"]
    assert set(updated) == {"id", "name", "permissions", "updated_at"}
    assert updated["id"] == created["id"]
    assert updated["name"] == "Renamed"
    assert sorted(updated["permissions"]) == ["usage:read", "webhooks:write"]
    assert parse_ms(updated["updated_at"]) >= parse_ms(created["created_at"])

    detail = (await call(livegate, "GET", path, account.token)).json()["data"]["api_key"]
    assert (detail["name"], sorted(detail["permissions"])) == (
        "Renamed",
        ["usage:read", "webhooks:write"],
    )
    # The new permissions hold from the next request: ai:read is gone.
    assert_openai_error(await models(livegate, created["key"]), 403, "missing_permission")
    quota = await call(livegate, "GET", "/api/usage/quota", created["key"])
    assert quota.status_code == 200

    # One field at a time leaves the other alone.
    only_name = await call(livegate, "PUT", path, account.token, json={"name": "Only name"})
    assert sorted(assert_playground_ok(only_name)["data"]["api_key"]["permissions"]) == [
        "usage:read",
        "webhooks:write",
    ]
    only_perms = await call(livegate, "PUT", path, account.token, json={"permissions": ["ai:read"]})
    assert assert_playground_ok(only_perms)["data"]["api_key"]["name"] == "Only name"
    assert (await models(livegate, created["key"])).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, None),
        ({"name": ""}, "name"),
        ({"permissions": ["root"]}, "permissions"),
        ({"permissions": []}, "permissions"),
        ({"name": "ok", "permissions": "ai:read"}, "permissions"),
    ],
    ids=["empty", "blank-name", "unknown-permission", "no-permissions", "permissions-string"],
)
async def test_invalid_update_is_400_and_changes_nothing(
    livegate: Livegate, body: dict[str, Any], field: str | None
):
    account = await livegate.account()
    created = await create_key(livegate, account.token, name="keep", permissions=["ai:read"])
    path = f"/api/v1/api-keys/{created['id']}"
    error = assert_playground_error(
        await call(livegate, "PUT", path, account.token, json=body), 400, "VALIDATION_ERROR"
    )
    if field is not None:
        assert error["details"]["field"] == field
    detail = (await call(livegate, "GET", path, account.token)).json()["data"]["api_key"]
    assert (detail["name"], detail["permissions"]) == ("keep", ["ai:read"])


# --- delete ----------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
async def test_delete_refuses_the_key_on_the_next_request(livegate: Livegate, header: str):
    account = await livegate.account()
    created = await create_key(livegate, account.token)
    keep = await create_key(livegate, account.token, name="kept")
    key = created["key"]
    assert (await models(livegate, key, header=header)).status_code == 200

    path = f"/api/v1/api-keys/{created['id']}"
    response = await call(livegate, "DELETE", path, account.token)
    body = assert_playground_ok(response)
    assert body["message"] == "API key deleted successfully"

    # Refused at once, however it is presented and wherever.
    for how in ("Authorization", "X-API-Key"):
        refused = await models(livegate, key, header=how)
        assert_openai_error(refused, 401, "invalid_api_key")
    quota = await call(livegate, "GET", "/api/usage/quota", key)
    assert quota.status_code == 401
    me = await call(livegate, "GET", "/api/auth/me", key)
    assert_playground_error(me, 401, "AUTHENTICATION_ERROR")

    # Soft delete: the row stays, with its revocation time.
    row = await key_row(livegate, created["id"])
    assert row.revoked_at is not None
    assert abs(datetime.now(UTC) - row.revoked_at) < timedelta(minutes=5)
    # Gone from the API.
    assert_playground_error(await call(livegate, "GET", path, account.token), 404, "NOT_FOUND")
    assert_playground_error(await call(livegate, "DELETE", path, account.token), 404, "NOT_FOUND")
    assert_playground_error(
        await call(livegate, "PUT", path, account.token, json={"name": "back"}), 404, "NOT_FOUND"
    )
    listed = (await call(livegate, "GET", "/api/v1/api-keys", account.token)).json()
    assert [k["id"] for k in listed["data"]["api_keys"]] == [keep["id"]]
    # The other key and the user's session are untouched.
    assert (await models(livegate, keep["key"])).status_code == 200
    assert (await call(livegate, "GET", "/api/auth/me", account.token)).status_code == 200


async def test_a_key_can_delete_itself_and_is_refused_after(livegate: Livegate):
    account = await livegate.account()
    created = await create_key(livegate, account.token, permissions=["keys:write", "ai:read"])
    path = f"/api/v1/api-keys/{created['id']}"
    assert (await call(livegate, "DELETE", path, created["key"])).status_code == 200
    assert_openai_error(await models(livegate, created["key"]), 401, "invalid_api_key")


# --- permissions -------------------------------------------------------------------------


async def test_read_only_ai_key_cannot_chat_but_lists_models(
    livegate: Livegate, fake_upstream: FakeUpstream
):
    account = await livegate.account()
    created = await create_key(livegate, account.token, permissions=["ai:read"])
    refused = await chat(livegate, created["key"])
    error = assert_openai_error(refused, 403, "missing_permission")
    assert error["type"] == "permission_error"
    assert "ai:write" in error["message"]
    assert fake_upstream.requests == []  # refused before the upstream
    listed = await models(livegate, created["key"])
    assert listed.status_code == 200
    assert [m["id"] for m in listed.json()["data"]] == [FAKE_MODEL]
    # A key with ai:write chats.
    writer = await create_key(livegate, account.token, permissions=["ai:write"])
    assert (await chat(livegate, writer["key"])).status_code == 200
    assert len(fake_upstream.requests) == 1
    assert_openai_error(await models(livegate, writer["key"]), 403, "missing_permission")


async def test_usage_read_is_needed_for_quota_reads(livegate: Livegate):
    account = await livegate.account()
    no_usage = await create_key(livegate, account.token, permissions=["ai:read", "ai:write"])
    refused = await call(livegate, "GET", "/api/usage/quota", no_usage["key"])
    assert refused.status_code == 403, refused.text
    assert refused.json()["details"]["code"] == "missing_permission"
    assert isinstance(refused.json()["error"], str)
    me = await call(livegate, "GET", "/api/auth/me", no_usage["key"])
    assert_playground_error(me, 403, "AUTHORIZATION_ERROR")

    usage = await create_key(livegate, account.token, permissions=["usage:read"])
    assert (await call(livegate, "GET", "/api/usage/quota", usage["key"])).status_code == 200
    assert (await call(livegate, "GET", "/api/auth/me", usage["key"])).status_code == 200


async def test_keys_permissions_guard_key_management(livegate: Livegate):
    account = await livegate.account()
    ai_only = await create_key(livegate, account.token, permissions=["ai:read", "ai:write"])
    target = await create_key(livegate, account.token, name="target")
    path = f"/api/v1/api-keys/{target['id']}"
    for method, url, body in (
        ("POST", "/api/v1/api-keys", {"name": "minted"}),
        ("GET", "/api/v1/api-keys", None),
        ("GET", path, None),
        ("PUT", path, {"name": "hijacked"}),
        ("DELETE", path, None),
    ):
        response = await call(livegate, method, url, ai_only["key"], json=body)
        error = assert_playground_error(response, 403, "AUTHORIZATION_ERROR")
        assert error["details"]["reason"] == "missing_permission"
    detail = (await call(livegate, "GET", path, account.token)).json()["data"]["api_key"]
    assert detail["name"] == "target"
    listed = (await call(livegate, "GET", "/api/v1/api-keys", account.token)).json()
    assert len(listed["data"]["api_keys"]) == 2  # nothing minted, nothing deleted

    reader = await create_key(livegate, account.token, permissions=["keys:read"])
    assert (await call(livegate, "GET", "/api/v1/api-keys", reader["key"])).status_code == 200
    assert (await call(livegate, "GET", path, reader["key"])).status_code == 200
    minted = await call(
        livegate, "POST", "/api/v1/api-keys", reader["key"], json={"name": "minted"}
    )
    assert_playground_error(minted, 403, "AUTHORIZATION_ERROR")

    writer = await create_key(livegate, account.token, permissions=["keys:write", "ai:read"])
    new = await call(
        livegate,
        "POST",
        "/api/v1/api-keys",
        writer["key"],
        json={"name": "minted", "permissions": ["ai:read"]},
    )
    assert new.status_code == 201, new.text
    assert (await models(livegate, new.json()["data"]["api_key"]["key"])).status_code == 200


async def test_a_key_cannot_grant_more_than_it_holds(livegate: Livegate):
    account = await livegate.account()
    manager = await create_key(livegate, account.token, permissions=["keys:write", "keys:read"])
    minted = await call(
        livegate,
        "POST",
        "/api/v1/api-keys",
        manager["key"],
        json={"name": "wider", "permissions": ["ai:write", "usage:read"]},
    )
    widened = await call(
        livegate,
        "PUT",
        f"/api/v1/api-keys/{manager['id']}",
        manager["key"],
        json={"permissions": ["keys:write", "keys:read", "ai:write"]},
    )
    assert minted.status_code == 403, minted.text
    assert widened.status_code == 403, widened.text


async def test_a_key_cannot_create_a_key_that_outlives_it(livegate: Livegate):
    account = await livegate.account()
    manager = await create_key(livegate, account.token, permissions=["keys:write"], expires_in=2)
    ends = parse_ms(manager["expires_at"])
    for body in ({}, {"expires_in": 3650}):
        minted = await create_key(livegate, manager["key"], permissions=["keys:write"], **body)
        assert parse_ms(minted["expires_at"]) == ends
        # Nor can a key it made, in turn.
        grandchild = await create_key(livegate, minted["key"], permissions=["keys:write"])
        assert parse_ms(grandchild["expires_at"]) == ends
    sooner = await create_key(livegate, manager["key"], permissions=["keys:write"], expires_in=1)
    assert parse_ms(sooner["expires_at"]) - parse_ms(sooner["created_at"]) == timedelta(days=1)


async def test_expired_key_is_401(livegate: Livegate):
    account = await livegate.account()
    created = await create_key(livegate, account.token, expires_in=1)
    assert (await models(livegate, created["key"])).status_code == 200
    async with livegate.services.engine.begin() as conn:
        await conn.execute(
            api_keys.update()
            .where(api_keys.c.id == created["id"])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert_openai_error(await models(livegate, created["key"]), 401, "invalid_api_key")
    assert (await call(livegate, "GET", "/api/usage/quota", created["key"])).status_code == 401
    assert_playground_error(
        await call(livegate, "GET", "/api/auth/me", created["key"]), 401, "AUTHENTICATION_ERROR"
    )


async def test_session_and_relay_key_manage_keys_but_unknown_keys_do_not(livegate: Livegate):
    account: Account = await livegate.account()
    # The relay key carries ai:* and usage:read only: no key management.
    relay = await call(livegate, "GET", "/api/v1/api-keys", account.api_key)
    assert_playground_error(relay, 403, "AUTHORIZATION_ERROR")
    unknown = await call(livegate, "GET", "/api/v1/api-keys", "sk-lg-" + "Z" * 43)
    assert_playground_error(unknown, 401, "AUTHENTICATION_ERROR")
    anonymous = await call(livegate, "POST", "/api/v1/api-keys", json={"name": "x"})
    assert_playground_error(anonymous, 401, "AUTHENTICATION_ERROR")
    assert (await call(livegate, "GET", "/api/v1/api-keys", account.token)).status_code == 200
