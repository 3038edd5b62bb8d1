"""The book as readers see it: every page of ``_toc.yml`` in a real browser, offline, warning-free.

The book is built once per session (``python -m autograder book``: ``-W -n --keep-going``)
and served from ``_build/html`` on 127.0.0.1; Debian's Chromium (``/usr/bin/chromium``),
driven by Playwright, visits each page once and records what the checks below need:
console errors and failed requests, MathJax (served by the book, no TeX errors), figures
(loaded, with alt text), cell outputs (no traceback or stderr), copy buttons, axe-core
accessibility violations, launch and download buttons, previous/next links. A full-page
screenshot of each page goes to ``_build/screenshots/``.

The ``test_acceptance_*`` tests prove the checks bite: a broken equation, figure path,
link, cross-reference or figure without alt text fails, naming the page.

Set ``BOOK_REUSE=1`` to test an existing ``_build/html`` without rebuilding it.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from browser_support import (
    CHROMIUM,
    chapter_pages,
    clean_dir,
    launch_chromium,
    link_problems,
    notebook_problems,
    serve,
    site_with_replaced_page,
    toc_pages,
    visit,
)

from autograder.course import ROOT

sys.path.insert(0, str(ROOT / "_ext"))
from alt_text import describe_figure  # noqa: E402

PAGES = toc_pages(ROOT)
CHAPTERS = chapter_pages(PAGES)
SCREENSHOTS = ROOT / "_build" / "screenshots"
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())

needs_browser = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


def _report(problems: list[str]) -> str:
    return "\n".join(problems)


# --- fixtures: one build, one server, one browser, one visit per page ----------------------


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    pytest.importorskip("axe_playwright_python", reason="axe-playwright-python (axe-core) is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def context(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light", service_workers="block")
    context.set_default_timeout(30_000)
    yield context
    context.close()


@pytest.fixture(scope="session")
def site(built_book):
    with serve(built_book) as base_url:
        yield base_url


@pytest.fixture(scope="session")
def reports(context, site):
    """Every page of the table of contents, visited once, with a full-page screenshot."""
    clean_dir(SCREENSHOTS)
    page = context.new_page()
    try:
        return {
            name: visit(page, site, name, screenshot=SCREENSHOTS / f"{name.replace('/', '__')}.jpg", run_axe=True)
            for name in PAGES
        }
    finally:
        page.close()


# --- every page ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAGES)
@pytest.mark.slow
@needs_browser
def test_page_loads_without_errors_or_failed_requests(reports, name):
    assert not reports[name].load_problems(), _report(reports[name].load_problems())


@pytest.mark.parametrize("name", PAGES)
@pytest.mark.slow
@needs_browser
def test_equations_render_with_local_mathjax(reports, name):
    report = reports[name]
    assert not report.math_problems(), _report(report.math_problems())


@pytest.mark.parametrize("name", PAGES)
@pytest.mark.slow
@needs_browser
def test_figures_load_and_have_alt_text(reports, name):
    assert not reports[name].image_problems(), _report(reports[name].image_problems())


@pytest.mark.parametrize("name", PAGES)
@pytest.mark.slow
@needs_browser
def test_no_traceback_or_stderr_in_outputs(reports, name):
    assert not reports[name].output_problems(), _report(reports[name].output_problems())


@pytest.mark.parametrize("name", PAGES)
@pytest.mark.slow
@needs_browser
def test_code_blocks_have_copy_buttons(reports, name):
    report = reports[name]
    assert not report.copy_button_problems(), _report(report.copy_button_problems())


@pytest.mark.parametrize("name", PAGES)
@pytest.mark.slow
@needs_browser
def test_no_serious_accessibility_violations(reports, name):
    assert not reports[name].axe_problems(), _report(reports[name].axe_problems())


@pytest.mark.parametrize("name", PAGES)
@pytest.mark.slow
@needs_browser
def test_links_in_the_content_resolve(reports, built_book, site, name):
    problems = link_problems(reports[name], built_book, site)
    assert not problems, _report(problems)


# --- the book as a whole ------------------------------------------------------------------


@pytest.mark.slow
@needs_browser
def test_the_checks_have_something_to_check(reports):
    """Guards the page checks against passing vacuously (a theme or MathJax change that hides what they look for)."""
    assert any(reports[name].images for name in CHAPTERS), "no figure found on any chapter page"
    assert any(reports[name].math.get("rendered", 0) > 0 for name in CHAPTERS), "no rendered equation on any chapter page"
    assert any(reports[name].code_blocks.get("inputs", 0) > 0 for name in CHAPTERS), "no code cell on any chapter page"


@pytest.mark.slow
@needs_browser
def test_dark_mode_has_no_serious_accessibility_violations(browser, site):
    """The book follows the reader's dark setting (default_mode: auto): check the first chapter in it too."""
    name = CHAPTERS[0] if CHAPTERS else PAGES[0]
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="dark", service_workers="block")
    try:
        page = context.new_page()
        report = visit(page, site, name, run_axe=True)
        assert page.evaluate("document.documentElement.dataset.theme") == "dark", "the page did not switch to dark mode"
    finally:
        context.close()
    problems = report.load_problems() + report.axe_problems()
    assert not problems, _report(problems)


