"""Mutants of chapter 8: wrong tiled_attention (online softmax in PyTorch) and flash_attention (Triton).

Each mutant is a template (a correct implementation written independently of ``solutions/``)
with one realistic mistake edited in; ``tests/test_ch08.py`` proves that every template passes
every check, so each mutant fails for its own mistake only.
"""

from autograder.mutants import Mutant

TILED_TEMPLATE = """
def tiled_attention(q, k, v, block_size=64, causal=False):
    out_dtype = q.dtype
    ft = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(ft), k.to(ft), v.to(ft)
    L, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    m = torch.full(q.shape[:-1], -math.inf, dtype=ft)
    l = torch.zeros(q.shape[:-1], dtype=ft)
    acc = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=ft)
    rows = torch.arange(L).view(L, 1)
    for j0 in range(0, S, block_size):
        kb, vb = k[..., j0:j0 + block_size, :], v[..., j0:j0 + block_size, :]
        s = q @ kb.transpose(-1, -2) / math.sqrt(d)
        if causal:
            cols = torch.arange(j0, j0 + kb.shape[-2]).view(1, -1)
            s = s.masked_fill(cols > rows + (S - L), -math.inf)
        m_new = torch.maximum(m, s.max(dim=-1).values)
        m_ok = m_new.masked_fill(torch.isinf(m_new), 0.0)
        p = torch.exp(s - m_ok[..., None])
        corr = torch.exp(m - m_ok)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + p @ vb
        m = m_new
    out = acc / l.clamp_min(1e-300 if ft == torch.float64 else 1e-30)[..., None]
    lse = m + torch.log(l)
    return out.to(out_dtype), lse
"""

FLASH_TEMPLATE = """
def flash_attention(q, k, v, causal=False):
    if not hasattr(flash_attention, "compiled"):

        @triton.jit
        def attn_fwd(Q, K, V, O, sb, sh, sl, kb, kh, ks, H, L, S, scale,
                     IS_CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DH: tl.constexpr):
            pid_m = tl.program_id(0)
            pid_bh = tl.program_id(1)
            bi = pid_bh // H
            hi = pid_bh % H
            rows = pid_m * BM + tl.arange(0, BM)
            dims = tl.arange(0, DH)
            q = tl.load(Q + bi * sb + hi * sh + rows[:, None] * sl + dims[None, :], mask=rows[:, None] < L, other=0.0)
            m = tl.zeros([BM], dtype=tl.float32) - float("inf")
            l = tl.zeros([BM], dtype=tl.float32)
            acc = tl.zeros([BM, DH], dtype=tl.float32)
            for n0 in range(0, S, BN):
                cols = n0 + tl.arange(0, BN)
                kt = tl.load(K + bi * kb + hi * kh + cols[None, :] * ks + dims[:, None], mask=cols[None, :] < S, other=0.0)
                vv = tl.load(V + bi * kb + hi * kh + cols[:, None] * ks + dims[None, :], mask=cols[:, None] < S, other=0.0)
                s = tl.dot(q, kt, input_precision="ieee") * scale
                ok = cols[None, :] < S
                if IS_CAUSAL:
                    ok = ok & (cols[None, :] <= rows[:, None] + (S - L))
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_use[:, None])
                corr = tl.exp(m - m_use)
                l = l * corr + tl.sum(p, axis=1)
                acc = acc * corr[:, None] + tl.dot(p, vv.to(tl.float32), input_precision="ieee")
                m = m_new
            acc = acc / tl.where(l > 0, l, 1.0)[:, None]
            tl.store(O + bi * sb + hi * sh + rows[:, None] * sl + dims[None, :], acc.to(O.dtype.element_ty),
                     mask=rows[:, None] < L)

        flash_attention.compiled = attn_fwd

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, L, D = q.shape
    S = k.shape[2]
    o = torch.empty_like(q)
    grid = (triton.cdiv(L, 16), B * H)
    flash_attention.compiled[grid](q, k, v, o, q.stride(0), q.stride(1), q.stride(2),
                                   k.stride(0), k.stride(1), k.stride(2), H, L, S, 1.0 / math.sqrt(D),
                                   IS_CAUSAL=causal, BM=16, BN=16, DH=D)
    return o
"""

