"""Usage windows, for tests that count real calls against a limit."""
from __future__ import annotations

import asyncio
import time

WINDOW = 60  # the default `usage.window`


async def room_in_window(needed: float, window: int = WINDOW) -> None:
    """Wait, if need be, for a usage window with `needed` seconds still to run. Counts start again
    in each window, a block ends with its window and an instance may serve a small share unleased
    before its first exchange in one: a test whose calls straddle two windows could see its limit
    never reached, its block lifted or its lease renewed by the window, not by what it tests."""
    left = window - time.time() % window
    if left < needed:
        await asyncio.sleep(left + 0.05)
