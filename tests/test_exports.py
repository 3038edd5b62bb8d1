"""``export``: Gradescope's results.json and autograder zip, and a Canvas gradebook CSV.

The Gradescope bundle is tried end to end: unzipped into a folder laid out as Gradescope's
``/autograder`` (``source/``, ``submission/``, ``submission_metadata.json``), its
``run_autograder`` grades a wrong notebook and an unreadable one with ``check --json`` and
must leave ``results/results.json`` in Gradescope's format with the scores and messages
``check`` gave.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
from hostile.catalogue import CH, WRONG_SOFTMAX, release_notebook, solved

from autograder.course import CHAPTERS, ROOT, find_chapter
from autograder.grading import exports

CHAPTER = find_chapter(CH)
VISIBILITIES = {"visible", "hidden", "after_due_date", "after_published"}


def assert_gradescope_format(doc: dict) -> None:
    """Gradescope's autograder results: a numeric score, tests with name/score/max_score/output/visibility."""
    assert isinstance(doc["score"], float)
    assert doc.get("visibility", "visible") in VISIBILITIES and doc.get("stdout_visibility", "visible") in VISIBILITIES
    for t in doc["tests"]:
        assert set(t) >= {"name", "score", "max_score", "output", "visibility"}, t
        assert isinstance(t["score"], float) and isinstance(t["max_score"], float) and 0 <= t["score"] <= t["max_score"]
        assert t["visibility"] in VISIBILITIES and t["status"] in ("passed", "failed")
    json.dumps(doc)


def test_results_json_from_a_grade_result_and_from_check():
    tests = [
        {"grade_id": "test_softmax", "points": 2.0, "max_points": 2.0, "passed": True, "message": ""},
        {"grade_id": "hidden_softmax", "points": 0.0, "max_points": 3.0, "passed": False, "message": "got NaN\nLikely mistake"},
    ]
    result = {"status": "graded", "score": 2.0, "max_score": 5.0, "tests": tests, "notes": ["the notebook was renamed"]}
    doc = exports.gradescope_results(result, hidden_visibility="after_due_date")
    assert_gradescope_format(doc)
    assert doc["score"] == 2.0 and [t["score"] for t in doc["tests"]] == [2.0, 0.0]
    assert doc["tests"][1]["output"] == "got NaN\nLikely mistake" and doc["tests"][1]["visibility"] == "after_due_date"
    assert doc["tests"][0]["visibility"] == "visible" and "renamed" in doc["output"]

    ungradable = exports.gradescope_from_check("", CH, "cannot grade: x.ipynb: the notebook file is empty (0 bytes)\n")
    assert_gradescope_format(ungradable)
    assert ungradable["score"] == 0.0 and "the notebook file is empty" in ungradable["output"]
    crashed = exports.gradescope_results({**result, "status": "crashed", "message": "stopped the worker", "tests": []})
    assert crashed["score"] == 0.0 and "crashed" in crashed["output"]
    with pytest.raises(ValueError, match="visibility"):
        exports.gradescope_results(result, hidden_visibility="sometimes")


