"""A student notebook as a student sees it: opened in real JupyterLab, rendered by Chromium.

The student copy (``student/``) is opened with no MyST extension enabled, as plain JupyterLab,
Colab and VS Code would show it. The page must show the chapter's title, numbered display
equations typeset by MathJax (the number as the book prints it), author-year citations
linking to the book's bibliography, and no raw MyST role. Debian's ``/usr/bin/chromium``
through Playwright; no browser is downloaded and nothing outside 127.0.0.1 is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from browser_support import CHROMIUM, launch_chromium

from autograder.course import ROOT
from autograder.student_form import BOOK_URL

NOTEBOOK = "04_multi_head_attention.ipynb"

_PAGE_JS = """
() => {
  const glyphs = el => [...el.querySelectorAll('mjx-c')].map(e => {
    const k = [...e.classList].find(c => /^mjx-c[0-9A-F]+$/.test(c));
    return k ? String.fromCodePoint(parseInt(k.slice(5), 16)) : e.textContent;
  }).join('');
  const cells = [...document.querySelectorAll('.jp-MarkdownCell .jp-RenderedMarkdown')];
  return {
    titles: cells.flatMap(c => [...c.querySelectorAll('h1')].map(h => h.textContent.replace(/¶$/, '').trim())),
    numbered: cells.flatMap(c => [...c.querySelectorAll('mjx-container[display="true"]')])
                   .filter(m => m.querySelector('mjx-labels, mjx-mlabeledtr')).map(glyphs),
    links: cells.flatMap(c => [...c.querySelectorAll('a[href]')].map(a => [a.textContent, a.href])),
    text: cells.map(c => c.innerText).join('\\n'),
    unrendered: cells.filter(c => /\\$\\$/.test(c.innerText)).length,
  };
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on 127.0.0.1 serving a copy of the student notebook, with private config and settings."""
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    root, config, settings = tmp_path / "work", tmp_path / "config", tmp_path / "settings"
    root.mkdir()
    shutil.copy(ROOT / "student" / NOTEBOOK, root / NOTEBOOK)
    (config / "labconfig").mkdir(parents=True)
    # as plain JupyterLab: a MyST renderer, if one is installed, stays off
    (config / "labconfig" / "page_config.json").write_text(json.dumps({"disabledExtensions": {"jupyterlab-myst": True}}))
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))  # render every cell, not only those on screen
    port = _free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTERLAB_SETTINGS_DIR": str(settings)}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ServerApp.token="]
    cmd += ["--ServerApp.password=", f"--ServerApp.root_dir={root}", "--LabApp.news_url=None", "--ServerApp.port_retries=0"]
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(base + "api/status", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.slow
def test_student_notebook_renders_in_plain_jupyterlab(jupyterlab, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    # Playwright's sync API refuses to run where an asyncio loop is marked running (earlier tests that drive
    # Jupyter kernels leave one in this thread), so the browser runs in a thread of its own.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        seen = pool.submit(_render, jupyterlab).result()
    assert "Multi-head attention" in seen["titles"], f"no chapter title among {seen['titles']}"
    assert any(text.endswith("(4.1)") for text in seen["numbered"]), f"no equation numbered (4.1): {seen['numbered'][:3]}"
    assert not seen["unrendered"], f"{seen['unrendered']} cells show raw $$ (MathJax did not typeset them)"
    citations = [t for t, href in seen["links"] if href == f"{BOOK_URL}bibliography.html"]
    assert any("Vaswani" in t and "2017" in t for t in citations), f"no author-year citation of Vaswani et al.: {citations[:5]}"
    for raw in ("{ref}`", "{eq}`", "{cite", "(ch-multi-head-attention)=", "```{"):
        assert raw not in seen["text"], f"the page shows raw MyST: {raw}"


def _render(jupyterlab: str) -> dict:
    """What the student's notebook shows in JupyterLab, read by Chromium."""
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{jupyterlab}lab/tree/{NOTEBOOK}", wait_until="load")
            page.wait_for_selector(".jp-MarkdownCell h1", timeout=90_000)
            deadline = time.monotonic() + 60
            while True:  # MathJax typesets the cells asynchronously
                seen = page.evaluate(_PAGE_JS)
                if (seen["numbered"] and not seen["unrendered"]) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            shots = ROOT / "_build" / "screenshots"
            if shots.is_dir():
                page.screenshot(path=str(shots / "student-jupyterlab.jpeg"), type="jpeg", quality=70)
        finally:
            browser.close()
    return seen
