"""Allowed origins: what may be saved on a token and which `Origin` values it lets in."""
from __future__ import annotations

import re
import time

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from gateway.policy.origins import OriginMatcher, compile_origins, origin_problems, pattern_problem, preset_problems

PRESETS: dict[str, list[str]] = {
    "flespi": ["https://flespi.io", "https://*.flespi.io"],
    "anything": ["*"],
    "nothing": [],
    "broken": ["https://x.example/"],
}
EXAMPLE_ORIGINS: list[object] = ["http://localhost:1234", "https://*.subdomain.domain", "custom7://te?t.example.com"]


def compiled(origins: object) -> OriginMatcher:
    matcher = compile_origins(origins, PRESETS)
    assert matcher is not None
    return matcher


@pytest.mark.parametrize(
    "origins",
    [
        None,
        "*",
        [],
        EXAMPLE_ORIGINS,
        ["*"],
        ["https://a.example", "*"],
        [{"preset": "flespi"}],
        ["HTTPS://A.Example.COM"],
        ["https://*.example.com:*", "https://*.example.com:80?"],
        ["http://192.168.1.*", "http://10.*.*.1:8080"],
        ["https://[::1]:8443", "http://[2001:db8::1]"],
        ["*://app.example.com", "http?://app.example.com"],
        ["https://app-*.preview.example.com", "https://*-pr.example.com", "https://*.*.example.com"],
        ["https://xn--bcher-kva.example", "http://under_score.example"],
        ["https://*.co.uk"],
    ],
)
def test_valid_origins_have_no_problems(origins: object) -> None:
    assert origin_problems(origins, PRESETS) == []


@pytest.mark.parametrize(
    ("origins", "reason"),
    [
        ("https://a.example", 'must be "*" or a list'),
        (5, 'must be "*" or a list'),
        ({"preset": "flespi"}, 'must be "*" or a list'),
        ([5], "must be an origin string or"),
        ([None], "must be an origin string or"),
        ([["https://a.example"]], "must be an origin string or"),
        ([{"preset": 1}], "must be an origin string or"),
        ([{"preset": "flespi", "extra": 1}], "must be an origin string or"),
        ([{"name": "flespi"}], "must be an origin string or"),
        ([{"preset": "nope"}], "unknown preset 'nope'"),
        ([{"preset": "broken"}], "preset 'broken' 'https://x.example/': a path is not part of an origin"),
        ([""], "empty origin"),
        (["https://a.example/"], "a path is not part of an origin"),
        (["https://a.example/app"], "a path is not part of an origin"),
        (["https://a.example?x=1"], "a query is not part of an origin"),
        (["https://a.example#top"], "a fragment is not part of an origin"),
        (["https://user@a.example"], "user info is not part of an origin"),
        ([" https://a.example"], "whitespace"),
        (["https://a.example\t"], "whitespace"),
        (["https://a .example"], "whitespace"),
        (["null"], "null origin"),
        (["Null"], "null origin"),
        (["a.example"], "scheme://host[:port]"),
        (["https//a.example"], "scheme://host[:port]"),
        (["1http://a.example"], "scheme '1http' is not valid"),
        (["://a.example"], "scheme '' is not valid"),
        (["https://"], "host is missing"),
        (["https://a..example"], "empty label"),
        (["https://a.example."], "empty label"),
        (["https://a.ex!ample"], "characters not allowed in a host: '!'"),
        (["https://bücher.example"], "punycode"),
        (["https://*example.com"], "last two labels"),
        (["https://example.*"], "last two labels"),
        (["https://*.com"], "last two labels"),
        (["https://a.example.c?m"], "last two labels"),
        (["https://*"], "last two labels"),
        (["http://local*:8080"], "last two labels"),
        (["https://a.example:443"], "default port 443"),
        (["http://a.example:80"], "default port 80"),
        (["https://a.example:0"], "out of range"),
        (["https://a.example:08080"], "leading zero"),
        (["https://a.example:65536"], "out of range"),
        (["https://a.example:"], "is not a number"),
        (["https://a.example:8o"], "is not a number"),
        (["https://a.example:80:80"], "too many ':'"),
        (["https://[::1"], "[address]"),
        (["https://[::1]x"], "[address]"),
        (["https://[0:0::1]"], "canonical form: write [::1]"),
        (["https://[::*]"], "not an IPv6 address"),
        (["https://[fe80::1%25eth0]"], "zones"),
    ],
)
def test_invalid_origins_are_refused_with_a_reason(origins: object, reason: str) -> None:
    problems = origin_problems(origins, PRESETS)
    assert len(problems) == 1
    assert reason in problems[0]
    with pytest.raises(ValueError, match=re.escape(reason)):
        compile_origins(origins, PRESETS)


