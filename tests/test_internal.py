"""The gateway's own endpoints (health, readiness, metrics: for `internal.allow` only; any other
internal path a 404 that never reaches the upstream), and what a request leaves behind: its line in
the request log (refusals with their reason, the real size of every reply) and its count in the
metrics, on both fronts (the fast path, and aiohttp for requests with an `Origin`)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.gateways import GatewayFactory, GatewayHandle, error
from support.keys import MASTER_KEY
from support.servers import RedisProcess, Upstream
from support.usage import room_in_window

UNKNOWN_KEY = "U" * 64
PAGE = {"Origin": "http://page.test"}  # sends a request to the aiohttp front
ClientFrom = Callable[[str], aiohttp.ClientSession]


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


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus-client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(gw: GatewayHandle) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with gw.request("GET", "/_gateway/metrics", key=None) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        return samples(await response.text())


def requests_of(found: dict[Any, float], front: str, code: str) -> float:
    return found.get(("gateway_requests_total", (("code", code), ("front", front))), 0)


async def fresh(gw: GatewayHandle, method: str, path: str, key: str | None = MASTER_KEY,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A request on a connection of its own: one that aiohttp served before (the API's) stays with
    aiohttp, so the fast path is reached only on a new connection."""
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"FlespiToken {key}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session, \
            session.request(method, gw.url + path, headers=sent) as response:
        return response.status, await response.read()


async def logged(path: Path, count: int, what: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The request log's records matching `what`, once there are `count` of them."""
    deadline = time.monotonic() + 10
    while True:
        lines = path.read_bytes().splitlines() if path.exists() else []
        records = [record for record in map(orjson.loads, lines) if what(record)]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.05)


# -- the endpoints and who may read them ---------------------------------------------------------

async def test_ready_and_health_answer_loopback(gw: GatewayHandle) -> None:
    assert await gw.call("GET", "/_gateway/ready", key=None) == (200, {"result": [{"status": "ready"}]})
    status, body = await gw.call("GET", "/_gateway/health", key=None)
    assert status == 200 and body["result"][0]["status"] == "ok" and body["result"][0]["store"] == "up"


async def test_allow_list_refuses_other_clients(make_gateway: GatewayFactory, client_from: ClientFrom,
                                                tmp_path: Path) -> None:
    log = tmp_path / "requests.log"
    gw = await make_gateway(internal={"allow": ["127.0.0.2"]}, log={"path": str(log), "flush_interval": 0.05})
    allowed, other = client_from("127.0.0.2"), client_from("127.0.0.3")
    for path in ("health", "ready", "metrics"):
        async with allowed.get(f"{gw.url}/_gateway/{path}") as response:
            assert response.status == 200, path
        async with other.get(f"{gw.url}/_gateway/{path}") as response:
            assert response.status == 403
            assert await response.json() == error(403, f"/_gateway/{path} is not served to this address "
                                                       "(internal.allow)")
    async with gw.request("GET", "/_gateway/metrics", key=None) as response:  # 127.0.0.1 is no longer in it
        assert response.status == 403
    # Open to anyone: the API description and the panel.
    async with other.get(f"{gw.url}/_gateway/openapi.json") as response:
        assert response.status == 200
    async with other.get(f"{gw.url}/_gateway/panel/") as response:
        assert response.status == 200
    refused = await logged(log, 4, lambda record: record.get("refusal") == "forbidden")
    assert sorted((record["host"], record["uri"], record["reason"]) for record in refused) == sorted(
        [("127.0.0.1", "/_gateway/metrics", "/_gateway/metrics is not served to this address (internal.allow)")] + [
            ("127.0.0.3", f"/_gateway/{path}", f"/_gateway/{path} is not served to this address (internal.allow)")
            for path in ("health", "ready", "metrics")])


async def test_allow_list_sees_the_client_behind_a_trusted_proxy(make_gateway: GatewayFactory,
                                                                 client_from: ClientFrom) -> None:
    """A proxy in front (127.0.0.2, trusted, not itself allowed) does not open the endpoints to
    its clients; a client the proxy names as 127.0.0.1 is let in, as the token checks see it."""
    gw = await make_gateway(trusted_proxies=["127.0.0.2"], internal={"allow": ["127.0.0.1"]})
    proxy = client_from("127.0.0.2")
    async with proxy.get(f"{gw.url}/_gateway/metrics", headers={"X-Forwarded-For": "203.0.113.9"}) as response:
        assert response.status == 403
    async with proxy.get(f"{gw.url}/_gateway/metrics", headers={"X-Forwarded-For": "127.0.0.1"}) as response:
        assert response.status == 200
    # An untrusted client cannot talk its way in with the header.
    async with client_from("127.0.0.3").get(f"{gw.url}/_gateway/metrics",
                                            headers={"X-Forwarded-For": "127.0.0.1"}) as response:
        assert response.status == 403


