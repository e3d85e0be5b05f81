"""Published flespi clients, unchanged but for their base URL, work against the gateway.

flespi's own JavaScript library (flespi-io-js) is not published to the package registries this
project can install from; `flespi` on PyPI is a thin REST client with the same request shape
(`Authorization: FlespiToken <key>`, JSON bodies, `{"result": [...]}` replies).
"""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import flespi_sdk
import pytest
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


async def test_flespi_python_client_session(gw: GatewayHandle) -> None:
    """A scripted session with every call the client has: login, subaccounts and tokens."""
    master = client_for(gw, MASTER_KEY)
    me = await asyncio.to_thread(master.get, "/platform/customer")
    assert me["code"] == 200 and me["message"]["result"][0]["id"] == 0
    made = await asyncio.to_thread(master.post, "/platform/subaccounts", [{"name": "client-made"}])
    assert made["code"] == 200, made
    account = made["message"]["result"][0]
    listed = await asyncio.to_thread(master.get, "/platform/subaccounts/name=client*")
    assert [item["id"] for item in listed["message"]["result"]] == [account["id"]]
    changed = await asyncio.to_thread(master.put, f"/platform/subaccounts/{account['id']}", {"metadata": {"k": "v"}})
    assert changed["message"]["result"][0]["metadata"] == {"k": "v"}
    tokens = await asyncio.to_thread(master.post, "/platform/tokens", [{"ttl": 60}, {"expire": 2 ** 31}])
    ids = [token["id"] for token in tokens["message"]["result"]]
    chosen = await asyncio.to_thread(master.get, "/platform/tokens/{ttl==60 || expire==2147483648}")
    assert [token["id"] for token in chosen["message"]["result"]] == ids
    refused = await asyncio.to_thread(master.put, f"/platform/tokens/{ids[0]}", {"ttl": "soon"})
    assert refused["code"] == 400 and refused["message"]["errors"][0]["field"] == "ttl"
    removed = await asyncio.to_thread(master.delete, f"/platform/tokens/{ids[0]},{ids[1]}")
    assert removed["message"]["result"] == [{"id": ids[0]}, {"id": ids[1]}]
    gone = await asyncio.to_thread(master.delete, f"/platform/subaccounts/{account['id']}")
    assert gone["message"]["result"] == [{"id": account["id"]}]


async def test_flespi_sdk_session(gw: GatewayHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """flespi-sdk (aiohttp), with only its base URL pointed at the gateway.

    It sends `X-Flespi-CID: <account id>` on every call after login and treats id 0 as "not
    set", so it logs in with a subaccount's master token: the root account (id 0) is the
    deployment operator's, and keeps its id (see CHANGELOG)."""
    def to_gateway(base_url: str | None = None, **kwargs: Any) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(gw.url, **kwargs)
    monkeypatch.setattr(flespi_sdk, "ClientSession", to_gateway)
    _, body = await gw.call("POST", "/platform/subaccounts", json={"name": "customer", "metadata": {"tier": "1"}})
    customer = body["result"][0]["id"]
    _, body = await gw.call("POST", "/platform/tokens", json={"ttl": 600, "access": {"type": 1}},
                            headers={"x-flespi-cid": str(customer)})
    key = body["result"][0]["key"]
    _, body = await gw.call("POST", "/platform/subaccounts", json=[{"name": "shop a"}, {"name": "shop b"}],
                            headers={"x-flespi-cid": str(customer)})
    shop_a, shop_b = (item["id"] for item in body["result"])

    account = await flespi_sdk.token_login(key)
    try:
        assert account.id == customer and account.name == "customer" and account.metadata == {"tier": "1"}
        shops = await account.subaccounts.list()
        assert sorted(shop.id for shop in shops) == [shop_a, shop_b]
        [found] = await account.subaccounts.list("{name == 'shop b'}")
        assert found.id == shop_b
        fetched = await account.subaccounts.get(shop_a)
        assert fetched.id == shop_a
        assert await fetched.get_name() == "shop a"
        await fetched.set_metadata_value("city", "Riga")  # GET then PUT /platform/customer as shop a
        assert await fetched.get_metadata_value("city", ignore_cache=True) == "Riga"
        with pytest.raises(flespi_sdk.FlespiException) as refused:  # metadata values are strings
            await fetched.set_metadata_value("region.city", "Riga")
        assert refused.value.status_code == 400 and [e.field for e in refused.value.errors] == ["metadata"]
        await account.set_metadata({"tier": "2"})
        assert await account.get_metadata() == {"tier": "2"}
    finally:
        await account.stop()
    _, body = await gw.call("GET", f"/platform/subaccounts/{shop_a}")
    assert body["result"][0]["metadata"] == {"city": "Riga"}
    root = await flespi_sdk.token_login(MASTER_KEY)  # the root account logs in, as id 0 ...
    try:
        assert root.id == 0
        with pytest.raises(ValueError, match="CID is not set"):  # ... which the SDK will not send
            await root.subaccounts.list()
    finally:
        await root.stop()
