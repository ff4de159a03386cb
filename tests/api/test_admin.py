"""Administration: tier changes reach the user's devices at once."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.asyncio.client import connect

from app.core.users import create_user
from tests.conftest import Account, Livegate

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)


async def admin_account(livegate: Livegate, role: str) -> Account:
    svc = livegate.services
    user = await create_user(
        svc.engine,
        email=f"{role}-{id(livegate)}@example.test",
        password=None,
        tier="free",
        role=role,
    )
    return Account(user, svc.secrets.issue_token(user.id), "")


async def patch_user(livegate: Livegate, token: str, user_id: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        return await http.patch(
            f"/api/admin/users/{user_id}", json=body, headers={"Authorization": f"Bearer {token}"}
        )


async def test_tier_change_pushes_the_new_quota_at_once(livegate: Livegate):
    admin = await admin_account(livegate, "admin")
    user = await livegate.account(tier="free")
    url = f"{livegate.ws_url}/ws/quota?deviceId=d1&token={user.token}"
    async with connect(url) as ws:
        first = json.loads(await ws.recv())
        assert first["total"] == 1_000_000
        response = await patch_user(livegate, admin.token, user.user.id, {"tier": "premium"})
        assert response.status_code == 200, response.text
        assert response.json()["data"]["user"]["tier"] == "premium"
        async with asyncio.timeout(10):
            pushed = json.loads(await ws.recv())
        assert pushed["type"] == "quota"
        assert pushed["total"] == 50_000_000
        assert pushed["seq"] > first["seq"]


async def test_only_admins_change_tiers_and_only_super_admins_change_roles(livegate: Livegate):
    user = await livegate.account()
    other = await livegate.account()
    admin = await admin_account(livegate, "admin")
    response = await patch_user(livegate, user.token, other.user.id, {"tier": "premium"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "AUTHORIZATION_ERROR"
    response = await patch_user(livegate, admin.token, other.user.id, {"role": "admin"})
    assert response.status_code == 403
    boss = await admin_account(livegate, "super_admin")
    response = await patch_user(livegate, boss.token, other.user.id, {"role": "admin"})
    assert response.status_code == 200
    assert response.json()["data"]["user"]["role"] == "admin"


@pytest.mark.parametrize(
    "body",
    [{}, {"tier": "nope"}, {"tier": 5}, {"role": "emperor"}],
    ids=["empty", "unknown-tier", "tier-type", "unknown-role"],
)
async def test_bad_admin_updates_are_400(livegate: Livegate, body: dict):
    boss = await admin_account(livegate, "super_admin")
    user = await livegate.account()
    response = await patch_user(livegate, boss.token, user.user.id, body)
    assert response.status_code == 400
    assert response.json()["success"] is False


async def test_unknown_user_is_404(livegate: Livegate):
    admin = await admin_account(livegate, "admin")
    response = await patch_user(livegate, admin.token, "no-such-user", {"tier": "basic"})
    assert response.status_code == 404
