"""Page checks for the built book in a real browser (Chromium through Playwright), offline.

Used by ``tests/test_browser.py``. Everything here takes a directory of built HTML and
reports problems as strings that name the page, so that a failing test says where to look.
No browser is ever downloaded: Debian's ``/usr/bin/chromium`` is driven by Playwright.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import yaml

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))  # Debian's; never a downloaded browser
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MATHJAX_TIMEOUT_MS = 30_000

# Theme-level axe-core findings that our content cannot fix (listed in docs/book.md):
# (rule id, CSS-selector fragment of the offending node). Anything else serious or critical fails.
THEME_AXE_ALLOWED: tuple[tuple[str, str], ...] = ()


def toc_pages(book_root: Path) -> list[str]:
    """Every page of ``_toc.yml`` in reading order, as docnames (``intro``, ``chapters/01_...``)."""
    toc = yaml.safe_load((book_root / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                pages.append(re.sub(r"\.(md|ipynb)$", "", entry["file"]))
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return pages


def chapter_pages(pages: list[str]) -> list[str]:
    """Pages built from a notebook in ``chapters/`` (chapters and notebook appendices; they have launch buttons)."""
    root = Path(__file__).resolve().parent.parent
    return [p for p in pages if p.startswith("chapters/") and (root / f"{p}.ipynb").exists()]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the signature of the base class
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 at a free port; yields the base URL (ending in '/')."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def launch_chromium(playwright):
    """Debian's Chromium, headless, with nothing that phones home."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def axe_script() -> str:
    """axe-core as bundled in the ``axe-playwright-python`` wheel (no network)."""
    from axe_playwright_python.base import AXE_SCRIPT

    return AXE_SCRIPT


@dataclass
class PageReport:
    """What one visit of a page saw."""

    name: str
    url: str
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    math: dict = field(default_factory=dict)
    images: list[dict] = field(default_factory=list)
    bad_outputs: list[str] = field(default_factory=list)
    code_blocks: dict = field(default_factory=dict)
    links: list[str] = field(default_factory=list)
    nav: dict = field(default_factory=dict)
    axe: list[dict] = field(default_factory=list)

    # --- checks: each returns a list of problems, each naming the page ---------------------
    def load_problems(self) -> list[str]:
        return [f"{self.name}: console error: {e}" for e in self.console_errors] + [
            f"{self.name}: failed request: {r}" for r in self.failed_requests
        ]

    def math_problems(self) -> list[str]:
        m, problems = self.math, []
        if m.get("error"):
            problems.append(f"{self.name}: MathJax did not finish: {m['error']}")
        if m.get("expected") and not m.get("local"):
            problems.append(f"{self.name}: MathJax is not served by the book itself: {m.get('scripts')}")
        for tex, message in m.get("errors", []):
            problems.append(f"{self.name}: TeX error {message!r} in: {tex[:200]}")
        for tex in m.get("unrendered", []):
            problems.append(f"{self.name}: equation not rendered by MathJax: {tex[:200]}")
        return problems

    def image_problems(self) -> list[str]:
        problems = []
        for img in self.images:
            if not img["loaded"]:
                problems.append(f"{self.name}: image does not load: {img['src']}")
            alt = (img["alt"] or "").strip()
            if img["decorative"]:
                continue
            if not alt:
                problems.append(f"{self.name}: image without alt text: {img['src']}")
            elif re.search(r"\.(png|jpe?g|svg|gif|webp)$", alt, re.I) or ("/" in alt and " " not in alt):
                problems.append(f"{self.name}: image alt text is a file name ({alt!r}): {img['src']}")
        return problems

    def output_problems(self) -> list[str]:
        return [f"{self.name}: {p}" for p in self.bad_outputs]

    def copy_button_problems(self) -> list[str]:
        missing = self.code_blocks.get("missing", [])
        return [f"{self.name}: code block without a copy button: {snippet!r}" for snippet in missing]

    def axe_problems(self, allowed: tuple[tuple[str, str], ...] = THEME_AXE_ALLOWED) -> list[str]:
        problems = []
        for v in self.axe:
            if v["impact"] not in ("serious", "critical"):
                continue
            for node in v["nodes"]:
                target = " ".join(map(str, node["target"]))
                if any(v["id"] == rule and fragment in target for rule, fragment in allowed):
                    continue
                problems.append(f"{self.name}: axe {v['impact']} {v['id']} ({v['help']}) at {target}: {node['html'][:160]}")
        return problems


# JavaScript run in the page ----------------------------------------------------------------

