"""The notebooks students open render in plain JupyterLab, Colab and VS Code: no MyST-only markup.

``student/`` holds generated student copies of ``chapters/`` (``python -m autograder sync``);
the book's Colab, Binder and download buttons point to them, ``release`` writes the same
student form, and the feedback page shows it.
"""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import nbformat
import pytest
import yaml

from autograder.course import CHAPTERS, CHAPTERS_DIR, ROOT
from autograder.notebook_format import read
from autograder.student_form import (
    BOOK_URL,
    BookIndex,
    MystError,
    Target,
    book_index,
    myst_leftovers,
    parse_bibtex,
    student_notebook,
    to_plain_markdown,
)
from autograder.sync import student_path, student_text

NOTEBOOKS = sorted(CHAPTERS_DIR.glob("*.ipynb"))
STDLIB = set(sys.stdlib_module_names)
STUDENT_MODULES = {"numpy", "torch", "matplotlib", "ipywidgets", "IPython", "triton", "autograder", "keras"}


def _index() -> BookIndex:
    index = BookIndex()
    index.targets["ch-x"] = Target("chapters/02_x", None, "Masks")
    index.targets["sec-y"] = Target("chapters/02_x", "sec-y", "Causal `masks`")
    index.equations.update({"eq-a": ("chapters/02_x", "2.1"), "eq-b": ("chapters/03_y", "3.4")})
    index.citations.update({"v17": (("Vaswani", "Shazeer", "Parmar"), False, "2017"), "s19": (("Shazeer",), False, "2019")})
    index.citations["k15"] = (("Chollet",), True, "2015")
    return index


def test_each_construct_becomes_plain_markdown():
    page, idx = "chapters/02_x", _index()
    text = (
        "(ch-x)=\n# Title\n\nSee {ref}`ch-x`, {ref}`sec-y` and {ref}`the refs <sec-y>`.\n\n"
        "$$\na = b\n$$ (eq-a)\n\nBy {eq}`eq-a` and {eq}`eq-b`, {cite:t}`v17` and {cite:p}`v17,s19` {cite}`k15`.\n\n"
        "```{warning}\nTrue means {ref}`ch-x`.\n```\n\n```python\nx = '{ref}`not a role`'\n```\n"
    )
    out = to_plain_markdown(text, page, idx)
    assert out.startswith("# Title\n"), out
    assert f"[Masks]({BOOK_URL}chapters/02_x.html)" in out
    assert (
        f"[Causal `masks`]({BOOK_URL}chapters/02_x.html#sec-y)" in out
        and f"[the refs]({BOOK_URL}chapters/02_x.html#sec-y)" in out
    )
    assert "$$\na = b\n\\tag{2.1}\n$$" in out
    assert "By (2.1) and [(3.4)](" + BOOK_URL + "chapters/03_y.html#equation-eq-b)" in out
    bib = f"{BOOK_URL}bibliography.html"
    assert f"Vaswani *et al.* \\[[2017]({bib})\\]" in out
    assert f"\\[[Vaswani *et al.*, 2017]({bib}), [Shazeer, 2019]({bib})\\]" in out
    assert f"\\[[Chollet *et al.*, 2015]({bib})\\]" in out
    assert f"> **Warning**\n>\n> True means [Masks]({BOOK_URL}chapters/02_x.html)." in out
    assert "x = '{ref}`not a role`'" in out, "code blocks are left alone"
    assert to_plain_markdown(out, page, idx) == out, "the rewriting is idempotent"


@pytest.mark.parametrize(
    "text, message",
    [("{numref}`fig-a`", "numref"), ("{ref}`nowhere`", "nowhere"), ("{eq}`eq-z`", "eq-z"), ("{cite:p}`nobody`", "nobody")],
)
def test_unknown_constructs_fail_naming_them(text, message):
    with pytest.raises(MystError, match=message):
        to_plain_markdown(text, "chapters/02_x", _index())
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("(a)=\n" + text)])
    lenient = student_notebook(nb, "chapters/02_x", _index(), strict=False)
    assert not myst_leftovers(lenient), lenient.cells[0].source


def test_bibtex_names_as_sphinxcontrib_bibtex_prints_them():
    bib = "@misc{a, author = {{Keras team}}, year = 2024}\n@article{b, author = {R{\\'e}, Chris and Kaiser, {\\L}ukasz},\n year = {2022}}\n@misc{c, author={Chollet, Fran\\c{c}ois and others}, year={2015}}"
    assert list(parse_bibtex(bib)) == [
        ("a", ("Keras team",), False, "2024"),
        ("b", ("Ré", "Kaiser"), False, "2022"),
        ("c", ("Chollet",), True, "2015"),
    ]


def test_book_url_is_the_configured_base_url():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["html"]["baseurl"] == BOOK_URL


