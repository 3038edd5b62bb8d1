"""The course's chapters and exercises, read from the check modules.

Adding a chapter means: a notebook in ``chapters/``, a module in ``solutions/``, a module
of checks ``autograder/checks/chNN.py`` with a ``POINTS`` table ``{exercise: (visible_points, hidden_points)}``, a module of mutants
``autograder/mutants/chNN.py``; the pipeline and the tests discover it.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS_DIR = ROOT / "chapters"
SOLUTIONS_DIR = ROOT / "solutions"


def _discover() -> tuple[str, ...]:
    """Chapters are the notebooks in ``chapters/`` that have a solutions module.

    An installed package (a student's ``pip install git+<repository>``) has no ``chapters/``
    beside it; there the installed solutions modules name the chapters, so ``self_check`` works.
    """
    if not CHAPTERS_DIR.is_dir():
        return tuple(sorted(p.stem[2:] for p in SOLUTIONS_DIR.glob("ch[0-9][0-9]_*.py")))
    return tuple(
        nb.stem for nb in sorted(CHAPTERS_DIR.glob("[0-9][0-9]_*.ipynb")) if (SOLUTIONS_DIR / f"ch{nb.stem}.py").exists()
    )


CHAPTER_SLUGS: tuple[str, ...] = _discover()


@dataclass(frozen=True)
class Exercise:
    """One graded exercise: a solution cell and its visible and hidden test cells."""

    chapter: str
    name: str
    visible_points: float
    hidden_points: float

    @property
    def visible_id(self) -> str:
        return f"test_{self.name}"

    @property
    def hidden_id(self) -> str:
        return f"hidden_{self.name}"

    @property
    def checks_module(self) -> str:
        return f"autograder.checks.ch{self.chapter[:2]}"


@dataclass(frozen=True)
class Chapter:
    slug: str

    @property
    def number(self) -> int:
        return int(self.slug[:2])

    @property
    def key(self) -> str:
        return f"ch{self.slug[:2]}"

    @property
    def notebook(self) -> Path:
        return CHAPTERS_DIR / f"{self.slug}.ipynb"

    @property
    def solutions_module(self) -> Path:
        return SOLUTIONS_DIR / f"ch{self.slug}.py"

    @property
    def checks_module(self) -> str:
        return f"autograder.checks.{self.key}"

    @property
    def mutants_module(self) -> str:
        return f"autograder.mutants.{self.key}"

    @cached_property
    def exercises(self) -> tuple[Exercise, ...]:
        points = importlib.import_module(self.checks_module).POINTS
        return tuple(Exercise(self.slug, name, v, h) for name, (v, h) in points.items())

    @property
    def max_score(self) -> float:
        return float(sum(e.visible_points + e.hidden_points for e in self.exercises))


CHAPTERS: tuple[Chapter, ...] = tuple(Chapter(slug) for slug in CHAPTER_SLUGS)


def find_chapter(name: str) -> Chapter:
    """A chapter by slug, number ('1', '01') or notebook path; ValueError if none matches."""
    stem = Path(name).stem
    for chapter in CHAPTERS:
        if stem == chapter.slug or (re.fullmatch(r"\d{1,2}", stem) and int(stem) == chapter.number):
            return chapter
    known = ", ".join(c.slug for c in CHAPTERS)
    raise ValueError(f"no chapter called {name!r}; the chapters are: {known}")
