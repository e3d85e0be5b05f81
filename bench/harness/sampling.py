"""What the soak watches in one gateway worker over time, and whether it stays flat.

A sample: VmRSS and the count of open descriptors from /proc/<pid>, and the asyncio task count
and open client connections the worker reports in `GET /_gateway/health` (`tasks`,
`connections`) when it does. The descriptor count is the least of a few reads a fraction of a
second apart: connections in flight come and go between them, a leaked descriptor stays.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .procs import open_descriptors, rss_mb

SERIES = ("RSS MB", "fds", "tasks", "connections")
RSS_SHARE = 0.05  # RSS is flat when it moves by at most this share of its level over the fit
COUNT_SHARE = 0.10  # counts: this share of the level, or the connections in flight, if more


@dataclass
class Sample:
    seconds: float  # since the traffic started
    values: dict[str, float | None]  # None: not available


async def read_sample(pid: int, seconds: float, health: dict[str, object] | None, reads: int = 5) -> Sample:
    values: dict[str, float | None] = dict.fromkeys(SERIES)
    try:
        values["RSS MB"] = rss_mb(pid)
        counts = []
        for _ in range(reads):
            counts.append(open_descriptors(pid))
            await asyncio.sleep(0.1)
        values["fds"] = float(min(counts))
    except (OSError, RuntimeError):
        pass  # not our process to read, or gone: n/a
    for name in ("tasks", "connections"):
        value = (health or {}).get(name)
        values[name] = float(value) if isinstance(value, int | float) else None
    return Sample(seconds, values)


def least_squares_slope(points: list[tuple[float, float]]) -> float:
    """Slope of the least-squares line through (x, y) points; 0 for fewer than two x values."""
    count = len(points)
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


@dataclass
class Trend:
    name: str
    points: list[tuple[float, float]]  # (minutes since the traffic started, value), after the warm-up
    in_flight: int  # connections the client may hold at once
    slope: float = 0.0  # per minute
    level: float = 0.0  # mean over the points
    allowed: float = 0.0  # the largest change over the fit still called flat
    verdict: str = "n/a"

    def __post_init__(self) -> None:
        if len(self.points) < 2:
            return
        self.slope = least_squares_slope(self.points)
        self.level = sum(y for _, y in self.points) / len(self.points)
        if self.name == "RSS MB":
            self.allowed = RSS_SHARE * self.level
        else:
            self.allowed = max(COUNT_SHARE * self.level, float(self.in_flight))
        change = self.slope * self.span
        if abs(change) <= self.allowed:
            self.verdict = "flat"
        else:
            self.verdict = "GROWING" if change > 0 else "falling"

    @property
    def span(self) -> float:
        return self.points[-1][0] - self.points[0][0] if self.points else 0.0


@dataclass
class SoakFigures:
    samples: list[Sample]
    after: Sample | None  # once the traffic stopped and the client's connections closed
    warmup: float  # seconds left out of the fit
    in_flight: int
    trends: list[Trend] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in SERIES:
            points = [(s.seconds / 60, v) for s in self.samples
                      if s.seconds >= self.warmup and (v := s.values[name]) is not None]
            self.trends.append(Trend(name, points, self.in_flight))

    def criterion(self) -> str:
        return (f"a series is flat when its least-squares slope over the samples after the first "
                f"{self.warmup:.0f} s, times the minutes they span, moves it by at most {RSS_SHARE:.0%} of its "
                f"mean (RSS) or, for counts, by at most {COUNT_SHARE:.0%} of its mean or the {self.in_flight} "
                "connections the client may hold at once, whichever is more; GROWING past that")

    def table(self) -> list[list[str]]:
        rows = [["t (s)", *SERIES]]
        for sample in self.samples + ([self.after] if self.after else []):
            label = f"{sample.seconds:.0f}" if sample is not self.after else f"{sample.seconds:.0f} (after)"
            rows.append([label, *(fmt(sample.values[name]) for name in SERIES)])
        return rows

    def trend_rows(self) -> list[list[str]]:
        rows = [["series", "slope per minute", "mean", "change over the fit", "allowed", "verdict"]]
        for trend in self.trends:
            if trend.verdict == "n/a":
                rows.append([trend.name, "n/a", "n/a", "n/a", "n/a", "n/a"])
                continue
            rows.append([trend.name, f"{trend.slope:+.3f}", f"{trend.level:.1f}", f"{trend.slope * trend.span:+.1f}",
                         f"±{trend.allowed:.1f}", trend.verdict])
        return rows


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if value != int(value) else f"{value:.0f}"


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(widths[i]) for i, c in enumerate(row) if i]))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows[1:]])
