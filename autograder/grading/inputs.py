"""Find the submissions to grade: an nbgrader ``submitted/`` tree, a flat folder or a zip.

* **nbgrader tree**: ``submitted/<student>/<assignment>/*.ipynb`` (the folder given may be
  the course directory that holds ``submitted/``). The assignment folder names the chapter;
  a notebook with another name is graded as that chapter's notebook (noted), a missing one
  scores zero.
* **flat folder or zip**, as downloaded from an LMS: every ``.ipynb`` below it. The student
  id comes from the file's path (relative, without ``.ipynb``) through ``--student-pattern``,
  a regular expression with a named group ``student`` and optionally ``chapter``; the
  chapter otherwise comes from ``--chapter``, the notebook's metadata or exercises, or its
  name. Several notebooks of one student for one chapter: the newest is graded (noted).

Student ids are reduced to letters, digits and ``._@-`` (nbgrader uses them as folder names).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from autograder.course import CHAPTERS, Chapter, find_chapter

DEFAULT_PATTERN = r"^(?P<student>[^_/]+)"
MAX_ZIP_MB = 2048
SKIP_DIRS = {".ipynb_checkpoints", "__MACOSX", ".git", "__pycache__"}


@dataclass
class Submission:
    """One student's work for one chapter."""

    student: str
    assignment: str  # chapter slug
    notebook: str | None  # the file to grade (None: no notebook was submitted)
    folder: str | None = None  # nbgrader tree: the assignment folder (other files are copied from it)
    files: list[str] = field(default_factory=list)  # every submitted file, for the integrity hashes
    notes: list[str] = field(default_factory=list)
    sha256: str = ""

    @property
    def key(self) -> str:
        return f"{self.assignment}/{self.student}"


def student_id(raw: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._@-]+", "_", raw.strip()).strip("._-")
    return s[:64] or "unknown-" + hashlib.sha1(raw.encode()).hexdigest()[:8]


def hash_files(paths: list[str]) -> str:
    """One SHA-256 over the submitted files (names and bytes), without following links."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.encode() + b"\0")
        try:
            if os.path.islink(p):
                h.update(b"link:" + os.readlink(p).encode())
            else:
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
        except OSError as exc:
            h.update(f"unreadable:{exc.errno}".encode())
        h.update(b"\0")
    return h.hexdigest()


def _peek_chapter(path: Path) -> Chapter | None:
    """The chapter a notebook belongs to, from its metadata or exercise ids; None if unreadable."""
    try:
        if path.stat().st_size > 100 * 1024 * 1024:
            return None
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    meta = data.get("metadata", {}) if isinstance(data.get("metadata"), dict) else {}
    course = meta.get("course", {}) if isinstance(meta.get("course"), dict) else {}
    if isinstance(course.get("chapter"), str):
        try:
            return find_chapter(course["chapter"])
        except ValueError:
            pass
    cells = data.get("cells") or [c for ws in data.get("worksheets", []) if isinstance(ws, dict) for c in ws.get("cells", [])]
    ids = set()
    for c in cells if isinstance(cells, list) else []:
        nbg = c.get("metadata", {}).get("nbgrader") if isinstance(c, dict) and isinstance(c.get("metadata"), dict) else None
        if isinstance(nbg, dict) and isinstance(nbg.get("grade_id"), str):
            ids.add(nbg["grade_id"])
    matches = [ch for ch in CHAPTERS if {e.name for e in ch.exercises} & ids]
    return matches[0] if len(matches) == 1 else None


def _chapter_from_name(name: str) -> Chapter | None:
    for ch in CHAPTERS:
        if ch.slug in name:
            return ch
    m = re.search(r"(?:^|[^0-9])(\d{2})_", name)
    if m:
        try:
            return find_chapter(m.group(1))
        except ValueError:
            return None
    return None


def extract_zip(path: Path, dest_root: Path) -> Path:
    """Extract ``path`` safely (no absolute paths, no ``..``, no links, a size cap) once per content."""
    digest = hash_files([str(path)])[:12]
    dest = dest_root / f"{path.stem}-{digest}"
    if (dest / ".complete").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename.replace("\\", "/")
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if info.is_dir() or not parts or ".." in parts or name.startswith("/"):
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symbolic link
                continue
            total += info.file_size
            if total > MAX_ZIP_MB * 1024 * 1024:
                raise ValueError(f"{path}: more than {MAX_ZIP_MB} MB uncompressed")
            target = tmp.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    (tmp / ".complete").write_text("")
    tmp.rename(dest)
    return dest


def _is_tree(root: Path) -> bool:
    """``root`` looks like nbgrader's submitted/: student folders holding chapter folders."""
    slugs = {c.slug for c in CHAPTERS}
    for student in root.iterdir() if root.is_dir() else []:
        if student.is_dir() and not student.is_symlink():
            for sub in student.iterdir():
                if sub.is_dir() and sub.name in slugs:
                    return True
    return False


