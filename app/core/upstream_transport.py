"""Calls to upstream providers, on aiohttp's connection pool.

Two ways in, one pool:

- `AiohttpTransport.post` is the relay's: it sends bytes the provider already
  encoded and hands back an `UpstreamResponse`, aiohttp's answer as it stands.
  Building httpx's `Request` and `Response` models around each call cost more CPU
  than aiohttp's own work on it (measured against the benchmark's fake upstream at 50
  concurrent calls: 265 µs per call through the models, 145 µs without).
- `AiohttpTransport` is also an httpx transport, for the other outbound calls
  (identity providers' keys, OAuth token exchanges), which keep httpx's interface
  and go through `send_bounded`, so that no answer is read past a limit.

httpx's own pool checks every pooled connection for readability on every request,
which at a few dozen connections cost more CPU than the rest of a relayed request
together (3.0 ms of client CPU per request, against 0.4 ms with this transport).

Either way, aiohttp's exceptions are mapped onto httpx's, so callers see one
exception tree:

    ConnectionTimeoutError                      -> httpx.ConnectTimeout
    other timeouts (socket read)                -> httpx.ReadTimeout
    ClientConnectorError (DNS, refused, TLS)    -> httpx.ConnectError
    ServerDisconnectedError, ClientPayloadError,
    ClientResponseError (a malformed answer)    -> httpx.RemoteProtocolError
    other connection errors                     -> httpx.ReadError
    anything else aiohttp raises                -> httpx.TransportError
"""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from contextlib import aclosing, contextmanager
from typing import Any, cast

import aiohttp
import httpx
from yarl import URL


def _mapped(exc: BaseException) -> httpx.TransportError:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(
        exc,
        aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError,
    ):
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return httpx.ReadError(message)
    return httpx.TransportError(message)


@contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise _mapped(exc) from exc


def client_timeout(
    connect: float | None, read: float | None, pool: float | None
) -> aiohttp.ClientTimeout:
    """httpx's connect/read/pool timeouts in aiohttp's terms."""
    return aiohttp.ClientTimeout(
        # aiohttp's `connect` covers waiting for a pooled connection too
        connect=None if connect is None or pool is None else connect + pool,
        sock_connect=connect,
        sock_read=read,
    )


async def _read_within(chunks: AsyncIterator[bytes], limit: int) -> bytes | None:
    """All of `chunks` joined; None once they run past `limit` bytes."""
    parts: list[bytes] = []
    size = 0
    async for data in chunks:
        size += len(data)
        if size > limit:
            return None
        parts.append(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def _iter_body(response: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
    # Whatever each read brought, unsplit: a relayed stream handles the events of one
    # read together.
    with _httpx_errors():
        async for data in response.content.iter_any():
            yield data


def _release(response: aiohttp.ClientResponse) -> None:
    if response.content.at_eof():
        response.release()  # the connection goes back to the pool
    else:
        response.close()  # a half-read body: the connection cannot be reused


class UpstreamResponse:
    """An upstream's answer: status and headers, then the body whole or as it arrives.

    The body is decoded (gzip, deflate). Close it with `aclose()` once done with it.
    """

    __slots__ = ("_response", "headers", "status_code")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read(self, limit: int) -> bytes | None:
        """The whole body, decoded; None once it runs past `limit` bytes.

        The limit counts decoded bytes: a small gzip body can inflate a thousandfold,
        so a Content-Length says nothing of what reading it costs.
        """
        with _httpx_errors():
            return await _read_within(self._response.content.iter_any(), limit)

    def aiter_bytes(self) -> AsyncGenerator[bytes, None]:
        return _iter_body(self._response)

    async def aclose(self) -> None:
        _release(self._response)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _iter_body(self._response)

    async def aclose(self) -> None:
        _release(self._response)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One `aiohttp.ClientSession` for every upstream call; create it in a running loop."""

    def __init__(self, limits: httpx.Limits) -> None:
        connector = aiohttp.TCPConnector(
            limit=limits.max_connections or 0,
            keepalive_timeout=limits.keepalive_expiry,
            ssl=httpx.create_ssl_context(),
        )
        # No cookie jar: the session serves every user's calls, and a cookie an
        # upstream set for one must not go out with another's (nor cost a lookup each).
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        )
        # Proxies come from the environment, as with httpx, read once: aiohttp's own
        # `trust_env` reads the environment and ~/.netrc again on every request.
        self._proxies = urllib.request.getproxies()
        self._proxy_by_origin: dict[tuple[str, str], str | None] = {}

    def _proxy_for(self, scheme: str, host: str) -> str | None:
        origin = (scheme, host)
        if origin not in self._proxy_by_origin:
            bypass = urllib.request.proxy_bypass(host)
            self._proxy_by_origin[origin] = None if bypass else self._proxies.get(scheme)
        return self._proxy_by_origin[origin]

    async def _request(
        self,
        method: str,
        url: URL,
        headers: Any,
        data: Any,
        timeouts: aiohttp.ClientTimeout,
        decompress: bool,
    ) -> aiohttp.ClientResponse:
        with _httpx_errors():
            return await self._session.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                proxy=self._proxy_for(url.scheme, url.host or "") if self._proxies else None,
                timeout=timeouts,
                auto_decompress=decompress,
            )

    async def post(
        self,
        url: URL,
        content: bytes,
        headers: Mapping[str, str],
        timeouts: aiohttp.ClientTimeout,
    ) -> UpstreamResponse:
        """POST `content`; the answer once its headers are in, whatever its status."""
        response = await self._request("POST", url, headers, content, timeouts, decompress=True)
        return UpstreamResponse(response)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        try:
            data: bytes | httpx.AsyncByteStream | None = request.content or None
        except httpx.RequestNotRead:
            data = request.stream  # type: ignore[assignment]
        response = await self._request(
            request.method,
            URL(str(request.url)),
            request.headers.multi_items(),
            data,
            client_timeout(timeout.get("connect"), timeout.get("read"), timeout.get("pool")),
            decompress=False,  # httpx decodes the body
        )
        extensions = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("ascii", "replace")
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        await self._session.close()


# Identity providers answer with keys, tokens and profiles: a few KiB each.
MAX_IDENTITY_ANSWER_BYTES = 1 << 20


class AnswerTooLarge(ValueError):
    """An answer's body ran past the limit it was read with."""


async def send_bounded(
    http: httpx.AsyncClient,
    request: httpx.Request,
    *,
    limit: int = MAX_IDENTITY_ANSWER_BYTES,
    auth: httpx.Auth | None = None,
) -> tuple[httpx.Response, bytes]:
    """Send `request` through `http`: its answer, and the body read no further than
    `limit` decoded bytes (past it, `AnswerTooLarge`), for calls outside the relay.

    httpx reads a whole body however long it runs, so a faulty or hostile identity
    provider could otherwise fill the memory of every instance that asks it. The
    answer is asked for uncompressed: httpx inflates each read whole, before any
    limit could stop it.
    """
    request.headers["Accept-Encoding"] = "identity"
    response = await http.send(request, auth=auth, stream=True)
    try:
        # An async generator, whatever httpx's annotation says: closed here when the
        # limit leaves it unfinished, not later by a task of the event loop's.
        chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
        async with aclosing(chunks):
            body = await _read_within(chunks, limit)
    finally:
        await response.aclose()
    if body is None:
        raise AnswerTooLarge(f"{request.url} answered with more than {limit} bytes")
    return response, body
