"""The load generator: keep-alive HTTP/1.1 connections on raw asyncio + httptools.

Closed loop: `concurrency` workers, each with its own connection, send the same
request back to back until `duration` seconds or `max_requests` requests, whichever
comes first, with a timeout on every request. Each answer records its status, the
time to the first token, the arrival time of every token (streams), and the number
of tokens delivered (occurrences of the fake upstream's `qz` marker), which is what
the metering check compares against `usage_logs`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from dataclasses import dataclass, field

import httptools

MARKER = b"qz"
perf = time.perf_counter


@dataclass(slots=True)
class Result:
    status: int = 0
    t_send: float = 0.0
    t_first: float = 0.0  # first token (0.0: none arrived)
    t_done: float = 0.0
    tokens: int = 0
    times: list[float] | None = None  # arrival time of each token, when recorded
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def latency(self) -> float:
        return self.t_done - self.t_send

    @property
    def ttft(self) -> float | None:
        return self.t_first - self.t_send if self.t_first else None

    def gaps(self) -> list[float]:
        t = self.times or []
        return [b - a for a, b in itertools.pairwise(t)]


@dataclass
class RunResult:
    results: list[Result] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def elapsed(self) -> float:
        return max(self.finished - self.started, 1e-9)

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.ok]

    @property
    def errors(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)


def chat_request(
    host: str, port: int, auth: str | None, model: str, stream: bool, path: str
) -> bytes:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream},
        separators=(",", ":"),
    ).encode()
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream" if stream else "Accept: application/json",
        f"Content-Length: {len(body)}",
    ]
    if auth:
        head.append(f"Authorization: Bearer {auth}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._fut: asyncio.Future[Result] | None = None
        self._result = Result()
        self._parser: httptools.HttpResponseParser | None = None
        self._now = 0.0
        self._carry = b""
        self._record = False
        self._error_body = b""

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, host, port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._fut is not None and not self._fut.done():
            self._result.error = f"connection lost: {exc or 'closed by server'}"
            self._result.t_done = perf()
            self._fut.set_result(self._result)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    async def request(self, raw: bytes, record_times: bool, limit: float) -> Result:
        if self.closed or self.transport is None:
            return Result(error="connection closed", t_send=perf(), t_done=perf())
        loop = asyncio.get_running_loop()
        self._fut = loop.create_future()
        self._result = Result(times=[] if record_times else None)
        self._record = record_times
        self._carry = b""
        self._error_body = b""
        self._parser = httptools.HttpResponseParser(self)
        self._result.t_send = perf()
        self.transport.write(raw)
        try:
            return await asyncio.wait_for(asyncio.shield(self._fut), limit)
        except TimeoutError:
            self._fut = None
            self._result.error = "timeout"
            self._result.t_done = perf()
            self.close()
            return self._result

    def data_received(self, data: bytes) -> None:
        self._now = perf()
        if self._parser is None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(f"bad response: {exc}")
            self.close()

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._result.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        r = self._result
        if r.status != 200:
            if len(self._error_body) < 400:
                self._error_body += body[:400]
            return
        text = self._carry + body if self._carry else body
        k = text.count(MARKER)
        self._carry = b"q" if body.endswith(b"q") else b""
        if k:
            if not r.tokens:
                r.t_first = self._now
            r.tokens += k
            if r.times is not None:
                r.times.extend([self._now] * k)

    def on_message_complete(self) -> None:
        error = None
        if self._result.status != 200:
            error = f"HTTP {self._result.status}: {self._error_body[:200].decode(errors='replace')}"
        self._finish(error)

    def _finish(self, error: str | None) -> None:
        r = self._result
        r.t_done = self._now or perf()
        if error and r.error is None:
            r.error = error
        self._parser = None
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(r)


async def closed_loop(
    host: str,
    port: int,
    raw: bytes,
    *,
    concurrency: int,
    duration: float,
    max_requests: int,
    request_timeout: float,
    record_times: bool = False,
    stagger: float = 0.0,
    connect_timeout: float = 10.0,
) -> RunResult:
    """Run the closed loop; always returns, within duration + timeout (+ connects).

    With `stagger`, worker i starts `stagger * i / concurrency` seconds late, so that
    paced streams are spread evenly over a stream's length instead of in lockstep.
    """
    run = RunResult()
    conns: list[HttpConnection | None] = []

    async def connect() -> HttpConnection | None:
        try:
            return await asyncio.wait_for(HttpConnection.open(host, port), connect_timeout)
        except (OSError, TimeoutError):
            return None

    conns = list(await asyncio.gather(*(connect() for _ in range(concurrency))))
    issued = 0
    run.started = perf()
    deadline = run.started + duration

    async def worker(i: int) -> None:
        nonlocal issued
        conn = conns[i]
        if stagger:
            await asyncio.sleep(stagger * i / concurrency)
        while issued < max_requests and perf() < deadline:
            if conn is None or conn.closed:
                conn = await connect()
                conns[i] = conn
                if conn is None:
                    run.results.append(Result(error="connect failed", t_send=perf(), t_done=perf()))
                    await asyncio.sleep(0.05)
                    continue
            issued += 1
            result = await conn.request(raw, record_times, request_timeout)
            run.results.append(result)
            if not result.ok and result.status != 200 and result.error:
                await asyncio.sleep(0.01)  # an erroring target: do not spin

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    run.finished = perf()
    for conn in conns:
        if conn is not None:
            conn.close()
    return run


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
