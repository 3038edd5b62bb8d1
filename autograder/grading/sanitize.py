"""Read a submitted notebook defensively and repair it, on a copy, before nbgrader sees it.

``read_submission`` turns any file into either a notebook or a reason it cannot be graded
(empty, too large, not UTF-8, invalid JSON, not a notebook); old formats (nbformat 3) are
converted. ``sanitize`` makes the notebook's structure match the released one, so that a
student's edits cost what they should and nothing else:

* a locked cell (setup, visible and hidden tests) is always the released one: edited ones
  are restored, duplicated copies dropped, deleted ones put back where they belong;
* an exercise cell split in two (same ``grade_id`` twice in a row) is joined again; a copy
  elsewhere runs as an ordinary cell; a deleted exercise cell comes back unsolved;
* nbgrader metadata with an unknown ``grade_id`` is removed (the cell still runs);
* the setup cell runs first, the kernelspec is the course's, cell ids are unique, outputs
  are cleared.

nbgrader repeats some of this itself (restoring locked cells from the gradebook), but it
fails a whole notebook on a duplicated ``grade_id`` and never restores the setup cell.
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from pathlib import Path

import nbformat
from nbformat import NotebookNode

MAX_NOTEBOOK_MB = 100


def _gid(cell) -> str | None:
    meta = cell.get("metadata", {}).get("nbgrader")
    return meta.get("grade_id") if isinstance(meta, dict) else None


def _locked(cell) -> bool:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return bool(meta.get("locked") or meta.get("grade")) and not meta.get("solution")


def read_submission(path: Path, max_mb: int = MAX_NOTEBOOK_MB) -> tuple[NotebookNode | None, list[str], str | None]:
    """``(notebook, notes, problem)``: ``problem`` says why the file cannot be graded at all."""
    notes: list[str] = []
    try:
        st = os.lstat(path)
    except OSError as exc:
        return None, notes, f"the notebook cannot be read ({exc.strerror})"
    if not os.path.isfile(path) or os.path.islink(path):
        return None, notes, "the submission is not a regular file (a link or a folder)"
    if st.st_size == 0:
        return None, notes, "the notebook file is empty (0 bytes)"
    if st.st_size > max_mb * 1024 * 1024:
        return (
            None,
            notes,
            (
                f"the notebook is {st.st_size / 1e6:.0f} MB, more than the {max_mb} MB limit "
                "(clear the outputs, Kernel > Restart & Clear Output, and submit again)"
            ),
        )
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, notes, f"the notebook is not UTF-8 text (byte {exc.start}): was it saved by Jupyter?"
    if not text.strip():
        return None, notes, "the notebook file is empty (only whitespace)"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, notes, f"the file is not a valid notebook: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})"
    if not isinstance(data, dict) or "nbformat" not in data or not ("cells" in data or "worksheets" in data):
        return None, notes, "the file is JSON but not a notebook (no 'cells' and 'nbformat' fields)"
    version = data.get("nbformat")
    try:
        with _quiet():
            nb = nbformat.reads(text, as_version=4)
    except Exception as exc:  # noqa: BLE001  (nbformat raises several kinds)
        return None, notes, f"the notebook cannot be read: {str(exc).splitlines()[0][:200]}"
    if version != 4:
        notes.append(f"the notebook was in the old format nbformat {version}; it was converted to version 4")
    try:
        with _quiet():
            nbformat.validate(nb)
    except Exception:  # noqa: BLE001
        try:
            with _quiet():
                _, nb_dict = nbformat.validator.normalize(nb, repair_duplicate_cell_ids=True, strip_invalid_metadata=True)
                nb = nbformat.from_dict(nb_dict)
                for cell in nb.cells:
                    cell.setdefault("metadata", {})
                nbformat.validate(nb)
            notes.append("the notebook had invalid fields; they were repaired")
        except Exception as exc:  # noqa: BLE001
            return None, notes, f"the notebook is not valid: {str(exc).splitlines()[0][:200]}"
    return nb, notes, None


class _quiet:
    """Silence nbformat's validation warnings (they go to stderr)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def sanitize(nb: NotebookNode, release: NotebookNode) -> tuple[NotebookNode, list[str]]:
    """A repaired copy of ``nb`` whose nbgrader cells match the released notebook ``release``."""
    nb = copy.deepcopy(nb)
    notes: list[str] = []
    ref = {_gid(c): c for c in release.cells if _gid(c)}
    order = [_gid(c) for c in release.cells if _gid(c)]

    # 1. metadata that is not nbgrader's, or names no cell of this assignment
    for i, cell in enumerate(nb.cells):
        cell.setdefault("metadata", {})
        meta = cell.metadata.get("nbgrader")
        if meta is not None and not isinstance(meta, dict):
            del cell.metadata["nbgrader"]
            notes.append(f"cell {i + 1} had broken nbgrader metadata; it was removed")
        elif meta is not None and meta.get("grade_id") not in ref:
            del cell.metadata["nbgrader"]
            notes.append(f"cell {i + 1} claimed an unknown grade id {meta.get('grade_id')!r}; it runs as an ordinary cell")

    # 2. duplicates: join a split exercise cell, drop copies of locked cells, demote other copies
    seen: set[str] = set()
    cells: list = []
    for cell in nb.cells:
        gid = _gid(cell)
        if gid is None:
            cells.append(cell)
            continue
        if gid not in seen:
            seen.add(gid)
            cells.append(cell)
            continue
        if _locked(ref[gid]):
            notes.append(f"a second copy of the locked cell `{gid}` was removed")
            continue
        if cells and _gid(cells[-1]) == gid:
            cells[-1].source = cells[-1].source + "\n" + cell.source
            notes.append(f"the exercise cell `{gid}` had been split in two; the parts were joined again")
            continue
        del cell.metadata["nbgrader"]
        notes.append(f"a second copy of the exercise cell `{gid}` runs as an ordinary cell")
        cells.append(cell)
    nb.cells = cells

    # 3. restore locked cells and the metadata of exercise cells
    for i, cell in enumerate(nb.cells):
        gid = _gid(cell)
        if gid is None:
            continue
        original = ref[gid]
        if _locked(original):
            if cell.cell_type != original.cell_type or cell.source != original.source:
                notes.append(f"the locked cell `{gid}` had been edited; the original was restored")
            restored = copy.deepcopy(original)
            nb.cells[i] = restored
        else:
            if cell.cell_type != original.cell_type:
                notes.append(f"the exercise cell `{gid}` had been turned into {cell.cell_type}; it is code again")
                new = copy.deepcopy(original)
                new.source = cell.source
                nb.cells[i] = new
            else:
                cell.metadata["nbgrader"] = copy.deepcopy(original.metadata["nbgrader"])

    # 4. put missing cells back, after the cell that precedes them in the release
    present = {_gid(c) for c in nb.cells if _gid(c)}
    for k, gid in enumerate(order):
        if gid in present:
            continue
        before = [g for g in order[:k] if g in present]
        pos = next((j + 1 for j, c in enumerate(nb.cells) if _gid(c) == before[-1]), 0) if before else 0
        nb.cells.insert(pos, copy.deepcopy(ref[gid]))
        present.add(gid)
        what = "exercise cell" if not _locked(ref[gid]) else "locked cell"
        tail = " (unsolved)" if what == "exercise cell" else ""
        notes.append(f"the {what} `{gid}` was missing; the released one was put back{tail}")

    # 5. the setup cell first among code cells
    setup = next((i for i, c in enumerate(nb.cells) if _gid(c) == "setup"), None)
    first_code = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), None)
    if setup is not None and first_code is not None and first_code < setup:
        nb.cells.insert(first_code, nb.cells.pop(setup))
        notes.append("code cells had been moved above the setup cell; the setup cell runs first")

    # 6. kernel, ids, outputs
    if nb.metadata.get("kernelspec") != release.metadata.get("kernelspec"):
        if nb.metadata.get("kernelspec"):
            notes.append("the notebook's kernel had been changed; the course's Python 3 kernel was used")
        nb.metadata["kernelspec"] = copy.deepcopy(release.metadata.get("kernelspec"))
    for key in ("language_info", "course"):
        if key in release.metadata:
            nb.metadata[key] = copy.deepcopy(release.metadata[key])
    nb.nbformat, nb.nbformat_minor = release.nbformat, release.nbformat_minor
    ids: set[str] = set()
    for cell in nb.cells:
        cid = cell.get("id")
        if not isinstance(cid, str) or not cid or cid in ids or len(cid) > 64:
            cell["id"] = uuid.uuid4().hex[:8]
        ids.add(cell["id"])
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        else:
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
    return nb, notes


