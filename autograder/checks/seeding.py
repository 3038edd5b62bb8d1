"""Per-student seeds of the hidden checks.

Every ``hidden_<name>(obj, seed: int = N)`` draws its random inputs from ``default_rng(seed)``.
Outside batch grading the seed is its default ``N``: ``check``, plain ``nbgrader autograde``,
the tests and the book all see the same inputs. ``python -m autograder grade`` puts a salt
derived from the student id in each kernel's environment (:data:`ENV`); the checks then draw
from :func:`effective_seed` ``(N, salt)``, so each student gets inputs of their own, the
same ones at every regrade.

The salt is read into a module variable by trusted code before any student code runs: at
import (a kernel started afresh) and again by the sandbox's kernel launcher after it sets the
kernel's environment (:func:`load_salt`; a kernel forked from a warmed-up server imported the
checks before the student existed). Changing ``os.environ`` later changes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os

ENV = "AHH_HIDDEN_SALT"
DEFAULT_COURSE_SEED = "attention-head-by-head"

_sha256 = hashlib.sha256
_from_bytes = int.from_bytes
_salt: str | None = None


def load_salt() -> str | None:
    """Read the salt from the environment (trusted code only, before student code runs)."""
    global _salt
    _salt = os.environ.get(ENV, "").strip() or None
    return _salt


def set_salt(salt: str | None) -> None:
    """Use ``salt`` in this process (to reproduce a student's hidden inputs: ``set_salt(student_salt(id))``)."""
    global _salt
    _salt = salt or None


def current_salt() -> str | None:
    """The salt the hidden checks use in this process (None: their default seeds)."""
    return _salt


def effective_seed(default: int, salt: str | None) -> int:
    """``default`` without a salt, else a 32-bit mix of (salt, default)."""
    if not salt:
        return default
    return _from_bytes(_sha256(f"{salt}:{default}".encode()).digest()[:4], "big")


def student_salt(student: str, course_seed: str = DEFAULT_COURSE_SEED) -> str:
    """The salt of one student: 8 hex digits of SHA-256 of the course seed and the student id."""
    return _sha256(f"{course_seed}:{student}".encode()).hexdigest()[:8]


def seeded(check):
    """``check`` with its default ``seed`` salted; an explicit ``seed`` argument still wins.

    A check without an integer ``seed`` parameter is returned unchanged (its inputs are fixed).
    """
    if getattr(check, "_salted_default", None) is not None:
        return check
    params = list(inspect.signature(check).parameters.values())
    names = [p.name for p in params]
    if "seed" not in names or type(params[names.index("seed")].default) is not int:
        return check
    position, default = names.index("seed"), params[names.index("seed")].default

    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        if len(args) <= position and "seed" not in kwargs:
            kwargs["seed"] = effective_seed(default, _salt)
        return check(*args, **kwargs)

    wrapper._salted_default = default
    return wrapper


load_salt()
