"""Chapter 2 specific proofs: the dtype error budget, correct variants, tamper resistance, and
the PyTorch facts that the chapter's prose relies on."""

from __future__ import annotations

import math
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CHAPTER_IDS, namespace

from autograder.checks import ch02 as checks
from autograder.checks.runner import run_check
from autograder.course import find_chapter
from autograder.mutants import mutants_of

pytestmark = pytest.mark.skipif("ch02" not in CHAPTER_IDS, reason="chapter 2 is not in chapters/")


def _chapter():
    return find_chapter("02")


def _exercise(name):
    return next(e for e in _chapter().exercises if e.name == name)


def _oracle(q, k, v, mask):
    """Attention in extended precision (x87 long double where NumPy has it), the float64 inputs' exact answer."""
    q, k, v = (np.asarray(a, dtype=np.longdouble) for a in (q, k, v))
    s = np.matmul(q, np.swapaxes(k, -1, -2)) / np.sqrt(np.longdouble(q.shape[-1]))
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0))
    total = e.sum(axis=-1, keepdims=True)
    return np.matmul(e / np.where(total == 0, 1, total), v)


def _sdpa_error(fn, q, k, v, mask, dtype):
    """Largest output error of ``fn`` and of PyTorch's SDPA at ``dtype``, against an extended-precision oracle."""
    qt, kt, vt = (torch.from_numpy(a).to(dtype) for a in (q, k, v))
    mt = None if mask is None else torch.from_numpy(mask)
    exact = _oracle(*(t.double().numpy() for t in (qt, kt, vt)), mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mt)
    ours, _ = fn(qt, kt, vt, mt)
    assert ours.dtype == dtype
    err = lambda t: float(np.abs(t.double().numpy().astype(np.longdouble) - exact).max())
    return err(ours), err(theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_solution_error_is_within_twice_pytorchs(dtype):
    """The contract: at every dtype, the error is at most twice that of F.scaled_dot_product_attention."""
    sdpa = namespace(_chapter())["scaled_dot_product_attention"]
    rng = np.random.default_rng(0)
    ratios = []
    for trial in range(12):
        B, L, S, d = 2, int(rng.integers(1, 20)), int(rng.integers(1, 40)), int(rng.choice([8, 16, 64]))
        offset = [0.0, 20.0, 100.0][trial % 3]
        q, k, v = checks._shared_offset(rng, (B,), L, S, d, 8, offset=offset)
        mask = rng.random((L, S)) > 0.3
        mask[:, 0] = True
        ours, theirs = _sdpa_error(sdpa, q, k, v, mask, dtype)
        floor = torch.finfo(dtype).eps * np.abs(v).max()  # one unit in the last place of the largest value
        assert ours <= 2 * theirs + floor, f"trial {trial}: error {ours:.3g} vs PyTorch's {theirs:.3g} at {dtype}"
        ratios.append(ours / max(theirs, 1e-300))
    print(f"{dtype}: error ratio ours/PyTorch max {max(ratios):.2f}, median {np.median(ratios):.2f}")


def test_half_precision_arithmetic_breaks_the_budget():
    """Doing the arithmetic in float16 (the natural first attempt) is well outside twice PyTorch's error."""
    naive = next(m for m in mutants_of("ch02") if m.name == "computed_in_half_precision")
    ns = namespace(_chapter(), replace={"scaled_dot_product_attention": naive.code})
    rng = np.random.default_rng(1)
    q, k, v = checks._shared_offset(rng, (2,), 9, 11, 64, 16, offset=100.0)
    ours, theirs = _sdpa_error(ns["scaled_dot_product_attention"], q, k, v, None, torch.float16)
    assert ours > 5 * theirs


@pytest.mark.parametrize("seed", range(20, 28))
def test_hidden_checks_pass_for_every_seed(seed):
    sol = namespace(_chapter())
    checks.hidden_scaled_dot_product_attention(sol["scaled_dot_product_attention"], seed=seed)
    checks.hidden_causal_mask(sol["causal_mask"], seed=seed)
    checks.hidden_padding_mask(sol["padding_mask"], seed=seed)


CORRECT_VARIANTS = {
    "scale_q_first_einsum": """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            q, k, v = q.to(work) * q.shape[-1] ** -0.5, k.to(work), v.to(work)
            scores = torch.einsum("...ld,...sd->...ls", q, k)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            return torch.einsum("...ls,...sv->...lv", weights, v).to(dtype), weights.to(dtype)
    """,
    "finfo_min_then_zero_rows": """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            q, k, v = q.to(work), k.to(work), v.to(work)
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = torch.where(mask, scores, torch.finfo(work).min)
            weights = torch.softmax(scores, dim=-1)
            if mask is not None:
                weights = weights * mask.any(-1, keepdim=True)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    "always_float64": """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            q, k, v = q.double(), k.double(), v.double()
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    "manual_logsumexp": """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            q, k, v = q.to(work), k.to(work), v.to(work)
            scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
            if mask is not None:
                scores = torch.where(mask, scores, float("-inf"))
            m = scores.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            e = torch.exp(scores - m)
            total = e.sum(dim=-1, keepdim=True)
            weights = e / torch.where(total == 0, torch.ones_like(total), total)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    "softmax_with_dtype_argument": """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            scores = (q.to(work) @ k.to(work).transpose(-2, -1)) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(mask.logical_not(), -math.inf)
            weights = torch.softmax(scores, dim=-1, dtype=work)
            weights = torch.nan_to_num(weights, nan=0.0)
            return (weights @ v.to(work)).to(dtype), weights.to(dtype)
    """,
}


@pytest.mark.parametrize("name", list(CORRECT_VARIANTS))
def test_correct_variants_pass(name):
    """Checks bite on behaviour, not on one way of writing the solution."""
    ex = _exercise("scaled_dot_product_attention")
    ns = namespace(_chapter(), replace={ex.name: textwrap.dedent(CORRECT_VARIANTS[name])})
    for hidden in (False, True):
        outcome = run_check(ex, ns, hidden=hidden)
        assert outcome.passed, outcome.message


def test_mask_variants_pass():
    ns = namespace(
        _chapter(),
        replace={
            "causal_mask": (
                "def causal_mask(L, S=None, device=None):\n"
                "    S = L if S is None else S\n"
                "    return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=S - L)\n"
            ),
            "padding_mask": (
                "def padding_mask(lengths, S):\n    return torch.stack([torch.arange(S) < int(n) for n in lengths])\n"
            ),
        },
    )
    for name in ("causal_mask", "padding_mask"):
        for hidden in (False, True):
            outcome = run_check(_exercise(name), ns, hidden=hidden)
            assert outcome.passed, outcome.message


def test_rebinding_pytorch_does_not_loosen_the_checks(monkeypatch):
    """A student cell that replaces F.scaled_dot_product_attention (to inflate the error budget) or
    np.max / torch.allclose changes nothing: the checks hold the originals."""
    naive = next(m for m in mutants_of("ch02") if m.name == "computed_in_half_precision")
    ns = namespace(_chapter(), replace={"scaled_dot_product_attention": naive.code})
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, v, **kw: torch.zeros_like(q) + 1e3)
    monkeypatch.setattr(np, "max", lambda *a, **k: 0.0)
    monkeypatch.setattr(torch, "allclose", lambda *a, **k: True)
    outcome = run_check(_exercise("scaled_dot_product_attention"), ns)
    assert not outcome.passed and "float32" in outcome.message


def test_look_alike_results_are_rejected():
    """An object that claims equality with everything is not a tensor."""

    class Always:
        def __eq__(self, other):
            return True

        shape = dtype = None

    ns = namespace(_chapter())
    ns["scaled_dot_product_attention"] = lambda q, k, v, mask=None: (Always(), Always())
    ns["causal_mask"] = lambda L, S=None, device=None: Always()
    for name in ("scaled_dot_product_attention", "causal_mask"):
        outcome = run_check(_exercise(name), ns)
        assert not outcome.passed and "torch.Tensor" in outcome.message


# ---- facts about PyTorch that the chapter states; if a release changes one, the prose must change


def test_pytorch_is_causal_is_top_left_aligned():
    L, S = 2, 5
    weights = F.scaled_dot_product_attention(torch.randn(L, 4), torch.randn(S, 4), torch.eye(S), is_causal=True)
    assert torch.equal(weights > 0, torch.ones(L, S, dtype=torch.bool).tril())


def test_masked_fill_minus_1e9_overflows_float16():
    scores = torch.zeros(3, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="overflow"):
        scores.masked_fill(torch.tensor([True, False, False]), -1e9)
    assert torch.tensor(-1e9).half().item() == -math.inf


def test_fully_masked_rows_in_pytorch():
    """F.scaled_dot_product_attention gives zeros (since 2.5); a plain softmax and nn.MultiheadAttention give NaN."""
    q = torch.randn(1, 3, 4)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert torch.equal(out[0, 1], torch.zeros(4))
    assert torch.isnan(torch.softmax(torch.full((3,), -math.inf), -1)).all()
    mha = torch.nn.MultiheadAttention(4, 1, batch_first=True)
    with torch.no_grad():
        y, _ = mha(q, q, q, key_padding_mask=torch.ones(1, 3, dtype=torch.bool))
    assert torch.isnan(y).all()


def test_pytorch_causal_lower_right_is_bottom_right_aligned():
    from torch.nn.attention.bias import causal_lower_right

    L, S = 3, 6
    weights = F.scaled_dot_product_attention(
        torch.randn(L, 4), torch.randn(S, 4), torch.eye(S), attn_mask=causal_lower_right(L, S)
    )
    expected = torch.arange(S)[None, :] <= torch.arange(L)[:, None] + (S - L)
    assert torch.equal(weights > 0, expected)
