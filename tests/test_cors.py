"""CORS through the real gateway: preflights answered from the configuration, replies shared per token."""
from __future__ import annotations

from typing import Any

import pytest
from conftest import GatewayFactory, GatewayHandle, Upstream, error, free_port
from multidict import CIMultiDictProxy
from yarl import URL

from gateway.config import ConfigError, build_settings

APP = "http://app.gw.example:8000"
OTHER = "http://evil.example:8000"
PREFLIGHT = {"Origin": APP, "Access-Control-Request-Method": "PUT",
             "Access-Control-Request-Headers": "authorization, x-flespi-cid, x-flespi-app, content-type"}
ALLOW_HEADERS = ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials", "Access-Control-Expose-Headers",
                 "Access-Control-Allow-Methods", "Access-Control-Allow-Headers", "Access-Control-Max-Age")


def listed(headers: CIMultiDictProxy[str], name: str) -> set[str]:
    return {item.strip().lower() for value in headers.getall(name, ()) for item in value.split(",") if item.strip()}


def assert_not_shared(headers: CIMultiDictProxy[str]) -> None:
    present = [name for name in ALLOW_HEADERS if name in headers]
    assert present == [], f"a refused reply must not be readable by the page: {present}"


async def preflight(gw: GatewayHandle, path: str = "/gw/devices/1", **headers: str) -> tuple[int, Any, Any]:
    async with gw.request("OPTIONS", path, key=None, headers={**PREFLIGHT, **headers}) as response:
        return response.status, response.headers, await response.read()


# -- preflight ----------------------------------------------------------------------------------

async def test_preflight_answered_by_gateway_without_token(gw: GatewayHandle, upstream: Upstream) -> None:
    status, headers, body = await preflight(gw)
    assert status == 200, body
    assert headers["Access-Control-Allow-Origin"] == APP
    assert listed(headers, "Access-Control-Allow-Methods") == {"put"}
    assert listed(headers, "Access-Control-Allow-Headers") == {"authorization", "x-flespi-cid", "x-flespi-app",
                                                               "content-type"}
    assert headers["Access-Control-Max-Age"] == "600"
    assert "origin" in listed(headers, "Vary")
    assert "Access-Control-Allow-Credentials" not in headers
    assert len(headers["X-Request-ID"]) == 32
    assert upstream.requests == []


async def test_preflight_for_any_path_and_the_internal_prefix(gw: GatewayHandle, upstream: Upstream) -> None:
    for path in ("/", "/platform/tokens/all", "/_gateway/health", "/a/../b"):
        status, headers, _ = await preflight(gw, path)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == APP, path
    assert upstream.requests == []


@pytest.mark.parametrize(("headers", "named"), [
    ({"Access-Control-Request-Headers": "authorization, x-secret"}, "X-SECRET"),
    ({"Access-Control-Request-Method": "PROPFIND"}, "'PROPFIND'"),
    ({"Origin": ""}, "origin header"),
])
async def test_preflight_refusals_are_json_and_unreadable(gw: GatewayHandle, upstream: Upstream,
                                                          headers: dict[str, str], named: str) -> None:
    merged = {**PREFLIGHT, **headers}
    if not merged["Origin"]:
        del merged["Origin"]
    async with gw.request("OPTIONS", "/gw/devices", key=None, headers=merged) as response:
        body = await response.json()
        assert response.status == 403
        assert_not_shared(response.headers)
    [problem] = body["errors"]
    assert problem["code"] == 403 and problem["reason"].startswith("CORS preflight request failed")
    assert named in problem["reason"]
    assert upstream.requests == []


