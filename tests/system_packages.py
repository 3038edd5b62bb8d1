"""One closing line for the test run: the suites skipped because a system package is missing.

``make test`` installs the Python side only; Chromium (browser tests), bubblewrap (the
grading sandbox) and PostgreSQL (the shared-gradebook tests) come from the system. Their suites skip, each saying why, and
:func:`pytest_unconfigure` (imported by ``conftest.py``) ends the run with one line that names
them and the command that installs what is missing.
"""

from __future__ import annotations

import re
from pathlib import Path

# A skip whose reason names one of these packages (Debian's names) and says it is missing was
# caused by that package: "no Chromium at /usr/bin/chromium", "bubblewrap (bwrap) is not installed".
SYSTEM_PACKAGES = {
    "chromium": re.compile(r"\bchromium\b", re.IGNORECASE),
    "bubblewrap": re.compile(r"\bbubblewrap\b|\bbwrap\b", re.IGNORECASE),
    "postgresql": re.compile(r"\bpostgresql\b", re.IGNORECASE),
}
MISSING = re.compile(r"\bnot installed\b|\bno\b|\bmissing\b|\bnot found\b", re.IGNORECASE)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr or "")


def missing_system_packages(reports) -> dict[str, dict[str, int]]:
    """``{package: {test file: skipped tests}}`` for the skips that name a missing system package."""
    found: dict[str, dict[str, int]] = {}
    for report in reports:
        reason = _skip_reason(report)
        if not MISSING.search(reason):
            continue
        for package, pattern in SYSTEM_PACKAGES.items():
            if pattern.search(reason):
                suite = report.nodeid.split("::")[0] or str(getattr(report, "fspath", "?"))
                found.setdefault(package, {}).setdefault(suite, 0)
                found[package][suite] += 1
                break
    return found


def skipped_suites_line(found: dict[str, dict[str, int]]) -> str | None:
    """The one line that ends a run with such skips: which suites, how many tests, and the command."""
    if not found:
        return None
    parts = []
    for package, suites in found.items():
        names = ", ".join(f"{Path(suite).name} ({n})" for suite, n in sorted(suites.items()))
        parts.append(f"{package} missing: {names}")
    return f"Skipped for a missing system package ({'; '.join(parts)}); enable them with: apt-get install -y {' '.join(found)}"


def pytest_unconfigure(config):
    """After pytest's own summary line, say which suites a missing system package skipped."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    line = skipped_suites_line(missing_system_packages(reporter.stats.get("skipped", [])))
    if line:
        reporter.write_line(line, yellow=True, bold=True)
