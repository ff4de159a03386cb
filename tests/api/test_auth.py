"""The Playground's accounts (`/api/auth/*`) and Navi's `POST /api/auth/refresh`.

Real servers on loopback, real SQLite or PostgreSQL+Redis: registration and its
validation rules, login, `/me`, profile and password changes, logout (on one instance
and across two), and rotating refresh tokens with reuse detection.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa

from app.core.config import ActionLimit, ServerConfig
from app.core.tables import refresh_tokens, revoked_tokens, users
from tests.conftest import FAKE_MODEL, Backend, Livegate, StartLivegate

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
PASSWORD = "SecurePass123!"
USER_KEYS = {"id", "username", "email", "tier", "created_at"}


# --- helpers ---------------------------------------------------------------------


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def call(
    livegate: Livegate,
    method: str,
    path: str,
    *,
    token: str | None = None,
    json: Any = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers.update(bearer(token))
    if content is not None:
        all_headers.setdefault("content-type", "application/json")
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        return await http.request(method, path, json=json, content=content, headers=all_headers)


def unique_name() -> str:
    return "u" + uuid.uuid4().hex[:12]


def new_identity() -> dict[str, str]:
    name = unique_name()
    return {"username": name, "email": f"{name}@example.test", "password": PASSWORD}


async def register(livegate: Livegate, **fields: str) -> dict[str, Any]:
    """Register a fresh account; the response's `data` plus the password used."""
    body = {**new_identity(), **fields}
    response = await call(livegate, "POST", "/api/auth/register", json=body)
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    return {**data, "password": body["password"]}


async def login(livegate: Livegate, email: str, password: str) -> httpx.Response:
    return await call(
        livegate, "POST", "/api/auth/login", json={"email": email, "password": password}
    )


async def refresh(livegate: Livegate, refresh_token: str) -> httpx.Response:
    return await call(livegate, "POST", "/api/auth/refresh", json={"refreshToken": refresh_token})


async def me(livegate: Livegate, token: str) -> httpx.Response:
    return await call(livegate, "GET", "/api/auth/me", token=token)


def assert_playground_ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is True
    assert set(body) <= {"success", "data", "message", "timestamp"}
    assert ISO_MS.match(body["timestamp"]), body["timestamp"]
    return body  # type: ignore[no-any-return]


def assert_playground_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"success", "error", "timestamp"}, body
    assert body["success"] is False
    assert set(body["error"]) == {"message", "code", "details"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["details"], dict)
    assert ISO_MS.match(body["timestamp"])
    return body["error"]  # type: ignore[no-any-return]


def assert_navi_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"success", "error"}, body
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


async def user_count(livegate: Livegate, **where: str) -> int:
    async with livegate.services.engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(users)
        for column, value in where.items():
            query = query.where(users.c[column] == value)
        return int((await conn.execute(query)).scalar_one())


# --- register ----------------------------------------------------------------------


