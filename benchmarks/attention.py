"""Attention on a GPU, measured side by side in one run: the course's layers and kernels against PyTorch's.

    python benchmarks/attention.py [--out benchmarks/results] [--quick] [--suite layers,kernels,training]
    python benchmarks/attention.py --plot-only benchmarks/results/2026-12-01-h100-80gb-hbm3.json
    python -m benchmarks.attention ...                       (the same)

Three suites, bfloat16 (the first two forward only):

* ``layers`` (chapter 7): a whole self-attention layer x (B, L, E) -> (B, L, E): a naive layer
  written here (three projections, the L x L scores, softmax, weights @ V, output projection),
  chapter 4's ``MultiHeadAttention``, ``nn.MultiheadAttention`` (eval, ``need_weights=False``),
  chapter 7's ``FusedMultiHeadAttention`` ("fused"), and a reference layer written here (one QKV
  matmul, ``F.scaled_dot_product_attention``, output projection) with SDPA's default choice and
  with each backend pinned by ``torch.nn.attention.sdpa_kernel``. All share one set of weights.
  E in {1024, 2048}, H = 16, B = 4, L = 512 .. 16384 (the naive layers' L x L matrices grow
  quadratically and run out of memory at the longest lengths, which the rows record as "oom").
* ``kernels`` (chapter 8): chapter 8's Triton ``flash_attention`` on q, k, v (B, H, N, D) against
  SDPA's default and each pinned backend, at the FlashAttention papers' shapes: B*N = 16384,
  H*D = 2048, N in {1k, 2k, 4k, 8k, 16k}, D in {64, 128}, causal and not.
* ``training`` (chapter 9): forward + backward (``torch.autograd.grad`` of the output for q, k, v with a
  random output gradient) at the kernels' shapes: chapter 9's ``TritonFlashAttentionFunction`` (chapter 8's
  forward with its logsumexp, chapter 9's Triton backward) against SDPA's default and its flash, efficient
  and cuDNN backends pinned; FLOPs 3.5x the forward's. Its gate checks the output and the three gradients
  against float64 autograd through the math backend before anything is timed.

Before anything is timed, each implementation passes a correctness gate at a small shape (its
bf16 output against a float32 reference, see ``GATE_TOL``) or is reported "wrong" and not timed.
Timing: warm-up outside the timed region, CUDA events around chunks of calls, rounds in which the
order of implementations alternates (forward, reversed), median and IQR of the chunks' per-call
times. Out of memory and unsupported backends are caught per point. Writes
``<out>/<YYYY-MM-DD>-<device>.json`` (``-quick`` added for ``--quick``), rewritten after every
point so an interrupted run keeps what it measured, then PNG plots next to it and a summary.

Without CUDA it runs the correctness gate at tiny shapes on the CPU (Triton's interpreter for
the kernel), says that speed ratios need a CUDA GPU, and writes nothing. Exit status 1 when the
course's own code (chapter 4's or 7's layer, chapter 8's kernel) fails the gate, else 0; a
PyTorch implementation that fails it is reported "wrong" and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/attention.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchmarks import attention_measure as am  # noqa: E402
from benchmarks import attention_plots as plots  # noqa: E402

DTYPE = torch.bfloat16
# Gate: max |out - ref| / max |ref| against a float32 reference computed from the same inputs.
# bf16 keeps 8 significant bits (unit roundoff 2**-8 = 3.9e-3); rounding the inputs, weights,
# probabilities and output each costs about that much, so 2e-2 leaves room for honest rounding
# while a wrong scale, mask or head split errs by 1e-1 or more. float32 (the CPU interpreter): 1e-3.
GATE_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-3}
BACKENDS = {
    "sdpa:flash": SDPBackend.FLASH_ATTENTION,
    "sdpa:efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa:cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa:math": SDPBackend.MATH,
}
# What torch.profiler shows when F.scaled_dot_product_attention dispatches to each backend.
ATEN_BACKEND = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
# The course's own code: the exit status is 1 when one of these fails the correctness gate.
COURSE_IMPLS = ("ch04", "fused", "triton")
CH04 = ("solutions.ch04_multi_head_attention", "MultiHeadAttention")
CH07 = ("solutions.ch07_multi_head_attention_on_gpu", "FusedMultiHeadAttention")
CH08 = ("solutions.ch08_flash_attention", "flash_attention")
CH09 = ("solutions.ch09_flash_attention_backward", "TritonFlashAttentionFunction")
# Gradients in bf16 round dO, P, dS and the products once more than the forward: a little more room.
GRAD_GATE_TOL = {torch.bfloat16: 4e-2, torch.float32: 1e-3}


@dataclass(frozen=True)
class Sweep:
    """What one run measures and how many samples it takes."""

    name: str
    layer_dims: tuple[int, ...]  # E
    layer_heads: int  # H
    layer_lengths: tuple[int, ...]  # L
    kernel_lengths: tuple[int, ...]  # N
    kernel_head_dims: tuple[int, ...]  # D
    kernel_causal: tuple[bool, ...]
    layer_batch: int = 4  # B (layers)
    tokens: int = 16384  # B * N (kernels)
    kernel_hidden: int = 2048  # H * D (kernels)
    rounds: int = 8  # alternating order: even rounds forward, odd reversed
    per_round: int = 2  # timed chunks per implementation per round
    chunk_ms: float = 10.0  # each chunk repeats the call until about this long
    warmup_ms: float = 30.0  # untimed calls (at least 3) before the first chunk


FULL = Sweep(
    name="full",
    layer_dims=(1024, 2048),
    layer_heads=16,
    layer_lengths=(512, 1024, 2048, 4096, 8192, 16384),
    kernel_lengths=(1024, 2048, 4096, 8192, 16384),
    kernel_head_dims=(64, 128),
    kernel_causal=(False, True),
)
QUICK = Sweep(
    name="quick",
    layer_dims=(2048,),
    layer_heads=16,
    layer_lengths=(1024, 4096),
    kernel_lengths=(1024, 4096),
    kernel_head_dims=(128,),
    kernel_causal=(False, True),
    rounds=4,
    chunk_ms=5.0,
    warmup_ms=15.0,
)
GPU_GATE = {
    "layers": {"batch": 2, "seq_len": 256},
    "kernels": {"batch": 2, "heads": 4, "seq_len": 256},
    "training": {"batch": 2, "heads": 4, "seq_len": 256},
}
CPU_GATE = {
    "layers": {"batch": 2, "seq_len": 16, "embed_dim": 64, "heads": 4},
    "kernels": {"batch": 1, "heads": 2, "seq_len": 48, "head_dim": 32},
    "training": {"batch": 1, "heads": 2, "seq_len": 40, "head_dim": 16},
}
SUITES = ("layers", "kernels", "training")

Impl = Callable[..., torch.Tensor]


# ---------------------------------------------------------------- implementations


def load_optional(module: str, attr: str) -> tuple[Any, str]:
    """(the object, "") or (None, why it is unavailable): a missing or broken chapter module
    removes its implementation from the run, not the run."""
    try:
        return getattr(importlib.import_module(module), attr), ""
    except Exception as error:
        return None, f"unavailable: {module}.{attr} failed to import ({type(error).__name__}: {am.first_line(error)})"


def pinned(impl: str):
    """The context in which ``impl``'s SDPA call runs: a pinned backend, or SDPA's own choice."""
    return sdpa_kernel(BACKENDS[impl]) if impl in BACKENDS else contextlib.nullcontext()


def naive_layer(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Self-attention as written on a blackboard, with ``mha``'s weights: x (B, L, E) -> (B, L, E).

    Three projections, scores (B, H, L, L) = Q K^T / sqrt(D) held in memory, softmax over keys,
    weights @ V, heads merged, output projection.
    """
    batch, length, embed_dim = x.shape
    heads = mha.num_heads
    head_dim = embed_dim // heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = F.linear(x, w_q, b_q).view(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, L, D)
    k = F.linear(x, w_k, b_k).view(batch, length, heads, head_dim).transpose(1, 2)
    v = F.linear(x, w_v, b_v).view(batch, length, heads, head_dim).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)  # (B, H, L, L)
    weights = torch.softmax(scores, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, length, embed_dim)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


