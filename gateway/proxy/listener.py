"""The listening side: every client connection starts here, and plain proxied requests never leave.

One `FrontProtocol` per client connection parses requests with llhttp (`httptools`). A plain
HTTP/1.1 request for the upstream (GET, POST, PUT, PATCH, DELETE; no `Origin`, `Upgrade` or
`Expect`; not an API, `/auth/info` or `/_gateway/` path) is served by an `Exchange` entirely in
callbacks: same facts, same checks (`Authenticator.authenticate_cached`, with no task when the token
is cached), same identity and forwarding headers, same log line and usage as the aiohttp path, and
the upstream reached through `upstream.UpstreamPool`. A task is made only when Redis must be asked
or a new upstream connection opened.

Any other request — the tokens API, CORS preflights and pages' requests, WebSockets, HEAD,
HTTP/1.0, `Expect: 100-continue` — hands the connection to aiohttp (`web.Application` in
`gateway/app.py`) for the rest of its life: the request is written, as parsed, into an aiohttp
`RequestHandler` through `Bridge`, a transport whose writes go to the real socket; once the
parser stands between two messages, later bytes go to aiohttp untouched. Both paths run the
same `Gateway` methods, so a request is decided the same way whichever serves it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools
from multidict import CIMultiDict

from gateway.api.platform import AUTH_INFO
from gateway.app import Gateway
from gateway.auth.authenticator import Authenticator, extract_key
from gateway.store.cache import Outcome
from gateway.auth.checks import RequestFacts, request_facts
from gateway.policy.clientaddr import client_address, forwarded_for
from gateway.config import LimitsSettings, Route
from gateway.errors import (
    INTERNAL_ERROR,
    STORAGE_UNAVAILABLE,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    Denied,
    StoreUnavailable,
    error_body,
)
from gateway.writers.logs import LogWriter, RequestIds, request_record
from gateway.policy.paths import pick_route, upstream_target
from gateway.proxy.relay import CORS_PREFIX, HOP_BY_HOP, REQUEST_DROP
from gateway.tokens import Token, key_digest
from gateway.proxy.upstream import NO_BODY_STATUSES, UpstreamConnection, UpstreamFailed, UpstreamPool
from gateway.writers.usage import UsageMeter

log = logging.getLogger("gateway.proxy.listener")
FAST_METHODS = frozenset({b"GET", b"POST", b"PUT", b"PATCH", b"DELETE"})
# Headers that send a request to aiohttp: pages (CORS), protocol switches, 100-continue.
SLOW_HEADERS = (b"origin", b"upgrade", b"expect")
MAX_BUFFERED = 1024 * 1024  # request body held while the token or a connection is awaited
RESPONSE_DROP = frozenset(name.encode() for name in HOP_BY_HOP) | {b"content-length", b"date"}
STATUS_LINES = {status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode()) for status in HTTPStatus}
CLIENT_CLOSED = 499  # nginx's status for a request whose client left before the reply
LINGER = 10.0  # aiohttp's lingering_time: how long the unread rest of a request is read and dropped
REFUSED_LINGER = 1.0  # a connection refused at once (too many open) drains for this long at most
URI_TOO_LONG = "request URI too long"
HEAD_TOO_LARGE = "request header too large"
BODY_TOO_LARGE = "request body too large"
HEAD_TIMEOUT = "request header timeout"
TOO_MANY_CONNECTIONS = "too many connections"


class RequestTooLarge(Exception):
    """Raised from a parser callback: the request passed a size limit (`status` says which)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Spent:
    """What the parser of a closed connection is bound to (it is never fed)."""


SPENT_REQUEST_PARSER = httptools.HttpRequestParser(_Spent())


class Incoming:
    """One parsed request; its body pieces wait here until an exchange or the bridge takes them."""

    __slots__ = ("url", "headers", "index", "method", "keep_alive", "upgrade", "version", "body", "buffered",
                 "complete", "chunked", "length", "head_size", "target", "received")

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
        # Where the body goes once it is no longer buffered: an Exchange or the Bridge.
        self.target: Any = None


