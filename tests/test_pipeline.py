"""nbgrader-driven proofs for every chapter (slow): written once, covering each chapter added.

(a) the solutions score full marks through ``nbgrader autograde``; (b) the untouched release
scores 0 on every graded cell; (c) mutants lose points and are named through nbgrader (a sample,
see :func:`graded_mutants`); (d) ``chapters/``
match ``solutions/`` and carry no outputs; (e) ``release/`` holds no solution code and no
hidden tests; (f) the book builds cleanly, shows no solution code, and has its figures.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nbformat
import pytest
from conftest import CHAPTER_IDS

from autograder.check import Report, grade_batch
from autograder.course import CHAPTERS, Chapter
from autograder.mutants import mutants_of
from autograder.notebook_format import (
    BEGIN_HIDDEN,
    grade_id,
    read,
    render,
    solution_lines,
    solution_sources,
)
from autograder.release import release
from autograder.sync import expected_text

pytestmark = pytest.mark.slow

CHAPTER_PARAMS = [pytest.param(c, id=c.key) for c in CHAPTERS]


def graded_mutants(chapter: Chapter) -> list:
    """The mutants (c) grades through nbgrader: the first and the last of each exercise, or all with ALL_MUTANTS=1.

    Every mutant is already proved to lose points and be named twice over, in process
    (``test_exercises.py``) and through the trusted process's stand-ins (``test_remote.py``); what
    nbgrader adds is the path (kernel, judge, gradebook, messages), which a sample per exercise
    exercises, keeping the run within CI's time. The last entry of an exercise is usually its
    newest. ``ALL_MUTANTS=1 pytest tests/test_pipeline.py`` grades the whole catalogue.
    """
    catalogue = mutants_of(chapter.key)
    if os.environ.get("ALL_MUTANTS") == "1":
        return catalogue
    chosen = []
    for exercise in chapter.exercises:
        own = [m for m in catalogue if m.exercise == exercise.name]
        chosen += [m for m in (own[:1] + own[-1:]) if m not in chosen]
    return chosen


def _submissions(chapter: Chapter, workdir: Path) -> dict[str, Path]:
    """The solution, the untouched release, and one notebook per mutant."""
    course = release(workdir / "course", chapters=(chapter,))
    subs = {"release": course / "release" / chapter.slug / f"{chapter.slug}.ipynb"}
    solved = render(read(chapter.notebook), chapter, "book")
    subs["solution"] = workdir / "solution.ipynb"
    nbformat.write(solved, str(subs["solution"]))
    for mutant in graded_mutants(chapter):
        nb = render(read(chapter.notebook), chapter, "book")
        # Only the setup, exercise and test cells: the chapter's demos (timings, training) cost
        # minutes per notebook and do not bear on grading; (a) and (b) grade whole notebooks.
        nb.cells = [c for c in nb.cells if c.cell_type == "markdown" or grade_id(c)]
        for cell in nb.cells:
            if grade_id(cell) == mutant.exercise:
                cell.source = mutant.code
        path = workdir / f"mutant-{mutant.id}.ipynb"
        nbformat.write(nb, str(path))
        subs[f"mutant-{mutant.id}"] = path
    return subs


def _grade_chapter(slug: str, workdir: str) -> dict[str, Report]:
    chapter = next(c for c in CHAPTERS if c.slug == slug)
    return grade_batch(chapter, _submissions(chapter, Path(workdir)))


@pytest.fixture(scope="session")
def graded(tmp_path_factory) -> dict[str, dict[str, Report]]:
    """Every chapter's submissions graded through nbgrader, two chapters at a time."""
    base = tmp_path_factory.mktemp("graded")
    # spawn, not fork: the judge computes torch references in these processes, and a fork of a process
    # whose torch thread pool already ran can deadlock in its first parallel operation
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {c.slug: pool.submit(_grade_chapter, c.slug, str(base / c.slug)) for c in CHAPTERS}
        return {slug: f.result() for slug, f in futures.items()}


