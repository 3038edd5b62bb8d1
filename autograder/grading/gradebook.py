"""The nbgrader gradebook under concurrent writers: SQLite (WAL, immediate transactions) or PostgreSQL.

The gradebook is nbgrader's, at a SQLAlchemy URL (nbgrader's ``db_url``): by default
``sqlite:///OUT/gradebook.db``; with ``grade --db postgresql://user@host/db`` a PostgreSQL
database that graders on several machines share (nbgrader's own advice once more than one
grader writes). The schema's unique constraints (one submission per assignment and student,
one grade per cell and notebook) hold in both, and :func:`submission_lock` makes sure that
no two graders, wherever they run, write one student's submission at the same time.

SQLite: several worker processes write the same file. WAL mode lets readers run beside the
writer; ``busy_timeout`` makes a writer wait for the lock instead of failing; and every
transaction starts with ``BEGIN IMMEDIATE``, because a deferred transaction that reads and
then writes cannot wait for the lock: it fails at once with "database is locked" when
another process committed in between. Each transaction is atomic, so a worker killed at
any point leaves the gradebook as it was before that transaction.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit

BUSY_TIMEOUT_MS = 120_000
_configured = False


def enable_wal(db: Path) -> None:
    """Switch the gradebook to WAL mode (persistent: stored in the file)."""
    con = sqlite3.connect(str(db), timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def configure_sqlite() -> None:
    """Make every SQLAlchemy SQLite connection of this process wait for locks and begin immediately."""
    global _configured
    if _configured:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _connect(dbapi_connection, _record):  # noqa: ANN001
        if isinstance(dbapi_connection, sqlite3.Connection):
            dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" event issues BEGIN itself
            cur = dbapi_connection.cursor()
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    @event.listens_for(Engine, "begin")
    def _begin(conn):  # noqa: ANN001
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    _configured = True


def db_url(course: Path, url: str | None = None) -> str:
    """The SQLAlchemy URL of the gradebook: ``url`` (normalised) or the course's SQLite file."""
    if url:
        return normalize_url(url)
    return f"sqlite:///{Path(course).resolve() / 'gradebook.db'}"


def normalize_url(url: str) -> str:
    """``postgresql://...`` -> ``postgresql+psycopg://...`` (psycopg 3); ``ValueError`` for other databases."""
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if scheme in ("postgresql+psycopg", "sqlite"):
        return url
    raise ValueError(
        f"--db {redact(url)}: only postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE and sqlite:///PATH are supported"
    )


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def sqlite_file(url: str) -> Path:
    return Path(url.split(":///", 1)[1])


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def check_reachable(url: str) -> None:
    """Open and close a connection; ``ValueError`` with the server's reason when the gradebook cannot be reached."""
    if is_sqlite(url):
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    engine = create_engine(url)
    try:
        with engine.connect() as con:
            con.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise ValueError(f"cannot reach the gradebook {redact(url)}: {reason}") from None
    finally:
        engine.dispose()


def _engine(url: str):
    from sqlalchemy import create_engine

    if is_sqlite(url):
        return create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    return create_engine(url)


@contextlib.contextmanager
def submission_lock(url: str, assignment: str, student: str):
    """Hold the lock of one student's submission while it is graded, wherever the graders run.

    PostgreSQL: a session advisory lock (released by the server when the holder's connection
    drops, so a killed worker never leaves it held). SQLite: an ``flock`` on a file next to
    the gradebook (every grader of a SQLite gradebook runs on that machine).
    """
    key = int.from_bytes(hashlib.sha256(f"{assignment}/{student}".encode()).digest()[:8], "big", signed=True)
    if is_sqlite(url):
        locks = sqlite_file(url).parent / ".grading" / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key & 0xFFFFFFFFFFFF:012x}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    from sqlalchemy import text

    engine = _engine(url)
    try:
        with engine.connect() as con:
            con.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            con.commit()
            try:
                yield
            finally:
                con.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                con.commit()
    finally:
        engine.dispose()


def has_assignment(url: str, assignment: str) -> bool:
    """Whether ``generate_assignment`` has put ``assignment`` (and its cells) in the gradebook."""
    from sqlalchemy import inspect, text

    if is_sqlite(url) and not sqlite_file(url).exists():
        return False
    engine = _engine(url)
    try:
        if "assignment" not in inspect(engine).get_table_names():
            return False
        with engine.connect() as con:
            return con.execute(text("SELECT COUNT(*) FROM assignment WHERE name = :n"), {"n": assignment}).scalar() > 0
    finally:
        engine.dispose()


def ensure_students(url: str, students: list[str]) -> None:
    """Create the student rows up front, so graders of two chapters of one student never race to insert it."""
    from nbgrader.api import Gradebook

    with Gradebook(url) as gb:
        known = {s.id for s in gb.students}
        for student in sorted(set(students) - known):
            gb.add_student(student)


