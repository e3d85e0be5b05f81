import asyncio
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
    def __init__(self, host, port): self.idle = []; self.host = host; self.port = port
    async def request(self, data):
        loop = asyncio.get_running_loop()
        if self.idle: conn = self.idle.pop()
        else: _, conn = await loop.create_connection(UpstreamConn, self.host, self.port)
        conn.waiter = loop.create_future()
        conn.transport.write(data)
        result = await conn.waiter
        conn.waiter = None
        self.idle.append(conn)
        return result
def build_request(method, raw_path, host, headers):
    parts = [f"{method} {raw_path} HTTP/1.1\r\n".encode(), b"Host: " + host + b"\r\n"]
    for k, v in headers:
        parts.append(k + b": " + v + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
