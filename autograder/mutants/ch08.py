"""Mutants of chapter 8: wrong tiled_attention (online softmax in PyTorch) and flash_attention (Triton).

Each mutant is a template (the correct implementations of :mod:`autograder.provided.ch08`, written
independently of ``solutions/``, which chapter 9 imports) with one realistic mistake edited in;
``tests/test_ch08.py`` proves that every template passes every check, so each mutant fails for its own
mistake only.
"""

import inspect

from autograder.mutants import Mutant
from autograder.provided import ch08 as provided

TILED_TEMPLATE = inspect.getsource(provided.tiled_attention)
FLASH_TEMPLATE = inspect.getsource(provided.flash_attention)

TEMPLATES = {"tiled_attention": TILED_TEMPLATE, "flash_attention": FLASH_TEMPLATE}


def _edit(template: str, old: str, new: str, count: int = 1) -> str:
    """``template`` with ``old`` replaced by ``new``; fails loudly if ``old`` does not occur ``count`` times."""
    if template.count(old) != count:
        raise ValueError(f"mutant edit {old!r} occurs {template.count(old)} times, expected {count}")
    return template.replace(old, new)


def _edits(template: str, *pairs: tuple[str, str]) -> str:
    """``template`` with each ``(old, new)`` of ``pairs`` applied in turn by :func:`_edit`."""
    for old, new in pairs:
        template = _edit(template, old, new)
    return template


