"""A real nginx in front of the gateway as its trusted proxy, clients on their own loopback addresses.

nginx appends the peer it saw to X-Forwarded-For (`$proxy_add_x_forwarded_for`) and connects to
the gateway from 127.0.0.1, the one trusted proxy; the gateway must then see the client nginx saw,
and nothing a client writes into X-Forwarded-For itself.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support.gateways import GatewayFactory, GatewayHandle, error, logged_hosts
from support.servers import Upstream, free_port, nginx_binary, wait_for_port

LOCATION = error(401, "using token from unauthorized location")

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


class NginxProcess:
    """nginx with a prefix, config and pid file of its own, in the foreground, on a free port."""

    def __init__(self, upstream_port: int) -> None:
        self.prefix = Path(tempfile.mkdtemp(prefix="gw-nginx-"))
        self.port = free_port()
        conf = NGINX_CONF.format(prefix=self.prefix, port=self.port, upstream_port=upstream_port)
        (self.prefix / "nginx.conf").write_text(conf)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = nginx_binary()
        conf = str(self.prefix / "nginx.conf")
        checked = subprocess.run([binary, "-t", "-p", str(self.prefix), "-e", str(self.prefix / "error.log"),
                                  "-c", conf], capture_output=True, text=True, timeout=30, check=False)
        assert checked.returncode == 0, checked.stderr
        self.process = subprocess.Popen([binary, "-p", str(self.prefix), "-e", str(self.prefix / "error.log"),
                                         "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port)
        except AssertionError:
            raise AssertionError(f"nginx did not start: {self.error_log()}") from None

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None
        shutil.rmtree(self.prefix, ignore_errors=True)


@pytest.fixture
async def behind_nginx(make_gateway: GatewayFactory) -> AsyncIterator[tuple[GatewayHandle, NginxProcess]]:
    gw = await make_gateway(trusted_proxies=["127.0.0.1"])
    nginx = NginxProcess(gw.server.port or 0)
    nginx.start()
    yield gw, nginx
    nginx.stop()


Call = Callable[..., Awaitable[tuple[int, Any]]]


@pytest.fixture
async def via_nginx(behind_nginx: tuple[GatewayHandle, NginxProcess]) -> AsyncIterator[Call]:
    """`await call("127.0.0.2", key, headers)`: a GET through nginx from that client address."""
    _, nginx = behind_nginx
    sessions: dict[str, aiohttp.ClientSession] = {}

    async def call(address: str, key: str, headers: dict[str, str] | None = None, path: str = "/via") -> Any:
        if address not in sessions:
            sessions[address] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))
        auth = {"Authorization": f"FlespiToken {key}", **(headers or {})}
        async with sessions[address].get(nginx.url + path, headers=auth) as response:
            return response.status, await response.json(content_type=None)

    yield call
    for session in sessions.values():
        await session.close()


async def test_client_behind_nginx_is_seen_as_itself(behind_nginx: tuple[GatewayHandle, NginxProcess],
                                                      via_nginx: Call, upstream: Upstream) -> None:
    gw, _ = behind_nginx
    token = await gw.create_token(ips="127.0.0.2")
    status, body = await via_nginx("127.0.0.2", token["key"])
    assert (status, body) == (200, {"method": "GET", "path": "/via", "size": 0})
    seen = upstream.last.headers
    assert seen["x-forwarded-for"] == ["127.0.0.2, 127.0.0.1"]  # nginx's chain, then nginx itself
    assert "authorization" not in seen
    assert await via_nginx("127.0.0.3", token["key"]) == (401, LOCATION)
    assert len(upstream.requests) == 1
    assert await logged_hosts(gw, token["id"], 2) == ["127.0.0.2", "127.0.0.3"]


async def test_spoofed_forwarded_for_does_not_pass_a_mask(behind_nginx: tuple[GatewayHandle, NginxProcess],
                                                           via_nginx: Call, upstream: Upstream) -> None:
    """nginx keeps what the client wrote and appends the real peer: the right-most untrusted entry wins."""
    gw, _ = behind_nginx
    token = await gw.create_token(ips="127.0.0.2")
    for claim in ("127.0.0.2", "127.0.0.1", "10.0.0.1, 127.0.0.2", "127.0.0.2, 127.0.0.1"):
        assert await via_nginx("127.0.0.3", token["key"], {"X-Forwarded-For": claim}) == (401, LOCATION), claim
    assert upstream.requests == []
    assert set(await logged_hosts(gw, token["id"], 4)) == {"127.0.0.3"}


async def test_spoofed_chain_reaches_upstream_only_left_of_the_real_client(
        behind_nginx: tuple[GatewayHandle, NginxProcess], via_nginx: Call, upstream: Upstream) -> None:
    gw, _ = behind_nginx
    token = await gw.create_token(ips="127.0.0.3")
    status, _ = await via_nginx("127.0.0.3", token["key"], {"X-Forwarded-For": "127.0.0.2"})
    assert status == 200
    assert upstream.last.headers["x-forwarded-for"] == ["127.0.0.2, 127.0.0.3, 127.0.0.1"]
    assert await logged_hosts(gw, token["id"], 1) == ["127.0.0.3"]


async def test_wildcard_and_cidr_masks_through_nginx(behind_nginx: tuple[GatewayHandle, NginxProcess],
                                                     via_nginx: Call) -> None:
    gw, _ = behind_nginx
    for ips, allowed in (("127.0.0.?", {"127.0.0.2", "127.0.0.3"}), ("127.0.0.2/32", {"127.0.0.2"}),
                         ("127.0.0.1", set())):  # nginx's own address is not the client's
        token = await gw.create_token(ips=ips)
        for address in ("127.0.0.2", "127.0.0.3"):
            status, _ = await via_nginx(address, token["key"])
            assert status == (200 if address in allowed else 401), (ips, address)


def test_nginx_is_installed() -> None:
    """Stated on its own so a machine without nginx fails with the reason first, never skips."""
    binary = nginx_binary()
    version = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    assert version.returncode == 0 and "nginx/" in version.stderr
