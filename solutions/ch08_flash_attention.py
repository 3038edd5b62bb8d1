"""Chapter 8: FlashAttention from scratch: online softmax in PyTorch, then a Triton forward kernel."""

import math
import os

import torch

if not torch.cuda.is_available():  # no GPU: run Triton kernels in its interpreter (NumPy on the CPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (after TRITON_INTERPRET is set)
import triton.language as tl  # noqa: E402


def tiled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = 64, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention computed one block of keys at a time, with an online softmax.

    q (..., L, D), k (..., S, D), v (..., S, Dv); leading dimensions equal. Scores are scaled by
    1/sqrt(D). With ``causal=True`` query i sees key j iff j <= i + (S - L) (bottom-right aligned,
    chapter 2's ``causal_mask``). Never creates an (L, S) matrix: only (..., L, block_size) tiles.
    Returns (out (..., L, Dv) in q's dtype, logsumexp (..., L)): logsumexp is the natural log of
    the sum of exp(scaled score) over the visible keys, in float32 (float64 for float64 inputs).
    A query that sees no key gets a zero output and a logsumexp of -inf.
    """
    ### BEGIN SOLUTION
    dtype = q.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32  # fp16/bf16 are computed in float32
    q, k, v = q.to(work), k.to(work), v.to(work)
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    row_max = torch.full(q.shape[:-1], float("-inf"), dtype=work, device=q.device)  # m_i, (..., L)
    row_sum = torch.zeros(q.shape[:-1], dtype=work, device=q.device)  # l_i, (..., L)
    acc = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=work, device=q.device)  # unnormalised output
    query_pos = torch.arange(L, device=q.device).unsqueeze(-1) + (S - L)  # (L, 1): position of query i
    for start in range(0, S, block_size):
        stop = min(start + block_size, S)
        scores = (q @ k[..., start:stop, :].transpose(-2, -1)) * scale  # (..., L, block)
        if causal:
            key_pos = torch.arange(start, stop, device=q.device)
            scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
        new_max = torch.maximum(row_max, scores.amax(dim=-1))
        safe_max = torch.where(new_max == float("-inf"), 0.0, new_max)  # a row that has seen no key yet
        p = torch.exp(scores - safe_max.unsqueeze(-1))
        rescale = torch.exp(row_max - safe_max)  # exp(m_old - m_new): shrinks what was summed so far
        row_sum = row_sum * rescale + p.sum(dim=-1)
        acc = acc * rescale.unsqueeze(-1) + p @ v[..., start:stop, :]
        row_max = new_max
    seen = row_sum > 0
    out = torch.where(seen.unsqueeze(-1), acc / torch.where(seen, row_sum, 1.0).unsqueeze(-1), 0.0)
    logsumexp = row_max + torch.log(row_sum)  # -inf + log(0) = -inf for a query that sees no key
    return out.to(dtype), logsumexp
    ### END SOLUTION


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, return_lse: bool = False):
    """FlashAttention forward pass as a Triton kernel.

    q (..., L, D), k and v (..., S, D) with equal leading dimensions (flattened into the kernel's grid; 3-D and
    4-D alike), all float16, bfloat16 or float32 on the same device (a CUDA GPU, or the CPU under
    ``TRITON_INTERPRET=1``). Scores are scaled by 1/sqrt(D); with ``causal=True`` query i sees key j iff
    j <= i + (S - L) (bottom-right aligned). One program computes one tile of queries of one (batch, head)
    pair, with float32 running max, running sum and accumulator: first an unmasked loop over the key tiles
    every row of the tile sees whole, then a masked step over the diagonal tiles and the last, partial one.
    Returns out (..., L, D) in q's dtype, or ``(out, lse)`` with ``return_lse=True``: lse (..., L) float32, the
    natural-log logsumexp of each query's visible scaled scores (-inf, with a zero output, where it sees no
    key). The kernel is built once, on the first call, and kept as ``flash_attention.kernel``; on a GPU
    ``triton.autotune`` picks its tiles from ``HOPPER_CONFIGS`` per (L, S, D, causal, dtype).
    """
    ### BEGIN SOLUTION
    kernel = getattr(flash_attention, "kernel", None)
    if kernel is None:

        @triton.jit
        def flash_forward(
            Q, K, V, Out, Lse,
            stride_qb, stride_qh, stride_ql, stride_qd,
            stride_kb, stride_kh, stride_ks, stride_kd,
            stride_vb, stride_vh, stride_vs, stride_vd,
            stride_ob, stride_oh, stride_ol, stride_od,
            H, L, S, qk_scale,
            D: tl.constexpr,  # compile-time, so the mask on the head dimension vanishes when D = BLOCK_D
            CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            FP32_DOT: tl.constexpr,
        ):  # fmt: skip
            tile, bh = tl.program_id(0), tl.program_id(1)  # which query tile, which (batch, head)
            b, h = bh // H, bh % H
            offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this program
            offs_n = tl.arange(0, BLOCK_N)  # key columns within a key tile
            offs_d = tl.arange(0, BLOCK_D)  # head dimension, padded to a power of two
            d_ok = offs_d[None, :] < D
            q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd
            k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
            v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
            q = tl.load(q_ptrs, mask=(offs_m[:, None] < L) & d_ok, other=0.0)

            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, in log2 units
            l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v

            # Key tiles [0, full_end): every key exists and every row of this tile sees it, so no mask at all.
            # Key tiles [full_end, hi): the diagonal (causal) and the last, partial tile: masked. Keys from hi on
            # are invisible to every row of the tile (causal) and never loaded.
            hi = S
            full_end = S // BLOCK_N * BLOCK_N
            if CAUSAL:
                hi = tl.minimum(S, (tile + 1) * BLOCK_M + S - L)
                full_end = tl.minimum(full_end, tl.maximum(tile * BLOCK_M + S - L + 1, 0) // BLOCK_N * BLOCK_N)
            for MASKED in tl.static_range(2):  # unrolled when compiled: two loops, MASKED a constant in each
                for start_n in range(full_end if MASKED else 0, hi if MASKED else full_end, BLOCK_N):
                    cols = start_n + offs_n
                    kv_mask = ((cols[:, None] < S) & d_ok) if MASKED else d_ok
                    k = tl.load(k_ptrs + start_n * stride_ks, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
                    v = tl.load(v_ptrs + start_n * stride_vs, mask=kv_mask, other=0.0)
                    if FP32_DOT:
                        s = tl.dot(q, tl.trans(k), input_precision="ieee")
                    else:
                        s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) raw scores, float32
                    if MASKED:
                        visible = cols[None, :] < S
                        if CAUSAL:
                            visible = visible & (cols[None, :] <= offs_m[:, None] + (S - L))
                        s = tl.where(visible, s * qk_scale, float("-inf"))
                        m_new = tl.maximum(m_i, tl.max(s, 1))
                        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
                        p = tl.math.exp2(s - m_ref[:, None])
                    else:  # every score is visible: the max is finite, and scale-and-subtract is one fused op
                        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                        m_ref = m_new
                        p = tl.math.exp2(s * qk_scale - m_ref[:, None])
                    alpha = tl.math.exp2(m_i - m_ref)  # rescales the sum and accumulator to the new max
                    l_i = l_i * alpha + tl.sum(p, 1)
                    if FP32_DOT:
                        acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
                    else:
                        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
                    m_i = m_new

            seen = l_i > 0.0  # False for a query that sees no key (causal with L > S)
            l_safe = tl.where(seen, l_i, 1.0)
            o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
            tl.store(o_ptrs, (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=(offs_m[:, None] < L) & d_ok)
            # log2 units back to natural log: ln(sum e^x) = ln(2) * (m + log2(l))
            lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            tl.store(Lse + bh * L + offs_m, lse, mask=offs_m < L)

        kernel = flash_attention.kernel = flash_forward

    L, D, S = q.shape[-2], q.shape[-1], k.shape[-2]
    # (..., n, D) -> (B, H, n, D): a view (no copy) for 2-D, 3-D and 4-D inputs of any layout
    q4, k4, v4 = (t.reshape((-1, *t.shape[-3:]) if t.dim() >= 4 else (1,) * (4 - t.dim()) + tuple(t.shape)) for t in (q, k, v))
    B, H = q4.shape[0], q4.shape[1]
    out = torch.empty_like(q4)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    args = (q4, k4, v4, out, lse, *q4.stride(), *k4.stride(), *v4.stride(), *out.stride(), H, L, S)
    consts = {"D": D, "CAUSAL": causal, "BLOCK_D": max(16, triton.next_power_of_2(D)), "FP32_DOT": q.dtype == torch.float32}
    qk_scale = math.log2(math.e) / math.sqrt(D)  # exp2(x * log2(e)) = exp(x): the scale and the base change in one
    if q.device.type == "cpu":  # Triton's interpreter: small tiles, so that small inputs span several
        kernel[(triton.cdiv(L, 16), B * H)](*args, qk_scale, **consts, BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    else:
        tuned = getattr(flash_attention, "tuned", None)
        if tuned is None:
            # (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by triton.autotune on a GPU, sized for H100/H200 (228 KB
            # of shared memory per SM): a Q tile plus num_stages K and V tiles in flight fit for D <= 128.
            HOPPER_CONFIGS = {
                "16-bit": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 4)],
                "float32": [(64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 3)],  # 4-byte tiles: half the size
            }
            tuned = flash_attention.tuned = {
                fp32: triton.autotune(
                    [
                        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                        for bm, bn, w, st in HOPPER_CONFIGS["float32" if fp32 else "16-bit"]
                    ],
                    key=["L", "S", "D", "CAUSAL"],  # tuned once per shape (Triton adds the dtypes to the key)
                )(kernel)
                for fp32 in (False, True)
            }
        tuned[consts["FP32_DOT"]][lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)](*args, qk_scale, **consts)
    out = out.reshape(q.shape)
    return (out, lse.reshape(q.shape[:-1])) if return_lse else out
    ### END SOLUTION
