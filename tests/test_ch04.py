"""Chapter 4 beyond the generic tests: the layer is a drop-in for ``nn.MultiheadAttention``.

* 200 random configurations (sizes, L != S, masks of every kind, float32 and float64, self- and
  cross-attention, need_weights / average_attn_weights, is_causal): the solution, loaded with the
  state dict of ``nn.MultiheadAttention``, is within twice PyTorch's own float32 error of a float64
  run (plus a tiny floor), and gives zeros where PyTorch gives NaN (fully masked queries).
* The checks' own float64 oracle equals ``nn.MultiheadAttention``, so the checks grade against
  PyTorch's semantics.
* The FLOP formula equals what ``torch.utils.flop_counter`` counts on the solution's forward pass.
* Dropout draws the same mask as PyTorch's layer under the same seed, and is off in eval mode.
* The mutants' TEMPLATE is a correct layer (each mutant differs from it by one mistake).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import namespace
from torch.utils.flop_counter import FlopCounterMode

from autograder.checks import ch04 as checks
from autograder.checks import torch_refs
from autograder.checks.runner import run_check
from autograder.course import find_chapter
from autograder.mutants import ch04 as mutants
from solutions.ch04_multi_head_attention import MultiHeadAttention, merge_heads, multi_head_attention_flops, split_heads

CONFIGS = 200


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP hand-offs, which dominate on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FLOOR32 = 1e-6  # floor on float32 comparisons, relative to the largest reference value (at least 1): about 8 ulps
FLOOR64 = 1e-12


def _reference(e: int, h: int, bias: bool, rng: np.random.Generator) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(e, h, bias=bias, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.from_numpy(rng.normal(size=(3 * e, e), scale=e**-0.5)))
        ref.out_proj.weight.copy_(torch.from_numpy(rng.normal(size=(e, e), scale=e**-0.5)))
        if bias:
            ref.in_proj_bias.copy_(torch.from_numpy(rng.normal(size=3 * e, scale=0.5)))
            ref.out_proj.bias.copy_(torch.from_numpy(rng.normal(size=e, scale=0.5)))
    return ref


def _random_mask(rng, shape, kind: str, dtype):
    """kind: 'bool' (True = not allowed) or 'float' (finite values plus some -inf)."""
    if kind == "bool":
        return torch.from_numpy(rng.random(size=shape) < 0.3)
    values = rng.normal(size=shape)
    values[rng.random(size=shape) < 0.2] = -np.inf
    return torch.from_numpy(values).to(dtype)


def _config(rng: np.random.Generator, i: int) -> dict:
    heads = int(rng.choice([1, 2, 3, 4, 8]))
    head_dim = int(rng.integers(1, 9))
    mode = ["self", "cross_kv_same", "cross"][i % 3]
    length = int(rng.integers(1, 13))
    src = length if mode == "self" else int(rng.integers(1, 13))
    return {
        "B": int(rng.integers(1, 5)),
        "L": length,
        "S": src,
        "H": heads,
        "E": heads * head_dim,
        "dtype": torch.float32 if i % 2 == 0 else torch.float64,
        "bias": bool(rng.random() < 0.8),
        "mode": mode,
        "kpm": str(rng.choice(["none", "bool", "float"])),
        "attn": str(rng.choice(["none", "bool2d", "bool3d", "float2d", "float3d", "causal"])),
        "need_weights": bool(rng.random() < 0.7),
        "average": bool(rng.random() < 0.5),
        "scale": float(rng.choice([1.0, 1.0, 4.0])),
        "fast_path": bool(rng.random() < 0.25),  # eval + no_grad: PyTorch may take its native fast path
    }


def _max_err(a: torch.Tensor, ref: torch.Tensor, where: torch.Tensor) -> float:
    if not where.any():
        return 0.0
    return float((a.detach().double() - ref.detach().double()).abs()[where].max())


def _run(module, q, k, v, kwargs, no_grad: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if no_grad:
            with torch.no_grad():
                return module(q, k, v, **kwargs)
        return module(q, k, v, **kwargs)


def _one_configuration(rng: np.random.Generator, i: int) -> dict:
    c = _config(rng, i)
    b, n, s, e, h, dtype = c["B"], c["L"], c["S"], c["E"], c["H"], c["dtype"]
    ref = _reference(e, h, c["bias"], rng).to(dtype)
    ref64 = copy.deepcopy(ref).to(torch.float64)
    ours = MultiHeadAttention(e, h, bias=c["bias"]).to(dtype)
    ours.load_state_dict(ref.state_dict())
    if c["fast_path"]:
        ref.eval()
        ours.eval()

    q = torch.from_numpy(rng.normal(size=(b, n, e), scale=c["scale"])).to(dtype)
    if c["mode"] == "self":
        k = v = q
    elif c["mode"] == "cross_kv_same":
        k = v = torch.from_numpy(rng.normal(size=(b, s, e), scale=c["scale"])).to(dtype)
    else:
        k = torch.from_numpy(rng.normal(size=(b, s, e), scale=c["scale"])).to(dtype)
        v = torch.from_numpy(rng.normal(size=(b, s, e), scale=c["scale"])).to(dtype)

    kwargs = {"need_weights": c["need_weights"], "average_attn_weights": c["average"]}
    ours_kwargs = {}
    if c["kpm"] != "none":
        kwargs["key_padding_mask"] = _random_mask(rng, (b, s), c["kpm"], dtype)
    attn = c["attn"]
    if attn == "causal" and n == s:
        kwargs["attn_mask"] = torch.ones(n, s, dtype=torch.bool).triu(1)
        kwargs["is_causal"] = True
        if rng.random() < 0.5:  # ours also accepts is_causal without a mask (PyTorch requires one)
            ours_kwargs["attn_mask"] = None
    elif attn != "none" and attn != "causal":
        shape = (n, s) if attn.endswith("2d") else (b * h, n, s)
        kwargs["attn_mask"] = _random_mask(rng, shape, "bool" if attn.startswith("bool") else "float", dtype)

    def as64(kw):
        return {
            key: (val.to(torch.float64) if torch.is_tensor(val) and val.is_floating_point() else val) for key, val in kw.items()
        }

    out_t, w_t = _run(ref, q, k, v, kwargs, c["fast_path"])
    out_o, w_o = _run(ours, q, k, v, {**kwargs, **ours_kwargs}, c["fast_path"])
    q64, k64, v64 = q.double(), k.double(), v.double()
    if c["mode"] == "self":
        k64 = v64 = q64
    elif c["mode"] == "cross_kv_same":
        v64 = k64
    # float64 references: the weights from PyTorch's explicit path (NaN where a query sees no key), the output
    # from its SDPA path (need_weights=False), which gives such queries zero weights, as the course asks.
    per_head = {**as64(kwargs), "need_weights": True, "average_attn_weights": False}
    _, w_64 = _run(ref64, q64, k64, v64, per_head, no_grad=True)
    out_64, _ = _run(ref64, q64, k64, v64, {**as64(kwargs), "need_weights": False}, no_grad=True)
    assert torch.isfinite(out_64).all(), f"configuration {i}: PyTorch's float64 SDPA path gave NaN"
    if not c["need_weights"]:
        assert w_o is None and w_t is None
    magnitude = max(1.0, float(out_64.abs().max()))
    floor = (FLOOR32 if dtype == torch.float32 else FLOOR64) * magnitude

    assert out_o.shape == out_t.shape and out_o.dtype == dtype, c
    assert torch.isfinite(out_o).all(), f"configuration {i} {c}: our output has NaN or inf"
    err_ours = _max_err(out_o, out_64, torch.ones_like(out_64, dtype=torch.bool))
    err_torch = _max_err(out_t, out_64, torch.isfinite(out_t))
    errors = {"out": (err_ours, err_torch)}
    if c["need_weights"]:
        if not c["average"]:
            assert w_o.shape == (b, h, n, s)
        else:
            assert w_o.shape == (b, n, s)
        dead = ~torch.isfinite(w_64)  # per head: queries of that head that see no key
        assert torch.isfinite(w_o).all(), f"configuration {i} {c}: our weights have NaN"
        if c["average"]:
            ref_w = w_64.nan_to_num(0.0).mean(dim=1)  # a head that sees nothing contributes zeros to the mean
            where = torch.ones_like(ref_w, dtype=torch.bool)
        else:
            assert (w_o[dead] == 0).all(), f"configuration {i}: fully masked rows should get zero weights"
            ref_w, where = w_64, ~dead
        errors["weights"] = (_max_err(w_o, ref_w, where), _max_err(w_t, ref_w, where & torch.isfinite(w_t)))
    for what, (mine, theirs) in errors.items():
        bound = (2 * theirs + floor) if dtype == torch.float32 else floor
        assert mine <= bound, f"configuration {i} {c}: {what} error {mine:.3g} > bound {bound:.3g} (PyTorch's {theirs:.3g})"
    return {"config": c, "errors": errors}


def test_drop_in_for_nn_multiheadattention_on_200_configurations():
    rng = np.random.default_rng(2024)
    worst = {torch.float32: (0.0, 0.0, ""), torch.float64: (0.0, 0.0, "")}  # (ours, PyTorch's, where)
    worst_ratio = (0.0, "")
    for i in range(CONFIGS):
        result = _one_configuration(rng, i)
        c = result["config"]
        for what, (mine, theirs) in result["errors"].items():
            if mine > worst[c["dtype"]][0]:
                worst[c["dtype"]] = (mine, theirs, f"{what} of configuration {i}")
            if c["dtype"] == torch.float32 and theirs > 0 and mine / theirs > worst_ratio[0]:
                worst_ratio = (mine / theirs, f"{what} of configuration {i}")
    f32, f64 = worst[torch.float32], worst[torch.float64]
    print(
        f"\nworst error against float64 over {CONFIGS} configurations: float32 {f32[0]:.3g} ({f32[2]}; PyTorch's there "
        f"{f32[1]:.3g}), float64 {f64[0]:.3g} ({f64[2]}); largest ratio ours/PyTorch in float32 {worst_ratio[0]:.2f} "
        f"({worst_ratio[1]})"
    )
    assert f32[0] < 1e-4 and f64[0] < 1e-10


def test_is_causal_without_mask_matches_sdpa_convention():
    """With attn_mask=None, is_causal=True is F.scaled_dot_product_attention's causal mask (query i sees j <= i)."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=True)
    ours = MultiHeadAttention(8, 2)
    ours.load_state_dict(ref.state_dict())
    for n, s in ((5, 5), (3, 6), (6, 3)):
        q, kv = torch.randn(2, n, 8), torch.randn(2, s, 8)
        mask = torch.ones(n, s, dtype=torch.bool).triu(1)
        want, _ = ref(q, kv, kv, attn_mask=mask, need_weights=False, is_causal=True)  # PyTorch's SDPA path
        got, _ = ours(q, kv, kv, is_causal=True, need_weights=False)
        torch.testing.assert_close(got, want)


