"""Redis Cluster, measured: three masters and three replicas on loopback (node timeout 1 s), a
gateway on it, one on a single Redis and one on a single Redis with a replica (one worker each,
request logging off), and one run of:

1. cache-miss throughput (every key asked once) on the cluster against one Redis, and against
   one Redis with a replica (as each master has one, its CPU taken from the same cores),
   alternated `--rounds` times: from a Python client, 32 at a time, and from wrk on 64 connections;
2. hot throughput (one cached key, wrk, 5 s) on both, alternated twice, with the Redis commands
   the cluster's masters ran meanwhile, per request;
3. `--bulk` tokens written straight into the cluster in the gateway's cluster layout (records,
   id, account and expiry indexes, as the tokens API writes them): how long, the keys and
   `used_memory` of each master, and cache-miss throughput with all of them there;
4. a master killed: the time until the first successful uncached authentication of a token it
   held, and how long such requests got 503; meanwhile, and for a second after that 200,
   revocations through the first gateway of tokens cached in both (their records on the killed
   master and elsewhere; a round of each kind started every 0.1 s, the DELETE retried until
   acknowledged): how long the second gateway still accepts them, from the acknowledgement and
   from the first try, and any 200 for a token after its revocation was acknowledged; then
   revocation through the first gateway seen by the second, after the failover.

    python bench/cluster.py [--tokens 3000] [--wrk-tokens 100000] [--rounds 3] [--bulk 3000000]
                            [--kill-shared] [--details rounds.jsonl] [--pin]

With `--pin` the gateways run on the first core and everything else (Redis, the upstream, wrk,
this script) on the last: Redis's CPU then no longer comes out of the gateway's, as when the
masters run on machines of their own, and the gateways' throughput is compared alone.

The master killed is the one holding most of the spare tokens, or with `--kill-shared` the one
holding the prefix's own slot: the invalidation channel (each gateway's subscription, and every
DELETE's PUBLISH), `next_id` and the accounts. `--details` writes every revocation round during
the failover (its DELETE answers, every request to A and B with its status) as JSON lines.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import HOST, PREFIX
from harness.procs import Processes, cpu_seconds, free_port, pin, process_tree, wait_for_port
from harness.revocation import delete_until_acknowledged, percentile, revocation_round
from harness.servers import start_gateway, start_upstream
from harness.tokens import fill_tokens, random_keys
from harness.tools import find_tools
from harness.wrk import parse_wrk
from scale import create_tokens, miss_throughput, start_cluster

ONE, PAIRED = "one Redis", "one Redis + replica"


def start_single(procs: Processes, redis_server: str, workdir: Path, name: str,
                 replica: bool = False) -> tuple[int, int | None]:
    """A Redis of its own (`redis-<name>`), and with `replica` one replicating it: their ports."""
    ports: list[int] = []
    for role in ("", "-replica") if replica else ("",):
        port = free_port()
        folder = workdir / f"{name}{role}"
        folder.mkdir()
        follow = ["--replicaof", HOST, str(ports[0])] if role else []
        wait_for_port(port, procs.start(f"redis-{name}{role}", [
            redis_server, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(folder), *follow]))
        ports.append(port)
    return ports[0], ports[1] if replica else None


def wait_synced(master: int, replica: int, timeout: float = 60.0) -> None:
    """Until the replica at `replica` follows its master and has all it was sent so far."""
    import redis
    deadline = time.monotonic() + timeout
    with redis.Redis(host=HOST, port=master, socket_timeout=5) as source, \
            redis.Redis(host=HOST, port=replica, socket_timeout=5) as copy:
        while time.monotonic() < deadline:
            sent = int(source.info("replication")["master_repl_offset"])
            info = copy.info("replication")
            if info.get("master_link_status") == "up" and int(info.get("slave_repl_offset", -1)) >= sent:
                return
            time.sleep(0.2)
    raise SystemExit(f"the replica on :{replica} did not catch up")


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
    on the gateway's lean client; each used a minute ago (its `accessed`), as in a store in use:
    a store whose `used` buckets are new holds them as small listpacks, searched key by key, and
    that early phase would be measured instead of the store's."""
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
            used_key = keys.used_of(digest)
            commands += [(ids_key, ("HSET", ids_key, token_id, digest)),
                         (expiry_key, ("ZADD", expiry_key, expires_at(record), token_id)),
                         (name, ("SET", name, orjson.dumps(record))),
                         (used_key, ("HSET", used_key, digest, now - 60))]
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