@pytest.mark.parametrize("chapter", CHAPTER_PARAMS)
def test_a_solution_scores_full_marks(graded, chapter):
    report = graded[chapter.slug]["solution"]
    failing = [f"{t.grade_id}: {t.message}" for t in report.tests if not t.passed]
    assert not failing, "\n".join(failing)
    assert report.score == report.max_score == chapter.max_score


@pytest.mark.parametrize("chapter", CHAPTER_PARAMS)
def test_b_release_scores_zero_everywhere(graded, chapter):
    report = graded[chapter.slug]["release"]
    assert report.max_score == chapter.max_score
    assert len(report.tests) == 2 * len(chapter.exercises)
    assert all(t.points == 0 for t in report.tests), report.table()
    assert all("not implemented" in t.message for t in report.tests), report.table()


@pytest.mark.parametrize("chapter", CHAPTER_PARAMS)
def test_c_mutants_lose_points_and_are_named_through_nbgrader(graded, chapter):
    problems = []
    for mutant in graded_mutants(chapter):
        report = graded[chapter.slug][f"mutant-{mutant.id}"]
        own = [t for t in report.tests if t.grade_id in (f"test_{mutant.exercise}", f"hidden_{mutant.exercise}")]
        if report.score >= report.max_score:
            problems.append(f"{mutant.id}: full marks")
        elif not any(mutant.diagnosis.lower() in t.message.lower() for t in own if not t.passed):
            problems.append(f"{mutant.id}: no {mutant.diagnosis!r} in " + " | ".join(t.message for t in own))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("chapter", CHAPTER_PARAMS)
def test_d_chapters_match_solutions_and_carry_no_outputs(chapter):
    text = chapter.notebook.read_text()
    assert text == expected_text(chapter), f"{chapter.notebook.name} drifted: run `python -m autograder sync`"
    for cell in read(chapter.notebook).cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{chapter.notebook.name} has outputs"


@pytest.mark.parametrize("chapter", CHAPTER_PARAMS)
def test_e_release_has_no_solutions_and_no_hidden_tests(tmp_path, chapter):
    course = release(tmp_path / "course", chapters=(chapter,))
    released = (course / "release" / chapter.slug / f"{chapter.slug}.ipynb").read_text()
    leaked = [line for line in _private_lines(chapter) if line in released]
    assert not leaked, f"solution lines in release/: {leaked[:3]}"
    assert BEGIN_HIDDEN not in released and "hidden_" + chapter.exercises[0].name + "(" not in released
    source = (course / "source" / chapter.slug / f"{chapter.slug}.ipynb").read_text()
    assert BEGIN_HIDDEN in source, "the instructor's source/ must keep the hidden tests"


def test_sync_check_exit_status():
    result = subprocess.run([sys.executable, "-m", "autograder", "sync", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("chapter", CHAPTER_PARAMS)
def test_f_book_page_has_skeletons_and_figures_but_no_solutions(built_book, chapter):
    book = built_book
    page = (book / "chapters" / f"{chapter.slug}.html").read_text()
    leaked = [line for line in _private_lines(chapter) if _html(line) in page]
    assert not leaked, f"solution lines on the page: {leaked[:3]}"
    assert page.count("NotImplementedError") >= len(chapter.exercises)
    figures = re.findall(r'<img[^>]+src="([^"]+\.png)"', page)
    assert figures, "the page has no figures"
    for src in figures:
        assert (book / "chapters" / src).resolve().exists(), f"missing figure {src}"
    assert "Traceback" not in page


def _private_lines(chapter: Chapter) -> list[str]:
    """Solution lines that a reader must never see: those not also in the chapter's public cells."""
    public = "\n".join(cell.source for cell in read(chapter.notebook).cells)
    return [
        line for src in solution_sources(chapter.solutions_module).values() for line in solution_lines(src) if line not in public
    ]


def _html(line: str) -> str:
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_chapter_ids_are_known():
    assert CHAPTER_IDS, "no chapters discovered"
