"""The schema, defined once; Alembic migrations create exactly these tables."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.engine import Dialect

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class UsageStatus(enum.StrEnum):
    STREAMING = "streaming"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    ERROR = "error"
    INTERRUPTED = "interrupted"


class KeyKind(enum.StrEnum):
    RELAY = "relay"  # the one per-user key that `/api/user/api-key` returns again
    USER = "user"  # keys created through the API-key endpoints, shown once


users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("username", String(30), nullable=True),
    Column("password_hash", Text, nullable=True),
    Column("tier", String(64), nullable=False),
    Column("role", String(32), nullable=False, server_default="user"),
    Column("first_name", String(200), nullable=True),
    Column("last_name", String(200), nullable=True),
    Column("image_url", Text, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("deleted_at", UTCDateTime(), nullable=True),
    Column("tokens_valid_after", UTCDateTime(), nullable=True),
    # An index, not a constraint: SQLite adds it without rebuilding the table.
    Index("uq_users_username", "username", unique=True),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("name", String(200), nullable=True),
    # SHA-256 of the whole key: the only form a key is looked up by.
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("key_mask", String(32), nullable=False),
    # Relay keys only: the key encrypted under the server secret, to be shown again.
    Column("key_ciphertext", Text, nullable=True),
    Column("permissions", JSON, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("last_used_at", UTCDateTime(), nullable=True),
    Column("usage_count", BigInteger, nullable=False, server_default="0"),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("updated_at", UTCDateTime(), nullable=True),
    Index("ix_api_keys_user_id", "user_id"),
    # At most one live relay key per user, so get-or-create is race-free.
    Index(
        "uq_api_keys_live_relay_key",
        "user_id",
        unique=True,
        sqlite_where=text("kind = 'relay' AND revoked_at IS NULL"),
        postgresql_where=text("kind = 'relay' AND revoked_at IS NULL"),
    ),
)

usage_logs = Table(
    "usage_logs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("request_id", String(128), nullable=False),
    Column("user_id", String(64), ForeignKey("users.id"), nullable=False),
    Column("api_key_id", String(64), nullable=True),
    Column("instance_id", String(64), nullable=False),
    Column("model", String(200), nullable=False),
    Column("provider", String(200), nullable=False),
    # The name the provider that answered knows the model by (aliases resolve to it).
    Column("upstream_model", String(200), nullable=True),
    Column("device_id", String(128), nullable=True),
    Column("platform", String(64), nullable=True),
    Column("stream", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("finish_reason", String(32), nullable=True),
    Column("prompt_tokens", BigInteger, nullable=False, server_default="0"),
    Column("completion_tokens", BigInteger, nullable=False, server_default="0"),
    Column("total_tokens", BigInteger, nullable=False, server_default="0"),
    # USD, from the answering provider's configured prices.
    Column("cost", Float, nullable=False, server_default="0"),
    # The quota period the row counts toward (month "YYYY-MM"), fixed at start.
    Column("period", String(16), nullable=False),
    Column("error", Text, nullable=True),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    Index("ix_usage_logs_user_id_period", "user_id", "period"),
    Index("ix_usage_logs_status_instance_id", "status", "instance_id"),
)

# Fast per-user counters, kept equal to sums over `usage_logs` by updating both in
# one transaction; `seq` orders the pushes so a client never goes back in time.
quota_counters = Table(
    "quota_counters",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("metric", String(64), primary_key=True),
    Column("period", String(16), primary_key=True),
    Column("used", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=False),
)

instances = Table(
    "instances",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("heartbeat_at", UTCDateTime(), nullable=False),
)

# Who a user is at an external identity provider (Clerk, WorkOS, any OIDC issuer).
external_identities = Table(
    "external_identities",
    metadata,
    Column("provider", String(64), primary_key=True),
    Column("subject", String(255), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id"), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

# Rotating refresh tokens: each use spends the token and issues the next one of its
# family; presenting a spent token revokes the whole family (it was stolen).
refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id"), nullable=False),
    Column("family_id", String(64), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("used_at", UTCDateTime(), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Index("ix_refresh_tokens_family_id", "family_id"),
)

# Access tokens revoked before they expire (logout), when Redis is not configured.
revoked_tokens = Table(
    "revoked_tokens",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("expires_at", UTCDateTime(), nullable=False),
)

# Inbound webhook deliveries already processed, so a replay is never applied twice.
# The longest event id a source's delivery may carry (Stripe's, svix's).
MAX_EVENT_ID = 255
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("source", String(32), primary_key=True),
    Column("event_id", String(MAX_EVENT_ID), primary_key=True),
    Column("received_at", UTCDateTime(), nullable=False),
)

# Navi's synced conversations. Ids are the client's, so they are unique per user only.
conversations = Table(
    "conversations",
    metadata,
    Column("user_id", String(64), ForeignKey("users.id"), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("title", String(500), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Index("ix_conversations_user_id_updated_at", "user_id", "updated_at"),
)

messages = Table(
    "messages",
    metadata,
    Column("user_id", String(64), ForeignKey("users.id"), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("conversation_id", String(128), nullable=False),
    Column("role", String(32), nullable=False),
    Column("content", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index(
        "ix_messages_user_id_conversation_id_created_at", "user_id", "conversation_id", "created_at"
    ),
)

# The longest profile values the AnkiLingoFlash extension may store.
MAX_ANKI_USER_NAME = 200
MAX_ANKI_USER_EMAIL = 320

# AnkiLingoFlash's user records, keyed by the extension's own user id (Google's).
anki_users = Table(
    "anki_users",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("user_name", String(MAX_ANKI_USER_NAME), nullable=True),
    Column("user_email", String(MAX_ANKI_USER_EMAIL), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

# OAuth logins under way: the state a callback must bring back, and its PKCE verifier.
oauth_states = Table(
    "oauth_states",
    metadata,
    Column("state", String(64), primary_key=True),
    Column("code_verifier", String(128), nullable=False),
    Column("app_redirect", Text, nullable=False),
    Column("callback_url", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

# Navi's Stripe subscription, one per user; `event_at` is the `created` time of the
# last Stripe event applied, so an older event delivered late never rolls state back.
subscriptions = Table(
    "subscriptions",
    metadata,
    Column("user_id", String(64), ForeignKey("users.id"), primary_key=True),
    Column("stripe_customer_id", String(255), nullable=True, unique=True),
    Column("stripe_subscription_id", String(255), nullable=True),
    Column("status", String(32), nullable=True),
    Column("tier", String(64), nullable=True),
    Column("period_end", UTCDateTime(), nullable=True),
    Column("event_at", BigInteger, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

# The Playground's outbound webhooks. The secret signs deliveries, so it is kept
# encrypted under the server secret rather than hashed.
webhooks = Table(
    "webhooks",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id"), nullable=False),
    Column("url", Text, nullable=False),
    Column("secret_ciphertext", Text, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("last_delivery_at", UTCDateTime(), nullable=True),
    Index("ix_webhooks_user_id", "user_id"),
)

# Which events each webhook wants, one row each, so enqueuing an event for a user is
# a single INSERT ... SELECT.
webhook_subscriptions = Table(
    "webhook_subscriptions",
    metadata,
    Column("webhook_id", String(64), ForeignKey("webhooks.id"), primary_key=True),
    Column("event", String(64), primary_key=True),
)

# The outbox: one row per event and webhook, written in the transaction that caused
# the event, sent (and retried) by whichever instance claims it first.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("webhook_id", String(64), ForeignKey("webhooks.id"), primary_key=True),
    Column("event", String(64), nullable=False),
    # The exact body sent, fixed at enqueue so every retry carries the same bytes.
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("locked_until", UTCDateTime(), nullable=True),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("delivered_at", UTCDateTime(), nullable=True),
    Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_webhook_id", "webhook_id"),
)