def victim_for(ports: list[int], spare: list[str], shared: bool = False) -> tuple[int, list[str]]:
    """The master that holds most of `spare` (uncached keys), or with `shared` the one that holds
    the prefix's own slot (the invalidation channel, `next_id`, accounts), and those of the keys
    it holds."""
    from redis.crc import key_slot

    from gateway.store.keys import ClusterKeys
    owners = slot_owners(ports[0])
    by_master: dict[int, list[str]] = {}
    for key in spare:
        by_master.setdefault(record_master(owners, key_digest_of(key)), []).append(key)
    victim = owners[key_slot(ClusterKeys(PREFIX).channel.encode())] if shared else \
        max(by_master, key=lambda port: len(by_master[port]))
    return victim, by_master.get(victim, [])


async def kill_master(url: str, victim: int, candidates: list[str], nodes: dict[int, Any],
                      alongside: Callable[[float, asyncio.Event], Awaitable[Any]] | None = None) -> dict[str, Any]:
    """Kill the master `victim`, then ask for its uncached keys `candidates` one after another
    until one is answered 200; `alongside(killed, served)`, if given, runs meanwhile (`served` is
    set at that 200) and its result is the answer's "alongside"."""
    import aiohttp
    unavailable: list[float] = []
    others: list[int] = []
    first_ok: float | None = None
    served = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=3)

    async def first_uncached(session: aiohttp.ClientSession, killed: float) -> None:
        nonlocal first_ok
        for key in candidates:
            sent = time.perf_counter()
            status = await status_of(session, url + "/bench/failover", key)
            if status == 200:
                first_ok = time.perf_counter() - killed
                break
            if status == 503:
                unavailable.append(sent - killed)
            else:
                others.append(status)
            await asyncio.sleep(0.01)
        served.set()

    async with aiohttp.ClientSession(timeout=timeout) as session:
        nodes[victim].kill()
        killed = time.perf_counter()
        _, besides = await asyncio.gather(first_uncached(session, killed),
                                          alongside(killed, served) if alongside is not None else asyncio.sleep(0))
    return {"victim": victim, "killed": killed, "first_ok": first_ok, "unavailable": unavailable, "other": others,
            "alongside": besides}


async def status_of(session: Any, url: str, key: str) -> int:
    """The status of one authentication; -1 when no answer came."""
    import aiohttp
    try:
        async with session.get(url, headers={"Authorization": f"FlespiToken {key}"}) as reply:
            await reply.read()
            return int(reply.status)
    except (TimeoutError, aiohttp.ClientError):
        return -1


def key_digest_of(key: str) -> str:
    from gateway.tokens import key_digest
    return key_digest(key)


def record_master(owners: dict[int, int], digest: str) -> int:
    """The master port that holds a token's record."""
    from redis.crc import key_slot

    from gateway.store.keys import ClusterKeys
    return owners[key_slot(ClusterKeys(PREFIX).token(digest).encode())]


def delete_masters(owners: dict[int, int], token: dict[str, Any]) -> set[int]:
    """The masters a DELETE of `token` writes to (store/sharded.py `remove`, then the PUBLISH,
    which redis-py sends to the channel's slot): its bin, record, indexes and account set."""
    from redis.crc import key_slot

    from gateway.store.keys import ClusterKeys
    keys, token_id, digest = ClusterKeys(PREFIX), int(token["id"]), key_digest_of(token["key"])
    names = [keys.bin_of(token_id), keys.token(digest), keys.ids_of(token_id), keys.account_tokens(0),
             keys.used_of(digest), keys.expiry_of(token_id), keys.channel]
    return {owners[key_slot(name.encode())] for name in names}


