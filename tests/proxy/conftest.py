"""Every test here runs through both fronts: the fast path and aiohttp (`front`, tests/conftest.py),
but the fast path's own tests (`fast_only` in test_fastpath.py) and test_differential.py, which
runs both fronts itself."""
from __future__ import annotations

import pytest


@pytest.fixture(params=["fast", "aiohttp"])
def front(request: pytest.FixtureRequest) -> str:
    return str(request.param)
