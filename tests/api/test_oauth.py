"""Navi's OAuth login end to end, against a small OIDC provider started on loopback."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from app.core.config import OAuthConfig
from app.core.upstream_transport import MAX_IDENTITY_ANSWER_BYTES
from tests.conftest import Livegate, StartLivegate
from tests.fake_upstream import LoopbackServer

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

APP_CALLBACK = "navi://auth/callback"


@dataclass
class FakeProvider:
    """Authorization endpoint, token endpoint (checking PKCE) and userinfo."""

    port: int = 0
    challenges: dict[str, tuple[str, str]] = field(default_factory=dict)  # code -> (challenge, uri)
    tokens: dict[str, dict[str, str]] = field(default_factory=dict)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    deny: bool = False
    # What the token endpoint and the userinfo answer instead, as raw JSON.
    token_answer: bytes | None = None
    userinfo_answer: bytes | None = None
    padded: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def authorize(self, request: Request) -> Response:
        q = request.query_params
        assert q["response_type"] == "code" and q["client_id"] == "navi-client"
        assert q["code_challenge_method"] == "S256"
        if self.deny:
            return RedirectResponse(
                f"{q['redirect_uri']}?error=access_denied&state={q['state']}", 302
            )
        code = secrets.token_urlsafe(16)
        self.challenges[code] = (q["code_challenge"], q["redirect_uri"])
        return RedirectResponse(f"{q['redirect_uri']}?code={code}&state={q['state']}", 302)

    async def token(self, request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        self.token_requests.append(form)
        expected_auth = base64.b64encode(b"navi-client:navi-secret").decode()
        if request.headers.get("authorization") != f"Basic {expected_auth}":
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        code = str(form.get("code", ""))
        verifier = str(form.get("code_verifier", ""))
        if code not in self.challenges:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        challenge, uri = self.challenges.pop(code)
        expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if expected.rstrip(b"=").decode() != challenge or form.get("redirect_uri") != uri:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        if self.token_answer is not None:
            return Response(self.token_answer, media_type="application/json")
        access = secrets.token_urlsafe(16)
        self.tokens[access] = {
            "sub": "workos-user-1",
            "email": "navi.user@example.test",
            "given_name": "Navi",
            "family_name": "User",
        }
        answer = {"access_token": access, "token_type": "Bearer", "expires_in": 3600}
        return JSONResponse({**answer, **self.padding("token")})

    async def userinfo(self, request: Request) -> Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.tokens:
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        if self.userinfo_answer is not None:
            return Response(self.userinfo_answer, media_type="application/json")
        return JSONResponse({**self.tokens[token], **self.padding("userinfo")})

    def padding(self, endpoint: str) -> dict[str, str]:
        """An extra member making the endpoint's answer `padded[endpoint]` bytes longer."""
        return {"padding": "x" * self.padded[endpoint]} if endpoint in self.padded else {}


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    fake = FakeProvider()
    server = LoopbackServer(
        Starlette(
            routes=[
                Route("/authorize", fake.authorize),
                Route("/token", fake.token, methods=["POST"]),
                Route("/userinfo", fake.userinfo),
            ]
        )
    )
    fake.port = server.port
    await server.start()
    try:
        yield fake
    finally:
        await server.stop()


@pytest.fixture
async def navi(start_livegate: StartLivegate, provider: FakeProvider) -> Livegate:
    config = OAuthConfig(
        name="workos",
        client_id="navi-client",
        client_secret="navi-secret",
        authorize_url=f"{provider.url}/authorize",
        token_url=f"{provider.url}/token",
        userinfo_url=f"{provider.url}/userinfo",
        app_redirects=[APP_CALLBACK, "navi-dev://auth/callback"],
    )
    return await start_livegate(oauth=config)


async def login(livegate: Livegate, redirect: str | None = None) -> tuple[str, str]:
    """Run the browser's part; (our callback URL as the provider sent it, final Location)."""
    async with httpx.AsyncClient(follow_redirects=False) as http:
        params = {"redirect": redirect} if redirect else {}
        start = await http.get(f"{livegate.base_url}/api/auth/login", params=params)
        assert start.status_code == 302, start.text
        at_provider = await http.get(start.headers["location"])
        assert at_provider.status_code == 302
        callback = at_provider.headers["location"]
        finished = await http.get(callback)
        assert finished.status_code == 302
        return callback, finished.headers["location"]


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def test_login_returns_to_the_app_with_working_tokens(navi: Livegate):
    _, location = await login(navi)
    assert location.startswith(APP_CALLBACK + "?")
    tokens = query(location)
    async with httpx.AsyncClient(base_url=navi.base_url) as http:
        me = await http.get(
            "/api/user", headers={"Authorization": f"Bearer {tokens['access_token']}"}
        )
        assert me.status_code == 200
        user = me.json()["user"]
        assert user["id"] == tokens["user_id"]
        assert (user["email"], user["firstName"], user["lastName"]) == (
            "navi.user@example.test",
            "Navi",
            "User",
        )
        refreshed = await http.post(
            "/api/auth/refresh", json={"refreshToken": tokens["refresh_token"]}
        )
        assert refreshed.status_code == 200 and refreshed.json()["success"] is True
    # A second login maps to the same user.
    _, again = await login(navi)
    assert query(again)["user_id"] == tokens["user_id"]


