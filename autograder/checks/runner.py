"""Run a chapter's checks on the objects in a namespace (the self-check, and the tests)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from autograder.checks.common import _namespace_var
from autograder.course import Chapter, Exercise, find_chapter


@dataclass
class Outcome:
    exercise: str
    hidden: bool
    passed: bool
    message: str


def run_check(ex: Exercise, namespace: dict, hidden: bool = False) -> Outcome:
    """Run the visible (or hidden) check of one exercise on ``namespace[ex.name]``."""
    module = importlib.import_module(ex.checks_module)
    check = getattr(module, f"{'hidden' if hidden else 'visible'}_{ex.name}")
    if ex.name not in namespace:
        return Outcome(ex.name, hidden, False, f"`{ex.name}` is not defined: run its cell first.")
    token = _namespace_var.set(namespace)  # lets a check name an earlier exercise a failure comes from
    try:
        check(namespace[ex.name])
    except AssertionError as exc:
        return Outcome(ex.name, hidden, False, str(exc))
    finally:
        _namespace_var.reset(token)
    return Outcome(ex.name, hidden, True, "")


def self_check(namespace: dict, chapter: str | int) -> bool:
    """Print one line per exercise of ``chapter`` (visible checks only); True if all pass."""
    ch: Chapter = find_chapter(f"{int(chapter):02d}" if str(chapter).isdigit() else str(chapter))
    import contextlib
    import io

    all_ok = True
    for ex in ch.exercises:
        with contextlib.redirect_stdout(io.StringIO()):
            outcome = run_check(ex, namespace)
        all_ok &= outcome.passed
        first = outcome.message.splitlines()[0] if outcome.message else ""
        print(f"{'PASS' if outcome.passed else 'FAIL'}  {ex.name}" + (f": {first}" if first else ""))
    print("All visible checks pass." if all_ok else "Some checks fail: run the exercise's test cell for details.")
    return all_ok
