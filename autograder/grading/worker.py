"""A grading worker: a long-lived process that grades the submissions it is sent, one by one.

Per submission: hash the submitted files; read and sanitize the notebook on a copy in
``sanitized/<student>/<assignment>/``; run nbgrader's autograde through the NbGraderAPI
(kernels in the worker's sandbox, :class:`~autograder.grading.execute.SandboxedExecute`
instead of nbgrader's Execute); read the scores back from the gradebook and the messages
from the autograded notebook; write the feedback page; hash the submitted files again;
write the result file last (its presence marks the submission as graded, for resuming).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autograder.checks.seeding import DEFAULT_COURSE_SEED, ENV, set_salt, student_salt
from autograder.course import find_chapter
from autograder.grading.inputs import Submission, hash_files
from autograder.sandbox import Limits

RESULTS_DIR = Path(".grading") / "results"


@dataclass
class Options:
    out: Path
    workers: int = 2
    sandbox: bool = True
    kernel_start: str = "auto"
    limits: Limits = field(default_factory=Limits)
    max_notebook_mb: int = 100
    run_root: Path = Path("/tmp")
    source_sha: dict = field(default_factory=dict)
    figures: bool = False
    hidden_seed: str = DEFAULT_COURSE_SEED
    trusted: bool = True  # verdicts from this process (False: every test runs in the kernel, as before)
    db: str = ""  # the gradebook's SQLAlchemy URL; "" = sqlite:///OUT/gradebook.db
    attempts: int = 3  # tries per submission when the worker grading it dies (the last death marks it "crashed")

    @property
    def db_url(self) -> str:
        from autograder.grading.gradebook import db_url

        return db_url(self.out, self.db or None)


def result_path(out: Path, assignment: str, student: str) -> Path:
    return Path(out) / RESULTS_DIR / assignment / f"{student}.json"


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Grader:
    """Grades submissions into the course directory ``opts.out`` (one instance per worker)."""

    def __init__(self, opts: Options, sandbox=None):
        from autograder.grading.feedback import FeedbackWriter
        from autograder.grading.gradebook import configure_sqlite

        configure_sqlite()
        self.opts = opts
        self.out = Path(opts.out).resolve()
        self.sandbox = sandbox
        self.db_url = opts.db_url
        self.feedback = FeedbackWriter(self.out, self.db_url)
        self._api = None
        self._release: dict = {}

    def api(self):
        if self._api is None:
            from nbconvert.preprocessors import ClearMetadataPreprocessor
            from nbgrader.apps import NbGraderAPI
            from nbgrader.coursedir import CourseDirectory
            from nbgrader.preprocessors import (
                AssignLatePenalties,
                CheckCellMetadata,
                IgnorePattern,
                LimitOutput,
                SaveAutoGrades,
            )

            from autograder.grading import execute
            from autograder.nbgrader_config import nbgrader_config

            limits = self.opts.limits
            c = nbgrader_config(self.out, limits.cell_timeout)
            c.CourseDirectory.submitted_directory = "sanitized"
            c.CourseDirectory.db_url = self.db_url
            c.Autograde.autograde_preprocessors = [
                execute.SandboxedExecute,
                IgnorePattern,
                ClearMetadataPreprocessor,
                LimitOutput,
                SaveAutoGrades,
                AssignLatePenalties,
                CheckCellMetadata,
            ]
            c.Execute.startup_timeout = 120
            c.Execute.iopub_timeout = 5
            c.SandboxedExecute.output_limit_kb = limits.output_kb
            c.SandboxedExecute.memory_mb = limits.memory_mb if self.sandbox else 0
            c.SandboxedExecute.processes = limits.processes if self.sandbox else 0
            c.Application.log_level = "ERROR"
            if self.sandbox is not None:
                from autograder.sandbox import kernel_manager_class

                execute.KERNEL_MANAGER_CLASS = kernel_manager_class()
            self._api = NbGraderAPI(CourseDirectory(config=c), config=c)
        return self._api

    def release(self, assignment: str):
        import nbformat

        if assignment not in self._release:
            path = self.out / "release" / assignment / f"{assignment}.ipynb"
            self._release[assignment] = nbformat.read(str(path), as_version=4)
        return self._release[assignment]

    # ---------------------------------------------------------------------------------

    def grade(self, sub: Submission) -> dict:
        start = time.monotonic()
        chapter = find_chapter(sub.assignment)
        result = {
            "student": sub.student,
            "assignment": sub.assignment,
            "status": "graded",
            "score": 0.0,
            "max_score": chapter.max_score,
            "tests": [],
            "notes": list(sub.notes),
            "events": [],
            "flags": [],
            "message": "",
            "input_sha": sub.sha256,
            "source_sha": self.opts.source_sha.get(sub.assignment, ""),
            "files": sub.files,
            "unchanged": True,
            "mode": self.sandbox.mode if self.sandbox else "no sandbox",
        }
        before = hash_files(sub.files)
        try:
            self._grade(sub, chapter, result)
        except Exception:  # noqa: BLE001  (one submission never stops the batch)
            result.update(
                status="error", message="the grader failed on this submission: " + traceback.format_exc(limit=3)[-1500:]
            )
        after = hash_files(sub.files)
        result["unchanged"] = before == after == (sub.sha256 or before)
        if not result["unchanged"]:
            result["notes"].append("INTEGRITY: the submitted files changed while they were graded")
        result["seconds"] = round(time.monotonic() - start, 2)
        if result["status"] != "error":
            write_json_atomic(result_path(self.out, sub.assignment, sub.student), result)
        return result

    def _grade(self, sub: Submission, chapter, result: dict) -> None:
        from autograder.check import results_from
        from autograder.grading import execute
        from autograder.grading.gradebook import record_zero, scores
        from autograder.grading.sanitize import read_submission, sanitize, suspicious

        out = self.out
        sdir = out / "sanitized" / sub.student / sub.assignment
        autograded = out / "autograded" / sub.student / sub.assignment
        shutil.rmtree(sdir, ignore_errors=True)
        sdir.mkdir(parents=True)
        self._copy_folder(sub, sdir, result)

        problem = None
        if sub.notebook is None:
            problem = "no notebook was submitted for this chapter"
        else:
            nb, notes, problem = read_submission(Path(sub.notebook), self.opts.max_notebook_mb)
            result["notes"] += notes
            if nb is not None:
                ids = {c.get("metadata", {}).get("nbgrader", {}).get("grade_id") for c in nb.cells}
                others = [ch.slug for ch in _chapters() if ch.slug != sub.assignment and {e.name for e in ch.exercises} & ids]
                if others and not {e.name for e in chapter.exercises} & ids:
                    problem = f"wrong chapter: this notebook holds the exercises of {', '.join(others)}, not {sub.assignment}"
                else:
                    clean, notes = sanitize(nb, self.release(sub.assignment))
                    result["notes"] += notes
                    result["flags"] = suspicious(clean, self.release(sub.assignment))
                    import nbformat

                    nbformat.write(clean, str(sdir / f"{sub.assignment}.ipynb"))
        if problem:
            shutil.rmtree(autograded, ignore_errors=True)
            record_zero(out, sub.assignment, sub.student, self.db_url)
            result.update(status="ungradable", message=problem, score=0.0)
            self.feedback.write(result, None)
            return

        result["hidden_salt"] = self.use_salt(sub.student, chapter)
        execute.JUDGE = execute.JudgeContext(chapter, self.release(sub.assignment)) if self.opts.trusted else None
        try:
            reply = self.api().autograde(sub.assignment, sub.student, force=True, create=True)
        finally:
            judge, execute.JUDGE = execute.JUDGE, None
            set_salt(None)
        result["events"] = list(execute.EVENTS)
        if judge is not None:
            result["flags"] = list(result.get("flags", [])) + judge.flags
        from autograder.grading.judge import is_trusted

        in_kernel = [ex.name for ex in chapter.exercises if not (self.opts.trusted and is_trusted(ex))]
        if in_kernel and result.get("flags"):
            result["flags"].append(
                f"in-kernel verdicts: the checks of {', '.join(in_kernel)} ran in the student's kernel, "
                "where the flagged code could have changed them"
            )
        graded_nb = autograded / f"{sub.assignment}.ipynb"
        if not reply["success"] or not graded_nb.exists():
            log = (reply.get("error") or "") + "\n" + (reply.get("log") or "")
            tail = [ln for ln in log.strip().splitlines() if ln.strip()][-6:]
            result.update(status="error", message="nbgrader could not autograde it: " + " | ".join(tail))
            return
        tests = results_from(graded_nb, scores(self.db_url, sub.assignment, sub.student))
        result["tests"] = [asdict(t) for t in tests]
        result["score"] = float(sum(t.points for t in tests))
        result["max_score"] = float(sum(t.max_points for t in tests)) or chapter.max_score
        with warnings.catch_warnings():  # nbconvert warns about outputs it cannot show (glue's records)
            warnings.simplefilter("ignore")
            self.feedback.write(result, graded_nb)

    def use_salt(self, student: str, chapter) -> str:
        """Draw ``student``'s hidden inputs: the judge (this process) uses the salt; returns it.

        The salt reaches the kernel only for a chapter whose checks still run there (see
        :data:`autograder.grading.judge.TRUSTED_CHAPTERS`); a trusted chapter's kernel never sees it.
        """
        from autograder.grading.judge import is_trusted

        salt = student_salt(student, self.opts.hidden_seed)
        set_salt(salt)
        in_kernel = not self.opts.trusted or not all(is_trusted(ex) for ex in chapter.exercises)
        extra = {ENV: salt} if in_kernel else {}
        if self.sandbox is not None:
            self.sandbox.kernel_extra = extra
        elif in_kernel:  # unsandboxed kernels inherit the worker's environment
            os.environ[ENV] = salt
        else:
            os.environ.pop(ENV, None)
        return salt

    def _copy_folder(self, sub: Submission, sdir: Path, result: dict) -> None:
        """The other files of an nbgrader submission folder (data the notebook reads), without links."""
        if sub.folder is None:
            return
        skipped = []
        budget = self.opts.limits.copy_mb * 1024 * 1024
        for name in sub.files:
            src = Path(name)
            rel = src.relative_to(sub.folder)
            if src.suffix == ".ipynb" and str(src) != sub.notebook:
                continue
            if src.is_symlink() or not src.is_file():
                skipped.append(f"{rel} (a link)")
                continue
            if str(src) == sub.notebook:
                continue
            size = src.stat().st_size
            if size > budget:
                skipped.append(f"{rel} (too large)")
                continue
            budget -= size
            if rel.name == "timestamp.txt" and rel.parent == Path("."):
                if not _valid_timestamp(src):
                    result["notes"].append("timestamp.txt is not a valid timestamp; it was ignored")
                    continue
            target = sdir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        if skipped:
            result["notes"].append("not copied for grading: " + ", ".join(skipped))


def _valid_timestamp(path: Path) -> bool:
    try:
        from nbgrader.utils import parse_utc

        parse_utc(path.read_text()[:200].strip())
        return True
    except Exception:  # noqa: BLE001
        return False


def _chapters():
    from autograder.course import CHAPTERS

    return CHAPTERS


def worker_main(index: int, opts: Options, conn) -> None:
    """Entry point of a worker process: grade what ``conn`` sends until it sends None."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    sandbox = None
    if not opts.figures:
        os.environ["MPLBACKEND"] = "agg"  # unsandboxed kernels inherit the worker's environment
    try:  # the judge's references are small; the cores are the kernels'
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        if opts.sandbox:
            from autograder.sandbox import Sandbox, SandboxUnavailable, activate

            try:
                root = Path(opts.run_root) / f"w{index}"
                sandbox = Sandbox(root, opts.limits, index, opts.kernel_start, figures=opts.figures).start()
            except SandboxUnavailable as exc:
                conn.send(("fatal", index, str(exc)))
                return
            activate(sandbox)
        grader = Grader(opts, sandbox)
        conn.send(("ready", index, sandbox.mode if sandbox else "no sandbox", sandbox.fallback_reason if sandbox else ""))
        while True:
            try:
                sub = conn.recv()
            except EOFError:
                break
            if sub is None:
                break
            conn.send(("done", index, grader.grade(sub)))
    finally:
        if sandbox is not None:
            sandbox.close()
        conn.close()
