"""Running the gateway: one process, or a supervisor and `workers: N` processes on its socket.

Signals, as nginx takes them: SIGTERM/SIGINT stop gracefully; SIGHUP re-reads the configuration
and applies it when it is valid (in place in one process, by a new generation of workers under
the supervisor), else keeps the running one and logs why; SIGUSR1 reopens the request log file.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import gc
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from gateway.app import GATEWAY, create_app, json_error_handlers
from gateway.config import ConfigError, ListenSettings, Settings, load_settings, reload_plan, reloaded_keys
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


def bind_listen(listen: ListenSettings, reuse_port: bool, backlog: int = 1024) -> list[socket.socket]:
    """Listening sockets on every address `listen.host` resolves to, as asyncio's create_server
    makes them (SO_REUSEADDR; IPv6 sockets v6 only); SO_REUSEPORT when asked. A failure is the
    ConfigError naming the key (`--check-config` binds the same way, then lets go)."""
    try:
        addresses = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError("listen.host", f"{listen.host!r} does not resolve ({exc.strerror})") from exc
    bound: list[socket.socket] = []
    try:
        for family, kind, protocol, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, protocol)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                key = "listen.port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "listen.host"
                host = str(address[0])
                where = f"[{host}]:{listen.port}" if family == socket.AF_INET6 else f"{host}:{listen.port}"
                raise ConfigError(key, f"cannot listen on {where} ({exc.strerror})") from exc
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


class GatewaySite(web.BaseSite):
    """The listening socket: connections start on the fast path (`proxy.listener.FastLane`).
    Its own socket on `host:port`, or the `sockets` a supervisor bound (shared by its workers)."""

    __slots__ = ("_host", "_more", "_port", "_reuse_port", "_sockets", "fast_path", "lane")

    def __init__(self, runner: web.AppRunner, host: str, port: int, reuse_port: bool,
                 sockets: Sequence[socket.socket] = (), fast_path: bool = True) -> None:
        super().__init__(runner, backlog=1024)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._sockets = tuple(sockets)
        self.fast_path = fast_path
        self._more: list[asyncio.AbstractServer] = []  # one server per inherited socket past the first
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
        handlers = json_error_handlers(runner.server, gateway)
        self.lane = lane = FastLane(gateway.flow, handlers, gateway.services.upstream_tls, self.fast_path)
        gateway.open_connections = lambda: len(lane.connections)
        lane.start()
        loop = asyncio.get_running_loop()
        if not self._sockets:
            self._server = await loop.create_server(
                self.lane, self._host, self._port, backlog=self._backlog, reuse_address=True,
                reuse_port=self._reuse_port or None)
            return
        servers: list[asyncio.AbstractServer] = [
            await loop.create_server(self.lane, sock=sock, backlog=self._backlog) for sock in self._sockets]
        self._server, self._more = servers[0], servers[1:]

    async def stop(self) -> None:
        for server in (self._server, *self._more):
            if server is not None:
                server.close()  # no new connections; those open finish their request
        if self.lane is not None:
            await self.lane.shutdown(SHUTDOWN_TIMEOUT)
        await super().stop()


SHUTDOWN_TIMEOUT = 30.0


class GatewayServer:
    """One running gateway in this process: the app, its services and the listening site."""

    def __init__(self, settings: Settings, shared: str | None = None, fast_path: bool = True) -> None:
        """`shared`: the metrics directory of a supervisor's workers; `fast_path=False`: aiohttp
        serves every request (the tests run both ways)."""
        self.settings = settings
        self.fast_path = fast_path
        self.app = create_app(settings, shared)
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

    async def start(self, host: str, port: int, reuse_port: bool = False,
                    sockets: Sequence[socket.socket] = ()) -> None:
        await self.runner.setup()  # services first: the port opens once the gateway can answer
        self.site = GatewaySite(self.runner, host, port, reuse_port, sockets, self.fast_path)
        try:
            await self.site.start()
        except OSError as exc:  # free at the check, taken since: said as the check says it, no traceback
            reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's strerror repeats the address
            raise ConfigError("listen.port", f"cannot listen on {host}:{port} ({reason})") from exc
        front, mqtt = self.app[GATEWAY].mqtt, self.settings.mqtt
        if front is not None and mqtt is not None:
            # Workers (given the supervisor's HTTP sockets) each bind the MQTT port themselves.
            try:
                self.mqtt = await listen_mqtt(front, mqtt.listen.host, mqtt.listen.port, reuse_port or bool(sockets))
            except OSError as exc:  # as for the HTTP port: a configuration error, no traceback
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ConfigError("mqtt.listen.port",
                                  f"cannot listen on {mqtt.listen.host}:{mqtt.listen.port} ({reason})") from exc

    @property
    def mqtt_port(self) -> int:
        assert self.mqtt is not None
        port: int = self.mqtt.sockets[0].getsockname()[1]
        return port

    def reload(self, loaded: Settings) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Apply a configuration re-read while running, for requests that start from now on.
        Returns the keys changed and those kept as running (they need a restart); raises
        ConfigError (nothing changed then)."""
        effective, kept = reload_plan(self.settings, loaded)
        changed = reloaded_keys(self.settings, effective)
        if changed:
            gateway = self.app[GATEWAY]
            gateway.reconfigure(effective)
            if self.site is not None and self.site.lane is not None:
                self.site.lane.reconfigure(gateway.flow, gateway.services.upstream_tls)
            self.settings = effective
        return changed, kept

    def reopen_logs(self) -> None:
        sink = self.app[GATEWAY].services.request_log
        if sink is not None:
            sink.reopen()

    async def close(self) -> None:
        """Stop serving; a second call (e.g. a test that closed it, then its fixture) does nothing."""
        if self._closed:
            return
        self._closed = True
        if self.mqtt is not None:
            self.mqtt.close()  # no new MQTT clients; the sessions end with the app's services
        await self.runner.cleanup()


