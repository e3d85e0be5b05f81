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
parser stands between two messages, later bytes go to aiohttp untouched. Both paths apply the
same `RequestFlow` (flow.py), so a request is decided the same way whichever serves it.

`Incoming`, the shared `Lane` and the `Front` interface that `Exchange` (exchange.py) and
`Bridge` (bridge.py) use live in front.py, below all three.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable

import httptools
from multidict import CIMultiDict

from gateway.config import LimitsSettings
from gateway.errors import INTERNAL_ERROR, MALFORMED_REQUEST, Denied
from gateway.proxy import decision
from gateway.proxy.bridge import Bridge
from gateway.proxy.exchange import MAX_BUFFERED, Exchange
from gateway.proxy.flow import SINGLE_HEADERS, RequestFlow
from gateway.proxy.front import Front, Incoming, Lane
from gateway.proxy.replies import error_bytes
from gateway.proxy.upstream import UpstreamPool

log = logging.getLogger("gateway.proxy.listener")
FAST_METHODS = frozenset({b"GET", b"POST", b"PUT", b"PATCH", b"DELETE"})
SINGLE_HEADER_NAMES = frozenset(name.encode() for name in SINGLE_HEADERS)
# Headers that send a request to aiohttp: pages (CORS), protocol switches, 100-continue.
SLOW_HEADERS = (b"origin", b"upgrade", b"expect")
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