ON_VICTIM, ELSEWHERE = "record on the killed master", "record on another master"


@dataclass
class Watched:
    """One revocation during the failover (perf_counter times)."""
    kind: str
    key: str
    first_try: float
    acked: float | None = None
    refused: float | None = None  # B's first 401 of the refusals it kept to
    wrong: int = 0  # 200 answers, by A or B, to requests sent after the DELETE was acknowledged
    answers: list[tuple[int, str]] = field(default_factory=list)  # the DELETE's, in order
    writes_victim: bool = False  # the DELETE writes to the killed master (record, index, set, channel)
    seen: dict[str, int] = field(default_factory=dict)  # "B 401 after": answers by gateway, status, to the ack
    polls: list[tuple[str, float, float, int]] = field(default_factory=list)  # gateway, sent, answered, status


async def watched_revocation(a: Any, b: Any, url_a: str, url_b: str, token: dict[str, Any], kind: str,
                             writes_victim: bool, deadline: float) -> Watched:
    """DELETE through A, retried until acknowledged, while B is asked for the token every 20 ms;
    from the acknowledgement, B and A back to back until both refuse it. Every 200 to a request
    sent after the acknowledgement is a wrong answer."""
    deleting = asyncio.ensure_future(delete_until_acknowledged(a, url_a, token["id"], deadline))
    round_ = Watched(kind, token["key"], time.perf_counter(), writes_victim=writes_victim)
    refused_by_a = False
    while time.monotonic() < deadline:
        acked = deleting.result()[1] if deleting.done() else None
        if deleting.done() and acked is None:  # never acknowledged
            break
        sent = time.perf_counter()
        status = await status_of(b, url_b + "/bench/revoke", token["key"])
        round_.polls.append(("B", sent, time.perf_counter(), status))
        tally(round_.seen, f"B {status} {'after' if acked is not None and sent > acked else 'before'}")
        if status == 401:
            round_.refused = round_.refused or time.perf_counter()
        elif status == 200:
            round_.refused = None
            round_.wrong += int(acked is not None and sent > acked)
        if acked is None:
            await asyncio.sleep(0.02)
            continue
        sent = time.perf_counter()
        status = await status_of(a, url_a + "/bench/revoke", token["key"])
        round_.polls.append(("A", sent, time.perf_counter(), status))
        tally(round_.seen, f"A {status} after")
        refused_by_a = refused_by_a or status == 401
        round_.wrong += int(status == 200 and sent > acked)
        if refused_by_a and round_.refused is not None:
            break
    round_.first_try, round_.acked, round_.answers = await deleting
    return round_


def tally(counts: dict[str, int], name: str) -> None:
    counts[name] = counts.get(name, 0) + 1


async def revocations_during(url_a: str, url_b: str, doomed: dict[str, list[tuple[dict[str, Any], bool]]],
                             killed: float, served: asyncio.Event, pace: float = 0.1, after: float = 1.0,
                             limit: float = 15.0) -> list[Watched]:
    """From the kill, a revocation round of each kind started every `pace` (all in flight at
    once), until `after` seconds past the first 200 for the killed master's tokens (or `limit`
    past the kill, or the tokens run out)."""
    import aiohttp
    timeout = aiohttp.ClientTimeout(total=3)
    queues = {kind: iter(tokens) for kind, tokens in doomed.items()}
    rounds: list[asyncio.Future[Watched]] = []
    served_at: float | None = None
    async with aiohttp.ClientSession(timeout=timeout) as a, aiohttp.ClientSession(timeout=timeout) as b:
        while time.perf_counter() - killed < limit:
            if served.is_set():
                served_at = served_at or time.perf_counter()
                if time.perf_counter() - served_at > after:
                    break
            started = 0
            for kind, queue in queues.items():
                item = next(queue, None)
                if item is not None:
                    token, writes_victim = item
                    rounds.append(asyncio.ensure_future(watched_revocation(
                        a, b, url_a, url_b, token, kind, writes_victim, time.monotonic() + limit)))
                    started += 1
            if not started:
                break
            await asyncio.sleep(pace)
        return list(await asyncio.gather(*rounds))


