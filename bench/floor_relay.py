"""The floor: Livegate's HTTP stack relaying to the fake upstream, and nothing else.

uvicorn (httptools, uvloop) serves a bare ASGI app that posts each request's body to
the fake upstream through one aiohttp session, as Livegate's relay does, and forwards
the answer's bytes as they arrive: no framework, authentication, validation, metering,
database or events. What separates it from "direct" is the cost of a Python relay on
this stack; what separates Livegate from it is the cost of Livegate's own work.

    python bench/floor_relay.py --port 9200 --upstream-port 9100
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import aiohttp
import uvicorn

Message = dict[str, Any]
_FORWARDED_HEADERS = (b"content-type", b"cache-control")


class FloorRelay:
    """ASGI app: every POST goes to the upstream's same path, every GET answers 200."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0),
                    cookie_jar=aiohttp.DummyCookieJar(),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        assert self.session is not None
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in (b"content-type", b"authorization")
        }
        async with self.session.post(
            self.upstream + scope["path"], data=body, headers=headers
        ) as answer:
            forwarded = [
                (name.lower(), value)
                for name, value in answer.raw_headers
                if name.lower() in _FORWARDED_HEADERS
            ]
            if answer.content_length is not None:
                data = await answer.read()
                forwarded.append((b"content-length", str(len(data)).encode()))
                await send(
                    {"type": "http.response.start", "status": answer.status, "headers": forwarded}
                )
                await send({"type": "http.response.body", "body": data})
                return
            await send(
                {"type": "http.response.start", "status": answer.status, "headers": forwarded}
            )
            async for chunk in answer.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    if not args.host.startswith("127."):
        sys.exit("the floor relay only listens on loopback")
    app = FloorRelay(f"http://127.0.0.1:{args.upstream_port}")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
