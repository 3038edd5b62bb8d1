"""Arithmetic and bookkeeping of the attention benchmark, free of any GPU: FLOP counts, the
GPU's peak, medians and IQRs, the alternating order of implementations, guarded calls
(out of memory, unsupported backend) and the ratios reported in one run.

``benchmarks/attention.py`` drives the GPU; this module is what ``tests/test_benchmarks.py``
checks on a CPU.
"""

from __future__ import annotations

import math
import re
import statistics
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

SCHEMA = 1
STATUSES = ("ok", "oom", "unsupported", "wrong")
ROW_KEYS = (
    "suite",
    "impl",
    "batch",
    "heads",
    "seq_len",
    "head_dim",
    "causal",
    "dtype",
    "median_ms",
    "iqr_ms",
    "tflops",
    "peak_mem_bytes",
    "status",
    "note",
)
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
PINNED_SDPA = tuple(f"sdpa:{b}" for b in SDPA_BACKENDS)
LAYER_IMPLS = ("naive", "ch04", "nn.MultiheadAttention", "fused", "sdpa:default", *PINNED_SDPA)
KERNEL_IMPLS = ("triton", "sdpa:default", *PINNED_SDPA)
# forward + backward: the fused backends only (math SDPA's backward materialises the L x L matrices)
TRAINING_IMPLS = ("triton", "sdpa:default", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # the backward's five matmuls against the forward's two

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s.
PEAKS = {"H100 SXM": 989.0, "H200": 989.0, "H100 PCIe": 756.0}

FLOPS_CONVENTION = {
    "kernels": "attention only: 4*B*H*N*N*D per forward (two matmuls, a multiply-add = 2 FLOPs), halved when causal",
    "training": "attention only, forward + backward: 3.5 x the forward's 4*B*H*N*N*D (backward 2.5 x), halved when causal",
    "layers": "whole layer: attention 4*B*H*L*L*D plus the projections 8*B*L*E^2 (Q, K, V and output, E = H*D); "
    "softmax, scale and biases are not counted",
}
BACKEND_NOTE = "SDPA backend seen by torch.profiler: "
RATIO_DEFINITION = (
    "ours/X = median time of X / median time of ours at the same shape, in the same run "
    "(= TFLOP/s of ours / TFLOP/s of X; above 1 means ours is faster); "
    "ours/peak = achieved TFLOP/s / peak_tflops"
)


# ---------------------------------------------------------------- FLOPs and throughput


def attention_flops(batch: int, heads: int, L: int, S: int, head_dim: int, causal: bool = False, mode: str = "fwd") -> float:
    """FLOPs of one attention forward on q (B, H, L, D), k and v (B, H, S, D): Q K^T and P V,
    2*B*H*L*S*D each; halved when causal (the FlashAttention papers' convention). ``mode`` "bwd" is 2.5x that
    (the backward recomputes Q K^T and adds dV, dP, dQ and dK), "fwd+bwd" 3.5x."""
    flops = 4.0 * batch * heads * L * S * head_dim * FLOP_FACTOR[mode]
    return flops / 2 if causal else flops


def layer_flops(batch: int, L: int, embed_dim: int, heads: int, causal: bool = False) -> float:
    """FLOPs of one self-attention layer forward on x (B, L, E): attention plus the Q, K, V and
    output projections (4 matmuls of 2*B*L*E*E)."""
    return attention_flops(batch, heads, L, L, embed_dim // heads, causal) + 8.0 * batch * L * embed_dim**2


def tflops(flops: float, median_ms: float | None) -> float | None:
    """Achieved TFLOP/s, or None without a time."""
    if median_ms is None or median_ms <= 0:
        return None
    return flops / (median_ms * 1e-3) / 1e12


# ---------------------------------------------------------------- the device's peak


def detect_peak(name: str, total_memory: int | None = None, sm_count: int | None = None) -> tuple[float | None, str]:
    """Dense bf16 peak TFLOP/s of a GPU from its ``torch.cuda.get_device_name()``, and how it was decided.

    H100 SXM and H200: 989; H100 PCIe: 756. An H100 whose name says neither (for example
    "NVIDIA H100 80GB HBM3" is the SXM board; HBM3 says so) is told apart by its SM count
    (132 SXM, 114 PCIe). Anything else, NVL boards and GH200 included, gives None: the ratio
    to peak is then left out rather than guessed.
    """
    upper = name.upper()
    gib = f", {total_memory / 2**30:.0f} GiB" if total_memory else ""
    sms = f", {sm_count} SMs" if sm_count else ""
    seen = f"{name!r}{gib}{sms}"
    if "GH200" in upper or "NVL" in upper:
        return None, f"{seen}: this variant's peak is not in the table (H100 SXM/H200 989, H100 PCIe 756); ratio to peak omitted"
    if re.search(r"\bH200\b", upper):
        return PEAKS["H200"], f"{seen}: H200, {PEAKS['H200']:.0f} TFLOP/s dense bf16 (the H100 SXM's compute)"
    if re.search(r"\bH100\b", upper):
        if "PCIE" in upper:
            return PEAKS["H100 PCIe"], f"{seen}: H100 PCIe by name, {PEAKS['H100 PCIe']:.0f} TFLOP/s dense bf16"
        if "SXM" in upper or "HBM3" in upper:
            return PEAKS["H100 SXM"], f"{seen}: H100 SXM by name, {PEAKS['H100 SXM']:.0f} TFLOP/s dense bf16"
        if sm_count == 132:
            return PEAKS["H100 SXM"], f"{seen}: H100 SXM by its 132 SMs, {PEAKS['H100 SXM']:.0f} TFLOP/s dense bf16"
        if sm_count == 114:
            return PEAKS["H100 PCIe"], f"{seen}: H100 PCIe by its 114 SMs, {PEAKS['H100 PCIe']:.0f} TFLOP/s dense bf16"
        return None, f"{seen}: an H100 whose variant could not be told; ratio to peak omitted"
    return None, f"unknown GPU {seen}: no peak in the table; ratio to peak omitted"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (for the result's file name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = re.sub(r"^nvidia-", "", slug)
    return slug or "unknown-device"


# ---------------------------------------------------------------- statistics and order


def median_iqr(samples: Sequence[float]) -> tuple[float, float]:
    """Median and interquartile range (q75 - q25, quartiles by linear interpolation, as
    ``numpy.percentile``'s default) of at least one sample."""
    if not samples:
        raise ValueError("median_iqr needs at least one sample")
    values = sorted(float(s) for s in samples)
    if len(values) == 1:
        return values[0], 0.0

    def quantile(q: float) -> float:
        pos = q * (len(values) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(values) - 1)
        return values[lo] + (values[hi] - values[lo]) * (pos - lo)

    return statistics.median(values), quantile(0.75) - quantile(0.25)


def alternating_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of implementations in each round: as given in even rounds, reversed in odd
    ones, so no implementation always runs first (cold clocks) or last (warm caches)."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def round_robin(samplers: dict[str, Callable[[], float]], rounds: int, per_round: int = 1) -> dict[str, list[float]]:
    """Call each sampler ``per_round`` times per round, in ``alternating_orders``; every call
    returns one timing sample (ms). Returns the samples of each implementation."""
    samples: dict[str, list[float]] = {name: [] for name in samplers}
    for order in alternating_orders(list(samplers), rounds):
        for name in order:
            for _ in range(per_round):
                samples[name].append(samplers[name]())
    return samples


# ---------------------------------------------------------------- guarded calls


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an error message (or of a string)."""
    text = str(error)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__ if isinstance(error, BaseException) else ""


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError from 2.5 on


def is_oom(error: BaseException) -> bool:
    return isinstance(error, OUT_OF_MEMORY) or "out of memory" in str(error).lower()


def guarded(fn: Callable[[], Any]) -> tuple[str, str, Any]:
    """Run ``fn()``: ("ok", "", result), ("oom", first line, None) on running out of memory, or
    ("unsupported", first line, None) on any other error (a pinned SDPA backend that cannot
    run this shape raises RuntimeError "No available kernel"; the reasons PyTorch gives in
    warnings just before are appended to the note)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return "ok", "", fn()
        except Exception as error:  # one failing point must never stop the run
            if is_oom(error):
                return "oom", first_line(error), None
            note = f"{type(error).__name__}: {first_line(error)}"
            reasons = "; ".join(dict.fromkeys(first_line(str(w.message)) for w in caught))
            if reasons:  # PyTorch warns why each backend was refused, one line per reason
                note += f" (warnings: {reasons[:400]})"
            return "unsupported", note, None


# ---------------------------------------------------------------- rows and ratios


def make_row(suite: str, impl: str, batch: int, heads: int, seq_len: int, head_dim: int, causal: bool, **fields: Any) -> dict:
    """One row of the result, every key of the schema present, in the schema's order."""
    row = {
        "suite": suite,
        "impl": impl,
        "batch": int(batch),
        "heads": int(heads),
        "seq_len": int(seq_len),
        "head_dim": int(head_dim),
        "causal": bool(causal),
        "dtype": "bfloat16",
        "median_ms": None,
        "iqr_ms": None,
        "tflops": None,
        "peak_mem_bytes": None,
        "status": "ok",
        "note": "",
    }
    unknown = set(fields) - set(row)
    if unknown:
        raise KeyError(f"not in the schema: {sorted(unknown)}")
    row.update(fields)
    if row["status"] not in STATUSES:
        raise ValueError(f"status {row['status']!r} is not one of {STATUSES}")
    return row


def speed_ratio(ours_ms: float | None, other_ms: float | None) -> float | None:
    """ours/other as a speed ratio: other's time over ours (None when either is missing)."""
    if ours_ms is None or other_ms is None or ours_ms <= 0 or other_ms <= 0:
        return None
    return other_ms / ours_ms


def fraction_of_peak(achieved_tflops: float | None, peak: float | None) -> float | None:
    if achieved_tflops is None or not peak:
        return None
    return achieved_tflops / peak


def _shape_key(row: dict) -> tuple:
    return (row["suite"], row["batch"], row["heads"], row["seq_len"], row["head_dim"], row["causal"])


def _shape(row: dict) -> dict:
    return {k: row[k] for k in ("batch", "heads", "seq_len", "head_dim", "causal")}


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def compute_ratios(rows: list[dict], peak: float | None) -> dict:
    """The ratios of one run, per shape and as geometric means over the shapes where both ran.

    layers:  fused/nn.MultiheadAttention, fused/sdpa:default, fused/peak
    kernels: triton/sdpa:default, triton/best_sdpa (the fastest pinned backend at that shape,
             named), triton/peak
    and, under "sdpa_backend_seen", the backend SDPA chose by itself wherever a row's note names it.
    """
    by_shape: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["status"] == "ok" and row["median_ms"] is not None:
            by_shape.setdefault(_shape_key(row), {})[row["impl"]] = row

    def per_shape(suite: str, ours: str, other: str | None) -> list[dict]:
        out = []
        for key, impls in sorted(by_shape.items(), key=lambda kv: (kv[0][4], kv[0][5], kv[0][3])):
            if key[0] != suite or ours not in impls:
                continue
            mine = impls[ours]
            if other == "peak":
                value = fraction_of_peak(mine["tflops"], peak)
                entry = {}
            elif other == "best_sdpa":
                pinned = [impls[name] for name in PINNED_SDPA if name in impls]
                if not pinned:
                    continue
                best = min(pinned, key=lambda r: r["median_ms"])
                value = speed_ratio(mine["median_ms"], best["median_ms"])
                entry = {"best": best["impl"]}
            else:
                if other not in impls:
                    continue
                value = speed_ratio(mine["median_ms"], impls[other]["median_ms"])
                entry = {}
            if value is not None:
                out.append({**_shape(mine), **entry, "value": value})
        return out

    ratios: dict[str, Any] = {"definition": RATIO_DEFINITION, "flops": FLOPS_CONVENTION}
    wanted = {
        "layers": {
            "fused/nn.MultiheadAttention": ("fused", "nn.MultiheadAttention"),
            "fused/sdpa:default": ("fused", "sdpa:default"),
        },
        "kernels": {
            "triton/sdpa:default": ("triton", "sdpa:default"),
            "triton/best_sdpa": ("triton", "best_sdpa"),
        },
    }
    wanted["training"] = dict(wanted["kernels"])  # forward + backward: the same ratios
    if peak:
        wanted["layers"]["fused/peak"] = ("fused", "peak")
        wanted["kernels"]["triton/peak"] = ("triton", "peak")
        wanted["training"]["triton/peak"] = ("triton", "peak")
    else:
        ratios["peak_note"] = "peak_tflops is null for this device: ours/peak omitted"
    seen = [
        {"suite": r["suite"], "impl": r["impl"], **_shape(r), "backend": r["note"].removeprefix(BACKEND_NOTE)}
        for r in rows
        if r["note"].startswith(BACKEND_NOTE)
    ]
    if seen:
        ratios["sdpa_backend_seen"] = seen
    for suite, pairs in wanted.items():
        if not any(r["suite"] == suite for r in rows):
            continue
        ratios[suite] = {}
        for label, (ours, other) in pairs.items():
            points = per_shape(suite, ours, other)
            ratios[suite][label] = {"geomean": _geomean([p["value"] for p in points]), "points": points}
    return ratios
