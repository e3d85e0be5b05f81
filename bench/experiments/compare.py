"""Throughput of the gateway beside framework floors, in rounds (a measurement aid, not a test).

    python bench/experiments/compare.py "gateway;gateway-nolog;bare-rawboth;bare-hello;bare-forward" [SECS] [ROUNDS]

Each `;`-separated name is a process on the bench upstream: `gateway` is `python -m gateway`
(1 worker, request log to a file), `gateway-nolog` the same with `log.path: off`, `gateway-gclog`
the same run by gclog.py (collections logged to bench/out/gc.log); `bare-<mode>` runs floors.py
in that mode. PROFILE=<name> also samples that one with py-spy (collapsed stacks in bench/out/).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from harness import HOST  # noqa: E402
from harness.client import create_token, http  # noqa: E402
from harness.procs import free_port, wait_for_port  # noqa: E402
from harness.servers import start_gateway  # noqa: E402
from harness.session import Session  # noqa: E402
from harness.tools import ensure_tools  # noqa: E402


def start(session: Session, name: str, index: int) -> tuple[str, subprocess.Popen[bytes]]:
    if name.startswith("bare-"):
        port = free_port()
        process = session.procs.start(f"v{index}", [sys.executable, str(HERE / "floors.py"), name[5:], str(port),
                                                    session.upstream])
        wait_for_port(port, process)
        return f"http://{HOST}:{port}", process
    argv = [sys.executable, str(HERE / "gclog.py")] if name == "gateway-gclog" else None
    settings = {"log": {"path": "off"}} if name == "gateway-nolog" else None
    gateway = start_gateway(session.procs, f"v{index}", session.upstream, session.redis_url, 1, argv=argv,
                            settings=settings)
    return gateway.url, gateway.process


def main() -> None:
    names = sys.argv[1].split(";")
    secs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    out = HERE.parent / "out"
    out.mkdir(exist_ok=True)
    session = Session(ensure_tools(), prefix="gw-exp-")
    try:
        session.start()
        first = start_gateway(session.procs, "gw-token", session.upstream, session.redis_url, 1)
        key = create_token(first.url)["key"]
        session.procs.stop(first.process)
        started = {name: start(session, name, index) for index, name in enumerate(names)}
        for name, (url, _) in started.items():
            status, body = http("GET", url + "/bench/ping", key)
            if status != 200:
                raise RuntimeError(f"{name}: {status} {body[:100]!r}")
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for round_no in range(rounds):
            for name, (url, process) in started.items():
                session.runner.wrk_run(url, 1, key=key)
                spy = None
                if os.environ.get("PROFILE") == name and round_no == 0:
                    spy = session.procs.start("py-spy", [
                        str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(process.pid),
                        "--format", "raw", "--rate", "250", "--duration", str(secs), "--nonblocking",
                        "--output", str(out / f"prof-{name}.txt")])
                run = session.runner.wrk_run(url, secs, key=key, pids=[process.pid])
                if spy is not None:
                    spy.wait(30)
                cpu_us = 1e6 * run.cpu_percent / 100 * run.seconds / run.requests
                results[name].append((run.rps, cpu_us))
                print(f"{name:28} {run.rps:9.0f} rps p50 {run.p50_ms:6.2f} p99 {run.p99_ms:6.2f} "
                      f"cpu/req {cpu_us:5.0f}us cpu {run.cpu_percent:4.0f}% others {run.others_percent:3.0f}% "
                      f"err {run.errors}", flush=True)
        print("best:")
        for name in names:
            print(f"{name:28} {max(r for r, _ in results[name]):9.0f} rps  "
                  f"cpu/req {min(c for _, c in results[name]):5.0f}us")
    finally:
        session.close()


if __name__ == "__main__":
    main()
