"""The student form of the prose: MyST-only markup rewritten as Markdown every front-end renders.

The book is built from ``chapters/`` in full MyST. Plain JupyterLab, Colab, VS Code and
nbgrader's feedback page show MyST's roles and labels as raw text, so every notebook a
student gets (``student/``, which ``sync`` writes and the book's Colab, Binder and download
buttons point to; nbgrader's ``release/``; the feedback page) has its Markdown cells
rewritten here:

* ``(label)=`` lines are removed;
* a labelled display equation ``$$ ... $$ (eq-x)`` gets ``\\tag{4.2}``, the number the book
  prints (chapter number from ``_toc.yml``, then the equation's place in the page);
* ``{eq}`eq-x``` becomes ``(4.2)`` (a link to the book's page when the equation is on another page);
* ``{cite:t}`` / ``{cite:p}`` / ``{cite}`` become author-year text as sphinxcontrib-bibtex's
  ``author_year`` style prints it (``Vaswani et al. [2017]``, ``[Vaswani et al., 2017]``),
  each reference linking to the book's bibliography page;
* ``{ref}`label``` becomes a link to the book's page and section, with its title as text;
* admonitions (```` ```{warning} ````, ``:::{note}``) become quoted blocks with a bold title.

Anything else MyST-only is an error naming the construct, so a new one cannot slip through.
The rewriting is idempotent: plain Markdown passes through unchanged.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from autograder.course import ROOT

# Where the book is published (``html.baseurl`` in ``_config.yml``; a test keeps the two equal).
BOOK_URL = "https://attention-head-by-head.github.io/course/"
BIBLIOGRAPHY_PAGE = "bibliography"
STUDENT_DIR = ROOT / "student"

ADMONITIONS = {
    "note": "Note",
    "warning": "Warning",
    "tip": "Tip",
    "hint": "Hint",
    "important": "Important",
    "caution": "Caution",
    "attention": "Attention",
    "danger": "Danger",
    "error": "Error",
    "seealso": "See also",
    "admonition": "",  # the title is the directive's argument
}

_LABEL_LINE = re.compile(r"^\(([^()\s]+)\)=[ \t]*\n?", re.M)
_LABELLED_EQ = re.compile(r"\$\$(?P<body>(?:(?!\$\$).)+?)\$\$[ \t]*\((?P<label>[^()\s]+)\)", re.S)
_ROLE = re.compile(r"\{(?P<role>[a-z][\w:+-]*)\}`(?P<content>[^`]*)`")
_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|:{3,})[ \t]*(?P<info>.*)$")
_DIRECTIVE = re.compile(r"^\{(?P<name>[\w:-]+)\}[ \t]*(?P<arg>.*)$")
_HEADING = re.compile(r"^#{1,6}[ \t]+(?P<title>.+?)[ \t]*#*[ \t]*$")
_COMMENT_LINE = re.compile(r"^%.*\n?", re.M)


class MystError(ValueError):
    """A MyST construct that has no student form (or a reference to something unknown)."""


@dataclass(frozen=True)
class Target:
    """Where a ``{ref}`` label points: a page (docname), a section anchor (None: the page's top), a title."""

    page: str
    anchor: str | None
    title: str | None

    def url(self) -> str:
        return page_url(self.page, self.anchor)


@dataclass
class BookIndex:
    """What the rewriting needs to know about the whole book: labels, equation numbers, citations."""

    targets: dict[str, Target] = field(default_factory=dict)
    equations: dict[str, tuple[str, str]] = field(default_factory=dict)  # label -> (page, number)
    citations: dict[str, tuple[tuple[str, ...], bool, str]] = field(default_factory=dict)  # key -> (last names, et al., year)

    @classmethod
    def from_repo(cls, root: Path = ROOT) -> BookIndex:
        index = cls()
        for page, number in toc_numbers(root).items():
            source = _page_source(root, page)
            if source is not None:
                index._add_page(page, number, source)
        for path in sorted((root / "bib").glob("*.bib")):
            for key, names, others, year in parse_bibtex(path.read_text()):
                index.citations.setdefault(key, (names, others, year))
        return index

    def _add_page(self, page: str, number: int | None, cells: list[str]) -> None:
        k, pending, first_heading = 0, [], True
        for text in cells:
            text = _strip_code_fences(text)
            for line in text.splitlines():
                label = re.fullmatch(r"\(([^()\s]+)\)=\s*", line)
                heading = _HEADING.match(line)
                if label:
                    pending.append(label.group(1))
                elif heading:
                    for name in pending:
                        self.targets[name] = Target(page, None if first_heading else name, heading.group("title"))
                    pending, first_heading = [], False
                elif line.strip() and pending:
                    for name in pending:  # a label on a paragraph, figure or equation: only an explicit title works
                        self.targets[name] = Target(page, name, None)
                    pending = []
            for m in _LABELLED_EQ.finditer(text):
                k += 1
                self.equations[m.group("label")] = (page, f"{number}.{k}" if number is not None else str(k))


def page_url(page: str, anchor: str | None = None) -> str:
    return f"{BOOK_URL}{page}.html" + (f"#{anchor}" if anchor else "")


@functools.cache
def book_index() -> BookIndex:
    return BookIndex.from_repo()


def toc_numbers(root: Path = ROOT) -> dict[str, int | None]:
    """Every page of ``_toc.yml`` with the number the book gives it.

    Jupyter Book 1 numbers the pages of every numbered part in one sequence (the appendices after
    nine chapters are 10, 11, 12: read from the built book); unnumbered parts get no number.
    """
    import yaml

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    pages: dict[str, int | None] = {toc["root"]: None}
    n = 0
    for part in toc.get("parts", []) or [{"chapters": toc.get("chapters", []), "numbered": toc.get("numbered")}]:
        for entry in part.get("chapters", []) or []:
            if "file" in entry:
                if part.get("numbered"):
                    n += 1
                pages[re.sub(r"\.(md|ipynb)$", "", entry["file"])] = n if part.get("numbered") else None
    return pages


def _page_source(root: Path, page: str) -> list[str] | None:
    """The Markdown of a page: the Markdown cells of its notebook, or its ``.md`` file."""
    if (root / f"{page}.ipynb").exists():
        nb = json.loads((root / f"{page}.ipynb").read_text())
        return [
            "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb["cells"]
            if c["cell_type"] == "markdown"
        ]
    if (root / f"{page}.md").exists():
        return [re.sub(r"\A---\n.*?\n---\n", "", (root / f"{page}.md").read_text(), flags=re.S)]
    return None


# --- BibTeX: just enough to print author-year citations --------------------------------------

_LATEX_ACCENTS = {
    "'": "\u0301",
    "`": "\u0300",
    '"': "\u0308",
    "^": "\u0302",
    "~": "\u0303",
    "c": "\u0327",
    "v": "\u030c",
    "=": "\u0304",
}
_LATEX_LETTERS = {"L": "Ł", "l": "ł", "o": "ø", "O": "Ø", "ss": "ß", "ae": "æ", "AE": "Æ", "aa": "å", "AA": "Å", "i": "ı"}


def latex_to_text(s: str) -> str:
    """``R{\\'e}`` -> ``Ré``, ``{\\L}ukasz`` -> ``Łukasz``, ``{NVIDIA}`` -> ``NVIDIA``."""
    import unicodedata

    s = re.sub(r"\\([\'`\"^~=])\s*\{?([A-Za-z])\}?", lambda m: m.group(2) + _LATEX_ACCENTS[m.group(1)], s)
    s = re.sub(r"\\([cv])\s*\{([A-Za-z])\}", lambda m: m.group(2) + _LATEX_ACCENTS[m.group(1)], s)
    s = re.sub(r"\\(ss|ae|AE|aa|AA|L|l|o|O|i)(?![A-Za-z])\s*", lambda m: _LATEX_LETTERS[m.group(1)], s)
    s = s.replace("{", "").replace("}", "").replace("~", " ")
    return unicodedata.normalize("NFC", s).strip()


def _split_top(s: str, sep: str) -> list[str]:
    """Split ``s`` on the word ``sep`` outside braces."""
    parts, depth, start, i = [], 0, 0, 0
    pattern = re.compile(rf"\s+{sep}\s+", re.I)
    while i < len(s):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
        elif depth == 0 and (m := pattern.match(s, i)):
            parts.append(s[start:i])
            i = start = m.end()
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts if p.strip()]