async def test_preflight_follows_configuration(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(cors={"allow_methods": ["GET", "post"], "allow_headers": ["Authorization", "X-Custom"],
                                  "max_age": 5})
    status, headers, _ = await preflight(gw, **{"Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "X-Custom"})
    assert status == 200
    assert headers["Access-Control-Max-Age"] == "5"
    assert listed(headers, "Access-Control-Allow-Headers") == {"x-custom"}
    refused_method, _, _ = await preflight(gw, **{"Access-Control-Request-Method": "DELETE",
                                                  "Access-Control-Request-Headers": "Authorization"})
    refused_header, _, _ = await preflight(gw)  # x-flespi-cid is no longer allowed
    assert (refused_method, refused_header) == (403, 403)


async def test_any_header_when_configured(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(cors={"allow_headers": ["*"]})
    status, headers, _ = await preflight(gw, **{"Access-Control-Request-Headers": "x-anything"})
    assert status == 200 and listed(headers, "Access-Control-Allow-Headers") == {"x-anything"}


async def test_plain_options_is_an_ordinary_request(gw: GatewayHandle, upstream: Upstream) -> None:
    """Without Access-Control-Request-Method an OPTIONS needs a token and is forwarded like any call."""
    async with gw.request("OPTIONS", "/gw/devices", key=None, headers={"Origin": APP}) as response:
        assert response.status == 401
        assert_not_shared(response.headers)
    assert upstream.requests == []
    token = await gw.create_token(origins=[APP])
    async with gw.request("OPTIONS", "/gw/devices", key=token["key"], headers={"Origin": APP}) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == APP
    assert upstream.last.method == "OPTIONS"


async def test_a_preflight_with_a_token_is_still_only_a_preflight(gw: GatewayHandle, upstream: Upstream) -> None:
    token = await gw.create_token(origins=[APP])
    async with gw.request("OPTIONS", "/gw/devices", key=token["key"], headers=PREFLIGHT) as response:
        assert response.status == 200
    assert upstream.requests == []


async def test_disabled_cors_answers_no_preflight_and_shares_nothing(make_gateway: GatewayFactory,
                                                                     upstream: Upstream) -> None:
    gw = await make_gateway(cors={"enabled": False})
    status, headers, body = await preflight(gw)
    assert status == 401 and b"invalid or expired access token" in body
    assert_not_shared(headers)
    token = await gw.create_token(origins=[APP])
    async with gw.request("GET", "/a", key=token["key"], headers={"Origin": APP}) as response:
        assert response.status == 200
        assert_not_shared(response.headers)
        assert "origin" not in listed(response.headers, "Vary")
    assert upstream.requests[-1].raw_path == "/a"


# -- real replies -------------------------------------------------------------------------------

async def test_proxied_reply_shared_with_an_allowed_origin(gw: GatewayHandle, upstream: Upstream) -> None:
    token = await gw.create_token(origins=["http://*.gw.example:8000"])
    async with gw.request("GET", "/cors", key=token["key"], headers={"Origin": APP}) as response:
        assert response.status == 200
        assert await response.json() == {"cors": True}
        headers = response.headers
    assert headers["Access-Control-Allow-Origin"] == APP  # the origin, never the upstream's "*"
    assert headers.getall("Access-Control-Allow-Origin") == [APP]
    assert headers["Access-Control-Expose-Headers"] == "Retry-After"
    assert "Access-Control-Allow-Credentials" not in headers
    assert listed(headers, "Vary") == {"accept-encoding", "origin"}


async def test_upstream_cors_headers_never_reach_the_client(gw: GatewayHandle, upstream: Upstream) -> None:
    async with gw.request("GET", "/cors") as response:  # no Origin: the gateway shares nothing
        assert response.status == 200
        assert_not_shared(response.headers)
        assert listed(response.headers, "Vary") == {"accept-encoding"}
    assert upstream.last.raw_path == "/cors"


async def test_refused_origin_gets_401_without_allow_headers(gw: GatewayHandle, upstream: Upstream) -> None:
    token = await gw.create_token(origins=[APP])
    async with gw.request("GET", "/cors", key=token["key"], headers={"Origin": OTHER}) as response:
        assert response.status == 401
        assert await response.json() == error(401, "using token from unauthorized origin")
        assert_not_shared(response.headers)
        assert "origin" in listed(response.headers, "Vary")
    assert upstream.requests == []


async def test_a_successful_preflight_does_not_admit_the_real_request(gw: GatewayHandle, upstream: Upstream) -> None:
    token = await gw.create_token(origins=[APP])
    status, headers, _ = await preflight(gw, Origin=OTHER)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == OTHER  # grants nothing by itself
    async with gw.request("PUT", "/gw/devices/1", key=token["key"], headers={"Origin": OTHER}) as response:
        assert response.status == 401
        assert_not_shared(response.headers)
    assert upstream.requests == []


@pytest.mark.parametrize("origins", [None, "*", [], ["*"]])
async def test_token_open_to_any_origin_shares_with_each(gw: GatewayHandle, origins: Any) -> None:
    fields = {} if origins is None else {"origins": origins}
    token = await gw.create_token(**fields)
    for origin in (APP, OTHER, "null"):
        async with gw.request("GET", "/a", key=token["key"], headers={"Origin": origin}) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == origin


async def test_api_and_later_refusals_are_shared(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    """Once the origin check passed, the page may read whatever follows: API replies and errors alike."""
    gw = await make_gateway(upstream=None, routes={"/": upstream.url, "/dead/": f"http://127.0.0.1:{free_port()}"})
    acl = {"type": 2, "acl": [{"uri": "gw/devices", "methods": ["GET"]}]}
    token = await gw.create_token(origins=[APP], access=acl)
    standard = await gw.create_token(origins=[APP])
    master = await gw.create_token(origins=[APP], access={"type": 1})
    cases = [
        ("GET", "/auth/info", token["key"], 200),
        ("GET", "/platform/tokens/all", master["key"], 200),
        ("POST", "/platform/tokens", master["key"], 400),
        ("PUT", "/gw/devices/1", token["key"], 403),
        ("GET", "/platform/tokens/all", standard["key"], 403),
        ("GET", "/dead/x", standard["key"], 502),
    ]
    for method, path, key, expected in cases:
        async with gw.request(method, path, key=key, headers={"Origin": APP}, json={"ttl": "x"}) as response:
            assert response.status == expected, (method, path, await response.text())
            assert response.headers["Access-Control-Allow-Origin"] == APP, (method, path)
            assert response.headers["Access-Control-Expose-Headers"] == "Retry-After"


async def test_refusals_before_the_origin_check_are_not_shared(gw: GatewayHandle) -> None:
    """Unknown, disabled or misplaced keys: a page learns nothing about a key it cannot use."""
    disabled = await gw.create_token(origins=[APP], enabled=False)
    elsewhere = await gw.create_token(origins=[APP], ips="10.0.0.1")
    cases = [("z" * 64, "invalid or expired access token"), (None, "invalid or expired access token"),
             (disabled["key"], "token is disabled"), (elsewhere["key"], "using token from unauthorized location")]
    for key, reason in cases:
        async with gw.request("GET", "/a", key=key, headers={"Origin": APP}) as response:
            assert (response.status, await response.json()) == (401, error(401, reason))
            assert_not_shared(response.headers)


async def test_bad_request_is_not_shared(gw: GatewayHandle) -> None:
    token = await gw.create_token(origins=[APP])
    auth = {"Authorization": f"FlespiToken {token['key']}", "Origin": APP}
    async with gw.session.get(URL(gw.url + "/a/%2e%2e/b", encoded=True), headers=auth) as response:
        assert (response.status, await response.json()) == (400, error(400, "invalid request path"))
        assert_not_shared(response.headers)
    async with gw.request("GET", "/a", key=token["key"], headers={"Origin": APP, "x-flespi-cid": "me"}) as response:
        assert response.status == 400
        assert_not_shared(response.headers)


async def test_expose_headers_as_configured(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(cors={"expose_headers": ["X-Request-ID", "X-Upstream"]})
    token = await gw.create_token(origins=[APP])
    async with gw.request("GET", "/a", key=token["key"], headers={"Origin": APP}) as response:
        assert response.headers["Access-Control-Expose-Headers"] == "X-Request-ID, X-Upstream"
    quiet = await make_gateway(cors={"expose_headers": []})
    token = await quiet.create_token(origins=[APP])
    async with quiet.request("GET", "/a", key=token["key"], headers={"Origin": APP}) as response:
        assert response.headers["Access-Control-Allow-Origin"] == APP
        assert "Access-Control-Expose-Headers" not in response.headers


# -- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize(("cors", "named"), [
    ("yes", "cors: must be a mapping"),
    ({"enabled": "yes"}, "cors.enabled"),
    ({"allow_headers": "Authorization"}, "cors.allow_headers: must be a list"),
    ({"allow_headers": ["Authorization", "bad header"]}, "cors.allow_headers: 'bad header'"),
    ({"expose_headers": [7]}, "cors.expose_headers: 7"),
    ({"allow_methods": ["GET", "*"]}, "cors.allow_methods: '*'"),
    ({"max_age": -1}, "cors.max_age"),
    ({"max_age": "600"}, "cors.max_age"),
    ({"origins": ["*"]}, "cors.origins: unknown key"),
])
def test_bad_cors_config_names_the_key(cors: Any, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("*", r"\*")):
        build_settings({"upstream": "http://127.0.0.1:1", "cors": cors})


def test_cors_defaults_allow_what_flespi_clients_send() -> None:
    cors = build_settings({"upstream": "http://127.0.0.1:1"}).cors
    assert cors.enabled and cors.max_age == 600
    assert {name.lower() for name in cors.allow_headers} == {"authorization", "x-flespi-cid", "x-flespi-app",
                                                            "content-type"}
    assert build_settings({"upstream": "http://127.0.0.1:1", "cors": None}).cors == cors
