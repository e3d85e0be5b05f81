"""Path safety: every ambiguous form is refused, every clean one decodes to what it means."""
from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import Denied
from gateway.policy.paths import INVALID_PATH, OwnPaths, checked_path, forwarded_path


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("/", "/"),
        ("/gw/devices", "/gw/devices"),
        ("/gw/devices/", "/gw/devices/"),
        ("/gw/devices/1,2,3/settings", "/gw/devices/1,2,3/settings"),
        ("/gw/devices/1%2C2", "/gw/devices/1,2"),
        ("/gw/devices/1%2c2", "/gw/devices/1,2"),
        ("/gw/devices/name=x*", "/gw/devices/name=x*"),
        ("/gw/devices/%7Bname%3D%22my%20car%22%7D", '/gw/devices/{name="my car"}'),
        ("/gw/devices/{id>5}", "/gw/devices/{id>5}"),
        ("/files/.hidden/...", "/files/.hidden/..."),
        ("/files/a.b/c..d", "/files/a.b/c..d"),
        ("/files/%D1%84%D0%B0%D0%B9%D0%BB", "/files/файл"),
        ("/files/%E2%9C%93", "/files/\u2713"),
        ("/files/a%3Fb%23c", "/files/a?b#c"),
        ("/x/~user/@me/(a)+b!$&'", "/x/~user/@me/(a)+b!$&'"),
    ],
)
def test_clean_paths_decode_once(raw: str, decoded: str) -> None:
    assert checked_path(raw) == decoded


def test_fast_path_returns_the_same_object() -> None:
    raw = "/gw/devices/12/settings"
    assert checked_path(raw) is raw


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "gw/devices",
        "*",
        "//gw/devices",
        "/gw//devices",
        "/gw/devices//",
        "/.",
        "/..",
        "/gw/./devices",
        "/gw/../platform/tokens",
        "/gw/devices/..",
        "/gw/devices/.",
        "/gw/%2e%2e/platform",
        "/gw/%2E%2E/platform",
        "/gw/.%2e/platform",
        "/gw/%2e./platform",
        "/gw/%2e/devices",
        "/gw/devices%2f..%2fplatform",
        "/gw/devices%2F1",
        "/gw/devices%5c1",
        "/gw/devices%5C..%5Cplatform",
        "/gw\\devices",
        "/gw/devices;jsessionid=1",
        "/gw/devices/1;x",
        "/gw/devices/1%3bx",
        "/gw/devices/1%3Bx",
        "/gw/devices/1%00",
        "/gw/devices/1\x00",
        "/gw/devices/1%0a",
        "/gw/devices/1%0D%0AX-Injected:%201",
        "/gw/devices/1%09",
        "/gw/devices/1%7f",
        "/gw/devices/1\x7f",
        "/gw/devices/1\t",
        "/gw/devices/1 2",
        "/gw/devices/%C2%85",
        "/gw/%252e%252e/platform",
        "/gw/devices/%2525",
        "/gw/devices/%25",
        "/gw/devices/%zz",
        "/gw/devices/%",
        "/gw/devices/%2",
        "/gw/devices/%+1",
        "/gw/devices/% 1",
        "/gw/devices/%_1",
        "/gw/devices/%ff",
        "/gw/devices/%c0%ae%c0%ae",
        "/gw/devices/%ed%a0%80",
        "/gw/devices/файл",
        "/gw/devices/\udcff",
        "/gw/devices?x=1",
        "/gw/devices#x",
    ],
)
def test_ambiguous_paths_are_refused(raw: str) -> None:
    with pytest.raises(Denied) as caught:
        checked_path(raw)
    assert (caught.value.status, caught.value.reason) == (400, INVALID_PATH)


@pytest.mark.parametrize(
    ("raw", "authorized", "forwarded"),
    [
        ("/gw/devices/all", "/gw/devices/all", "/gw/devices/all"),
        ("/gw/devices/all", "/gw/devices/1,2", "/gw/devices/1,2"),
        ("/gw/devices/%61ll/x%20y", "/gw/devices/3/x y", "/gw/devices/3/x%20y"),
        ("/gw/devices/all/", "/gw/devices/7/", "/gw/devices/7/"),
        ("/gw/%64evices/all/%6D", "/gw/devices/1,2/m", "/gw/%64evices/1,2/%6D"),
    ],
)
def test_forwarded_path_rewrites_only_changed_segments(raw: str, authorized: str, forwarded: str) -> None:
    checked = checked_path(raw)
    result = forwarded_path(raw, checked, authorized)
    assert result == forwarded
    assert checked_path(result) == authorized


def test_forwarded_path_falls_back_to_full_encoding_when_segments_differ() -> None:
    result = forwarded_path("/a/all", "/a/all", "/a/1/b c")
    assert result == "/a/1/b%20c"
    assert checked_path(result) == "/a/1/b c"


# --- properties -----------------------------------------------------------------------------