_RISKY_CALLS = {
    "os._exit": "ends the kernel with os._exit",
    "os.fork": "forks processes",
    "os.system": "runs shell commands",
    "subprocess": "runs programs",
    "ctypes": "uses ctypes",
    "socket": "opens network sockets",
    "signal.signal": "changes signal handlers",
    "set_custom_exc": "installs an IPython exception handler",
    "sys.modules": "edits sys.modules",
    "importlib": "imports modules by name (importlib)",
    "__import__": "imports modules by name (__import__)",
    "gc": "walks the interpreter's objects (gc)",
    "__code__": "touches a function's __code__",
    "__globals__": "touches a function's globals",
    "__closure__": "touches a function's closure",
    "input_transformers_cleanup": "rewrites later cells (IPython input transformers)",
    "input_transformers_post": "rewrites later cells (IPython input transformers)",
    "ast_transformers": "rewrites later cells (IPython AST transformers)",
    "events.register": "hooks IPython's cell events",
    "run_cell": "replaces or calls IPython's run_cell",
    "run_cell_async": "replaces IPython's run_cell_async",
    "run_cell_magic": "replaces IPython's run_cell_magic",
    "should_run_async": "replaces IPython's should_run_async",
    "showtraceback": "replaces IPython's traceback display",
    "register_magic_function": "defines IPython magics",
    "clear_output": "clears cell outputs",
    "sys.stdout": "replaces or writes sys.stdout",
    "sys.stderr": "replaces or writes sys.stderr",
    "sys.settrace": "traces execution",
    "sys.setprofile": "traces execution",
    "_getframe": "reads the caller's frame",
    "currentframe": "reads the caller's frame",
    "f_back": "reads the caller's frame",
    "f_locals": "reads a frame's variables",
    "os.environ": "reads the environment",
    "builtins": "changes or reads builtins",
    "__torch_function__": "overrides torch functions on its objects",
    "__torch_dispatch__": "overrides torch operators on its objects",
    "__array_ufunc__": "overrides NumPy ufuncs on its objects",
    "__array_function__": "overrides NumPy functions on its objects",
    "TorchFunctionMode": "intercepts torch functions",
    "_ahh_agent_state": "touches the grader's kernel agent",
    "_ahh_agents": "touches the grader's kernel agent",
}
# Strings that only code aimed at the grader has a reason to hold.
_RISKY_TEXT = {
    "autograder": "names the course's grader in a string",
    "\u2714": "prints the checks' success mark",
    "checks passed": "prints the checks' success line",
    "check passed": "prints the checks' success line",
    "AHH_HIDDEN_SALT": "reads the hidden tests' salt",
    "hidden_": "names the hidden tests in a string",
    "visible_": "names the visible tests in a string",
}


