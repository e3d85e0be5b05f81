"""Placeholder until the path-safety module lands: refuses anything but plain paths."""
from __future__ import annotations

import re
from urllib.parse import unquote

from .errors import Denied

INVALID_PATH = "invalid request path"
_PLAIN = re.compile(r"^(/[A-Za-z0-9_\-~,=:@!$&'()*+]+)*/?$")


def checked_path(raw_path: str) -> str:
    if not _PLAIN.match(raw_path) and not _PLAIN.match(unquote(raw_path)):
        raise Denied(400, INVALID_PATH)
    return unquote(raw_path)
