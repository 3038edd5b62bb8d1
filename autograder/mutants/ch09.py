"""Mutants of chapter 9: wrong backward passes (PyTorch tiles and Triton), autograd Functions, and decoding.

Each mutant is a template (a correct implementation written independently of ``solutions/``) with one
realistic mistake edited in; ``tests/test_ch09.py`` proves that every template passes every check, so each
mutant fails for its own mistake only. The Triton template takes the other road the chapter describes: one
program per key block writes its dK and dV and adds its share of dQ with ``tl.atomic_add``.
"""

from autograder.mutants import Mutant, edit

TILED_TEMPLATE = """
def flash_attention_backward_tiled(q, k, v, out, lse, grad_out, causal=False, block_size=64):
    ft = torch.float64 if q.dtype == torch.float64 else torch.float32
    Q, K, V, O, dO = (t.to(ft) for t in (q, k, v, out, grad_out))
    L, S, d = Q.shape[-2], K.shape[-2], Q.shape[-1]
    sm = 1.0 / math.sqrt(d)
    Di = (dO * O).sum(-1)[..., None]
    m = lse.to(ft).masked_fill(torch.isinf(lse), 0.0)[..., None]
    rows = torch.arange(L).view(L, 1)
    dQ = torch.zeros_like(Q)
    dK = torch.zeros_like(K)
    dV = torch.zeros_like(V)
    for j0 in range(0, S, block_size):
        j1 = min(j0 + block_size, S)
        s = Q @ K[..., j0:j1, :].transpose(-1, -2) * sm
        if causal:
            cols = torch.arange(j0, j1).view(1, -1)
            s = s.masked_fill(cols > rows + (S - L), -math.inf)
        P = torch.exp(s - m)
        dV[..., j0:j1, :] = P.transpose(-1, -2) @ dO
        dP = dO @ V[..., j0:j1, :].transpose(-1, -2)
        dS = P * (dP - Di)
        dQ += dS @ K[..., j0:j1, :] * sm
        dK[..., j0:j1, :] = dS.transpose(-1, -2) @ Q * sm
    return dQ.to(q.dtype), dK.to(k.dtype), dV.to(v.dtype)
"""

FUNCTION_TEMPLATE = """
class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal=False):
        o, lse = tiled_attention(q, k, v, causal=causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.is_causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward_tiled(q, k, v, o, lse, do, causal=ctx.is_causal)
        return dq, dk, dv, None
"""

