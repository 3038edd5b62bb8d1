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
with kernels in its own sandbox (:mod:`autograder.sandbox`). With ``--scheduler`` the same
grading function runs on the workers of a Dask cluster instead
(:mod:`autograder.grading.distributed`), and ``--db postgresql://...`` puts the gradebook in
PostgreSQL (:mod:`autograder.grading.gradebook`). A submission is done when its result file
exists; a rerun grades only what is not done (or whose files or chapter source changed),
``--force`` regrades everything. Killed at any point, the gradebook stays consistent (every
write is one transaction) and the rerun picks up where it stopped.
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


def prepare_course(out: Path, slugs: list[str], hidden_seed: str = DEFAULT_COURSE_SEED, db: str | None = None) -> dict[str, str]:
    """Write ``source/`` and run ``generate_assignment`` (into the gradebook at ``db``, default
    ``OUT/gradebook.db``) for chapters whose source changed; WAL on for SQLite. Returns
    ``{slug: grading_sha}``."""
    from autograder.grading.gradebook import configure_sqlite, db_url, enable_wal, has_assignment, is_sqlite
    from autograder.release import write_source

    configure_sqlite()
    url = db_url(out, db)
    state_file = out / STATE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    shas = {}
    for slug in slugs:
        chapter = find_chapter(slug)
        path = write_source(chapter, out)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        released = out / "release" / slug / f"{slug}.ipynb"
        key = slug if not db else f"{slug}@{hashlib.sha256(url.encode()).hexdigest()[:12]}"
        if state.get(key) != sha or not released.exists() or not has_assignment(url, slug):
            _generate_assignment(chapter, out, url)
            state[key] = sha
            write_json_atomic(state_file, state)
        shas[slug] = grading_sha(chapter, path, hidden_seed)
    if is_sqlite(url):
        enable_wal(out / "gradebook.db" if not db else Path(url.split(":///", 1)[1]))
    return shas


def _generate_assignment(chapter, out: Path, url: str) -> None:
    """nbgrader's ``generate_assignment`` into the gradebook at ``url`` (fills it with the cells' checksums)."""
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    from autograder.nbgrader_config import nbgrader_config

    c = nbgrader_config(out)
    c.CourseDirectory.db_url = url
    result = NbGraderAPI(CourseDirectory(config=c), config=c).generate_assignment(chapter.slug, force=True, create=True)
    if not result["success"]:
        raise RuntimeError(f"nbgrader generate_assignment failed for {chapter.slug}:\n{result['error']}\n{result['log']}")


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


def load_result(out: Path, sub: Submission) -> dict | None:
    path = result_path(out, sub.assignment, sub.student)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_done(out: Path, sub: Submission, source_sha: str, pairs: set) -> bool:
    """Graded (or given up on: ``crashed``) with these files and this chapter source, its rows and pages in place."""
    r = load_result(out, sub)
    if r is None or r.get("status") not in ("graded", "ungradable", "crashed"):
        return False
    if r.get("input_sha") != sub.sha256 or r.get("source_sha") != source_sha:
        return False
    feedback = out / "feedback" / sub.student / sub.assignment / f"{sub.assignment}.html"
    if r["status"] == "crashed":  # no gradebook rows: nothing was graded
        return feedback.exists()
    if (sub.assignment, sub.student) not in pairs:
        return False
    autograded = out / "autograded" / sub.student / sub.assignment / f"{sub.assignment}.ipynb"
    return feedback.exists() and (r["status"] == "ungradable" or autograded.exists())


# -- running the workers ---------------------------------------------------------------


