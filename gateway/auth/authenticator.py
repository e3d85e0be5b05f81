"""Authentication: find the token for a request and run the checks; the one decision point."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.auth.checks import Checks, RequestFacts
from gateway.errors import INTERNAL_ERROR, INVALID_TOKEN, STORAGE_UNAVAILABLE, Denied, StoreUnavailable, Undecided
from gateway.store.cache import Outcome, TokenCache
from gateway.tokens import KEY_LENGTH, Token, key_digest
from gateway.writers.accessed import AccessedWriter

log = logging.getLogger("gateway.auth.authenticator")
SCHEME = "flespitoken"
# A check that cannot decide at once (`Undecided`: usage near a limit) is asked again after what it
# waits for, for this long at most; then the request gets the check's refusal.
UNDECIDED_WAIT = 2.0


def extract_key(authorization: str | None) -> str | None:
    """`FlespiToken <key>`, or the bare key as the whole value; any other scheme is no token."""
    if not authorization:
        return None
    value = authorization.strip()
    scheme, _, rest = value.partition(" ")
    if rest and scheme.lower() == SCHEME:
        value = rest.strip()
    elif rest:
        return None
    if len(value) != KEY_LENGTH or not value.isascii() or not value.isalnum():
        return None
    return value


class Authenticator:
    def __init__(self, cache: TokenCache, accessed: AccessedWriter, checks: Checks) -> None:
        self._cache = cache
        self._accessed = accessed
        self._checks = checks

    async def authenticate(self, key: str | None, facts: RequestFacts) -> Token:
        """The token allowed to make this request, or `Denied`; any other failure denies too."""
        try:
            return await self._authenticate(key, facts)
        except Denied:
            raise
        except StoreUnavailable:
            raise Denied(503, STORAGE_UNAVAILABLE) from None
        except Exception:
            log.exception("unexpected error while authenticating; request denied")
            raise Denied(500, INTERNAL_ERROR) from None

    def authenticate_cached(self, digest: str | None, facts: RequestFacts, waited: bool = False) -> Token | None:
        """The same decision without waiting, when the cache alone can make it; None means "ask
        `authenticate`". It takes the key's digest (`key_digest`, None for no key): a request
        that has to wait for its record asks again, and hashes once. Raises `Denied` like
        `authenticate`, and any other failure denies too. `waited`: asked again once the record's
        load settled (`when_loaded`), so not counted as a cache hit."""
        try:
            if digest is None:
                raise Denied(401, INVALID_TOKEN)
            known, token = self._cache.peek(digest, not waited)
            if not known:
                return None
            if token is None:
                raise Denied(401, INVALID_TOKEN)
            if not token.valid_at(facts.now):
                return None  # `find` reloads it: another instance may have used it since
            facts.token = token
            self._checks.run(token, facts)
            self._accessed.note(token, int(facts.now))
            return token
        except Denied:
            raise
        except Undecided:
            return None  # `authenticate` waits for what the check needs, then decides
        except Exception:
            log.exception("unexpected error while authenticating; request denied")
            raise Denied(500, INTERNAL_ERROR) from None

    def when_loaded(self, digest: str, callback: Callable[[Outcome], None]) -> bool:
        """For a key (by digest) `authenticate_cached` declined because the cache has no entry for
        it at all: `callback` is called once the cache has tried to load it, and
        `authenticate_cached` can then decide. False when there is an entry (stale): ask
        `authenticate`."""
        return self._cache.load_then(digest, callback)

    async def authenticate_digest(self, digest: str, facts: RequestFacts) -> Token:
        """`authenticate` for a key known only by its digest (a live MQTT session re-checked)."""
        try:
            return await self._checked(await self.find_digest(digest, facts.now), facts)
        except Denied:
            raise
        except StoreUnavailable:
            raise Denied(503, STORAGE_UNAVAILABLE) from None
        except Exception:
            log.exception("unexpected error while authenticating; request denied")
            raise Denied(500, INTERNAL_ERROR) from None

    async def find(self, key: str | None, now: float) -> Token:
        if key is None:
            raise Denied(401, INVALID_TOKEN)
        return await self.find_digest(key_digest(key), now)

    async def find_digest(self, digest: str, now: float) -> Token:
        token = await self._cache.lookup(digest)
        if token is not None and not token.valid_at(now):
            token = await self._cache.revalidate(digest)
        if token is None or not token.valid_at(now):
            raise Denied(401, INVALID_TOKEN)
        return token

    async def _authenticate(self, key: str | None, facts: RequestFacts) -> Token:
        return await self._checked(await self.find(key, facts.now), facts)

    async def _checked(self, token: Token, facts: RequestFacts) -> Token:
        facts.token = token
        deadline = 0.0
        while True:
            try:
                self._checks.run(token, facts)  # pure but for the usage check, which counts only a pass
                break
            except Undecided as undecided:
                now = time.monotonic()
                deadline = deadline or now + UNDECIDED_WAIT
                try:
                    async with asyncio.timeout(deadline - now):
                        await undecided.settled()
                except TimeoutError:
                    raise undecided.refusal from None
        self._accessed.note(token, int(facts.now))
        return token
