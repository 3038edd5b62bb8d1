"""Chapter 6 beyond the generic tests: the solutions against PyTorch itself, the checks' oracles
against PyTorch, the mutant templates, and the numbers the chapter quotes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import namespace

from autograder.checks import ch06 as checks
from autograder.checks import torch_refs
from autograder.checks.runner import run_check
from autograder.course import ROOT, find_chapter
from solutions.ch06_kv_cache_and_gqa import GroupedQueryAttention, KVCache, decode_step, kv_cache_bytes

CHAPTER = find_chapter("06")


def _causal_mha(embed_dim: int, num_heads: int, bias: bool = True, dtype=torch.float32) -> nn.MultiheadAttention:
    torch.manual_seed(embed_dim * 100 + num_heads)
    mha = nn.MultiheadAttention(embed_dim, num_heads, bias=bias, batch_first=True).to(dtype).eval()
    if bias:  # PyTorch initialises the biases to zero: make them count
        with torch.no_grad():
            mha.in_proj_bias.normal_(0, 0.5)
            mha.out_proj.bias.normal_(0, 0.5)
    return mha


def _full_causal(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[1]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)  # True = not allowed
    with torch.no_grad():
        return mha(x, x, x, attn_mask=future, need_weights=False)[0]


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_decode_64_steps_equals_full_causal_attention(dtype, atol):
    """Every one of 64 decoding steps equals full causal attention over the prefix (nn.MultiheadAttention)."""
    mha = _causal_mha(32, 4, dtype=dtype)
    x = torch.randn(3, 64, 32, dtype=dtype)
    cache = KVCache()
    with torch.no_grad():
        for t in range(64):
            out = decode_step(mha, x[:, t : t + 1], cache)
            assert out.shape == (3, 1, 32) and out.dtype == dtype
            assert len(cache) == t + 1
            want = _full_causal(mha, x[:, : t + 1])[:, -1:]
            torch.testing.assert_close(out, want, atol=atol, rtol=0)


def test_decode_after_a_prompt_and_without_bias():
    mha = _causal_mha(24, 3, bias=False)
    x = torch.randn(2, 20, 24)
    full = _full_causal(mha, x)
    cache = KVCache()
    with torch.no_grad():
        for t in range(20):
            torch.testing.assert_close(decode_step(mha, x[:, t : t + 1], cache), full[:, t : t + 1], atol=2e-5, rtol=0)


def test_decode_with_chapter_4_drop_in():
    """decode_step reads only parameters that chapter 4's MultiHeadAttention shares with PyTorch's."""
    ch04 = pytest.importorskip("solutions.ch04_multi_head_attention")
    ref = _causal_mha(16, 4)
    ours = ch04.MultiHeadAttention(16, 4).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 12, 16)
    full = _full_causal(ref, x)
    cache = KVCache()
    with torch.no_grad():
        for t in range(12):
            torch.testing.assert_close(decode_step(ours, x[:, t : t + 1], cache), full[:, t : t + 1], atol=2e-5, rtol=0)


def test_decode_oracle_equals_nn_multihead_attention():
    rng = np.random.default_rng(0)
    for e, h, bias in [(12, 3, True), (8, 8, False), (16, 1, True)]:
        p = torch_refs.mha_params(rng, e, bias)
        x = rng.normal(size=(2, 9, e))
        np.testing.assert_allclose(checks._causal_oracle(p, x, h), checks._torch_causal_reference(p, x, h, bias), atol=1e-12)


def _gqa_by_sdpa(module: nn.Module, x: torch.Tensor, is_causal: bool) -> torch.Tensor:
    b, n, e = x.shape
    h, kv = module.num_heads, module.num_kv_heads
    d = e // h
    q = module.q_proj(x).view(b, n, h, d).transpose(1, 2)
    k = module.k_proj(x).view(b, n, kv, d).transpose(1, 2)
    v = module.v_proj(x).view(b, n, kv, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    return module.out_proj(out.transpose(1, 2).reshape(b, n, e))


@pytest.mark.parametrize(("h", "kv"), [(8, 8), (8, 4), (8, 2), (8, 1), (6, 3), (6, 2)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa_equals_sdpa_with_enable_gqa(h, kv, is_causal):
    torch.manual_seed(h * 10 + kv)
    module = GroupedQueryAttention(4 * h, h, kv, bias=True).double()
    x = torch.randn(2, 7, 4 * h, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(x, is_causal=is_causal), _gqa_by_sdpa(module, x, is_causal), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("h", "kv"), [(4, 2), (6, 2), (6, 3), (4, 1), (4, 4)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa_oracle_equals_sdpa_with_enable_gqa(h, kv, is_causal):
    """The checks' NumPy oracle agrees with PyTorch's own grouped-query attention."""
    rng = np.random.default_rng(h + kv)
    e = 2 * h
    p = checks._gqa_params(rng, e, h, kv, True)
    module = GroupedQueryAttention(e, h, kv, bias=True).double()
    with torch.no_grad():
        for name, (w, b) in p.items():
            getattr(module, name).weight.copy_(torch.from_numpy(w))
            getattr(module, name).bias.copy_(torch.from_numpy(b))
    x = rng.normal(size=(2, 5, e))
    with torch.no_grad():
        by_torch = _gqa_by_sdpa(module, torch.from_numpy(x), is_causal).numpy()
    np.testing.assert_allclose(checks._gqa_oracle(p, x, h, kv, is_causal), by_torch, atol=1e-12)
    if 1 < kv < h:  # the `repeat` fingerprint really differs from the right answer
        assert np.abs(checks._gqa_oracle(p, x, h, kv, is_causal, "tiled") - by_torch).max() > 1e-3


@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa_with_all_heads_is_nn_multihead_attention(is_causal):
    """num_kv_heads == num_heads is multi-head attention: same outputs as nn.MultiheadAttention's weights."""
    ref = _causal_mha(16, 4)
    gqa = GroupedQueryAttention(16, 4, 4, bias=True).eval()
    w_q, w_k, w_v = ref.in_proj_weight.detach().chunk(3)
    b_q, b_k, b_v = ref.in_proj_bias.detach().chunk(3)
    with torch.no_grad():
        for layer, w, b in [(gqa.q_proj, w_q, b_q), (gqa.k_proj, w_k, b_k), (gqa.v_proj, w_v, b_v)]:
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        gqa.out_proj.load_state_dict(ref.out_proj.state_dict())
    x = torch.randn(2, 6, 16)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1) if is_causal else None
    with torch.no_grad():
        want = ref(x, x, x, attn_mask=mask, need_weights=False)[0]
        torch.testing.assert_close(gqa(x, is_causal=is_causal), want, atol=2e-5, rtol=0)


