"""Do slow or huge clients delay the others? One worker, the same victim traffic twice in one run.

    python bench/hostile_clients.py [--seconds 20] [--hostile 40]

Starts its own gateway process (embedded store, one worker) in front of `bench/upstream.py`, then
measures a victim: one keep-alive client asking a proxied GET in a loop with a valid key, and
reports its latency percentiles
  1. alone, and
  2. while `--hostile` connections misbehave at once, over and over: heads that never end
     (refused at `limits.max_head_size`), heads sent a byte every 100 ms (slowloris, dropped at
     `limits.header_timeout`), bodies of megabytes for an unknown key, and clients that ask for a
     reply and never read it.
It prints both and the ratio of the p99s. Loopback only; every loop is bounded in time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness.procs import free_port, wait_for_port  # bench/ is the script's own directory

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def create_token(url: str, master: str) -> str:
    request = urllib.request.Request(f"{url}/platform/tokens", data=json.dumps([{"ttl": 3600}]).encode(),
                                     headers={"Authorization": f"FlespiToken {master}"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:
        return str(json.loads(reply.read())["result"][0]["key"])


async def victim(port: int, key: str, seconds: float) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET /victim HTTP/1.1\r\nHost: x\r\nAuthorization: FlespiToken {key}\r\n\r\n".encode()
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        latencies.append((time.perf_counter() - started) * 1000)
    writer.close()
    return latencies


async def one_hostile(port: int, kind: int, key: str) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        if kind == 0:  # a header that never ends
            writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"v" * 300_000)
        elif kind == 1:  # slowloris: a byte every 100 ms
            for byte in b"GET /x HTTP/1.1\r\nHost: x\r\nX-Slow: 123456789":
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)
        elif kind == 2:  # megabytes of body for a key nobody has
            writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nAuthorization: FlespiToken " + b"B" * 64
                         + b"\r\nContent-Length: 4000000\r\n\r\n" + b"b" * 2_000_000)
        else:  # asks for a reply and never reads it
            writer.write(f"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: FlespiToken {key}\r\n\r\n".encode() * 50)
            await asyncio.sleep(2)
        await asyncio.wait_for(writer.drain(), 5)
        await asyncio.wait_for(reader.read(65536), 2)
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.transport.abort()


async def hostile(port: int, key: str, count: int, seconds: float) -> int:
    made = 0
    end = time.monotonic() + seconds
    running: set[asyncio.Task[None]] = set()
    while time.monotonic() < end:
        while len(running) < count:
            task = asyncio.ensure_future(one_hostile(port, made % 4, key))
            running.add(task)
            task.add_done_callback(running.discard)
            made += 1
        await asyncio.sleep(0.01)
    for task in list(running):
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    return made


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def describe(name: str, values: list[float]) -> str:
    return (f"{name:<22} {len(values):>7} requests  p50 {percentile(values, 0.5):6.2f} ms  "
            f"p99 {percentile(values, 0.99):6.2f} ms  max {max(values):7.2f} ms  "
            f"mean {statistics.fmean(values):6.2f} ms")


def measure(port: int, key: str, seconds: float, count: int) -> tuple[list[float], list[float], int]:
    alone = asyncio.run(victim(port, key, seconds))
    # The hostile clients run in a process of their own: on the victim's loop they would delay
    # the measurement itself.
    attack = subprocess.Popen([sys.executable, __file__, "--attack", str(port), key, str(seconds + 1),
                               str(count)], stdout=subprocess.PIPE, text=True)
    time.sleep(1)  # they are at it before the victim starts again
    besieged = asyncio.run(victim(port, key, seconds))
    made = int((attack.communicate(timeout=seconds + 60)[0] or "0").strip() or 0)
    return alone, besieged, made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--hostile", type=int, default=40, help="misbehaving connections at any moment")
    parser.add_argument("--attack", nargs=4, metavar=("PORT", "KEY", "SECONDS", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:  # the child process: only the hostile clients
        port, key, seconds, count = args.attack
        print(asyncio.run(hostile(int(port), key, int(count), float(seconds))))
        return 0
    work = Path(tempfile.mkdtemp(prefix="gw-hostile-"))
    upstream_port, port = free_port(), free_port()
    master = "H" * 64
    config = work / "gateway.yaml"
    config.write_text(json.dumps({
        "listen": {"host": "127.0.0.1", "port": port}, "upstream": f"http://127.0.0.1:{upstream_port}",
        "redis": {"url": "memory://", "data_file": str(work / "data.json")}, "log": {"path": "off"},
        "bootstrap_master_token": master, "limits": {"header_timeout": 2, "send_timeout": 2}}))
    processes = [
        subprocess.Popen([sys.executable, str(HERE / "upstream.py"), "--port", str(upstream_port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ}),
    ]
    try:
        wait_for_port(upstream_port, processes[0])
        wait_for_port(port, processes[1], timeout=30)
        key = create_token(f"http://127.0.0.1:{port}", master)
        alone, besieged, made = measure(port, key, args.seconds, args.hostile)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(30)
    print(describe("victim alone", alone))
    print(describe(f"with {args.hostile} hostile", besieged))
    print(f"hostile connections made: {made}")
    print(f"p99 with hostile clients / alone: {percentile(besieged, 0.99) / percentile(alone, 0.99):.2f}x; "
          f"p99 added: {percentile(besieged, 0.99) - percentile(alone, 0.99):.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
