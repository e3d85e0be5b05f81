"""Decision mode (`<internal_prefix>auth`): "may this request pass?", asked by a proxy in front.

First the endpoint on its own, on raw sockets (Envoy's request shape, which cannot run here, and
what nginx and Caddy send); then a real nginx with `auth_request` and a real Caddy with
`forward_auth` in front of the recording upstream: what reaches the upstream is the oracle.
The configurations the proxies run are the ones docs/decision.md gives.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.proxy.listener import FastLane

from support.gateways import GatewayFactory, GatewayHandle, error, logged_hosts
from support.keys import MASTER_KEY
from support.rawhttp import Client, Reply
from support.servers import ROOT, Upstream, caddy_binary, free_port, nginx_binary, wait_for_port
from support.usage import room_in_window

ENDPOINT = "/_gateway/auth"
INVALID = error(401, "invalid or expired access token")
CHALLENGE = 'FlespiToken realm="gateway"'
CONFLICT = "conflicting original request: its headers name different URIs or methods"
ACL = [{"uri": "gw/devices", "methods": ["GET"], "ids": [12, 777],
        "submodules": [{"name": "telemetry", "methods": ["GET"]}]},
       {"uri": "gw/channels", "methods": ["GET"]}]


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> GatewayHandle:
    return await make_gateway(log={"flush_interval": 0.05})  # log records read back soon


def lane_of(gw: GatewayHandle) -> FastLane:
    site = gw.server.site
    assert site is not None and site.lane is not None
    return site.lane


async def ask(gw: GatewayHandle, method: str, target: str, headers: dict[str, str] | None = None,
              key: str | None = MASTER_KEY, version: str = "1.1") -> Reply:
    """One check on its own connection, as a proxy would send it."""
    lines = [f"{method} {target} HTTP/{version}", "Host: gw.test", "Connection: close"]
    if key is not None:
        lines.append(f"Authorization: FlespiToken {key}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    client = await Client.connect(gw.server.port or 0)
    try:
        await client.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        return await client.reply(head_only=method == "HEAD")
    finally:
        client.close()


def identity(reply: Reply) -> dict[str, str | None]:
    return {name: reply.header(name) for name in ("X-Token-Id", "X-Account-Id", "X-Authorized-Uri")}


async def log_records(gw: GatewayHandle, token_id: int, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        status, body = await gw.call("GET", f"/platform/tokens/{token_id}/logs")
        assert status == 200, body
        records = [record for record in body["result"] if record.get("event_code") == 1000]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.05)


# -- the endpoint on its own ----------------------------------------------------------------------

async def test_envoy_shape_allowed_on_the_fast_path(gw: GatewayHandle, upstream: Upstream) -> None:
    """Envoy's ext_authz (HTTP) appends the original path to the endpoint and keeps the method."""
    token = await gw.create_token()
    lane = lane_of(gw)
    fast, handed = lane.served_fast, lane.handed_over
    reply = await ask(gw, "POST", ENDPOINT + "/gw/devices/5?fields=id", key=token["key"],
                      headers={"x-flespi-app": "envoy-test"})
    assert (reply.status, reply.body, reply.header("Content-Length")) == (200, b"", "0")
    assert identity(reply) == {"X-Token-Id": str(token["id"]), "X-Account-Id": "0",
                               "X-Authorized-Uri": "/gw/devices/5?fields=id"}
    assert reply.header("X-Request-ID")
    assert (lane.served_fast - fast, lane.handed_over - handed) == (1, 0)  # no aiohttp object made
    [record] = await log_records(gw, token["id"], 1)
    assert (record["method"], record["uri"], record["status"], record["app"]) == (
        "POST", "/gw/devices/5", 200, "envoy-test")
    assert record["request_id"] == reply.header("X-Request-ID")
    assert upstream.requests == []  # a decision forwards nothing