class Progress:
    """One progress line on stderr for the whole run, local or on a cluster (a line every few seconds
    when stderr is not a terminal): submissions done, not full marks, failures, and per-worker counts."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.done, self.failed, self.not_full = total, 0, 0, 0
        self.per_worker: dict[str, int] = {}
        self.start = time.monotonic()
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def update(self, result: dict | None = None, force: bool = False) -> None:
        if result is not None:
            self.done += 1
            if result.get("status") in ("error", "crashed"):
                self.failed += 1
            elif result.get("status") != "graded" or result.get("score", 0) < result.get("max_score", 0):
                self.not_full += 1
            worker = result.get("worker")
            if worker:
                self.per_worker[worker] = self.per_worker.get(worker, 0) + 1
        if self.quiet:
            return
        now = time.monotonic()
        if not force and now - self._last < (0.5 if self.tty else 5) and (result is None or self.done < self.total):
            return
        self._last = now
        print(("\r" + self.line()) if self.tty else self.line(), end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def line(self) -> str:
        """``grading [####....] 7/12  not full marks: 2  failed: 0  workers: a 4, b 3  0:41 elapsed, ~0:30 left``."""
        elapsed = time.monotonic() - self.start
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0
        workers = ", ".join(f"{w} {n}" for w, n in sorted(self.per_worker.items()))
        return (
            f"grading [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}  "
            f"not full marks: {self.not_full}  failed: {self.failed}  "
            + (f"workers: {workers}  " if workers else "")
            + f"{_clock(elapsed)} elapsed"
            + (f", ~{_clock(eta)} left" if self.done else "")
        )

    def close(self) -> None:
        if self.tty and not self.quiet:
            print(file=sys.stderr)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def _crash_result(sub: Submission, opts: Options, why: str, status: str = "error") -> dict:
    return {
        "student": sub.student,
        "assignment": sub.assignment,
        "status": status,
        "score": 0.0,
        "max_score": find_chapter(sub.assignment).max_score,
        "tests": [],
        "notes": list(sub.notes),
        "events": [],
        "flags": [],
        "message": why,
        "input_sha": sub.sha256,
        "source_sha": opts.source_sha.get(sub.assignment, ""),
        "files": sub.files,
        "unchanged": hash_files(sub.files) == sub.sha256,
    }


def mark_crashed(sub: Submission, opts: Options, deaths: int, last: str) -> dict:
    """Give up on a submission whose grading killed ``deaths`` workers: a ``crashed`` result (done: a rerun
    does not retry it, ``--force`` does), its feedback page, no gradebook rows."""
    from autograder.grading.feedback import FeedbackWriter

    why = (
        f"grading this submission stopped the grading worker each time it was tried ({deaths} times; the last: {last}); "
        "it was not retried again. The instructor can regrade it with --force --student ID."
    )
    result = _crash_result(sub, opts, why, status="crashed")
    FeedbackWriter(opts.out, opts.db_url).write(result, None)
    write_json_atomic(result_path(opts.out, sub.assignment, sub.student), result)
    return result


def run_workers(pending: list[Submission], opts: Options, progress: Progress, notebook_timeout: int, log=print) -> dict:
    """Grade ``pending`` with ``opts.workers`` processes; returns {key: result}."""
    ctx = mp.get_context("fork")
    queue = list(pending)
    results: dict[str, dict] = {}
    workers: dict[int, tuple] = {}  # index -> (process, conn)
    busy: dict[int, tuple[Submission, float]] = {}
    deaths: dict[str, int] = {}
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

    def retire(i: int, why: str, died: bool = False) -> None:
        proc, conn = workers.pop(i)
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        conn.close()
        if i in busy:
            sub, _ = busy.pop(i)
            deaths[sub.key] = deaths.get(sub.key, 0) + died
            if died and deaths[sub.key] < opts.attempts:
                log(f"worker {i} died while grading {sub.key} ({why}); trying it again ({deaths[sub.key]} of {opts.attempts})")
                queue.insert(0, sub)
            elif died:
                results[sub.key] = mark_crashed(sub, opts, deaths[sub.key], why)
                results[sub.key]["worker"] = f"local-{i}"
                progress.update(results[sub.key])
            else:
                results[sub.key] = _crash_result(sub, opts, why)
                results[sub.key]["worker"] = f"local-{i}"
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
                        results[sub.key] = {**msg[2], "worker": f"local-{i}"}
                        progress.update(results[sub.key])
                    feed(i)
                    if i not in busy:
                        closing[i] = time.monotonic()
                elif obj in sentinels:
                    i = sentinels[obj]
                    if i in workers and not workers[i][0].is_alive():
                        if i in busy:
                            from autograder.sandbox import describe_exit

                            code = workers[i][0].exitcode
                            retire(i, "the worker process " + describe_exit(code).removeprefix("it "), died=True)
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


def write_csv(out: Path, results: dict[str, dict], assignments: list[str], db: str | None = None) -> Path:
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
    with Gradebook(db_url(out, db)) as gb:
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
        db = getattr(args, "db", None) or None
        scheduler = getattr(args, "scheduler", None)
        try:
            if db:
                from autograder.grading.gradebook import check_reachable, normalize_url

                db = normalize_url(db)
                check_reachable(db)
        except ValueError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        if scheduler:  # before anything is written: is there a scheduler at all?
            from autograder.grading.distributed import ClusterUnavailable, check_scheduler

            try:
                check_scheduler(scheduler, args.scheduler_wait, log)
            except ClusterUnavailable as exc:
                print(f"cannot grade on the cluster: {exc}", file=sys.stderr)
                return 2
        from autograder.grading.gradebook import db_url, ensure_students, graded_pairs, redact

        source_sha = prepare_course(out, assignments, args.hidden_seed, db)
        url = db_url(out, db)
        pairs = graded_pairs(url)
        pending = [s for s in subs if args.force or not is_done(out, s, source_sha[s.assignment], pairs)]
        ensure_students(url, [s.student for s in pending])
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
            db=db or "",
            attempts=max(1, getattr(args, "attempts", 3)),
        )
        where = f"on the Dask cluster at {scheduler}" if scheduler else f"with {min(opts.workers, max(len(pending), 1))} workers"
        log(
            f"{len(subs)} submissions of {', '.join(assignments)}: {len(subs) - len(pending)} already graded, "
            f"{len(pending)} to grade {where}, "
            + ("sandbox: bubblewrap" if bwrap else "NO sandbox")
            + f", gradebook: {redact(url)}"
        )
        started = time.monotonic()
        progress = Progress(len(pending), quiet=args.quiet)
        fresh: dict[str, dict] = {}
        if pending:
            old = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
            try:
                if scheduler:
                    from autograder.grading.distributed import ClusterUnavailable, run_cluster

                    try:
                        fresh = run_cluster(
                            pending, opts, scheduler, progress, args.notebook_timeout, log=log, wait=args.scheduler_wait
                        )
                    except ClusterUnavailable as exc:
                        progress.close()
                        print(f"cannot grade on the cluster: {exc}", file=sys.stderr)
                        return 2
                else:
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
        csv_path = write_csv(out, results, assignments, db)
        print(summary_table(list(results.values())))
        return _closing_report(out, subs, results, pending, elapsed, csv_path, opts, log)
    finally:
        lock.close()


