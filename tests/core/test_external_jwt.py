"""Bearer JWTs from an external issuer (Clerk-like, JWKS on loopback), our own, and x-user-id.

A small JWKS server runs on loopback and counts its fetches; the tokens are signed with
RSA and EC keys generated here. Every refused token gets a 401 and creates no user.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.core.auth import JwksCache
from app.core.config import AuthConfig, IssuerConfig
from app.core.tables import external_identities, users
from app.core.upstream_transport import MAX_IDENTITY_ANSWER_BYTES
from tests.conftest import Livegate, StartLivegate
from tests.fake_upstream import LoopbackServer

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

ISSUER = "https://issuer.test"
AUDIENCE = "livegate-app"
PARTY = "https://app.test"
PROFILE = "/api/user/profile"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# --- the issuer: keys and a JWKS server --------------------------------------------


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: PrivateKey

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**data, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class JwksServer:
    keys: list[SigningKey]
    port: int = 0
    fetches: int = 0
    spare: dict[str, SigningKey] = field(default_factory=dict)
    padding: int = 0  # characters of an extra member, to make the answer long
    gate: asyncio.Event | None = None  # if set, answers wait for it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def jwks(self, request: Request) -> Response:
        self.fetches += 1
        if self.gate is not None:
            await self.gate.wait()
        answer: dict[str, Any] = {"keys": [k.jwk() for k in self.keys]}
        if self.padding:
            answer["padding"] = "x" * self.padding
        return JSONResponse(answer)


@pytest.fixture(scope="module")
def generated_keys() -> dict[str, SigningKey]:
    # RSA generation is slow: once per module.
    return {
        "rsa": rsa_key("rsa-1"),
        "ec": ec_key("ec-1"),
        "rotated": rsa_key("rsa-2"),
        # Never published: the attacker's own keys.
        "attacker-rsa": rsa_key("rsa-1"),
        "attacker-ec": ec_key("ec-1"),
    }


@pytest.fixture
async def jwks(generated_keys: dict[str, SigningKey]) -> AsyncIterator[JwksServer]:
    state = JwksServer(keys=[generated_keys["rsa"], generated_keys["ec"]], spare=generated_keys)
    server = LoopbackServer(Starlette(routes=[Route("/.well-known/jwks.json", state.jwks)]))
    state.port = server.port
    await server.start()
    try:
        yield state
    finally:
        await server.stop()


def issuer_config(jwks: JwksServer) -> AuthConfig:
    return AuthConfig(
        issuers=[
            IssuerConfig(
                name="clerk",
                issuer=ISSUER,
                jwks_url=jwks.url,
                audience=AUDIENCE,
                authorized_parties=[PARTY],
            )
        ]
    )


@pytest.fixture
async def livegate(start_livegate: StartLivegate, jwks: JwksServer) -> Livegate:
    return await start_livegate(auth=issuer_config(jwks))


# --- tokens -------------------------------------------------------------------------


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "azp": PARTY,
        "sub": f"user_{uuid.uuid4().hex[:20]}",
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
    }
    for name, value in overrides.items():
        if value is None:
            values.pop(name, None)
        else:
            values[name] = value
    return values


def sign(key: SigningKey, payload: dict[str, Any], **header: Any) -> str:
    headers = {"kid": key.kid, **header}
    return jwt.encode(payload, key.private, algorithm=key.alg, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token put together by hand, as an attacker would (PyJWT refuses to make these)."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    if secret is None:
        return signing_input + "."
    digest = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(digest)


async def get(
    livegate: Livegate, path: str = PROFILE, *, token: str | None = None, **headers: str
) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(base_url=livegate.base_url, timeout=30) as http:
        return await http.get(path, headers=headers)


async def identity_count(livegate: Livegate, provider: str, subject: str | None = None) -> int:
    query = (
        sa.select(sa.func.count())
        .select_from(external_identities)
        .where(external_identities.c.provider == provider)
    )
    if subject is not None:
        query = query.where(external_identities.c.subject == subject)
    async with livegate.services.engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]


# --- accepted -----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["rsa", "ec"])
async def test_issuer_tokens_map_to_a_user_created_on_first_sight(
    livegate: Livegate, generated_keys: dict[str, SigningKey], which: str
):
    key = generated_keys[which]
    payload = claims(
        email=f"{uuid.uuid4().hex[:8]}@Example.test",
        given_name="Aiko",
        family_name="Tanaka",
        picture="https://img.test/a.png",
    )
    assert await identity_count(livegate, "clerk", payload["sub"]) == 0

    first = await get(livegate, token=sign(key, payload))
    assert first.status_code == 200, first.text
    user = first.json()["user"]
    assert user["email"] == payload["email"].lower()
    assert (user["firstName"], user["lastName"], user["imageUrl"]) == (
        "Aiko",
        "Tanaka",
        "https://img.test/a.png",
    )
    assert user["subscription"] == "free"
    assert await identity_count(livegate, "clerk", payload["sub"]) == 1

    # Another token for the same subject is the same user; nothing new is created.
    again = await get(livegate, token=sign(key, claims(sub=payload["sub"])))
    assert again.status_code == 200, again.text
    assert again.json()["user"]["id"] == user["id"]
    assert await identity_count(livegate, "clerk", payload["sub"]) == 1
    async with livegate.services.engine.connect() as conn:
        stored = (
            await conn.execute(sa.select(users.c.email).where(users.c.id == user["id"]))
        ).scalar_one()
    assert stored == payload["email"].lower()


async def test_different_subjects_are_different_users(
    livegate: Livegate, generated_keys: dict[str, SigningKey]
):
    a = await get(livegate, token=sign(generated_keys["rsa"], claims()))
    b = await get(livegate, token=sign(generated_keys["ec"], claims()))
    assert a.status_code == b.status_code == 200
    assert a.json()["user"]["id"] != b.json()["user"]["id"]


@pytest.mark.parametrize(
    "email",
    [None, 42, "no-at-sign", "x" * 320 + "@example.test", "a\x00b@example.test"],
    ids=["absent", "number", "not-an-address", "longer-than-the-column", "nul"],
)
async def test_a_token_without_a_usable_email_gets_a_placeholder_address(
    livegate: Livegate, generated_keys: dict[str, SigningKey], email: object
):
    payload = claims() if email is None else claims(email=email)
    response = await get(livegate, token=sign(generated_keys["rsa"], payload))
    assert response.status_code == 200, response.text
    assert response.json()["user"]["email"].endswith(".invalid")


async def test_profile_claims_a_column_cannot_hold_are_left_out(
    livegate: Livegate, generated_keys: dict[str, SigningKey]
):
    payload = claims(given_name="Ai\x00ko", family_name="Tanaka \ud800")
    response = await get(livegate, token=sign(generated_keys["rsa"], payload))
    assert response.status_code == 200, response.text
    user = response.json()["user"]
    assert (user["firstName"], user["lastName"]) == (None, None)


async def test_issuer_tokens_reach_every_surface(
    livegate: Livegate, generated_keys: dict[str, SigningKey]
):
    token = sign(generated_keys["ec"], claims())
    for path in ("/v1/models", "/api/usage/quota", "/api/auth/me", "/api/user/api-key"):
        response = await get(livegate, path, token=token)
        assert response.status_code == 200, (path, response.text)


# --- refused ------------------------------------------------------------------------


def _alg_none(keys: dict[str, SigningKey], secret: bytes) -> str:
    return hand_made({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims(), None)


def _alg_none_uppercase(keys: dict[str, SigningKey], secret: bytes) -> str:
    return hand_made({"alg": "None", "typ": "JWT", "kid": "rsa-1"}, claims(), None)


def _hs256_with_rsa_public_pem(keys: dict[str, SigningKey], secret: bytes) -> str:
    # Key confusion: the issuer's public key (which anyone has) used as an HMAC secret.
    header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    return hand_made(header, claims(), keys["rsa"].public_pem())


def _hs256_with_jwk_json(keys: dict[str, SigningKey], secret: bytes) -> str:
    header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    return hand_made(header, claims(), json.dumps(keys["rsa"].jwk()).encode())


def _hs256_with_our_secret(keys: dict[str, SigningKey], secret: bytes) -> str:
    return jwt.encode(claims(), secret, algorithm="HS256", headers={"kid": "rsa-1"})


def _wrong_issuer(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["rsa"], claims(iss="https://evil.test"))


def _issuer_with_trailing_slash(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["rsa"], claims(iss=ISSUER + "/"))


def _wrong_audience(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["rsa"], claims(aud="another-app"))


def _missing_audience(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["rsa"], claims(aud=None))


def _wrong_azp(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["rsa"], claims(azp="https://evil.test"))


def _missing_azp(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["rsa"], claims(azp=None))


def _expired(keys: dict[str, SigningKey], secret: bytes) -> str:
    now = int(time.time())
    return sign(keys["rsa"], claims(iat=now - 600, nbf=now - 600, exp=now - 60))


def _not_yet_valid(keys: dict[str, SigningKey], secret: bytes) -> str:
    now = int(time.time())
    return sign(keys["ec"], claims(nbf=now + 600, exp=now + 900))


def _missing_sub(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["rsa"], claims(sub=None))


def _empty_sub(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["rsa"], claims(sub=""))


def _sub_with_nul(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["rsa"], claims(sub="user_\x00admin"))


def _missing_exp(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["rsa"], claims(exp=None))


def _unknown_kid(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["attacker-rsa"], claims(), kid="no-such-kid")


def _unpublished_key_with_known_kid(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["attacker-rsa"], claims())  # kid "rsa-1", another key


def _unpublished_ec_key_with_known_kid(keys: dict[str, SigningKey], secret: bytes) -> str:
    return sign(keys["attacker-ec"], claims())  # kid "ec-1", another key


def _tampered_payload(keys: dict[str, SigningKey], secret: bytes) -> str:
    header, _, signature = sign(keys["rsa"], claims()).split(".")
    forged = b64url(json.dumps(claims(sub="user_admin")).encode())
    return f"{header}.{forged}.{signature}"


def _ps_not_allowed(keys: dict[str, SigningKey], secret: bytes) -> str:
    # PS256 is asymmetric but not in this issuer's allow-list (RS256, ES256).
    return jwt.encode(claims(), keys["rsa"].private, algorithm="PS256", headers={"kid": "rsa-1"})


REFUSED = {
    "alg-none": _alg_none,
    "alg-None": _alg_none_uppercase,
    "hs256-rsa-public-pem-as-secret": _hs256_with_rsa_public_pem,
    "hs256-jwk-json-as-secret": _hs256_with_jwk_json,
    "hs256-our-secret-their-issuer": _hs256_with_our_secret,
    "wrong-issuer": _wrong_issuer,
    "issuer-trailing-slash": _issuer_with_trailing_slash,
    "wrong-audience": _wrong_audience,
    "missing-audience": _missing_audience,
    "wrong-azp": _wrong_azp,
    "missing-azp": _missing_azp,
    "expired": _expired,
    "not-yet-valid": _not_yet_valid,
    "missing-sub": _missing_sub,
    "empty-sub": _empty_sub,
    "sub-with-nul": _sub_with_nul,
    "missing-exp": _missing_exp,
    "unknown-kid": _unknown_kid,
    "unpublished-rsa-key-known-kid": _unpublished_key_with_known_kid,
    "unpublished-ec-key-known-kid": _unpublished_ec_key_with_known_kid,
    "tampered-payload": _tampered_payload,
    "ps256-not-allowed": _ps_not_allowed,
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_bad_issuer_tokens_are_refused(
    livegate: Livegate, generated_keys: dict[str, SigningKey], case: str
):
    secret = livegate.settings.jwt_secret
    assert secret is not None
    token = REFUSED[case](generated_keys, secret.get_secret_value().encode())
    identities_before = await identity_count(livegate, "clerk")
    for path in (PROFILE, "/v1/models"):
        response = await get(livegate, path, token=token)
        assert response.status_code == 401, (path, response.text)
    assert_401(await get(livegate, token=token))
    assert await identity_count(livegate, "clerk") == identities_before
    # The issuer's real tokens still work on this instance.
    assert (await get(livegate, token=sign(generated_keys["rsa"], claims()))).status_code == 200


@pytest.mark.parametrize(
    ("header_alg", "signer", "kid"),
    [("ES256", "attacker-ec", "rsa-1"), ("RS256", "attacker-rsa", "ec-1")],
    ids=["es256-on-rsa-kid", "rs256-on-ec-kid"],
)
async def test_alg_that_does_not_fit_the_kids_key_is_401_not_500(
    livegate: Livegate,
    generated_keys: dict[str, SigningKey],
    header_alg: str,
    signer: str,
    kid: str,
):
    key = generated_keys[signer]
    assert key.alg == header_alg
    token = jwt.encode(claims(), key.private, algorithm=header_alg, headers={"kid": kid})
    assert_401(await get(livegate, token=token))


async def test_unknown_kids_refetch_the_jwks_at_most_once_per_window(
    livegate: Livegate, jwks: JwksServer, generated_keys: dict[str, SigningKey]
):
    assert jwks.fetches == 0  # nothing is fetched before a token needs it
    good = await get(livegate, token=sign(generated_keys["rsa"], claims()))
    assert good.status_code == 200, good.text
    assert jwks.fetches == 1
    # A flood of unknown kids must not turn into a flood of fetches at the issuer.
    for i in range(20):
        token = sign(generated_keys["attacker-rsa"], claims(), kid=f"unknown-{i}")
        assert_401(await get(livegate, token=token))
    assert 1 <= jwks.fetches <= 2, jwks.fetches
    # Known kids are served from the cache.
    before = jwks.fetches
    for _ in range(5):
        ok = await get(livegate, token=sign(generated_keys["ec"], claims()))
        assert ok.status_code == 200
    assert jwks.fetches == before


async def test_unknown_kid_as_the_first_token_fetches_once(
    livegate: Livegate, jwks: JwksServer, generated_keys: dict[str, SigningKey]
):
    for i in range(10):
        token = sign(generated_keys["attacker-ec"], claims(), kid=f"unknown-{i}")
        assert_401(await get(livegate, token=token))
    assert jwks.fetches == 1


async def test_key_rotation_is_picked_up(
    livegate: Livegate,
    jwks: JwksServer,
    generated_keys: dict[str, SigningKey],
    monkeypatch: pytest.MonkeyPatch,
):
    old, new = generated_keys["rsa"], generated_keys["rotated"]
    assert (await get(livegate, token=sign(old, claims()))).status_code == 200
    assert jwks.fetches == 1

    # The issuer rotates: the new key replaces the old one.
    jwks.keys = [new, generated_keys["ec"]]
    monkeypatch.setattr(JwksCache, "MIN_REFETCH", 0)
    response = await get(livegate, token=sign(new, claims()))
    assert response.status_code == 200, response.text
    assert jwks.fetches == 2
    # The cache now holds the new set: the retired key's tokens are refused.
    assert_401(await get(livegate, token=sign(old, claims())))


async def test_a_jwks_answer_past_its_limit_is_not_read(
    livegate: Livegate,
    jwks: JwksServer,
    generated_keys: dict[str, SigningKey],
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(JwksCache, "MIN_REFETCH", 0)
    token = sign(generated_keys["rsa"], claims())
    jwks.padding = MAX_IDENTITY_ANSWER_BYTES
    assert_401(await get(livegate, token=token))
    assert jwks.fetches == 1
    # The same keys in a shorter answer are taken.
    jwks.padding = MAX_IDENTITY_ANSWER_BYTES - 4096
    response = await get(livegate, token=token)
    assert response.status_code == 200, response.text


async def test_jwks_unreachable_refuses_tokens_without_failing(
    start_livegate: StartLivegate, generated_keys: dict[str, SigningKey]
):
    config = AuthConfig(
        issuers=[
            IssuerConfig(
                name="clerk",
                issuer=ISSUER,
                jwks_url="http://127.0.0.1:9/.well-known/jwks.json",
                audience=AUDIENCE,
            )
        ]
    )
    livegate = await start_livegate(auth=config)
    assert_401(await get(livegate, token=sign(generated_keys["rsa"], claims())))


# --- our own tokens -------------------------------------------------------------------


def _own_claims(user_id: str) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": user_id,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "iss": "livegate",
    }


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_our_tokens_refuse_alg_none_and_key_confusion(
    livegate: Livegate, generated_keys: dict[str, SigningKey]
):
    account = await livegate.account()
    secret = livegate.settings.jwt_secret
    assert secret is not None
    payload = _own_claims(account.user.id)
    # The real thing works.
    valid = jwt.encode(payload, secret.get_secret_value(), algorithm="HS256")
    assert (await get(livegate, token=valid)).status_code == 200

    forged = {
        "alg-none": hand_made({"alg": "none", "typ": "JWT"}, payload, None),
        "rs256-attacker-key": jwt.encode(
            payload, generated_keys["attacker-rsa"].private, algorithm="RS256"
        ),
        "rs256-issuer-key": jwt.encode(payload, generated_keys["rsa"].private, algorithm="RS256"),
        "es256-issuer-key": jwt.encode(payload, generated_keys["ec"].private, algorithm="ES256"),
        "hs256-issuer-public-pem": hand_made(
            {"alg": "HS256", "typ": "JWT"}, payload, generated_keys["rsa"].public_pem()
        ),
        "hs256-wrong-secret": jwt.encode(payload, "x" * 48, algorithm="HS256"),
        "hs512-our-secret": jwt.encode(payload, secret.get_secret_value(), algorithm="HS512"),
    }
    for name, token in forged.items():
        response = await get(livegate, token=token)
        assert response.status_code == 401, (name, response.text)


# --- x-user-id (development only) ---------------------------------------------------


async def test_x_user_id_works_in_development(livegate: Livegate):
    assert livegate.settings.environment.value == "development"
    dev_id = f"user-alice-{uuid.uuid4().hex[:6]}"
    first = await get(livegate, **{"x-user-id": dev_id})
    assert first.status_code == 200, first.text
    assert await identity_count(livegate, "dev", dev_id) == 1
    again = await get(livegate, "/api/usage/quota", **{"x-user-id": dev_id})
    assert again.status_code == 200, again.text
    profile = await get(livegate, **{"x-user-id": dev_id})
    assert profile.json()["user"]["id"] == first.json()["user"]["id"]
    assert await identity_count(livegate, "dev", dev_id) == 1
    other = await get(livegate, **{"x-user-id": dev_id + "-bob"})
    assert other.json()["user"]["id"] != first.json()["user"]["id"]


async def test_x_user_id_is_refused_in_production(
    start_livegate: StartLivegate, generated_keys: dict[str, SigningKey]
):
    livegate = await start_livegate(environment="production")
    dev_id = f"user-alice-{uuid.uuid4().hex[:6]}"
    for path in (PROFILE, "/api/usage/quota", "/api/auth/me", "/v1/models"):
        response = await get(livegate, path, **{"x-user-id": dev_id})
        assert response.status_code == 401, (path, response.text)
    assert await identity_count(livegate, "dev", dev_id) == 0
    # Real credentials still work in production.
    account = await livegate.account()
    assert (await get(livegate, token=account.token)).status_code == 200
    # And a bearer credential is not overridden by the header.
    both = await get(livegate, token=account.token, **{"x-user-id": dev_id})
    assert both.json()["user"]["id"] == account.user.id


async def test_an_overlong_x_user_id_is_refused_not_a_500(livegate: Livegate):
    response = await get(livegate, **{"x-user-id": "a" * 300})
    assert response.status_code == 401, response.text