async def test_original_request_from_headers(gw: GatewayHandle) -> None:
    """nginx's X-Original-* first, then Caddy's and Traefik's X-Forwarded-*; the check's own query
    string (Caddy 2.6 keeps the original's on it) is not the original URI."""
    token = await gw.create_token(access={"type": 2, "acl": ACL})
    key = token["key"]
    nginx = await ask(gw, "GET", ENDPOINT, key=key, headers={"X-Original-URI": "/gw/devices/12",
                                                              "X-Original-Method": "GET"})
    assert nginx.status == 200 and nginx.header("X-Authorized-Uri") == "/gw/devices/12"
    caddy = await ask(gw, "GET", ENDPOINT + "?x=1", key=key, headers={"X-Forwarded-Uri": "/gw/devices/all?x=1",
                                                                       "X-Forwarded-Method": "GET"})
    assert caddy.status == 200 and caddy.header("X-Authorized-Uri") == "/gw/devices/12,777?x=1"  # narrowed
    refused = await ask(gw, "GET", ENDPOINT, key=key, headers={"X-Forwarded-Uri": "/gw/devices/12",
                                                                "X-Forwarded-Method": "DELETE"})
    denied = error(403, "access to gw/devices/12 (DELETE) is denied by token ACL")
    assert (refused.status, refused.json()) == (403, denied)
    # every source the check carries must name the same request (a proxy passes the client's
    # headers on, so the names it does not set itself are the client's)
    for headers, target in (({"X-Original-URI": "/gw/devices/12", "X-Forwarded-Uri": "/gw/devices/3"}, ENDPOINT),
                            ({"X-Original-URI": "/gw/devices/12"}, ENDPOINT + "/gw/devices/3"),
                            ({"X-Original-URI": "/gw/devices/12", "X-Original-Method": "GET",
                              "X-Forwarded-Method": "DELETE"}, ENDPOINT),
                            ({"X-Original-Method": "GET"}, ENDPOINT + "/gw/devices/12")):
        method = "DELETE" if target.endswith("/12") else "GET"
        conflict = await ask(gw, method, target, key=key, headers=headers)
        assert (conflict.status, conflict.json()) == (400, error(400, CONFLICT)), headers
    agreeing = await ask(gw, "GET", ENDPOINT + "/gw/devices/12", key=key, headers={
        "X-Original-URI": "/gw/devices/12", "X-Forwarded-Uri": "/gw/devices/12", "X-Forwarded-Method": "GET"})
    assert agreeing.status == 200
    records = await log_records(gw, token["id"], 4)
    assert [(r["method"], r["uri"], r["status"]) for r in records] == [
        ("GET", "/gw/devices/12", 200), ("GET", "/gw/devices/all", 200), ("DELETE", "/gw/devices/12", 403),
        ("GET", "/gw/devices/12", 200)]  # a conflict is refused before any token is looked at: no record


@pytest.mark.parametrize("method", ["GET", "HEAD"])  # the fast path, and aiohttp
async def test_a_proxy_that_cannot_narrow_gets_a_refusal(gw: GatewayHandle, method: str) -> None:
    """`X-Gateway-Narrowing: refuse` (Traefik, Envoy: they cannot forward X-Authorized-Uri): what
    the ACL would narrow is refused, not allowed whole."""
    token = await gw.create_token(access={"type": 2, "acl": ACL})
    refuse = {"X-Gateway-Narrowing": "refuse"}
    narrowed = await ask(gw, method, ENDPOINT + "/gw/devices/all", key=token["key"], headers=refuse)
    assert narrowed.status == 403
    if method == "GET":
        assert narrowed.json() == error(403, "access to gw/devices/all (GET) is narrowed by token ACL, "
                                             "which the proxy cannot send")
    plain = await ask(gw, method, ENDPOINT + "/gw/devices/12,777", key=token["key"], headers=refuse)
    assert (plain.status, plain.header("X-Authorized-Uri")) == (200, "/gw/devices/12,777")
    unlimited = await ask(gw, method, ENDPOINT + "/gw/channels/all", key=token["key"], headers=refuse)
    assert (unlimited.status, unlimited.header("X-Authorized-Uri")) == (200, "/gw/channels/all")


