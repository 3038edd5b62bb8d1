"""Checks of the exercises: one module per chapter, ``visible_<name>`` and ``hidden_<name>``.

Importing this package (the chapters' setup cell does, through ``autograder``) imports every
chapter's checks before any student code runs, so the references they capture at module
level (see :mod:`autograder.checks.trusted` and :mod:`autograder.checks.torch_refs`) are the
untouched originals. Each ``hidden_<name>`` with a ``seed`` parameter is replaced in its module
by :func:`autograder.checks.seeding.seeded` of itself, so that batch grading can give each
student inputs of their own (the hidden test cells import it from the module).
"""

import importlib
import pkgutil

from autograder.checks import seeding as seeding  # noqa: F401  (the salt, read before student code)
from autograder.checks import torch_refs as torch_refs  # noqa: F401  (then the shared torch references)
from autograder.checks import trusted as trusted  # noqa: F401  (capture primitives first)

for _info in pkgutil.iter_modules(__path__):
    if _info.name.startswith("ch") and _info.name[2:].isdigit():
        try:
            _module = importlib.import_module(f"{__name__}.{_info.name}")
        except ImportError:  # without PyTorch, only chapter 1's checks (NumPy) can import
            if torch_refs.torch is not None:
                raise
            continue
        for _name, _obj in list(vars(_module).items()):
            if _name.startswith("hidden_") and callable(_obj) and getattr(_obj, "__module__", None) == _module.__name__:
                setattr(_module, _name, seeding.seeded(_obj))
