"""Build script: everything is in pyproject.toml except the compiled fast path.

The modules every proxied request runs through (`COMPILED` in gateway/build.py: the fast path,
the upstream pool, authentication, the cache, the checks, logs and batched Redis writes) are
compiled to C extensions with mypyc when the build can: ~1.4x the requests per second of the same
modules interpreted (bench/ANALYSIS.md). Without a C compiler, or with NO_COMPILED_FAST_PATH=1, the
package installs as plain Python and behaves the same; `/_gateway/health` says which one runs.
"""
from __future__ import annotations

import os
import runpy
import sys

from pathlib import Path

from setuptools import setup

# The list lives in gateway/build.py (run on its own here: importing the package would check
# the very build being made).
BUILD = runpy.run_path("gateway/build.py")
COMPILED = [f"gateway/{name.replace('.', '/')}.py" for name in BUILD["COMPILED"]]


def remove_orphan_builds() -> None:
    """A checkout keeps the compiled modules of earlier builds; one whose source moved or was
    removed would otherwise stay importable (gateway/build.py refuses to run beside one)."""
    for built, source in BUILD["compiled_modules"](Path("gateway")):
        if not source.exists():
            built.unlink()


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


remove_orphan_builds()
setup(ext_modules=compiled_extensions())