def _in_class(tree, fn) -> bool:
    import ast

    return any(isinstance(n, ast.ClassDef) and fn in n.body for n in ast.walk(tree))


def suspicious(nb: NotebookNode, release: NotebookNode | None = None) -> list[str]:
    """Things in the student's own cells an instructor may want to look at (they cost no points).

    Assignments to attributes of modules or of IPython (``np.allclose = ...``,
    ``get_ipython().run_cell = ...``), changes to builtins, references to the course's checks,
    and calls that end the kernel, fork, open sockets or run programs.
    """
    import ast

    flags: list[str] = []

    def dotted(node) -> str:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
        elif isinstance(node, ast.Call):
            parts.append(dotted(node.func) + "()")
        return ".".join(reversed(parts))

    course_code = {c.source.strip() for c in (release.cells if release is not None else []) if c.cell_type == "code"}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or _locked(cell) or cell.source.strip() in course_code:
            continue  # the course's own cells, as released
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        found = set()
        modules = {"np", "numpy", "torch", "builtins", "sys", "math", "autograder"}
        for node in ast.walk(tree):  # names bound to modules or to the IPython shell
            if isinstance(node, ast.Import):
                modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                modules |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and dotted(node.value.func) == "get_ipython":
                modules |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Attribute):
                        name = dotted(t)
                        root = name.split(".")[0]
                        if root in modules or "get_ipython()" in name:
                            found.add(f"replaces {name}")
            elif isinstance(node, ast.Call) and dotted(node.func) in ("setattr",) and node.args:
                found.add(f"setattr on {dotted(node.args[0]) or 'an object'}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(n and n.split(".")[0] == "autograder" for n in names):
                    found.add("imports the course's checks")
            if isinstance(node, (ast.Attribute, ast.Name)):
                name = dotted(node)
                for key, words in _RISKY_CALLS.items():
                    if name == key or name.endswith("." + key) or name.startswith(key + ".") or ("." + key + ".") in name:
                        found.add(words)
            elif isinstance(node, ast.alias):
                for key, words in _RISKY_CALLS.items():
                    if node.name == key or node.name.split(".")[0] == key:
                        found.add(words)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                for key, words in _RISKY_TEXT.items():
                    if key in node.value:
                        found.add(words)
            elif isinstance(node, ast.FunctionDef) and node.name in ("__eq__", "__ne__", "__bool__") and _in_class(tree, node):
                found.add(f"defines {node.name} on its own class (an object that may compare equal to anything)")
        flags += [f"cell {i + 1}: {f}" for f in sorted(found)]
    return flags
