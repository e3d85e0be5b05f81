"""The programs the bench drives (wrk, nginx, redis-server) and the facts of the machine it ran on."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

Tools = dict[str, str | None]  # program name -> its path, None when not installed


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
                                      None)


def find_tools() -> Tools:
    return {binary: find_binary(binary) for binary in ("wrk", "nginx", "redis-server")}


def ensure_tools(needed: tuple[str, ...] = ("wrk", "redis-server")) -> Tools:
    """The tools, installed with apt-get first when missing and this runs as root."""
    wanted = {"wrk": "wrk", "nginx": "nginx", "redis-server": "redis-server"}
    missing = [package for binary, package in wanted.items() if find_binary(binary) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing with apt-get: {' '.join(missing)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, check=False, timeout=600,
                       stdout=subprocess.DEVNULL)
    tools = find_tools()
    if any(tools[name] is None for name in needed):
        raise SystemExit(f"{' and '.join(needed)} are needed (run as root to have them installed with apt-get)")
    return tools


def version_of(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def machine_facts(tools: Tools) -> dict[str, str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        import uvloop
        loop = f"uvloop {getattr(uvloop, '__version__', '?')}"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    import aiohttp
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "event loop": loop,
        "aiohttp": aiohttp.__version__,
        "nginx": version_of([tools["nginx"], "-v"]).replace("nginx version: ", "") if tools["nginx"] else "not installed",
        "wrk": " ".join(version_of([tools["wrk"] or "wrk", "-v"]).split()[:2]),
        "redis": version_of([tools["redis-server"] or "redis-server", "--version"]),
        "kernel": platform.release(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