def test_every_bad_item_is_reported_with_its_index() -> None:
    problems = origin_problems(["https://ok.example", "https://a.example/", {"preset": "nope"}], PRESETS)
    assert problems == [
        "origins[1] 'https://a.example/': a path is not part of an origin",
        "origins[2] unknown preset 'nope'",
    ]


@pytest.mark.parametrize(
    "origins",
    [None, "*", [], ["*"], ["https://a.example", "*"], [{"preset": "anything"}, "https://a.example"]],
)
def test_any_origin_compiles_to_none(origins: object) -> None:
    assert compile_origins(origins, PRESETS) is None


def test_an_empty_preset_allows_nothing_rather_than_anything() -> None:
    matcher = compiled([{"preset": "nothing"}])
    assert not matcher.matches("https://a.example")
    assert not matcher.matches("null")


@pytest.mark.parametrize(
    ("origins", "origin", "expected"),
    [
        (EXAMPLE_ORIGINS, "http://localhost:1234", True),
        (EXAMPLE_ORIGINS, "http://localhost:1235", False),
        (EXAMPLE_ORIGINS, "https://localhost:1234", False),
        (EXAMPLE_ORIGINS, "http://localhost", False),
        (EXAMPLE_ORIGINS, "https://a.subdomain.domain", True),
        (EXAMPLE_ORIGINS, "https://a.b.subdomain.domain", True),
        (EXAMPLE_ORIGINS, "https://subdomain.domain", False),
        (EXAMPLE_ORIGINS, "custom7://test.example.com", True),
        (EXAMPLE_ORIGINS, "custom7://text.example.com", True),
        (EXAMPLE_ORIGINS, "custom7://tet.example.com", False),
        (EXAMPLE_ORIGINS, "custom7://te.t.example.com", False),
        (EXAMPLE_ORIGINS, "custom8://test.example.com", False),
        (["https://*.example.com"], "https://a.example.com", True),
        (["https://*.example.com"], "https://a.b.example.com", True),
        (["https://*.example.com"], "https://example.com", False),
        (["https://*.example.com"], "https://example.com.evil.com", False),
        (["https://*.example.com"], "https://evilexample.com", False),
        (["https://*.example.com"], "https://a.example.com.evil.com", False),
        (["https://*.example.com"], "https://a.example.com:8080", False),
        (["https://*.example.com"], "http://a.example.com", False),
        (["https://*.example.com"], "https://.example.com", False),
        (["https://*.example.com"], "https://a/b.example.com", False),
        (["https://*.example.com"], "https://evil.com#.example.com", False),
        (["https://*.example.com"], "https://evil.com?.example.com", False),
        (["https://*.example.com"], "https://evil.com/.example.com", False),
        (["https://*.example.com"], "https://evil.com@a.example.com", False),
        (["https://*.example.com"], "null", False),
        (["https://*.example.com:*"], "https://a.example.com:8080", True),
        (["https://*.example.com:*"], "https://a.example.com:80x", False),
        (["https://*.example.com:80?"], "https://a.example.com:801", True),
        (["https://*.example.com:80?"], "https://a.example.com:8081", False),
        (["https://*.example.com:80?"], "https://a.example.com:80", False),
        (["https://app-*.example.com"], "https://app-42.example.com", True),
        (["https://app-*.example.com"], "https://app-.example.com", True),
        (["https://app-*.example.com"], "https://app-4.2.example.com", False),
        (["https://a.*.example.com"], "https://a.b.example.com", True),
        (["https://a.*.example.com"], "https://a.b.c.example.com", False),
        (["https://allowed.example"], "https://allowed.example", True),
        (["https://allowed.example"], "https://allowed.example.evil.com", False),
        (["https://allowed.example"], "https://allowed.examplex", False),
        (["https://allowed.example"], "https://allowed.example:444", False),
        (["https://allowed.example"], "https://allowed.example/", False),
        (["https://allowed.example"], "https://allowed.example ", False),
        (["https://Allowed.Example"], "HTTPS://ALLOWED.EXAMPLE", True),
        (["https://allowed.example"], "https://allowed.exa\u212aple", False),
        (["http://192.168.1.*"], "http://192.168.1.77", True),
        (["http://192.168.1.*"], "http://192.168.1.evil", False),
        (["http://192.168.1.*"], "http://192.168.1.7.evil.com", False),
        (["http://[::1]:8080"], "http://[::1]:8080", True),
        (["http://[::1]:8080"], "http://[::2]:8080", False),
        (["*://app.example.com"], "wss://app.example.com", True),
        (["*://app.example.com"], "https://evil.com/://app.example.com", False),
        (["http?://app.example.com"], "https://app.example.com", True),
        (["http?://app.example.com"], "http://app.example.com", False),
        ([{"preset": "flespi"}], "https://flespi.io", True),
        ([{"preset": "flespi"}], "https://cdn.flespi.io", True),
        ([{"preset": "flespi"}], "https://flespi.io.evil.com", False),
        ([{"preset": "flespi"}, "https://a.example"], "https://a.example", True),
    ],
)
def test_matching(origins: object, origin: str, expected: bool) -> None:
    assert compiled(origins).matches(origin) is expected


