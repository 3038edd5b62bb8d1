"""``book``: execute the chapters with solutions, stage skeletons with outputs, build the HTML.

1. Every chapter notebook is rendered in *book form* (solutions filled in, no hidden tests)
   and executed, unless an executed copy with the same inputs is in the cache.
2. The exercise cells get their skeleton source back; every output is kept.
3. Jupyter Book builds ``_build/html`` from that staged copy with ``-W -n --keep-going``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat

from autograder.course import CHAPTERS, CHAPTERS_DIR, ROOT, Chapter
from autograder.notebook_format import grade_id, read, render

BUILD = ROOT / "_build"
STAGE = BUILD / "stage"
CACHE = BUILD / "execution-cache"
# student/: the Colab, Binder and download buttons point at these copies (_ext/student_links.py).
BOOK_FILES = ("_config.yml", "_toc.yml", "*.md", "chapters/*.md", "_ext", "_static", "figures", "appendices", "student/*.ipynb")
EXEC_TIMEOUT_S = 600
_PRINT_LOCK = threading.Lock()
_STARTED = time.perf_counter()


class BookError(Exception):
    """A notebook failed to execute, or wrote to stderr, while building the book."""


SHARED_CHECK_MODULES = (
    "__init__.py",
    "checks/__init__.py",
    "checks/common.py",
    "checks/trusted.py",
    "checks/torch_refs.py",
    "checks/runner.py",
    "course.py",
)


def _inputs_digest(nb_text: str, chapter: Chapter | None) -> str:
    """Hash of what an executed notebook depends on: its cells, its solutions, the checks it prints.

    Only the chapter's own checks module and the shared check helpers count, so editing one
    chapter (or the grading pipeline) does not re-execute the others.
    """
    h = hashlib.sha256(nb_text.encode())
    deps = [ROOT / "autograder" / name for name in SHARED_CHECK_MODULES]
    if chapter is not None:
        deps += [chapter.solutions_module, ROOT / "autograder" / "checks" / f"{chapter.key}.py"]
    for path in deps:
        h.update(path.name.encode() + (path.read_bytes() if path.exists() else b""))
    return h.hexdigest()[:16]


def _raises_on_purpose(cell) -> bool:
    return "raises-exception" in cell.get("metadata", {}).get("tags", [])


def _kernel_manager_class():
    """Kernels reached over IPC sockets in a private directory (not TCP on localhost).

    ipykernel 7 warns on stderr about every kernel "running over TCP without encryption"; over
    IPC nothing listens on a port and nothing is printed.
    """
    import tempfile

    from jupyter_client.manager import AsyncKernelManager

    class BookKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ipc_dir = Path(tempfile.mkdtemp(prefix="book-kernel-"))
            self.connection_file = str(self.ipc_dir / "kernel.json")
            self.ip = str(self.ipc_dir / "ipc")

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if not restart:
                shutil.rmtree(self.ipc_dir, ignore_errors=True)

    return BookKernelManager


def _client(nb: nbformat.NotebookNode, cwd: Path, timeout: int = EXEC_TIMEOUT_S):
    """An nbclient that runs widget cells without pretending to be a widget front end.

    nbclient normally mimics JupyterLab for ``Output`` widgets (the output area of
    ``ipywidgets.interact``): for each output the kernel sends into the widget, it sends a
    ``comm_msg`` back to the kernel on the shell socket, the socket it is polling for the
    cell's ``execute_reply`` at that moment. Now and then (2 or 3 in 60 ``interact`` cells on
    this machine) the reply then sits in the socket unnoticed until the poll's timeout fires,
    the whole per-cell timeout (600 s), after which the cell ends normally: the idle wait of a
    cold build. The book shows no live widgets (``nb_ipywidgets_js: {}``, widget cells are
    ``remove-output``), so the widget comms get no handler: nothing is sent to the kernel, and
    what the widget's function prints or plots lands in the cell's own outputs, where the
    stderr check below sees it.
    """
    import nbclient

    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(cwd)}},
        kernel_manager_class=_kernel_manager_class(),
        store_widget_state=False,
    )
    client.comm_open_handlers = {"jupyter.widget": lambda msg: None}
    return client


def _kernel_env(jobs: int) -> dict[str, str]:
    """The kernels' environment: the CPU cores shared out between the notebooks running at once.

    Two kernels each running as many OpenMP/BLAS threads as there are cores fight for them:
    chapters 5 and 7 side by side on 2 cores took 54-75 s with the default threads, 40-48 s
    with one thread each. A value the caller set already is kept.
    """
    threads = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    return env


def execute(nb: nbformat.NotebookNode, name: str, cwd: Path, jobs: int = 1) -> nbformat.NotebookNode:
    """Run every cell (``jobs`` notebooks run at once); fail on an unexpected error or on anything written to stderr."""
    _client(nb, cwd).execute(env=_kernel_env(jobs))
    problems = []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error" and not _raises_on_purpose(cell):
                problems.append(f"cell {index}: {out.get('ename')}: {out.get('evalue')}")
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                problems.append(f"cell {index} wrote to stderr: {''.join(out.get('text', '')).strip()[:200]}")
    if problems:
        raise BookError(f"{name}:\n  " + "\n  ".join(problems))
    return nb


def _progress(message: str) -> None:
    """One line of staging progress, at once (notebooks run two at a time, in threads)."""
    with _PRINT_LOCK:
        print(f"  [{time.perf_counter() - _STARTED:4.0f} s] {message}", flush=True)


def _stage_notebook(source: Path, cwd: Path, jobs: int = 1) -> tuple[str, bool]:
    """Execute (or take from the cache) one notebook and write its staged copy."""
    chapter = next((c for c in CHAPTERS if c.notebook == source), None)
    nb = render(read(source), chapter, "book") if chapter else read(source)
    digest = _inputs_digest(nbformat.writes(nb), chapter)
    cached = CACHE / f"{source.stem}-{digest}.ipynb"
    hit = cached.exists()
    if hit:
        nb = nbformat.read(str(cached), as_version=4)
        _progress(f"{source.name}: cached")
    else:
        _progress(f"{source.name}: executing...")
        begun = time.perf_counter()
        try:
            nb = execute(nb, source.name, cwd, jobs)
        except BaseException:
            _progress(f"{source.name}: FAILED after {time.perf_counter() - begun:.1f} s")
            raise
        _progress(f"{source.name}: executed in {time.perf_counter() - begun:.1f} s")
        CACHE.mkdir(parents=True, exist_ok=True)
        for old in CACHE.glob(f"{source.stem}-*.ipynb"):
            old.unlink()
        nbformat.write(nb, str(cached))
    if chapter:
        skeleton = {grade_id(c): c.source for c in read(source).cells if grade_id(c)}
        for cell in nb.cells:
            if grade_id(cell) in skeleton:
                cell.source = skeleton[grade_id(cell)]
    _write_if_changed(STAGE / source.relative_to(ROOT), nbformat.writes(nb))
    return source.name, hit


def _write_if_changed(target: Path, text: str) -> None:
    """Leave unchanged files untouched, so Sphinx does not read them again on a warm build."""
    if target.exists() and target.read_text() == text:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def _copy_book_files() -> None:
    for pattern in BOOK_FILES:
        for path in ROOT.glob(pattern):
            dest = STAGE / path.relative_to(ROOT)
            if path.is_dir():
                shutil.copytree(path, dest, dirs_exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
    _vendor_mathjax()
    _merge_bibliography()


def _merge_bibliography() -> None:
    """One ``references.bib`` from the per-chapter files in ``bib/`` (the name ``_config.yml`` uses)."""
    entries: dict[str, str] = {}
    for path in sorted((ROOT / "bib").glob("*.bib")):
        for entry in re.split(r"\n(?=@)", "\n" + path.read_text()):
            match = re.match(r"\s*@\w+\s*\{\s*([^,\s]+)\s*,", entry)
            if match:
                entries.setdefault(match.group(1), entry.strip())  # chapters may cite the same work
    _write_if_changed(STAGE / "references.bib", "\n\n".join(entries.values()) + "\n")


def _vendor_mathjax() -> None:
    """MathJax 3 from the django-static-mathjax wheel, served from the book (no CDN offline)."""
    import mathjax  # the django-static-mathjax package

    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    dest = STAGE / "_mathjax" / "mathjax"
    if not (dest / "tex-chtml.js").exists():
        shutil.copytree(es5, dest, dirs_exist_ok=True)


def stage(jobs: int = 2) -> list[tuple[str, bool]]:
    """Build ``_build/stage``: the book's sources with executed, skeletonised chapters."""
    _copy_book_files()
    cwd = STAGE / "chapters"
    cwd.mkdir(parents=True, exist_ok=True)
    notebooks = sorted(CHAPTERS_DIR.glob("*.ipynb"))
    for stale in set(cwd.glob("*.ipynb")) - {cwd / nb.name for nb in notebooks}:
        stale.unlink()
    global _STARTED
    _STARTED = time.perf_counter()
    print(f"Staging {len(notebooks)} notebooks ({max(1, jobs)} at a time; cache: {CACHE.relative_to(ROOT)})", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda nb: _stage_notebook(nb, cwd, max(1, jobs)), notebooks))


def build_book(jobs: int = 2) -> int:
    """Stage, then run Jupyter Book. Returns the exit status."""
    start = time.perf_counter()
    try:
        staged = stage(jobs)
    except BookError as exc:
        print(f"book: a notebook failed while executing:\n{exc}", file=sys.stderr)
        return 1
    executed = sum(not hit for _, hit in staged)
    print(
        f"Staged {len(staged)} notebooks ({executed} executed, {len(staged) - executed} cached) "
        f"in {time.perf_counter() - start:.0f} s; building HTML...",
        flush=True,
    )
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb), "build", str(STAGE), "--path-output", str(ROOT), "-W", "-n", "--keep-going"]
    status = subprocess.call(cmd, cwd=ROOT)
    print(f"Book {'built' if status == 0 else 'FAILED'} in {time.perf_counter() - start:.0f} s: {BUILD / 'html' / 'index.html'}")
    return status
