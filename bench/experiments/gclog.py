"""Run the gateway with monkeypatched variants (experiments only; gateway/ is untouched).

    VARIANT=oneshot,reqid python bench/experiments/variant.py --config FILE

oneshot   small upstream replies relayed as one web.Response (one write) instead of StreamResponse
reqid     request id from a per-process prefix + counter instead of uuid4()
nolog     no request log line
noauth    authentication done once per key, then skipped (an upper bound of its cost)
rawproxy  plain requests forwarded by rawlib.py's keep-alive HTTP/1.1 pool instead of ClientSession
          (a prototype: Content-Length replies only, no timeouts, no errors handled)
gcstats   log gen-2 collections (and any over 5 ms) to $GCLOG
gcfreeze  gc.freeze() every 2 s, so long-lived objects (cached tokens) leave the collector's view
"""
import os, sys
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
variants = set(filter(None, os.environ.get("VARIANT", "").split(",")))
import gateway.proxy as proxy
import gateway.app as app
from aiohttp import web

if "oneshot" in variants:
    orig_relay = proxy.Proxy._relay
    async def _relay(self, request, upstream, finish):
        body_allowed = request.method != "HEAD" and upstream.status not in proxy.NO_BODY_STATUSES
        if body_allowed:
            first = await upstream.content.readany()
            if upstream.content.at_eof():
                headers = proxy.response_headers(upstream.headers)
                headers.popall("Content-Length", None)
                response = web.Response(status=upstream.status, reason=upstream.reason, body=first, headers=headers)
                finish(response)
                return response
            raise RuntimeError("experiment only handles small bodies")
        return await orig_relay(self, request, upstream, finish)
    proxy.Proxy._relay = _relay

if "reqid" in variants:
    import itertools
    counter = itertools.count()
    base = os.urandom(8).hex()
    app.Gateway._request_id = lambda self, request: f"{base}{next(counter):016x}"

if "nolog" in variants:
    app.Gateway._log_request = lambda *a, **k: None

if "noauth" in variants:
    from gateway.auth import Authenticator
    tok = {}
    orig = Authenticator.authenticate
    async def authenticate(self, key, facts):
        t = tok.get(key)
        if t is None:
            t = tok[key] = await orig(self, key, facts)
        facts.token = t
        return t
    Authenticator.authenticate = authenticate

if "rawproxy" in variants:
    sys.argv_saved = sys.argv
    import importlib.util
    spec = importlib.util.spec_from_file_location("barelib", str(HERE / "rawlib.py"))
    barelib = importlib.util.module_from_spec(spec); spec.loader.exec_module(barelib)
    pools = {}
    async def forward(self, request, url, headers, finish):
        origin = (url.host, url.port)
        pool = pools.get(origin) or pools.setdefault(origin, barelib.Pool(url.host, url.port))
        data = barelib.build_request(request.method, url.raw_path_qs, f"{url.host}:{url.port}".encode(),
                                     [(k.encode(), v.encode()) for k, v in headers.items()])
        status, rheaders, body = await pool.request(data)
        out = [(k.decode(), v.decode()) for k, v in rheaders if k.lower() != b"content-length"]
        response = web.Response(status=status, body=body, headers=out)
        finish(response)
        return response
    proxy.Proxy.forward = forward

if "gcstats" in variants or "gcfreeze" in variants:
    import gc, time as _t
    gclog = open(os.environ.get("GCLOG", str(HERE.parent / "out" / "gc.log")), "a")
    _start = {}
    def cb(phase, info):
        if phase == "start":
            _start["t"] = _t.perf_counter()
        else:
            d = (_t.perf_counter() - _start.get("t", _t.perf_counter())) * 1000
            if info["generation"] == 2 or d > 5:
                gclog.write(f"{_t.time():.3f} gen{info['generation']} {d:.1f}ms collected={info['collected']} tracked={len(gc.get_objects()) if d > 50 else -1}\n"); gclog.flush()
    gc.callbacks.append(cb)

if "gcfreeze" in variants:
    # freeze what is long-lived every few seconds: the cache's entries leave the collector's view
    import gc, asyncio as _a
    from gateway import app as _app
    _orig_services = _app.services
    async def services(app, settings):
        async def freezer():
            while True:
                await _a.sleep(2)
                gc.freeze()
        task = _a.ensure_future(freezer())
        try:
            async for _ in _orig_services(app, settings):
                yield
        finally:
            task.cancel()
    _app.services = services

from gateway.cli import main
sys.exit(main())