def sdpa_layer(mha: nn.MultiheadAttention, x: torch.Tensor, impl: str) -> torch.Tensor:
    """Self-attention with one QKV matmul and ``F.scaled_dot_product_attention`` under ``impl``'s backend."""
    batch, length, embed_dim = x.shape
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, heads, embed_dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    with pinned(impl):
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
    return F.linear(out.transpose(1, 2).reshape(batch, length, embed_dim), mha.out_proj.weight, mha.out_proj.bias)


def layer_impls(mha: nn.MultiheadAttention) -> dict[str, Impl | str]:
    """Every layer implementation as ``f(x) -> out`` on ``mha``'s weights and dtype, or the reason it cannot run."""
    impls: dict[str, Impl | str] = {"naive": lambda x: naive_layer(mha, x)}
    for name, (module, attr) in (("ch04", CH04), ("fused", CH07)):
        cls, why = load_optional(module, attr)
        if cls is None:
            impls[name] = why
            continue
        status, note, layer = am.guarded(lambda cls=cls: _copy_of(mha, cls))
        if status != "ok":
            impls[name] = f"could not build {module}.{attr} from nn.MultiheadAttention's state dict: {note}"
        elif name == "ch04":
            impls[name] = lambda x, layer=layer: layer(x, x, x, need_weights=False)[0]
        else:
            impls[name] = layer
    impls["nn.MultiheadAttention"] = lambda x: mha(x, x, x, need_weights=False)[0]
    for name in ("sdpa:default", *am.PINNED_SDPA):
        impls[name] = lambda x, name=name: sdpa_layer(mha, x, name)
    return {name: impls[name] for name in am.LAYER_IMPLS}


