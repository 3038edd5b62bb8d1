"""The ``grade`` pipeline's parts: inputs, sanitizing, the hardened Execute, workers, feedback.

The command itself is :mod:`autograder.grade`; the sandbox is :mod:`autograder.sandbox`, and
:mod:`autograder.grading.zygote` is the code that runs inside it.
"""
