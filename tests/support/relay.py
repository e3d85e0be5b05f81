"""A TCP relay on loopback that can hold one connection's bytes: a link that goes silent without a
reset, as a lost route or a stalled peer looks, for a real server behind it."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class Link:
    """One relayed connection; `held` bytes wait (both ways) while it is frozen."""

    upstream_port: int  # the relay's own port towards the server: what the server sees as the client
    frozen: bool = False
    held: list[tuple[asyncio.StreamWriter, bytes]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def thaw(self) -> None:
        self.frozen = False
        for writer, data in self.held:
            if not writer.is_closing():
                writer.write(data)
        self.held.clear()


class Relay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.links: dict[int, Link] = {}
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def link(self, upstream_port: int) -> Link:
        return self.links[upstream_port]

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.target)
        link = Link(server_writer.get_extra_info("sockname")[1], writers=[client_writer, server_writer])
        self.links[link.upstream_port] = link
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.ensure_future(self._pump(link, reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if link.frozen:
                    link.held.append((writer, data))
                else:
                    writer.write(data)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for each in link.writers:
                each.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self.links.values():
            for writer in link.writers:
                writer.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def running_relay(target_host: str, target_port: int) -> AsyncIterator[Relay]:
    relay = Relay(target_host, target_port)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()
