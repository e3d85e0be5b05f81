"""(b) Revocation across instances: a token deleted through gateway A while gateway B, on the same
Redis, is polled back to back; how long B still accepts it."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from . import MASTER_KEY
from .servers import start_gateway
from .session import Session, run_async


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def revocation_rounds(url_a: str, url_b: str, rounds: int) -> dict[str, Any]:
    """Delete through A while B is polled back to back; how long does B still accept the token?"""
    import aiohttp

    master = {"Authorization": f"FlespiToken {MASTER_KEY}"}
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
