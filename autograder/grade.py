"""``grade SUBMISSIONS``: autograde a class with real nbgrader, sandboxed, in parallel, resumably.

The course directory ``--out`` (default ``./graded``) is an nbgrader course directory::

    gradebook.db                      nbgrader's gradebook (SQLite, WAL mode)
    source/<chapter>/, release/<chapter>/    what `release` builds (hidden tests in source/ only)
    sanitized/<student>/<chapter>/    the repaired copies nbgrader grades (never the submitted files)
    autograded/<student>/<chapter>/   nbgrader's executed notebooks
    feedback/<student>/<chapter>/<chapter>.html   one page per student, hidden test code removed
    grades.csv                        nbgrader's export columns + points per exercise + status
    .grading/results/<chapter>/<student>.json     per-submission results (marks them done)

Workers are long-lived processes, one per core by default; each takes one submission at a
time (so no two workers ever grade the same student) and drives nbgrader's API in-process,
with kernels in its own sandbox (:mod:`autograder.sandbox`). A submission is done when its
result file exists; a rerun grades only what is not done (or whose files or chapter source
changed), ``--force`` regrades everything. Killed at any point, the gradebook stays
consistent (every write is one SQLite transaction) and the rerun picks up where it stopped.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

from autograder.checks.seeding import DEFAULT_COURSE_SEED
from autograder.course import find_chapter
from autograder.grading.inputs import DEFAULT_PATTERN, Submission, discover, hash_files
from autograder.grading.worker import Options, result_path, worker_main, write_json_atomic
from autograder.sandbox import Limits, SandboxUnavailable, require_sandbox

STATE = Path(".grading") / "state.json"


# -- the course directory --------------------------------------------------------------


def prepare_course(out: Path, slugs: list[str], hidden_seed: str = DEFAULT_COURSE_SEED) -> dict[str, str]:
    """Write ``source/`` and run ``generate_assignment`` for chapters whose source changed; WAL on."""
    from autograder.grading.gradebook import configure_sqlite, enable_wal
    from autograder.release import generate_assignment, write_source

    configure_sqlite()
    state_file = out / STATE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    shas = {}
    for slug in slugs:
        chapter = find_chapter(slug)
        path = write_source(chapter, out)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        released = out / "release" / slug / f"{slug}.ipynb"
        if state.get(slug) != sha or not released.exists() or not (out / "gradebook.db").exists():
            generate_assignment(chapter, out)
            state[slug] = sha
            write_json_atomic(state_file, state)
        shas[slug] = grading_sha(chapter, path, hidden_seed)
    enable_wal(out / "gradebook.db")
    return shas


def grading_sha(chapter, source: Path, hidden_seed: str = DEFAULT_COURSE_SEED) -> str:
    """What a chapter's grades depend on: its test and locked cells, its checks' and the judge's code, the hidden seed.

    Prose edits do not invalidate earlier grades; a changed test, setup cell, check or
    ``--hidden-seed`` does.
    """
    import importlib

    import nbformat

    h = hashlib.sha256()
    h.update(json.dumps(["hidden-seed", hidden_seed]).encode())
    nb = nbformat.read(str(source), as_version=4)
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("grade") or meta.get("locked"):
            h.update(json.dumps([meta.get("grade_id"), meta.get("points"), cell.source]).encode())
    for module in (
        chapter.checks_module,
        "autograder.checks.common",
        "autograder.checks.trusted",
        "autograder.checks.torch_refs",
        "autograder.checks.seeding",
        "autograder.checks",  # its __init__ wraps the hidden checks with the per-student seeds
        "autograder.checks.objects",
        "autograder.grading.judge",  # the trusted side of a verdict, and what crosses to the kernel
        "autograder.grading.remote",
        "autograder.grading.wire",
        "autograder.grading.agent",
    ):
        h.update(Path(importlib.import_module(module).__file__).read_bytes())
    return h.hexdigest()


def graded_pairs(out: Path) -> set[tuple[str, str]]:
    """(assignment, student) pairs whose every grade cell has a score in the gradebook."""
    import sqlite3

    db = out / "gradebook.db"
    if not db.exists():
        return set()
    con = sqlite3.connect(str(db), timeout=60)
    try:
        rows = con.execute(
            """SELECT a.name, sa.student_id,
                      SUM(CASE WHEN g.auto_score IS NULL AND g.manual_score IS NULL THEN 1 ELSE 0 END), COUNT(g.id)
               FROM submitted_assignment sa JOIN assignment a ON sa.assignment_id = a.id
               JOIN submitted_notebook sn ON sn.assignment_id = sa.id
               JOIN grade g ON g.notebook_id = sn.id
               GROUP BY a.name, sa.student_id"""
        ).fetchall()
    finally:
        con.close()
    return {(a, s) for a, s, missing, count in rows if missing == 0 and count > 0}


def load_result(out: Path, sub: Submission) -> dict | None:
    path = result_path(out, sub.assignment, sub.student)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_done(out: Path, sub: Submission, source_sha: str, pairs: set) -> bool:
    r = load_result(out, sub)
    if r is None or r.get("status") not in ("graded", "ungradable"):
        return False
    if r.get("input_sha") != sub.sha256 or r.get("source_sha") != source_sha:
        return False
    if (sub.assignment, sub.student) not in pairs:
        return False
    feedback = out / "feedback" / sub.student / sub.assignment / f"{sub.assignment}.html"
    autograded = out / "autograded" / sub.student / sub.assignment / f"{sub.assignment}.ipynb"
    return feedback.exists() and (r["status"] == "ungradable" or autograded.exists())


# -- running the workers ---------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (a line every few seconds when stderr is not a terminal)."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.done, self.failed = total, 0, 0
        self.start = time.monotonic()
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def update(self, result: dict | None = None, force: bool = False) -> None:
        if result is None and not self.tty and not force and time.monotonic() - self._last < 10:
            return
        if result is not None:
            self.done += 1
            self.failed += result.get("status") != "graded" or result.get("score", 0) < result.get("max_score", 0)
        if self.quiet:
            return
        now = time.monotonic()
        if not force and now - self._last < (0.5 if self.tty else 5) and result is None:
            return
        if not force and not self.tty and result is not None and now - self._last < 5 and self.done < self.total:
            return
        self._last = now
        elapsed = now - self.start
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0
        line = (
            f"grading [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}  "
            f"not full marks: {self.failed}  {_clock(elapsed)} elapsed" + (f", ~{_clock(eta)} left" if self.done else "")
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and not self.quiet:
            print(file=sys.stderr)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def _crash_result(sub: Submission, opts: Options, why: str) -> dict:
    return {
        "student": sub.student,
        "assignment": sub.assignment,
        "status": "error",
        "score": 0.0,
        "max_score": find_chapter(sub.assignment).max_score,
        "tests": [],
        "notes": list(sub.notes),
        "events": [],
        "message": why,
        "input_sha": sub.sha256,
        "source_sha": opts.source_sha.get(sub.assignment, ""),
        "unchanged": hash_files(sub.files) == sub.sha256,
    }


def run_workers(pending: list[Submission], opts: Options, progress: Progress, notebook_timeout: int, log=print) -> dict:
    """Grade ``pending`` with ``opts.workers`` processes; returns {key: result}."""
    ctx = mp.get_context("fork")
    queue = list(pending)
    results: dict[str, dict] = {}
    workers: dict[int, tuple] = {}  # index -> (process, conn)
    busy: dict[int, tuple[Submission, float]] = {}
    modes: set[str] = set()

    def spawn(i: int) -> None:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(i, opts, child), daemon=True, name=f"grader-{i}")
        proc.start()
        child.close()
        workers[i] = (proc, parent)

    def feed(i: int) -> None:
        conn = workers[i][1]
        if queue:
            sub = queue.pop(0)
            busy[i] = (sub, time.monotonic())
            conn.send(sub)
        else:
            conn.send(None)

    def retire(i: int, why: str) -> None:
        proc, conn = workers.pop(i)
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        conn.close()
        if i in busy:
            sub, _ = busy.pop(i)
            results[sub.key] = _crash_result(sub, opts, why)
            progress.update(results[sub.key])
        if queue:
            spawn(i)

    for i in range(min(opts.workers, len(queue))):
        spawn(i)
    closing: dict[int, float] = {}  # workers sent None: index -> when
    try:
        while workers:
            conns = {workers[i][1]: i for i in workers if i not in closing}
            sentinels = {workers[i][0].sentinel: i for i in workers}
            for obj in wait(list(conns) + list(sentinels), timeout=1.0):
                if obj in conns:
                    i = conns[obj]
                    if i not in workers or i in closing:
                        continue
                    try:
                        msg = obj.recv()
                    except (EOFError, OSError):
                        closing.setdefault(i, time.monotonic())
                        continue
                    kind = msg[0]
                    if kind == "fatal":
                        raise SandboxUnavailable(msg[2])
                    if kind == "ready":
                        modes.add(msg[2])
                        if msg[3]:
                            log(f"worker {i}: kernels start in a fresh sandbox each ({msg[3]})")
                    elif kind == "done":
                        sub, _ = busy.pop(i)
                        results[sub.key] = msg[2]
                        progress.update(msg[2])
                    feed(i)
                    if i not in busy:
                        closing[i] = time.monotonic()
                elif obj in sentinels:
                    i = sentinels[obj]
                    if i in workers and not workers[i][0].is_alive():
                        if i in busy:
                            code = workers[i][0].exitcode
                            retire(i, f"the grading worker crashed (exit code {code}) on this submission; rerun to retry it")
                        else:
                            proc, conn = workers.pop(i)
                            conn.close()
                        closing.pop(i, None)
            now = time.monotonic()
            for i, (_sub, started) in list(busy.items()):
                if now - started > notebook_timeout:
                    retire(i, f"grading took longer than {notebook_timeout} s; the grader stopped it (rerun to retry)")
            for i, since in list(closing.items()):
                if i in workers and now - since > 20:  # a worker that does not exit after its last task
                    proc, conn = workers.pop(i)
                    proc.kill()
                    proc.join(5)
                    conn.close()
                    closing.pop(i)
            progress.update()
    finally:
        for proc, _conn in workers.values():
            if proc.is_alive():
                proc.kill()
            proc.join(5)
    opts.modes = modes  # type: ignore[attr-defined]
    return results


# -- reports ----------------------------------------------------------------------------


def write_csv(out: Path, results: dict[str, dict], assignments: list[str]) -> Path:
    """nbgrader's export columns for every student in the gradebook, points per exercise, status."""
    from nbgrader.api import Gradebook, MissingEntry

    from autograder.grading.gradebook import db_url

    chapters = [find_chapter(a) for a in assignments]
    exercises = [e for ch in chapters for e in ch.exercises]
    keys = [
        "assignment",
        "duedate",
        "timestamp",
        "student_id",
        "last_name",
        "first_name",
        "email",
        "raw_score",
        "late_submission_penalty",
        "score",
        "max_score",
    ]
    header = keys + [e.name for e in exercises] + ["status", "message", "flags"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    by_pair = {(r["assignment"], r["student"]): r for r in results.values()}
    with Gradebook(db_url(out)) as gb:
        for assignment in gb.assignments:
            if assignment.name not in assignments:
                continue
            for student in gb.students:
                row = {
                    "assignment": assignment.name,
                    "duedate": assignment.duedate or "",
                    "student_id": student.id,
                    "last_name": student.last_name or "",
                    "first_name": student.first_name or "",
                    "email": student.email or "",
                    "max_score": assignment.max_score,
                }
                per_ex = {}
                try:
                    sub = gb.find_submission(assignment.name, student.id)
                except MissingEntry:
                    row.update(timestamp="", raw_score=0.0, late_submission_penalty=0.0, score=0.0)
                else:
                    penalty = sub.late_submission_penalty or 0.0
                    row.update(
                        timestamp=sub.timestamp or "",
                        raw_score=sub.score,
                        late_submission_penalty=penalty,
                        score=max(0.0, sub.score - penalty),
                    )
                    for nb in sub.notebooks:
                        for g in nb.grades:
                            per_ex[g.name] = g.score
                r = by_pair.get((assignment.name, student.id), {})
                cells = [row.get(k, "") for k in keys]
                for e in exercises:
                    if e.chapter != assignment.name:
                        cells.append("")
                    else:
                        cells.append(f"{(per_ex.get(e.visible_id) or 0) + (per_ex.get(e.hidden_id) or 0):g}")
                message = r.get("message") or _first_problem(r)
                cells += [r.get("status", "graded" if per_ex else "no submission"), message, "; ".join(r.get("flags", []))]
                writer.writerow(cells)
    target = out / "grades.csv"
    tmp = target.with_suffix(".csv.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, target)
    return target


def _first_problem(r: dict) -> str:
    for t in r.get("tests", []):
        if not t["passed"]:
            return f"{t['grade_id']}: {(t['message'].splitlines() or [''])[0]}"[:200]
    return ""


def summary_table(results: list[dict]) -> str:
    rows = []
    for r in sorted(results, key=lambda r: (r["assignment"], r["student"])):
        score = f"{r['score']:g}/{r['max_score']:g}"
        if r["status"] == "graded":
            note = _first_problem(r) or "all tests passed"
            kinds = sorted({e["kind"] for e in r.get("events", [])})
            if kinds:
                note = f"[{', '.join(kinds)}] {note}"
        else:
            note = f"{r['status']}: {r.get('message', '')}"
        if r.get("flags"):
            note = f"(flagged) {note}"
        if not r.get("unchanged", True):
            note = "SUBMITTED FILES CHANGED! " + note
        rows.append((r["student"], r["assignment"][:2], score, note.replace("\n", " ")))
    w_student = max([len(r[0]) for r in rows] + [7])
    lines = [f"{'student':<{w_student}}  ch  {'score':>9}  notes", f"{'-' * w_student}  --  {'-' * 9}  {'-' * 50}"]
    for student, ch, score, note in rows:
        lines.append(f"{student:<{w_student}}  {ch}  {score:>9}  {note[:110]}")
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------


def _scratch(out: Path) -> Path:
    """A short scratch folder for the workers' sandboxes (IPC socket paths must stay under 108 bytes).

    Recorded in ``.grading/run.json``; one left behind by a killed run is removed (the lock
    guarantees that its run is over).
    """
    record = out / ".grading" / "run.json"
    try:
        stale = Path(json.loads(record.read_text())["scratch"])
        if stale.name.startswith("ag-"):
            shutil.rmtree(stale, ignore_errors=True)
    except (OSError, ValueError, KeyError):
        pass
    root = Path(tempfile.mkdtemp(prefix="ag-", dir="/tmp" if os.path.isdir("/tmp") else None))
    os.chmod(root, 0o755)
    write_json_atomic(record, {"pid": os.getpid(), "scratch": str(root), "started": time.time()})
    return root


def _lock(out: Path):
    (out / ".grading").mkdir(parents=True, exist_ok=True)
    fh = open(out / ".grading" / "lock", "w")  # noqa: SIM115  (held for the whole run)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another `grade` is running on {out}; wait for it or use another --out") from None
    return fh


def main(args) -> int:
    out = Path(args.out).resolve()
    submissions = Path(args.submissions).resolve()
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    if not args.no_sandbox:
        try:
            bwrap = require_sandbox()
        except SandboxUnavailable as exc:
            print(f"cannot grade safely: {exc}", file=sys.stderr)
            return 2
    else:
        bwrap = None
        log("WARNING: --no-sandbox: student code runs with your permissions. Only for notebooks you trust.")
    if out == submissions or out in submissions.parents:
        print(f"--out {out} must not contain the submissions ({submissions})", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        try:
            subs, problems = discover(submissions, out, args.student_pattern, args.chapter, args.student)
        except (OSError, ValueError) as exc:
            print(f"cannot read the submissions: {exc}", file=sys.stderr)
            return 2
        for p in problems:
            log(f"skipped: {p}")
        if not subs:
            print("no submissions found", file=sys.stderr)
            return 1
        assignments = sorted({s.assignment for s in subs})
        limits = Limits(
            cell_timeout=args.timeout,
            memory_mb=args.memory_mb,
            cpu_seconds=args.cpu_seconds,
            processes=args.processes,
            output_kb=args.output_kb,
        )
        source_sha = prepare_course(out, assignments, args.hidden_seed)
        pairs = graded_pairs(out)
        pending = [s for s in subs if args.force or not is_done(out, s, source_sha[s.assignment], pairs)]
        run_root = _scratch(out)
        opts = Options(
            out=out,
            workers=max(1, args.workers or os.cpu_count() or 1),
            sandbox=bwrap is not None,
            kernel_start=args.kernel_start,
            limits=limits,
            max_notebook_mb=args.max_notebook_mb,
            run_root=run_root,
            source_sha=source_sha,
            figures=args.figures,
            hidden_seed=args.hidden_seed,
        )
        log(
            f"{len(subs)} submissions of {', '.join(assignments)}: {len(subs) - len(pending)} already graded, "
            f"{len(pending)} to grade with {min(opts.workers, max(len(pending), 1))} workers, "
            + ("sandbox: bubblewrap" if bwrap else "NO sandbox")
        )
        started = time.monotonic()
        progress = Progress(len(pending), quiet=args.quiet)
        fresh: dict[str, dict] = {}
        if pending:
            old = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
            try:
                fresh = run_workers(pending, opts, progress, args.notebook_timeout, log=log)
            except KeyboardInterrupt:
                progress.close()
                log(f"interrupted: {progress.done} of {len(pending)} graded in this run; run the same command again to continue.")
                return 130
            except SandboxUnavailable as exc:
                progress.close()
                print(f"cannot grade safely: {exc}", file=sys.stderr)
                return 2
            finally:
                signal.signal(signal.SIGTERM, old)
                shutil.rmtree(run_root, ignore_errors=True)
            progress.close()
        else:
            shutil.rmtree(run_root, ignore_errors=True)
        elapsed = time.monotonic() - started
        results = {}
        for s in subs:
            r = fresh.get(s.key) or load_result(out, s)
            if r is not None:
                results[s.key] = r
        csv_path = write_csv(out, results, assignments)
        print(summary_table(list(results.values())))
        return _closing_report(out, subs, results, pending, elapsed, csv_path, opts, log)
    finally:
        lock.close()


def _closing_report(out, subs, results, pending, elapsed, csv_path, opts, log) -> int:
    from autograder.grading.gradebook import integrity

    changed = [s.key for s in subs if hash_files(s.files) != s.sha256]
    problems = integrity(out)
    counts = {k: sum(r["status"] == k for r in results.values()) for k in ("graded", "ungradable", "error")}
    full = sum(r["status"] == "graded" and r["score"] >= r["max_score"] for r in results.values())
    lines = [
        "",
        f"{len(results)} submissions: {counts['graded']} graded ({full} full marks), {counts['ungradable']} could not be "
        f"graded (scored 0), {counts['error']} grader errors" + (" (rerun to retry them)" if counts["error"] else ""),
    ]
    if pending:
        rate = len(pending) / elapsed * 60 if elapsed else 0
        modes = ", ".join(sorted(getattr(opts, "modes", set()))) or "-"
        lines.append(
            f"graded {len(pending)} in {_clock(elapsed)} ({rate:.1f} per minute, {opts.workers} workers, kernels: {modes})"
        )
    lines.append(
        "submitted files: "
        + ("all unchanged" if not changed else f"CHANGED: {', '.join(changed)}")
        + "; gradebook: "
        + ("consistent" if not problems else "; ".join(problems))
    )
    lines.append(f"grades: {csv_path}   feedback: {out / 'feedback'}   gradebook: {out / 'gradebook.db'}")
    print("\n".join(lines))
    missing = [s.key for s in subs if s.key not in results]
    if missing:
        print(f"not graded: {', '.join(missing)}")
    return 1 if counts["error"] or changed or problems or missing else 0


def add_arguments(p) -> None:
    """The ``grade`` subcommand's options (used by :mod:`autograder.cli`)."""
    p.add_argument(
        "submissions", help="nbgrader submitted/ folder (or its course folder), a folder or zip of notebooks, or one notebook"
    )
    p.add_argument("--out", default="graded", help="course directory for the gradebook, feedback and grades (default: ./graded)")
    p.add_argument("--chapter", help="grade only this chapter (slug or number); also the chapter of notebooks that do not say")
    p.add_argument(
        "--student-pattern",
        default=DEFAULT_PATTERN,
        help="regex on a flat folder's file paths (relative, without .ipynb) with a group 'student' and optionally "
        f"'chapter' (default: {DEFAULT_PATTERN!r}: the name up to the first underscore or folder)",
    )
    p.add_argument("--student", action="append", help="grade only this student (repeatable)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel workers (default: number of cores)")
    p.add_argument("--timeout", type=int, default=60, help="seconds per cell (default 60)")
    p.add_argument(
        "--memory-mb", type=int, default=4096, help="memory per notebook beyond the preloaded libraries (default 4096)"
    )
    p.add_argument("--cpu-seconds", type=int, default=900, help="CPU time per notebook (default 900)")
    p.add_argument("--processes", type=int, default=128, help="processes and threads per notebook (default 128)")
    p.add_argument("--output-kb", type=int, default=1024, help="output kept per cell (default 1024 KiB)")
    p.add_argument("--max-notebook-mb", type=int, default=100, help="larger submitted notebooks are not graded (default 100)")
    p.add_argument("--notebook-timeout", type=int, default=1800, help="wall-clock seconds per submission (default 1800)")
    p.add_argument(
        "--kernel-start", choices=["auto", "fork", "fresh"], default="auto", help="how sandboxed kernels start (default auto)"
    )
    p.add_argument("--figures", action="store_true", help="draw matplotlib figures (slower; by default plt.show() draws nothing)")
    p.add_argument(
        "--hidden-seed",
        default=DEFAULT_COURSE_SEED,
        help="course-wide seed of the per-student hidden-test inputs (change it for a new term; "
        f"default {DEFAULT_COURSE_SEED!r}); each student's inputs derive from it and the student id",
    )
    p.add_argument("--no-sandbox", action="store_true", help="run student code unsandboxed (only for notebooks you trust)")
    p.add_argument("--force", action="store_true", help="regrade submissions that are already graded")
    p.add_argument("--quiet", action="store_true", help="no progress or log lines on stderr")
