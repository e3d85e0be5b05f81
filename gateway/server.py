"""Running the gateway: one process, or `workers: N` processes sharing one port (SO_REUSEPORT)."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

from aiohttp import web

from .app import create_app
from .config import Settings

log = logging.getLogger("gateway.server")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional: plain asyncio works, only slower
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


GC_FREEZE_INTERVAL = 10.0


async def freeze_long_lived_objects(app: web.Application) -> AsyncIterator[None]:
    """Move what survived so far (mostly cached tokens) out of the cyclic collector's reach.

    With 100,000 cached tokens a full collection walked some 360,000 objects and paused the
    worker for about 200 ms every few seconds (bench/ANALYSIS.md); frozen objects are still freed
    by reference counting, only cycles among them would outlive their use.
    """
    async def loop() -> None:
        while True:
            await asyncio.sleep(GC_FREEZE_INTERVAL)
            gc.freeze()

    task = asyncio.ensure_future(loop())
    yield
    task.cancel()


def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, finish requests and drain the writers."""
    listen = settings.listen

    def ready(message: str) -> None:
        log.info("%s (pid %d)", message.strip(), os.getpid())

    app = create_app(settings)
    app.cleanup_ctx.append(freeze_long_lived_objects)
    web.run_app(
        app, host=listen.host, port=listen.port, reuse_port=reuse_port or None,
        access_log=None, print=ready, loop=new_event_loop(), shutdown_timeout=30.0,
    )


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
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

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
