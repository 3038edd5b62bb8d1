"""Chapter 7: multi-head attention on a GPU: timing it honestly, fusing it, counting its FLOPs and bytes."""

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def benchmark(fn, *args, warmup: int = 3, repeats: int = 20) -> dict:
    """Time ``fn(*args)``: median and interquartile range of ``repeats`` calls, in milliseconds.

    Calls ``fn(*args)`` exactly ``warmup + repeats`` times: first ``warmup`` untimed calls (they
    absorb one-off costs: compilation, autotuning, allocator growth, cold caches), then ``repeats``
    calls, each timed on its own. Returns ``{"median_ms": float, "iqr_ms": float}``: the median of
    the ``repeats`` times and their interquartile range, the 75th minus the 25th percentile with
    linear interpolation (``numpy.percentile``'s default).

    CUDA launches are asynchronous: ``fn`` returns as soon as its kernels are queued. When
    ``torch.cuda.is_available()`` (whatever the arguments: ``fn`` may be a closure over CUDA
    tensors and take none), time each call with CUDA events (``torch.cuda.Event(enable_timing=True)``,
    ``record``, ``synchronize``, ``elapsed_time``) or with ``torch.cuda.synchronize()`` around a
    monotonic clock such as ``time.perf_counter()``, and synchronise after the warm-up. Without
    CUDA, time each call with ``time.perf_counter()`` alone, without touching ``torch.cuda``.
    """
    ### BEGIN SOLUTION
    on_cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn(*args)
    times = []
    if on_cuda:
        torch.cuda.synchronize()  # the warm-up's kernels must not leak into the first timed call
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))  # milliseconds
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    q25, q50, q75 = np.percentile(np.array(times, dtype=np.float64), [25, 50, 75])
    return {"median_ms": float(q50), "iqr_ms": float(q75 - q25)}
    ### END SOLUTION


class FusedMultiHeadAttention(nn.Module):
    """Multi-head self-attention with one QKV matmul and ``F.scaled_dot_product_attention``.

    Parameters as ``nn.MultiheadAttention(embed_dim, num_heads, bias=bias, batch_first=True)`` and
    chapter 4's layer: ``in_proj_weight`` (3E, E) holding W_q, W_k, W_v stacked in that order,
    ``in_proj_bias`` (3E) (``None`` when ``bias=False``), and ``out_proj``, an ``nn.Linear(E, E,
    bias=bias)``; so ``load_state_dict(torch_mha.state_dict())`` works. Raises ValueError when
    embed_dim is not a multiple of num_heads.

    ``forward(x, attn_mask=None, is_causal=False)``: x (B, L, E) -> (B, L, E), self-attention with
    H heads of size D = E // H. ``attn_mask`` follows ``F.scaled_dot_product_attention``, NOT
    ``nn.MultiheadAttention``: a bool mask is True where a query MAY attend to a key; a float mask
    is added to the scores. It broadcasts to (B, H, L, L). ``is_causal=True``: query i sees keys
    j <= i (do not pass both).
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        ### BEGIN SOLUTION
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        ### END SOLUTION

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x (B, L, E) -> (B, L, E). attn_mask: bool (True = may attend) or float (added), broadcast to (B, H, L, L)."""
        ### BEGIN SOLUTION
        batch, length, embed_dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3E): one matmul for Q, K and V
        # (B, L, 3, H, D) -> (3, B, H, L, D): one permute instead of three transposes
        qkv = qkv.reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B, H, L, D)
        out = out.transpose(1, 2).reshape(batch, length, embed_dim)
        return self.out_proj(out)
        ### END SOLUTION


def attention_flops(batch: int, heads: int, L: int, S: int, head_dim: int, causal: bool = False, mode: str = "fwd") -> float:
    """Floating-point operations of attention's two matmuls, QK^T and PV, counting a multiply-add as 2.

    Forward: 4 * batch * heads * L * S * head_dim (2 * L * S * D for QK^T, the same for PV).
    ``causal=True`` halves it (half the score matrix is masked; the convention of FlashAttention's
    benchmarks). ``mode``: ``"fwd"`` the forward pass, ``"bwd"`` the backward pass (2.5 times the
    forward), ``"fwd_bwd"`` both (3.5 times the forward). Any other mode raises ValueError.
    Softmax, scaling and the projections are not counted. Returns a float.
    """
    ### BEGIN SOLUTION
    factors = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
    if mode not in factors:
        raise ValueError(f"mode must be one of {sorted(factors)}, got {mode!r}")
    flops = 4.0 * batch * heads * L * S * head_dim
    if causal:
        flops /= 2
    return flops * factors[mode]
    ### END SOLUTION


def naive_attention_bytes(batch: int, heads: int, L: int, S: int, dtype: torch.dtype) -> int:
    """Bytes of the L x S matrices that a naive attention holds at once: the scores and the weights.

    A naive implementation writes the scores QK^T / sqrt(D) and then, while they are still alive,
    the softmax weights P, two (batch, heads, L, S) tensors of ``dtype``:
    2 * batch * heads * L * S * (bytes per element of ``dtype``). Returns an exact int.
    """
    ### BEGIN SOLUTION
    bytes_per_element = torch.empty((), dtype=dtype).element_size()
    return 2 * batch * heads * L * S * bytes_per_element
    ### END SOLUTION
