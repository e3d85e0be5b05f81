"""ACLs through the real gateway: what the recording upstream receives is the oracle."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from support.gateways import GatewayFactory, GatewayHandle
from support.keys import MASTER_KEY
from support.servers import ROOT, Upstream

DEVICES_ACL = [
    {"uri": "gw/devices", "methods": ["GET", "PUT"], "ids": [12, 777],
     "submodules": [{"name": "messages", "methods": ["GET"]},
                    {"name": "settings", "methods": ["GET", "PUT", "DELETE"]}]},
    {"uri": "gw/channels", "methods": ["GET", "POST"], "ids": "all"},
    {"uri": "gw/calcs", "methods": ["GET"], "ids": [5]},
    {"uri": "gw/calcs", "methods": ["DELETE"], "ids": [6]},
]


@pytest.fixture(params=["fast", "aiohttp"])
def front(request: pytest.FixtureRequest) -> str:
    """Every gateway here runs through both fronts (tests/conftest.py): the rules are one."""
    return str(request.param)


def denied(what: str, method: str) -> tuple[int, dict[str, Any]]:
    return 403, {"errors": [{"code": 403, "reason": f"access to {what} ({method}) is denied by token ACL"}]}


@pytest.fixture
async def acl_token(gw: GatewayHandle) -> dict[str, Any]:
    return await gw.create_token(access={"type": 2, "acl": DEVICES_ACL})


@pytest.mark.parametrize(("method", "path", "forwarded"), [
    ("GET", "/gw/devices/12", "/gw/devices/12"),
    ("HEAD", "/gw/devices/12", "/gw/devices/12"),
    ("PUT", "/gw/devices/777", "/gw/devices/777"),
    ("PATCH", "/gw/devices/777", "/gw/devices/777"),
    ("GET", "/gw/devices/12,777", "/gw/devices/12,777"),
    ("GET", "/gw/devices/all", "/gw/devices/12,777"),
    ("GET", "/gw/devices/all/messages?data=%7B%7D", "/gw/devices/12,777/messages?data=%7B%7D"),
    ("GET", "/gw/devices/12/messages", "/gw/devices/12/messages"),
    ("DELETE", "/gw/devices/12/settings/a", "/gw/devices/12/settings/a"),
    ("GET", "/gw/channels/all", "/gw/channels/all"),
    ("GET", "/gw/channels/name=x", "/gw/channels/name=x"),
    ("POST", "/gw/channels", "/gw/channels"),
    ("GET", "/gw/channels/3/anything/below", "/gw/channels/3/anything/below"),
    ("GET", "/gw/calcs/5", "/gw/calcs/5"),
    ("DELETE", "/gw/calcs/6", "/gw/calcs/6"),
])
async def test_granted(gw: GatewayHandle, upstream: Upstream, acl_token: dict[str, Any], method: str, path: str,
                       forwarded: str) -> None:
    async with gw.request(method, path, key=acl_token["key"]) as response:
        assert response.status == 200, await response.text()
    assert upstream.last.method == method and upstream.last.raw_path == forwarded


@pytest.mark.parametrize(("method", "path", "what"), [
    ("GET", "/gw/devices/13", "gw/devices/13"),
    ("GET", "/gw/devices/12,13", "gw/devices/12,13"),
    ("DELETE", "/gw/devices/12", "gw/devices/12"),
    ("POST", "/gw/devices", "gw/devices"),
    ("GET", "/gw/devices", "gw/devices"),
    ("GET", "/gw/devices/name=x", "gw/devices/name=x"),
    ("GET", "/gw/devices/{id>1}", "gw/devices/{id>1}"),
    ("PUT", "/gw/devices/12/messages", "gw/devices/12/messages"),
    ("GET", "/gw/devices/12/telemetry", "gw/devices/12/telemetry"),
    ("DELETE", "/gw/channels/1", "gw/channels/1"),
    ("GET", "/gw/calcs/6", "gw/calcs/6"),
    ("DELETE", "/gw/calcs/5", "gw/calcs/5"),
    ("GET", "/gw/streams/1", "gw/streams/1"),
    ("GET", "/platform/tokens", "platform/tokens"),
    ("OPTIONS", "/gw/devices/12", "gw/devices/12"),
])
async def test_denied(gw: GatewayHandle, upstream: Upstream, acl_token: dict[str, Any], method: str, path: str,
                      what: str) -> None:
    reported = {"PATCH": "PUT", "HEAD": "GET"}.get(method, method)
    assert await gw.call(method, path, key=acl_token["key"]) == denied(what, reported)
    assert not [r for r in upstream.requests if r.headers.get("x-token-id") == [str(acl_token["id"])]]


@pytest.mark.parametrize(("acl", "field"), [
    ([{"uri": "gw/devices", "methods": ["FETCH"]}], "access.acl[0].methods"),
    ([{"uri": "gw/devices", "methods": ["GET"], "ids": [1, "2"]}], "access.acl[0].ids"),
    ([{"uri": "", "methods": ["GET"]}], "access.acl[0].uri"),
    ([{"uri": "platform/tokens", "methods": ["GET"]}], "access.acl[0].uri"),
    ([{"uri": "mqtt", "topic": "flespi/message/gw/devices/1", "actions": ["subscribe"]}], "access.acl[0].topic"),
    ("not a list", "access.acl"),
])
async def test_invalid_acl_refused_with_field(gw: GatewayHandle, acl: Any, field: str) -> None:
    status, body = await gw.call("POST", "/platform/tokens", json=[{"ttl": 60, "access": {"type": 2, "acl": acl}}])
    assert status == 400
    assert field in [error["field"] for error in body["errors"]]


async def test_in_groups(gw: GatewayHandle, upstream: Upstream, redis_client: Any, key_prefix: str) -> None:
    await redis_client.sadd(f"{key_prefix}group:7:gw/devices", 100, 101)
    await redis_client.sadd(f"{key_prefix}group:8:gw/devices", 200)
    token = await gw.create_token(access={"type": 2, "acl": [
        {"uri": "gw/groups", "methods": ["GET"], "ids": [7]},
        {"uri": "gw/devices", "methods": ["GET"], "ids": "in-groups"}]})
    assert (await gw.call("GET", "/gw/devices/101", key=token["key"]))[0] == 200
    assert (await gw.call("GET", "/gw/devices/all", key=token["key"]))[0] == 200
    assert upstream.last.raw_path == "/gw/devices/100,101"
    assert (await gw.call("GET", "/gw/devices/200", key=token["key"])) == denied("gw/devices/200", "GET")


async def test_uri_mapping_for_another_api(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(acl={"uri_patterns": {"orders": "/api/v2/orders/{selector}/{submodule}"}})
    token = await gw.create_token(access={"type": 2, "acl": [
        {"uri": "orders", "methods": ["GET"], "ids": [1, 2], "submodules": [{"name": "lines", "methods": ["GET"]}]}]})
    assert (await gw.call("GET", "/api/v2/orders/all/lines", key=token["key"]))[0] == 200
    assert upstream.last.raw_path == "/api/v2/orders/1,2/lines"
    assert (await gw.call("GET", "/api/v2/orders/3", key=token["key"])) == denied("api/v2/orders/3", "GET")
    assert (await gw.call("GET", "/api/v2/orders/1/notes", key=token["key"])) == denied("api/v2/orders/1/notes", "GET")


@pytest.mark.parametrize(("template", "allowed", "refused"), [
    ("toolbox", ["/gw/devices/12345", "/gw/devices/12345/telemetry/all"], ["/gw/devices/1", "PUT /gw/devices/12345"]),
    ("setbox", ["PUT /gw/devices/12345/settings/x"], ["/gw/devices/12345/messages"]),
    ("trackit", ["/gw/devices/12345/messages"], ["/gw/devices/12345/settings", "/gw/devices/12346/messages"]),
    ("support", ["/gw/devices/12345/logs"], ["DELETE /gw/devices/12345"]),
    ("mqtt-messages", ["/gw/devices/12345/messages"], ["/gw/devices/12345/telemetry"]),
])
async def test_templates_via_api(gw: GatewayHandle, template: str, allowed: list[str], refused: list[str]) -> None:
    status, body = await gw.call("POST", "/platform/tokens",
                                 json=[{"ttl": 600, "template": {"name": template, "item": 12345}}])
    assert status == 200, body
    token = body["result"][0]
    assert token["access"]["type"] == 2
    for spec, expected in [(s, 200) for s in allowed] + [(s, 403) for s in refused]:
        method, _, path = spec.rpartition(" ")
        assert (await gw.call(method or "GET", path, key=token["key"]))[0] == expected, spec


async def test_support_template_expires(gw: GatewayHandle) -> None:
    token = (await gw.call("POST", "/platform/tokens", json={"template": {"name": "support", "item": 9}}))[1]
    assert token["result"][0]["expire"] > 0 and token["result"][0]["ttl"] == 0


async def test_bad_template(gw: GatewayHandle) -> None:
    status, body = await gw.call("POST", "/platform/tokens", json={"ttl": 5, "template": {"name": "nope", "item": 0}})
    assert status == 400
    assert sorted(e["field"] for e in body["errors"]) == ["template.item", "template.name"]


async def test_template_from_cli(gw: GatewayHandle, upstream: Upstream, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"upstream": upstream.url}))
    command = [sys.executable, "-m", "gateway", "--config", str(config), "token", "create", "--template", "trackit",
               "--item", "12345", "--ttl", "7d", "--url", gw.url, "--json"]
    result = await asyncio.to_thread(subprocess.run, command, cwd=ROOT, capture_output=True, text=True, timeout=30,
                                     env={**os.environ, "GATEWAY_MASTER_TOKEN": MASTER_KEY})
    assert result.returncode == 0, result.stderr
    [token] = orjson.loads(result.stdout)["result"]
    assert token["ttl"] == 7 * 86400 and len(token["key"]) == 64
    assert (await gw.call("GET", "/gw/devices/12345/messages", key=token["key"]))[0] == 200
    assert (await gw.call("GET", "/gw/devices/12345/settings", key=token["key"]))[0] == 403


# Encodings of the path segments of a path that is not granted.
def encodings(segment: str) -> st.SearchStrategy[str]:
    def encode(chars: list[tuple[str, int]]) -> str:
        out = []
        for char, how in chars:
            if how == 0:
                out.append(char)
            elif how == 1:
                out.append(f"%{ord(char):02X}")
            elif how == 2:
                out.append(f"%{ord(char):02x}")
            else:
                out.append(f"%25{ord(char):02X}")
        return "".join(out)
    return st.lists(st.sampled_from(range(4)), min_size=len(segment), max_size=len(segment)).map(
        lambda hows: encode(list(zip(segment, hows, strict=True))))


SHARED: dict[int, tuple[GatewayHandle, dict[str, Any]]] = {}
TRICKS = st.sampled_from(["{}", "/./{}", "/../gw/devices/1/../{}", "//{}", "/{};x=1", "/%2e/{}", "/{}%00", "/{}/.",
                          "/{}%2f", "/gw/devices/1/..%2f{}"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(["gw/devices/3", "gw/devices/3/settings", "platform/tokens", "gw/streams/1",
                               "gw/devices/1/settings"]), trick=TRICKS, data=st.data())
async def test_no_encoding_of_an_ungranted_path_gets_through(make_gateway: GatewayFactory, upstream: Upstream,
                                                             target: str, trick: str, data: Any) -> None:
    # One gateway for all examples of this run: hypothesis calls the test many times with one fixture.
    if id(make_gateway) not in SHARED:
        gw = await make_gateway()
        acl = [{"uri": "gw/devices", "methods": ["GET"], "ids": [1, 2],
                "submodules": [{"name": "messages", "methods": ["GET"]}]}]
        token = await gw.create_token(access={"type": 2, "acl": acl})
        SHARED.clear()
        SHARED[id(make_gateway)] = (gw, token)
    gw, token = SHARED[id(make_gateway)]
    encoded = "/".join(data.draw(encodings(part)) for part in target.split("/"))
    path = trick.format(encoded)
    path = path if path.startswith("/") else "/" + path
    before = len(upstream.requests)
    async with gw.session.get(URL(gw.url + path, encoded=True),
                              headers={"Authorization": f"FlespiToken {token['key']}"}) as response:
        assert response.status in (400, 403), (path, response.status)
    assert len(upstream.requests) == before, path


@pytest.mark.parametrize("name", [{"a": 1}, ["trackit"], 5, None])
async def test_template_name_of_any_type_is_a_400(gw: GatewayHandle, name: Any) -> None:
    status, body = await gw.call("POST", "/platform/tokens", json={"ttl": 5, "template": {"name": name, "item": 1}})
    assert status == 400 and [e["field"] for e in body["errors"]] == ["template.name"]
