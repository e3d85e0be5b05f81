"""Redis Cluster, measured: three masters and three replicas on loopback (node timeout 1 s), a
gateway on it and one on a single Redis (one worker each, request logging off), and one run of:

1. cache-miss throughput (every key asked once) on the cluster against one Redis, alternated
   `--rounds` times: from a Python client, 32 at a time, and from wrk on 64 connections;
2. hot throughput (one cached key, wrk, 5 s) on both, alternated twice, with the Redis commands
   the cluster's masters ran meanwhile, per request;
3. `--bulk` tokens written straight into the cluster in the gateway's cluster layout (records,
   id, account and expiry indexes, as the tokens API writes them): how long, the keys and
   `used_memory` of each master, and cache-miss throughput with all of them there;
4. a master killed: the time until the first successful uncached authentication of a token it
   held, and how long such requests got 503; then revocation through the first gateway seen by a
   second one on the cluster, after the failover.

    python bench/cluster.py [--tokens 3000] [--wrk-tokens 100000] [--rounds 3] [--bulk 3000000]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import HOST, PREFIX
from harness.procs import Processes, cpu_seconds, free_port, wait_for_port
from harness.servers import start_gateway, start_upstream
from harness.tokens import fill_tokens, random_keys
from harness.tools import find_tools
from harness.wrk import parse_wrk
from harness.revocation import percentile
from scale import create_tokens, miss_throughput, revocation_round, start_cluster


def masters(ports: list[int]) -> dict[int, tuple[int, int]]:
    """master port -> (keys, used_memory bytes)."""
    import redis
    found = {}
    for port in ports:
        with redis.Redis(host=HOST, port=port, socket_timeout=5) as client:
            if client.execute_command("ROLE")[0] == b"master":
                found[port] = (int(client.dbsize()), int(client.info("memory")["used_memory"]))
    return found


def node_roles(ports: list[int]) -> dict[int, str]:
    """port -> "master" or "slave" (ROLE), for the nodes that answer."""
    import redis
    roles = {}
    for port in ports:
        try:
            with redis.Redis(host=HOST, port=port, socket_timeout=2) as client:
                roles[port] = client.execute_command("ROLE")[0].decode()
        except (redis.RedisError, OSError):
            pass
    return roles


def commands_processed(ports: list[int]) -> int:
    import redis
    total = 0
    for port in ports:
        try:
            with redis.Redis(host=HOST, port=port, socket_timeout=2) as client:
                if client.execute_command("ROLE")[0] == b"master":
                    total += int(client.info("stats")["total_commands_processed"])
        except (redis.RedisError, OSError):
            pass
    return total


def slot_owners(port: int) -> dict[int, int]:
    """slot -> master port."""
    import redis
    with redis.Redis(host=HOST, port=port, socket_timeout=5) as client:
        owners = {}
        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            for slot in range(int(start), int(end) + 1):
                owners[slot] = int(master[1])
    return owners


async def bulk_fill(ports: list[int], count: int, first_id: int, given: list[str] | None = None) -> float:
    """`count` tokens (of the `given` keys, else random ones) in the cluster layout, sent per master
    on the gateway's lean client."""
    import orjson
    from redis.crc import key_slot

    from gateway.api.validation import DEFAULTS
    from gateway.store.keys import ClusterKeys
    from gateway.store.resp import RespClient
    from gateway.store.tokens import expires_at
    from gateway.tokens import key_digest

    keys = ClusterKeys(PREFIX)
    started = time.perf_counter()
    now = int(time.time())
    chunk = 10_000
    stalls = 0
    for start in range(0, count, chunk):
        commands: list[tuple[str, tuple[Any, ...]]] = []  # (key, command)
        ids = []
        size = min(chunk, count - start)
        for offset, key in enumerate(given[start:start + size] if given is not None else random_keys(size)):
            token_id = first_id + start + offset
            digest = key_digest(key)
            record = {**DEFAULTS, "ttl": 86400, "info": "", "id": token_id, "digest": digest, "created": now,
                      "accessed": 0, "cid": 0}
            name = keys.token(digest)
            ids_key, expiry_key = keys.ids_of(token_id), keys.expiry_of(token_id)
            commands += [(ids_key, ("HSET", ids_key, token_id, digest)),
                         (expiry_key, ("ZADD", expiry_key, expires_at(record), token_id)),
                         (name, ("SET", name, orjson.dumps(record)))]
            ids.append(token_id)
        account_key = keys.account_tokens(0)
        commands.append((account_key, ("SADD", account_key, *ids)))
        while True:  # the writes are idempotent: a chunk refused (a node too busy to answer its
            try:     # peers in time, on a loaded machine) is written again where the slots are now
                owners = slot_owners(ports[0])
                per_node: dict[int, list[tuple[Any, ...]]] = {}
                for name, command in commands:
                    per_node.setdefault(owners[key_slot(name.encode())], []).append(command)
                clients = [RespClient(f"redis://{HOST}:{port}/0", 60, 5) for port in per_node]
                try:
                    await asyncio.gather(*(client.execute(part) for client, part in zip(clients, per_node.values(),
                                                                                         strict=True)))
                finally:
                    for client in clients:
                        await client.close()
                break
            except Exception:
                stalls += 1
                if stalls > 20:
                    raise
                await asyncio.sleep(2)
    owners = slot_owners(ports[0])
    with_next = RespClient(f"redis://{HOST}:{owners[key_slot(keys.next_id.encode())]}/0", 10, 5)
    await with_next.execute([("SET", keys.next_id, first_id + count)])
    await with_next.close()
    if stalls:
        print(f"(bulk fill: {stalls} chunks written again after the cluster refused them)")
    return time.perf_counter() - started