def test_gqa_rejects_uneven_groups():
    with pytest.raises(ValueError):
        GroupedQueryAttention(24, 6, 4)


def test_kv_cache_bytes_of_the_models_the_chapter_names():
    gib = 2**30
    # Llama 2 7B: 32 layers, 32 KV heads (multi-head attention), head_dim 128, 4096-token context, float16.
    assert kv_cache_bytes(1, 4096, 32, 32, 128, torch.float16) == 2 * gib
    # Llama 2 70B: 80 layers, 8 KV heads (GQA), head_dim 128.
    assert kv_cache_bytes(1, 4096, 80, 8, 128, torch.float16) == 1.25 * gib
    # Mistral 7B: 32 layers, 8 KV heads, head_dim 128; 8192-token context, 4096-token rolling buffer.
    assert kv_cache_bytes(1, 8192, 32, 8, 128, torch.float16) == gib
    assert kv_cache_bytes(1, 4096, 32, 8, 128, torch.bfloat16) == gib // 2
    assert kv_cache_bytes(1, 1, 1, 1, 1, torch.int8) == 2
    assert isinstance(kv_cache_bytes(4097, 10000019, 126, 16, 128, torch.float32), int)


def test_flops_per_token_ratio_is_the_context_length():
    """The claim of the chapter: without a cache a step costs exactly T times as much (attention layers)."""
    for e in (64, 4096):
        for t in (1, 17, 4096):
            no_cache = 8 * t * e * e + 4 * t * t * e
            with_cache = 8 * e * e + 4 * t * e
            assert no_cache == t * with_cache