async def cache_in_both(urls: list[str], tokens: list[dict[str, Any]]) -> None:
    """Every token asked once of each gateway, which caches it; all must be answered 200."""
    import aiohttp
    async with aiohttp.ClientSession() as session:
        for url in urls:
            for token in tokens:
                status = await status_of(session, url + "/bench/revoke", token["key"])
                if status != 200:
                    raise RuntimeError(f"caching a token for the failover's revocations: {status}")


async def still_accepted(urls: list[str], keys: list[str]) -> int:
    """How many answers 200 the (revoked) keys get, each asked once of each gateway."""
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        statuses = [await status_of(session, url + "/bench/revoke", key) for key in keys for url in urls]
    return sum(status == 200 for status in statuses)


def doomed_by_kind(ports: list[int], victim: int, tokens: list[dict[str, Any]],
                   per_kind: int) -> dict[str, list[tuple[dict[str, Any], bool]]]:
    """`per_kind` tokens whose records the victim holds and as many held elsewhere, each with
    whether its DELETE writes to the victim at all."""
    owners = slot_owners(ports[0])
    doomed: dict[str, list[tuple[dict[str, Any], bool]]] = {ON_VICTIM: [], ELSEWHERE: []}
    for token in tokens:
        kind = ON_VICTIM if record_master(owners, key_digest_of(token["key"])) == victim else ELSEWHERE
        doomed[kind].append((token, victim in delete_masters(owners, token)))
    return {kind: found[:per_kind] for kind, found in doomed.items()}


def during_rows(rounds: list[Watched], wrong_later: int) -> list[tuple[str, str]]:
    """The table's rows for the revocations during the failover."""
    rows: list[tuple[str, str]] = []
    for kind in (ON_VICTIM, ELSEWHERE):
        mine = [r for r in rounds if r.kind == kind]
        done = [r for r in mine if r.acked is not None and r.refused is not None]
        writing = sum(r.writes_victim for r in mine)
        rows.append((f"during the failover, {kind}: rounds (acknowledged and refused by B; DELETE writing to the "
                     "killed master; DELETE answers other than 200)",
                     f"{len(mine)} ({len(done)}; {writing}; {sum(s != 200 for r in mine for s, _ in r.answers)})"))
        for label, seen in (("acknowledgement", [refused_after(r, r.acked) for r in done]),
                            ("first try", [refused_after(r, r.first_try) for r in done])):
            if seen:
                rows.append((f"during the failover, {kind}: until B refuses, from the DELETE's {label}, "
                             "p50 / p99 / max", ms_triple(seen)))
        refusals: dict[str, int] = {}
        for r in mine:
            for status, body in r.answers:
                if status != 200:
                    reason = f"{status} {answer_reason(body)}"
                    refusals[reason] = refusals.get(reason, 0) + 1
        if refusals:
            rows.append((f"during the failover, {kind}: DELETE answers other than 200",
                         "; ".join(f"{reason}: {count}" for reason, count in sorted(refusals.items()))))
    wrong = sum(r.wrong for r in rounds)
    rows.append(("during the failover: 200 answers (A or B) for a token after its revocation was acknowledged; "
                 "then, the failover over, revoked tokens some gateway still accepts",
                 f"{wrong} in {sum(r.wrong > 0 for r in rounds)} rounds; {wrong_later}"))
    return rows