class FastLane:
    """Per process: the protocol factory for the listening socket, and what its connections share."""

    def __init__(self, gateway: Gateway, handler_factory: Callable[[], asyncio.Protocol]) -> None:
        self.gateway = gateway
        self.handler_factory = handler_factory
        settings = gateway.settings
        proxy = settings.proxy
        # The services every request uses, held here as typed attributes: reaching them through
        # the (interpreted) Gateway costs an attribute lookup by name each time.
        self.auth: Authenticator = gateway.auth
        self.usage: UsageMeter = gateway.usage
        self.logs: LogWriter = gateway.logs
        self.request_ids: RequestIds = gateway.request_ids
        self.routes: tuple[Route, ...] = settings.routes
        limits = settings.limits
        self.limits: LimitsSettings = limits
        # The whole head may be buffered by the parser before any callback sees it (a header that
        # never ends): what a connection may feed it between two heads' ends.
        self.max_pending_head = limits.max_head_size + limits.max_request_line
        self.loop = asyncio.get_running_loop()
        self.connections: set[FrontProtocol] = set()
        self.closing = False
        # By route prefix (unique per route): hashing the Route itself hashes its URL, per request.
        self._pools: dict[str, tuple[UpstreamPool, bytes]] = {}
        self._date = b""
        self._date_second = -1
        drop = {name.encode() for name in HOP_BY_HOP | REQUEST_DROP} | {b"content-length", b"host"}
        drop |= {proxy.token_id_header.lower().encode(), proxy.account_id_header.lower().encode(),
                 proxy.request_id_header.lower().encode()}
        if not proxy.forward_authorization:
            drop.add(b"authorization")
        self.request_drop = frozenset(drop)
        self.response_drop = RESPONSE_DROP | {proxy.request_id_header.lower().encode()}
        self.request_id_header = proxy.request_id_header.lower().encode()
        self.request_id_name = proxy.request_id_header.encode()
        self.preserve_host = proxy.preserve_host
        self.internal_prefix = settings.internal_prefix
        # Paths the API answers (every one under a platform prefix, 404 if unknown) or the
        # gateway's own: never proxied, so handed to aiohttp after the `handles` test below.
        self.not_proxied = (*gateway.api.prefixes, AUTH_INFO, settings.internal_prefix)
        self.token_id_name = proxy.token_id_header.encode()
        self.account_id_name = proxy.account_id_header.encode()
        self.realm_challenge = f'FlespiToken realm="{settings.realm}"'.encode()
        self._sweeper: asyncio.Task[None] | None = None
        # Requests answered by an Exchange, and connections handed to aiohttp (for tests and stats).
        self.served_fast = 0
        self.handed_over = 0

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    def start(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep())

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
                context = self.gateway.services.upstream_tls if tls else None
                found = (UpstreamPool(host, port, context, self.gateway.settings.proxy, self.loop), netloc.encode())
            self._pools[route.prefix] = found
        return found

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True).encode()
        return self._date

    async def _sweep(self) -> None:
        """Enforce the connection timeouts: one pass over the connections instead of a timer each."""
        limits = self.limits
        tick = min(1.0, limits.header_timeout / 4, limits.keepalive_timeout / 4, limits.send_timeout / 4)
        while True:
            await asyncio.sleep(tick)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.check_timeouts(now, limits)

    async def shutdown(self, timeout: float) -> None:
        """Stop keep-alive, let requests in flight finish (up to `timeout`), then close the pools."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if conn.idle_since is not None:
                conn.close()
        deadline = self.loop.time() + timeout
        while any(conn.exchange is not None for conn in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.bridge is None:
                conn.close()
        for pool, _ in self._pools.values():
            pool.close()


class FrontProtocol(asyncio.Protocol):
    """One client connection: requests are served one at a time, in order."""

    def __init__(self, lane: FastLane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.parser = httptools.HttpRequestParser(self)
        self.incoming: Incoming | None = None
        self.queue: deque[Incoming] = deque()
        self.exchange: Exchange | None = None
        self.bridge: Bridge | None = None
        self.raw = False  # bytes go to aiohttp unparsed
        self.raw_backlog: list[bytes] = []
        self.idle_since: float | None = lane.loop.time()
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
        self._eof = False
        # Timeouts, enforced by the lane's sweep (`check_timeouts`): since when a head has been
        # arriving, the client has taken nothing of what is sent (`pause_writing`), or the
        # connection has been closing while its unsent bytes wait.
        self.head_since: float | None = None
        self.stalled_since: float | None = None
        self.closing_since: float | None = None
        # Bytes fed to the parser within the current head (it buffers a header that never ends
        # before any callback sees it), and how many heads were completed so far.
        self._pending_head = 0
        self._heads_done = 0
        # Set by the parser callbacks that refuse a request over a limit: the exception they
        # raise reaches data_received wrapped by httptools, and this does not depend on its chaining.
        self._too_large: RequestTooLarge | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else str(peer or "")
        # Per connection, not per request: whether the peer is a trusted proxy, and the address
        # a request from it has when it brings no X-Forwarded-For.
        gateway = self.lane.gateway
        self.trusted_peer = gateway.is_trusted_peer(self.peer)
        self.peer_address = client_address(self.peer, _NO_HEADERS, gateway.trusted)
        lane = self.lane
        full = len(lane.connections) >= lane.limits.max_connections
        lane.connections.add(self)  # counted while it drains, so the sweep bounds its close too
        if full:
            self.idle_since = None
            self.write(render_error(lane, 503, TOO_MANY_CONNECTIONS, {}, b"", close=True))
            self.linger(REFUSED_LINGER)

    def data_received(self, data: bytes) -> None:
        if self.raw:
            self._raw_data(data)
            return
        heads_done = self._heads_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.raw = True
            tail = data[upgrade.args[0]:]
            if tail:
                self._raw_data(tail)
            return
        except httptools.HttpParserCallbackError:
            refusal = self._too_large
            if refusal is not None:
                self._refuse(refusal.status, refusal.reason)
            else:
                log.exception("request parsing failed")
                self._refuse(500, INTERNAL_ERROR)
            return
        except httptools.HttpParserError:
            self._refuse(400, "malformed HTTP request")
            return
        if self.head_since is not None and self._heads_done == heads_done:
            # Still in the head this data started in: bound what the parser holds of it. (A head
            # that began behind one completed in the same data is counted from the next data on.)
            self._pending_head += len(data)
            if self._pending_head > self.lane.max_pending_head:
                self._refuse(431, HEAD_TOO_LARGE)

    def eof_received(self) -> bool:
        self._eof = True
        bridge = self.bridge
        if bridge is not None:
            if self.raw or self.incoming is not None:
                return False  # an upgraded stream, or a request that can never be completed: close
            handler = bridge.handler
            handler.eof_received()
            if bridge.idle():
                return False  # nothing in progress: close now, as aiohttp's own transport would
            handler.close()  # answer what was read, then close (a half-closed client may still read)
            return True
        if self.exchange is not None and self.exchange.incoming is self.incoming:
            return False  # mid-body: the request can never be completed, so the client is gone
        if self.exchange is not None:
            return True  # half-closed: the reply in progress is still sent
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()  # it holds this connection, and so its buffers, until it fires
            self._linger_timer = None
        self.lane.connections.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.client_gone()
            exchange.incoming.target = None
        self.queue.clear()
        bridge, self.bridge = self.bridge, None
        if bridge is not None:
            bridge.lost(exc)
        # The parser calls back into this object and this object holds the parser: a cycle only
        # the collector could free, and never once `gc.freeze` has moved it out of its reach.
        self.parser = SPENT_REQUEST_PARSER

    def pause_writing(self) -> None:
        self.paused_writing = True
        self.stalled_since = self.lane.loop.time()
        if self.bridge is not None:
            self.bridge.handler.pause_writing()
        elif self.exchange is not None:
            self.exchange.pause_download()

    def resume_writing(self) -> None:
        self.paused_writing = False
        self.stalled_since = None
        if self.bridge is not None:
            self.bridge.handler.resume_writing()
        elif self.exchange is not None:
            self.exchange.resume_download()

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.incoming = Incoming()
        self.idle_since = None
        self.head_since = self.lane.loop.time()
        self._pending_head = 0

    def on_url(self, url: bytes) -> None:
        incoming = self.incoming
        assert incoming is not None
        incoming.url += url
        if len(incoming.url) > self.lane.limits.max_request_line:
            self._over_limit(414, URI_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        incoming = self.incoming
        assert incoming is not None
        limits = self.lane.limits
        size = incoming.head_size = incoming.head_size + len(name) + len(value) + 4
        if (len(name) + len(value) > limits.max_header_size or size > limits.max_head_size
                or len(incoming.headers) >= limits.max_headers):
            self._over_limit(431, HEAD_TOO_LARGE)
        lower = name.lower()
        incoming.headers.append((lower, name, value))
        incoming.index.setdefault(lower, value)

    def _over_limit(self, status: int, reason: str) -> None:
        self._too_large = refusal = RequestTooLarge(status, reason)
        raise refusal
    def on_headers_complete(self) -> None:
        incoming = self.incoming
        assert incoming is not None
        self.head_since = None
        self._heads_done += 1
        parser = self.parser
        incoming.method = parser.get_method()
        incoming.version = parser.get_http_version()
        incoming.keep_alive = parser.should_keep_alive()
        incoming.upgrade = parser.should_upgrade()
        index = incoming.index
        encoding = index.get(b"transfer-encoding")
        # Every Transfer-Encoding field counts ("gzip" then "chunked" is chunked to llhttp), not the first.
        incoming.chunked = encoding is not None and any(
            lower == b"transfer-encoding" and b"chunked" in value.lower() for lower, _, value in incoming.headers)
        length = index.get(b"content-length")
        incoming.length = int(length) if length is not None and not incoming.chunked else None
        max_body = self.lane.limits.max_body_size
        if max_body and incoming.length is not None and incoming.length > max_body:
            self._over_limit(413, BODY_TOO_LARGE)
        if self.bridge is not None:
            self.bridge.send_head(incoming)
        elif self.exchange is None and not self.queue:
            self._start(incoming)
        else:
            self.queue.append(incoming)  # pipelined: served when the ones before it are
            if len(self.queue) > 8:
                self.pause("pipeline")

    def on_body(self, body: bytes) -> None:
        incoming = self.incoming
        assert incoming is not None
        incoming.received += len(body)
        max_body = self.lane.limits.max_body_size
        if max_body and incoming.received > max_body:  # a chunked body, without a length to refuse at once
            self._over_limit(413, BODY_TOO_LARGE)
        target = incoming.target
        if target is not None:
            target.request_body(body)
            return
        incoming.body.append(body)
        incoming.buffered += len(body)
        if incoming.buffered > MAX_BUFFERED:
            self.pause("buffered")

    def on_message_complete(self) -> None:
        incoming = self.incoming
        assert incoming is not None
        incoming.complete = True
        if incoming.target is not None:
            incoming.target.request_done()
        self.incoming = None

    # -- serving ---------------------------------------------------------------------------------

    def _start(self, incoming: Incoming) -> None:
        if self._closing:
            return  # requests parsed after the reply that ends the connection are not served
        self.idle_since = None
        index = incoming.index
        if (incoming.method not in FAST_METHODS or incoming.version != "1.1" or incoming.upgrade
                or not incoming.url.startswith(b"/") or any(name in index for name in SLOW_HEADERS)):
            self.hand_over(incoming)
            return
        self.exchange = Exchange(self, incoming)
        self.exchange.start()

    def hand_over(self, incoming: Incoming) -> None:
        """From this request on, aiohttp serves the connection."""
        self.lane.handed_over += 1
        self.exchange = None
        self.bridge = Bridge(self)
        self.bridge.send_head(incoming)
        for queued in self.queue:
            self.bridge.send_head(queued)
        self.queue.clear()
        if self.raw_backlog:
            for data in self.raw_backlog:
                self.bridge.handler.data_received(data)
            self.raw_backlog.clear()
        self.resume("pipeline")

    def exchange_done(self, exchange: Exchange, close: bool) -> None:
        if self.exchange is not exchange:
            return
        self.exchange = None
        exchange.incoming.target = None  # break the cycle: reference counting frees both now
        self.resume("buffered")
        if close or self.lane.closing or self._closed or self._eof:
            if exchange.incoming.complete:
                self.close()
            else:
                self.linger()  # the client may still be sending the body
            return
        if self.queue:
            self.resume("pipeline")
            self._start(self.queue.popleft())
        else:
            self.idle_since = self.lane.loop.time()

    def _raw_data(self, data: bytes) -> None:
        if self.bridge is not None:
            self.bridge.handler.data_received(data)
        elif self._closing:
            return  # lingering: what the client still sends is dropped
        else:
            self.raw_backlog.append(data)  # an upgrade pipelined behind a fast request
            self.pause("pipeline")

    def _refuse(self, status: int, reason: str) -> None:
        """The byte stream cannot be read any further: answer if nothing else is, then close."""
        self.head_since = None
        exchange = self.exchange
        if (exchange is not None and exchange.incoming is self.incoming and not exchange.replied
                and self.bridge is None):
            exchange.close_after = True
            exchange.fail(status, reason, {})  # its own request went over a limit mid-body
            return
        bridge = self.bridge
        if (bridge is not None and not bridge.idle()) or exchange is not None or self.transport is None:
            self.close()  # a reply is on its way: the stream cannot carry another
            return
        self.write(render_error(self.lane, status, reason, {}, b"", close=True))
        self.linger()

    def check_timeouts(self, now: float, limits: LimitsSettings) -> None:
        """Called by the lane's sweep: drop a connection whose client stalls, idles or dawdles."""
        if self._closed:
            return
        if self.stalled_since is not None and now - self.stalled_since > limits.send_timeout:
            self.abort()  # it takes nothing of its reply: its upstream connection is given back too
        elif self.closing_since is not None:
            if now - self.closing_since > limits.send_timeout:
                self.abort()  # closed, but what was left to send never leaves
        elif self.head_since is not None:
            if now - self.head_since > limits.header_timeout:
                self._refuse(408, HEAD_TIMEOUT)
        elif self.idle_since is not None and now - self.idle_since > limits.keepalive_timeout:
            self.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    def close(self) -> None:
        self._closing = True
        if self.closing_since is None:
            self.closing_since = self.lane.loop.time()
        if self.transport is not None and not self._closed:
            self.transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None and not self._closed:
            self.transport.abort()

    def linger(self, timeout: float = LINGER) -> None:
        """Close after a reply sent before the request was read whole. Closing at once, with bytes
        unread, makes the kernel reset the connection, and a client still sending loses the reply
        it had not read yet: so the reply is followed by our FIN, what the client still sends is
        read and dropped, and the connection closes on the client's EOF or after LINGER."""
        transport = self.transport
        if transport is None or self._closed or self._eof or not transport.can_write_eof():
            self.close()
            return
        self._closing = True
        self.raw = True  # later bytes skip the parser (see _raw_data)
        self._pauses.clear()
        transport.resume_reading()
        transport.write_eof()
        self._linger_timer = self.lane.loop.call_later(timeout, self.close)

    def pause(self, reason: str) -> None:
        if not self._pauses and self.transport is not None and not self._closed:
            self.transport.pause_reading()
        self._pauses.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and self.transport is not None and not self._closed:
                self.transport.resume_reading()


