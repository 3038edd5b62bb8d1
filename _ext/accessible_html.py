"""Sphinx extension: HTML that axe-core accepts where docutils' defaults fail it.

docutils 0.21 writes a bibliography as ``<div role="list">`` holding
``<div role="doc-biblioentry">`` items. ``doc-biblioentry`` is deprecated in DPUB-ARIA 1.1,
and a ``list`` must own ``listitem`` children, so axe-core reports a *critical*
``aria-required-children`` violation on every page with references. Each entry here is
a ``listitem`` instead; the markup is otherwise the same, so the theme's styles still apply.
"""

from __future__ import annotations

from docutils import nodes
from sphinx.application import Sphinx


def visit_citation(self, node: nodes.citation) -> None:
    if not isinstance(node.previous_sibling(), type(node)):
        self.body.append('<div role="list" class="citation-list">\n')
    self.body.append(self.starttag(node, "div", classes=[node.tagname], role="listitem"))


def depart_citation(self, node: nodes.citation) -> None:
    self.body.append("</div>\n")
    if not isinstance(node.next_node(descend=False, siblings=True), type(node)):
        self.body.append("</div>\n")


def setup(app: Sphinx) -> dict:
    app.add_node(nodes.citation, override=True, html=(visit_citation, depart_citation))
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
