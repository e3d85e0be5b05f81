"""Which modules run compiled, and a guard against running a stale compiled module.

`setup.py` compiles the modules of the request path (`COMPILED`) with mypyc when it can; a
compiled module (`proxy/listener.cpython-311-...so`) then sits beside its source and Python imports it
first. In a source checkout (an editable install) the source can change afterwards; running the
old compiled code would be silently wrong, so importing the package refuses instead.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

# What every proxied request (and every cache miss) runs through; setup.py compiles these. Not
# here: modules that take API input as it comes (acl, validation, api), where mypyc's run-time
# type checks would turn malformed data into TypeErrors. `compiler` takes stored records, typed
# `Any` throughout, and a record that fails to compile fails alone (`compile_each`).
COMPILED = ("proxy.listener", "proxy.front", "proxy.exchange", "proxy.decision", "proxy.bridge", "proxy.flow",
            "proxy.routing", "proxy.replies", "proxy.upstream", "auth.authenticator", "auth.checks", "auth.compiler",
            "store.cache", "store.resp", "store.slots", "policy.paths", "writers.accessed", "writers.logs",
            "writers.tokenlogs", "writers.usage", "tokens", "counters")
HERE = Path(__file__).resolve().parent


def fast_path_compiled() -> bool:
    """Whether the fast path's modules were imported as compiled extensions."""
    for name in COMPILED:
        spec = importlib.util.find_spec(f"{__package__}.{name}")
        if spec is None or spec.origin is None or spec.origin.endswith(".py"):
            return False
    return True


def source_of(name: str, package: Path = HERE) -> Path:
    """`proxy.listener` -> gateway/proxy/listener.py"""
    return package.joinpath(*name.split(".")).with_suffix(".py")


def compiled_modules(package: Path) -> list[tuple[Path, Path]]:
    """Each compiled module under `package` and the source it would have been built from."""
    suffixes = sorted(importlib.machinery.EXTENSION_SUFFIXES, key=len, reverse=True)
    found = []
    for built in package.rglob("*.so"):
        suffix = next((s for s in suffixes if built.name.endswith(s)), None)
        if suffix is not None:
            found.append((built, built.with_name(built.name[: -len(suffix)] + ".py")))
    return found


def check_fresh(package: Path = HERE) -> None:
    """In a checkout, refuse a compiled module older than its source (edited since the build),
    or one whose source moved or vanished (an editable install leaves old builds behind)."""
    if not (package.parent / "pyproject.toml").exists():
        return  # an installed package: its files change only by installing again
    for built, source in compiled_modules(package):
        if not source.exists():
            raise ImportError(
                f"{built} has no source beside it (the module moved or was removed): delete it, "
                f"or run `pip install -e .` again, which removes it")
        if source.stat().st_mtime > built.stat().st_mtime:
            raise ImportError(
                f"{source} changed after it was compiled to {built.name}: run `pip install -e .` "
                f"again to rebuild it, or delete {built.name} to run the module as Python")