async def test_register_returns_the_playground_shape_and_a_working_token(livegate: Livegate):
    identity = new_identity()
    response = await call(livegate, "POST", "/api/auth/register", json=identity)
    body = assert_playground_ok(response, 201)
    assert set(body) == {"success", "data", "message", "timestamp"}
    assert body["message"] == "User registered successfully"
    data = body["data"]
    assert {"user", "token"} <= set(data)
    user = data["user"]
    assert set(user) == USER_KEYS
    assert user["username"] == identity["username"]
    assert user["email"] == identity["email"]
    assert user["tier"] == "free"
    assert isinstance(user["id"], str) and user["id"]
    assert ISO_MS.match(user["created_at"])
    created = datetime.strptime(user["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=5)
    assert PASSWORD not in response.text

    # The token is a JWT for this user that opens /me.
    assert jwt.decode(data["token"], options={"verify_signature": False})["sub"] == user["id"]
    me_body = assert_playground_ok(await me(livegate, data["token"]))
    assert me_body["data"]["id"] == user["id"]

    # Stored as an argon2id hash with OWASP's parameters, never in clear.
    async with livegate.services.engine.connect() as conn:
        stored = (
            await conn.execute(sa.select(users.c.password_hash).where(users.c.id == user["id"]))
        ).scalar_one()
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$"), stored
    assert PASSWORD not in stored


EDGE_USERNAMES = {
    # Random suffixes: the PostgreSQL database is shared by the whole session.
    "shortest-username": lambda: uuid.uuid4().hex[:3],
    "longest-username": lambda: "a" * 24 + uuid.uuid4().hex[:6],
    "mixed-case-username": lambda: "AbC" + uuid.uuid4().hex[:6],
}


@pytest.mark.parametrize("case", sorted(EDGE_USERNAMES))
async def test_register_accepts_the_edges_of_the_rules(livegate: Livegate, case: str):
    username = EDGE_USERNAMES[case]()
    password = "xxxxxxA1"  # exactly 8, one uppercase, one digit
    body = {"username": username, "email": f"{unique_name()}@example.test", "password": password}
    response = await call(livegate, "POST", "/api/auth/register", json=body)
    data = assert_playground_ok(response, 201)["data"]
    assert data["user"]["username"] == username
    assert (await login(livegate, body["email"], password)).status_code == 200


INVALID_REGISTRATIONS: dict[str, tuple[dict[str, Any], str]] = {
    # username: 3-30 characters, letters and digits only
    "username-too-short": ({"username": "ab"}, "username"),
    "username-too-long": ({"username": "a" * 31}, "username"),
    "username-underscore": ({"username": "john_doe"}, "username"),
    "username-space": ({"username": "john doe"}, "username"),
    "username-dash": ({"username": "john-doe"}, "username"),
    "username-non-ascii": ({"username": "jöhndoe"}, "username"),
    "username-empty": ({"username": ""}, "username"),
    "username-number": ({"username": 12345}, "username"),
    "username-missing": ({"username": None}, "username"),
    "username-final-newline": ({"username": "johndoe\n"}, "username"),
    "username-30-and-newline": ({"username": "a" * 30 + "\n"}, "username"),
    # lowercased, 636 characters: past the column's 320
    "email-longer-lowercased": ({"email": "a@" + "İ" * 316 + ".x"}, "email"),
    # email: a valid address
    "email-no-at": ({"email": "john.example.com"}, "email"),
    "email-no-domain-dot": ({"email": "john@example"}, "email"),
    "email-no-local-part": ({"email": "@example.com"}, "email"),
    "email-two-ats": ({"email": "john@@example.com"}, "email"),
    "email-space": ({"email": "jo hn@example.com"}, "email"),
    "email-empty": ({"email": ""}, "email"),
    "email-number": ({"email": 42}, "email"),
    "email-missing": ({"email": None}, "email"),
    # password: at least 8, with an uppercase, a lowercase and a digit
    "password-seven-chars": ({"password": "Abcdef1"}, "password"),
    "password-no-uppercase": ({"password": "securepass123"}, "password"),
    "password-no-lowercase": ({"password": "SECUREPASS123"}, "password"),
    "password-no-digit": ({"password": "SecurePassword"}, "password"),
    "password-empty": ({"password": ""}, "password"),
    "password-number": ({"password": 12345678}, "password"),
    "password-missing": ({"password": None}, "password"),
}


@pytest.mark.parametrize("case", sorted(INVALID_REGISTRATIONS))
async def test_register_validation_rules(livegate: Livegate, case: str):
    change, field = INVALID_REGISTRATIONS[case]
    body: dict[str, Any] = new_identity()
    for key, value in change.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    response = await call(livegate, "POST", "/api/auth/register", json=body)
    error = assert_playground_error(response, 400, "VALIDATION_ERROR")
    assert error["details"]["field"] == field
    if isinstance(body.get("username"), str):
        assert await user_count(livegate, username=body["username"]) == 0
    if isinstance(body.get("email"), str):
        assert await user_count(livegate, email=body["email"].lower()) == 0


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"[1, 2]", b'"johndoe"', b"{"], ids=lambda r: repr(r)[:12]
)
async def test_register_refuses_bodies_that_are_not_a_json_object(livegate: Livegate, raw: bytes):
    response = await call(livegate, "POST", "/api/auth/register", content=raw)
    assert_playground_error(response, 400, "VALIDATION_ERROR")


async def test_register_duplicate_email_or_username_is_409(livegate: Livegate):
    first = await register(livegate)
    taken_email = first["user"]["email"]
    taken_name = first["user"]["username"]
    cases = {
        "same-email": {"email": taken_email},
        "same-email-other-case": {"email": taken_email.upper()},
        "same-username": {"username": taken_name},
    }
    for name, change in cases.items():
        body = {**new_identity(), **change}
        response = await call(livegate, "POST", "/api/auth/register", json=body)
        assert_playground_error(response, 409, "CONFLICT")
        assert (await user_count(livegate, username=body["username"])) == (
            1 if name == "same-username" else 0
        ), name
    assert await user_count(livegate, email=taken_email) == 1
    # The first account is untouched: its password still logs in.
    assert (await login(livegate, taken_email, PASSWORD)).status_code == 200