def describe_reload(source: str, changed: Sequence[str], kept: Sequence[str]) -> str:
    said = f"reloaded {source}: " + (f"changed {', '.join(changed)}" if changed else "nothing changed")
    if kept:
        said += f"; needs a restart, kept as running: {', '.join(kept)}"
    return said


@dataclass(frozen=True, slots=True)
class Worker:
    """How a worker process is started by the supervisor (None for a gateway on its own)."""

    sockets: tuple[socket.socket, ...]
    parent: int  # the supervisor's pid: the worker stops when it is gone
    ready: int  # the pipe the worker writes one byte to once it accepts connections
    shared: str  # the directory the workers share their metrics through (gateway/metrics.py)


PARENT_WATCH_INTERVAL = 1.0


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """Besides PR_SET_PDEATHSIG (Linux): a worker whose supervisor is gone is re-parented."""
    while os.getppid() == parent:  # noqa: ASYNC110 (no event to wait on: the kernel tells nothing)
        await asyncio.sleep(PARENT_WATCH_INTERVAL)
    log.warning("supervisor %d is gone; stopping", parent)
    stop.set()


def serve(settings: Settings, *, config_path: str | None = None, worker: Worker | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, finish requests and drain the writers.
    On its own, SIGHUP reloads `config_path` in place; a worker leaves reloads to its supervisor."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    async def main() -> None:
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        server = GatewayServer(settings, worker.shared if worker is not None else None)
        source = config_path or "(environment)"

        def reload() -> None:
            if stop.is_set() or server.site is None or server.site.lane is None:
                log.warning("SIGHUP ignored: the gateway is %s", "stopping" if stop.is_set() else "starting")
                return
            try:
                changed, kept = server.reload(load_settings(config_path))
            except ConfigError as exc:
                log.error("reload of %s refused, still running the previous configuration: %s", source, exc)
                return
            except Exception:  # a bug, not the file: said, and the process goes on serving
                log.exception("reload of %s failed", source)
                return
            log.info("%s", describe_reload(source, changed, kept))

        if worker is None:
            loop.add_signal_handler(signal.SIGHUP, reload)
        else:
            loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
                "SIGHUP ignored by a worker: send it to the supervisor (pid %d)", worker.parent))
        loop.add_signal_handler(signal.SIGUSR1, server.reopen_logs)
        watch: asyncio.Task[None] | None = None
        try:
            if worker is None:
                await server.start(settings.listen.host, settings.listen.port)
            else:
                watch = asyncio.ensure_future(_watch_parent(worker.parent, stop))
                await server.start(settings.listen.host, settings.listen.port, sockets=worker.sockets)
            log.info("listening on http://%s:%d (pid %d)", settings.listen.host, server.port, os.getpid())
            if worker is not None:
                os.write(worker.ready, b"1")
                os.close(worker.ready)
            await stop.wait()
        finally:
            if watch is not None:
                watch.cancel()
            await server.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def run(settings: Settings, config_path: str | None = None) -> int:
    # Until their handlers are in place a reload or reopen signal would end the process (their
    # default action): ignored instead. Workers inherit this.
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    if settings.workers == 1:
        serve(settings, config_path=config_path)
        return 0
    return Supervisor(settings, config_path).run()


