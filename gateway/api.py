"""The tokens API (SPEC 7), served by the gateway itself to master tokens."""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from .errors import Denied, FieldProblem, InvalidInput
from .logs import LogWriter
from .store import TokenStore
from .tokens import PUBLIC_FIELDS, Token, TokenType, key_digest, new_key
from .validation import DEFAULTS, TokenValidator, validity_problems

TOKENS = "/platform/tokens"
AUTH_INFO = "/auth/info"
MAX_BODY = 1024 * 1024
EVENT_CREATED, EVENT_UPDATED, EVENT_DELETED = 1, 2, 3
Handler = Callable[[web.Request, Token, str | None], Awaitable[list[dict[str, Any]]]]


def public(record: dict[str, Any], fields: tuple[str, ...] = PUBLIC_FIELDS) -> dict[str, Any]:
    return {name: record.get(name) for name in fields}


def parse_selector(selector: str | None) -> list[int] | None:
    """`all` (or none) -> None; `1,2,3` -> ids; anything else is a 400 naming the selector."""
    if selector is None or selector == "all":
        return None
    ids: list[int] = []
    for part in selector.split(","):
        if not part.isdigit() or not part.isascii() or int(part) < 1:
            raise InvalidInput([FieldProblem("selector", f"invalid token selector '{selector}': use all or ids like 1,2")])
        ids.append(int(part))
    return ids


def parse_fields(request: web.Request) -> tuple[str, ...]:
    raw = request.query.get("fields")
    if raw is None:
        return PUBLIC_FIELDS
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    unknown = [name for name in names if name not in PUBLIC_FIELDS]
    if unknown or not names:
        raise InvalidInput([FieldProblem("fields", f"unknown field in 'fields': {', '.join(unknown) or raw!r}")])
    return names


async def read_json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise InvalidInput([FieldProblem("", f"request body larger than {MAX_BODY} bytes")])
    body = await request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise InvalidInput([FieldProblem("", f"request body larger than {MAX_BODY} bytes")])
    try:
        return orjson.loads(body or b"null")
    except orjson.JSONDecodeError:
        raise InvalidInput([FieldProblem("", "request body is not valid JSON")]) from None


class TokensApi:
    def __init__(self, store: TokenStore, validator: TokenValidator, logs: LogWriter) -> None:
        self._store = store
        self._validator = validator
        self._logs = logs

    def handles(self, path: str) -> bool:
        return path == AUTH_INFO or path == TOKENS or path.startswith(TOKENS + "/")

    async def dispatch(self, request: web.Request, token: Token, path: str) -> web.Response:
        if path == AUTH_INFO:
            if request.method not in ("GET", "HEAD"):
                raise Denied(405, f"method {request.method} is not allowed on {path}")
            return ok([token.public_record()])
        if token.type is not TokenType.MASTER:
            raise Denied(403, f"access to {path.lstrip('/')} is denied: master token required")
        rest = path[len(TOKENS):].strip("/")
        if "/" in rest:
            raise Denied(404, f"unknown path {path}")
        selector = rest or None
        handler = self._handlers().get(request.method)
        if handler is None or (request.method == "POST" and selector is not None):
            raise Denied(405, f"method {request.method} is not allowed on {path}")
        return ok(await handler(request, token, selector))

    def _handlers(self) -> dict[str, Handler]:
        return {"GET": self.get, "HEAD": self.get, "POST": self.create, "PUT": self.update, "DELETE": self.delete}

    async def get(self, request: web.Request, token: Token, selector: str | None) -> list[dict[str, Any]]:
        fields = parse_fields(request)
        return [public(record, fields) for record in await self._select(selector)]

    async def create(self, request: web.Request, token: Token, selector: str | None) -> list[dict[str, Any]]:
        body = await read_json(request)
        items = body if isinstance(body, list) else [body]
        problems = [
            FieldProblem(p.field, p.reason, index if isinstance(body, list) else None)
            for index, item in enumerate(items)
            for p in self._validator.problems(item, partial=False)
        ]
        if problems:
            raise InvalidInput(problems)
        if not items:
            raise InvalidInput([FieldProblem("", "no tokens to create")])
        now = int(time.time())
        ids = await self._store.allocate_ids(len(items))
        created = []
        for token_id, item in zip(ids, items):
            key = new_key()
            record = {**DEFAULTS, **item, "id": token_id, "digest": key_digest(key), "created": now,
                      "accessed": 0, "cid": token.cid}
            created.append((key, record))
        await self._store.insert([record for _, record in created])
        await self._store.publish(record["digest"] for _, record in created)
        self._log_events(EVENT_CREATED, [record for _, record in created], token)
        return [{**public(record), "key": key} for key, record in created]

    async def update(self, request: web.Request, token: Token, selector: str | None) -> list[dict[str, Any]]:
        changes = await read_json(request)
        problems = self._validator.problems(changes, partial=True)
        if problems:
            raise InvalidInput(problems)
        records = await self._select(selector)
        updated = [{**record, **changes} for record in records]
        for record in updated:
            problems = validity_problems(record)
            if problems:
                raise InvalidInput([FieldProblem(p.field, f"token {record['id']}: {p.reason}") for p in problems])
        for record in updated:
            await self._store.replace(record)
        await self._store.publish(record["digest"] for record in updated)
        self._log_events(EVENT_UPDATED, updated, token)
        return [public(record) for record in updated]

    async def delete(self, request: web.Request, token: Token, selector: str | None) -> list[dict[str, Any]]:
        records = await self._select(selector)
        await self._store.remove(records, to_bin=True)
        await self._store.publish(record["digest"] for record in records)
        self._log_events(EVENT_DELETED, records, token)
        return [{"id": record["id"]} for record in records]

    async def _select(self, selector: str | None) -> list[dict[str, Any]]:
        ids = parse_selector(selector)
        return await self._store.get_many(await self._store.all_ids() if ids is None else ids)

    def _log_events(self, code: int, records: list[dict[str, Any]], by: Token) -> None:
        now = time.time()
        for record in records:
            self._logs.emit({"timestamp": now, "event_code": code, "token_id": record["id"], "cid": record["cid"],
                             "by_token_id": by.id})


def ok(result: list[dict[str, Any]]) -> web.Response:
    return web.Response(body=orjson.dumps({"result": result}), content_type="application/json")