# --- login -------------------------------------------------------------------------


async def test_login_returns_the_user_and_a_new_token(livegate: Livegate):
    account = await register(livegate)
    response = await login(livegate, account["user"]["email"], PASSWORD)
    body = assert_playground_ok(response)
    assert body["message"] == "Login successful"
    assert set(body["data"]["user"]) == USER_KEYS
    assert body["data"]["user"] == account["user"]
    token = body["data"]["token"]
    assert token != account["token"]
    assert assert_playground_ok(await me(livegate, token))["data"]["id"] == account["user"]["id"]
    # The address is matched whatever its case.
    upper = await login(livegate, account["user"]["email"].upper(), PASSWORD)
    assert upper.status_code == 200, upper.text


async def test_wrong_password_and_unknown_email_fail_alike(livegate: Livegate):
    account = await register(livegate)
    wrong = await login(livegate, account["user"]["email"], "WrongPass123!")
    unknown = await login(livegate, f"{unique_name()}@example.test", PASSWORD)
    case_changed = await login(livegate, account["user"]["email"], PASSWORD.lower())
    errors = [assert_playground_error(r, 401, "AUTHENTICATION_ERROR") for r in (wrong, unknown)]
    assert errors[0]["message"] == errors[1]["message"]
    assert errors[0]["details"] == errors[1]["details"]
    assert_playground_error(case_changed, 401, "AUTHENTICATION_ERROR")
    assert "token" not in wrong.text and "token" not in unknown.text


async def _with_login_limit(start_livegate: StartLivegate, backend: Backend) -> Livegate:
    """Three wrong passwords per email and address; addresses from X-Forwarded-For."""
    return await start_livegate(
        actions={"login_fail": ActionLimit(limit=3, window_seconds=900, scope="email_ip")},
        server=ServerConfig(redis_prefix=backend.redis_prefix, trusted_proxies=["127.0.0.1/32"]),
    )


async def login_from(livegate: Livegate, address: str, email: str, password: str) -> httpx.Response:
    return await call(
        livegate,
        "POST",
        "/api/auth/login",
        json={"email": email, "password": password},
        headers={"X-Forwarded-For": address},
    )


async def test_past_the_wrong_password_limit_even_the_right_one_is_refused_from_that_address(
    start_livegate: StartLivegate, backend: Backend
):
    livegate = await _with_login_limit(start_livegate, backend)
    account, other = await register(livegate), await register(livegate)
    email = account["user"]["email"]
    for _ in range(3):
        wrong = await login_from(livegate, "203.0.113.7", email, "WrongPass123!")
        assert_playground_error(wrong, 401, "AUTHENTICATION_ERROR")
    # The email is matched whatever its case or spaces, so these count as the same.
    for attempt in (email.upper(), f" {email} "):
        refused = await login_from(livegate, "203.0.113.7", attempt, PASSWORD)
        assert_playground_error(refused, 429, "RATE_LIMIT_EXCEEDED")
        assert 890 <= int(refused.headers["Retry-After"]) <= 900
    # Someone failing on purpose elsewhere locks no one out: the owner's address, and
    # another account from the guessing address, still log in.
    assert (await login_from(livegate, "198.51.100.2", email, PASSWORD)).status_code == 200
    other_ok = await login_from(livegate, "203.0.113.7", other["user"]["email"], PASSWORD)
    assert other_ok.status_code == 200, other_ok.text


async def test_logins_that_succeed_and_unknown_emails_are_counted_as_they_should(
    start_livegate: StartLivegate, backend: Backend
):
    livegate = await _with_login_limit(start_livegate, backend)
    account = await register(livegate)
    for _ in range(5):  # successes never count
        ok = await login_from(livegate, "203.0.113.7", account["user"]["email"], PASSWORD)
        assert ok.status_code == 200, ok.text
    # An unknown email is limited like a known one: the answers tell nothing apart.
    unknown = f"{unique_name()}@example.test"
    statuses = [
        (await login_from(livegate, "203.0.113.7", unknown, PASSWORD)).status_code for _ in range(4)
    ]
    assert statuses == [401, 401, 401, 429]