PR_SET_PDEATHSIG = 1  # prctl's option number (linux/prctl.h)


def die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the supervisor dies (Linux); if it already has, stop."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


@dataclass(slots=True)
class Process:
    """One worker as the supervisor sees it."""

    pid: int
    slot: int
    generation: int
    started: float
    ready_pipe: int | None  # read end, until the worker says it accepts (or dies)
    ready: bool = False
    retiring: bool = False


# Back-off of a worker that keeps dying: a death within CRASH_WINDOW seconds of its start doubles
# the wait before the next start, from RESTART_FIRST up to RESTART_MAX seconds.
RESTART_FIRST = 0.25
RESTART_MAX = 30.0
CRASH_WINDOW = 10.0
# A new generation that does not accept connections by then is given up (the old one stays).
READY_TIMEOUT = 60.0
SUPERVISED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)


@dataclass(slots=True)
class Supervisor:
    """Like nginx's master: it binds the socket once, and its workers all accept on it. SIGHUP
    starts a new generation with the re-read configuration and retires the old one only once
    every new worker accepts (the queue of the shared socket is never closed, so no connection
    is refused meanwhile); a worker that dies is started again, with back-off."""

    settings: Settings
    config_path: str | None
    sockets: list[socket.socket] = field(default_factory=list)
    processes: dict[int, Process] = field(default_factory=dict)
    generation: int = 0
    # The generation being started by a reload, its settings, and when it is given up.
    next_generation: tuple[int, Settings, float] | None = None
    reload_again: bool = False
    due: list[tuple[float, int, int]] = field(default_factory=list)  # (when, slot, generation) to start
    failures: dict[int, int] = field(default_factory=dict)  # by slot: quick deaths in a row
    received: list[int] = field(default_factory=list)
    stopping: bool = False
    shared: str = ""  # where the workers leave their metrics for each other; this run's only

    def run(self) -> int:
        self.sockets = bind_listen(self.settings.listen, reuse_port=True)
        self.shared = tempfile.mkdtemp(prefix="gateway-workers-")
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        for signum in SUPERVISED:
            signal.signal(signum, lambda number, frame: self.received.append(number))
        try:
            for slot in range(self.settings.workers):
                self.spawn(slot, self.generation, self.settings)
            while self.processes or (self.due and not self.stopping):
                self.step(wake_read)
        finally:
            signal.set_wakeup_fd(-1)
            for fd in (wake_read, wake_write):
                os.close(fd)
            for sock in self.sockets:
                sock.close()
            shutil.rmtree(self.shared, ignore_errors=True)
        log.info("supervisor stopped")
        sys.stdout.flush()
        return 0

    def step(self, wake: int) -> None:
        now = time.monotonic()
        deadlines = [when for when, _, _ in self.due]
        if self.next_generation is not None:
            deadlines.append(self.next_generation[2])
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        pipes = {p.ready_pipe: p for p in self.processes.values() if p.ready_pipe is not None}
        try:
            readable, _, _ = select.select([wake, *pipes], [], [], timeout)
        except InterruptedError:
            readable = []
        if wake in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake, 512):
                    pass
        for fd in readable:
            if fd in pipes:
                self.heard_from(pipes[fd])
        received, self.received = self.received, []
        for signum in received:
            self.on_signal(signum)
        self.reap()
        now = time.monotonic()
        for entry in [entry for entry in self.due if entry[0] <= now]:
            self.due.remove(entry)
            _, slot, generation = entry
            if not self.stopping and generation == self.generation:
                self.spawn(slot, generation, self.settings)
        if self.next_generation is not None:
            self.advance_reload(now)

    def spawn(self, slot: int, generation: int, settings: Settings) -> None:
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            parent = os.getppid()
            code = 0
            try:
                signal.set_wakeup_fd(-1)
                for signum in SUPERVISED:  # reload and reopen ignored until serve() takes them
                    ignored = signum in (signal.SIGHUP, signal.SIGUSR1)
                    signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL)
                os.close(ready_read)
                for other in self.processes.values():
                    if other.ready_pipe is not None:
                        os.close(other.ready_pipe)
                die_with_parent(parent)
                serve(settings, worker=Worker(tuple(self.sockets), parent, ready_write, self.shared))
            except ConfigError as exc:
                log.error("worker %d: configuration error: %s", os.getpid(), exc)
                code = 2
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(ready_write)
        self.processes[pid] = Process(pid, slot, generation, time.monotonic(), ready_read)

    def heard_from(self, process: Process) -> None:
        assert process.ready_pipe is not None
        try:
            said = os.read(process.ready_pipe, 1)
        except OSError:
            said = b""
        os.close(process.ready_pipe)
        process.ready_pipe = None
        process.ready = said == b"1"

    def on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if not self.stopping:
                log.info("stopping: workers finish their requests")
            self.stopping = True
            self.due.clear()
            self.next_generation = None
            self.tell_all(signal.SIGTERM)
        elif signum == signal.SIGHUP and not self.stopping:
            if self.next_generation is not None:
                self.reload_again = True  # after the one under way
            else:
                self.reload()
        elif signum == signal.SIGUSR1:
            self.tell_all(signal.SIGUSR1)

    def tell_all(self, signum: int) -> None:
        for pid in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def reload(self) -> None:
        source = self.config_path or "(environment)"
        try:
            loaded = load_settings(self.config_path)
        except ConfigError as exc:
            log.error("reload of %s refused, still running the previous configuration: %s", source, exc)
            return
        except Exception:  # a bug, not the file: the supervisor (and its workers) must go on
            log.exception("reload of %s failed, still running the previous configuration", source)
            return
        effective, kept = reload_plan(self.settings, loaded)
        changed = reloaded_keys(self.settings, effective)
        log.info("%s; starting %d new workers", describe_reload(source, changed, kept), effective.workers)
        generation = self.generation + 1
        self.next_generation = (generation, effective, time.monotonic() + READY_TIMEOUT)
        for slot in range(effective.workers):
            self.spawn(slot, generation, effective)

    def advance_reload(self, now: float) -> None:
        assert self.next_generation is not None
        generation, settings, deadline = self.next_generation
        new = [p for p in self.processes.values() if p.generation == generation]
        if len(new) == settings.workers and all(p.ready for p in new):
            self.next_generation = None
            self.generation, self.settings = generation, settings
            self.failures.clear()
            old = [p for p in self.processes.values() if p.generation != generation]
            for process in old:
                process.retiring = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
            log.info("reload done: %d new workers accept connections; %d old ones finish their requests",
                     len(new), len(old))
        elif len(new) < settings.workers or now >= deadline:
            why = "a new worker exited" if len(new) < settings.workers else "new workers not ready in time"
            log.error("reload failed (%s), still running the previous configuration", why)
            self.next_generation = None
            for process in new:
                process.retiring = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        else:
            return
        if self.reload_again:
            self.reload_again = False
            self.reload()

    def reap(self) -> None:
        while self.processes:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            process = self.processes.pop(pid, None)
            if process is None:
                continue
            if process.ready_pipe is not None:
                os.close(process.ready_pipe)
            how = exit_reason(os.waitstatus_to_exitcode(status))
            if self.stopping or process.retiring:
                log.info("worker %d stopped (%s)", pid, how)
            elif self.next_generation is not None and process.generation == self.next_generation[0]:
                log.error("new worker %d exited (%s) before accepting connections", pid, how)
                # advance_reload sees the generation short of a worker and gives it up
            else:
                self.restart_later(process, how)

    def restart_later(self, process: Process, how: str) -> None:
        quick = time.monotonic() - process.started < CRASH_WINDOW
        failures = self.failures.get(process.slot, 0) + 1 if quick else 0
        self.failures[process.slot] = failures
        delay = min(RESTART_MAX, RESTART_FIRST * 2 ** (failures - 1)) if failures else 0.0
        log.error("worker %d exited (%s); starting another in %.2f s", process.pid, how, delay)
        self.due.append((time.monotonic() + delay, process.slot, process.generation))


def exit_reason(code: int) -> str:
    """`os.waitstatus_to_exitcode`'s result in words: a negative code is the signal that killed it."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"status {code}"
