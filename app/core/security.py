"""Tokens, keys and passwords: issuing, verifying and keeping them out of plain text."""

from __future__ import annotations

import base64
import hashlib
import math
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.core.config import Environment, Settings
from app.core.strict_json import storable

JWT_ALGORITHM = "HS256"
JWT_ISSUER = "livegate"
JWT_LIFETIME = timedelta(hours=24)
API_KEY_PREFIX = "sk-lg-"
# Own tokens kept verified: a client sends the same token with every request until it
# expires, and decoding one (signature, claims) costs ~0.1 ms of CPU.
VERIFIED_TOKENS_KEPT = 4096


def new_id() -> str:
    """A random 128-bit id as 32 hex digits, the shape of `uuid4().hex`.

    At a fifth of `uuid4`'s cost, which builds an object and its version bits only to
    print them: every relayed request takes two.
    """
    return os.urandom(16).hex()


# The longest id a column of ours holds (ours are 32 hex digits): a longer claim would
# fail the lookup or the denylist write it goes into.
MAX_CLAIM_LENGTH = 64


def _claim_text(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_CLAIM_LENGTH and storable(value)


class InvalidTokenError(Exception):
    """A bearer token that is malformed, forged, expired or from another issuer."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    subject: str
    token_id: str
    issued_at: datetime
    expires_at: datetime
    session_id: str | None = None  # the refresh-token family the token belongs to


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A freshly generated key: `plaintext` leaves the server once and is never stored."""

    plaintext: str
    hash: str
    mask: str


class Secrets:
    """The server secret and everything derived from it."""

    def __init__(self, jwt_secret: str) -> None:
        self._jwt_key = jwt_secret.encode()
        # A separate key for encrypting stored relay keys, so the signing key is never
        # used for two purposes.
        derived = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"livegate relay-key encryption"
        ).derive(self._jwt_key)
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))
        # By the token's hash (`hash_key`, as API keys are): memory holds no usable
        # credential.
        self._verified: dict[str, TokenClaims] = {}  # oldest first

    @classmethod
    def from_settings(cls, settings: Settings) -> Secrets:
        if settings.jwt_secret is not None:
            return cls(settings.jwt_secret.get_secret_value())
        if settings.environment is Environment.PRODUCTION:
            raise RuntimeError("JWT_SECRET is required in production")
        return cls(_development_secret(settings.data_dir))

    def issue_token(
        self, subject: str, now: datetime | None = None, session_id: str | None = None
    ) -> str:
        now = now or datetime.now(UTC)
        payload: dict[str, object] = {
            "sub": subject,
            # In milliseconds, rounded down: a token issued before a password change,
            # even in the same second, is refused (`tokens_valid_after`).
            "iat": math.floor(now.timestamp() * 1000) / 1000,
            "exp": int((now + JWT_LIFETIME).timestamp()),
            "jti": new_id(),
            "iss": JWT_ISSUER,
        }
        if session_id is not None:
            payload["sid"] = session_id
        return jwt.encode(payload, self._jwt_key, algorithm=JWT_ALGORITHM)

    def verify_token(self, token: str) -> TokenClaims:
        """The claims of one of our tokens, or `InvalidTokenError`. A token verified
        before is taken from memory (`verified`) until it expires."""
        token_hash = hash_key(token)
        if (claims := self._remembered(token_hash)) is not None:
            return claims
        try:
            payload = jwt.decode(
                token,
                self._jwt_key,
                algorithms=[JWT_ALGORITHM],
                issuer=JWT_ISSUER,
                options={"require": ["sub", "iat", "exp", "jti", "iss"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidTokenError(str(exc)) from exc
        subject, token_id, session_id = payload["sub"], payload["jti"], payload.get("sid")
        # Only a holder of the secret can sign claims, but none of them may fail the
        # lookups they go into: text a database column takes, times a datetime holds.
        if not (
            _claim_text(subject)
            and _claim_text(token_id)
            and (session_id is None or _claim_text(session_id))
        ):
            raise InvalidTokenError("malformed claims")
        try:
            issued_at = datetime.fromtimestamp(payload["iat"], UTC)
            expires_at = datetime.fromtimestamp(payload["exp"], UTC)
        except (OverflowError, OSError, ValueError, TypeError) as exc:
            # TypeError: a string of digits, which PyJWT's own checks let through.
            raise InvalidTokenError("a time claim is out of range") from exc
        claims = TokenClaims(
            subject=subject,
            token_id=token_id,
            issued_at=issued_at,
            expires_at=expires_at,
            session_id=session_id,
        )
        if len(self._verified) >= VERIFIED_TOKENS_KEPT:
            del self._verified[next(iter(self._verified))]
        self._verified[token_hash] = claims
        return claims

    def verified(self, token: str) -> TokenClaims | None:
        """The claims of `token` if `verify_token` accepted it lately and it has not
        expired since; None otherwise. Revocation is the caller's to check, as after
        `verify_token`."""
        return self._remembered(hash_key(token))

    def _remembered(self, token_hash: str) -> TokenClaims | None:
        claims = self._verified.get(token_hash)
        if claims is not None and claims.expires_at <= datetime.now(UTC):
            del self._verified[token_hash]
            return None
        return claims

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken as exc:
            raise RuntimeError("stored key cannot be decrypted: was JWT_SECRET changed?") from exc


def _development_secret(data_dir: Path) -> str:
    """A random secret kept under the data directory, so tokens survive restarts."""
    path = data_dir / "jwt_secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race; use its secret
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(secret)
    return secret


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def mask_key(key: str) -> str:
    return f"{key[:7]}...{key[-4:]}"


def generate_api_key() -> IssuedKey:
    plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
    return IssuedKey(plaintext=plaintext, hash=hash_key(plaintext), mask=mask_key(plaintext))


def looks_like_api_key(credential: str) -> bool:
    return credential.startswith(API_KEY_PREFIX)


# OWASP's argon2id recommendation: 19 MiB, 2 iterations, 1 lane.
_password_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


def hash_password(password: str) -> str:
    return _password_hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _password_hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
