"""Handing a connection to aiohttp: `Bridge` is the transport an aiohttp `RequestHandler` writes to.

A request the fast path does not serve (the API, pages' requests, WebSockets, HEAD, HTTP/1.0,
`Expect`) is written, as parsed, into an aiohttp `RequestHandler` whose transport is a `Bridge`:
its writes go to the client's socket, its flow control to the connection's. The connection stays
with aiohttp from then on.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from gateway.proxy.front import Front, Incoming


class Bridge(asyncio.Transport):
    """What an aiohttp `RequestHandler` sees as its transport: writes go to the client socket."""

    def __init__(self, front: Front, handler_factory: Callable[[], asyncio.Protocol]) -> None:
        super().__init__()
        self.front = front
        self.handler: Any = handler_factory()
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
        between requests (tests/proxy/test_connections.py fails if that ever changes)."""
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
        return not self.front.is_paused("aiohttp")

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