def _grades_csv(course: Path, rows: list[dict]) -> None:
    course.mkdir(parents=True, exist_ok=True)
    keys = ["assignment", "student_id", "last_name", "first_name", "score", "max_score", "status", "message"]
    with open(course / "grades.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})


def test_canvas_csv_with_and_without_a_roster(tmp_path):
    other = CHAPTERS[1].slug
    course = tmp_path / "course"
    _grades_csv(
        course,
        [
            {"assignment": CH, "student_id": "ann", "last_name": "Lee", "first_name": "Ann", "score": "11.0", "status": "graded"},
            {"assignment": CH, "student_id": "bob", "score": "0.0", "status": "ungradable"},
            {"assignment": CH, "student_id": "cy", "score": "0.0", "status": "crashed"},
            {"assignment": other, "student_id": "ann", "score": "7.5", "status": "graded"},
            {"assignment": other, "student_id": "bob", "score": "0", "status": "no submission"},
        ],
    )
    rows = list(csv.reader(io.StringIO(exports.canvas_csv(course))))
    assert rows[0] == ["Student", "ID", "SIS User ID", "Section", CH, other]
    assert rows[1][0].strip() == "Points Possible" and rows[1][4:] == [
        f"{CHAPTER.max_score:g}",
        f"{find_chapter(other).max_score:g}",
    ]
    body = {r[2]: r for r in rows[2:]}
    assert body["ann"][0] == "Lee, Ann" and body["ann"][4:] == ["11.0", "7.5"]
    assert body["bob"][4:] == ["0.0", ""], "ungradable scores 0; no submission stays empty"
    assert body["cy"][4:] == ["", ""], "a crashed submission is not a grade"

    roster = tmp_path / "roster.csv"
    roster.write_text(
        "Student,ID,SIS User ID,SIS Login ID,Section,Old assignment (123)\n"
        "    Points Possible,,,,,10\n"
        '"Lee, Ann",501,ann,alee,Sec A,9\n'
        '"Doe, Dan",502,dan,ddoe,Sec B,8\n'
    )
    rows = list(csv.reader(io.StringIO(exports.canvas_csv(course, roster))))
    assert [r[:4] for r in rows[2:]] == [["Lee, Ann", "501", "ann", "Sec A"], ["Doe, Dan", "502", "dan", "Sec B"]]
    assert rows[2][4:] == ["11.0", "7.5"] and rows[3][4:] == ["", ""]
    assert exports.unmatched(course, roster) == ["bob", "cy"]
    with pytest.raises(ValueError, match="no column 'Email'"):
        exports.canvas_csv(course, roster, match="Email")
    proc = subprocess.run(
        [sys.executable, "-m", "autograder", "export", "canvas", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "no grades.csv" in proc.stderr


@pytest.mark.slow
def test_gradescope_bundle_runs_check_and_writes_results_json(tmp_path):
    bundle = tmp_path / "autograder.zip"
    proc = subprocess.run(
        [sys.executable, "-m", "autograder", "export", "gradescope-bundle", "--chapter", CH[:2], "--out", str(bundle)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        for script in ("setup.sh", "run_autograder"):
            assert script in names, "Gradescope wants both scripts at the root of the zip"
            assert (zf.getinfo(script).external_attr >> 16) & stat.S_IXUSR, f"{script} is executable"
        assert {"course/pyproject.toml", "course/autograder/__init__.py", "course/autograder/checks/common.py"} <= names
        assert f"course/chapters/{CH}.ipynb" in names and f'CHAPTER="{CH}"' in zf.read("run_autograder").decode()
        zf.extractall(tmp_path / "autograder" / "source")

    rel = release_notebook(tmp_path / "build", CHAPTER)
    env = {**os.environ, "AUTOGRADER_ROOT": str(tmp_path / "autograder"), "PYTHON": sys.executable, "PATH": os.environ["PATH"]}
    env["PYTHONPATH"] = str(ROOT)  # the bundle's course is what setup.sh installs; here: this checkout
    env.pop("VIRTUAL_ENV", None)
    root = tmp_path / "autograder"
    (root / "submission_metadata.json").write_text(json.dumps({"users": [{"id": "4242", "email": "ann@example.org"}]}))
    seen = {}
    for kind, replace in (("wrong", {"softmax": WRONG_SOFTMAX}),):
        sub = root / "submission"
        if sub.exists():
            for p in sub.iterdir():
                p.unlink()
        sub.mkdir(exist_ok=True)
        (sub / "my homework.ipynb").write_text(nbformat.writes(solved(rel, CHAPTER, replace)))
        run = subprocess.run(
            ["bash", str(root / "source" / "run_autograder")], env=env, capture_output=True, text=True, timeout=300
        )
        doc = json.loads((root / "results" / "results.json").read_text())
        assert_gradescope_format(doc)
        seen[kind] = doc
        if kind == "wrong":  # the per-test scores and messages are those of the check run_autograder ran
            expected = json.loads((root / "results" / "check.json").read_text())
            assert expected["notebook"].endswith("my homework.ipynb")
            assert doc["score"] == expected["score"], run.stdout[-2000:] + run.stderr[-2000:]
            assert [t["score"] for t in doc["tests"]] == [t["points"] for t in expected["tests"]]
            assert [t["output"] for t in doc["tests"]] == [t["message"] or "passed" for t in expected["tests"]]
    assert CHAPTER.max_score > seen["wrong"]["score"] > 0
    assert any(t["status"] == "passed" for t in seen["wrong"]["tests"])
    assert any(t["status"] == "failed" and "softmax" in t["name"] for t in seen["wrong"]["tests"])

    for p in (root / "submission").iterdir():
        p.unlink()
    (root / "submission" / "x.ipynb").write_text("{not json")
    subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, capture_output=True, text=True, timeout=300)
    doc = json.loads((root / "results" / "results.json").read_text())
    assert doc["score"] == 0.0 and doc["tests"] == [] and "invalid JSON" in doc["output"]