TRITON_TEMPLATE = """
def flash_attention_backward(q, k, v, out, lse, grad_out, causal=False):
    if not hasattr(flash_attention_backward, "compiled"):

        @triton.jit
        def row_dot(O, DO, DELTA, L, D, BM: tl.constexpr, DP: tl.constexpr):
            pid_m = tl.program_id(0)
            bh = tl.program_id(1)
            rows = pid_m * BM + tl.arange(0, BM)
            dims = tl.arange(0, DP)
            msk = (rows[:, None] < L) & (dims[None, :] < D)
            o = tl.load(O + bh * L * D + rows[:, None] * D + dims[None, :], mask=msk, other=0.0)
            do = tl.load(DO + bh * L * D + rows[:, None] * D + dims[None, :], mask=msk, other=0.0)
            tl.store(DELTA + bh * L + rows, tl.sum(o * do, axis=1), mask=rows < L)

        @triton.jit
        def bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, L, S, D, scale,
                IS_CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr):
            pid_n = tl.program_id(0)
            bh = tl.program_id(1)
            cols = pid_n * BN + tl.arange(0, BN)
            dims = tl.arange(0, DP)
            kv_msk = (cols[:, None] < S) & (dims[None, :] < D)
            kt = tl.load(K + bh * S * D + cols[:, None] * D + dims[None, :], mask=kv_msk, other=0.0)
            vt = tl.load(V + bh * S * D + cols[:, None] * D + dims[None, :], mask=kv_msk, other=0.0)
            dk = tl.zeros([BN, DP], dtype=tl.float32)
            dv = tl.zeros([BN, DP], dtype=tl.float32)
            for m0 in range(0, L, BM):
                rows = m0 + tl.arange(0, BM)
                q_msk = (rows[:, None] < L) & (dims[None, :] < D)
                qt = tl.load(Q + bh * L * D + rows[:, None] * D + dims[None, :], mask=q_msk, other=0.0)
                dot = tl.load(DO + bh * L * D + rows[:, None] * D + dims[None, :], mask=q_msk, other=0.0)
                m = tl.load(LSE + bh * L + rows, mask=rows < L, other=0.0)
                m = tl.where(m == float("-inf"), 0.0, m)
                di = tl.load(DELTA + bh * L + rows, mask=rows < L, other=0.0)
                s = tl.dot(qt, tl.trans(kt), input_precision="ieee") * scale
                ok = (rows[:, None] < L) & (cols[None, :] < S)
                if IS_CAUSAL:
                    ok = ok & (cols[None, :] <= rows[:, None] + (S - L))
                p = tl.where(ok, tl.exp(s - m[:, None]), 0.0)
                dv += tl.dot(tl.trans(p), dot, input_precision="ieee")
                dp = tl.dot(dot, tl.trans(vt), input_precision="ieee")
                ds = p * (dp - di[:, None])
                dk += tl.dot(tl.trans(ds), qt, input_precision="ieee")
                dq_part = tl.dot(ds, kt, input_precision="ieee") * scale
                tl.atomic_add(DQ + bh * L * D + rows[:, None] * D + dims[None, :], dq_part, mask=q_msk)
            tl.store(DK + bh * S * D + cols[:, None] * D + dims[None, :], dk * scale, mask=kv_msk)
            tl.store(DV + bh * S * D + cols[:, None] * D + dims[None, :], dv, mask=kv_msk)

        flash_attention_backward.compiled = (row_dot, bwd)

    row_dot, bwd = flash_attention_backward.compiled
    L, D, S = q.shape[-2], q.shape[-1], k.shape[-2]
    q3, o3, do3 = (t.reshape(-1, L, D).float().contiguous() for t in (q, out, grad_out))
    k3, v3 = (t.reshape(-1, S, D).float().contiguous() for t in (k, v))
    m3 = lse.reshape(-1, L).float().contiguous()
    BH = q3.shape[0]
    delta = torch.empty((BH, L), dtype=torch.float32, device=q.device)
    dq = torch.zeros_like(q3)
    dk = torch.empty_like(k3)
    dv = torch.empty_like(v3)
    BM, BN = 16, 16
    DP = max(16, triton.next_power_of_2(D))
    row_dot[(triton.cdiv(L, BM), BH)](o3, do3, delta, L, D, BM=BM, DP=DP)
    bwd[(triton.cdiv(S, BN), BH)](q3, k3, v3, do3, m3, delta, dq, dk, dv, L, S, D, 1.0 / math.sqrt(D),
                                  IS_CAUSAL=causal, BM=BM, BN=BN, DP=DP)
    return dq.reshape(q.shape).to(q.dtype), dk.reshape(k.shape).to(k.dtype), dv.reshape(v.shape).to(v.dtype)
"""

TRITON_FUNCTION_TEMPLATE = """
class TritonFlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal=False):
        o, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.is_causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        grads = flash_attention_backward(q, k, v, o, lse, do, causal=ctx.is_causal)
        return grads[0], grads[1], grads[2], None
"""

DECODE_TEMPLATE = """
def flash_decode(q, k, v, num_splits):
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    ft = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(ft).view(B, Hkv, H // Hkv, D)
    parts, lses = [], []
    for kc, vc in zip(torch.tensor_split(k, num_splits, dim=2), torch.tensor_split(v, num_splits, dim=2)):
        if kc.shape[2] == 0:
            continue
        s = torch.einsum("bgqd,bgsd->bgqs", qg, kc.to(ft)) / math.sqrt(D)
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        parts.append(torch.exp(s - lse) @ vc.to(ft))
        lses.append(lse)
    lses = torch.stack(lses)
    w = torch.softmax(lses, dim=0)
    out = (w * torch.stack(parts)).sum(0)
    return out.reshape(B, H, 1, D).to(q.dtype)
"""

TEMPLATES = {
    "flash_attention_backward_tiled": TILED_TEMPLATE,
    "FlashAttentionFunction": FUNCTION_TEMPLATE,
    "flash_attention_backward": TRITON_TEMPLATE,
    "TritonFlashAttentionFunction": TRITON_FUNCTION_TEMPLATE,
    "flash_decode": DECODE_TEMPLATE,
}

T, F, K, TF, DEC = TILED_TEMPLATE, FUNCTION_TEMPLATE, TRITON_TEMPLATE, TRITON_FUNCTION_TEMPLATE, DECODE_TEMPLATE
BT, FN, TK, TFN, FD = (
    "flash_attention_backward_tiled",
    "FlashAttentionFunction",
    "flash_attention_backward",
    "TritonFlashAttentionFunction",
    "flash_decode",
)


