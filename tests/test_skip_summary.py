"""The test run ends with one line naming the suites skipped for a missing system package."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from autograder.course import ROOT

CONFTEST = f"""
import importlib.util

_spec = importlib.util.spec_from_file_location("system_packages", {str(ROOT / "tests" / "system_packages.py")!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
pytest_unconfigure = _module.pytest_unconfigure
"""


def _run(tmp_path: Path, files: dict[str, str]) -> list[str]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name, source in files.items():
        (tmp_path / name).write_text(textwrap.dedent(source))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout.rstrip().splitlines()


def test_last_line_names_the_suites_and_the_command(tmp_path):
    lines = _run(
        tmp_path,
        {
            "test_browsing.py": """
                import pytest
                pytestmark = pytest.mark.skipif(True, reason="no Chromium at /nowhere/chromium")
                def test_a(): pass
                def test_b(): pass
            """,
            "test_sandboxing.py": """
                import pytest
                def test_c(): pytest.skip("bubblewrap (bwrap) is not installed; install it with: apt-get install -y bubblewrap")
                def test_d(): pass
            """,
            "test_other.py": """
                import pytest
                def test_e(): pytest.skip("needs a CUDA GPU (none here)")
                def test_f(): pytest.skip("bwrap could not create a user namespace on this host")
            """,
        },
    )
    assert lines[-1] == (
        "Skipped for a missing system package (chromium missing: test_browsing.py (2); "
        "bubblewrap missing: test_sandboxing.py (1)); enable them with: apt-get install -y chromium bubblewrap"
    ), lines[-3:]
    assert "5 skipped" in lines[-2] and "1 passed" in lines[-2], lines[-3:]


def test_no_line_when_nothing_was_skipped_for_a_system_package(tmp_path):
    lines = _run(
        tmp_path,
        {"test_other.py": "import pytest\ndef test_e(): pytest.skip('needs a CUDA GPU (none here)')\ndef test_f(): pass\n"},
    )
    assert not any("missing system package" in line for line in lines), lines
