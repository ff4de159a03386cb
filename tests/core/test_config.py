"""`load_settings`: the environment and the LIVEGATE_CONFIG TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.config import (
    ConfigError,
    CounterLimit,
    Environment,
    TierConfig,
    _builtin_tiers,
    load_settings,
)

ENV_VARS = (
    "DATABASE_URL",
    "REDIS_URL",
    "ENVIRONMENT",
    "JWT_SECRET",
    "LIVEGATE_CONFIG",
    "LIVEGATE_DATA_DIR",
    "PROVIDERS",
    "TIERS",
    "METERING",
    "SERVER",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def config_file(tmp_path: Path, clean_env: pytest.MonkeyPatch):
    """Write a TOML file and point LIVEGATE_CONFIG at it."""

    def write(text: str) -> Path:
        path = tmp_path / "livegate.toml"
        path.write_text(text)
        clean_env.setenv("LIVEGATE_CONFIG", str(path))
        return path

    return write


def test_defaults_without_file():
    settings = load_settings()
    assert settings.environment is Environment.DEVELOPMENT
    assert settings.redis_url is None
    assert settings.providers == []
    assert settings.tiers == _builtin_tiers()
    assert settings.tiers["free"].requests_per_minute == 10
    assert settings.tiers["free"].burst == 20
    assert settings.tiers["basic"].requests_per_minute == 60
    assert settings.tiers["premium"].burst == 500
    enterprise = settings.tiers["enterprise"]
    assert enterprise.requests_per_minute is None and enterprise.burst is None
    assert enterprise.monthly_tokens is None
    assert settings.server.default_tier == "free"


def test_environment_variables_are_read(clean_env: pytest.MonkeyPatch, tmp_path: Path):
    clean_env.setenv("DATABASE_URL", "postgresql://db.example/livegate")
    clean_env.setenv("REDIS_URL", "redis://cache.example:6379/1")
    clean_env.setenv("ENVIRONMENT", "production")
    clean_env.setenv("JWT_SECRET", "j" * 40)
    clean_env.setenv("LIVEGATE_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.database_url == "postgresql://db.example/livegate"
    assert settings.redis_url == "redis://cache.example:6379/1"
    assert settings.environment is Environment.PRODUCTION
    assert settings.jwt_secret is not None
    assert settings.jwt_secret.get_secret_value() == "j" * 40
    assert settings.data_dir == tmp_path


def test_invalid_environment_value_is_a_config_error(clean_env: pytest.MonkeyPatch):
    clean_env.setenv("ENVIRONMENT", "staging")
    with pytest.raises(ConfigError, match="environment"):
        load_settings()


def test_providers_are_parsed(config_file):
    config_file(
        """
[[providers]]
name = "local"
kind = "openai"
base_url = "http://127.0.0.1:9100/v1"
api_key = "sk-upstream-secret"
models = ["model-a", "model-b"]

[[providers]]
name = "second"
base_url = "http://127.0.0.1:9200/v1"
models = ["model-c"]
read_timeout = 5
"""
    )
    settings = load_settings()
    assert [p.name for p in settings.providers] == ["local", "second"]
    local, second = settings.providers
    assert local.kind == "openai"
    assert local.base_url == "http://127.0.0.1:9100/v1"
    assert local.api_key is not None and local.api_key.get_secret_value() == "sk-upstream-secret"
    # The upstream key is never printed with the settings.
    assert "sk-upstream-secret" not in repr(settings)
    assert local.models == ["model-a", "model-b"]
    assert second.api_key is None
    assert second.models == ["model-c"]
    assert second.read_timeout == 5.0
    # Tiers untouched by a file that names none.
    assert settings.tiers == _builtin_tiers()


def test_tier_in_file_replaces_the_builtin_tier_entirely(config_file):
    config_file(
        """
[tiers.free]
monthly_tokens = 5000
requests_per_minute = 3
"""
    )
    settings = load_settings()
    free = settings.tiers["free"]
    assert free.monthly_tokens == 5000
    assert free.requests_per_minute == 3
    # Keys left out mean unlimited, not the built-in numbers.
    assert free.burst is None
    assert free.daily_requests is None
    assert free.weekly_requests is None
    assert free.monthly_requests is None
    assert free.counters == {}
    builtin = _builtin_tiers()
    for name in ("basic", "premium", "enterprise"):
        assert settings.tiers[name] == builtin[name]


def test_new_tiers_can_be_added(config_file):
    config_file(
        """
[tiers.gold]
monthly_tokens = 7
"""
    )
    settings = load_settings()
    assert settings.tiers["gold"] == TierConfig(monthly_tokens=7)
    assert settings.tiers["free"] == _builtin_tiers()["free"]
    assert settings.tier("gold").monthly_tokens == 7
    # A tier no longer configured falls back to the default tier.
    assert settings.tier("vanished") == settings.tiers["free"]


def test_empty_tier_table_is_unlimited(config_file):
    config_file("[tiers.free]\n")
    assert load_settings().tiers["free"] == TierConfig()


def test_counters_table_is_parsed(config_file):
    config_file(
        """
