"""bench/RESULTS.md holds the last full run (run.py) and, at its end, the last soak (soak.py);
each script rewrites its own part and keeps the other's."""
from __future__ import annotations

from pathlib import Path

SOAK_HEADING = "## Soak"


def with_soak_section(results: Path, section: str) -> str:
    """RESULTS.md with `section` at its end, in place of an earlier soak section."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    return without_soak_section(text).rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"


def with_run_report(results: Path, report: str) -> str:
    """A new run's report, followed by the soak section the file had."""
    soak = soak_section(results.read_text()) if results.exists() else ""
    return report if not soak else report.rstrip("\n") + "\n\n" + soak


def without_soak_section(text: str) -> str:
    index = text.find("\n" + SOAK_HEADING + "\n")
    return text if index < 0 else text[:index + 1]


def soak_section(text: str) -> str:
    """The soak section of a RESULTS.md, '' if none."""
    index = text.find("\n" + SOAK_HEADING + "\n")
    return "" if index < 0 else text[index + 1:]