def test_checks_oracle_equals_nn_multiheadattention():
    rng = np.random.default_rng(7)
    for i in range(40):
        h = int(rng.choice([1, 2, 4]))
        e = h * int(rng.integers(1, 6))
        b, n, s = (int(x) for x in rng.integers(1, 6, size=3))
        p = torch_refs.mha_params(rng, e, bias=bool(i % 3))
        ref = torch_refs.mha_module(e, h, bool(i % 3), p).to(torch.float64)
        q, k, v = (rng.normal(size=(b, m, e)) for m in (n, s, s))
        kpm = rng.random(size=(b, s)) < 0.3 if i % 2 else None
        am = rng.normal(size=(b * h, n, s)) if i % 4 == 1 else (rng.random(size=(n, s)) < 0.3 if i % 4 == 2 else None)
        kw = {
            "key_padding_mask": None if kpm is None else torch.from_numpy(kpm),
            "attn_mask": None if am is None else torch.from_numpy(am),
            "average_attn_weights": False,
        }
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out_t, w_t = ref(*(torch.from_numpy(x) for x in (q, k, v)), **kw)
        out_o, w_o = checks._oracle(p, q, k, v, h, kpm=kpm, am=am)
        finite = np.isfinite(out_t.numpy())
        np.testing.assert_allclose(out_o[finite], out_t.numpy()[finite], atol=1e-12)
        finite_w = np.isfinite(w_t.numpy())
        np.testing.assert_allclose(w_o[finite_w], w_t.numpy()[finite_w], atol=1e-12)
        assert (w_o[~finite_w] == 0).all()