def _copy_of(mha: nn.MultiheadAttention, cls: type) -> nn.Module:
    """A ``cls(E, H)`` holding ``mha``'s weights, on its device and in its dtype, in eval mode."""
    layer = cls(mha.embed_dim, mha.num_heads, bias=True)
    layer.load_state_dict(mha.state_dict())
    return layer.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype).eval()


def kernel_impls(causal: bool) -> dict[str, Impl | str]:
    """Every kernel as ``f(q, k, v) -> out`` on (B, H, N, D), or the reason it cannot run."""
    flash, why = load_optional(*CH08)
    impls: dict[str, Impl | str] = {"triton": (lambda q, k, v: flash(q, k, v, causal=causal)) if flash else why}

    def sdpa(name: str) -> Impl:
        def run(q, k, v):
            with pinned(name):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run

    for name in ("sdpa:default", *am.PINNED_SDPA):
        impls[name] = sdpa(name)
    return impls


def training_impls(causal: bool) -> dict[str, Impl | str]:
    """Every forward + backward as ``f(q, k, v, grad_out) -> (out, dq, dk, dv)`` on (B, H, N, D), or why it cannot run.

    Ours is chapter 9's ``TritonFlashAttentionFunction``, imported only here (the chapter may not be there yet:
    then its row says so and the others still run)."""
    function, why = load_optional(*CH09)

    def backward_of(forward: Callable[..., torch.Tensor]) -> Impl:
        def run(q, k, v, grad_out):
            with torch.enable_grad():
                q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
                out = forward(q, k, v)
                return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))

        return run

    impls: dict[str, Impl | str] = {"triton": backward_of(lambda q, k, v: function.apply(q, k, v, causal)) if function else why}

    def sdpa(name: str) -> Callable[..., torch.Tensor]:
        def forward(q, k, v):
            with pinned(name):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return forward

    for name in am.TRAINING_IMPLS[1:]:
        impls[name] = backward_of(sdpa(name))
    return impls


def make_mha(embed_dim: int, heads: int, device: torch.device, seed: int = 0) -> nn.MultiheadAttention:
    """A float32 ``nn.MultiheadAttention`` in eval mode with non-zero biases (PyTorch starts them at
    zero, which would hide a layer that drops them)."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(embed_dim, heads, batch_first=True, device=device).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_(0, 0.5)
        mha.out_proj.bias.normal_(0, 0.5)
    return mha


# ---------------------------------------------------------------- correctness gate


def gate_error(out: Any, ref: torch.Tensor, dtype: torch.dtype) -> tuple[str, str]:
    """("ok" | "wrong", note) for an output against its float32 reference."""
    if not isinstance(out, torch.Tensor):
        return "wrong", f"returned {type(out).__name__}, not a tensor"
    if tuple(out.shape) != tuple(ref.shape) or out.dtype != dtype:
        return "wrong", f"returned {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {dtype}"
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    tol = GATE_TOL[dtype]
    if not math.isfinite(err) or err > tol:
        return "wrong", f"gate failed: max|out - ref| / max|ref| = {err:.2e} > {tol:.0e}"
    return "ok", f"gate passed: max|out - ref| / max|ref| = {err:.2e} <= {tol:.0e}"


def gate_layers(
    impls: dict[str, Impl | str], mha32: nn.MultiheadAttention, batch: int, length: int
) -> dict[str, tuple[str, str]]:
    """Each layer in bf16 against ``mha32`` (nn.MultiheadAttention, float32, math SDPA) on one small input."""
    device = mha32.in_proj_weight.device
    torch.manual_seed(1)
    x = torch.randn(batch, length, mha32.embed_dim, device=device)
    with sdpa_kernel(SDPBackend.MATH):
        ref = mha32(x, x, x, need_weights=False)[0]
    return _gate(impls, ref, (x.to(DTYPE),), DTYPE)


def gate_kernels(
    impls: dict[str, Impl | str], shape: tuple[int, int, int, int], causal: bool, device: torch.device, dtype=DTYPE
) -> dict[str, tuple[str, str]]:
    """Each kernel in ``dtype`` against float32 math SDPA on the same (rounded) q, k, v."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(shape, device=device).to(dtype) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    return _gate(impls, ref, (q, k, v), dtype)


