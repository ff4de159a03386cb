"""Tokens, relay keys, secrets and passwords (app.core.security)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import stat
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from app.core.config import ConfigError, Environment, Settings, load_settings
from app.core.security import (
    API_KEY_PREFIX,
    JWT_LIFETIME,
    VERIFIED_TOKENS_KEPT,
    InvalidTokenError,
    Secrets,
    generate_api_key,
    hash_key,
    hash_password,
    looks_like_api_key,
    mask_key,
    new_id,
    verify_password,
)

SECRET = "unit-test-secret-" + "s" * 60
OTHER_SECRET = "another-secret-" + "o" * 40


@pytest.fixture
def secrets_() -> Secrets:
    return Secrets(SECRET)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    payload: dict[str, Any] = {
        "sub": "user-1",
        "iat": now,
        "exp": now + 3600,
        "jti": uuid.uuid4().hex,
        "iss": "livegate",
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def hand_made_token(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A JWT built byte by byte: HMAC-SHA256 over it with `key`, or no signature."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = (
        b64url(hmac.new(key, signing_input.encode(), hashlib.sha256).digest()) if key else ""
    )
    return f"{signing_input}.{signature}"


# --- JWTs -------------------------------------------------------------------------


def test_issued_token_carries_the_claims_and_verifies(secrets_: Secrets):
    now = datetime.now(UTC).replace(microsecond=0)
    token = secrets_.issue_token("user-42", now=now)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    payload = jwt.decode(token, options={"verify_signature": False})
    assert set(payload) == {"sub", "iat", "exp", "jti", "iss"}
    assert payload["sub"] == "user-42"
    assert payload["iss"] == "livegate"
    assert payload["iat"] == int(now.timestamp())
    assert payload["exp"] == payload["iat"] + 24 * 3600
    assert isinstance(payload["jti"], str) and len(payload["jti"]) >= 16

    verified = secrets_.verify_token(token)
    assert verified.subject == "user-42"
    assert verified.token_id == payload["jti"]
    assert verified.issued_at == now
    assert verified.expires_at - verified.issued_at == timedelta(hours=24)


def test_every_token_has_its_own_jti(secrets_: Secrets):
    now = datetime.now(UTC)
    ids = {secrets_.verify_token(secrets_.issue_token("u", now=now)).token_id for _ in range(20)}
    assert len(ids) == 20


def test_token_verifies_across_instances_with_the_same_secret():
    token = Secrets(SECRET).issue_token("user-1")
    assert Secrets(SECRET).verify_token(token).subject == "user-1"


def test_token_signed_with_another_secret_is_refused(secrets_: Secrets):
    forged = Secrets(OTHER_SECRET).issue_token("user-1")
    with pytest.raises(InvalidTokenError):
        secrets_.verify_token(forged)


def test_tampered_payload_is_refused(secrets_: Secrets):
    token = secrets_.issue_token("user-1")
    header, _, signature = token.split(".")
    payload = b64url(json.dumps(claims(sub="admin")).encode())
    with pytest.raises(InvalidTokenError):
        secrets_.verify_token(f"{header}.{payload}.{signature}")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_token_is_refused(secrets_: Secrets, alg: str):
    token = hand_made_token({"alg": alg, "typ": "JWT"}, claims(), key=None)
    with pytest.raises(InvalidTokenError):
        secrets_.verify_token(token)


def test_hs512_token_with_the_right_secret_is_refused(secrets_: Secrets):
    token = jwt.encode(claims(), SECRET.encode(), algorithm="HS512")
    with pytest.raises(InvalidTokenError):
        secrets_.verify_token(token)


def test_rs256_labelled_token_hmac_signed_with_the_secret_is_refused(secrets_: Secrets):
    # Algorithm confusion: the header claims RS256, the signature is HMAC over the secret.
    token = hand_made_token({"alg": "RS256", "typ": "JWT"}, claims(), key=SECRET.encode())
    with pytest.raises(InvalidTokenError):
        secrets_.verify_token(token)


def test_genuine_rs256_token_is_refused(secrets_: Secrets):
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), private_key, algorithm="RS256")
    with pytest.raises(InvalidTokenError):
        secrets_.verify_token(token)


def test_hand_made_hs256_token_is_accepted(secrets_: Secrets):
    # Control for the hand-made tokens above: the same construction with HS256 passes.
    token = hand_made_token({"alg": "HS256", "typ": "JWT"}, claims(sub="u-7"), SECRET.encode())
    assert secrets_.verify_token(token).subject == "u-7"


@pytest.mark.parametrize("issuer", ["other", "", "Livegate"])
def test_wrong_issuer_is_refused(secrets_: Secrets, issuer: str):
    token = jwt.encode(claims(iss=issuer), SECRET.encode(), algorithm="HS256")
    with pytest.raises(InvalidTokenError):
        secrets_.verify_token(token)


def test_expired_token_is_refused(secrets_: Secrets):
    token = secrets_.issue_token("user-1", now=datetime.now(UTC) - timedelta(hours=24, minutes=1))
    with pytest.raises(InvalidTokenError):
        secrets_.verify_token(token)


def test_token_near_the_end_of_its_lifetime_still_verifies(secrets_: Secrets):
    token = secrets_.issue_token("user-1", now=datetime.now(UTC) - timedelta(hours=23, minutes=50))
    assert secrets_.verify_token(token).subject == "user-1"


def test_a_verified_token_is_remembered_until_it_expires(secrets_: Secrets):
    # Issued so that it expires within about two seconds.
    issued = datetime.now(UTC) - JWT_LIFETIME + timedelta(seconds=2)
    token = secrets_.issue_token("user-1", now=issued)
    assert secrets_.verified(token) is None  # never verified: not known
    claims = secrets_.verify_token(token)
    assert secrets_.verified(token) == claims
    assert secrets_.verify_token(token) == claims
    while datetime.now(UTC) <= claims.expires_at:  # no clock of our own to move
        time.sleep(0.05)
    assert secrets_.verified(token) is None
    with pytest.raises(InvalidTokenError):
        secrets_.verify_token(token)


def test_a_remembered_token_vouches_for_no_other_text(secrets_: Secrets):
    token = secrets_.issue_token("user-1")
    secrets_.verify_token(token)
    header, payload, signature = token.split(".")
    other = Secrets(OTHER_SECRET).issue_token("user-2")
    for forged in (
        f"{header}.{other.split('.')[1]}.{signature}",
        f"{header}.{payload}.{signature[:-2]}AA",
        token + " ",
    ):
        assert secrets_.verified(forged) is None
        with pytest.raises(InvalidTokenError):
            secrets_.verify_token(forged)


def test_remembered_tokens_are_bounded_oldest_forgotten_first(secrets_: Secrets):
    tokens = [secrets_.issue_token(f"user-{i}") for i in range(VERIFIED_TOKENS_KEPT + 1)]
    for token in tokens:
        secrets_.verify_token(token)
    assert secrets_.verified(tokens[0]) is None
    assert secrets_.verified(tokens[1]) is not None
    assert secrets_.verified(tokens[-1]) is not None
    # Forgotten is not refused: it verifies again.
    assert secrets_.verify_token(tokens[0]).subject == "user-0"


@pytest.mark.parametrize("missing", ["sub", "iat", "exp", "jti", "iss"])
def test_token_missing_a_claim_is_refused(secrets_: Secrets, missing: str):
    payload = claims()
    del payload[missing]
    token = jwt.encode(payload, SECRET.encode(), algorithm="HS256")
    with pytest.raises(InvalidTokenError):
        secrets_.verify_token(token)


@pytest.mark.parametrize(
    "changes",
    [
        {"sub": 123},
        {"sub": ["a"]},
        {"jti": 5},
        {"exp": "tomorrow"},
        {"iat": "now"},
        # Signed with the secret, yet no lookup could take them.
        {"sub": "\ud800"},
        {"sub": "a\x00b"},
        {"sub": ""},
        {"sub": "u" * 65},
        {"sid": "s" * 65},
        {"jti": "\udfff"},
        {"sid": "s\x00"},
        {"sid": 5},
        {"exp": 1e20},
        {"iat": -1e12},
        {"exp": str(int(time.time()) + 3600)},
    ],
    ids=[
        "sub-int",
        "sub-list",
        "jti-int",
        "exp-str",
        "iat-str",
        "sub-surrogate",
        "sub-nul",
        "sub-empty",
        "sub-too-long",
        "sid-too-long",
        "jti-surrogate",
        "sid-nul",
        "sid-int",
        "exp-past-any-date",
        "iat-before-any-date",
        "exp-digits-string",
    ],
)
def test_token_with_malformed_claims_is_refused(secrets_: Secrets, changes: dict[str, Any]):
    token = hand_made_token({"alg": "HS256", "typ": "JWT"}, claims(**changes), SECRET.encode())
    with pytest.raises(InvalidTokenError):
        secrets_.verify_token(token)


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "....", "sk-lg-notatoken"])
def test_garbage_is_refused(secrets_: Secrets, garbage: str):
    with pytest.raises(InvalidTokenError):
        secrets_.verify_token(garbage)


# --- Relay keys -------------------------------------------------------------------


def test_generated_api_key_shape_hash_and_mask():
    issued = generate_api_key()
    assert API_KEY_PREFIX == "sk-lg-"
    assert issued.plaintext.startswith("sk-lg-")
    assert looks_like_api_key(issued.plaintext)
    # At least 32 random bytes after the prefix.
    assert len(issued.plaintext) >= len("sk-lg-") + 43
    assert re.fullmatch(r"sk-lg-[A-Za-z0-9_-]+", issued.plaintext)
    assert issued.hash == hashlib.sha256(issued.plaintext.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", issued.hash)
    assert issued.hash == hash_key(issued.plaintext)
    assert issued.mask == issued.plaintext[:7] + "..." + issued.plaintext[-4:]
    assert issued.plaintext not in issued.mask


def test_mask_key_shows_first_seven_and_last_four():
    assert mask_key("sk-lg-abcdefghijklmnop") == "sk-lg-a...mnop"


def test_generated_keys_are_unique():
    keys = [generate_api_key().plaintext for _ in range(50)]
    assert len(set(keys)) == 50


def test_jwt_does_not_look_like_an_api_key(secrets_: Secrets):
    assert not looks_like_api_key(secrets_.issue_token("user-1"))


def test_encrypt_decrypt_round_trip(secrets_: Secrets):
    key = generate_api_key().plaintext
    ciphertext = secrets_.encrypt(key)
    assert ciphertext != key
    assert key not in ciphertext
    assert key.removeprefix("sk-lg-") not in ciphertext
    assert secrets_.decrypt(ciphertext) == key
    # Another instance with the same secret decrypts it too (restart, other replica).
    assert Secrets(SECRET).decrypt(ciphertext) == key


def test_encryption_is_randomized(secrets_: Secrets):
    key = generate_api_key().plaintext
    assert secrets_.encrypt(key) != secrets_.encrypt(key)


def test_another_secret_cannot_decrypt(secrets_: Secrets):
    ciphertext = secrets_.encrypt(generate_api_key().plaintext)
    with pytest.raises(RuntimeError, match="JWT_SECRET"):
        Secrets(OTHER_SECRET).decrypt(ciphertext)


def test_tampered_ciphertext_is_refused(secrets_: Secrets):
    ciphertext = secrets_.encrypt(generate_api_key().plaintext)
    flipped = ciphertext[:-6] + ("A" if ciphertext[-6] != "A" else "B") + ciphertext[-5:]
    with pytest.raises(RuntimeError):
        secrets_.decrypt(flipped)


# --- The server secret --------------------------------------------------------------


def test_development_secret_is_persisted_with_0600_and_reused(tmp_path: Path):
    data_dir = tmp_path / "nested" / "data"
    settings = Settings(livegate_data_dir=data_dir, jwt_secret=None)
    first = Secrets.from_settings(settings)
    secret_file = data_dir / "jwt_secret"
    assert secret_file.is_file()
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    content = secret_file.read_text().strip()
    assert len(content) >= 32

    token = first.issue_token("user-1")
    second = Secrets.from_settings(settings)
    assert secret_file.read_text().strip() == content
    assert second.verify_token(token).subject == "user-1"
    assert Secrets(content).verify_token(token).subject == "user-1"


def test_development_secrets_differ_between_data_dirs(tmp_path: Path):
    one = Secrets.from_settings(Settings(livegate_data_dir=tmp_path / "a", jwt_secret=None))
    two = Secrets.from_settings(Settings(livegate_data_dir=tmp_path / "b", jwt_secret=None))
    with pytest.raises(InvalidTokenError):
        two.verify_token(one.issue_token("user-1"))


def test_configured_secret_wins_and_nothing_is_written(tmp_path: Path):
    settings = Settings(livegate_data_dir=tmp_path, jwt_secret=SECRET)
    token = Secrets.from_settings(settings).issue_token("user-1")
    assert Secrets(SECRET).verify_token(token).subject == "user-1"
    assert not (tmp_path / "jwt_secret").exists()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("JWT_SECRET", "ENVIRONMENT", "LIVEGATE_CONFIG", "LIVEGATE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_production_without_jwt_secret_is_a_config_error(clean_env: pytest.MonkeyPatch, tmp_path):
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        load_settings(environment="production", livegate_data_dir=tmp_path)
    assert not (tmp_path / "jwt_secret").exists()


def test_production_from_the_environment_without_secret_is_refused(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
):
    clean_env.setenv("ENVIRONMENT", "production")
    clean_env.setenv("LIVEGATE_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        load_settings()


def test_production_with_short_secret_is_refused(clean_env: pytest.MonkeyPatch):
    clean_env.setenv("JWT_SECRET", "short")
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        load_settings(environment="production")


def test_production_with_a_strong_secret_loads(clean_env: pytest.MonkeyPatch):
    clean_env.setenv("JWT_SECRET", SECRET)
    settings = load_settings(environment="production")
    assert settings.environment is Environment.PRODUCTION
    token = Secrets.from_settings(settings).issue_token("user-1")
    assert Secrets(SECRET).verify_token(token).subject == "user-1"


def test_secrets_refuse_production_without_secret_even_if_settings_bypass_checks(tmp_path):
    settings = Settings(environment="production", jwt_secret=None, livegate_data_dir=tmp_path)
    with pytest.raises(RuntimeError, match="JWT_SECRET"):
        Secrets.from_settings(settings)
    assert not (tmp_path / "jwt_secret").exists()


# --- Passwords ----------------------------------------------------------------------


def test_password_hash_is_argon2id_and_verifies():
    hashed = hash_password("correct horse battery staple")
    assert hashed.startswith("$argon2id$")
    assert "correct horse" not in hashed
    assert verify_password(hashed, "correct horse battery staple")
    assert not verify_password(hashed, "correct horse battery stapler")
    assert not verify_password(hashed, "")


def test_password_hashes_are_salted():
    assert hash_password("same") != hash_password("same")


@pytest.mark.parametrize("bad_hash", ["", "not-a-hash", "$argon2id$v=19$m=1$broken"])
def test_verify_password_against_garbage_hash_is_false(bad_hash: str):
    assert verify_password(bad_hash, "whatever") is False


def test_new_id_is_32_hex_digits_and_never_repeats() -> None:
    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
