"""Every test here runs through both fronts: the fast path and aiohttp (`front`, tests/conftest.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(params=["fast", "aiohttp"])
def front(request: pytest.FixtureRequest) -> str:
    return str(request.param)
