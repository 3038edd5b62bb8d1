"""Checks for chapter 9, training with FlashAttention: the backward pass and decoding.

Oracles, all computed here and never taken from ``solutions/``:

* gradients: ``torch.autograd`` through PyTorch's ``F.scaled_dot_product_attention`` with the math backend,
  in float64, on the exact values handed to the student (low-precision inputs are rounded first), with an
  explicit bottom-right causal mask (query i sees key j iff j <= i + S - L). A query that sees no key gets a
  zero output and zero gradients.
* the forward's out and logsumexp that the backward functions receive: the same float64 SDPA and a float64
  logsumexp of the visible scaled scores.
* the error budget: PyTorch's own math-backend gradients at the student's dtype against the float64 oracle.
* ``torch.autograd.gradcheck`` in float64, run here on a small autograd Function whose forward or backward
  calls the student's code (through the data-only wire when grading).

Wrong answers are compared with float64 NumPy versions of known mistakes (no D term, D from one tile, the
scale missing from dK or dQ, a top-left or off-by-one causal bound, dQ overwritten by each key block, ...)
to name them. Properties of the call are watched where the student's code runs: chapter 8's dispatch-mode
recorder gives the largest tensor a call creates (the tiled backward must not create an L x S one), the
aten operations it ran and its Triton launches (the Triton backward must compute in kernels); the probe
:func:`observe_function` reports what an autograd Function saved for its backward.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from autograder.checks import torch_refs as R
from autograder.checks import trusted as T
from autograder.checks.ch08 import (
    _as_tensor,
    _device,
    _is_torch_math,
    _LaunchCounter,
    _np_ascontiguous,
    _observed,
    _Recorder,
    _transpose,
    _visible,
)
from autograder.checks.ch08 import _inputs as _ch08_inputs
from autograder.checks.common import CheckFailure, call, diagnose, max_error, passed, show
from autograder.checks.torch_refs import BF16, F16, F32, F64
from autograder.grading.remote import current_remote, is_remote

if not torch.cuda.is_available():  # as the chapter's setup cell: Triton runs interpreted without a GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ---------------------------------------------------------------------------------------------
# References captured at import time (a student cell may rebind torch or numpy attributes).
_sdpa_kernel = sdpa_kernel
_MATH = SDPBackend.MATH
_gradcheck = torch.autograd.gradcheck
_Function = torch.autograd.Function
_enable_grad = torch.enable_grad
_detach = R.TB.detach
_requires_grad = R.TB.__dict__["requires_grad"].__get__
_grad_fn = R.TB.__dict__["grad_fn"].__get__
_np_matmul = np.matmul
_np_sum = np.sum
_np_log = np.log
_np_full = np.full
_np_maximum = np.maximum
_np_inf = np.inf
_np_repeat = np.repeat
_np_stack = np.stack
_int = int
_str = str
_range = range
_min = min
_max = max
_getattr = getattr
_zip = zip
_enumerate = enumerate
_sorted = sorted

# ---------------------------------------------------------------------------------------------
# Mistakes, by the phrase that names them (the mutants' diagnoses quote these).
NO_DELTA = "forgot D: the softmax's backward is dS = P * (dP - D) with D_i = rowsum(dO * O) (= rowsum(P * dP)), not dS = P * dP."
DELTA_TILE = (
    "computed D from one tile: D_i = rowsum(P * dP) sums over all the keys of row i, so a tile's own "
    "rowsum(P_j * dP_j) is not it; use D_i = rowsum(dO * O), which needs no keys at all."
)
DELTA_NO_O = "computed D as rowsum(dO): D_i = rowsum(dO * O), the row sums of the elementwise product with the output."
DK_SCALE = "dK is missing the scale: the scores are q k^T / sqrt(D), so dK = dS^T Q / sqrt(D) (and dQ = dS K / sqrt(D))."
DQ_SCALE = "dQ is missing the scale: the scores are q k^T / sqrt(D), so dQ = dS K / sqrt(D)."
P_UNNORMALISED = (
    "recomputed P without the logsumexp: the forward's weights are P = exp(s - lse), with lse the logsumexp "
    "of the whole row (what the forward saved); exp(s) or exp(s - the tile's max) is not normalised over the row."
)
P_TILE_SOFTMAX = (
    "recomputed P as a softmax of each tile: P_ij = exp(s_ij - lse_i) is normalised over the whole row, "
    "which is what the saved logsumexp lse_i gives you without seeing the other tiles."
)
TOP_LEFT = (
    "the backward used a top-left causal bound (key j visible to query i iff j <= i); with L != S it is "
    "bottom-right aligned as in the forward: j <= i + (S - L)."
)
OFF_BY_ONE = "the backward's causal mask is off by one: query i sees key j iff j <= i + (S - L), its own position included."
NOT_CAUSAL = "the backward ignored causal=True: the recomputed P must be masked exactly as in the forward."
DQ_OVERWRITE = (
    "dQ holds only one key block's contribution: every key block adds dS_j K_j / sqrt(D) to dQ; accumulate "
    "(dq += ...) over all key blocks instead of overwriting it (in a kernel: one program owns a block of dQ "
    "and loops over the key blocks, or the programs add with tl.atomic_add)."
)
DV_FROM_DS = "dV uses dS instead of P: dV = P^T dO (the output is P V, so its gradient with respect to V is P^T dO)."
USED_OUT = (
    "used the output O where the recomputed weights P belong: dV = P^T dO with P = exp(s - lse), an (L, S) tile "
    "per block of keys, not O^T dO (O = P V is what the forward returned, not the weights)."
)
SWAPPED = "returned the gradients in the wrong order: (dq, dk, dv)."
FULL_MATRIX = "flash_attention_backward_tiled created a tensor as large as the whole (L, S) matrix"
BLOCK_IGNORED = (
    "ignored block_size: the tiles of scores, P, dP and dS are (..., L, block_size), one block of keys at a time, "
    "with the block_size the caller passes (not a size of your own)"
)
FP16_ACCUM = (
    "accumulated in float16 (or bfloat16): summed over many key blocks, dq (and the products of each tile) lose "
    "bits at every step; compute the tiles and keep dq, dk and dv in float32, and cast to q's dtype once, at the end."
)
STRIDED = (
    "assumed contiguous inputs: here q, k, v and grad_out are transposed views (as autograd hands a backward "
    "the gradient of a permuted output), so their memory is not laid out as (BH, L, D); call .contiguous() on "
    "them (or pass their strides to the kernels) before indexing rows as bh * L * D + row * D + column."
)
FUNCTION_SDPA = (
    "called PyTorch's scaled_dot_product_attention (or its autograd): the forward is chapter 8's tiled_attention, "
    "the backward flash_attention_backward_tiled with the saved out and logsumexp"
)
GRAD_DTYPE = (
    "returned the gradients in another dtype: dq, dk and dv come back in the dtypes of q, k and v; compute in "
    "float32 inside, and cast once, at the end (.to(q.dtype))"
)
OUT_DTYPE = (
    "returned out in another dtype: the forward returns out in q's dtype and saves q, k and v themselves; the "
    "kernels compute in float32 inside, not on float32 copies of the inputs"
)
FUNCTION_FULL = "created a tensor as large as the whole (L, S) score matrix"
FUNCTION_TORCH = (
    "computed attention with PyTorch maths where Triton kernels belong: the forward is chapter 8's "
    "flash_attention(q, k, v, causal=causal, return_lse=True) alone (it returns the logsumexp too), the backward "
    "flash_attention_backward"
)
USED_TORCH = "flash_attention_backward must compute in Triton kernels, not with PyTorch's matrix products or exp"
NO_KERNEL = "flash_attention_backward did not launch a Triton kernel"
STORE_MASK = "wrote outside the tensors it was given: mask the stores of the last, partial tiles (rows < L, cols < S)."
UNWRITTEN = (
    "NaN in a gradient: new tensors hold a NaN sentinel during this check, so entries the kernels never stored "
    "show up as NaN. Does each grid cover every block (cdiv(S, BLOCK_N) key blocks for dK and dV, cdiv(L, BLOCK_M) "
    "query blocks for dQ) of every (batch, head), and does every program store its whole block?"
)
SAVED_P = (
    "saved a tensor as large as the (L, S) weights for the backward: FlashAttention saves only the (..., L) "
    "logsumexp beside q, k, v and out, and recomputes P tile by tile in the backward."
)
SAVED_COUNT = "save exactly five tensors with ctx.save_for_backward(q, k, v, out, lse)"
CTX_TENSOR = "kept a tensor as an attribute of ctx: tensors for the backward go through ctx.save_for_backward"
NO_LSE = "saved no (..., L) logsumexp"
GQA_MOD = (
    "mapped query head h to key/value head h % H_kv: with grouped-query attention consecutive query heads share "
    "a key/value head, h // (H / H_kv) (as repeat_interleave does, and chapter 6's GroupedQueryAttention)."
)
COMBINE_MEAN = (
    "averaged the splits' outputs: the splits have different weights; the exact combine is "
    "out = sum_s exp(lse_s - lse) out_s with lse = logsumexp over the splits of lse_s."
)
COMBINE_NO_MAX = (
    "combined the splits without subtracting the max: exp(lse_s) overflows for large scores; use "
    "exp(lse_s - max_s lse_s) (or torch.logsumexp) when you merge the splits."
)
DROP_TAIL = (
    "dropped the last keys: when num_splits does not divide S, the splits must still cover all S keys "
    "(chunks of ceil(S / num_splits), the last one shorter)."
)
EMPTY_SPLIT = (
    "an empty split (num_splits > S) must contribute nothing: its logsumexp is -inf and its weight "
    "exp(-inf - lse) = 0; skip it, or guard 0/0."
)
COPIED_KV = (
    "copied K or V for every query head (repeat_interleave, expand + contiguous, or indexing with a head map): "
    "grouped-query decoding reads each key/value head once for its whole group of query heads; reshape q to "
    "(B, H_kv, H / H_kv, D) instead"
)
DECODE_SCALE = "did not scale the scores by 1/sqrt(D)."
IGNORED_SPLITS = (
    "ignored num_splits: it reduced over all S keys at once (a softmax, max, sum or matrix product along the whole "
    "key axis). Split-KV decoding cuts the keys into num_splits chunks that each reduce only over their own keys "
    "(so they can run in parallel), then merges the chunks' outputs by their logsumexp"
)
NO_TRITON_FORWARD = (
    "no Triton kernel ran in the forward: use chapter 8's flash_attention(q, k, v, causal=causal, return_lse=True)"
)
NO_TRITON_BACKWARD = "no Triton kernel ran in the backward: call flash_attention_backward"
CHAIN_HINT = "If flash_attention_backward_tiled (the first exercise) fails its own tests, fix it first: this class uses it."
CHAIN_HINT_TRITON = "If flash_attention_backward (the Triton exercise) fails its own tests, fix it first: this class uses it."


# ---------------------------------------------------------------------------------------------
# Float64 oracle (torch.autograd through SDPA's math backend) and the known mistakes (NumPy)


def _oracle(q, k, v, g, causal: bool) -> tuple:
    """(out, lse, dq, dk, dv), float64 NumPy, from torch.autograd through SDPA (math backend)."""
    L, S = q.shape[-2], k.shape[-2]
    qt, kt, vt = (R.requires_grad_(R.from_numpy(T.np_array(a, dtype=T.np_float64))) for a in (q, k, v))
    mask = R.from_numpy(_visible(L, S, causal)) if causal else None
    with _enable_grad(), _sdpa_kernel(_MATH):
        out = R.sdpa(qt, kt, vt, attn_mask=mask)
        grads = R.autograd_grad(R.t_sum(R.t_mul(out, R.from_numpy(T.np_array(g, dtype=T.np_float64)))), (qt, kt, vt))
    scores = _np_matmul(q, T.np_swapaxes(k, -1, -2)) / T.sqrt(q.shape[-1])
    scores = T.np_where(_visible(L, S, causal), scores, -_np_inf)
    with T.np_errstate(all="ignore"):
        m = T.np_max(scores, axis=-1)
        safe = T.np_where(T.np_isfinite(m), m, 0.0)
        lse = safe + _np_log(_np_sum(T.np_exp(scores - safe[..., None]), axis=-1))
    return (T.tensor_to_float64(out), lse, *(T.tensor_to_float64(t) for t in grads))


def _sdpa_grad_error(q, k, v, g, causal: bool, dtype, expected: tuple) -> list:
    """How far PyTorch's math-backend gradients at ``dtype`` land from the float64 ones (0 for float64)."""
    if dtype == F64:
        return [0.0, 0.0, 0.0]
    L, S = q.shape[-2], k.shape[-2]
    qt, kt, vt = (R.requires_grad_(R.tensor_of(a, dtype)) for a in (q, k, v))
    mask = R.from_numpy(_visible(L, S, causal)) if causal else None
    with _enable_grad(), _sdpa_kernel(_MATH):
        out = R.sdpa(qt, kt, vt, attn_mask=mask)
        grads = R.autograd_grad(R.t_sum(R.t_mul(out, R.tensor_of(g, dtype))), (qt, kt, vt))
    return [max_error(T.tensor_to_float64(t), e) for t, e in _zip(grads, expected, strict=True)]


