"""Instructions per proxied request, counted by callgrind, for two builds: a figure the machine's load
does not move.

    python bench/instructions.py --a /old/checkout/.venv/bin/python --b .venv/bin/python [--requests 5000]
                                 [--idle-seconds 10] [--path /_gateway/auth/hot]

Throughput on these shared 2-core machines drifts by 10-20 % between rounds (ab_builds.py), more
than the difference a refactor makes. Callgrind counts the instructions the gateway process runs,
which depend on the code and the requests, not on what else the machine does. Each build runs
under `valgrind --tool=callgrind` on its own redis-server, in front of nginx `return 200` (or
bench/upstream.py): after a warm-up (the token cached, upstream connections open) the counters are
zeroed, exactly `--requests` requests are sent over `--connections` keep-alive connections, and the
counters are dumped. What is paid once cancels out: a second count with twice the requests is
taken and the figure is the difference per extra request. Background timers (the store probe,
the date, sweeps, the invalidation PING) are paid per second, though, and under valgrind the
extra requests take many seconds: `--idle-seconds S` counts S idle seconds first and takes their
rate times the extra seconds off,

    per request = (count(2N) - count(N) - idle_per_second * (t(2N) - t(N))) / N

That whole-process figure still moves by several per cent between runs of one build. The request
path alone (callgrind's inclusive count of the two callbacks every proxied request runs in, the
client side's and the upstream side's `data_received`; needs `callgrind_annotate`) moves by well
under one per cent: it is printed too, with its own B / A. Prints both builds and B / A.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ab_builds import backends, start_gateway  # bench/ is the script's own directory


async def _one_connection(port: int, request: bytes, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            found = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if not head.startswith(b"HTTP/1.1 200") or found is None:
                raise SystemExit(f"unexpected reply: {head[:200]!r}")
            await reader.readexactly(int(found.group(1)))
    finally:
        writer.close()


def send(port: int, key: str, requests: int, connections: int, path: str = "/hot") -> None:
    """Exactly `requests` GETs of `path`, spread over `connections` keep-alive connections."""
    request = (f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: FlespiToken {key}\r\n\r\n").encode()
    shares = [requests // connections + (1 if i < requests % connections else 0) for i in range(connections)]

    async def run() -> None:
        await asyncio.gather(*(_one_connection(port, request, share) for share in shares if share))
    asyncio.run(run())


def dumped_instructions(out_dir: Path, before: set[Path]) -> int:
    """The instruction total of the dump files that appeared since `before`."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(out_dir.glob("cg.out*")) - before
        totals = [re.search(r"^totals:\s+(\d+)", path.read_text(errors="replace"), re.M) for path in new]
        if new and all(totals):
            return sum(int(t.group(1)) for t in totals if t)
        time.sleep(0.5)
    raise SystemExit(f"no callgrind dump in {out_dir}")


# Every proxied request (and decision check) runs in these callbacks (compiled names): their
# inclusive count is the request path's instructions, without the timers and batched writes that
# run per second.
REQUEST_PATH = ("CPyPy_listener___FrontProtocol___data_received", "CPyPy_upstream___UpstreamConnection___data_received")


def request_path(dump: Path) -> int:
    """The inclusive instructions of REQUEST_PATH in one callgrind dump (0 without callgrind_annotate)."""
    if shutil.which("callgrind_annotate") is None:
        return 0
    out = subprocess.run(["callgrind_annotate", "--auto=no", "--inclusive=yes", "--threshold=100", str(dump)],
                         capture_output=True, text=True, check=True).stdout
    total = 0
    for line in out.splitlines():
        found = re.match(r"\s*([\d,]+) \([\d. %]+\)\s+\S*?:(\S+)", line)
        if found and found.group(2) in REQUEST_PATH:
            total += int(found.group(1).replace(",", ""))
    return total


def counted(pid: int, port: int, key: str, requests: int, connections: int, out_dir: Path, path: str) -> int:
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
    send(port, key, requests, connections, path)
    before = set(out_dir.glob("cg.out*"))
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    return dumped_instructions(out_dir, before)


def idle(pid: int, seconds: float, out_dir: Path) -> float:
    """Instructions per second of a gateway that serves nothing."""
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
    time.sleep(seconds)
    before = set(out_dir.glob("cg.out*"))
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    return dumped_instructions(out_dir, before) / seconds


def measure(python: str, name: str, upstream: int, redis_port: int, work: Path,
            requests: int, connections: int, path: str, idle_seconds: float) -> tuple[float, float]:
    out_dir = work / f"cg-{name}"
    out_dir.mkdir()
    wrapper = ["valgrind", "--tool=callgrind", "--trace-children=no", "--dump-instr=no",
               f"--callgrind-out-file={out_dir}/cg.out.%p"]
    process, port, key = start_gateway(python, upstream, redis_port, work, name, wrapper=wrapper, timeout=300)
    try:
        send(port, key, 500, connections, path)  # warm-up: cached token, open upstream connections, warm caches
        per_second = idle(process.pid, idle_seconds, out_dir) if idle_seconds else 0.0
        before, started = set(out_dir.glob("cg.out*")), time.monotonic()
        small = counted(process.pid, port, key, requests, connections, out_dir, path)
        small_time, started = time.monotonic() - started, time.monotonic()
        after_small = set(out_dir.glob("cg.out*"))
        large = counted(process.pid, port, key, 2 * requests, connections, out_dir, path)
        large_time = time.monotonic() - started
        small_dumps, large_dumps = after_small - before, set(out_dir.glob("cg.out*")) - after_small
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
    # The timers' cost of the extra seconds the larger count took (none without --idle-seconds).
    per_request = (large - small - per_second * (large_time - small_time)) / requests
    idle_part = (f"; idle {per_second:,.0f}/s, {requests} requests took {small_time:.1f} s, {2 * requests} "
                 f"took {large_time:.1f} s" if idle_seconds else "")
    alone = (sum(map(request_path, large_dumps)) - sum(map(request_path, small_dumps))) / requests
    print(f"{name}: {small / requests:,.0f} instructions/request over {requests}, "
          f"{large / (2 * requests):,.0f} over {2 * requests}{idle_part}; marginal {per_request:,.0f}; "
          f"request path {alone:,.0f}", flush=True)
    return per_request, alone


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="python of build A")
    parser.add_argument("--b", required=True, help="python of build B")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--idle-seconds", type=float, default=0.0,
                        help="count this many idle seconds first, and take the timers' cost of the extra seconds "
                             "the larger count took off the marginal figure")
    parser.add_argument("--path", default="/hot",
                        help="what each request asks for (/_gateway/auth/hot counts decision checks)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (Debian's package valgrind)")
    work = Path(tempfile.mkdtemp(prefix="gw-instr-"))
    with backends(work) as (upstream_port, redis_port, _):
        a, a_path = measure(args.a, "A", upstream_port, redis_port, work, args.requests, args.connections, args.path,
                    args.idle_seconds)
        b, b_path = measure(args.b, "B", upstream_port, redis_port, work, args.requests, args.connections, args.path,
                    args.idle_seconds)
    print(f"instructions per request of {args.path}: A {a:,.0f}, B {b:,.0f}, B / A = {b / a:.3f} (dumps in {work})")
    if a_path and b_path:
        print(f"request path alone: A {a_path:,.0f}, B {b_path:,.0f}, B / A = {b_path / a_path:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