def render_error(lane: FastLane, status: int, reason: str, extra: dict[str, str], request_id: bytes,
                 close: bool) -> bytes:
    """The same reply as `errors.error_response`, as bytes."""
    body = error_body(status, reason)
    head = [STATUS_LINES.get(status) or b"HTTP/1.1 %d Error\r\n" % status,
            b"Content-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\n" % (len(body), lane.date())]
    if status == 401:
        head.append(b"WWW-Authenticate: %s\r\n" % lane.realm_challenge)
    for name, value in extra.items():
        head.append(b"%s: %s\r\n" % (name.encode(), value.encode()))
    if request_id:
        head.append(b"%s: %s\r\n" % (lane.request_id_name, request_id))
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    head.append(body)
    return b"".join(head)


class Exchange:
    """One request served on the fast path, from its head to the last byte of the reply."""

    __slots__ = ("front", "lane", "incoming", "started", "facts", "token", "served", "request_id", "conn",
                 "task", "status", "replied", "out", "chunked_reply", "sent_bytes", "received_bytes", "done",
                 "close_after", "head", "retried", "digest")

    def __init__(self, front: FrontProtocol, incoming: Incoming) -> None:
        self.front = front
        self.lane = front.lane
        self.incoming = incoming
        self.started = time.perf_counter()
        self.facts: RequestFacts | None = None
        self.token: Token | None = None  # the token found (it may still have been refused)
        self.served: Token | None = None  # the token that passed every check
        self.request_id = b""
        self.conn: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.status = 0
        self.replied = False  # the reply's head went to the client
        self.out: list[bytes] = []
        self.chunked_reply = False
        self.sent_bytes = 0
        self.received_bytes = 0
        self.done = False
        self.close_after = not incoming.keep_alive
        self.head = b""
        self.retried = False
        self.digest: str | None = None  # the key's digest, kept only while its record is being loaded

    # -- deciding --------------------------------------------------------------------------------

    def start(self) -> None:
        incoming, lane, front = self.incoming, self.lane, self.front
        gateway = lane.gateway
        index = incoming.index
        now = time.time()
        incoming_id = index.get(lane.request_id_header) if front.trusted_peer else None
        self.request_id = (gateway.request_id(incoming_id.decode("latin-1"), front.peer) if incoming_id
                           else lane.request_ids.next()).encode()
        try:
            raw_path, _, query = incoming.url.decode("utf-8", "surrogateescape").partition("?")
            cid = index.get(b"x-flespi-cid")
            self.facts = facts = request_facts(
                incoming.method.decode(), raw_path, query,
                cid.decode("utf-8", "surrogateescape") if cid is not None else None, None, self._client_ip(), now)
            path = facts.path
            if path.startswith(lane.not_proxied) and (gateway.api.handles(path)
                                                      or path.startswith(lane.internal_prefix)):
                front.hand_over(incoming)
                return
            incoming.target = self
            authorization = index.get(b"authorization")
            if authorization is not None and authorization == front.last_authorization:
                digest = front.last_digest  # a keep-alive client sends the same key each time
            else:
                key = extract_key(_text(authorization))
                digest = key_digest(key) if key is not None else None
                if authorization is not None:
                    front.last_authorization, front.last_digest = authorization, digest
            token = lane.auth.authenticate_cached(digest, facts)
        except Exception as error:
            incoming.target = self
            self._refuse(error)
            return
        if token is not None:
            self.token = self.served = token
            self._forward()
        elif digest is not None and lane.auth.when_loaded(digest, self._loaded):
            self.digest = digest  # a plain miss: `_loaded` goes on once the record's batch is read
        else:
            self.task = asyncio.ensure_future(self._authenticate())

    def _loaded(self, outcome: Outcome) -> None:
        """The cache read the key's record (or failed to): decide as `start` would have."""
        digest, self.digest = self.digest, None
        if self.done:
            return  # the client left meanwhile
        if isinstance(outcome, asyncio.CancelledError):
            self.fail(503, STORAGE_UNAVAILABLE, {})  # shutting down
            return
        try:
            facts = self.facts
            assert facts is not None  # set by `start` before it waited
            # Another request's load may have filled the entry even if this one failed.
            token = self.lane.auth.authenticate_cached(digest, facts)
        except Exception as error:
            self._refuse(error)
            return
        if token is not None:
            self.token = self.served = token
            self._guarded(self._forward)
        elif isinstance(outcome, StoreUnavailable):
            self.fail(503, STORAGE_UNAVAILABLE, {})
        elif isinstance(outcome, BaseException):
            self.fail(500, INTERNAL_ERROR, {})  # the cache logged it
        else:
            # The entry needs more than a look (it looks expired, or was dropped while being
            # read): the full path decides.
            self.task = asyncio.ensure_future(self._authenticate())

    def _client_ip(self) -> str:
        front = self.front
        if not front.trusted_peer or b"x-forwarded-for" not in self.incoming.index:
            return front.peer_address
        return client_address(front.peer, self._multidict(), self.lane.gateway.trusted)

    def _multidict(self) -> CIMultiDict[str]:
        return CIMultiDict((name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
                           for _, name, value in self.incoming.headers)

    async def _authenticate(self) -> None:
        try:
            facts = self.facts
            assert facts is not None  # set by `start` before it made this task
            token = await self.lane.auth.authenticate(
                extract_key(_text(self.incoming.index.get(b"authorization"))), facts)
        except Exception as error:
            self._refuse(error)
            return
        self.task = None
        if self.done:
            return
        self.token = self.served = token
        self._guarded(self._forward)

    def _refuse(self, error: Exception) -> None:
        """Answer a request its checks refused (`Denied`) or could not decide: any other error
        denies it too, with 500, and is logged."""
        if isinstance(error, Denied):
            facts = self.facts
            self.token = facts.token if facts is not None else None
            self.fail(error.status, error.reason, error.headers)
        else:
            log.error("unexpected error while authenticating; request denied", exc_info=error)
            self.fail(500, INTERNAL_ERROR, {})

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a step from a task: whatever goes wrong, the client gets an answer."""
        try:
            step()
        except Exception:
            log.exception("unexpected error while forwarding")
            self.fail(500, INTERNAL_ERROR, {})

    # -- forwarding ------------------------------------------------------------------------------

    def _forward(self) -> None:
        lane, facts = self.lane, self.facts
        assert facts is not None  # _forward runs only for a request its checks let through
        route = pick_route(lane.routes, facts.path)
        if route is None:
            self.fail(404, f"no upstream for {facts.path}", {})
            return
        pool, host = lane.pool(route)
        self.head = self._request_head(upstream_target(route, facts.path, facts.forward_path, facts.query), host)
        conn = pool.take_idle()
        if conn is None:
            self.task = asyncio.ensure_future(self._connect(pool))
        else:
            self._send(conn)

    async def _connect(self, pool: UpstreamPool) -> None:
        try:
            conn = await pool.connect()
        except UpstreamFailed as failed:
            self.task = None
            self.fail(504 if failed.timeout else 502, UPSTREAM_TIMEOUT if failed.timeout else UPSTREAM_UNAVAILABLE, {})
            return
        self.task = None
        if self.done:
            pool.release(conn)
            return
        self._guarded(lambda: self._send(conn))

    def _send(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        if self.front.paused_writing:
            conn.pause_reply()  # the client is not reading what came before yet
        incoming = self.incoming
        body = incoming.body
        if body:
            parts = [self._framed(piece) for piece in body] if incoming.chunked else body
            self.sent_bytes = incoming.buffered
            incoming.body = []
            if incoming.complete and incoming.chunked:
                parts.append(b"0\r\n\r\n")
            conn.send(self, self.head + b"".join(parts))
            self.front.resume("buffered")
        else:
            conn.send(self, self.head if not (incoming.complete and incoming.chunked) else self.head + b"0\r\n\r\n")
        if incoming.complete:
            conn.request_complete()

    def _request_head(self, target: str, host: bytes) -> bytes:
        lane, incoming, gateway = self.lane, self.incoming, self.lane.gateway
        index = incoming.index
        drop = lane.request_drop
        connection = index.get(b"connection")
        if connection is not None:
            named = set(drop)
            for lower, _name, value in incoming.headers:
                if lower == b"connection":
                    for item in value.split(b","):
                        named.add(item.strip().lower())
            drop = frozenset(named)
        client_host = index.get(b"host", b"")
        parts = [incoming.method, b" ", target.encode("utf-8", "surrogateescape"), b" HTTP/1.1\r\nHost: ",
                 client_host if lane.preserve_host and client_host else host, b"\r\n"]
        for lower, name, value in incoming.headers:
            if lower not in drop:
                parts += (name, b": ", value, b"\r\n")
        # Gateway.identity_headers, as bytes.
        served, facts = self.served, self.facts
        assert served is not None and facts is not None
        parts += (lane.token_id_name, b": ", str(served.id).encode(), b"\r\n", lane.account_id_name, b": ",
                  str(facts.account_of(served)).encode(), b"\r\n", lane.request_id_name, b": ", self.request_id,
                  b"\r\n")
        front = self.front
        trusted = front.trusted_peer
        forwarded = (forwarded_for(front.peer, self._multidict(), gateway.trusted) if trusted
                     else front.peer_address)
        proto = (index.get(b"x-forwarded-proto") if trusted else None) or b"http"
        forwarded_host = (index.get(b"x-forwarded-host") if trusted else None) or client_host
        parts.append(b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n" % (
            forwarded.encode(), proto, forwarded_host))
        if incoming.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif incoming.length is not None:
            parts.append(b"Content-Length: %d\r\n" % incoming.length)
        parts.append(b"\r\n")
        return b"".join(parts)

    @staticmethod
    def _framed(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    # request body, after the head was sent (called by FrontProtocol)

    def request_body(self, data: bytes) -> None:
        if self.done:
            return
        conn = self.conn
        if conn is None:
            self.incoming.body.append(data)
            self.incoming.buffered += len(data)
            if self.incoming.buffered > MAX_BUFFERED:
                self.front.pause("buffered")
            return
        self.sent_bytes += len(data)
        conn.send_body(self._framed(data) if self.incoming.chunked else data)

    def request_done(self) -> None:
        if self.done:
            self.front.exchange_done(self, self.close_after)
            return
        conn = self.conn
        if conn is None:
            return
        if self.incoming.chunked:
            conn.send_body(b"0\r\n\r\n")
        conn.request_complete()

    # -- the reply (UpstreamSink) ----------------------------------------------------------------

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes, bytes]], length: int | None,
                chunked: bool) -> None:
        lane = self.lane
        self.status = status
        drop = lane.response_drop
        named: set[bytes] | None = None
        for lower, _, value in headers:
            if lower == b"connection":
                if named is None:
                    named = set()
                for item in value.split(b","):  # a loop: compiled, a generator here cost 7,000 instructions
                    named.add(item.strip().lower())
        out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        date = None
        for lower, name, value in headers:
            if lower in drop or (named is not None and lower in named) or lower.startswith(CORS_PREFIX_BYTES):
                if lower == b"date":
                    date = value
                continue
            out += (name, b": ", value, b"\r\n")
        out.append(b"Date: %s\r\n%s: %s\r\n" % (date or lane.date(), lane.request_id_name, self.request_id))
        if status in NO_BODY_STATUSES:
            pass
        elif length is not None:
            out.append(b"Content-Length: %d\r\n" % length)
        else:
            out.append(b"Transfer-Encoding: chunked\r\n")
            self.chunked_reply = True
        if self.close_after or lane.closing:
            self.close_after = True
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        self.out = out
        self.replied = True

    def on_body(self, data: bytes) -> None:
        self.received_bytes += len(data)
        if self.chunked_reply:
            self.out.append(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.out.append(data)

    def flush(self) -> None:
        if self.out:
            self.front.write(b"".join(self.out))
            self.out = []

    def on_done(self) -> None:
        self.conn = None
        if self.chunked_reply:
            self.out.append(b"0\r\n\r\n")
        self.flush()
        self._finish()

    def on_fail(self, timeout: bool) -> None:
        conn, self.conn = self.conn, None
        if self.done:
            return
        if not self.replied:
            if (conn is not None and conn.reused and not self.retried and not timeout and self.incoming.length is None
                    and not self.incoming.chunked):
                # A kept-alive connection the upstream had just closed: try once on a fresh one.
                self.retried = True
                pool = conn.pool
                self.task = asyncio.ensure_future(self._connect(pool))
                return
            self.fail(504 if timeout else 502, UPSTREAM_TIMEOUT if timeout else UPSTREAM_UNAVAILABLE, {})
            return
        # The status is already sent: the only honest signal left is a broken connection.
        log.warning("upstream failed mid-response (%s); closing client connection", "timeout" if timeout else "error")
        self.flush()
        self.close_after = True
        self.front.close()
        self._finish()

    def pause_upload(self) -> None:
        self.front.pause("upload")

    def resume_upload(self) -> None:
        self.front.resume("upload")

    def pause_download(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.pause_reply()

    def resume_download(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.resume_reply()

    # -- ending ----------------------------------------------------------------------------------

    def fail(self, status: int, reason: str, extra: dict[str, str]) -> None:
        """Answer with a gateway error (nothing was sent yet)."""
        if self.done:
            return
        if self.conn is not None:
            self.conn.abandon()
            self.conn = None
        self.status = status
        incoming = self.incoming
        if not incoming.complete and (incoming.chunked or incoming.length):
            self.close_after = True  # the rest of the body would have to be read and thrown away
        self.front.write(render_error(self.lane, status, reason, extra, self.request_id,
                                      self.close_after or self.lane.closing))
        self.replied = True
        self._finish()

    def client_gone(self) -> None:
        """The client closed its connection: stop everything for this request."""
        if self.done:
            return
        if self.task is not None:
            self.task.cancel()
        if self.conn is not None:
            self.conn.abandon()
            self.conn = None
        if not self.replied:
            self.status = CLIENT_CLOSED
        self.close_after = True
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.lane.served_fast += 1
        self.front.resume("upload")
        lane, facts, token = self.lane, self.facts, self.token
        if facts is not None and token is not None:
            served = self.served
            if served is not None:
                lane.usage.record(served, served.cid, self.sent_bytes + self.received_bytes, facts.now)
            lane.logs.emit(request_record(
                facts.now, token.id, token.cid, facts.client_ip, _text(self.incoming.index.get(b"x-flespi-app")) or "",
                facts.method, facts.path, self.status, time.perf_counter() - self.started, self.received_bytes,
                self.request_id.decode()))
        if self.incoming.complete or self.close_after:
            self.front.exchange_done(self, self.close_after)
        # else: FrontProtocol reads the rest of the body (request_body ignores it) and then calls
        # request_done, which ends the exchange; the connection stays usable.


CORS_PREFIX_BYTES = CORS_PREFIX.encode()
_NO_HEADERS: CIMultiDict[str] = CIMultiDict()


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", "surrogateescape") if value is not None else None


class Bridge(asyncio.Transport):
    """What an aiohttp `RequestHandler` sees as its transport: writes go to the client socket."""

    def __init__(self, front: FrontProtocol) -> None:
        super().__init__()
        self.front = front
        self.handler: Any = front.lane.handler_factory()
        self._closing = False
        self._lost = False
        self.handler.connection_made(self)
        if front.paused_writing:
            self.handler.pause_writing()

    def send_head(self, incoming: Incoming) -> None:
        """Write a request, as parsed so far, into aiohttp; the rest of its body follows."""
        head = [b"%s %s HTTP/%s\r\n" % (incoming.method, incoming.url, incoming.version.encode())]
        head.extend(b"%s: %s\r\n" % (name, value) for _, name, value in incoming.headers)
        head.append(b"\r\n")
        self.handler.data_received(b"".join(head))
        incoming.target = self
        for piece in incoming.body:
            self._body(piece, incoming.chunked)
        incoming.body = []
        self.front.resume("buffered")
        if incoming.complete and incoming.chunked:
            self.handler.data_received(b"0\r\n\r\n")

    def _body(self, data: bytes, chunked: bool) -> None:
        # The parser took the chunked framing off; aiohttp gets it back, chunk extensions aside.
        self.handler.data_received(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

    def request_body(self, data: bytes) -> None:
        incoming = self.front.incoming
        self._body(data, incoming is not None and incoming.chunked)

    def request_done(self) -> None:
        incoming = self.front.incoming
        if incoming is not None and incoming.chunked:
            self.handler.data_received(b"0\r\n\r\n")

    def idle(self) -> bool:
        """Whether aiohttp waits for a request, with none in progress or queued.

        aiohttp has no public word for it; its handler's `_waiter` is the future it waits on
        between requests (tests/test_connections.py fails if that ever changes)."""
        waiter = getattr(self.handler, "_waiter", None)
        return waiter is not None and not waiter.done() and not getattr(self.handler, "_messages", True)

    def lost(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self.handler.connection_lost(exc)

    # -- asyncio.Transport, as far as aiohttp uses it ---------------------------------------------

    def write(self, data: Any) -> None:
        self.front.write(bytes(data) if not isinstance(data, bytes) else data)

    def writelines(self, list_of_data: Any) -> None:
        self.front.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        transport = self.front.transport
        return self._closing or transport is None or transport.is_closing()

    def close(self) -> None:
        self._closing = True
        self.front.close()

    def abort(self) -> None:
        self._closing = True
        if self.front.transport is not None:
            self.front.transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self.front.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def pause_reading(self) -> None:
        self.front.pause("aiohttp")

    def resume_reading(self) -> None:
        self.front.resume("aiohttp")

    def is_reading(self) -> bool:
        return "aiohttp" not in self.front._pauses

    def get_write_buffer_size(self) -> int:
        transport = self.front.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.front.transport is not None:
            self.front.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        transport = self.front.transport
        return transport.get_write_buffer_limits() if transport is not None else (0, 0)

    def can_write_eof(self) -> bool:
        transport = self.front.transport
        return transport.can_write_eof() if transport is not None else False

    def write_eof(self) -> None:
        if self.front.transport is not None:
            self.front.transport.write_eof()
