"""A gateway error as a reply: the same status, body and headers for every front.

`RequestFlow.error_headers` says which headers an error carries and `errors.error_body` what its
body is; these two render them, for aiohttp (`web.Response`) and as the bytes the fast path
writes to its socket.
"""
from __future__ import annotations

from http import HTTPStatus

import orjson
from aiohttp import web

from gateway.errors import FieldProblem, error_body
from gateway.proxy.flow import RequestFlow

STATUS_LINES = {status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode()) for status in HTTPStatus}
JSON = "application/json"


def error_response(flow: RequestFlow, status: int, reason: str, extra: dict[str, str] | None = None) -> web.Response:
    """One gateway error for aiohttp (the request id is added with the other reply headers)."""
    response = web.Response(status=status, body=error_body(status, reason), content_type=JSON)
    for name, value in flow.error_headers(status, extra or {}):
        response.headers[name] = value
    return response


def invalid_input_response(problems: list[FieldProblem]) -> web.Response:
    body = orjson.dumps({"errors": [problem.as_json() for problem in problems]})
    return web.Response(status=400, body=body, content_type=JSON)


def error_bytes(flow: RequestFlow, status: int, reason: str, extra: dict[str, str], request_id: bytes, date: bytes,
                close: bool) -> bytes:
    """The same reply as `error_response`, as an HTTP/1.1 message (`request_id` empty: none)."""
    body = error_body(status, reason)
    head = [STATUS_LINES.get(status) or b"HTTP/1.1 %d Error\r\n" % status,
            b"Content-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n" % (JSON.encode(), len(body), date)]
    for name, value in flow.error_headers(status, extra):
        head.append(b"%s: %s\r\n" % (name.encode(), value.encode()))
    if request_id:
        head.append(b"%s: %s\r\n" % (flow.request_id_header.encode(), request_id))
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    head.append(body)
    return b"".join(head)