@pytest.mark.slow
@needs_browser
def test_previous_and_next_walk_the_book_in_toc_order(reports, context, site):
    by_url = {r.url: name for name, r in reports.items()}
    forward, name = [PAGES[0]], PAGES[0]
    while reports[name].nav["next"] and len(forward) <= len(PAGES):
        name = by_url.get(reports[name].nav["next"].split("#")[0], reports[name].nav["next"])
        forward.append(name)
    assert forward == PAGES, f"next links walk {forward}, _toc.yml says {PAGES}"
    backward, name = [PAGES[-1]], PAGES[-1]
    while reports[name].nav["prev"] and len(backward) <= len(PAGES):
        name = by_url.get(reports[name].nav["prev"].split("#")[0], reports[name].nav["prev"])
        backward.append(name)
    assert backward == PAGES[::-1], f"previous links walk {backward}"
    page = context.new_page()
    try:  # the site's front door leads to the first page
        page.goto(site)
        page.wait_for_url(re.compile(re.escape(PAGES[0]) + r"\.html$"))
        page.locator(".prev-next-area a.right-next").click()
        page.wait_for_url(re.compile(re.escape(PAGES[1]) + r"\.html$"))
    finally:
        page.close()


@pytest.mark.slow
@needs_browser
def test_search_finds_softmax(context, site):
    page = context.new_page()
    errors = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(site + "search.html?q=softmax")
        page.wait_for_function("document.querySelectorAll('#search-results ul.search li').length > 0", timeout=20_000)
        hits = page.eval_on_selector_all("#search-results ul.search li a", "els => els.map(a => a.getAttribute('href'))")
    finally:
        page.close()
    assert any("chapters/01_dot_product_attention" in h for h in hits), f"search for softmax found {hits}"
    assert not errors, f"search.html: console errors {errors}"


@pytest.mark.parametrize("name", CHAPTERS)
@pytest.mark.slow
@needs_browser
def test_launch_buttons_open_the_chapter_notebook_in_colab_and_binder(reports, name):
    repo = CONFIG["repository"]["url"].removeprefix("https://github.com/")
    branch = CONFIG["repository"]["branch"]
    notebook = f"student/{Path(name).name}.ipynb"  # the generated student copy (plain Markdown), see _ext/student_links.py
    launch = reports[name].nav["launch"]
    colab = f"https://colab.research.google.com/github/{repo}/blob/{branch}/{notebook}"
    assert colab in launch, f"{name}: no Colab link {colab} in {launch}"
    binder = [h for h in launch if h.startswith("https://mybinder.org/v2/gh/")]
    assert binder and all(f"/{repo}/{branch}" in h and h.endswith(notebook) for h in binder), f"{name}: Binder links {binder}"


