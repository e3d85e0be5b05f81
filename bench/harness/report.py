"""The figures of one run: the console table, the targets met or missed, and RESULTS.md."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .memory import Memory
from .misses import Misses
from .revocation import percentile
from .throughput import FLOOR, GATEWAY_1, NAIVE, NGINX_PROXY, Throughput, gateway_n
from .wrk import CONNECTIONS, WrkResult


def fmt_rps(value: float) -> str:
    return f"{value:,.0f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def scaling_verdict(scale: float, per_core: float, saturated: bool, cores: float, workers: int) -> bool | None:
    """N workers against one: met at 0.75 × N the throughput; on a saturated machine, met at 0.75
    of one worker's throughput per core used if the workers had at least 1.25 cores, and None
    (nothing shown either way) with fewer; a loss per core, or cores left unused, is a miss."""
    if scale >= 0.75 * workers:
        return True
    if per_core < 0.75 or not saturated:
        return False
    return True if cores >= 1.25 else None


@dataclass
class Report:
    machine: dict[str, str]
    started_at: str
    quick: bool
    duration: int
    rounds: int
    workers_n: int
    upstream_kind: str
    throughput: Throughput
    misses: Misses
    memory: Memory
    revoke: dict[str, Any]
    micro: dict[str, float]
    elapsed: float
    profile_note: str = ""

    # -- derived figures --
    @property
    def best(self) -> dict[str, WrkResult]:
        return self.throughput.best

    @property
    def gw1(self) -> WrkResult:
        return self.best[GATEWAY_1]

    @property
    def gwn(self) -> WrkResult:
        return self.best[gateway_n(self.workers_n)]

    def ratio(self, a: str, b: str) -> float | None:
        if a in self.best and b in self.best and self.best[b].rps:
            return self.best[a].rps / self.best[b].rps
        return None

    @property
    def scaling(self) -> tuple[float, float, bool]:
        """N workers / 1 worker in req/s, the same per CPU core they used, and whether the machine
        had no core left (wrk and the upstream share it: the workers cannot have N cores then)."""
        scale = self.gwn.rps / self.gw1.rps
        per_core = (self.gwn.rps / max(1.0, self.gwn.cpu_percent)) / (self.gw1.rps / max(1.0, self.gw1.cpu_percent))
        saturated = self.gwn.machine_percent >= 0.9 * 100 * (os.cpu_count() or 1)
        return scale, per_core, saturated

    @property
    def redis_per_request(self) -> float:
        return self.gw1.redis_commands / max(1, self.gw1.requests)

    def targets(self) -> list[tuple[str, str, bool | None]]:
        """(target, measured, met): met None when the run could not tell."""
        memory, misses = self.memory, self.misses
        rows: list[tuple[str, str, bool | None]] = []
        nginx = self.ratio(GATEWAY_1, NGINX_PROXY)
        rows.append(("gateway 1 worker ≥ 0.20 × nginx proxy_pass",
                     f"{nginx:.2f} ×" if nginx is not None else "nginx not installed",
                     None if nginx is None else nginx >= 0.20))
        naive = self.ratio(GATEWAY_1, NAIVE)
        rows.append(("gateway 1 worker ≥ 3 × naive proxy", f"{naive:.2f} ×", naive is not None and naive >= 3))
        scale, efficiency, saturated = self.scaling
        cores = self.gwn.cpu_percent / 100
        scaled = scaling_verdict(scale, efficiency, saturated, cores, self.workers_n)
        rows.append((f"{self.workers_n} workers scale with cores (≥ 0.75 × {self.workers_n} = "
                     f"{0.75 * self.workers_n:.2f} × 1 worker, or, when wrk and the upstream leave the workers "
                     "fewer cores than that, ≥ 0.75 × 1 worker's req/s per core used, the workers having had "
                     "at least 1.25 cores; n/a when they had less)",
                     f"{scale:.2f} ×; per core {efficiency:.2f} ×; the workers had {cores:.2f} "
                     f"cores; machine {'saturated' if saturated else 'not saturated'}"
                     + ("; too few cores left to show it" if scaled is None else ""),
                     scaled))
        rows.append(("≤ 0.01 Redis commands per proxied request (1 worker)", f"{self.redis_per_request:.5f}",
                     self.redis_per_request <= 0.01))
        rows.append(("p99 < 5 ms at 50 connections (gateway 1 worker)", f"{self.gw1.p99_ms:.2f} ms",
                     self.gw1.p99_ms < 5))
        rows.append((f"p99 < 5 ms at 50 connections (gateway {self.workers_n} workers)", f"{self.gwn.p99_ms:.2f} ms",
                     self.gwn.p99_ms < 5))
        rows.append((f"p99 < 5 ms at 50 connections with {memory.cached:,} tokens cached (gateway 1 worker)",
                     f"{memory.hot.p99_ms:.2f} ms", memory.hot.p99_ms < 5))
        revoke_p99 = percentile(self.revoke["windows_ms"], 99)
        rows.append(("revoked token refused on another instance within 100 ms p99", f"{revoke_p99:.2f} ms",
                     revoke_p99 < 100))
        miss_ratio = misses.miss.rps / misses.hot.rps
        rows.append(("cache-miss throughput ≥ 0.5 × hot", f"{miss_ratio:.2f} ×", miss_ratio >= 0.5))
        rss, extrapolated = memory.rss_for_100k
        rows.append(("< 200 MB RSS per worker with 100,000 cached tokens",
                     f"{rss:.1f} MB" + (" (extrapolated)" if extrapolated else ""), rss < 200))
        return rows

    def main_table(self) -> list[list[str]]:
        rows = [["target", "req/s", "p50 ms", "p99 ms", "CPU %", "others' CPU %", "errors"]]
        for name, result in self.best.items():
            rows.append([name, fmt_rps(result.rps), f"{result.p50_ms:.2f}", f"{result.p99_ms:.2f}",
                         f"{result.cpu_percent:.0f}", f"{result.others_percent:.0f}", str(result.errors)])
        return rows

    def ratio_lines(self) -> list[str]:
        lines = []
        nginx = self.ratio(GATEWAY_1, NGINX_PROXY)
        if nginx is not None:
            lines.append(f"gateway 1 worker / nginx proxy_pass = {nginx:.2f}")
        naive = self.ratio(GATEWAY_1, NAIVE)
        lines.append(f"gateway 1 worker / naive proxy = {naive:.2f}")
        scale, per_core, saturated = self.scaling
        lines.append(f"gateway {self.workers_n} workers / gateway 1 worker = {scale:.2f}; per CPU core used "
                     f"{per_core:.2f} ({self.gw1.cpu_percent:.0f} % and {self.gwn.cpu_percent:.0f} % of a core; "
                     f"whole machine during the {self.workers_n}-worker run {self.gwn.machine_percent:.0f} % of "
                     f"{100 * (os.cpu_count() or 1)} %{', saturated' if saturated else ''})")
        floor = self.ratio(GATEWAY_1, FLOOR)
        if floor is not None:
            lines.append(f"gateway 1 worker / aiohttp floor = {floor:.2f} (the floor forwards with aiohttp's server "
                         "and ClientSession and does nothing else)")
        detail = ", ".join(f"{name} {n}" for name, n in sorted(self.gw1.redis_detail.items(), key=lambda x: -x[1]))
        lines.append(f"Redis commands per proxied request (gateway 1 worker): {self.redis_per_request:.5f} "
                     f"({self.gw1.redis_commands} commands for {self.gw1.requests:,} requests: {detail or 'none'})")
        lines.append("CPU time per request: " + ", ".join(
            f"{name} {cpu_us_per_request(result):.0f} µs" for name, result in self.best.items()))
        return lines

    def extra_lines(self) -> list[str]:
        misses, memory = self.misses, self.memory
        windows, after = self.revoke["windows_ms"], self.revoke["after_ack_ms"]
        rss, extrapolated = memory.rss_for_100k
        hot, miss = misses.hot, misses.miss
        return [
            f"(a) cache-miss traffic, gateway 1 worker, {misses.n_tokens:,} tokens in Redis "
            f"(written in {misses.fill_seconds:.0f} s):",
            f"    hot (one key)     {fmt_rps(hot.rps):>9} req/s  p50 {hot.p50_ms:.2f} ms  "
            f"p99 {hot.p99_ms:.2f} ms  errors {hot.errors}  others' CPU {hot.others_percent:.0f}%",
            f"    random key        {fmt_rps(miss.rps):>9} req/s  p50 {miss.p50_ms:.2f} ms  "
            f"p99 {miss.p99_ms:.2f} ms  errors {miss.errors}  others' CPU {miss.others_percent:.0f}%",
            f"    miss / hot = {miss.rps / hot.rps:.2f}; {misses.loads:,} records loaded from Redis for "
            f"{miss.requests:,} requests ({100 * misses.loads / max(1, miss.requests):.0f}% misses) in "
            f"{miss.redis_detail.get('mget', 0):,} round trips, "
            f"{miss.redis_commands / max(1, miss.requests):.2f} Redis commands per request; "
            f"afterwards {misses.cached:,} tokens cached, RSS {misses.rss:.1f} MB",
            f"(b) revocation through instance A, instance B polled back to back, {self.revoke['rounds']} rounds:",
            f"    first 401 from B after the DELETE was sent: p50 {percentile(windows, 50):.2f} ms, "
            f"p99 {percentile(windows, 99):.2f} ms, max {max(windows):.2f} ms",
            f"    after the DELETE was acknowledged: p50 {percentile(after, 50):.2f} ms, "
            f"p99 {percentile(after, 99):.2f} ms; requests B accepted after the acknowledgement: "
            f"{self.revoke['late_accepts']}",
            f"(c) resident memory of one gateway worker with {memory.cached:,} cached tokens: "
            f"{memory.rss_after:.1f} MB (peak {memory.rss_peak:.1f} MB; {memory.rss_before:.1f} MB with one token; "
            f"{1024 * (memory.rss_after - memory.rss_before) / max(1, memory.cached):.2f} KB per token)"
            + (f"; extrapolated to 100,000 tokens: {rss:.1f} MB" if extrapolated else ""),
            f"    then hot traffic (one key) through that worker: {fmt_rps(memory.hot.rps)} req/s  "
            f"p50 {memory.hot.p50_ms:.2f} ms  p99 {memory.hot.p99_ms:.2f} ms  errors {memory.hot.errors}",
            "(d) in-process cost of one check (cached token, no I/O): " + ", ".join(
                f"{name} {value:.2f} µs" for name, value in self.micro.items()),
        ]

    def console(self) -> str:
        table = self.main_table()
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines = []
        for index, row in enumerate(table):
            cells = [row[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in enumerate(row) if i]
            lines.append("  ".join(cells))
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [""] + self.ratio_lines() + [""] + self.extra_lines() + [""]
        for name, value, ok in self.targets():
            lines.append(f"{'n/a' if ok is None else verdict(ok):6}  {name}: {value}")
        if self.profile_note:
            lines += ["", self.profile_note]
        return "\n".join(lines)

    def markdown(self) -> str:
        table = self.main_table()
        out = [
            "# Benchmark results" + (" (quick mode)" if self.quick else ""),
            "",
            f"Measured {self.started_at} by `python bench/run.py{' --quick' if self.quick else ''}` "
            f"({self.elapsed:.0f} s in all). wrk `-t1 -c{CONNECTIONS} -d{self.duration}s --latency`, "
            f"GET with `Authorization: FlespiToken <key>` of a standard token created through the API; "
            f"{self.rounds} round(s) over the targets, the best round of each kept. Upstream: {self.upstream_kind}. "
            "Gateways run `python -m gateway` with the full pipeline and request logging to a file.",
            "",
            "| " + " | ".join(table[0]) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(table[0]) - 1)) + "|",
        ]
        out += ["| " + " | ".join(row) + " |" for row in table[1:]]
        out += ["", "CPU % is the target's processes during the run (100 % = one core); others' CPU % is what "
                "processes this benchmark did not start used meanwhile (the machine is shared); errors are "
                "non-2xx replies plus socket errors.", ""]
        out += [f"- {line}" for line in self.ratio_lines()]
        if self.rounds > 1:
            out += ["", "Every round (req/s): " + "; ".join(
                f"{name}: " + ", ".join(fmt_rps(r.rps) for r in runs) for name, runs in self.throughput.all_runs.items())]
        out += ["", "## Other figures", "", "```", *self.extra_lines(), "```", "", "## Targets", "",
                "| target | measured | |", "|---|---:|---|"]
        for name, value, ok in self.targets():
            out.append(f"| {name} | {value} | {'n/a' if ok is None else verdict(ok)} |")
        out += ["", f"With {CONNECTIONS} connections each waiting for its reply, the mean latency is "
                f"{CONNECTIONS} / throughput (Little's law): p99 < 5 ms needs well over "
                f"{CONNECTIONS / 0.005:,.0f} req/s, so that target follows the throughput ones."]
        out += ["", "## Machine", "", "| | |", "|---|---|"]
        out += [f"| {name} | {value} |" for name, value in self.machine.items()]
        out += ["", "The machine is shared: wrk, the upstream and the proxy under test all run on its "
                f"{self.machine['nproc']} cores, and other services on it add noise; compare ratios more than "
                "absolute figures.", ""]
        if self.profile_note:
            out += ["## Profile", "", "```", self.profile_note, "```", ""]
        return "\n".join(out)


def cpu_us_per_request(result: WrkResult) -> float:
    return 1e6 * result.cpu_percent / 100 * result.seconds / max(1, result.requests)
