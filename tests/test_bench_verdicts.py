"""The verdicts of the bench scripts: run.py's scaling, soak.py's trends (the scripts themselves are never
run by the tests)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from harness.report import scaling_verdict  # noqa: E402
from harness.sampling import Trend, least_squares_slope  # noqa: E402


@pytest.mark.parametrize(("scale", "per_core", "saturated", "cores", "expected"), [
    (1.6, 0.8, False, 1.9, True),    # twice the cores, nearly twice the throughput
    (1.2, 0.9, False, 1.3, False),   # cores were free and the workers did not use them
    (1.1, 0.95, True, 1.4, True),    # saturated machine, no loss per core, enough cores to tell
    (1.1, 1.02, True, 1.06, None),   # saturated, the workers barely had one core: nothing shown
    (1.0, 0.6, True, 1.1, False),    # a loss per core shows even on a saturated machine
])
def test_scaling_verdict(scale: float, per_core: float, saturated: bool, cores: float, expected: bool | None) -> None:
    assert scaling_verdict(scale, per_core, saturated, cores, 2) is expected


def test_least_squares_slope() -> None:
    assert least_squares_slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert least_squares_slope([(0, 4), (1, 6), (2, 4), (3, 6)]) == pytest.approx(0.4)
    assert least_squares_slope([(1, 7), (1, 9)]) == 0.0  # one x value: no line


@pytest.mark.parametrize(("name", "values", "expected"), [
    ("RSS MB", [60.0, 60.5, 60.2, 60.8, 60.4], "flat"),        # noise well under 5 % of 60 MB
    ("RSS MB", [60.0, 63.0, 66.0, 69.0, 72.0], "GROWING"),     # +12 MB over 4 minutes
    ("fds", [40, 70, 45, 65, 50], "flat"),                     # connections in flight come and go
    ("fds", [100, 800, 1500, 2200, 2900], "GROWING"),          # one left open per API call
    ("tasks", [900, 700, 500, 300, 100], "falling"),
    ("RSS MB", [54.8, 57.0, 59.5, 60.3, 60.3, 60.3, 60.3, 60.4], "levels off"),  # warms up, then stays
    ("RSS MB", [54.8, 57.0, 59.5, 60.3, 60.3, 60.3, 61.5, 62.5], "GROWING"),  # grows again late
])
def test_soak_trend(name: str, values: list[float], expected: str) -> None:
    trend = Trend(name, [(float(minute), value) for minute, value in enumerate(values)], in_flight=32)
    assert trend.verdict == expected


def test_soak_trend_needs_two_samples() -> None:
    assert Trend("fds", [(0.5, 40.0)], in_flight=32).verdict == "n/a"
