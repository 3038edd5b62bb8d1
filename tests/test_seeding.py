"""Per-student seeds of the hidden checks (:mod:`autograder.checks.seeding`).

Fast tests: the plumbing (default seed without a salt, a salt changes it deterministically,
an explicit seed wins, ``os.environ`` changed after import changes nothing, the kernel
launcher reads the salt, ``grade`` gives each student a salt of their own and the grading
hash depends on ``--hidden-seed``), and mutants of chapters 1, 2 and 6 still lose points
under other salts. Slow: every seeded hidden check passes on the reference solutions under
many salts, and a sandboxed ``grade`` of two correct chapter-1 submissions gives both full
marks with different salts.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys

import nbformat
import pytest
from conftest import namespace

from autograder.checks import seeding
from autograder.checks.runner import run_check
from autograder.course import CHAPTERS, ROOT, find_chapter
from autograder.mutants import mutants_of

SALTS = [f"{i:08x}" for i in (0x1, 0xBEEF, 0x5EED5EED, 0xDEADBEEF, 0x12345678, 0x0BADF00D, 0xCAFEBABE, 0x7FFFFFFF)]


@contextlib.contextmanager
def salted(salt: str | None):
    """Run the hidden checks of this process with ``salt`` (as a graded kernel would)."""
    old = seeding.current_salt()
    seeding.set_salt(salt)
    try:
        yield
    finally:
        seeding.set_salt(old)


def _fake(obj, seed: int = 7) -> int:
    return seed


def test_default_seed_without_salt_and_explicit_seed_wins():
    check = seeding.seeded(_fake)
    assert inspect.signature(check).parameters["seed"].default == 7
    with salted(None):
        assert check(None) == 7
    with salted("abcd1234"):
        salted_seed = check(None)
        assert salted_seed == seeding.effective_seed(7, "abcd1234") != 7
        assert check(None) == salted_seed, "deterministic"
        assert check(None, seed=3) == 3 and check(None, 3) == 3, "an explicit seed wins"
    with salted("abcd1235"):
        assert check(None) != salted_seed, "another salt, another seed"
    assert seeding.seeded(check) is check, "not wrapped twice"


def test_checks_without_a_seed_stay_fixed():
    def hidden_fixed(obj) -> None:
        return None

    assert seeding.seeded(hidden_fixed) is hidden_fixed


def test_environment_changed_after_import_changes_nothing(monkeypatch):
    monkeypatch.delenv(seeding.ENV, raising=False)
    check = seeding.seeded(_fake)
    with salted(None):
        monkeypatch.setenv(seeding.ENV, "feedface")
        assert check(None) == 7, "a student who sets os.environ gets nothing"
        assert seeding.load_salt() == "feedface"  # only trusted code reads it again
        assert check(None) == seeding.effective_seed(7, "feedface")


def test_fresh_kernel_reads_the_salt_at_import():
    code = "import autograder.checks.ch01 as c, autograder.checks.seeding as s; print(s.current_salt())"
    env = {**os.environ, seeding.ENV: "0a0b0c0d"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "0a0b0c0d", out.stderr[-2000:]


def test_forked_kernel_reads_the_salt_of_its_spec():
    from autograder.grading import zygote

    saved = dict(os.environ)
    try:
        with salted(None):
            zygote.set_environment({"PATH": "/usr/bin", seeding.ENV: "01234567"})
            assert seeding.current_salt() == "01234567"
            zygote.set_environment({"PATH": "/usr/bin"})
            assert seeding.current_salt() is None
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_every_seeded_hidden_check_is_wrapped_in_its_module():
    """The hidden cells import ``hidden_<name>`` from the module: that attribute is the salted one."""
    seeded = 0
    for chapter in CHAPTERS:
        module = importlib.import_module(chapter.checks_module)
        for ex in chapter.exercises:
            check = getattr(module, f"hidden_{ex.name}")
            original = inspect.unwrap(check)
            has_seed = "seed" in inspect.signature(original).parameters
            assert (getattr(check, "_salted_default", None) is not None) == has_seed, ex.name
            seeded += has_seed
    assert seeded >= 20


def _untrusted_chapter():
    from autograder.grading.judge import is_trusted

    return next((c for c in CHAPTERS if not all(is_trusted(e) for e in c.exercises)), None)


def test_each_student_gets_a_salt_and_only_the_grader_holds_it(tmp_path):
    """The judge draws a trusted chapter's hidden inputs with the student's salt; the kernel never sees it."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed")
    from autograder.grading.worker import Grader, Options
    from autograder.sandbox import Limits, Sandbox

    sandbox = Sandbox(tmp_path / "sandbox", Limits())
    grader = Grader(Options(out=tmp_path / "out"), sandbox)
    first = find_chapter("01")
    try:
        alice = grader.use_salt("alice", first)
        assert seeding.current_salt() == alice == seeding.student_salt("alice")
        assert seeding.ENV not in sandbox.kernel_env(), "a trusted chapter's kernel must not hold the salt"
        assert grader.use_salt("alice", first) == alice, "a regrade gets the same salt"
        bob = grader.use_salt("bob", first)
        assert seeding.current_salt() == bob != alice
        other_term = Grader(Options(out=tmp_path / "out", hidden_seed="spring"), sandbox)
        assert other_term.use_salt("alice", first) != alice, "--hidden-seed changes every student's salt"
        assert len(alice) == 8 and int(alice, 16) >= 0
        untrusted = _untrusted_chapter()
        if untrusted is not None:  # its checks still run in the kernel: the kernel needs the salt
            carol = grader.use_salt("carol", untrusted)
            assert sandbox.kernel_env()[seeding.ENV] == carol
    finally:
        seeding.set_salt(None)


