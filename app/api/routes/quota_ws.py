"""`WS /ws/quota`: the user's token quota, pushed to every device as it changes.

Server → client messages (JSON text frames):
- `{"type": "quota", "total", "used", "remaining", "resetDate", "unlimited", "seq"}`:
  on connect, then on every change (coalesced, latest wins, `seq` only grows within
  a period);
- `{"type": "ping"}` after a quiet interval; `{"type": "pong"}` answering a client ping.
Client → server: `ping` or `{"type": "ping"}`. Bad or missing auth closes with 4401.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.api.requests import require_principal, services
from app.core.bus import RESYNC, Subscription
from app.core.errors import ApiError
from app.core.live import quota_channel
from app.core.services import Services
from app.core.users import User

CLOSE_UNAUTHORIZED = 4401
PING = json.dumps({"type": "ping"})
PONG = json.dumps({"type": "pong"})


class _QuotaSocket:
    """One connection: a push loop beside the receive loop, sends serialized."""

    def __init__(self, websocket: WebSocket, svc: Services, user: User) -> None:
        self.websocket = websocket
        self.svc = svc
        self.user = user
        self._send_lock = asyncio.Lock()
        self._position: tuple[str, int] = ("", -1)  # (resetDate, seq) of the last push

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self.websocket.send_text(text)

    async def send_quota(self, message: str) -> None:
        fields = json.loads(message)
        position = (fields["resetDate"], fields["seq"])
        if position <= self._position:
            return  # an older value overtaken by one already sent
        self._position = position
        await self.send(message)

    async def send_snapshot(self) -> None:
        await self.send_quota((await self.svc.token_quota(self.user)).as_message())

    async def push_loop(self, subscription: Subscription) -> None:
        quiet = self.svc.settings.server.ws_ping_seconds
        while True:
            message = await subscription.get(within=quiet)
            if message is None:
                await self.send(PING)
            elif message is RESYNC:
                await self.send_snapshot()
            elif isinstance(message, str):
                await self.send_quota(message)

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
        await websocket.close(code=CLOSE_UNAUTHORIZED, reason="unauthorized")
        return
    svc = services(websocket)
    conn = _QuotaSocket(websocket, svc, principal.user)
    # Subscribe before reading the snapshot, so no change falls between the two.
    subscription = await svc.bus.subscribe(quota_channel(principal.user.id))
    pusher: asyncio.Task[None] | None = None
    try:
        await conn.send_snapshot()
        pusher = asyncio.create_task(conn.push_loop(subscription))
        await conn.receive_loop()
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        if pusher is not None:
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await pusher
        await subscription.close()


routes = [WebSocketRoute("/ws/quota", quota_socket)]