async def test_refusals_carry_what_a_proxied_refusal_carries(gw: GatewayHandle) -> None:
    for reply in (await ask(gw, "GET", ENDPOINT + "/x", key=None), await ask(gw, "GET", ENDPOINT + "/x", key="B" * 64)):
        assert (reply.status, reply.json(), reply.header("WWW-Authenticate")) == (401, INVALID, CHALLENGE)
        assert reply.header("Content-Type") == "application/json" and reply.header("X-Request-ID")
        assert reply.header("X-Token-Id") is None
    async with gw.request("GET", "/x", key="B" * 64) as proxied:  # the same refusal, proxied
        assert (proxied.status, await proxied.json(), proxied.headers["WWW-Authenticate"]) == (401, INVALID, CHALLENGE)
    disabled = await gw.create_token(enabled=False)
    reply = await ask(gw, "GET", ENDPOINT + "/x", key=disabled["key"])
    assert (reply.status, reply.json()) == (401, error(401, "token is disabled"))


@pytest.mark.parametrize("headers, target", [
    ({}, ENDPOINT),  # no original URI at all
    ({}, ENDPOINT + "?x=1"),
    ({"X-Original-URI": "/gw/../platform/tokens"}, ENDPOINT),
    ({"X-Forwarded-Uri": "/gw/%2e%2e/platform"}, ENDPOINT),
    ({"X-Original-URI": "gw/devices"}, ENDPOINT),
    ({"X-Original-URI": "/gw/\u00e9"}, ENDPOINT),
    ({}, ENDPOINT + "/gw//devices"),
    ({"X-Original-URI": "/gw", "X-Original-Method": "G:T"}, ENDPOINT),
])
async def test_ambiguous_or_missing_original_is_refused(gw: GatewayHandle, headers: dict[str, str],
                                                        target: str) -> None:
    """The original URI passes the path rules of a proxied request (checked_path), or 400."""
    reply = await ask(gw, "GET", target, headers=headers)
    assert reply.status == 400, reply.body
    assert reply.json()["errors"][0]["code"] == 400
    assert reply.header("X-Token-Id") is None


async def test_handed_over_checks_answer_the_same(gw: GatewayHandle) -> None:
    """HEAD and HTTP/1.0 go to aiohttp: the same decision, the same headers."""
    token = await gw.create_token(access={"type": 2, "acl": ACL})
    lane = lane_of(gw)
    shapes = [("GET", "1.1"), ("HEAD", "1.1"), ("GET", "1.0")]
    answers = []
    for method, version in shapes:
        handed = lane.handed_over
        allowed = await ask(gw, method, ENDPOINT + "/gw/devices/all", key=token["key"], version=version)
        denied = await ask(gw, method, ENDPOINT + "/gw/devices/3", key=token["key"], version=version)
        missing = await ask(gw, method, ENDPOINT + "/gw/devices/3", key=None, version=version)
        assert lane.handed_over - handed == (0 if (method, version) == ("GET", "1.1") else 3)
        # (aiohttp says no Content-Length to a HEAD whose answer has no body; nor does it need one)
        allowed.headers = [(name, value) for name, value in allowed.headers
                           if method != "HEAD" or name.lower() != "content-length"]
        answers.append([(reply.status, identity(reply), reply.header("WWW-Authenticate"), reply.header("Content-Type"),
                         reply.header("Content-Length") or "0", bool(reply.header("X-Request-ID")))
                        for reply in (allowed, denied, missing)])
        if method == "GET":
            assert denied.json() == error(403, "access to gw/devices/3 (GET) is denied by token ACL")
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0][:2] == (200, {"X-Token-Id": str(token["id"]), "X-Account-Id": "0",
                                       "X-Authorized-Uri": "/gw/devices/12,777"})
    records = await log_records(gw, token["id"], 6)
    assert [r["method"] for r in records] == ["GET", "GET", "HEAD", "HEAD", "GET", "GET"]


