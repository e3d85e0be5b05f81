"""Turning a stored record into a `Token` for the cache: everything per-token is compiled here, once."""
from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from gateway.config import Settings
from gateway.policy.acl import compile_acl, parse_uri_patterns
from gateway.policy.ipmask import compile_ip_masks
from gateway.policy.origins import compile_origins
from gateway.store.groups import load_group_members
from gateway.store.tokens import RedisStore
from gateway.tokens import TOKEN_TYPES, Token, TokenType


class TokenCompiler:
    def __init__(self, settings: Settings, store: RedisStore) -> None:
        self._store = store
        self._presets: Mapping[str, Sequence[str]] = dict(settings.origin_presets)
        self._patterns = parse_uri_patterns(dict(settings.acl.uri_patterns), settings.platform_prefixes)
        self._group_uri = settings.acl.group_uri
        self._platform = settings.platform_prefixes

    async def compile_many(self, records: Sequence[dict[str, Any]]) -> list[Token | Exception]:
        """A `Token` per record, or the exception that compiling it raised (one bad record fails
        alone); the group members that ACL tokens need are read from the store concurrently."""
        compiled, grouped = self.compile_each(records)
        if grouped:
            await self.add_group_members(compiled, grouped)
        return compiled

    def compile_each(self, records: Sequence[dict[str, Any]]) -> tuple[list[Token | Exception], list[int]]:
        """`compile_many` up to the group members: the results, and the indexes of the tokens
        that still need theirs (`add_group_members`)."""
        compiled: list[Token | Exception] = []
        grouped: list[int] = []
        for record in records:
            try:
                token = self.compile(record)
            except Exception as exc:
                compiled.append(exc)
                continue
            compiled.append(token)
            if token.acl is not None and token.acl.groups_needed():
                grouped.append(len(compiled) - 1)
        return compiled, grouped

    async def add_group_members(self, compiled: list[Token | Exception], grouped: list[int]) -> None:
        # Membership is owned by the upstream application; it is cached with the token.
        tokens = [token for token in (compiled[index] for index in grouped) if isinstance(token, Token)]
        found = await asyncio.gather(*(self._group_members(token) for token in tokens), return_exceptions=True)
        for index, token, members in zip(grouped, tokens, found, strict=False):
            if isinstance(members, BaseException):
                if not isinstance(members, Exception):
                    raise members
                compiled[index] = members
            else:
                token.group_members = members

    def compile(self, record: dict[str, Any]) -> Token:
        """Everything but group membership (`compile_many` adds it)."""
        access = record.get("access") or {}
        kind = TOKEN_TYPES.get(access.get("type", 0))
        if kind is None:
            raise ValueError(f"{access.get('type')!r} is not a token type")
        token = Token(
            id=int(record["id"]), digest=record["digest"], cid=int(record.get("cid", 0)), type=kind,
            enabled=bool(record.get("enabled", True)), expire=int(record.get("expire", 0)),
            ttl=int(record.get("ttl", 0)), created=int(record.get("created", 0)),
            accessed=int(record.get("accessed", 0)),
            # A copy of exactly its length: what orjson returns keeps its whole 4 KiB write buffer.
            record_json=memoryview(orjson.dumps({k: v for k, v in record.items() if k != "digest"})).tobytes(),
            ips=compile_ip_masks(record.get("ips") or ""),
            origins=compile_origins(record.get("origins"), self._presets),
        )
        if kind is TokenType.ACL:
            token.acl = compile_acl(list(access.get("acl") or []), self._patterns, self._group_uri, self._platform)
        return token

    async def _group_members(self, token: Token) -> dict[str, frozenset[int]]:
        return await self._store.call(lambda: load_group_members(self._store.client, self._store.keys, token.acl))