T, FL = TILED_TEMPLATE, FLASH_TEMPLATE
_TOP_LEFT_LOOP = (  # the causal loop over key tiles bounded top-left: min(S, (tile + 1) * BM), without S - L
    "hi_n = tl.minimum(S, (pid_m + 1) * BM + S - L)",
    "hi_n = tl.minimum(S, (pid_m + 1) * BM)",
)

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
    Mutant(
        "tiled_attention",
        "drops_last_partial_block",
        "dropped the last partial key block",
        _edit(T, "for j0 in range(0, S, block_size):", "for j0 in range(0, S - block_size + 1, block_size):"),
    ),
    Mutant(
        "tiled_attention",
        "off_by_one_causal_mask",
        "causal mask is off by one",
        _edit(T, "cols > rows + (S - L)", "cols >= rows + (S - L)"),
    ),
    Mutant(
        "tiled_attention",
        "logsumexp_in_base_2",
        "logsumexp in base 2",
        _edits(
            T,
            ("s = q @ kb.transpose(-1, -2) / math.sqrt(d)", "s = q @ kb.transpose(-1, -2) * (math.log2(math.e) / math.sqrt(d))"),
            ("p = torch.exp(s - m_ok[..., None])", "p = torch.exp2(s - m_ok[..., None])"),
            ("corr = torch.exp(m - m_ok)", "corr = torch.exp2(m - m_ok)"),
            ("lse = m + torch.log(l)", "lse = m + torch.log2(l)"),
        ),
    ),
    Mutant(
        "tiled_attention",
        "nan_for_a_query_that_sees_no_key",
        "not 0/0 = NaN",
        _edit(T, "out = acc / l.clamp_min(1e-300 if ft == torch.float64 else 1e-30)[..., None]", "out = acc / l[..., None]"),
    ),
    Mutant(
        "tiled_attention",
        "averages_per_block_softmax_outputs",
        "normalised each key block separately",
        _edits(
            T,
            ("acc = acc * corr[..., None] + p @ vb", "acc = acc + torch.softmax(s, dim=-1) @ vb  # this block's own softmax"),
            (
                "out = acc / l.clamp_min(1e-300 if ft == torch.float64 else 1e-30)[..., None]",
                "out = acc / len(range(0, S, block_size))  # the average over the blocks",
            ),
        ),
    ),
    Mutant(
        "tiled_attention",
        "inverted_rescale_factor",
        "rescale factor is inverted",
        _edit(T, "corr = torch.exp(m - m_ok)", "corr = torch.exp(m_ok - m) if j0 > 0 else torch.ones_like(m)"),
    ),
    Mutant(
        "tiled_attention",
        "logsumexp_from_the_unscaled_max",
        "logsumexp from the unscaled max",
        _edits(
            T,
            ("s = q @ kb.transpose(-1, -2) / math.sqrt(d)", "s = q @ kb.transpose(-1, -2)"),
            ("p = torch.exp(s - m_ok[..., None])", "p = torch.exp((s - m_ok[..., None]) / math.sqrt(d))"),
            ("corr = torch.exp(m - m_ok)", "corr = torch.exp((m - m_ok) / math.sqrt(d))"),
        ),
    ),
    Mutant(
        "tiled_attention",
        "ignores_block_size",
        "did you ignore block_size?",
        _edits(
            T,
            ("for j0 in range(0, S, block_size):", "for j0 in range(0, S, 64):  # tiles of 64 keys"),
            (
                "k[..., j0 : j0 + block_size, :], v[..., j0 : j0 + block_size, :]",
                "k[..., j0 : j0 + 64, :], v[..., j0 : j0 + 64, :]",
            ),
        ),
    ),
    Mutant(
        "tiled_attention",
        "running_max_starts_at_zero",
        "the running max must be each query row's own max",
        _edit(
            T,
            "m = torch.full(q.shape[:-1], -math.inf, dtype=ft, device=q.device)",
            "m = torch.zeros(q.shape[:-1], dtype=ft, device=q.device)",
        ),
    ),
    Mutant(
        "tiled_attention",
        "causal_mask_with_positions_inside_the_block",
        "key positions inside the tile",
        _edit(
            T,
            "cols = torch.arange(j0, j0 + kb.shape[-2], device=q.device).view(1, -1)",
            "cols = torch.arange(kb.shape[-2], device=q.device).view(1, -1)",
        ),
    ),
    # ----------------------------------------------------------------- flash_attention
    Mutant(
        "flash_attention",
        "forgets_to_rescale_accumulator",
        "forgot to rescale the accumulator",
        _edit(FL, "acc = acc * corr[:, None] + tl.dot", "acc = acc + tl.dot", count=2),
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
        _edits(  # the mask and both loop bounds, all top-left
            FL,
            ("cols[None, :] <= rows[:, None] + (S - L)", "cols[None, :] <= rows[:, None]"),
            ("hi_n = tl.minimum(S, (pid_m + 1) * BM + S - L)", "hi_n = tl.minimum(S, (pid_m + 1) * BM)"),
            ("tl.maximum(pid_m * BM + S - L + 1, 0)", "tl.maximum(pid_m * BM + 1, 0)"),
        ),
    ),
    Mutant(
        "flash_attention",
        "no_mask_past_the_last_key",
        "did not mask the keys past the end of the sequence",
        _edit(FL, 's = tl.where(ok, s, float("-inf"))', 's = tl.where(ok | (cols[None, :] >= S), s, float("-inf"))'),
    ),
    Mutant(
        "flash_attention",
        "scale_by_the_padded_head_dim",
        "1/sqrt of the padded head dimension",
        _edit(FL, "H, L, S, D, 1.0 / math.sqrt(D)", "H, L, S, D, 1.0 / math.sqrt(DP)"),
    ),
    Mutant(
        "flash_attention",
        "exp2_without_log2e",
        "used exp2 without folding log2(e) into the scale",
        _edits(
            FL,
            ("p = tl.exp(s - m_use[:, None])", "p = tl.math.exp2(s - m_use[:, None])"),
            ("corr = tl.exp(m - m_use)", "corr = tl.math.exp2(m - m_use)"),
        ),
    ),
    Mutant(
        "flash_attention",
        "log2e_scale_with_exp",
        "folded log2(e) into the scale but then used exp",
        _edit(FL, "H, L, S, D, 1.0 / math.sqrt(D)", "H, L, S, D, math.log2(math.e) / math.sqrt(D)"),
    ),
    Mutant(
        "flash_attention",
        "no_store_mask",
        "wrote outside the output tensor",
        _edit(
            FL,
            "tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(rows[:, None] < L) & (dims[None, :] < D))",
            "tl.store(o_ptrs, acc.to(O.dtype.element_ty))",
        ),
    ),
    Mutant(
        "flash_attention",
        "no_final_division",
        "never divided the accumulator by the running sum",
        _edit(FL, "            acc = acc / tl.where(l > 0, l, 1.0)[:, None]\n", ""),
    ),
    Mutant(
        "flash_attention",
        "k_and_v_with_q_strides",
        "loaded k and v with q's strides",
        _edits(
            FL,
            ("t.shape[-2], D).contiguous() for t in", "t.shape[-2], D) for t in"),
            ("k.stride(0), k.stride(1), k.stride(2)", "q.stride(0), q.stride(1), q.stride(2)"),
        ),
    ),
    Mutant(
        "flash_attention",
        "causal_loop_bound_top_left",
        "skipped key tiles that hold visible keys",
        _edit(FL, *_TOP_LEFT_LOOP),
    ),
    Mutant(
        "flash_attention",
        "grid_ignores_heads",
        "never wrote some entries of the output",
        _edit(FL, "grid = (triton.cdiv(L, BM), B * H)", "grid = (triton.cdiv(L, BM), B)"),
    ),
    Mutant(
        "flash_attention",
        "running_max_starts_at_zero",
        "the running max must be each query row's own max",
        _edit(FL, 'm = tl.zeros([BM], dtype=tl.float32) - float("inf")', "m = tl.zeros([BM], dtype=tl.float32)"),
    ),
    Mutant(
        "flash_attention",
        "values_loaded_from_k",
        "loaded the values from k",
        _edit(FL, "vv = tl.load(V + bi * kb", "vv = tl.load(K + bi * kb"),
    ),
    Mutant(
        "flash_attention",
        "calls_pytorch_sdpa",
        "not call PyTorch's SDPA",
        """
def flash_attention(q, k, v, causal=False, return_lse=False):
    # Right numbers, wrong exercise: PyTorch does the work, no Triton kernel runs.
    L, S = q.shape[-2], k.shape[-2]
    mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L) if causal else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if not return_lse:
        return out
    scores = (q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, -math.inf) if causal else (
        q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]))
    return out, torch.logsumexp(scores, dim=-1)
""",
    ),
]

