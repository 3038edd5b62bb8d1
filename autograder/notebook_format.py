"""Turn ``solutions/`` modules into notebook cells, in the three forms the course uses.

* ``student``: what ``chapters/`` and nbgrader's ``release/`` hold: solution regions
  replaced by ``# YOUR CODE HERE`` / ``raise NotImplementedError()``, hidden tests absent.
* ``source``: what nbgrader's ``source/`` holds: full solutions and hidden tests.
* ``book``: solutions filled in (to execute the book) but no hidden tests.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Literal

import nbformat

from autograder.course import Chapter, Exercise

Form = Literal["student", "source", "book"]

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
NBGRADER_SCHEMA = 3


def solution_sources(module_path: Path) -> dict[str, str]:
    """Source of every top-level function or class of a solutions module, decorators included."""
    text = module_path.read_text()
    lines = text.splitlines()
    sources = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            end = node.end_lineno  # comments after the last statement (### END SOLUTION) are not in the AST
            while end < len(lines) and (not lines[end].strip() or lines[end][:1].isspace()):
                end += 1
            sources[node.name] = "\n".join(lines[start - 1 : end]).rstrip()
    return sources


def strip_solutions(source: str) -> str:
    """Replace each solution region by the stub, indented like its BEGIN marker (nbgrader's rule)."""
    out, inside = [], False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN_SOLUTION:
            if inside:
                raise ValueError("nested ### BEGIN SOLUTION")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + stub for stub in CODE_STUB)
        elif stripped == END_SOLUTION:
            if not inside:
                raise ValueError("### END SOLUTION without ### BEGIN SOLUTION")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError("### BEGIN SOLUTION without ### END SOLUTION")
    return "\n".join(out)


def solution_lines(source: str) -> list[str]:
    """The non-trivial lines inside solution regions (used to prove they never leak)."""
    lines, inside = [], False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN_SOLUTION:
            inside = True
        elif stripped == END_SOLUTION:
            inside = False
        elif inside and len(stripped) > 12 and not stripped.startswith("#"):
            lines.append(stripped)
    return lines


def nbgrader_meta(grade_id: str, *, solution: bool = False, grade: bool = False, locked: bool = False, points: float = 0) -> dict:
    meta = {
        "grade": grade,
        "grade_id": grade_id,
        "locked": locked,
        "schema_version": NBGRADER_SCHEMA,
        "solution": solution,
        "task": False,
    }
    if grade:
        meta["points"] = points
    return meta


def _points(p: float) -> str:
    return f"{p:g} point{'' if p == 1 else 's'}"


def visible_test_source(ex: Exercise) -> str:
    return (
        f"# Visible tests for `{ex.name}` ({_points(ex.visible_points)}). Run this cell to check your work.\n"
        f"from {ex.checks_module} import visible_{ex.name}\n\n"
        f"visible_{ex.name}({ex.name})"
    )


def hidden_test_source(ex: Exercise, form: Form) -> str:
    head = f"# Hidden tests for `{ex.name}` ({_points(ex.hidden_points)}) run when your notebook is graded."
    if form != "source":
        return head
    return f"{head}\n{BEGIN_HIDDEN}\nfrom {ex.checks_module} import hidden_{ex.name}\n\nhidden_{ex.name}({ex.name})\n{END_HIDDEN}"


def _code_cell(source: str, meta: dict) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source)
    cell["id"] = meta["grade_id"]  # stable ids keep `sync --check` deterministic
    cell.metadata["nbgrader"] = meta
    cell.metadata["editable"] = not meta["locked"]
    cell.metadata["deletable"] = not (meta["locked"] or meta["solution"])
    return cell


def exercise_cells(ex: Exercise, solution_source: str, form: Form) -> list[nbformat.NotebookNode]:
    """The solution cell and the two test cells of one exercise, in the given form."""
    code = strip_solutions(solution_source) if form == "student" else solution_source
    return [
        _code_cell(code, nbgrader_meta(ex.name, solution=True)),
        _code_cell(visible_test_source(ex), nbgrader_meta(ex.visible_id, grade=True, locked=True, points=ex.visible_points)),
        _code_cell(hidden_test_source(ex, form), nbgrader_meta(ex.hidden_id, grade=True, locked=True, points=ex.hidden_points)),
    ]


def grade_id(cell) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def render(nb: nbformat.NotebookNode, chapter: Chapter, form: Form) -> nbformat.NotebookNode:
    """A copy of ``nb`` whose exercise and test cells are regenerated from ``solutions/``.

    Each exercise's three cells replace the exercise cell found in ``nb`` (and any test
    cells of it); a missing exercise cell is an error, since its place in the prose is
    the author's choice.
    """
    sources = solution_sources(chapter.solutions_module)
    nb = copy.deepcopy(nb)
    by_id = {grade_id(c): i for i, c in enumerate(nb.cells) if grade_id(c)}
    generated_ids = {gid for ex in chapter.exercises for gid in (ex.name, ex.visible_id, ex.hidden_id)}
    missing = [ex.name for ex in chapter.exercises if ex.name not in by_id]
    if missing:
        raise ValueError(f"{chapter.notebook.name} has no exercise cell for: {', '.join(missing)}")
    unknown = [ex.name for ex in chapter.exercises if ex.name not in sources]
    if unknown:
        raise ValueError(f"{chapter.solutions_module.name} defines no top-level {', '.join(unknown)}")
    new_cells = []
    for cell in nb.cells:
        gid = grade_id(cell)
        if gid in generated_ids and gid not in {ex.name for ex in chapter.exercises}:
            continue  # a test cell: regenerated next to its exercise
        if gid in {ex.name for ex in chapter.exercises}:
            ex = next(e for e in chapter.exercises if e.name == gid)
            new_cells.extend(exercise_cells(ex, sources[gid], form))
        else:
            new_cells.append(cell)
    nb.cells = new_cells
    nb.metadata.setdefault("course", {})["chapter"] = chapter.slug
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    return nb


def clear_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def dumps(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"
