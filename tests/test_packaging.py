"""The repository's packaging: pinned stack, conda environment in step, CI wiring."""

from __future__ import annotations

import re
import tomllib

import yaml

from autograder.course import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    from_env = {_norm(r) for r in pip if not r.startswith("-e")}
    project = PYPROJECT["project"]
    from_pyproject = {_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    assert from_env == from_pyproject, (
        f"environment.yml and pyproject.toml differ: only in environment.yml {sorted(from_env - from_pyproject)}, "
        f"only in pyproject.toml {sorted(from_pyproject - from_env)}"
    )


def test_stack_is_pinned():
    deps = {re.split(r"[=<>!~]", _norm(r))[0]: _norm(r) for r in PYPROJECT["project"]["dependencies"]}
    assert deps["jupyter-book"] == "jupyter-book==1.0.4.post1"
    assert deps["nbgrader"] == "nbgrader==0.9.6"
    assert deps["sphinx"].startswith("sphinx==7.")
    torch = deps["torch"]
    assert ">=2.13" in torch and "<2.14" in torch, "torch must be a range that the local 2.13.0 wheel satisfies"
    unpinned = [r for name, r in deps.items() if name != "torch" and "==" not in r]
    assert not unpinned, f"unpinned dependencies: {unpinned}"


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
