"""A catalogue of hostile and broken submissions of chapter 1, and what each must score.

Every case starts from chapter 1's *release* notebook (what students get, built by nbgrader's
``generate_assignment``) with the reference solutions filled into the exercise cells, then
breaks it in one way. ``write_class`` lays the cases out as nbgrader's ``submitted/`` tree.

A case's ``score`` is the exact score it must get; ``None`` means "what its exercises score
when the checks run in process" (the maximum when it changes no exercise, see ``replace``);
``-1`` means "everything except the points of the exercise it breaks".
"""

from __future__ import annotations

import copy
import socket
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from autograder.course import Chapter, find_chapter
from autograder.mutants import mutants_of
from autograder.notebook_format import grade_id, solution_sources
from autograder.release import generate_assignment, write_source

CH = "01_dot_product_attention"
WRONG_SOFTMAX = next(m.code for m in mutants_of("ch01") if m.id == "softmax-no_max_shift")


@dataclass
class Case:
    student: str
    what: str
    make: Callable  # (solved notebook, release notebook, chapter) -> notebook | bytes | None (no notebook)
    score: float | None = None
    status: str = "graded"
    says: list[str] = field(default_factory=list)  # substrings of the student's messages and notes
    events: list[str] = field(default_factory=list)  # grader events (``a|b``: either)
    filename: str | None = None  # the notebook's name, when not the chapter's
    replace: dict = field(default_factory=dict)  # exercises whose code is not the solution
    broken: str | None = None  # the exercise whose points are lost (score -1)
    flagged: bool | None = None  # whether the grader flags the code for the instructor (None: either)


def release_notebook(course: Path, chapter: Chapter) -> nbformat.NotebookNode:
    """The chapter's release notebook, built with nbgrader into ``course`` (once)."""
    path = course / "release" / chapter.slug / f"{chapter.slug}.ipynb"
    if not path.exists():
        write_source(chapter, course)
        generate_assignment(chapter, course)
    return nbformat.read(str(path), as_version=4)


