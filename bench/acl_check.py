"""Micro benchmark: time per `CompiledAcl.authorize()` call against a 50-entry ACL.

Run from the repository root: `python bench/acl_check.py`. It prints figures and asserts nothing.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.policy.acl import CompiledAcl, compile_acl
from gateway.errors import Denied
from gateway.policy.paths import checked_path

ITERATIONS = 100_000
REPEATS = 5


def fifty_entry_acl() -> list[dict[str, object]]:
    """47 unrelated collections, plus three entries for the uri the requests hit."""
    acl: list[dict[str, object]] = [
        {"uri": f"svc{n}/items", "methods": ["GET", "PUT"], "ids": list(range(n, n + 20))} for n in range(47)
    ]
    acl += [
        {
            "uri": "gw/devices",
            "methods": ["GET", "PUT"],
            "ids": list(range(1000, 1100)),
            "submodules": [{"name": "messages", "methods": ["GET"]}, {"name": "settings", "methods": ["GET", "PUT"]}],
        },
        {"uri": "gw/devices", "methods": ["GET"], "ids": [5, 6, 7]},
        {"uri": "gw/channels", "methods": ["GET", "POST"], "ids": "all"},
    ]
    return acl


def per_call(acl: CompiledAcl, method: str, path: str) -> float:
    """Best of REPEATS runs, like timeit: the minimum is the figure least disturbed by other load."""
    return min(_one_run(acl, method, path) for _ in range(REPEATS))


def _one_run(acl: CompiledAcl, method: str, path: str) -> float:
    denied = 0
    start = time.perf_counter()
    for _ in range(ITERATIONS):
        try:
            acl.authorize(method, path)
        except Denied:
            denied += 1  # a denial is timed too: building the 403 is part of the cost
    return (time.perf_counter() - start) / ITERATIONS


def per_check(path: str) -> float:
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(ITERATIONS):
            checked_path(path)
        runs.append((time.perf_counter() - start) / ITERATIONS)
    return min(runs)


def main() -> None:
    entries = fifty_entry_acl()
    compile_runs = []
    for _ in range(20):
        start = time.perf_counter()
        acl = compile_acl(entries)
        compile_runs.append(time.perf_counter() - start)
    print(f"compile_acl, {len(entries)} entries, 1043 ids: {min(compile_runs) * 1e6:7.0f} us (once per token load)")
    cases = [
        ("GET", "/gw/devices/1005,1006/settings", "granted, id list + submodule"),
        ("GET", "/gw/channels/name=x*", "granted, ids all"),
        ("GET", "/gw/devices/all", "granted, all rewritten to 103 ids"),
        ("PUT", "/gw/devices/5", "denied, id not permitted for PUT"),
        ("GET", "/gw/calcs/1", "denied, no entry"),
        ("GET", "/svc46/items/50/x", "granted, last of 47 other uris"),
    ]
    for method, path, what in cases:
        print(f"authorize {method:4} {path:34} {per_call(acl, method, path) * 1e9:7.0f} ns  ({what})")
    single = compile_acl(entries[-3:-2])
    path = cases[0][1]
    print(f"authorize GET  {path:34} {per_call(single, 'GET', path) * 1e9:7.0f} ns  (same request, 1-entry ACL)")
    for path in ("/gw/devices/1005,1006/settings", "/gw/devices/%7Bname%3D%22x%22%7D/messages"):
        print(f"checked_path {path:44} {per_check(path) * 1e9:7.0f} ns")


if __name__ == "__main__":
    main()
