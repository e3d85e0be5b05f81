"""Instructions per proxied request for two builds, less what the gateway does each second anyway.

    python bench/idle_instructions.py --a /old/checkout/.venv/bin/python --b .venv/bin/python [--requests 4000]

`instructions.py` takes the difference between a count over N requests and one over 2N, which
cancels what is paid once; but the gateway's timers (the store probe, the date, the sweeps, the
metrics share) are paid per second, and under valgrind the extra N requests take many seconds.
This script counts, for each build, the instructions of `--seconds` idle seconds too, times both
counted runs, and takes the idle cost of the extra seconds off the marginal figure:

    per request = (count(2N) - count(N) - idle_per_second * (t(2N) - t(N))) / N

Prints both builds (marginal, idle per second, corrected) and the corrected B / A.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ab_builds import backends, start_gateway  # bench/ is the script's own directory
from instructions import counted, dumped_instructions, send


def idle(pid: int, seconds: float, out_dir: Path) -> float:
    """Instructions per second of a gateway that serves nothing."""
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
    time.sleep(seconds)
    before = set(out_dir.glob("cg.out*"))
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    return dumped_instructions(out_dir, before) / seconds


def measure(python: str, name: str, upstream: int, redis_port: int, work: Path, requests: int, connections: int,
            seconds: float) -> float:
    out_dir = work / f"cg-{name}"
    out_dir.mkdir()
    wrapper = ["valgrind", "--tool=callgrind", "--trace-children=no", "--dump-instr=no",
               f"--callgrind-out-file={out_dir}/cg.out.%p"]
    process, port, key = start_gateway(python, upstream, redis_port, work, name, wrapper=wrapper, timeout=300)
    try:
        send(port, key, 500, connections)  # warm-up: cached token, open upstream connections
        per_second = idle(process.pid, seconds, out_dir)
        started = time.monotonic()
        small = counted(process.pid, port, key, requests, connections, out_dir)
        small_time = time.monotonic() - started
        started = time.monotonic()
        large = counted(process.pid, port, key, 2 * requests, connections, out_dir)
        large_time = time.monotonic() - started
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
    marginal = (large - small) / requests
    corrected = (large - small - per_second * (large_time - small_time)) / requests
    print(f"{name}: marginal {marginal:,.0f} instructions/request; idle {per_second:,.0f}/s; "
          f"{requests} requests took {small_time:.1f} s, {2 * requests} took {large_time:.1f} s; "
          f"corrected {corrected:,.0f}", flush=True)
    return corrected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="python of build A")
    parser.add_argument("--b", required=True, help="python of build B")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="idle seconds counted")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (Debian's package valgrind)")
    work = Path(tempfile.mkdtemp(prefix="gw-idle-instr-"))
    print(f"callgrind dumps in {work}", flush=True)
    with backends(work) as (upstream_port, redis_port, _):
        a = measure(args.a, "A", upstream_port, redis_port, work, args.requests, args.connections, args.seconds)
        b = measure(args.b, "B", upstream_port, redis_port, work, args.requests, args.connections, args.seconds)
    print(f"instructions per proxied request, idle seconds taken off: A {a:,.0f}, B {b:,.0f}, B / A = {b / a:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
