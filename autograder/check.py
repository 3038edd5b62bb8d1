"""``check NOTEBOOK``: grade one notebook through real nbgrader autograding.

The notebook is copied into a temporary course directory with its own gradebook, so the
file given is never changed. ``CannotGrade`` means the notebook could not be graded at all
(the command then exits non-zero); failing tests are a normal result.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from autograder.course import CHAPTERS, Chapter, find_chapter
from autograder.nbgrader_config import nbgrader_api
from autograder.notebook_format import grade_id
from autograder.release import generate_assignment, write_source

STUDENT = "student"

# nbgrader 0.9.6 with SQLAlchemy 2.1 warns about autoflush on every autograde; harmless.
warnings.filterwarnings("ignore", message=".*not in session.*")


class CannotGrade(Exception):
    """The notebook cannot be graded at all (unreadable, not a notebook, wrong chapter)."""


@dataclass
class TestResult:
    grade_id: str
    points: float
    max_points: float
    passed: bool
    message: str


@dataclass
class Report:
    notebook: str
    score: float
    max_score: float
    tests: list[TestResult] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        width = max([len(t.grade_id) for t in self.tests] + [4])
        rows = [f"{'test':<{width}}  {'points':>9}  message", f"{'-' * width}  {'-' * 9}  {'-' * 40}"]
        for t in self.tests:
            mark = "ok" if t.passed else (t.message.splitlines() or ["failed"])[0]
            rows.append(f"{t.grade_id:<{width}}  {t.points:>4g}/{t.max_points:<4g}  {mark}")
            for extra in t.message.splitlines()[1:] if not t.passed else []:
                rows.append(f"{'':<{width}}  {'':>9}  {extra}")
        rows.append(f"{'total':<{width}}  {self.score:>4g}/{self.max_score:<4g}")
        return "\n".join(rows)


def load_notebook(path: Path) -> nbformat.NotebookNode:
    """Read and validate a notebook, or raise ``CannotGrade`` saying why."""
    if not path.exists():
        raise CannotGrade(f"{path}: no such file")
    if path.is_dir():
        raise CannotGrade(f"{path}: is a directory, not a notebook")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CannotGrade(f"{path}: cannot read the file ({exc})") from None
    if not text.strip():
        raise CannotGrade(f"{path}: the file is empty")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CannotGrade(f"{path}: not a notebook: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from None
    if not isinstance(raw, dict) or "cells" not in raw or "nbformat" not in raw:
        raise CannotGrade(f"{path}: not a notebook: the JSON has no 'cells' and 'nbformat' fields")
    try:
        nb = nbformat.reads(text, as_version=4)
        nbformat.validate(nb)
    except Exception as exc:  # noqa: BLE001  (nbformat raises several kinds)
        raise CannotGrade(f"{path}: not a valid notebook ({str(exc).splitlines()[0]})") from None
    return nb


def identify_chapter(nb: nbformat.NotebookNode, path: Path, chapter: str | None = None) -> Chapter:
    """The chapter a notebook belongs to, from its metadata, its exercises or its name."""
    ids = {grade_id(c) for c in nb.cells if grade_id(c)}
    by_exercises = [c for c in CHAPTERS if {e.name for e in c.exercises} & ids]
    meta = nb.metadata.get("course", {}).get("chapter")
    if chapter is not None:
        try:
            wanted = find_chapter(chapter)
        except ValueError as exc:
            raise CannotGrade(str(exc)) from None
        if by_exercises and wanted not in by_exercises:
            raise CannotGrade(
                f"{path}: wrong chapter: you asked for {wanted.slug}, but the notebook holds the exercises of "
                f"{', '.join(c.slug for c in by_exercises)}"
            )
        return wanted
    if meta:
        try:
            return find_chapter(meta)
        except ValueError:
            pass
    if len(by_exercises) == 1:
        return by_exercises[0]
    try:
        return find_chapter(path.stem)
    except ValueError:
        raise CannotGrade(
            f"{path}: wrong chapter: the notebook has no exercise cells of any chapter of this course "
            f"({', '.join(c.slug for c in CHAPTERS)}); pass --chapter if it was renamed"
        ) from None


def error_message(cell) -> str:
    """The student-facing message of a failed cell: the exception's type and text."""
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            name, value = out.get("ename", "Error"), out.get("evalue", "")
            if name == "AssertionError" or name.endswith("CheckFailure"):
                return value or "a check failed"
            return f"{name}: {value}" if value else name
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream" and out.get("name") == "stderr":
            return "the cell wrote to stderr: " + "".join(out.get("text", "")).strip()[:300]
    return ""


def results_from(autograded: Path, gradebook_scores: dict[str, tuple[float, float]]) -> list[TestResult]:
    """Join the gradebook's scores with the messages in the autograded notebook."""
    nb = nbformat.read(str(autograded), as_version=4)
    messages = {grade_id(c): error_message(c) for c in nb.cells if grade_id(c)}
    results = []
    for gid, (score, max_score) in gradebook_scores.items():
        passed = score >= max_score
        msg = "" if passed else (messages.get(gid) or "the test cell did not pass")
        results.append(TestResult(gid, score, max_score, passed, msg))
    return results


def gradebook_scores(course_dir: Path, assignment: str, student: str) -> dict[str, tuple[float, float]]:
    """``{grade_id: (score, max_score)}`` of a student's graded cells, in notebook order."""
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course_dir / 'gradebook.db'}") as gb:
        sub = gb.find_submission_notebook(assignment, assignment, student)
        order = {c.name: i for i, c in enumerate(gb.find_notebook(assignment, assignment).grade_cells)}
        grades = sorted(sub.grades, key=lambda g: order.get(g.name, 0))
        return {g.name: (float(g.score), float(g.max_score)) for g in grades}


def grade_batch(chapter: Chapter, submissions: dict[str, Path], cell_timeout: int = 60) -> dict[str, Report]:
    """Grade several notebooks of one chapter in one temporary course directory.

    ``submissions`` maps a student id to a notebook path; the files are copied, never changed.
    """
    reports = {}
    with tempfile.TemporaryDirectory(prefix="autograder-check-") as tmp:
        course = Path(tmp)
        write_source(chapter, course)
        generate_assignment(chapter, course)
        api = nbgrader_api(course, cell_timeout)
        for student, path in submissions.items():
            submitted = course / "submitted" / student / chapter.slug / f"{chapter.slug}.ipynb"
            submitted.parent.mkdir(parents=True)
            shutil.copyfile(path, submitted)
            result = api.autograde(chapter.slug, student, force=True, create=True)
            autograded = course / "autograded" / student / chapter.slug / f"{chapter.slug}.ipynb"
            if not result["success"] or not autograded.exists():
                detail = (result.get("error") or result.get("log") or "").strip().splitlines()[-5:]
                raise CannotGrade(f"{path}: nbgrader could not autograde it:\n  " + "\n  ".join(detail))
            tests = results_from(autograded, gradebook_scores(course, chapter.slug, student))
            reports[student] = Report(str(path), sum(t.points for t in tests), sum(t.max_points for t in tests), tests)
    return reports


def check(path: Path, chapter: str | None = None, cell_timeout: int = 60) -> Report:
    """Grade one notebook; raise ``CannotGrade`` when it cannot be graded at all."""
    path = Path(path)
    nb = load_notebook(path)
    ch = identify_chapter(nb, path, chapter)
    return grade_batch(ch, {STUDENT: path}, cell_timeout)[STUDENT]
