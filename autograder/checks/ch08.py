"""Checks for chapter 8, FlashAttention from scratch.

Oracles, all computed here and never taken from ``solutions/``:

* the output: PyTorch's ``F.scaled_dot_product_attention`` in float64 on the exact values handed
  to the student (low-precision inputs are rounded first), with an explicit bottom-right causal
  mask (query i sees key j iff j <= i + S - L); it returns zeros for a query that sees no key.
* the log-sum-exp: float64 NumPy, log of the sum of exp of the scaled, visible scores.
* the error budget: PyTorch's own SDPA at the student's dtype against the same oracle.

Wrong answers are compared with the outputs of known mistakes (float64 NumPy variants of the
online softmax, tiled like the student's code) to name them. Two properties are checked by
watching the call, not its result: ``tiled_attention`` must never create a tensor as large as the
(L, S) score matrix (a ``TorchDispatchMode`` records the largest tensor each aten operation
returns), and ``flash_attention`` must launch a Triton kernel and must not compute attention with
PyTorch operations (matrix products, softmax, SDPA), which the same kind of mode records. That mode
also hands the kernel guarded allocations (a NaN sentinel before, after and, for ``empty``, inside each
new tensor), so a store past the end of the output and output entries never written are named, and
such a write lands in the guard instead of memory the grader uses.

Everything a student cell could rebind is captured when this module is imported, which the
chapter's setup cell does before any student code runs (after it has set ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autograder.checks import torch_refs as R
from autograder.checks import trusted as T
from autograder.checks.common import CheckFailure, call, diagnose, is_or_are, max_error, passed, show
from autograder.checks.torch_refs import BF16, F16, F32, F64
from autograder.grading.remote import current_remote, is_remote

# Triton decorates its own library functions (tl.zeros, ...) when it is imported, for the
# interpreter or for the compiler depending on TRITON_INTERPRET at that moment. Without a CUDA GPU
# the kernels can only run interpreted, so set the variable before the first import of Triton,
# as the chapter's setup cell does (this module may be imported first, e.g. by the tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # chapter 8 only; the other chapters' setup cells import these checks too
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
    from triton.runtime.jit import JITFunction as _Jit
except ImportError:  # pragma: no cover  (Triton is a dependency of the course)
    _Interpreted = _Jit = None
_environ_get = os.environ.get

# ---------------------------------------------------------------------------------------------
# References captured at import time (a student cell may rebind torch or numpy attributes).
# Those most chapters share are in torch_refs (R.dtype_of, R.MHA, ...) and trusted (T.np_where, ...).
_numel = R.TB.numel
_cuda_available = torch.cuda.is_available
_TorchDispatchMode = TorchDispatchMode
_tree_leaves = torch.utils._pytree.tree_leaves
_as_strided = R.TB.as_strided
_stride_of = R.TB.stride
_view_as = R.TB.view
_fill_ = R.TB.fill_
_copy_ = R.TB.copy_
_device_of = R.TB.__dict__["device"].__get__
_detach = R.TB.detach
_to_cpu = R.TB.cpu
_to_numpy = R.TB.numpy
_transpose = R.TB.transpose
# A quiet NaN with a payload no arithmetic produces, per floating dtype: (integer view, bit pattern).
_SENTINEL = {
    F16: (torch.int16, 0x7E5A),
    BF16: (torch.int16, 0x7FDA),
    F32: (torch.int32, 0x7FC5A5A5),
    F64: (torch.int64, 0x7FF8A5A5A5A5A5A5),
}

_np_matmul = np.matmul
_np_log = np.log
_np_sum = np.sum
_np_maximum = np.maximum
_np_minimum = np.minimum
_np_ascontiguous = np.ascontiguousarray
_np_argwhere = np.argwhere
_np_full = np.full
_np_inf = np.inf
_np_isneginf = np.isneginf
_t_matmul = torch.matmul
_t_mul = torch.mul
_t_logsumexp = torch.logsumexp
_t_masked_fill = R.TB.masked_fill
_log2e = math.log2(math.e)
_int = int
_sum_int = sum
_str = str
_range = range
_min = min
_max = max
_isinstance = isinstance
_len = T._len
_list = T._list
_getattr = getattr
_setattr = setattr

# ---------------------------------------------------------------------------------------------
# Mistakes, by the phrase that names them (the mutants' diagnoses quote these).
NO_RESCALE_ACC = (
    "forgot to rescale the accumulator: when a new tile raises the running max from m_old to m_new, the output "
    "accumulated so far must be multiplied by exp(m_old - m_new) before the new tile's p @ v is added."
)
NO_RESCALE_SUM = (
    "forgot to rescale the running sum: when the running max grows from m_old to m_new, l = l * exp(m_old - m_new) "
    "+ p.sum(-1); without the factor, earlier tiles are over-weighted in the denominator."
)
SCALE_D = "scaled the scores by 1/d instead of 1/sqrt(d)."
NO_SCALE = "did not scale the scores: multiply q @ k^T by 1/sqrt(d)."
TOP_LEFT = (
    "used a top-left causal mask (query i sees key j <= i). With L != S the L queries are the *last* L positions: "
    "query i sees key j <= i + (S - L) (bottom-right aligned, like chapter 2's causal_mask)."
)
OFF_BY_ONE = "the causal mask is off by one: a query sees its own position (j <= i + S - L, not j < i + S - L)."
NOT_CAUSAL = "ignored causal=True: every query attended to every key."
LSE_NO_MAX = (
    "logsumexp without the max: the running sum l is relative to the running max m, so logsumexp = m + log(l), not log(l)."
)
LSE_BASE2 = "logsumexp in base 2 (exp2/log2 units): convert back to natural log (multiply by ln 2)."
BOUNDARY = (
    "did not mask the keys past the end of the sequence: when S is not a multiple of the key tile, the last tile "
    "loads padding (zeros) whose scores of 0 still enter the softmax; mask key positions >= S with -inf."
)
USED_TORCH = "flash_attention must compute attention in the Triton kernel, not call PyTorch's SDPA"
NO_KERNEL = "flash_attention did not launch a Triton kernel"
FULL_MATRIX = "tiled_attention created a tensor as large as the whole (L, S) score matrix"
DROP_TAIL = (
    "dropped the last partial key block: when block_size does not divide S, range(0, S - block_size + 1, "
    "block_size) (or S // block_size blocks) never visits the last S % block_size keys; loop over range(0, S, "
    "block_size) and slice k[..., start:start + block_size, :] (the slice stops at S by itself)."
)
NAN_EMPTY = (
    "a query that sees no key (causal with L > S) must get a zero output, not 0/0 = NaN: its running sum stays 0, "
    "so guard the final division (divide by 1 where the sum is 0) and the max (use 0 where it is still -inf)."
)
AVERAGE_BLOCKS = (
    "normalised each key block separately and averaged the blocks' outputs: the blocks must share one softmax. "
    "Keep the unnormalised sum exp(s - m) @ v and the running sum across blocks, rescale both when the max grows, "
    "and divide once at the end."
)
INVERTED_RESCALE = (
    "the rescale factor is inverted: when the running max grows from m_old to m_new, multiply the sum and the "
    "accumulator by exp(m_old - m_new) <= 1, not exp(m_new - m_old)."
)
LSE_UNSCALED = (
    "logsumexp from the unscaled max: the running max m was taken over the raw scores q @ k^T, but the sum is of "
    "exp(scale * (s - m)), so logsumexp = scale * m + log(l), not m + log(l)."
)
NO_NORMALISE = (
    "never divided the accumulator by the running sum: the output is acc / l at the end (acc holds sum exp(s - m) v, "
    "unnormalised)."
)
IGNORED_BLOCK = "did you ignore block_size?"
MAX_UNDERFLOW = (
    "the running max must be each query row's own max, starting at -inf: with a max that starts at 0, or s.max() "
    "over the whole tile instead of the max of each row, a row whose scores are all far below it underflows, "
    "exp(s - m) = 0 for every key, and its output becomes 0 (or NaN)."
)
SCALE_DV = "scaled the scores by 1/sqrt(Dv), the value dimension: the scale is 1/sqrt(D), the dimension of q and k."
LOCAL_COLS = (
    "the causal mask used key positions inside the tile (0 .. block - 1) instead of their positions in the "
    "sequence (start + 0 .. start + block - 1): add the tile's start before comparing with the query's position."
)
V_IS_K = "loaded the values from k (a copy-paste slip): the output is softmax(q k^T / sqrt(d)) k instead of ... v."
SCALE_PADDED = (
    "scaled the scores by 1/sqrt of the padded head dimension (BLOCK_D, the power of two the tile is padded to): "
    "the scale is 1/sqrt(D) with the real D; the padding columns are zeros and change nothing else."
)
EXP2_NO_LOG2E = (
    "used exp2 without folding log2(e) into the scale: exp2(x) = e^(x ln 2), so exp2 of scores scaled by 1/sqrt(d) "
    "is the softmax of scores scaled by ln(2)/sqrt(d). Scale by log2(e)/sqrt(d) before exp2, or use exp."
)
EXP_WITH_LOG2E = (
    "folded log2(e) into the scale but then used exp, not exp2: exp of scores scaled by log2(e)/sqrt(d) is the "
    "softmax at the wrong temperature. Use exp2 with that scale, or exp with 1/sqrt(d)."
)
CAUSAL_SKIP = (
    "skipped key tiles that hold visible keys: with causal=True the last key a query tile sees is "
    "(tile + 1) * BLOCK_M - 1 + (S - L), not (tile + 1) * BLOCK_M - 1; the loop over key tiles must run up to "
    "min(S, (tile + 1) * BLOCK_M + S - L) (bottom-right aligned, like the mask)."
)
KV_STRIDES = (
    "loaded k and v with q's strides (or assumed contiguous inputs): pass k.stride() and v.stride() to the kernel "
    "and use them for k and v (or call .contiguous() first); here k and v are transposed views, so their strides "
    "differ from q's."
)
STORE_MASK = (
    "wrote outside the output tensor: mask the store, tl.store(ptrs, out, mask=(rows < L)[:, None] & (cols < D)[None, :]), "
    "so that the last tile of queries (and the padded head dimension) writes nothing past row L - 1 or column D - 1."
)
SAME_TILE = (
    "every program loaded the same tile of queries: the rows of program (tile, bh) are tile * BLOCK_M + "
    "tl.arange(0, BLOCK_M); use them for loading q (and for the mask and the store), not tl.arange(0, BLOCK_M) alone"
)
LSE_LAST_TILE = (
    "the logsumexp holds only the last key tile's sum: lse = m + log(l) with l, the running sum over every tile "
    "(rescaled as the max grows), not the sum of the last tile's exp(s - m) alone."
)
LSE_NOT_CAUSAL = (
    "the logsumexp ignores the causal mask: it sums exp(score) over every key, also those in the query's future; "
    "it must come from the same masked scores as the output (the running max and sum of the masked step)."
)
LSE_EMPTY = (
    "a query that sees no key (causal with L > S) must get a logsumexp of -inf (the log of an empty sum), not a "
    "finite number: keep -inf there (e.g. tl.where(l > 0, m + log(l), -inf)), so that a backward pass gives it zero weight."
)
LSE_DTYPE = "should be float32"
MASKED_SKIPPED = (
    "skipped the masked step: after the unmasked loop over the key tiles that every row of the query tile sees "
    "whole, the diagonal tiles (causal) and the last, partial tile (S not a multiple of BLOCK_N) still hold visible "
    "keys; run them too, with the mask."
)
DIAGONAL_SKIPPED = (
    "skipped the diagonal key tiles: with causal=True the masked step must start where the unmasked loop stopped, "
    "at the first key tile that some row of the query tile cannot see whole, and run to the tile's bottom-right bound "
    "min(S, (tile + 1) * BLOCK_M + S - L), not cover only the last, partial tile."
)
TAIL_SKIPPED = (
    "skipped the last, partial key tile: when S is not a multiple of BLOCK_N, the loops end at S // BLOCK_N * BLOCK_N "
    "and the keys after it are never seen; the masked step must run up to S (with the mask cols < S)."
)
WRONG_BOUND = (
    "the unmasked loop ran over key tiles that need the causal mask: a key tile may skip the mask only if the first "
    "row of the query tile (tile * BLOCK_M) sees all of it, i.e. if it ends at or before tile * BLOCK_M + S - L + 1. "
    "Bounded by the tile's last row, the rows above it see keys in their future."
)
UNWRITTEN = (
    "never wrote some entries of the output: they still hold the NaN this check fills new tensors with. Does the grid "
    "cover every (batch, head) pair (B * H programs) and every tile of queries (cdiv(L, BLOCK_M)), and does each "
    "program store all its rows?"
)


# ---------------------------------------------------------------------------------------------
# Float64 oracle and the known mistakes, in NumPy


def _visible(L: int, S: int, causal: bool, mode: str = "") -> np.ndarray:
    """(L, S) bool, True where query i may see key j."""
    i = T.np_arange(L)[:, None]
    j = T.np_arange(S)[None, :]
    if not causal or mode == "not_causal":
        return _np_full((L, S), True)
    if mode == "top_left":
        return j <= i
    if mode == "off_by_one":
        return j < i + (S - L)
    return j <= i + (S - L)


def _online(
    q,
    k,
    v,
    causal: bool,
    block: int,
    mistake: str = "",
    *,
    scale: float | None = None,
    skip: tuple | None = None,
    vis: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 online softmax over key tiles of ``block`` with one optional mistake; (out, logsumexp).

    ``scale`` replaces 1/sqrt(d); ``skip = (block_m, block_n)`` drops the key tiles that a kernel with a
    top-left causal loop bound, min(S, (tile + 1) * block_m), never visits; ``vis`` (L, S) replaces which keys
    each query sees (see :func:`_split_vis`).
    """
    L, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if scale is None:
        scale = {"scale_d": 1.0 / d, "no_scale": 1.0}.get(mistake, 1.0 / T.sqrt(d))
    if mistake == "boundary" and S % block:  # the last tile padded with zero keys and values, unmasked
        pad = block - S % block
        zeros = T.np_zeros(k.shape[:-2] + (pad, k.shape[-1]))
        k = T.np_concat([k, zeros], axis=-2)
        v = T.np_concat([v, T.np_zeros(v.shape[:-2] + (pad, v.shape[-1]))], axis=-2)
        vis = T.np_concat([_visible(L, S, causal), _np_full((L, pad), True)], axis=-1)
        S = S + pad
    else:
        vis = _visible(L, S, causal, mistake) if vis is None else vis
    if mistake == "local_cols" and causal:  # the key's index within its tile compared with the query position
        j_local = T.np_arange(S)[None, :] % block
        vis = j_local <= T.np_arange(L)[:, None] + (S - L)
    if mistake == "drop_tail":  # the loop stops before the last partial block
        S = S // block * block
        k, v, vis = k[..., :S, :], v[..., :S, :], vis[:, :S]
    if skip is not None:
        block_m, block_n = skip
        hi = _np_minimum(S, (T.np_arange(L) // block_m + 1) * block_m)  # the loop bound of each query's tile
        vis = vis & (T.np_arange(S)[None, :] < -(-hi // block_n)[:, None] * block_n)
    with T.np_errstate(all="ignore"):  # -inf - -inf and log(0) are expected for queries that see no key
        return _online_loop(q, k, v, vis, scale, S, block, mistake)


def _online_loop(q, k, v, vis, scale: float, S: int, block: int, mistake: str) -> tuple[np.ndarray, np.ndarray]:
    m = T.np_zeros(q.shape[:-1]) if mistake == "max_zero" else _np_full(q.shape[:-1], -_np_inf)
    lsum = T.np_zeros(q.shape[:-1])
    acc = T.np_zeros(q.shape[:-1] + (v.shape[-1],))
    blocks = 0
    last = lsum
    for start in _range(0, S, block):
        stop = _min(start + block, S)
        s = _np_matmul(q, T.np_swapaxes(k[..., start:stop, :], -1, -2)) * scale
        s = T.np_where(vis[:, start:stop], s, -_np_inf)
        m_new = _np_maximum(m, T.np_max(s, axis=-1) if mistake != "global_max" else T.np_max(s))
        safe = T.np_where(m_new == -_np_inf, 0.0, m_new)
        p = T.np_exp(s - safe[..., None])
        alpha = T.np_exp(m - safe)
        if mistake == "inverted" or (mistake == "inverted_first" and start > 0):
            alpha = T.np_exp(safe - m)
        elif mistake == "inverted_first":  # the first block only sets the sum and the accumulator
            alpha = T.np_ones(m.shape)
        if mistake == "average_blocks":  # each block's own softmax, averaged over the blocks
            own = T.np_exp(s - T.np_max(s, axis=-1)[..., None])
            acc = acc + _np_matmul(own / _np_sum(own, axis=-1)[..., None], v[..., start:stop, :])
            blocks += 1
        else:
            acc = (acc if mistake == "no_rescale_acc" else acc * alpha[..., None]) + _np_matmul(p, v[..., start:stop, :])
        lsum = (lsum if mistake == "no_rescale_sum" else lsum * alpha) + _np_sum(p, axis=-1)
        last = _np_sum(p, axis=-1)
        m = m_new
    seen = lsum > 0
    out = T.np_where(seen[..., None], acc / T.np_where(seen, lsum, 1.0)[..., None], 0.0)
    if mistake == "average_blocks":
        out = acc / _max(blocks, 1)
    elif mistake == "no_normalise":
        out = acc
    elif mistake == "nan_empty":
        out = acc / lsum[..., None]
    lse = m + _np_log(lsum)
    if mistake == "lse_no_max":
        lse = _np_log(lsum)
    elif mistake == "lse_base2":
        lse = lse * _log2e
    elif mistake == "lse_last_tile":
        lse = m + _np_log(last)
    elif mistake == "lse_unscaled":
        lse = m / scale + _np_log(lsum)
    return out, lse


def _sdpa64(q, k, v, causal: bool) -> np.ndarray:
    """PyTorch's SDPA in float64 with an explicit bottom-right causal mask."""
    L, S = q.shape[-2], k.shape[-2]
    mask = R.from_numpy(_visible(L, S, causal)) if causal else None
    args = [R.from_numpy(T.np_array(a, dtype=T.np_float64)) for a in (q, k, v)]
    return T.tensor_to_float64(R.sdpa(*args, attn_mask=mask))


def _sdpa_error(q, k, v, causal: bool, dtype, expected: np.ndarray) -> float:
    """How far PyTorch's own SDPA at ``dtype`` lands from the float64 oracle (0 for float64)."""
    if dtype == F64:
        return 0.0
    L, S = q.shape[-2], k.shape[-2]
    mask = R.from_numpy(_visible(L, S, causal)) if causal else None
    args = [R.tensor_of(a, dtype) for a in (q, k, v)]
    try:
        got = T.tensor_to_float64(R.sdpa(*args, attn_mask=mask))
    except RuntimeError:  # an SDPA backend without this dtype on this device
        got = T.tensor_to_float64(R.sdpa(*[T._to(a, dtype=F32) for a in args], attn_mask=mask))
    return max_error(got, expected)


def _atol(dtype, base_error: float, scale: float) -> float:
    floor = {F64: 1e-10, F32: 2e-6, F16: 2e-3, BF16: 1.6e-2}[dtype]
    return _max(4.0 * base_error, floor * _max(1.0, scale))


def _fail(label: str, what: str, got: np.ndarray, expected: np.ndarray, atol: float, mistakes: list, extra: str = ""):
    if T._tuple(got.shape) != T._tuple(expected.shape):
        first = f"{label}: the {what} should have shape {T._tuple(expected.shape)}, got {T._tuple(got.shape)}."
    else:
        first = (
            f"{label}: the {what} {is_or_are(what)} wrong (largest error {max_error(got, expected):.3g}, tolerance {atol:.2g})."
        )
    lines = [first, f"  expected: {show(expected)}", f"  got:      {show(got)}"]
    if not T.np_isfinite(got).all() and T.np_isfinite(expected).all():
        lines.append("  Your result contains NaN or inf where the correct one is finite.")
    lines += [f"  Likely mistake: {m}" for m in mistakes if m]
    if extra:
        lines.append(extra)
    raise CheckFailure("\n".join(lines))


def _compare(got, expected, *, label: str, what: str, atol: float, fingerprints: dict) -> None:
    if T._tuple(got.shape) == T._tuple(expected.shape) and max_error(got, expected) <= atol:
        return
    mistake = diagnose(got, fingerprints, atol=_max(atol, 1e-9))
    _fail(label, what, got, expected, atol, [mistake])


def _as_tensor(result, *, label: str, what: str, dtype=None, shape=None) -> np.ndarray:
    if not T.is_tensor(result):
        raise CheckFailure(f"{label}: the {what} should be a torch.Tensor, got {T.type_name(result)}.")
    if dtype is not None and R.dtype_of(result) not in (dtype if _isinstance(dtype, tuple) else (dtype,)):
        wanted = " or ".join(R.dname(d) for d in (dtype if _isinstance(dtype, tuple) else (dtype,)))
        raise CheckFailure(f"{label}: the {what} should be {wanted}, got {R.dname(R.dtype_of(result))}.")
    if shape is not None and T._tuple(R.shape_of(result)) != T._tuple(shape):
        raise CheckFailure(f"{label}: the {what} should have shape {T._tuple(shape)}, got {T._tuple(R.shape_of(result))}.")
    return T.tensor_to_float64(result)


def _inputs(rng, lead: tuple, L: int, S: int, d: int, dtype, scale: float = 1.0, dv: int | None = None):
    q = R.rounded(rng.normal(size=lead + (L, d), scale=scale), dtype)
    k = R.rounded(rng.normal(size=lead + (S, d), scale=scale), dtype)
    v = R.rounded(rng.normal(size=lead + (S, dv or d)), dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# Watching a call: the largest tensor created, and the aten operations used


class _Recorder(_TorchDispatchMode):
    """Records the names of the aten operations run inside it and the largest tensor they return.

    With ``guard=True`` every floating tensor that an allocation (``empty_like``, ``zeros``, ...) returns is
    replaced by a view into a larger buffer whose margins before and after hold a NaN sentinel, and the
    contents of ``empty*`` results hold it too: afterwards :meth:`overrun` says whether a kernel wrote past
    (or before) a tensor it was given, and :func:`_unwritten` which output entries it never wrote. The margins
    also keep such a write from corrupting memory the process uses.
    """

    _ALLOCATIONS = frozenset(
        ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like", "new_zeros")
        + ("ones", "ones_like", "new_ones", "full", "full_like", "new_full")
    )

    # Operations that reduce along given axes (their ``dim`` argument), and those that contract their first
    # operand's last axis (matrix products): :attr:`reduced` collects the sizes of the axes they reduce.
    _DIM_REDUCTIONS = frozenset(
        ("amax", "amin", "max", "min", "sum", "nansum", "mean", "prod", "logsumexp", "argmax", "argmin")
        + ("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")
    )
    _CONTRACTIONS = {"mm": 0, "bmm": 0, "matmul": 0, "mv": 0, "dot": 0, "vdot": 0, "addmm": 1, "baddbmm": 1, "addbmm": 1}

    def __init__(self, guard: bool = False):
        super().__init__()
        self.largest = 0
        self.largest_shape = ()
        self.ops: set = set()
        self.reduced: set = set()  # sizes of the axes reductions and matrix products ran along
        self.guard = guard
        self.guarded: list = []  # (buffer, margin, span) per guarded allocation

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = _str(func)
        self.ops.add(name)
        base = name.split(".")[1] if name.count(".") >= 1 else name
        self._note_reduction(base, args, kwargs or {})
        if self.guard and _isinstance(out, T.Tensor) and base in self._ALLOCATIONS:
            out = self._guarded(out, fill=base.startswith(("empty", "new_empty")))
        for leaf in _tree_leaves(out):
            if _isinstance(leaf, T.Tensor):
                n = _numel(leaf)
                if n > self.largest:
                    self.largest, self.largest_shape = n, T._tuple(R.shape_of(leaf))
        return out

    def _note_reduction(self, base: str, args: tuple, kwargs: dict) -> None:
        if "scaled_dot_product" in base:  # attention itself reduces along the keys of its second operand
            if _len(args) > 1 and _isinstance(args[1], T.Tensor) and _len(R.shape_of(args[1])) >= 2:
                self.reduced.add(_int(R.shape_of(args[1])[-2]))
            return
        if base in self._CONTRACTIONS:
            i = self._CONTRACTIONS[base]
            if _len(args) > i and _isinstance(args[i], T.Tensor) and _len(R.shape_of(args[i])) >= 1:
                self.reduced.add(_int(R.shape_of(args[i])[-1]))
            return
        if base not in self._DIM_REDUCTIONS or not args or not _isinstance(args[0], T.Tensor):
            return
        dims = kwargs.get("dim", args[1] if _len(args) > 1 else None)
        if _isinstance(dims, _int):
            dims = (dims,)
        if not _isinstance(dims, (_list, T._tuple)):
            return  # a reduction over every element, or max(a, b): not along one axis
        shape = T._tuple(R.shape_of(args[0]))
        for d in dims:
            if _isinstance(d, _int) and -_len(shape) <= d < _len(shape):
                self.reduced.add(_int(shape[d]))

    def _guarded(self, out, fill: bool):
        dtype = R.dtype_of(out)
        if dtype not in _SENTINEL or _numel(out) == 0:
            return out
        shape, strides = T._tuple(R.shape_of(out)), T._tuple(_stride_of(out))
        span = 1 + _sum_int((n - 1) * st for n, st in zip(shape, strides, strict=True))
        margin = (span + 16384 + 63) // 64 * 64  # more than a tile of queries can overshoot; keeps the alignment
        int_dtype, bits = _SENTINEL[dtype]
        buffer = R.t_empty(margin + span + margin, dtype=dtype, device=_device_of(out))
        _fill_(_view_as(buffer, int_dtype), bits)
        view = _as_strided(buffer, shape, strides, margin)
        if not fill:
            _copy_(view, out)
        self.guarded.append((buffer, margin, span))
        return view

    def overrun(self) -> int:
        """How many elements of the guard margins were overwritten."""
        changed = 0
        for buffer, margin, span in self.guarded:
            int_dtype, bits = _SENTINEL[R.dtype_of(buffer)]
            raw = _to_numpy(_to_cpu(_detach(_view_as(buffer, int_dtype))))
            changed += _int(_np_sum(raw[:margin] != bits)) + _int(_np_sum(raw[margin + span :] != bits))
        return changed


def _unwritten(result) -> np.ndarray | None:
    """Bool array, True where ``result`` still holds the allocation sentinel (None if the dtype has none)."""
    if R.dtype_of(result) not in _SENTINEL:
        return None
    int_dtype, bits = _SENTINEL[R.dtype_of(result)]
    return _to_numpy(_to_cpu(_detach(_view_as(result, int_dtype)))) == bits


# aten operations that compute attention (or its pieces) in PyTorch instead of in a Triton kernel
_TORCH_MATH = frozenset(
    ("mm", "bmm", "addmm", "baddbmm", "matmul", "einsum", "linear", "softmax", "_softmax", "_log_softmax", "log_softmax")
    + ("exp", "exp_", "exp2", "exp2_", "logsumexp", "dot", "vdot", "mv", "addmv", "addbmm", "_safe_softmax")
)


def _is_torch_math(op_name: str) -> bool:
    """True for an aten operation such as "aten.bmm.default" that does attention arithmetic."""
    base = op_name.split(".")[1] if op_name.count(".") >= 1 else op_name
    return base in _TORCH_MATH or "scaled_dot_product" in base


class _LaunchCounter:
    """Counts Triton kernel launches (interpreted or compiled) while it is active."""

    def __init__(self):
        self.count = 0
        self._saved = []

    def __enter__(self):
        for cls in (_Interpreted, _Jit):
            if cls is None:
                continue
            original = cls.__dict__["run"]

            def run(fn_self, *args, _original=original, **kwargs):
                self.count += 1
                return _original(fn_self, *args, **kwargs)

            self._saved.append((cls, original))
            _setattr(cls, "run", run)
        return self

    def __exit__(self, *exc):
        for cls, original in self._saved:
            _setattr(cls, "run", original)
        self._saved.clear()
        return False


OBSERVE = "autograder.checks.ch08.observe_call"


def observe_call(fn, guard: bool, count_launches: bool, label: str, *args, **kwargs) -> dict:
    """Call ``fn`` where the student's code runs, watched: the aten operations it ran, its largest tensor,
    (with ``guard``) writes outside its allocations and output entries it never wrote, Triton launches.

    Returns data only: ``{"error", "result", "largest", "largest_shape", "ops", "overrun", "unwritten", "unwritten_lse",
    "launches"}`` (``unwritten_lse``: of the second tensor of a tuple result, as ``flash_attention(..., return_lse=True)``).
    """
    recorder = _Recorder(guard=guard)
    launches = _LaunchCounter()
    try:
        if count_launches:
            with launches, recorder:
                result = call(fn, *args, label=label, **kwargs)
        else:
            with recorder:
                result = call(fn, *args, label=label, **kwargs)
    except CheckFailure as exc:
        return {"error": _str(exc)}
    parts = T._tuple(result) if T._type(result) is T._tuple else (result,)
    unwritten = [_unwritten(r) if guard and T.is_tensor(r) else None for r in parts[:2]] + [None]
    return {
        "error": None,
        "result": result,
        "largest": _int(recorder.largest),
        "largest_shape": T._tuple(_int(n) for n in recorder.largest_shape),
        "ops": sorted(_str(op) for op in recorder.ops),
        "reduced": sorted(recorder.reduced),
        "overrun": _int(recorder.overrun()) if guard else 0,
        "unwritten": unwritten[0],
        "unwritten_lse": unwritten[1],
        "launches": _int(launches.count),
    }


def _observed(fn, args: tuple, kwargs: dict, *, guard: bool, count_launches: bool, label: str) -> dict:
    """:func:`observe_call` here, or in the student's kernel when ``fn`` lives there (its report is data)."""
    if is_remote(fn):
        run = current_remote().probe(OBSERVE, fn, guard, count_launches, label, *args, **kwargs)
    else:
        run = observe_call(fn, guard, count_launches, label, *args, **kwargs)
    if T._type(run) is not T._dict or "error" not in run:
        raise CheckFailure(f"{label}: the watched call did not report back.")
    if run["error"] is not None:
        raise CheckFailure(_str(run["error"]))
    keys = ("result", "largest", "largest_shape", "ops", "overrun", "unwritten", "launches")
    if not all(k in run for k in keys) or T._type(run["ops"]) is not T._list or T._type(run["largest"]) is not _int:
        raise CheckFailure(f"{label}: the watched call's report is malformed.")
    for key in ("unwritten", "unwritten_lse"):
        if run.get(key) is not None and T._type(run[key]) is not T.ndarray:
            raise CheckFailure(f"{label}: the watched call's report is malformed.")
    return run


# ---------------------------------------------------------------------------------------------
# tiled_attention
# ---------------------------------------------------------------------------------------------


def _tiled_prints(q, k, v, causal: bool, block: int) -> dict:
    prints = {}
    for mistake, message in (
        ("no_rescale_acc", NO_RESCALE_ACC),
        ("no_rescale_sum", NO_RESCALE_SUM),
        ("scale_d", SCALE_D),
        ("no_scale", NO_SCALE),
        ("top_left", TOP_LEFT),
        ("off_by_one", OFF_BY_ONE),
        ("not_causal", NOT_CAUSAL),
        ("drop_tail", DROP_TAIL),
        ("nan_empty", NAN_EMPTY),
        ("average_blocks", AVERAGE_BLOCKS),
        ("inverted_first", INVERTED_RESCALE),
        ("inverted", INVERTED_RESCALE + " "),  # the same message (a dict key per fingerprint)
        ("no_normalise", NO_NORMALISE),
        ("max_zero", MAX_UNDERFLOW),
        ("global_max", MAX_UNDERFLOW + " "),
        ("local_cols", LOCAL_COLS),
    ):
        if causal or mistake not in ("top_left", "off_by_one", "not_causal", "local_cols"):
            prints[message] = _online(q, k, v, causal, block, mistake)
    if v.shape[-1] != q.shape[-1]:
        prints[SCALE_DV] = _online(q, k, v, causal, block, scale=1.0 / T.sqrt(v.shape[-1]))
    return prints


def _check_tiled(fn, q, k, v, *, causal: bool, block: int | None, dtype, note: str = "", memory: bool = False) -> None:
    L, S = q.shape[-2], k.shape[-2]
    where = f"q {T._tuple(q.shape)}, k {T._tuple(k.shape)}, v {T._tuple(v.shape)}, {R.dname(dtype)}"
    args_text = f"block_size={block}, " if block is not None else ""
    label = f"tiled_attention(q, k, v, {args_text}causal={causal}) [{where}{note}]"
    qt, kt, vt = (R.tensor_of(a, dtype) for a in (q, k, v))
    before = [R.clone(t) for t in (qt, kt, vt)]
    kwargs = {"causal": causal} if block is None else {"block_size": block, "causal": causal}
    run = _observed(fn, (qt, kt, vt), kwargs, guard=False, count_launches=False, label=label)
    result, largest, largest_shape = run["result"], run["largest"], run["largest_shape"]
    if T._type(result) is not T._tuple or T._len(result) != 2:
        raise CheckFailure(f"{label}: should return a tuple (out, logsumexp), got {T.type_name(result)}.")
    expected = _sdpa64(q, k, v, causal)
    scale = float(T.np_max(T.np_abs(v))) if v.size else 1.0
    atol = _atol(dtype, _sdpa_error(q, k, v, causal, dtype, expected), scale)
    lse_dtype = F64 if dtype == F64 else F32
    out = _as_tensor(result[0], label=label, what="output", dtype=dtype, shape=q.shape[:-1] + (v.shape[-1],))
    lse = _as_tensor(result[1], label=label, what="logsumexp (natural log, float32; float64 for float64 inputs)", dtype=lse_dtype)
    prints = _tiled_prints(q, k, v, causal, block or 64)
    _compare(
        out, expected, label=label, what="output", atol=atol, fingerprints={m: (lambda o=o: o[0]) for m, o in prints.items()}
    )
    exp_lse = _online(q, k, v, causal, block or 64)[1]
    lse_prints = {m: (lambda o=o: o[1]) for m, o in prints.items()}
    lse_prints[LSE_NO_MAX] = lambda: _online(q, k, v, causal, block or 64, "lse_no_max")[1]
    lse_prints[LSE_BASE2] = lambda: _online(q, k, v, causal, block or 64, "lse_base2")[1]
    lse_prints[LSE_UNSCALED] = lambda: _online(q, k, v, causal, block or 64, "lse_unscaled")[1]
    finite = exp_lse[T.np_isfinite(exp_lse)]
    lse_scale = float(T.np_max(T.np_abs(finite))) if finite.size else 1.0
    lse_atol = (1e-10 if dtype == F64 else 2e-5) * _max(1.0, lse_scale)
    _compare(
        lse, exp_lse, label=label, what=f"logsumexp (shape {T._tuple(q.shape[:-1])})", atol=lse_atol, fingerprints=lse_prints
    )
    for name, t, b in zip(("q", "k", "v"), (qt, kt, vt), before, strict=True):
        if not R.t_equal(t, b):
            raise CheckFailure(f"{label}: tiled_attention changed its input {name} in place.")
    if memory and largest >= L * S:  # memory cases have no leading dimensions
        raise CheckFailure(
            f"{label}: your tiled_attention created a tensor of {largest} elements (shape "
            f"{largest_shape}); L x S = {L} x {S} = {L * S}. "
            f"{FULL_MATRIX}: compute the scores one block of keys at a time, (..., L, block_size), and keep only "
            "the running max, the running sum and the output accumulator between blocks."
            + (
                f" Its last dimension is {largest_shape[-1]} but block_size={block}: {IGNORED_BLOCK} The "
                "tiles must be block_size keys wide."
                if largest_shape and block is not None and largest_shape[-1] != block
                else ""
            )
        )


def visible_tiled_attention(fn) -> None:
    """Five small cases: L = S, L != S, causal, a block size that does not divide S."""
    rng = T.default_rng(80)
    _check_tiled(fn, *_inputs(rng, (), 8, 8, 4, F64), causal=False, block=4, dtype=F64, note=", two key blocks")
    _check_tiled(fn, *_inputs(rng, (2,), 6, 10, 8, F32), causal=False, block=3, dtype=F32, note=", block 3 does not divide S")
    _check_tiled(fn, *_inputs(rng, (2, 3), 7, 7, 8, F32), causal=True, block=4, dtype=F32, note=", causal")
    _check_tiled(fn, *_inputs(rng, (1,), 5, 12, 4, F64), causal=True, block=5, dtype=F64, note=", causal, L < S")
    _check_tiled(fn, *_inputs(rng, (2,), 10, 9, 8, F32, scale=3.0), causal=False, block=None, dtype=F32,
                 note=", default block size")  # fmt: skip
    passed("tiled_attention", 5)


def hidden_tiled_attention(fn, seed: int = 81) -> None:
    """Large scores whose max moves between tiles, L > S causal (queries that see nothing), fp16/bf16,
    Dv != D, block 1 and block > S, and the memory rule (no tensor of L x S elements, also with S = 64, the
    default block size, so that tiles that ignore block_size are seen)."""
    rng = T.default_rng(seed)
    count = 0

    def case(args, **kw):
        nonlocal count
        _check_tiled(fn, *args, **kw)
        count += 1

    # rising scores: the max grows in every tile, so every rescaling matters
    q = R.rounded(rng.normal(size=(2, 6, 8)), F64)
    k = R.rounded(rng.normal(size=(2, 20, 8)) + T.np_arange(20)[None, :, None] * 0.4, F64)
    case((q, k, R.rounded(rng.normal(size=(2, 20, 3)), F64)), causal=False, block=4, dtype=F64,
         note=", key scores rising tile by tile, Dv = 3")  # fmt: skip
    case(_inputs(rng, (2, 2), 9, 33, 16, F32, scale=4.0), causal=True, block=8, dtype=F32, note=", scores near 60, causal")
    case(_inputs(rng, (3,), 12, 5, 8, F64), causal=True, block=2, dtype=F64,
         note=", causal with L > S: the first 7 queries see no key (zero output, logsumexp -inf)")  # fmt: skip
    case(_inputs(rng, (1,), 9, 7, 4, F32), causal=True, block=1, dtype=F32, note=", block_size=1")
    case(_inputs(rng, (2,), 5, 6, 4, F32), causal=False, block=64, dtype=F32, note=", block larger than S")
    q, k, v = _inputs(rng, (2,), 10, 12, 8, F64)
    k[..., 0] = 60.0 + 0.1 * k[..., 0]
    q[:, :5, 0] -= 60.0  # rows 0-4 score about -1270 on every key: exp underflows unless each row has its own max
    case((q, k, v), causal=False, block=4, dtype=F64, note=", queries 0-4 score about -1270 on every key")
    case(_inputs(rng, (2, 2), 16, 24, 16, F16, scale=2.0), causal=True, block=8, dtype=F16, note=", float16")
    case(_inputs(rng, (2,), 11, 19, 8, BF16), causal=False, block=8, dtype=BF16, note=", bfloat16")
    case(_inputs(rng, (), 128, 128, 8, F32), causal=True, block=16, dtype=F32, memory=True,
         note=", memory: no tensor may have L x S elements")  # fmt: skip
    case(_inputs(rng, (), 96, 160, 4, F32), causal=False, block=32, dtype=F32, memory=True,
         note=", memory: no tensor may have L x S elements")  # fmt: skip
    case(_inputs(rng, (), 256, 64, 8, F32), causal=True, block=16, dtype=F32, memory=True,
         note=", memory with S = 64: no tensor may have L x S elements (tiles of block_size=16 keys)")  # fmt: skip
    passed("tiled_attention", count, hidden=True)


# ---------------------------------------------------------------------------------------------
# flash_attention
# ---------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _flash_prints(q, k, v, causal: bool, kv_transposed: bool = False) -> dict:
    """The outputs of known kernel mistakes; tile-dependent ones are tried at the usual tile sizes."""
    d = q.shape[-1]
    prints = {
        SCALE_D: lambda: _online(q, k, v, causal, 16, "scale_d")[0],
        NO_SCALE: lambda: _online(q, k, v, causal, 16, "no_scale")[0],
        EXP2_NO_LOG2E: lambda: _online(q, k, v, causal, 16, scale=math.log(2.0) / T.sqrt(d))[0],
        EXP_WITH_LOG2E: lambda: _online(q, k, v, causal, 16, scale=_log2e / T.sqrt(d))[0],
        NO_NORMALISE: lambda: _online(q, k, v, causal, 16, "no_normalise")[0],
        NAN_EMPTY: lambda: _online(q, k, v, causal, 16, "nan_empty")[0],
        MAX_UNDERFLOW: lambda: _online(q, k, v, causal, 16, "max_zero")[0],
        V_IS_K: lambda: _online(q, k, k, causal, 16)[0],
    }
    for padded in sorted({_pow2(d), _max(16, _pow2(d))} - {d}):
        prints[f"{SCALE_PADDED} (here {padded} instead of {d})"] = lambda padded=padded: _online(
            q, k, v, causal, 16, scale=1.0 / T.sqrt(padded)
        )[0]
    L = q.shape[-2]
    for block_m in (16, 32, 64, 128):
        if L > block_m:  # every query tile computed with the queries of tile 0 (its own rows in the mask and the store)
            rows = T.np_arange(L) % block_m
            prints[f"{SAME_TILE} (query tiles of {block_m})"] = lambda rows=rows: _online(q[..., rows, :], k, v, causal, 16)[0]
    if kv_transposed:  # the kernel read the (B, S, H, D) buffers of k and v as if they were (B, H, S, D)
        B, H, S = k.shape[0], k.shape[1], k.shape[2]
        flat_k = _np_ascontiguous(T.np_swapaxes(k, 1, 2)).reshape(B, H, S, k.shape[-1])
        flat_v = _np_ascontiguous(T.np_swapaxes(v, 1, 2)).reshape(B, H, S, v.shape[-1])
        prints[KV_STRIDES] = lambda: _online(q, flat_k, flat_v, causal, 16)[0]
    if causal:
        prints[TOP_LEFT] = lambda: _online(q, k, v, causal, 16, "top_left")[0]
        prints[OFF_BY_ONE] = lambda: _online(q, k, v, causal, 16, "off_by_one")[0]
        prints[NOT_CAUSAL] = lambda: _online(q, k, v, causal, 16, "not_causal")[0]
        for block in (16, 32, 64, 128):
            prints[f"{LOCAL_COLS} (key tiles of {block})"] = lambda block=block: _online(q, k, v, causal, block, "local_cols")[0]
        for tiles in ((16, 16), (32, 32), (64, 64), (128, 128), (32, 16), (64, 32), (128, 64), (16, 32)):
            message = f"{CAUSAL_SKIP} (query tiles of {tiles[0]}, key tiles of {tiles[1]})"
            prints[message] = lambda skip=tiles: _online(q, k, v, causal, 16, skip=skip)[0]
    for mistake, message in (("no_rescale_acc", NO_RESCALE_ACC), ("no_rescale_sum", NO_RESCALE_SUM), ("boundary", BOUNDARY)):
        for block in (16, 32, 64, 128, 8):
            prints[f"{message} (key tiles of {block})"] = lambda block=block, mistake=mistake: _online(
                q, k, v, causal, block, mistake
            )[0]
    prints.update(_split_prints(q, k, v, causal))
    return prints


def _split_vis(L: int, S: int, bm: int, bn: int, causal: bool, mistake: str) -> np.ndarray:
    """(L, S) bool: the keys each query sees in a kernel whose loop over key tiles is split in two (an unmasked loop
    over [0, full_end), a masked step over [full_end, hi)) with tiles of ``bm`` queries and ``bn`` keys, and one mistake.
    """
    i, j = T.np_arange(L)[:, None], T.np_arange(S)[None, :]
    tile = i // bm
    even = S // bn * bn  # keys before this lie in whole tiles
    full_end = _np_minimum(even, _np_maximum(tile * bm + S - L + 1, 0) // bn * bn) if causal else even
    vis = _visible(L, S, causal)
    if mistake == "masked_skipped":  # only the unmasked loop ran
        return vis & (j < full_end)
    if mistake == "diagonal_skipped":  # the masked step covered only the last, partial tile
        return vis & ((j < full_end) | (j >= even))
    if mistake == "tail_skipped":  # both loops end at S // bn * bn
        return vis & (j < even)
    if mistake == "bound_from_last_row":  # the unmasked loop ran up to the tile's last row's bound: no mask there
        wrong_end = _np_minimum(even, _np_maximum((tile + 1) * bm + S - L, 0) // bn * bn) if causal else even
        return vis | (j < wrong_end)
    raise ValueError(mistake)


_SPLIT_MISTAKES = (
    ("masked_skipped", MASKED_SKIPPED, False),
    ("diagonal_skipped", DIAGONAL_SKIPPED, True),
    ("tail_skipped", TAIL_SKIPPED, False),
    ("bound_from_last_row", WRONG_BOUND, True),
)
_TILES = (16, 32, 64, 128)


def _split_prints(q, k, v, causal: bool) -> dict:
    """Outputs of the mistakes of a split loop (unmasked loop, masked diagonal/tail step), at the usual tiles."""
    L, S = q.shape[-2], k.shape[-2]
    prints = {}
    for mistake, message, causal_only in _SPLIT_MISTAKES:
        if (causal_only or mistake == "masked_skipped") and not causal:
            continue  # without causal, the masked step is the tail alone: tail_skipped names it
        for bm in _TILES if causal else (16,):  # without causal, the query tile changes nothing
            for bn in _TILES:
                prints[f"{message} (query tiles of {bm}, key tiles of {bn})"] = lambda bm=bm, bn=bn, mistake=mistake: _online(
                    q, k, v, causal, bn, vis=_split_vis(L, S, bm, bn, causal, mistake)
                )[0]
    return prints


def _lse64(q, k, causal: bool) -> np.ndarray:
    """Float64 ``torch.logsumexp`` of the scaled scores, masked bottom-right when ``causal`` (-inf: no key seen)."""
    qt, kt = (R.from_numpy(T.np_array(a, dtype=T.np_float64)) for a in (q, k))
    scores = _t_mul(_t_matmul(qt, _transpose(kt, -2, -1)), 1.0 / T.sqrt(q.shape[-1]))
    if causal:
        hidden = R.from_numpy(~_visible(q.shape[-2], k.shape[-2], True))
        scores = _t_masked_fill(scores, hidden, -_np_inf)
    return T.tensor_to_float64(_t_logsumexp(scores, -1))


def _lse_prints(q, k, v, causal: bool) -> dict:
    """The logsumexp of known mistakes (natural log, float64)."""
    exp = _lse64(q, k, causal)
    prints = {
        LSE_BASE2: lambda: exp * _log2e,
        LSE_NO_MAX: lambda: _online(q, k, v, causal, 16, "lse_no_max")[1],
        LSE_EMPTY: lambda: T.np_where(_np_isneginf(exp), 0.0, exp),
    }
    if causal:
        prints[LSE_NOT_CAUSAL] = lambda: _lse64(q, k, False)
    for block in _TILES:
        prints[f"{LSE_LAST_TILE} (key tiles of {block})"] = lambda block=block: _online(q, k, v, causal, block, "lse_last_tile")[
            1
        ]
    return prints


def _device() -> str:
    interpreting = _environ_get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return "cuda" if _cuda_available() and not interpreting else "cpu"


def _check_flash(
    fn,
    q,
    k,
    v,
    *,
    causal: bool,
    dtype,
    note: str = "",
    default_call: bool = False,
    kv_transposed: bool = False,
    return_lse: bool = False,
) -> None:
    L, d = q.shape[-2], q.shape[-1]
    device = _device()
    where = f"q {T._tuple(q.shape)}, k and v {T._tuple(k.shape)}, {R.dname(dtype)}, {device}"
    args_text = "" if default_call else f", causal={causal}"
    label = f"flash_attention(q, k, v{args_text}{', return_lse=True' if return_lse else ''}) [{where}{note}]"
    if _Interpreted is None:
        raise CheckFailure(f"{label}: Triton is not installed in this environment (pip install triton).")
    qt = R.tensor_of(q, dtype, device)
    if kv_transposed:  # strides (S*H*D, D, H*D, 1): not contiguous, and different from q's
        kt, vt = (_transpose(R.tensor_of(_np_ascontiguous(T.np_swapaxes(a, 1, 2)), dtype, device), 1, 2) for a in (k, v))
    else:
        kt, vt = (R.tensor_of(a, dtype, device) for a in (k, v))
    before = [R.clone(t) for t in (qt, kt, vt)]
    kwargs = ({} if default_call else {"causal": causal}) | ({"return_lse": True} if return_lse else {})
    run = _observed(fn, (qt, kt, vt), kwargs, guard=True, count_launches=True, label=label)
    result = run["result"]
    used = sorted(op for op in run["ops"] if _is_torch_math(op))
    if used:
        raise CheckFailure(
            f"{label}: {USED_TORCH} or other PyTorch maths: the call ran {', '.join(used[:6])}. Load tiles of q, k and v "
            "in the kernel and compute the scores, the online softmax and the output there."
        )
    if run["launches"] == 0:
        raise CheckFailure(
            f"{label}: {NO_KERNEL}. Define a @triton.jit kernel and launch it with kernel[grid](...); the output must "
            "be written by the kernel."
        )
    overrun = run["overrun"]
    if overrun:
        raise CheckFailure(
            f"{label}: the kernel {STORE_MASK} It wrote {overrun} element{'' if overrun == 1 else 's'} outside the tensors allocated during the "
            f"call (here L = {L}, D = {d})."
        )
    if return_lse:
        if T._type(result) is not T._tuple or T._len(result) != 2:
            raise CheckFailure(f"{label}: with return_lse=True, should return a tuple (out, lse), got {T.type_name(result)}.")
        result, lse_result = result
    elif T._type(result) is T._tuple:
        raise CheckFailure(f"{label}: without return_lse, should return the output tensor alone, got a tuple.")
    expected = _sdpa64(q, k, v, causal)
    atol = _atol(dtype, _sdpa_error(q, k, v, causal, dtype, expected), float(T.np_max(T.np_abs(v))))
    out = _as_tensor(result, label=label, what="output", dtype=dtype, shape=T._tuple(q.shape))
    unwritten = run["unwritten"]
    if unwritten is not None and unwritten.any():
        spots = _np_argwhere(unwritten.reshape((-1,) + T._tuple(unwritten.shape[-2:])))
        heads = sorted({_int(bh) for bh, _, _ in spots})
        rows = sorted({_int(i) for _, i, _ in spots})
        _fail(
            label,
            "output",
            out,
            expected,
            atol,
            [f"the kernel {UNWRITTEN}"],
            f"  {_int(_np_sum(unwritten))} of {unwritten.size} entries unwritten; (batch x head) programs {heads[:6]}"
            f"{' ...' if T._len(heads) > 6 else ''}, query rows {rows[:8]}{' ...' if T._len(rows) > 8 else ''}.",
        )
    _compare(out, expected, label=label, what="output", atol=atol, fingerprints=_flash_prints(q, k, v, causal, kv_transposed))
    if return_lse:
        _check_lse(lse_result, run.get("unwritten_lse"), q, k, v, causal, label)
    for name, t, b in zip(("q", "k", "v"), (qt, kt, vt), before, strict=True):
        if not R.t_equal(t, b):
            raise CheckFailure(f"{label}: flash_attention changed its input {name} in place.")


def _check_lse(result, unwritten, q, k, v, causal: bool, label: str) -> None:
    """The kernel's logsumexp: float32, shape (..., L), natural log, -inf where a query sees no key."""
    what = f"logsumexp (natural log, float32, shape {T._tuple(q.shape[:-1])})"
    lse = _as_tensor(result, label=label, what="logsumexp", dtype=F32, shape=T._tuple(q.shape[:-1]))
    expected = _lse64(q, k, causal)
    if unwritten is not None and unwritten.any():
        _fail(label, what, lse, expected, 0.0, [f"the kernel {UNWRITTEN}"], "  (in the logsumexp tensor)")
    finite = expected[T.np_isfinite(expected)]
    atol = 2e-5 * _max(1.0, float(T.np_max(T.np_abs(finite))) if finite.size else 1.0)
    if T._tuple(lse.shape) == T._tuple(expected.shape) and max_error(lse, expected) <= atol:
        return
    extra = ""
    empty = _np_isneginf(expected)
    if empty.any() and not _np_isneginf(lse[empty]).all():
        extra = f"  Queries {sorted(_int(i) for i in _np_argwhere(empty)[:, -1])[:8]} (last index) see no key: {LSE_EMPTY}"
    _fail(label, what, lse, expected, atol, [diagnose(lse, _lse_prints(q, k, v, causal), atol=atol)], extra)


def visible_flash_attention(fn) -> None:
    """Five small cases under the Triton interpreter: one tile, several tiles, causal, and the logsumexp of 3-D
    inputs (return_lse=True), also where causal queries see no key."""
    rng = T.default_rng(82)
    _check_flash(fn, *_inputs(rng, (1, 1), 16, 16, 16, F32), causal=False, dtype=F32, note=", one tile", default_call=True)
    _check_flash(fn, *_inputs(rng, (1, 2), 48, 48, 32, F32), causal=False, dtype=F32, note=", several tiles")
    _check_flash(fn, *_inputs(rng, (2, 1), 32, 37, 16, F32), causal=True, dtype=F32, note=", causal, L = 32 < S = 37")
    _check_flash(fn, *_inputs(rng, (2,), 20, 40, 16, F32, scale=2.0), causal=False, dtype=F32, return_lse=True,
                 note=", 3-D inputs (batch x heads flattened)")  # fmt: skip
    _check_flash(fn, *_inputs(rng, (2,), 24, 13, 16, F32), causal=True, dtype=F32, return_lse=True,
                 note=", 3-D, causal with L > S: the first 11 queries see no key (zero output, logsumexp -inf)")  # fmt: skip
    passed("flash_attention", 5)


def hidden_flash_attention(fn, seed: int = 83) -> None:
    """Strided k and v, L and S not multiples of a tile, L != S both ways, causal, large scores, float16,
    D = 64, and D = 24 and 40 (not powers of two); the logsumexp (return_lse=True) in float32 for float16 inputs,
    for 3-D inputs and 4-D ones with several batches and heads, causal with L != S both ways, and over many query tiles (L > 256: 17 tiles of 16, the
    interpreter's, and 3 of 128, a GPU's). Every tensor allocated during a call is guarded: writes past its end and
    entries never written are named."""
    rng = T.default_rng(seed)
    count = 0

    def case(args, **kw):
        nonlocal count
        _check_flash(fn, *args, **kw)
        count += 1

    case(_inputs(rng, (1, 2), 20, 20, 16, F32), causal=False, dtype=F32, kv_transposed=True,
         note=", k and v are transposed views of (B, S, H, D) buffers: their strides differ from q's")  # fmt: skip
    case(
        _inputs(rng, (1, 1), 37, 45, 16, F32, scale=2.0),
        causal=False,
        dtype=F32,
        note=", L = 37, S = 45: not multiples of a tile",
    )
    case(_inputs(rng, (1, 2), 40, 23, 32, F32), causal=True, dtype=F32,
         note=", causal with L > S: the first 17 queries see no key (zero output)")  # fmt: skip
    case(_inputs(rng, (2, 1), 21, 46, 16, F32, scale=3.0), causal=True, dtype=F32, note=", causal with L < S, scores near 150")
    k_rising = R.rounded(rng.normal(size=(1, 1, 48, 16)) + T.np_arange(48)[None, None, :, None] * 0.3, F32)
    q_all = R.rounded(rng.normal(size=(1, 1, 20, 16)), F32)
    case((q_all, k_rising, R.rounded(rng.normal(size=(1, 1, 48, 16)), F32)), causal=False, dtype=F32,
         note=", key scores rising tile by tile")  # fmt: skip
    case(_inputs(rng, (1, 2), 33, 33, 32, F16), causal=True, dtype=F16, note=", float16")
    q, k, v = _inputs(rng, (1, 2), 20, 24, 16, F32)
    k[..., 0] = R.rounded(60.0 + 0.1 * k[..., 0], F32)
    q[..., :10, 0] = R.rounded(q[..., :10, 0] - 60.0, F32)  # rows 0-9 score about -900 on every key
    case((q, k, v), causal=True, dtype=F32, note=", queries 0-9 score about -900 on every key")
    case(_inputs(rng, (1, 1), 24, 17, 64, F32), causal=False, dtype=F32, note=", D = 64")
    case(_inputs(rng, (1, 2), 19, 27, 24, F32, scale=2.0), causal=False, dtype=F32,
         note=", D = 24: not a power of two (the tile is padded to 32 columns)")  # fmt: skip
    case(_inputs(rng, (2, 1), 18, 18, 40, F32, scale=2.0), causal=True, dtype=F32,
         note=", D = 40: not a power of two (the tile is padded to 64 columns)")  # fmt: skip
    # Several query tiles whatever the kernel's tiles (up to 128 rows): every program must compute its own tile, and
    # a causal loop over key tiles must end at the bottom-right bound. S is no multiple of 16, 32, 64 or 128.
    case(_inputs(rng, (1, 1), 264, 301, 16, F32), causal=True, dtype=F32, return_lse=True,
         note=", L = 264 < S = 301, causal: three tiles of 128 queries (or more, smaller), S no multiple of a tile")  # fmt: skip
    case(_inputs(rng, (1, 2), 33, 50, 32, F16, scale=2.0), causal=True, dtype=F16, return_lse=True,
         note=", float16: the logsumexp stays float32")  # fmt: skip
    case(_inputs(rng, (2, 3), 21, 30, 16, F32), causal=True, dtype=F32, return_lse=True,
         note=", 4-D with batch 2 and 3 heads: the logsumexp of every (batch, head)")  # fmt: skip
    case(_inputs(rng, (3,), 45, 77, 16, F32, scale=2.0), causal=True, dtype=F32, return_lse=True,
         note=", 3-D, causal with L = 45 < S = 77")  # fmt: skip
    case(_inputs(rng, (1,), 290, 70, 16, F32), causal=True, dtype=F32, return_lse=True,
         note=", 3-D, causal with L = 290 > S = 70: 220 queries see no key, over several query tiles")  # fmt: skip
    case(_inputs(rng, (2,), 300, 45, 16, F32, scale=2.0), causal=False, dtype=F32, return_lse=True,
         note=", 3-D, L = 300, S = 45: many query tiles, S no multiple of a tile")  # fmt: skip
    passed("flash_attention", count, hidden=True)


POINTS = {
    "tiled_attention": (2, 2),
    "flash_attention": (2, 2),
}