@pytest.mark.parametrize(
    "origins", [EXAMPLE_ORIGINS, ["https://*.example.com"], [{"preset": "flespi"}], ["http://*.*.*.*"]]
)
def test_null_origin_matches_no_list(origins: object) -> None:
    matcher = compiled(origins)
    assert not matcher.matches("null")
    assert not matcher.matches("NULL")


def test_preset_problems_checks_the_configuration() -> None:
    assert preset_problems({"ok": ["https://a.example", "https://*.a.example"], "any": ["*"]}) == []
    assert preset_problems(PRESETS) == [
        "preset 'nothing' is empty",
        "preset 'broken' 'https://x.example/': a path is not part of an origin",
    ]
    assert preset_problems({"one": "https://a.example"}) == ["preset 'one' must be a list of origins, not one string"]


@pytest.mark.parametrize(("pattern", "ok"), [("*", True), ("https://a.example", True), (5, False), ("null", False)])
def test_pattern_problem(pattern: object, ok: bool) -> None:
    assert (pattern_problem(pattern) is None) is ok


def test_pathological_pattern_is_matched_in_linear_time() -> None:
    matcher = compiled(["https://" + "a*" * 30 + "b.example.com", "*" * 20 + "x*://" + "a*" * 20 + "b.example.com"])
    hostile = ["https://" + "a" * 5000 + ".example.com", "a" * 3000 + "://" + "a" * 3000 + ".example.com"]
    started = time.perf_counter()
    for origin in hostile:
        assert not matcher.matches(origin)
    assert time.perf_counter() - started < 1.0


# ---- properties ----

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
ports = st.none() | st.integers(1, 65535).filter(lambda port: port not in (80, 443))