def wrk_misses(wrk: str, url: str, keys: list[str], workdir: Path, seconds: int) -> tuple[float, int]:
    """Uncached authentications a second with wrk (C, one thread, 64 connections) for `seconds`:
    the keys in order (random_tokens.lua `seq`), each asked once (refused if wrk got through all
    of them). The load generator's CPU is a fraction of the Python client's, so more of the two
    cores is left to the gateway and Redis, and misses come in the batches a loaded gateway makes."""
    path = workdir / f"miss-keys-{time.monotonic_ns()}.txt"
    path.write_text("\n".join(keys) + "\n")
    script = Path(__file__).resolve().parent / "random_tokens.lua"
    result = subprocess.run([wrk, "-t1", "-c64", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
                             url + "/bench/miss", "--", str(path), "seq"], capture_output=True, text=True,
                            timeout=seconds + 60)
    parsed = parse_wrk(result.stdout)
    if parsed.errors:
        raise RuntimeError(f"cache-miss run (wrk): {parsed.errors} errors\n{result.stdout}")
    if parsed.requests >= len(keys):
        raise RuntimeError(f"cache-miss run (wrk): {parsed.requests:,} requests for {len(keys):,} keys; "
                           "give --wrk-tokens more")
    return parsed.rps, parsed.requests


async def revocations_after(url_a: str, url_b: str, rounds: int) -> list[float]:
    """Seconds from a DELETE answered by gateway A until gateway B (which had the token cached)
    refuses it, for `rounds` new tokens."""
    import aiohttp
    tokens = await create_tokens(url_a, rounds)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as a, aiohttp.ClientSession(timeout=timeout) as b:
        found = [await revocation_round(a, b, url_a, url_b, token, time.monotonic() + 10) for token in tokens]
    return [seconds for seconds in found if seconds is not None]


def hot_rps(wrk: str, url: str, key: str, seconds: int = 5) -> tuple[float, int]:
    result = subprocess.run([wrk, "-t1", "-c32", f"-d{seconds}s", "-H", f"Authorization: FlespiToken {key}",
                             url + "/bench/hot"], capture_output=True, text=True, timeout=seconds + 30)
    parsed = parse_wrk(result.stdout)
    if parsed.errors:
        raise RuntimeError(f"hot run: {parsed.errors} errors")
    return parsed.rps, parsed.requests


