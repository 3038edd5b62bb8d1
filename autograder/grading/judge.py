"""Trusted verdicts: run an exercise's checks in the grader's process on the student's objects.

The student's kernel only answers calls (:mod:`autograder.grading.agent`); this module holds
the checks, draws the hidden inputs (with the student's salt, which never enters the kernel),
computes the references, compares, and writes the test cell's output: the checks' success
line when they pass, the failure message as an error when they do not. nbgrader then scores
that output as usual, so its gradebook records the trusted verdict.

Before anything is called, the exercise cell's own source (read from the notebook file, not
from the kernel) is compared with the released skeleton: an exercise whose cell is still the
skeleton scores 0 as "not implemented", whatever the kernel would answer. That closes every
attack that leaves the exercise blank and makes another cell answer for it.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
from dataclasses import dataclass, field

from autograder.course import Chapter, Exercise
from autograder.grading.remote import Remote, RemoteCallError, is_remote

# Chapters whose checks run here against stand-ins for the kernel's objects (RemoteObject): every chapter
# of this edition. A new chapter's checks must be written for it (see docs/authoring.md, "Checks and the
# trust boundary") before it joins; until then its tests run in the kernel and its grades say so.
TRUSTED_CHAPTERS = {"ch01", "ch02", "ch03", "ch04", "ch05", "ch06", "ch07", "ch08", "ch09", "ch10"}


def is_trusted(ex: Exercise) -> bool:
    return f"ch{ex.chapter[:2]}" in TRUSTED_CHAPTERS


@dataclass
class Verdict:
    passed: bool
    message: str
    stdout: str = ""
    flags: list[str] = field(default_factory=list)


# -- what the notebook file says ------------------------------------------------------------


def _definition(source: str, name: str):
    """The top-level ``def``/``class`` called ``name`` in ``source`` (the last one), or None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    found = None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            found = node
    return found


def _is_stub(fn) -> bool:
    """A function whose body is only a docstring and ``raise NotImplementedError(...)``."""
    body = list(fn.body)
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    exc = body[0].exc
    target = exc.func if isinstance(exc, ast.Call) else exc
    return isinstance(target, ast.Name) and target.id == "NotImplementedError"


def _stubs(node) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {node.name} if _is_stub(node) else set()
    return {
        f"{node.name}.{item.name}"
        for item in node.body
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_stub(item)
    }


@dataclass
class CellFacts:
    """What the trusted side knows of one exercise from the notebook file alone.

    ``source`` is the exercise's definition as written in its cell (the checks that read code,
    such as "no Python loop", read this, never the kernel's idea of it)."""

    source: str
    defined: bool
    unimplemented: bool
    stubs: set[str]


def cell_facts(nb, skeleton, name: str) -> CellFacts:
    """Read the exercise cell ``name`` of ``nb`` against the released skeleton ``skeleton``."""
    cell = next((c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == name), None)
    source = cell.source if cell is not None else ""
    skel_cell = next((c for c in skeleton.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == name), None)
    node = _definition(source, name)
    skel_node = _definition(skel_cell.source, name) if skel_cell is not None else None
    skel_stubs = _stubs(skel_node) if skel_node is not None else set()
    stubs = _stubs(node) & skel_stubs if node is not None else set()
    if node is None:
        unimplemented = False  # defined elsewhere, or not at all: the kernel's answer decides, and it is flagged
    elif isinstance(node, ast.ClassDef):
        unimplemented = bool(skel_stubs) and stubs == skel_stubs
    else:
        unimplemented = bool(stubs)
    text = (ast.get_source_segment(source, node, padded=False) or "") if node is not None else ""
    return CellFacts(text, node is not None, unimplemented, stubs)


# -- running a check ------------------------------------------------------------------------


def run_remote_check(ex: Exercise, remote: Remote, facts: CellFacts, hidden: bool) -> Verdict:
    """Run the visible or hidden check of ``ex`` here, on the kernel's object of that name."""
    from autograder.checks.common import CheckFailure

    flags: list[str] = []
    if facts.unimplemented:
        return Verdict(False, f"{ex.name}: not implemented yet (its cell still raises NotImplementedError).")
    module = importlib.import_module(ex.checks_module)
    check = getattr(module, f"{'hidden' if hidden else 'visible'}_{ex.name}")
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), remote:
            try:
                obj = remote.lookup(ex.name, facts.source)
            except NameError:
                return Verdict(False, f"`{ex.name}` is not defined: run its cell first.")
            check(obj)
    except CheckFailure as exc:
        return Verdict(False, str(exc), buf.getvalue(), flags)
    except RemoteCallError as exc:
        return Verdict(False, f"{ex.name}: the grader could not run your code: {exc}", buf.getvalue(), flags)
    except AssertionError as exc:  # a check's own assertion (never raised by the kernel: see remote)
        return Verdict(False, str(exc) or f"{ex.name}: a check failed", buf.getvalue(), flags)
    except Exception as exc:  # noqa: BLE001  (student code reached through a stand-in, outside call())
        return Verdict(False, f"{ex.name}: {type(exc).__name__}: {exc}", buf.getvalue(), flags)
    finally:
        with contextlib.suppress(Exception):
            remote.reset()
    if not facts.defined:
        flags.append(f"{ex.name}: passed, but its cell does not define it (defined in another cell)")
    elif facts.stubs:
        flags.append(f"{ex.name}: passed, but {', '.join(sorted(facts.stubs))} in its cell still raise NotImplementedError")
    return Verdict(True, "", buf.getvalue(), flags)


def exercise_of(chapter: Chapter, grade_id: str) -> tuple[Exercise, bool] | None:
    """(exercise, hidden) of a test cell's grade id, or None."""
    for ex in chapter.exercises:
        if grade_id == ex.visible_id:
            return ex, False
        if grade_id == ex.hidden_id:
            return ex, True
    return None


def source_of(obj) -> str | None:
    """The source the checks may read of a student object: the cell as the judge read it."""
    if is_remote(obj):
        from autograder.grading.remote import remote_source

        return remote_source(obj)
    return None