# The logsumexp (return_lse=True): its output is right, its lse is not.
_LSE_LINE = 'lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))'
MUTANTS += [
    Mutant(
        "flash_attention",
        "lse_in_log2_units",
        "logsumexp in base 2",
        _edits(
            FL,
            ("H, L, S, D, 1.0 / math.sqrt(D)", "H, L, S, D, math.log2(math.e) / math.sqrt(D)"),
            ("p = tl.exp(s - m_use[:, None])", "p = tl.math.exp2(s - m_use[:, None])"),
            ("corr = tl.exp(m - m_use)", "corr = tl.math.exp2(m - m_use)"),
            (_LSE_LINE, _LSE_LINE.replace("m + tl.log(", "m + tl.log2(")),
        ),
    ),
    Mutant(
        "flash_attention",
        "lse_without_the_max",
        "logsumexp without the max",
        _edit(FL, _LSE_LINE, _LSE_LINE.replace("m + tl.log(", "tl.log(")),
    ),
    Mutant(
        "flash_attention",
        "lse_of_the_last_tile_only",
        "only the last key tile's sum",
        _edits(
            FL,
            ("l = l * corr + tl.sum(p, axis=1)", "l_tile = tl.sum(p, axis=1)\n                    l = l * corr + l_tile"),
            ("            hi_n = S  #", "            l_tile = tl.zeros([BM], dtype=tl.float32)\n            hi_n = S  #"),
            (_LSE_LINE, _LSE_LINE.replace("l > 0", "l_tile > 0").replace("0, l, 1.0", "0, l_tile, 1.0")),
        ),
    ),
    Mutant(
        "flash_attention",
        "lse_in_the_dtype_of_q",
        "should be float32",
        _edit(FL, "lse = torch.empty((B, H, L), dtype=torch.float32", "lse = torch.empty((B, H, L), dtype=q.dtype"),
    ),
    Mutant(
        "flash_attention",
        "lse_zero_where_no_key_is_seen",
        "must get a logsumexp of -inf",
        _edit(FL, _LSE_LINE, "lse = tl.where(l > 0, m, 0.0) + tl.log(tl.where(l > 0, l, 1.0))"),
    ),
    Mutant(
        "flash_attention",
        "lse_from_a_second_pass_without_the_causal_mask",
        "ignores the causal mask",
        _edit(
            FL,
            "            " + _LSE_LINE + "\n",
            '            m2 = tl.zeros([BM], dtype=tl.float32) - float("inf")\n'
            "            l2 = tl.zeros([BM], dtype=tl.float32)\n"
            "            for n2 in range(0, S, BN):  # a second pass over the keys, for the logsumexp\n"
            "                cols2 = n2 + tl.arange(0, BN)\n"
            "                k2 = tl.load(K + bi * kb + hi * kh + cols2[None, :] * ks + dims[:, None],\n"
            "                             mask=(cols2[None, :] < S) & (dims[:, None] < D), other=0.0)\n"
            '                s2 = tl.dot(q, k2, input_precision="ieee") * scale\n'
            '                s2 = tl.where(cols2[None, :] < S, s2, float("-inf"))\n'
            "                m2_new = tl.maximum(m2, tl.max(s2, axis=1))\n"
            "                l2 = l2 * tl.exp(m2 - m2_new) + tl.sum(tl.exp(s2 - m2_new[:, None]), axis=1)\n"
            "                m2 = m2_new\n"
            "            lse = m2 + tl.log(l2)\n",
        ),
    ),
]

