"""Checks, diagnostics, mutants and the nbgrader pipeline of "Attention, Head by Head"."""

from autograder import checks as _checks  # noqa: F401  (captures trusted references early)

__all__ = ["self_check"]


def self_check(namespace: dict, chapter: str | int) -> None:
    """Run every visible check of ``chapter`` on the exercises defined in ``namespace``.

    Prints one line per exercise and a verdict. Use it as the last cell of a chapter:
    ``self_check(globals(), 1)``.
    """
    from autograder.checks.runner import self_check as _run

    _run(namespace, chapter)