def gate_training(
    impls: dict[str, Impl | str], shape: tuple[int, int, int, int], causal: bool, device: torch.device, dtype=DTYPE
) -> dict[str, tuple[str, str]]:
    """Each forward + backward in ``dtype``: its output and dq, dk, dv against float64 autograd through the math
    SDPA backend on the same (rounded) q, k, v and output gradient; the worst of the four relative errors."""
    torch.manual_seed(3)
    q, k, v, grad_out = (torch.randn(shape, device=device).to(dtype) for _ in range(4))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        out64 = F.scaled_dot_product_attention(*leaves, is_causal=causal)
        refs = (out64.detach(), *torch.autograd.grad(out64, leaves, grad_out.double()))
    verdicts = {}
    for name, fn in impls.items():
        if isinstance(fn, str):
            verdicts[name] = ("unsupported", fn)
            continue
        status, note, got = am.guarded(lambda fn=fn: _synced(fn, q, k, v, grad_out))
        verdicts[name] = grad_gate_error(got, refs, dtype) if status == "ok" else (status, note)
    return verdicts


def grad_gate_error(got: Any, refs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[str, str]:
    """("ok" | "wrong", note) for (out, dq, dk, dv) against their float64 references."""
    names = ("out", "dq", "dk", "dv")
    if not isinstance(got, tuple) or len(got) != 4 or not all(isinstance(t, torch.Tensor) for t in got):
        return "wrong", "did not return the output and three gradients"
    tol = GRAD_GATE_TOL[dtype]
    errors = {}
    for name, g, ref in zip(names, got, refs, strict=True):
        if tuple(g.shape) != tuple(ref.shape) or g.dtype != dtype:
            return "wrong", f"{name}: {tuple(g.shape)} {g.dtype}, expected {tuple(ref.shape)} {dtype}"
        errors[name] = ((g.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    text = ", ".join(f"{n} {e:.2e}" for n, e in errors.items())
    if not all(math.isfinite(e) and e <= tol for e in errors.values()):
        return "wrong", f"gradient gate failed: max|x - ref| / max|ref| = {text} (tolerance {tol:.0e})"
    return "ok", f"gradient gate passed: max|x - ref| / max|ref| = {text} <= {tol:.0e}"


def _gate(impls: dict[str, Impl | str], ref: torch.Tensor, args: tuple, dtype: torch.dtype) -> dict[str, tuple[str, str]]:
    verdicts = {}
    for name, fn in impls.items():
        if isinstance(fn, str):
            verdicts[name] = ("unsupported", fn)
            continue
        status, note, out = am.guarded(lambda fn=fn: _synced(fn, *args))
        verdicts[name] = gate_error(out, ref, dtype) if status == "ok" else (status, note)
    return verdicts


def _synced(fn: Impl, *args) -> Any:
    """``fn(*args)``, waiting for the GPU so that its errors surface here."""
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


# ---------------------------------------------------------------- timing on the GPU


def time_chunk(fn: Callable[[], Any], reps: int) -> float:
    """Milliseconds per call of ``reps`` back-to-back calls, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def warm_up(fn: Callable[[], Any], warmup_ms: float) -> float:
    """Untimed calls (at least 3, about ``warmup_ms``, at most 100); returns the last call's ms."""
    torch.cuda.synchronize()
    begin, calls, last = time.perf_counter(), 0, 0.0
    while calls < 3 or ((time.perf_counter() - begin) * 1e3 < warmup_ms and calls < 100):
        last = time_chunk(fn, 1)
        calls += 1
    return last


def peak_memory(fn: Callable[[], Any]) -> int:
    """``torch.cuda.max_memory_allocated()`` over one call, after ``reset_peak_memory_stats``:
    what the call allocates plus everything already resident (inputs, weights)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return int(torch.cuda.max_memory_allocated())


def backend_seen(fn: Callable[[], Any]) -> str:
    """Which SDPA backend one call of ``fn`` dispatched to, read from ``torch.profiler``'s ATen op names."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
            torch.cuda.synchronize()
        names = {event.key for event in prof.key_averages()}
    except Exception as error:
        return f"unknown (profiler failed: {am.first_line(error)})"
    seen = sorted({backend for op, backend in ATEN_BACKEND.items() for name in names if name.startswith(op)})
    return "+".join(seen) if seen else "none (no SDPA op in the profile)"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_point(fns: dict[str, Callable[[], Any]], flops: float, sweep: Sweep, detect: tuple[str, ...]) -> dict[str, dict]:
    """Time every implementation of one shape side by side; returns each one's row fields."""
    fields: dict[str, dict] = {}
    reps: dict[str, int] = {}
    for name, fn in fns.items():
        status, note, est = am.guarded(lambda fn=fn: warm_up(fn, sweep.warmup_ms))
        if status == "ok":
            status, note, mem = am.guarded(lambda fn=fn: peak_memory(fn))
        if status != "ok":
            fields[name] = {"status": status, "note": note}
            free_memory()
            continue
        reps[name] = max(1, min(1000, round(sweep.chunk_ms / max(est, 1e-3))))
        fields[name] = {"status": "ok", "note": "", "peak_mem_bytes": mem}
        if name in detect:
            fields[name]["note"] = am.BACKEND_NOTE + backend_seen(fn)
    failures: dict[str, tuple[str, str]] = {}

    def sampler(name: str) -> Callable[[], float]:
        def sample() -> float:
            if name in failures:
                return math.nan
            status, note, ms = am.guarded(lambda: time_chunk(fns[name], reps[name]))
            if status != "ok":
                failures[name] = (status, note)
                free_memory()
                return math.nan
            return ms

        return sample

    samples = am.round_robin({name: sampler(name) for name in reps}, sweep.rounds, sweep.per_round)
    for name, values in samples.items():
        if name in failures:
            fields[name] = {"status": failures[name][0], "note": failures[name][1] + " (during the timed rounds)"}
            continue
        median, iqr = am.median_iqr(values)
        fields[name].update(median_ms=median, iqr_ms=iqr, tflops=am.tflops(flops, median))
    return fields


# ---------------------------------------------------------------- the suites


def run_layers(sweep: Sweep, device: torch.device, record: Callable[[list[dict]], None]) -> None:
    for embed_dim in sweep.layer_dims:
        heads = sweep.layer_heads
        mha32 = make_mha(embed_dim, heads, device)
        impls = layer_impls(copy.deepcopy(mha32).to(DTYPE))
        g = GPU_GATE["layers"]
        verdicts = gate_layers(impls, mha32, g["batch"], g["seq_len"])
        _print_gate(f"layers E={embed_dim} H={heads}", verdicts)
        for length in sweep.layer_lengths:
            batch = sweep.layer_batch
            shape = (batch, heads, length, embed_dim // heads, False)
            inputs = lambda batch=batch, length=length, embed_dim=embed_dim: (
                torch.randn(batch, length, embed_dim, device=device, dtype=DTYPE),
            )
            flops = am.layer_flops(batch, length, embed_dim, heads)
            record(
                run_point(
                    "layers", shape, impls, verdicts, inputs, flops, sweep, ("nn.MultiheadAttention", "fused", "sdpa:default")
                )
            )
        del impls, mha32
        free_memory()


# The two suites on q, k, v (B, H, N, D): how each builds its implementations and gates them, how it labels
# its output, how many random tensors a call takes (q, k, v, and the output gradient for training), its FLOPs
# mode, and the implementations its rows are compared with.
ATTENTION_SUITES = {
    "kernels": (kernel_impls, gate_kernels, "kernels", 3, "fwd", ("sdpa:default",)),
    "training": (training_impls, gate_training, "training (forward + backward)", 4, "fwd+bwd", am.TRAINING_IMPLS[1:]),
}


def run_attention_suite(suite: str, sweep: Sweep, device: torch.device, record: Callable[[list[dict]], None]) -> None:
    """One of ATTENTION_SUITES at the kernels' shapes: the gate first, then the timings."""
    make_impls, gate, label, n_inputs, mode, baselines = ATTENTION_SUITES[suite]
    for head_dim in sweep.kernel_head_dims:
        heads = sweep.kernel_hidden // head_dim
        for causal in sweep.kernel_causal:
            impls = make_impls(causal)
            g = GPU_GATE[suite]
            verdicts = gate(impls, (g["batch"], g["heads"], g["seq_len"], head_dim), causal, device)
            _print_gate(f"{label} D={head_dim} causal={causal}", verdicts)
            for length in sweep.kernel_lengths:
                batch = max(1, sweep.tokens // length)
                shape = (batch, heads, length, head_dim, causal)
                inputs = lambda shape=shape: tuple(torch.randn(shape[:4], device=device, dtype=DTYPE) for _ in range(n_inputs))
                flops = am.attention_flops(batch, heads, length, length, head_dim, causal, mode=mode)
                record(run_point(suite, shape, impls, verdicts, inputs, flops, sweep, baselines))


def run_point(
    suite: str,
    shape: tuple[int, int, int, int, bool],
    impls: dict[str, Impl | str],
    verdicts: dict[str, tuple[str, str]],
    make_inputs: Callable[[], tuple[torch.Tensor, ...]],
    flops: float,
    sweep: Sweep,
    detect: tuple[str, ...],
) -> list[dict]:
    """The rows of one shape (batch, heads, seq_len, head_dim, causal), in ``impls``' order: those
    that failed the gate as the gate said, the others measured side by side."""
    fields = {name: {"status": v[0], "note": v[1]} for name, v in verdicts.items() if v[0] != "ok"}
    passed = [name for name, v in verdicts.items() if v[0] == "ok"]
    status, note, inputs = am.guarded(make_inputs)
    if status != "ok":
        fields.update({name: {"status": status, "note": f"creating the inputs: {note}"} for name in passed})
    else:
        fields.update(
            measure_point({name: (lambda fn=impls[name], inputs=inputs: fn(*inputs)) for name in passed}, flops, sweep, detect)
        )
    inputs = None  # free the inputs before the next shape
    free_memory()
    return [am.make_row(suite, name, *shape, **fields[name]) for name in impls]


# ---------------------------------------------------------------- environment and output


def versions() -> dict:
    """torch, triton (without importing it), CUDA, cuDNN and the NVIDIA driver (None where absent)."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": str(cudnn) if cudnn else None,
        "driver": driver_version(),
    }


def driver_version() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _math_sdp_reduction() -> bool | None:
    """Whether SDPA's math backend may reduce in bf16 (False, the default: it computes in float32)."""
    allowed = getattr(torch.backends.cuda, "fp16_bf16_reduction_math_sdp_allowed", None)
    return bool(allowed()) if allowed else None


def today() -> str:
    return datetime.datetime.now(datetime.UTC).date().isoformat()


def write_json(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def load_result(path: Path) -> dict:
    """A result JSON, checked against the schema (the chapters' notebooks rely on it)."""
    result = json.loads(path.read_text())
    missing = {"schema", "device", "peak_tflops", "date", "versions", "rows", "ratios"} - set(result)
    if missing or result["schema"] != am.SCHEMA:
        raise ValueError(f"{path}: not a schema-{am.SCHEMA} attention result (missing {sorted(missing)})")
    for row in result["rows"]:
        if set(row) != set(am.ROW_KEYS) or row["status"] not in am.STATUSES:
            raise ValueError(f"{path}: a row does not follow the schema: {row}")
    return result


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec`` ("9.3f"), or a dash in the same width."""
    width = spec.split(".")[0]
    return format("-", f">{width}") if value is None else format(value, spec)


def _where(suite: str, point: dict) -> str:
    """A ratio's shape in words: layers by L and E, kernels by N, D and causal."""
    if suite == "layers":
        return f"L={point['seq_len']} E={point['heads'] * point['head_dim']}"
    return f"N={point['seq_len']} D={point['head_dim']}{' causal' if point['causal'] else ''}"


def summary(result: dict) -> str:
    """The printed table: every row, then the ratios at each shape."""
    lines = [f"{result['device']}, {result['date']}, " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v)]
    lines.append(
        f"peak {result['peak_tflops']} TFLOP/s dense bf16" if result["peak_tflops"] else "peak unknown: ratios to peak omitted"
    )
    lines.append(
        f"{'suite':8} {'impl':22} {'B':>3} {'H':>3} {'N':>6} {'D':>4} {'causal':6} {'ms':>9} {'IQR':>7} {'TFLOP/s':>8} {'GiB':>6}  {'status':11}  note"
    )
    for r in result["rows"]:
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**30
        lines.append(
            f"{r['suite']:8} {r['impl']:22} {r['batch']:>3} {r['heads']:>3} {r['seq_len']:>6} {r['head_dim']:>4} {r['causal']!s:6} "
            f"{_fmt(r['median_ms'], '9.3f')} {_fmt(r['iqr_ms'], '7.3f')} {_fmt(r['tflops'], '8.1f')} {_fmt(mem, '6.2f')}  {r['status']:11}  {r['note'][:100]}"
        )
    lines.append("ratios (" + am.RATIO_DEFINITION + "):")
    for suite in SUITES:
        for label, data in result["ratios"].get(suite, {}).items():
            points = ", ".join(
                f"{_where(suite, p)}: {p['value']:.2f}" + (f" ({p['best']})" if "best" in p else "") for p in data["points"]
            )
            lines.append(f"  {suite} {label}: geomean {_fmt(data['geomean'], '.2f')}  [{points}]")
    if "peak_note" in result["ratios"]:
        lines.append("  " + result["ratios"]["peak_note"])
    return "\n".join(lines)


def _print_gate(title: str, verdicts: dict[str, tuple[str, str]]) -> None:
    print(f"correctness gate, {title}:")
    for name, (status, note) in verdicts.items():
        print(f"  {name:22} {status:11} {note}")
    sys.stdout.flush()


# ---------------------------------------------------------------- entry points


def cpu_gate(suites: list[str]) -> int:
    """No CUDA: the correctness gate at tiny shapes on the CPU; no timings."""
    wrong = False
    if "layers" in suites:
        g = CPU_GATE["layers"]
        mha32 = make_mha(g["embed_dim"], g["heads"], torch.device("cpu"))
        verdicts = gate_layers(layer_impls(copy.deepcopy(mha32).to(DTYPE)), mha32, g["batch"], g["seq_len"])
        _print_gate(f"layers on the CPU, bf16, E={g['embed_dim']} H={g['heads']} B={g['batch']} L={g['seq_len']}", verdicts)
        wrong |= any(v[0] == "wrong" for name, v in verdicts.items() if name in COURSE_IMPLS)
    for suite, (make_impls, gate, label, _, _, _) in ATTENTION_SUITES.items():
        if suite not in suites:
            continue
        g = CPU_GATE[suite]
        shape = (g["batch"], g["heads"], g["seq_len"], g["head_dim"])
        for causal in (False, True):
            impls = make_impls(causal)
            triton_impl = impls.pop("triton")
            verdicts = gate(impls, shape, causal, torch.device("cpu"))
            if isinstance(triton_impl, str):
                verdicts["triton"] = ("unsupported", triton_impl)
            else:  # bf16 tl.dot is wrong under the interpreter: gate the kernel in float32 instead
                status, note = gate({"triton": triton_impl}, shape, causal, torch.device("cpu"), torch.float32)["triton"]
                verdicts["triton"] = (
                    status,
                    note
                    + " [float32 under TRITON_INTERPRET=1; bf16 skipped on the CPU: the interpreter's bf16 tl.dot gives wrong results]",
                )
            _print_gate(f"{label} on the CPU, bf16, B,H,N,D={shape} causal={causal}", verdicts)
            wrong |= any(v[0] == "wrong" for name, v in verdicts.items() if name in COURSE_IMPLS)
    print("speed ratios need a CUDA GPU; no timings were taken")
    return 1 if wrong else 0


def describe_device(device: torch.device) -> tuple[str, int | None, int | None]:
    """(name, memory in bytes, SM count) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return torch.cuda.get_device_name(device), int(props.total_memory), int(props.multi_processor_count)


def gpu_run(suites: list[str], sweep: Sweep, out_dir: Path, device: torch.device | None = None) -> int:
    """Measure ``suites`` on ``device`` (the current CUDA device), write the JSON, the plots and the summary."""
    device = device or torch.device("cuda")
    name, memory, sms = describe_device(device)
    peak, peak_note = am.detect_peak(name, memory, sms)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = today()
    path = out_dir / f"{date}-{am.device_slug(name)}{'-quick' if sweep.name == 'quick' else ''}.json"
    result = {
        "schema": am.SCHEMA,
        "device": name,
        "peak_tflops": peak,
        "date": date,
        "versions": versions(),
        "rows": [],
        "ratios": {},
    }
    info = {
        "sweep": sweep.name,
        "complete": False,
        "peak": peak_note,
        "device_memory_bytes": memory,
        "sm_count": sms,
        "timing": f"{sweep.rounds} rounds alternating the order of implementations (forward, reversed), {sweep.per_round} chunks per implementation per round; "
        f"a chunk repeats the call back to back for about {sweep.chunk_ms:g} ms between two CUDA events and gives ms per call; median and IQR over the chunks; "
        f"warm-up (>= 3 calls, about {sweep.warmup_ms:g} ms, compilation included) is not timed",
        "gate": f"bf16 output vs a float32 reference at a small shape: max|out - ref| / max|ref| <= {GATE_TOL[DTYPE]:g} (layers: nn.MultiheadAttention in float32 with math SDPA; kernels: math SDPA in float32 on the same inputs)",
        "peak_mem_bytes": "torch.cuda.max_memory_allocated() over one call after reset_peak_memory_stats(): includes the resident inputs and weights",
        "math_sdp_bf16_reduction": _math_sdp_reduction(),
        "sdpa_default_backend": "read from torch.profiler's ATen op names of one call (aten::_scaled_dot_product_<backend>_attention); in each row's note",
        "shapes": {
            "layers": f"B = {sweep.layer_batch}, H = {sweep.layer_heads}, E = H*D in {list(sweep.layer_dims)}, not causal",
            "kernels": f"B*N = {sweep.tokens}, H*D = {sweep.kernel_hidden}",
            "training": f"B*N = {sweep.tokens}, H*D = {sweep.kernel_hidden}; forward + backward",
        },
        "training_gate": f"output and dq, dk, dv in bf16 vs float64 autograd through math SDPA at a small shape: max|x - ref| / max|ref| <= {GRAD_GATE_TOL[DTYPE]:g} each",
        "impls": {
            "naive": "written in the harness: three projections, (B, H, L, L) scores, softmax, weights @ V, output projection",
            "sdpa:*": "layers: one QKV matmul + F.scaled_dot_product_attention + output projection, written in the harness; kernels: F.scaled_dot_product_attention alone; "
            "sdpa:<backend> pinned with torch.nn.attention.sdpa_kernel, sdpa:default unpinned",
            "fused": f"{CH07[0]}.{CH07[1]}",
            "ch04": f"{CH04[0]}.{CH04[1]}",
            "triton": f"kernels: {CH08[0]}.{CH08[1]}; training: {CH09[0]}.{CH09[1]}.apply, then torch.autograd.grad",
        },
    }
    print(f"{name}: {peak_note}\nwriting {path}")

    def record(rows: list[dict]) -> None:
        result["rows"].extend(rows)
        result["ratios"] = {**am.compute_ratios(result["rows"], peak), **info}
        write_json(path, result)

    started = time.perf_counter()
    with torch.no_grad():
        if "layers" in suites:
            run_layers(sweep, device, record)
        for suite in ATTENTION_SUITES:
            if suite in suites:
                run_attention_suite(suite, sweep, device, record)
    info["complete"] = True
    info["wall_seconds"] = round(time.perf_counter() - started, 1)
    record([])
    print(summary(result))
    for png in plots.plot_result(result, path):
        print(f"wrote {png}")
    print(f"wrote {path} in {info['wall_seconds']:.0f} s")
    return 1 if any(r["status"] == "wrong" and r["impl"] in COURSE_IMPLS for r in result["rows"]) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON and PNGs")
    parser.add_argument("--quick", action="store_true", help="a reduced sweep (under 2 minutes on an H100)")
    parser.add_argument("--suite", default=",".join(SUITES), help="comma-separated: " + ", ".join(SUITES))
    parser.add_argument("--plot-only", type=Path, metavar="FILE.json", help="redraw the plots (and the summary) of a result")
    args = parser.parse_args(argv)
    if args.plot_only:
        result = load_result(args.plot_only)
        print(summary(result))
        for png in plots.plot_result(result, args.plot_only):
            print(f"wrote {png}")
        return 0
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    if not suites or set(suites) - set(SUITES):
        parser.error(f"--suite takes any of {', '.join(SUITES)}, got {args.suite!r}")
    torch.set_float32_matmul_precision("highest")  # float32 references without TF32
    if torch.cuda.is_available():
        if os.environ.pop("TRITON_INTERPRET", None) and "triton" not in sys.modules:
            print("note: TRITON_INTERPRET was set; unset it so the Triton kernel runs compiled on the GPU")
        return gpu_run(suites, QUICK if args.quick else FULL, args.out)
    if "triton" not in sys.modules:  # before anything imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    with torch.no_grad():
        return cpu_gate(suites)


if __name__ == "__main__":
    sys.exit(main())
