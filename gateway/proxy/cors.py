"""CORS: the gateway answers preflights itself and decides per token which replies a page may read.

A preflight (`OPTIONS` with `Access-Control-Request-Method`) carries no token, so it can only be
answered from the configuration. aiohttp-cors answers it, for any origin, and it grants nothing
by itself: the real request still needs its token, and its reply is shared only as below. It is
never forwarded upstream.

A real reply carries `Access-Control-Allow-Origin: <Origin>` only when the request's token allowed
that origin, i.e. the origin check ran and passed; every other reply (no token, unknown, disabled,
wrong address, wrong origin) reaches a cross-origin page as a network error, so a page learns
nothing about a key its origin may not use. aiohttp-cors decides from options fixed per route and
cannot express that, so it gets a router adapter that never claims a real request, and
`CorsPolicy.share` adds the headers in the gateway's one response path. The proxy drops upstream
`Access-Control-*` reply headers: the gateway is the only authority on who may read a reply.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp_cors
from aiohttp import hdrs, web
from aiohttp_cors.abc import AbstractRouterAdapter
from multidict import CIMultiDict

from gateway.config import CorsSettings
from gateway.errors import Denied

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PREFLIGHT_REFUSED = "CORS preflight request failed"


def is_preflight(request: web.BaseRequest) -> bool:
    """A plain OPTIONS (no request method named) is an ordinary request and is authorized as one."""
    return request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers


class _CatchAllAdapter(AbstractRouterAdapter):
    """aiohttp-cors's view of the gateway: one catch-all route, and preflights recognised by header.

    aiohttp-cors's own adapter routes every OPTIONS of a resource to its preflight handler and
    refuses resources with a `*` route; the gateway's only route is `*` and a plain OPTIONS must
    still be authorized and forwarded, so this adapter keeps the handler for the gateway to call.
    """

    def __init__(self, options: aiohttp_cors.ResourceOptions) -> None:
        self._options = options
        self.preflight_handler: Handler | None = None

    def add_preflight_handler(self, routing_entity: Any, handler: Handler, webview: bool = False) -> None:
        self.preflight_handler = handler

    def is_preflight_request(self, request: web.Request) -> bool:
        return is_preflight(request)

    def is_cors_enabled_on_request(self, request: web.Request) -> bool:
        # Keeps aiohttp-cors's response hook off real replies: sharing them is decided per token.
        return False

    def set_config_for_routing_entity(self, routing_entity: Any, config: Any) -> None:
        """The options are the gateway's configuration, given to the constructor."""

    async def get_preflight_request_config(self, preflight_request: web.Request, origin: str,
                                           requested_method: str) -> Mapping[str, aiohttp_cors.ResourceOptions]:
        if not self._options.is_method_allowed(requested_method):
            raise KeyError(requested_method)  # aiohttp-cors refuses the preflight, naming the method
        # Any origin: which origins a token accepts is only known once a token is presented.
        return {"*": self._options}

    def get_non_preflight_request_config(self, request: web.Request) -> Mapping[str, aiohttp_cors.ResourceOptions]:
        return {}


def _any_or(names: tuple[str, ...]) -> str | tuple[str, ...]:
    return "*" if names == ("*",) else names


def _options(settings: CorsSettings) -> aiohttp_cors.ResourceOptions:
    return aiohttp_cors.ResourceOptions(allow_methods=_any_or(settings.allow_methods),
                                        allow_headers=_any_or(settings.allow_headers), max_age=settings.max_age)


class CorsPolicy:
    """Built from `cors` in the configuration; disabled, it answers no preflight and shares nothing."""

    def __init__(self, settings: CorsSettings) -> None:
        self._adapter = _CatchAllAdapter(_options(settings))
        self.enabled = settings.enabled
        self._expose = ", ".join(settings.expose_headers)

    def configure(self, settings: CorsSettings) -> None:
        """A reload: preflights and replies from now on follow `settings`. In place, because
        aiohttp-cors keeps the adapter it was installed with (a started app takes no new one)."""
        self._adapter._options = _options(settings)
        self.enabled = settings.enabled
        self._expose = ", ".join(settings.expose_headers)

    def install(self, app: web.Application, route: web.AbstractRoute) -> None:
        """Register the catch-all route with aiohttp-cors, which hands over its preflight handler;
        even while disabled, so that a reload can enable it."""
        aiohttp_cors.CorsConfig(app, router_adapter=self._adapter).add(route)

    def is_preflight(self, request: web.BaseRequest) -> bool:
        return self.enabled and is_preflight(request)

    async def preflight(self, request: web.Request) -> web.StreamResponse:
        """aiohttp-cors's answer; its refusals become gateway errors (JSON, rendered in one place)."""
        handler = self._adapter.preflight_handler
        if handler is None:
            raise RuntimeError("CorsPolicy.install was not called for the gateway's route")
        try:
            response = await handler(request)
        except web.HTTPForbidden as refused:
            raise Denied(403, refused.text or PREFLIGHT_REFUSED) from None
        return response

    def share(self, headers: CIMultiDict[str], origin: str | None, allowed: bool) -> None:
        """Let the page at `origin` read this reply, when `allowed`: its token accepted that origin."""
        if not self.enabled or origin is None:
            return
        # Whether a reply is shared depends on Origin, so a cache must never give it to another one.
        vary_on_origin(headers)
        if allowed:
            headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            if self._expose:
                headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = self._expose


def vary_on_origin(headers: CIMultiDict[str]) -> None:
    """Add `Origin` to `Vary`, keeping what the upstream listed (`Vary: Accept-Encoding`)."""
    listed = [item.strip() for value in headers.getall(hdrs.VARY, ()) for item in value.split(",") if item.strip()]
    if "*" in listed or any(item.lower() == "origin" for item in listed):
        return
    headers[hdrs.VARY] = ", ".join([*listed, "Origin"])