def test_equations_are_numbered_as_the_book_numbers_them():
    """Sphinx numbers labelled equations N.k per page (N: the page's number in its part of _toc.yml)."""
    idx = book_index()
    first = {page: number for page, number in idx.equations.values() if number.endswith(".1")}
    assert first["chapters/01_dot_product_attention"] == "1.1"
    assert first["chapters/04_multi_head_attention"] == "4.1"
    html = ROOT / "_build" / "html"
    if not html.exists():
        pytest.skip("no built book in _build/html to compare with (run `python -m autograder book`)")
    problems = []
    for label, (page, number) in idx.equations.items():
        text = (html / f"{page}.html").read_text()
        m = re.search(rf'id="equation-{re.escape(label)}".*?\(([\d.]+)\)', text, re.S)
        if not m or m.group(1) != number:
            problems.append(f"{page}: {label} is {m.group(1) if m else 'missing'} in the book, {number} in the student copy")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_student_copy_is_generated_and_current(notebook):
    target = student_path(notebook)
    assert target.exists(), f"{target.relative_to(ROOT)} is missing: run `python -m autograder sync`"
    assert target.read_text() == student_text(notebook.read_text(), f"chapters/{notebook.stem}"), (
        f"{target.relative_to(ROOT)} differs from what sync writes from {notebook.relative_to(ROOT)}: "
        "run `python -m autograder sync` (never edit student/ by hand)"
    )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_student_copy_has_no_myst_and_the_same_code(notebook):
    student, source = read(student_path(notebook)), read(notebook)
    assert not myst_leftovers(student), "\n".join(myst_leftovers(student))
    code = lambda nb: [(c.get("id"), c.source, c.metadata.get("nbgrader")) for c in nb.cells if c.cell_type == "code"]
    assert code(student) == code(source), "the student copy must keep every code cell (and its nbgrader metadata) as it is"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_student_copy_imports_only_what_the_student_install_has(notebook):
    """Colab runs every cell with only `pip install git+<repository>`: no book-only module may be imported."""
    problems = []
    for i, cell in enumerate(read(student_path(notebook)).cells):
        if cell.cell_type != "code":
            continue
        for m in re.finditer(r"^[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import|import[ \t]+([\w.]+))", cell.source, re.M):
            module = (m.group(1) or m.group(2)).split(".")[0]
            guarded = re.search(r"try:\s*\n\s*" + re.escape(m.group(0).strip()), cell.source)
            if module not in STDLIB | STUDENT_MODULES and not guarded:
                problems.append(
                    f"cell {i} imports {module}, which the student install lacks (guard it with try/except ImportError)"
                )
    assert not problems, f"{notebook.name}:\n" + "\n".join(problems)


def test_launch_and_download_buttons_point_at_the_student_copy(tmp_path):
    sys.path.insert(0, str(ROOT / "_ext"))
    import student_links

    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "04_multi_head_attention.ipynb").write_text("{}")
    app = SimpleNamespace(srcdir=str(tmp_path))
    url = "https://colab.research.google.com/github/o/r/blob/main/chapters/04_multi_head_attention.ipynb"
    context = {"header_buttons": [{"label": "launch-buttons", "buttons": [{"url": url}]}]}
    student_links._retarget(app, "chapters/04_multi_head_attention", "page.html", context, None)
    new = context["header_buttons"][0]["buttons"][0]["url"]
    assert new.endswith("/blob/main/student/04_multi_head_attention.ipynb"), new
    colab_target = ROOT / new.split("/blob/main/")[1]
    assert colab_target.exists() and not myst_leftovers(read(colab_target))


@pytest.mark.slow
def test_released_notebook_has_no_myst(tmp_path):
    from autograder.release import release

    chapter = next(c for c in CHAPTERS if c.number == 4)
    course = release(tmp_path / "course", (chapter,))
    released = read(course / "release" / chapter.slug / f"{chapter.slug}.ipynb")
    assert not myst_leftovers(released), "\n".join(myst_leftovers(released))
    assert any("\\tag{4.1}" in c.source for c in released.cells if c.cell_type == "markdown")


def test_feedback_page_shows_the_student_form(tmp_path, monkeypatch):
    from nbconvert.exporters import HTMLExporter

    from autograder.grading.feedback import FeedbackWriter

    nb = read(CHAPTERS_DIR / "04_multi_head_attention.ipynb")
    nb.cells.append(nbformat.v4.new_markdown_cell("(mine)=\nMy own note on {ref}`nothing-here`."))
    path = tmp_path / "autograded.ipynb"
    nbformat.write(nb, str(path))
    writer = FeedbackWriter(tmp_path)
    monkeypatch.setattr(writer, "_get_exporter", lambda: HTMLExporter(template_name="classic"))
    result = {"assignment": "04_multi_head_attention", "student": "s1", "score": 1, "max_score": 2, "tests": []}
    page = writer.write(result, path).read_text()
    for raw in ("(ch-multi-head-attention)=", "{ref}", "{cite", "{eq}", "(mine)="):
        assert raw not in page, f"the feedback page shows {raw}"
    assert "Vaswani" in page and "\\tag{4.1}" in page
