"""The tokens API (docs/api.md), with field-level errors that lose nothing."""
from __future__ import annotations

import time
from typing import Any

import pytest

from support.gateways import GatewayHandle, error


async def test_create_returns_key_once_and_get_never(gw: GatewayHandle) -> None:
    status, body = await gw.call("POST", "/platform/tokens", json=[{"ttl": 60, "info": "a"}, {"expire": 2 ** 31}])
    assert status == 200
    first, second = body["result"]
    assert len(first["key"]) == 64 and first["key"].isalnum() and first["key"] != second["key"]
    assert second["id"] == first["id"] + 1
    assert first["info"] == "a" and first["enabled"] is True and first["access"] == {"type": 0}
    assert abs(first["created"] - time.time()) < 5
    status, body = await gw.call("GET", f"/platform/tokens/{first['id']},{second['id']}")
    assert status == 200
    assert [r["id"] for r in body["result"]] == [first["id"], second["id"]]
    assert all("key" not in r and "digest" not in r for r in body["result"])


async def test_single_object_body_is_accepted(gw: GatewayHandle) -> None:
    status, body = await gw.call("POST", "/platform/tokens", json={"ttl": 10})
    assert status == 200 and len(body["result"]) == 1


async def test_keys_are_stored_only_as_digests(gw: GatewayHandle, redis_client: Any, key_prefix: str) -> None:
    token = await gw.create_token()
    keys = [k async for k in redis_client.scan_iter(match=key_prefix.replace("{", "\\{").replace("}", "\\}") + "*")]
    assert keys
    for name in keys:
        kind = (await redis_client.type(name)).decode()
        dump = repr(await redis_client.dump(name)) + repr(name)
        assert token["key"] not in dump, kind


async def test_get_all_and_fields(gw: GatewayHandle) -> None:
    token = await gw.create_token(info="fields")
    status, body = await gw.call("GET", "/platform/tokens/all", params={"fields": "id,info"})
    assert status == 200
    assert {"id": token["id"], "info": "fields"} in body["result"]
    assert all(set(r) == {"id", "info"} for r in body["result"])
    status, body = await gw.call("GET", "/platform/tokens/all", params={"fields": "id,key"})
    assert status == 400
    assert body["errors"][0]["field"] == "fields"


async def test_update_is_partial_and_validated(gw: GatewayHandle) -> None:
    token = await gw.create_token(info="before", ttl=100)
    status, body = await gw.call("PUT", f"/platform/tokens/{token['id']}", json={"info": "after"})
    assert status == 200
    assert body["result"][0]["info"] == "after" and body["result"][0]["ttl"] == 100
    status, body = await gw.call("PUT", f"/platform/tokens/{token['id']}", json={"ttl": 0})
    assert status == 400
    assert body["errors"][0]["field"] == "ttl"
    status, body = await gw.call("GET", f"/platform/tokens/{token['id']}")
    assert body["result"][0]["ttl"] == 100


async def test_delete(gw: GatewayHandle) -> None:
    token = await gw.create_token()
    assert await gw.call("DELETE", f"/platform/tokens/{token['id']}") == (200, {"result": [{"id": token["id"]}]})
    assert await gw.call("GET", f"/platform/tokens/{token['id']}") == (200, {"result": []})


@pytest.mark.parametrize(("item", "fields"), [
    ({}, ["ttl"]),
    ({"ttl": 0, "expire": 0}, ["ttl"]),
    ({"ttl": -1}, ["ttl"]),
    ({"ttl": "10"}, ["ttl"]),
    ({"ttl": True}, ["ttl"]),
    ({"ttl": 10, "expire": 1.5}, ["expire"]),
    ({"ttl": 10, "enabled": "yes"}, ["enabled"]),
    ({"ttl": 10, "info": 5}, ["info"]),
    ({"ttl": 10, "metadata": {"a": 1}}, ["metadata"]),
    ({"ttl": 10, "access": {"type": 7}}, ["access.type"]),
    ({"ttl": 10, "access": {"type": 2}}, ["access.acl"]),
    ({"ttl": 10, "access": {"type": 0, "acl": []}}, ["access.acl"]),
    ({"ttl": 10, "ips": 5}, ["ips"]),
    ({"ttl": 10, "bogus": 1}, ["bogus"]),
    ({"ttl": 10, "id": 5, "key": "x", "created": 1}, ["id", "key", "created"]),
    ({"ttl": "x", "enabled": 1, "wrong": 2}, ["wrong", "enabled", "ttl"]),
])
async def test_invalid_input_names_every_field(gw: GatewayHandle, item: dict[str, Any], fields: list[str]) -> None:
    before = (await gw.call("GET", "/platform/tokens/all", params={"fields": "id"}))[1]["result"]
    status, body = await gw.call("POST", "/platform/tokens", json=[{"ttl": 5}, item])
    assert status == 400
    assert sorted(e["field"] for e in body["errors"]) == sorted(fields)
    assert all(e["code"] == 400 and e["reason"] and e["index"] == 1 for e in body["errors"])
    after = (await gw.call("GET", "/platform/tokens/all", params={"fields": "id"}))[1]["result"]
    assert after == before  # nothing half-created


@pytest.mark.parametrize("body", [b"{", b"[1]", b'"x"', b"null"])
async def test_malformed_bodies(gw: GatewayHandle, body: bytes) -> None:
    status, reply = await gw.call("POST", "/platform/tokens", data=body)
    assert status == 400
    assert reply["errors"][0]["code"] == 400


@pytest.mark.parametrize("selector", ["abc", "1,x", "0", "-1", "1,,2", "bogus=x"])
async def test_bad_selector(gw: GatewayHandle, selector: str) -> None:
    status, body = await gw.call("GET", f"/platform/tokens/{selector}")
    assert status == 400
    assert body["errors"][0]["field"] == "selector"


async def test_api_needs_master(gw: GatewayHandle) -> None:
    token = await gw.create_token(access={"type": 0})
    for method in ("GET", "POST", "PUT", "DELETE"):
        status, body = await gw.call(method, "/platform/tokens/all", key=token["key"])
        assert status == 403, method
        assert "denied" in body["errors"][0]["reason"]


async def test_method_not_allowed(gw: GatewayHandle) -> None:
    assert (await gw.call("POST", "/platform/tokens/1"))[0] == 405
    assert (await gw.call("PATCH", "/platform/tokens"))[0] == 405
    assert (await gw.call("POST", "/auth/info"))[0] == 405


async def test_error_shape(gw: GatewayHandle) -> None:
    refused = error(405, "method POST is not allowed on /platform/tokens/1")
    assert await gw.call("POST", "/platform/tokens/1") == (405, refused)