def _grads_np(q, k, v, out, lse, g, causal: bool, mistake: str = "", block: int = 16) -> tuple:
    """Float64 NumPy backward (dq, dk, dv) with one optional mistake, from the given out and lse."""
    L, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / T.sqrt(d)
    vis = _visible(
        L, S, causal, {"top_left": "top_left", "off_by_one": "off_by_one", "not_causal": "not_causal"}.get(mistake, "")
    )
    s = _np_matmul(q, T.np_swapaxes(k, -1, -2)) * scale
    s = T.np_where(vis, s, -_np_inf)
    with T.np_errstate(all="ignore"):
        lse_safe = T.np_where(T.np_isfinite(lse), lse, 0.0)[..., None]
        if mistake == "p_unnormalised":
            p = T.np_exp(s)
        elif mistake == "p_tile_softmax":
            p = T.np_zeros(s.shape)
            for start in _range(0, S, block):
                tile = s[..., start : start + block]
                m = T.np_max(tile, axis=-1, keepdims=True)
                e = T.np_exp(tile - T.np_where(T.np_isfinite(m), m, 0.0))
                tot = _np_sum(e, axis=-1, keepdims=True)
                p[..., start : start + block] = T.np_where(tot > 0, e / T.np_where(tot > 0, tot, 1.0), 0.0)
        else:
            p = T.np_exp(s - lse_safe)
        p = T.np_where(vis, p, 0.0)
    dv = _np_matmul(T.np_swapaxes(p, -1, -2), g)
    dp = _np_matmul(g, T.np_swapaxes(v, -1, -2))
    delta = _np_sum(g * out, axis=-1, keepdims=True)
    if mistake == "no_delta":
        ds = p * dp
    elif mistake == "delta_no_o":
        ds = p * (dp - _np_sum(g, axis=-1, keepdims=True))
    elif mistake == "delta_tile":
        ds = T.np_zeros(p.shape)
        for start in _range(0, S, block):
            pj, dpj = p[..., start : start + block], dp[..., start : start + block]
            ds[..., start : start + block] = pj * (dpj - _np_sum(pj * dpj, axis=-1, keepdims=True))
    else:
        ds = p * (dp - delta)
    if mistake == "dv_from_ds":
        dv = _np_matmul(T.np_swapaxes(ds, -1, -2), g)
    dq = _np_matmul(ds, k) * (1.0 if mistake == "dq_scale" else scale)
    if mistake == "dq_overwrite":  # only the last key block that any query sees is left in dQ
        last = (S - 1) // block * block
        dq = _np_matmul(ds[..., last:], k[..., last:, :]) * scale
    dk = _np_matmul(T.np_swapaxes(ds, -1, -2), q) * (1.0 if mistake in ("dk_scale",) else scale)
    return dq, dk, dv


