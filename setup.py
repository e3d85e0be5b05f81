"""Build script: everything is in pyproject.toml except the compiled fast path.

`gateway/fastpath.py` and `gateway/upstream.py` (the code every proxied request runs through) are
compiled to C extensions with mypyc when the build can: ~1.4x the requests per second of the same
modules interpreted (bench/ANALYSIS.md). Without a C compiler, or with NO_COMPILED_FAST_PATH=1, the
package installs as plain Python and behaves the same; `/_gateway/health` says which one runs.
"""
from __future__ import annotations

import os
import sys

from setuptools import setup

COMPILED = ["gateway/fastpath.py", "gateway/upstream.py"]


def compiled_extensions() -> list[object]:
    if os.environ.get("NO_COMPILED_FAST_PATH") == "1":
        return []
    try:
        from mypyc.build import mypycify

        # The build environment need not hold the gateway's dependencies: their types are Any
        # here, so the strict checks about Any (run in development with them installed) are off.
        # Only the compiled modules' own errors count (`mypy gateway/` checks the rest).
        relaxed = ["--ignore-missing-imports", "--follow-imports=silent", "--no-warn-return-any",
                   "--allow-untyped-calls", "--allow-subclassing-any", "--allow-untyped-decorators",
                   "--no-warn-unused-ignores"]
        extensions = mypycify([*relaxed, *COMPILED], opt_level="3")
    except (Exception, SystemExit) as exc:  # no mypyc, or it refused the modules: install interpreted
        print(f"gateway: fast path not compiled ({type(exc).__name__}: {exc}); installing it as Python",
              file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # a compiler that fails leaves the Python modules in charge
    return list(extensions)


setup(ext_modules=compiled_extensions())
