"""In-process proofs: solutions pass, skeletons fail, every mutant is caught and named."""

from __future__ import annotations

import importlib

import pytest
from conftest import all_exercises, all_mutants, namespace

from autograder.checks.runner import run_check
from autograder.course import CHAPTERS
from autograder.mutants import mutants_of
from autograder.notebook_format import solution_sources


@pytest.mark.parametrize(("chapter", "exercise"), all_exercises())
@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
def test_solution_passes(chapter, exercise, hidden):
    outcome = run_check(exercise, namespace(chapter), hidden=hidden)
    assert outcome.passed, outcome.message


@pytest.mark.parametrize(("chapter", "exercise"), all_exercises())
@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
def test_skeleton_fails_and_says_so(chapter, exercise, hidden):
    outcome = run_check(exercise, namespace(chapter, skeleton=True), hidden=hidden)
    assert not outcome.passed
    assert "not implemented" in outcome.message


@pytest.mark.parametrize(("chapter", "mutant"), all_mutants())
def test_mutant_loses_points_and_is_named(chapter, mutant):
    ex = next(e for e in chapter.exercises if e.name == mutant.exercise)
    ns = namespace(chapter, replace={mutant.exercise: mutant.code})
    outcomes = [run_check(ex, ns, hidden=h) for h in (False, True)]
    failed = [o for o in outcomes if not o.passed]
    assert failed, f"mutant {mutant.id} passes every check of {ex.name}"
    messages = "\n".join(o.message for o in failed)
    assert mutant.diagnosis.lower() in messages.lower(), f"no diagnosis {mutant.diagnosis!r} in:\n{messages}"


def _templates():
    """(chapter, exercise) of every correct template a chapter's mutants are edited from (``TEMPLATES``)."""
    params = []
    for chapter in CHAPTERS:
        templates = getattr(importlib.import_module(chapter.mutants_module), "TEMPLATES", {})
        params += [pytest.param(chapter, name, id=f"{chapter.key}-{name}") for name in sorted(templates)]
    return params


@pytest.mark.parametrize(("chapter", "exercise"), _templates())
@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
def test_mutant_template_passes_every_check(chapter, exercise, hidden):
    """Each mutant is its template plus one mistake; the template itself must pass."""
    template = importlib.import_module(chapter.mutants_module).TEMPLATES[exercise]
    ex = next(e for e in chapter.exercises if e.name == exercise)
    outcome = run_check(ex, namespace(chapter, replace={exercise: template}), hidden=hidden)
    assert outcome.passed, outcome.message


@pytest.mark.parametrize("chapter", [pytest.param(c, id=c.key) for c, _ in {(p.values[0], 0) for p in all_exercises()}])
def test_catalogue_is_complete(chapter):
    """Every exercise has a solution, checks and at least three mutants."""
    sources = solution_sources(chapter.solutions_module)
    names = [m.exercise for m in mutants_of(chapter.key)]
    for ex in chapter.exercises:
        assert ex.name in sources, f"solutions/ lacks {ex.name}"
        assert names.count(ex.name) >= 3, f"{ex.name} has {names.count(ex.name)} mutants; at least 3 are required"
