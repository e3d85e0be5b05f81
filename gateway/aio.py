"""Small asyncio helpers."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.errors import StoreUnavailable

log = logging.getLogger("gateway")


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait for `event` at most `seconds`; True if it was set.

    Not `asyncio.wait_for`: on Python 3.11 it can swallow a cancellation that arrives as the
    event is set, which left a background writer running forever at shutdown.
    """
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_all(tasks: Sequence[asyncio.Task[Any]], retry_every: float = 0.5) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again while any runs on.

    One cancellation is not always enough: on Python 3.11 `asyncio.wait_for` (fakeredis uses it
    for every reply of the embedded store) drops a cancellation that arrives as its future
    completes, and the background loop that was waiting on it then runs forever, so shutdown hung.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_every)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not report it again when it is collected


async def every(seconds: float, job: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `job` every `seconds` for good; a store outage is expected and waited out quietly."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except StoreUnavailable:
            pass
        except Exception:
            log.exception("%s failed", what)
