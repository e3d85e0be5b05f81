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
    """A series' least-squares slope over the fit, and over its second half: a leak keeps the
    same slope to the end, memory that warms up (allocator arenas, buffers at their high-water
    mark) levels off."""

    name: str
    points: list[tuple[float, float]]  # (minutes since the traffic started, value), after the warm-up
    in_flight: int  # connections the client may hold at once
    slope: float = 0.0  # per minute
    late_slope: float = 0.0  # per minute, over the second half of the fit
    level: float = 0.0  # mean over the points
    allowed: float = 0.0  # the largest change over the fit still called flat
    verdict: str = "n/a"

    def __post_init__(self) -> None:
        if len(self.points) < 2:
            return
        self.slope = least_squares_slope(self.points)
        self.level = sum(y for _, y in self.points) / len(self.points)
        self.allowed = self.allowance(1.0)
        change = self.slope * self.span
        if abs(change) <= self.allowed:
            self.verdict = "flat"
            return
        late = self.late_points
        self.late_slope = least_squares_slope(late) if len(late) >= 3 else self.slope
        late_span = late[-1][0] - late[0][0] if len(late) >= 3 else self.span
        if len(late) >= 3 and abs(self.late_slope * late_span) <= self.allowance(late_span / self.span):
            self.verdict = "levels off"
        else:
            self.verdict = "GROWING" if change > 0 else "falling"

    def allowance(self, fraction: float) -> float:
        """The change still called flat over `fraction` of the fit: a share of the level per fit,
        and for counts never less than the connections in flight (they come and go at any time)."""
        if self.name == "RSS MB":
            return RSS_SHARE * self.level * fraction
        return max(COUNT_SHARE * self.level * fraction, float(self.in_flight))

    @property
    def late_points(self) -> list[tuple[float, float]]:
        middle = self.points[0][0] + self.span / 2
        return [(x, y) for x, y in self.points if x >= middle]

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
                "connections the client may hold at once, whichever is more. Past that, it levels off when the "
                "slope over the second half of those samples moves it by no more than that allowance for half "
                "the time (the same share, the same floor for counts), and is GROWING (or falling) otherwise")

    def table(self) -> list[list[str]]:
        rows = [["t (s)", *SERIES]]
        for sample in self.samples + ([self.after] if self.after else []):
            label = f"{sample.seconds:.0f}" if sample is not self.after else f"{sample.seconds:.0f} (after)"
            rows.append([label, *(fmt(sample.values[name]) for name in SERIES)])
        return rows

    def trend_rows(self) -> list[list[str]]:
        rows = [["series", "slope per minute", "mean", "change over the fit", "allowed", "second half, per minute",
                 "verdict"]]
        for trend in self.trends:
            if trend.verdict == "n/a":
                rows.append([trend.name, *["n/a"] * 6])
                continue
            late = f"{trend.late_slope:+.3f}" if trend.verdict != "flat" else "-"
            rows.append([trend.name, f"{trend.slope:+.3f}", f"{trend.level:.1f}", f"{trend.slope * trend.span:+.1f}",
                         f"±{trend.allowed:.1f}", late, trend.verdict])
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