@st.composite
def exact_origins(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https"]))
    host = ".".join([*draw(st.lists(labels, min_size=1, max_size=3)), draw(st.sampled_from(["org", "test", "net"]))])
    port = draw(ports)
    return f"{scheme}://{host}" + ("" if port is None else f":{port}")


def split_origin(origin: str) -> tuple[str, str, str]:
    scheme, _, authority = origin.partition("://")
    host, colon, port = authority.partition(":")
    return scheme, host, colon + port


def look_alikes(origin: str, registrable: str) -> list[str]:
    """Origins a browser could send that only resemble `origin`; `registrable` is the host part
    that an attacker would try to imitate (the whole host, or `example.com` for `*.example.com`)."""
    scheme, host, port = split_origin(origin)
    other_scheme = {"http": "https", "https": "http"}[scheme]
    candidates = [
        f"{scheme}://{host}.evil.com{port}",
        f"{scheme}://{host}{port}.evil.com",
        f"{scheme}://evil{registrable}{port}",
        f"{scheme}://evil-{registrable}{port}",
        f"{scheme}://{host}:8443" if port == "" else f"{scheme}://{host}:1{port[1:]}",
        f"{scheme}://{host}",
        f"{other_scheme}://{host}{port}",
        f"wss://{host}{port}",
        f"{origin}/",
        f"{origin}.",
        f" {origin}",
        f"{scheme}://evil.com@{host}{port}",
        f"{scheme}://{host}{port}@evil.com",
        "null",
    ]
    return [fake for fake in candidates if fake != origin]


@given(st.lists(exact_origins(), min_size=1, max_size=10), st.data())
def test_look_alikes_never_match(allowed: list[str], data: st.DataObject) -> None:
    matcher = compiled([*allowed, "https://*.example.com"])
    target = data.draw(st.sampled_from(allowed))
    sub = "https://" + ".".join(data.draw(st.lists(labels, min_size=1, max_size=3))) + ".example.com"
    fakes = [*look_alikes(target, split_origin(target)[1]), *look_alikes(sub, "example.com")]
    for fake in fakes:
        if fake not in allowed:
            assert not matcher.matches(fake), (allowed, fake)


@given(st.lists(exact_origins(), min_size=1, max_size=10), st.data())
def test_allowed_origins_match_in_any_letter_case(allowed: list[str], data: st.DataObject) -> None:
    matcher = compiled([*allowed, "https://*.example.com"])
    sub = "https://" + ".".join(data.draw(st.lists(labels, min_size=1, max_size=4))) + ".example.com"
    for origin in [*allowed, sub]:
        flips = data.draw(st.lists(st.booleans(), min_size=len(origin), max_size=len(origin)))
        assert matcher.matches("".join(c.upper() if flip else c for c, flip in zip(origin, flips, strict=True)))


FRAGMENTS = [
    *("https://", "http://", "https://a", "a.example", "localhost:1234", "a", ".", "example", ".com"),
    *(".example.com", ":1234", "localhost", "/", "@", "?", "#"),
]
SUBDOMAIN_ORACLE = re.compile(r"https://(?:[a-z0-9_-]+\.)+example\.com")


CORES = ["https://a.example", "http://localhost:1234", "https://x.example.com", "HTTPS://X.Example.Com", "null"]
affixes = st.just("") | st.sampled_from(FRAGMENTS) | st.text(max_size=2)
near_misses = st.tuples(affixes, st.sampled_from(CORES), affixes).map("".join)
fragment_soup = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=2), max_size=8).map("".join)


@given(near_misses | fragment_soup)
def test_only_allowed_origins_match(text: str) -> None:
    allowed = ["https://a.example", "http://localhost:1234"]
    matcher = compiled([*allowed, "https://*.example.com"])
    lowered = text.lower()
    expected = text.isascii() and (lowered in allowed or SUBDOMAIN_ORACLE.fullmatch(lowered) is not None)
    event(f"matches: {expected}")
    assert matcher.matches(text) is expected
