"""Outages as an operator sees them: readiness turns 503 while a real Redis is stopped or stalled
(SIGSTOP) and 200 once it answers again, and the application log says so once each way, with how
long the store was away."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import Iterator

import pytest

from support.gateways import GatewayFactory, GatewayHandle, error
from support.servers import RedisProcess

FAST_REDIS = {"socket_timeout": 0.3, "connect_timeout": 0.3}
AWAY = re.compile(r"token store reachable again after (\d+\.\d) s")


async def ready_status(gw: GatewayHandle) -> tuple[int, object]:
    return await gw.call("GET", "/_gateway/ready", key=None)


async def until_ready_is(gw: GatewayHandle, status: int, body: object = None, timeout: float = 10.0) -> None:
    """Until readiness answers `status` (and `body`, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        got, answer = await ready_status(gw)
        if got == status and (body is None or answer == body):
            return
        assert time.monotonic() < deadline, f"ready stayed {got} {answer}"
        await asyncio.sleep(0.05)


def outage_lines(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    messages = [record.getMessage() for record in caplog.records if record.name == "gateway.store"]
    return ([m for m in messages if m.startswith("token store unreachable")],
            [m for m in messages if m.startswith("token store reachable again")])


@pytest.fixture
def stalled(own_redis: RedisProcess) -> Iterator[RedisProcess]:
    """The Redis of the test; resumed at the end whatever happens (never left stopped)."""
    yield own_redis
    if own_redis.process is not None:
        os.kill(own_redis.process.pid, signal.SIGCONT)


async def test_ready_follows_a_stalled_redis(make_gateway: GatewayFactory, stalled: RedisProcess,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.store")
    gw = await make_gateway(redis={"url": stalled.url, **FAST_REDIS})
    await until_ready_is(gw, 200)
    assert stalled.process is not None
    os.kill(stalled.process.pid, signal.SIGSTOP)
    paused = time.monotonic()
    await until_ready_is(gw, 503, error(503, "token storage unavailable"))
    status, body = await gw.call("GET", "/_gateway/health", key=None)  # liveness: still alive
    assert status == 200 and body["result"][0]["store"] == "down"
    await asyncio.sleep(1.0)  # several probes fail meanwhile: still one line
    os.kill(stalled.process.pid, signal.SIGCONT)
    stalled_for = time.monotonic() - paused
    await until_ready_is(gw, 200)
    down, up = outage_lines(caplog)
    assert len(down) == 1 and len(up) == 1, (down, up)
    match = AWAY.match(up[0])
    assert match is not None and 0.5 < float(match.group(1)) <= stalled_for + 1.5, (up[0], stalled_for)
    assert gw.gateway.monitor.outages == 1


async def test_ready_follows_a_stopped_redis_and_its_restart(make_gateway: GatewayFactory, own_redis: RedisProcess,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.store")
    gw = await make_gateway(redis={"url": own_redis.url, **FAST_REDIS})
    await until_ready_is(gw, 200)
    own_redis.stop()
    # The subscription may be seen lost first; the probe finds the store gone within a second.
    await until_ready_is(gw, 503)
    await until_ready_is(gw, 503, error(503, "token storage unavailable"))
    own_redis.start()
    await until_ready_is(gw, 200)  # the store answers and the subscription is back
    assert gw.gateway.cache.subscribed.is_set()
    down, up = outage_lines(caplog)
    assert len(down) == 1 and len(up) == 1, (down, up)
    assert AWAY.match(up[0])