TEMPLATES = {"tiled_attention": TILED_TEMPLATE, "flash_attention": FLASH_TEMPLATE}


def _edit(template: str, old: str, new: str, count: int = 1) -> str:
    """``template`` with ``old`` replaced by ``new``; fails loudly if ``old`` does not occur ``count`` times."""
    if template.count(old) != count:
        raise ValueError(f"mutant edit {old!r} occurs {template.count(old)} times, expected {count}")
    return template.replace(old, new)


T, FL = TILED_TEMPLATE, FLASH_TEMPLATE

MUTANTS = [
    # ----------------------------------------------------------------- tiled_attention
    Mutant(
        "tiled_attention",
        "forgets_to_rescale_accumulator",
        "forgot to rescale the accumulator",
        _edit(T, "acc = acc * corr[..., None] + p @ vb", "acc = acc + p @ vb"),
    ),
    Mutant(
        "tiled_attention",
        "forgets_to_rescale_running_sum",
        "forgot to rescale the running sum",
        _edit(T, "l = l * corr + p.sum(-1)", "l = l + p.sum(-1)"),
    ),
    Mutant(
        "tiled_attention",
        "scale_one_over_d",
        "1/d instead of 1/sqrt(d)",
        _edit(T, "/ math.sqrt(d)", "/ d"),
    ),
    Mutant(
        "tiled_attention",
        "top_left_causal_mask",
        "top-left causal mask",
        _edit(T, "cols > rows + (S - L)", "cols > rows"),
    ),
    Mutant(
        "tiled_attention",
        "logsumexp_without_max",
        "logsumexp without the max",
        _edit(T, "lse = m + torch.log(l)", "lse = torch.log(l)"),
    ),
    Mutant(
        "tiled_attention",
        "builds_the_full_score_matrix",
        "created a tensor as large as the whole (L, S) score matrix",
        """
def tiled_attention(q, k, v, block_size=64, causal=False):
    # Correct numbers, but the whole (L, S) score matrix exists at once: not tiled at all.
    dt = q.dtype
    ft = torch.float64 if dt == torch.float64 else torch.float32
    q, k, v = q.to(ft), k.to(ft), v.to(ft)
    L, S = q.shape[-2], k.shape[-2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).tril(S - L).logical_not(), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    w = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return (w @ v).to(dt), lse
""",
    ),
    # ----------------------------------------------------------------- flash_attention
    Mutant(
        "flash_attention",
        "forgets_to_rescale_accumulator",
        "forgot to rescale the accumulator",
        _edit(FL, "acc = acc * corr[:, None] + tl.dot", "acc = acc + tl.dot"),
    ),
    Mutant(
        "flash_attention",
        "forgets_to_rescale_running_sum",
        "forgot to rescale the running sum",
        _edit(FL, "l = l * corr + tl.sum(p, axis=1)", "l = l + tl.sum(p, axis=1)"),
    ),
    Mutant(
        "flash_attention",
        "scale_one_over_d",
        "1/d instead of 1/sqrt(d)",
        _edit(FL, "1.0 / math.sqrt(D)", "1.0 / D"),
    ),
    Mutant(
        "flash_attention",
        "top_left_causal_mask",
        "top-left causal mask",
        _edit(FL, "cols[None, :] <= rows[:, None] + (S - L)", "cols[None, :] <= rows[:, None]"),
    ),
    Mutant(
        "flash_attention",
        "no_mask_past_the_last_key",
        "did not mask the keys past the end of the sequence",
        _edit(FL, 's = tl.where(ok, s, float("-inf"))', 's = tl.where(ok | (cols[None, :] >= S), s, float("-inf"))'),
    ),
    Mutant(
        "flash_attention",
        "calls_pytorch_sdpa",
        "not call PyTorch's SDPA",
        """
def flash_attention(q, k, v, causal=False):
    # Right numbers, wrong exercise: PyTorch does the work, no Triton kernel runs.
    L, S = q.shape[-2], k.shape[-2]
    mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
""",
    ),
]
