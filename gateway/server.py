"""Running the gateway: one process, or `workers: N` processes sharing one port (SO_REUSEPORT)."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.app import GATEWAY, create_app
from gateway.config import Settings
from gateway.mqtt.listener import listen as listen_mqtt
from gateway.proxy.listener import FastLane

log = logging.getLogger("gateway.server")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional: plain asyncio works, only slower
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


GC_FREEZE_INTERVAL = 10.0
# Allocations between two young-generation collections (CPython's default is 700). A proxied
# request makes ~50 tracked objects and frees nearly all of them by reference counting, so a
# collection finds only the requests in flight; at 700 it ran every ~14 requests and cost ~6 %
# of the instructions of the request path (callgrind, bench harness).
GC_YOUNG_THRESHOLD = 20_000


# Every this many freezes, one full collection over everything: cycles among objects that were
# frozen while in use (an aiohttp connection's, say) are freed then, not never.
GC_FULL_EVERY = 30  # freezes: five minutes
# Allocations from this size on get their own mapping, given back to the system when freed.
# glibc raises this threshold by itself after such a free, up to 32 MB, after which a burst of
# large buffers (request heads, bodies) leaves its memory held by the allocator for good.
MMAP_THRESHOLD = 256 * 1024
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def fix_mmap_threshold() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its own allocator's policy stands
        pass


async def freeze_long_lived_objects(app: web.Application) -> AsyncIterator[None]:
    """Move what survived so far (mostly cached tokens) out of the cyclic collector's reach.

    With 100,000 cached tokens a full collection walked some 360,000 objects and paused the
    worker for about 200 ms every few seconds (bench/ANALYSIS.md); frozen objects are still freed
    by reference counting, only cycles among them would outlive their use, so the request path
    breaks its own cycles when a connection closes and a full collection runs every
    GC_FULL_EVERY freezes for the rest. Young collections are made rarer too (GC_YOUNG_THRESHOLD).
    """
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    fix_mmap_threshold()

    async def loop() -> None:
        rounds = 0
        while True:
            rounds += 1
            if rounds % GC_FULL_EVERY == 0:
                gc.unfreeze()
                gc.collect()
            gc.freeze()  # at once too: modules and startup objects are most of the heap
            await asyncio.sleep(GC_FREEZE_INTERVAL)

    task = asyncio.ensure_future(loop())
    yield
    task.cancel()


class GatewaySite(web.BaseSite):
    """The listening socket: connections start on the fast path (`proxy.listener.FastLane`)."""

    __slots__ = ("_host", "_port", "_reuse_port", "lane")

    def __init__(self, runner: web.AppRunner, host: str, port: int, reuse_port: bool) -> None:
        super().__init__(runner, backlog=1024)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self.lane: FastLane | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return port

    async def start(self) -> None:
        await super().start()
        runner = self._runner
        assert isinstance(runner, web.AppRunner) and runner.server is not None
        gateway = runner.app[GATEWAY]
        self.lane = lane = FastLane(gateway.flow, runner.server, gateway.services.upstream_tls)
        gateway.open_connections = lambda: len(lane.connections)
        lane.start()
        self._server = await asyncio.get_running_loop().create_server(
            self.lane, self._host, self._port, backlog=self._backlog, reuse_address=True,
            reuse_port=self._reuse_port or None)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections; those open finish their request
        if self.lane is not None:
            await self.lane.shutdown(SHUTDOWN_TIMEOUT)
        await super().stop()


SHUTDOWN_TIMEOUT = 30.0


class GatewayServer:
    """One running gateway in this process: the app, its services and the listening site."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.app.cleanup_ctx.append(freeze_long_lived_objects)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                    shutdown_timeout=SHUTDOWN_TIMEOUT)
        self.site: GatewaySite | None = None
        self.mqtt: asyncio.Server | None = None  # the MQTT listener, when configured
        self._closed = False

    @property
    def port(self) -> int:
        assert self.site is not None
        return self.site.port

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        await self.runner.setup()  # services first: the port opens once the gateway can answer
        self.site = GatewaySite(self.runner, host, port, reuse_port)
        await self.site.start()
        front, mqtt = self.app[GATEWAY].mqtt, self.settings.mqtt
        if front is not None and mqtt is not None:
            self.mqtt = await listen_mqtt(front, mqtt.listen.host, mqtt.listen.port, reuse_port)

    @property
    def mqtt_port(self) -> int:
        assert self.mqtt is not None
        port: int = self.mqtt.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stop serving; a second call (e.g. a test that closed it, then its fixture) does nothing."""
        if self._closed:
            return
        self._closed = True
        if self.mqtt is not None:
            self.mqtt.close()  # no new MQTT clients; the sessions end with the app's services
        await self.runner.cleanup()


def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, finish requests and drain the writers."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    async def main() -> None:
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        server = GatewayServer(settings)
        await server.start(settings.listen.host, settings.listen.port, reuse_port)
        log.info("listening on http://%s:%d (pid %d)", settings.listen.host, server.port, os.getpid())
        try:
            await stop.wait()
        finally:
            await server.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def run(settings: Settings) -> int:
    if settings.workers == 1:
        serve(settings)
        return 0
    return supervise(settings)


def supervise(settings: Settings) -> int:
    """Like nginx's master: start the workers, restart one that dies, pass on stop signals."""
    children: dict[int, int] = {}
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                serve(settings, reuse_port=True)
            finally:
                os._exit(0)
        children[pid] = slot

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(settings.workers):
        spawn(slot)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid in children and not stopping:
            slot = children.pop(pid)
            log.error("worker %d exited with status %d; restarting it", pid, status)
            time.sleep(0.5)
            spawn(slot)
        else:
            children.pop(pid, 0)
    sys.stdout.flush()
    return 0