@pytest.mark.parametrize("headers", [{}, PAGE], ids=["fast", "aiohttp"])
async def test_unknown_internal_path_is_404_and_never_proxied(gw: GatewayHandle, upstream: Upstream,
                                                              headers: dict[str, str]) -> None:
    for path in ("/_gateway/nothing", "/_gateway/health/more", "/_gateway/", "/_gateway/metrics.txt"):
        for key in (MASTER_KEY, None):
            status, body = await gw.call("GET", path, key=key, headers=headers)
            assert (status, body) == (404, error(404, f"unknown path {path}")), (path, key)
    assert upstream.requests == []


async def test_panel_turned_off_is_404_not_proxied(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(panel={"enabled": False})
    assert await gw.call("GET", "/_gateway/panel/") == (404, error(404, "unknown path /_gateway/panel/"))
    assert upstream.requests == []


# -- the request log: refusals with their reason, sizes as sent ----------------------------------

@pytest.mark.parametrize("headers", [{}, PAGE], ids=["fast", "aiohttp"])
async def test_refusals_and_sizes_in_the_request_log(make_gateway: GatewayFactory, tmp_path: Path,
                                                     headers: dict[str, str]) -> None:
    log = tmp_path / "requests.log"
    gw = await make_gateway(log={"path": str(log), "flush_interval": 0.05})
    served = gw.gateway.flow.fast if not headers else gw.gateway.flow.aiohttp
    before = served.by_class()
    token = await gw.create_token(ips="10.9.9.9")  # never this client's address
    bodies: dict[str, bytes] = {}
    for name, path, key in (("unknown", "/a", UNKNOWN_KEY), ("location", "/b", token["key"]),
                            ("proxied", "/big/1000", MASTER_KEY), ("bad path", "/c%2Fd", MASTER_KEY),
                            ("no key", "/e", None), ("api", "/auth/info", MASTER_KEY)):  # the API: aiohttp's
        bodies[name] = (await fresh(gw, "GET", path, key, headers))[1]
    records = await logged(log, 6, lambda record: record.get("event_code") == 1000
                           and record["uri"] in ("/a", "/b", "/big/1000", "/c%2Fd", "/e", "/auth/info"))
    by_uri = {record["uri"]: record for record in records}
    assert {uri: (r["status"], r.get("reason"), r.get("refusal"), r["token_id"]) for uri, r in by_uri.items()} == {
        "/a": (401, "invalid or expired access token", "invalid_token", None),
        "/b": (401, "using token from unauthorized location", "unauthorized_location", token["id"]),
        "/big/1000": (200, None, None, 1),
        "/c%2Fd": (400, "invalid request path", "invalid_path", None),
        "/e": (401, "invalid or expired access token", "invalid_token", None),
        "/auth/info": (200, None, None, 1),
    }
    sizes = {uri: record["size"] for uri, record in by_uri.items()}
    assert sizes == {"/a": len(bodies["unknown"]), "/b": len(bodies["location"]), "/big/1000": 1000,
                     "/c%2Fd": len(bodies["bad path"]), "/e": len(bodies["no key"]), "/auth/info": len(bodies["api"])}
    assert all(size > 0 for size in sizes.values())
    after = served.by_class()
    assert after["4xx"] - before["4xx"] == 4 and after["2xx"] - before["2xx"] >= 1
    raw = log.read_bytes()
    assert MASTER_KEY.encode() not in raw and token["key"].encode() not in raw and UNKNOWN_KEY.encode() not in raw


# -- metrics -------------------------------------------------------------------------------------

async def test_metrics_count_what_was_sent(gw: GatewayHandle, upstream: Upstream) -> None:
    first = await scrape(gw)
    token = await gw.create_token(ips="10.9.9.9")
    for _ in range(5):
        assert (await fresh(gw, "GET", "/x"))[0] == 200  # fast path
    for _ in range(3):
        assert (await fresh(gw, "GET", "/y", headers=PAGE))[0] == 200  # aiohttp
    for _ in range(2):
        assert (await fresh(gw, "GET", "/z", key=UNKNOWN_KEY))[0] == 401
    assert (await fresh(gw, "GET", "/z", key=token["key"]))[0] == 401
    found = await scrape(gw)

    def grew(name: str, **labels: str) -> float:
        sample = (name, tuple(sorted(labels.items())))
        return found.get(sample, 0) - first.get(sample, 0)

    assert requests_of(found, "fast", "2xx") - requests_of(first, "fast", "2xx") == 5
    assert requests_of(found, "aiohttp", "2xx") - requests_of(first, "aiohttp", "2xx") >= 4  # + the token's creation
    assert requests_of(found, "fast", "4xx") - requests_of(first, "fast", "4xx") == 3
    assert grew("gateway_refusals_total", reason="invalid_token") == 2
    assert grew("gateway_refusals_total", reason="unauthorized_location") == 1
    assert grew("gateway_upstream_latency_seconds_count") == 8
    assert grew("gateway_upstream_latency_seconds_bucket", le="+Inf") == 8
    assert grew("gateway_cache_hits_total") >= 8
    assert found[("gateway_cache_entries", ())] >= 2
    assert found[("gateway_store_up", ())] == 1 and found[("gateway_invalidation_live", ())] == 1
    assert found[("gateway_workers", ())] == 1
    assert found[("gateway_open_connections", ())] >= 1
    assert found[("gateway_store_batch_seconds_count", ())] >= 1
    # Nothing in it names a token: no key, no token id label.
    async with gw.request("GET", "/_gateway/metrics", key=None) as response:
        text = await response.text()
    assert MASTER_KEY not in text and token["key"] not in text and "token" not in {
        label for family in text_string_to_metric_families(text) for sample in family.samples
        for label in sample.labels}


async def test_metrics_follow_usage_blocks_log_lines_and_a_store_outage(
        make_gateway: GatewayFactory, own_redis: RedisProcess, tmp_path: Path) -> None:
    """The families the test above leaves: a usage block (counted, and the blocked gauge), log
    records written, the invalidation lag, and an outage (counted once, `gateway_store_up` 0
    until the store is back)."""
    window = 30
    gw = await make_gateway(redis={"url": own_redis.url, "socket_timeout": 0.3, "connect_timeout": 0.3},
                            usage={"window": window, "flush_interval": 0.1},
                            log={"path": str(tmp_path / "requests.log"), "flush_interval": 0.05})
    await room_in_window(5, window)  # the calls and the block in one window
    cid = (await gw.call("POST", "/platform/subaccounts", json={"name": "t", "limits": {"api_calls": 4}}))[1][
        "result"][0]["id"]
    token = (await gw.call("POST", "/platform/tokens", json={"ttl": 600}, headers={"x-flespi-cid": str(cid)}))[1][
        "result"][0]
    await asyncio.sleep(0.3)  # the gateway knows the account's limits
    first = await scrape(gw)
    assert [(await gw.call("GET", f"/e{n}", key=token["key"]))[0] for n in range(5)] == [200] * 4 + [429]

    async def until(check: Callable[[dict[Any, float]], bool], timeout: float = 5.0) -> dict[Any, float]:
        deadline = time.monotonic() + timeout
        while True:
            found = await scrape(gw)
            if check(found):
                return found
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.05)

    def grew(found: dict[Any, float], name: str) -> float:
        return found.get((name, ()), 0) - first.get((name, ()), 0)

    found = await until(lambda found: grew(found, "gateway_log_lines_written_total") >= 5)
    assert grew(found, "gateway_usage_blocks_total") == 1
    assert found[("gateway_usage_blocked_tokens", ())] == 1
    assert 0 <= found[("gateway_invalidation_lag_seconds", ())] < 1.0
    assert found[("gateway_store_up", ())] == 1
    own_redis.stop()
    try:
        found = await until(lambda found: found[("gateway_store_up", ())] == 0)
        assert grew(found, "gateway_store_outages_total") == 1
    finally:
        own_redis.start()
    found = await until(lambda found: found[("gateway_store_up", ())] == 1, timeout=10.0)
    assert grew(found, "gateway_store_outages_total") == 1  # one outage, however many probes failed
