"""What a student installs: `pip install git+<repository>` in Colab or any Python 3.11-3.13.

The package's own dependencies are what a chapter notebook needs (numpy, torch, matplotlib,
ipywidgets, triton where it has wheels), as lower bounds only, so that Colab keeps its own
builds and its kernel; everything authors and graders use is in pinned extras. The slow
test builds a fresh virtual environment with only the student install and runs chapter 4 as
a student would: the setup cell, each exercise (the reference answer), its visible tests and
the self-check.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from autograder.course import ROOT, find_chapter
from autograder.notebook_format import read, solution_sources

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
STUDENT_NEEDS = {"numpy", "torch", "matplotlib", "ipywidgets", "triton"}
# Colab's kernel and the author/grader stack: a student install must not ask for any of them.
NOT_FOR_STUDENTS = {
    "ipykernel",
    "jupyter-client",
    "nbclient",
    "nbconvert",
    "nbformat",
    "nbgrader",
    "jupyter-book",
    "sphinx",
    "myst-nb",
}


@pytest.mark.parametrize("version", ["3.11", "3.12", "3.13"])
def test_metadata_admits_colab_pythons(version):
    assert version in SpecifierSet(PROJECT["requires-python"]), (
        f"requires-python {PROJECT['requires-python']!r} refuses {version}"
    )
    assert f"Programming Language :: Python :: {version}" in PROJECT["classifiers"]


def test_student_dependencies_pin_nothing_over_colab():
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    names = {r.name.lower().replace("_", "-") for r in reqs}
    assert names <= STUDENT_NEEDS, f"the student install asks for more than the notebooks need: {sorted(names - STUDENT_NEEDS)}"
    assert not names & NOT_FOR_STUDENTS
    for r in reqs:
        assert all(s.operator == ">=" for s in r.specifier), f"{r}: a student dependency may only have a lower bound"
    assert any(r.name == "triton" and r.marker and "x86_64" in str(r.marker) for r in reqs), "triton only where it has wheels"


@pytest.mark.slow
def test_fresh_venv_with_only_the_student_install_runs_a_chapter(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")

    def pip(*args):
        result = subprocess.run([py, "-m", "pip", "install", "--quiet", *args], capture_output=True, text=True, timeout=1500)
        assert result.returncode == 0, f"pip install {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    pip("torch==2.13.0")  # the local CPU wheel, as Colab has its own torch already
    source = tmp_path / "course"  # a copy, so that building leaves no build/ in the working tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "_build", "build", "*.egg-info", "__pycache__"))
    pip(str(source))  # what `pip install git+<repository>` builds
    installed = {
        d["name"].lower().replace("_", "-")
        for d in json.loads(subprocess.check_output([py, "-m", "pip", "list", "--format=json"]))
    }
    assert not installed & NOT_FOR_STUDENTS, f"the student install brought in {sorted(installed & NOT_FOR_STUDENTS)}"

    chapter = find_chapter("04")
    nb = read(ROOT / "student" / f"{chapter.slug}.ipynb")
    setup = next(c.source for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == "setup")
    visible = [c.source for c in nb.cells if re.match(r"test_", c.get("metadata", {}).get("nbgrader", {}).get("grade_id", ""))]
    answers = solution_sources(chapter.solutions_module)
    self_check = [c.source for c in nb.cells if c.cell_type == "code" and "self_check(globals()" in c.source][-1]
    script = "\n\n".join(
        [setup] + [answers[ex.name] + "\n\n" + test for ex, test in zip(chapter.exercises, visible, strict=True)] + [self_check]
    )
    (tmp_path / "chapter.py").write_text(script)
    result = subprocess.run([py, "chapter.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"chapter {chapter.slug} failed in the student venv:\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    for ex in chapter.exercises:
        assert ex.name in out, f"self_check printed nothing for {ex.name}:\n{out[-3000:]}"
    print(textwrap.indent(out[-1500:], "  "))