def shared_slots_on(ports: list[int], victim: int) -> str:
    """Whether the victim holds the invalidation channel's slot and the bench account's token set,
    which every DELETE writes to."""
    from redis.crc import key_slot

    from gateway.store.keys import ClusterKeys
    keys, owners = ClusterKeys(PREFIX), slot_owners(ports[0])
    return "; ".join(f"{name} {'yes' if owners[key_slot(key.encode())] == victim else 'no'}"
                     for name, key in (("channel", keys.channel), ("account set", keys.account_tokens(0))))


def write_details(path: Path, rounds: list[Watched], killed: float) -> None:
    """Every revocation round during the failover, a JSON line each, times in seconds from the kill."""
    import orjson
    with path.open("wb") as out:
        for r in rounds:
            out.write(orjson.dumps({
                "kind": r.kind, "writes_victim": r.writes_victim, "first_try": r.first_try - killed,
                "acked": None if r.acked is None else r.acked - killed,
                "refused": None if r.refused is None else r.refused - killed, "wrong": r.wrong, "seen": r.seen,
                "polls": [[name, round(sent - killed, 4), round(got - killed, 4), status]
                          for name, sent, got, status in r.polls],
                "answers": [[status, body[:200]] for status, body in r.answers]}) + b"\n")


def logged_errors(path: Path) -> str:
    """Each distinct error a gateway logged: its message and the last lines of its traceback."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    seen: dict[str, None] = {}
    for index, line in enumerate(lines):
        if " ERROR " in line:
            end = next((at for at in range(index + 1, len(lines)) if lines[at][:4].isdigit()), len(lines))
            seen[" / ".join([line.split(" ERROR ", 1)[1], *lines[max(index + 1, end - 2):end]])] = None
    return "\n".join(f"- {entry}" for entry in seen)


def wrong_rounds(rounds: list[Watched], killed: float, most: int = 10) -> list[str]:
    """What the rounds with a wrong answer saw, seconds from the kill: the evidence."""
    lines = []
    for r in [r for r in rounds if r.wrong][:most]:
        answers = ", ".join(f"{status} {body[:70]!r}" for status, body in r.answers)
        acked, refused = (f"{at - killed:.3f} s" if at is not None else "never" for at in (r.acked, r.refused))
        lines.append(f"- {r.kind} (DELETE writes to the killed master: {r.writes_victim}): first try "
                     f"{r.first_try - killed:.3f} s, acknowledged {acked}, B refused {refused}, "
                     f"{r.wrong} wrong answers; DELETE answers: {answers}")
    return lines


def refused_after(round_: Watched, start: float | None) -> float:
    """Seconds from `start` until B refused (0 if it refused before)."""
    assert round_.refused is not None and start is not None
    return max(0.0, round_.refused - start)


def answer_reason(body: str) -> str:
    """An error answer's reason (flespi-style body), else its start."""
    import orjson
    try:
        return str(orjson.loads(body)["errors"][0]["reason"])
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return body[:60]


