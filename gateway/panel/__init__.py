"""The token management panel: static files served at `<internal_prefix>panel/`.

The panel holds no state and no privilege of its own: the page logs in with a token and calls the
same platform API as any client, with that token. This module only hands out its files, read
once at start into memory (so a request can only ever name one of them), each with headers that
keep the page from running anything but its own scripts (`SECURITY_HEADERS`).
"""
from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.config import Settings
from gateway.errors import error_body

STATIC = Path(__file__).resolve().parent / "static"
# No inline script or style, nothing from another origin, never framed, no form posts anywhere
# (the forms are handled by the scripts, so a key typed into one never lands in a URL).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "font-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",  # always revalidated (ETag): an upgraded gateway serves its own panel
}
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}


@dataclass(frozen=True, slots=True)
class PanelFile:
    body: bytes
    content_type: str
    etag: str


FILES = web.AppKey("panel_files", dict[str, PanelFile])


def load_files(root: Path = STATIC) -> dict[str, PanelFile]:
    """Every file under `root` by its path relative to it."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            body = path.read_bytes()
            kind = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            files[path.relative_to(root).as_posix()] = PanelFile(body, kind, f'"{hashlib.sha256(body).hexdigest()[:20]}"')
    return files


async def serve(request: web.Request) -> web.StreamResponse:
    found = request.app[FILES].get(request.match_info.get("name") or "index.html")
    if found is None:
        return web.Response(status=404, body=error_body(404, f"unknown path {request.path}"),
                            content_type="application/json", headers={"X-Content-Type-Options": "nosniff"})
    headers = {**SECURITY_HEADERS, "ETag": found.etag}
    if request.headers.get("If-None-Match") == found.etag:
        return web.Response(status=304, headers=headers)
    charset = "utf-8" if found.content_type.startswith("text/") or found.content_type.endswith("+xml") else None
    return web.Response(body=found.body, content_type=found.content_type, charset=charset, headers=headers)


async def to_slash(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect(request.path + "/")


def install(app: web.Application, settings: Settings) -> None:
    """Add the panel's routes (before the catch-all route, so they are matched first)."""
    if not settings.panel.enabled:
        return
    base = settings.internal_prefix + "panel"
    app[FILES] = load_files()
    app.router.add_get(base, to_slash)
    app.router.add_get(base + "/", serve)
    app.router.add_get(base + "/{name:.+}", serve)
