"""Every route that takes an object id refuses another user's object with a 404.

One table: a route that takes an id is one line in `ROUTES`; a new kind of object is
one entry in `KINDS` (how its owner creates it and reads it back).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import Livegate

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def call(
    livegate: Livegate, method: str, path: str, credential: str, body: Any = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        return await http.request(method, path, json=body, headers=bearer(credential))


@dataclass(frozen=True)
class Kind:
    """How an owner makes one object of this kind and reads it back (as JSON)."""

    create: Callable[[Livegate, str], Awaitable[str]]  # -> object id
    read: Callable[[Livegate, str, str], Awaitable[dict[str, Any]]]
    # Permissions an API key needs to reach every route of this kind.
    key_permissions: tuple[str, ...]


async def _create_api_key(livegate: Livegate, token: str) -> str:
    response = await call(
        livegate,
        "POST",
        "/api/v1/api-keys",
        token,
        {"name": "owned", "permissions": ["ai:read"], "expires_in": 30},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["data"]["api_key"]["id"])


async def _read_api_key(livegate: Livegate, token: str, key_id: str) -> dict[str, Any]:
    response = await call(livegate, "GET", f"/api/v1/api-keys/{key_id}", token)
    assert response.status_code == 200, response.text
    api_key = response.json()["data"]["api_key"]
    api_key.pop("last_used")  # the owner's own reads are not what is compared
    api_key.pop("usage_count")
    return api_key  # type: ignore[no-any-return]


async def _create_conversation(livegate: Livegate, token: str) -> str:
    conversation_id = f"conv_{uuid.uuid4().hex[:12]}"
    created = await call(
        livegate, "POST", "/api/conversations", token, {"id": conversation_id, "title": "mine"}
    )
    assert created.status_code == 200, created.text
    saved = await call(
        livegate,
        "POST",
        "/api/messages",
        token,
        {
            "conversationId": conversation_id,
            "messages": [{"id": "m1", "role": "user", "content": "private"}],
        },
    )
    assert saved.status_code == 200, saved.text
    return conversation_id


async def _read_conversation(
    livegate: Livegate, token: str, conversation_id: str
) -> dict[str, Any]:
    response = await call(livegate, "GET", f"/api/messages?conversationId={conversation_id}", token)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


KINDS: dict[str, Kind] = {
    "api-key": Kind(_create_api_key, _read_api_key, ("keys:read", "keys:write")),
    "conversation": Kind(_create_conversation, _read_conversation, ()),
}

# (kind, method, path with {id}, body with "{id}" where the id goes): one line per route
# that takes an object id.
ROUTES: list[tuple[str, str, str, Any]] = [
    ("api-key", "GET", "/api/v1/api-keys/{id}", None),
    ("api-key", "PUT", "/api/v1/api-keys/{id}", {"name": "stolen", "permissions": ["ai:write"]}),
    ("api-key", "DELETE", "/api/v1/api-keys/{id}", None),
    ("conversation", "GET", "/api/messages?conversationId={id}", None),
    (
        "conversation",
        "POST",
        "/api/messages",
        {"conversationId": "{id}", "messages": [{"id": "m9", "role": "user", "content": "x"}]},
    ),
    ("conversation", "DELETE", "/api/conversations?id={id}", None),
]


def with_id(body: Any, object_id: str) -> Any:
    if isinstance(body, dict):
        return {k: with_id(v, object_id) for k, v in body.items()}
    if isinstance(body, list):
        return [with_id(v, object_id) for v in body]
    return object_id if body == "{id}" else body


def assert_not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == "NOT_FOUND"


async def other_users_credential(livegate: Livegate, kind: Kind, how: str) -> str:
    intruder = await livegate.account()
    if how == "session" or not kind.key_permissions:
        return intruder.token
    response = await call(
        livegate,
        "POST",
        "/api/v1/api-keys",
        intruder.token,
        {"name": "intruder", "permissions": list(kind.key_permissions)},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["data"]["api_key"]["key"])


@pytest.mark.parametrize("how", ["session", "api-key"])
@pytest.mark.parametrize(
    ("kind", "method", "path", "body"),
    ROUTES,
    ids=[f"{method} {path}" for _, method, path, _ in ROUTES],
)
async def test_another_users_object_is_404_and_untouched(
    livegate: Livegate, kind: str, method: str, path: str, body: Any, how: str
):
    owner = await livegate.account()
    spec = KINDS[kind]
    object_id = await spec.create(livegate, owner.token)
    before = await spec.read(livegate, owner.token, object_id)
    intruder = await other_users_credential(livegate, spec, how)

    response = await call(
        livegate, method, path.format(id=object_id), intruder, with_id(body, object_id)
    )
    assert_not_found(response)
    # Indistinguishable from an id that does not exist.
    absent = f"key_{uuid.uuid4().hex}"
    missing = await call(livegate, method, path.format(id=absent), intruder, with_id(body, absent))
    assert_not_found(missing)
    assert response.json()["error"]["message"] == missing.json()["error"]["message"]

    # The owner's object is as it was.
    assert await spec.read(livegate, owner.token, object_id) == before


@pytest.mark.parametrize(
    ("kind", "method", "path", "body"),
    ROUTES,
    ids=[f"{method} {path}" for _, method, path, _ in ROUTES],
)
@pytest.mark.parametrize("missing_id", ["key_" + "0" * 32, "nonexistent", "%2e%2e"])
async def test_a_nonexistent_id_is_404(
    livegate: Livegate, kind: str, method: str, path: str, body: Any, missing_id: str
):
    owner = await livegate.account()
    spec = KINDS[kind]
    await spec.create(livegate, owner.token)  # the caller has objects, just not this one
    response = await call(
        livegate, method, path.format(id=missing_id), owner.token, with_id(body, missing_id)
    )
    assert_not_found(response)