def graded_pairs(url: str) -> set[tuple[str, str]]:
    """(assignment, student) pairs whose every grade cell has a score in the gradebook."""
    from sqlalchemy import inspect, text

    if is_sqlite(url) and not sqlite_file(url).exists():
        return set()
    engine = _engine(url)
    try:
        if "grade" not in inspect(engine).get_table_names():
            return set()
        with engine.connect() as con:
            rows = con.execute(
                text(
                    """SELECT a.name, sa.student_id,
                          SUM(CASE WHEN g.auto_score IS NULL AND g.manual_score IS NULL THEN 1 ELSE 0 END), COUNT(g.id)
                   FROM submitted_assignment sa JOIN assignment a ON sa.assignment_id = a.id
                   JOIN submitted_notebook sn ON sn.assignment_id = sa.id
                   JOIN grade g ON g.notebook_id = sn.id
                   GROUP BY a.name, sa.student_id"""
                )
            ).fetchall()
    finally:
        engine.dispose()
    return {(a, s) for a, s, missing, count in rows if missing == 0 and count > 0}


def scores(url: str, assignment: str, student: str) -> dict[str, tuple[float, float]]:
    """``{grade_id: (score, max_score)}`` of a student's graded cells, in notebook order."""
    from nbgrader.api import Gradebook

    with Gradebook(url) as gb:
        sub = gb.find_submission_notebook(assignment, assignment, student)
        order = {c.name: i for i, c in enumerate(gb.find_notebook(assignment, assignment).grade_cells)}
        grades = sorted(sub.grades, key=lambda g: order.get(g.name, 0))
        return {g.name: (float(g.score), float(g.max_score)) for g in grades}


def dump(url: str) -> dict:
    """The gradebook's grading content, independent of row ids and of the database: for comparing two gradebooks.

    ``{"students": [...], "submissions": {(assignment, student): {"timestamp", "late_penalty",
    "grades": {cell: (auto, manual, needs_manual)}, "comments": {cell: auto_comment}}}}``.
    """
    from nbgrader.api import Gradebook

    out: dict = {"students": [], "submissions": {}}
    with Gradebook(url) as gb:
        out["students"] = sorted(s.id for s in gb.students)
        for assignment in gb.assignments:
            for sub in assignment.submissions:
                entry = {
                    "timestamp": str(sub.timestamp) if sub.timestamp else None,
                    "late_penalty": sub.late_submission_penalty,
                    "grades": {},
                    "comments": {},
                }
                for nb in sub.notebooks:
                    for g in nb.grades:
                        entry["grades"][f"{nb.name}/{g.name}"] = (g.auto_score, g.manual_score, g.needs_manual_grade)
                    for c in nb.comments:
                        entry["comments"][f"{nb.name}/{c.name}"] = c.auto_comment
                out["submissions"][(assignment.name, sub.student.id)] = entry
    return out


def record_zero(course: Path, assignment: str, student: str, url: str | None = None) -> None:
    """A submission whose every grade is 0 (what nbgrader does for a missing notebook)."""
    from nbgrader.api import Gradebook

    with Gradebook(db_url(course, url)) as gb:
        gb.update_or_create_student(student)
        sub = gb.update_or_create_submission(assignment, student)
        for nb in sub.notebooks:
            for grade in nb.grades:
                grade.auto_score = 0
                grade.manual_score = None
                grade.needs_manual_grade = False
        gb.db.commit()


def has_submission(course: Path, assignment: str, student: str, url: str | None = None) -> bool:
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(db_url(course, url)) as gb:
        try:
            sub = gb.find_submission(assignment, student)
        except MissingEntry:
            return False
        return all(g.score is not None for nb in sub.notebooks for g in nb.grades)


def integrity(course: Path, url: str | None = None) -> list[str]:
    """Problems in the gradebook: SQLite's own check, duplicated or missing rows."""
    from sqlalchemy import text

    url = db_url(course, url)
    engine = _engine(url)
    try:
        with engine.connect() as con:
            problems = []
            if is_sqlite(url):
                ok = con.execute(text("PRAGMA integrity_check")).fetchone()[0]
                if ok != "ok":
                    problems.append(f"sqlite integrity_check: {ok}")
            dup = con.execute(
                text("SELECT assignment_id, student_id, COUNT(*) FROM submitted_assignment GROUP BY 1, 2 HAVING COUNT(*) > 1")
            ).fetchall()
            problems += [f"duplicated submission {a}/{s} ({n} rows)" for a, s, n in dup]
            dup = con.execute(
                text("SELECT notebook_id, cell_id, COUNT(*) FROM grade GROUP BY 1, 2 HAVING COUNT(*) > 1")
            ).fetchall()
            problems += [f"duplicated grade rows for notebook {nb} cell {c} ({n})" for nb, c, n in dup]
            return problems
    finally:
        engine.dispose()
