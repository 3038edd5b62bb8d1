"""Chapter 10 beyond the generic tests: the solution on 1 to 4 real gloo ranks against
``nn.MultiheadAttention``, forward and backward (input, weight and bias gradients; default and
non-default groups), ``shard_heads`` properties, the checks' oracles against PyTorch and its
autograd, the checks' fallback and failure modes, the mutant templates, and the numbers the
chapter quotes."""

from __future__ import annotations

import datetime
import os
import re
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from conftest import namespace

from autograder.checks import ch10 as checks
from autograder.checks.runner import run_check
from autograder.course import ROOT, find_chapter
from autograder.mutants import ch10 as mutants
from autograder.notebook_format import read
from solutions.ch10_heads_across_devices import TensorParallelMultiHeadAttention, shard_heads

CHAPTER = find_chapter("10")
TIMEOUT_S = 30


def _reference(embed_dim: int, num_heads: int, bias: bool = True, dtype=torch.float32, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(embed_dim, num_heads, bias=bias, batch_first=True).to(dtype).eval()
    if bias:  # PyTorch initialises the biases to zero: make them count
        with torch.no_grad():
            mha.in_proj_bias.normal_(0, 0.5)
            mha.out_proj.bias.normal_(0, 0.5)
    return mha


# ---------------------------------------------------------------------------------------------
# Real ranks, started with torch.multiprocessing


def _worker(rank, world_size, folder, backend, state, num_heads, inputs, kwargs, bias, dtype):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.FileStore(os.path.join(folder, "store"), world_size)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    try:
        embed_dim = inputs[0].shape[-1]
        layer = TensorParallelMultiHeadAttention(embed_dim, num_heads, bias=bias).to(dtype)
        layer.load_state_dict(shard_heads(state, rank, world_size, num_heads))
        layer = layer.to(device).eval()
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        with torch.no_grad():
            out = layer(*(x.to(device) for x in inputs), **moved)
        torch.save(out.cpu(), os.path.join(folder, f"out{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _launch(world_size: int, folder, *args, backend: str = "gloo", method: str | None = None) -> list[torch.Tensor]:
    """Run _worker on world_size processes; a hang fails after TIMEOUT_S instead of blocking."""
    method = method or ("spawn" if backend == "nccl" else "fork")
    ctx = mp.start_processes(
        _worker, args=(world_size, str(folder), backend, *args), nprocs=world_size, join=False, start_method=method
    )
    deadline = time.monotonic() + TIMEOUT_S + 10
    while not ctx.join(timeout=0.1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{world_size} ranks did not finish within {TIMEOUT_S + 10} s")
    return [torch.load(os.path.join(folder, f"out{r}.pt")) for r in range(world_size)]


CASES = [
    # (world_size, embed_dim, num_heads, bias, dtype, masks)
    (1, 16, 4, True, torch.float32, "causal"),
    (2, 16, 4, True, torch.float32, "padding"),
    (2, 24, 6, False, torch.float64, "attn_mask"),
    (4, 32, 8, True, torch.float64, "padding+causal"),
    (4, 16, 4, False, torch.float32, "cross"),
]


@pytest.mark.parametrize(("world_size", "embed_dim", "num_heads", "bias", "dtype", "masks"), CASES)
def test_tensor_parallel_equals_nn_multihead_attention_on_gloo_ranks(
    tmp_path, world_size, embed_dim, num_heads, bias, dtype, masks
):
    mha = _reference(embed_dim, num_heads, bias, dtype)
    torch.manual_seed(1)
    x = torch.randn(3, 7, embed_dim, dtype=dtype)
    kwargs, ref_kwargs, inputs, ref_inputs = {}, {}, [x], (x, x, x)
    if "padding" in masks:
        pad = torch.arange(7)[None, :] >= torch.tensor([7, 3, 5])[:, None]
        kwargs["key_padding_mask"] = ref_kwargs["key_padding_mask"] = pad
    if "causal" in masks:
        kwargs["is_causal"] = True
        ref_kwargs["attn_mask"] = torch.ones(7, 7, dtype=torch.bool).triu(1)
    if masks == "attn_mask":
        kwargs["attn_mask"] = ref_kwargs["attn_mask"] = torch.randn(7, 7, dtype=dtype)
    if masks == "cross":
        kv = torch.randn(3, 5, embed_dim, dtype=dtype)
        v = torch.randn(3, 5, embed_dim, dtype=dtype)
        inputs, ref_inputs = [x, kv, v], (x, kv, v)
    with torch.no_grad():
        want = mha(*ref_inputs, need_weights=False, **ref_kwargs)[0]
    outs = _launch(world_size, tmp_path, mha.state_dict(), num_heads, inputs, kwargs, bias, dtype)
    atol = 1e-12 if dtype == torch.float64 else 2e-5
    for out in outs:
        assert out.dtype == dtype and out.shape == want.shape
        torch.testing.assert_close(out, want, atol=atol, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="NCCL needs at least 2 GPUs")
def test_tensor_parallel_on_nccl(tmp_path):
    mha = _reference(64, 8)
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        want = mha(x, x, x, need_weights=False)[0]
    outs = _launch(2, tmp_path, mha.state_dict(), 8, [x], {}, True, torch.float32, backend="nccl")
    for out in outs:  # TF32 or a different reduction order on the GPU: a float32-sized tolerance
        torch.testing.assert_close(out, want, atol=2e-3, rtol=0)


@pytest.mark.slow
def test_spawned_ranks_as_the_nccl_test_starts_them(tmp_path):
    """The NCCL test spawns fresh interpreters (CUDA cannot be forked); the same launcher works with gloo."""
    mha = _reference(16, 4)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = mha(x, x, x, need_weights=False)[0]
    for out in _launch(2, tmp_path, mha.state_dict(), 4, [x], {}, True, torch.float32, method="spawn"):
        torch.testing.assert_close(out, want, atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# shard_heads


@pytest.mark.parametrize(("world_size", "num_heads"), [(1, 4), (2, 4), (4, 8), (3, 6)])
def test_shards_reassemble_the_layer(world_size, num_heads):
    """Concatenating the shards (per Q, K, V block) gives back the full weights; each bias is whole."""
    mha = _reference(4 * num_heads, num_heads)
    state = mha.state_dict()
    shards = [shard_heads(state, r, world_size, num_heads) for r in range(world_size)]
    for name in ("in_proj_weight", "in_proj_bias"):
        blocks = [s[name].chunk(3) for s in shards]
        rebuilt = torch.cat([torch.cat([b[i] for b in blocks]) for i in range(3)])
        assert torch.equal(rebuilt, state[name])
    assert torch.equal(torch.cat([s["out_proj.weight"] for s in shards], dim=1), state["out_proj.weight"])
    for s in shards:
        assert torch.equal(s["out_proj.bias"], state["out_proj.bias"])
        assert set(s) == set(state)


def test_shard_heads_keeps_dtype_copies_and_rejects_uneven_splits():
    state = _reference(16, 4, bias=False, dtype=torch.float64).state_dict()
    before = {k: v.clone() for k, v in state.items()}
    shard = shard_heads(state, 1, 2, 4)
    assert set(shard) == {"in_proj_weight", "out_proj.weight"}
    assert all(v.dtype == torch.float64 for v in shard.values())
    shard["in_proj_weight"].zero_()
    assert all(torch.equal(state[k], before[k]) for k in state)
    with pytest.raises(ValueError):  # 6 heads over 4 ranks
        shard_heads(_reference(24, 6).state_dict(), 0, 4, 6)
    with pytest.raises(ValueError):  # 4 heads over 3 ranks
        shard_heads(state, 0, 3, 4)
    with pytest.raises(ValueError):  # no rank 2 among 2 ranks
        shard_heads(state, 2, 2, 4)


def _construct_or_error(rank, world_size, embed_dim, num_heads):
    try:
        TensorParallelMultiHeadAttention(embed_dim, num_heads)
    except ValueError as exc:
        return f"ValueError: {exc}"
    return "built"


def test_layer_rejects_heads_that_do_not_split_over_the_group():
    assert (
        checks.run_on_ranks(4, _construct_or_error, 12, 6)
        == ["ValueError: num_heads 6 is not divisible by the group's 4 ranks"] * 4
    )
    assert checks.run_on_ranks(3, _construct_or_error, 12, 6) == ["built"] * 3


# ---------------------------------------------------------------------------------------------
# Gradients: every rank holds the single-device layer's input gradients and its slices of the others


def _grad_worker(rank, world_size, state, num_heads, inputs, kwargs, grad_out, bias, groups):
    group = None
    if groups:  # every rank creates every group, in the same order, then uses its own
        made = [dist.new_group(ranks) for ranks in groups]
        group = next(g for ranks, g in zip(groups, made, strict=True) if rank in ranks)
    embed_dim = inputs[0].shape[-1]
    layer = TensorParallelMultiHeadAttention(embed_dim, num_heads, group=group, bias=bias).double()
    layer.load_state_dict(shard_heads(state, dist.get_rank(group), dist.get_world_size(group), num_heads))
    xs = [x.clone().requires_grad_() for x in inputs]
    out = layer(*xs, **kwargs)
    out.backward(grad_out)
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return out.detach(), [x.grad for x in xs], grads, dist.get_rank(group), dist.get_world_size(group)


GRAD_CASES = [
    # (world_size, groups, embed_dim, num_heads, bias, mode)
    (2, None, 16, 4, True, "self"),
    (2, None, 12, 6, False, "cross"),
    (3, None, 12, 6, True, "self"),
    (3, None, 18, 3, True, "cross"),
    (3, [[0], [1, 2]], 16, 4, True, "self"),
    (3, [[0, 2], [1]], 8, 2, True, "cross"),
]


@pytest.mark.parametrize(("world_size", "groups", "embed_dim", "num_heads", "bias", "mode"), GRAD_CASES)
def test_gradients_equal_nn_multihead_attention_on_gloo_ranks(world_size, groups, embed_dim, num_heads, bias, mode):
    mha = _reference(embed_dim, num_heads, bias, torch.float64)
    torch.manual_seed(2)
    x = torch.randn(2, 5, embed_dim, dtype=torch.float64)
    inputs = (
        [x]
        if mode == "self"
        else [x, torch.randn(2, 6, embed_dim, dtype=torch.float64), torch.randn(2, 6, embed_dim, dtype=torch.float64)]
    )
    pad = torch.arange(inputs[-1].shape[1])[None, :] >= torch.tensor([6, 3])[:, None]
    grad_out = torch.randn(2, 5, embed_dim, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref_args = leaves * 3 if mode == "self" else leaves
    want = mha(*ref_args, key_padding_mask=pad, need_weights=False)[0]
    want.backward(grad_out)
    want_params = {name: p.grad for name, p in mha.named_parameters()}
    results = checks.run_on_ranks(
        world_size, _grad_worker, mha.state_dict(), num_heads, inputs, {"key_padding_mask": pad}, grad_out, bias, groups
    )
    for out, d_inputs, d_params, group_rank, group_size in results:
        torch.testing.assert_close(out, want.detach(), atol=1e-12, rtol=0)
        for got, leaf in zip(d_inputs, leaves, strict=True):  # in full on every rank
            torch.testing.assert_close(got, leaf.grad, atol=1e-12, rtol=0)
        expected = shard_heads(want_params, group_rank, group_size, num_heads)  # gradients slice as the weights do
        assert set(d_params) == set(expected)
        for name, grad in expected.items():
            torch.testing.assert_close(d_params[name], grad, atol=1e-12, rtol=0)


def _naive_tp_input_gradient(rank, world_size, state, num_heads, x, grad_out):
    # The first edition's layer: dist.all_reduce in place on the partial output, no f at the input.
    layer = TensorParallelMultiHeadAttention(x.shape[-1], num_heads).to(x.dtype)
    layer.load_state_dict(shard_heads(state, rank, world_size, num_heads))
    layer.CopyToRanks = type("Identity", (), {"apply": staticmethod(lambda t, group: t)})

    def plain_all_reduce(partial, group):
        dist.all_reduce(partial, group=group)
        return partial

    layer.SumOverRanks = type("InPlace", (), {"apply": staticmethod(plain_all_reduce)})
    xi = x.clone().requires_grad_()
    layer(xi).backward(grad_out)
    return xi.grad


def test_plain_all_reduce_leaves_each_rank_a_partial_input_gradient():
    """What the issue measured: without f, each rank's input gradient is its heads' share; only the sum is right."""
    mha = _reference(16, 4, True, torch.float64)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    grad_out = torch.randn(2, 6, 16, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    mha(xr, xr, xr, need_weights=False)[0].backward(grad_out)
    partial = checks.run_on_ranks(2, _naive_tp_input_gradient, mha.state_dict(), 4, x, grad_out)
    assert all((g - xr.grad).abs().max() > 0.05 for g in partial)
    torch.testing.assert_close(sum(partial), xr.grad, atol=1e-12, rtol=0)


def _dist_nn_all_reduce_gradient(rank, world_size):
    import torch.distributed.nn.functional as dnf

    w = torch.tensor([rank + 1.0], dtype=torch.float64, requires_grad=True)
    dnf.all_reduce(w * 2.0).sum().backward()
    return w.grad.item()


def test_torch_distributed_nn_all_reduce_sums_the_replicated_gradient():
    """The chapter's claim: its backward all-reduces the gradient, so a loss replicated on p ranks gives p x."""
    assert checks.run_on_ranks(3, _dist_nn_all_reduce_gradient) == [6.0, 6.0, 6.0]  # 2 (the true gradient) x 3


# ---------------------------------------------------------------------------------------------
# The checks' oracles against PyTorch


def _add_masks(rng, masks: str, case: dict, kw: dict, lq: int, ls: int) -> None:
    """The masks of a test case: NumPy ones in ``case`` (the checks' convention), torch ones in ``kw``."""
    if masks == "padding":
        case["key_padding_mask"] = np.array([[False] * ls, [False] * 2 + [True] * (ls - 2)])
        kw["key_padding_mask"] = torch.from_numpy(case["key_padding_mask"])
    if masks == "bool_attn":
        m = rng.random((lq, ls)) < 0.4
        m[:, 0] = False
        case["attn_mask"], kw["attn_mask"] = m, torch.from_numpy(m)
    if masks == "float_attn":
        m = rng.normal(size=(lq, ls))
        case["attn_mask"], kw["attn_mask"] = m, torch.from_numpy(m)
    if masks == "causal":
        case["is_causal"] = True
        kw["attn_mask"] = torch.ones(lq, ls, dtype=torch.bool).triu(1)


@pytest.mark.parametrize("masks", ["none", "padding", "bool_attn", "float_attn", "causal", "cross"])
@pytest.mark.parametrize("bias", [True, False])
def test_check_oracle_equals_nn_multihead_attention(masks, bias):
    rng = np.random.default_rng(5)
    e, h, b, lq = 12, 4, 2, 5
    ls = 6 if masks == "cross" else lq
    params = checks._params(rng, e, bias, torch.float64)
    mha = nn.MultiheadAttention(e, h, bias=bias, batch_first=True).double().eval()
    mha.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    q = rng.normal(size=(b, lq, e))
    k = rng.normal(size=(b, ls, e)) if masks == "cross" else q
    v = rng.normal(size=(b, ls, e)) if masks == "cross" else q
    case, kw = {"query": q, "key": k, "value": v}, {}
    _add_masks(rng, masks, case, kw, lq, ls)
    with torch.no_grad():
        want = mha(*(torch.from_numpy(a) for a in (q, k, v)), need_weights=False, **kw)[0].numpy()
    np.testing.assert_allclose(checks._oracle(params, case, h), want, atol=1e-12, rtol=0)
    for p in (1, 2, 4):  # eq-tp-sum: the ranks' partial outputs plus the bias give the same layer
        total = sum(checks._partial(params, case, r, p, h) for r in range(p)) + checks._bias(params)
        np.testing.assert_allclose(total, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("masks", ["none", "padding", "bool_attn", "float_attn", "causal", "cross", "query_key"])
@pytest.mark.parametrize("bias", [True, False])
def test_check_backward_oracle_equals_autograd(masks, bias):
    """The checks' hand-written backward (all heads, and any rank's share) against autograd of nn.MultiheadAttention."""
    rng = np.random.default_rng(7)
    e, h, b, lq = 12, 4, 2, 5
    ls = 6 if masks in ("cross", "query_key") else lq
    params = checks._params(rng, e, bias, torch.float64)
    mha = nn.MultiheadAttention(e, h, bias=bias, batch_first=True).double()
    mha.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    q = rng.normal(size=(b, lq, e))
    k = rng.normal(size=(b, ls, e)) if masks in ("cross", "query_key") else q
    v = rng.normal(size=(b, ls, e)) if masks == "cross" else k
    mode = {"cross": "cross", "query_key": "query_key"}.get(masks, "self")
    case, kw = {"query": q, "key": k, "value": v, "mode": mode}, {}
    _add_masks(rng, masks, case, kw, lq, ls)
    leaves = {"self": [q], "query_key": [q, k], "cross": [q, k, v]}[mode]
    leaves = [torch.from_numpy(a).requires_grad_() for a in leaves]
    args = leaves * 3 if mode == "self" else ([*leaves, leaves[1]] if mode == "query_key" else leaves)
    grad_out = rng.normal(size=(b, lq, e))
    out = mha(*args, need_weights=False, **kw)[0]
    out.backward(torch.from_numpy(grad_out))
    grads, d_args = checks._full_backward(params, case, h, grad_out)
    for leaf, got in zip(leaves, d_args, strict=True):
        np.testing.assert_allclose(got, leaf.grad.numpy(), atol=1e-12, rtol=0)
    for name, p in mha.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), atol=1e-12, rtol=0)
    for p_ranks in (2, 4):  # the ranks' shares of the input gradients add up to the whole
        shares = [checks._heads_backward(params, case, checks._rank_heads(r, p_ranks, h), h, grad_out)[1] for r in range(p_ranks)]
        total = [sum(s[i] for s in shares) for i in range(3)]
        for got, want in zip(checks._per_argument(total, mode), d_args, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)


def test_check_shards_equal_an_independent_torch_slicing():
    rng = np.random.default_rng(6)
    params = checks._params(rng, 16, True, torch.float64)
    w = torch.from_numpy(params["in_proj_weight"])
    for r in range(4):
        got = checks._shard(params, r, 4, 8)
        q, k, v = w.chunk(3)
        rows = slice(r * 4, (r + 1) * 4)  # 2 heads of 2 features per rank
        assert np.array_equal(got["in_proj_weight"], torch.cat([q[rows], k[rows], v[rows]]).numpy())
        assert np.array_equal(got["out_proj.weight"], params["out_proj.weight"][:, rows])


# ---------------------------------------------------------------------------------------------
# The checks: templates, fallback, hangs, patched collectives


def test_bias_on_rank_zero_only_is_accepted():
    """Adding the bias before the all-reduce on rank 0 only is correct too (forward and gradients)."""
    source = mutants.TEMPLATES["TensorParallelMultiHeadAttention"].replace(
        "        out = self.G.apply(out, self.group)\n        if self.out_proj.bias is not None:\n",
        "        if self.out_proj.bias is not None and self.rank == 0:\n            out = out + self.out_proj.bias\n"
        "        out = self.G.apply(out, self.group)\n        if False:\n",
    )
    assert source != mutants.TEMPLATES["TensorParallelMultiHeadAttention"]
    ex = CHAPTER.exercises[1]
    ns = namespace(CHAPTER, replace={ex.name: source})
    assert run_check(ex, ns, hidden=True).passed


@pytest.mark.parametrize(
    "mutant", ["missing_all_reduce", "in_place_all_reduce_no_backward", "all_reduce_without_group", "g_backward_all_reduces"]
)
def test_thread_fallback_without_fork(monkeypatch, mutant):
    """Where gloo cannot start, the ranks run as threads (groups and gradients too): the solution passes, mistakes are named."""
    monkeypatch.setattr(checks, "_fork", None)
    ex = CHAPTER.exercises[1]
    if mutant == "missing_all_reduce":
        ok = run_check(ex, namespace(CHAPTER), hidden=True)
        assert ok.passed, ok.message
    bad = next(m for m in mutants.MUTANTS if m.name == mutant)
    ns = namespace(CHAPTER, replace={ex.name: bad.code})
    outcomes = [run_check(ex, ns, hidden=hidden) for hidden in (False, True)]
    message = "\n".join(o.message for o in outcomes if not o.passed)
    assert message and "simulated ranks" in message and bad.diagnosis.lower() in message.lower()
    assert (dist.all_reduce, dist.get_rank, dist.get_world_size) == (checks._all_reduce, checks._get_rank, checks._get_world_size)


def test_a_hanging_rank_is_killed_and_reported(monkeypatch):
    monkeypatch.setattr(checks, "DEADLINE_S", 2.0)
    source = mutants.TEMPLATES["TensorParallelMultiHeadAttention"].replace(
        "        return out\n", "        while self.rank == 1:\n            pass\n        return out\n"
    )
    ex = CHAPTER.exercises[1]
    start = time.monotonic()
    outcome = run_check(ex, namespace(CHAPTER, replace={ex.name: source}))
    assert time.monotonic() - start < 10
    assert not outcome.passed and "did not finish" in outcome.message and "deadlock" in outcome.message


def test_checks_survive_a_notebook_that_patches_all_reduce(monkeypatch):
    """A notebook that turns dist.all_reduce into a no-op cannot make the missing sum pass."""
    ns = namespace(CHAPTER)
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: None)
    ex = CHAPTER.exercises[1]
    assert run_check(ex, ns).passed


def test_checks_never_import_solutions():
    for name in ("checks/ch10.py", "mutants/ch10.py"):
        assert "solutions" not in (ROOT / "autograder" / name).read_text().replace("``solutions/``", "")


# ---------------------------------------------------------------------------------------------
# The numbers the chapter quotes


def test_numbers_the_chapter_quotes():
    """The formulas behind the prose, and every number the prose quotes is glued by a code cell."""
    ns = namespace(CHAPTER)
    ring = lambda n, p: 2 * (p - 1) * n / p  # noqa: E731  (eq-ring-bytes)
    assert 2 * 6 * 16 * 4 == 768 and ring(768, 2) == 768 and ring(768, 4) == 1152
    assert ring(1, 2) == 1 and ring(1, 8) == 1.75
    e, b, s, peak, nvlink = 4096, 8, 2, 989e12, 450e9
    assert 2 * (e + 1) == 8194 and round(2 * (e + 1) / b) == 1024

    def time_ratio(L, p, beta):  # eq-tp-time-ratio from its two sides, eq-ring-bytes and eq-tp-flops
        return (ring(b * L * e * s, p) / beta) / ((8 * b * L * e**2 + 4 * b * L**2 * e) / p / peak)

    for L, p in ((2048, 8), (2048, 2), (32768, 8)):
        assert time_ratio(L, p, nvlink) == pytest.approx(2 * (p - 1) * s / (8 * e + 4 * L) * peak / nvlink)
    assert round(time_ratio(2048, 8, nvlink), 2) == 1.5 and round(time_ratio(2048, 8, 50e9), 1) == 13.5
    assert time_ratio(2048, 8, nvlink) / time_ratio(2048, 2, nvlink) == pytest.approx(7)  # grows as p - 1
    # The figure's shard: rank 0 of 2 holds rows 0-7, 16-23, 32-39 of a (48, 16) in_proj_weight.
    ids = {"in_proj_weight": torch.arange(48.0)[:, None].expand(48, 16).clone(), "out_proj.weight": torch.zeros(16, 16)}
    rows = ns["shard_heads"](ids, 0, 2, 4)["in_proj_weight"][:, 0].long().tolist()
    assert rows == [*range(0, 8), *range(16, 24), *range(32, 40)]
    cells = read(CHAPTER.notebook).cells
    quoted = {k for c in cells if c.cell_type == "markdown" for k in re.findall(r"\{glue:text\}`([A-Za-z0-9_]+)", c.source)}
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    glued = set(re.findall(r'glue\("([A-Za-z0-9_]+)"', code))
    for pattern in re.findall(r'glue\(f"([A-Za-z0-9_{}]+)"', code):  # f-string keys: match their fixed parts
        glued |= {k for k in quoted if re.fullmatch(re.sub(r"\{[^}]*\}", "[A-Za-z0-9]+", pattern), k)}
    assert quoted and quoted <= glued, f"quoted but never glued: {sorted(quoted - glued)}"
    assert "barely" not in "".join(c.source for c in cells if c.cell_type == "markdown")


def _sum_of_ranks(rank, world_size):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return rank, t.item()


def _fails_on_rank_one(rank, world_size):
    if rank == 1:
        raise KeyError("no such head")
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def test_run_on_ranks_returns_results_and_names_a_failing_rank():
    """The helper the chapter's demos use: results in rank order; a failure names the rank, the others are killed."""
    assert checks.run_on_ranks(4, _sum_of_ranks) == [(r, 10.0) for r in range(4)]
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1: KeyError"):
        checks.run_on_ranks(2, _fails_on_rank_one)
    assert time.monotonic() - start < 5
