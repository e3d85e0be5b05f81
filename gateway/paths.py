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
from urllib.parse import quote

from gateway.errors import Denied

INVALID_PATH = "invalid request path"

# Unreserved characters, `/`, and the sub-delimiters that carry no meaning in a path (`;` does);
# a path made only of these needs no decoding at all.
_FAST_PATH = re.compile(r"/[A-Za-z0-9\-._~/,=:@!$&'()*+]*")
# Raw characters that may appear before decoding: printable ASCII without the ones that end the
# path (`?`, `#`), start parameters (`;`) or act as a separator on some servers (`\`).
_RAW_FORBIDDEN = re.compile(r"[^\x21-\x7e]|[?#;\\]")
# After decoding, a segment may hold any text except separators, controls (C1 too: some stacks
# read U+0085 as a line break) and a second `%`, which would mean double encoding.
_DECODED_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f/\\;%]")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_DOT_SEGMENTS = frozenset((".", ".."))
# What `forwarded_path` leaves unencoded in a rewritten segment: the fast-path set without `/`.
_QUOTE_SAFE = "-._~,=:@!$&'()*+"


def checked_path(raw_path: str) -> str:
    """Return the decoded path every check must use, or refuse an ambiguous one with 400."""
    if _FAST_PATH.fullmatch(raw_path):
        _check_segments(raw_path)
        return raw_path
    if not raw_path.startswith("/") or _RAW_FORBIDDEN.search(raw_path):
        raise Denied(400, INVALID_PATH)
    decoded = "/".join(_decode_segment(segment) for segment in raw_path.split("/"))
    _check_segments(decoded)
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
        for raw, old, new in zip(raw_segments, checked_segments, authorized_segments)
    )


def _check_segments(path: str) -> None:
    """Refuse dot segments and empty segments; only the last segment may be empty (trailing `/`)."""
    if "//" in path or not path.startswith("/"):
        raise Denied(400, INVALID_PATH)
    if "/." in path and any(segment in _DOT_SEGMENTS for segment in path.split("/")):
        raise Denied(400, INVALID_PATH)


def _decode_segment(segment: str) -> str:
    if "%" not in segment:
        return segment
    pieces = segment.split("%")
    octets = bytearray(pieces[0].encode("ascii"))
    for piece in pieces[1:]:
        # int(..., 16) alone would also accept "+1", " 1" and "_1"; only two hex digits are an escape.
        if len(piece) < 2 or piece[0] not in _HEX_DIGITS or piece[1] not in _HEX_DIGITS:
            raise Denied(400, INVALID_PATH)
        octets.append(int(piece[:2], 16))
        octets += piece[2:].encode("ascii")
    try:
        decoded = octets.decode("utf-8")
    except UnicodeDecodeError:
        raise Denied(400, INVALID_PATH) from None
    if _DECODED_FORBIDDEN.search(decoded):
        raise Denied(400, INVALID_PATH)
    return decoded
