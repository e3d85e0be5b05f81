"""A lean keep-alive HTTP/1.1 client for proxied requests: an asyncio Protocol per connection.

aiohttp's `ClientSession` costs about 120 µs of CPU per request (bench/ANALYSIS.md), more than
the rest of the gateway together. Here a request is bytes written to a pooled connection and the
reply is parsed by llhttp (through `httptools`, the parser uvicorn uses) straight into callbacks
on the exchange that sent it, with no task, future or stream object per request on the way back.

Callbacks go to an `UpstreamSink` (the exchange in `proxy/listener.py`):
`on_head` once (1xx replies are skipped), `on_body` per piece, then `on_done`, or `on_fail` once
if the reply cannot be completed. A connection goes back to the pool only when its reply was read
to the end, the request was sent in full and both sides kept it alive; any other connection is
closed, so a half-read reply can never be mistaken for the next one.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import Protocol

import httptools

from gateway.config import ProxySettings

log = logging.getLogger("gateway.proxy.upstream")
# Idle connections kept per upstream when `pool_size` is 0 (no limit on open connections).
DEFAULT_IDLE = 256
NO_BODY_STATUSES = frozenset({204, 304})


class UpstreamSink(Protocol):
    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes, bytes]], length: int | None,
                chunked: bool) -> None:
        """`headers`: (lowercased name, name, value) for each header, in order."""

    def on_body(self, data: bytes) -> None: ...

    def on_done(self) -> None: ...

    def on_fail(self, timeout: bool) -> None: ...

    def flush(self) -> None: ...

    def pause_upload(self) -> None: ...

    def resume_upload(self) -> None: ...


class UpstreamFailed(Exception):
    """No connection could be made (refused, unreachable, or the connect timeout passed)."""

    def __init__(self, timeout: bool) -> None:
        super().__init__("upstream connect timeout" if timeout else "upstream unreachable")
        self.timeout = timeout


class _Spent:
    """What the parser of a closed connection is bound to (it is never fed)."""


SPENT_RESPONSE_PARSER = httptools.HttpResponseParser(_Spent())


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_closed",
        "_head_done",
        "_headers",
        "_informational",
        "_last_active",
        "_loop",
        "_paused",
        "_read_timeout",
        "_reason",
        "_request_sent",
        "_reusable",
        "_status",
        "_timer",
        "_until_close",
        "parser",
        "pool",
        "reused",
        "sink",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self._loop = pool.loop
        self._read_timeout = pool.read_timeout
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: UpstreamSink | None = None
        self.reused = False
        self._closed = False
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes, bytes]] = []  # (lowercased name, name, value)
        self._informational = False
        self._head_done = False
        self._until_close = False
        self._reusable = True
        self._request_sent = False
        self._last_active = 0.0

    # -- sending ---------------------------------------------------------------------------------

    def send(self, sink: UpstreamSink, head: bytes) -> None:
        """Start one exchange: the request head (and maybe its whole body) is written at once."""
        self.sink = sink
        self._last_active = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._last_active + self._read_timeout, self._check_timeout)
        assert self.transport is not None
        self.transport.write(head)

    def send_body(self, data: bytes) -> None:
        self._last_active = self._loop.time()
        if self.transport is not None:
            self.transport.write(data)

    def request_complete(self) -> None:
        self._request_sent = True

    def pause_reply(self) -> None:
        """Stop reading the reply while the client is not reading it; the read timeout waits too
        (as aiohttp's does): the upstream is not late, the client is slow."""
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reply(self) -> None:
        self._paused = False
        self._last_active = self._loop.time()
        if self.transport is not None:
            self.transport.resume_reading()

    def abandon(self) -> None:
        """The exchange gives up (its client left, or it failed): never reuse this connection."""
        self.sink = None
        self._close()

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._last_active = self._loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            log.warning("upstream sent an invalid HTTP reply; connection closed")
            self._fail(False)
            return
        sink = self.sink
        if sink is not None:
            sink.flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timer()
        self.pool.forget(self)
        self.parser = SPENT_RESPONSE_PARSER  # no parser <-> connection cycle left for the collector
        sink = self.sink
        if sink is None:
            return
        if self._head_done and self._until_close:
            self._complete()  # a reply without a length ends when the connection does
        else:
            self._fail(False)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.pause_upload()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.resume_upload()

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            self._informational = True  # 100 Continue, 103 Early Hints: the real reply follows
            return
        self._status = status
        length: int | None = None
        chunked = False
        for lower, _, value in self._headers:
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = chunked or b"chunked" in value.lower()
        if not parser.should_keep_alive():
            self._reusable = False
        self._until_close = length is None and not chunked and status not in NO_BODY_STATUSES
        if self._until_close:
            self._reusable = False
        self._head_done = True
        sink = self.sink
        if sink is None:
            self._reusable = False
            return
        sink.on_head(status, self._reason, self._headers, length, chunked)

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.on_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            self._reason = b""
            self._headers = []
            return
        if self.sink is None:
            self._reusable = False  # an unrequested reply: the stream is out of step
            return
        self._complete()

    # -- outcomes --------------------------------------------------------------------------------

    def _complete(self) -> None:
        sink, self.sink = self.sink, None
        reusable = self._reusable and self._request_sent and not self._closed
        # The read timer stays armed: under load the next request reuses it instead of making a
        # new one; with no exchange when it fires, it simply lapses.
        self._reset()
        self.reused = True
        if reusable:
            self.pool.release(self)
        else:
            self._close()
        if sink is not None:
            sink.on_done()

    def _fail(self, timeout: bool) -> None:
        sink, self.sink = self.sink, None
        self._close()
        if sink is not None:
            sink.on_fail(timeout)

    def _check_timeout(self) -> None:
        self._timer = None
        if self.sink is None:
            return
        if self._paused:
            self._timer = self._loop.call_later(self._read_timeout, self._check_timeout)
            return
        idle = self._loop.time() - self._last_active
        if idle >= self._read_timeout:
            self._fail(True)
        else:
            self._timer = self._loop.call_at(self._last_active + self._read_timeout, self._check_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self) -> None:
        self._cancel_timer()
        self.pool.forget(self)
        if self.transport is not None and not self._closed:
            self._closed = True
            self.transport.close()


class UpstreamPool:
    """Open connections to one upstream origin: idle ones are reused last-in first-out."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, settings: ProxySettings,
                 loop: asyncio.AbstractEventLoop) -> None:
        """`tls`: the context of an https upstream (certificate and host name checked against `host`), else None."""
        self.host = host
        self.port = port
        self.loop = loop
        self.read_timeout = settings.read_timeout
        self._connect_timeout = settings.connect_timeout
        self._pool_timeout = settings.pool_timeout
        self.tls = tls
        # As aiohttp does: a certificate names a host without the root's trailing dot.
        self._server_hostname = host.rstrip(".") if tls is not None else None
        self._limit = settings.pool_size
        self._max_idle = settings.pool_size or DEFAULT_IDLE
        self._idle: list[UpstreamConnection] = []
        self._open: set[UpstreamConnection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn._closed:
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection, waiting for a free slot first when `pool_size` limits them."""
        deadline = self.loop.time() + self._pool_timeout
        while self._limit and len(self._open) >= self._limit:
            conn = self.take_idle()
            if conn is not None:
                return conn
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                # A bounded wait: with every connection held (by clients that stopped reading,
                # say), a request is refused after `pool_timeout` instead of waiting forever.
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise UpstreamFailed(True) from None
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled before it could run: the turn goes to the next
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        conn = UpstreamConnection(self)
        self._open.add(conn)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.loop.create_connection(lambda: conn, self.host, self.port, ssl=self.tls,
                                              server_hostname=self._server_hostname)
        except TimeoutError:
            self.forget(conn)
            raise UpstreamFailed(True) from None
        except OSError:
            self.forget(conn)
            raise UpstreamFailed(False) from None
        except BaseException:
            self.forget(conn)
            if conn.transport is not None:
                conn.transport.close()
            raise
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            conn._close()
            return
        self._idle.append(conn)
        self._wake()

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def retire(self) -> None:
        """No longer used for new requests (a reload): idle connections close now, the others
        when their request is done (`release`)."""
        self._closed = True
        for conn in self._idle:
            conn._close()
        self._idle.clear()

    def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn._close()
        self._idle.clear()