class FastLane:
    """Per process: the protocol factory for the listening socket, and its connections.

    What the requests share is a `front.Lane`, held rather than inherited: mypyc's native
    subclass of a class compiled in another module crashed when constructed."""

    def __init__(self, flow: RequestFlow, handler_factory: Callable[[], asyncio.Protocol],
                 upstream_tls: ssl.SSLContext, fast_path: bool = True) -> None:
        """`fast_path=False` hands every request to aiohttp (the tests run both ways with it)."""
        self.shared = shared = Lane(flow, handler_factory, upstream_tls)
        self.fast_methods = FAST_METHODS if fast_path else frozenset()
        self.flow = flow
        self.loop = shared.loop
        self.limits: LimitsSettings = shared.limits
        limits = self.limits
        # Read for every header of every request: native ints (the settings object is not compiled).
        self.max_request_line: int = shared.max_request_line
        self.max_header_size: int = shared.max_header_size
        self.max_head_size: int = shared.max_head_size
        self.max_headers: int = shared.max_headers
        self.max_body_size: int = shared.max_body_size
        # The whole head may be buffered by the parser before any callback sees it (a header that
        # never ends): what a connection may feed it between two heads' ends.
        self.max_pending_head = limits.max_head_size + limits.max_request_line
        self.connections: set[FrontProtocol] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # Read by tests and stats; kept by the shared lane, which the exchanges count on.
    @property
    def served_fast(self) -> int:
        return self.shared.served_fast

    @property
    def handed_over(self) -> int:
        return self.shared.handed_over

    @property
    def closing(self) -> bool:
        return self.shared.closing

    def pools(self) -> list[UpstreamPool]:
        return self.shared.pools()

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    def reconfigure(self, flow: RequestFlow, upstream_tls: ssl.SSLContext) -> None:
        """A reload: requests that start from now on use `flow` (on open connections too); those
        in flight finish with the lane they started with."""
        lane = Lane(flow, self.shared.handler_factory, upstream_tls)
        lane.take_over(self.shared)
        self.shared, self.flow = lane, flow

    def start(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        """Enforce the connection timeouts: one pass over the connections instead of a timer each."""
        limits = self.limits
        tick = min(1.0, limits.header_timeout / 4, limits.keepalive_timeout / 4, limits.send_timeout / 4)
        while True:
            await asyncio.sleep(tick)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.check_timeouts(now, limits)

    async def shutdown(self, timeout: float) -> None:  # noqa: ASYNC109 (the caller's grace period)
        """Stop keep-alive, let requests in flight finish (up to `timeout`), then close the pools."""
        self.shared.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if conn.idle_since is not None:
                conn.close()
        deadline = self.loop.time() + timeout
        # Polled: exchanges end in callbacks, with no event to wait on.
        while any(conn.exchange is not None for conn in self.connections) and self.loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.bridge is None:
                conn.close()
        for pool in self.pools():
            pool.close()


class FrontProtocol(Front):
    """One client connection: requests are served one at a time, in order."""

    def __init__(self, lane: FastLane) -> None:
        super().__init__(lane.loop)
        self.lane = lane
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Incoming] = deque()
        self.exchange: Exchange | None = None
        self.bridge: Bridge | None = None
        self.flow: RequestFlow = lane.flow  # the flow `trusted_peer` and `peer_address` were worked out by
        self.raw = False  # bytes go to aiohttp unparsed
        self.raw_backlog: list[bytes] = []
        self.idle_since: float | None = lane.loop.time()
        self._eof = False
        # Timeouts, enforced by the lane's sweep (`check_timeouts`): since when a head has been
        # arriving, or the client has taken nothing of what is sent (`pause_writing`); and
        # `Front.closing_since`.
        self.head_since: float | None = None
        self.stalled_since: float | None = None
        # Bytes fed to the parser within the current head (it buffers a header that never ends
        # before any callback sees it), and how many heads were completed so far.
        self._pending_head = 0
        self._heads_done = 0
        # Set by the parser callbacks that refuse a request over a limit: the exception they
        # raise reaches data_received wrapped by httptools, and this does not depend on its chaining.
        self._too_large: RequestTooLarge | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        # A request whose head completed while the parser was being fed: it starts only once the
        # parser has taken the whole of that data, so a message it refuses is never forwarded.
        self._feeding = False
        self._ready: Incoming | None = None
        # A request without keep-alive was read: what follows it is not read (llhttp refuses it).
        self._last_read = False

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else str(peer or "")
        # Per connection, not per request: whether the peer is a trusted proxy, and the address
        # a request from it has when it brings no X-Forwarded-For.
        self._adopt(self.lane.flow)
        lane = self.lane
        full = len(lane.connections) >= lane.limits.max_connections
        lane.connections.add(self)  # counted while it drains, so the sweep bounds its close too
        if full:
            self.idle_since = None
            self._write_refusal(503, TOO_MANY_CONNECTIONS)
            self.linger(REFUSED_LINGER)

    def _adopt(self, flow: RequestFlow) -> None:
        """Per connection, not per request: whether the peer is a trusted proxy, and the address a
        request from it has when it brings no X-Forwarded-For (again after a reload)."""
        self.flow = flow
        self.trusted_peer = flow.is_trusted_peer(self.peer)
        self.peer_address = flow.client_address(self.peer, _NO_HEADERS)

    def data_received(self, data: bytes) -> None:
        if self.raw:
            self._raw_data(data)
            return
        if self._last_read:
            return  # after a request that ends the connection nothing is read (its reply still goes out)
        heads_done = self._heads_done
        self._feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._feeding = False
            self.raw = True
            self._start_ready()
            tail = data[upgrade.args[0]:]
            if tail:
                self._raw_data(tail)
            return
        except httptools.HttpParserCallbackError:
            self._feeding = False
            self._ready = None  # refused before anything of it went on
            refusal = self._too_large
            if refusal is not None:
                self._refuse(refusal.status, refusal.reason)
            else:
                log.exception("request parsing failed")
                self._refuse(500, INTERNAL_ERROR)
            return
        except httptools.HttpParserError:
            self._feeding = False
            if self._last_read:
                self._start_ready()  # only the bytes behind a `Connection: close` request were refused
                return
            self._ready = None
            self._refuse(400, MALFORMED_REQUEST)
            return
        self._feeding = False
        if self._ready is not None:
            self._start_ready()
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
            incoming = self.incoming
            if self.raw or (incoming is not None and incoming.target is not None):
                return False  # an upgraded stream, or aiohttp reads a request that can never be completed: close
            # A head still incomplete never reached aiohttp: the request before it is answered, as
            # the fast path answers it.
            handler = bridge.handler
            handler.eof_received()
            if bridge.idle():
                return False  # nothing in progress: close now, as aiohttp's own transport would
            handler.close()  # answer what was read, then close (a half-closed client may still read)
            return True
        if self.exchange is not None and self.exchange.incoming is self.incoming:
            return False  # mid-body: the request can never be completed, so the client is gone
        return self.exchange is not None  # half-closed: the reply in progress is still sent

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
        if len(incoming.url) > self.lane.max_request_line:
            self._over_limit(414, URI_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        incoming = self.incoming
        assert incoming is not None
        lane = self.lane
        size = incoming.head_size = incoming.head_size + len(name) + len(value) + 4
        if (len(name) + len(value) > lane.max_header_size or size > lane.max_head_size
                or len(incoming.headers) >= lane.max_headers):
            self._over_limit(431, HEAD_TOO_LARGE)
        if incoming.method:
            return  # a chunked body's trailer field (the method is known once the head is): never a header
        lower = name.lower()
        incoming.headers.append((lower, name, value))
        index = incoming.index
        known = len(index)
        index.setdefault(lower, value)
        if len(index) == known and lower in SINGLE_HEADER_NAMES and incoming.refusal is None:
            incoming.refusal = self.lane.flow.repeated_header(lower.decode())

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
        if encoding is not None:
            # Every Transfer-Encoding field counts ("gzip" then "chunked" is chunked to llhttp).
            codings = [value.decode("latin-1") for lower, _, value in incoming.headers if lower == b"transfer-encoding"]
            try:
                self.lane.flow.check_transfer_encoding(codings)
            except Denied as denied:
                incoming.refusal = incoming.refusal or denied
            incoming.chunked = True
        length = index.get(b"content-length")
        incoming.length = int(length) if length is not None and not incoming.chunked else None
        max_body = self.lane.max_body_size
        if max_body and incoming.length is not None and incoming.length > max_body:
            self._over_limit(413, BODY_TOO_LARGE)
        if self.bridge is not None:
            self.bridge.send_head(incoming)
        elif self.exchange is None and self._ready is None and not self.queue:
            self._start(incoming)
        else:
            self.queue.append(incoming)  # pipelined: served when the ones before it are
            if len(self.queue) > 8:
                self.pause("pipeline")

    def on_body(self, body: bytes) -> None:
        incoming = self.incoming
        assert incoming is not None
        incoming.received += len(body)
        max_body = self.lane.max_body_size
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
        if not incoming.keep_alive and not incoming.upgrade:
            self._last_read = True
        if incoming.target is not None:
            incoming.target.request_done()
        self.incoming = None

    # -- serving ---------------------------------------------------------------------------------

    def _start_ready(self) -> None:
        incoming, self._ready = self._ready, None
        if incoming is not None:
            self._start(incoming)

    def _start(self, incoming: Incoming) -> None:
        if self._closing:
            return  # requests parsed after the reply that ends the connection are not served
        if self._feeding:
            self._ready = incoming  # the rest of the data may still make the parser refuse it
            return
        self.idle_since = None
        if incoming.refusal is not None:
            self._refuse_request(incoming, incoming.refusal)
            return
        index = incoming.index
        shared = self.lane.shared
        if shared.flow is not self.flow:  # reloaded since this connection's last request
            self._adopt(shared.flow)
        if incoming.url.startswith(shared.decision_path) and shared.flow.is_decision(incoming.url.decode("latin-1")):
            self._decide(incoming)
            return
        if (incoming.method not in self.lane.fast_methods or incoming.version != "1.1" or incoming.upgrade
                or not incoming.url.startswith(b"/") or any(name in index for name in SLOW_HEADERS)):
            try:
                self.lane.flow.check_request_line(incoming.method.decode("latin-1"),
                                                  incoming.url.decode("latin-1"), incoming.version)
            except Denied as denied:
                self._refuse_request(incoming, denied)
                return
            self.hand_over(incoming)
            return
        self.exchange = Exchange(self, self.lane.shared, incoming)
        self.exchange.start()

    def _decide(self, incoming: Incoming) -> None:
        """A proxy's check (decision.py): any method; aiohttp answers what the fast path does not."""
        if not decision.serves(incoming):
            self.hand_over(incoming)
            return
        self.exchange = Exchange(self, self.lane.shared, incoming, True)
        self.exchange.start()

    def hand_over(self, incoming: Incoming) -> None:
        """From this request on, aiohttp serves the connection."""
        self.lane.shared.handed_over += 1
        self.exchange = None
        self.bridge = Bridge(self, self.lane.shared.handler_factory)
        self.bridge.send_head(incoming)
        for queued in self.queue:
            self.bridge.send_head(queued)
        self.queue.clear()
        if self.raw_backlog:
            for data in self.raw_backlog:
                self.bridge.handler.data_received(data)
            self.raw_backlog.clear()
        self.resume("pipeline")

    def exchange_done(self, exchange: object, close: bool) -> None:
        current = self.exchange
        if current is None or current is not exchange:
            return
        self.exchange = None
        current.incoming.target = None  # break the cycle: reference counting frees both now
        self.resume("buffered")
        if close or self.lane.closing or self._closed or self._eof:
            if current.incoming.complete:
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

    def _refuse_request(self, incoming: Incoming, denied: Denied) -> None:
        """A request refused before any of it went on: answered, and the connection ends (what
        follows it on the stream cannot be trusted to be framed as it was meant)."""
        self.queue.clear()
        self._answer_refusal(incoming, denied.status, denied.reason, denied.headers)
        if incoming.complete:
            self.close()
        else:
            self.linger()

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
        self._write_refusal(status, reason)
        self.linger()

    def _write_refusal(self, status: int, reason: str) -> None:
        """A refusal of the byte stream itself, before any exchange, with what was parsed of the
        request (if anything)."""
        self._answer_refusal(self.incoming, status, reason, {})

    def _answer_refusal(self, incoming: Incoming | None, status: int, reason: str, extra: dict[str, str]) -> None:
        """A refusal the listener makes itself, as `Gateway.handle` makes the same ones: with a
        request id, counted and logged with its reason (`RequestFlow.finish`)."""
        started = time.perf_counter()
        flow = self.lane.flow
        trusted = self.trusted_peer
        name = self.lane.shared.request_id_header
        incoming_id = incoming.index.get(name) if incoming is not None and trusted else None
        request_id = flow.request_id(incoming_id.decode("latin-1") if incoming_id is not None else None, trusted)
        rid = request_id.encode("utf-8", "surrogateescape")
        reply = error_bytes(flow, status, reason, extra, rid, self.lane.shared.date(), close=True)
        self.write(reply)
        method = incoming.method.decode("latin-1") if incoming is not None else ""
        target = incoming.url.decode("utf-8", "replace") if incoming is not None else ""
        facts = flow.unchecked_facts(method, target, self._client_ip(incoming), time.time())
        app = incoming.index.get(b"x-flespi-app", b"").decode("utf-8", "replace") if incoming is not None else ""
        flow.finish(flow.fast, facts, None, None, app, status, started, len(reply) - reply.find(b"\r\n\r\n") - 4, 0,
                    request_id, reason)

    def _client_ip(self, incoming: Incoming | None) -> str:
        """The client's address as `Exchange` gives it: a trusted proxy's X-Forwarded-For counts."""
        if incoming is None or not self.trusted_peer or b"x-forwarded-for" not in incoming.index:
            return self.peer_address
        headers = CIMultiDict((name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
                              for _, name, value in incoming.headers)
        return self.lane.flow.client_address(self.peer, headers)

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


_NO_HEADERS: CIMultiDict[str] = CIMultiDict()
