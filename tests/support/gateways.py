"""A gateway under test, seen from its client side: requests carrying the master key, the flespi
error shape, and the request log read back through the API."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.app import GATEWAY
from gateway.config import Settings
from gateway.server import GatewayServer

from .keys import MASTER_KEY


@dataclass
class GatewayHandle:
    url: str
    settings: Settings
    server: GatewayServer
    session: aiohttp.ClientSession

    @property
    def gateway(self) -> Any:
        return self.server.app[GATEWAY]

    def request(self, method: str, path: str, key: str | None = MASTER_KEY, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}) or {})
        if key is not None:
            headers.setdefault("Authorization", f"FlespiToken {key}")
        return self.session.request(method, self.url + path, headers=headers, allow_redirects=False, **kwargs)

    async def call(self, method: str, path: str, key: str | None = MASTER_KEY, **kwargs: Any) -> tuple[int, Any]:
        async with self.request(method, path, key, **kwargs) as response:
            return response.status, await response.json(content_type=None)

    async def create_token(self, **fields: Any) -> dict[str, Any]:
        fields.setdefault("ttl", 3600)
        status, body = await self.call("POST", "/platform/tokens", json=[fields])
        assert status == 200, body
        token: dict[str, Any] = body["result"][0]
        return token


GatewayFactory = Callable[..., Awaitable[GatewayHandle]]


def base_config(upstream_url: str, redis_url: str, prefix: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstream": upstream_url,
        "redis": {"url": redis_url, "key_prefix": prefix},
        "bootstrap_master_token": MASTER_KEY,
        "log": {"path": "off"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


async def wait_for_master(handle: GatewayHandle, timeout: float = 10.0) -> None:
    if handle.settings.bootstrap_master_token is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with handle.request("GET", "/auth/info") as response:
            if response.status == 200:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("bootstrap master token never became usable")


async def logged_hosts(gw: GatewayHandle, token_id: int, count: int, timeout: float = 5.0) -> list[str]:
    """The `host` of a token's request log records, oldest first, read back through the logs API."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = await gw.call("GET", f"/platform/tokens/{token_id}/logs")
        assert status == 200, body
        hosts = [record["host"] for record in body["result"] if record.get("event_code") == 1000]
        if len(hosts) >= count or time.monotonic() > deadline:
            return hosts
        await asyncio.sleep(0.05)


def error(status: int, reason: str) -> dict[str, Any]:
    return {"errors": [{"code": status, "reason": reason}]}
