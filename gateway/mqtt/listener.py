"""MQTT over TCP: one `ClientProtocol` per connection, feeding its `Session`."""
from __future__ import annotations

import asyncio
from typing import cast

from gateway.mqtt.front import MqttFront
from gateway.mqtt.session import Session

# How long a connection the gateway ended is still read (and what comes dropped) after its FIN.
LINGER = 2.0


class ClientProtocol(asyncio.Protocol):
    __slots__ = ("front", "transport", "session", "lingering")

    def __init__(self, front: MqttFront) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.lingering: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if self.front.closing:
            transport.close()
            return
        self.session = Session(self.front, self, peer[0] if isinstance(peer, tuple) else "")

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.lingering is not None:
            self.lingering.cancel()
            self.lingering = None
        if self.session is not None:
            self.session.client_lost()
            self.session = None  # no cycle left behind

    def pause_writing(self) -> None:  # the client reads slower than the broker sends
        if self.session is not None and self.session.broker is not None and self.session.broker.transport:
            self.session.broker.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.session is not None and self.session.broker is not None and self.session.broker.transport:
            self.session.broker.transport.resume_reading()

    # -- ClientSide ----------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and self.lingering is None and data:
            self.transport.write(data)

    def close(self) -> None:
        """A lingering close, as nginx's: the FIN after what was written (a 5.0 DISCONNECT and its
        reason), then reading on for up to LINGER. A socket closed with the client's packets still
        arriving answers them with a reset, and a client busy publishing may meet that before it
        reads the DISCONNECT (paho then reports 0x80, "connection lost", not the reason)."""
        transport = self.transport
        if transport is None or self.lingering is not None:
            return
        if not transport.can_write_eof():  # a transport with no half-close (TLS)
            transport.close()
            return
        transport.write_eof()
        if not transport.is_reading():
            transport.resume_reading()  # paused for the broker: what comes now is only dropped
        self.lingering = asyncio.get_running_loop().call_later(LINGER, transport.close)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


async def listen(front: MqttFront, host: str, port: int, reuse_port: bool = False) -> asyncio.Server:
    return await asyncio.get_running_loop().create_server(
        lambda: ClientProtocol(front), host, port, backlog=1024, reuse_address=True, reuse_port=reuse_port or None)
