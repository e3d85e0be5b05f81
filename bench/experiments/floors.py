"""Floors (python floors.py MODE PORT UPSTREAM_URL): aiohttp hello server (hello), aiohttp server + ClientSession forward (forward),
aiohttp server + raw keep-alive client (rawclient), raw asyncio server + raw client (rawboth)."""
import sys, asyncio, aiohttp, uvloop
from aiohttp import web
from yarl import URL
mode, port, upstream = sys.argv[1], int(sys.argv[2]), sys.argv[3]
u = URL(upstream)
UP_HOST = f"{u.host}:{u.port}".encode()

class UpstreamConn(asyncio.Protocol):
    def __init__(self):
        self.buf = bytearray(); self.waiter = None; self.transport = None
    def connection_made(self, t): self.transport = t
    def connection_lost(self, exc):
        if self.waiter and not self.waiter.done(): self.waiter.set_exception(ConnectionError("lost"))
    def data_received(self, data):
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            parsed = self.try_parse()
            if parsed is not None: self.waiter.set_result(parsed)
    def try_parse(self):
        end = self.buf.find(b"\r\n\r\n")
        if end < 0: return None
        lines = bytes(self.buf[:end]).split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = []; clen = 0
        for line in lines[1:]:
            k, _, v = line.partition(b":"); v = v.strip()
            if k.lower() == b"content-length": clen = int(v)
            elif k.lower() not in (b"connection", b"keep-alive", b"transfer-encoding"): headers.append((k, v))
        total = end + 4 + clen
        if len(self.buf) < total: return None
        body = bytes(self.buf[end + 4:total]); del self.buf[:total]
        return status, headers, body

class Pool:
    def __init__(self): self.idle = []
    async def request(self, data):
        loop = asyncio.get_running_loop()
        if self.idle: conn = self.idle.pop()
        else: _, conn = await loop.create_connection(UpstreamConn, u.host, u.port)
        conn.waiter = loop.create_future()
        conn.transport.write(data)
        result = await conn.waiter
        conn.waiter = None
        self.idle.append(conn)
        return result

pool = Pool()

def build_request(method, raw_path, headers):
    parts = [f"{method} {raw_path} HTTP/1.1\r\n".encode(), b"Host: " + UP_HOST + b"\r\n"]
    for k, v in headers:
        parts.append(k + b": " + v + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)

class RawServer(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = bytearray(); self.busy = False
    def data_received(self, data):
        self.buf += data
        if not self.busy: self.next()
    def next(self):
        end = self.buf.find(b"\r\n\r\n")
        if end < 0: return
        head = bytes(self.buf[:end]); del self.buf[:end + 4]
        lines = head.split(b"\r\n")
        method, path, _ = lines[0].split(b" ")
        hdrs = []
        for line in lines[1:]:
            k, _, v = line.partition(b":"); lk = k.lower()
            if lk not in (b"host", b"authorization", b"connection"): hdrs.append((k, v.strip()))
        self.busy = True
        asyncio.ensure_future(self.handle(method.decode(), path.decode(), hdrs))
    async def handle(self, method, path, hdrs):
        status, headers, body = await pool.request(build_request(method, path, hdrs))
        out = [f"HTTP/1.1 {status} OK\r\n".encode()]
        for k, v in headers:
            out.append(k + b": " + v + b"\r\n")
        out.append(b"Content-Length: %d\r\n\r\n" % len(body)); out.append(body)
        self.t.write(b"".join(out))
        self.busy = False
        self.next()

if mode == "rawboth":
    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(RawServer, "127.0.0.1", port, backlog=1024)
        await asyncio.Event().wait()
    uvloop.run(main())
    sys.exit()

app = web.Application()
state = {}
async def ctx(app):
    state["s"] = aiohttp.ClientSession()
    yield
    await state["s"].close()
async def hello(request):
    return web.Response(body=b"ok")
async def forward(request):
    async with state["s"].get(upstream + request.raw_path) as r:
        body = await r.read()
        return web.Response(status=r.status, body=body)
async def rawclient(request):
    hdrs = [(k.encode(), v.encode()) for k, v in request.headers.items() if k.lower() not in ("host", "authorization", "connection")]
    status, headers, body = await pool.request(build_request(request.method, request.raw_path, hdrs))
    return web.Response(status=status, body=body, headers=[(k.decode(), v.decode()) for k, v in headers if k.lower() != b"content-length"])
app.cleanup_ctx.append(ctx)
app.router.add_route("*", "/{tail:.*}", {"hello": hello, "forward": forward, "rawclient": rawclient}[mode])
web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop())