def solved(release: nbformat.NotebookNode, chapter: Chapter, replace: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """``release`` with every exercise cell holding the reference solution (or ``replace[name]``)."""
    nb = copy.deepcopy(release)
    sources = solution_sources(chapter.solutions_module)
    for cell in nb.cells:
        gid = grade_id(cell)
        if gid in sources:
            cell.source = (replace or {}).get(gid, sources[gid])
    return nb


def _index(nb, gid: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if grade_id(c) == gid)


def add_cell(nb, source: str, after: str = "dot_product_attention"):
    """``nb`` with an ordinary code cell after the cell ``after`` (default: the last exercise)."""
    nb = copy.deepcopy(nb)
    nb.cells.insert(_index(nb, after) + 1, nbformat.v4.new_code_cell(textwrap.dedent(source).strip()))
    return nb


def drop(nb, gid):
    nb = copy.deepcopy(nb)
    del nb.cells[_index(nb, gid)]
    return nb


def duplicate(nb, gid):
    nb = copy.deepcopy(nb)
    i = _index(nb, gid)
    nb.cells.insert(i + 1, copy.deepcopy(nb.cells[i]))
    nb.cells[i + 1]["id"] = nb.cells[i]["id"] + "-copy"
    return nb


def split(nb, gid):
    nb = copy.deepcopy(nb)
    i = _index(nb, gid)
    lines = nb.cells[i].source.splitlines()
    cut = max(1, len(lines) // 2)
    second = copy.deepcopy(nb.cells[i])
    nb.cells[i].source = "\n".join(lines[:cut])
    second.source = "\n".join(lines[cut:])
    second["id"] = nb.cells[i]["id"] + "-2"
    nb.cells.insert(i + 1, second)
    return nb


def edit(nb, gid, source):
    nb = copy.deepcopy(nb)
    nb.cells[_index(nb, gid)].source = source
    return nb


def other_kernel(nb):
    nb = copy.deepcopy(nb)
    nb.metadata["kernelspec"] = {"name": "evil", "display_name": "Evil", "language": "python", "argv": ["rm", "-rf", "/"]}
    return nb


def noisy_softmax(nb):
    """The first calls of softmax write a Python warning and a PyTorch C++ warning to stderr."""
    nb = add_cell(nb, NOISY, after="setup")
    nb.cells[_index(nb, "softmax")].source += "\n\nsoftmax = _noisy(softmax)"
    return nb


def stderr_debug(rel, chapter):
    src = solution_sources(chapter.solutions_module)["softmax"]
    body = src.replace('    """\n', '    """\n    import sys\n\n    print("debug: softmax called", file=sys.stderr)\n', 1)
    return solved(rel, chapter, {"softmax": body})


def nbformat3(nb) -> bytes:
    return nbformat.writes(nbformat.convert(copy.deepcopy(nb), 3), version=3).encode()


NOISY = """
import sys


def _noisy(f):
    calls = []

    def g(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 3:
            sys.stderr.write("/usr/lib/python3/dist-packages/foo.py:12: DeprecationWarning: foo is deprecated\\n")
            sys.stderr.write("  warnings.warn('foo is deprecated', DeprecationWarning)\\n")
            sys.stderr.write("[W NNPACK.cpp:64] Could not initialize NNPACK! Reason: Unsupported hardware.\\n")
            sys.stderr.flush()
        return f(*args, **kwargs)

    return g
"""

HUGE_OUTPUT = """
for _ in range(200):
    print("x" * 5_000_000)
"""

NEVER_ENDS = """
while True:
    pass
"""

IGNORES_INTERRUPT = """
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
while True:
    pass
"""

MEMORY_HOG = """
hog = []
while True:
    hog.append(bytearray(50_000_000))
"""

FORK_BOMB = """
import os

while True:
    os.fork()
"""

SEGFAULT_ATTEND = """
def attend(query, keys, values):
    import ctypes

    ctypes.string_at(0)
"""

ALWAYS_EQUAL = """
def softmax(x, axis=-1):
    class AlwaysEqual:
        shape = x.shape

        def __eq__(self, other):
            return True

        def __ne__(self, other):
            return False

    return AlwaysEqual()
"""

READ_SOLUTIONS = """
import pathlib

import autograder

repo = pathlib.Path(autograder.__file__).resolve().parent.parent
print(sorted(p.name for p in repo.iterdir()))
print((repo / "solutions" / "ch01_dot_product_attention.py").read_text()[:100])
"""

MONKEYPATCH = """
import builtins

import numpy
import numpy.testing
import torch

numpy.allclose = lambda *a, **k: True
numpy.testing.assert_allclose = lambda *a, **k: None
torch.allclose = lambda *a, **k: True
torch.testing.assert_close = lambda *a, **k: None


class Nope(Exception):
    pass


builtins.AssertionError = Nope
"""

HIDE_ERRORS = """
ip = get_ipython()
ip.set_custom_exc((BaseException,), lambda *a, **k: None)
ip.showtraceback = lambda *a, **k: None
"""

REPLACE_RUN_CELL = """
from IPython.core.interactiveshell import ExecutionInfo, ExecutionResult

ip = get_ipython()


async def run_cell_async(*args, **kwargs):
    print("\\u2714 everything passed")
    return ExecutionResult(ExecutionInfo("", False, False, False, None))


ip.run_cell_async = run_cell_async
ip.should_run_async = lambda *a, **k: True
"""

PROBE = """
import json
import os
import pathlib
import socket

import autograder

res = {{}}
for name, addr in (("loopback", ("127.0.0.1", {port})), ("host", ("{host_ip}", {port})), ("internet", ("1.1.1.1", 53))):
    try:
        socket.create_connection(addr, timeout=3).close()
        res["net_" + name] = "connected"
    except OSError as exc:
        res["net_" + name] = str(exc)
repo = pathlib.Path(autograder.__file__).resolve().parent.parent
res["repo"] = sorted(os.listdir(repo))
res["solutions"] = (repo / "solutions").exists()
res["course"] = os.path.exists("{course}")
res["submitted"] = os.path.exists("{submitted}")
targets = (
    ("write_package", repo / "autograder" / "pwned.txt"),
    ("write_course", "{course}/pwned.txt"),
    ("write_submitted", "{submitted}/pwned.txt"),
    ("write_usr", "/usr/pwned.txt"),
    ("write_cwd", "mine.txt"),
    ("write_tmp", "/tmp/mine.txt"),
)
for key, target in targets:
    try:
        pathlib.Path(target).write_text("x")
        res[key] = "written"
    except OSError as exc:
        res[key] = type(exc).__name__
status = open("/proc/self/status").read()
res["caps"] = {{ln.split(":")[0]: ln.split()[1] for ln in status.splitlines() if ln.startswith("Cap")}}
res["no_new_privs"] = [ln.split()[1] for ln in status.splitlines() if ln.startswith("NoNewPrivs")]
res["uid"] = os.getuid()
print("PROBE " + json.dumps(res))
"""


def cases(port: int = 9, host_ip: str = "127.0.0.1", course: str = "/nonexistent", submitted: str = "/nonexistent") -> list[Case]:
    """The catalogue.

    ``port``/``host_ip``: a TCP server on the grading machine that the sandbox must not reach;
    ``course``/``submitted``: the grader's course directory and the submissions, which it must not see.
    """
    wrong = {"softmax": WRONG_SOFTMAX}
    probe = PROBE.format(port=port, host_ip=host_ip, course=course, submitted=submitted)
    return [
        Case("correct", "the reference solution", lambda nb, rel, ch: nb, flagged=False),
        Case("skeleton", "nothing solved", lambda nb, rel, ch: rel, 0, says=["not implemented"]),
        Case(
            "mutant",
            "a wrong softmax (no max shift)",
            lambda nb, rel, ch: solved(rel, ch, wrong),
            says=["overflow"],
            replace=wrong,
        ),
        Case(
            "deleted_test",
            "the visible softmax test cell deleted",
            lambda nb, rel, ch: drop(nb, "test_softmax"),
            says=["test_softmax` was missing"],
        ),
        Case(
            "duplicated_test",
            "the softmax test cell duplicated",
            lambda nb, rel, ch: duplicate(nb, "test_softmax"),
            says=["second copy of the locked cell `test_softmax`"],
        ),
        Case(
            "split_test",
            "the softmax test cell split in two",
            lambda nb, rel, ch: split(nb, "test_softmax"),
            says=["second copy of the locked cell `test_softmax`"],
        ),
        Case("split_exercise", "the attend cell split in two", lambda nb, rel, ch: split(nb, "attend"), says=["split in two"]),
        Case(
            "edited_test",
            "a wrong softmax, its test edited to print success",
            lambda nb, rel, ch: edit(solved(rel, ch, wrong), "test_softmax", 'print("\\u2714 softmax: 4 visible checks passed")'),
            says=["had been edited", "overflow"],
            replace=wrong,
        ),
        Case("kernelspec", "another kernelspec", lambda nb, rel, ch: other_kernel(nb), says=["kernel had been changed"]),
        Case("stderr_warnings", "warnings on stderr during the tests", lambda nb, rel, ch: noisy_softmax(nb)),
        # what student code prints while the grader calls it is not part of the verdict (nbgrader alone gives 0)
        Case("stderr_debug", "debug prints to stderr in softmax", lambda nb, rel, ch: stderr_debug(rel, ch)),
        Case(
            "malformed_json",
            "truncated JSON",
            lambda nb, rel, ch: nbformat.writes(nb)[:500].encode(),
            0,
            "ungradable",
            says=["invalid JSON"],
        ),
        Case("nbformat3", "saved as nbformat 3", lambda nb, rel, ch: nbformat3(nb), says=["nbformat 3"]),
        Case("renamed", "the notebook renamed", lambda nb, rel, ch: nb, says=["instead of"], filename="homework (1).ipynb"),
        Case("missing", "no notebook in the folder", lambda nb, rel, ch: None, 0, "ungradable", says=["no notebook"]),
        Case("empty_file", "an empty file", lambda nb, rel, ch: b"", 0, "ungradable", says=["empty"]),
        Case("huge_output", "a cell printing 1 GB", lambda nb, rel, ch: add_cell(nb, HUGE_OUTPUT), events=["output_truncated"]),
        Case("never_ends", "a cell that never ends", lambda nb, rel, ch: add_cell(nb, NEVER_ENDS), events=["timeout"]),
        Case(
            "ignores_interrupt",
            "a cell that never ends and ignores SIGINT",
            lambda nb, rel, ch: add_cell(nb, IGNORES_INTERRUPT),
            events=["stuck"],
        ),
        Case("memory_hog", "a cell allocating without end", lambda nb, rel, ch: add_cell(nb, MEMORY_HOG), events=["memory"]),
        Case(
            "fork_bomb",
            "a fork bomb",
            lambda nb, rel, ch: add_cell(nb, FORK_BOMB),
            events=["processes|stuck|timeout|kernel_died"],
        ),
        Case(
            "sys_exit",
            "sys.exit() in a cell",
            lambda nb, rel, ch: add_cell(nb, "import sys\nsys.exit(3)"),
            events=["system_exit"],
        ),
        Case(
            "os_exit", "os._exit() in a cell", lambda nb, rel, ch: add_cell(nb, "import os\nos._exit(7)"), events=["kernel_died"]
        ),
        Case(
            "segfault",
            "a segfault inside attend",
            lambda nb, rel, ch: solved(rel, ch, {"attend": SEGFAULT_ATTEND}),
            -1,
            says=["SIGSEGV"],
            events=["kernel_died"],
            broken="attend",
        ),
        Case("read_solutions", "reads solutions/", lambda nb, rel, ch: add_cell(nb, READ_SOLUTIONS), says=[]),
        Case("sandbox_probe", "network, reads and writes outside its folder", lambda nb, rel, ch: add_cell(nb, probe)),
        Case(
            "monkeypatch",
            "a wrong softmax; allclose, numpy.testing and AssertionError patched",
            lambda nb, rel, ch: add_cell(solved(rel, ch, wrong), MONKEYPATCH, after="setup"),
            says=["overflow"],
            replace=wrong,
            flagged=True,
        ),
        Case(
            "always_equal",
            "softmax returns an object equal to everything",
            lambda nb, rel, ch: solved(rel, ch, {"softmax": ALWAYS_EQUAL}),
            0,
            says=["should be a NumPy array"],
        ),
        Case(
            "hide_errors",
            "a wrong softmax; errors swallowed by IPython hooks",
            lambda nb, rel, ch: add_cell(solved(rel, ch, wrong), HIDE_ERRORS, after="setup"),
            replace=wrong,
            flagged=True,
        ),
        Case(
            "replace_run_cell",
            "a wrong softmax; IPython's run_cell replaced, so no later cell runs",
            lambda nb, rel, ch: add_cell(solved(rel, ch, wrong), REPLACE_RUN_CELL, after="setup"),
            0,
            says=["is not defined"],
            flagged=True,
        ),
    ]


def write_class(
    course: Path,
    submitted: Path,
    port: int = 9,
    host_ip: str = "127.0.0.1",
    grader_out: str = "/nonexistent",
    only: list[str] | None = None,
) -> list[Case]:
    """Write the cases under ``submitted/<student>/<chapter>/``; returns the cases written.

    ``course`` is a scratch course directory to build the release notebook in; ``grader_out`` the
    grader's ``--out`` (the probe checks that it cannot see it).
    """
    chapter = find_chapter(CH)
    rel = release_notebook(course, chapter)
    nb = solved(rel, chapter)
    written = []
    for case in cases(port, host_ip, grader_out, str(submitted)):
        if only and case.student not in only:
            continue
        folder = submitted / case.student / CH
        folder.mkdir(parents=True, exist_ok=True)
        content = case.make(nb, rel, chapter)
        if content is None:
            (folder / "notes.txt").write_text("I forgot the notebook")
        else:
            path = folder / (case.filename or f"{CH}.ipynb")
            path.write_bytes(content if isinstance(content, bytes) else nbformat.writes(content).encode())
        written.append(case)
    return written


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
