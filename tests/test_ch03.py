"""Chapter 3 specifics: the checks resist tampering, stay fast, and need nothing from solutions/."""

from __future__ import annotations

import ast
import time

import pytest
from conftest import namespace

from autograder.checks.runner import run_check
from autograder.course import CHAPTERS

CH03 = [c for c in CHAPTERS if c.key == "ch03"]
pytestmark = pytest.mark.skipif(not CH03, reason="chapter 3 is not in chapters/ yet")


def _exercise(name: str):
    return next(e for e in CH03[0].exercises if e.name == name)


def _outcomes(name: str, code: str) -> list:
    ns = namespace(CH03[0], replace={name: code})
    return [run_check(_exercise(name), ns, hidden=h) for h in (False, True)]


TAMPERED_ATTENTION = """
import numpy as _np
import torch as _torch

_np.exp = lambda a: _np.ones_like(a)          # would make every float64 softmax uniform
_np.allclose = lambda *a, **k: True
_torch.allclose = lambda *a, **k: True
_torch.softmax = lambda s, dim=-1: _torch.full_like(s, 1.0 / s.shape[-1])


class SelfAttention(nn.Module):
    def __init__(self, d_model, d_k=None, d_v=None, bias=False):
        super().__init__()
        self.W_q = nn.Linear(d_model, d_k or d_model, bias=bias)
        self.W_k = nn.Linear(d_model, d_k or d_model, bias=bias)
        self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

    def forward(self, x, mask=None):
        v = self.W_v(x)
        w = torch.full(x.shape[:-1] + (x.shape[-2],), 1.0 / x.shape[-2], dtype=x.dtype)
        return w @ v, w
"""

TAMPERED_ENCODING = """
import numpy as _np

_np.sin, _np.cos = _np.cos, _np.sin           # would swap the oracle's columns too


def sinusoidal_positional_encoding(L, d_model):
    if d_model % 2:
        raise ValueError("odd")
    pos = torch.arange(L, dtype=torch.float64)[:, None]
    angles = pos / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    pe = torch.empty(L, d_model, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.cos(angles), torch.sin(angles)
    return pe.float()
"""

LOOKALIKE = """
class _Always:
    shape = property(lambda self: (2, 4, 4))
    dtype = torch.float32
    def __eq__(self, other):
        return True
    def __getattr__(self, name):
        return lambda *a, **k: self


class SelfAttention(nn.Module):
    def __init__(self, d_model, d_k=None, d_v=None, bias=False):
        super().__init__()
        self.W_q = nn.Linear(d_model, d_k or d_model, bias=bias)
        self.W_k = nn.Linear(d_model, d_k or d_model, bias=bias)
        self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

    def forward(self, x, mask=None):
        return _Always(), _Always()
"""


@pytest.fixture
def restore_libraries():
    """The tampering cells rebind module attributes of numpy and torch: put them back afterwards."""
    import numpy as np
    import torch

    saved = {(np, n): getattr(np, n) for n in ("exp", "sin", "cos", "allclose")}
    saved.update({(torch, n): getattr(torch, n) for n in ("allclose", "softmax")})
    yield
    for (mod, name), value in saved.items():
        setattr(mod, name, value)


@pytest.mark.usefixtures("restore_libraries")
def test_rebinding_numpy_and_torch_does_not_fool_the_attention_checks():
    assert not any(o.passed for o in _outcomes("SelfAttention", TAMPERED_ATTENTION))


@pytest.mark.usefixtures("restore_libraries")
def test_rebinding_sin_and_cos_does_not_fool_the_encoding_checks():
    outcomes = _outcomes("sinusoidal_positional_encoding", TAMPERED_ENCODING)
    assert not any(o.passed for o in outcomes)
    assert "swapped sin and cos" in outcomes[0].message


def test_lookalike_results_are_rejected_by_type():
    outcomes = _outcomes("SelfAttention", LOOKALIKE)
    assert not any(o.passed for o in outcomes)
    assert "should be a torch.Tensor" in outcomes[0].message


@pytest.mark.parametrize("name", ["SelfAttention", "sinusoidal_positional_encoding"])
@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
def test_each_check_of_the_solution_runs_well_under_two_seconds(name, hidden):
    ns = namespace(CH03[0])
    start = time.perf_counter()
    outcome = run_check(_exercise(name), ns, hidden=hidden)
    assert outcome.passed, outcome.message
    assert time.perf_counter() - start < 2.0


def test_checks_do_not_import_solutions():
    from autograder.checks import ch03

    tree = ast.parse(open(ch03.__file__).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.split(".")[0] == "solutions" for m in imported), imported


def test_odd_widths_must_raise_value_error_not_any_error():
    wrong_error = """
def sinusoidal_positional_encoding(L, d_model):
    if d_model % 2:
        raise RuntimeError("odd")
    pos = torch.arange(L, dtype=torch.float64)[:, None]
    angles = pos / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    pe = torch.empty(L, d_model, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angles), torch.cos(angles)
    return pe.float()
"""
    outcomes = _outcomes("sinusoidal_positional_encoding", wrong_error)
    assert not outcomes[0].passed and "ValueError" in outcomes[0].message
