"""Real servers for the tests, on free loopback ports: a redis-server of a test's own, the recording
upstream (what it receives is the oracle), and the gateway as its own process."""
from __future__ import annotations

import asyncio
import gzip
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

ROOT = Path(__file__).resolve().parents[2]  # the repository


def _ephemeral_start() -> int:
    """The first port the kernel gives client connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# The ports handed to the tests' servers lie below the kernel's ephemeral range, where no client
# is given a local port: a port the kernel chose as free (bind to 0) is one of the range, and a
# connection made before the server binds it may take it ("address already in use", seen in CI).
# The test cluster's nodes take theirs from CLUSTER_PORTS, apart from these.
CLUSTER_PORTS = range(10000, 13000)  # a node's bus listens on its port + 10000: 20000-22999
LISTEN_PORTS = range(23000, _ephemeral_start())


def bindable(port: int) -> bool:
    """Nothing on any address holds `port` (a server may listen on every interface)."""
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    if len(LISTEN_PORTS) >= 1000:
        for _ in range(200):
            port = random.choice(LISTEN_PORTS)
            if bindable(port):
                return port
    with socket.socket() as sock:  # an unusual ephemeral range: whatever the kernel gives
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalServer:
    """A server binary of the tests' own (Debian's), on a free loopback port, with a scratch
    directory; a test may stop and start it again."""

    binary = ""

    def __init__(self, prefix: str) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self, arguments: list[str]) -> None:
        found = shutil.which(self.binary) or shutil.which(self.binary, path="/usr/sbin:/sbin")
        if found is None:
            pytest.fail(f"{self.binary} is not installed (.ci/run installs it)")
        self.process = subprocess.Popen([found, *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisProcess(LocalServer):
    """A redis-server of our own."""

    binary = "redis-server"

    def __init__(self, persistent: bool = False, extra: list[str] | None = None) -> None:
        super().__init__("gw-redis-")
        self.persistent = persistent
        self.extra = extra or []  # more redis-server options, e.g. --requirepass

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.launch(["--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always",
                     "--dir", str(self.dir), *self.extra])


@dataclass
class Recorded:
    method: str
    raw_path: str
    headers: dict[str, list[str]]
    body: bytes
    peer_port: int


@dataclass
class Upstream:
    url: str
    requests: list[Recorded] = field(default_factory=list)

    @property
    def last(self) -> Recorded:
        return self.requests[-1]


def build_upstream(record: list[Recorded]) -> web.Application:
    async def remember(request: web.Request, body: bytes) -> None:
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        record.append(Recorded(request.method, request.raw_path, headers, body, peer[1] if peer else 0))

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        await remember(request, body)
        return web.json_response({"method": request.method, "path": request.raw_path, "size": len(body)},
                                 headers={"X-Upstream": "yes"})

    async def status(request: web.Request) -> web.StreamResponse:
        await remember(request, b"")
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code, headers={"X-Status": str(code)})
        return web.Response(status=code, text=f"status {code}", headers={"X-Status": str(code)})

    async def big(request: web.Request) -> web.StreamResponse:
        await remember(request, b"")
        size = int(request.match_info["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        block = b"x" * 65536
        sent = size if request.method == "HEAD" else 0
        while sent < size:
            part = block[: min(len(block), size - sent)]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.StreamResponse:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        await remember(request, b"")
        return web.json_response({"received": total})

    async def slow(request: web.Request) -> web.StreamResponse:
        await remember(request, b"")
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.json_response({"slow": True})

    async def gzipped(request: web.Request) -> web.StreamResponse:
        await remember(request, b"")
        return web.Response(body=gzip.compress(b'{"zipped": true}'),
                            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    async def hop(request: web.Request) -> web.StreamResponse:
        await remember(request, b"")
        return web.Response(text="hop", headers={"Connection": "X-Private", "X-Private": "secret",
                                                 "Keep-Alive": "timeout=5", "X-Public": "ok"})

    async def chunked(request: web.Request) -> web.StreamResponse:
        await remember(request, b"")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"one,", b"two,", b"three"):
            await response.write(part)
        await response.write_eof()
        return response

    async def websocket(request: web.Request) -> web.StreamResponse:
        await remember(request, b"")
        ws = web.WebSocketResponse(protocols=("echo",))
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws

    async def cors(request: web.Request) -> web.StreamResponse:
        # An upstream with CORS opinions of its own, which the gateway must not pass on.
        await remember(request, b"")
        return web.json_response({"cors": True}, headers={
            "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": "X-Secret", "Vary": "Accept-Encoding"})

    app = web.Application(client_max_size=1 << 34)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/big/{size}", big)
    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/slow/{seconds}", slow)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/hop", hop)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/cors", cors)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@asynccontextmanager
async def running_upstream(tls: ssl.SSLContext | None = None, name: str = "127.0.0.1") -> AsyncIterator[Upstream]:
    """The recording upstream on a free loopback port; with `tls` it serves https, its URL naming `name`."""
    recorded: list[Recorded] = []
    server = TestServer(build_upstream(recorded), host="127.0.0.1", port=free_port())
    await server.start_server(ssl=tls)
    try:
        yield Upstream(f"{'https' if tls else 'http'}://{name}:{server.port}", recorded)
    finally:
        await server.close()


def run_gateway_process(config_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config_path)], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail("nginx is not installed (.ci/run installs it)")  # never a skip: CI must run this
    return found


def caddy_binary() -> str:
    found = shutil.which("caddy")
    if found is None:
        pytest.fail("caddy is not installed (.ci/run installs it)")  # never a skip: CI must run this
    return found