async def test_untrusted_peer_cannot_claim_an_address(make_gateway: GatewayFactory) -> None:
    """X-Forwarded-For is believed only from trusted_proxies, as for proxied requests."""
    gw = await make_gateway(trusted_proxies=["10.9.9.9"], log={"flush_interval": 0.05})
    token = await gw.create_token(ips="127.0.0.2")
    reply = await ask(gw, "GET", ENDPOINT + "/x", key=token["key"], headers={"X-Forwarded-For": "127.0.0.2"})
    assert (reply.status, reply.json()) == (401, error(401, "using token from unauthorized location"))
    assert await logged_hosts(gw, token["id"], 1) == ["127.0.0.1"]


async def test_traefik_shape(make_gateway: GatewayFactory) -> None:
    """Traefik's ForwardAuth, as docs/decision.md configures it (Traefik cannot run here): a GET of
    the configured address with the client's allowed headers, `X-Forwarded-*` for the original
    request and its client, and `X-Gateway-Narrowing: refuse` (Traefik cannot forward a rewritten
    path)."""
    gw = await make_gateway(trusted_proxies=["127.0.0.1"], log={"flush_interval": 0.05})
    token = await gw.create_token(ips="10.1.2.0/24", access={"type": 2, "acl": ACL})
    traefik = {"X-Forwarded-Method": "GET", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.com",
               "X-Forwarded-Uri": "/gw/devices/12?fields=id", "X-Forwarded-For": "10.1.2.3",
               "X-Gateway-Narrowing": "refuse", "X-Flespi-App": "traefik-test"}
    allowed = await ask(gw, "GET", ENDPOINT, key=token["key"], headers=traefik)
    assert (allowed.status, allowed.body) == (200, b"")
    assert identity(allowed) == {"X-Token-Id": str(token["id"]), "X-Account-Id": "0",
                                 "X-Authorized-Uri": "/gw/devices/12?fields=id"}
    # `all` would be narrowed to the ACL's ids, which Traefik cannot pass on: refused instead.
    everything = {**traefik, "X-Forwarded-Uri": "/gw/devices/all"}
    narrowed = await ask(gw, "GET", ENDPOINT, key=token["key"], headers=everything)
    assert (narrowed.status, narrowed.json()) == (403, error(403, "access to gw/devices/all (GET) is narrowed by "
                                                                  "token ACL, which the proxy cannot send"))
    outside = await ask(gw, "GET", ENDPOINT, key=token["key"], headers={**traefik, "X-Forwarded-For": "10.9.9.9"})
    assert (outside.status, outside.json()) == (401, error(401, "using token from unauthorized location"))
    assert await logged_hosts(gw, token["id"], 3) == ["10.1.2.3", "10.1.2.3", "10.9.9.9"]


async def test_same_effects_as_a_proxied_request(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    """`accessed` advances, the request is logged, and the key is nowhere: not in the log file, not
    in the answer."""
    log_file = tmp_path / "requests.log"
    gw = await make_gateway(log={"path": str(log_file), "flush_interval": 0.05}, accessed_flush_interval=0.1)
    token = await gw.create_token()
    assert token["accessed"] == 0
    reply = await ask(gw, "GET", ENDPOINT, key=token["key"], headers={"X-Original-URI": "/data/7?q=1"})
    assert reply.status == 200
    deadline = time.monotonic() + 5
    while True:
        _, body = await gw.call("GET", f"/platform/tokens/{token['id']}")
        if body["result"][0]["accessed"] > 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert body["result"][0]["accessed"] >= int(time.time()) - 10
    while "/data/7" not in (log_file.read_text() if log_file.exists() else "") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    text = log_file.read_text()
    assert '"uri":"/data/7"' in text and '"method":"GET"' in text
    assert token["key"] not in text
    assert token["key"] not in repr(reply.headers)


async def test_usage_counts_and_blocks(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(usage={"window": 60, "flush_interval": 0.1})
    await room_in_window(8)  # the whole test must fit in one window
    account = await gw.call("POST", "/platform/subaccounts", json={"name": "limited", "limits": {"api_calls": 3}})
    cid = account[1]["result"][0]["id"]
    status, body = await gw.call("POST", "/platform/tokens", json={"ttl": 600}, headers={"x-flespi-cid": str(cid)})
    assert status == 200, body
    key = body["result"][0]["key"]
    statuses = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        reply = await ask(gw, "GET", ENDPOINT + "/x", key=key)
        statuses.append(reply.status)
        if reply.status == 429:
            break
        await asyncio.sleep(0.05)
    assert statuses[:3] == [200, 200, 200] and statuses[-1] == 429, statuses
    assert reply.json()["errors"][0]["reason"].startswith("token is blocked: ")
    assert reply.header("Retry-After")


# -- real proxies in front ------------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{config}
}}
"""

def documented(language: str) -> str:
    """The one configuration block of `language` in docs/decision.md: the tests run what the page
    says, so the two cannot drift apart."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", (ROOT / "docs" / "decision.md").read_text(), re.S | re.M)
    assert len(blocks) == 1, f"docs/decision.md should hold one {language} block, not {len(blocks)}"
    return blocks[0]


