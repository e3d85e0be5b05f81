"""The load benchmark's scaling verdict (the benchmark itself is never run by the tests)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from harness.report import scaling_verdict  # noqa: E402


@pytest.mark.parametrize(("scale", "per_core", "saturated", "cores", "expected"), [
    (1.6, 0.8, False, 1.9, True),    # twice the cores, nearly twice the throughput
    (1.2, 0.9, False, 1.3, False),   # cores were free and the workers did not use them
    (1.1, 0.95, True, 1.4, True),    # saturated machine, no loss per core, enough cores to tell
    (1.1, 1.02, True, 1.06, None),   # saturated, the workers barely had one core: nothing shown
    (1.0, 0.6, True, 1.1, False),    # a loss per core shows even on a saturated machine
])
def test_scaling_verdict(scale: float, per_core: float, saturated: bool, cores: float, expected: bool | None) -> None:
    assert scaling_verdict(scale, per_core, saturated, cores, 2) is expected
