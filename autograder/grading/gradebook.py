"""The nbgrader gradebook under concurrent writers: WAL, a busy timeout, immediate transactions.

Several worker processes write the same SQLite file. WAL mode lets readers run beside the
writer; ``busy_timeout`` makes a writer wait for the lock instead of failing; and every
transaction starts with ``BEGIN IMMEDIATE``, because a deferred transaction that reads and
then writes cannot wait for the lock: it fails at once with "database is locked" when
another process committed in between. Each transaction is atomic, so a worker killed at
any point leaves the gradebook as it was before that transaction.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

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


def db_url(course: Path) -> str:
    return f"sqlite:///{Path(course).resolve() / 'gradebook.db'}"


def record_zero(course: Path, assignment: str, student: str) -> None:
    """A submission whose every grade is 0 (what nbgrader does for a missing notebook)."""
    from nbgrader.api import Gradebook

    with Gradebook(db_url(course)) as gb:
        gb.update_or_create_student(student)
        sub = gb.update_or_create_submission(assignment, student)
        for nb in sub.notebooks:
            for grade in nb.grades:
                grade.auto_score = 0
                grade.manual_score = None
                grade.needs_manual_grade = False
        gb.db.commit()


def has_submission(course: Path, assignment: str, student: str) -> bool:
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(db_url(course)) as gb:
        try:
            sub = gb.find_submission(assignment, student)
        except MissingEntry:
            return False
        return all(g.score is not None for nb in sub.notebooks for g in nb.grades)


def integrity(course: Path) -> list[str]:
    """Problems in the gradebook: SQLite's own check, duplicated or missing rows."""
    con = sqlite3.connect(str(Path(course) / "gradebook.db"), timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        problems = []
        ok = con.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            problems.append(f"sqlite integrity_check: {ok}")
        dup = con.execute(
            "SELECT assignment_id, student_id, COUNT(*) FROM submitted_assignment GROUP BY 1, 2 HAVING COUNT(*) > 1"
        ).fetchall()
        problems += [f"duplicated submission {a}/{s} ({n} rows)" for a, s, n in dup]
        dup = con.execute("SELECT notebook_id, cell_id, COUNT(*) FROM grade GROUP BY 1, 2 HAVING COUNT(*) > 1").fetchall()
        problems += [f"duplicated grade rows for notebook {nb} cell {c} ({n})" for nb, c, n in dup]
        return problems
    finally:
        con.close()
