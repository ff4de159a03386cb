"""The response that carries a relayed stream and notices a client leaving at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # nginx must not hold tokens back
}


class RelayStreamResponse(Response):
    """Sends an SSE byte stream; on client disconnect cancels it mid-await.

    Starlette's `StreamingResponse` notices a disconnect only between chunks; a stream
    waiting on a slow upstream must instead be cancelled the moment the client goes,
    so the upstream request is dropped and the usage row finalized without delay.
    """

    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        headers: Mapping[str, str] | None = None,
        on_server_cancel: Callable[[], None] | None = None,
    ) -> None:
        self._chunks = chunks
        self._on_server_cancel = on_server_cancel
        self.status_code = 200
        self.background = None
        self.media_type = "text/event-stream"
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.create_task(self._pump(send))
        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Neither the stream nor the client ended it: the server is shutting down.
            if self._on_server_cancel is not None:
                self._on_server_cancel()
            raise
        finally:
            for task in (pump, watcher):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _pump(self, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self._chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._chunks.aclose()


async def cancel_on_disconnect(receive: Receive, work: Awaitable[T]) -> T | None:
    """Await `work`, cancelling it the moment the client disconnects (then None).

    For non-streamed relays: nothing else would notice the client leaving while the
    upstream is still thinking. Call it only after the request body has been read.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
