"""Grades out of the course directory, in the formats instructors upload: Gradescope and Canvas.

* :func:`gradescope_results`: one submission as Gradescope's autograder ``results.json``
  (``{"score", "output", "tests": [{"name", "score", "max_score", "status", "output",
  "visibility"}], ...}``), from a ``grade`` result file or from ``check --json``'s report.
* :func:`gradescope_bundle`: the zip Gradescope's "autograder" assignments take: ``setup.sh``
  installs this course package, ``run_autograder`` runs ``check --json`` on the notebook in
  ``/autograder/submission`` and converts its report to ``/autograder/results/results.json``.
* :func:`canvas_csv`: a gradebook CSV in the layout Canvas imports (``Student, ID, SIS User ID,
  Section``, then a column of points per assignment, after a "Points Possible" row), from
  ``grades.csv``; with a roster (a Canvas gradebook export) the students' Canvas ids are kept.

nbgrader's own ``nbgrader export`` works on the course directory as well.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import zipfile
from pathlib import Path

from autograder.course import ROOT, find_chapter

VISIBILITIES = ("visible", "hidden", "after_due_date", "after_published")
CANVAS_COLUMNS = ["Student", "ID", "SIS User ID", "Section"]


# -- Gradescope results.json -----------------------------------------------------------


def gradescope_results(report: dict, hidden_visibility: str = "visible") -> dict:
    """Gradescope's ``results.json`` for one graded notebook.

    ``report``: a ``grade`` result (``.grading/results/<chapter>/<student>.json``: ``status``,
    ``score``, ``max_score``, ``tests``, ``message``, ``notes``, ``events``) or ``check --json``'s
    report (``notebook``, ``score``, ``max_score``, ``tests``); each test ``{"grade_id", "points",
    "max_points", "passed", "message"}``. Hidden tests get ``hidden_visibility`` (the feedback
    pages show their messages, so ``visible`` by default).
    """
    if hidden_visibility not in VISIBILITIES:
        raise ValueError(f"visibility must be one of {', '.join(VISIBILITIES)}, not {hidden_visibility!r}")
    status = report.get("status", "graded")
    tests = []
    for t in report.get("tests", []):
        hidden = t["grade_id"].startswith("hidden_")
        exercise = t["grade_id"].split("_", 1)[1] if "_" in t["grade_id"] else t["grade_id"]
        tests.append(
            {
                "name": f"{exercise} ({'hidden' if hidden else 'visible'} test {t['grade_id']})",
                "score": float(t["points"]),
                "max_score": float(t["max_points"]),
                "status": "passed" if t["passed"] else "failed",
                "output": "passed" if t["passed"] else (t.get("message") or "failed"),
                "visibility": hidden_visibility if hidden else "visible",
            }
        )
    lines = []
    if status != "graded":
        lines.append(f"This notebook could not be graded ({status}): {report.get('message', '')}")
    notes = list(report.get("notes", [])) + [e["message"] for e in report.get("events", [])]
    if notes:
        lines += ["What the grader noticed:"] + [f"- {n}" for n in notes]
    score = float(report.get("score", 0.0)) if status in ("graded", "ungradable") else 0.0
    out = {
        "score": score,
        "output": "\n".join(lines) or f"Score: {score:g} / {float(report.get('max_score', 0)):g}",
        "visibility": "visible",
        "stdout_visibility": "hidden",
        "tests": tests,
    }
    return out


def gradescope_from_check(check_json: str, chapter: str, stderr: str = "") -> dict:
    """``results.json`` from the text ``check --json`` printed (empty or invalid when it could not grade:
    then ``stderr`` holds the reason, and the score is 0)."""
    max_score = find_chapter(chapter).max_score
    try:
        report = json.loads(check_json)
        if not isinstance(report, dict) or "tests" not in report:
            raise ValueError("not a report")
    except ValueError:
        reason = " ".join(stderr.strip().splitlines()[-3:]) or "the grader produced no report"
        reason = reason.removeprefix("cannot grade: ")
        return gradescope_results({"status": "ungradable", "score": 0.0, "max_score": max_score, "message": reason})
    return gradescope_results(report)


def export_gradescope(course: Path, out: Path, hidden_visibility: str = "visible") -> list[Path]:
    """``OUT/<chapter>/<student>/results.json`` for every graded submission of the course directory."""
    written = []
    for path in sorted((Path(course) / ".grading" / "results").glob("*/*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        target = Path(out) / result["assignment"] / result["student"] / "results.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(gradescope_results(result, hidden_visibility), indent=1) + "\n")
        written.append(target)
    return written


# -- Gradescope autograder bundle ------------------------------------------------------

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image.
set -euo pipefail
apt-get install -y -qq python3.11 python3.11-venv >/dev/null 2>&1 || apt-get install -y -qq python3-venv >/dev/null
PY=$(command -v python3.11 || command -v python3)
"$PY" -m venv /autograder/venv
/autograder/venv/bin/pip install --quiet --upgrade pip
/autograder/venv/bin/pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
/autograder/venv/bin/pip install --quiet "/autograder/source/course[pinned,grade]"
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for every submission; it must leave results/results.json.
# AUTOGRADER_ROOT and PYTHON exist to try the bundle outside Gradescope.
set -u
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
PY="${{PYTHON:-$ROOT/venv/bin/python}}"
CHAPTER="{chapter}"
mkdir -p "$ROOT/results"
NB=$(find "$ROOT/submission" -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' 2>/dev/null | sort | head -n 1)
STUDENT=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["users"][0]["id"])' \\
  "$ROOT/submission_metadata.json" 2>/dev/null || echo student)
cd "$ROOT/source"
"$PY" -m autograder check --json --chapter "$CHAPTER" --student "$STUDENT" "${{NB:-$ROOT/submission/no-notebook.ipynb}}" \\
  > "$ROOT/results/check.json" 2> "$ROOT/results/check.err"
"$PY" -m autograder export gradescope-results "$ROOT/results/check.json" --stderr "$ROOT/results/check.err" \\
  --chapter "$CHAPTER" --out "$ROOT/results/results.json"
cat "$ROOT/results/check.err"
"""

