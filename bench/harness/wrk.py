"""wrk runs (one thread, 50 connections) and what they measured, with CPU and Redis commands around them."""
from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import BENCH, HOST
from .procs import Processes, cpu_seconds, machine_busy_seconds, our_cpu_seconds, signal_group

CONNECTIONS = 50


@dataclass
class WrkResult:
    rps: float = 0.0
    requests: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    non_2xx: int = 0
    socket_errors: int = 0
    cpu_percent: float = 0.0  # of the target's processes during the run
    others_percent: float = 0.0  # of processes this script did not start, during the run
    machine_percent: float = 0.0  # every process on the machine (wrk and the upstream too), % of one core
    redis_commands: int = 0
    redis_detail: dict[str, int] = field(default_factory=dict)
    raw: str = ""

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * UNITS[unit]


def parse_wrk(text: str) -> WrkResult:
    result = WrkResult(raw=text)
    if match := re.search(r"Requests/sec:\s+([\d.]+)", text):
        result.rps = float(match.group(1))
    if match := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text):
        result.requests = int(match.group(1))
        result.seconds = _ms(match.group(2) + match.group(3)) / 1000
    if match := re.search(r"^\s+50%\s+(\S+)", text, re.M):
        result.p50_ms = _ms(match.group(1))
    if match := re.search(r"^\s+99%\s+(\S+)", text, re.M):
        result.p99_ms = _ms(match.group(1))
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text):
        result.non_2xx = int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        result.socket_errors = sum(int(x) for x in match.groups())
    return result


class Runner:
    """Runs wrk against one URL at a time; counts the bench Redis's commands when asked."""

    def __init__(self, procs: Processes, wrk: str, redis_port: int) -> None:
        self.procs = procs
        self.wrk = wrk
        self.redis_port = redis_port
        import redis
        self.redis = redis.Redis(host=HOST, port=redis_port)

    def command_counts(self) -> dict[str, int]:
        stats = self.redis.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}

    def wrk_run(self, url: str, seconds: float, *, key: str | None = None, script_args: list[str] | None = None,
                pids: list[int] | None = None, count_redis: bool = False,
                stop_when: Callable[[], bool] | None = None, max_seconds: float | None = None) -> WrkResult:
        """GET url/bench/ping for `seconds` with the key (or keys from a file through
        random_tokens.lua); with `stop_when`, wrk is stopped as soon as it returns true."""
        argv = [self.wrk, "-t1", f"-c{CONNECTIONS}", f"-d{int(max_seconds or seconds)}s", "--latency", "--timeout", "5s"]
        if key is not None:
            argv += ["-H", f"Authorization: FlespiToken {key}"]
        if script_args is not None:
            argv += ["-s", str(BENCH / "random_tokens.lua")]
        argv.append(url + "/bench/ping")
        if script_args is not None:
            argv += ["--", *script_args]
        before_cmds = self.command_counts() if count_redis else {}
        before_cpu, started = cpu_seconds(pids or []), time.monotonic()
        before_busy, before_ours = machine_busy_seconds(), our_cpu_seconds()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        self.procs.running.append(("wrk", process))
        try:
            if stop_when is not None:
                deadline = time.monotonic() + (max_seconds or seconds)
                while process.poll() is None and time.monotonic() < deadline:
                    if stop_when():
                        signal_group(process, signal.SIGINT)  # wrk prints its figures on SIGINT
                        break
                    time.sleep(0.2)
            output, _ = process.communicate(timeout=(max_seconds or seconds) + 60)
        finally:
            self.procs.stop(process, grace=2)
        elapsed = time.monotonic() - started
        result = parse_wrk(output.decode(errors="replace"))
        others = (machine_busy_seconds() - before_busy) - (our_cpu_seconds() - before_ours)
        result.others_percent = max(0.0, 100 * others / elapsed)
        result.machine_percent = 100 * (machine_busy_seconds() - before_busy) / elapsed
        if pids:
            result.cpu_percent = 100 * (cpu_seconds(pids) - before_cpu) / elapsed
        if count_redis:
            after = self.command_counts()
            delta = {name: after[name] - before_cmds.get(name, 0) for name in after}
            delta["info"] = delta.get("info", 0) - 1  # our own INFO after the run
            result.redis_detail = {name: n for name, n in delta.items() if n > 0}
            result.redis_commands = sum(result.redis_detail.values())
        if result.requests == 0:
            raise RuntimeError(f"wrk made no requests against {url}:\n{result.raw}")
        return result
