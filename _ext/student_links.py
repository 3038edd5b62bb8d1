"""Point the book's Colab, Binder and download buttons at the student copy of each notebook.

``chapters/<name>.ipynb`` is the book's MyST source; ``student/<name>.ipynb`` is its generated
student copy (``python -m autograder sync``), whose prose plain JupyterLab, Colab and VS Code
render. sphinx-book-theme builds the launch links from the page's source path (priority
501); this handler runs after it and rewrites them, and once the HTML is written the
downloadable ``_sources/chapters/<name>.ipynb`` is replaced by the student copy.
``autograder/book.py`` stages ``student/`` with the book.
"""

from __future__ import annotations

import shutil
from pathlib import Path

STUDENT_DIR = "student"


def _student_copy(app, pagename: str) -> Path | None:
    if not pagename.startswith("chapters/"):
        return None
    path = Path(app.srcdir) / STUDENT_DIR / f"{pagename.removeprefix('chapters/')}.ipynb"
    return path if path.exists() else None


def _retarget(app, pagename, templatename, context, doctree):
    if _student_copy(app, pagename) is None:
        return
    source = f"{pagename}.ipynb"
    target = f"{STUDENT_DIR}/{pagename.removeprefix('chapters/')}.ipynb"
    for group in context.get("header_buttons", []):
        if group.get("label") != "launch-buttons":
            continue
        for button in group.get("buttons", []):
            if "url" in button:
                button["url"] = button["url"].replace(f"/{source}", f"/{target}")


def _replace_downloads(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    for docname in app.env.found_docs:
        student = _student_copy(app, docname)
        download = Path(app.outdir) / "_sources" / f"{docname}.ipynb"
        if student is not None and download.exists():
            shutil.copyfile(student, download)


def setup(app):
    app.connect("html-page-context", _retarget, priority=510)
    app.connect("build-finished", _replace_downloads)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
