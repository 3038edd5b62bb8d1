"""``grade --scheduler`` and ``grade --db postgresql://``: real services on 127.0.0.1, no mocks.

The fixtures start a PostgreSQL server (Debian's ``postgresql``: ``initdb``/``pg_ctl`` in a
temporary folder, on a free port; as an unprivileged user when the tests run as root, since
PostgreSQL refuses root) and a Dask scheduler with two ``dask worker`` processes, each with
its own sandbox, kept running the way a supervisor (systemd ``Restart=always``) keeps them:
restarted when they exit. Everything they start is stopped afterwards, even on failure.

The slow tests grade a small class of chapter 1 on the cluster into PostgreSQL and compare
it with a one-machine run into SQLite (gradebook, grades.csv, feedback, result files), then
put a run through faults: a worker killed mid-task, a worker that joins late, the scheduler
restarted, the grading command killed with SIGKILL and rerun, and a submission whose grading
kills every worker that touches it.
"""

from __future__ import annotations

import csv
import glob
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat
import pytest
from hostile.catalogue import CH, WRONG_SOFTMAX, release_notebook, solved

from autograder.course import ROOT, find_chapter
from autograder.grading import gradebook
from autograder.grading.distributed import worker_args

CHAPTER = find_chapter(CH)
BWRAP = shutil.which("bwrap")
GRADE_ARGS = ["--timeout", "10", "--memory-mb", "2048", "--processes", "64"]
DASK = Path(sys.executable).parent / "dask"
needs_bwrap = pytest.mark.skipif(
    BWRAP is None, reason="bubblewrap (bwrap) is not installed; install it with: apt-get install -y bubblewrap"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- PostgreSQL --------------------------------------------------------------------------


def pg_bin(name: str) -> str | None:
    """A PostgreSQL binary: on PATH, or where Debian puts it (/usr/lib/postgresql/<version>/bin)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4].split(".")[0]))
    return candidates[-1] if candidates else None


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1 (user ``grader``, trust authentication)."""

    def __init__(self):
        self.initdb, self.pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            pytest.skip("PostgreSQL is not installed (initdb, pg_ctl); install the Debian package: apt-get install -y postgresql")
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # postgres refuses to run as root
            runuser = shutil.which("runuser")
            if runuser is None:
                pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
            self.as_user = [runuser, "-u", "nobody", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="agpg-", dir="/tmp"))
        if self.as_user:
            shutil.chown(self.dir, "nobody")
        self.port = free_port()
        self.data = self.dir / "data"
        self._run([self.initdb, "-D", str(self.data), "-U", "grader", "--auth=trust", "-E", "UTF8"])
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
        self._run([self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "-t", "60", "start"])

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(self.as_user + cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"{cmd[0]} failed: {proc.stdout}{proc.stderr}{log}")

    def url(self, db: str) -> str:
        return f"postgresql://grader@127.0.0.1:{self.port}/{db}"

    def new_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(self.as_user + [self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    server = Postgres()
    try:
        yield server
    finally:
        server.stop()


# -- the Dask cluster --------------------------------------------------------------------


class Cluster:
    """``dask scheduler`` and supervised ``dask worker`` processes on 127.0.0.1.

    ``allowed-failures`` is 1: a task is given up on when a second worker dies running it.
    Workers exit when they lose the scheduler (Dask's rule), so each runs under a supervisor
    thread that starts it again, as systemd would.
    """

    def __init__(self):
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.tmp = Path(tempfile.mkdtemp(prefix="agt-", dir="/tmp"))  # short: sandbox socket paths
        self.env = {
            **os.environ,
            "TMPDIR": str(self.tmp),
            "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.keep: set[str] = set()
        self.starts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        self.start_scheduler()
        self._thread.start()

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.tmp / log, "ab") as fh:
            return subprocess.Popen(
                [str(DASK), *args], env=self.env, cwd=self.tmp, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )

    def start_scheduler(self) -> None:
        self.scheduler = self._spawn(
            ["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"], "scheduler.log"
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the Dask scheduler did not start: " + (self.tmp / "scheduler.log").read_text()[-2000:])

    def restart_scheduler(self) -> None:
        _killpg(self.scheduler)
        time.sleep(1)
        self.start_scheduler()

    def add_worker(self, name: str) -> None:
        with self._lock:
            self.keep.add(name)
            self._start_worker(name)

    def _start_worker(self, name: str) -> None:
        args = worker_args(self.address, name)
        self.workers[name] = self._spawn(args, f"{name}.log")
        self.starts[name] = self.starts.get(name, 0) + 1

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                for name in self.keep:
                    if self.workers[name].poll() is not None:
                        self._start_worker(name)

    def grading(self) -> dict[str, int]:
        """``{student: pid}`` of the worker processes grading each student right now."""
        found = {}
        for root in self.tmp.glob("ag-d*"):
            try:
                pid = json.loads((root / "worker.json").read_text())["pid"]
                for inbox in (root / "in").glob("*"):
                    found[inbox.name] = pid
            except (OSError, ValueError, KeyError):
                continue
        return found

    def log(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for proc in list(self.workers.values()) + [self.scheduler]:
            _killpg(proc)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _killpg(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


@pytest.fixture
def cluster():
    if BWRAP is None:
        pytest.skip("bubblewrap (bwrap) is not installed; install it with: apt-get install -y bubblewrap")
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


# -- helpers -------------------------------------------------------------------------------


def write_class(root: Path, students: dict[str, str]) -> Path:
    """An nbgrader submitted/ tree: ``{student: "correct" | "wrong" | "empty"}``."""
    rel = release_notebook(root / "build", CHAPTER)
    submitted = root / "submitted"
    for student, kind in students.items():
        folder = submitted / student / CH
        folder.mkdir(parents=True)
        path = folder / f"{CH}.ipynb"
        if kind == "empty":
            path.write_bytes(b"")
        else:
            path.write_text(nbformat.writes(solved(rel, CHAPTER, {"softmax": WRONG_SOFTMAX} if kind == "wrong" else None)))
    return submitted


def grade_cmd(submitted: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "autograder", "grade", str(submitted), "--out", str(out), *GRADE_ARGS, *extra]


def run_grade(submitted: Path, out: Path, *extra: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(grade_cmd(submitted, out, *extra), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def results(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / ".grading" / "results" / CH).glob("*.json")}


def feedback_summary(page: Path) -> str:
    """The feedback page's summary (score, every test's points and message, the grader's notes) as text.

    The rest of the page is the executed notebook, whose execution timestamps, printed timings
    and widget ids differ between any two runs, on one machine or on many.
    """
    text = page.read_text()
    start = text.index("Feedback: ")
    end = text.index("Failed tests show their full message", start) if "Failed tests show" in text else len(text)
    return html.unescape(re.sub(r"<[^>]+>", " ", text[start:end])).split()


def cell_outputs(out: Path, student: str) -> dict[str, list]:
    """The outputs of the autograded notebook's test cells (the verdicts' messages)."""
    nb = nbformat.read(str(out / "autograded" / student / CH / f"{CH}.ipynb"), as_version=4)
    outs = {}
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("grade") and cell.cell_type == "code":
            outs[meta["grade_id"]] = [o.get("text", o.get("evalue", "")) for o in cell.outputs]
    return outs


def one_row_per_cell(url: str) -> dict[tuple[str, str, str], int]:
    from sqlalchemy import create_engine, text

    engine = create_engine(gradebook.normalize_url(url) if not url.startswith("sqlite") else url)
    try:
        with engine.connect() as con:
            rows = con.execute(
                text(
                    "SELECT sa.student_id, a.name, gc.name, COUNT(*) FROM grade g "
                    "JOIN submitted_notebook sn ON g.notebook_id = sn.id JOIN submitted_assignment sa ON sn.assignment_id = sa.id "
                    "JOIN assignment a ON sa.assignment_id = a.id JOIN base_cell gc ON g.cell_id = gc.id "
                    "GROUP BY sa.student_id, a.name, gc.name"
                )
            ).fetchall()
    finally:
        engine.dispose()
    return {(s, a, c): n for s, a, c, n in rows}


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.slow
@needs_bwrap
def test_cluster_grades_like_one_machine(tmp_path, postgres, cluster):
    """Two Dask workers writing PostgreSQL give the gradebook, CSV, feedback and results of one machine with SQLite."""
    cluster.add_worker("w1")
    cluster.add_worker("w2")
    students = {"ann": "correct", "bob": "wrong", "cy": "empty"}
    submitted = write_class(tmp_path, students)
    local, remote = tmp_path / "local", tmp_path / "cluster"
    url = postgres.new_db("equal")

    one = run_grade(submitted, local, "--workers", "2")
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    many = run_grade(submitted, remote, "--scheduler", cluster.address, "--db", url)
    assert many.returncode == 0, many.stdout[-2000:] + many.stderr[-3000:] + cluster.log()
    assert "gradebook: consistent" in many.stdout and "submitted files: all unchanged" in many.stdout
    assert not (remote / "gradebook.db").exists(), "the gradebook is in PostgreSQL"

    assert gradebook.dump(gradebook.db_url(local)) == gradebook.dump(gradebook.normalize_url(url))
    assert (local / "grades.csv").read_text() == (remote / "grades.csv").read_text()
    ra, rb = results(local), results(remote)
    assert set(ra) == set(rb) == set(students)
    volatile = {"seconds", "mode", "worker"}
    for student in students:
        assert {k: v for k, v in ra[student].items() if k not in volatile} == {
            k: v for k, v in rb[student].items() if k not in volatile
        }, student
        page = Path("feedback") / student / CH / f"{CH}.html"
        assert feedback_summary(local / page) == feedback_summary(remote / page), student
        if students[student] != "empty":
            assert cell_outputs(local, student) == cell_outputs(remote, student), student
    assert rb["bob"]["score"] < CHAPTER.max_score == rb["ann"]["score"]

    cells = one_row_per_cell(url)
    graded = [s for s, k in students.items()]
    assert set(cells.values()) == {1}, "one grade row per (student, assignment, cell)"
    assert len(cells) == len(graded) * 2 * len(CHAPTER.exercises)
    workers = {r["worker"] for r in rb.values()}
    assert workers == {"w1", "w2"}, f"both workers graded: {workers}"
    assert re.search(r"workers: w1 \d+, w2 \d+", many.stderr), "the progress line counts per worker"


@pytest.mark.slow
@needs_bwrap
def test_faults_lose_nothing_and_grade_nothing_twice(tmp_path, postgres, cluster):
    """A worker killed mid-task, a late worker, a restarted scheduler, ``kill -9`` of the command, and a
    submission that kills every worker it touches: one complete, consistent gradebook in the end."""
    # Eight plain submissions: after the fourth result at least four are left, more than two workers can
    # finish in the moment between the test seeing that result and its kill -9 of the command.
    students = {f"s{i}": ("wrong" if i % 2 else "correct") for i in range(8)} | {"toxic": "correct"}
    submitted = write_class(tmp_path, students)
    out = tmp_path / "out"
    url = postgres.new_db("faults")
    kills: dict[str, int] = {}
    killed: set[int] = set()
    stop = threading.Event()

    def killer():  # "toxic" kills each worker that grades it; s1 kills the first one only
        while not stop.wait(0.1):
            for student, pid in cluster.grading().items():
                if pid not in killed and (student == "toxic" or (student == "s1" and not kills.get("s1"))):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    killed.add(pid)
                    kills[student] = kills.get(student, 0) + 1

    cluster.add_worker("w1")
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    done_dir = out / ".grading" / "results" / CH
    proc = subprocess.Popen(
        grade_cmd(submitted, out, "--scheduler", cluster.address, "--db", url),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "first.log", "w"),  # noqa: SIM115
    )
    try:

        def wait_results(n: int, timeout: float = 240) -> None:
            deadline = time.monotonic() + timeout
            while len(list(done_dir.glob("*.json"))) < n:
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no progress: " + (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(0.2)

        wait_results(1)
        cluster.add_worker("w2")  # joins late
        wait_results(2)
        cluster.restart_scheduler()
        wait_results(4)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in done_dir.glob("*.json")}
    assert 4 <= len(first) < len(students)
    assert "lost the Dask scheduler" in (tmp_path / "first.log").read_text()

    rerun = run_grade(submitted, out, "--scheduler", cluster.address, "--db", url)
    stop.set()
    thread.join(5)
    assert f"{len(first)} already graded, {len(students) - len(first)} to grade" in rerun.stderr, rerun.stderr[-3000:]
    assert rerun.returncode == 1, "a crashed submission needs a human: " + rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in done_dir.glob("*.json")) if n in first} == first

    final = results(out)
    assert set(final) == set(students), "nothing lost"
    # toxic: two deaths in the rerun (allowed-failures 1); one more if the first run reached it before its kill
    assert kills.get("s1") == 1 and kills.get("toxic", 0) >= 2, kills
    for s, kind in students.items():
        if s == "toxic":
            continue
        assert final[s]["status"] == "graded", final[s]
        assert (final[s]["score"] == CHAPTER.max_score) == (kind == "correct"), final[s]
    toxic = final["toxic"]
    assert toxic["status"] == "crashed" and "stopped the grading worker each time" in toxic["message"]
    assert "stopped the grading worker" in (out / "feedback" / "toxic" / CH / f"{CH}.html").read_text()
    with open(out / "grades.csv", newline="") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f)}
    assert rows["toxic"]["status"] == "crashed" and "stopped the grading worker" in rows["toxic"]["message"]
    assert "given up on" in rerun.stdout
    assert any(r.get("worker") == "w2" for r in final.values()), "the late worker graded"

    cells = one_row_per_cell(url)
    assert set(cells.values()) == {1} and len(cells) == (len(students) - 1) * 2 * len(CHAPTER.exercises)
    assert gradebook.integrity(out, gradebook.normalize_url(url)) == []
    assert gradebook.graded_pairs(gradebook.normalize_url(url)) == {(CH, s) for s in students if s != "toxic"}

    again = run_grade(submitted, out, "--scheduler", cluster.address, "--db", url)
    assert f"{len(students)} already graded, 0 to grade" in again.stderr, "the crashed one is not retried forever"