@pytest.mark.parametrize("name", CHAPTERS)
@pytest.mark.slow
@needs_browser
def test_download_button_gives_the_notebook(reports, context, name, tmp_path):
    ipynb = [h for h in reports[name].nav["download"] if h.endswith(".ipynb")]
    assert ipynb, f"{name}: the download menu offers {reports[name].nav['download']}"
    assert ipynb[0].endswith(f"_sources/{name}.ipynb"), ipynb
    response = context.request.get(ipynb[0])
    assert response.ok, f"{name}: download {ipynb[0]} gave HTTP {response.status}"
    path = tmp_path / f"{Path(name).name}.ipynb"
    path.write_bytes(response.body())
    graded = re.match(r"chapters/\d\d_", name) is not None  # appendices have no exercises
    problems = notebook_problems(path, expect_skeleton=graded)
    assert not problems, _report(problems)
    assert path.read_text() == (ROOT / "student" / path.name).read_text(), f"{name}: the download is not student/{path.name}"


# --- acceptance: the checks catch a broken equation, figure, link and cross-reference ----


def _first_chapter_with(reports, what: str) -> str:
    for name in CHAPTERS:
        if (what == "math" and reports[name].math.get("rendered")) or (what == "image" and reports[name].images):
            return name
    pytest.skip(f"no chapter page has {what}")


@pytest.mark.slow
@needs_browser
@pytest.mark.parametrize(
    "broken, message",
    [
        (r"\fraq{1}{2} + ", "TeX error 'Undefined control sequence"),
        (r"x^1^2 + ", "TeX error 'Double exponent"),
        (r"\frac{1}{", "equation not rendered by MathJax"),
    ],
    ids=["undefined-macro", "double-exponent", "missing-brace"],
)
def test_acceptance_broken_tex_fails_naming_the_page(reports, built_book, context, tmp_path, broken, message):
    name = _first_chapter_with(reports, "math")

    def break_first_equation(html: str) -> str:
        edited = re.sub(r'(<span class="math notranslate nohighlight">\\\()', lambda m: m.group(1) + broken, html, count=1)
        assert edited != html, "no inline equation to break"
        return edited

    broken_site = site_with_replaced_page(built_book, tmp_path / "site", name, break_first_equation)
    page = context.new_page()
    try:
        with serve(broken_site) as base_url:
            report = visit(page, base_url, name, run_axe=False)
    finally:
        page.close()
    problems = report.math_problems()
    assert problems, "a broken equation went unnoticed"
    assert all(p.startswith(f"{name}: ") for p in problems), problems
    assert any(message in p for p in problems), problems


@pytest.mark.slow
@needs_browser
def test_acceptance_broken_figure_path_and_link_fail_naming_the_page(reports, built_book, context, tmp_path):
    name = _first_chapter_with(reports, "image")

    def break_figure_and_link(html: str) -> str:
        head, article = html.split("<article", 1)
        article = article.replace('src="../_images/', 'src="../_images/missing-', 1)
        article = re.sub(r'(class="reference internal" href=")[^"]*"', r'\1../no-such-page.html"', article, count=1)
        article = re.sub(r'(class="reference internal" href=")#[^"]*"', r'\1#no-such-anchor"', article, count=1)
        assert article.count("missing-") == 1 and "no-such-page" in article and "no-such-anchor" in article
        return head + "<article" + article

    broken_site = site_with_replaced_page(built_book, tmp_path / "site", name, break_figure_and_link)
    page = context.new_page()
    try:
        with serve(broken_site) as base_url:
            report = visit(page, base_url, name, run_axe=False)
            links = link_problems(report, broken_site, base_url)
    finally:
        page.close()
    images = report.image_problems()
    assert any("image does not load: ../_images/missing-" in p for p in images), images
    assert any("failed request" in p and "missing-" in p for p in report.load_problems()), report.load_problems()
    assert any("broken link" in p and "no-such-page" in p for p in links), links
    assert any("missing anchor" in p and "no-such-anchor" in p for p in links), links
    assert all(p.startswith(f"{name}: ") for p in images + links)


