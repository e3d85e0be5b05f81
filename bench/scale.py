"""Sentinel failover, measured: a master, a replica and three sentinels on loopback
(down-after-milliseconds 1000), two gateways on them, and one run of:

1. cache-miss throughput: uncached authentications per second through a gateway that finds the
   master through the sentinels, against one pointed at the same master by `redis://`;
2. the time from killing the master to the first successful uncached authentication on the
   new master (target: under down-after + failover + 1 s), and how long uncached requests got 503;
3. revocation across instances (deleted through A, how long B still accepts the token): p50/p99
   during the failover and after it (target: p99 <= 100 ms after).

    python bench/scale.py [--tokens 3000] [--rounds 50]

With `--cluster`, instead: cache-miss throughput through a gateway on a Redis Cluster of three
masters and three replicas (the cluster key layout, docs/redis.md) against one on a single Redis,
alternated twice. `bench/cluster.py` measures the cluster further (hot throughput, a bulk of
tokens and each master's memory, a master killed).

    python bench/scale.py --cluster [--tokens 3000]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import HOST, PREFIX
from harness.procs import Processes, free_port, wait_for_port
from harness.revocation import MASTER, percentile, revocation_round
from harness.servers import start_gateway, start_upstream
from harness.tools import find_tools

SERVICE = "gwbench"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def start_sentinel_set(procs: Processes,
                       redis_server: str) -> tuple[list[int], list[subprocess.Popen[bytes]], list[int]]:
    ports = [free_port(), free_port()]
    servers = []
    for index, port in enumerate(ports):
        data = procs.workdir / f"redis-{index}"
        data.mkdir()
        extra = ["--replicaof", HOST, str(ports[0])] if index else []
        servers.append(procs.start(f"redis-{index}", [redis_server, "--port", str(port), "--bind", HOST, "--save", "",
                                                      "--appendonly", "no", "--dir", str(data), *extra]))
        wait_for_port(port, servers[-1])
    sentinel_ports = [free_port() for _ in range(3)]
    binary = shutil.which("redis-sentinel") or redis_server
    for index, port in enumerate(sentinel_ports):
        config = procs.workdir / f"sentinel-{index}.conf"
        config.write_text(f"port {port}\nbind {HOST}\ndir {procs.workdir}\n"
                          f"sentinel monitor {SERVICE} {HOST} {ports[0]} 2\n"
                          f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                          f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n")
        argv = [binary, str(config)] if binary.endswith("redis-sentinel") else [binary, str(config), "--sentinel"]
        wait_for_port(port, procs.start(f"sentinel-{index}", argv))
    return ports, servers, sentinel_ports


def master_port(sentinel_ports: list[int]) -> int | None:
    import redis
    for port in sentinel_ports:
        try:
            with redis.Redis(host=HOST, port=port, socket_timeout=0.5) as client:
                address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                if address:
                    return int(address[1])
        except (redis.RedisError, OSError):
            continue
    return None


def wait_settled(sentinel_ports: list[int], timeout: float = 60.0) -> int:
    """A master with a replica online, as every sentinel sees it."""
    import redis
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        port = master_port(sentinel_ports)
        if port is not None:
            try:
                with redis.Redis(host=HOST, port=port, socket_timeout=0.5) as client:
                    info = client.info("replication")
                slaves = [value for name, value in info.items() if name.startswith("slave") and isinstance(value, dict)]
                states = []
                for sentinel in sentinel_ports:
                    with redis.Redis(host=HOST, port=sentinel, socket_timeout=0.5) as client:
                        state = client.sentinel_master(SERVICE)
                        states.append(state["is_master"] and not state["is_sdown"]
                                      and state["num-other-sentinels"] >= 2)
                if info["role"] == "master" and any(s.get("state") == "online" for s in slaves) and all(states):
                    return port
            except (redis.RedisError, OSError, KeyError):
                pass
        time.sleep(0.2)
    raise RuntimeError("the sentinel set did not settle")


async def create_tokens(url: str, count: int) -> list[dict[str, Any]]:
    import aiohttp
    made: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        while len(made) < count:
            batch = [{"ttl": 7200} for _ in range(min(500, count - len(made)))]
            async with session.post(url + "/platform/tokens", json=batch, headers=MASTER) as reply:
                body = await reply.json()
                if reply.status != 200:
                    raise RuntimeError(f"creating tokens: {reply.status} {body}")
                made += body["result"]
    return made


async def miss_throughput(url: str, keys: list[str], concurrency: int = 32) -> float:
    """Uncached authentications a second: every key asked once, `concurrency` at a time."""
    import aiohttp
    queue = list(keys)
    statuses: dict[int, int] = {}

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            key = queue.pop()
            async with session.get(url + "/bench/miss", headers={"Authorization": f"FlespiToken {key}"}) as reply:
                await reply.read()
                statuses[reply.status] = statuses.get(reply.status, 0) + 1
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    if set(statuses) != {200}:
        raise RuntimeError(f"cache-miss run answered {statuses}")
    return len(keys) / seconds


async def failover(url_a: str, url_b: str, spare: list[str], doomed: list[dict[str, Any]], kill: Any,
                   revive: Any) -> dict[str, Any]:
    import aiohttp
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as a, aiohttp.ClientSession(timeout=timeout) as b:
        killed = time.perf_counter()
        kill()
        first_ok: float | None = None
        unavailable: list[float] = []
        during: list[float] = []

        async def uncached() -> None:
            nonlocal first_ok
            for key in spare:
                sent = time.perf_counter()
                try:
                    headers = {"Authorization": f"FlespiToken {key}"}
                    async with a.get(url_a + "/bench/failover", headers=headers) as reply:
                        await reply.read()
                        status = reply.status
                except (TimeoutError, aiohttp.ClientError):
                    status = -1
                if status == 200:
                    first_ok = time.perf_counter() - killed
                    return
                if status == 503:
                    unavailable.append(sent - killed)
                await asyncio.sleep(0.01)

        async def revocations() -> None:
            for token in doomed:
                if time.perf_counter() - killed > 15:
                    return
                seconds = await revocation_round(a, b, url_a, url_b, token, time.monotonic() + 15)
                if seconds is not None:
                    during.append(seconds)

        await asyncio.gather(uncached(), revocations())
        revive()
        return {"first_ok": first_ok, "unavailable": unavailable, "during": during}


async def revocations_after(url_a: str, url_b: str, tokens: list[dict[str, Any]]) -> list[float]:
    import aiohttp
    async with aiohttp.ClientSession() as a, aiohttp.ClientSession() as b:
        found = [await revocation_round(a, b, url_a, url_b, token, time.monotonic() + 10) for token in tokens]
    return [seconds for seconds in found if seconds is not None]


def start_cluster(procs: Processes, redis_server: str) -> list[int]:
    """Three masters and three replicas (node timeout 1 s); ports whose bus port (+10000) is valid."""
    import redis
    ports: list[int] = []
    while len(ports) < 6:
        port = free_port()
        if port < 55000 and port not in ports:
            ports.append(port)
    for index, port in enumerate(ports):
        data = procs.workdir / f"node-{index}"
        data.mkdir()
        node = procs.start(f"node-{index}", [
            redis_server, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", str(data),
            "--cluster-enabled", "yes", "--cluster-config-file", str(data / "nodes.conf"),
            "--cluster-node-timeout", "1000"])
        wait_for_port(port, node)
    cli = shutil.which("redis-cli") or "redis-cli"
    subprocess.run([cli, "--cluster", "create", *[f"{HOST}:{port}" for port in ports], "--cluster-replicas", "1",
                    "--cluster-yes"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = []
        for port in ports:
            with redis.Redis(host=HOST, port=port, socket_timeout=0.5) as client:
                states.append("cluster_state:ok" in client.execute_command("CLUSTER", "INFO").decode())
        if all(states):
            return ports
        time.sleep(0.2)
    raise RuntimeError("the cluster did not become ok")


def cluster_main(tokens: int, tools: dict[str, Any], procs: Processes) -> None:
    redis_server = str(tools["redis-server"])
    upstream, _, kind = start_upstream(procs, tools)
    ports = start_cluster(procs, redis_server)
    single_port = free_port()
    single = procs.workdir / "single"
    single.mkdir()
    wait_for_port(single_port, procs.start("redis-single", [redis_server, "--port", str(single_port), "--bind", HOST,
                                                            "--save", "", "--appendonly", "no", "--dir", str(single)]))
    cluster = {"cluster": {"nodes": [f"{HOST}:{port}" for port in ports[:3]]}, "key_prefix": PREFIX}
    on_cluster = start_gateway(procs, "gw-cluster", upstream, "", 1,
                               settings={"redis": cluster, "log": {"path": "off"}})
    on_one = start_gateway(procs, "gw-single", upstream, f"redis://{HOST}:{single_port}/0", 1,
                           settings={"log": {"path": "off"}})
    print(f"upstream: {kind}; cluster of 3 masters + 3 replicas, one Redis; load average {os.getloadavg()[0]:.1f}")
    half = tokens // 2
    keys = {name: [token["key"] for token in asyncio.run(create_tokens(url, tokens))]
            for name, url in (("cluster", on_cluster.url), ("one Redis", on_one.url))}
    rates: dict[str, list[float]] = {"cluster": [], "one Redis": []}
    for step, (name, url) in enumerate([("cluster", on_cluster.url), ("one Redis", on_one.url)] * 2):
        chunk = keys[name][(step // 2) * half:(step // 2 + 1) * half]
        rates[name].append(asyncio.run(miss_throughput(url, chunk)))
    print("\n| measurement | figure |\n|---|---:|")
    for name, values in rates.items():
        print(f"| cache-miss authentications/s, {name} (runs) | {' / '.join(f'{r:,.0f}' for r in values)} |")
    print(f"| cluster / one Redis (best runs) | {max(rates['cluster']) / max(rates['one Redis']):.2f} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=3000, help="tokens for the cache-miss runs (each)")
    parser.add_argument("--rounds", type=int, default=50, help="revocation rounds after the failover")
    parser.add_argument("--cluster", action="store_true", help="cache misses on a Redis Cluster against one Redis")
    args = parser.parse_args()
    tools = find_tools()
    if not tools["redis-server"]:
        raise SystemExit("redis-server is needed")
    workdir = Path(tempfile.mkdtemp(prefix="gw-scale-"))
    procs = Processes(workdir)
    try:
        if args.cluster:
            cluster_main(args.tokens, tools, procs)
            return
        upstream, _, kind = start_upstream(procs, tools)
        ports, servers, sentinel_ports = start_sentinel_set(procs, str(tools["redis-server"]))
        first = wait_settled(sentinel_ports)
        sentinel = {"sentinel": {"hosts": [f"{HOST}:{p}" for p in sentinel_ports], "service": SERVICE},
                    "key_prefix": PREFIX}
        a = start_gateway(procs, "gw-a", upstream, "", 1, settings={"redis": sentinel, "log": {"path": "off"}})
        b = start_gateway(procs, "gw-b", upstream, "", 1, settings={"redis": sentinel, "log": {"path": "off"}})
        direct = start_gateway(procs, "gw-direct", upstream, f"redis://{HOST}:{first}/0", 1,
                               settings={"log": {"path": "off"}})
        print(f"upstream: {kind}; master :{first}, replica, 3 sentinels; load average {os.getloadavg()[0]:.1f}")

        tokens = asyncio.run(create_tokens(a.url, 2 * args.tokens + 2000 + args.rounds + 100))
        keys = [token["key"] for token in tokens]
        # Alternate the two, twice: the machine is shared and its load moves.
        rates: dict[str, list[float]] = {"sentinel": [], "redis://": []}
        half = args.tokens // 2
        for step, (name, url) in enumerate([("sentinel", a.url), ("redis://", direct.url)] * 2):
            chunk = keys[step * half:(step + 1) * half]
            rates[name].append(asyncio.run(miss_throughput(url, chunk)))
        spare = keys[2 * args.tokens:2 * args.tokens + 2000]
        doomed = tokens[2 * args.tokens + 2000:2 * args.tokens + 2000 + 100]
        after = tokens[2 * args.tokens + 2000 + 100:]
        procs.stop(direct.process)

        old = master_port(sentinel_ports)
        victim = servers[ports.index(old)]
        revived: list[subprocess.Popen[bytes]] = []

        def kill() -> None:
            os.kill(victim.pid, signal.SIGKILL)

        def revive() -> None:  # as after a crash and restart: the sentinels make it a replica
            data = workdir / f"redis-{ports.index(old)}"
            revived.append(procs.start("redis-revived", [str(tools["redis-server"]), "--port", str(old), "--bind", HOST,
                                                          "--save", "", "--appendonly", "no", "--dir", str(data)]))
        seen = asyncio.run(failover(a.url, b.url, spare, doomed, kill, revive))
        wait_settled(sentinel_ports)
        later = asyncio.run(revocations_after(a.url, b.url, after))

        sentinel_rate = sorted(rates["sentinel"])[len(rates["sentinel"]) // 2]
        direct_rate = sorted(rates["redis://"])[len(rates["redis://"]) // 2]
        print("\n| measurement | figure |\n|---|---:|")
        for name in rates:
            print(f"| cache-miss authentications/s, {name} (runs) | {' / '.join(f'{r:,.0f}' for r in rates[name])} |")
        print(f"| sentinel / redis:// (best runs) | {max(rates['sentinel']) / max(rates['redis://']):.2f} |")
        first_ok = seen["first_ok"]
        target = (DOWN_AFTER_MS / 1000) + 1.0
        print(f"| master killed → first uncached 200 | {first_ok:.2f} s (down-after {DOWN_AFTER_MS} ms) |"
              if first_ok is not None else "| master killed → first uncached 200 | never |")
        if seen["unavailable"]:
            print(f"| uncached requests answered 503 | from {seen['unavailable'][0]:.2f} s to "
                  f"{seen['unavailable'][-1]:.2f} s after the kill ({len(seen['unavailable'])} requests) |")
        for label, values in (("during the failover", seen["during"]), ("after it", later)):
            if values:
                print(f"| revocation {label}: p50 / p99 / max ({len(values)} rounds) | "
                      f"{percentile(values, 50) * 1000:.1f} / {percentile(values, 99) * 1000:.1f} / "
                      f"{max(values) * 1000:.1f} ms |")
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}; sentinel/redis:// medians "
              f"{sentinel_rate:,.0f} / {direct_rate:,.0f}; first-200 target under {target:.1f} s + election")
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
