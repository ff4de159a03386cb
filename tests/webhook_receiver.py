"""A webhook receiver on loopback: records what arrives, answers as scripted."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fake_upstream import LoopbackServer

WAIT = 10


@dataclass
class Delivery:
    headers: dict[str, str]
    body: str

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """Records deliveries; answers each with the next scripted status (then 200)."""

    statuses: list[int] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)  # seconds before answering each
    received: list[Delivery] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def hook(self, request: Request) -> Response:
        body = (await request.body()).decode()
        async with self.arrived:
            self.received.append(Delivery(dict(request.headers), body))
            self.arrived.notify_all()
        if self.delays:
            await asyncio.sleep(self.delays.pop(0))
        return Response(status_code=self.statuses.pop(0) if self.statuses else 200)

    async def wait_for(self, count: int) -> list[Delivery]:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.received) >= count), WAIT)
        return self.received


async def start_receiver() -> tuple[Receiver, LoopbackServer]:
    receiver = Receiver()
    server = LoopbackServer(Starlette(routes=[Route("/hook", receiver.hook, methods=["POST"])]))
    await server.start()
    receiver.port = server.port
    return receiver, server
