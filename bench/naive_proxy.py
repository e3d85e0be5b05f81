"""The "bolted-on naive proxy" the gateway is compared with: one Redis GET per request, then forward.

For every request: take the key from `Authorization: FlespiToken <key>`, GET the gateway's record
key `{prefix}tok:<sha256 hex of the key>` from Redis, refuse with 401 if it is missing, else
forward the request with one shared aiohttp ClientSession and return the upstream's reply.
No cache, no checks beyond existence, no log: what one writes in an afternoon.
With --no-check it skips the Redis GET too: the cost of aiohttp's server and client alone.

    python bench/naive_proxy.py --port 9001 --upstream http://127.0.0.1:9000 \
        --redis redis://127.0.0.1:6390/0 [--prefix '{gw}:']

It runs on uvloop when installed, as the gateway does, so the comparison is about the code.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import AsyncIterator

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "authorization", "content-length",
})


def build_app(upstream: str, redis_url: str, prefix: str, check: bool = True) -> web.Application:
    app = web.Application()
    state: dict[str, object] = {}

    async def context(app: web.Application) -> AsyncIterator[None]:
        state["redis"] = aioredis.Redis.from_url(redis_url)
        state["session"] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await state["session"].close()  # type: ignore[attr-defined]
        await state["redis"].aclose()  # type: ignore[attr-defined]

    async def handle(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "flespitoken" or not key:
            return web.json_response({"errors": [{"code": 401, "reason": "no token"}]}, status=401)
        if check:
            digest = hashlib.sha256(key.strip().encode()).hexdigest()
            record = await state["redis"].get(f"{prefix}tok:{digest}")  # type: ignore[attr-defined]
            if record is None:
                return web.json_response({"errors": [{"code": 401, "reason": "invalid token"}]}, status=401)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read() if request.body_exists else None
        session: aiohttp.ClientSession = state["session"]  # type: ignore[assignment]
        async with session.request(request.method, upstream + request.raw_path, headers=headers, data=body,
                                   allow_redirects=False) as reply:
            payload = await reply.read()
            out = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=reply.status, body=payload, headers=out)

    app.cleanup_ctx.append(context)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parse = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parse.add_argument("--host", default="127.0.0.1")
    parse.add_argument("--port", type=int, required=True)
    parse.add_argument("--upstream", required=True, help="http://host:port (no trailing slash)")
    parse.add_argument("--redis", required=True, help="redis://host:port/db")
    parse.add_argument("--prefix", default="{gw}:", help="the gateway's redis.key_prefix")
    parse.add_argument("--no-check", action="store_true",
                       help="skip the Redis GET: aiohttp server + ClientSession alone, the floor of any aiohttp proxy")
    args = parse.parse_args()
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(build_app(args.upstream.rstrip("/"), args.redis, args.prefix, not args.no_check),
                host=args.host, port=args.port,
                access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