BUNDLED = ("pyproject.toml", "README.md", "LICENSE", "autograder", "solutions", "chapters")


def _course_files() -> list[str]:
    """The course package's files (tracked files of the checkout when it is one)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", *BUNDLED], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if listed:
            return listed
    except (OSError, subprocess.CalledProcessError):
        pass
    files = []
    for top in BUNDLED:
        p = ROOT / top
        if p.is_file():
            files.append(top)
        for f in sorted(p.rglob("*")) if p.is_dir() else []:
            if f.is_file() and "__pycache__" not in f.parts and not f.name.endswith(".pyc"):
                files.append(str(f.relative_to(ROOT)))
    return files


def gradescope_bundle(chapter: str, out: Path) -> Path:
    """Write the autograder zip for ``chapter`` to ``out``: ``setup.sh``, ``run_autograder`` and ``course/``."""
    ch = find_chapter(chapter)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in (("setup.sh", SETUP_SH), ("run_autograder", RUN_AUTOGRADER.format(chapter=ch.slug))):
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o755) << 16
            zf.writestr(info, text)
        for rel in _course_files():
            path = ROOT / rel
            if path.is_file():
                zf.write(path, f"course/{rel}")
    os.replace(tmp, out)
    return out


# -- Canvas ----------------------------------------------------------------------------


def canvas_csv(course: Path, roster: Path | None = None, match: str = "SIS User ID") -> str:
    """A Canvas gradebook import: one row per student, one column of points per assignment.

    Points come from ``grades.csv`` (nbgrader's score after any late penalty). ``ungradable``
    scores 0; ``error``, ``crashed`` and "no submission" stay empty (not graded). With ``roster``
    (a CSV exported from Canvas's gradebook) the students are the roster's, matched on its
    ``match`` column against the student ids; graded students missing from the roster are left
    out (:func:`unmatched` lists them).
    """
    grades = _read_grades(course)
    assignments = sorted({r["assignment"] for r in grades})
    points: dict[str, dict[str, str]] = {}
    names: dict[str, str] = {}
    for r in grades:
        value = r["score"] if r["status"] in ("graded", "ungradable") else ""
        points.setdefault(r["student_id"], {})[r["assignment"]] = value
        full = ", ".join(x for x in (r.get("last_name"), r.get("first_name")) if x)
        if full or r["student_id"] not in names:
            names[r["student_id"]] = full or r["student_id"]
    max_points = {a: f"{find_chapter(a).max_score:g}" for a in assignments}
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CANVAS_COLUMNS + assignments)
    writer.writerow(["    Points Possible", "", "", ""] + [max_points[a] for a in assignments])
    if roster is None:
        for sid in sorted(points):
            writer.writerow([names[sid], "", sid, ""] + [points[sid].get(a, "") for a in assignments])
        return buf.getvalue()
    for row in _read_roster(roster, match):
        sid = row.get(match, "").strip()
        if not sid or "Points Possible" in row.get("Student", ""):
            continue
        got = points.get(sid, {})
        writer.writerow([row.get(c, "") for c in CANVAS_COLUMNS] + [got.get(a, "") for a in assignments])
    return buf.getvalue()


def unmatched(course: Path, roster: Path, match: str = "SIS User ID") -> list[str]:
    """Student ids with grades that the roster does not list."""
    ids = {row.get(match, "").strip() for row in _read_roster(roster, match)}
    return sorted({r["student_id"] for r in _read_grades(course)} - ids)


def _read_grades(course: Path) -> list[dict]:
    path = Path(course) / "grades.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no grades.csv here; run `python -m autograder grade ... --out {course}` first")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_roster(roster: Path, match: str) -> list[dict]:
    with open(roster, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if rows and match not in rows[0]:
        raise ValueError(f"{roster}: no column {match!r} (columns: {', '.join(rows[0])}); choose one with --match")
    return rows