def test_unsandboxed_kernels_get_the_salt_only_for_in_kernel_checks(tmp_path, monkeypatch):
    from autograder.grading.worker import Grader, Options

    monkeypatch.delenv(seeding.ENV, raising=False)
    grader = Grader(Options(out=tmp_path / "out", sandbox=False), None)
    try:
        grader.use_salt("carol", find_chapter("01"))
        assert seeding.ENV not in os.environ
        untrusted = _untrusted_chapter()
        if untrusted is not None:
            grader.use_salt("carol", untrusted)
            assert os.environ[seeding.ENV] == seeding.student_salt("carol")
    finally:
        seeding.set_salt(None)


def test_grading_sha_depends_on_the_hidden_seed():
    from autograder.grade import grading_sha

    chapter = find_chapter("01")
    default = grading_sha(chapter, chapter.notebook)
    assert grading_sha(chapter, chapter.notebook) == default
    assert grading_sha(chapter, chapter.notebook, "spring-term") != default, "a new --hidden-seed regrades"


def _mutant_params():
    return [
        pytest.param(c, m, id=f"{c.key}-{m.id}") for c in CHAPTERS if c.key in ("ch01", "ch02", "ch06") for m in mutants_of(c.key)
    ]


@pytest.mark.parametrize(("chapter", "mutant"), _mutant_params())
def test_mutant_loses_points_under_other_salts(chapter, mutant):
    ex = next(e for e in chapter.exercises if e.name == mutant.exercise)
    ns = namespace(chapter, replace={mutant.exercise: mutant.code})
    for salt in SALTS[:2]:
        with salted(salt):
            outcomes = [run_check(ex, ns, hidden=h) for h in (False, True)]
        assert not all(o.passed for o in outcomes), f"mutant {mutant.id} passes every check of {ex.name} with salt {salt}"


@pytest.mark.slow
@pytest.mark.parametrize("chapter", [pytest.param(c, id=c.key) for c in CHAPTERS])
def test_solutions_pass_every_hidden_check_under_many_salts(chapter):
    ns = namespace(chapter)
    failures = []
    for ex in chapter.exercises:
        for salt in SALTS:
            with salted(salt):
                outcome = run_check(ex, ns, hidden=True)
            if not outcome.passed:
                failures.append(f"{ex.name} with salt {salt}: {outcome.message[:400]}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
def test_grade_gives_two_correct_students_full_marks_with_their_own_salts(tmp_path):
    from hostile.catalogue import release_notebook, solved

    chapter = find_chapter("01")
    nb = solved(release_notebook(tmp_path / "course", chapter), chapter)
    submitted, out = tmp_path / "submitted", tmp_path / "graded"
    submitted.mkdir()
    for student in ("alice", "bob"):
        nbformat.write(nb, str(submitted / f"{student}_{chapter.slug}.ipynb"))
    cmd = [sys.executable, "-m", "autograder", "grade", str(submitted), "--out", str(out), "--chapter", "01"]
    cmd += ["--workers", "2", "--timeout", "30", "--memory-mb", "2048", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {}
    for path in (out / ".grading" / "results" / chapter.slug).glob("*.json"):
        r = json.loads(path.read_text())
        results[r["student"]] = r
    assert set(results) == {"alice", "bob"}
    for student, r in results.items():
        assert r["score"] == r["max_score"] == chapter.max_score, r
        assert r["hidden_salt"] == seeding.student_salt(student)
    assert results["alice"]["hidden_salt"] != results["bob"]["hidden_salt"]
