"""Catalogue of mutants: realistic wrong implementations of each exercise.

Each chapter module ``chNN.py`` holds ``MUTANTS``, a list of :class:`Mutant`. The tests
prove that every mutant loses points and that its failure message names the mistake.
"""

from __future__ import annotations

import importlib
import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    """A wrong version of one exercise.

    ``source`` defines ``exercise`` (a function or class) and may use the names the
    chapter's setup cell imports. ``diagnosis`` is a phrase that the failure message must
    contain (case-insensitive) when the checks recognise the mistake.
    """

    exercise: str
    name: str
    diagnosis: str
    source: str

    @property
    def code(self) -> str:
        return textwrap.dedent(self.source).strip() + "\n"

    @property
    def id(self) -> str:
        return f"{self.exercise}-{self.name}"


def edit(source: str, *pairs: tuple[str, str]) -> str:
    """``source`` with each ``old`` text replaced by ``new``, in turn; ValueError when an ``old`` does not occur.

    Mutants are mostly a correct template with one mistake edited in; the error catches a template
    that changed under its mutants.
    """
    for old, new in pairs:
        if old not in source:
            raise ValueError(f"mutant edit does not apply: {old!r}")
        source = source.replace(old, new)
    return source


def mutants_of(chapter_key: str) -> list[Mutant]:
    """All mutants of a chapter, e.g. ``mutants_of("ch01")``."""
    return list(importlib.import_module(f"autograder.mutants.{chapter_key}").MUTANTS)
