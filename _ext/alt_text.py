"""Sphinx extension: give every notebook figure a meaningful alt text.

myst-nb 1.4 writes a notebook image output as ``<img>`` with the alt text given in the
cell's metadata, ``{"mystnb": {"image": {"alt": "..."}}}``; without it, Sphinx falls back
to the image's file name (a hash), which tells a screen-reader user nothing. This
extension fills in what a cell leaves out, in this order:

1. ``mystnb.image.alt`` in the cell metadata (left untouched; myst-nb already applied it);
2. the titles that the cell's own code gives its figure, read from the source with ``ast``:
   ``fig.suptitle(...)``, ``ax.set_title(...)``, ``plt.title(...)``, ``ax.set(title=...)``;
   failing those, the axis labels (``set_xlabel``/``set_ylabel``/``set(xlabel=, ylabel=)``);
3. the figure caption from ``mystnb.figure.caption``.

A notebook image with none of these gets a placeholder and a warning
(``alt_text.missing``), which fails a ``-W`` build: give the figure a title, or set
``mystnb.image.alt``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

PLACEHOLDER = "Figure drawn by the code cell above"
_TEX_WORDS = {r"\cdot": "·", r"\times": "×", r"\sqrt": "sqrt", r"\top": "T", r"\to": "→", r"\leq": "≤", r"\geq": "≥"}


def _text(node: ast.expr | None) -> str | None:
    """The text of a string literal; an f-string keeps its literal parts, with '…' for each value."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = [v.value if isinstance(v, ast.Constant) else "…" for v in node.values]
        return "".join(str(p) for p in parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):  # "a" + "b"
        left, right = _text(node.left), _text(node.right)
        return None if left is None or right is None else left + right
    return None


def plain(text: str) -> str:
    """Readable text from a matplotlib label: mathtext ``$...$`` unwrapped, TeX commands spelled out."""
    for command, word in _TEX_WORDS.items():
        text = text.replace(command, word)
    text = re.sub(r"\\([A-Za-z]+)", r"\1", text).replace("$", "").replace("{", "").replace("}", "")
    return re.sub(r"\s+", " ", text).strip()


def describe_figure(source: str) -> str | None:
    """An alt text from the titles (or, failing those, the axis labels) that ``source`` gives its figure."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    aliases = {"suptitle": "suptitle", "set_title": "title", "title": "title", "set_xlabel": "xlabel", "xlabel": "xlabel"}
    aliases |= {"set_ylabel": "ylabel", "ylabel": "ylabel"}
    hits: list[tuple[int, int, str, str]] = []  # (line, column, kind, text), sorted into source order below
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
        name = call.func.attr
        if name in aliases:
            arg = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg in ("t", "label")), None)
            pairs = [(aliases[name], arg)]
        elif name == "set":
            pairs = [(k.arg, k.value) for k in call.keywords if k.arg in ("title", "xlabel", "ylabel")]
        else:
            continue
        for kind, value in pairs:
            text = plain(_text(value) or "")
            if text:
                hits.append((call.lineno, call.col_offset, kind, text))
    found: dict[str, list[str]] = {"suptitle": [], "title": [], "xlabel": [], "ylabel": []}
    for _, _, kind, text in sorted(hits):
        if text not in found[kind]:
            found[kind].append(text)
    titles = found["title"]
    if found["suptitle"]:
        panels = [t for t in titles if "…" not in t]  # "T = …" from an f-string in a loop says nothing
        return found["suptitle"][0] + (f". Panels: {'; '.join(panels)}" if panels else "")
    if len(titles) == 1:
        return titles[0]
    if titles:
        return f"{len(titles)} panels: {'; '.join(titles)}"
    if found["xlabel"] and found["ylabel"]:
        return f"Plot of {found['ylabel'][0]} against {found['xlabel'][0]}"
    return None


def _cell_source(cell: nodes.Element, docpath: Path, cache: dict) -> str | None:
    """The code of a myst-nb cell: from its rendered input or, when the input is removed, from the notebook."""
    for block in cell.findall(nodes.literal_block):
        return block.astext()
    if docpath.suffix != ".ipynb":
        return None
    if docpath not in cache:
        import nbformat

        cache[docpath] = nbformat.read(str(docpath), as_version=4)
    cells = cache[docpath].cells
    index = cell.get("cell_index")
    return cells[index].source if isinstance(index, int) and index < len(cells) else None


def add_alt_text(app: Sphinx, doctree: nodes.document) -> None:
    docpath = Path(app.env.doc2path(app.env.docname))
    cache: dict = {}
    for image in list(doctree.findall(nodes.image)):
        if image.get("alt"):
            continue
        cell = image.parent
        while cell is not None and not (isinstance(cell, nodes.container) and cell.get("nb_element") == "cell_code"):
            cell = cell.parent
        if cell is None:
            continue  # not a notebook output: Markdown images carry their own alt text
        source = _cell_source(cell, docpath, cache)
        alt = describe_figure(source) if source else None
        if not alt:
            figure = image.parent
            while figure is not None and not isinstance(figure, nodes.figure):
                figure = figure.parent
            caption = next(iter(figure.findall(nodes.caption)), None) if figure is not None else None
            alt = plain(caption.astext()) if caption is not None else None
        if not alt:
            alt = PLACEHOLDER
            logger.warning(
                "notebook figure in cell %s has no alt text: give it a title, or set the cell metadata "
                '{"mystnb": {"image": {"alt": "..."}}}',
                cell.get("cell_index"),
                location=image,
                type="alt_text",
                subtype="missing",
            )
        image["alt"] = alt


def setup(app: Sphinx) -> dict:
    app.connect("doctree-read", add_alt_text)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
