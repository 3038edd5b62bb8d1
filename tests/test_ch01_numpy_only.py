"""Chapter 1 runs with NumPy alone: its setup cell, its exercises and its checks never need PyTorch.

Each test runs in a separate Python (or kernel) whose ``sitecustomize`` puts an import blocker
first on ``sys.meta_path``, so ``import torch`` fails there exactly as it would where PyTorch was
never installed, although this environment has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import setup_source

from autograder.course import ROOT, find_chapter

CHAPTER = find_chapter("1")

BLOCKER = '''
import sys


class _NoTorch:
    """Behave as if PyTorch (and anything under it) were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the NumPy-only test)", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
'''


@pytest.fixture
def no_torch_env(tmp_path: Path) -> dict[str, str]:
    """Environment variables for a Python in which ``import torch`` fails."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def test_setup_cell_runs_without_torch(no_torch_env):
    driver = textwrap.dedent(
        """
        import json, sys
        try:
            import torch  # noqa: F401
            blocked = False
        except ImportError:
            blocked = True
        namespace = {"get_ipython": lambda: None}
        exec(compile(sys.stdin.read(), "<chapter 1 setup>", "exec"), namespace)
        print(json.dumps({
            "blocked": blocked,
            "torch_loaded": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
            "self_check": callable(namespace.get("self_check")),
        }))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", driver],
        input=setup_source(CHAPTER),
        capture_output=True,
        text=True,
        env=no_torch_env,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, f"chapter 1's setup cell fails without PyTorch:\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["blocked"], "the import blocker did not stop `import torch`: the test proves nothing"
    assert report["torch_loaded"] == [], f"the setup cell imported {report['torch_loaded']}"
    assert report["self_check"], "the setup cell did not define self_check"


def test_with_torch_every_chapter_is_checked():
    """Where PyTorch is installed, importing the course imports every chapter's checks (none skipped)."""
    code = "import sys, autograder; print(sorted(m for m in sys.modules if m.startswith('autograder.checks.ch')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = (p.stem for p in (ROOT / "autograder" / "checks").glob("ch*.py"))
    expected = sorted(f"autograder.checks.{m}" for m in modules if m[2:].isdigit())
    assert result.stdout.strip() == str(expected)


@pytest.mark.slow
def test_whole_chapter_runs_without_torch(no_torch_env, tmp_path):
    """Every cell of chapter 1 (solutions filled in, as the book runs it) in a kernel without PyTorch."""
    import nbformat

    from autograder.book import _client
    from autograder.notebook_format import read, render

    nb = render(read(CHAPTER.notebook), CHAPTER, "book")
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import sys\nprint('torch modules:', sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
        )
    )
    _client(nb, tmp_path, timeout=300).execute(env=no_torch_env)
    problems = []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error" and "raises-exception" not in cell.metadata.get("tags", []):
                problems.append(f"cell {index}: {out.get('ename')}: {out.get('evalue')}")
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                problems.append(f"cell {index} wrote to stderr: {out.get('text', '')[:300]}")
    assert not problems, "chapter 1 does not run without PyTorch:\n" + "\n".join(problems)
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "torch modules: []" in last, last
