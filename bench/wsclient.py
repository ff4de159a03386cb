"""A minimal WebSocket client for `/ws/quota`, light enough to hold 10k sockets.

It does the handshake, answers protocol pings with pongs, timestamps every text
frame on arrival, and is ready once the server's first quota snapshot has arrived
(so a socket counts as held only when it is authenticated and subscribed).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import cast

perf = time.perf_counter

OnMessage = Callable[["WsClient", float, bytes], None]


class WsClient(asyncio.Protocol):
    def __init__(self, request: bytes, on_message: OnMessage | None = None) -> None:
        self.request = request
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.handshaken = False
        self.closed = False
        self.close_code: int | None = None
        self.messages = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.tag: object = None  # the caller's, e.g. which user and instance

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP connection's (uvloop's transports are not asyncio.Transport subclasses).
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready ({self.close_code})"))

    def data_received(self, data: bytes) -> None:
        now = perf()
        self.buffer += data
        if not self.handshaken:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                if not self.ready.done():
                    line = head.split(b"\r\n", 1)[0].decode(errors="replace")
                    self.ready.set_exception(ConnectionError(f"handshake refused: {line}"))
                self.abort()
                return
            self.handshaken = True
        self._frames(now)

    def _frames(self, now: float) -> None:
        buf = self.buffer
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            opcode, length, offset = b0 & 0x0F, b1 & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, offset = struct.unpack_from("!H", buf, 2)[0], 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, offset = struct.unpack_from("!Q", buf, 2)[0], 10
            if b1 & 0x80:
                offset += 4  # servers never mask; tolerate it anyway
            if len(buf) < offset + length:
                return
            payload = bytes(buf[offset : offset + length])
            del buf[: offset + length]
            if opcode == 1:
                self.messages += 1
                if not self.ready.done():
                    self.ready.set_result(None)
                if self.on_message is not None:
                    self.on_message(self, now, payload)
            elif opcode == 9:
                self._send(0xA, payload)
            elif opcode == 8:
                if len(payload) >= 2:
                    self.close_code = struct.unpack_from("!H", payload)[0]
                self._send(0x8, payload[:2])
                self.abort()
                return

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def send_text(self, text: str) -> None:
        self._send(0x1, text.encode()[:125])

    def close(self) -> None:
        """A clean close: our close frame, then the TCP close."""
        if self.transport is not None and not self.transport.is_closing():
            self._send(0x8, struct.pack("!H", 1000))
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True


def handshake(host: str, port: int, token: str, device: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws/quota?deviceId={device} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


async def open_socket(
    host: str,
    port: int,
    token: str,
    device: str,
    on_message: OnMessage | None = None,
    within: float = 15.0,
) -> WsClient:
    """A socket that has received its first quota snapshot; raises otherwise."""
    loop = asyncio.get_running_loop()
    request = handshake(host, port, token, device)
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: WsClient(request, on_message), host, port), within
    )
    try:
        await asyncio.wait_for(asyncio.shield(client.ready), within)
    except BaseException:
        client.abort()
        raise
    return client


async def open_many(
    host: str,
    port: int,
    credentials: list[tuple[str, str]],
    *,
    parallel: int,
    deadline: float,
    on_message: OnMessage | None = None,
) -> tuple[list[WsClient], list[str]]:
    """Open one socket per (token, device), `parallel` handshakes at a time.

    Stops starting new ones at `deadline` (perf_counter time). Returns the ready
    sockets and the errors of the others.
    """
    sem = asyncio.Semaphore(parallel)
    ready: list[WsClient] = []
    errors: list[str] = []

    async def one(token: str, device: str) -> None:
        async with sem:
            if perf() > deadline:
                errors.append("not started: deadline")
                return
            try:
                within = max(1.0, min(15.0, deadline - perf()))
                ready.append(await open_socket(host, port, token, device, on_message, within))
            except (OSError, TimeoutError, ConnectionError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(t, d) for t, d in credentials))
    return ready, errors
