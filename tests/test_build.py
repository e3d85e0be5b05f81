"""The compiled fast path (setup.py, gateway/build.py): which one runs, and no stale build runs."""
from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

import pytest
from conftest import GatewayHandle

from gateway.build import COMPILED, check_fresh, fast_path_compiled, source_of

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def built_of(source: Path) -> Path:
    return source.with_name(source.stem + SUFFIX)


def make_package(root: Path, checkout: bool) -> Path:
    package = root / "gateway"
    package.mkdir()
    if checkout:
        (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    for name in COMPILED:
        source = source_of(name, package)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("# source\n")
        built_of(source).write_bytes(b"\x7fELF")
    return package


def age(path: Path, seconds: float) -> None:
    stat = path.stat()
    os.utime(path, (stat.st_atime - seconds, stat.st_mtime - seconds))


def test_a_source_edited_after_the_build_is_refused(tmp_path: Path) -> None:
    package = make_package(tmp_path, checkout=True)
    check_fresh(package)  # built after the sources: fine
    built = built_of(source_of("proxy.listener", package))
    age(built, 60)  # listener.py is now newer than what was compiled from it
    with pytest.raises(ImportError, match=r"listener\.py changed after it was compiled.*pip install -e \."):
        check_fresh(package)
    built.unlink()  # no compiled module: the source runs, nothing to refuse
    check_fresh(package)


def test_a_build_whose_source_moved_is_refused(tmp_path: Path) -> None:
    package = make_package(tmp_path, checkout=True)
    (package / f"fastpath{SUFFIX}").write_bytes(b"\x7fELF")  # from before the module moved to proxy/
    with pytest.raises(ImportError, match=r"fastpath.*has no source beside it"):
        check_fresh(package)


def test_an_installed_package_is_not_second_guessed(tmp_path: Path) -> None:
    package = make_package(tmp_path, checkout=False)  # site-packages: no pyproject.toml beside it
    for name in COMPILED:
        age(built_of(source_of(name, package)), 60)
    check_fresh(package)


@pytest.mark.skipif(os.environ.get("EXPECT_COMPILED_FAST_PATH") != "1",
                    reason="set by .ci/run, where a C compiler is")
def test_the_fast_path_was_compiled() -> None:
    """CI builds with a C compiler: a build that fell back to Python (setup.py prints why) fails here
    instead of passing unnoticed, slower."""
    assert fast_path_compiled()


async def test_health_says_which_fast_path_runs(gw: GatewayHandle) -> None:
    status, body = await gw.call("GET", "/_gateway/health")
    assert status == 200
    assert body["result"][0]["fast_path"] == ("compiled" if fast_path_compiled() else "interpreted")
    import gateway.proxy.listener
    assert fast_path_compiled() == (not gateway.proxy.listener.__file__.endswith(".py"))
