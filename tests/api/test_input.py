"""The API's input at its edges: integer fields take integers only, a JSON key is written once,
repeated ids count once, oversized bodies and numbers are refused in flespi's error shape."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from support.gateways import GatewayFactory, GatewayHandle, error

HUGE = "1" + "0" * 4999  # past Python's int-string conversion limit (4300 digits)


async def token_ids(gw: GatewayHandle) -> list[int]:
    status, body = await gw.call("GET", "/platform/tokens/all", params={"fields": "id"})
    assert status == 200, body
    return [record["id"] for record in body["result"]]


@pytest.mark.parametrize(("item", "field"), [
    ({"ttl": 10, "access": {"type": 1.0}}, "access.type"),
    ({"ttl": 10, "access": {"type": 0.0}}, "access.type"),
    ({"ttl": 10, "access": {"type": True}}, "access.type"),
    ({"ttl": 10, "access": {"type": False}}, "access.type"),
    ({"ttl": 10.0}, "ttl"),
    ({"ttl": False, "expire": 2 ** 31}, "ttl"),
    ({"expire": 2.0 ** 31}, "expire"),
    ({"expire": True}, "expire"),
    ({"ttl": 10, "access": {"type": 2, "acl": [{"uri": "gw/devices", "methods": ["GET"], "ids": [1.0]}]}},
     "access.acl[0].ids"),
    ({"ttl": 10, "access": {"type": 2, "acl": [{"uri": "gw/devices", "methods": ["GET"], "ids": [True]}]}},
     "access.acl[0].ids"),
    ({"ttl": 10, "template": {"name": "trackit", "item": 5.0}}, "template.item"),
    ({"ttl": 10, "template": {"name": "trackit", "item": True}}, "template.item"),
])
async def test_integer_token_fields_refuse_floats_and_booleans(gw: GatewayHandle, item: dict[str, Any],
                                                              field: str) -> None:
    before = await token_ids(gw)
    status, body = await gw.call("POST", "/platform/tokens", json=[item])
    assert status == 400, body
    assert [e["field"] for e in body["errors"]] == [field]
    assert await token_ids(gw) == before
    if "template" not in item:  # a change is held to the same rules
        token = await gw.create_token(info="kept")
        status, body = await gw.call("PUT", f"/platform/tokens/{token['id']}",
                                     json={k: v for k, v in item.items() if k != "ttl" or field == "ttl"})
        assert status == 400 and [e["field"] for e in body["errors"]] == [field], body


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "a", "limits": {"api_calls": 10.0}}, "limits.api_calls"),
    ({"name": "a", "limits": {"traffic": True}}, "limits.traffic"),
])
async def test_integer_account_fields_refuse_floats_and_booleans(gw: GatewayHandle, body: dict[str, Any],
                                                                field: str) -> None:
    status, reply = await gw.call("POST", "/platform/subaccounts", json=body)
    assert status == 400 and [e["field"] for e in reply["errors"]] == [field], reply


@pytest.mark.parametrize("grace", [1.0, True, int(HUGE[:30])])
async def test_rotation_grace_is_a_whole_number(gw: GatewayHandle, grace: Any) -> None:
    token = await gw.create_token()
    status, body = await gw.call("POST", f"/platform/tokens/{token['id']}/rotate", json={"grace": grace})
    assert status == 400 and [e["field"] for e in body["errors"]] == ["grace"], body


@pytest.mark.parametrize(("data", "field"), [
    ({"count": 2.0}, "data.count"), ({"count": True}, "data.count"), ({"token_id": 1.0}, "data.token_id"),
])
async def test_integer_options_refuse_floats_and_booleans(gw: GatewayHandle, data: dict[str, Any],
                                                         field: str) -> None:
    status, body = await gw.call("GET", "/platform/logs", params={"data": orjson.dumps(data).decode()})
    assert status == 400 and [e["field"] for e in body["errors"]] == [field], body


async def test_repeated_ids_are_taken_once(gw: GatewayHandle) -> None:
    first, second = await gw.create_token(info="a"), await gw.create_token(info="b")
    a, b = first["id"], second["id"]
    status, body = await gw.call("GET", f"/platform/tokens/{a},{b},{a},{a}", params={"fields": "id"})
    assert (status, body) == (200, {"result": [{"id": a}, {"id": b}]})
    status, body = await gw.call("PUT", f"/platform/tokens/{b},{b}", json={"info": "once"})
    assert status == 200 and [record["id"] for record in body["result"]] == [b]
    status, body = await gw.call("DELETE", f"/platform/tokens/{a},{a}")
    assert (status, body) == (200, {"result": [{"id": a}]})
    status, body = await gw.call("GET", f"/platform/recycle-bin/tokens/{a},{a}", params={"fields": "id"})
    assert (status, body) == (200, {"result": [{"id": a}]})
    status, body = await gw.call("POST", f"/platform/recycle-bin/tokens/{a},{a}/restore")
    assert status == 200 and [record["id"] for record in body["result"]] == [a]
    status, body = await gw.call("POST", "/platform/subaccounts", json={"name": "twice"})
    account = body["result"][0]["id"]
    status, body = await gw.call("GET", f"/platform/subaccounts/{account},{account}", params={"fields": "id"})
    assert (status, body) == (200, {"result": [{"id": account}]})


@pytest.mark.parametrize(("raw", "field", "index"), [
    (b'{"ttl": 60, "info": "a", "ttl": 0}', "ttl", None),
    (b'[{"ttl": 60}, {"ttl": 60, "access": {"type": 0, "type": 1}}]', "access.type", 1),
    (b'{"ttl": 60, "metadata": {"owner": "a", "owner": "b"}}', "metadata.owner", None),
    (b'{"ttl": 60, "access": {"type": 2, "acl": [{"uri": "gw/devices", "methods": ["GET"],'
     b' "uri": "gw/calcs"}]}}', "access.acl[0].uri", None),
])
async def test_a_repeated_key_is_refused_and_nothing_made(gw: GatewayHandle, raw: bytes, field: str,
                                                         index: int | None) -> None:
    before = await token_ids(gw)
    status, body = await gw.call("POST", "/platform/tokens", data=raw, headers={"Content-Type": "application/json"})
    key = field.rsplit(".", 1)[-1].split("]")[-1]
    problem: dict[str, Any] = {"code": 400, "field": field,
                               "reason": f"key '{key}' appears more than once in the request body"}
    if index is not None:
        problem["index"] = index
    assert (status, body) == (400, {"errors": [problem]})
    assert await token_ids(gw) == before


async def test_a_repeated_key_in_a_change_or_an_option_is_refused(gw: GatewayHandle) -> None:
    token = await gw.create_token(info="before")
    status, body = await gw.call("PUT", f"/platform/tokens/{token['id']}", data=b'{"info": "x", "info": "y"}')
    assert status == 400 and [e["field"] for e in body["errors"]] == ["info"], body
    status, body = await gw.call("GET", f"/platform/tokens/{token['id']}", params={"fields": "info"})
    assert body == {"result": [{"info": "before"}]}
    status, body = await gw.call("POST", "/platform/subaccounts", data=b'{"name": "a", "name": "b"}')
    assert status == 400 and [e["field"] for e in body["errors"]] == ["name"], body
    status, body = await gw.call("GET", "/platform/logs", params={"data": '{"count": 1, "count": 5}'})
    assert (status, body) == (400, {"errors": [{"code": 400, "field": "data.count",
                                                "reason": "key 'count' appears more than once in 'data'"}]})


async def test_same_key_in_different_objects_is_no_repetition(gw: GatewayHandle) -> None:
    raw = b'[{"ttl": 60, "metadata": {"ttl": "x"}}, {"ttl": 60, "metadata": {"ttl": "y"}}]'
    status, body = await gw.call("POST", "/platform/tokens", data=raw)
    assert status == 200 and [record["metadata"] for record in body["result"]] == [{"ttl": "x"}, {"ttl": "y"}]


async def test_chunked_api_body_over_the_limit_is_413(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(limits={"api_body_size": 2000})

    async def pieces() -> AsyncIterator[bytes]:  # no Content-Length: the size is known only by reading
        yield b'[{"ttl": 60, "info": "'
        for _ in range(5):
            yield b"i" * 500
        yield b'"}]'
    before = await token_ids(gw)
    status, body = await gw.call("POST", "/platform/tokens", data=pieces())
    assert (status, body) == (413, error(413, "request body larger than 2000 bytes"))
    assert await token_ids(gw) == before


@pytest.mark.parametrize("selector", [
    HUGE, f"1,{HUGE}", f"{{id=={HUGE}}}", f"{{id=={HUGE[:4000]}}}", f"1,cid={HUGE[:4000]}", f"{HUGE[:4000]}",
    f"{{ttl>{HUGE[:40]}}}", f"{{ttl>{HUGE[:40]}.5}}", f"{{ttl>1e{HUGE[:400]}}}",
])
async def test_huge_numbers_in_a_selector_are_400(gw: GatewayHandle, selector: str) -> None:
    for collection in ("tokens", "subaccounts", "recycle-bin/tokens"):
        status, body = await gw.call("GET", f"/platform/{collection}/{selector}")
        assert status == 400 and [e["field"] for e in body["errors"]] == ["selector"], (collection, body)


@pytest.mark.parametrize("raw", [
    f'{{"ttl": {HUGE}}}', f'{{"ttl": 60, "access": {{"type": {HUGE}}}}}', f'{{"expire": -{HUGE}}}',
    f'[{{"ttl": 60, "template": {{"name": "trackit", "item": {HUGE}}}}}]', f'{{"ttl": {HUGE}.0}}',
    f'{{"ttl": 60, "access": {{"type": 2, "acl": [{{"uri": "gw/devices", "methods": ["GET"], "ids": [{HUGE}]}}]}}}}',
    '{"ttl": 100000000000000000000}', '{"ttl": 60, "access": {"type": 10000000000000000001}}',
])
async def test_huge_numbers_in_a_body_are_400(gw: GatewayHandle, raw: str) -> None:
    before = await token_ids(gw)
    status, body = await gw.call("POST", "/platform/tokens", data=raw.encode())
    assert status == 400 and body["errors"][0]["code"] == 400, body
    assert await token_ids(gw) == before


async def test_huge_numbers_in_options_are_400(gw: GatewayHandle) -> None:
    for data in (f'{{"count": {HUGE}}}', f'{{"from": {HUGE}}}', f'{{"token_id": {HUGE[:25]}}}'):
        status, body = await gw.call("GET", "/platform/logs", params={"data": data})
        assert status == 400 and body["errors"][0]["field"].startswith("data"), body
        status, body = await gw.call("GET", "/platform/tokens/all/logs", params={"data": data})
        assert status == 400 and body["errors"][0]["field"].startswith("data"), body
