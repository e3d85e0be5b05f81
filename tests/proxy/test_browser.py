"""CORS as a user sees it: headless Chromium runs a page that calls the gateway with fetch().

The page is served from its own loopback origin (another port than the gateway's), so every
call is cross-origin with an Authorization header: the browser sends a preflight, then the real
request, and hands the page the reply only if the gateway shared it. The page writes what it
could see into the DOM, which `chromium --dump-dom` prints once the page is done.
"""
from __future__ import annotations

import asyncio
import html
import json
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from support.gateways import GatewayHandle
from support.servers import Upstream, free_port

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>gateway CORS check</title></head>
<body><pre id="result">pending</pre>
<script>
const calls = %s;
async function one(call) {
  try {
    const response = await fetch(call.url, {method: call.method, headers: call.headers});
    return {status: response.status, body: await response.json(),
            retryAfter: response.headers.get("Retry-After"), requestId: response.headers.get("X-Request-ID")};
  } catch (error) {
    return {error: error.name, message: error.message};
  }
}
(async () => {
  const results = [];
  for (const call of calls) results.push(await one(call));
  document.getElementById("result").textContent = JSON.stringify(results);
})();
</script></body></html>
"""
RESULT = re.compile(r'<pre id="result">(.*?)</pre>', re.DOTALL)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--virtual-time-budget=5000")


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed (.ci/run installs it)")  # never a skip: CI must run this
    return found


class Pages:
    """A tiny site whose pages each run a list of fetch() calls; it listens on two origins."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = {}
        self.servers: list[TestServer] = []

    def app(self) -> web.Application:
        async def page(request: web.Request) -> web.Response:
            calls = json.dumps(self.calls[request.match_info["name"]])
            return web.Response(text=PAGE % calls, content_type="text/html")

        app = web.Application()
        app.router.add_get("/{name}", page)
        return app

    async def serve(self) -> list[str]:
        for _ in range(2):
            server = TestServer(self.app(), host="127.0.0.1", port=free_port())
            await server.start_server()
            self.servers.append(server)
        return [f"http://127.0.0.1:{server.port}" for server in self.servers]

    async def close(self) -> None:
        for server in self.servers:
            await server.close()


@pytest.fixture
async def pages() -> AsyncIterator[Pages]:
    site = Pages()
    yield site
    await site.close()


async def run_page(url: str) -> list[dict[str, Any]]:
    """Load `url` in a fresh headless Chromium and return what the page's script wrote."""
    with tempfile.TemporaryDirectory(prefix="gw-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            chromium_binary(), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(90):
                dom, errors = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    found = RESULT.search(dom.decode())
    assert found is not None, f"no result in the page (chromium exit {process.returncode}): {errors.decode()[-2000:]}"
    text = html.unescape(found.group(1))
    assert text != "pending", "the page's calls did not finish within the virtual time budget"
    results: list[dict[str, Any]] = json.loads(text)
    return results


def call(gw: GatewayHandle, method: str, path: str, key: str, **headers: str) -> dict[str, Any]:
    return {"url": gw.url + path, "method": method, "headers": {"Authorization": f"FlespiToken {key}", **headers}}



async def logged_statuses(gw: GatewayHandle, token_id: int, count: int) -> list[int]:
    for _ in range(100):
        status, body = await gw.call("GET", f"/platform/tokens/{token_id}/logs")
        assert status == 200, body
        statuses = [record["status"] for record in body["result"] if record.get("event_code") == 1000]
        if len(statuses) >= count:
            return statuses
        await asyncio.sleep(0.05)
    return statuses


async def test_page_reads_replies_only_where_its_origin_is_allowed(gw: GatewayHandle, upstream: Upstream,
                                                                    pages: Pages) -> None:
    allowed_origin, refused_origin = await pages.serve()
    token = await gw.create_token(origins=[allowed_origin], info="web app")
    acl = await gw.create_token(origins=[allowed_origin],
                                access={"type": 2, "acl": [{"uri": "gw/devices", "methods": ["GET"]}]})
    pages.calls["app"] = [
        call(gw, "GET", "/gw/devices/7", token["key"], **{"x-flespi-app": "browser-test"}),
        call(gw, "PUT", "/gw/devices/7", acl["key"], **{"Content-Type": "application/json"}),
        call(gw, "GET", "/gw/devices/7", "Z" * 64),
    ]
    pages.calls["elsewhere"] = [call(gw, "GET", "/gw/devices/8", token["key"])]

    readable, denied_by_acl, unknown_key = await run_page(f"{allowed_origin}/app")
    [from_elsewhere] = await run_page(f"{refused_origin}/elsewhere")

    # The allowed origin reads the proxied JSON, and a refusal that comes after the origin check.
    assert readable.get("status") == 200, readable
    assert readable["body"] == {"method": "GET", "path": "/gw/devices/7", "size": 0}
    assert readable["requestId"] is None  # not in cors.expose_headers, so hidden from the page
    assert denied_by_acl.get("status") == 403, denied_by_acl
    assert denied_by_acl["body"] == {"errors": [{"code": 403, "reason":
                                                 "access to gw/devices/7 (PUT) is denied by token ACL"}]}
    # A key nobody knows, or a known key from a refused origin: the page gets a network error only.
    assert unknown_key.get("error") == "TypeError", unknown_key
    assert from_elsewhere.get("error") == "TypeError", from_elsewhere
    assert "status" not in from_elsewhere and "body" not in from_elsewhere

    # What happened on the wire: preflights stayed at the gateway, the refused call was refused.
    assert [(r.method, r.raw_path) for r in upstream.requests] == [("GET", "/gw/devices/7")]
    assert upstream.last.headers["origin"] == [allowed_origin]
    assert sorted(await logged_statuses(gw, token["id"], 2)) == [200, 401]
    assert await logged_statuses(gw, acl["id"], 1) == [403]


def test_chromium_is_installed() -> None:
    """Stated on its own so a machine without chromium fails with the reason first, never skips."""
    assert chromium_binary()