_MATH_JS = """
async (timeout) => {
  const scripts = [...document.querySelectorAll('script[src]')].map(s => s.src).filter(s => /mathjax/i.test(s));
  const expected = document.querySelectorAll('.math, .amsmath').length > 0;
  const result = {expected, scripts, local: scripts.length > 0 && scripts.every(s => s.startsWith(location.origin))};
  if (!expected) return result;
  const deadline = Date.now() + timeout;
  while (!(window.MathJax && MathJax.startup && MathJax.startup.promise) && Date.now() < deadline)
    await new Promise(r => setTimeout(r, 50));
  if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) { result.error = 'MathJax never loaded'; return result; }
  try {
    const timer = new Promise((_, no) => setTimeout(() => no(new Error('timed out')), Math.max(0, deadline - Date.now())));
    await Promise.race([MathJax.startup.promise, timer]);
  } catch (e) { result.error = String(e); return result; }
  result.errors = [...document.querySelectorAll('mjx-merror')].map(e => {
    const c = e.closest('mjx-container');
    const item = c && MathJax.startup.document.getMathItemsWithin ? MathJax.startup.document.getMathItemsWithin(c)[0] : null;
    return [item ? item.math : (c ? c.textContent : e.textContent), e.getAttribute('data-mjx-error') || e.textContent];
  });
  result.unrendered = [...document.querySelectorAll('.math, .amsmath')]
     .filter(el => !el.querySelector('mjx-container') && !el.closest('mjx-container'))
     .map(el => el.textContent.trim());
  result.rendered = document.querySelectorAll('mjx-container').length;
  return result;
}
"""

_IMAGES_JS = """
() => [...document.querySelectorAll('main img, article img')].map(img => ({
  src: img.getAttribute('src'),
  alt: img.getAttribute('alt'),
  loaded: img.complete && img.naturalWidth > 0,
  decorative: ['presentation', 'none'].includes(img.getAttribute('role')) || img.getAttribute('aria-hidden') === 'true',
}))
"""

_OUTPUTS_JS = """
() => {
  const problems = [];
  for (const cell of document.querySelectorAll('.cell')) {
    if (cell.classList.contains('tag_raises-exception')) continue;
    const index = [...document.querySelectorAll('.cell')].indexOf(cell);
    for (const out of cell.querySelectorAll('.output.stderr, .output.traceback, .output.error, .stderr'))
      problems.push(`cell ${index}: ${out.classList.contains('stderr') ? 'stderr' : 'error'} output: `
                    + out.textContent.trim().slice(0, 200));
    if (cell.querySelector('.cell_output script[type="application/vnd.jupyter.widget-view+json"]'))
      problems.push(`cell ${index}: a widget output shows nothing in the book: tag the cell remove-output`);
    const text = cell.querySelector('.cell_output') ? cell.querySelector('.cell_output').textContent : '';
    if (/Traceback \\(most recent call last\\)/.test(text))
      problems.push(`cell ${index}: traceback in output: ` + text.trim().slice(0, 200));
  }
  return problems;
}
"""

_CODE_JS = """
() => {
  const blocks = [...document.querySelectorAll('main div.highlight pre')];
  const missing = blocks.filter(pre => !pre.parentElement.querySelector('button.copybtn'))
                        .map(pre => pre.textContent.trim().slice(0, 60));
  return {count: blocks.length, inputs: document.querySelectorAll('main .cell_input div.highlight pre').length, missing};
}
"""

# axe's color-contrast rule costs milliseconds per text node, and a chapter has thousands of
# syntax-highlighting spans whose colours repeat. So: every rule on the page without its code
# blocks; every rule but color-contrast on the code blocks; and color-contrast on the code
# through one span of each highlighting class, the smallest block (unhighlighted text) and a
# copy button.
_AXE_JS = """
async () => {
  const base = {resultTypes: ['violations'], preload: false};
  const runs = [await axe.run({exclude: [['div.highlight']]}, base)];
  const blocks = [...document.querySelectorAll('div.highlight')];
  if (blocks.length) {
    runs.push(await axe.run({include: [['div.highlight']]}, {...base, rules: {'color-contrast': {enabled: false}}}));
    const sample = new Map();
    for (const span of document.querySelectorAll('div.highlight span[class]'))
      if (!sample.has(span.className)) sample.set(span.className, span);
    const smallest = blocks.reduce((a, b) => (b.textContent.length < a.textContent.length ? b : a));
    const nodes = [...sample.values(), smallest, document.querySelector('div.highlight button.copybtn')].filter(Boolean);
    runs.push(await axe.run({include: nodes}, {...base, runOnly: {type: 'rule', values: ['color-contrast']}}));
  }
  return runs.flatMap(r => r.violations);
}
"""

_LINKS_JS = """
() => [...document.querySelectorAll('main a[href]')].map(a => a.href)
"""

