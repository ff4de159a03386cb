"""Settings from the environment and the optional TOML file.

The environment holds what differs per deployment (`DATABASE_URL`, `REDIS_URL`,
`ENVIRONMENT`, `JWT_SECRET`, `LIVEGATE_CONFIG`); the TOML file holds providers, tiers
and tuning. Every TOML key is optional and the defaults reproduce the specs' numbers.
"""

from __future__ import annotations

import enum
import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

Period = Literal["minute", "hour", "day", "week", "month", "lifetime"]
PositiveInt = Annotated[int, Field(ge=0)]
# Only asymmetric algorithms for external issuers: an HS* token could be forged with
# the public key as the secret.
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
AsymmetricAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "ES256", "ES384"]


class ConfigError(Exception):
    """The environment or the TOML file is invalid; the message says where."""


class Environment(enum.StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class _Strict(BaseModel):
    # A misspelt key in a hand-written file must fail loudly, not mean "unlimited".
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    """USD per million tokens."""

    prompt: float = Field(default=0.0, ge=0)
    completion: float = Field(default=0.0, ge=0)


class ProviderConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    # "openai": any OpenAI-compatible API; "anthropic": the Messages API, translated.
    kind: Literal["openai", "anthropic"] = "openai"
    base_url: str = Field(min_length=1)
    api_key: SecretStr | None = None
    models: list[str] = Field(min_length=1)
    connect_timeout: float = Field(default=10.0, gt=0)
    # Time allowed between two bytes of the upstream response (first token included).
    read_timeout: float = Field(default=120.0, gt=0)
    # Attempts on 429/5xx/timeouts before the first token, before falling back.
    max_retries: int = Field(default=1, ge=0, le=10)
    # The most an answer may take, decoded: a whole answer, or one event of a stream.
    max_response_bytes: int = Field(default=33_554_432, ge=65_536)
    prices: dict[str, Price] = Field(default_factory=dict)


class ModelRoute(_Strict):
    """A model name clients may ask for, served by an ordered fallback chain."""

    name: str = Field(min_length=1)
    # "provider:model" targets, tried in order until one answers before its first token.
    targets: list[str] = Field(min_length=1)
    description: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        for target in value:
            provider, _, model = target.partition(":")
            if not provider or not model:
                raise ValueError(f"target {target!r} must be written provider:model")
        return value


class CounterLimit(_Strict):
    limit: PositiveInt | None = None
    per: Period = "day"


class RateOverride(_Strict):
    """A tier's request rate on one surface, where that surface's spec differs. The
    rate is required: an override giving only a burst would otherwise leave the
    surface unlimited without saying so."""

    requests_per_minute: PositiveInt
    burst: PositiveInt | None = None


class TierConfig(_Strict):
    """One tier's limits; a key left out (None) means unlimited."""

    requests_per_minute: PositiveInt | None = None
    burst: PositiveInt | None = None
    # Per-surface request rates ("openai", "sokuji", "playground", ...), e.g. the
    # Playground's 30/min for `basic` beside Sokuji's 60/min.
    surfaces: dict[str, RateOverride] = Field(default_factory=dict)
    daily_requests: PositiveInt | None = None
    weekly_requests: PositiveInt | None = None
    monthly_requests: PositiveInt | None = None
    monthly_tokens: PositiveInt | None = None
    counters: dict[str, CounterLimit] = Field(default_factory=dict)


def _builtin_tiers() -> dict[str, TierConfig]:
    """Every number the specs give, by tier.

    Rates: Sokuji's table (`free` 10/20, `basic` 60/100, `premium` 300/500,
    `enterprise` unlimited), with the Playground's own where it differs (`basic` 30,
    `pro` 100, `enterprise` 500). AI request quotas: the Playground's daily limits,
    weekly = 7x and monthly = 30x as its free-tier example shows (50/350/1500).
    Tokens: Sokuji's. Counters: Navi's 20 messages a day and AnkiLingoFlash's 100
    generations, 5 regenerations a card, on `free`; Navi's `pro` is unlimited.
    """
    free_counters = {
        "chat_messages": CounterLimit(limit=20, per="day"),
        "flashcard_generations": CounterLimit(limit=100, per="lifetime"),
        "flashcard_regenerations": CounterLimit(limit=5, per="lifetime"),
    }

    def requests(daily: int) -> dict[str, int]:
        return {
            "daily_requests": daily,
            "weekly_requests": 7 * daily,
            "monthly_requests": 30 * daily,
        }

    return {
        "free": TierConfig(
            requests_per_minute=10,
            burst=20,
            **requests(50),
            monthly_tokens=1_000_000,
            counters=free_counters,
        ),
        "basic": TierConfig(
            requests_per_minute=60,
            burst=100,
            **requests(500),
            monthly_tokens=10_000_000,
            surfaces={"playground": RateOverride(requests_per_minute=30)},
        ),
        "pro": TierConfig(
            requests_per_minute=100,
            **requests(2000),
            monthly_tokens=20_000_000,
        ),
        "premium": TierConfig(
            requests_per_minute=300,
            burst=500,
            monthly_tokens=50_000_000,
        ),
        "enterprise": TierConfig(
            surfaces={"playground": RateOverride(requests_per_minute=500)},
        ),
        # Callers without an account, counted per client IP (Navi's anonymous chat).
        "anonymous": TierConfig(
            requests_per_minute=10,
            burst=20,
            counters={"chat_messages": CounterLimit(limit=20, per="day")},
        ),
    }


class ActionLimit(_Strict):
    """A per-action limit: `limit` per `window_seconds`, counted per `scope` value."""

    limit: int = Field(ge=1)
    window_seconds: int = Field(ge=1)
    scope: Literal["user", "ip", "email", "email_ip"] = "user"


def _builtin_actions() -> dict[str, ActionLimit]:
    return {
        # Wrong passwords for one email from one address. Per address, so that no one
        # else can lock the owner out by failing on purpose.
        "login_fail": ActionLimit(limit=10, window_seconds=900, scope="email_ip"),
        # The workspace spec's table.
        "otp_send": ActionLimit(limit=3, window_seconds=600, scope="email"),
        "otp_send_ip": ActionLimit(limit=10, window_seconds=600, scope="ip"),
        "otp_try": ActionLimit(limit=5, window_seconds=600, scope="email"),
        "voice_execute": ActionLimit(limit=20, window_seconds=60, scope="user"),
        "thread_create": ActionLimit(limit=10, window_seconds=60, scope="user"),
        "work_item_create": ActionLimit(limit=50, window_seconds=3600, scope="user"),
    }


class MeteringConfig(_Strict):
    # A checkpoint writes the usage row and the quota counter and pushes the quota;
    # it happens after this many delivered tokens or this many ms, whichever is first.
    checkpoint_tokens: int = Field(default=20, ge=1)
    checkpoint_ms: int = Field(default=250, ge=10)
    # Quota pushes per user are coalesced to at most one per this interval.
    push_interval_ms: int = Field(default=100, ge=0)
    # How often each instance proves it is alive; streams of an instance silent for
    # three intervals are finalized as interrupted by the others.
    heartbeat_seconds: float = Field(default=10.0, gt=0)


class ServerConfig(_Strict):
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # Proxies whose X-Forwarded-For is believed (CIDRs); empty: the peer is the client.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Browser origins allowed to call the API (e.g. "chrome-extension://<id>"); the
    # AnkiLingoFlash routes are open to every origin as their spec says.
    cors_origins: list[str] = Field(default_factory=list)
    # The model behind chats that name none (Navi's); None: the first configured one.
    chat_model: str | None = None
    ws_ping_seconds: float = Field(default=25.0, gt=0)
    redis_prefix: str = Field(default="livegate", min_length=1)
    default_tier: str = "free"

    @field_validator("trusted_proxies")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)
        return value

    @property
    def trusted_proxy_networks(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.trusted_proxies)