def _grad_prints(q, k, v, out, lse, g, causal: bool, blocks: tuple) -> list:
    """Fingerprints of (dq, dk, dv): a dict per gradient, message -> function giving that gradient."""
    cache: dict = {}

    def grads(mistake: str, block: int = 16):
        key = (mistake, block)
        if key not in cache:
            cache[key] = _grads_np(q, k, v, out, lse, g, causal, mistake, block)
        return cache[key]

    single = [("no_delta", NO_DELTA), ("delta_no_o", DELTA_NO_O), ("p_unnormalised", P_UNNORMALISED)]
    single += [("dk_scale", DK_SCALE), ("dq_scale", DQ_SCALE), ("dv_from_ds", DV_FROM_DS)]
    if causal:
        single += [("top_left", TOP_LEFT), ("off_by_one", OFF_BY_ONE), ("not_causal", NOT_CAUSAL)]
    tiled = [("delta_tile", DELTA_TILE), ("p_tile_softmax", P_TILE_SOFTMAX), ("dq_overwrite", DQ_OVERWRITE)]
    prints = [{}, {}, {}]
    for which in _range(3):
        for mistake, message in single:
            prints[which][message] = lambda mistake=mistake, which=which: grads(mistake)[which]
        for mistake, message in tiled:
            for block in blocks:
                if block < k.shape[-2]:
                    prints[which][f"{message} (key blocks of {block})"] = lambda m=mistake, b=block, w=which: grads(m, b)[w]
    right = grads("")
    prints[0][SWAPPED + " (this looks like dk)"] = lambda: right[1] if right[1].shape == q.shape else None
    prints[1][SWAPPED + " (this looks like dq)"] = lambda: right[0] if right[0].shape == k.shape else None
    return prints


# ---------------------------------------------------------------------------------------------
# Comparing


def _atol(dtype, base_error: float, scale: float) -> float:
    floor = {F64: 1e-9, F32: 2e-5, F16: 4e-3, BF16: 3e-2}[dtype]
    return _max(4.0 * base_error, floor * _max(1.0, scale))


def _fail(label: str, what: str, got, expected, atol: float, mistake: str | None, extra: str = "") -> None:
    if T._tuple(got.shape) != T._tuple(expected.shape):
        first = f"{label}: {what} should have shape {T._tuple(expected.shape)}, got {T._tuple(got.shape)}."
    else:
        first = f"{label}: {what} is wrong (largest error {max_error(got, expected):.3g}, tolerance {atol:.2g})."
    lines = [first, f"  expected: {show(expected)}", f"  got:      {show(got)}"]
    if not T.np_isfinite(got).all() and T.np_isfinite(expected).all():
        lines.append("  Your result contains NaN or inf where the correct one is finite.")
    if mistake:
        lines.append(f"  Likely mistake: {mistake}")
    if extra:
        lines.append(f"  {extra}")
    raise CheckFailure("\n".join(lines))


def _compare(got, expected, *, label: str, what: str, atol: float, fingerprints: dict, extra: str = "") -> None:
    if T._tuple(got.shape) == T._tuple(expected.shape) and max_error(got, expected) <= atol:
        return
    same_shape = T._tuple(got.shape) == T._tuple(expected.shape)
    mistake = diagnose(got, _dropping_none(fingerprints), atol=_max(atol, 1e-9)) if same_shape else None
    _fail(label, what, got, expected, atol, mistake, extra)


def _dropping_none(prints: dict) -> dict:
    """Fingerprints whose function returns None (not applicable) are left out."""
    out = {}
    for message, fn in prints.items():
        value = fn()
        if value is not None:
            out[message] = lambda value=value: value
    return out


def _inputs(rng, lead: tuple, L: int, S: int, d: int, dtype, scale: float = 1.0, dv: int | None = None):
    """Chapter 8's (q, k, v) and an output gradient g (..., L, Dv), all rounded to ``dtype``."""
    q, k, v = _ch08_inputs(rng, lead, L, S, d, dtype, scale, dv)
    return q, k, v, R.rounded(rng.normal(size=lead + (L, dv or d)), dtype)


def _compare_grads(grads: tuple, q, k, v, g, oracle: tuple, *, label: str, dtype, causal: bool, blocks: tuple, extra="",
                   accumulate: bool = False):  # fmt: skip
    """Judge (dq, dk, dv) float64 arrays against the oracle, naming a known mistake when one matches.

    With ``accumulate`` (a low-precision case over many key blocks) the tolerance is six times PyTorch's own error,
    without the usual floor: float32 accumulation lands within about twice it, float16 accumulation ten times and more.
    """
    out64, lse64, dq, dk, dv = oracle
    errors = _sdpa_grad_error(q, k, v, g, causal, dtype, (dq, dk, dv))
    prints = _grad_prints(q, k, v, out64, lse64, g, causal, blocks)
    for i, (name, got, exp) in _enumerate(_zip(("dq", "dk", "dv"), grads, (dq, dk, dv), strict=True)):
        scale = float(T.np_max(T.np_abs(exp))) if exp.size else 1.0
        atol = _max(6.0 * errors[i], 1e-5 * _max(1.0, scale)) if accumulate else _atol(dtype, errors[i], scale)
        hint = f"Likely mistake: {FP16_ACCUM}" if accumulate and not extra else extra
        _compare(got, exp, label=label, what=name, atol=atol, fingerprints={} if accumulate else prints[i], extra=hint)


def _grad_results(result, q, k, v, *, label: str, dtypes: tuple, out=None, g=None) -> tuple:
    """The three gradients as float64 arrays, after their type, dtype and shape are checked (a wrong shape that
    is another gradient's, or that of out^T dO, is named)."""
    if T._type(result) not in (T._tuple, T._list) or T._len(result) != 3:
        raise CheckFailure(f"{label}: should return a tuple (dq, dk, dv), got {T.type_name(result)}.")
    shapes = [T._tuple(R.shape_of(r)) if T.is_tensor(r) else None for r in result]
    wanted = [T._tuple(a.shape) for a in (q, k, v)]
    if shapes != wanted and _sorted(shapes, key=_str) == _sorted(wanted, key=_str):
        raise CheckFailure(
            f"{label}: the gradients have shapes {shapes}, expected {wanted} for (dq, dk, dv). Likely mistake: {SWAPPED}"
        )
    if out is not None and T.is_tensor(result[2]) and shapes[2] != wanted[2]:
        used_out = _np_matmul(T.np_swapaxes(out, -1, -2), g)  # (..., Dv, Dv): out where P belongs
        if shapes[2] == T._tuple(used_out.shape):
            got = T.tensor_to_float64(result[2])
            if max_error(got, used_out) <= 1e-3 * _max(1.0, float(T.np_max(T.np_abs(used_out)))):
                raise CheckFailure(f"{label}: dv should have shape {wanted[2]}, got {shapes[2]}. Likely mistake: {USED_OUT}")
    for r, name, dt in _zip(result, ("dq", "dk", "dv"), dtypes, strict=True):
        if T.is_tensor(r) and R.dtype_of(r) != dt:
            raise CheckFailure(
                f"{label}: {name} is {R.dname(R.dtype_of(r))}, expected {R.dname(dt)}. Likely mistake: {GRAD_DTYPE}."
            )
    return T._tuple(
        _as_tensor(r, label=label, what=name, dtype=dt, shape=a.shape)
        for r, name, dt, a in _zip(result, ("dq", "dk", "dv"), dtypes, (q, k, v), strict=True)
    )


