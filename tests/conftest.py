"""Shared fixtures: the chapters, and namespaces in which exercises run in process."""

from __future__ import annotations

import linecache
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from system_packages import pytest_unconfigure  # noqa: F401  (the run's last line: suites skipped for a system package)

from autograder.course import CHAPTERS, ROOT, Chapter
from autograder.mutants import mutants_of
from autograder.notebook_format import grade_id, read, solution_sources, strip_solutions

CHAPTER_IDS = [c.key for c in CHAPTERS]


def setup_source(chapter: Chapter) -> str:
    """The chapter's setup cell, as the kernel would run it (Colab install skipped)."""
    for cell in read(chapter.notebook).cells:
        if grade_id(cell) == "setup":
            return cell.source
    raise AssertionError(f"{chapter.notebook.name} has no setup cell")


def namespace(chapter: Chapter, replace: dict[str, str] | None = None, skeleton: bool = False) -> dict:
    """Globals of a notebook where every exercise holds the solution, except those in ``replace``."""
    ns: dict = {"get_ipython": lambda: None}
    exec(compile(setup_source(chapter), f"<{chapter.key} setup>", "exec"), ns)
    for name, source in solution_sources(chapter.solutions_module).items():
        code = (replace or {}).get(name, strip_solutions(source) if skeleton else source)
        exec(compile(code, _cell_file(chapter, name, code), "exec"), ns)
    return ns


def _cell_file(chapter: Chapter, name: str, code: str) -> str:
    """Register ``code`` in linecache, as IPython does for cells, so ``inspect.getsource`` works."""
    filename = f"<{chapter.key}-{name}-{abs(hash(code))}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    return filename


def all_mutants():
    return [pytest.param(c, m, id=f"{c.key}-{m.id}") for c in CHAPTERS for m in mutants_of(c.key)]


def all_exercises():
    return [pytest.param(c, e, id=f"{c.key}-{e.name}") for c in CHAPTERS for e in c.exercises]


@pytest.fixture(scope="session")
def built_book() -> Path:
    """``_build/html``, built once per session exactly as ``make book`` does (-W -n --keep-going)."""
    html = ROOT / "_build" / "html"
    if os.environ.get("BOOK_REUSE") == "1" and (html / "index.html").exists():
        return html
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "autograder", "book"], capture_output=True, text=True, cwd=ROOT)
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, f"the book does not build:\n{log}"
    warnings = [line for line in result.stderr.splitlines() if re.search(r"\bWARNING\b", line)]
    assert not warnings, "\n".join(warnings)  # kernels included: over IPC they print no transport warning
    print(f"book built in {time.perf_counter() - start:.0f} s")
    return html
