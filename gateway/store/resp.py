"""A lean pipelined RESP2 client for the gateway's own batched Redis traffic.

Cache-miss loads (MGET + HMGET + ZMSCORE), `accessed` writes and the log and usage scripts are a
handful of commands each, sent in batches. Through redis-py's pipeline a batch cost ~300 µs of
CPU (each command packed argument by argument, each reply read under its own timeout, a
connection taken from and given back to the pool); this client packs a batch with a few `bytes`
formats, writes it on one shared connection, and hands the replies, parsed by hiredis, back in
order: ~60 µs. Every other Redis use (the tokens API, pub/sub, accounts, housekeeping) stays on
redis-py.

One connection, opened on first use and again after any failure; requests are pipelined on it and
answered in order. A request not answered within `timeout` fails, and so does the connection
(its later replies could no longer be matched), as redis-py does. Failures are raised as redis-py
exceptions (`ConnectionError`, `TimeoutError`, `ResponseError` for an error reply, `NoScriptError`
for NOSCRIPT), so callers map them as they map redis-py's. `redis://` (with user, password and
database) and `unix://` URLs; `rediss://` stays on redis-py (`lean_client` returns None).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote

import hiredis
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("gateway.store.resp")
Arg = bytes | str | int | float
Command = Sequence[Arg]


def _arg(value: Arg) -> bytes:
    kind = type(value)
    if kind is bytes:
        return value  # type: ignore[return-value]
    if kind is str:
        return value.encode()  # type: ignore[union-attr]
    if kind is int:
        return str(value).encode()
    if kind is float:
        return repr(value).encode()
    raise TypeError(f"a Redis argument must be bytes, str, int or float, not {kind.__name__}")


def pack(commands: Sequence[Command]) -> bytes:
    """Commands in the Redis protocol, as one buffer."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for value in command:
            data = _arg(value)
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


Answer = Callable[[list[Any] | BaseException], None]
Locate = Callable[[], Awaitable[tuple[str, int]]]
# Error replies that say this server can no longer take the traffic (a demoted master, a replica
# that lost its master, one still loading): the connection is dropped, so that the next command
# goes wherever the master is now.
WRONG_SERVER = ("READONLY", "MASTERDOWN", "LOADING")