def _lse_on_ctx(template: str) -> str:
    """The Function ``template`` keeping the logsumexp as a ctx attribute instead of saving it."""
    return edit(
        template,
        ("ctx.save_for_backward(q, k, v, o, lse)", "ctx.save_for_backward(q, k, v, o)\n        ctx.lse = lse"),
        ("q, k, v, o, lse = ctx.saved_tensors", "q, k, v, o = ctx.saved_tensors\n        lse = ctx.lse"),
    )


MUTANTS = [
    # -- flash_attention_backward_tiled ------------------------------------------------------------
    Mutant(BT, "forgot_delta", "forgot D", edit(T, ("dS = P * (dP - Di)", "dS = P * dP"))),
    Mutant(
        BT,
        "delta_from_one_tile",
        "computed D from one tile",
        edit(T, ("dS = P * (dP - Di)", "dS = P * (dP - (P * dP).sum(-1, keepdim=True))")),
    ),
    Mutant(BT, "delta_without_out", "computed D as rowsum(dO)", edit(T, ("Di = (dO * O).sum(-1)", "Di = dO.sum(-1)"))),
    Mutant(
        BT, "dk_without_scale", "dK is missing the scale", edit(T, ("dS.transpose(-1, -2) @ Q * sm", "dS.transpose(-1, -2) @ Q"))
    ),
    Mutant(
        BT,
        "dq_without_scale",
        "dQ is missing the scale",
        edit(T, ("dQ += dS @ K[..., j0:j1, :] * sm", "dQ += dS @ K[..., j0:j1, :]")),
    ),
    Mutant(BT, "top_left_causal", "top-left causal bound", edit(T, ("cols > rows + (S - L)", "cols > rows"))),
    Mutant(BT, "off_by_one_causal", "off by one", edit(T, ("cols > rows + (S - L)", "cols >= rows + (S - L)"))),
    Mutant(BT, "ignores_causal", "ignored causal=True", edit(T, ("        if causal:\n", "        if False:\n"))),
    Mutant(BT, "p_without_lse", "recomputed P without the logsumexp", edit(T, ("P = torch.exp(s - m)", "P = torch.exp(s)"))),
    Mutant(
        BT,
        "p_softmax_per_tile",
        "recomputed P as a softmax of each tile",
        edit(T, ("P = torch.exp(s - m)", "P = torch.softmax(s, dim=-1).nan_to_num()")),
    ),
    Mutant(
        BT,
        "dq_overwritten",
        "dQ holds only one key block",
        edit(T, ("dQ += dS @ K[..., j0:j1, :] * sm", "dQ = dS @ K[..., j0:j1, :] * sm")),
    ),
    Mutant(
        BT,
        "dv_from_ds",
        "dV uses dS instead of P",
        edit(
            T,
            ("        dV[..., j0:j1, :] = P.transpose(-1, -2) @ dO\n", ""),
            (
                "        dS = P * (dP - Di)\n",
                "        dS = P * (dP - Di)\n        dV[..., j0:j1, :] = dS.transpose(-1, -2) @ dO\n",
            ),
        ),
    ),
    Mutant(
        BT,
        "dv_from_out",
        "used the output O where the recomputed weights P belong",
        edit(
            T,
            ("        dV[..., j0:j1, :] = P.transpose(-1, -2) @ dO\n", ""),
            ("    return dQ.to(q.dtype)", "    dV = O.transpose(-1, -2) @ dO\n    return dQ.to(q.dtype)"),
        ),
    ),
    Mutant(
        BT,
        "whole_score_matrix",
        "created a tensor as large as the whole",
        edit(
            T,
            (
                "    for j0 in range(0, S, block_size):\n",
                "    s_all = Q @ K.transpose(-1, -2) * sm\n    for j0 in range(0, S, block_size):\n",
            ),
            ("        s = Q @ K[..., j0:j1, :].transpose(-1, -2) * sm\n", "        s = s_all[..., j0:j1]\n"),
        ),
    ),
    Mutant(
        BT,
        "returns_dk_first",
        "wrong order",
        edit(T, ("return dQ.to(q.dtype), dK.to(k.dtype)", "return dK.to(q.dtype), dQ.to(k.dtype)")),
    ),
    # -- FlashAttentionFunction --------------------------------------------------------------------
    Mutant(
        FN,
        "saves_the_weights",
        "saved a tensor as large as the (L, S) weights",
        edit(
            F,
            (
                "        ctx.save_for_backward(q, k, v, o, lse)\n",
                "        mask = torch.arange(k.shape[-2]) <= torch.arange(q.shape[-2])[:, None] + (k.shape[-2] - q.shape[-2])\n"
                "        w = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(causal & ~mask, -math.inf), -1)\n"
                "        ctx.save_for_backward(q, k, v, o, lse, w)\n",
            ),
            ("        q, k, v, o, lse = ctx.saved_tensors", "        q, k, v, o, lse, w = ctx.saved_tensors"),
        ),
    ),  # fmt: skip
    Mutant(FN, "lse_as_ctx_attribute", "kept a tensor as an attribute of ctx", _lse_on_ctx(F)),
    Mutant(FN, "backward_not_causal", "ignored causal=True", edit(F, ("do, causal=ctx.is_causal)", "do)"))),
    Mutant(
        FN,
        "no_gradient_slot_for_causal",
        "incorrect number of gradients",
        edit(F, ("return dq, dk, dv, None", "return dq, dk, dv")),
    ),
    Mutant(FN, "gradients_swapped", "wrong order", edit(F, ("return dq, dk, dv, None", "return dk, dq, dv, None"))),
    # -- flash_attention_backward (Triton) ---------------------------------------------------------
    Mutant(
        TK,
        "dq_stored_not_added",
        "dQ holds only one key block",
        edit(
            K,
            (
                "tl.atomic_add(DQ + bh * L * D + rows[:, None] * D + dims[None, :], dq_part, mask=q_msk)",
                "tl.store(DQ + bh * L * D + rows[:, None] * D + dims[None, :], dq_part, mask=q_msk)",
            ),
        ),
    ),  # fmt: skip
    Mutant(TK, "forgot_delta", "forgot D", edit(K, ("ds = p * (dp - di[:, None])", "ds = p * dp"))),
    Mutant(
        TK,
        "delta_from_one_tile",
        "computed D from one tile",
        edit(K, ("ds = p * (dp - di[:, None])", "ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])")),
    ),
    Mutant(
        TK,
        "top_left_causal",
        "top-left causal bound",
        edit(K, ("cols[None, :] <= rows[:, None] + (S - L)", "cols[None, :] <= rows[:, None]")),
    ),
    Mutant(TK, "dk_without_scale", "dK is missing the scale", edit(K, ("dk * scale, mask=kv_msk", "dk, mask=kv_msk"))),
    Mutant(
        TK,
        "grid_misses_the_last_key_block",
        "entries the kernels never stored",
        edit(K, ("bwd[(triton.cdiv(S, BN), BH)]", "bwd[(S // BN, BH)]")),
    ),
    Mutant(
        TK,
        "unmasked_stores",
        "wrote outside the tensors",
        edit(K, ("dk * scale, mask=kv_msk)", "dk * scale)"), ("dv, mask=kv_msk)", "dv)")),
    ),
    Mutant(
        TK,
        "autograd_instead_of_kernels",
        "must compute in Triton kernels",
        """
def flash_attention_backward(q, k, v, out, lse, grad_out, causal=False):
    L, S = q.shape[-2], k.shape[-2]
    mask = torch.arange(S) <= torch.arange(L)[:, None] + (S - L) if causal else None
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return torch.autograd.grad(o, (q, k, v), grad_out)
""",
    ),
    # -- TritonFlashAttentionFunction --------------------------------------------------------------
    Mutant(
        TFN,
        "tiled_forward",
        "no Triton kernel ran in the forward",
        edit(
            TF,
            (
                "o, lse = flash_attention(q, k, v, causal=causal, return_lse=True)",
                "o, lse = tiled_attention(q, k, v, causal=causal)",
            ),
        ),
    ),
    Mutant(TFN, "backward_not_causal", "ignored causal=True", edit(TF, ("do, causal=ctx.is_causal)", "do)"))),
    Mutant(
        TFN,
        "no_gradient_slot_for_causal",
        "incorrect number of gradients",
        edit(TF, ("return grads[0], grads[1], grads[2], None", "return grads[0], grads[1], grads[2]")),
    ),
    Mutant(TFN, "lse_as_ctx_attribute", "kept a tensor as an attribute of ctx", _lse_on_ctx(TF)),
    # -- flash_decode -------------------------------------------------------------------------------
    Mutant(
        FD,
        "head_map_modulo",
        "h % H_kv",
        edit(
            DEC,
            ("qg = q.to(ft).view(B, Hkv, H // Hkv, D)", "qg = q.to(ft).view(B, H // Hkv, Hkv, D).transpose(1, 2)"),
            ("return out.reshape(B, H, 1, D)", "return out.transpose(1, 2).reshape(B, H, 1, D)"),
        ),
    ),  # fmt: skip
    Mutant(
        FD,
        "mean_of_splits",
        "averaged the splits' outputs",
        edit(DEC, ("out = (w * torch.stack(parts)).sum(0)", "out = torch.stack(parts).mean(0)")),
    ),
    Mutant(
        FD,
        "combine_without_max",
        "without subtracting the max",
        edit(DEC, ("w = torch.softmax(lses, dim=0)", "w = torch.exp(lses) / torch.exp(lses).sum(0)")),
    ),
    Mutant(
        FD,
        "splits_of_floor_size",
        "dropped the last keys",
        edit(
            DEC,
            (
                "zip(torch.tensor_split(k, num_splits, dim=2), torch.tensor_split(v, num_splits, dim=2))",
                "((k[:, :, i * (S // num_splits):(i + 1) * (S // num_splits)], v[:, :, i * (S // num_splits):(i + 1) * (S // num_splits)]) for i in range(num_splits))",
            ),
        ),
    ),  # fmt: skip
    Mutant(
        FD,
        "repeat_kv_per_head",
        "copied K or V for every query head",
        edit(
            DEC,
            (
                "qg = q.to(ft).view(B, Hkv, H // Hkv, D)",
                "qg = q.to(ft)\n    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)",
            ),
            ("return out.reshape(B, H, 1, D)", "return out.reshape(B, H, 1, D)"),
        ),
    ),
    Mutant(FD, "unscaled_scores", "did not scale the scores", edit(DEC, ("kc.to(ft)) / math.sqrt(D)", "kc.to(ft))"))),
    Mutant(
        FD,
        "one_split_whatever_num_splits",
        "ignored num_splits",
        edit(
            DEC,
            (
                "zip(torch.tensor_split(k, num_splits, dim=2), torch.tensor_split(v, num_splits, dim=2))",
                "zip(torch.tensor_split(k, 1, dim=2), torch.tensor_split(v, 1, dim=2))",
            ),
        ),
    ),
    Mutant(
        FD,
        "one_softmax_over_all_keys",
        "ignored num_splits",
        edit(
            DEC,
            (
                "    parts, lses = [], []\n",
                "    s = torch.einsum('bgqd,bgsd->bgqs', qg, k.to(ft)) / math.sqrt(D)\n"
                "    return (torch.softmax(s, dim=-1) @ v.to(ft)).reshape(B, H, 1, D).to(q.dtype)\n"
                "    parts, lses = [], []\n",
            ),
        ),
    ),
]

