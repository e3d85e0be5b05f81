"""Turning a stored record into a `Token` for the cache: everything per-token is compiled here, once."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .acl import compile_acl, load_group_members, parse_uri_patterns
from .errors import FieldProblem
from .ipmask import compile_ip_masks, ip_mask_problems
from .origins import compile_origins, origin_problems
from .acl import acl_problems
from .config import Settings
from .store import RedisStore
from .tokens import Token, TokenType
from .validation import TokenValidator


class TokenCompiler:
    def __init__(self, settings: Settings, store: RedisStore) -> None:
        self._store = store
        self._presets: Mapping[str, Sequence[str]] = dict(settings.origin_presets)
        self._patterns = parse_uri_patterns(dict(settings.acl.uri_patterns), settings.platform_prefixes)
        self._group_uri = settings.acl.group_uri
        self._platform = settings.platform_prefixes

    async def __call__(self, record: dict[str, Any]) -> Token:
        access = record.get("access") or {}
        kind = TokenType(access.get("type", 0))
        token = Token(
            id=int(record["id"]), digest=record["digest"], cid=int(record.get("cid", 0)), type=kind,
            enabled=bool(record.get("enabled", True)), expire=int(record.get("expire", 0)),
            ttl=int(record.get("ttl", 0)), created=int(record.get("created", 0)),
            accessed=int(record.get("accessed", 0)),
            record={k: v for k, v in record.items() if k != "digest"},
            ips=compile_ip_masks(record.get("ips") or ""),
            origins=compile_origins(record.get("origins"), self._presets),
        )
        if kind is TokenType.ACL:
            token.acl = compile_acl(list(access.get("acl") or []), self._patterns, self._group_uri, self._platform)
            if token.acl.groups_needed():
                # Membership is owned by the upstream application; it is cached with the token.
                token.group_members = await self._store.call(
                    lambda: load_group_members(self._store.client, self._store.prefix, token.acl))
        return token

    def validator(self) -> TokenValidator:
        def acl(value: Any) -> list[FieldProblem]:
            return acl_problems(value, "access.acl", self._platform, self._group_uri)

        def ips(value: Any) -> list[FieldProblem]:
            return [FieldProblem("ips", reason) for reason in ip_mask_problems(value)]

        def origins(value: Any) -> list[FieldProblem]:
            return [FieldProblem("origins", reason) for reason in origin_problems(value, self._presets)]

        return TokenValidator(acl_problems=acl, ips_problems=ips, origins_problems=origins)