def last_name(person: str) -> str:
    """The von and last parts of a BibTeX name (pybtex's ``last`` name style)."""
    if person.startswith("{") and person.endswith("}") and _split_top(person[1:-1], ",") == [person[1:-1]]:
        return latex_to_text(person)  # a corporate author: {Keras team}
    if "," in person:
        return latex_to_text(person.split(",")[0])
    words = person.split()
    # von part: the first lower-case word before the last one starts it ("Ludwig van Beethoven")
    start = next((i for i, w in enumerate(words[:-1]) if w[:1].islower()), len(words) - 1)
    return latex_to_text(" ".join(words[start:]))


def _field(entry: str, name: str) -> str | None:
    m = re.search(rf"\b{name}\s*=\s*", entry, re.I)
    if not m:
        return None
    i = m.end()
    if entry[i] == "{":
        depth, j = 0, i
        while j < len(entry):
            depth += {"{": 1, "}": -1}.get(entry[j], 0)
            if depth == 0:
                return entry[i + 1 : j]
            j += 1
        return entry[i + 1 :]
    if entry[i] == '"':
        return entry[i + 1 : entry.index('"', i + 1)]
    return re.match(r"[^,}\s]+", entry[i:]).group(0)


def parse_bibtex(text: str):
    """Yield ``(key, last names, has 'and others', year)`` for every entry."""
    for entry in re.split(r"\n(?=@)", "\n" + text):
        m = re.match(r"\s*@(\w+)\s*\{\s*([^,\s]+)\s*,", entry)
        if not m or m.group(1).lower() in ("comment", "string", "preamble"):
            continue
        people = _field(entry, "author") or _field(entry, "editor")
        persons = _split_top(" ".join(people.split()), "and") if people else []
        others = bool(persons) and persons[-1].lower() == "others"
        names = tuple(last_name(p) for p in persons if p.lower() != "others")
        if not names:
            names = (latex_to_text(_field(entry, "title") or m.group(2)),)
        yield m.group(2), names, others, latex_to_text(_field(entry, "year") or "")