@pytest.mark.slow
def test_acceptance_broken_cross_reference_and_missing_alt_text_fail_the_build(tmp_path):
    """A tiny book with our _config.yml and _ext: -W -n fails, naming the page of each problem.

    The same build shows where alt text comes from: the cell metadata ``mystnb.image.alt``
    wins, else the figure's title in the code, else a warning.
    """
    import nbformat

    book = tmp_path / "book"
    book.mkdir()
    shutil.copy(ROOT / "_config.yml", book / "_config.yml")
    shutil.copytree(ROOT / "_ext", book / "_ext", ignore=shutil.ignore_patterns("__pycache__"))
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: figure\n")
    (book / "references.bib").write_text("@misc{nobody, title = {Nothing}, year = {2026}}\n")
    (book / "intro.md").write_text("(intro)=\n# Intro\n\nSee {ref}`ch-no-such-chapter`.\n")

    def figure_cell(source: str, **metadata):
        cell = nbformat.v4.new_code_cell(source, metadata=metadata)
        png = base64.b64encode(_tiny_png(len(source))).decode()  # distinct images, distinct files
        cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"})]
        return cell

    cells = [
        nbformat.v4.new_markdown_cell("# A figure"),
        figure_cell("plt.plot([1, 2]); plt.show()"),
        figure_cell('plt.plot([1, 2]); plt.title("Ignored")', mystnb={"image": {"alt": "Alt from the cell metadata"}}),
        figure_cell('fig, ax = plt.subplots()\nax.set_title("Loss against step")'),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(book / "figure.ipynb"))
    jb = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run(
        [str(jb), "build", str(book), "--path-output", str(tmp_path), "-W", "-n", "--keep-going"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0, "the build passed with an undefined label and a figure without alt text"
    assert re.search(r"intro\.md:\d+: WARNING: undefined label: 'ch-no-such-chapter'", log), log[-3000:]
    assert re.search(r"figure\.ipynb:\d*:? ?WARNING: notebook figure in cell 1 has no alt text", log), log[-3000:]
    assert len(re.findall(r"WARNING: notebook figure", log)) == 1, log[-3000:]
    alts = re.findall(r'<img alt="([^"]*)" src="_images/', (tmp_path / "_build" / "html" / "figure.html").read_text())
    assert alts == ["Figure drawn by the code cell above", "Alt from the cell metadata", "Loss against step"], alts


def _tiny_png(grey: int = 0) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes([0, grey % 256])))
        + chunk(b"IEND", b"")
    )


# --- fast: the alt-text extension and the table of contents -------------------------------


@pytest.mark.parametrize(
    "source, alt",
    [
        ('fig, ax = plt.subplots()\nax.set_title("Attention weights")', "Attention weights"),
        ('ax.set(xlabel="key", title=r"Score of each key: $q \\cdot k_i$")', "Score of each key: q · k_i"),
        ('a.set_title("left")\nb.set_title("right")', "2 panels: left; right"),
        ('for T in ts:\n    ax.set(title=f"T = {T:g}")\nfig.suptitle("softmax(x / T)")', "softmax(x / T)"),
        ('fig.suptitle("Heads")\naxes[0].set_title("head 1")', "Heads. Panels: head 1"),
        ('plt.xlabel("position")\nplt.ylabel("weight")', "Plot of weight against position"),
        ("plt.plot([1, 2])", None),
        ("this is not python", None),
    ],
)
def test_alt_text_from_the_figure_titles(source, alt):
    assert describe_figure(source) == alt


def test_toc_pages_in_reading_order():
    assert PAGES[0] == yaml.safe_load((ROOT / "_toc.yml").read_text())["root"]
    assert len(PAGES) == len(set(PAGES)), PAGES
    for name in PAGES:
        assert any((ROOT / f"{name}{suffix}").exists() for suffix in (".md", ".ipynb")), f"{name} in _toc.yml has no source"
