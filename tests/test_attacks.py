"""Attacks on the grade (``tests/hostile/attacks.py``), on a NumPy chapter and a PyTorch chapter.

Each attack goes into a **blank** notebook (the release notebook, every exercise unsolved) and a
**correct** one (the reference solutions). Graded by ``python -m autograder grade`` (sandbox on)
and by ``check``'s engine (:func:`autograder.check.grade_batch`, the code behind
``python -m autograder check``):

* the blank notebook scores 0 on every exercise, whatever the attack;
* the correct notebook keeps the points of every exercise the attack does not replace;
* ``check`` and ``grade`` give the same score and the same message for every test;
* the grade is flagged for the instructor where the attack can be seen in the source.

To keep the batch short the notebooks keep only their setup, exercise and test cells (a student
may delete the rest). The tests need bubblewrap (``apt-get install -y bubblewrap``).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from hostile.attacks import ATTACKS, render
from hostile.catalogue import release_notebook, solved

from autograder.check import grade_batch
from autograder.course import ROOT, find_chapter
from autograder.notebook_format import grade_id

BWRAP = shutil.which("bwrap")
CHAPTERS = [find_chapter("01"), find_chapter("02")]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        BWRAP is None, reason="bubblewrap (bwrap) is not installed; install it with: apt-get install -y bubblewrap"
    ),
]


def _trim(nb):
    """Only the setup, exercise and test cells (and the prose)."""
    nb = copy.deepcopy(nb)
    keep = []
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell.cell_type != "code" or meta.get("grade_id"):
            keep.append(cell)
    nb.cells = keep
    return nb


def _with_attack(nb, attack, chapter):
    nb = copy.deepcopy(nb)
    target = chapter.exercises[-1].name
    source = render(attack, chapter.key, target)
    if attack.exercise:
        for cell in nb.cells:
            if grade_id(cell) == target:
                cell.source = source
        return nb
    at = next(i for i, c in enumerate(nb.cells) if grade_id(c) == "setup")
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source))
    return nb


def _student(form: str, chapter, attack=None) -> str:
    return f"{form}-{chapter.key}" + (f"-{attack.name}" if attack else "")


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every attack in both forms of both chapters, graded by ``grade`` in one batch."""
    root = tmp_path_factory.mktemp("attacks")
    submitted, out = root / "submitted", root / "out"
    cases = {}
    for chapter in CHAPTERS:
        release = _trim(release_notebook(root / "build", chapter))
        correct = solved(release, chapter)
        for form, base in (("blank", release), ("correct", correct)):
            for attack in [None, *ATTACKS]:
                student = _student(form, chapter, attack)
                nb = base if attack is None else _with_attack(base, attack, chapter)
                folder = submitted / student / chapter.slug
                folder.mkdir(parents=True)
                nbformat.write(nb, str(folder / f"{chapter.slug}.ipynb"))
                cases[student] = (form, chapter, attack, folder / f"{chapter.slug}.ipynb")
    cmd = [sys.executable, "-m", "autograder", "grade", str(submitted), "--out", str(out), "--workers", "2", "--timeout", "20"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    results = {}
    for chapter in CHAPTERS:
        for path in (out / ".grading" / "results" / chapter.slug).glob("*.json"):
            r = json.loads(path.read_text())
            results[r["student"]] = r
    return {"cases": cases, "results": results, "proc": proc, "out": out}


def _params(form: str):
    return [pytest.param(c, a, id=f"{c.key}-{a.name}") for c in CHAPTERS for a in ATTACKS] + [
        pytest.param(c, None, id=f"{c.key}-none") for c in CHAPTERS
    ]


def _points(result: dict) -> dict[str, float]:
    return {t["grade_id"]: t["points"] for t in result["tests"]}


@pytest.mark.parametrize(("chapter", "attack"), _params("blank"))
def test_blank_notebook_scores_zero(graded, chapter, attack):
    r = graded["results"][_student("blank", chapter, attack)]
    assert r["status"] == "graded", r.get("message")
    assert r["score"] == 0, {t["grade_id"]: (t["points"], t["message"][:120]) for t in r["tests"] if t["points"]}
    assert all(not t["passed"] for t in r["tests"])
    if attack is not None and attack.flagged:
        assert r.get("flags"), f"{attack.name} is not flagged"


@pytest.mark.parametrize(("chapter", "attack"), _params("correct"))
def test_correct_notebook_keeps_its_points(graded, chapter, attack):
    r = graded["results"][_student("correct", chapter, attack)]
    assert r["status"] == "graded", r.get("message")
    replaced = chapter.exercises[-1] if attack is not None and attack.exercise else None
    for ex in chapter.exercises:
        points = _points(r)
        for gid, full in ((ex.visible_id, ex.visible_points), (ex.hidden_id, ex.hidden_points)):
            want = 0 if ex is replaced else full
            message = next(t["message"] for t in r["tests"] if t["grade_id"] == gid)
            assert points[gid] == want, f"{gid}: {points[gid]} of {full} ({message[:300]})"
    if attack is not None and attack.flagged:
        assert r.get("flags"), f"{attack.name} is not flagged"


def test_the_batch_finishes_and_the_gradebook_is_consistent(graded):
    proc = graded["proc"]
    assert "gradebook: consistent" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted files: all unchanged" in proc.stdout
    assert len(graded["results"]) == len(graded["cases"])


def test_check_gives_the_grade(graded):
    """``check``'s engine on one attack of each class (blank: both chapters; correct: the PyTorch one):
    the same scores and the same messages as ``grade``."""
    chosen: dict = {}
    seen = set()
    for student, (form, chapter, attack, path) in graded["cases"].items():
        kind = attack.kind if attack is not None else None
        if (form, chapter.key, kind) in seen or (form == "correct" and chapter.key != "ch02"):
            continue  # one attack of each class per chapter and form
        seen.add((form, chapter.key, kind))
        chosen.setdefault(chapter, {})[student] = path
    for chapter, subs in chosen.items():
        reports = grade_batch(chapter, subs, cell_timeout=20, sandbox=True)
        for student, report in reports.items():
            r = graded["results"][student]
            assert report.score == r["score"], student
            got = {t.grade_id: (t.points, t.message) for t in report.tests}
            want = {t["grade_id"]: (t["points"], t["message"]) for t in r["tests"]}
            assert got == want, student


def test_check_command_matches_grade_for_one_student(graded, tmp_path):
    student = _student("correct", CHAPTERS[1], ATTACKS[0])
    path: Path = graded["cases"][student][3]
    cmd = [sys.executable, "-m", "autograder", "check", str(path), "--json", "--student", student]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    r = graded["results"][student]
    assert report["score"] == r["score"] == r["max_score"]
    assert [(t["grade_id"], t["message"]) for t in report["tests"]] == [(t["grade_id"], t["message"]) for t in r["tests"]]
