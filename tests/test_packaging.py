"""The repository's packaging: pinned stack, conda environment in step, CI wiring."""

from __future__ import annotations

import re
import tomllib

import yaml

from autograder.course import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


SELF = PYPROJECT["project"]["name"]


def _extras() -> dict[str, list[str]]:
    return PYPROJECT["project"]["optional-dependencies"]


def _author_requirements() -> list[str]:
    """What `pip install -e ".[test]"` asks for: the test extra, with the extras it names expanded."""
    reqs, todo = [], list(_extras()["test"])
    while todo:
        req = todo.pop(0)
        if _norm(req).startswith(SELF + "["):
            todo += [r for extra in _norm(req)[len(SELF) + 1 : -1].split(",") for r in _extras()[extra]]
        else:
            reqs.append(req)
    return reqs


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    from_env = {_norm(r) for r in pip if not r.startswith("-e")}
    from_pyproject = {_norm(r) for r in _author_requirements()}
    assert from_env == from_pyproject, (
        f"environment.yml and pyproject.toml differ: only in environment.yml {sorted(from_env - from_pyproject)}, "
        f"only in pyproject.toml {sorted(from_pyproject - from_env)}"
    )


def test_stack_is_pinned():
    """Authors and graders get the stack exactly as measured; the test extra installs all of it."""
    deps = {re.split(r"[=<>!~;]", _norm(r))[0]: _norm(r) for r in _author_requirements()}
    assert deps["jupyter-book"] == "jupyter-book==1.0.4.post1"
    assert deps["nbgrader"] == "nbgrader==0.9.6"
    assert deps["sphinx"].startswith("sphinx==7.")
    torch = deps["torch"]
    assert ">=2.13" in torch and "<2.14" in torch, "torch must be a range that the local 2.13.0 wheel satisfies"
    unpinned = [r for name, r in deps.items() if name != "torch" and "==" not in r]
    assert not unpinned, f"unpinned dependencies: {unpinned}"
    used = {
        extra for r in _extras()["test"] if _norm(r).startswith(SELF + "[") for extra in _norm(r)[len(SELF) + 1 : -1].split(",")
    }
    assert used == set(_extras()) - {"test"}, f"the test extra must include every other extra, it names {sorted(used)}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme.split("\n## ")[0], "the README opens with `make test`"
    assert "make test" in ci


def test_ruff_clean():
    import subprocess
    import sys
    from pathlib import Path

    ruff = Path(sys.executable).parent / "ruff"
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([str(ruff), *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, f"ruff {' '.join(args)}:\n{result.stdout[-3000:]}"
