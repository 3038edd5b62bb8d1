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


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """FlashAttention forward pass as a Triton kernel.

    q (B, H, L, D), k and v (B, H, S, D), all float16, bfloat16 or float32 on the same device
    (a CUDA GPU, or the CPU under ``TRITON_INTERPRET=1``). Scores are scaled by 1/sqrt(D); with
    ``causal=True`` query i sees key j iff j <= i + (S - L) (bottom-right aligned). One program
    computes one tile of queries of one (batch, head) pair, with float32 running max, running sum
    and accumulator. Returns out (B, H, L, D) in q's dtype; a query that sees no key gets zeros.
    The kernel is compiled once, on the first call, and kept as ``flash_attention.kernel``.
    """
    ### BEGIN SOLUTION
    kernel = getattr(flash_attention, "kernel", None)
    if kernel is None:

        @triton.jit
        def flash_forward(
            Q, K, V, Out,
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
            q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd
            k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
            v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
            q = tl.load(q_ptrs, mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)

            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, in log2 units
            l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v

            hi = S  # key tiles from hi on are fully masked for every row of this tile: skip them
            unmasked_end = (S // BLOCK_N) * BLOCK_N  # key tiles before this need no mask at all
            if CAUSAL:
                hi = tl.minimum(S, (tile + 1) * BLOCK_M + S - L)
                unmasked_end = tl.minimum(unmasked_end, tl.maximum(tile * BLOCK_M + S - L + 1, 0) // BLOCK_N * BLOCK_N)
            for start_n in range(0, hi, BLOCK_N):
                cols = start_n + offs_n
                kv_mask = (cols[:, None] < S) & (offs_d[None, :] < D)
                k = tl.load(k_base + cols[:, None] * stride_ks, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
                v = tl.load(v_base + cols[:, None] * stride_vs, mask=kv_mask, other=0.0)
                if FP32_DOT:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
                else:
                    s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
                if start_n + BLOCK_N > unmasked_end:  # only the diagonal and the last tile need a mask
                    visible = cols[None, :] < S
                    if CAUSAL:
                        visible = visible & (cols[None, :] <= offs_m[:, None] + (S - L))
                    s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
                p = tl.math.exp2(s - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)  # rescales the sum and accumulator to the new max
                l_i = l_i * alpha + tl.sum(p, 1)
                if FP32_DOT:
                    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new

            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that saw no key: 0, not 0/0
            o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_d[None, :] < D))

        kernel = flash_attention.kernel = flash_forward

    B, H, L, D = q.shape
    S = k.shape[2]
    out = torch.empty_like(q)
    if q.device.type == "cpu":  # Triton's interpreter: small tiles, so that small inputs span several
        block_m, block_n, warps, stages = 16, 16, 4, 1
    elif q.element_size() == 2:  # float16/bfloat16 on a GPU (sized for Hopper): 128 queries x 64 keys per step
        block_m, block_n, warps, stages = 128, 64, (4 if D <= 64 else 8), 3
    else:  # float32 tiles take twice the shared memory: smaller tiles, one stage less
        block_m, block_n, warps, stages = 64, 32, (4 if D <= 64 else 8), 2
    block_d = max(16, triton.next_power_of_2(D))
    grid = (triton.cdiv(L, block_m), B * H)
    kernel[grid](
        q, k, v, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, L, S, math.log2(math.e) / math.sqrt(D),
        D=D, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        FP32_DOT=q.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
    ### END SOLUTION
