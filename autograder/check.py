"""``check NOTEBOOK``: grade one notebook with the engine of ``grade``, through real nbgrader.

The notebook is copied into a temporary course directory with its own gradebook, so the
file given is never changed; it is graded by the same worker code as ``grade`` (sandboxed
where bubblewrap exists, trusted verdicts, the student's own hidden inputs), so a student's
self-check is the instructor's grade. ``CannotGrade`` means the notebook could not be graded
at all (the command then exits non-zero); failing tests are a normal result.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from autograder.checks.seeding import DEFAULT_COURSE_SEED
from autograder.course import CHAPTERS, Chapter, find_chapter
from autograder.notebook_format import grade_id

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
    flags: list[str] = field(default_factory=list)  # for the instructor; not part of the JSON contract

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("flags")
        return json.dumps(data, indent=2)

    def table(self) -> str:
        width = max([len(t.grade_id) for t in self.tests] + [4])
        rows = [f"{'test':<{width}}  {'points':>9}  message", f"{'-' * width}  {'-' * 9}  {'-' * 40}"]
        for t in self.tests:
            mark = "ok" if t.passed else (t.message.splitlines() or ["failed"])[0]
            rows.append(f"{t.grade_id:<{width}}  {t.points:>4g}/{t.max_points:<4g}  {mark}")
            for extra in t.message.splitlines()[1:] if not t.passed else []:
                rows.append(f"{'':<{width}}  {'':>9}  {extra}")
        rows.append(f"{'total':<{width}}  {self.score:>4g}/{self.max_score:<4g}")
        rows += [f"flagged for review: {f}" for f in self.flags]
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


def grade_batch(
    chapter: Chapter,
    submissions: dict[str, Path],
    cell_timeout: int = 60,
    sandbox: bool | None = None,
    hidden_seed: str = DEFAULT_COURSE_SEED,
    log=None,
) -> dict[str, Report]:
    """Grade several notebooks of one chapter with ``grade``'s engine, in a temporary course directory.

    ``submissions`` maps a student id to a notebook path; the files are copied, never changed.
    ``sandbox``: True requires bubblewrap, False runs unsandboxed, None (default) uses it where it
    is installed and says so where it is not. The hidden inputs are the student's own (their salt),
    exactly as ``grade`` draws them, so both give the same scores and messages.
    """
    from autograder.grade import prepare_course
    from autograder.grading.inputs import Submission, hash_files
    from autograder.grading.worker import Grader, Options
    from autograder.sandbox import Limits, Sandbox, SandboxUnavailable, activate, bwrap_path, require_sandbox

    log = log or (lambda *a: print(*a, file=sys.stderr))
    if sandbox is None:
        sandbox = bwrap_path() is not None
        if not sandbox:
            log(
                "note: bubblewrap is not installed, so this check runs your notebook without a sandbox (as your own "
                "user). The scores are the same; an instructor's `grade` runs it sandboxed."
            )
    elif sandbox:
        require_sandbox()
    reports = {}
    old_backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "agg"
    box = None
    with (
        tempfile.TemporaryDirectory(prefix="autograder-check-") as tmp,
        tempfile.TemporaryDirectory(prefix="ag-", dir="/tmp" if os.path.isdir("/tmp") else None) as run_root,
    ):
        course = Path(tmp)
        os.chmod(run_root, 0o755)
        limits = Limits(cell_timeout=cell_timeout)
        try:
            opts = Options(
                out=course,
                workers=1,
                sandbox=sandbox,
                limits=limits,
                run_root=Path(run_root),
                source_sha=prepare_course(course, [chapter.slug], hidden_seed),
                hidden_seed=hidden_seed,
            )
            if sandbox:
                try:
                    box = Sandbox(Path(run_root) / "w0", limits, 0, "auto").start()
                except SandboxUnavailable as exc:
                    raise CannotGrade(f"the sandbox cannot start here: {exc}") from None
                activate(box)
            grader = Grader(opts, box)
            for student, path in submissions.items():
                path = Path(path).resolve()
                sub = Submission(student, chapter.slug, str(path), files=[str(path)], sha256=hash_files([str(path)]))
                r = grader.grade(sub)
                if r["status"] == "ungradable":
                    raise CannotGrade(f"{path}: {r['message']}")
                if r["status"] != "graded":
                    raise CannotGrade(f"{path}: {r['message']}")
                tests = [TestResult(**t) for t in r["tests"]]
                reports[student] = Report(str(path), r["score"], r["max_score"], tests, flags=list(r.get("flags", [])))
        finally:
            if box is not None:
                box.close()
                activate(None)
            if old_backend is None:
                os.environ.pop("MPLBACKEND", None)
            else:
                os.environ["MPLBACKEND"] = old_backend
    return reports


def check(
    path: Path,
    chapter: str | None = None,
    cell_timeout: int = 60,
    student: str = STUDENT,
    hidden_seed: str = DEFAULT_COURSE_SEED,
    sandbox: bool | None = None,
) -> Report:
    """Grade one notebook as ``grade`` would grade it for ``student``; raise ``CannotGrade`` when it cannot be graded at all."""
    path = Path(path)
    nb = load_notebook(path)
    ch = identify_chapter(nb, path, chapter)
    return grade_batch(ch, {student: path}, cell_timeout, sandbox=sandbox, hidden_seed=hidden_seed)[student]