# ---------------------------------------------------------------------------------------------
# flash_attention_backward_tiled and flash_attention_backward


def _strided(a, dtype, device):
    """A tensor holding ``a`` (..., n, d) as a transposed view: its first and next-to-last axes swapped in memory."""
    buffer = R.tensor_of(_np_ascontiguous(T.np_swapaxes(a, 0, -2)), dtype, device)
    return _transpose(buffer, 0, -2)


def _check_backward(fn, q, k, v, g, *, causal: bool, dtype, block: int | None = None, triton: bool = False,
                    memory: bool = False, strided: bool = False, accumulate: bool = False,
                    note: str = "") -> None:  # fmt: skip
    L, S = q.shape[-2], k.shape[-2]
    name = "flash_attention_backward" if triton else "flash_attention_backward_tiled"
    device = _device() if triton else "cpu"
    where = f"q {T._tuple(q.shape)}, k {T._tuple(k.shape)}, v {T._tuple(v.shape)}, {R.dname(dtype)}" + (
        f", {device}" if triton else ""
    )
    extra_args = f", block_size={block}" if block is not None else ""
    label = f"{name}(q, k, v, out, lse, grad_out, causal={causal}{extra_args}) [{where}{note}]"
    oracle = _oracle(q, k, v, g, causal)
    out64, lse64 = oracle[0], oracle[1]
    lse_dtype = F64 if dtype == F64 and not triton else F32
    qt, kt, vt, gt = ((_strided if strided else R.tensor_of)(a, dtype, device) for a in (q, k, v, g))
    ot = R.tensor_of(out64, dtype, device)
    lt = R.tensor_of(lse64, lse_dtype, device)
    before = [R.clone(t) for t in (qt, kt, vt, ot, lt, gt)]
    kwargs = {"causal": causal} if block is None else {"causal": causal, "block_size": block}
    run = _observed(fn, (qt, kt, vt, ot, lt, gt), kwargs, guard=triton, count_launches=triton, label=label)
    if triton:
        used = _sorted(op for op in run["ops"] if _is_torch_math(op))
        if used:
            raise CheckFailure(
                f"{label}: {USED_TORCH}: the call ran {', '.join(used[:6])}. Load tiles of q, k, v, dO in the kernels "
                "and compute the recomputed P, dP, dS and the gradients there."
            )
        if run["launches"] == 0:
            raise CheckFailure(f"{label}: {NO_KERNEL}. Launch @triton.jit kernels with kernel[grid](...).")
        if run["overrun"]:
            raise CheckFailure(f"{label}: the kernel {STORE_MASK} ({run['overrun']} elements written past the ends).")
    grads = _grad_results(run["result"], q, k, v, label=label, dtypes=(dtype, dtype, dtype), out=out64, g=g)
    blocks = (block,) if block is not None else (64,) if not triton else (16, 32, 64, 128)
    unwritten = triton and not all(T.np_isfinite(gr).all() for gr in grads)
    extra = UNWRITTEN if unwritten else f"Likely mistake: {STRIDED}" if strided else ""
    _compare_grads(grads, q, k, v, g, oracle, label=label, dtype=dtype, causal=causal, blocks=blocks, extra=extra,
                   accumulate=accumulate)  # fmt: skip
    for nm, t, b in _zip(("q", "k", "v", "out", "lse", "grad_out"), (qt, kt, vt, ot, lt, gt), before, strict=True):
        if not R.t_equal(t, b):
            raise CheckFailure(f"{label}: {name} changed its input {nm} in place.")
    if memory and run["largest"] >= L * S:
        shape = run["largest_shape"]
        raise CheckFailure(
            f"{label}: your backward created a tensor of {run['largest']} elements (shape {shape}); L x S = "
            f"{L} x {S} = {L * S}. {FULL_MATRIX}: recompute P, dP and dS one block of keys at a time, "
            "(..., L, block_size), and keep only dq, the blocks of dk and dv, and D between blocks."
        )
    if memory and block is not None:
        tile = L * block  # the largest tile; the inputs and the gradients may be larger
        allowed = _max([tile] + [_int(a.size) for a in (q, k, v, g)])
        if run["largest"] > 2 * allowed:
            raise CheckFailure(
                f"{label}: your backward created a tensor of {run['largest']} elements (shape {run['largest_shape']}), "
                f"more than a (L, block_size) = ({L}, {block}) tile. Likely mistake: it {BLOCK_IGNORED}."
            )


def _tiled_gradcheck(fn, rng, causal: bool) -> None:
    """torch.autograd.gradcheck of the student's backward against the numerical Jacobian of attention.

    A float64 autograd Function here: its forward is attention (SDPA, math backend), its backward calls the
    student's ``flash_attention_backward_tiled`` with the forward's out and logsumexp.
    """
    L, S, d = 3, 5, 2
    label = f"torch.autograd.gradcheck of flash_attention_backward_tiled(..., causal={causal}, block_size=2) [(2, {L}, {d}) x (2, {S}, {d}), float64]"
    state = {}

    class Attention(_Function):
        @staticmethod
        def forward(ctx, q, k, v):
            mask = R.from_numpy(_visible(L, S, causal)) if causal else None
            with _sdpa_kernel(_MATH):
                out = R.sdpa(q, k, v, attn_mask=mask)
            ctx.save_for_backward(q, k, v, out)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out = ctx.saved_tensors
            qn, kn = T.tensor_to_float64(q), T.tensor_to_float64(k)
            s = T.np_where(_visible(L, S, causal), _np_matmul(qn, T.np_swapaxes(kn, -1, -2)) / T.sqrt(d), -_np_inf)
            m = T.np_max(s, axis=-1)
            lse = R.from_numpy(m + _np_log(_np_sum(T.np_exp(s - m[..., None]), axis=-1)))
            args = tuple(R.clone(_detach(t)) for t in (q, k, v, out)) + (lse, R.clone(_detach(grad_out)))
            result = call(fn, *args, causal=causal, block_size=2, label=label)
            if T._type(result) not in (T._tuple, T._list) or T._len(result) != 3 or not all(T.is_tensor(r) for r in result):
                state["bad"] = f"{label}: should return a tuple of three tensors (dq, dk, dv), got {T.type_name(result)}."
                return tuple(R.clone(_detach(t)) * 0.0 for t in (q, k, v))
            return tuple(result)

    q, k, v = (R.requires_grad_(R.from_numpy(rng.normal(size=(2, n, d)))) for n in (L, S, S))
    ok = _gradcheck_call(Attention.apply, (q, k, v), label)
    if "bad" in state:
        raise CheckFailure(state["bad"])
    if not ok:
        raise CheckFailure(f"{label}: the gradients do not match the numerical derivative of attention.")


def _gradcheck_call(fn, inputs, label: str) -> bool:
    try:
        return bool(_gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6, raise_exception=False))
    except CheckFailure:
        raise
    except Exception as exc:  # noqa: BLE001  (gradcheck's own shape and type errors name the problem)
        raise CheckFailure(f"{label}: {T.type_name(exc)}: {_str(exc)[:400]}") from None


def visible_flash_attention_backward_tiled(fn) -> None:
    """Four small float64 and float32 cases: two key blocks, L != S, causal, a block that does not divide S."""
    rng = T.default_rng(90)
    _check_backward(fn, *_inputs(rng, (), 6, 8, 4, F64), causal=False, dtype=F64, block=4, note=", two key blocks")
    _check_backward(fn, *_inputs(rng, (2,), 5, 9, 8, F32), causal=False, dtype=F32, block=4,
                    note=", block 4 does not divide S = 9")  # fmt: skip
    _check_backward(fn, *_inputs(rng, (2, 2), 7, 7, 8, F64), causal=True, dtype=F64, block=3, note=", causal, 4-D")
    _check_backward(fn, *_inputs(rng, (1,), 4, 10, 4, F64), causal=True, dtype=F64, block=4, note=", causal, L < S")
    passed("flash_attention_backward_tiled", 4)