@pytest.mark.parametrize(
    "body",
    [{}, {"email": "a@example.test"}, {"password": PASSWORD}, {"email": 5, "password": PASSWORD}],
    ids=["empty", "no-password", "no-email", "email-not-string"],
)
async def test_login_needs_email_and_password(livegate: Livegate, body: dict[str, Any]):
    response = await call(livegate, "POST", "/api/auth/login", json=body)
    assert_playground_error(response, 400, "VALIDATION_ERROR")


async def test_password_user_without_password_hash_cannot_log_in(livegate: Livegate):
    # Users created by an external identity have no password: no password opens them.
    account = await livegate.account()
    response = await login(livegate, account.user.email, "")
    assert_playground_error(response, 400, "VALIDATION_ERROR")
    # Not even the password of the hash verified in place of a missing one, which was
    # once a constant in the source.
    for password in (PASSWORD, "livegate-timing-equaliser"):
        response = await login(livegate, account.user.email, password)
        assert_playground_error(response, 401, "AUTHENTICATION_ERROR")


# --- /me ---------------------------------------------------------------------------


async def test_me_shape_quota_and_masked_keys(livegate: Livegate):
    account = await register(livegate)
    token = account["token"]
    body = assert_playground_ok(await me(livegate, token))
    data = body["data"]
    assert set(data) == {
        "id",
        "username",
        "email",
        "tier",
        "quota",
        "api_keys",
        "created_at",
        "updated_at",
    }
    assert {k: data[k] for k in USER_KEYS} == account["user"]
    assert ISO_MS.match(data["updated_at"])
    assert data["quota"] == {
        "daily": {"used": 0, "limit": 50},
        "weekly": {"used": 0, "limit": 350},
        "monthly": {"used": 0, "limit": 1500},
    }
    assert data["api_keys"] == []

    # An AI request counts in every window.
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        chat = await http.post(
            "/v1/chat/completions",
            headers=bearer(token),
            json={"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert chat.status_code == 200, chat.text
    quota = assert_playground_ok(await me(livegate, token))["data"]["quota"]
    assert {w: q["used"] for w, q in quota.items()} == {"daily": 1, "weekly": 1, "monthly": 1}

    # Keys are listed masked; the relay key (Sokuji's) is not among them.
    relay = await call(livegate, "GET", "/api/user/api-key", token=token)
    assert relay.status_code == 200, relay.text
    created = await call(
        livegate, "POST", "/api/v1/api-keys", token=token, json={"name": "My Application"}
    )
    assert created.status_code == 201, created.text
    full_key = created.json()["data"]["api_key"]["key"]
    response = await me(livegate, token)
    listed = assert_playground_ok(response)["data"]["api_keys"]
    assert len(listed) == 1
    assert listed[0]["key"] == full_key[:7] + "..." + full_key[-4:]
    assert listed[0]["name"] == "My Application"
    assert full_key not in response.text
    assert relay.json()["apiKey"] not in response.text


async def test_me_without_credentials_is_401(livegate: Livegate):
    response = await call(livegate, "GET", "/api/auth/me")
    assert_playground_error(response, 401, "AUTHENTICATION_ERROR")
    response = await me(livegate, "not-a-token")
    assert_playground_error(response, 401, "AUTHENTICATION_ERROR")


# --- PUT /profile ------------------------------------------------------------------


async def test_update_profile(livegate: Livegate):
    account = await register(livegate)
    token = account["token"]
    new_name = unique_name()
    new_email = f"{new_name}@example.test"
    response = await call(
        livegate,
        "PUT",
        "/api/auth/profile",
        token=token,
        json={"username": new_name, "email": new_email},
    )
    body = assert_playground_ok(response)
    assert body["message"] == "Profile updated successfully"
    data = body["data"]
    assert set(data) == {"id", "username", "email", "tier", "updated_at"}
    assert (data["id"], data["username"], data["email"], data["tier"]) == (
        account["user"]["id"],
        new_name,
        new_email,
        "free",
    )
    assert ISO_MS.match(data["updated_at"])

    current = assert_playground_ok(await me(livegate, token))["data"]
    assert (current["username"], current["email"]) == (new_name, new_email)
    assert current["created_at"] == account["user"]["created_at"]
    # The new address logs in; the old one no longer does.
    assert (await login(livegate, new_email, PASSWORD)).status_code == 200
    assert (await login(livegate, account["user"]["email"], PASSWORD)).status_code == 401

    # One field alone changes only that field.
    only_name = unique_name()
    response = await call(
        livegate, "PUT", "/api/auth/profile", token=token, json={"username": only_name}
    )
    assert assert_playground_ok(response)["data"]["email"] == new_email
    assert assert_playground_ok(response)["data"]["username"] == only_name


async def test_update_profile_refusals(livegate: Livegate):
    account = await register(livegate)
    other = await register(livegate)
    token = account["token"]

    async def put(body: Any) -> httpx.Response:
        return await call(livegate, "PUT", "/api/auth/profile", token=token, json=body)

    refused: list[dict[str, Any]] = [
        {},
        {"username": "ab"},
        {"email": "nope"},
        {"username": "bad_name"},
        {"username": "abcd\n"},
        {"email": "a@" + "İ" * 316 + ".x"},  # 320 characters, 636 once lowercased
    ]
    for body in refused:
        error = assert_playground_error(await put(body), 400, "VALIDATION_ERROR")
        if body:
            assert error["details"]["field"] == next(iter(body))
    assert_playground_error(await put({"email": other["user"]["email"]}), 409, "CONFLICT")
    assert_playground_error(await put({"username": other["user"]["username"]}), 409, "CONFLICT")
    unauthenticated = await call(livegate, "PUT", "/api/auth/profile", json={"username": "abcd"})
    assert_playground_error(unauthenticated, 401, "AUTHENTICATION_ERROR")
    # Nothing changed.
    current = assert_playground_ok(await me(livegate, token))["data"]
    assert (current["username"], current["email"]) == (
        account["user"]["username"],
        account["user"]["email"],
    )


# --- PUT /password -----------------------------------------------------------------


async def test_change_password(livegate: Livegate):
    account = await register(livegate)
    email, token = account["user"]["email"], account["token"]
    earlier_refresh = account["refresh_token"]
    # A second session's refresh token, issued before the change, too.
    second = assert_playground_ok(await login(livegate, email, PASSWORD))["data"]

    async def put(body: dict[str, Any]) -> httpx.Response:
        return await call(livegate, "PUT", "/api/auth/password", token=token, json=body)

    wrong_old = await put({"oldPassword": "NotMyPass123", "newPassword": "NewSecurePass456!"})
    assert_playground_error(wrong_old, 401, "AUTHENTICATION_ERROR")
    for weak in ("short1A", "nouppercase123", "NOLOWERCASE123", "NoDigitsAtAll"):
        response = await put({"oldPassword": PASSWORD, "newPassword": weak})
        error = assert_playground_error(response, 400, "VALIDATION_ERROR")
        assert error["details"]["field"] == "newPassword"
    missing_old = await put({"newPassword": "NewSecurePass456!"})
    assert_playground_error(missing_old, 400, "VALIDATION_ERROR")
    # None of the refused attempts changed anything.
    assert (await login(livegate, email, PASSWORD)).status_code == 200

    new_password = "NewSecurePass456!"
    response = await put({"oldPassword": PASSWORD, "newPassword": new_password})
    body = assert_playground_ok(response)
    assert body["message"] == "Password changed successfully"
    assert "data" not in body

    assert_playground_error(await login(livegate, email, PASSWORD), 401, "AUTHENTICATION_ERROR")
    assert (await login(livegate, email, new_password)).status_code == 200
    # Every refresh token issued before the change stops working, and every access
    # token: also one issued in the second of the change.
    for stale in (earlier_refresh, second["refresh_token"]):
        assert_navi_error(await refresh(livegate, stale), 401, "UNAUTHORIZED")
    for stale in (token, second["token"]):
        assert_playground_error(await me(livegate, stale), 401, "AUTHENTICATION_ERROR")


async def test_wrong_current_passwords_are_limited_as_wrong_logins_are(
    start_livegate: StartLivegate, backend: Backend
):
    """A stolen session is no way around the wrong-password limit, not even by
    changing the account's email between guesses."""
    livegate = await _with_login_limit(start_livegate, backend)
    account = await register(livegate)
    token = account["token"]

    async def change_from(address: str, old: str) -> httpx.Response:
        return await call(
            livegate,
            "PUT",
            "/api/auth/password",
            token=token,
            json={"oldPassword": old, "newPassword": "NewSecurePass456!"},
            headers={"X-Forwarded-For": address},
        )

    for guess in range(3):
        wrong = await change_from("203.0.113.7", f"WrongPass{guess}23!")
        assert_playground_error(wrong, 401, "AUTHENTICATION_ERROR")
        new_email = {"email": f"{unique_name()}@example.test"}
        moved = await call(livegate, "PUT", "/api/auth/profile", token=token, json=new_email)
        assert moved.status_code == 200, moved.text
    # The fourth try is refused, even with the right password, and changes nothing.
    refused = await change_from("203.0.113.7", PASSWORD)
    assert_playground_error(refused, 429, "RATE_LIMIT_EXCEEDED")
    assert 890 <= int(refused.headers["Retry-After"]) <= 900
    # From another address the right password still changes it.
    changed = await change_from("198.51.100.2", PASSWORD)
    assert changed.status_code == 200, changed.text
    new_login = await login_from(livegate, "198.51.100.2", new_email["email"], "NewSecurePass456!")
    assert new_login.status_code == 200, new_login.text


# --- logout ------------------------------------------------------------------------


async def test_logout_revokes_the_token_at_once(livegate: Livegate):
    account = await register(livegate)
    token = account["token"]
    other_session = assert_playground_ok(await login(livegate, account["user"]["email"], PASSWORD))[
        "data"
    ]["token"]
    assert (await me(livegate, token)).status_code == 200

    response = await call(livegate, "POST", "/api/auth/logout", token=token)
    body = assert_playground_ok(response)
    assert body["message"] == "Logout successful"

    assert_playground_error(await me(livegate, token), 401, "AUTHENTICATION_ERROR")
    again = await call(livegate, "POST", "/api/auth/logout", token=token)
    assert_playground_error(again, 401, "AUTHENTICATION_ERROR")
    # Revoked on every surface, not only the Playground's.
    profile = await call(livegate, "GET", "/api/user/profile", token=token)
    assert profile.status_code == 401
    # Only that session: the user's other session lives on.
    assert (await me(livegate, other_session)).status_code == 200


async def test_logout_ends_every_access_token_of_the_session(livegate: Livegate):
    account = await register(livegate)
    rotated = await refresh(livegate, account["refresh_token"])
    assert rotated.status_code == 200, rotated.text
    newest = rotated.json()["accessToken"]
    assert (await call(livegate, "POST", "/api/auth/logout", token=newest)).status_code == 200
    # The token the session had before its refresh is as dead as the one logged out.
    assert_playground_error(await me(livegate, account["token"]), 401, "AUTHENTICATION_ERROR")
    assert_navi_error(await refresh(livegate, rotated.json()["refreshToken"]), 401, "UNAUTHORIZED")


async def race_a_thief(livegate: Livegate, ending: str) -> dict[str, str]:
    """The victim ends the session while a thief spends its refresh tokens as fast as
    it can; what the thief holds at the end."""
    account = await register(livegate)
    held = {"access": account["token"], "refresh": account["refresh_token"]}
    done = asyncio.Event()

    async def thief() -> None:
        for _ in range(200):  # bounded: a thief never locked out must not hang the test
            rotated = await refresh(livegate, held["refresh"])
            if rotated.status_code == 200:
                held["access"] = rotated.json()["accessToken"]
                held["refresh"] = rotated.json()["refreshToken"]
            elif done.is_set():
                return

    async def victim() -> None:
        await asyncio.sleep(0.01)
        if ending == "logout":
            response = await call(livegate, "POST", "/api/auth/logout", token=account["token"])
        else:
            body = {"oldPassword": PASSWORD, "newPassword": "NewSecurePass456!"}
            response = await call(
                livegate, "PUT", "/api/auth/password", token=account["token"], json=body
            )
        assert response.status_code == 200, response.text
        done.set()

    await asyncio.gather(thief(), victim())
    return held


@pytest.mark.parametrize("ending", ["logout", "password-change"])
async def test_a_thief_refreshing_in_a_loop_is_locked_out_too(livegate: Livegate, ending: str):
    for _ in range(5):
        held = await race_a_thief(livegate, ending)
        assert_playground_error(await me(livegate, held["access"]), 401, "AUTHENTICATION_ERROR")
        assert_navi_error(await refresh(livegate, held["refresh"]), 401, "UNAUTHORIZED")


async def test_logout_is_stored_where_every_instance_reads_it(livegate: Livegate):
    account = await register(livegate)
    token = account["token"]
    assert (await call(livegate, "POST", "/api/auth/logout", token=token)).status_code == 200
    assert_playground_error(await me(livegate, token), 401, "AUTHENTICATION_ERROR")

    # The denylist lives in Redis when there is one, else in SQL.
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    async with livegate.services.engine.connect() as conn:
        in_sql = (
            await conn.execute(sa.select(revoked_tokens).where(revoked_tokens.c.jti == jti))
        ).first()
    redis = livegate.services.redis
    if redis is not None:
        prefix = livegate.settings.server.redis_prefix
        assert await redis.exists(f"{prefix}:revoked:{jti}") == 1
        ttl = await redis.ttl(f"{prefix}:revoked:{jti}")
        assert 0 < ttl <= 24 * 3600 + 1  # kept until the token would have expired
        assert in_sql is None
    else:
        assert in_sql is not None


async def test_concurrent_logouts_of_one_token_never_fail(livegate: Livegate):
    account = await register(livegate)
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        responses = await asyncio.gather(
            *(http.post("/api/auth/logout", headers=bearer(account["token"])) for _ in range(8))
        )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 401}, [r.text for r in responses]
    assert 200 in statuses
    assert (await me(livegate, account["token"])).status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/auth/logout", None),
        ("PUT", "/api/auth/password", {"oldPassword": PASSWORD, "newPassword": "NewPass12345"}),
        ("PUT", "/api/auth/profile", {"username": "stolenname"}),
    ],
    ids=["logout", "password", "profile"],
)
@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
async def test_api_keys_cannot_use_session_only_routes(
    livegate: Livegate, method: str, path: str, body: Any, header: str
):
    account = await register(livegate)
    every_permission = ["ai:read", "ai:write", "usage:read", "keys:read", "keys:write"]
    created = await call(
        livegate,
        "POST",
        "/api/v1/api-keys",
        token=account["token"],
        json={"name": "all", "permissions": every_permission},
    )
    assert created.status_code == 201, created.text
    key = created.json()["data"]["api_key"]["key"]
    value = f"Bearer {key}" if header == "Authorization" else key
    response = await call(livegate, method, path, json=body, headers={header: value})
    error = assert_playground_error(response, 401, "AUTHENTICATION_ERROR")
    assert error["details"]["reason"] == "session_required"
    # Nothing happened: the password and the username are unchanged, the key still works.
    assert (await login(livegate, account["user"]["email"], PASSWORD)).status_code == 200
    current = assert_playground_ok(await me(livegate, account["token"]))["data"]
    assert current["username"] == account["user"]["username"]
    assert (await me(livegate, key)).status_code == 200


