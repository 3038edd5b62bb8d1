"""Grading throughput: ``python -m autograder grade`` (sandboxed, parallel) against plain serial nbgrader.

Generates a class (default 100 submissions) of a PyTorch chapter when one exists, else of
chapter 1: correct solutions, realistic wrong ones (the chapter's mutants) and hostile ones
that plain nbgrader survives unsandboxed (warnings on stderr, monkeypatching, an object
equal to everything, a deleted test cell, another kernelspec, sys.exit, os._exit, a
segfault, a cell that never ends, malformed JSON, an empty file). Then, in one run on this
machine, times

* ``nbgrader autograde CHAPTER`` (one process, serial, no sandbox, no feedback), and
* ``python -m autograder grade submitted/ --out ...`` (sandbox on, default workers, with
  feedback pages and the grades CSV),

on copies of the same input, each in a course directory prepared the same way beforehand
(``generate_assignment`` is not timed), and reports submissions per minute for both, the
ratio, the machine's load, and whether the two agree on the scores of the submissions that
are neither hostile nor broken.

    .venv/bin/python benchmarks/grading_throughput.py [--students 100] [--chapter 02] [--timeout 30]

``--distributed`` times the cluster path instead: ``grade --workers W`` (the embedded local
pool) against ``grade --scheduler`` with the same number W of Dask worker processes, on a
scheduler and workers the benchmark starts on 127.0.0.1 (or on ``--scheduler ADDR``, an
existing cluster), and the cluster with one worker, for the scaling from 1 to W. All use the
SQLite gradebook of their own course directory (the workers are on this machine), so the
difference is the distributed path itself: task transfer, the workers' scratch copies and
the files sent back.

    .venv/bin/python benchmarks/grading_throughput.py --distributed --students 12 --chapter 02

Not a test: it takes minutes, and its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import nbformat  # noqa: E402
from hostile.catalogue import add_cell, drop, other_kernel, release_notebook, solved  # noqa: E402

from autograder.course import CHAPTERS, find_chapter  # noqa: E402
from autograder.mutants import mutants_of  # noqa: E402

HOSTILE = {
    "warnings": """
        import sys, warnings
        sys.stderr.write("/usr/lib/python3/dist-packages/x.py:1: DeprecationWarning: old\\n")
        warnings.warn("harmless", UserWarning)
    """,
    "monkeypatch": """
        import numpy, torch
        numpy.allclose = lambda *a, **k: True
        torch.allclose = lambda *a, **k: True
        numpy.testing.assert_allclose = lambda *a, **k: None
    """,
    "sys_exit": "import sys\nsys.exit(1)",
    "os_exit": "import os\nos._exit(3)",
    "segfault": "import ctypes\nctypes.string_at(0)",
    "never_ends": "while True:\n    pass",
}


def always_equal(name: str) -> str:
    return f"""
def {name}(*args, **kwargs):
    class AlwaysEqual:
        def __eq__(self, other):
            return True

    return AlwaysEqual()
