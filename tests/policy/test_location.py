"""Where a token may be used from, seen by the real gateway from real loopback addresses.

Linux routes all of 127.0.0.0/8 to the loopback interface, so a client bound to 127.0.0.2 or
127.0.0.3 reaches the gateway on 127.0.0.1 as a genuinely different TCP peer.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from support.gateways import GatewayFactory, GatewayHandle, error, logged_hosts
from support.servers import Upstream

LOCATION = error(401, "using token from unauthorized location")
SPOOF = {"X-Forwarded-For": "127.0.0.2", "X-Real-IP": "127.0.0.2", "Forwarded": "for=127.0.0.2"}
ClientFrom = Callable[[str], aiohttp.ClientSession]


@pytest.fixture(params=["fast", "aiohttp"])
def front(request: pytest.FixtureRequest) -> str:
    """Every gateway here runs through both fronts (tests/conftest.py): the rules are one."""
    return str(request.param)


@pytest.fixture
async def client_from() -> AsyncIterator[ClientFrom]:
    """`client_from("127.0.0.2")`: a session whose connections leave from that address."""
    sessions: list[aiohttp.ClientSession] = []

    def make(address: str) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        await session.close()


async def call_from(session: aiohttp.ClientSession, gw: GatewayHandle, key: str, path: str = "/where",
                    headers: dict[str, str] | None = None) -> tuple[int, Any]:
    auth = {"Authorization": f"FlespiToken {key}", **(headers or {})}
    async with session.get(gw.url + path, headers=auth) as response:
        return response.status, await response.json(content_type=None)


async def test_token_for_one_address(gw: GatewayHandle, upstream: Upstream, client_from: ClientFrom) -> None:
    token = await gw.create_token(ips="127.0.0.2")
    assert await call_from(client_from("127.0.0.2"), gw, token["key"]) == (200, {"method": "GET", "path": "/where",
                                                                                "size": 0})
    assert upstream.last.headers["x-forwarded-for"] == ["127.0.0.2"]
    assert await call_from(client_from("127.0.0.3"), gw, token["key"]) == (401, LOCATION)
    assert len(upstream.requests) == 1
    assert await logged_hosts(gw, token["id"], 2) == ["127.0.0.2", "127.0.0.3"]


@pytest.mark.parametrize(("ips", "allowed"), [
    ("127.0.0.*", {"127.0.0.2", "127.0.0.3"}),
    ("127.0.0.?", {"127.0.0.2", "127.0.0.3"}),
    ("127.*.0.2", {"127.0.0.2"}),
    ("10.0.0.1, 127.0.0.3", {"127.0.0.3"}),
    ("127.0.0.2/32", {"127.0.0.2"}),
    ("127.0.0.0/30", {"127.0.0.2", "127.0.0.3"}),
    ("127.0.0.0/31", set()),
    ("127.0.1.0/24", set()),
    ("", {"127.0.0.2", "127.0.0.3"}),
])
async def test_masks_from_real_addresses(gw: GatewayHandle, client_from: ClientFrom, ips: str,
                                         allowed: set[str]) -> None:
    token = await gw.create_token(ips=ips)
    for address in ("127.0.0.2", "127.0.0.3"):
        status, body = await call_from(client_from(address), gw, token["key"])
        if address in allowed:
            assert status == 200, (address, body)
        else:
            assert (status, body) == (401, LOCATION), address


async def test_changing_ips_takes_effect_for_the_next_request(gw: GatewayHandle, client_from: ClientFrom) -> None:
    token = await gw.create_token(ips="127.0.0.2")
    client = client_from("127.0.0.3")
    assert (await call_from(client, gw, token["key"]))[0] == 401
    status, body = await gw.call("PUT", f"/platform/tokens/{token['id']}", json={"ips": "127.0.0.3"})
    assert status == 200, body
    deadline = time.monotonic() + 5
    while (await call_from(client, gw, token["key"]))[0] != 200:  # pub/sub invalidation, milliseconds
        assert time.monotonic() < deadline, "the new ips never applied"
        await asyncio.sleep(0.02)


async def test_untrusted_client_cannot_claim_another_address(gw: GatewayHandle, upstream: Upstream,
                                                              client_from: ClientFrom) -> None:
    token = await gw.create_token(ips="127.0.0.2")
    other = client_from("127.0.0.3")
    assert await call_from(other, gw, token["key"], headers=SPOOF) == (401, LOCATION)
    for name, value in SPOOF.items():
        assert await call_from(other, gw, token["key"], headers={name: value}) == (401, LOCATION), name
    assert upstream.requests == []
    assert set(await logged_hosts(gw, token["id"], 4)) == {"127.0.0.3"}


async def test_untrusted_client_headers_never_reach_upstream(gw: GatewayHandle, upstream: Upstream,
                                                              client_from: ClientFrom) -> None:
    token = await gw.create_token(ips="127.0.0.3")
    status, _ = await call_from(client_from("127.0.0.3"), gw, token["key"], headers=SPOOF)
    assert status == 200
    seen = upstream.last.headers
    assert seen["x-forwarded-for"] == ["127.0.0.3"]
    assert "x-real-ip" not in seen and "forwarded" not in seen


async def test_only_the_configured_proxy_is_trusted(make_gateway: GatewayFactory, upstream: Upstream,
                                                    client_from: ClientFrom) -> None:
    """With 127.0.0.4 trusted, the same header from 127.0.0.3 is ignored and from 127.0.0.4 believed."""
    gw = await make_gateway(trusted_proxies=["127.0.0.4"])
    token = await gw.create_token(ips="127.0.0.2")
    chain = {"X-Forwarded-For": "127.0.0.2"}
    assert await call_from(client_from("127.0.0.3"), gw, token["key"], headers=chain) == (401, LOCATION)
    status, _ = await call_from(client_from("127.0.0.4"), gw, token["key"], headers=chain)
    assert status == 200
    assert upstream.last.headers["x-forwarded-for"] == ["127.0.0.2, 127.0.0.4"]
    assert await logged_hosts(gw, token["id"], 2) == ["127.0.0.3", "127.0.0.2"]


async def test_master_token_is_bound_to_its_ips_too(gw: GatewayHandle, client_from: ClientFrom) -> None:
    master = await gw.create_token(access={"type": 1}, ips="127.0.0.2")
    status, _ = await call_from(client_from("127.0.0.2"), gw, master["key"], path="/auth/info")
    assert status == 200
    assert await call_from(client_from("127.0.0.3"), gw, master["key"], path="/auth/info") == (401, LOCATION)
