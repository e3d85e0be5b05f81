"""aiohttp's relay to the upstream, for the requests aiohttp serves: streamed both ways, keep-alive,
WebSockets. What is dropped and added is the flow's (`RequestFlow`); 502/504 on upstream failure."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.config import ProxySettings
from gateway.counters import Buckets
from gateway.errors import UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE, Denied
from gateway.proxy.flow import CORS_PREFIX, HOP_BY_HOP

log = logging.getLogger("gateway.proxy.relay")
WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                          "sec-websocket-protocol"})
NO_BODY_STATUSES = frozenset({204, 304})
Finish = Callable[[web.StreamResponse], None]
CHUNK = 256 * 1024


def connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    return {item.strip().lower() for value in headers.getall("Connection", ()) for item in value.split(",")}


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    named = connection_tokens(upstream)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower not in HOP_BY_HOP and lower not in named and not lower.startswith(CORS_PREFIX):
            headers.add(name, value)
    return headers


class RelayedResponse(web.StreamResponse):
    """A relayed reply, with the body bytes it passed on (the size logged; aiohttp counts the head
    and the chunk framing too)."""

    body_sent = 0


def body_size(request: web.Request, response: web.StreamResponse) -> int:
    """The bytes of a reply's body as it is (or was) sent: relayed, or made by the gateway."""
    if request.method == "HEAD" or response.status in NO_BODY_STATUSES:
        return 0
    if isinstance(response, RelayedResponse):
        return response.body_sent
    if isinstance(response, web.Response):
        body = response.body
        if isinstance(body, (bytes, bytearray)):
            return len(body)
        return (body.size or 0) if body is not None else 0
    return 0


class Proxy:
    """`drop`: what the flow never forwards from a request (`RequestFlow.request_drop`); `latency`:
    where the time to the upstream reply's head is counted (`RequestFlow.upstream_latency`)."""

    def __init__(self, settings: ProxySettings, session: aiohttp.ClientSession, drop: frozenset[str],
                 latency: Buckets, options: dict[str, Any] | None = None) -> None:
        """`options`: per-request arguments of the session's requests (`timeout`, `ssl`), when a
        reload changed what the session was opened with."""
        self._settings = settings
        self._session = session
        self._latency = latency
        self._options = options or {}
        # aiohttp's client writes the upstream's Host itself unless the client's is kept.
        self._drop = drop if settings.preserve_host else drop | {"host"}

    def request_headers(self, incoming: CIMultiDictProxy[str], extra: list[tuple[str, str]]) -> CIMultiDict[str]:
        named = connection_tokens(incoming)
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in incoming.items():
            lower = name.lower()
            if lower not in named and lower not in self._drop:
                headers.add(name, value)
        headers.update(extra)
        return headers

    async def forward(self, request: web.Request, url: URL, headers: CIMultiDict[str],
                      finish: Finish) -> web.StreamResponse:
        """Relay the upstream's reply; `finish` sets the gateway's own reply headers before it starts."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._forward_websocket(request, url, headers)
        sent = time.perf_counter()
        try:
            upstream = await self._session.request(
                request.method, url, headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                **self._options,
            )
        except TimeoutError:
            raise Denied(504, UPSTREAM_TIMEOUT) from None
        except (aiohttp.ClientError, OSError):
            raise Denied(502, UPSTREAM_UNAVAILABLE) from None
        self._latency.observe(time.perf_counter() - sent)
        try:
            return await self._relay(request, upstream, finish)
        finally:
            upstream.release()

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse,
                     finish: Finish) -> web.StreamResponse:
        response = RelayedResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(response_headers(upstream.headers))
        finish(response)
        body_allowed = request.method != "HEAD" and upstream.status not in NO_BODY_STATUSES
        try:
            first = await upstream.content.readany() if body_allowed else b""
        except TimeoutError:
            raise Denied(504, UPSTREAM_TIMEOUT) from None
        except aiohttp.ClientError:
            raise Denied(502, UPSTREAM_UNAVAILABLE) from None
        try:
            await response.prepare(request)
            chunk = first
            while chunk:
                await response.write(chunk)
                response.body_sent += len(chunk)
                chunk = await upstream.content.readany()
            await response.write_eof()
        except ConnectionResetError:
            # The client went away: drop the upstream connection too, it is half read.
            upstream.close()
        except (TimeoutError, aiohttp.ClientError) as exc:
            # The status is already sent: the only honest signal left is a broken connection.
            log.warning("upstream failed mid-response (%s); closing client connection", type(exc).__name__)
            upstream.close()
            if request.transport is not None:
                request.transport.close()
        return response

    async def _forward_websocket(self, request: web.Request, url: URL, headers: CIMultiDict[str]) -> web.StreamResponse:
        for name in list(headers):
            if name.lower() in WS_HANDSHAKE:
                del headers[name]
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        try:
            upstream = await self._session.ws_connect(url, headers=headers, protocols=protocols, autoping=False,
                                                      ssl=self._options.get("ssl", True))
        except aiohttp.WSServerHandshakeError as exc:
            raise Denied(502, UPSTREAM_UNAVAILABLE) from exc
        except TimeoutError:
            raise Denied(504, UPSTREAM_TIMEOUT) from None
        except (aiohttp.ClientError, OSError):
            raise Denied(502, UPSTREAM_UNAVAILABLE) from None
        client = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else (), autoping=False)
        await client.prepare(request)
        await asyncio.gather(_pump(client, upstream), _pump(upstream, client), return_exceptions=True)
        return client


async def _pump(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                target: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
    try:
        async for message in source:
            kind = message.type
            if kind is aiohttp.WSMsgType.TEXT:
                await target.send_str(message.data)
            elif kind is aiohttp.WSMsgType.BINARY:
                await target.send_bytes(message.data)
            elif kind is aiohttp.WSMsgType.PING:
                await target.ping(message.data)
            elif kind is aiohttp.WSMsgType.PONG:
                await target.pong(message.data)
    finally:
        if not target.closed:
            await target.close(code=source.close_code or aiohttp.WSCloseCode.OK)