@pytest.mark.parametrize(("b", "n", "s", "e", "h"), [(1, 4, 4, 8, 1), (2, 5, 7, 12, 3), (3, 16, 9, 32, 8), (1, 1, 1, 4, 4)])
def test_flop_formula_matches_torch_flop_counter(b, n, s, e, h):
    module = MultiHeadAttention(e, h)
    q, kv = torch.randn(b, n, e), torch.randn(b, s, e)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(q, kv, kv, need_weights=False)
    assert counter.get_total_flops() == multi_head_attention_flops(b, n, s, e, h)


def test_parameter_count_does_not_depend_on_heads():
    counts = {h: sum(p.numel() for p in MultiHeadAttention(64, h).parameters()) for h in (1, 2, 4, 8, 16, 64)}
    assert set(counts.values()) == {4 * 64 * 64 + 4 * 64}


def test_dropout_matches_pytorch_in_training_and_is_off_in_eval():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
    with torch.no_grad():
        ref.in_proj_bias.normal_()
    ours = MultiHeadAttention(8, 2, dropout=0.3)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 8)
    torch.manual_seed(1)
    want = ref(x, x, x, average_attn_weights=False)
    torch.manual_seed(1)
    got = ours(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(got, want)  # the same dropout mask, drawn from the same generator
    ref.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, x, x)[0], ours(x, x, x)[0])
        torch.testing.assert_close(ours(x, x, x, need_weights=True), ref(x, x, x, need_weights=True))


