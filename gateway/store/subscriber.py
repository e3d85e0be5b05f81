"""The loop that keeps a `TokenCache` subscribed to the invalidation channel, interpreted.

`TokenCache.follow` (compiled) reads one subscription; this loop makes it again after a failure
and, on a cluster, runs two at once. Compiled, that loop (two coroutines under `gather`, a pause
awaited while an exception was handled) did not end when cancelled at shutdown: the task hung in
"cancelling", or formatting it crashed the process. It runs a few times per failure, never per
request, so nothing is lost by leaving it to the interpreter.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.store.cache import TokenCache

log = logging.getLogger("gateway.store.cache")


async def follow_channel(cache: TokenCache, retry_delay: float) -> None:
    """Every subscription the store asks for (`TokenStore.subscriptions`), for the life of the app."""
    count = cache.subscriptions
    if count == 1:
        await _subscribe(cache, 0, retry_delay)
        return
    tasks = [asyncio.ensure_future(_subscribe(cache, number, retry_delay)) for number in range(count)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _subscribe(cache: TokenCache, number: int, retry_delay: float) -> None:
    while True:
        if not await _subscribe_once(cache, number):
            await asyncio.sleep(retry_delay)


async def _subscribe_once(cache: TokenCache, number: int) -> bool:
    """Follow subscription `number` until it fails; whether it had been live (then it is made
    again at once, else after a pause)."""
    was_live = False
    try:
        async with cache.subscription(number) as pubsub:
            try:
                await cache.follow(pubsub, number)
            except Exception:
                # Not live from the moment the connection says so (a reset, an EOF): leaving the
                # subscription awaits its cleanup (the connection closed and given back to the
                # pool), and requests served meanwhile must re-read.
                was_live = cache.subscription_live(number)
                cache.subscription_down(number)
                raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        was_live = was_live or cache.subscription_live(number)
        if was_live:
            log.warning("token invalidation channel lost (%s); subscribing again", type(exc).__name__)
        cache.subscription_down(number)
    return was_live
