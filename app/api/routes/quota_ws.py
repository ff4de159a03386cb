"""`WS /ws/quota`: the user's token quota, pushed to every device as it changes.

Server → client messages (JSON text frames):
- `{"type": "quota", "total", "used", "remaining", "resetDate", "unlimited", "seq"}`:
  on connect, then on every change (coalesced, latest wins, `seq` only grows within
  a period);
- `{"type": "ping"}` after a quiet interval; `{"type": "pong"}` answering a client ping.
Client → server: `ping` or `{"type": "ping"}`. Bad or missing auth closes with 4401,
and so does a credential that stops being valid while the socket is open (logged
out, revoked, expired, a password change, the user deleted): it is checked again at
every ping interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import orjson
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.api.requests import credential, require_principal, services
from app.core.bus import RESYNC, Signal
from app.core.errors import ApiError, Unauthorized
from app.core.live import quota_channel
from app.core.services import Services
from app.core.users import User, get_user

logger = logging.getLogger("livegate.quota_ws")

CLOSE_UNAUTHORIZED = 4401
PING = json.dumps({"type": "ping"})
PONG = json.dumps({"type": "pong"})


class _QuotaSocket:
    """One connection: pushes driven by the bus, replies by the receive loop.

    While idle a socket holds no task besides its receive loop (at 10k sockets, a
    waiting push task each was 2.3 KiB per socket): a bus message wakes a short-lived
    sender, and a timer pings after a quiet interval. Sends are serialized.
    """

    __slots__ = (
        "_check_due",
        "_credential",
        "_due",
        "_last_sent",
        "_live",
        "_loop",
        "_ping_due",
        "_ping_timer",
        "_position",
        "_quiet",
        "_send_lock",
        "_sender",
        "svc",
        "user",
        "websocket",
    )

    def __init__(
        self, websocket: WebSocket, svc: Services, user: User, credential: str | None
    ) -> None:
        self.websocket = websocket
        self.svc = svc
        self.user = user
        self._credential = credential  # None: a development `x-user-id`
        self._check_due = False
        self._send_lock = asyncio.Lock()
        self._position: tuple[str, int] = ("", -1)  # (resetDate, seq) of the last push
        self._quiet = svc.settings.server.ws_ping_seconds
        self._loop = asyncio.get_running_loop()
        self._last_sent = self._loop.time()  # of the last push or ping
        self._live = False  # pushes wait until the first snapshot went out
        self._due: str | Signal | None = None  # the newest push not yet sent
        self._ping_due = False
        self._sender: asyncio.Task[None] | None = None
        self._ping_timer: asyncio.TimerHandle | None = None

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self.websocket.send_text(text)

    async def send_quota(self, message: str) -> None:
        fields = orjson.loads(message)  # each push, on every socket of the user
        position = (fields["resetDate"], fields["seq"])
        if position <= self._position:
            return  # an older value overtaken by one already sent
        self._position = position
        await self.send(message)

    async def send_snapshot(self) -> None:
        await self.send_quota((await self.svc.token_quota(self.user)).as_message())

    async def _still_authorized(self) -> bool:
        """Whether the socket's credential still holds; if not, the socket is closed."""
        assert self._credential is not None
        try:
            principal = await self.svc.authenticator.authenticate(self._credential, use=False)
            principal.require("usage:read")
        except ApiError:
            await self._close_unauthorized()
            return False
        self.user = principal.user
        return True

    async def _close_unauthorized(self) -> None:
        async with self._send_lock:
            await self.websocket.close(code=CLOSE_UNAUTHORIZED, reason="unauthorized")

    async def resync(self) -> None:
        """After the bus lost messages: a snapshot of the user as they are now (a tier
        change may be among what was lost). A user deleted meanwhile is let go."""
        try:
            self.user = await get_user(self.svc.engine, self.user.id)
        except Unauthorized:
            await self._close_unauthorized()
            return
        await self.send_snapshot()

    def on_message(self, message: str | Signal) -> None:
        """The bus listener: the latest message wins (each carries the whole quota)."""
        self._due = message
        self._last_sent = self._loop.time()
        self._wake()

    def go_live(self) -> None:
        self._live = True
        self._ping_timer = self._loop.call_later(self._quiet, self._ping)
        self._wake()

    def _ping(self) -> None:
        # One timer per socket, moved only when it fires: a push does not re-arm it.
        # Each firing also has the credential checked again, busy socket or quiet.
        self._check_due = self._credential is not None
        quiet_for = self._loop.time() - self._last_sent
        if quiet_for < self._quiet:
            self._ping_timer = self._loop.call_later(self._quiet - quiet_for, self._ping)
            self._wake()
            return
        self._ping_due = True
        self._last_sent = self._loop.time()
        self._ping_timer = self._loop.call_later(self._quiet, self._ping)
        self._wake()

    def _wake(self) -> None:
        due = self._due is not None or self._ping_due or self._check_due
        if self._live and self._sender is None and due:
            self._sender = asyncio.create_task(self._send_due())

    async def _send_due(self) -> None:
        try:
            while self._due is not None or self._ping_due or self._check_due:
                if self._check_due:
                    self._check_due = False
                    if not await self._still_authorized():
                        return
                message, self._due = self._due, None
                if message is RESYNC:
                    await self.resync()
                elif isinstance(message, str):
                    await self.send_quota(message)
                if self._ping_due:
                    self._ping_due = False
                    await self.send(PING)
        except Exception:
            # The socket closed under the send, or the snapshot read failed: the
            # receive loop ends the connection; nothing else waits on this task.
            logger.debug("quota push to user %s stopped", self.user.id, exc_info=True)
        finally:
            self._sender = None

    async def close(self) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        self._live = False
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender

    async def receive_loop(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = (message.get("text") or "").strip()
            if text == "ping":
                await self.send(PONG)
            elif text.startswith("{"):
                with contextlib.suppress(ValueError, AttributeError, RecursionError):
                    if json.loads(text).get("type") == "ping":
                        await self.send(PONG)


async def quota_socket(websocket: WebSocket) -> None:
    # Accept first: a browser only sees a close code on an accepted socket.
    await websocket.accept()
    try:
        principal = await require_principal(websocket, "usage:read", allow_query=True)
    except ApiError:
        # A client may leave while its credential is checked (an issuer's keys being
        # fetched): there is no one left to tell.
        with contextlib.suppress(WebSocketDisconnect):
            await websocket.close(code=CLOSE_UNAUTHORIZED, reason="unauthorized")
        return
    svc = services(websocket)
    held = credential(websocket, allow_query=True)
    conn = _QuotaSocket(websocket, svc, principal.user, held)
    # Subscribe before reading the snapshot, so no change falls between the two.
    subscription = await svc.bus.subscribe(
        quota_channel(principal.user.id), listener=conn.on_message
    )
    try:
        await conn.send_snapshot()
        conn.go_live()
        await conn.receive_loop()
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        await subscription.close()
        await conn.close()


routes = [WebSocketRoute("/ws/quota", quota_socket)]
