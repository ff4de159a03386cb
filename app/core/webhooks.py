"""The Playground's outbound webhooks: endpoints, the event outbox, and delivery.

An event is written to `webhook_deliveries` (one row per subscribed webhook) in the
same transaction as what caused it, so a committed change never loses its event and a
rolled-back one never sends one. A dispatcher on every instance claims due rows, POSTs
them, and retries failures on a schedule; a claim is a conditional update, so one
delivery goes out from one instance at a time.

Deliveries are signed the Standard Webhooks way (what Svix sends, and what its
libraries verify): headers `webhook-id`, `webhook-timestamp` and `webhook-signature`
= `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")). The key is the base64
part of a `whsec_...` secret, or the UTF-8 bytes of a secret of the user's own form.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import ipaddress
import json
import logging
import re
import secrets as random
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.auth_cache import NEUTRAL, OF_USER
from app.core.config import WebhooksConfig
from app.core.db import TransactionNeeded, dialect_insert
from app.core.errors import BadRequest, Conflict, NotFound
from app.core.pagination import Page
from app.core.security import Secrets, new_id
from app.core.tables import webhook_deliveries, webhook_subscriptions, webhooks
from app.core.users import lock_user

if TYPE_CHECKING:
    from svix.webhooks import Webhook as Signer

logger = logging.getLogger("livegate.webhooks")

MAX_URL_LENGTH = 2048
# A host name's labels as DNS carries them (underscores appear in real names too).
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0[xX][0-9A-Fa-f]*)$")
SECRET_PREFIX = "whsec_"
USER_AGENT = "Livegate-Webhooks/1"
# A claimed delivery is left alone by other instances this long past its timeout.
CLAIM_MARGIN_SECONDS = 30.0
CLAIM_BATCH = 20


class Event(enum.StrEnum):
    TASK_COMPLETED = "ai.task.completed"
    TASK_FAILED = "ai.task.failed"
    QUOTA_WARNING = "quota.warning"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # every retry used up


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    id: str
    url: str
    events: list[str]
    active: bool
    created_at: datetime
    updated_at: datetime
    last_delivery_at: datetime | None


@dataclass(frozen=True, slots=True)
class CreatedEndpoint:
    endpoint: WebhookEndpoint
    secret: str  # returned once on creation


# -- validation ----------------------------------------------------------------------


# NAT64 and SIIT (IPv4-translated) prefixes: an address in them reaches the IPv4
# address it embeds.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable, and so is any IPv4 address an IPv6 one carries inside it
    (mapped, translated, 6to4, Teredo, NAT64, IPv4-compatible), which would be where it
    leads."""
    if isinstance(address, ipaddress.IPv6Address):
        # Site-local addresses are deprecated but still reach a site's own hosts.
        if address in _LOCAL_NAT64 or address.is_site_local:
            return False
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        translated = address in _NAT64 or address in _TRANSLATED
        if embedded is None and (translated or int(address) >> 32 == 0):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not _is_public(embedded):
            return False
    return address.is_global and not address.is_multicast


def _is_host(host: str) -> bool:
    """Whether `host` (as in the URL, IDNA-encoded) is an IP address or a DNS name.

    A name whose last label is a number is refused unless it is a dotted quad: browsers
    and resolvers read "2130706433" or "127.1" as an IPv4 address, and nobody means one
    written that way.
    """
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        return False
    if _NUMERIC_LABEL.match(labels[-1]):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return False
    return True


def validate_url(value: object, allow_private: bool) -> str:
    """An absolute http(s) URL without credentials; no private address unless allowed.

    Names are checked again when each delivery is sent (they may resolve anywhere).
    """
    if not isinstance(value, str) or not value or len(value) > MAX_URL_LENGTH:
        raise BadRequest(
            f"`url` must be a URL of at most {MAX_URL_LENGTH} characters", details={"field": "url"}
        )
    try:
        url = httpx.URL(value)
        host = url.host  # decoded on first use: a bad IDNA label raises here
    except (httpx.InvalidURL, ValueError):  # IDNAError is a ValueError
        raise BadRequest("`url` is not a valid URL", details={"field": "url"}) from None
    if url.scheme not in ("http", "https") or not host:
        raise BadRequest("`url` must be an absolute http or https URL", details={"field": "url"})
    if url.userinfo:
        raise BadRequest("`url` must not carry credentials", details={"field": "url"})
    if not _is_host(url.raw_host.decode("ascii")):
        raise BadRequest("`url` does not name a valid host", details={"field": "url"})
    if url.port is not None and not 0 < url.port < 65536:
        raise BadRequest("`url` has a port outside 1-65535", details={"field": "url"})
    if not allow_private:
        host = host.lower().rstrip(".")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        private_name = host == "localhost" or host.endswith((".localhost", ".local", ".internal"))
        if private_name or (literal is not None and not _is_public(literal)):
            raise BadRequest("`url` must point to a public address", details={"field": "url"})
    return value