def authors_text(names: tuple[str, ...], others: bool) -> str:
    """sphinxcontrib-bibtex's short author list: ``A``, ``A and B``, ``A et al.``."""
    if len(names) > 2 or others:
        return f"{names[0]} *et al.*"
    return " and ".join(names)


def _join(items: list[str]) -> str:
    return ", ".join(items)  # sphinxcontrib-bibtex's BracketStyle separator between references


# --- the rewriting ---------------------------------------------------------------------------


def _strip_code_fences(text: str) -> str:
    """``text`` with the contents of plain code fences blanked (directive fences and their bodies are kept)."""
    out, code, directives = [], None, []
    for line in text.splitlines(keepends=True):
        m = _FENCE_OPEN.match(line.rstrip("\n"))
        if code is not None:
            if line.strip() == code:
                code = None
                out.append(line)
            else:
                out.append("\n")
            continue
        if directives and line.strip() == directives[-1]:
            directives.pop()
        elif m and m.group("info").startswith("{"):
            directives.append(m.group("fence"))
        elif m and m.group("fence")[0] == "`":
            code = m.group("fence")
        out.append(line)
    return "".join(out)


def _escape_brackets(s: str) -> str:
    return s.replace("[", "\\[").replace("]", "\\]")


class _Rewriter:
    def __init__(self, page: str | None, index: BookIndex, glued: dict[str, str] | None = None):
        self.page, self.index, self.glued = page, index, glued or {}

    def role(self, m: re.Match) -> str:
        role, content = m.group("role"), m.group("content")
        if role == "eq":
            return self.eq(content)
        if role == "ref":
            return self.ref(content)
        if role in ("cite", "cite:p", "cite:ps", "cite:t", "cite:ts", "cite:ct", "cite:cts"):
            return self.cite(role, content)
        if role in ("math",):
            return f"${content}$"
        if role in ("glue", "glue:text", "glue:any"):
            name = content.split(":")[0].strip()
            # the value exists only once the cell that glues it has run: point the reader at its output
            return f"*(the value printed {self.glued.get(name, 'in this notebook')})*"
        raise MystError(f"the MyST role {{{role}}} has no student form (in {{{role}}}`{content}`)")

    def eq(self, label: str) -> str:
        if label not in self.index.equations:
            raise MystError(f"{{eq}}`{label}`: no labelled equation {label!r} in the book")
        page, number = self.index.equations[label]
        if page == self.page:
            return f"({number})"
        return f"[({number})]({page_url(page, f'equation-{label}')})"

    def ref(self, content: str) -> str:
        m = re.fullmatch(r"(?P<title>.*?)\s*<(?P<label>[^<>]+)>", content.strip(), re.S)
        title, label = (m.group("title"), m.group("label")) if m else (None, content.strip())
        target = self.index.targets.get(label)
        if target is None:
            raise MystError(f"{{ref}}`{content}`: no label {label!r} in the book")
        title = title or target.title
        if not title:
            raise MystError(f"{{ref}}`{content}`: the label {label!r} is not on a section, so the reference needs a title")
        return f"[{title}]({target.url()})"

    def cite(self, role: str, content: str) -> str:
        keys = [k.strip() for k in content.split(",") if k.strip()]
        unknown = [k for k in keys if k not in self.index.citations]
        if unknown:
            raise MystError(f"{{{role}}}`{content}`: no BibTeX entry for {', '.join(unknown)}")
        bib = page_url(BIBLIOGRAPHY_PAGE)
        parts = []
        for key in keys:
            names, others, year = self.index.citations[key]
            authors = " and ".join(names) if role.endswith("s") else authors_text(names, others)
            if role.startswith("cite:t") or role.startswith("cite:ct"):
                if role.startswith("cite:ct"):
                    authors = authors[:1].upper() + authors[1:]
                parts.append(f"{authors} \\[[{year}]({bib})\\]")
            else:
                parts.append(f"[{authors}, {year}]({bib})")
        text = _join(parts)
        return text if role.startswith("cite:t") or role.startswith("cite:ct") else f"\\[{text}\\]"

    def equation(self, m: re.Match) -> str:
        label = m.group("label")
        if label not in self.index.equations:
            raise MystError(f"labelled equation {label!r} is not in the book's index")
        body = m.group("body")
        number = self.index.equations[label][1]
        if "\n" in body.strip("\n") or body.startswith("\n"):
            return f"$$\n{body.strip(chr(10))}\n\\tag{{{number}}}\n$$"
        return f"$${body.strip()} \\tag{{{number}}}$$"

    def directives(self, text: str) -> str:
        """Turn admonition directives into quoted blocks (their bodies rewritten too)."""
        lines = text.split("\n")
        out, i = [], 0
        while i < len(lines):
            m = _FENCE_OPEN.match(lines[i])
            d = _DIRECTIVE.match(m.group("info")) if m else None
            if not d:
                out.append(lines[i])
                if m and m.group("fence")[0] == "`":  # a plain code fence: copy it whole
                    j = i + 1
                    while j < len(lines) and lines[j].strip() != m.group("fence"):
                        out.append(lines[j])
                        j += 1
                    if j < len(lines):
                        out.append(lines[j])
                    i = j
                i += 1
                continue
            fence, name, arg = m.group("fence"), d.group("name"), d.group("arg").strip()
            j, body = i + 1, []
            while j < len(lines) and lines[j].strip() != fence:
                body.append(lines[j])
                j += 1
            if name not in ADMONITIONS:
                raise MystError(f"the MyST directive {{{name}}} has no student form")
            while body and re.match(r"^:[\w-]+:", body[0]):
                body.pop(0)  # directive options (:class:, :name:)
            title = arg if name == "admonition" else ADMONITIONS[name] + (f": {arg}" if arg else "")
            inner = self.rewrite("\n".join(body).strip("\n")).split("\n")
            out.append(f"> **{title}**")
            out.append(">")
            out.extend(f"> {line}" if line.strip() else ">" for line in inner)
            i = j + 1
        return "\n".join(out)

    def rewrite(self, text: str) -> str:
        text = self.directives(text)
        text = _LABEL_LINE.sub("", text)
        text = _COMMENT_LINE.sub("", text)
        pieces = re.split(r"(^`{3,}[^\n]*\n.*?^`{3,}[ \t]*$)", text, flags=re.M | re.S)  # leave code fences alone
        for n in range(0, len(pieces), 2):
            piece = _LABELLED_EQ.sub(self.equation, pieces[n])
            pieces[n] = _ROLE.sub(self.role, piece)
        return "".join(pieces)


