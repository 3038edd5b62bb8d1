"""``sync``: regenerate the exercise cells of ``chapters/`` from ``solutions/``."""

from __future__ import annotations

from autograder.course import CHAPTERS, Chapter
from autograder.notebook_format import clear_outputs, dumps, read, render


def expected_text(chapter: Chapter) -> str:
    """The exact file ``chapters/<slug>.ipynb`` should hold: student form, no outputs."""
    return dumps(clear_outputs(render(read(chapter.notebook), chapter, "student")))


def sync(check: bool = False, chapters: tuple[Chapter, ...] = CHAPTERS) -> list[str]:
    """Rewrite drifted notebooks (or, with ``check``, only report them). Returns the drifted names."""
    drifted = []
    for chapter in chapters:
        want = expected_text(chapter)
        if chapter.notebook.read_text() != want:
            drifted.append(chapter.notebook.name)
            if not check:
                chapter.notebook.write_text(want)
    return drifted
