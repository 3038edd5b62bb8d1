"""nbgrader configuration shared by ``release``, ``check`` and ``grade``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from traitlets.config import Config

# nbgrader shells out to `alembic` by name: make this interpreter's scripts findable even
# when the virtual environment is not activated (`.venv/bin/python -m autograder ...`).
_bin = str(Path(sys.executable).parent)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

COURSE_ID = "attention-head-by-head"
CELL_TIMEOUT_S = 60


def nbgrader_config(course_dir: Path, cell_timeout: int = CELL_TIMEOUT_S) -> Config:
    c = Config()
    c.CourseDirectory.root = str(course_dir)
    c.CourseDirectory.course_id = COURSE_ID
    c.CourseDirectory.db_url = f"sqlite:///{Path(course_dir).resolve() / 'gradebook.db'}"
    c.Execute.timeout = cell_timeout
    c.Execute.allow_errors = True
    # A test cell deleted by the student is put back from the gradebook instead of scoring 0 silently.
    c.OverwriteCells.add_missing_cells = True
    return c


def nbgrader_api(course_dir: Path, cell_timeout: int = CELL_TIMEOUT_S):
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    config = nbgrader_config(course_dir, cell_timeout)
    return NbGraderAPI(CourseDirectory(config=config), config=config)
