"""Processes the bench starts, loopback ports, and what /proc says about CPU and memory."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import suppress
from pathlib import Path

from . import HOST


class Processes:
    """Every process this script starts, each in its own process group, stopped in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.workdir / f"{name}.out", "ab")
        process = subprocess.Popen(argv, cwd=cwd or self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.running.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if process.poll() is None:
            signal_group(process, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may hold workers that outlive their parent: make sure it is empty.
        signal_group(process, signal.SIGKILL)
        try:
            process.wait(2)
        except subprocess.TimeoutExpired:
            pass
        self.running = [(n, p) for n, p in self.running if p is not process]

    def stop_all(self) -> None:
        for _, process in reversed(list(self.running)):
            self.stop(process)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.out"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.args!r} exited with {process.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout}s")


def listeners(port: int) -> int:
    """Listening sockets on the port (one per worker with SO_REUSEPORT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[1].endswith(f":{port:04X}") and parts[3] == "0A":
                count += 1
    return count


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def pin(pids: list[int], cpus: set[int]) -> None:
    """Every thread of the processes onto `cpus` (threads started later inherit it)."""
    for pid in pids:
        try:
            threads = [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:
            continue
        for tid in threads:
            with suppress(OSError):  # gone meanwhile
                os.sched_setaffinity(tid, cpus)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (SC_CLK_TCK ticks)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def machine_busy_seconds() -> float:
    """CPU time every core spent busy (not idle, not waiting for I/O) since boot, in seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def our_cpu_seconds() -> float:
    """This script and everything it started, alive or already reaped."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    reaped = (int(fields[13]) + int(fields[14])) / ticks  # cutime + cstime of waited-for children
    return cpu_seconds(process_tree(os.getpid())) + reaped


def others_percent(seconds: float = 1.0) -> float:
    """CPU used by processes that are not ours, in % of one core, sampled over `seconds`."""
    busy, ours, started = machine_busy_seconds(), our_cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return max(0.0, 100 * ((machine_busy_seconds() - busy) - (our_cpu_seconds() - ours)) / elapsed)


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field_name} for pid {pid}")


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
