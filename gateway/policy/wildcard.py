"""Turn `*`/`?` wildcard text into a regular expression that cannot backtrack catastrophically.

Token owners write the patterns and clients send the text they are matched against, so a
pattern such as `*1*1*1*1*1*1` must not cost exponential time on a hostile address or origin.
As in `fnmatch.translate`, every `*` except the last is an atomic lazy group: the text between two
stars has a fixed length, so placing it at its earliest position never loses a match, and the atomic
group forbids the engine from trying the later positions again. Matching stays
O(len(pattern) * len(text)).
"""
from __future__ import annotations

import re

_STAR_RUN = re.compile(r"\*+")


def glob_to_regex(glob: str, star: str, one: str) -> str:
    """Regex source for `glob`: `*` becomes `star*` and `?` becomes `one`, everything else literal.

    `star` and `one` are single-character regex classes; `star` must accept every character that
    `one` and the literal parts accept, or the earliest-placement argument above does not hold.
    """
    pieces = [_literal(piece, one) for piece in _STAR_RUN.sub("*", glob).split("*")]
    if len(pieces) == 1:
        return pieces[0]
    middle = "".join(f"(?>{star}*?{piece})" for piece in pieces[1:-1])
    return f"{pieces[0]}{middle}{star}*{pieces[-1]}"


def _literal(piece: str, one: str) -> str:
    return "".join(one if char == "?" else re.escape(char) for char in piece)
