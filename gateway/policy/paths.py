"""Path safety: the access decision is made on exactly the path that is forwarded.

Every form that servers are known to read differently is refused with 400 rather than normalised:
dot segments (raw or encoded), empty segments, encoded `/` and `\\`, `;` parameters, control
characters, double encoding, malformed escapes and invalid UTF-8. Because nothing ambiguous is
accepted, the raw path can be forwarded unchanged and the upstream decodes it to the very path
the checks saw. The one exception is an ACL rewrite of a selector, which `forwarded_path` applies
to that single segment.
"""
from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, unquote

from gateway.errors import Denied

INVALID_PATH = "invalid request path"
# The gateway's own paths (the platform API and the token's own record); every front needs them.
PLATFORM = "/platform/"
AUTH_INFO = "/auth/info"

# Unreserved characters, `/`, and the sub-delimiters that carry no meaning in a path (`;` does);
# a path made only of these, without `//` or `/.`, needs no decoding and no segment check at all.
_FAST_PATH = re.compile(r"/[A-Za-z0-9\-._~/,=:@!$&'()*+]*")
# Raw characters allowed before decoding: printable ASCII (0x21-0x7e) without the ones that end the
# path (`?` 0x3f, `#` 0x23), start parameters (`;` 0x3b) or act as a separator on some servers (`\`).
_RAW_FORBIDDEN = re.compile(r"[^!-\"$-:<->@-\[\]-~]")
# A malformed escape (`unquote` would pass it through) or an encoded `/`, the one character whose
# encoding is lost once decoded; encoded `\` and `%` are refused after decoding, like raw ones.
_BAD_ESCAPE = re.compile(r"%(?!(?!2[Ff])[0-9A-Fa-f]{2})")
# After decoding: controls (C1 too: some stacks read U+0085 as a line break), `\`, `;` and `%`.
_DECODED_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\\;%]")
_DOT_SEGMENTS = frozenset((".", ".."))
# What `forwarded_path` leaves unencoded in a rewritten segment: the fast-path set without `/`.
_QUOTE_SAFE = "-._~,=:@!$&'()*+"


def checked_path(raw_path: str) -> str:
    """Return the decoded path every check must use, or refuse an ambiguous one with 400."""
    if _FAST_PATH.fullmatch(raw_path) and "//" not in raw_path and "/." not in raw_path:
        return raw_path
    if not raw_path.startswith("/") or _RAW_FORBIDDEN.search(raw_path) or _BAD_ESCAPE.search(raw_path):
        raise Denied(400, INVALID_PATH)
    try:
        decoded = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise Denied(400, INVALID_PATH) from None
    if _DECODED_FORBIDDEN.search(decoded) or "//" in decoded:
        raise Denied(400, INVALID_PATH)
    # Encoded slashes were refused above, so decoded segments are exactly the raw ones.
    if any(segment in _DOT_SEGMENTS for segment in decoded.split("/")):
        raise Denied(400, INVALID_PATH)
    return decoded


def forwarded_path(raw_path: str, checked: str, authorized: str) -> str:
    """The path to send upstream: the raw path, with only the segments the ACL rewrote re-encoded.

    `checked` is `checked_path(raw_path)` and `authorized` what the ACL returned for it. Segment
    counts agree because encoded slashes are refused, so each raw segment pairs with its decoded one.
    """
    if authorized == checked:
        return raw_path
    raw_segments = raw_path.split("/")
    checked_segments = checked.split("/")
    authorized_segments = authorized.split("/")
    if not len(raw_segments) == len(checked_segments) == len(authorized_segments):
        return quote(authorized, safe="/" + _QUOTE_SAFE)
    return "/".join(
        raw if old == new else quote(new, safe=_QUOTE_SAFE)
        for raw, old, new in zip(raw_segments, checked_segments, authorized_segments, strict=True)
    )


# Where a lenient router stops reading a segment's name: a format suffix (`.json`), a trailing dot
# or space (Windows servers drop both), `~`, `:`... Only letters, digits, `-` and `_` name it.
_NAME_END = re.compile(r"[^a-z0-9_\-]")


def canonical_segment(segment: str) -> str:
    """What a case-insensitive, suffix-stripping router takes a decoded path segment for."""
    folded = segment.lower() if segment.isascii() else unicodedata.normalize("NFKC", segment).casefold()
    end = _NAME_END.search(folded)
    return folded if end is None else folded[:end.start()]


class OwnPaths:
    """The gateway's own prefixes, and every spelling an upstream could read as one of them.

    A path that is one of them exactly (under a prefix ending in `/`, or equal to one without) is
    the gateway's; a path that only a lenient upstream would read as one (`/Platform/tokens`,
    `/platform./x`, `/platform.json`, `/platform%20/x`, `/Auth`) is refused: it must reach no
    upstream, whatever token carries it."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes
        # A prefix ending in `/` names its bare segment too (`/platform` is the API's own 404).
        self.exact = frozenset(prefix.rstrip("/") for prefix in prefixes)
        self.under = tuple(prefix for prefix in prefixes if prefix.endswith("/"))
        self.canonical = tuple({tuple(canonical_segment(part) for part in prefix.strip("/").split("/"))
                                for prefix in prefixes})
        self.heads = frozenset(segments[0] for segments in self.canonical)
        self.head_starts = tuple(sorted(self.heads))  # a canonical head is where its segment begins

    def lookalike(self, path: str) -> bool:
        """Whether `path` (decoded, as `checked_path` returns it) is read as one of the prefixes
        by a lenient upstream without being one."""
        if path.startswith(self.under) or path in self.exact:
            return False
        end = path.find("/", 1)
        first = path[1:] if end < 0 else path[1:end]
        if first.isascii() and not first.lower().startswith(self.head_starts):
            return False  # the common case: one ASCII segment that starts as no own prefix does
        if canonical_segment(first) not in self.heads:
            return False
        segments = [canonical_segment(part) for part in path[1:].split("/")]
        for canonical in self.canonical:
            if len(segments) >= len(canonical) and tuple(segments[:len(canonical)]) == canonical:
                return True
        return False