def hidden_flash_attention_backward_tiled(fn, seed: int = 91) -> None:
    """Causal with L > S (queries that see no key) and L < S, several blocks, S no multiple of the block, 3-D
    and 4-D, Dv != D, large scores, float16 and bfloat16, float16 over 1024 key blocks (float32 accumulation),
    the default block size, the memory rule (no L x S tensor, tiles of block_size), and torch.autograd.gradcheck
    in float64."""
    rng = T.default_rng(seed)
    count = 0

    def case(args, **kw):
        nonlocal count
        _check_backward(fn, *args, **kw)
        count += 1

    case(_inputs(rng, (2,), 11, 5, 4, F64), causal=True, dtype=F64, block=2,
         note=", causal with L > S: the first 6 queries see no key (zero gradients)")  # fmt: skip
    case(_inputs(rng, (1, 2), 9, 23, 8, F32, scale=2.0), causal=True, dtype=F32, block=8, note=", causal with L < S")
    case(_inputs(rng, (2,), 10, 13, 8, F64, dv=3), causal=False, dtype=F64, block=5, note=", Dv = 3")
    case(_inputs(rng, (2, 2), 12, 12, 8, F32, scale=3.0), causal=True, dtype=F32, block=4, note=", scores near 70")
    case(_inputs(rng, (2,), 16, 24, 16, F16), causal=True, dtype=F16, block=8, note=", float16")
    case(_inputs(rng, (2,), 11, 19, 8, BF16), causal=False, dtype=BF16, block=8, note=", bfloat16")
    case(_inputs(rng, (1,), 20, 70, 4, F32), causal=False, dtype=F32, block=None, note=", default block size")
    case(_inputs(rng, (2,), 8, 2048, 8, F16), causal=False, dtype=F16, block=2, accumulate=True,
         note=", float16 over 1024 key blocks: within 6x PyTorch's own error, so accumulate in float32")  # fmt: skip
    case(_inputs(rng, (), 96, 160, 4, F32), causal=True, dtype=F32, block=32, memory=True,
         note=", memory: no tensor may have L x S elements")  # fmt: skip
    case(_inputs(rng, (), 128, 80, 4, F32), causal=False, dtype=F32, block=16, memory=True,
         note=", memory: no tensor may have L x S elements")  # fmt: skip
    for causal in (False, True):
        _tiled_gradcheck(fn, rng, causal)
        count += 1
    passed("flash_attention_backward_tiled", count, hidden=True)


def visible_flash_attention_backward(fn) -> None:
    """Three small float32 cases under the Triton interpreter: one tile, several tiles, causal with L != S."""
    rng = T.default_rng(92)
    _check_backward(fn, *_inputs(rng, (1, 1), 16, 16, 16, F32), causal=False, dtype=F32, triton=True, note=", one tile")
    _check_backward(fn, *_inputs(rng, (2,), 40, 50, 16, F32), causal=False, dtype=F32, triton=True,
                    note=", several tiles, 3-D")  # fmt: skip
    _check_backward(fn, *_inputs(rng, (1, 2), 24, 40, 16, F32), causal=True, dtype=F32, triton=True,
                    note=", causal, L < S")  # fmt: skip
    passed("flash_attention_backward", 3)


def hidden_flash_attention_backward(fn, seed: int = 93) -> None:
    """Several tiles of 128 (L > 256) at small D, causal with L != S both ways (queries that see no key),
    L and S no multiples of a tile, D not a power of two, large scores, 3-D and 4-D, q, k, v and grad_out as
    transposed views; float16 (small, in the interpreter), and float16 and bfloat16 on a GPU (the interpreter's
    bfloat16 tl.dot is wrong). Writes past the ends are named."""
    rng = T.default_rng(seed)
    count = 0

    def case(args, **kw):
        nonlocal count
        _check_backward(fn, *args, triton=True, **kw)
        count += 1

    case(_inputs(rng, (1,), 37, 45, 16, F32, scale=2.0), causal=False, dtype=F32, note=", L = 37, S = 45")
    case(_inputs(rng, (1, 2), 40, 23, 16, F32), causal=True, dtype=F32,
         note=", causal with L > S: the first 17 queries see no key (zero gradients)")  # fmt: skip
    case(_inputs(rng, (2, 1), 21, 46, 16, F32, scale=3.0), causal=True, dtype=F32, note=", causal with L < S, large scores")
    case(_inputs(rng, (1, 1), 19, 27, 24, F32), causal=False, dtype=F32, note=", D = 24: not a power of two")
    case(_inputs(rng, (1, 1), 264, 301, 8, F32), causal=True, dtype=F32,
         note=", L = 264 < S = 301, causal: several tiles of 128 queries and keys")  # fmt: skip
    case(_inputs(rng, (1,), 300, 270, 8, F32), causal=False, dtype=F32, note=", L = 300, S = 270: several tiles, 3-D")
    case(_inputs(rng, (1, 2), 20, 36, 16, F32), causal=True, dtype=F32, strided=True,
         note=", q, k, v and grad_out are transposed views (not contiguous)")  # fmt: skip
    case(_inputs(rng, (3,), 18, 33, 16, F32), causal=False, dtype=F32, strided=True,
         note=", 3-D, q, k, v and grad_out are transposed views (not contiguous)")  # fmt: skip
    if _device() == "cpu":  # the interpreter's float16 tl.dot is right (its bfloat16 one is not)
        case(_inputs(rng, (1, 2), 24, 40, 16, F16), causal=True, dtype=F16, note=", float16: gradients in float16")
    if _device() == "cuda":
        case(_inputs(rng, (2, 2), 200, 200, 64, F16), causal=True, dtype=F16, note=", float16")
        case(_inputs(rng, (2, 2), 130, 190, 64, BF16), causal=False, dtype=BF16, note=", bfloat16")
    passed("flash_attention_backward", count, hidden=True)


# ---------------------------------------------------------------------------------------------
# FlashAttentionFunction and TritonFlashAttentionFunction


OBSERVE_FUNCTION = "autograder.checks.ch09.observe_function"


def observe_function(cls, causal: bool, count_launches: bool, label: str, q, k, v, grad_out) -> dict:
    """Run ``cls.apply(q, k, v, causal)`` and its backward where the student's code runs.

    Returns data only: ``{"error", "out", "saved", "ctx_tensors", "grads", "launches", "forward_launches", "ops",
    "forward_ops", "forward_largest", "backward_largest"}``: the output, the tensors its autograd node saved
    (``ctx.saved_tensors``), (name, shape) of tensors kept as ctx attributes, (dq, dk, dv) from
    ``torch.autograd.grad``, the Triton launches and the aten operations run (all, and the forward's), and the
    largest tensor the forward and the backward each created, as (elements, shape).
    """
    recorder = _Recorder()
    backward_recorder = _Recorder()
    launches = _LaunchCounter()
    leaves = [R.requires_grad_(R.clone(_detach(t))) for t in (q, k, v)]
    try:
        apply = cls.apply
        with _enable_grad():
            if count_launches:
                with launches, recorder:
                    out = call(apply, *leaves, causal, label=label)
            else:
                with recorder:
                    out = call(apply, *leaves, causal, label=label)
            if not T.is_tensor(out):
                raise CheckFailure(f"{label}: should return the output tensor, got {T.type_name(out)}.")
            forward_launches = _int(launches.count)
            node = _grad_fn(out)
            if node is None:
                raise CheckFailure(f"{label}: the output carries no gradient (grad_fn is None): did forward detach it?")
            saved = [_detach(t) for t in call(lambda: T._tuple(node.saved_tensors), label=label + " saved_tensors")]
            ctx_tensors = [
                (_str(name), T._tuple(_int(n) for n in R.shape_of(value)))
                for name, value in _getattr(node, "__dict__", {}).items()
                if T.is_tensor(value)
            ]
            with launches, backward_recorder:
                grads = call(R.autograd_grad, out, leaves, grad_out, allow_unused=True, label=label + " backward")
    except CheckFailure as exc:
        return {"error": _str(exc)}
    return {
        "error": None,
        "out": _detach(out),
        "saved": saved,
        "ctx_tensors": ctx_tensors,
        "grads": [None if t is None else _detach(t) for t in grads],
        "launches": _int(launches.count),
        "forward_launches": forward_launches,
        "ops": _sorted(_str(op) for op in recorder.ops | backward_recorder.ops),
        "forward_ops": _sorted(_str(op) for op in recorder.ops),
        "forward_largest": [_int(recorder.largest), [_int(n) for n in recorder.largest_shape]],
        "backward_largest": [_int(backward_recorder.largest), [_int(n) for n in backward_recorder.largest_shape]],
    }


