"""Reference solutions of every exercise, one module per chapter.

Each exercise is one top-level function or class whose body holds nbgrader's
``### BEGIN SOLUTION`` / ``### END SOLUTION`` markers. The chapter notebooks'
exercise cells are generated from these modules by ``python -m autograder sync``.
"""