def discover(
    path: Path, out: Path, pattern: str = DEFAULT_PATTERN, chapter: str | None = None, students: list[str] | None = None
) -> tuple[list[Submission], list[str]]:
    """The submissions under ``path`` and the problems found (files that match no student or chapter)."""
    path = Path(path).resolve()
    out = Path(out).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file() and zipfile.is_zipfile(path):
        root = extract_zip(path, out / ".grading" / "inbox")
        subs, problems = _discover_flat(root, out, pattern, chapter)
    elif path.is_file() and path.suffix == ".ipynb":
        subs, problems = _discover_flat(path.parent, out, pattern, chapter, only=[path])
    elif path.is_file():
        raise ValueError(f"{path}: expected a folder, a zip file or a notebook")
    elif (path / "submitted").is_dir() and _is_tree(path / "submitted"):
        subs, problems = _discover_tree(path / "submitted", chapter)
    elif _is_tree(path):
        subs, problems = _discover_tree(path, chapter)
    else:
        subs, problems = _discover_flat(path, out, pattern, chapter)
    if students:
        wanted = {student_id(s) for s in students}
        subs = [s for s in subs if s.student in wanted]
    for s in subs:
        s.sha256 = hash_files(s.files)
    subs.sort(key=lambda s: (s.assignment, s.student))
    return subs, problems


def _discover_tree(root: Path, chapter: str | None) -> tuple[list[Submission], list[str]]:
    wanted = find_chapter(chapter) if chapter else None
    subs, problems = [], []
    for sdir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        for adir in sorted(p for p in sdir.iterdir() if p.is_dir() and not p.is_symlink()):
            try:
                ch = find_chapter(adir.name)
            except ValueError:
                problems.append(f"{adir}: not a chapter of this course; skipped")
                continue
            if wanted and ch != wanted:
                continue
            files = [str(p) for p in adir.rglob("*") if (p.is_file() or p.is_symlink()) and not set(p.parts) & SKIP_DIRS]
            notebooks = sorted(Path(f) for f in files if f.endswith(".ipynb"))
            sub = Submission(student_id(sdir.name), ch.slug, None, folder=str(adir), files=files)
            if sdir.name != sub.student:
                sub.notes.append(f"the student folder {sdir.name!r} is graded as student id {sub.student!r}")
            exact = adir / f"{ch.slug}.ipynb"
            if exact in notebooks:
                sub.notebook = str(exact)
            elif notebooks:
                pick = next((nb for nb in notebooks if _peek_chapter(nb) == ch), None) or max(notebooks, key=os.path.getmtime)
                sub.notebook = str(pick)
                sub.notes.append(
                    f"the notebook was named {pick.name!r} instead of {exact.name!r}; it was graded as the chapter's notebook"
                )
            subs.append(sub)
    return subs, problems


def _discover_flat(
    root: Path, out: Path, pattern: str, chapter: str | None, only: list[Path] | None = None
) -> tuple[list[Submission], list[str]]:
    rx = re.compile(pattern)
    wanted = find_chapter(chapter) if chapter else None
    problems: list[str] = []
    found: list[tuple[str, Chapter | None, Path]] = []
    inside_out = out in root.resolve().parents  # an extracted zip lives in the course directory
    candidates = only or sorted(
        p
        for p in root.rglob("*.ipynb")
        if not set(p.relative_to(root).parts) & SKIP_DIRS and (inside_out or out not in p.resolve().parents)
    )
    for nb in candidates:
        rel = nb.relative_to(root).as_posix()[: -len(".ipynb")]
        m = rx.search(rel)
        if not m or not m.groupdict().get("student"):
            problems.append(f"{nb}: the student pattern {pattern!r} does not match this name; skipped")
            continue
        ch = None
        if m.groupdict().get("chapter"):
            try:
                ch = find_chapter(m.group("chapter"))
            except ValueError:
                ch = None
        ch = ch or wanted or _peek_chapter(nb) or _chapter_from_name(nb.name)
        found.append((student_id(m.group("student")), ch, nb))
    known = {ch for _, ch, _ in found if ch is not None}
    subs: dict[tuple[str, str], Submission] = {}
    for student, ch, nb in found:
        if ch is None:
            if len(known) == 1:
                ch = next(iter(known))
            else:
                problems.append(f"{nb}: cannot tell which chapter this notebook is for (pass --chapter); skipped")
                continue
        if wanted and ch != wanted:
            continue
        key = (student, ch.slug)
        if key in subs:
            prev = subs[key]
            older, newer = sorted([Path(prev.notebook), nb], key=os.path.getmtime)
            prev.notes.append(f"{older.name} and {newer.name} are both for this chapter; the newer one, {newer.name}, was graded")
            prev.notebook = str(newer)
            prev.files.append(str(nb))
            continue
        subs[key] = Submission(student, ch.slug, str(nb), files=[str(nb)])
    return list(subs.values()), problems