# --- refresh -----------------------------------------------------------------------


async def test_refresh_rotates_the_pair(livegate: Livegate):
    account = await register(livegate)
    first_refresh = account["refresh_token"]
    response = await refresh(livegate, first_refresh)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"success", "accessToken", "refreshToken"}
    assert body["success"] is True
    assert body["refreshToken"] != first_refresh
    assert body["accessToken"] != account["token"]
    # The new access token is this user's and works.
    data = assert_playground_ok(await me(livegate, body["accessToken"]))["data"]
    assert data["id"] == account["user"]["id"]
    # The new refresh token works once more, and so on down the chain.
    again = await refresh(livegate, body["refreshToken"])
    assert again.status_code == 200, again.text
    assert (await me(livegate, again.json()["accessToken"])).status_code == 200

    # Only hashes are stored.
    async with livegate.services.engine.connect() as conn:
        rows = list(
            await conn.execute(
                sa.select(refresh_tokens).where(refresh_tokens.c.user_id == account["user"]["id"])
            )
        )
    assert len(rows) == 3
    assert len({r.family_id for r in rows}) == 1
    for row in rows:
        assert all(first_refresh not in str(v) and body["refreshToken"] not in str(v) for v in row)


async def test_reusing_a_spent_refresh_token_revokes_the_family(livegate: Livegate):
    account = await register(livegate)
    other_session = assert_playground_ok(await login(livegate, account["user"]["email"], PASSWORD))[
        "data"
    ]
    spent = account["refresh_token"]
    first = await refresh(livegate, spent)
    assert first.status_code == 200, first.text
    second = await refresh(livegate, first.json()["refreshToken"])
    assert second.status_code == 200, second.text
    newest = second.json()["refreshToken"]

    reused = await refresh(livegate, spent)
    error = assert_navi_error(reused, 401, "UNAUTHORIZED")
    assert set(error) == {"code", "message"}
    # The whole family ends: even the newest token of it is refused now, and every
    # access token it issued.
    assert_navi_error(await refresh(livegate, newest), 401, "UNAUTHORIZED")
    for access in (account["token"], first.json()["accessToken"], second.json()["accessToken"]):
        assert_playground_error(await me(livegate, access), 401, "AUTHENTICATION_ERROR")
    # Another family (another login) is not touched.
    assert (await me(livegate, other_session["token"])).status_code == 200
    assert (await refresh(livegate, other_session["refresh_token"])).status_code == 200