"""


def make_class(submitted: Path, build: Path, chapter, n: int) -> dict[str, str]:
    """Write ``n`` submissions as nbgrader's submitted/ tree; returns {student: kind}."""
    rel = release_notebook(build, chapter)
    good = solved(rel, chapter)
    mutants = mutants_of(chapter.key)
    first = chapter.exercises[0].name
    kinds: dict[str, str] = {}
    hostile = list(HOSTILE) + ["always_equal", "deleted_test", "kernelspec", "malformed_json", "empty_file"]
    for i in range(n):
        student = f"student{i:03d}"
        folder = submitted / student / chapter.slug
        folder.mkdir(parents=True)
        path = folder / f"{chapter.slug}.ipynb"
        slot = i % 20
        if slot < 11:
            kind, nb = "correct", good
        elif slot < 16:
            m = mutants[(i // 20 * 5 + slot - 11) % len(mutants)]
            kind, nb = f"mutant:{m.id}", solved(rel, chapter, {m.exercise: m.code})
        else:
            h = hostile[(i // 20 * 4 + slot - 16) % len(hostile)]
            kind = f"hostile:{h}"
            if h in HOSTILE:
                nb = add_cell(good, HOSTILE[h], after=chapter.exercises[-1].name)
            elif h == "always_equal":
                nb = solved(rel, chapter, {first: always_equal(first)})
            elif h == "deleted_test":
                nb = drop(good, f"test_{first}")
            elif h == "kernelspec":
                nb = other_kernel(good)
            elif h == "malformed_json":
                path.write_text(nbformat.writes(good)[:400])
                kinds[student] = kind
                continue
            else:
                path.write_bytes(b"")
                kinds[student] = kind
                continue
        path.write_text(nbformat.writes(copy.deepcopy(nb)))
        kinds[student] = kind
    return kinds


def prepare(course: Path, chapter) -> None:
    from autograder.grade import prepare_course

    course.mkdir(parents=True)
    prepare_course(course, [chapter.slug])


def scores(course: Path, assignment: str) -> dict[str, float]:
    con = sqlite3.connect(course / "gradebook.db")
    try:
        rows = con.execute(
            "SELECT sa.student_id, SUM(COALESCE(g.manual_score, g.auto_score, 0)), "
            "SUM(g.auto_score IS NULL AND g.manual_score IS NULL) FROM grade g "
            "JOIN submitted_notebook sn ON g.notebook_id = sn.id JOIN submitted_assignment sa ON sn.assignment_id = sa.id "
            "JOIN assignment a ON sa.assignment_id = a.id WHERE a.name = ? GROUP BY sa.student_id",
            (assignment,),
        ).fetchall()
    finally:
        con.close()
    return {s: float(v) for s, v, missing in rows if not missing}


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


class LocalCluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, as an instructor would start them."""

    def __init__(self, env: dict):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.env = env
        self.dask = str(Path(sys.executable).parent / "dask")
        self.log = open(Path(tempfile.gettempdir()) / f"bench-dask-{self.port}.log", "ab")  # noqa: SIM115
        self.scheduler = self._spawn(["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"])
        self.workers: list[subprocess.Popen] = []
        time.sleep(3)

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [self.dask, *args], env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def scale(self, n: int) -> None:
        """Exactly ``n`` worker processes, registered with the scheduler."""
        from distributed import Client

        from autograder.grading.distributed import worker_args

        while len(self.workers) > n:
            os.killpg(self.workers.pop().pid, signal.SIGTERM)
        while len(self.workers) < n:
            name = f"w{len(self.workers) + 1}"
            args = worker_args(self.address, name)
            self.workers.append(self._spawn(args))
        with Client(self.address, timeout=30, set_as_default=False) as client:
            deadline = time.monotonic() + 120
            while len(client.scheduler_info()["workers"]) != n and time.monotonic() < deadline:
                time.sleep(0.5)

    def close(self) -> None:
        for proc in self.workers + [self.scheduler]:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        self.log.close()


def time_grade(submitted: Path, course: Path, timeout: int, env: dict, *extra: str) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "autograder", "grade", str(submitted), "--out", str(course), "--timeout", str(timeout)]
    t = time.monotonic()
    r = subprocess.run(cmd + ["--quiet", *extra], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - t
    if r.returncode not in (0, 1):
        raise SystemExit(f"grade failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return seconds, r.stdout


def distributed_main(args, chapter, work: Path, kinds: dict, env: dict) -> int:
    """Local pool vs Dask cluster with the same worker count, and the cluster's scaling from 1 worker."""
    workers = args.workers or 2
    n = args.students
    runs = {"local": (workers, None), "cluster": (workers, "cluster"), "cluster_1": (1, "cluster")}
    cluster = None if args.scheduler else LocalCluster(env)
    address = args.scheduler or cluster.address
    figures, scores_by = {}, {}
    try:
        for name, (count, kind) in runs.items():
            course = work / name
            shutil.rmtree(course, ignore_errors=True)
            prepare(course, chapter)
            if kind is None:
                extra = ["--workers", str(count)]
            else:
                if cluster is not None:
                    cluster.scale(count)
                elif name == "cluster_1":
                    continue  # an existing cluster keeps its size
                extra = ["--scheduler", address]
            print(f"load average before {name}: {loadavg()}", flush=True)
            seconds, stdout = time_grade(work / "class" / "submitted", course, args.timeout, env, *extra)
            figures[name] = seconds
            scores_by[name] = scores(course, chapter.slug)
            print(f"{name} ({count} worker{'s' * (count > 1)}): {seconds:.1f} s, {n / seconds * 60:.1f} per minute", flush=True)
            print("\n".join(stdout.strip().splitlines()[-3:]), flush=True)
    finally:
        if cluster is not None:
            cluster.close()
    report = {
        "chapter": chapter.slug,
        "submissions": n,
        "mix": {k: sum(1 for v in kinds.values() if v.split(":")[0] == k) for k in ("correct", "mutant", "hostile")},
        "cores": os.cpu_count(),
        "workers": workers,
        "cell_timeout_s": args.timeout,
        "load_after": loadavg(),
    }
    for name, seconds in figures.items():
        report[f"{name}_seconds"] = round(seconds, 1)
        report[f"{name}_per_minute"] = round(n / seconds * 60, 1)
    if "cluster" in figures:
        report["cluster_overhead_pct"] = round((figures["cluster"] / figures["local"] - 1) * 100, 1)
        report["same_scores_local_and_cluster"] = scores_by["local"] == scores_by["cluster"]
    if "cluster_1" in figures:
        report[f"scaling_1_to_{workers}_workers"] = round(figures["cluster_1"] / figures["cluster"], 2)
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = next((c.slug for c in CHAPTERS if c.number >= 2), CHAPTERS[0].slug)
    p.add_argument("--chapter", default=default, help=f"chapter to grade (default {default})")
    p.add_argument("--students", type=int, default=100)
    p.add_argument("--timeout", type=int, default=30, help="seconds per cell, for both graders (default 30)")
    p.add_argument("--workers", type=int, default=None, help="workers for `grade` (default: its own default, the cores)")
    p.add_argument("--figures", action="store_true", help="let `grade` draw figures too (as plain nbgrader does)")
    p.add_argument("--keep", help="keep the generated class and course directories here")
    p.add_argument("--only", choices=["plain", "ours"], help="time only one of the two")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="time the local pool against a Dask cluster with the same number of workers, and the cluster with 1 worker",
    )
    p.add_argument("--scheduler", help="with --distributed: an existing cluster to time instead of one started here")
    args = p.parse_args()
    chapter = find_chapter(args.chapter)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="grading-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"chapter {chapter.slug}, {args.students} submissions, cell timeout {args.timeout} s, in {work}", flush=True)
    kinds = make_class(work / "class" / "submitted", work / "build", chapter, args.students)
    if args.distributed or args.scheduler:
        env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
        return distributed_main(args, chapter, work, kinds, env)

    plain, ours = work / "plain", work / "ours"
    for course in (plain, ours):
        shutil.rmtree(course, ignore_errors=True)
        prepare(course, chapter)
    shutil.copytree(work / "class" / "submitted", plain / "submitted")
    (plain / "nbgrader_config.py").write_text(
        f"c = get_config()\nc.CourseDirectory.course_id = 'attention-head-by-head'\nc.Execute.timeout = {args.timeout}\n"
    )
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    figures = {}
    print(f"load average before: {loadavg()}", flush=True)
    if args.only != "ours":
        t = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "nbgrader", "autograde", chapter.slug],
            cwd=plain,
            env=env,
            capture_output=True,
            text=True,
        )
        figures["plain"] = time.monotonic() - t
        (work / "plain.log").write_text(r.stdout + r.stderr)
        print(f"plain nbgrader autograde: {figures['plain']:.1f} s (exit {r.returncode}); load {loadavg()}", flush=True)
    if args.only != "plain":
        cmd = [sys.executable, "-m", "autograder", "grade", str(work / "class" / "submitted"), "--out", str(ours)]
        cmd += ["--timeout", str(args.timeout), "--quiet"] + (["--workers", str(args.workers)] if args.workers else [])
        cmd += ["--figures"] if args.figures else []
        t = time.monotonic()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        figures["ours"] = time.monotonic() - t
        (work / "ours.log").write_text(r.stdout + r.stderr)
        print(f"autograder grade (sandboxed): {figures['ours']:.1f} s (exit {r.returncode}); load {loadavg()}", flush=True)
        print("\n".join(r.stdout.strip().splitlines()[-4:]))

    n = args.students
    report = {
        "chapter": chapter.slug,
        "submissions": n,
        "mix": {k: sum(1 for v in kinds.values() if v.split(":")[0] == k) for k in ("correct", "mutant", "hostile")},
        "cores": os.cpu_count(),
        "machine": f"{platform.system()} {platform.release()}, {platform.python_implementation()} {platform.python_version()}",
        "cell_timeout_s": args.timeout,
        "figures_drawn_by_grade": args.figures,
    }
    for name, seconds in figures.items():
        report[f"{name}_seconds"] = round(seconds, 1)
        report[f"{name}_per_minute"] = round(n / seconds * 60, 1)
    if len(figures) == 2:
        report["ratio"] = round(figures["plain"] / figures["ours"], 2)
        a, b = scores(plain, chapter.slug), scores(ours, chapter.slug)
        fair = [s for s, k in kinds.items() if not k.startswith("hostile")]
        report["graded_by_plain"] = len(a)
        report["graded_by_ours"] = len(b)
        report["same_score_correct_and_mutants"] = sum(a.get(s) == b.get(s) for s in fair)
        report["correct_and_mutants"] = len(fair)
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
