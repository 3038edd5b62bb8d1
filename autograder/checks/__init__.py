"""Checks of the exercises: one module per chapter, ``visible_<name>`` and ``hidden_<name>``.

Importing this package (the chapters' setup cell does, through ``autograder``) imports every
chapter's checks before any student code runs, so the references they capture at module
level (see :mod:`autograder.checks.trusted` and :mod:`autograder.checks.torch_refs`) are the
untouched originals.
"""

import importlib
import pkgutil

from autograder.checks import torch_refs as torch_refs  # noqa: F401  (then the shared torch references)
from autograder.checks import trusted as trusted  # noqa: F401  (capture primitives first)

for _info in pkgutil.iter_modules(__path__):
    if _info.name.startswith("ch") and _info.name[2:].isdigit():
        importlib.import_module(f"{__name__}.{_info.name}")
