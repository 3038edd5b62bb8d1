"""``release``: an nbgrader course directory with ``source/`` and ``release/`` for every chapter.

Both hold the prose in student form (``autograder.student_form``): nbgrader copies Markdown
cells from ``source/`` to ``release/`` unchanged, and students open ``release/`` in plain
JupyterLab, Colab or VS Code, which do not render MyST.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat

from autograder.course import CHAPTERS, Chapter
from autograder.nbgrader_config import nbgrader_api
from autograder.notebook_format import clear_outputs, read, render
from autograder.student_form import student_notebook


def write_source(chapter: Chapter, course_dir: Path) -> Path:
    """``source/<slug>/<slug>.ipynb``: solutions and hidden tests in place, prose in student form."""
    target = course_dir / "source" / chapter.slug / f"{chapter.slug}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    nb = clear_outputs(render(read(chapter.notebook), chapter, "source"))
    nbformat.write(student_notebook(nb, f"chapters/{chapter.slug}"), str(target))
    return target


def generate_assignment(chapter: Chapter, course_dir: Path) -> None:
    """Run ``nbgrader generate_assignment`` (fills the gradebook with the cells' checksums)."""
    result = nbgrader_api(course_dir).generate_assignment(chapter.slug, force=True, create=True)
    if not result["success"]:
        raise RuntimeError(f"nbgrader generate_assignment failed for {chapter.slug}:\n{result['error']}\n{result['log']}")


def release(out: Path, chapters: tuple[Chapter, ...] = CHAPTERS) -> Path:
    """Build (or rebuild) the course directory ``out``; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    for chapter in chapters:
        shutil.rmtree(out / "release" / chapter.slug, ignore_errors=True)
        write_source(chapter, out)
        generate_assignment(chapter, out)
    return out