class AnkiConfig(_Strict):
    # False (the default): the caller must prove it is the `userId` it names (a token
    # of that user, or of an external identity with that subject). True: the spec's
    # open mode, where any caller may act for any `userId`.
    open_mode: bool = False
    # Which external identities may prove a `userId` (the extension signs in with Google).
    identity_providers: list[str] = Field(default_factory=lambda: ["google"])
    # The origins `/oauth-redirect` hands the token to (the extension's own, such as
    # "chrome-extension://<id>"). Empty: any page that opened it, as in the spec.
    opener_origins: list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9+.-]*://[^/\s]+$")]] = Field(
        default_factory=list
    )


class OAuthConfig(_Strict):
    """The OAuth 2 / OIDC provider behind Navi's `/api/auth/login` (WorkOS, Google, ...)."""

    name: str = Field(default="oauth", min_length=1, max_length=64)
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    authorize_url: str = Field(min_length=1)
    token_url: str = Field(min_length=1)
    userinfo_url: str = Field(min_length=1)
    scope: str = "openid email profile"
    # This server's `/api/auth/callback` as the provider must call it back; unset, it
    # is derived from each login request's own URL (set it behind a proxy).
    callback_url: str | None = None
    # Where a finished login may send the app; the first is the default.
    app_redirects: list[str] = Field(default_factory=lambda: ["navi://auth/callback"], min_length=1)
    error_redirect: str = "navi://auth/error"


class StripeConfig(_Strict):
    """Navi's Pro subscription through Stripe Checkout and the billing portal.

    The keys come from the environment (`STRIPE_SECRET_KEY`, `STRIPE_WEBHOOK_SECRET`).
    """

    # The recurring price a checkout subscribes to, and the tier it grants.
    price_id: str = Field(min_length=1)
    tier: str = Field(default="pro", min_length=1)
    success_url: str = Field(min_length=1)
    cancel_url: str = Field(min_length=1)
    portal_return_url: str = Field(min_length=1)
    # Another Stripe-compatible API (stripe-mock, a test double); unset: Stripe's own.
    api_base: str | None = None