def to_plain_markdown(text: str, page: str | None = None, index: BookIndex | None = None, glued: dict | None = None) -> str:
    """The student form of one Markdown cell of ``page`` (a docname such as ``chapters/04_multi_head_attention``).

    ``glued`` maps a myst-nb ``glue`` name to where its value is printed ("above", "below").
    """
    return _Rewriter(page, index or book_index(), glued).rewrite(text)


def _glue_cells(nb) -> list[tuple[int, re.Pattern]]:
    """(cell index, name pattern) of every ``glue("name", ...)`` call in a code cell (f-string parts match anything)."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "glue(" in cell.source:
            for m in re.finditer(r"""\bglue\(\s*f?(?:"([^"]+)"|'([^']+)')""", cell.source):
                parts = re.split(r"\{[^{}]*\}", m.group(1) or m.group(2))
                found.append((i, re.compile(".+".join(map(re.escape, parts)))))
    return found


def unwrap_myst(text: str) -> str:
    """The last resort for Markdown that cannot be rewritten: labels dropped, roles shown as their content."""
    text = _LABEL_LINE.sub("", text)
    return _ROLE.sub(lambda m: f"`{m.group('content')}`", text)


def student_notebook(nb, page: str | None = None, index: BookIndex | None = None, strict: bool = True):
    """A copy of notebook ``nb`` whose Markdown cells are in student form (code cells untouched).

    With ``strict=False`` (the feedback page, where a student may have written their own
    Markdown), a cell naming an unknown label or role is unwrapped instead of raising MystError.
    """
    nb = copy.deepcopy(nb)
    index = index or book_index()
    glues = _glue_cells(nb)
    for j, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            glued = {}
            for name in re.findall(r"\{glue(?::\w+)?\}`([^`:]+)", cell.source):
                where = [i for i, pattern in glues if pattern.fullmatch(name.strip())]
                if where:
                    glued[name.strip()] = "by the code above" if where[0] < j else "by the code below"
            try:
                cell.source = to_plain_markdown(cell.source, page, index, glued)
            except MystError:
                if strict:
                    raise
                cell.source = unwrap_myst(cell.source)
    return nb


# What a student copy must not contain: used by the tests and by ``myst_leftovers``.
MYST_ONLY = {
    "role": re.compile(r"\{[a-z][\w:+-]*\}`"),
    "label": re.compile(r"^\([^()\s]+\)=\s*$", re.M),
    "labelled equation": re.compile(r"\$\$[ \t]*\([^()\s]+\)"),
    "directive": re.compile(r"^[ \t]*(`{3,}|:{3,})[ \t]*\{", re.M),
}


def myst_leftovers(nb) -> list[str]:
    """Every MyST-only construct left in the Markdown cells of ``nb``, as 'cell N: kind: text'."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        for kind, pattern in MYST_ONLY.items():
            for m in pattern.finditer(cell.source):
                found.append(f"cell {i}: {kind}: {cell.source[m.start() : m.start() + 60]!r}")
    return found
