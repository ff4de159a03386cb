"""Settings from the environment and the optional TOML file.

The environment holds what differs per deployment (`DATABASE_URL`, `REDIS_URL`,
`ENVIRONMENT`, `JWT_SECRET`, `LIVEGATE_CONFIG`); the TOML file holds providers, tiers
and tuning. Every TOML key is optional and the defaults reproduce the specs' numbers.
"""

from __future__ import annotations

import enum
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Period = Literal["minute", "hour", "day", "week", "month", "lifetime"]
PositiveInt = Annotated[int, Field(ge=0)]


class ConfigError(Exception):
    """The environment or the TOML file is invalid; the message says where."""


class Environment(enum.StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class _Strict(BaseModel):
    # A misspelt key in a hand-written file must fail loudly, not mean "unlimited".
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderConfig(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["openai"] = "openai"
    base_url: str = Field(min_length=1)
    api_key: SecretStr | None = None
    models: list[str] = Field(min_length=1)
    connect_timeout: float = Field(default=10.0, gt=0)
    # Time allowed between two bytes of the upstream response (first token included).
    read_timeout: float = Field(default=120.0, gt=0)


class CounterLimit(_Strict):
    limit: PositiveInt | None = None
    per: Period = "day"


class TierConfig(_Strict):
    """One tier's limits; a key left out (None) means unlimited."""

    requests_per_minute: PositiveInt | None = None
    burst: PositiveInt | None = None
    daily_requests: PositiveInt | None = None
    weekly_requests: PositiveInt | None = None
    monthly_requests: PositiveInt | None = None
    monthly_tokens: PositiveInt | None = None
    counters: dict[str, CounterLimit] = Field(default_factory=dict)


def _builtin_tiers() -> dict[str, TierConfig]:
    # Sokuji's rate-limit table, Playground's request quotas, Navi's and
    # AnkiLingoFlash's counters; the token quotas follow Sokuji's example profile.
    free_counters = {
        "chat_messages": CounterLimit(limit=20, per="day"),
        "flashcard_generations": CounterLimit(limit=100, per="lifetime"),
    }
    return {
        "free": TierConfig(
            requests_per_minute=10,
            burst=20,
            daily_requests=50,
            weekly_requests=350,
            monthly_requests=1500,
            monthly_tokens=1_000_000,
            counters=free_counters,
        ),
        "basic": TierConfig(
            requests_per_minute=60,
            burst=100,
            daily_requests=500,
            weekly_requests=3500,
            monthly_requests=15000,
            monthly_tokens=10_000_000,
        ),
        "premium": TierConfig(
            requests_per_minute=300,
            burst=500,
            daily_requests=5000,
            weekly_requests=35000,
            monthly_requests=150000,
            monthly_tokens=50_000_000,
        ),
        "enterprise": TierConfig(),
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
    ws_ping_seconds: float = Field(default=25.0, gt=0)
    redis_prefix: str = Field(default="livegate", min_length=1)
    default_tier: str = "free"


class FileConfig(_Strict):
    """The TOML file's shape."""

    providers: list[ProviderConfig] = Field(default_factory=list)
    tiers: dict[str, TierConfig] = Field(default_factory=dict)
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @model_validator(mode="after")
    def _check(self) -> FileConfig:
        names = [p.name for p in self.providers]
        if len(names) != len(set(names)):
            raise ValueError("provider names must be unique")
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

    providers: list[ProviderConfig] = Field(default_factory=list)
    tiers: dict[str, TierConfig] = Field(default_factory=_builtin_tiers)
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @property
    def data_dir(self) -> Path:
        return self.livegate_data_dir

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
                "tiers": tiers,
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
