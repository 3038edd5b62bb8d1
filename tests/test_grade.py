"""``grade``: a class of hostile and broken submissions, graded in one sandboxed batch.

The slow tests grade the catalogue of :mod:`hostile.catalogue` (built from chapter 1's release
notebook with the solutions filled in) through ``python -m autograder grade`` with the
sandbox on, then check every student's score and messages, the submitted files (hashed
before and after), the gradebook, the feedback pages, the grades CSV, what the sandbox let
a probe see, and that a run killed with SIGKILL resumes. They need bubblewrap
(``apt-get install -y bubblewrap``) and skip without it. The fast tests cover reading,
sanitizing and discovering submissions in process.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import html
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import nbformat
import pytest
from conftest import namespace
from hostile.catalogue import CH, WRONG_SOFTMAX, cases, release_notebook, solved, write_class

from autograder.checks import seeding
from autograder.checks.runner import run_check
from autograder.course import ROOT, find_chapter
from autograder.grading.execute import DEFAULT_HARMLESS_STDERR
from autograder.grading.feedback import scrub_hidden
from autograder.grading.inputs import discover, student_id
from autograder.grading.sanitize import read_submission, sanitize
from autograder.notebook_format import grade_id

BWRAP = shutil.which("bwrap")
needs_bwrap = pytest.mark.skipif(
    BWRAP is None, reason="bubblewrap (bwrap) is not installed; install it with: apt-get install -y bubblewrap"
)
CHAPTER = find_chapter(CH)
GRADE_ARGS = ["--timeout", "10", "--memory-mb", "2048", "--processes", "64", "--workers", "2"]


def run_grade(submitted: Path, out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "autograder", "grade", str(submitted), "--out", str(out), *GRADE_ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def inprocess_score(replace: dict[str, str], student: str) -> float:
    """What the checks give these exercises when run in process (the reference for the batch),
    with the hidden inputs ``grade`` gives ``student`` (its salt)."""
    ns = namespace(CHAPTER, replace=replace)
    total = 0.0
    old = seeding.current_salt()
    seeding.set_salt(seeding.student_salt(student))
    try:
        for ex in CHAPTER.exercises:
            for hidden, points in ((False, ex.visible_points), (True, ex.hidden_points)):
                total += points if run_check(ex, ns, hidden=hidden).passed else 0
    finally:
        seeding.set_salt(old)
    return total


def expected_score(case) -> float:
    if case.score is None:
        return inprocess_score(case.replace, case.student)
    if case.score == -1:
        ex = next(e for e in CHAPTER.exercises if e.name == case.broken)
        return CHAPTER.max_score - ex.visible_points - ex.hidden_points
    return case.score


class Listener:
    """A TCP server on every interface of the grading machine that counts connections."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                continue

    def close(self):
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def host_ip() -> str:
    """An address of this machine other than loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """The whole catalogue, graded in one run of ``grade`` with the sandbox on."""
    if BWRAP is None:
        pytest.skip("bubblewrap (bwrap) is not installed; install it with: apt-get install -y bubblewrap")
    root = tmp_path_factory.mktemp("class")
    submitted, out = root / "submitted", root / "graded"
    listener = Listener()
    try:
        written = write_class(root / "build", submitted, port=listener.port, host_ip=host_ip(), grader_out=str(out))
        before = tree_hashes(submitted)
        started = time.monotonic()
        proc = run_grade(submitted, out)
        seconds = time.monotonic() - started
        time.sleep(0.5)
    finally:
        listener.close()
    results = {}
    for path in (out / ".grading" / "results" / CH).glob("*.json"):
        r = json.loads(path.read_text())
        results[r["student"]] = r
    return {
        "cases": {c.student: c for c in written},
        "submitted": submitted,
        "out": out,
        "proc": proc,
        "before": before,
        "after": tree_hashes(submitted),
        "results": results,
        "connections": listener.connections,
        "seconds": seconds,
    }


def _text(result: dict) -> str:
    parts = [result.get("message", "")] + result.get("notes", [])
    parts += [t["message"] for t in result.get("tests", [])] + [e["message"] for e in result.get("events", [])]
    return "\n".join(parts)


@pytest.mark.slow
@needs_bwrap
def test_batch_completes(batch):
    proc = batch["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(batch["results"]) == set(batch["cases"]), "every student has a result"
    assert "gradebook: consistent" in proc.stdout and "submitted files: all unchanged" in proc.stdout
    assert "grading [" in proc.stderr, "a progress bar on stderr"
    print(f"graded {len(batch['cases'])} submissions in {batch['seconds']:.0f} s")


@pytest.mark.slow
@needs_bwrap
@pytest.mark.parametrize("case", [c.student for c in cases()])
def test_each_student_scores_what_it_should(batch, case):
    spec = batch["cases"][case]
    r = batch["results"][case]
    assert r["status"] == spec.status, _text(r)
    assert r["score"] == pytest.approx(expected_score(spec)), f"{case} ({spec.what}): {_text(r)}"
    assert r["max_score"] == CHAPTER.max_score
    text = _text(r).lower()
    for phrase in spec.says:
        assert phrase.lower() in text, f"{case}: no {phrase!r} in:\n{_text(r)}"
    kinds = {e["kind"] for e in r["events"]}
    for wanted in spec.events:
        assert kinds & set(wanted.split("|")), f"{case}: expected an event {wanted}, got {sorted(kinds)}"
    assert r["unchanged"], "the submitted files did not change"
    if spec.flagged is not None:
        assert bool(r.get("flags")) == spec.flagged, f"{case}: flags {r.get('flags')}"
    feedback = batch["out"] / "feedback" / case / CH / f"{CH}.html"
    assert feedback.exists()
    page = feedback.read_text()
    assert f"Score: {r['score']:g} / {r['max_score']:g}" in page
    first = next((t for t in r["tests"] if not t["passed"]), None)
    if first:  # the diagnostic message reaches the feedback page
        assert html.escape(first["message"].splitlines()[0])[:60] in page


@pytest.mark.slow
@needs_bwrap
def test_submitted_files_and_gradebook_intact(batch):
    assert batch["before"] == batch["after"], "grading changed a submitted file"
    con = sqlite3.connect(batch["out"] / "gradebook.db")
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = con.execute("SELECT student_id, COUNT(*) FROM submitted_assignment GROUP BY student_id").fetchall()
        assert dict(rows) == {s: 1 for s in batch["cases"]}, "one submission per student, none lost or duplicated"
        n_cells = len(CHAPTER.exercises) * 2
        grades = con.execute(
            "SELECT sa.student_id, COUNT(g.id), SUM(g.auto_score IS NULL AND g.manual_score IS NULL) FROM grade g "
            "JOIN submitted_notebook sn ON g.notebook_id = sn.id JOIN submitted_assignment sa ON sn.assignment_id = sa.id "
            "GROUP BY sa.student_id"
        ).fetchall()
        assert {s: (n, missing) for s, n, missing in grades} == {s: (n_cells, 0) for s in batch["cases"]}
    finally:
        con.close()


@pytest.mark.slow
@needs_bwrap
def test_feedback_hides_hidden_tests(batch):
    source = nbformat.read(str(batch["out"] / "source" / CH / f"{CH}.ipynb"), as_version=4)
    _, hidden_lines = scrub_hidden(source)
    secret = [ln.strip() for ln in hidden_lines if len(ln.strip()) > 8]
    assert secret, "the chapter has hidden tests"
    for page in (batch["out"] / "feedback").rglob("*.html"):
        text = page.read_text()
        for line in secret:
            assert line not in text, f"{page}: shows hidden test code {line!r}"
    page = (batch["out"] / "feedback" / "correct" / CH / f"{CH}.html").read_text()
    assert "their code is not shown" in page


@pytest.mark.slow
@needs_bwrap
def test_grades_csv(batch):
    with open(batch["out"] / "grades.csv", newline="") as f:
        rows = {row["student_id"]: row for row in csv.DictReader(f)}
    assert set(rows) == set(batch["cases"])
    header = list(next(iter(rows.values())).keys())
    assert header[:11] == [
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
    for student, row in rows.items():
        r = batch["results"][student]
        assert float(row["score"]) == pytest.approx(r["score"])
        per_exercise = sum(float(row[e.name]) for e in CHAPTER.exercises)
        assert per_exercise == pytest.approx(r["score"]), f"{student}: exercise columns add up to the score"
        assert row["status"] == r["status"]


@pytest.mark.slow
@needs_bwrap
def test_sandbox_blocks_network_solutions_and_writes(batch):
    nb = json.loads((batch["out"] / "autograded" / "sandbox_probe" / CH / f"{CH}.ipynb").read_text())
    lines = [
        line
        for cell in nb["cells"]
        for out in cell.get("outputs", [])
        for line in "".join(out.get("text", "")).splitlines()
        if line.startswith("PROBE ")
    ]
    assert lines, "the probe cell ran"
    seen = json.loads(lines[0][6:])
    assert batch["connections"] == 0, "a kernel reached a server on the grading machine"
    for key in ("net_loopback", "net_host", "net_internet"):
        assert seen[key] != "connected", key
    assert "unreachable" in seen["net_internet"].lower() or "refused" in seen["net_internet"].lower()
    assert seen["solutions"] is False and "solutions" not in seen["repo"], seen["repo"]
    assert seen["course"] is False and seen["submitted"] is False, "the course directory and the submissions are hidden"
    for key in ("write_package", "write_course", "write_submitted", "write_usr"):
        assert seen[key] != "written", key
    assert seen["write_cwd"] == "written" and seen["write_tmp"] == "written", "its own folder and /tmp are writable"
    assert set(seen["caps"].values()) == {"0000000000000000"}, seen["caps"]
    assert seen["no_new_privs"] == ["1"]
    if os.geteuid() == 0:
        assert seen["uid"] != 0, "kernels do not run as root"
    assert not (ROOT / "autograder" / "pwned.txt").exists()
    assert not (batch["out"] / "pwned.txt").exists() and not (batch["submitted"] / "pwned.txt").exists()
    solutions_cell = json.loads((batch["out"] / "autograded" / "read_solutions" / CH / f"{CH}.ipynb").read_text())
    errors = [o for c in solutions_cell["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert any("No such file" in e["evalue"] and "solutions" in e["evalue"] for e in errors)


@pytest.mark.slow
@needs_bwrap
def test_rerun_grades_nothing_and_force_regrades_one(batch):
    out, submitted = batch["out"], batch["submitted"]
    stamp = {p: p.stat().st_mtime_ns for p in (out / ".grading" / "results" / CH).glob("*.json")}
    proc = run_grade(submitted, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{len(batch['cases'])} already graded, 0 to grade" in proc.stderr
    assert stamp == {p: p.stat().st_mtime_ns for p in stamp}
    proc = run_grade(submitted, out, "--force", "--student", "correct")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 to grade" in proc.stderr
    assert json.loads((out / ".grading" / "results" / CH / "correct.json").read_text())["score"] == CHAPTER.max_score


@pytest.mark.slow
@needs_bwrap
def test_kill_and_resume(tmp_path):
    """SIGKILL the grader mid-batch: no process survives it, and a rerun finishes the rest consistently."""
    students = [f"s{i}" for i in range(6)]
    build, submitted, out = tmp_path / "build", tmp_path / "submitted", tmp_path / "graded"
    rel = release_notebook(build, CHAPTER)
    for i, s in enumerate(students):
        nb = solved(rel, CHAPTER, {"softmax": WRONG_SOFTMAX} if i % 2 else None)
        folder = submitted / s / CH
        folder.mkdir(parents=True)
        (folder / f"{CH}.ipynb").write_text(nbformat.writes(nb))
    before = tree_hashes(submitted)
    cmd = [sys.executable, "-m", "autograder", "grade", str(submitted), "--out", str(out), *GRADE_ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / ".grading" / "results" / CH
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(results.glob("*.json"))) < 2:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")}
    assert 2 <= len(done_before) < len(students), "killed mid-batch"
    scratch = json.loads((out / ".grading" / "run.json").read_text())["scratch"]
    for _ in range(100):  # workers and sandboxes die with the grader
        if not _processes_mentioning([str(out), scratch]):
            break
        time.sleep(0.1)
    assert not _processes_mentioning([str(out), scratch]), "processes survived the killed grader"

    rerun = run_grade(submitted, out)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"{len(done_before)} already graded, {len(students) - len(done_before)} to grade" in rerun.stderr
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("*.json") if p.name in done_before} == done_before
    con = sqlite3.connect(out / "gradebook.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = dict(con.execute("SELECT student_id, COUNT(*) FROM submitted_assignment GROUP BY student_id").fetchall())
        assert rows == {s: 1 for s in students}
        nulls = con.execute("SELECT COUNT(*) FROM grade WHERE auto_score IS NULL AND manual_score IS NULL").fetchone()[0]
        assert nulls == 0
    finally:
        con.close()
    for i, s in enumerate(students):
        r = json.loads((results / f"{s}.json").read_text())
        assert r["score"] == (inprocess_score({"softmax": WRONG_SOFTMAX}, s) if i % 2 else CHAPTER.max_score), s
    assert tree_hashes(submitted) == before


@pytest.mark.slow
@needs_bwrap
def test_a_submission_that_kills_its_worker_is_retried_then_marked_crashed(tmp_path):
    """The local pool retries a submission whose worker died (``--attempts``), then gives up on it: ``crashed``."""
    build, submitted, out = tmp_path / "build", tmp_path / "submitted", tmp_path / "graded"
    rel = release_notebook(build, CHAPTER)
    for s in ("ann", "toxic"):
        folder = submitted / s / CH
        folder.mkdir(parents=True)
        (folder / f"{CH}.ipynb").write_text(nbformat.writes(solved(rel, CHAPTER)))
    (submitted / "toxic" / CH / "marker.txt").write_text("kill my worker")  # copied into its kernel's folder
    cmd = [sys.executable, "-m", "autograder", "grade", str(submitted), "--out", str(out), *GRADE_ARGS, "--attempts", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: set[int] = set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            scratch = Path(json.loads((out / ".grading" / "run.json").read_text())["scratch"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
            continue
        for marker in scratch.glob("w*/k*/work/marker.txt"):
            for pid in _processes_mentioning([str(marker.parents[2])]):  # the worker's sandbox processes
                parent = _parent(pid)
                if parent and _parent(parent) == proc.pid and parent not in killed:  # a worker: a child of grade
                    try:
                        os.kill(parent, signal.SIGKILL)
                        killed.add(parent)
                    except ProcessLookupError:
                        pass
                    shutil.rmtree(marker.parents[1], ignore_errors=True)  # the dead worker's kernel folder
                    break
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=60)
    assert len(killed) == 2, f"two attempts, two dead workers: {killed}\n{stderr[-2000:]}"
    assert proc.returncode == 1, stdout[-2000:] + stderr[-2000:]
    assert "trying it again (1 of 2)" in stderr and "were given up on" in stdout
    r = json.loads((out / ".grading" / "results" / CH / "toxic.json").read_text())
    assert r["status"] == "crashed" and "stopped the grading worker each time it was tried (2 times" in r["message"]
    assert json.loads((out / ".grading" / "results" / CH / "ann.json").read_text())["score"] == CHAPTER.max_score
    with open(out / "grades.csv", newline="") as f:
        assert {row["student_id"]: row["status"] for row in csv.DictReader(f)} == {"ann": "graded", "toxic": "crashed"}
    rerun = run_grade(submitted, out)
    assert "2 already graded, 0 to grade" in rerun.stderr, "a crashed submission is not retried by later runs"


def _parent(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().split(")")[-1].split()[1])
    except (OSError, ValueError):
        return None


def _processes_mentioning(needles: list[str]) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if (d / "stat").read_text().split(")")[-1].split()[0] == "Z":
                continue
        except OSError:
            continue
        if any(n in cmd for n in needles):
            found.append(int(d.name))
    return found


# -- fast tests: no kernels --------------------------------------------------------------


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return release_notebook(tmp_path_factory.mktemp("release"), CHAPTER)


def test_refuses_without_bwrap_and_says_how_to_fix_it(monkeypatch, capsys, tmp_path):
    from autograder import grade, sandbox

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    args = argparse.Namespace(out=str(tmp_path / "out"), submissions=str(tmp_path), no_sandbox=False, quiet=True)
    assert grade.main(args) == 2
    err = capsys.readouterr().err
    assert "apt-get install -y bubblewrap" in err and "--no-sandbox" in err
    assert not (tmp_path / "out").exists(), "nothing was graded or written"


def test_read_submission_problems(tmp_path, release):
    cases_ = {
        "empty.ipynb": (b"", "empty"),
        "blank.ipynb": (b"  \n", "empty"),
        "bad.ipynb": (b'{"cells": [', "invalid JSON"),
        "list.ipynb": (b"[1, 2]", "not a notebook"),
        "latin1.ipynb": ('{"a": "\xe9"}'.encode("latin-1"), "not UTF-8"),
    }
    for name, (data, phrase) in cases_.items():
        (tmp_path / name).write_bytes(data)
        nb, _, problem = read_submission(tmp_path / name)
        assert nb is None and phrase in problem, (name, problem)
    big = tmp_path / "big.ipynb"
    big.write_bytes(b" " * (2 * 1024 * 1024))
    assert "limit" in read_submission(big, max_mb=1)[2]
    (tmp_path / "link.ipynb").symlink_to(tmp_path / "empty.ipynb")
    assert "link" in read_submission(tmp_path / "link.ipynb")[2]
    v3 = tmp_path / "v3.ipynb"
    v3.write_text(nbformat.writes(nbformat.convert(copy.deepcopy(release), 3), version=3))
    nb, notes, problem = read_submission(v3)
    assert problem is None and nb.nbformat == 4 and any("nbformat 3" in n for n in notes)


def test_sanitize_restores_structure(release):
    nb = solved(release, CHAPTER)
    ids = [grade_id(c) for c in nb.cells if grade_id(c)]
    broken = copy.deepcopy(nb)
    i = next(k for k, c in enumerate(broken.cells) if grade_id(c) == "test_softmax")
    broken.cells[i].source = "print('all good')"  # edited test
    broken.cells.insert(i, copy.deepcopy(broken.cells[i]))  # duplicated test
    del broken.cells[next(k for k, c in enumerate(broken.cells) if grade_id(c) == "hidden_attend")]  # deleted test
    setup = next(k for k, c in enumerate(broken.cells) if grade_id(c) == "setup")
    broken.cells.insert(setup, nbformat.v4.new_code_cell("import numpy as np\nnp.allclose = lambda *a, **k: True"))
    broken.cells[-1].metadata["nbgrader"] = {"grade_id": "made_up", "grade": True, "points": 100}
    broken.metadata["kernelspec"] = {"name": "evil", "display_name": "x", "language": "python"}
    for c in broken.cells:
        if c.cell_type == "code":
            c.outputs = [nbformat.v4.new_output("stream", name="stdout", text="old")]
    clean, notes = sanitize(broken, release)
    assert [grade_id(c) for c in clean.cells if grade_id(c)] == ids
    by_id = {grade_id(c): c for c in clean.cells if grade_id(c)}
    rel_by_id = {grade_id(c): c for c in release.cells if grade_id(c)}
    assert by_id["test_softmax"].source == rel_by_id["test_softmax"].source
    assert by_id["softmax"].source == next(c.source for c in nb.cells if grade_id(c) == "softmax")
    first_code = next(c for c in clean.cells if c.cell_type == "code")
    assert grade_id(first_code) == "setup", "the setup cell runs first"
    assert clean.metadata["kernelspec"] == release.metadata["kernelspec"]
    assert all(not c.outputs for c in clean.cells if c.cell_type == "code")
    assert len({c["id"] for c in clean.cells}) == len(clean.cells)
    text = "\n".join(notes)
    for phrase in ("edited", "second copy", "hidden_attend` was missing", "unknown grade id", "setup cell runs first", "kernel"):
        assert phrase in text, phrase
    nbformat.validate(clean)


def test_sanitize_joins_a_split_exercise_and_restores_a_deleted_one(release):
    nb = solved(release, CHAPTER)
    i = next(k for k, c in enumerate(nb.cells) if grade_id(c) == "attend")
    lines = nb.cells[i].source.splitlines()
    second = copy.deepcopy(nb.cells[i])
    nb.cells[i].source, second.source = "\n".join(lines[:3]), "\n".join(lines[3:])
    nb.cells.insert(i + 1, second)
    del nb.cells[next(k for k, c in enumerate(nb.cells) if grade_id(c) == "softmax")]
    clean, notes = sanitize(nb, release)
    attend = [c for c in clean.cells if grade_id(c) == "attend"]
    assert len(attend) == 1 and attend[0].source.splitlines() == lines
    softmax = next(c for c in clean.cells if grade_id(c) == "softmax")
    assert "NotImplementedError" in softmax.source, "a deleted exercise comes back unsolved"
    assert any("split in two" in n for n in notes) and any("`softmax` was missing" in n for n in notes)


def test_discover_tree_flat_and_zip(tmp_path, release):
    nb = nbformat.writes(solved(release, CHAPTER))
    tree = tmp_path / "course" / "submitted"
    (tree / "ann" / CH).mkdir(parents=True)
    (tree / "ann" / CH / f"{CH}.ipynb").write_text(nb)
    (tree / "bo b" / CH).mkdir(parents=True)
    (tree / "bo b" / CH / "Copy of homework.ipynb").write_text(nb)
    (tree / "cy" / CH).mkdir(parents=True)
    (tree / "cy" / CH / "data.csv").write_text("1,2")
    subs, problems = discover(tmp_path / "course", tmp_path / "out")
    by = {s.student: s for s in subs}
    assert set(by) == {"ann", "bo_b", "cy"} and not problems
    assert by["cy"].notebook is None and by["bo_b"].notebook.endswith("Copy of homework.ipynb")
    assert any("instead of" in n for n in by["bo_b"].notes)

    flat = tmp_path / "lms"
    flat.mkdir()
    (flat / f"smithj_12345_67890_{CH}.ipynb").write_text(nb)
    (flat / "doe_late_1.ipynb").write_text(nb)  # chapter from the content
    time.sleep(0.01)
    (flat / "doe_late_2.ipynb").write_text(nb)  # a resubmission: the newer one counts
    (flat / "garbage_x.ipynb").write_text("{not json")  # chapter unknown, but it is the only one here
    subs, problems = discover(flat, tmp_path / "out2")
    by = {s.student: s for s in subs}
    assert set(by) == {"smithj", "doe", "garbage"}, problems
    assert by["doe"].notebook.endswith("doe_late_2.ipynb") and any("newer" in n for n in by["doe"].notes)
    subs, _ = discover(flat, tmp_path / "out3", pattern=r"^[^_]+_(?P<student>\d+)")
    assert {s.student for s in subs} == {"12345"}

    archive = tmp_path / "download.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"Ann Lee_1001_assignsubmission_file_/{CH}.ipynb", nb)
        zf.writestr("../escape.ipynb", nb)
        zf.writestr("/abs.ipynb", nb)
    subs, _ = discover(archive, tmp_path / "out4")
    assert [s.student for s in subs] == ["Ann_Lee"]
    assert not (tmp_path / "escape.ipynb").exists() and not Path("/abs.ipynb").exists()


def test_student_ids_are_safe():
    assert student_id("Ann Lee") == "Ann_Lee"
    assert student_id("../../etc") == "etc"
    assert student_id("a/b\\c") == "a_b_c"
    assert student_id("...").startswith("unknown-")


def test_harmless_stderr_pattern():
    import re

    rx = re.compile(DEFAULT_HARMLESS_STDERR)
    for line in (
        "/x/y.py:12: DeprecationWarning: old",
        "  warnings.warn('old', DeprecationWarning)",
        "[W NNPACK.cpp:64] Could not initialize NNPACK! Reason: Unsupported hardware.",
        "[W1121 12:00:00.123456 123 NNPACK.cpp:57] Could not initialize NNPACK!",
        "/x/y.py:3: UserWarning: something",
    ):
        assert rx.match(line), line
    for line in ("Traceback (most recent call last):", "debug: softmax called", "AssertionError: wrong"):
        assert not rx.match(line), line


def test_suspicious_code_is_flagged_not_penalised():
    from autograder.grading.sanitize import suspicious

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(src)
        for src in (
            "import numpy as np\nnp.allclose = lambda *a, **k: True",
            "ip = get_ipython()\nip.run_cell_async = None",
            "from autograder.checks import common\ncommon.expect_close = print",
            "import os\nos._exit(0)",
            "def softmax(x, axis=-1):\n    e = np.exp(x - x.max(axis, keepdims=True))\n    return e / e.sum(axis, keepdims=True)",
        )
    ]
    flags = "\n".join(suspicious(nb))
    for phrase in ("cell 1: replaces np.allclose", "cell 2: replaces ip.run_cell_async", "cell 3: imports the course's checks"):
        assert phrase in flags
    assert "os._exit" in flags and "cell 5" not in flags


def test_exit_statuses_are_explained():
    from autograder.sandbox import describe_exit

    assert "SIGSEGV" in describe_exit(-11) and "segmentation fault" in describe_exit(139)
    assert "CPU time" in describe_exit(-24)
    assert "status 3" in describe_exit(3)