def on_loopback(config: str, replaced: dict[str, str]) -> str:
    """The documented addresses (gateway 127.0.0.1:8080, API 127.0.0.1:8000, the public listener)
    replaced by the test's free ports; each must be there."""
    for documented_text, actual in replaced.items():
        assert documented_text in config, documented_text
        config = config.replace(documented_text, actual)
    return config


class Proxy:
    """nginx or Caddy in the foreground, with a directory of its own, on a free port."""

    def __init__(self, kind: str, gateway_port: int, upstream_port: int) -> None:
        self.kind = kind
        self.prefix = Path(tempfile.mkdtemp(prefix=f"gw-{kind}-"))
        self.port = free_port()
        addresses = {"127.0.0.1:8080": f"127.0.0.1:{gateway_port}", "127.0.0.1:8000": f"127.0.0.1:{upstream_port}"}
        if kind == "nginx":
            config = on_loopback(documented("nginx"), {**addresses, "listen 80;": f"listen 127.0.0.1:{self.port};"})
            (self.prefix / "nginx.conf").write_text(NGINX_CONF.format(prefix=self.prefix, config=config))
        else:
            caddyfile = on_loopback(documented("caddyfile"), {**addresses, "http://api.example.com {":
                                                              f"http://127.0.0.1:{self.port} {{"})
            (self.prefix / "Caddyfile").write_text(caddyfile)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "nginx":
            return [nginx_binary(), "-p", str(self.prefix), "-e", str(self.prefix / "error.log"),
                    "-c", str(self.prefix / "nginx.conf")]
        return [caddy_binary(), "run", "--config", str(self.prefix / "Caddyfile"), "--adapter", "caddyfile"]

    def start(self) -> None:
        # Caddy keeps its state under XDG_*/HOME: this directory, not the user's.
        env = {**os.environ, "HOME": str(self.prefix), "XDG_DATA_HOME": str(self.prefix),
               "XDG_CONFIG_HOME": str(self.prefix)}
        log = (self.prefix / "output.log").open("wb")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_port(self.port)
        except AssertionError:
            raise AssertionError(f"{self.kind} did not start: {self.output()}") from None

    def output(self) -> str:
        return "".join(path.read_text() for path in (self.prefix / "output.log", self.prefix / "error.log")
                       if path.exists())

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None
        shutil.rmtree(self.prefix, ignore_errors=True)


def test_caddy_is_installed() -> None:
    version = subprocess.run([caddy_binary(), "version"], capture_output=True, text=True, timeout=10, check=False)
    assert version.returncode == 0 and version.stdout.lstrip("v").startswith("2."), version


@pytest.fixture(params=["nginx", "caddy"])
async def fronted(request: pytest.FixtureRequest, make_gateway: GatewayFactory, upstream: Upstream
                  ) -> AsyncIterator[tuple[GatewayHandle, Proxy]]:
    gw = await make_gateway(trusted_proxies=["127.0.0.1"], usage={"window": 60, "flush_interval": 0.1},
                            log={"flush_interval": 0.05})
    proxy = Proxy(request.param, gw.server.port or 0, int(upstream.url.rsplit(":", 1)[1]))
    proxy.start()
    yield gw, proxy
    proxy.stop()