def validate_events(value: object) -> list[str]:
    known = [e.value for e in Event]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(e, str) and e in known for e in value)
    ):
        raise BadRequest(
            f"`events` must be a non-empty array of: {', '.join(known)}",
            details={"field": "events"},
        )
    return list(dict.fromkeys(value))


def validate_secret(value: object, *, generate: bool = True) -> str:
    """The caller's secret, or a new `whsec_` one when none is given and `generate`."""
    if value is None and generate:
        return SECRET_PREFIX + base64.b64encode(random.token_bytes(32)).decode()
    if not isinstance(value, str) or not 16 <= len(value) <= 256:
        raise BadRequest(
            "`secret` must be a string of 16 to 256 characters", details={"field": "secret"}
        )
    _signer(value)  # a `whsec_` secret must be valid base64
    return value


def validate_active(value: object) -> bool:
    if not isinstance(value, bool):
        raise BadRequest("`active` must be a boolean", details={"field": "active"})
    return value


def _signer(secret: str) -> Signer:
    # Imported on first use: the Svix SDK holds ~9 MiB, and most servers sign nothing.
    from svix.webhooks import Webhook as Signer

    if secret.startswith(SECRET_PREFIX):
        encoded = secret.removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) < 16:
            raise BadRequest(
                "a `whsec_` secret must be base64 of at least 16 bytes after its prefix",
                details={"field": "secret"},
            )
        return Signer(key)
    return Signer(secret.encode())


# -- endpoints -----------------------------------------------------------------------


def _endpoint(row: Any, events: list[str]) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=row.id,
        url=row.url,
        events=events,
        active=bool(row.active),
        created_at=row.created_at,
        updated_at=row.updated_at,
        last_delivery_at=row.last_delivery_at,
    )


