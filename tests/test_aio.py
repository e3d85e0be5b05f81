"""Small asyncio helpers: shutdown must end background loops even when a cancellation is lost."""
from __future__ import annotations

import asyncio

from gateway.aio import cancel_all


async def test_cancel_all_ends_a_loop_that_swallowed_a_cancellation() -> None:
    swallowed = 0

    async def stubborn() -> None:
        # What a lost cancellation looks like from outside: the loop goes on after being cancelled.
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    async def obedient() -> None:
        await asyncio.sleep(3600)

    tasks = [asyncio.ensure_future(stubborn()), asyncio.ensure_future(obedient())]
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_all(tasks, retry_every=0.05)
    assert swallowed == 1
    assert all(task.cancelled() for task in tasks)


async def test_cancel_all_collects_failures_without_raising() -> None:
    async def failed() -> None:
        raise RuntimeError("writer broke")

    task = asyncio.ensure_future(failed())
    await asyncio.sleep(0)
    await cancel_all([task])
    assert isinstance(task.exception(), RuntimeError)
