"""The command line as a student or instructor meets it: exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest

from autograder.course import CHAPTERS, find_chapter
from autograder.mutants import mutants_of
from autograder.notebook_format import grade_id, read, render

FIRST = CHAPTERS[0]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autograder", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "empty"),
        ("{not json", "invalid JSON"),
        ('{"hello": 1}', "not a notebook"),
        (b"\xff\xfe\x00garbage", "cannot read"),
    ],
    ids=["empty", "malformed-json", "json-not-notebook", "binary"],
)
def test_check_refuses_what_it_cannot_grade(tmp_path, content, reason):
    path = tmp_path / "submission.ipynb"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = run_cli("check", str(path))
    assert result.returncode == 2
    assert reason in result.stderr and str(path) in result.stderr


def test_check_missing_file(tmp_path):
    result = run_cli("check", str(tmp_path / "nope.ipynb"))
    assert result.returncode == 2 and "no such file" in result.stderr


def test_check_wrong_chapter(tmp_path):
    path = tmp_path / "mine.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), str(path))
    result = run_cli("check", str(path))
    assert result.returncode == 2 and "wrong chapter" in result.stderr
    if len(CHAPTERS) > 1:
        result = run_cli("check", str(FIRST.notebook), "--chapter", CHAPTERS[1].slug)
        assert result.returncode == 2 and "wrong chapter" in result.stderr


def test_find_chapter_by_number_and_slug():
    assert find_chapter("1") is FIRST and find_chapter(FIRST.slug) is FIRST
    with pytest.raises(ValueError, match="no chapter"):
        find_chapter("99")


@pytest.mark.slow
def test_check_release_correct_and_wrong_axis(tmp_path):
    """The acceptance scenario: 0 of N, N of N, and wrong-axis softmax named."""
    n = FIRST.max_score
    skeleton = json.loads(run_cli("check", str(FIRST.notebook), "--json").stdout)
    assert (skeleton["score"], skeleton["max_score"]) == (0, n)
    assert set(skeleton) == {"notebook", "score", "max_score", "tests"}
    assert set(skeleton["tests"][0]) == {"grade_id", "points", "max_points", "passed", "message"}

    solved = tmp_path / "solved.ipynb"
    nbformat.write(render(read(FIRST.notebook), FIRST, "book"), str(solved))
    before = solved.read_bytes()
    full = json.loads(run_cli("check", str(solved), "--json").stdout)
    assert full["score"] == n
    assert solved.read_bytes() == before, "check must never change the file it grades"

    wrong_axis = next(m for m in mutants_of(FIRST.key) if m.name == "axis_ignored")
    nb = render(read(FIRST.notebook), FIRST, "book")
    for cell in nb.cells:
        if grade_id(cell) == "softmax":
            cell.source = wrong_axis.code
    path = tmp_path / "wrong_axis.ipynb"
    nbformat.write(nb, str(path))
    result = run_cli("check", str(path))
    assert result.returncode == 0
    assert f"/{n:g}" in result.stdout and f"{n:g}/{n:g}" not in result.stdout.splitlines()[-1]
    assert "axis" in result.stdout


def test_release_verb(tmp_path):
    result = run_cli("release", "--out", str(tmp_path / "course"))
    assert result.returncode == 0, result.stderr
    for chapter in CHAPTERS:
        assert (tmp_path / "course" / "release" / chapter.slug / f"{chapter.slug}.ipynb").exists()
        assert (tmp_path / "course" / "source" / chapter.slug / f"{chapter.slug}.ipynb").exists()
    assert (tmp_path / "course" / "gradebook.db").exists()