def test_split_and_merge_are_inverse():
    x = torch.randn(3, 7, 24)
    for h in (1, 2, 3, 4, 6, 8, 12, 24):
        assert torch.equal(merge_heads(split_heads(x, h)), x)
        assert torch.equal(split_heads(x, h)[:, 1 % h, 2], x[:, 2, (1 % h) * (24 // h) : (1 % h + 1) * (24 // h)])


def test_mutant_template_is_a_correct_layer():
    chapter = find_chapter("04")
    ex = next(e for e in chapter.exercises if e.name == "MultiHeadAttention")
    ns = namespace(chapter, replace={"MultiHeadAttention": mutants.TEMPLATE})
    for hidden in (False, True):
        outcome = run_check(ex, ns, hidden=hidden)
        assert outcome.passed, outcome.message


class _TorchsOwnLayer(nn.Module):
    """nn.MultiheadAttention's parameters and its own functional forward: PyTorch's dropout placement exactly."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True):
        super().__init__()
        ref = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, bias=bias, batch_first=True)
        self.in_proj_weight, self.in_proj_bias, self.out_proj = ref.in_proj_weight, ref.in_proj_bias, ref.out_proj
        self.num_heads, self.dropout = num_heads, dropout

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True):
        out, w = nn.functional.multi_head_attention_forward(
            *(t.transpose(0, 1) for t in (query, key, value)), query.shape[-1], self.num_heads,
            self.in_proj_weight, self.in_proj_bias, None, None, False, self.dropout, self.out_proj.weight,
            self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights,
        )  # fmt: skip
        return out.transpose(0, 1), w


@pytest.mark.parametrize("seed", range(6))
def test_dropout_placement_check_accepts_pytorchs_own_layer_and_the_solution(seed):
    """The read-back of the dropped weights holds for PyTorch's layer (both its paths) and the solution, any seed."""
    for cls in (_TorchsOwnLayer, MultiHeadAttention):
        checks._check_dropout_train(cls, np.random.default_rng(seed))


def test_dropout_placement_check_names_dropout_on_the_output():
    ns = namespace(
        find_chapter("04"), replace={"MultiHeadAttention": next(m.code for m in mutants.MUTANTS if m.name == "dropout_on_output")}
    )
    with pytest.raises(AssertionError, match="dropout acts on the layer's output"):
        checks._check_dropout_train(ns["MultiHeadAttention"], np.random.default_rng(0))
