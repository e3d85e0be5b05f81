"""Token ACLs: validation, compilation and matching (group membership is read in store/groups.py)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.errors import Denied
from gateway.policy.acl import (
    CompiledAcl,
    UriPattern,
    acl_problems,
    compile_acl,
    parse_uri_patterns,
)
from gateway.policy.paths import checked_path, forwarded_path

# --- validation -------------------------------------------------------------------------------

GET: dict[str, object] = {"uri": "gw/devices", "methods": ["GET"]}
GROUPS: dict[str, object] = {"uri": "gw/groups", "methods": ["GET"], "ids": [5]}


def _fields(acl: object, **kwargs: Any) -> list[str]:
    return [problem.field for problem in acl_problems(acl, **kwargs)]


@pytest.mark.parametrize(
    "acl",
    [
        [],
        [GET],
        [{"uri": "gw/devices", "methods": ["GET", "POST", "PUT", "DELETE"], "ids": "all"}],
        [{"uri": "gw/devices", "methods": ["GET", "GET"], "ids": [1, 1, 2]}],
        [{"uri": "gw/devices", "methods": ["GET"], "ids": []}],
        [{"uri": "storage/containers", "methods": ["GET"], "ids": [12345, 777]}],
        [{"uri": "gw/devices", "methods": ["GET"], "submodules": []}],
        [
            {
                "uri": "gw/devices",
                "methods": ["GET", "PUT"],
                "ids": [12345, 777],
                "submodules": [
                    {"name": "messages", "methods": ["GET"]},
                    {"name": "settings", "methods": ["GET", "PUT", "DELETE"]},
                    {"name": "settings", "methods": ["GET"]},
                ],
            }
        ],
        [GROUPS, {"uri": "gw/devices", "methods": ["GET"], "ids": "in-groups"}],
        [{"uri": "gw/devices", "methods": ["GET"], "ids": "in-groups"}, {"uri": "gw/groups", "methods": ["PUT"]}],
        [{"uri": "mqtt", "topic": "my/topic/#", "actions": ["publish", "subscribe"]}],
        [{"uri": "mqtt", "topic": "a/+/b", "actions": ["subscribe"]}],
        [{"uri": "mqtt", "topic": "notflespi/x", "actions": ["publish"]}],
        [{"uri": "gw/platform", "methods": ["GET"]}],
        [{"uri": "authors", "methods": ["GET"]}],
    ],
)
def test_valid_acls_have_no_problems(acl: list[object]) -> None:
    assert acl_problems(acl) == []


@pytest.mark.parametrize(
    ("acl", "fields"),
    [
        ("gw/devices", ["access.acl"]),
        ({"uri": "gw/devices"}, ["access.acl"]),
        (None, ["access.acl"]),
        ([1], ["access.acl[0]"]),
        ([GET, ["gw/devices"]], ["access.acl[1]"]),
        ([{**GET, "name": "x"}], ["access.acl[0].name"]),
        ([{**GET, "topic": "x"}], ["access.acl[0].topic"]),
        ([{"methods": ["GET"]}], ["access.acl[0].uri"]),
        ([{**GET, "uri": ""}], ["access.acl[0].uri"]),
        ([{**GET, "uri": 5}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "/gw/devices"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw/devices/"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": " gw/devices"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw/devices\n"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw devices"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw//devices"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw/../platform"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw/./devices"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw/%2e%2e"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw/dev%69ces"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw/devices;x"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw\\devices"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw/{devices}"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw/dev?ices"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw/\u0434"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "gw/devices\x00"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "platform"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "platform/tokens"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "Platform/Tokens"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "auth"}], ["access.acl[0].uri"]),
        ([{**GET, "uri": "auth/info"}], ["access.acl[0].uri"]),
        ([{"uri": "gw/devices"}], ["access.acl[0].methods"]),
        ([{**GET, "methods": []}], ["access.acl[0].methods"]),
        ([{**GET, "methods": "GET"}], ["access.acl[0].methods"]),
        ([{**GET, "methods": ["PATCH"]}], ["access.acl[0].methods"]),
        ([{**GET, "methods": ["HEAD"]}], ["access.acl[0].methods"]),
        ([{**GET, "methods": ["OPTIONS"]}], ["access.acl[0].methods"]),
        ([{**GET, "methods": ["get"]}], ["access.acl[0].methods"]),
        ([{**GET, "methods": ["GET", 1]}], ["access.acl[0].methods"]),
        ([{**GET, "methods": [{"GET": 1}]}], ["access.acl[0].methods"]),
        ([{**GET, "ids": "none"}], ["access.acl[0].ids"]),
        ([{**GET, "ids": None}], ["access.acl[0].ids"]),
        ([{**GET, "ids": 5}], ["access.acl[0].ids"]),
        ([{**GET, "ids": [0]}], ["access.acl[0].ids"]),
        ([{**GET, "ids": [-1]}], ["access.acl[0].ids"]),
        ([{**GET, "ids": [True]}], ["access.acl[0].ids"]),
        ([{**GET, "ids": [1.0]}], ["access.acl[0].ids"]),
        ([{**GET, "ids": ["1"]}], ["access.acl[0].ids"]),
        ([{**GET, "ids": {"1": 1}}], ["access.acl[0].ids"]),
        ([{**GET, "ids": "in-groups"}], ["access.acl[0].ids"]),
        ([{**GROUPS, "ids": "in-groups"}], ["access.acl[0].ids"]),
        ([{**GET, "submodules": "messages"}], ["access.acl[0].submodules"]),
        ([{**GET, "submodules": {"name": "messages", "methods": ["GET"]}}], ["access.acl[0].submodules"]),
        ([{**GET, "submodules": ["messages"]}], ["access.acl[0].submodules[0]"]),
        ([{**GET, "submodules": [{"name": "messages"}]}], ["access.acl[0].submodules[0].methods"]),
        ([{**GET, "submodules": [{"name": "m", "methods": ["PATCH"]}]}], ["access.acl[0].submodules[0].methods"]),
        ([{**GET, "submodules": [{"name": "", "methods": ["GET"]}]}], ["access.acl[0].submodules[0].name"]),
        ([{**GET, "submodules": [{"name": "a/b", "methods": ["GET"]}]}], ["access.acl[0].submodules[0].name"]),
        ([{**GET, "submodules": [{"name": "..", "methods": ["GET"]}]}], ["access.acl[0].submodules[0].name"]),
        ([{**GET, "submodules": [{"name": 7, "methods": ["GET"]}]}], ["access.acl[0].submodules[0].name"]),
        ([{**GET, "submodules": [{"name": "a b", "methods": ["GET"]}]}], ["access.acl[0].submodules[0].name"]),
        ([{**GET, "submodules": [{"name": "a%20b", "methods": ["GET"]}]}], ["access.acl[0].submodules[0].name"]),
        ([{**GET, "submodules": [{"name": "{x}", "methods": ["GET"]}]}], ["access.acl[0].submodules[0].name"]),
        ([{**GET, "submodules": [{"name": "m", "methods": ["GET"], "ids": [1]}]}], ["access.acl[0].submodules[0].ids"]),
        ([{"uri": "mqtt", "topic": "flespi/state/#", "actions": ["subscribe"]}], ["access.acl[0].topic"]),
        ([{"uri": "mqtt", "topic": "flespi/", "actions": ["subscribe"]}], ["access.acl[0].topic"]),
        ([{"uri": "mqtt", "actions": ["subscribe"]}], ["access.acl[0].topic"]),
        ([{"uri": "mqtt", "topic": "", "actions": ["subscribe"]}], ["access.acl[0].topic"]),
        ([{"uri": "mqtt", "topic": "a/#/b", "actions": ["subscribe"]}], ["access.acl[0].topic"]),
        ([{"uri": "mqtt", "topic": "a/b#", "actions": ["subscribe"]}], ["access.acl[0].topic"]),
        ([{"uri": "mqtt", "topic": "a/b+/c", "actions": ["subscribe"]}], ["access.acl[0].topic"]),
        ([{"uri": "mqtt", "topic": "a\x00b", "actions": ["subscribe"]}], ["access.acl[0].topic"]),
        ([{"uri": "mqtt", "topic": "a"}], ["access.acl[0].actions"]),
        ([{"uri": "mqtt", "topic": "a", "actions": []}], ["access.acl[0].actions"]),
        ([{"uri": "mqtt", "topic": "a", "actions": ["read"]}], ["access.acl[0].actions"]),
        ([{"uri": "mqtt", "topic": "a", "actions": "publish"}], ["access.acl[0].actions"]),
        ([{"uri": "mqtt", "topic": "a", "actions": [["publish"]]}], ["access.acl[0].actions"]),
        ([{"uri": "mqtt", "topic": "a", "actions": ["publish"], "methods": ["GET"]}], ["access.acl[0].methods"]),
        (
            [GET, GET, {"uri": "platform/tokens", "methods": ["PATCH"], "ids": [0], "extra": 1}],
            ["access.acl[2].extra", "access.acl[2].uri", "access.acl[2].methods", "access.acl[2].ids"],
        ),
        (
            [{**GET, "submodules": [{"name": "a", "methods": ["GET"]}, {"name": "b b", "methods": []}]}],
            ["access.acl[0].submodules[1].name", "access.acl[0].submodules[1].methods"],
        ),
    ],
)
def test_invalid_acls_name_every_problem(acl: object, fields: list[str]) -> None:
    problems = acl_problems(acl)
    assert [problem.field for problem in problems] == fields
    assert all(problem.reason and problem.index is None for problem in problems)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("platform/tokens", "platform uri can not be granted by an ACL"),
        ("/gw/devices", "uri must not start or end with a slash"),
        ("gw devices", "uri must not contain whitespace"),
        ("gw//devices", "uri must not contain an empty segment"),
    ],
)
def test_uri_problems_explain_themselves(uri: str, reason: str) -> None:
    assert [p.reason for p in acl_problems([{**GET, "uri": uri}])] == [reason]


def test_flespi_topics_are_refused_with_the_documented_reason() -> None:
    problems = acl_problems([{"uri": "mqtt", "topic": "flespi/message/#", "actions": ["subscribe"]}])
    assert [(p.field, p.reason) for p in problems] == [("access.acl[0].topic", "topic may not start with flespi/")]


def test_in_groups_without_a_groups_entry_says_why() -> None:
    problems = acl_problems([{**GET, "ids": "in-groups"}])
    assert [p.reason for p in problems] == ["in-groups needs a gw/groups entry in the same ACL"]


def test_field_name_is_the_callers() -> None:
    assert _fields([{"uri": "x"}], field="result[3].access.acl") == ["result[3].access.acl[0].methods"]
    assert _fields(7, field="acl") == ["acl"]


@pytest.mark.parametrize(
    ("uri", "prefixes", "refused"),
    [
        ("admin/users", ("/admin/",), True),
        ("platform/tokens", ("/admin/",), False),
        ("api", ("/api/admin/",), True),
        ("api/admin", ("/api/admin/",), True),
        ("api/orders", ("/api/admin/",), False),
        ("administrators", ("/admin/",), False),
    ],
)
def test_configured_platform_prefixes(uri: str, prefixes: tuple[str, ...], refused: bool) -> None:
    assert bool(acl_problems([{**GET, "uri": uri}], platform_prefixes=prefixes)) is refused


# --- matching ---------------------------------------------------------------------------------

EXAMPLE_ACL: list[dict[str, object]] = [
    {
        "uri": "gw/devices",
        "methods": ["GET", "PUT"],
        "ids": [12345, 777],
        "submodules": [
            {"name": "messages", "methods": ["GET"]},
            {"name": "settings", "methods": ["GET", "PUT", "DELETE"]},
        ],
    },
    {"uri": "gw/channels", "methods": ["GET", "POST"], "ids": "all"},
    {"uri": "mqtt", "topic": "my/#", "actions": ["publish", "subscribe"]},
]


@pytest.mark.parametrize(
    ("method", "path", "forwarded"),
    [
        ("GET", "/gw/devices/12345", "/gw/devices/12345"),
        ("get", "/gw/devices/12345", "/gw/devices/12345"),
        ("HEAD", "/gw/devices/777", "/gw/devices/777"),
        ("GET", "/gw/devices/777,12345", "/gw/devices/777,12345"),
        ("GET", "/gw/devices/777,777", "/gw/devices/777,777"),
        ("GET", "/gw/devices/all", "/gw/devices/777,12345"),
        ("GET", "/gw/devices/all/", "/gw/devices/777,12345/"),
        ("GET", "/gw/devices/777/", "/gw/devices/777/"),
        ("GET", "/gw/devices/all/messages", "/gw/devices/777,12345/messages"),
        ("GET", "/gw/devices/777/messages/extra/path", "/gw/devices/777/messages/extra/path"),
        ("PUT", "/gw/devices/777", "/gw/devices/777"),
        ("PATCH", "/gw/devices/777", "/gw/devices/777"),
        ("PUT", "/gw/devices/all/settings", "/gw/devices/777,12345/settings"),
        ("DELETE", "/gw/devices/777/settings", "/gw/devices/777/settings"),
        ("DELETE", "/gw/devices/777/settings/some.name", "/gw/devices/777/settings/some.name"),
        ("GET", "/gw/channels", "/gw/channels"),
        ("GET", "/gw/channels/", "/gw/channels/"),
        ("POST", "/gw/channels", "/gw/channels"),
        ("GET", "/gw/channels/all", "/gw/channels/all"),
        ("GET", "/gw/channels/name=test*", "/gw/channels/name=test*"),
        ("GET", "/gw/channels/{protocol_id=5}", "/gw/channels/{protocol_id=5}"),
        ("GET", "/gw/channels/1,2/messages", "/gw/channels/1,2/messages"),
        ("POST", "/gw/channels/7/commands-queue", "/gw/channels/7/commands-queue"),
    ],
)
def test_granted_requests(method: str, path: str, forwarded: str) -> None:
    assert compile_acl(EXAMPLE_ACL).authorize(method, path) == forwarded


@pytest.mark.parametrize(
    ("method", "path", "shown"),
    [
        ("GET", "/gw/devices/12345,1", "GET"),
        ("GET", "/gw/devices/1", "GET"),
        ("POST", "/gw/devices/777", "POST"),
        ("DELETE", "/gw/devices/777", "DELETE"),
        ("PATCH", "/gw/devices/12/settings", "PUT"),
        ("PUT", "/gw/devices/777/messages", "PUT"),
        ("GET", "/gw/devices/777/telemetry", "GET"),
        ("GET", "/gw/devices", "GET"),
        ("GET", "/gw/devices/", "GET"),
        ("POST", "/gw/devices", "POST"),
        ("GET", "/gw/devices/name=x", "GET"),
        ("GET", "/gw/devices/{id=777}", "GET"),
        ("GET", "/gw/devices/0777", "GET"),
        ("GET", "/gw/devices/777,", "GET"),
        ("GET", "/gw/devices/777,,12345", "GET"),
        ("GET", "/gw/devices/+777", "GET"),
        ("GET", "/gw/devices/ 777", "GET"),
        ("GET", "/gw/devices/\u0667\u0667\u0667", "GET"),
        ("GET", "/gw/devices/ALL", "GET"),
        ("GET", "/gw/devicesx/777", "GET"),
        ("GET", "/GW/devices/777", "GET"),
        ("GET", "/gw", "GET"),
        ("GET", "/", "GET"),
        ("OPTIONS", "/gw/channels", "OPTIONS"),
        ("TRACE", "/gw/channels", "TRACE"),
        ("DELETE", "/gw/channels/1", "DELETE"),
        ("GET", "/gw/calcs/1", "GET"),
        ("GET", "/mqtt", "GET"),
        ("POST", "/mqtt/my/topic", "POST"),
        ("GET", "/platform/tokens/all", "GET"),
    ],
)
def test_denied_requests(method: str, path: str, shown: str) -> None:
    with pytest.raises(Denied) as caught:
        compile_acl(EXAMPLE_ACL).authorize(method, path)
    assert (caught.value.status, caught.value.reason) == (403, f"access to {path[1:]} ({shown}) is denied by token ACL")


def test_denial_reason_is_the_documented_example() -> None:
    with pytest.raises(Denied) as caught:
        compile_acl(EXAMPLE_ACL).authorize("PATCH", "/gw/devices/12/settings")
    assert caught.value.reason == "access to gw/devices/12/settings (PUT) is denied by token ACL"


SETTINGS_PUT: dict[str, object] = {**GET, "submodules": [{"name": "settings", "methods": ["PUT"]}]}


def _decide(
    acl: CompiledAcl, method: str, path: str, members: Mapping[str, frozenset[int]] | None = None
) -> str | None:
    try:
        return acl.authorize(method, path, members)
    except Denied as denied:
        assert denied.status == 403
        return None


@pytest.mark.parametrize(
    ("acl", "method", "path", "forwarded"),
    [
        # Several entries for one uri combine: ids of every entry that grants the method.
        ([{**GET, "ids": [1]}, {**GET, "ids": [2]}], "GET", "/gw/devices/all", "/gw/devices/1,2"),
        ([{**GET, "ids": [1]}, {**GET, "ids": [2]}], "GET", "/gw/devices/2,1", "/gw/devices/2,1"),
        ([{**GET, "ids": [1]}, {**GET, "methods": ["PUT"], "ids": [2]}], "PUT", "/gw/devices/1", None),
        ([{**GET, "ids": [1]}, {**GET, "methods": ["PUT"], "ids": [2]}], "PUT", "/gw/devices/all", "/gw/devices/2"),
        ([{**GET, "ids": [1]}, {**GET, "methods": ["PUT"], "ids": [2]}], "GET", "/gw/devices/1,2", None),
        ([{**GET, "ids": [1]}, {**GET, "ids": "all"}], "GET", "/gw/devices/all", "/gw/devices/all"),
        ([{**GET, "ids": [3]}, {**GET, "ids": "all"}], "GET", "/gw/devices/name=x", "/gw/devices/name=x"),
        # The collection path: only an entry with ids "all" grants it, POST included.
        ([{**GET, "methods": ["POST"], "ids": [1]}], "POST", "/gw/devices", None),
        ([{**GET, "methods": ["POST"], "ids": "all"}], "POST", "/gw/devices", "/gw/devices"),
        ([{**GET, "methods": ["POST"], "ids": "all"}], "GET", "/gw/devices", None),
        ([{**GET, "ids": [1]}, {**GET, "methods": ["POST"]}], "POST", "/gw/devices", "/gw/devices"),
        ([{**GET, "ids": [1]}, {**GET, "methods": ["POST"]}], "GET", "/gw/devices", None),
        ([{**GET, "methods": ["DELETE"], "ids": [1]}], "DELETE", "/gw/devices", None),
        # ids left out mean "all".
        ([GET], "GET", "/gw/devices/{x}", "/gw/devices/{x}"),
        # An empty id list permits nothing, not even `all`.
        ([{**GET, "ids": []}], "GET", "/gw/devices/all", None),
        # submodules: absent = the entry's methods; present = only the listed ones.
        ([{**GET, "ids": [1]}], "GET", "/gw/devices/1/anything/deep", "/gw/devices/1/anything/deep"),
        ([{**GET, "ids": [1], "submodules": []}], "GET", "/gw/devices/1/messages", None),
        ([{**GET, "ids": [1], "submodules": []}], "GET", "/gw/devices/1", "/gw/devices/1"),
        ([SETTINGS_PUT], "PUT", "/gw/devices/1/settings", "/gw/devices/1/settings"),
        ([SETTINGS_PUT], "PUT", "/gw/devices/1", None),
        ([SETTINGS_PUT], "GET", "/gw/devices/1/settings", None),
        (
            [
                {**GET, "ids": [1], "submodules": [{"name": "settings", "methods": ["GET"]}]},
                {**GET, "ids": [2]},
            ],
            "GET",
            "/gw/devices/all/settings",
            "/gw/devices/1,2/settings",
        ),
        (
            [
                {**GET, "ids": [1], "submodules": [{"name": "settings", "methods": ["GET"]}]},
                {**GET, "ids": [2]},
            ],
            "GET",
            "/gw/devices/all/messages",
            "/gw/devices/2/messages",
        ),
        (
            [
                {**GET, "ids": [1], "submodules": [{"name": "settings", "methods": ["GET"]}]},
                {**GET, "ids": [2]},
            ],
            "GET",
            "/gw/devices/1/messages",
            None,
        ),
        (
            [
                {**GET, "ids": [1], "submodules": [{"name": "a", "methods": ["GET"]}]},
                {**GET, "ids": [2], "submodules": [{"name": "a", "methods": ["PUT"]}]},
            ],
            "PUT",
            "/gw/devices/1/a",
            None,
        ),
        # A path that fits two uris is granted by either; the longest uri rewrites `all`.
        ([{"uri": "gw", "methods": ["GET"]}, {**GET, "ids": [1]}], "GET", "/gw/devices/2", "/gw/devices/2"),
        ([{"uri": "gw", "methods": ["GET"]}, {**GET, "ids": [1]}], "GET", "/gw/devices/all", "/gw/devices/1"),
        ([{"uri": "gw", "methods": ["GET"], "ids": [1]}, GET], "GET", "/gw/1/x", "/gw/1/x"),
        ([{"uri": "gw", "methods": ["GET"], "ids": [1]}, GET], "GET", "/gw/2/x", None),
        # Nothing granted at all.
        ([], "GET", "/gw/devices/1", None),
        ([{"uri": "mqtt", "topic": "#", "actions": ["publish"]}], "GET", "/mqtt/x/y", None),
    ],
)
def test_entries_combine(acl: list[dict[str, object]], method: str, path: str, forwarded: str | None) -> None:
    assert _decide(compile_acl(acl), method, path) == forwarded


@pytest.mark.parametrize(
    ("acl", "method", "path", "forwarded"),
    [
        ([{"uri": "gw/devices", "methods": "GET"}], "GET", "/gw/devices/1", None),
        ([{"uri": "gw/devices", "methods": ["GET", "PATCH"]}], "PATCH", "/gw/devices/1", None),
        ([{**GET, "ids": "bogus"}], "GET", "/gw/devices/1", None),
        ([{**GET, "ids": [True, "2", 0, -3, 4]}], "GET", "/gw/devices/all", "/gw/devices/4"),
        ([{**GET, "submodules": "x"}], "GET", "/gw/devices/1/x", None),
        ([{**GET, "submodules": "x"}], "GET", "/gw/devices/1", "/gw/devices/1"),
        ([{**GET, "submodules": [7, {"name": 1, "methods": ["GET"]}]}], "GET", "/gw/devices/1/1", None),
        ([5, "gw/devices", None], "GET", "/gw/devices/1", None),
        ([{**GET, "uri": "/gw/devices/"}], "GET", "/gw/devices/1", None),
        ([{**GET, "uri": 7}], "GET", "/7/1", None),
        ([{**GET, "uri": "a{b}"}], "GET", "/a{b}/1", None),
        ([{**GET, "uri": "gw/.."}], "GET", "/gw/../1", None),
        ([{**GET, "uri": "platform/tokens"}], "GET", "/platform/tokens/1", None),
        ([{**GET, "uri": "auth"}], "GET", "/auth/info", None),
    ],
)
def test_a_malformed_stored_acl_fails_closed(
    acl: list[dict[str, object]], method: str, path: str, forwarded: str | None
) -> None:
    assert _decide(compile_acl(acl), method, path) == forwarded


# --- groups -----------------------------------------------------------------------------------

IN_GROUPS_ACL: list[dict[str, object]] = [
    {"uri": "gw/groups", "methods": ["GET"], "ids": [5, 6]},
    {"uri": "gw/groups", "methods": ["PUT"], "ids": [7]},
    {"uri": "gw/devices", "methods": ["GET"], "ids": "in-groups"},
    {"uri": "gw/devices", "methods": ["GET"], "ids": [100]},
    {"uri": "gw/calcs", "methods": ["GET"], "ids": "in-groups"},
]


def test_groups_needed_and_reachable() -> None:
    acl = compile_acl(IN_GROUPS_ACL)
    assert acl.group_uri == "gw/groups"
    assert acl.groups_needed() == ("gw/calcs", "gw/devices")
    assert acl.reachable_groups() == frozenset({5, 6, 7})


@pytest.mark.parametrize(
    ("acl", "needed", "reachable"),
    [
        ([], None, None),
        ([GET], None, None),
        ([{**GET, "ids": "in-groups"}], ("gw/devices",), None),
        ([{**GROUPS, "ids": "all"}, {**GROUPS, "ids": [1]}], None, "all"),
        ([GROUPS], None, frozenset({5})),
        ([{**GROUPS, "ids": "in-groups"}], None, frozenset()),
    ],
)
def test_groups_of_simple_acls(acl: list[dict[str, object]], needed: object, reachable: object) -> None:
    compiled = compile_acl(acl)
    assert compiled.groups_needed() == needed
    assert compiled.reachable_groups() == reachable


def test_compile_skips_uris_under_configured_platform_prefixes() -> None:
    acl: list[dict[str, object]] = [{**GET, "uri": "admin/users"}, {**GET, "uri": "platform/tokens"}]
    compiled = compile_acl(acl, platform_prefixes=("/admin/",))
    assert _decide(compiled, "GET", "/admin/users/1") is None
    assert _decide(compiled, "GET", "/platform/tokens/1") == "/platform/tokens/1"


def test_group_uri_is_configurable() -> None:
    teams: dict[str, object] = {"uri": "teams", "methods": ["GET"], "ids": [3]}
    acl = compile_acl([teams, {**GET, "ids": "in-groups"}], group_uri="teams")
    assert (acl.group_uri, acl.groups_needed(), acl.reachable_groups()) == ("teams", ("gw/devices",), frozenset({3}))


@pytest.mark.parametrize(
    ("members", "path", "forwarded"),
    [
        ({"gw/devices": frozenset({3, 4})}, "/gw/devices/3", "/gw/devices/3"),
        ({"gw/devices": frozenset({3, 4})}, "/gw/devices/3,100", "/gw/devices/3,100"),
        ({"gw/devices": frozenset({3, 4})}, "/gw/devices/all", "/gw/devices/3,4,100"),
        ({"gw/devices": frozenset({3, 4})}, "/gw/devices/5", None),
        ({"gw/devices": frozenset({3, 4})}, "/gw/calcs/3", None),
        ({"gw/calcs": frozenset({3})}, "/gw/calcs/all", "/gw/calcs/3"),
        ({}, "/gw/calcs/all", None),
        (None, "/gw/devices/3", None),
        (None, "/gw/devices/all", "/gw/devices/100"),
    ],
)
def test_in_groups_permits_exactly_the_members(
    members: Mapping[str, frozenset[int]] | None, path: str, forwarded: str | None
) -> None:
    assert _decide(compile_acl(IN_GROUPS_ACL), "GET", path, members) == forwarded


def test_members_do_not_widen_an_entry_that_is_not_in_groups() -> None:
    acl = compile_acl([{**GET, "ids": [1]}])
    members = {"gw/devices": frozenset({2})}
    assert _decide(acl, "GET", "/gw/devices/2", members) is None
    assert _decide(acl, "GET", "/gw/devices/all", members) == "/gw/devices/1"


# --- uri patterns -----------------------------------------------------------------------------

PATTERNS = parse_uri_patterns(
    {"orders": "/api/v2/orders/{selector}/{submodule}", "users": "/api/users/{selector}"}
)
PATTERN_ACL: list[dict[str, object]] = [
    {"uri": "orders", "methods": ["GET"], "ids": [1, 2]},
    {"uri": "users", "methods": ["GET", "POST"]},
    {"uri": "gw/devices", "methods": ["GET"]},
]


def test_parsed_patterns() -> None:
    expected = {
        "orders": UriPattern("orders", "/api/v2/orders", True),
        "users": UriPattern("users", "/api/users", False),
    }
    assert expected == PATTERNS


@pytest.mark.parametrize(
    ("method", "path", "forwarded"),
    [
        ("GET", "/api/v2/orders/1", "/api/v2/orders/1"),
        ("GET", "/api/v2/orders/all", "/api/v2/orders/1,2"),
        ("GET", "/api/v2/orders/all/lines/3", "/api/v2/orders/1,2/lines/3"),
        ("GET", "/api/v2/orders/3", None),
        ("GET", "/api/v2/orders", None),
        ("GET", "/orders/1", None),
        ("GET", "/api/users", "/api/users"),
        ("POST", "/api/users", "/api/users"),
        ("GET", "/api/users/email=a@b", "/api/users/email=a@b"),
        ("GET", "/api/users/5/roles", None),
        ("GET", "/users/5", None),
        ("GET", "/gw/devices/5/messages", "/gw/devices/5/messages"),
    ],
)
def test_mapped_uris(method: str, path: str, forwarded: str | None) -> None:
    assert _decide(compile_acl(PATTERN_ACL, PATTERNS), method, path) == forwarded


@pytest.mark.parametrize(
    "mapping",
    [
        {"orders": "/api/orders"},
        {"orders": "/api/orders/{submodule}"},
        {"orders": "/api/orders/{submodule}/{selector}"},
        {"orders": "api/orders/{selector}"},
        {"orders": "/{selector}"},
        {"orders": "/api/{selector}/x"},
        {"orders": "/api/{selector}/{submodule}/x"},
        {"orders": "/api/{x}/{selector}"},
        {"orders": "/api//orders/{selector}"},
        {"orders": "/api/../platform/{selector}"},
        {"orders": "/api/%2e%2e/{selector}"},
        {"orders": "/api/orders;x/{selector}"},
        {"orders": "/platform/orders/{selector}"},
        {"orders": "/auth/{selector}"},
        {"orders": 5},
        {"/orders": "/api/orders/{selector}"},
        {"": "/api/orders/{selector}"},
        {"mqtt": "/api/mqtt/{selector}"},
        {"orders": "/api/orders/{selector}", "orders2": "/api/orders/{selector}/{submodule}"},
    ],
)
def test_bad_patterns_are_refused_by_name(mapping: Mapping[str, str]) -> None:
    with pytest.raises(ValueError, match=repr(list(mapping)[-1])):
        parse_uri_patterns(mapping)


def test_pattern_platform_prefixes_are_configurable() -> None:
    with pytest.raises(ValueError, match="platform"):
        parse_uri_patterns({"x": "/admin/x/{selector}"}, platform_prefixes=("/admin/",))
    patterns = parse_uri_patterns({"x": "/platform/x/{selector}"}, platform_prefixes=("/admin/",))
    assert patterns["x"].prefix == "/platform/x"


# --- properties -------------------------------------------------------------------------------

_NARROW_ACL = compile_acl([{"uri": "gw/devices", "methods": ["GET"], "ids": [1, 2], "submodules": []}])
_POOL = ["gw", "devices", "1", "2", "3", "12", "all", "1,2", "2,1", "1,3", "0", "01", ".", "..", "", "x",
         "settings", "platform", "GW", "Devices", "1;", "1\x00", "%31", "1/2", "1\\2", "\u0661"]
_RAW_OK = frozenset(chr(c) for c in range(0x21, 0x7F)) - set("%/\\;?#")


@st.composite
def _wire_form(draw: st.DrawFn, segment: str) -> str:
    out = []
    for char in segment:
        form = draw(st.sampled_from(["raw", "raw", "single", "double"] if char in _RAW_OK else ["single", "double"]))
        if form == "raw":
            out.append(char)
            continue
        hexes = [f"%{b:02X}" if draw(st.booleans()) else f"%{b:02x}" for b in char.encode("utf-8")]
        out.append("".join(h.replace("%", "%25") if form == "double" else h for h in hexes))
    return "".join(out)


@given(
    segments=st.lists(st.sampled_from(_POOL), min_size=1, max_size=5),
    method=st.sampled_from(["GET", "get", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    junk=st.sampled_from(["", "/", "//", "/./", "/../", ";", "%2f", "%2F", "%5c", "%", "%00", "%2e"]),
    data=st.data(),
)
def test_no_encoding_escapes_a_narrow_grant(segments: list[str], method: str, junk: str, data: st.DataObject) -> None:
    raw = "/" + "/".join(data.draw(_wire_form(segment)) for segment in segments)
    at = data.draw(st.integers(0, len(raw)))
    raw = raw[:at] + junk + raw[at:]
    try:
        checked = checked_path(raw)
        authorized = _NARROW_ACL.authorize(method, checked)
    except Denied:
        return
    assert method.upper() in ("GET", "HEAD")
    parts = authorized.split("/")
    if parts[-1] == "" and len(parts) == 5:
        parts = parts[:-1]
    assert parts[:3] == ["", "gw", "devices"] and len(parts) == 4
    assert parts[3].split(",") and set(parts[3].split(",")) <= {"1", "2"}
    forwarded = forwarded_path(raw, checked, authorized)
    assert checked_path(forwarded) == authorized == unquote(forwarded)


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        ("/gw/devices/%31", "/gw/devices/%31"),
        ("/gw/devices/1%2c2", "/gw/devices/1%2c2"),
        ("/gw/%64evices/2", "/gw/%64evices/2"),
        ("/gw/devices/%61ll", "/gw/devices/1,2"),
        ("/gw/devices/all/", "/gw/devices/1,2/"),
    ],
)
def test_encoded_forms_of_a_grant_pass_once_decoded(raw: str, forwarded: str) -> None:
    checked = checked_path(raw)
    assert forwarded_path(raw, checked, _NARROW_ACL.authorize("GET", checked)) == forwarded


_URIS = ["gw/devices", "gw/channels"]
_SUBS = ["messages", "settings"]
_entry = st.fixed_dictionaries(
    {
        "uri": st.sampled_from(_URIS),
        "methods": st.lists(st.sampled_from(["GET", "POST", "PUT", "DELETE"]), min_size=1, max_size=3),
        "ids": st.one_of(st.just("all"), st.just("in-groups"), st.lists(st.integers(1, 4), max_size=3)),
    },
    optional={
        "submodules": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(_SUBS), "methods": st.lists(st.sampled_from(["GET", "PUT"]), min_size=1)}
            ),
            max_size=2,
        )
    },
)
_selector = st.one_of(
    st.sampled_from(["all", "name=x", "{x}", "0"]),
    st.lists(st.integers(1, 4), min_size=1, max_size=3).map(lambda ids: ",".join(map(str, ids))),
)


def _reference(acl: list[dict[str, Any]], verb: str, path: str, members: Mapping[str, frozenset[int]]) -> str | None:
    """A deliberately naive scan of every entry, to check the compiled lookup against."""
    segments = path[1:].split("/")
    uri, rest = "/".join(segments[:2]), segments[2:]
    entries = [e for e in acl if e["uri"] == uri]
    if not rest:
        return path if any(verb in e["methods"] and e["ids"] == "all" for e in entries) else None

    def grants(entry: dict[str, Any]) -> bool:
        if len(rest) == 1 or "submodules" not in entry:
            return verb in entry["methods"]
        return any(s["name"] == rest[1] and verb in s["methods"] for s in entry["submodules"])

    granting = [e for e in entries if grants(e)]
    if any(e["ids"] == "all" for e in granting):
        return path
    permitted = {i for e in granting if isinstance(e["ids"], list) for i in e["ids"]}
    if any(e["ids"] == "in-groups" for e in granting):
        permitted |= members.get(uri, frozenset())
    if rest[0] == "all":
        return "/".join(["", uri, ",".join(map(str, sorted(permitted))), *rest[1:]]) if permitted else None
    if rest[0] in ("name=x", "{x}", "0"):
        return None
    return path if {int(i) for i in rest[0].split(",")} <= permitted else None


@given(
    acl=st.lists(_entry, max_size=6),
    verb=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    uri=st.sampled_from(_URIS),
    selector=st.one_of(st.none(), _selector),
    submodule=st.one_of(st.none(), st.sampled_from([*_SUBS, "other"])),
    members=st.dictionaries(st.sampled_from(_URIS), st.frozensets(st.integers(1, 4), max_size=3)),
)
@settings(max_examples=400)
def test_compiled_lookup_agrees_with_a_naive_scan(
    acl: list[dict[str, Any]],
    verb: str,
    uri: str,
    selector: str | None,
    submodule: str | None,
    members: dict[str, frozenset[int]],
) -> None:
    path = "/" + uri + (f"/{selector}" if selector else "") + (f"/{submodule}" if selector and submodule else "")
    assert _decide(compile_acl(acl), verb, path, members) == _reference(acl, verb, path, members)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["all", "in-groups", "GET", "gw/devices", "x{"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "uri", "ids"]), inner),
    max_leaves=8,
)
_loose_entry = st.fixed_dictionaries(
    {},
    optional={
        "uri": st.one_of(st.just("gw/devices"), st.sampled_from(["gw/groups", "mqtt", "/x", "a{b}", ""]), _json),
        "methods": st.one_of(st.lists(st.sampled_from(["GET", "PUT", "PATCH", "get"])), _json),
        "ids": _json,
        "submodules": st.one_of(st.lists(st.fixed_dictionaries({"name": _json, "methods": _json})), _json),
    },
)


def _grants_get_on_one(entry: object) -> bool:
    if not isinstance(entry, dict) or entry.get("uri") != "gw/devices":
        return False
    methods, ids = entry.get("methods"), entry.get("ids", "all")
    permits_one = ids in ("all", "in-groups") or (isinstance(ids, list) and any(type(i) is int and i == 1 for i in ids))
    return isinstance(methods, list) and "GET" in methods and permits_one


@given(st.lists(st.one_of(_loose_entry, _json), max_size=4), st.sampled_from(["/gw/devices/1", "/gw/devices/all/a"]))
@settings(max_examples=300)
def test_a_malformed_acl_never_fails_compilation_nor_grants_by_accident(acl: list[Any], path: str) -> None:
    granted = _decide(compile_acl(acl), "GET", path, {"gw/devices": frozenset({1})})
    event("granted" if granted else "denied")
    if granted is not None:
        assert granted in (path, "/gw/devices/1/a")
        assert any(_grants_get_on_one(entry) for entry in acl)