class WebhooksConfig(_Strict):
    """The Playground's outbound webhooks."""

    # False (the default): deliveries to loopback, private, link-local and other
    # non-public addresses are refused, so a webhook cannot probe the server's network.
    allow_private_networks: bool = False
    timeout_seconds: float = Field(default=10.0, gt=0)
    # Wait before each retry of a failed delivery; after the last, it is given up.
    retry_schedule_seconds: list[float] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 7200.0, 18000.0, 36000.0],
        max_length=20,
    )
    # `quota.warning` fires when a request quota's use first reaches each percentage.
    quota_warning_percents: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=lambda: [90, 100]
    )
    max_per_user: int = Field(default=20, ge=1)
    poll_seconds: float = Field(default=1.0, gt=0)


class IssuerConfig(_Strict):
    """An external identity provider whose bearer JWTs are accepted (Clerk, WorkOS, OIDC)."""

    name: str = Field(min_length=1, max_length=64)
    issuer: str = Field(min_length=1)
    jwks_url: str = Field(min_length=1)
    audience: str | list[str] | None = None
    # Clerk's `azp`: the origins allowed to have requested the token.
    authorized_parties: list[str] = Field(default_factory=list)
    algorithms: list[AsymmetricAlgorithm] = Field(
        default_factory=lambda: list[AsymmetricAlgorithm](["RS256", "ES256"]), min_length=1
    )


class AuthConfig(_Strict):
    issuers: list[IssuerConfig] = Field(default_factory=list)
    # Which issuer's subjects the Clerk webhook's user ids are.
    clerk_provider: str = "clerk"


class FileConfig(_Strict):
    """The TOML file's shape."""

    providers: list[ProviderConfig] = Field(default_factory=list)
    models: list[ModelRoute] = Field(default_factory=list)
    tiers: dict[str, TierConfig] = Field(default_factory=dict)
    actions: dict[str, ActionLimit] = Field(default_factory=dict)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    anki: AnkiConfig = Field(default_factory=AnkiConfig)
    oauth: OAuthConfig | None = None
    stripe: StripeConfig | None = None
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @model_validator(mode="after")
    def _check(self) -> FileConfig:
        names = [p.name for p in self.providers]
        if len(names) != len(set(names)):
            raise ValueError("provider names must be unique")
        served = {(p.name, m) for p in self.providers for m in p.models}
        for route in self.models:
            for target in route.targets:
                provider, _, model = target.partition(":")
                if provider not in names:
                    raise ValueError(f"model {route.name!r}: unknown provider {provider!r}")
                if (provider, model) not in served:
                    raise ValueError(
                        f"model {route.name!r}: provider {provider!r} does not list {model!r}"
                    )
        return self


class Settings(BaseSettings):
    """Everything the app reads at start-up, environment and file merged."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./data/livegate.db"
    redis_url: str | None = None
    environment: Environment = Environment.DEVELOPMENT
    jwt_secret: SecretStr | None = None
    livegate_config: Path | None = None
    livegate_data_dir: Path = Path("data")
    clerk_webhook_signing_secret: SecretStr | None = None
    stripe_secret_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None

    providers: list[ProviderConfig] = Field(default_factory=list)
    models: list[ModelRoute] = Field(default_factory=list)
    tiers: dict[str, TierConfig] = Field(default_factory=_builtin_tiers)
    actions: dict[str, ActionLimit] = Field(default_factory=_builtin_actions)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    anki: AnkiConfig = Field(default_factory=AnkiConfig)
    oauth: OAuthConfig | None = None
    stripe: StripeConfig | None = None
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @property
    def data_dir(self) -> Path:
        return self.livegate_data_dir

    @property
    def anonymous_tier(self) -> str:
        return "anonymous" if "anonymous" in self.tiers else self.server.default_tier

    def tier(self, name: str) -> TierConfig:
        """The named tier, or the default tier if the name is no longer configured."""
        return self.tiers.get(name) or self.tiers[self.server.default_tier]


def load_settings(**overrides: object) -> Settings:
    """Read the environment, then the TOML file it names, and validate both."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(f"invalid environment: {exc}") from exc
    if settings.livegate_config is not None:
        file = read_config_file(settings.livegate_config)
        tiers = {**settings.tiers, **file.tiers}
        settings = settings.model_copy(
            update={
                "providers": file.providers,
                "models": file.models,
                "tiers": tiers,
                "actions": {**settings.actions, **file.actions},
                "auth": file.auth,
                "anki": file.anki,
                "oauth": file.oauth,
                "stripe": file.stripe,
                "webhooks": file.webhooks,
                "metering": file.metering,
                "server": file.server,
            }
        )
    if settings.server.default_tier not in settings.tiers:
        raise ConfigError(f"default tier {settings.server.default_tier!r} is not defined")
    if settings.environment is Environment.PRODUCTION:
        secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else ""
        if len(secret) < 32:
            raise ConfigError("JWT_SECRET of at least 32 characters is required in production")
    return settings


def read_config_file(path: Path) -> FileConfig:
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    try:
        return FileConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config file {path} is invalid: {exc}") from exc