@pytest.mark.parametrize(
    "token",
    ["rt_" + "A" * 43, "garbage", "eyJhbGciOiJIUzI1NiJ9.e30.x"],
    ids=["unknown", "junk", "jwt"],
)
async def test_unknown_refresh_token_is_401(livegate: Livegate, token: str):
    assert_navi_error(await refresh(livegate, token), 401, "UNAUTHORIZED")


@pytest.mark.parametrize(
    "body", [{}, {"refreshToken": ""}, {"refreshToken": 5}, {"refresh_token": "rt_x"}]
)
async def test_refresh_needs_a_refresh_token(livegate: Livegate, body: dict[str, Any]):
    response = await call(livegate, "POST", "/api/auth/refresh", json=body)
    assert_navi_error(response, 400, "BAD_REQUEST")


async def test_expired_refresh_token_is_refused(livegate: Livegate):
    account = await register(livegate)
    token = account["refresh_token"]
    async with livegate.services.engine.begin() as conn:
        await conn.execute(
            refresh_tokens.update()
            .where(refresh_tokens.c.user_id == account["user"]["id"])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert_navi_error(await refresh(livegate, token), 401, "UNAUTHORIZED")


async def test_access_token_is_not_a_refresh_token(livegate: Livegate):
    account = await register(livegate)
    assert_navi_error(await refresh(livegate, account["token"]), 401, "UNAUTHORIZED")
    # The refresh token is no access token either.
    assert (await me(livegate, account["refresh_token"])).status_code == 401


async def test_concurrent_double_use_of_one_refresh_token_admits_exactly_one(
    livegate: Livegate,
):
    account = await register(livegate)
    token = account["refresh_token"]
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        responses = await asyncio.gather(
            *(http.post("/api/auth/refresh", json={"refreshToken": token}) for _ in range(2))
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 401], [r.text for r in responses]
    winner = next(r for r in responses if r.status_code == 200)
    loser = next(r for r in responses if r.status_code == 401)
    assert_navi_error(loser, 401, "UNAUTHORIZED")
    # The loser was a reuse: it ended the family, the winner's new pair with it.
    assert (await me(livegate, winner.json()["accessToken"])).status_code == 401


async def test_reuse_detected_in_a_race_still_ends_the_whole_family(livegate: Livegate):
    # Two uses of one refresh token at once: one wins, the other is a reuse and revokes
    # the family. The winner's new token belongs to that family, so it must be refused
    # afterwards, whichever order the two requests ran in. Ten rounds: the race goes
    # the wrong way in most of them.
    survivors = 0
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        for _ in range(10):
            account = await register(livegate)
            token = account["refresh_token"]
            responses = await asyncio.gather(
                *(http.post("/api/auth/refresh", json={"refreshToken": token}) for _ in range(2))
            )
            winners = [r for r in responses if r.status_code == 200]
            assert len(winners) == 1, [r.text for r in responses]
            follow = await refresh(livegate, winners[0].json()["refreshToken"])
            survivors += follow.status_code == 200
    assert survivors == 0, f"the family survived reuse detection in {survivors} of 10 rounds"


async def test_concurrent_burst_on_one_refresh_token_admits_exactly_one(livegate: Livegate):
    account = await register(livegate)
    token = account["refresh_token"]
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=60) as http:
        responses = await asyncio.gather(
            *(http.post("/api/auth/refresh", json={"refreshToken": token}) for _ in range(10))
        )
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 1, [r.text for r in responses]
    assert statuses.count(401) == 9, [r.text for r in responses]


async def test_deleted_user_cannot_refresh(livegate: Livegate):
    account = await register(livegate)
    async with livegate.services.engine.begin() as conn:
        await conn.execute(
            users.update()
            .where(users.c.id == account["user"]["id"])
            .values(deleted_at=datetime.now(UTC))
        )
    response = await refresh(livegate, account["refresh_token"])
    # Whatever the refresh answers, it must not hand out a working session.
    if response.status_code == 200:
        assert (await me(livegate, response.json()["accessToken"])).status_code == 401
    else:
        assert_navi_error(response, 401, "UNAUTHORIZED")