class Clients:
    """GETs through the proxy from a chosen loopback address."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.sessions: dict[str, aiohttp.ClientSession] = {}

    async def get(self, key: str | None, path: str = "/via", address: str = "127.0.0.2",
                  headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        if address not in self.sessions:
            self.sessions[address] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"FlespiToken {key}"
        url = URL(self.proxy.url + path, encoded=True)  # sent as written, dot segments too
        async with self.sessions[address].request(method, url, headers=sent, allow_redirects=False) as reply:
            return reply.status, dict(reply.headers), await reply.read()

    async def close(self) -> None:
        for session in self.sessions.values():
            await session.close()


@pytest.fixture
async def via(fronted: tuple[GatewayHandle, Proxy]) -> AsyncIterator[Clients]:
    clients = Clients(fronted[1])
    yield clients
    await clients.close()


async def test_allowed_through_the_proxy(fronted: tuple[GatewayHandle, Proxy], via: Clients,
                                         upstream: Upstream) -> None:
    gw, proxy = fronted
    token = await gw.create_token(access={"type": 2, "acl": ACL})
    lane = lane_of(gw)
    fast, handed = lane.served_fast, lane.handed_over
    status, _, body = await via.get(token["key"], "/gw/devices/all/telemetry?x=1",
                                          headers={"X-Token-Id": "999", "X-Account-Id": "999"})
    assert status == 200, (body, proxy.output())
    seen = upstream.last
    assert seen.raw_path == "/gw/devices/12,777/telemetry?x=1"  # narrowed by the ACL
    assert seen.headers["x-token-id"] == [str(token["id"])]  # the client's own claim replaced
    assert seen.headers["x-account-id"] == ["0"]
    [request_id] = seen.headers["x-request-id"]
    assert "authorization" not in seen.headers and "x-authorized-uri" not in seen.headers
    assert token["key"] not in repr(seen.headers)
    assert (lane.served_fast - fast, lane.handed_over - handed) == (1, 0)  # the proxy's check took the fast path
    [record] = await log_records(gw, token["id"], 1)
    assert (record["method"], record["uri"], record["host"], record["request_id"]) == (
        "GET", "/gw/devices/all/telemetry", "127.0.0.2", request_id)


async def test_refusals_never_reach_the_upstream(fronted: tuple[GatewayHandle, Proxy], via: Clients,
                                                 upstream: Upstream) -> None:
    gw, proxy = fronted
    disabled = await gw.create_token(enabled=False)
    masked = await gw.create_token(ips="127.0.0.2")
    origins = await gw.create_token(origins=["https://app.example"])
    acl = await gw.create_token(access={"type": 2, "acl": ACL})
    cases = [
        (None, "/via", "127.0.0.2", {}, 401, "invalid or expired access token"),
        ("B" * 64, "/via", "127.0.0.2", {}, 401, "invalid or expired access token"),
        (disabled["key"], "/via", "127.0.0.2", {}, 401, "token is disabled"),
        # the proxy's X-Forwarded-For: the client is 127.0.0.3, whatever it writes itself
        (masked["key"], "/via", "127.0.0.3", {"X-Forwarded-For": "127.0.0.2"}, 401,
         "using token from unauthorized location"),
        (origins["key"], "/via", "127.0.0.2", {"Origin": "https://evil.example"}, 401,
         "using token from unauthorized origin"),
        (acl["key"], "/gw/devices/3", "127.0.0.2", {}, 403, "access to gw/devices/3 (GET) is denied by token ACL"),
        (acl["key"], "/gw/devices/12/commands", "127.0.0.2", {}, 403,
         "access to gw/devices/12/commands (GET) is denied by token ACL"),
        (MASTER_KEY, "/gw/%2e%2e/platform/tokens", "127.0.0.2", {}, 400, "invalid request path"),
        # a client naming another request in the headers its proxy does not set (nginx sets
        # X-Original-*, Caddy X-Forwarded-*): refused, whichever proxy passes them on
        (acl["key"], "/gw/devices/3", "127.0.0.2", {"X-Original-URI": "/gw/devices/12",
                                                   "X-Forwarded-Uri": "/gw/devices/12"}, 400, CONFLICT),
        (acl["key"], "DELETE /gw/devices/12", "127.0.0.2", {"X-Original-Method": "GET",
                                                           "X-Forwarded-Method": "GET"}, 400, CONFLICT),
    ]
    for key, target, address, headers, expected, reason in cases:
        method, _, path = target.rpartition(" ")
        status, reply_headers, body = await via.get(key, path, address, headers, method or "GET")
        if proxy.kind == "nginx" and expected == 400:
            assert status == 500, (path, status)  # auth_request: anything but 2xx/401/403 (docs say so)
        else:
            assert status == expected, (path, status, body, proxy.output())
        if expected == 401:
            assert reply_headers.get("WWW-Authenticate") == CHALLENGE
        if proxy.kind == "caddy":  # Caddy gives the client the gateway's own answer
            assert json.loads(body) == error(expected, reason)
    assert upstream.requests == []
    # and they are allowed from where, and with what, they may be used
    for key, address, headers in ((masked["key"], "127.0.0.2", {}),
                                  (origins["key"], "127.0.0.2", {"Origin": "https://app.example"}),
                                  (acl["key"], "127.0.0.2", {})):
        status, _, body = await via.get(key, "/gw/devices/12" if key == acl["key"] else "/via", address, headers)
        assert status == 200, body
    assert len(upstream.requests) == 3
    assert await logged_hosts(gw, masked["id"], 2) == ["127.0.0.3", "127.0.0.2"]


async def test_cors_through_the_proxy(fronted: tuple[GatewayHandle, Proxy], via: Clients,
                                      upstream: Upstream) -> None:
    """Preflights are the proxy's (no token to decide on); a real request's Origin is the token's."""
    gw, proxy = fronted
    token = await gw.create_token(origins=["https://app.example"])
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "PUT",
                 "Access-Control-Request-Headers": "authorization"}
    status, headers, _ = await via.get(None, "/via", headers=preflight, method="OPTIONS")
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "PUT" in headers["Access-Control-Allow-Methods"]
    assert upstream.requests == []
    status, headers, _ = await via.get(token["key"], "/via", headers={"Origin": "https://app.example"})
    assert status == 200
    if proxy.kind == "nginx":  # the configuration shares allowed replies (docs/decision.md)
        assert headers["Access-Control-Allow-Origin"] == "https://app.example"
    status, headers, _ = await via.get(token["key"], "/via", headers={"Origin": "https://evil.example"})
    assert status == 401 and "Access-Control-Allow-Origin" not in headers
    assert len(upstream.requests) == 1
    records = await log_records(gw, token["id"], 2)
    assert [(r["method"], r["status"]) for r in records] == [("GET", 200), ("GET", 401)]  # no preflight asked


async def test_usage_blocking_through_the_proxy(fronted: tuple[GatewayHandle, Proxy], via: Clients,
                                                upstream: Upstream) -> None:
    """429 reaches the client: Caddy passes the gateway's answer on, nginx maps it (error_page)."""
    gw, _ = fronted
    await room_in_window(8)
    account = await gw.call("POST", "/platform/subaccounts", json={"name": "limited", "limits": {"api_calls": 2}})
    cid = account[1]["result"][0]["id"]
    _, body = await gw.call("POST", "/platform/tokens", json={"ttl": 600}, headers={"x-flespi-cid": str(cid)})
    key = body["result"][0]["key"]
    statuses = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status, headers, _ = await via.get(key)
        statuses.append(status)
        if status == 429:
            break
        await asyncio.sleep(0.05)
    assert statuses[:2] == [200, 200] and statuses[-1] == 429, statuses
    assert headers.get("Retry-After")
    assert len(upstream.requests) == len(statuses) - 1
