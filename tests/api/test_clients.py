"""A published flespi client, unchanged but for its base URL, works against the gateway.

flespi's own JavaScript library (flespi-io-js) is not published to the package registries this
project can install from; `flespi` on PyPI is a thin REST client with the same request shape
(`Authorization: FlespiToken <key>`, JSON bodies, `{"result": [...]}` replies).
"""
from __future__ import annotations

import asyncio

from flespi.rest import FlespiClient

from support.gateways import GatewayHandle
from support.keys import MASTER_KEY


def client_for(gw: GatewayHandle, key: str) -> FlespiClient:
    client = FlespiClient(key)
    client._url = gw.url  # the base URL is the one thing a user changes
    return client


async def test_flespi_python_client_manages_tokens(gw: GatewayHandle) -> None:
    master = client_for(gw, MASTER_KEY)
    created = await asyncio.to_thread(master.post, "/platform/tokens", [{"info": "from client", "ttl": 600}])
    assert created["code"] == 200, created
    token = created["message"]["result"][0]
    listed = await asyncio.to_thread(master.get, "/platform/tokens/all")
    assert token["id"] in [item["id"] for item in listed["message"]["result"]]
    updated = await asyncio.to_thread(master.put, f"/platform/tokens/{token['id']}", {"info": "renamed"})
    assert updated["message"]["result"][0]["info"] == "renamed"
    info = await asyncio.to_thread(client_for(gw, token["key"]).get, "/auth/info")
    assert info["message"]["result"][0]["id"] == token["id"]
    deleted = await asyncio.to_thread(master.delete, f"/platform/tokens/{token['id']}")
    assert deleted["code"] == 200
    refused = await asyncio.to_thread(client_for(gw, token["key"]).get, "/gw/devices/all")
    assert refused["error"] and refused["code"] == 401
    assert refused["message"] == {"errors": [{"code": 401, "reason": "invalid or expired access token"}]}


async def test_flespi_python_client_reaches_upstream(gw: GatewayHandle) -> None:
    token = await gw.create_token(access={"type": 0})
    reply = await asyncio.to_thread(client_for(gw, token["key"]).get, "/gw/devices/all")
    assert reply["code"] == 200 and reply["message"]["path"] == "/gw/devices/all"
