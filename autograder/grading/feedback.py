"""Feedback HTML per student: nbgrader's feedback page, without the hidden tests' code.

nbgrader's own ``generate_feedback`` shows hidden tests in full (nbgrader issue 917). Here the
autograded notebook is copied, every hidden test cell's code between ``### BEGIN HIDDEN
TESTS`` and ``### END HIDDEN TESTS`` is replaced by a sentence, the tracebacks of hidden
cells are reduced to their messages (a traceback quotes the cell's code), a summary cell
(score, each test's points and message, what the grader did) is put on top, and the page
is rendered with nbgrader's feedback template and scores. The prose is shown in student form
(``autograder.student_form``): a notebook opened from ``chapters/`` carries MyST roles and
labels, which nbconvert would print as raw text.
"""

from __future__ import annotations

import copy
import html
import os
from pathlib import Path

import nbformat

from autograder.notebook_format import BEGIN_HIDDEN, END_HIDDEN
from autograder.student_form import student_notebook

HIDDEN_SENTENCE = "# The hidden tests ran here when your notebook was graded; their code is not shown."


def scrub_hidden(nb: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, list[str]]:
    """A copy of ``nb`` without hidden test code; also returns the removed lines (to prove they are gone)."""
    nb = copy.deepcopy(nb)
    removed: list[str] = []
    for cell in nb.cells:
        if cell.cell_type != "code" or BEGIN_HIDDEN not in cell.source:
            continue
        kept, inside = [], False
        for line in cell.source.splitlines():
            if line.strip() == BEGIN_HIDDEN:
                inside = True
                kept.append(HIDDEN_SENTENCE)
            elif line.strip() == END_HIDDEN:
                inside = False
            elif inside:
                removed.append(line)
            else:
                kept.append(line)
        cell.source = "\n".join(kept)
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                out["traceback"] = [f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"]
    return nb, removed


def _summary_cell(result: dict) -> nbformat.NotebookNode:
    lines = [
        f"## Feedback: {result['assignment']}",
        "",
        f"**Score: {result['score']:g} / {result['max_score']:g}**",
        "",
    ]
    if result.get("tests"):
        lines += ["| test | points | result |", "| --- | --- | --- |"]
        for t in result["tests"]:
            msg = "passed" if t["passed"] else (t["message"].splitlines() or ["failed"])[0]
            lines.append(
                f"| `{t['grade_id']}` | {t['points']:g} / {t['max_points']:g} | {html.escape(msg).replace('|', '&#124;')} |"
            )
        lines.append("")
    notes = result.get("notes", []) + [e["message"] for e in result.get("events", [])]
    if notes:
        lines += ["**What the grader noticed:**", ""] + [f"- {html.escape(n)}" for n in notes] + [""]
    lines.append("Failed tests show their full message in the test cell below.")
    return nbformat.v4.new_markdown_cell("\n".join(lines))


class FeedbackWriter:
    """Renders feedback pages; one per worker (the template is compiled once)."""

    def __init__(self, course: Path, db_url: str | None = None):
        self.course = Path(course)
        self.db_url = db_url or f"sqlite:///{self.course.resolve() / 'gradebook.db'}"
        self._exporter = None

    def _get_exporter(self):
        if self._exporter is None:
            import nbgrader
            from nbconvert.exporters import HTMLExporter
            from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
            from nbgrader.preprocessors import GetGrades
            from traitlets.config import Config

            base = Path(nbgrader.__file__).parent / "server_extensions" / "formgrader"
            c = Config()
            c.HTMLExporter.template_name = "feedback"
            c.HTMLExporter.extra_template_basedirs = [str(base / "templates")]
            c.HTMLExporter.extra_template_paths = [str(base / "static" / "node_modules" / "bootstrap" / "dist" / "css")]
            exporter = HTMLExporter(config=c)
            exporter.register_preprocessor(GetGrades(config=c), enabled=True)
            exporter.register_preprocessor(CSSHTMLHeaderPreprocessor(config=c), enabled=True)
            self._exporter = exporter
        return self._exporter

    def path(self, assignment: str, student: str) -> Path:
        return self.course / "feedback" / student / assignment / f"{assignment}.html"

    def write(self, result: dict, autograded: Path | None) -> Path:
        """Write the page for ``result`` (from the autograded notebook, or a short page if there is none)."""
        target = self.path(result["assignment"], result["student"])
        target.parent.mkdir(parents=True, exist_ok=True)
        if autograded is not None and autograded.exists():
            nb = nbformat.read(str(autograded), as_version=4)
            nb, _ = scrub_hidden(nb)
            nb = student_notebook(nb, f"chapters/{result['assignment']}", strict=False)
            nb.cells.insert(0, _summary_cell(result))
            resources = {
                "nbgrader": {
                    "student": result["student"],
                    "assignment": result["assignment"],
                    "notebook": result["assignment"],
                    "db_url": self.db_url,
                },
                "metadata": {"name": result["assignment"]},
            }
            body, _ = self._get_exporter().from_notebook_node(nb, resources=resources)
        else:
            body = _plain_page(result)
        tmp = target.with_suffix(".html.tmp")
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, target)
        return target


def _plain_page(result: dict) -> str:
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.get("notes", []))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Feedback: {html.escape(result['assignment'])}</title></head><body>"
        f"<h1>Feedback: {html.escape(result['assignment'])}</h1>"
        f"<p><strong>Score: {result['score']:g} / {result['max_score']:g}</strong></p>"
        f"<p>Your submission could not be graded: {html.escape(result.get('message', ''))}</p>"
        + (f"<ul>{notes}</ul>" if notes else "")
        + "</body></html>\n"
    )
