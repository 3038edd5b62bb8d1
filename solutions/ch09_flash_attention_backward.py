"""Chapter 9: training with FlashAttention (the backward pass, in PyTorch tiles and in Triton) and decoding with it."""

import math
import os

import torch

if not torch.cuda.is_available():  # no GPU: run Triton kernels in its interpreter (NumPy on the CPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (after TRITON_INTERPRET is set)
import triton.language as tl  # noqa: E402

from autograder.provided.ch08 import flash_attention, tiled_attention  # noqa: E402  (the course's chapter 8)


def flash_attention_backward_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    causal: bool = False,
    block_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of attention with respect to q, k and v, one block of keys at a time.

    q (..., L, D), k (..., S, D), v (..., S, Dv), out (..., L, Dv) the forward's output, lse (..., L) its
    natural-log logsumexp, grad_out (..., L, Dv) the gradient of the loss with respect to out. Scores are
    scaled by 1/sqrt(D); ``causal`` is bottom-right aligned (query i sees key j iff j <= i + S - L).
    The weights P are recomputed tile by tile from q, k and lse, and delta_i = rowsum(dO * O) replaces
    rowsum(P * dP), so no (L, S) matrix is ever held: only (..., L, block_size) tiles.
    Returns (dq, dk, dv) in the dtypes of q, k and v.
    """
    ### BEGIN SOLUTION
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qw, kw, vw = q.to(work), k.to(work), v.to(work)
    dout = grad_out.to(work)
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    delta = (dout * out.to(work)).sum(dim=-1, keepdim=True)  # delta_i = rowsum(dO * O), (..., L, 1)
    lse_w = lse.to(work)
    lse_safe = torch.where(torch.isneginf(lse_w), 0.0, lse_w).unsqueeze(-1)  # a query that sees no key: P = 0
    query_pos = torch.arange(L, device=q.device).unsqueeze(-1) + (S - L)  # (L, 1)
    dq = torch.zeros_like(qw)
    dk_blocks, dv_blocks = [], []
    for start in range(0, S, block_size):
        stop = min(start + block_size, S)
        k_blk, v_blk = kw[..., start:stop, :], vw[..., start:stop, :]
        scores = (qw @ k_blk.transpose(-2, -1)) * scale  # (..., L, block)
        if causal:
            scores = scores.masked_fill(torch.arange(start, stop, device=q.device) > query_pos, float("-inf"))
        p = torch.exp(scores - lse_safe)  # the forward's weights, recomputed exactly
        dv_blocks.append(p.transpose(-2, -1) @ dout)  # dV_j = P_j^T dO
        dp = dout @ v_blk.transpose(-2, -1)  # dP = dO V_j^T
        ds = p * (dp - delta)  # dZ = P * (dP - delta), the softmax's backward
        dq = dq + (ds @ k_blk) * scale  # every key block adds to all of dQ
        dk_blocks.append((ds.transpose(-2, -1) @ qw) * scale)  # dK_j = dZ_j^T Q / sqrt(D)
    dk = torch.cat(dk_blocks, dim=-2) if dk_blocks else torch.zeros_like(kw)
    dv = torch.cat(dv_blocks, dim=-2) if dv_blocks else torch.zeros_like(vw)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    ### END SOLUTION


class FlashAttentionFunction(torch.autograd.Function):
    """Attention as an autograd Function: chapter 8's ``tiled_attention`` forward, the tiled backward above.

    ``FlashAttentionFunction.apply(q, k, v, causal=False) -> out``, inputs (..., L, D), 3-D and 4-D alike.
    The forward saves q, k, v, out and one (..., L) tensor, the logsumexp, and nothing else.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal=False):
        """(out (..., L, D)); saves what the backward needs: q, k, v, out and the logsumexp."""
        ### BEGIN SOLUTION
        out, lse = tiled_attention(q, k, v, causal=causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_out):
        """(dq, dk, dv, None): one gradient per input of forward, None for the flag ``causal``."""
        ### BEGIN SOLUTION
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward_tiled(q, k, v, out, lse, grad_out, causal=ctx.causal)
        return dq, dk, dv, None
        ### END SOLUTION


