"""What a Redis round trip costs Redis itself, on this machine: the CPU a Redis server spends per
key read, when the keys come 1, 2, 4, ... to a round trip.

A cache miss on a cluster is read as a GET of its record and an HMGET of its `used` bucket, and
each master holding part of a batch answers its part in a round trip of its own; on one Redis the
whole batch is one MGET, one HMGET and one ZMSCORE. So per miss, a cluster pays more round trips
(one per master a batch touches) and more commands. This prints both costs, for both shapes, on
one Redis started for it (cluster mode is not needed to measure them):

    python bench/round_trips.py [--keys 20000] [--sizes 1,2,4,8,16,32]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from harness import HOST
from harness.procs import Processes, cpu_seconds
from harness.servers import start_redis
from harness.tools import find_tools


def record_key(digest: str) -> str:
    return f"gw:tok:{{t.{digest[:3]}}}:{digest}"


def used_key(digest: str) -> str:
    return f"gw:used:{{u.{int(digest[:3], 16) >> 7}}}"


def per_key_cluster_shape(client: redis.Redis, batch: list[str]) -> None:
    """A GET per record and an HMGET per key (the cluster's commands for a master's part)."""
    pipe = client.pipeline(transaction=False)
    for digest in batch:
        pipe.execute_command("GET", record_key(digest))
    for digest in batch:
        pipe.execute_command("HMGET", used_key(digest), digest)
    pipe.execute()


def one_redis_shape(client: redis.Redis, batch: list[str]) -> None:
    """MGET of the records, HMGET of their last uses, ZMSCORE of the old sorted set (no key)."""
    pipe = client.pipeline(transaction=False)
    pipe.execute_command("MGET", *[f"gw:tok:{digest}" for digest in batch])
    pipe.execute_command("HMGET", "gw:used", *batch)
    pipe.execute_command("ZMSCORE", "gw:accessed", *batch)
    pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=20000, help="keys read for each figure")
    parser.add_argument("--sizes", default="1,2,4,8,16,32", help="keys per round trip")
    args = parser.parse_args()
    binary = find_tools()["redis-server"]
    if not binary:
        raise SystemExit("redis-server is needed")
    workdir = Path(tempfile.mkdtemp(prefix="gw-round-trips-"))
    procs = Processes(workdir)
    try:
        port, server = start_redis(procs, str(binary))
        client = redis.Redis(host=HOST, port=port)
        digests = [hashlib.sha256(os.urandom(16)).hexdigest() for _ in range(args.keys)]
        record = "x" * 300  # about a standard token's record
        pipe = client.pipeline(transaction=False)
        for digest in digests:
            pipe.set(record_key(digest), record)
            pipe.set(f"gw:tok:{digest}", record)
            pipe.hset(used_key(digest), digest, 1_700_000_000)
            pipe.hset("gw:used", digest, 1_700_000_000)
        pipe.execute()
        print(f"# bench/round_trips.py: Redis CPU µs per key read ({args.keys:,} keys each), "
              f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores, shared\n")
        print("| keys a round trip | GET + HMGET per key (cluster) | MGET + HMGET + ZMSCORE (one Redis) |")
        print("|---:|---:|---:|")
        for size in (int(value) for value in args.sizes.split(",")):
            figures = []
            for shape in (per_key_cluster_shape, one_redis_shape):
                before = cpu_seconds([server.pid])
                for start in range(0, len(digests), size):
                    shape(client, digests[start:start + size])
                figures.append((cpu_seconds([server.pid]) - before) / len(digests) * 1e6)
            print(f"| {size} | {figures[0]:.1f} | {figures[1]:.1f} |")
        client.close()
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
