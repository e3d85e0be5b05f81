"""MQTT over WebSocket (subprotocol `mqtt`, binary frames) on a path of the HTTP listener, through
aiohttp's WebSocket support: the same `Session` as TCP, fed from the frames."""
from __future__ import annotations

import asyncio
import contextlib

from aiohttp import WSMsgType, web

from gateway.mqtt.front import MqttFront
from gateway.mqtt.session import CLOSED, Session

WRITES_HELD = 256  # chunks waiting for the socket before the broker's connection stops being read


class WebSocketSide:
    """`ClientSide` over an aiohttp WebSocket: writes are queued, in order, to one writer task."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.session: Session | None = None
        self.writer = asyncio.ensure_future(self._write_all())
        self.paused = False

    def write(self, data: bytes) -> None:
        if data:
            self.queue.put_nowait(data)
            if self.queue.qsize() > WRITES_HELD and not self.paused:
                self._broker_reading(False)

    def close(self) -> None:
        self.queue.put_nowait(None)

    def pause_reading(self) -> None:  # frames are read by `serve`'s loop, one at a time
        return None

    def resume_reading(self) -> None:
        return None

    def _broker_reading(self, on: bool) -> None:
        self.paused = not on
        broker = self.session.broker if self.session is not None else None
        if broker is not None and broker.transport is not None:
            (broker.transport.resume_reading if on else broker.transport.pause_reading)()

    async def _write_all(self) -> None:
        while True:
            data = await self.queue.get()
            if data is None:
                await self.ws.close()
                return
            try:
                await self.ws.send_bytes(data)
            except (ConnectionError, RuntimeError):
                return
            if self.paused and self.queue.qsize() < WRITES_HELD // 2:
                self._broker_reading(True)


async def serve(front: MqttFront, request: web.Request, client_ip: str) -> web.StreamResponse:
    ws = web.WebSocketResponse(protocols=("mqtt",), max_msg_size=front.settings.max_packet_size)
    if not ws.can_prepare(request).ok:
        raise web.HTTPBadRequest(text='{"errors":[{"code":400,"reason":"MQTT over WebSocket needs a WebSocket '
                                      'upgrade"}]}', content_type="application/json")
    await ws.prepare(request)
    side = WebSocketSide(ws)
    session = side.session = Session(front, side, client_ip)
    try:
        async for message in ws:
            if message.type is not WSMsgType.BINARY:
                break  # MQTT travels in binary frames only
            session.feed(message.data)
            if session.state == CLOSED:
                break
    finally:
        session.client_lost()
        side.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(side.writer), 5)
    return ws
