"""Chapter 8's tiled attention and Triton FlashAttention forward, as the course provides them to chapter 9.

Written independently of ``solutions/`` (grading works without it). Chapter 8's mutants are these two
functions with one mistake edited in (``autograder/mutants/ch08.py`` reads their source), so chapter 8's
checks prove them correct as well. Contract (course-design.md, chapter 8):

* ``tiled_attention(q, k, v, block_size=64, causal=False) -> (out, lse)`` in PyTorch;
* ``flash_attention(q, k, v, causal=False, return_lse=False)``, one Triton kernel on (..., L, D) inputs
  (leading dimensions flattened), ``out`` in q's dtype and, with ``return_lse``, ``lse`` (..., L) in float32.

Scores are scaled by 1/sqrt(D); ``causal`` is bottom-right aligned (query i sees key j iff j <= i + S - L);
lse is the natural-log logsumexp of the visible scaled scores, -inf (with a zero output) for a query that
sees no key. Without a CUDA GPU the kernel runs in Triton's interpreter on CPU tensors.
"""

# ruff: noqa: E741  (l is the running sum and O the output, as in the FlashAttention papers)

import math
import os

import torch

if not torch.cuda.is_available():  # before Triton is imported: kernels run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def tiled_attention(q, k, v, block_size=64, causal=False):
    out_dtype = q.dtype
    ft = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(ft), k.to(ft), v.to(ft)
    L, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    m = torch.full(q.shape[:-1], -math.inf, dtype=ft, device=q.device)
    l = torch.zeros(q.shape[:-1], dtype=ft, device=q.device)
    acc = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=ft, device=q.device)
    rows = torch.arange(L, device=q.device).view(L, 1)
    for j0 in range(0, S, block_size):
        kb, vb = k[..., j0 : j0 + block_size, :], v[..., j0 : j0 + block_size, :]
        s = q @ kb.transpose(-1, -2) / math.sqrt(d)
        if causal:
            cols = torch.arange(j0, j0 + kb.shape[-2], device=q.device).view(1, -1)
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


# fmt: off
def flash_attention(q, k, v, causal=False, return_lse=False):
    if not hasattr(flash_attention, "compiled"):

        @triton.jit
        def attn_fwd(Q, K, V, O, LSE, sb, sh, sl, kb, kh, ks, H, L, S, D, scale,
                     IS_CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
                     F32: tl.constexpr):
            pid_m = tl.program_id(0)
            pid_bh = tl.program_id(1)
            bi = pid_bh // H
            hi = pid_bh % H
            rows = pid_m * BM + tl.arange(0, BM)
            dims = tl.arange(0, DP)
            q = tl.load(Q + bi * sb + hi * sh + rows[:, None] * sl + dims[None, :],
                        mask=(rows[:, None] < L) & (dims[None, :] < D), other=0.0)
            m = tl.zeros([BM], dtype=tl.float32) - float("inf")
            l = tl.zeros([BM], dtype=tl.float32)
            acc = tl.zeros([BM, DP], dtype=tl.float32)
            hi_n = S  # key tiles from hi_n on are invisible to every row of this tile
            full_end = S // BN * BN  # key tiles before full_end are visible to every row: no mask
            if IS_CAUSAL:
                hi_n = tl.minimum(S, (pid_m + 1) * BM + S - L)
                full_end = tl.minimum(full_end, tl.maximum(pid_m * BM + S - L + 1, 0) // BN * BN)
            for phase in tl.static_range(2):  # unrolled: 0, the full tiles unmasked; 1, the diagonal and the tail
                lo = 0 if phase == 0 else full_end
                up = full_end if phase == 0 else hi_n
                for n0 in range(lo, up, BN):
                    cols = n0 + tl.arange(0, BN)
                    kt = tl.load(K + bi * kb + hi * kh + cols[None, :] * ks + dims[:, None],
                                 mask=(cols[None, :] < S) & (dims[:, None] < D), other=0.0)
                    vv = tl.load(V + bi * kb + hi * kh + cols[:, None] * ks + dims[None, :],
                                 mask=(cols[:, None] < S) & (dims[None, :] < D), other=0.0)
                    if F32:  # float32 inputs: exact float32 products (no TF32 rounding on a GPU)
                        s = tl.dot(q, kt, input_precision="ieee") * scale
                    else:
                        s = tl.dot(q, kt) * scale
                    if phase == 1:
                        ok = cols[None, :] < S
                        if IS_CAUSAL:
                            ok = ok & (cols[None, :] <= rows[:, None] + (S - L))
                        s = tl.where(ok, s, float("-inf"))
                    m_new = tl.maximum(m, tl.max(s, axis=1))
                    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                    p = tl.exp(s - m_use[:, None])
                    corr = tl.exp(m - m_use)
                    l = l * corr + tl.sum(p, axis=1)
                    if F32:
                        acc = acc * corr[:, None] + tl.dot(p, vv, input_precision="ieee")
                    else:
                        acc = acc * corr[:, None] + tl.dot(p.to(vv.dtype), vv)
                    m = m_new
            lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
            acc = acc / tl.where(l > 0, l, 1.0)[:, None]
            o_ptrs = O + bi * sb + hi * sh + rows[:, None] * sl + dims[None, :]
            tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(rows[:, None] < L) & (dims[None, :] < D))
            tl.store(LSE + pid_bh * L + rows, lse, mask=rows < L)

        flash_attention.compiled = attn_fwd

    lead, L, D, S = q.shape[:-2], q.shape[-2], q.shape[-1], k.shape[-2]
    q, k, v = (t.reshape(-1, t.shape[-3] if t.dim() > 2 else 1, t.shape[-2], D).contiguous() for t in (q, k, v))
    B, H = q.shape[0], q.shape[1]
    DP = max(16, triton.next_power_of_2(D))
    if q.device.type == "cpu":  # the interpreter: small tiles keep small inputs quick and spanning several tiles
        BM, BN, warps, stages = 16, 16, 4, 1
    elif q.element_size() == 2:  # float16 / bfloat16 on a GPU
        BM, BN, warps, stages = 128, 64, 4 if D <= 64 else 8, 3
    else:  # float32 tiles need twice the on-chip memory
        BM, BN, warps, stages = 64, 32, 4 if D <= 64 else 8, 2
    o = torch.empty_like(q)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(L, BM), B * H)
    flash_attention.compiled[grid](q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2),
                                   k.stride(0), k.stride(1), k.stride(2), H, L, S, D, 1.0 / math.sqrt(D),
                                   IS_CAUSAL=causal, BM=BM, BN=BN, DP=DP, F32=q.dtype == torch.float32,
                                   num_warps=warps, num_stages=stages)
    o = o.reshape(lead + (L, D))
    return (o, lse.reshape(lead + (L,))) if return_lse else o
# fmt: on