# Mistakes that passed every check until the checks below were added (a review with wrong implementations written
# independently of this catalogue): float16 accumulation, a block size of one's own, PyTorch's attention inside an
# autograd Function, kernels that index strided inputs as contiguous ones, float32 gradients or outputs for float16
# inputs, a Triton Function whose logsumexp comes from PyTorch, and multi-query decoding that broadcasts K across
# the heads (a copy per query head).
MUTANTS += [
    Mutant(
        BT,
        "computes_in_float16",
        "accumulated in float16",
        edit(T, ("ft = torch.float64 if q.dtype == torch.float64 else torch.float32", "ft = q.dtype")),
    ),
    Mutant(
        BT,
        "dq_accumulated_in_float16",
        "accumulated in float16",
        edit(T, ("dQ = torch.zeros_like(Q)", "dQ = torch.zeros_like(q)")),
    ),
    Mutant(
        BT,
        "block_size_hardcoded",
        "ignored block_size",
        edit(T, ("    for j0 in range(0, S, block_size):\n", "    block_size = 64\n    for j0 in range(0, S, block_size):\n")),
    ),
    Mutant(
        FN,
        "backward_by_sdpa_autograd",
        "called PyTorch's scaled_dot_product_attention",
        edit(
            F,
            (
                "        dq, dk, dv = flash_attention_backward_tiled(q, k, v, o, lse, do, causal=ctx.is_causal)\n",
                "        L, S = q.shape[-2], k.shape[-2]\n"
                "        q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))\n"
                "        with torch.enable_grad():\n"
                "            mask = torch.arange(S) <= torch.arange(L)[:, None] + (S - L) if ctx.is_causal else None\n"
                "            o2 = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask)\n"
                "            dq, dk, dv = (t.nan_to_num() for t in torch.autograd.grad(o2, (q2, k2, v2), do))\n",
            ),
        ),
    ),
    Mutant(
        FN,
        "backward_by_autograd_through_softmax",
        "created a tensor as large as the whole (L, S) score matrix",
        edit(
            F,
            (
                "        dq, dk, dv = flash_attention_backward_tiled(q, k, v, o, lse, do, causal=ctx.is_causal)\n",
                "        L, S = q.shape[-2], k.shape[-2]\n"
                "        q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))\n"
                "        with torch.enable_grad():\n"
                "            s = q2 @ k2.transpose(-1, -2) / math.sqrt(q.shape[-1])\n"
                "            if ctx.is_causal:\n"
                "                s = s.masked_fill(torch.arange(S) > torch.arange(L)[:, None] + (S - L), -math.inf)\n"
                "            o2 = torch.softmax(s, -1).nan_to_num() @ v2\n"
                "            dq, dk, dv = torch.autograd.grad(o2, (q2, k2, v2), do)\n",
            ),
        ),
    ),
    Mutant(
        TK,
        "grad_out_assumed_contiguous",
        "assumed contiguous inputs",
        edit(
            K,
            (
                "q3, o3, do3 = (t.reshape(-1, L, D).float().contiguous() for t in (q, out, grad_out))",
                "q3, o3 = (t.reshape(-1, L, D).float().contiguous() for t in (q, out))\n"
                "    do3 = grad_out.reshape(-1, L, D).float()",
            ),
        ),
    ),
    Mutant(
        TK,
        "inputs_assumed_contiguous",
        "assumed contiguous inputs",
        edit(
            K,
            (
                "t.reshape(-1, L, D).float().contiguous() for t in (q, out, grad_out)",
                "t.reshape(-1, L, D).float() for t in (q, out, grad_out)",
            ),
            ("t.reshape(-1, S, D).float().contiguous() for t in (k, v)", "t.reshape(-1, S, D).float() for t in (k, v)"),
        ),
    ),  # fmt: skip
    Mutant(
        TK,
        "float32_gradients_for_float16",
        "returned the gradients in another dtype",
        edit(
            K,
            (
                "return dq.reshape(q.shape).to(q.dtype), dk.reshape(k.shape).to(k.dtype), dv.reshape(v.shape).to(v.dtype)",
                "return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)",
            ),
        ),
    ),
    Mutant(
        TFN,
        "logsumexp_from_pytorch_scores",
        "computed attention with PyTorch maths",
        edit(
            TF,
            (
                "o, lse = flash_attention(q, k, v, causal=causal, return_lse=True)",
                "o = flash_attention(q, k, v, causal=causal)\n"
                "        L, S = q.shape[-2], k.shape[-2]\n"
                "        s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])\n"
                "        if causal:\n"
                "            s = s.masked_fill(torch.arange(S, device=q.device) > torch.arange(L, device=q.device)[:, None] + (S - L), -math.inf)\n"
                "        lse = torch.logsumexp(s, -1)",
            ),
        ),
    ),  # fmt: skip
    Mutant(
        TFN,
        "logsumexp_from_tiled_attention",
        "computed attention with PyTorch maths",
        edit(
            TF,
            (
                "o, lse = flash_attention(q, k, v, causal=causal, return_lse=True)",
                "o = flash_attention(q, k, v, causal=causal)\n        lse = tiled_attention(q, k, v, causal=causal)[1]",
            ),
        ),
    ),
    Mutant(
        TFN,
        "computes_in_float32",
        "returned out in another dtype",
        edit(
            TF,
            (
                "o, lse = flash_attention(q, k, v, causal=causal, return_lse=True)",
                "q, k, v = q.float(), k.float(), v.float()\n        o, lse = flash_attention(q, k, v, causal=causal, return_lse=True)",
            ),
        ),
    ),
    Mutant(
        FD,
        "multi_query_by_broadcasting",
        "copied K or V for every query head",
        edit(
            DEC, ("qg = q.to(ft).view(B, Hkv, H // Hkv, D)", "qg = q.to(ft).view(B, Hkv, H // Hkv, D) if Hkv > 1 else q.to(ft)")
        ),
    ),
]