[tiers.free]
daily_requests = 50
[tiers.free.counters]
chat_messages = { limit = 3, per = "hour" }
flashcard_generations = { limit = 100, per = "lifetime" }
default_period = { limit = 9 }
unlimited_counter = { per = "week" }
"""
    )
    counters = load_settings().tiers["free"].counters
    assert counters == {
        "chat_messages": CounterLimit(limit=3, per="hour"),
        "flashcard_generations": CounterLimit(limit=100, per="lifetime"),
        "default_period": CounterLimit(limit=9, per="day"),
        "unlimited_counter": CounterLimit(limit=None, per="week"),
    }


def test_metering_and_server_sections_are_parsed(config_file):
    config_file(
        """
[metering]
checkpoint_tokens = 7
[server]
max_body_bytes = 4096
redis_prefix = "lg2"
default_tier = "basic"
"""
    )
    settings = load_settings()
    assert settings.metering.checkpoint_tokens == 7
    assert settings.server.max_body_bytes == 4096
    assert settings.server.redis_prefix == "lg2"
    assert settings.server.default_tier == "basic"


@pytest.mark.parametrize(
    ("text", "bad_key"),
    [
        ("[tiers.free]\nmontly_tokens = 5\n", "montly_tokens"),
        ("[[providers]]\nname='a'\nbase_url='http://x/v1'\nmodels=['m']\napikey='k'\n", "apikey"),
        ("[tiers.free.counters]\nchat = { limit = 1, period = 'day' }\n", "period"),
        ("[servr]\nmax_body_bytes = 4096\n", "servr"),
        ("[metering]\ncheckpoint_token = 3\n", "checkpoint_token"),
    ],
    ids=["tier", "provider", "counter", "top-level", "metering"],
)
def test_unknown_key_is_a_config_error_naming_it(config_file, text: str, bad_key: str):
    path = config_file(text)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert bad_key in message
    assert str(path) in message


@pytest.mark.parametrize(
    "text",
    [
        "[tiers.free]\nmonthly_tokens = -1\n",
        "[tiers.free]\nmonthly_tokens = 'lots'\n",
        "[tiers.free.counters]\nchat = { limit = 1, per = 'fortnight' }\n",
        "[[providers]]\nname='a'\nbase_url='http://x/v1'\nmodels=[]\n",
        "[[providers]]\nname='a'\nkind='gemini'\nbase_url='http://x/v1'\nmodels=['m']\n",
        "[[providers]]\nbase_url='http://x/v1'\nmodels=['m']\n",
        "[server]\nmax_body_bytes = 10\n",
        "[server]\ndefault_tier = 'gold'\n",
        "providers = 'none'\n",
        "[tiers.free.surfaces.playground]\nburst = 10\n",
    ],
    ids=[
        "negative-limit",
        "string-limit",
        "bad-period",
        "no-models",
        "unknown-kind",
        "no-name",
        "tiny-body-limit",
        "undefined-default-tier",
        "providers-not-a-list",
        "surface-burst-without-rate",
    ],
)
def test_invalid_values_are_config_errors(config_file, text: str):
    config_file(text)
    with pytest.raises(ConfigError):
        load_settings()


def test_invalid_toml_is_a_config_error(config_file):
    path = config_file("[tiers.free\nmonthly_tokens = = 3\n")
    with pytest.raises(ConfigError, match="TOML") as caught:
        load_settings()
    assert str(path) in str(caught.value)


def test_missing_file_is_a_config_error(clean_env: pytest.MonkeyPatch, tmp_path: Path):
    missing = tmp_path / "nope" / "livegate.toml"
    clean_env.setenv("LIVEGATE_CONFIG", str(missing))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(missing) in str(caught.value)


def test_duplicate_provider_names_are_a_config_error(config_file):
    config_file(
        """
[[providers]]
name = "same"
base_url = "http://127.0.0.1:9100/v1"
models = ["model-a"]

[[providers]]
name = "same"
base_url = "http://127.0.0.1:9200/v1"
models = ["model-b"]
"""
    )
    with pytest.raises(ConfigError, match="unique"):
        load_settings()


def test_config_path_can_be_passed_as_override(tmp_path: Path):
    path = tmp_path / "other.toml"
    path.write_text("[tiers.free]\nmonthly_tokens = 1\n")
    assert load_settings(livegate_config=path).tiers["free"].monthly_tokens == 1


@pytest.mark.parametrize(
    "origin",
    ["https://app.example/", "https://app.example/path", "app.example", "https://a b", ""],
)
def test_an_opener_origin_that_is_no_origin_is_a_config_error(config_file, origin: str):
    config_file(f"[anki]\nopener_origins = [{origin!r}]\n")
    with pytest.raises(ConfigError, match="opener_origins"):
        load_settings()


def test_opener_origins_are_read(config_file):
    config_file('[anki]\nopener_origins = ["chrome-extension://abc", "https://a.example:8443"]\n')
    origins = load_settings().anki.opener_origins
    assert origins == ["chrome-extension://abc", "https://a.example:8443"]