_RAW_OK = frozenset(chr(c) for c in range(0x21, 0x7F)) - set("%/\\;?#")
_SEGMENT_ALPHABET = st.one_of(
    st.sampled_from(list("abcXYZ019-._~,=:@!$&'()*+{}\"<>|^`[] ")),
    st.sampled_from(list("/\\;%?#\x00\x1f\x7f\x85")),
    st.characters(codec="utf-8"),
)


def _is_clean(segment: str) -> bool:
    forbidden = set("/\\;%") | {chr(c) for c in range(0x20)} | {chr(c) for c in range(0x7F, 0xA0)}
    return segment not in ("", ".", "..") and not (set(segment) & forbidden)


@st.composite
def _encoded_char(draw: st.DrawFn, char: str) -> tuple[str, bool]:
    """One character in a random wire form; the flag says whether it was double encoded."""
    forms = ["single", "double"] + (["raw"] if char in _RAW_OK else [])
    form = draw(st.sampled_from(forms))
    if form == "raw":
        return char, False
    upper = draw(st.booleans())
    escapes = "".join(f"%{byte:02X}" if upper else f"%{byte:02x}" for byte in char.encode("utf-8"))
    if form == "double":
        return escapes.replace("%", "%25"), True
    return escapes, False


@st.composite
def _encoded_segment(draw: st.DrawFn, segment: str) -> tuple[str, bool]:
    parts = [draw(_encoded_char(char)) for char in segment]
    return "".join(text for text, _ in parts), any(double for _, double in parts)


_MUTATIONS = ["/./", "/../", "/%2e/", "/%2E%2e/", "/.%2E/", "//", ";", ";a=b", "%2f", "%2F", "%5c", "\\", "%00", "%"]


@given(
    segments=st.lists(st.text(_SEGMENT_ALPHABET, max_size=6), min_size=1, max_size=5),
    trailing_slash=st.booleans(),
    mutate=st.booleans(),
    data=st.data(),
)
def test_checked_path_refuses_or_returns_the_intended_path(
    segments: list[str], trailing_slash: bool, mutate: bool, data: st.DataObject
) -> None:
    encoded = [data.draw(_encoded_segment(segment)) for segment in segments]
    raw = "/" + "/".join(text for text, _ in encoded) + ("/" if trailing_slash else "")
    intended = "/" + "/".join(segments) + ("/" if trailing_slash else "")
    if mutate:
        mutation = data.draw(st.sampled_from(_MUTATIONS))
        at = data.draw(st.integers(1, len(raw)))
        raw = raw[:at] + mutation + raw[at:]
    double_encoded = any(double for _, double in encoded)
    try:
        result = checked_path(raw)
    except Denied as refused:
        assert refused.status == 400
        # Completeness: a clean path, encoded once and left alone, must never be refused.
        assert mutate or double_encoded or not all(_is_clean(segment) for segment in segments)
        return
    assert not double_encoded
    assert result == unquote(raw, errors="strict")
    if not mutate:
        assert result == intended
    inner = result[1:].split("/")
    assert all(segment not in ("", ".", "..") for segment in inner[:-1])
    assert inner[-1] not in (".", "..")
    assert "%" not in result and ";" not in result and "\\" not in result


# -- the gateway's own prefixes, in every spelling a lenient upstream reads as them ------------------

OWN = OwnPaths(("/platform/", "/auth/", "/platform/", "/auth/info", "/_gateway/"))


@pytest.mark.parametrize("path", [
    "/Platform/tokens", "/PLATFORM/tokens", "/AUTH/info", "/Auth/info", "/platform./x", "/platform.json",
    "/platform /x", "/Platform", "/AUTH", "/auth.", "/Auth/Info/x",
    "/platform~1/x", "/platform::$DATA/x", "/\uff50latform/tokens", "/_Gateway/health", "/_gateway.",
])
def test_lookalikes_of_own_prefixes(path: str) -> None:
    assert OWN.lookalike(path)


@pytest.mark.parametrize("path", [
    "/platform/tokens", "/auth/info", "/auth/anything", "/_gateway/health", "/gw/devices", "/", "/platforms/x",
    "/platform-v2/x", "/authors", "/gw/platform/tokens", "/x/auth/info", "/.json", "/platform", "/auth",
])
def test_own_and_unrelated_paths_are_no_lookalikes(path: str) -> None:
    assert not OWN.lookalike(path)


@given(st.sampled_from(["platform", "auth", "_gateway"]),
       st.sampled_from(["", ".", "..json", ".json", " ", "~1", ":x"]), st.text(alphabet="abcxyz/", max_size=8))
def test_any_case_and_suffix_of_an_own_head_is_caught(head: str, suffix: str, rest: str) -> None:
    spelled = "".join(char.upper() if index % 2 else char for index, char in enumerate(head)) + suffix
    path = "/" + spelled + "/" + rest
    assert OWN.lookalike(path) or path.startswith(OWN.under) or path in OWN.exact