_NAV_JS = """
() => {
  const href = sel => { const a = document.querySelector(sel); return a ? a.href : null; };
  const links = sel => [...document.querySelectorAll(sel)].map(a => a.href);
  return {
    next: href('.prev-next-area a.right-next'),
    prev: href('.prev-next-area a.left-prev'),
    launch: links('.dropdown-launch-buttons a'),
    download: links('.dropdown-download-buttons a[href]').filter(h => !h.startsWith('javascript')),
  };
}
"""


def visit(page, base_url: str, name: str, screenshot: Path | None = None, run_axe: bool = True) -> PageReport:
    """Load one page (``name`` is its docname), wait for MathJax, and record everything the checks need."""
    url = urljoin(base_url, f"{name}.html")
    report = PageReport(name=name, url=url)
    origin = base_url.rstrip("/")

    def on_console(msg):
        if msg.type == "error":
            report.console_errors.append(msg.text)

    def on_response(resp):
        if resp.status >= 400:
            report.failed_requests.append(f"{resp.status} {resp.url}")

    def on_failed(req):
        failure = req.failure or ""
        if "ERR_ABORTED" in failure and any(req.url in r for r in report.failed_requests):
            return  # already reported with its HTTP status
        report.failed_requests.append(f"{req.url} ({failure})")

    def on_request(req):
        if not req.url.startswith(origin) and not req.url.startswith(("data:", "blob:", "about:")):
            report.failed_requests.append(f"{req.url} (not served by the book: the page must work offline)")

    handlers = {
        "console": on_console,
        "pageerror": lambda exc: report.console_errors.append(f"uncaught {exc}"),
        "response": on_response,
        "requestfailed": on_failed,
        "request": on_request,
    }
    for event, handler in handlers.items():
        page.on(event, handler)
    try:
        page.goto(url, wait_until="load")
        report.math = page.evaluate(_MATH_JS, MATHJAX_TIMEOUT_MS)
        page.wait_for_load_state("networkidle")
        report.images = page.evaluate(_IMAGES_JS)
        report.bad_outputs = page.evaluate(_OUTPUTS_JS)
        report.code_blocks = page.evaluate(_CODE_JS)
        report.links = page.evaluate(_LINKS_JS)
        report.nav = page.evaluate(_NAV_JS)
        if run_axe:
            page.evaluate(axe_script())
            report.axe = page.evaluate(_AXE_JS)
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True, animations="disabled", type="jpeg", quality=80)
    finally:
        for event, handler in handlers.items():
            page.remove_listener(event, handler)
    return report


def link_problems(report: PageReport, site: Path, base_url: str) -> list[str]:
    """Links inside the page's content that point into the book must reach a file, and an id when they name one."""
    problems, ids_cache = [], {}
    for href in report.links:
        if not href.startswith(base_url):
            continue
        parts = urlsplit(href)
        path = site / unquote(parts.path.removeprefix(urlsplit(base_url).path))
        if path.is_dir():
            path = path / "index.html"
        if not path.exists():
            problems.append(f"{report.name}: broken link {href[len(base_url) :]}")
            continue
        if parts.fragment and path.suffix == ".html":
            if path not in ids_cache:
                ids_cache[path] = set(re.findall(r'\bid="([^"]+)"', path.read_text(errors="replace")))
            if unquote(parts.fragment) not in ids_cache[path]:
                problems.append(f"{report.name}: link to a missing anchor {href[len(base_url) :]}")
    return problems


def site_with_replaced_page(site: Path, tmp: Path, name: str, edit) -> Path:
    """A copy of the built site in ``tmp`` (links to everything) where page ``name`` is ``edit(html)``."""
    target = f"{name}.html"

    def mirror(src: Path, dst: Path):
        dst.mkdir(parents=True, exist_ok=True)
        for entry in src.iterdir():
            rel = entry.relative_to(site).as_posix()
            if rel == target:
                (dst / entry.name).write_text(edit(entry.read_text()))
            elif entry.is_dir() and target.startswith(rel + "/"):
                mirror(entry, dst / entry.name)
            else:
                (dst / entry.name).symlink_to(entry)

    mirror(site, tmp)
    return tmp


def notebook_problems(path: Path, expect_skeleton: bool = True) -> list[str]:
    """A downloaded ``.ipynb`` must be a notebook; a graded chapter's must show the skeletons."""
    try:
        nb = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return [f"{path.name}: not JSON: {exc}"]
    if nb.get("nbformat") != 4 or not nb.get("cells"):
        return [f"{path.name}: not an nbformat 4 notebook with cells"]
    if expect_skeleton and "NotImplementedError" not in json.dumps(nb):
        return [f"{path.name}: the download has no skeleton (raise NotImplementedError) in it"]
    return []


def clean_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
