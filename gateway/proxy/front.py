"""What the requests of a client connection use of it and of the listener: the lower layer of the
fast path, so that `Exchange` and `Bridge` need neither `listener.py` (which makes them) nor each
other.

`Incoming` is one parsed request, `Lane` what every connection of the process shares (the flow,
the upstream pools, the date), `Front` what a request may do to its connection (write, close,
pause reading, hand it to aiohttp, say it is done). `listener.FrontProtocol` is the one `Front`.
"""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from email.utils import formatdate
from time import time as wall_clock  # bound: a module attribute is a lookup per use, compiled
from typing import Any

from gateway.config import LimitsSettings, ProxySettings, Route
from gateway.errors import Denied
from gateway.proxy.flow import RequestFlow
from gateway.proxy.upstream import UpstreamPool


class Incoming:
    """One parsed request; its body pieces wait here until an exchange or the bridge takes them."""

    __slots__ = (
        "body",
        "buffered",
        "chunked",
        "complete",
        "head_size",
        "headers",
        "index",
        "keep_alive",
        "length",
        "method",
        "received",
        "refusal",
        "target",
        "upgrade",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # (lowercased name, name, value)
        self.index: dict[bytes, bytes] = {}  # first value of each header, by lowercased name
        self.method = b""
        self.keep_alive = True
        self.upgrade = False
        self.version = "1.1"
        self.body: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.chunked = False
        self.length: int | None = None
        self.head_size = 0
        self.received = 0  # body bytes read so far (`limits.max_body_size`)
        # Why the request must be refused before anything of it goes on (a repeated single header,
        # a transfer coding other than chunked): found by the parser callbacks, answered when it starts.
        self.refusal: Denied | None = None
        # Where the body goes once it is no longer buffered: an Exchange or the Bridge.
        self.target: Any = None


class Lane:
    """Per process: what the fast path's requests share. `listener.FastLane` adds the connections."""

    def __init__(self, flow: RequestFlow, handler_factory: Callable[[], asyncio.Protocol],
                 upstream_tls: ssl.SSLContext) -> None:
        self.flow = flow
        self.handler_factory = handler_factory
        self.upstream_tls = upstream_tls
        settings = flow.settings
        proxy = settings.proxy
        self.proxy: ProxySettings = proxy
        limits = settings.limits
        self.limits: LimitsSettings = limits
        # Read for every header of every request: native ints here, not attributes of the
        # (interpreted) settings object, each a generic attribute lookup.
        self.max_request_line: int = limits.max_request_line
        self.max_header_size: int = limits.max_header_size
        self.max_head_size: int = limits.max_head_size
        self.max_headers: int = limits.max_headers
        self.max_body_size: int = limits.max_body_size
        self.loop = asyncio.get_running_loop()
        self.closing = False
        # By route prefix (unique per route): hashing the Route itself hashes its URL, per request.
        self._pools: dict[str, tuple[UpstreamPool, bytes]] = {}
        self._date = b""
        self._date_second = -1
        # The flow's rules as bytes, plus the framing this path writes itself (Host, the length).
        self.request_drop = frozenset(name.encode() for name in flow.request_drop) | {b"content-length", b"host"}
        self.reply_drop = (frozenset(name.encode() for name in flow.reply_drop)
                           | {b"content-length", b"date", proxy.request_id_header.lower().encode()})
        self.request_id_header = proxy.request_id_header.lower().encode()
        self.request_id_name = proxy.request_id_header.encode()
        self.preserve_host = proxy.preserve_host
        self.decision_path = flow.decision_path.encode()  # what a check's URL starts with
        # Requests answered by an Exchange, and connections handed to aiohttp (for tests and stats).
        self.served_fast = 0
        self.handed_over = 0

    def pool(self, route: Route) -> tuple[UpstreamPool, bytes]:
        """The connection pool of a route's upstream, and the Host header it is sent."""
        found = self._pools.get(route.prefix)
        if found is None:
            url = route.upstream
            tls = url.scheme == "https"
            host, port = url.raw_host or "localhost", url.port or (443 if tls else 80)
            for pool, host_header in self._pools.values():
                if (pool.host, pool.port) == (host, port) and (pool.tls is not None) == tls:
                    found = (pool, host_header)
                    break
            else:
                netloc = host if url.is_default_port() else f"{host}:{port}"
                context = self.upstream_tls if tls else None
                found = (UpstreamPool(host, port, context, self.proxy, self.loop), netloc.encode())
            self._pools[route.prefix] = found
        return found

    def pools(self) -> list[UpstreamPool]:
        return [pool for pool, _ in self._pools.values()]

    def take_over(self, previous: Lane) -> None:
        """After a reload: keep the previous lane's pools this lane's routes still reach with the
        same proxy settings (their idle connections stay warm); retire the others, whose
        connections close as the requests using them finish."""
        self.closing = previous.closing
        self.served_fast, self.handed_over = previous.served_fast, previous.handed_over
        same = self.proxy == previous.proxy and self.upstream_tls is previous.upstream_tls
        wanted = {(route.upstream.raw_host or "localhost", route.upstream.port, route.upstream.scheme == "https")
                  for route in self.flow.routes}
        kept: set[int] = set()
        for prefix, (pool, host_header) in previous._pools.items():
            if same and (pool.host, pool.port, pool.tls is not None) in wanted:
                # Under a key no prefix has (prefixes start with /): found by `pool`'s scan only.
                self._pools["kept " + prefix] = (pool, host_header)
                kept.add(id(pool))
        for pool in previous.pools():
            if id(pool) not in kept:
                pool.retire()

    def date(self) -> bytes:
        now = int(wall_clock())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True).encode()
        return self._date


class Front(asyncio.Protocol):
    """A client connection as its requests see it; `listener.FrontProtocol` is the whole of it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.incoming: Incoming | None = None
        self.trusted_peer = False
        self.peer_address = ""
        # The Authorization header of the connection's last request and the digest of its key
        # (None: no valid key in it): hashing the key again cost more than a tenth of a request.
        # Held only as long as the connection, which sends that header with every request anyway.
        self.last_authorization: bytes | None = None
        self.last_digest: str | None = None
        self.paused_writing = False
        self._pauses: set[str] = set()
        self._closed = False
        self._closing = False
        # Since when the connection has been closing while its unsent bytes wait (the sweep's).
        self.closing_since: float | None = None

    def hand_over(self, incoming: Incoming) -> None:
        """From this request on, aiohttp serves the connection."""
        raise NotImplementedError

    def exchange_done(self, exchange: object, close: bool) -> None:
        """The exchange serving the connection's current request is over."""
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    def close(self) -> None:
        self._closing = True
        if self.closing_since is None:
            self.closing_since = self.loop.time()
        if self.transport is not None and not self._closed:
            self.transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None and not self._closed:
            self.transport.abort()

    def pause(self, reason: str) -> None:
        if not self._pauses and self.transport is not None and not self._closed:
            self.transport.pause_reading()
        self._pauses.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and self.transport is not None and not self._closed:
                self.transport.resume_reading()

    def is_paused(self, reason: str) -> bool:
        return reason in self._pauses