# The split loop: an unmasked loop over the key tiles every row sees whole, then a masked diagonal/tail step.
MUTANTS += [
    Mutant(
        "flash_attention",
        "masked_step_skipped",
        "skipped the masked step",
        _edit(FL, "for phase in tl.static_range(2):", "for phase in tl.static_range(1):"),
    ),
    Mutant(
        "flash_attention",
        "diagonal_step_skipped",
        "skipped the diagonal key tiles",
        _edit(FL, "lo = 0 if phase == 0 else full_end", "lo = 0 if phase == 0 else S // BN * BN  # the tail"),
    ),
    Mutant(
        "flash_attention",
        "tail_step_skipped",
        "skipped the last, partial key tile",
        _edit(FL, "            hi_n = S  #", "            hi_n = S // BN * BN  #"),
    ),
    Mutant(
        "flash_attention",
        "unmasked_loop_bounded_by_the_last_row",
        "the unmasked loop ran over key tiles that need the causal mask",
        _edit(FL, "tl.maximum(pid_m * BM + S - L + 1, 0)", "tl.maximum((pid_m + 1) * BM + S - L, 0)"),
    ),
]

# Kernels with GPU-sized tiles (128 query rows): on inputs of at most 48 queries they have one query tile, so the
# mistakes below passed every check until the hidden checks added L > 256.
_BIG = _edit(FL, "BM, BN, warps, stages = 16, 16, 4, 1", "BM, BN, warps, stages = 128, 64, 4, 1")
TEMPLATES_BIG_TILES = {"flash_attention": _BIG}
MUTANTS += [
    Mutant(
        "flash_attention",
        "same_query_tile_in_every_program",
        "every program loaded the same tile of queries",
        _edit(
            _BIG,
            "            q = tl.load(Q + bi * sb + hi * sh + rows[:, None] * sl + dims[None, :],\n"
            "                        mask=(rows[:, None] < L)",
            "            first = tl.arange(0, BM)  # the query rows to load\n"
            "            q = tl.load(Q + bi * sb + hi * sh + first[:, None] * sl + dims[None, :],\n"
            "                        mask=(first[:, None] < L)",
        ),
    ),
    Mutant(
        "flash_attention",
        "rows_ignore_program_id",
        "never wrote some entries of the output",
        _edit(_BIG, "rows = pid_m * BM + tl.arange(0, BM)", "rows = tl.arange(0, BM)"),
    ),
    Mutant(
        "flash_attention",
        "causal_loop_bound_top_left_big_tiles",
        "skipped key tiles that hold visible keys",
        _edit(_BIG, *_TOP_LEFT_LOOP),
    ),
    Mutant(
        "flash_attention",
        "grid_counts_larger_tiles_than_the_kernel",
        "never wrote some entries of the output",
        _edit(_BIG, "IS_CAUSAL=causal, BM=BM,", "IS_CAUSAL=causal, BM=64,"),
    ),
]

# The logsumexp stored per head only: right wherever the batch is 1 (3-D inputs become one batch of heads).
MUTANTS += [
    Mutant(
        "flash_attention",
        "lse_indexed_by_head_only",
        "never wrote some entries",
        _edit(FL, "tl.store(LSE + pid_bh * L + rows", "tl.store(LSE + hi * L + rows"),
    ),
]
