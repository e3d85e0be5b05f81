"""The gateway operated as a process (`python -m gateway`, `workers: 2`), as an operator watches it:
metrics summed over the workers, the application log as JSON lines, and one line per worker when
the store goes away and when it is back."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from support.keys import MASTER_KEY
from support.servers import RedisProcess, Upstream, free_port, run_gateway_process, wait_for_port

AUTH = {"Authorization": f"FlespiToken {MASTER_KEY}"}


@pytest.fixture
def two_workers(tmp_path: Path, upstream: Upstream, own_redis: RedisProcess) -> Iterator[tuple[str, Any]]:
    port = free_port()
    config = {"listen": {"host": "127.0.0.1", "port": port}, "upstream": upstream.url, "workers": 2,
              "bootstrap_master_token": MASTER_KEY,
              "redis": {"url": own_redis.url},
              "log": {"path": str(tmp_path / "requests.log"), "format": "json", "flush_interval": 0.1}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    process = run_gateway_process(path)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def get(url: str, key: str | None = MASTER_KEY) -> tuple[int, bytes]:
    """On a new connection each time: the kernel spreads new connections over the workers."""
    headers = {"Authorization": f"FlespiToken {key}"} if key else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.read()


def totals(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def until(check: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.1)


async def test_two_workers_metrics_ready_and_outage_lines(two_workers: tuple[str, Any],
                                                          own_redis: RedisProcess) -> None:
    url, process = two_workers
    async with aiohttp.ClientSession() as session, \
            session.post(f"{url}/platform/tokens", json=[{"ttl": 600}], headers=AUTH) as response:
        key = (await response.json())["result"][0]["key"]
    pids = set()
    served = 0.0
    for _ in range(40):
        assert (await get(f"{url}/x", key))[0] == 200
        status, body = await get(f"{url}/_gateway/health", None)
        assert status == 200
        pids.add(orjson.loads(body)["result"][0]["pid"])
        # Scrapes reach either worker: the sum may lag a second behind, but never goes back.
        status, body = await get(f"{url}/_gateway/metrics", None)
        now = totals(body.decode()).get(("gateway_requests_total", (("code", "2xx"), ("front", "fast"))), 0)
        assert now >= served, (now, served)
        served = now
    for _ in range(10):
        assert (await get(f"{url}/y", "U" * 64))[0] == 401
    assert len(pids) == 2  # both workers served some of it

    async def summed() -> dict[Any, float] | None:
        status, body = await get(f"{url}/_gateway/metrics", None)
        assert status == 200
        found = totals(body.decode())
        fast = found.get(("gateway_requests_total", (("code", "2xx"), ("front", "fast"))), 0)
        refused = found.get(("gateway_refusals_total", (("reason", "invalid_token"),)), 0)
        return found if (fast, refused, found[("gateway_workers", ())]) == (40, 10, 2) else None

    # Each worker's numbers reach the others within a second; then whichever answers, the sum is
    # the same, and it never reads lower than before.
    found = await until(summed, "the workers' counts summed")
    assert found[("gateway_upstream_latency_seconds_count", ())] == 40
    for _ in range(6):
        assert await summed() is not None

    # A worker that dies is replaced; its counters stay in the sum, its gauges leave it.
    gone = min(pids)
    os.kill(gone, signal.SIGKILL)

    async def replaced() -> set[int] | None:
        seen: set[int] = set()
        for _ in range(12):
            status, body = await get(f"{url}/_gateway/health", None)
            if status == 200:
                seen.add(orjson.loads(body)["result"][0]["pid"])
        return seen if len(seen) == 2 and gone not in seen else None
    pids = await until(replaced, "the dead worker replaced")
    for _ in range(6):
        assert await summed() is not None

    own_redis.stop()
    seen_down: set[int] = set()

    async def unready() -> bool:
        status, body = await get(f"{url}/_gateway/ready", None)
        assert status in (200, 503)
        if status == 503 and orjson.loads(body) == {"errors": [{"code": 503, "reason": "token storage unavailable"}]}:
            status, body = await get(f"{url}/_gateway/health", None)  # which worker, and what it says
            health = orjson.loads(body)["result"][0]
            if health["store"] == "down":
                seen_down.add(health["pid"])
        return seen_down == pids
    await until(unready, "ready 503 on both workers")
    own_redis.start()

    async def ready() -> bool:
        return all([(await get(f"{url}/_gateway/ready", None))[0] == 200 for _ in range(6)])
    await until(ready, "ready 200 again")

    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    lines = [orjson.loads(line) for line in process.stderr.read().splitlines()]  # every line is JSON
    assert all({"timestamp", "level", "logger", "message", "pid"} <= set(line) for line in lines)
    down = [line["pid"] for line in lines if line["message"].startswith("token store unreachable")]
    up = [line for line in lines if line["message"].startswith("token store reachable again after ")]
    assert sorted(down) == sorted(pids) and sorted(line["pid"] for line in up) == sorted(pids), lines
    assert all(line["level"] == "WARNING" and line["logger"] == "gateway.store" for line in up)
