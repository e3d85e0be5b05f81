"""Where a checked path goes: the route it matches and the target sent to that route's upstream.

Compiled (every proxied request asks), and shared by every front: the fast path writes the target
into its request head, the aiohttp relay into a URL.
"""
from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote

from yarl import URL

from gateway.config import Route


def pick_route(routes: Iterable[Route], path: str) -> Route | None:
    """Longest prefix wins (routes are kept sorted longest first)."""
    for route in routes:
        if path.startswith(route.prefix):
            return route
    return None


def upstream_target(route: Route, path: str, raw_path: str, query: str) -> str:
    """The request target (path and query) to send upstream: the path exactly as received unless the
    route rewrites its prefix (nginx style)."""
    if route.replaces_prefix:
        prefix = route.prefix
        if raw_path.startswith(prefix):
            rest = raw_path[len(prefix):]
        else:
            rest = quote(path[len(prefix):], safe="/:@!$&'()*+,=-._~")
        base = route.upstream.raw_path
        raw_path = base.rstrip("/") + "/" + rest if base.endswith("/") or prefix.endswith("/") else base + rest
    return raw_path + "?" + query if query else raw_path


def upstream_url(route: Route, path: str, raw_path: str, query: str) -> URL:
    return URL(str(route.upstream.origin()) + upstream_target(route, path, raw_path, query), encoded=True)
