"""https upstreams: `proxy.ca_file` trusted on both proxy paths, host names checked, bad files refused.

A private CA from `trustme` signs the upstream's certificate; the recording upstream
(`tests/support/servers.py`) serves https with it (the `upstream` fixture below replaces conftest's
for this module, so `make_gateway` points at it) and notes the host name each TLS handshake asked for (SNI).
"""
from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from test_fastpath import Client, Counts, Reply, chunked
from test_process import Running, write_config

from gateway.config import ConfigError, build_settings, load_settings

from support.gateways import GatewayFactory, GatewayHandle, error
from support.keys import MASTER_KEY
from support.servers import Upstream, free_port, running_upstream

ORIGIN = {"Origin": "https://page.example"}  # a request with Origin is served by the aiohttp path


# Every gateway here runs through both fronts (`front`, tests/proxy/conftest.py); on the aiohttp
# front a connection's first request is handed over, so the fast path serves nothing.

@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def serving(cert: trustme.LeafCert, server_names: list[str | None]) -> ssl.SSLContext:
    """A server context presenting `cert`, noting each handshake's SNI in `server_names`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)

    def note(connection: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        server_names.append(name)

    context.sni_callback = note
    return context


@pytest.fixture
def server_names() -> list[str | None]:
    return []


@pytest.fixture
async def upstream(ca: trustme.CA, server_names: list[str | None]) -> AsyncIterator[Upstream]:
    """The recording upstream over https as `localhost`, its certificate from the private CA."""
    async with running_upstream(serving(ca.issue_cert("localhost", "127.0.0.1"), server_names), "localhost") as up:
        yield up


@pytest.fixture
async def gw(make_gateway: GatewayFactory, ca_file: str) -> GatewayHandle:
    return await make_gateway(proxy={"ca_file": ca_file})


@pytest.fixture
async def client(gw: GatewayHandle) -> AsyncIterator[Client]:
    """A raw keep-alive client connection to `gw`."""
    connection = await Client.connect(gw.server.port)
    yield connection
    connection.close()


# -- the fast path ---------------------------------------------------------------------------------

async def test_get_over_tls_reuses_the_upstream_connection(gw: GatewayHandle, client: Client, upstream: Upstream,
                                                           server_names: list[str | None], front: str) -> None:
    counts = Counts(gw)
    for path in ("/first", "/second"):
        reply = await client.ask("GET", path)
        assert reply.status == 200 and reply.json() == {"method": "GET", "path": path, "size": 0}
        assert reply.header("X-Upstream") == "yes" and reply.header("Content-Type") == "application/json; charset=utf-8"
    assert counts.delta() == ((2, 0) if front == "fast" else (0, 1))
    assert [request.raw_path for request in upstream.requests] == ["/first", "/second"]
    assert upstream.requests[0].peer_port == upstream.requests[1].peer_port
    assert server_names == ["localhost"]  # one handshake, naming the URL's host


async def test_bodies_both_ways_over_tls(gw: GatewayHandle, client: Client, upstream: Upstream, front: str) -> None:
    counts = Counts(gw)
    reply = await client.ask("POST", "/orders", body=b'{"n": 1}', headers={"Content-Type": "application/json"})
    assert reply.status == 200 and reply.json() == {"method": "POST", "path": "/orders", "size": 8}
    assert upstream.last.body == b'{"n": 1}'
    size = 300_000  # many TLS records
    reply = await client.ask("POST", "/upload", body=b"u" * size)
    assert reply.json() == {"received": size}
    reply = await client.ask("POST", "/upload", headers={"Transfer-Encoding": "chunked"},
                             body=chunked(b"a" * 70_000, b"b" * 5))
    assert reply.json() == {"received": 70_005}
    reply = await client.ask("GET", "/chunked")
    assert reply.header("Transfer-Encoding") == "chunked" and reply.body == b"one,two,three"
    reply = await client.ask("GET", f"/big/{size}")
    assert reply.header("Content-Length") == str(size) and reply.body == b"x" * size
    assert counts.delta() == ((5, 0) if front == "fast" else (0, 1))
    assert len({request.peer_port for request in upstream.requests}) == 1


# -- the aiohttp path ------------------------------------------------------------------------------

async def test_aiohttp_path_over_tls_with_the_same_ca(gw: GatewayHandle, client: Client, upstream: Upstream,
                                                      server_names: list[str | None]) -> None:
    counts = Counts(gw)
    reply = await client.ask("GET", "/with-origin", headers=ORIGIN)
    assert reply.status == 200 and reply.json()["path"] == "/with-origin"
    assert reply.header("X-Upstream") == "yes"
    assert reply.header("Access-Control-Allow-Origin") == ORIGIN["Origin"]
    reply = await client.ask("HEAD", "/big/1000")
    assert reply.status == 200 and reply.header("Content-Length") == "1000"
    assert counts.delta() == (0, 1)  # the connection stays with aiohttp once handed over
    async with gw.session.ws_connect(gw.url + "/ws", headers={"Authorization": f"FlespiToken {MASTER_KEY}"},
                                     protocols=("echo",)) as ws:
        await ws.send_str("over tls")
        assert (await ws.receive_str()) == "echo:over tls"
    assert [request.method for request in upstream.requests] == ["GET", "HEAD", "GET"]
    assert set(server_names) == {"localhost"}


async def both_paths(gw: GatewayHandle) -> list[Reply]:
    """A GET on the fast path, then one on the aiohttp path (with Origin), from a new client connection
    (on the aiohttp front both are aiohttp's)."""
    counts = Counts(gw)
    client = await Client.connect(gw.server.port)
    try:
        replies = [await client.ask("GET", "/both", headers=headers) for headers in ({}, ORIGIN)]
    finally:
        client.close()
    assert counts.delta() == ((1, 1) if gw.server.fast_path else (0, 1))
    return replies


async def test_name_checked_is_the_upstream_host_not_the_clients(make_gateway: GatewayFactory, ca_file: str,
                                                                   upstream: Upstream,
                                                                   server_names: list[str | None]) -> None:
    gw = await make_gateway(proxy={"ca_file": ca_file, "preserve_host": True})
    assert [reply.status for reply in await both_paths(gw)] == [200, 200]
    assert [request.headers["host"] for request in upstream.requests] == [["gw.test"], ["gw.test"]]
    # A handshake per path's own pool; on the aiohttp front one connection serves both.
    assert server_names == ["localhost"] * (2 if gw.server.fast_path else 1)


async def test_upstream_by_address(make_gateway: GatewayFactory, ca: trustme.CA, ca_file: str) -> None:
    server_names: list[str | None] = []
    async with running_upstream(serving(ca.issue_cert("127.0.0.1"), server_names), "127.0.0.1") as by_address:
        gw = await make_gateway(upstream=by_address.url, proxy={"ca_file": ca_file})
        assert [reply.status for reply in await both_paths(gw)] == [200, 200]
    # No SNI for an address (the certificate must name the address); a handshake per pool, as above.
    assert server_names == [None] * (2 if gw.server.fast_path else 1)


# -- refused certificates --------------------------------------------------------------------------

async def assert_refused_on_both_paths(gw: GatewayHandle, upstream: Upstream) -> None:
    replies = await both_paths(gw)
    assert [(reply.status, reply.json()) for reply in replies] == [(502, error(502, "upstream unavailable"))] * 2
    assert upstream.requests == []


async def test_system_trust_store_refuses_a_private_ca(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    await assert_refused_on_both_paths(await make_gateway(), upstream)


async def test_certificate_for_another_host_is_refused(make_gateway: GatewayFactory, ca: trustme.CA, ca_file: str,
                                                        server_names: list[str | None]) -> None:
    async with running_upstream(serving(ca.issue_cert("other.example"), server_names), "localhost") as other:
        gw = await make_gateway(upstream=other.url, proxy={"ca_file": ca_file})
        await assert_refused_on_both_paths(gw, other)
    assert set(server_names) == {"localhost"}


async def test_certificate_for_the_name_but_not_the_address_is_refused(make_gateway: GatewayFactory,
                                                                        ca: trustme.CA, ca_file: str) -> None:
    async with running_upstream(serving(ca.issue_cert("localhost"), []), "127.0.0.1") as by_address:
        gw = await make_gateway(upstream=by_address.url, proxy={"ca_file": ca_file})
        await assert_refused_on_both_paths(gw, by_address)


# -- the production server (uvloop) ---------------------------------------------------------------

async def test_gateway_process_proxies_over_tls(upstream: Upstream, ca_file: str, tmp_path: Path) -> None:
    port = free_port()
    config = {"listen": {"host": "127.0.0.1", "port": port}, "upstream": upstream.url,
              "bootstrap_master_token": MASTER_KEY, "log": {"path": "off"},
              "redis": {"url": "memory://", "data_file": str(tmp_path / "data.json")}, "proxy": {"ca_file": ca_file}}
    gateway = Running(write_config(tmp_path / "gw.yaml", config), port)
    try:
        gateway.start()
        auth = {"Authorization": f"FlespiToken {MASTER_KEY}"}
        async with aiohttp.ClientSession() as session:
            for headers in (auth, {**auth, **ORIGIN}):
                async with session.post(f"{gateway.url}/upload", data=b"p" * 100_000, headers=headers) as response:
                    assert response.status == 200 and await response.json() == {"received": 100_000}
    finally:
        code, stderr = gateway.stop()
    assert code == 0, stderr
    assert len(upstream.requests) == 2
    assert MASTER_KEY.encode() not in stderr


# -- configuration ---------------------------------------------------------------------------------

def proxy_config(ca_file: Any) -> dict[str, Any]:
    return {"upstream": "https://localhost:8443", "proxy": {"ca_file": ca_file}}


@pytest.fixture
def bad_ca_files(ca: trustme.CA, tmp_path: Path) -> dict[str, Any]:
    files = {"empty": b"", "not PEM": b"certainly not a certificate\n",
             "key only": ca.issue_cert("localhost").private_key_pem.bytes(),
             "broken PEM": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}
    paths: dict[str, Any] = {"missing": str(tmp_path / "missing.pem"), "a directory": str(tmp_path),
                             "not a string": 5, "empty path": ""}
    for name, content in files.items():
        path = tmp_path / f"{name.replace(' ', '-')}.pem"
        path.write_bytes(content)
        paths[name] = str(path)
    return paths


def test_ca_file_defaults_to_the_system_trust_store(ca_file: str) -> None:
    assert build_settings({"upstream": "https://localhost:8443"}).proxy.ca_file is None
    assert build_settings(proxy_config(None)).proxy.ca_file is None
    assert build_settings(proxy_config(ca_file)).proxy.ca_file == ca_file


@pytest.mark.parametrize("kind", ["missing", "a directory", "not a string", "empty path", "empty", "not PEM",
                                  "key only", "broken PEM"])
def test_bad_ca_file_is_refused(bad_ca_files: dict[str, Any], kind: str) -> None:
    with pytest.raises(ConfigError, match=r"^proxy\.ca_file: "):
        build_settings(proxy_config(bad_ca_files[kind]))


def test_bad_ca_file_from_the_environment_is_refused(bad_ca_files: dict[str, str]) -> None:
    environ = {"GATEWAY_UPSTREAM": "https://localhost:8443", "GATEWAY_PROXY__CA_FILE": bad_ca_files["not PEM"]}
    with pytest.raises(ConfigError, match=r"^GATEWAY_PROXY__CA_FILE: proxy\.ca_file: "):
        load_settings(None, environ)
