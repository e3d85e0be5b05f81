"""One request served on the fast path, in callbacks, from its head to the last byte of its reply.

The rules are the flow's (`RequestFlow`: request id, facts, own paths, route, upstream headers,
what is dropped, the error reply, the log record and usage); what is here is the fast path's
own way of applying them: bytes in, bytes out, no task unless Redis must be asked or a new
upstream connection opened.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

# Bound names: compiled, each use of a module attribute (`time.time`) is a lookup on the module.
from time import perf_counter
from time import time as wall_clock

from multidict import CIMultiDict

from gateway.auth.authenticator import extract_key
from gateway.auth.checks import RequestFacts
from gateway.errors import (
    INTERNAL_ERROR,
    STORAGE_UNAVAILABLE,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    Denied,
    StoreUnavailable,
)
from gateway.proxy.decision import allowed_bytes, original_facts
from gateway.proxy.flow import CORS_PREFIX, IDEMPOTENT
from gateway.proxy.front import Front, Incoming, Lane
from gateway.proxy.replies import error_bytes
from gateway.proxy.routing import upstream_target
from gateway.proxy.upstream import NO_BODY_STATUSES, UpstreamConnection, UpstreamFailed, UpstreamPool
from gateway.store.cache import Outcome
from gateway.tokens import Token, key_digest

log = logging.getLogger("gateway.proxy.exchange")
MAX_BUFFERED = 1024 * 1024  # request body held while the token or a connection is awaited
CLIENT_CLOSED = 499  # nginx's status for a request whose client left before the reply
CORS_PREFIX_BYTES = CORS_PREFIX.encode()
IDEMPOTENT_METHODS = frozenset(method.encode() for method in IDEMPOTENT)
SCHEME = "http"  # the listener serves plain HTTP (TLS, when there is any, ends in front of it)
_NO_HEADERS: CIMultiDict[str] = CIMultiDict()


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", "surrogateescape") if value is not None else None


class Exchange:
    """One request served on the fast path, from its head to the last byte of the reply."""

    __slots__ = (
        "chunked_reply",
        "close_after",
        "conn",
        "decision",
        "digest",
        "done",
        "facts",
        "flow",
        "front",
        "head",
        "incoming",
        "lane",
        "out",
        "reason",
        "received_bytes",
        "replied",
        "request_id",
        "retried",
        "sent_at",
        "sent_bytes",
        "served",
        "started",
        "status",
        "task",
        "token",
    )

    def __init__(self, front: Front, lane: Lane, incoming: Incoming, decision: bool = False) -> None:
        self.front = front
        self.decision = decision  # a proxy's check (decision.py): answered here, never forwarded
        self.lane = lane
        self.flow = lane.flow
        self.incoming = incoming
        self.started = perf_counter()
        self.facts: RequestFacts | None = None
        self.token: Token | None = None  # the token found (it may still have been refused)
        self.served: Token | None = None  # the token that passed every check
        self.request_id = b""
        self.conn: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.status = 0
        self.reason: str | None = None  # a refusal's, for the log record and the metrics
        self.sent_at = 0.0  # when the request went upstream (the upstream latency's start)
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
        incoming, lane, front, flow = self.incoming, self.lane, self.front, self.flow
        index = incoming.index
        now = wall_clock()
        trusted = front.trusted_peer
        incoming_id = index.get(lane.request_id_header) if trusted else None
        self.request_id = flow.request_id(incoming_id.decode("latin-1") if incoming_id is not None else None,
                                          trusted).encode()
        try:
            if self.decision:
                self.facts = facts = original_facts(flow, incoming, self._client_ip(), now)
            else:
                method, target = incoming.method.decode(), incoming.url.decode("utf-8", "surrogateescape")
                self.facts = facts = flow.facts(method, target, _text(index.get(b"x-flespi-cid")), None,
                                                self._client_ip(), now)
            if not self.decision and flow.is_own(facts.path):
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
            token = flow.auth.authenticate_cached(digest, facts)
        except Exception as error:
            incoming.target = self
            if self.facts is None:  # refused before its facts were made: logged with the path as it came
                self.facts = flow.unchecked_facts(incoming.method.decode(), incoming.url.decode("utf-8", "replace"),
                                                  self._client_ip(), now)
            self._refuse(error)
            return
        if token is not None:
            self.token = self.served = token
            self._forward()
        elif digest is not None and flow.auth.when_loaded(digest, self._loaded):
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
            token = self.flow.auth.authenticate_cached(digest, facts, True)
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
        return self.flow.client_address(front.peer, self._multidict())

    def _multidict(self) -> CIMultiDict[str]:
        return CIMultiDict((name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
                           for _, name, value in self.incoming.headers)

    async def _authenticate(self) -> None:
        try:
            facts = self.facts
            assert facts is not None  # set by `start` before it made this task
            token = await self.flow.auth.authenticate(
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
        """Answer a request its checks refused (`Denied`) or could not decide (`RequestFlow.refusal`)."""
        if isinstance(error, Denied):
            facts = self.facts
            self.token = facts.token if facts is not None else None
        denied = self.flow.refusal(error)
        self.fail(denied.status, denied.reason, denied.headers)

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
        if self.decision:
            self._allow(facts)
            return
        try:
            route = self.flow.route(facts.path)
        except Denied as denied:
            self.fail(denied.status, denied.reason, denied.headers)
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
        self.sent_at = perf_counter()
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
        lane, incoming = self.lane, self.incoming
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
            # `_` too: a WSGI/CGI upstream files X_Token_Id under the same name as X-Token-Id.
            if lower not in drop and not (b"_" in lower and lower.replace(b"_", b"-") in drop):
                parts += (name, b": ", value, b"\r\n")
        served, facts, front = self.served, self.facts, self.front
        assert served is not None and facts is not None
        trusted = front.trusted_peer
        # Header values went through the parser as bytes: surrogateescape gives back the same bytes.
        parts.append(self.flow.upstream_header_lines(
            served, facts, self.request_id.decode(), front.peer, trusted,
            self._multidict() if trusted else _NO_HEADERS, SCHEME, client_host.decode("utf-8", "surrogateescape")))
        if incoming.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif incoming.length is not None:
            parts.append(b"Content-Length: %d\r\n" % incoming.length)
        elif incoming.method != b"GET":
            # A method with meaning for a body says it has none (RFC 9110 8.6), as aiohttp's relay does.
            parts.append(b"Content-Length: 0\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    @staticmethod
    def _framed(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    def _allow(self, facts: RequestFacts) -> None:
        """A decision's answer when its checks passed: the proxy forwards the request itself."""
        served = self.served
        assert served is not None
        self.status = 200
        lane = self.lane
        if not self.incoming.complete and (self.incoming.chunked or self.incoming.length):
            self.close_after = True  # as `fail`: a check's body is never read
        self.front.write(allowed_bytes(self.flow, served, facts, self.request_id, lane.date(),
                                       self.close_after or lane.closing))
        self.replied = True
        self._finish()

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
        self.flow.upstream_latency.observe(perf_counter() - self.sent_at)
        self.status = status
        drop = lane.reply_drop
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
            incoming = self.incoming
            if (conn is not None and conn.reused and not self.retried and not timeout and incoming.length is None
                    and not incoming.chunked and incoming.method in IDEMPOTENT_METHODS):
                # A kept-alive connection the upstream had just closed: an idempotent request
                # without a body (RFC 9110 9.2.2, as nginx) is tried once more on a fresh one.
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
        self.reason = reason
        incoming = self.incoming
        if not incoming.complete and (incoming.chunked or incoming.length):
            self.close_after = True  # the rest of the body would have to be read and thrown away
        lane = self.lane
        reply = error_bytes(self.flow, status, reason, extra, self.request_id, lane.date(),
                            self.close_after or lane.closing)
        self.front.write(reply)
        self.received_bytes = len(reply) - reply.find(b"\r\n\r\n") - 4  # the body: the size logged
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
        flow = self.flow
        app = _text(self.incoming.index.get(b"x-flespi-app")) or ""
        counts = flow.decision if self.decision else flow.fast
        flow.finish(counts, self.facts, self.token, self.served, app, self.status, self.started, self.received_bytes,
                    self.sent_bytes + self.received_bytes, self.request_id.decode(), self.reason)
        if self.incoming.complete or self.close_after:
            self.front.exchange_done(self, self.close_after)
        # else: FrontProtocol reads the rest of the body (request_body ignores it) and then calls
        # request_done, which ends the exchange; the connection stays usable.