def _run_function(cls, causal: bool, count_launches: bool, label: str, *args) -> dict:
    if is_remote(cls):
        run = current_remote().probe(OBSERVE_FUNCTION, cls, causal, count_launches, label, *args)
    else:
        run = observe_function(cls, causal, count_launches, label, *args)
    if T._type(run) is not T._dict or "error" not in run:
        raise CheckFailure(f"{label}: the watched call did not report back.")
    if run["error"] is not None:
        message = _str(run["error"])
        if "invalid gradient at index" in message:  # autograd's own shape test of what backward returned
            message += (
                f"\n  Likely mistake: {SWAPPED} backward returns one gradient per input of forward, in order: (dq, dk, dv, None)."
            )
        raise CheckFailure(message)
    keys = ("out", "saved", "ctx_tensors", "grads", "launches", "forward_launches", "ops", "forward_ops")
    keys += ("forward_largest", "backward_largest")
    if not all(key in run for key in keys) or T._type(run["saved"]) is not T._list or T._type(run["grads"]) is not T._list:
        raise CheckFailure(f"{label}: the watched call's report is malformed.")
    for key in ("forward_largest", "backward_largest"):
        value = run[key]
        if T._type(value) not in (T._list, T._tuple) or T._len(value) != 2 or T._type(value[0]) is not _int:
            raise CheckFailure(f"{label}: the watched call's report is malformed.")
    if T._type(run["ops"]) is not T._list or T._type(run["forward_ops"]) is not T._list:
        raise CheckFailure(f"{label}: the watched call's report is malformed.")
    return run


def _check_function(cls, q, k, v, g, *, causal: bool, dtype, triton: bool, note: str = "", memory: bool = False) -> None:
    name = "TritonFlashAttentionFunction" if triton else "FlashAttentionFunction"
    device = _device() if triton else "cpu"
    where = f"q {T._tuple(q.shape)}, k and v {T._tuple(k.shape)}, {R.dname(dtype)}" + (f", {device}" if triton else "")
    label = f"{name}.apply(q, k, v, {causal}) and its backward [{where}{note}]"
    L, S = q.shape[-2], k.shape[-2]
    qt, kt, vt, gt = (R.tensor_of(a, dtype, device) for a in (q, k, v, g))
    run = _run_function(cls, causal, triton, label, qt, kt, vt, gt)
    oracle = _oracle(q, k, v, g, causal)
    out64, lse64 = oracle[0], oracle[1]
    if T.is_tensor(run["out"]) and R.dtype_of(run["out"]) != dtype:
        raise CheckFailure(
            f"{label}: the output is {R.dname(R.dtype_of(run['out']))}, expected {R.dname(dtype)}. Likely mistake: {OUT_DTYPE}."
        )
    out = _as_tensor(run["out"], label=label, what="output", dtype=dtype, shape=q.shape[:-1] + (v.shape[-1],))
    scale = float(T.np_max(T.np_abs(v))) if v.size else 1.0
    _compare(out, out64, label=label, what="the output", atol=_atol(dtype, 0.0, scale), fingerprints={})
    # what the forward saved for the backward
    saved, lead = run["saved"], T._tuple(q.shape[:-1])
    if not all(T.is_tensor(t) for t in saved):
        raise CheckFailure(f"{label}: the saved tensors did not come back as tensors.")
    shapes = [T._tuple(R.shape_of(t)) for t in saved]
    for shape in shapes:
        if T._len(shape) >= 2 and shape[-2:] == (L, S) and L * S > 0 and (L, S) != T._tuple(q.shape[-2:]):
            raise CheckFailure(f"{label}: the forward {SAVED_P} (saved shapes {shapes})")
    if run["ctx_tensors"]:
        raise CheckFailure(f"{label}: the forward {CTX_TENSOR}: {run['ctx_tensors'][:4]}.")
    if T._len(saved) != 5:
        raise CheckFailure(
            f"{label}: the forward saved {T._len(saved)} tensors (shapes {shapes}); {SAVED_COUNT}, the logsumexp of shape {lead}."
        )
    remaining = list(saved)
    for what, value, dt in (("q", q, dtype), ("k", k, dtype), ("v", v, dtype), ("out", None, dtype)):
        target = T.tensor_to_float64(run["out"]) if value is None else value
        match = next(
            (
                t
                for t in remaining
                if T._tuple(R.shape_of(t)) == T._tuple(target.shape) and R.dtype_of(t) == dt
                and T.np_array_equal(T.tensor_to_float64(t), target)
            ),
            None,
        )  # fmt: skip
        if match is None:
            raise CheckFailure(f"{label}: the forward did not save {what} itself (saved shapes {shapes}); {SAVED_COUNT}.")
        remaining = [t for t in remaining if t is not match]
    lse = remaining[0]
    if T._tuple(R.shape_of(lse)) != lead:
        raise CheckFailure(f"{label}: the forward {NO_LSE} (the fifth tensor has shape {T._tuple(R.shape_of(lse))}, not {lead}).")
    lse_np = T.tensor_to_float64(lse)
    finite = T.np_isfinite(lse64)
    if not (
        T.np_array_equal(T.np_isfinite(lse_np), finite)
        and max_error(lse_np[finite], lse64[finite])
        <= 1e-4 * _max(1.0, float(T.np_max(T.np_abs(lse64[finite]))) if finite.any() else 1.0)
    ):
        _fail(label, "the saved (..., L) tensor, the logsumexp,", lse_np, lse64, 1e-4, None)
    grads = run["grads"]
    if T._len(grads) != 3 or any(gr is None for gr in grads):
        raise CheckFailure(f"{label}: backward returned no gradient for some of q, k, v.")
    arrays = _grad_results(grads, q, k, v, label=label, dtypes=(dtype, dtype, dtype), out=out64, g=g)
    blocks = (16, 32, 64, 128) if triton else (64,)
    if triton and run["forward_launches"] == 0:
        raise CheckFailure(f"{label}: {NO_TRITON_FORWARD}.")
    if triton and run["launches"] == run["forward_launches"]:
        raise CheckFailure(f"{label}: {NO_TRITON_BACKWARD}.")
    sdpa = _sorted({_str(op) for op in run["ops"] if "scaled_dot_product" in _str(op)})
    if sdpa and not triton:
        where = "forward" if any(op in run["forward_ops"] for op in sdpa) else "backward"
        raise CheckFailure(f"{label}: the {where} ran {', '.join(sdpa[:4])}: it {FUNCTION_SDPA}.")
    if triton:
        used = _sorted({_str(op) for op in run["ops"] if _is_torch_math(_str(op))})
        if used:
            where = "forward" if any(op in run["forward_ops"] for op in used) else "backward"
            raise CheckFailure(f"{label}: the {where} ran {', '.join(used[:6])}: it {FUNCTION_TORCH}.")
    if memory:
        full = _int(q.size) // _max(1, L * q.shape[-1]) * L * S  # (..., L, S) elements
        for where in ("forward", "backward"):
            n, shape = run[f"{where}_largest"]
            if n >= full:
                raise CheckFailure(
                    f"{label}: the {where} {FUNCTION_FULL} (a tensor of {n} elements, shape {T._tuple(shape)}; "
                    f"(..., L, S) has {full}). FlashAttention never holds it: the forward is tiled_attention "
                    "(or flash_attention), the backward recomputes P one block of keys at a time; do not call "
                    "F.scaled_dot_product_attention, autograd or a plain softmax on the whole score matrix."
                )
    _compare_grads(arrays, q, k, v, g, oracle, label=label, dtype=dtype, causal=causal, blocks=blocks,
                   extra=CHAIN_HINT_TRITON if triton else CHAIN_HINT)  # fmt: skip