def flash_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention's backward pass as Triton kernels, on (..., L, D) inputs (leading dimensions flattened).

    q, out, grad_out (..., L, D); k, v (..., S, D); lse (..., L) float32, natural log (chapter 8's
    ``flash_attention(..., return_lse=True)``). A small kernel may first compute
    delta_i = rowsum(dO * O) (recommended, optional). Then either one program per block of keys accumulates
    its dK and dV and one program per block of queries its dQ (one writer per block, deterministic), or
    one program per block of keys also adds its share of dQ with atomics (into a zeroed float32 buffer):
    your choice, explained in a comment. Inputs may be non-contiguous views and float16. The kernels are
    compiled on the first call and kept as ``flash_attention_backward.kernels``. Returns (dq, dk, dv) in
    the dtypes of q, k and v.
    """
    ### BEGIN SOLUTION
    # Our choice: three launches, a preprocessing kernel for delta_i = rowsum(dO * O), then one program per
    # key block for dK and dV and one per query block for dQ. Every block of dQ, dK and dV has exactly one
    # writer, so no atomics are needed and the result is deterministic, at the price of computing Q K^T
    # (and dO V^T) twice: seven products per tile instead of five.
    kernels = getattr(flash_attention_backward, "kernels", None)
    if kernels is None:

        @triton.jit
        def preprocess(Out, DO, Delta, L, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
            tile, bh = tl.program_id(0), tl.program_id(1)
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            dims = tl.arange(0, BLOCK_D)
            mask = (rows[:, None] < L) & (dims[None, :] < D)
            offs = bh * L * D + rows[:, None] * D + dims[None, :]
            o = tl.load(Out + offs, mask=mask, other=0.0).to(tl.float32)
            do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(Delta + bh * L + rows, tl.sum(o * do, 1), mask=rows < L)

        @triton.jit
        def dkdv_kernel(
            Q, K, V, DO, LSE, Delta, DK, DV, L, S, scale,
            D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
        ):  # fmt: skip
            tile, bh = tl.program_id(0), tl.program_id(1)  # one block of keys of one (batch, head)
            cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            dims = tl.arange(0, BLOCK_D)
            kv_mask = (cols[:, None] < S) & (dims[None, :] < D)
            kv_offs = bh * S * D + cols[:, None] * D + dims[None, :]
            k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            lo = 0
            if CAUSAL:  # query i sees key j iff i >= j - (S - L): earlier query blocks see none of these keys
                lo = tl.maximum(tile * BLOCK_N - (S - L), 0) // BLOCK_M * BLOCK_M
            for start_m in range(lo, L, BLOCK_M):
                rows = start_m + tl.arange(0, BLOCK_M)
                q_mask = (rows[:, None] < L) & (dims[None, :] < D)
                q_offs = bh * L * D + rows[:, None] * D + dims[None, :]
                q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
                do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
                lse = tl.load(LSE + bh * L + rows, mask=rows < L, other=0.0)
                lse = tl.where(lse == float("-inf"), 0.0, lse)  # a query that sees no key: its P row is 0
                delta = tl.load(Delta + bh * L + rows, mask=rows < L, other=0.0)
                if FP32_DOT:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                else:
                    s = tl.dot(q, tl.trans(k)) * scale
                visible = (rows[:, None] < L) & (cols[None, :] < S)
                if CAUSAL:
                    visible = visible & (cols[None, :] <= rows[:, None] + (S - L))
                p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N), recomputed
                if FP32_DOT:
                    dv += tl.dot(tl.trans(p), do, input_precision="ieee")
                    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                else:
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                    dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                if FP32_DOT:
                    dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
                else:
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            tl.store(DK + kv_offs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
            tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)

        @triton.jit
        def dq_kernel(
            Q, K, V, DO, LSE, Delta, DQ, L, S, scale,
            D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
        ):  # fmt: skip
            tile, bh = tl.program_id(0), tl.program_id(1)  # one block of queries of one (batch, head)
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            dims = tl.arange(0, BLOCK_D)
            q_mask = (rows[:, None] < L) & (dims[None, :] < D)
            q_offs = bh * L * D + rows[:, None] * D + dims[None, :]
            q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
            do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
            lse = tl.load(LSE + bh * L + rows, mask=rows < L, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(Delta + bh * L + rows, mask=rows < L, other=0.0)
            dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            hi = S
            if CAUSAL:  # the last key this block's last query sees is (tile + 1) * BLOCK_M - 1 + S - L
                hi = tl.minimum(S, (tile + 1) * BLOCK_M + S - L)
            for start_n in range(0, hi, BLOCK_N):
                cols = start_n + tl.arange(0, BLOCK_N)
                kv_mask = (cols[:, None] < S) & (dims[None, :] < D)
                kv_offs = bh * S * D + cols[:, None] * D + dims[None, :]
                k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
                v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
                if FP32_DOT:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k)) * scale
                    dp = tl.dot(do, tl.trans(v))
                visible = (rows[:, None] < L) & (cols[None, :] < S)
                if CAUSAL:
                    visible = visible & (cols[None, :] <= rows[:, None] + (S - L))
                p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
                ds = p * (dp - delta[:, None])
                if FP32_DOT:
                    dq += tl.dot(ds, k, input_precision="ieee")
                else:
                    dq += tl.dot(ds.to(k.dtype), k)
            tl.store(DQ + q_offs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)

        kernels = flash_attention_backward.kernels = (preprocess, dkdv_kernel, dq_kernel)

    preprocess, dkdv_kernel, dq_kernel = kernels
    L, D, S = q.shape[-2], q.shape[-1], k.shape[-2]
    # (BH, L, D), contiguous: the kernels index rows as bh * L * D + row * D + column
    q3, o3, do3 = (t.reshape(-1, L, D).contiguous() for t in (q, out, grad_out.to(q.dtype)))
    k3, v3 = (t.reshape(-1, S, D).contiguous() for t in (k, v))
    lse3 = lse.reshape(-1, L).to(torch.float32).contiguous()
    BH = q3.shape[0]
    delta = torch.empty((BH, L), dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q3), torch.empty_like(k3), torch.empty_like(v3)
    if q.device.type == "cpu":  # the interpreter: small tiles, few of them
        block_m, block_n, warps, stages = 32, 32, 4, 1
    else:  # sized for Hopper; float32 tiles take twice the on-chip memory
        block_m, block_n = (64, 64) if q.element_size() == 2 else (32, 32)
        warps, stages = (4 if D <= 64 else 8), 2
    block_d = max(16, triton.next_power_of_2(D))
    fp32 = q.dtype == torch.float32
    preprocess[(triton.cdiv(L, block_m), BH)](o3, do3, delta, L, D=D, BLOCK_M=block_m, BLOCK_D=block_d)
    args = (q3, k3, v3, do3, lse3, delta)
    meta = dict(D=D, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, FP32_DOT=fp32)
    scale = 1.0 / math.sqrt(D)
    dkdv_kernel[(triton.cdiv(S, block_n), BH)](*args, dk, dv, L, S, scale, **meta, num_warps=warps, num_stages=stages)
    dq_kernel[(triton.cdiv(L, block_m), BH)](*args, dq, L, S, scale, **meta, num_warps=warps, num_stages=stages)
    return (
        dq.reshape(q.shape).to(q.dtype),
        dk.reshape(k.shape).to(k.dtype),
        dv.reshape(v.shape).to(v.dtype),
    )
    ### END SOLUTION


class TritonFlashAttentionFunction(torch.autograd.Function):
    """Attention as an autograd Function on Triton kernels: chapter 8's ``flash_attention(..., return_lse=True)``
    forward and ``flash_attention_backward``. ``TritonFlashAttentionFunction.apply(q, k, v, causal=False) -> out``.
    Saves q, k, v, out and the (..., L) logsumexp, and nothing else.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal=False):
        """(out (..., L, D)); saves q, k, v, out and the logsumexp."""
        ### BEGIN SOLUTION
        out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_out):
        """(dq, dk, dv, None)."""
        ### BEGIN SOLUTION
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(q, k, v, out, lse, grad_out, causal=ctx.causal)
        return dq, dk, dv, None
        ### END SOLUTION


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_splits: int) -> torch.Tensor:
    """One decoding step of attention, split over the keys (FlashDecoding).

    q (B, H, 1, D) the new token's queries; k, v (B, H_kv, S, D) the cached keys and values, H_kv dividing
    H: query head h reads key/value head h // (H / H_kv) (grouped-query attention, without copying K or
    V per query head). The S keys are cut into ``num_splits`` consecutive chunks, of ceil(S / num_splits)
    keys (the last shorter) or as equal as possible (torch.tensor_split): either is accepted; an empty
    chunk contributes nothing. Each chunk gives a partial output and its logsumexp, and the partial
    results are merged exactly. Returns (B, H, 1, D) in q's dtype.
    """
    ### BEGIN SOLUTION
    B, H, _, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    group = H // H_kv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(work).reshape(B, H_kv, group, D)  # heads h = g_kv * group + i share key/value head g_kv
    scale = 1.0 / math.sqrt(D)
    chunk = -(-S // num_splits)  # ceil(S / num_splits)
    outs, lses = [], []
    for split in range(num_splits):
        start, stop = split * chunk, min((split + 1) * chunk, S)
        if start >= stop:
            continue  # an empty split contributes nothing (its logsumexp would be -inf)
        k_s, v_s = k[:, :, start:stop].to(work), v[:, :, start:stop].to(work)  # (B, H_kv, n, D): no copy per head
        s = (qg @ k_s.transpose(-2, -1)) * scale  # (B, H_kv, group, n)
        m = s.amax(dim=-1, keepdim=True)
        p = torch.exp(s - m)
        total = p.sum(dim=-1, keepdim=True)
        outs.append((p @ v_s) / total)  # the split's own normalised output, (B, H_kv, group, D)
        lses.append(m + torch.log(total))  # and its logsumexp, (B, H_kv, group, 1)
    lse_all = torch.stack(lses)  # (splits, B, H_kv, group, 1)
    lse = lse_all.amax(dim=0) + torch.log(torch.exp(lse_all - lse_all.amax(dim=0)).sum(dim=0))  # stable
    out = (torch.exp(lse_all - lse) * torch.stack(outs)).sum(dim=0)  # each split weighted by its share
    return out.reshape(B, H, 1, D).to(q.dtype)
    ### END SOLUTION