def _closing_report(out, subs, results, pending, elapsed, csv_path, opts, log) -> int:
    from autograder.grading.gradebook import integrity

    changed = [s.key for s in subs if hash_files(s.files) != s.sha256]
    problems = integrity(out, opts.db or None)
    counts = {k: sum(r["status"] == k for r in results.values()) for k in ("graded", "ungradable", "error", "crashed")}
    full = sum(r["status"] == "graded" and r["score"] >= r["max_score"] for r in results.values())
    lines = [
        "",
        f"{len(results)} submissions: {counts['graded']} graded ({full} full marks), {counts['ungradable']} could not be "
        f"graded (scored 0), {counts['error']} grader errors" + (" (rerun to retry them)" if counts["error"] else ""),
    ]
    if counts["crashed"]:
        lines.append(
            f"{counts['crashed']} submissions stopped every grading worker they ran on and were given up on "
            "(status 'crashed'; regrade one with --force --student ID)"
        )
    if pending:
        rate = len(pending) / elapsed * 60 if elapsed else 0
        modes = ", ".join(sorted(getattr(opts, "modes", set()))) or "-"
        workers = getattr(opts, "cluster_workers", None) or f"{opts.workers} workers"
        lines.append(f"graded {len(pending)} in {_clock(elapsed)} ({rate:.1f} per minute, {workers}, kernels: {modes})")
    lines.append(
        "submitted files: "
        + ("all unchanged" if not changed else f"CHANGED: {', '.join(changed)}")
        + "; gradebook: "
        + ("consistent" if not problems else "; ".join(problems))
    )
    from autograder.grading.gradebook import db_url, redact

    lines.append(f"grades: {csv_path}   feedback: {out / 'feedback'}   gradebook: {redact(db_url(out, opts.db or None))}")
    print("\n".join(lines))
    missing = [s.key for s in subs if s.key not in results]
    if missing:
        print(f"not graded: {', '.join(missing)}")
    return 1 if counts["error"] or counts["crashed"] or changed or problems or missing else 0


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
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="parallel workers on this machine (default: number of cores)"
    )
    p.add_argument(
        "--scheduler",
        metavar="tcp://HOST:8786",
        help="grade on the workers of this Dask cluster (`dask scheduler` / `dask worker`) instead of on this machine",
    )
    p.add_argument(
        "--scheduler-wait",
        type=int,
        default=300,
        metavar="S",
        help="with --scheduler: seconds to wait for the scheduler and a first worker, also after losing them (default 300)",
    )
    p.add_argument(
        "--db",
        metavar="URL",
        help="nbgrader's gradebook at this URL, e.g. postgresql://USER:PASSWORD@HOST/DB (default: OUT/gradebook.db, SQLite)",
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=3,
        help="on this machine: tries per submission when the worker grading it dies; after the last it is marked "
        "'crashed' (default 3; on a cluster the scheduler's distributed.scheduler.allowed-failures decides)",
    )
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