def test_checks_never_import_solutions():
    for name in ("checks/ch06.py", "mutants/ch06.py"):
        text = (ROOT / "autograder" / name).read_text()
        assert "import solutions" not in text and "from solutions" not in text


def test_decode_check_survives_a_notebook_that_patches_torch(monkeypatch):
    """A cell that rewrites PyTorch's attention and comparison functions cannot fake a pass."""
    ns = namespace(CHAPTER)
    cheat = """
def decode_step(mha, x_t, cache):
    import torch, numpy
    zero = lambda *a, **k: (torch.zeros(1), None)
    torch.nn.MultiheadAttention.forward = zero
    torch.nn.functional.multi_head_attention_forward = zero
    torch.allclose = lambda *a, **k: True
    torch.equal = lambda *a, **k: True
    numpy.allclose = lambda *a, **k: True
    B, _, E = x_t.shape
    H = mha.num_heads
    cache.update(torch.zeros(B, H, 1, E // H, dtype=x_t.dtype), torch.zeros(B, H, 1, E // H, dtype=x_t.dtype))
    return torch.zeros_like(x_t)
"""
    for target, attr in [
        (torch.nn.MultiheadAttention, "forward"),
        (torch.nn.functional, "multi_head_attention_forward"),
        (torch, "allclose"),
        (torch, "equal"),
        (np, "allclose"),
    ]:
        monkeypatch.setattr(target, attr, getattr(target, attr))  # restored after the test
    exec(cheat, ns)
    ex = next(e for e in CHAPTER.exercises if e.name == "decode_step")
    for hidden in (False, True):
        outcome = run_check(ex, ns, hidden=hidden)
        assert not outcome.passed


def test_cache_is_exact_and_keeps_dtype():
    cache = KVCache()
    assert len(cache) == 0
    k = torch.randn(2, 3, 5, 4, dtype=torch.float16)
    v = torch.randn(2, 3, 5, 4, dtype=torch.float16)
    cache.update(k, v)
    k2, v2 = torch.randn(2, 3, 1, 4, dtype=torch.float16), torch.randn(2, 3, 1, 4, dtype=torch.float16)
    k_all, v_all = cache.update(k2, v2)
    assert len(cache) == 6 and k_all.dtype == torch.float16
    assert torch.equal(k_all, torch.cat([k, k2], dim=2)) and torch.equal(v_all, torch.cat([v, v2], dim=2))
    assert math.isclose(float(k_all[0, 0, -1, 0]), float(k2[0, 0, 0, 0]))


def test_gqa_that_repeats_heads_then_calls_sdpa_passes():
    """The watch on SDPA objects only to grouping left to SDPA: repeat_interleave first, then SDPA, is correct."""
    from autograder.mutants.ch06 import _GROUPING, GQA_TEMPLATE

    code = GQA_TEMPLATE.replace(
        _GROUPING,
        "        g = self.h // self.kv\n        k = k.repeat_interleave(g, dim=1)\n        v = v.repeat_interleave(g, dim=1)\n"
        "        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal).transpose(1, 2).reshape(B, L, E)\n",
    )
    assert code != GQA_TEMPLATE
    chapter = find_chapter("06")
    ex = next(e for e in chapter.exercises if e.name == "GroupedQueryAttention")
    for hidden in (False, True):
        outcome = run_check(ex, namespace(chapter, replace={"GroupedQueryAttention": code}), hidden=hidden)
        assert outcome.passed, outcome.message