class _Request:
    """Commands sent together; their replies go to a future (`execute`) or a callback (`execute_then`)."""

    __slots__ = ("future", "callback", "expected", "replies", "timer")

    def __init__(self, future: asyncio.Future[list[Any]] | None, callback: Answer | None, expected: int) -> None:
        self.future = future
        self.callback = callback
        self.expected = expected
        self.replies: list[Any] = []
        self.timer: asyncio.TimerHandle | None = None

    def settle(self, error: BaseException | None = None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        callback = self.callback
        if callback is not None:
            self.callback = None
            try:
                callback(error if error is not None else self.replies)
            except Exception:
                log.exception("a Redis reply callback failed")
            return
        future = self.future
        if future is None or future.done():  # its caller was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(self.replies)


class _Connection(asyncio.Protocol):
    def __init__(self, timeout: float, where: str) -> None:
        self.timeout = timeout
        self.where = where
        self.reader = hiredis.Reader()
        self.pending: deque[_Request] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, expected: int) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._send(_Request(future, None, expected), data, loop)
        return future

    def send_then(self, data: bytes, expected: int, callback: Answer) -> None:
        self._send(_Request(None, callback, expected), data, asyncio.get_running_loop())

    def _send(self, request: _Request, data: bytes, loop: asyncio.AbstractEventLoop) -> None:
        request.timer = loop.call_later(self.timeout, self._timed_out)
        self.pending.append(request)
        self.transport.write(data)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"protocol error from {self.where}: {exc}"))
                return
            if reply is False:
                return
            if not pending:
                self.fail(RedisConnectionError(f"unexpected reply from {self.where}"))
                return
            request = pending[0]
            request.replies.append(reply)
            wrong = isinstance(reply, hiredis.ReplyError) and str(reply).startswith(WRONG_SERVER)
            if len(request.replies) == request.expected:
                pending.popleft()
                request.settle()
            if wrong:
                self.fail(RedisConnectionError(f"{self.where} no longer takes writes: {reply}"))
                return

    def _timed_out(self) -> None:
        self.fail(RedisTimeoutError(f"Timeout reading from {self.where}"))

    def fail(self, error: BaseException) -> None:
        """The connection is done for: every request on it fails."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        while self.pending:
            self.pending.popleft().settle(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to {self.where} lost" + (f": {exc}" if exc else "")))


class RespClient:
    """`locate` (Sentinel): where the master is, asked again for every connection, which is
    opened only once the server says it is a master (ROLE)."""

    def __init__(self, url: str, timeout: float, connect_timeout: float, locate: Locate | None = None,
                 preload: Sequence[str] = ()) -> None:
        options = parse_url(url)
        self._locate = locate
        self._path: str | None = options.get("path") if options.get("connection_class") is \
            UnixDomainSocketConnection else None
        self._host = options.get("host", "localhost")
        self._port = int(options.get("port", 6379))
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._handshake: list[Command] = []
        password, username = options.get("password"), options.get("username")
        if password is not None:
            self._handshake.append(("AUTH", username, password) if username else ("AUTH", password))
        if int(options.get("db") or 0):
            self._handshake.append(("SELECT", int(options["db"])))
        # Scripts loaded on every new connection (a cluster master, found anew after a failover,
        # has none): EVALSHA then finds them, instead of a first batch refused NOSCRIPT.
        self._handshake += [("SCRIPT", "LOAD", source) for source in preload]
        if locate is not None:
            self._handshake.append(("ROLE",))  # last: its reply is read as the last
        self._where = self._path or f"{self._host}:{self._port}"
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """The commands' replies, in order; the first error reply is raised as `ResponseError`."""
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        replies = await connection.send(pack(commands), len(commands))
        error = reply_error(replies)
        if error is not None:
            raise error
        return replies

    def execute_then(self, commands: Sequence[Command], callback: Answer) -> bool:
        """`execute` without a task: `callback` gets the replies (error replies among them, as
        `hiredis.ReplyError`) or the exception, from the connection's own callback. False, and
        nothing sent, when the connection is not open: use `execute`, which opens it."""
        connection = self._connection
        if connection is None or connection.closed:
            return False
        connection.send_then(pack(commands), len(commands), callback)
        return True

    async def _connect(self) -> _Connection:
        """Callers arriving while the connection is being made wait for the same attempt."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._opened)
        return await asyncio.shield(self._connecting)

    def _opened(self, attempt: asyncio.Future[_Connection]) -> None:
        self._connecting = None
        if attempt.cancelled():
            return
        if attempt.exception() is None:
            self._connection = attempt.result()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self._locate is not None:
            self._host, self._port = await self._locate()
            self._where = f"{self._host}:{self._port}"

        def factory() -> _Connection:
            return _Connection(self._timeout, self._where)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._path is not None:
                    _, connection = await loop.create_unix_connection(factory, self._path)
                else:
                    _, connection = await loop.create_connection(factory, self._host, self._port)
        except TimeoutError:
            raise RedisTimeoutError(f"Timeout connecting to {self._where}") from None
        except OSError as exc:
            raise RedisConnectionError(f"Error connecting to {self._where}: {exc}") from None
        if self._handshake:
            replies = await connection.send(pack(self._handshake), len(self._handshake))
            for reply in replies:
                if isinstance(reply, hiredis.ReplyError):
                    connection.fail(RedisConnectionError("handshake refused"))
                    raise RedisConnectionError(f"{self._where} refused the handshake: {reply}")
            if self._locate is not None and not (isinstance(replies[-1], list) and replies[-1][:1] == [b"master"]):
                connection.fail(RedisConnectionError("not the master"))
                raise RedisConnectionError(f"{self._where} is not a master (any more)")
        return connection

    @property
    def is_open(self) -> bool:
        return self._connection is not None and not self._connection.closed

    def open_soon(self) -> None:
        """Start opening the connection (if it is not open or being opened), in the background."""
        if self.is_open or self._connecting is not None:
            return
        self._connecting = asyncio.ensure_future(self._open())
        self._connecting.add_done_callback(self._opened)

    def reset(self) -> None:
        """Drop the connection (the master moved): what is in flight fails, the next call reconnects."""
        if self._connection is not None:
            self._connection.fail(RedisConnectionError(f"{self._where} is no longer the master"))
            self._connection = None

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.fail(RedisConnectionError("client closed"))
            self._connection = None


class LeanNodes:
    """A lean client per node address (a Redis Cluster's masters), made on first use, for the
    cache-miss loads (`ShardedTokenStore.load_many_then`)."""

    def __init__(self, username: str, password: str, timeout: float, connect_timeout: float,
                 preload: Sequence[str] = ()) -> None:
        self._auth = f"{quote(username, safe='')}:{quote(password, safe='')}@" if password else ""
        self._preload = tuple(preload)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._clients: dict[str, RespClient] = {}

    def client(self, address: str) -> RespClient:
        """`address`: host:port, as redis-py names a cluster node."""
        lean = self._clients.get(address)
        if lean is None:
            lean = self._clients[address] = RespClient(f"redis://{self._auth}{address}/0", self._timeout,
                                                       self._connect_timeout, preload=self._preload)
        return lean

    async def close(self) -> None:
        for lean in self._clients.values():
            await lean.close()


def reply_error(replies: list[Any]) -> ResponseError | None:
    """The first error reply among `replies`, as redis-py raises it (`NoScriptError` for NOSCRIPT)."""
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            return (NoScriptError if message.startswith("NOSCRIPT") else ResponseError)(message)
    return None


def lean_client(url: str, timeout: float, connect_timeout: float) -> RespClient | None:
    """The lean client for a plain or Unix-socket Redis URL; None for the others (TLS)."""
    if not url.startswith(("redis://", "unix://")):
        return None
    return RespClient(url, timeout, connect_timeout)


def script_sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()