def ms_triple(seconds: list[float]) -> str:
    return " / ".join(f"{percentile(seconds, q) * 1000:.1f}" for q in (50, 99)) + f" / {max(seconds) * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=3000, help="tokens per cache-miss run of the Python client")
    parser.add_argument("--wrk-tokens", type=int, default=100000,
                        help="tokens per cache-miss run of wrk, more than it asks for in --wrk-seconds (0: none)")
    parser.add_argument("--wrk-seconds", type=int, default=3, help="length of a cache-miss run of wrk")
    parser.add_argument("--revocations", type=int, default=40, help="revocation rounds after the failover")
    parser.add_argument("--failover-revocations", type=int, default=60,
                        help="tokens of each kind for the revocations during the failover (at most)")
    parser.add_argument("--kill-shared", action="store_true",
                        help="kill the master of the prefix's own slot (the invalidation channel), not the one "
                             "with most spare tokens")
    parser.add_argument("--details", help="a file for every revocation round during the failover (JSON lines)")
    parser.add_argument("--rounds", type=int, default=3, help="cache-miss runs on each")
    parser.add_argument("--bulk", type=int, default=3_000_000, help="tokens written straight into the cluster")
    parser.add_argument("--pin", action="store_true",
                        help="the gateways on the first core, everything else on the last (2 cores or more)")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.pin:
        if len(cores) < 2:
            raise SystemExit("--pin needs two cores")
        pin([os.getpid()], {cores[-1]})  # inherited by every process started from here
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
        # Two baselines: one Redis alone, and one Redis with a replica as each cluster master has
        # (on this machine the replicas' CPU is taken from the same two cores as everything else).
        single_port, _ = start_single(procs, redis_server, workdir, "single")
        paired_port, paired_replica = start_single(procs, redis_server, workdir, "paired", replica=True)
        cluster = {"cluster": {"nodes": [f"{HOST}:{port}" for port in ports[:3]]}, "key_prefix": PREFIX}
        on_cluster = start_gateway(procs, "gw-cluster", upstream, "", 1,
                                   settings={"redis": cluster, "log": {"path": "off"}})
        second = start_gateway(procs, "gw-cluster-2", upstream, "", 1,
                               settings={"redis": cluster, "log": {"path": "off"}})
        singles = {ONE: single_port, PAIRED: paired_port}
        on_single = {name: start_gateway(procs, f"gw-single-{index}", upstream, f"redis://{HOST}:{port}/0", 1,
                                         settings={"log": {"path": "off"}})
                     for index, (name, port) in enumerate(singles.items())}
        if args.pin:
            for gateway in (on_cluster, second, *on_single.values()):
                pin(process_tree(gateway.process.pid), {cores[0]})
        print(f"# bench/cluster.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; upstream: {kind}; "
              f"load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores, shared"
              + (f"; gateways pinned to core {cores[0]}, the rest to core {cores[-1]}" if args.pin else ""))
        gateways = {"cluster": on_cluster, **on_single}
        wanted = args.tokens * args.rounds + 1500
        made = {name: [token["key"] for token in asyncio.run(create_tokens(gateway.url, wanted))]
                for name, gateway in gateways.items()}
        # wrk's keys are written straight into each store (the API would take minutes for them).
        filled = {name: random_keys(args.wrk_tokens * args.rounds) for name in made}
        asyncio.run(bulk_fill(ports, len(filled["cluster"]), 5_000_000, filled["cluster"]))
        for name, port in singles.items():
            asyncio.run(fill_tokens(f"redis://{HOST}:{port}/0", filled[name]))
        if paired_replica is not None:
            wait_synced(paired_port, paired_replica)
        # Each store's processes, for the Redis CPU a miss costs (10 ms ticks: over a run of
        # thousands of misses, a fraction of a µs each).
        nodes_by_pid = {process.pid: port for port, process in nodes.items()}
        store_pids = {"cluster": list(nodes_by_pid),
                      ONE: [process.pid for name, process in procs.running if name == "redis-single"],
                      PAIRED: [process.pid for name, process in procs.running if name.startswith("redis-paired")]}
        replica_pids = {process.pid for name, process in procs.running if name == "redis-paired-replica"}
        rows: list[tuple[str, str]] = []
        for client, size in (("Python client, 32 at a time", args.tokens), ("wrk, 64 connections", args.wrk_tokens)):
            if not size:
                continue
            rates: dict[str, list[float]] = {name: [] for name in gateways}
            miss_cpu: dict[str, list[float]] = {name: [] for name in gateways}
            redis_cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in gateways}
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
                    replicas = sum(value for pid, value in spent.items()
                                   if roles.get(nodes_by_pid.get(pid)) == "slave" or pid in replica_pids)
                    redis_cpu[name].append((sum(spent.values()) - replicas, replicas))
            rows += [(f"cache-miss authentications/s, {name}, {client} (runs)",
                      " / ".join(f"{r:,.0f}" for r in values)) for name, values in rates.items()]
            medians = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
            rows += [(f"cache-miss, cluster / {name}, {client} (best runs; medians)",
                      f"{max(rates['cluster']) / max(rates[name]):.2f}; {medians['cluster'] / medians[name]:.2f}")
                     for name in singles]
            rows += [(f"gateway CPU µs per cache miss, {name}, {client} (runs)",
                      " / ".join(f"{v:,.0f}" for v in values)) for name, values in miss_cpu.items()]
            rows += [(f"Redis CPU µs per cache miss, {name}, {client}: masters + replicas (runs)",
                      " / ".join(f"{own:,.0f} + {copies:,.0f}" for own, copies in values))
                     for name, values in redis_cpu.items()]
        hot: dict[str, list[float]] = {"cluster": [], ONE: []}
        hot_cpu: dict[str, list[float]] = {"cluster": [], ONE: []}
        per_request: list[float] = []
        hot_keys = {name: made[name][-1] for name in hot}
        for _ in range(2):
            for name in hot:
                gateway = gateways[name]
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
        victim, candidates = victim_for(ports, spare, args.kill_shared)
        shared = shared_slots_on(ports, victim)  # asked while every node answers
        made_doomed = asyncio.run(create_tokens(on_cluster.url, 4 * args.failover_revocations))
        doomed = doomed_by_kind(ports, victim, made_doomed, args.failover_revocations)
        doomed_tokens = [token for found in doomed.values() for token, _ in found]
        asyncio.run(cache_in_both([on_cluster.url, second.url], doomed_tokens))

        async def during(killed: float, served: asyncio.Event) -> list[Watched]:
            return await revocations_during(on_cluster.url, second.url, doomed, killed, served)
        failover = asyncio.run(kill_master(on_cluster.url, victim, candidates, nodes, during))
        first_ok = failover["first_ok"]
        rows.append((f"master :{failover['victim']} killed: first successful uncached authentication after",
                     "none" if first_ok is None else f"{first_ok:.2f} s"))
        unavailable = failover["unavailable"]
        rows.append(("503 answers for its tokens meanwhile (first, last)",
                     f"{len(unavailable)} ({unavailable[0]:.2f} s, {unavailable[-1]:.2f} s)" if unavailable else "0"))
        if failover["other"]:
            rows.append(("other answers meanwhile", str(sorted(set(failover["other"])))))
        # Once the failover is over, every token revoked during it asked once more of both.
        wrong_later = asyncio.run(still_accepted([on_cluster.url, second.url],
                                                 [r.key for r in failover["alongside"] if r.acked is not None]))
        rows.append(("the killed master holds: the invalidation channel's slot; the account's token set", shared))
        rows += during_rows(failover["alongside"], wrong_later)
        seen = asyncio.run(revocations_after(on_cluster.url, second.url, args.revocations))
        if seen:
            rows.append((f"after the failover: revocation through one gateway seen by the other, p50 / p99 / max "
                         f"({len(seen)} of {args.revocations} rounds)",
                         " / ".join(f"{percentile(seen, q) * 1000:.1f}" for q in (50, 99)) +
                         f" / {max(seen) * 1000:.1f} ms"))
        print("\n| measurement | figure |\n|---|---:|")
        for name, value in rows:
            print(f"| {name} | {value} |")
        if args.details:
            write_details(Path(args.details), failover["alongside"], failover["killed"])
        if any(status == 500 for r in failover["alongside"] for status, _ in r.answers):
            print("\nThe errors the first gateway logged (the 500 answers during the failover):")
            print(logged_errors(procs.workdir / "gw-cluster.out"))
        evidence = wrong_rounds(failover["alongside"], failover["killed"])
        if evidence:
            print("\nRevocations answered 200 after their acknowledgement (seconds from the kill):")
            print("\n".join(evidence))
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
