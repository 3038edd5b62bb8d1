"""``sync``: regenerate the exercise cells of ``chapters/`` from ``solutions/``, and ``student/`` from ``chapters/``.

``chapters/<name>.ipynb`` is the book's source, in full MyST. ``student/<name>.ipynb`` is its
generated student copy (``autograder.student_form``): the same cells, with the prose in plain
Markdown that JupyterLab, Colab and VS Code render. The book's Colab, Binder and download
buttons point to it. Neither is edited by hand; ``sync --check`` reports every file that
differs from what ``sync`` would write.
"""

from __future__ import annotations

from pathlib import Path

from autograder.course import CHAPTERS, CHAPTERS_DIR, ROOT, Chapter
from autograder.notebook_format import clear_outputs, dumps, read, render
from autograder.student_form import STUDENT_DIR, book_index, student_notebook


def expected_text(chapter: Chapter) -> str:
    """The exact file ``chapters/<slug>.ipynb`` should hold: student form, no outputs."""
    return dumps(clear_outputs(render(read(chapter.notebook), chapter, "student")))


def student_text(source_text: str, page: str) -> str:
    """The exact student copy of a notebook whose ``chapters/`` file holds ``source_text``."""
    import nbformat

    nb = clear_outputs(nbformat.reads(source_text, as_version=4))
    nb = student_notebook(nb, page, book_index())
    nb.metadata.setdefault("course", {})["generated_from"] = f"{page}.ipynb (run `python -m autograder sync`; do not edit)"
    return dumps(nb)


def student_path(notebook: Path) -> Path:
    return STUDENT_DIR / notebook.name


def sync(check: bool = False, chapters: tuple[Chapter, ...] = CHAPTERS) -> list[str]:
    """Rewrite drifted notebooks (or, with ``check``, only report them). Returns the drifted paths.

    Every chapter in ``chapters`` and, when all chapters are synced, every other notebook of
    ``chapters/`` (the appendices) gets its student copy in ``student/``.
    """
    drifted = []
    sources: dict[Path, str] = {}
    for chapter in chapters:
        want = expected_text(chapter)
        if chapter.notebook.read_text() != want:
            drifted.append(str(chapter.notebook.relative_to(ROOT)))
            if not check:
                chapter.notebook.write_text(want)
        sources[chapter.notebook] = want
    if chapters == CHAPTERS:
        for path in sorted(CHAPTERS_DIR.glob("*.ipynb")):
            sources.setdefault(path, path.read_text())
        expected = {student_path(p) for p in sources}
        for stale in sorted(set(STUDENT_DIR.glob("*.ipynb")) - expected):
            drifted.append(str(stale.relative_to(ROOT)))
            if not check:
                stale.unlink()
    for path, text in sources.items():
        target = student_path(path)
        want = student_text(text, f"chapters/{path.stem}")
        if not target.exists() or target.read_text() != want:
            drifted.append(str(target.relative_to(ROOT)))
            if not check:
                target.parent.mkdir(exist_ok=True)
                target.write_text(want)
    return drifted