async def test_allow_listed_custom_redirect_is_used(navi: Livegate):
    _, location = await login(navi, "navi-dev://auth/callback")
    assert location.startswith("navi-dev://auth/callback?")


async def test_redirect_not_on_the_allow_list_is_refused(navi: Livegate):
    async with httpx.AsyncClient(base_url=navi.base_url) as http:
        response = await http.get("/api/auth/login", params={"redirect": "https://evil.test/x"})
    assert response.status_code == 400
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == "BAD_REQUEST"


async def test_unknown_state_goes_to_the_error_url(navi: Livegate):
    async with httpx.AsyncClient(base_url=navi.base_url) as http:
        response = await http.get("/api/auth/callback", params={"code": "x", "state": "forged"})
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith("navi://auth/error?")
    assert query(location)["error"] == "invalid_state"
    assert "access_token" not in location


async def test_a_callback_cannot_be_replayed(navi: Livegate, provider: FakeProvider):
    callback, first = await login(navi)
    assert first.startswith(APP_CALLBACK)
    async with httpx.AsyncClient() as http:
        replay = await http.get(callback)
    assert query(replay.headers["location"])["error"] == "invalid_state"


async def test_bad_code_goes_to_the_error_url(navi: Livegate, provider: FakeProvider):
    async with httpx.AsyncClient(follow_redirects=False) as http:
        start = await http.get(f"{navi.base_url}/api/auth/login")
        state = query(start.headers["location"])["state"]
        response = await http.get(
            f"{navi.base_url}/api/auth/callback", params={"code": "not-issued", "state": state}
        )
    location = response.headers["location"]
    assert location.startswith("navi://auth/error?")
    assert query(location)["error"] == "auth_failed"
    # The exchange carried the PKCE verifier.
    assert provider.token_requests[-1]["code_verifier"]


async def test_provider_refusal_goes_to_the_error_url(navi: Livegate, provider: FakeProvider):
    provider.deny = True
    _, location = await login(navi)
    assert location.startswith("navi://auth/error?")
    assert query(location)["error"] == "auth_failed"


@pytest.mark.parametrize(
    ("token_answer", "userinfo_answer"),
    [
        (b"[1, 2]", None),
        (b'"a token"', None),
        (None, b"[1, 2]"),
        (None, b'{"email": "no-subject@example.test"}'),
        (None, b'{"sub": "%s"}' % (b"s" * 256)),
        (None, b'{"sub": "nul\\u0000"}'),
        (None, b'{"sub": "workos-user-1", "given_name": "N\\u0000vi"}'),
        (None, b'{"sub": "workos-user-1", "email": "a\\ud800@example.test"}'),
        (None, b'{"sub": true}'),
    ],
    ids=[
        "token-array",
        "token-string",
        "userinfo-array",
        "no-subject",
        "subject-too-long",
        "subject-nul",
        "name-nul",
        "email-surrogate",
        "subject-not-text",
    ],
)
async def test_a_malformed_provider_answer_goes_to_the_error_url(
    navi: Livegate,
    provider: FakeProvider,
    token_answer: bytes | None,
    userinfo_answer: bytes | None,
):
    provider.token_answer, provider.userinfo_answer = token_answer, userinfo_answer
    _, location = await login(navi)
    assert location.startswith("navi://auth/error?")
    assert query(location)["error"] == "auth_failed"


@pytest.mark.parametrize("endpoint", ["token", "userinfo"])
async def test_a_provider_answer_past_its_limit_goes_to_the_error_url(
    navi: Livegate, provider: FakeProvider, endpoint: str
):
    provider.padded = {endpoint: MAX_IDENTITY_ANSWER_BYTES}
    _, location = await login(navi)
    assert query(location)["error"] == "auth_failed", location
    # The same answer a little shorter is read.
    provider.padded = {endpoint: MAX_IDENTITY_ANSWER_BYTES - 4096}
    _, location = await login(navi)
    assert "access_token" in query(location), location


async def test_a_numeric_id_identifies_the_user(navi: Livegate, provider: FakeProvider):
    # OAuth 2 providers without OIDC (GitHub) name the user by a numeric `id`.
    user_id = secrets.randbelow(10**12)
    provider.userinfo_answer = b'{"id": %d, "email": "octo-%d@example.test"}' % (user_id, user_id)
    _, location = await login(navi)
    assert location.startswith(APP_CALLBACK + "?")
    _, again = await login(navi)
    assert query(again)["user_id"] == query(location)["user_id"]


async def test_an_email_of_another_account_goes_to_the_error_url(
    navi: Livegate, provider: FakeProvider
):
    taken = await navi.account()
    subject = f"oauth-{secrets.token_hex(8)}"
    provider.userinfo_answer = b'{"sub": "%s", "email": "%s"}' % (
        subject.encode(),
        taken.user.email.encode(),
    )
    _, location = await login(navi)
    assert location.startswith("navi://auth/error?")
    assert query(location)["error"] == "auth_failed"


async def test_login_without_configuration_is_503(livegate: Livegate):
    async with httpx.AsyncClient(base_url=livegate.base_url) as http:
        response = await http.get("/api/auth/login")
    assert response.status_code == 503
    assert response.json()["success"] is False