async def _events_of(conn: AsyncConnection, ids: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {i: [] for i in ids}
    if ids:
        rows = await conn.execute(
            sa.select(webhook_subscriptions.c.webhook_id, webhook_subscriptions.c.event)
            .where(webhook_subscriptions.c.webhook_id.in_(ids))
            .order_by(webhook_subscriptions.c.event)
        )
        for webhook_id, event in rows:
            found[webhook_id].append(event)
    return found


async def _owned(
    conn: AsyncConnection, user_id: str, webhook_id: str, *, lock: bool = False
) -> Any:
    query = sa.select(webhooks).where(webhooks.c.id == webhook_id, webhooks.c.user_id == user_id)
    row = (await conn.execute(query.with_for_update() if lock else query)).first()
    if row is None:
        raise NotFound("Webhook not found")
    return row


async def create_endpoint(
    engine: AsyncEngine,
    secrets: Secrets,
    user_id: str,
    *,
    url: str,
    events: list[str],
    secret: str,
    active: bool,
    max_per_user: int,
) -> CreatedEndpoint:
    now = datetime.now(UTC)
    webhook_id = f"wh-{new_id()}"
    async with engine.begin() as conn:
        # Creations of one user run one after another: the count read next holds until
        # this one commits, so concurrent requests cannot pass the cap.
        await lock_user(conn, user_id)
        count = await conn.scalar(
            sa.select(sa.func.count()).select_from(webhooks).where(webhooks.c.user_id == user_id)
        )
        if (count or 0) >= max_per_user:
            raise Conflict(f"at most {max_per_user} webhooks per user", code="webhook_limit")
        await conn.execute(
            webhooks.insert().values(
                id=webhook_id,
                user_id=user_id,
                url=url,
                secret_ciphertext=secrets.encrypt(secret),
                active=active,
                created_at=now,
                updated_at=now,
            ),
            execution_options={OF_USER: user_id},  # whether the user has webhooks
        )
        await conn.execute(
            webhook_subscriptions.insert(),
            [{"webhook_id": webhook_id, "event": e} for e in events],
        )
        row = await _owned(conn, user_id, webhook_id)
    return CreatedEndpoint(_endpoint(row, sorted(events)), secret)


async def list_endpoints(
    engine: AsyncEngine, user_id: str, page: Page
) -> tuple[list[WebhookEndpoint], int]:
    order = webhooks.c.created_at.desc() if page.descending else webhooks.c.created_at.asc()
    async with engine.connect() as conn:
        total = await conn.scalar(
            sa.select(sa.func.count()).select_from(webhooks).where(webhooks.c.user_id == user_id)
        )
        rows = (
            await conn.execute(
                sa.select(webhooks)
                .where(webhooks.c.user_id == user_id)
                .order_by(order, webhooks.c.id)
                .limit(page.size)
                .offset(page.offset)
            )
        ).all()
        events = await _events_of(conn, [r.id for r in rows])
    return [_endpoint(r, events[r.id]) for r in rows], int(total or 0)


async def get_endpoint(engine: AsyncEngine, user_id: str, webhook_id: str) -> WebhookEndpoint:
    async with engine.connect() as conn:
        row = await _owned(conn, user_id, webhook_id)
        events = await _events_of(conn, [row.id])
    return _endpoint(row, events[row.id])


async def update_endpoint(
    engine: AsyncEngine,
    secrets: Secrets,
    user_id: str,
    webhook_id: str,
    *,
    url: str | None = None,
    events: list[str] | None = None,
    secret: str | None = None,
    active: bool | None = None,
) -> WebhookEndpoint:
    values: dict[str, Any] = {"updated_at": datetime.now(UTC)}
    if url is not None:
        values["url"] = url
    if secret is not None:
        values["secret_ciphertext"] = secrets.encrypt(secret)
    if active is not None:
        values["active"] = active
    async with engine.begin() as conn:
        await _owned(conn, user_id, webhook_id)
        await conn.execute(
            webhooks.update().where(webhooks.c.id == webhook_id).values(**values),
            execution_options={OF_USER: user_id},
        )
        if events is not None:
            await conn.execute(
                webhook_subscriptions.delete().where(
                    webhook_subscriptions.c.webhook_id == webhook_id
                )
            )
            await conn.execute(
                webhook_subscriptions.insert(),
                [{"webhook_id": webhook_id, "event": e} for e in events],
            )
        row = await _owned(conn, user_id, webhook_id)
        found = await _events_of(conn, [webhook_id])
    return _endpoint(row, found[webhook_id])


async def delete_endpoint(engine: AsyncEngine, user_id: str, webhook_id: str) -> None:
    """Delete the webhook with its subscriptions and deliveries (pending ones are dropped).

    The webhook's row is locked first: an event being queued for it at the same time
    holds a share of it (`_SUBSCRIBED`), so the two run one after the other, and the
    delete never misses a delivery that would then refer to no webhook.
    """
    async with engine.begin() as conn:
        await _owned(conn, user_id, webhook_id, lock=True)
        for table in (webhook_deliveries, webhook_subscriptions):
            await conn.execute(table.delete().where(table.c.webhook_id == webhook_id))
        await conn.execute(
            webhooks.delete().where(webhooks.c.id == webhook_id),
            execution_options={OF_USER: user_id},
        )


# -- the outbox ----------------------------------------------------------------------


def _timestamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Built once: it runs as every relayed request of a user with webhooks finishes. The
# share of each webhook's row (PostgreSQL) keeps it from being deleted until the
# deliveries queued for it are committed (see `delete_endpoint`).
_SUBSCRIBED = (
    sa.select(webhooks.c.id)
    .join(webhook_subscriptions, webhook_subscriptions.c.webhook_id == webhooks.c.id)
    .where(
        webhooks.c.user_id == sa.bindparam("user_id"),
        webhooks.c.active.is_(True),
        webhook_subscriptions.c.event == sa.bindparam("event"),
    )
    .with_for_update(key_share=True, of=webhooks)
)


async def enqueue(
    conn: AsyncConnection,
    user_id: str,
    event: Event,
    data: Callable[[], dict[str, Any]],
    event_id: str | None = None,
) -> int:
    """Queue `event` for each of the user's active webhooks that want it, in `conn`'s
    transaction. Returns how many deliveries were queued (usually none: one query).

    `data` builds the event's data only when someone will receive it. With an
    `event_id` of the caller's, an event already queued under it is left as it is: a
    transaction retried after it was committed unbeknown queues nothing twice.
    """
    found = await conn.execute(_SUBSCRIBED, {"user_id": user_id, "event": event.value})
    targets = found.scalars().all()
    if not targets:
        return 0
    now = datetime.now(UTC)
    payload = json.dumps(
        {
            "event": event.value,
            "data": {**data(), "user_id": user_id, "timestamp": _timestamp(now)},
        },
        separators=(",", ":"),
    )
    event_id = event_id or f"evt_{new_id()}"
    await conn.execute(
        dialect_insert(conn)(webhook_deliveries).on_conflict_do_nothing(),
        [
            {
                "event_id": event_id,
                "webhook_id": webhook_id,
                "event": event.value,
                "payload": payload,
                "status": DeliveryStatus.PENDING,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for webhook_id in targets
        ],
    )
    return len(targets)


class QuotaWarnings:
    """`quota.warning` events when a quota's use first reaches a configured percentage."""

    def __init__(self, percents: Iterable[int]) -> None:
        self._percents = sorted(set(percents))

    def crossed(self, before: int, after: int, limit: int | None) -> bool:
        if not limit or after <= before:
            return False
        return any(before * 100 < p * limit <= after * 100 for p in self._percents)

    async def check(
        self,
        conn: AsyncConnection | None,
        user_id: str,
        quota_type: str,
        before: int,
        after: int,
        limit: int | None,
    ) -> None:
        """Queue a `quota.warning` if a threshold lies in (before, after]; without
        `conn`, raise `TransactionNeeded` instead."""
        if limit and self.crossed(before, after, limit):
            if conn is None:
                raise TransactionNeeded
            data = {
                "quota_type": quota_type,
                "used": after,
                "limit": limit,
                "percentage": min(100, after * 100 // limit),
            }
            await enqueue(conn, user_id, Event.QUOTA_WARNING, lambda: data)


# -- delivery ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Claimed:
    event_id: str
    webhook_id: str
    url: str
    secret_ciphertext: str
    payload: str
    attempts: int


class DeliveryRefused(Exception):
    """The target may not be sent to (its address is not public)."""


async def _resolve(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to; refuses non-public ones unless allowed.

    Resolved here and connected to by address, so a name cannot pass the check and
    then resolve elsewhere for the connection (DNS rebinding).
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DeliveryRefused(f"cannot resolve {host}: {exc.strerror}") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses:
        raise DeliveryRefused(f"{host} has no address")
    if not allow_private and not all(_is_public(a) for a in addresses):
        raise DeliveryRefused(f"{host} resolves to a non-public address")
    return str(addresses[0])


class WebhookDispatcher:
    """Sends due deliveries from the outbox; one per process, started in the lifespan."""

    def __init__(self, engine: AsyncEngine, secrets: Secrets, config: WebhooksConfig) -> None:
        self._engine = engine
        self._secrets = secrets
        self._config = config
        # Made on the first delivery: most servers never send one, and the client
        # (its connection pool library and TLS context) costs several MiB.
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.aclose()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self._config.timeout_seconds),
                follow_redirects=False,
                trust_env=False,
                headers={"user-agent": USER_AGENT},
                # Connections are made by address and pooled by address: a kept-alive
                # one verified for one name must not carry another name's delivery.
                limits=httpx.Limits(max_keepalive_connections=0),
            )
        return self._http

    def wake(self) -> None:
        """Look for due deliveries now rather than at the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                sent = await self.run_once()
            except Exception:
                logger.exception("webhook dispatch failed")
                sent = 0
            if sent:
                continue  # there may be more due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._config.poll_seconds)
            self._wake.clear()

    async def run_once(self) -> int:
        """Claim and send the deliveries due now; returns how many were attempted."""
        claimed = await self._claim()
        if claimed:
            await asyncio.gather(*(self._deliver(c) for c in claimed))
        return len(claimed)

    async def _claim(self) -> list[_Claimed]:
        now = datetime.now(UTC)
        lock = now + timedelta(seconds=self._config.timeout_seconds + CLAIM_MARGIN_SECONDS)
        free = sa.or_(
            webhook_deliveries.c.locked_until.is_(None), webhook_deliveries.c.locked_until < now
        )
        due = sa.and_(
            webhook_deliveries.c.status == DeliveryStatus.PENDING,
            webhook_deliveries.c.next_attempt_at <= now,
            free,
        )
        claimed: list[_Claimed] = []
        async with self._engine.begin() as conn:
            rows = (
                await conn.execute(
                    sa.select(
                        webhook_deliveries.c.event_id,
                        webhook_deliveries.c.webhook_id,
                        webhook_deliveries.c.payload,
                        webhook_deliveries.c.attempts,
                        webhooks.c.url,
                        webhooks.c.secret_ciphertext,
                    )
                    .join(webhooks, webhooks.c.id == webhook_deliveries.c.webhook_id)
                    # A deactivated webhook's deliveries wait until it is active again.
                    .where(due, webhooks.c.active.is_(True))
                    .order_by(webhook_deliveries.c.next_attempt_at, webhook_deliveries.c.event_id)
                    .limit(CLAIM_BATCH)
                    # PostgreSQL: rows another instance is claiming are passed over, not
                    # waited for (SQLite has one writer and no row locks to skip).
                    .with_for_update(skip_locked=True, of=webhook_deliveries)
                )
            ).all()
            for row in rows:
                # Conditional: another instance may have claimed it since the select.
                result = await conn.execute(
                    webhook_deliveries.update()
                    .where(
                        webhook_deliveries.c.event_id == row.event_id,
                        webhook_deliveries.c.webhook_id == row.webhook_id,
                        due,
                    )
                    .values(locked_until=lock, attempts=webhook_deliveries.c.attempts + 1)
                )
                if result.rowcount == 1:
                    claimed.append(
                        _Claimed(
                            row.event_id,
                            row.webhook_id,
                            row.url,
                            row.secret_ciphertext,
                            row.payload,
                            row.attempts + 1,
                        )
                    )
        return claimed

    async def _deliver(self, delivery: _Claimed) -> None:
        status_code: int | None = None
        error: str | None = None
        try:
            # One deadline for all of it (a read timeout alone lets a target that
            # trickles bytes hold the delivery past its claim).
            async with asyncio.timeout(self._config.timeout_seconds):
                status_code = await self._send(delivery)
            if not 200 <= status_code < 300:
                error = f"answered HTTP {status_code}"
        except DeliveryRefused as exc:
            error = str(exc)
        except TimeoutError:
            error = f"no answer within {self._config.timeout_seconds:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:
            # Recorded like any failure, so the row follows its retry schedule.
            logger.exception("webhook delivery %s failed unexpectedly", delivery.event_id)
            error = f"internal error: {type(exc).__name__}"
        await self._record(delivery, status_code, error)

    async def _send(self, delivery: _Claimed) -> int:
        url = httpx.URL(delivery.url)
        port = url.port or (443 if url.scheme == "https" else 80)
        # The name as DNS, TLS and the Host header all see it (IDNA-encoded).
        host = url.raw_host.decode("ascii")
        address = await _resolve(host, port, self._config.allow_private_networks)
        now = datetime.now(UTC)
        signer = _signer(self._secrets.decrypt(delivery.secret_ciphertext))
        headers = {
            "content-type": "application/json",
            "host": url.netloc.decode("ascii"),
            "webhook-id": delivery.event_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signer.sign(delivery.event_id, now, delivery.payload),
        }
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        async with self._client().stream(
            "POST",
            url.copy_with(host=address),
            content=delivery.payload.encode(),
            headers=headers,
            extensions=extensions,
        ) as response:
            # The body is not read: a target cannot make us download anything.
            return response.status_code

    async def _record(self, delivery: _Claimed, status_code: int | None, error: str | None) -> None:
        now = datetime.now(UTC)
        key = sa.and_(
            webhook_deliveries.c.event_id == delivery.event_id,
            webhook_deliveries.c.webhook_id == delivery.webhook_id,
        )
        values: dict[str, Any] = {"last_status_code": status_code, "locked_until": None}
        if error is None:
            values.update(status=DeliveryStatus.DELIVERED, delivered_at=now, last_error=None)
        else:
            schedule = self._config.retry_schedule_seconds
            values["last_error"] = error[:1000]
            if delivery.attempts > len(schedule):
                values["status"] = DeliveryStatus.FAILED
            else:
                wait = schedule[delivery.attempts - 1]
                values["next_attempt_at"] = now + timedelta(seconds=wait)
            logger.info(
                "webhook delivery %s to %s failed (attempt %d): %s",
                delivery.event_id,
                delivery.webhook_id,
                delivery.attempts,
                error,
            )
        async with self._engine.begin() as conn:
            await conn.execute(webhook_deliveries.update().where(key).values(**values))
            if error is None:
                await conn.execute(
                    webhooks.update()
                    .where(webhooks.c.id == delivery.webhook_id)
                    .values(last_delivery_at=now),
                    execution_options={NEUTRAL: True},  # no principal holds it
                )