async def kill_master(url: str, ports: list[int], spare: list[str], nodes: dict[int, Any]) -> dict[str, Any]:
    """Kill the master that holds most of `spare` (uncached keys), then ask for them one after
    another until one is answered 200."""
    import aiohttp
    from redis.crc import key_slot

    from gateway.store.keys import ClusterKeys
    from gateway.tokens import key_digest
    keys = ClusterKeys(PREFIX)
    owners = slot_owners(ports[0])
    by_master: dict[int, list[str]] = {}
    for key in spare:
        by_master.setdefault(owners[key_slot(keys.token(key_digest(key)).encode())], []).append(key)
    victim = max(by_master, key=lambda port: len(by_master[port]))
    candidates = by_master[victim]
    unavailable: list[float] = []
    others: list[int] = []
    timeout = aiohttp.ClientTimeout(total=3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        nodes[victim].kill()
        killed = time.perf_counter()
        for key in candidates:
            sent = time.perf_counter()
            try:
                headers = {"Authorization": f"FlespiToken {key}"}
                async with session.get(url + "/bench/failover", headers=headers) as reply:
                    await reply.read()
                    status = reply.status
            except (TimeoutError, aiohttp.ClientError):
                status = -1
            if status == 200:
                return {"victim": victim, "first_ok": time.perf_counter() - killed, "unavailable": unavailable,
                        "other": others}
            if status == 503:
                unavailable.append(sent - killed)
            else:
                others.append(status)
            await asyncio.sleep(0.01)
    return {"victim": victim, "first_ok": None, "unavailable": unavailable, "other": others}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=3000, help="tokens per cache-miss run of the Python client")
    parser.add_argument("--wrk-tokens", type=int, default=100000,
                        help="tokens per cache-miss run of wrk, more than it asks for in --wrk-seconds (0: none)")
    parser.add_argument("--wrk-seconds", type=int, default=3, help="length of a cache-miss run of wrk")
    parser.add_argument("--revocations", type=int, default=40, help="revocation rounds after the failover")
    parser.add_argument("--rounds", type=int, default=3, help="cache-miss runs on each")
    parser.add_argument("--bulk", type=int, default=3_000_000, help="tokens written straight into the cluster")
    args = parser.parse_args()
    tools = find_tools()
    if not tools["redis-server"] or not tools["wrk"]:
        raise SystemExit("redis-server and wrk are needed")
    workdir = Path(tempfile.mkdtemp(prefix="gw-cluster-"))
    procs = Processes(workdir)
    redis_server = str(tools["redis-server"])
    try:
        upstream, _, kind = start_upstream(procs, tools)
        ports = start_cluster(procs, redis_server)
        nodes = {port: process for (name, process) in procs.running if name.startswith("node-")
                 for port in [ports[int(name.split("-")[1])]]}
        single_port = free_port()
        single = workdir / "single"
        single.mkdir()
        wait_for_port(single_port, procs.start("redis-single", [
            redis_server, "--port", str(single_port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(single)]))
        cluster = {"cluster": {"nodes": [f"{HOST}:{port}" for port in ports[:3]]}, "key_prefix": PREFIX}
        on_cluster = start_gateway(procs, "gw-cluster", upstream, "", 1,
                                   settings={"redis": cluster, "log": {"path": "off"}})
        second = start_gateway(procs, "gw-cluster-2", upstream, "", 1,
                               settings={"redis": cluster, "log": {"path": "off"}})
        on_one = start_gateway(procs, "gw-single", upstream, f"redis://{HOST}:{single_port}/0", 1,
                               settings={"log": {"path": "off"}})
        print(f"# bench/cluster.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; upstream: {kind}; "
              f"load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores, shared")
        made = {name: [token["key"] for token in asyncio.run(create_tokens(url, args.tokens * args.rounds + 1500))]
                for name, url in (("cluster", on_cluster.url), ("one Redis", on_one.url))}
        # wrk's keys are written straight into each store (the API would take minutes for them).
        filled = {name: random_keys(args.wrk_tokens * args.rounds) for name in made}
        asyncio.run(bulk_fill(ports, len(filled["cluster"]), 5_000_000, filled["cluster"]))
        asyncio.run(fill_tokens(f"redis://{HOST}:{single_port}/0", filled["one Redis"]))
        gateways = {"cluster": on_cluster, "one Redis": on_one}
        # Each store's processes, for the Redis CPU a miss costs (10 ms ticks: over a run of
        # thousands of misses, a fraction of a µs each).
        nodes_by_pid = {process.pid: port for port, process in nodes.items()}
        store_pids = {"cluster": list(nodes_by_pid),
                      "one Redis": [process.pid for name, process in procs.running if name == "redis-single"]}
        rows: list[tuple[str, str]] = []
        for client, size in (("Python client, 32 at a time", args.tokens), ("wrk, 64 connections", args.wrk_tokens)):
            if not size:
                continue
            rates: dict[str, list[float]] = {"cluster": [], "one Redis": []}
            miss_cpu: dict[str, list[float]] = {"cluster": [], "one Redis": []}
            redis_cpu: dict[str, list[tuple[float, float]]] = {"cluster": [], "one Redis": []}
            for step in range(args.rounds):
                for name, gateway in gateways.items():
                    before = cpu_seconds(gateway.worker_pids())
                    store = store_pids[name]
                    store_before = {pid: cpu_seconds([pid]) for pid in store}
                    if client.startswith("wrk"):
                        chunk = filled[name][step * size:(step + 1) * size]
                        rate, answered = wrk_misses(str(tools["wrk"]), gateway.url, chunk, workdir, args.wrk_seconds)
                    else:
                        chunk = made[name][step * size:(step + 1) * size]
                        rate, answered = asyncio.run(miss_throughput(gateway.url, chunk)), len(chunk)
                    rates[name].append(rate)
                    miss_cpu[name].append((cpu_seconds(gateway.worker_pids()) - before) / answered * 1e6)
                    roles = node_roles(ports) if name == "cluster" else {}
                    spent = {pid: (cpu_seconds([pid]) - store_before[pid]) / answered * 1e6 for pid in store}
                    replicas = sum(value for pid, value in spent.items() if roles.get(nodes_by_pid.get(pid)) == "slave")
                    redis_cpu[name].append((sum(spent.values()) - replicas, replicas))
            rows += [(f"cache-miss authentications/s, {name}, {client} (runs)",
                      " / ".join(f"{r:,.0f}" for r in values)) for name, values in rates.items()]
            medians = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
            rows.append((f"cache-miss, cluster / one Redis, {client} (best runs; medians)",
                         f"{max(rates['cluster']) / max(rates['one Redis']):.2f}; "
                         f"{medians['cluster'] / medians['one Redis']:.2f}"))
            rows += [(f"gateway CPU µs per cache miss, {name}, {client} (runs)",
                      " / ".join(f"{v:,.0f}" for v in values)) for name, values in miss_cpu.items()]
            rows += [(f"Redis CPU µs per cache miss, {name}, {client}: masters + replicas (runs)",
                      " / ".join(f"{own:,.0f} + {copies:,.0f}" for own, copies in values))
                     for name, values in redis_cpu.items()]
        hot: dict[str, list[float]] = {"cluster": [], "one Redis": []}
        hot_cpu: dict[str, list[float]] = {"cluster": [], "one Redis": []}
        per_request: list[float] = []
        hot_keys = {"cluster": made["cluster"][-1], "one Redis": made["one Redis"][-1]}
        for _ in range(2):
            for name, gateway in gateways.items():
                before = commands_processed(ports) if name == "cluster" else 0
                cpu_before = cpu_seconds(gateway.worker_pids())
                rps, requests = hot_rps(str(tools["wrk"]), gateway.url, hot_keys[name])
                hot_cpu[name].append((cpu_seconds(gateway.worker_pids()) - cpu_before) / max(1, requests) * 1e6)
                hot[name].append(rps)
                if name == "cluster":
                    per_request.append((commands_processed(ports) - before) / max(1, requests))
        rows += [(f"hot (cached) requests/s, {name} (runs)", " / ".join(f"{r:,.0f}" for r in values))
                 for name, values in hot.items()]
        rows.append(("hot, cluster / one Redis (best runs)", f"{max(hot['cluster']) / max(hot['one Redis']):.2f}"))
        rows += [(f"gateway CPU µs per hot request, {name} (runs)", " / ".join(f"{v:,.0f}" for v in values))
                 for name, values in hot_cpu.items()]
        rows.append(("Redis commands per hot request on the cluster (all masters; background included)",
                     " / ".join(f"{value:.4f}" for value in per_request)))
        spare = made["cluster"][args.tokens * args.rounds:-1]
        if args.bulk:
            seconds = asyncio.run(bulk_fill(ports, args.bulk, 10_000_000))
            rows.append((f"{args.bulk:,} tokens written straight into the cluster", f"{seconds:,.0f} s"))
            for port, (keys, memory) in sorted(masters(ports).items()):
                rows.append((f"master :{port}: keys, used_memory", f"{keys:,}, {memory / 2**20:,.0f} MiB"))
            sample = random.sample(spare, min(1000, len(spare) - 300))
            spare = [key for key in spare if key not in sample]
            rows.append((f"cache-miss authentications/s with {args.bulk:,} more tokens there (one run)",
                         f"{asyncio.run(miss_throughput(on_cluster.url, sample)):,.0f}"))
        failover = asyncio.run(kill_master(on_cluster.url, ports, spare, nodes))
        first_ok = failover["first_ok"]
        rows.append((f"master :{failover['victim']} killed: first successful uncached authentication after",
                     "none" if first_ok is None else f"{first_ok:.2f} s"))
        unavailable = failover["unavailable"]
        rows.append(("503 answers for its tokens meanwhile (first, last)",
                     f"{len(unavailable)} ({unavailable[0]:.2f} s, {unavailable[-1]:.2f} s)" if unavailable else "0"))
        if failover["other"]:
            rows.append(("other answers meanwhile", str(sorted(set(failover["other"])))))
        seen = asyncio.run(revocations_after(on_cluster.url, second.url, args.revocations))
        if seen:
            rows.append((f"after the failover: revocation through one gateway seen by the other, p50 / p99 / max "
                         f"({len(seen)} of {args.revocations} rounds)",
                         " / ".join(f"{percentile(seen, q) * 1000:.1f}" for q in (50, 99)) +
                         f" / {max(seen) * 1000:.1f} ms"))
        print("\n| measurement | figure |\n|---|---:|")
        for name, value in rows:
            print(f"| {name} | {value} |")
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