def test_concurrent_writers_leave_one_row_per_cell(tmp_path, postgres):
    """Eight threads write one student's submission at once under the submission lock: one row per cell."""
    from autograder.grade import prepare_course

    url = gradebook.normalize_url(postgres.new_db("locks"))
    course = tmp_path / "course"
    course.mkdir()
    prepare_course(course, [CH], db=url)
    gradebook.ensure_students(url, ["ann"])
    errors = []

    def write():
        try:
            with gradebook.submission_lock(url, CH, "ann"):
                gradebook.record_zero(course, CH, "ann", url)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    cells = one_row_per_cell(url)
    assert set(cells.values()) == {1} and len(cells) == 2 * len(CHAPTER.exercises)
    assert gradebook.graded_pairs(url) == {(CH, "ann")}


def test_bad_gradebook_and_cluster_addresses_are_refused(tmp_path, postgres):
    submitted = write_class(tmp_path, {"ann": "correct"})
    proc = run_grade(submitted, tmp_path / "o1", "--db", "mysql://x@localhost/db", "--no-sandbox")
    assert proc.returncode == 2 and "only postgresql://" in proc.stderr
    proc = run_grade(submitted, tmp_path / "o2", "--db", f"postgresql://grader@127.0.0.1:{free_port()}/x", "--no-sandbox")
    assert proc.returncode == 2 and "cannot reach the gradebook" in proc.stderr
    args = ["--scheduler", f"tcp://127.0.0.1:{free_port()}", "--scheduler-wait", "1", "--no-sandbox"]
    proc = run_grade(submitted, tmp_path / "o3", *args)
    assert proc.returncode == 2 and "no Dask scheduler answers" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "o3" / ".grading" / "results").exists()