def _function_gradcheck(cls, rng, causal: bool) -> None:
    """torch.autograd.gradcheck in float64 of the student's Function, run here: the forward and backward of a
    local autograd Function call the student's ``apply`` and its backward (through the probe)."""
    L, S, d = 4, 3, 2
    label = (
        f"torch.autograd.gradcheck of FlashAttentionFunction.apply(q, k, v, {causal}) [(2, {L}, {d}) x (2, {S}, {d}), float64]"
    )

    class Bridge(_Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = call(cls.apply, R.clone(_detach(q)), R.clone(_detach(k)), R.clone(_detach(v)), causal, label=label)
            if not T.is_tensor(out):
                raise CheckFailure(f"{label}: apply should return a tensor, got {T.type_name(out)}.")
            ctx.save_for_backward(q, k, v)
            return _detach(out)

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v = ctx.saved_tensors
            run = _run_function(cls, causal, False, label, q, k, v, R.clone(_detach(grad_out)))
            grads = run["grads"]
            if T._len(grads) != 3 or not all(T.is_tensor(t) for t in grads):
                raise CheckFailure(f"{label}: backward returned no gradient for some of q, k, v.")
            return tuple(grads)

    q, k, v = (R.requires_grad_(R.from_numpy(rng.normal(size=(2, n, d)))) for n in (L, S, S))
    if not _gradcheck_call(Bridge.apply, (q, k, v), label):
        raise CheckFailure(f"{label}: the backward does not match the numerical derivative of the forward. {CHAIN_HINT}")


def visible_FlashAttentionFunction(cls) -> None:
    """Three small cases: 3-D, 4-D causal with L != S, and what the forward saved."""
    rng = T.default_rng(94)
    _check_function(cls, *_inputs(rng, (2,), 6, 9, 4, F64), causal=False, dtype=F64, triton=False, note=", 3-D")
    _check_function(cls, *_inputs(rng, (2, 2), 7, 5, 8, F32), causal=True, dtype=F32, triton=False,
                    note=", 4-D, causal with L > S")  # fmt: skip
    _check_function(cls, *_inputs(rng, (1, 2), 5, 70, 8, F64), causal=True, dtype=F64, triton=False,
                    note=", causal, S = 70 spans two blocks of 64")  # fmt: skip
    passed("FlashAttentionFunction", 3)


def hidden_FlashAttentionFunction(cls, seed: int = 95) -> None:
    """Longer sequences (several blocks of 64), causal with L != S both ways, fully masked rows, float16,
    and torch.autograd.gradcheck in float64, causal and not."""
    rng = T.default_rng(seed)
    count = 0
    for args, kw in (
        (
            _inputs(rng, (1, 2), 100, 150, 8, F32),
            {"causal": True, "dtype": F32, "note": ", causal, L < S, three blocks, no (L, S) tensor", "memory": True},
        ),
        (
            _inputs(rng, (2,), 140, 70, 4, F64),
            {"causal": True, "dtype": F64, "note": ", causal with L > S: 70 queries see no key"},
        ),
        (
            _inputs(rng, (2, 1), 66, 130, 8, F32, scale=3.0),
            {"causal": False, "dtype": F32, "note": ", large scores, no (L, S) tensor", "memory": True},
        ),
        (_inputs(rng, (1, 2), 40, 72, 16, F16), {"causal": True, "dtype": F16, "note": ", float16"}),
    ):
        _check_function(cls, *args, triton=False, **kw)
        count += 1
    for causal in (False, True):
        _function_gradcheck(cls, rng, causal)
        count += 1
    passed("FlashAttentionFunction", count, hidden=True)


def visible_TritonFlashAttentionFunction(cls) -> None:
    """Two small float32 cases under the Triton interpreter: 4-D, and 3-D causal with L != S."""
    rng = T.default_rng(96)
    _check_function(cls, *_inputs(rng, (1, 2), 20, 20, 16, F32), causal=False, dtype=F32, triton=True, note=", 4-D")
    _check_function(cls, *_inputs(rng, (2,), 30, 18, 16, F32), causal=True, dtype=F32, triton=True,
                    note=", 3-D, causal with L > S")  # fmt: skip
    passed("TritonFlashAttentionFunction", 2)


def hidden_TritonFlashAttentionFunction(cls, seed: int = 97) -> None:
    """Several tiles (L > 256), causal with L < S, D not a power of two, no (L, S) tensor and no PyTorch attention
    maths in the forward or the backward; float16 (small in the interpreter, larger on a GPU)."""
    rng = T.default_rng(seed)
    count = 0
    cases = [
        (
            _inputs(rng, (1, 1), 260, 290, 8, F32),
            {"causal": True, "dtype": F32, "note": ", L = 260 < S = 290, causal, no (L, S) tensor", "memory": True},
        ),
        (_inputs(rng, (2,), 33, 41, 24, F32), {"causal": False, "dtype": F32, "note": ", D = 24"}),
    ]
    if _device() == "cuda":
        cases.append((_inputs(rng, (2, 2), 200, 260, 64, F16), {"causal": True, "dtype": F16, "note": ", float16"}))
    else:  # the interpreter's float16 tl.dot is right: output, saved tensors and gradients stay float16
        cases.append((_inputs(rng, (1, 2), 24, 40, 16, F16), {"causal": True, "dtype": F16, "note": ", float16"}))
    for args, kw in cases:
        _check_function(cls, *args, triton=True, **kw)
        count += 1
    passed("TritonFlashAttentionFunction", count, hidden=True)


# ---------------------------------------------------------------------------------------------
# flash_decode


def _decode_np(q, k, v, num_splits: int, mistake: str = "") -> np.ndarray:
    """Float64 NumPy decoding output (B, H, 1, D) with one optional mistake."""
    B, H, _, d = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    group = H // H_kv
    heads = T.np_arange(H) % H_kv if mistake == "gqa_mod" else T.np_arange(H) // group
    kk, vv = k[:, heads], v[:, heads]  # the oracle may copy
    scale = 1.0 if mistake == "no_scale" else 1.0 / T.sqrt(d)
    chunk = S // num_splits if mistake == "floor_chunks" else -(-S // num_splits)
    outs, lses = [], []
    for split in _range(num_splits):
        start, stop = split * chunk, _min((split + 1) * chunk, S)
        if mistake == "drop_tail" and stop - start < chunk:
            continue
        if start >= stop:
            continue
        s = _np_matmul(q, T.np_swapaxes(kk[:, :, start:stop], -1, -2)) * scale
        m = T.np_max(s, axis=-1, keepdims=True)
        p = T.np_exp(s - m)
        tot = _np_sum(p, axis=-1, keepdims=True)
        outs.append(_np_matmul(p, vv[:, :, start:stop]) / tot)
        lses.append(m + _np_log(tot))
    if not outs:
        return T.np_zeros(q.shape)
    outs, lses = _np_stack(outs), _np_stack(lses)
    if mistake == "mean":
        return _np_sum(outs, axis=0) / T._len(outs)
    top = T.np_max(lses, axis=0)
    lse = top + _np_log(_np_sum(T.np_exp(lses - top), axis=0))
    return _np_sum(T.np_exp(lses - lse) * outs, axis=0)


def _check_decode(fn, q, k, v, num_splits: int, *, dtype, note: str = "", memory: bool = False) -> None:
    B, H, _, d = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    label = (
        f"flash_decode(q, k, v, num_splits={num_splits}) [q {T._tuple(q.shape)}, k and v {T._tuple(k.shape)}, "
        f"{R.dname(dtype)}{note}]"
    )
    qt, kt, vt = (R.tensor_of(a, dtype) for a in (q, k, v))
    before = [R.clone(t) for t in (qt, kt, vt)]
    run = _observed(fn, (qt, kt, vt, num_splits), {}, guard=False, count_launches=False, label=label)
    got = _as_tensor(run["result"], label=label, what="output", dtype=dtype, shape=q.shape)
    heads = T.np_arange(H) // (H // H_kv)
    expected = T.tensor_to_float64(
        R.sdpa(*(R.from_numpy(T.np_array(a, dtype=T.np_float64)) for a in (q, k[:, heads], v[:, heads])))
    )
    scale = float(T.np_max(T.np_abs(v))) if v.size else 1.0
    atol = {F64: 1e-9, F32: 2e-5, F16: 4e-3, BF16: 3e-2}[dtype] * _max(1.0, scale)
    if dtype in (F16, BF16):
        low = T.tensor_to_float64(R.sdpa(*(R.tensor_of(a, dtype) for a in (q, k[:, heads], v[:, heads]))))
        atol = _max(atol, 4.0 * max_error(low, expected))
    prints = {DECODE_SCALE: lambda: _decode_np(q, k, v, num_splits, "no_scale")}
    if H != H_kv and H_kv > 1:
        prints[GQA_MOD] = lambda: _decode_np(q, k, v, num_splits, "gqa_mod")
    if num_splits > 1:
        prints[COMBINE_MEAN] = lambda: _decode_np(q, k, v, num_splits, "mean")
    if S % num_splits:
        prints[DROP_TAIL] = lambda: _decode_np(q, k, v, num_splits, "drop_tail")
        prints[DROP_TAIL + " "] = lambda: _decode_np(q, k, v, num_splits, "floor_chunks")
    extra = ""
    if not T.np_isfinite(got).all():
        extra = COMBINE_NO_MAX if float(T.np_max(T.np_abs(q))) > 10 else EMPTY_SPLIT if num_splits > S else ""
    _compare(got, expected, label=label, what="the output", atol=atol, fingerprints=prints, extra=extra)
    for nm, t, b in _zip(("q", "k", "v"), (qt, kt, vt), before, strict=True):
        if not R.t_equal(t, b):
            raise CheckFailure(f"{label}: flash_decode changed its input {nm} in place.")
    if num_splits > 1 and S in _split_free_sizes(q.shape, k.shape, num_splits, run):
        raise CheckFailure(f"{label}: {IGNORED_SPLITS} (here S = {S}, chunks of at most {-(-S // num_splits)} keys).")
    copies = [op for op in run["ops"] if op.split(".")[1] in ("repeat_interleave", "repeat")] if H != H_kv else []
    chunk = -(-S // num_splits)
    if memory and (copies or run["largest"] >= B * H * chunk * d):
        raise CheckFailure(
            f"{label}: {COPIED_KV} (the call ran {', '.join(copies) or 'no repeat'}; its largest tensor had "
            f"{run['largest']} elements, shape {run['largest_shape']}, as many as K expanded to all {H} query heads)."
        )


def _split_free_sizes(q_shape, k_shape, num_splits: int, run: dict) -> set:
    """The sizes of the axes ``run`` reduced along that no split decoding has to reduce along.

    A split reduces over its own keys (ceil(S / n), floor(S / n), the shorter last chunk), the combine over the
    splits, the products over D; the rest is left only when no such size equals S.
    """
    reduced = run.get("reduced")
    if T._type(reduced) is not T._list or not all(T._type(n) is _int for n in reduced):
        raise CheckFailure("flash_decode: the watched call's report is malformed.")
    B, H, _, d = q_shape
    H_kv, S = k_shape[1], k_shape[2]
    ceil, floor = -(-S // num_splits), S // num_splits
    legit = {1, B, H, H_kv, H // H_kv, d, num_splits, ceil, floor, floor + 1, S - (num_splits - 1) * ceil, -(-S // ceil)}
    return set() if S in legit else {n for n in reduced if n not in legit}


def _decode_inputs(rng, B: int, H: int, H_kv: int, S: int, d: int, dtype, scale: float = 1.0):
    q = R.rounded(rng.normal(size=(B, H, 1, d), scale=scale), dtype)
    k = R.rounded(rng.normal(size=(B, H_kv, S, d), scale=scale), dtype)
    v = R.rounded(rng.normal(size=(B, H_kv, S, d)), dtype)
    return q, k, v


def visible_flash_decode(fn) -> None:
    """Four small cases: one split, splits that divide S, grouped-query heads, splits that do not divide S."""
    rng = T.default_rng(98)
    _check_decode(fn, *_decode_inputs(rng, 2, 2, 2, 8, 4, F64), 1, dtype=F64, note=", one split")
    _check_decode(fn, *_decode_inputs(rng, 1, 2, 2, 12, 8, F64), 3, dtype=F64, note=", three splits of 4 keys")
    _check_decode(fn, *_decode_inputs(rng, 2, 4, 2, 10, 8, F32), 2, dtype=F32, note=", grouped-query: 4 query heads, 2 KV heads")
    _check_decode(fn, *_decode_inputs(rng, 1, 6, 3, 11, 4, F64), 4, dtype=F64, note=", 4 splits do not divide S = 11")
    passed("flash_decode", 4)


def hidden_flash_decode(fn, seed: int = 99) -> None:
    """num_splits > S (empty splits), scores near 1e3 (the combine must subtract the max), multi-query
    (H_kv = 1), grouped heads whose mapping h % H_kv differs from h // group, float16, and the no-copy rule."""
    rng = T.default_rng(seed)
    count = 0

    def case(args, num_splits, **kw):
        nonlocal count
        _check_decode(fn, *args, num_splits, **kw)
        count += 1

    case(_decode_inputs(rng, 1, 2, 2, 5, 4, F64), 8, dtype=F64, note=", num_splits = 8 > S = 5: three splits are empty")
    case(_decode_inputs(rng, 2, 4, 2, 16, 8, F64, scale=30.0), 4, dtype=F64, note=", scores near 1e3")
    case(_decode_inputs(rng, 1, 4, 4, 12, 8, F32, scale=6.0), 3, dtype=F32, note=", float32, scores near 100")
    case(_decode_inputs(rng, 1, 8, 1, 9, 8, F32), 2, dtype=F32, memory=True,
         note=", multi-query: one KV head for 8 query heads, no copy of it per query head")  # fmt: skip
    case(_decode_inputs(rng, 2, 6, 2, 17, 8, F64), 5, dtype=F64, note=", 6 query heads on 2 KV heads, 5 splits of S = 17")
    case(_decode_inputs(rng, 1, 4, 2, 33, 16, F16), 3, dtype=F16, note=", float16")
    case(_decode_inputs(rng, 2, 8, 2, 40, 8, F32), 2, dtype=F32, memory=True,
         note=", no copy of K or V per query head")  # fmt: skip
    case(_decode_inputs(rng, 1, 8, 4, 24, 8, F32), 1, dtype=F32, memory=True,
         note=", one split, no copy of K or V per query head")  # fmt: skip
    passed("flash_decode", count, hidden=True)


POINTS = {
    "flash_attention_backward_tiled": (2, 2),
    "FlashAttentionFunction": (2, 2),
    "flash_attention_backward": (2, 2),
    "TritonFlashAttentionFunction": (1, 1),
    "flash_decode": (2, 2),
}
