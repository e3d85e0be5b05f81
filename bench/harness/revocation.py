"""(b) Revocation across instances: a token deleted through gateway A while gateway B, on the same
Redis, is polled back to back; how long B still accepts it. Also the DELETE retried until it is
acknowledged and one such round, which the failover scripts (scale.py, cluster.py) share."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from . import MASTER_KEY
from .servers import start_gateway
from .session import Session, run_async

MASTER = {"Authorization": f"FlespiToken {MASTER_KEY}"}
# The 503 of a change made on the master (and published) that no replica confirmed in time.
NOT_REPLICATED_PREFIX = "token storage unavailable: the change was made"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def delete_until_acknowledged(session: Any, url: str, token_id: int, deadline: float,
                                    pause: float = 0.02) -> tuple[float, float | None, list[tuple[int, str]]]:
    """DELETE the token through the gateway at `url`, again every `pause` until it is answered 200
    or with the 503 that says the change was made: (first try, answered or None, every answer as
    status and body). A failed request (no answer) is tried again too, as -1."""
    import aiohttp
    answers: list[tuple[int, str]] = []
    first_try = time.perf_counter()
    while time.monotonic() < deadline:
        try:
            async with session.delete(f"{url}/platform/tokens/{token_id}", headers=MASTER) as reply:
                status, body = reply.status, await reply.text()
        except (TimeoutError, aiohttp.ClientError) as exc:
            status, body = -1, type(exc).__name__
        answers.append((status, body))
        if status == 200 or NOT_REPLICATED_PREFIX in body:
            return first_try, time.perf_counter(), answers
        await asyncio.sleep(pause)
    return first_try, None, answers


async def revocation_round(session_a: Any, session_b: Any, url_a: str, url_b: str, token: dict[str, Any],
                           deadline: float) -> float | None:
    """Seconds from the DELETE's answer through A (200, or the 503 that says it was made) until B,
    which had the token cached, refuses it."""
    auth = {"Authorization": f"FlespiToken {token['key']}"}
    async with session_b.get(url_b + "/bench/revoke", headers=auth) as reply:
        await reply.read()
    _, answered, _ = await delete_until_acknowledged(session_a, url_a, token["id"], deadline)
    if answered is None:
        return None
    while time.monotonic() < deadline:
        async with session_b.get(url_b + "/bench/revoke", headers=auth) as reply:
            await reply.read()
            if reply.status == 401:
                return time.perf_counter() - answered
    return None


async def revocation_rounds(url_a: str, url_b: str, rounds: int) -> dict[str, Any]:
    """Delete through A while B is polled back to back; how long does B still accept the token?"""
    import aiohttp

    master = MASTER
    windows, after_ack = [], []
    late_accepts = 0
    connector_b = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession() as a, aiohttp.ClientSession(connector=connector_b) as b:
        for _ in range(rounds):
            async with a.post(url_a + "/platform/tokens", json=[{"ttl": 3600}], headers=master) as reply:
                token = (await reply.json())["result"][0]
            auth = {"Authorization": f"FlespiToken {token['key']}"}
            for _ in range(100):  # B caches it
                async with b.get(url_b + "/bench/revoke", headers=auth) as reply:
                    await reply.read()
                    if reply.status == 200:
                        break
            else:
                raise RuntimeError("instance B never accepted the new token")
            polls: list[tuple[float, float, int]] = []
            stop_polling = time.monotonic() + 5.0

            async def poll() -> None:
                while time.monotonic() < stop_polling:
                    sent = time.perf_counter()
                    async with b.get(url_b + "/bench/revoke", headers=auth) as reply:
                        await reply.read()
                    polls.append((sent, time.perf_counter(), reply.status))
                    if reply.status == 401:
                        return

            poller = asyncio.ensure_future(poll())
            await asyncio.sleep(0.01)
            deleted = time.perf_counter()
            async with a.delete(f"{url_a}/platform/tokens/{token['id']}", headers=master) as reply:
                await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"DELETE through A failed: {reply.status}")
            acked = time.perf_counter()
            await poller
            refused = next((received for _, received, status in polls if status == 401), None)
            if refused is None:
                raise RuntimeError("instance B kept accepting a deleted token for 5 s")
            windows.append((refused - deleted) * 1000)
            after_ack.append(max(0.0, refused - acked) * 1000)
            late_accepts += sum(1 for sent, _, status in polls if status == 200 and sent > acked)
            await asyncio.sleep(0.01)
    return {"rounds": rounds, "windows_ms": windows, "after_ack_ms": after_ack, "late_accepts": late_accepts}


def revocation(session: Session, rounds: int) -> dict[str, Any]:
    gwa = start_gateway(session.procs, "gateway-A", session.upstream, session.redis_url, 1)
    gwb = start_gateway(session.procs, "gateway-B", session.upstream, session.redis_url, 1)
    revoke: dict[str, Any] = run_async(revocation_rounds(gwa.url, gwb.url, rounds))
    session.say(f"revocation on the other instance: p50 {percentile(revoke['windows_ms'], 50):.2f} ms, "
                f"p99 {percentile(revoke['windows_ms'], 99):.2f} ms after DELETE was sent; "
                f"{revoke['late_accepts']} request(s) accepted after the DELETE was acknowledged")
    session.procs.stop(gwb.process)
    session.procs.stop(gwa.process)
    return revoke
