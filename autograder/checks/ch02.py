"""Checks for chapter 2, scaled dot-product attention and masks (PyTorch).

Oracles are float64 NumPy maths on the exact values handed to the student (low-precision
inputs are rounded first, then widened), and PyTorch's own ``F.scaled_dot_product_attention``
run at the same dtype, which sets the error budget: an output may be at most twice as far
from the float64 oracle as PyTorch's, plus a small floor (one unit in the last place of the
output, and the conditioning of the softmax in the working precision).

Every primitive used here is captured when this module is imported, which the chapter's setup
cell does before any student code runs.
"""

from __future__ import annotations

import ast
import warnings

import numpy as np
import torch

from autograder.checks import torch_refs as R
from autograder.checks import trusted as T
from autograder.checks.common import CheckFailure, call, diagnose, max_error, passed, show, source_tree
from autograder.checks.objects import watched_call
from autograder.checks.torch_refs import BF16, BOOL, F16, F32, F64

# ---------------------------------------------------------------------------------------------
# References captured at import time (a student cell may rebind torch or numpy attributes).
# Those most chapters share are in torch_refs (R.dtype_of, R.MHA, ...) and trusted (T.np_where, ...).
_device_of = R.TB.__dict__["device"].__get__
_to = R.TB.to
_detach = R.TB.detach
_numpy = R.TB.numpy
_expand = R.TB.expand
_contiguous = R.TB.contiguous
_broadcast_shapes = torch.broadcast_shapes
_torch_device = torch.device
_finfo = torch.finfo
_catch_warnings = warnings.catch_warnings
_simplefilter = warnings.simplefilter

LOW = (F16, BF16)
CPU = torch.device("cpu")

_np_matmul = np.matmul
_np_sum = np.sum
_np_broadcast_to = np.broadcast_to
_np_sqrt = np.sqrt
_np_nan_to_num = np.nan_to_num
_isinstance = T._isinstance
_int = int
_list = list
_str = str


# ---------------------------------------------------------------------------------------------
# Small helpers


def _as64(t: torch.Tensor) -> np.ndarray:
    return T.tensor_to_float64(t)


def _as_bool(t: torch.Tensor) -> np.ndarray:
    return np.array(_numpy(_to(_detach(t), device="cpu")), dtype=bool, copy=True)


def _dtype_name(dtype) -> str:
    return _str(dtype)


def _shape(t) -> tuple:
    return T._tuple(R.shape_of(t))


def _expect_tensor(result, *, label: str, what: str) -> torch.Tensor:
    if not T.is_tensor(result):
        raise CheckFailure(f"{label}: the {what} should be a torch.Tensor, got {T.type_name(result)}.")
    return result


def _softmax64(s: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax in float64 where a slice that is entirely -inf gets zero weights."""
    m = T.np_max(s, axis=axis, keepdims=True)
    m = T.np_where(T.np_isfinite(m), m, 0.0)
    e = T.np_exp(s - m)
    total = _np_sum(e, axis=axis, keepdims=True)
    return e / T.np_where(total == 0.0, 1.0, total)


def _unpack_pair(result, *, label: str) -> tuple:
    if T._type(result) is not T._tuple or T._len(result) != 2:
        extra = f" of length {T._len(result)}" if T._type(result) in (tuple, list) else ""
        raise CheckFailure(f"{label}: should return a tuple (out, weights), got {T.type_name(result)}{extra}.")
    return result


def _close(actual: np.ndarray, expected: np.ndarray, atol: float) -> bool:
    return max_error(actual, expected) <= atol


def _fail(label: str, what: str, actual, expected, atol: float, mistake: str | None, extra: str = "") -> None:
    lines = [
        f"{label}: wrong {what} (largest error {max_error(actual, expected):.3g}, tolerance {atol:.2g}).",
        f"  expected: {show(expected)}",
        f"  got:      {show(actual)}",
    ]
    if not T.np_isfinite(actual).all() and T.np_isfinite(expected).all():
        lines.append("  Your result contains NaN or inf where the correct one is finite.")
    if extra:
        lines.append("  " + extra)
    if mistake:
        lines.append(f"  Likely mistake: {mistake}")
    raise CheckFailure("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention


def _scores64(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    return _np_matmul(q, T.np_swapaxes(k, -1, -2)) * scale


def _attend64(q, k, v, mask, *, scale=None, axis=-1, mask_rule="before"):
    """Float64 attention, and the variants that common mistakes compute."""
    d = q.shape[-1]
    s = _scores64(q, k, (1.0 / _np_sqrt(d)) if scale is None else scale)
    if mask is not None and mask_rule == "before":
        s = T.np_where(mask, s, -np.inf)
    elif mask is not None and mask_rule == "multiply":
        s = s * mask
    w = _softmax64(s, axis)
    if mask is not None and mask_rule == "after":
        w = w * mask
    return _np_matmul(w, v), w


def _sdpa_fingerprints(q, k, v, mask) -> dict:
    """{mistake: () -> (out, weights)} for the same float64 inputs."""
    d, dv = q.shape[-1], v.shape[-1]
    prints = {
        "scaled the scores by 1/d instead of 1/sqrt(d)": lambda: _attend64(q, k, v, mask, scale=1.0 / d),
        "did not scale the scores: divide q·k by sqrt(d), the key dimension": lambda: _attend64(q, k, v, mask, scale=1.0),
        "multiplied the scores by sqrt(d) instead of dividing by it": lambda: _attend64(q, k, v, mask, scale=_np_sqrt(d)),
    }
    if dv != d:
        prints["scaled by 1/sqrt(d_v), the value dimension; the scale uses d, the last dimension of q and k"] = lambda: _attend64(
            q, k, v, mask, scale=1.0 / _np_sqrt(dv)
        )
    prints["took the softmax over the queries (dim=-2) instead of over the keys (dim=-1)"] = lambda: _attend64(
        q, k, v, mask, axis=-2
    )
    if mask is not None:
        prints.update(
            {
                "inverted the mask: True means 'may attend' (PyTorch's SDPA convention), so fill where the mask is False": (
                    lambda: _attend64(q, k, v, ~mask)
                ),
                "applied the mask after the softmax: zeroing weights leaves rows that no longer sum to 1; "
                "mask the scores (with -inf) before the softmax": lambda: _attend64(q, k, v, mask, mask_rule="after"),
                "ignored the mask": lambda: _attend64(q, k, v, None),
                "multiplied the scores by the mask: a masked score of 0 still gets weight exp(0); "
                "set masked scores to -inf instead": lambda: _attend64(q, k, v, mask, mask_rule="multiply"),
            }
        )
    return prints


def _fully_masked_rows(mask_full: np.ndarray | None, shape: tuple) -> np.ndarray:
    """Boolean (..., L) of the queries that may attend to no key."""
    if mask_full is None:
        return T.np_zeros(shape[:-1], dtype=bool)
    return ~T.np_any(_np_broadcast_to(mask_full, shape), axis=-1)


def _eps(dtype) -> float:
    return float(_finfo(dtype).eps)


def _sdpa_baseline_error(qt, kt, vt, mask, expected_out, live_rows) -> float:
    """Largest error of PyTorch's own SDPA at the inputs' dtype, on queries with a visible key."""
    batch = _broadcast_shapes(_shape(qt)[:-2], _shape(kt)[:-2], _shape(vt)[:-2])
    if mask is not None:
        batch = _broadcast_shapes(batch, mask.shape[:-2])
    L, S = _shape(qt)[-2], _shape(kt)[-2]
    args = [_contiguous(_expand(t, (*batch, *_shape(t)[-2:]))) for t in (qt, kt, vt)]
    attn_mask = None
    if mask is not None:
        attn_mask = R.from_numpy(np.array(_np_broadcast_to(mask, (*batch, L, S)), dtype=bool, copy=True))
    with _catch_warnings():
        _simplefilter("ignore")
        ref = _as64(R.sdpa(*args, attn_mask=attn_mask))
    ref = ref[live_rows]
    exp = expected_out[live_rows]
    if ref.size == 0:
        return 0.0
    return max_error(ref, exp)


def _ref_weights_error(q64, k64, mask, dtype, expected_w, live_rows) -> float:
    """Error of weights computed the standard way (working precision, cast back) vs float64."""
    work = F32 if dtype in LOW else dtype
    d = q64.shape[-1]
    s = _np_matmul(
        q64.astype(np.float32 if work == F32 else np.float64),
        T.np_swapaxes(k64, -1, -2).astype(np.float32 if work == F32 else np.float64),
    ) * (1.0 / _np_sqrt(d))
    if mask is not None:
        s = T.np_where(mask, s, -np.inf)
    w = _softmax64(s.astype(np.float64)).astype(np.float32 if work == F32 else np.float64)
    w = _as64(R.tensor_of(w, dtype))
    return max_error(w[live_rows], expected_w[live_rows]) if expected_w[live_rows].size else 0.0


USES_TORCH_SDPA = (
    "the exercise is to write attention yourself, and your function calls PyTorch's "
    "F.scaled_dot_product_attention ({where}). Compute the scores, the mask, the softmax and the weighted sum "
    "with matrix products and torch.softmax."
)
_TORCH_ATTENTION = {"scaled_dot_product_attention", "multi_head_attention_forward", "_scaled_dot_product_attention_math"}


def _expect_no_torch_attention(sdpa, calls, label: str) -> None:
    """PyTorch's own attention is the oracle, not a building block: judged from the exercise cell's source and
    from the torch calls the function made (what the kernel reports)."""
    tree = source_tree(sdpa)
    in_source = [
        f"line {node.lineno}"
        for node in (ast.walk(tree) if tree is not None else ())
        if (isinstance(node, ast.Attribute) and node.attr in _TORCH_ATTENTION)
        or (isinstance(node, ast.alias) and node.name in _TORCH_ATTENTION)
    ]
    called = [c for c in calls if T._type(c) is T._dict and c.get("name") in _TORCH_ATTENTION]
    if in_source or called:
        where = ", ".join(in_source) if in_source else "called while it ran"
        raise CheckFailure(f"{label}: {USES_TORCH_SDPA.format(where=where)}")


def _check_sdpa_case(sdpa, q, k, v, mask=None, dtype=F64, note: str = "") -> None:
    """Run the student's function on (q, k, v, mask) at ``dtype`` and compare with float64."""
    shapes = f"q {T._tuple(q.shape)}, k {T._tuple(k.shape)}, v {T._tuple(v.shape)}"
    mask_text = "" if mask is None else f", mask {T._tuple(mask.shape)}"
    label = f"scaled_dot_product_attention(q, k, v{', mask' if mask is not None else ''}) with {shapes}{mask_text}, {_dtype_name(dtype)}{note}"
    qt, kt, vt = R.tensor_of(q, dtype), R.tensor_of(k, dtype), R.tensor_of(v, dtype)
    q64, k64, v64 = _as64(qt), _as64(kt), _as64(vt)  # the exact values the student receives
    mt = None if mask is None else R.from_numpy(np.array(mask, dtype=bool, copy=True))
    args = [qt, kt, vt] + ([] if mask is None else [mt])
    given = [_as64(a) if R.dtype_of(a) != BOOL else _as_bool(a) for a in args]

    result, calls = call(_watched, sdpa, *args, label=label)
    _expect_no_torch_attention(sdpa, calls, label)
    out, w = _unpack_pair(result, label=label)
    out = _expect_tensor(out, label=label, what="output (first element)")
    w = _expect_tensor(w, label=label, what="weights (second element)")

    for name, a, before in zip(("q", "k", "v", "mask"), args, given, strict=False):
        now = _as64(a) if R.dtype_of(a) != BOOL else _as_bool(a)
        if not T.np_array_equal(now, before, equal_nan=R.dtype_of(a) != BOOL):
            raise CheckFailure(f"{label}: your function changed its input `{name}` in place; work on new tensors.")

    exp_out, exp_w = _attend64(q64, k64, v64, mask)
    for what, t in (("output", out), ("weights", w)):
        if R.dtype_of(t) != dtype:
            raise CheckFailure(
                f"{label}: the {what} should have dtype {_dtype_name(dtype)} (the dtype of q), got {_dtype_name(R.dtype_of(t))}.\n"
                "  Likely mistake: the dtype was not restored; compute in float32 if you like, then cast the results back "
                "with .to(q.dtype)."
            )
    got_out, got_w = _as64(out), _as64(w)
    L, S = exp_w.shape[-2], exp_w.shape[-1]
    if got_out.shape == exp_w.shape and got_w.shape == exp_out.shape and exp_w.shape != exp_out.shape:
        raise CheckFailure(f"{label}: the tuple is in the wrong order; return (out, weights).")
    if got_w.shape != exp_w.shape:
        hint = ""
        if L != S and got_w.shape == (*exp_w.shape[:-2], S, L):
            hint = " (the transpose: one row per query, one column per key)"
        raise CheckFailure(f"{label}: the weights should have shape {exp_w.shape} = (..., L, S), got {got_w.shape}{hint}.")
    if got_out.shape != exp_out.shape:
        raise CheckFailure(f"{label}: the output should have shape {exp_out.shape} = (..., L, d_v), got {got_out.shape}.")

    dead = _fully_masked_rows(mask, exp_w.shape)  # (..., L): queries with no visible key
    live = ~dead
    work = F32 if dtype in LOW else dtype
    s_max = float(T.np_max(T.np_abs(_scores64(q64, k64, 1.0 / _np_sqrt(q64.shape[-1])))))
    v_max = float(T.np_max(T.np_abs(v64))) if v64.size else 0.0
    conditioning = 4 * _eps(work) * (1.0 + s_max)
    base_out = _sdpa_baseline_error(qt, kt, vt, mask, exp_out, live)
    base_w = _ref_weights_error(q64, k64, mask, dtype, exp_w, live)
    tol_out = 2 * base_out + _eps(dtype) * float(T.np_max(T.np_abs(exp_out), initial=0.0)) + conditioning * v_max
    tol_w = 2 * base_w + _eps(dtype) + conditioning

    # 1. Queries that see at least one key: weights, then output.
    prints = _sdpa_fingerprints(q64, k64, v64, mask)
    for what, got, exp, tol, idx in (("weights", got_w, exp_w, tol_w, 1), ("output", got_out, exp_out, tol_out, 0)):
        g, e = got[live], exp[live]
        if _close(g, e, tol):
            continue
        scale = max(1.0, float(T.np_max(T.np_abs(e), initial=0.0)))
        diag_atol = max(tol, 2e-5 * scale)
        cands = {}
        for m, f in prints.items():  # only mistakes that this input tells apart from the right answer
            try:
                cand = f()[idx][live]
            except Exception:  # noqa: BLE001  (a fingerprint that does not apply to this input)
                continue
            if cand.shape == e.shape and max_error(cand, e) > diag_atol:
                cands[m] = lambda cand=cand: cand
        mistake = diagnose(_np_nan_to_num(g, nan=0.0), cands, atol=diag_atol)
        extra = ""
        lower = {F64: F32, F32: F16}.get(dtype, dtype)  # the precision a too-cheap computation would have
        loose = tol + 4 * _eps(lower) * (1.0 + s_max) * (v_max if idx == 0 else 1.0) + 2 * _eps(lower) * scale
        if mistake is None and T.np_isfinite(g).all() and max_error(g, e) <= loose:
            if idx == 0:
                extra = f"PyTorch's F.scaled_dot_product_attention at {_dtype_name(dtype)} is off by {base_out:.2g} here"
            else:
                extra = (
                    f"Weights computed in {_dtype_name(work)} and rounded to {_dtype_name(dtype)} are off by {base_w:.2g} here"
                )
            extra += f"; yours are off by {max_error(g, e):.2g}."
            if dtype in LOW:
                mistake = (
                    f"the arithmetic was done in {_dtype_name(dtype)}, whose few mantissa bits round the scores and weights. "
                    "Compute in float32 (q.float(), ...), then cast the results back with .to(q.dtype)."
                )
            else:
                mistake = (
                    f"the arithmetic was done in a lower precision than {_dtype_name(dtype)} (e.g. .float() on every input). "
                    "Widen only float16/bfloat16 to float32; keep float32 and float64 as they are."
                )
        _fail(label, what + (" (queries that see at least one key)" if dead.any() else ""), g, e, tol, mistake, extra)

    # 2. Queries whose keys are all masked: zero weights and a zero output, not NaN.
    if dead.any():
        g_w, g_out = got_w[dead], got_out[dead]
        if T.np_isnan(g_w).any() or T.np_isnan(g_out).any():
            raise CheckFailure(
                f"{label}: {int(dead.sum())} quer{'y' if dead.sum() == 1 else 'ies'} whose keys are all masked got NaN "
                "instead of zero weights and a zero output.\n"
                "  Likely mistake: softmax over a row that is all -inf is 0/0 = NaN. After the softmax, set the weights of "
                "such rows to 0 (e.g. torch.where(mask.any(-1, keepdim=True), weights, 0.0))."
            )
        if not _close(g_w, T.np_zeros(g_w.shape), tol_w):
            mistake = None
            if _close(g_w, T.np_ones(g_w.shape) / S, max(tol_w, 1e-3)):
                mistake = (
                    "a query with every key masked got uniform weights 1/S, so it averages keys it must not see: "
                    "a finite fill such as -1e9 (or finfo.min) does that. Fill with -inf and give such rows zero weights."
                )
            _fail(label, "weights for the queries whose keys are all masked (they should be 0)", g_w, 0.0 * g_w, tol_w, mistake)
        if not _close(g_out, T.np_zeros(g_out.shape), tol_out):
            _fail(label, "output for the queries whose keys are all masked (it should be 0)", g_out, 0.0 * g_out, tol_out, None)


def _sdpa_call_hint(fn):
    """The student's function (the hint for an fp16 overflow is added where it is called, :func:`_watched`)."""
    return fn


def _watched(fn, *args):
    """``watched_call(fn, *args)``; an fp16 overflow error names the -1e9 trap."""
    try:
        return watched_call(fn, *args)
    except RuntimeError as exc:
        if "overflow" in _str(exc):
            raise RuntimeError(
                f"{exc}\n  Likely mistake: a large finite fill value such as -1e9 overflows float16 (its largest "
                "finite value is 65504). Fill masked scores with float('-inf') instead."
            ) from None
        raise


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _causal64(L: int, S: int) -> np.ndarray:
    return T.np_arange(S)[None, :] <= T.np_arange(L)[:, None] + (S - L)


def _padding64(lengths, S: int) -> np.ndarray:
    return T.np_arange(S)[None, :] < np.asarray(lengths)[:, None]


def _shared_offset(rng, batch: tuple, L: int, S: int, d: int, dv: int, offset: float, noise: float = 1.5):
    """q, k, v whose scores all sit near ``offset`` (keys share one large component) with a spread of a few units.

    The softmax only sees differences of scores, but rounding a score to float16 costs an error
    proportional to its size: this is where computing in float16 shows.
    """
    q, k = noise * rng.normal(size=(*batch, L, d)), noise * rng.normal(size=(*batch, S, d))
    c = float(_np_sqrt(offset * _np_sqrt(d)))
    q[..., 0] = c + rng.normal(size=(*batch, L))
    k[..., 0] = c
    return q, k, rng.normal(size=(*batch, S, dv))


def visible_scaled_dot_product_attention(sdpa) -> None:
    """No mask; leading dims that broadcast with a causal mask and L != S; padding with a fully
    masked query; float16 with scores near 50."""
    fn = _sdpa_call_hint(sdpa)
    rng = _rng(0)
    _check_sdpa_case(fn, rng.normal(size=(3, 4)), rng.normal(size=(5, 4)), rng.normal(size=(5, 2)), note=" (no mask)")
    _check_sdpa_case(
        fn,
        rng.normal(size=(2, 1, 3, 8)),
        rng.normal(size=(1, 2, 5, 8)),
        rng.normal(size=(1, 2, 5, 6)),
        _causal64(3, 5),
        F32,
        " (leading dims broadcast, causal mask with L=3, S=5)",
    )
    mask = _np_broadcast_to(_padding64([4, 6], 6)[:, None, None, :], (2, 1, 4, 6)).copy()
    mask[1, 0, 2, :] = False  # this query may see nothing at all
    _check_sdpa_case(
        fn,
        rng.normal(size=(2, 2, 4, 4)),
        rng.normal(size=(2, 2, 6, 4)),
        rng.normal(size=(2, 2, 6, 4)),
        mask,
        F32,
        " (padding mask, one query with every key masked)",
    )
    q, k, v = _shared_offset(rng, (2,), 6, 7, 32, 8, offset=50.0)
    _check_sdpa_case(fn, q, k, v, _causal64(6, 7), F16, " (causal mask, scores all near 50)")
    passed("scaled_dot_product_attention", 4)


def hidden_scaled_dot_product_attention(sdpa, seed: int = 20) -> None:
    """Huge logits, fully masked rows, fp16/bf16, 1-D masks, L != S both ways, odd sizes."""
    fn = _sdpa_call_hint(sdpa)
    rng = _rng(seed)
    # Logits of size 1e4 in float64 and float32.
    q, k = 40 * rng.normal(size=(2, 5, 8)), 40 * rng.normal(size=(2, 6, 8))
    mask = rng.random((5, 6)) > 0.3
    mask[:, 0] = True
    _check_sdpa_case(fn, q, k, rng.normal(size=(2, 6, 3)), mask, F64, " (scores of size 1e4)")
    _check_sdpa_case(fn, q, k, rng.normal(size=(2, 6, 3)), None, F32, " (scores of size 1e4)")
    # float16 and bfloat16, batched, scores near 100, with fully masked queries.
    mask = rng.random((2, 1, 9, 11)) > 0.4
    mask[0, 0, 3, :] = False
    mask[1, 0, :, :] = False
    mask[1, 0, 5, 2] = True
    for dtype in (F16, BF16):
        q, k, v = _shared_offset(rng, (2, 3), 9, 11, 64, 16, offset=100.0)
        _check_sdpa_case(fn, q, k, v, mask, dtype, " (scores near 100, fully masked queries)")
    _check_sdpa_case(
        fn,
        2 * rng.normal(size=(4, 33, 48)),
        2 * rng.normal(size=(4, 65, 48)),
        rng.normal(size=(4, 65, 24)),
        _causal64(33, 65),
        BF16,
        " (bottom-right causal mask)",
    )
    q, k, v = _shared_offset(rng, (2,), 7, 3, 12, 5, offset=100.0)
    _check_sdpa_case(fn, q, k, v, None, F16, " (L=7 > S=3, d_v != d, scores near 100)")
    # Cache-aligned causal mask with L > S: the first queries see no key.
    _check_sdpa_case(
        fn,
        rng.normal(size=(1, 2, 6, 5)),
        rng.normal(size=(1, 2, 4, 5)),
        rng.normal(size=(1, 2, 4, 7)),
        _causal64(6, 4),
        F64,
        " (causal mask with L=6 > S=4)",
    )
    # A 1-D key mask with one query (a decoding step); one key.
    _check_sdpa_case(
        fn,
        rng.normal(size=(3, 1, 16)),
        rng.normal(size=(3, 10, 16)),
        rng.normal(size=(3, 10, 4)),
        rng.random(10) > 0.5,
        F32,
        " (a 1-D key mask)",
    )
    _check_sdpa_case(
        fn, rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 1, 3)), rng.normal(size=(2, 1, 5)), None, F64, " (one key)"
    )
    # Everything masked, and unusual broadcasting (k of lower rank than q).
    _check_sdpa_case(
        fn,
        rng.normal(size=(2, 3, 4)),
        rng.normal(size=(2, 5, 4)),
        rng.normal(size=(2, 5, 4)),
        T.np_zeros((3, 5), dtype=bool),
        F32,
        " (every key masked)",
    )
    _check_sdpa_case(
        fn,
        rng.normal(size=(3, 1, 5, 7)),
        rng.normal(size=(3, 11, 7)),
        rng.normal(size=(3, 11, 3)),
        rng.random((5, 11)) > 0.2,
        F64,
        " (odd sizes, k of lower rank)",
    )
    passed("scaled_dot_product_attention", 11, hidden=True)


# ---------------------------------------------------------------------------------------------
# causal_mask


def _expect_mask(result, expected: np.ndarray, *, label: str, fingerprints: dict, what: str = "mask") -> None:
    got = _expect_tensor(result, label=label, what=what)
    if R.dtype_of(got) != BOOL:
        raise CheckFailure(
            f"{label}: the {what} should be a bool tensor (True = may attend), got dtype {_dtype_name(R.dtype_of(got))}."
        )
    shape = _shape(got)
    if shape != T._tuple(expected.shape):
        hint = ""
        if len(shape) == 2 and shape == T._tuple(expected.shape[::-1]):
            hint = " (the transpose)"
        raise CheckFailure(f"{label}: the {what} should have shape {T._tuple(expected.shape)}, got {shape}{hint}.")
    actual = _as_bool(got)
    if T.np_array_equal(actual, expected):
        return
    mistake = None
    for name, make in fingerprints.items():
        try:
            cand = np.asarray(make(), dtype=bool)
        except Exception:  # noqa: BLE001  (a fingerprint that does not apply)
            continue
        if cand.shape == actual.shape and T.np_array_equal(actual, cand):
            mistake = name
            break
    wrong = int((actual != expected).sum())
    lines = [
        f"{label}: {wrong} of {expected.size} entries {'is' if wrong == 1 else 'are'} wrong.",
        f"  expected: {show(expected.astype(int))}",
        f"  got:      {show(actual.astype(int))}",
    ]
    if mistake:
        lines.append(f"  Likely mistake: {mistake}")
    raise CheckFailure("\n".join(lines))


def _causal_fingerprints(L: int, S: int) -> dict:
    i, j = T.np_arange(L)[:, None], T.np_arange(S)[None, :]
    return {
        "top-left aligned (j <= i), which is what is_causal=True does in PyTorch; here the last query lines up with "
        "the last key: query i sees key j iff j <= i + (S - L)": lambda: j <= i,
        "off by one: a query must also see the key at its own position (j <= i + (S - L), not <)": lambda: j < i + (S - L),
        "inverted: True must mark the keys a query MAY attend to": lambda: ~(j <= i + (S - L)),
        "the upper triangle (j >= i + (S - L)): a query sees past keys, not future ones": lambda: j >= i + (S - L),
        "the offset has the wrong sign: use j <= i + (S - L)": lambda: j <= i + (L - S),
    }


def _check_causal_case(causal_mask, L: int, S: int | None = None, device=None) -> None:
    kwargs = {}
    if S is not None:
        kwargs["S"] = S
    if device is not None:
        kwargs["device"] = device
    args_text = ", ".join([_str(L)] + [f"{key}={val!r}" for key, val in kwargs.items()])
    label = f"causal_mask({args_text})"
    result = call(causal_mask, L, label=label, **kwargs)
    S_ = L if S is None else S
    expected = _causal64(L, S_)
    got = _expect_tensor(result, label=label, what="mask")
    if R.dtype_of(got) == BOOL and _shape(got) == (L, L) and S_ != L:
        raise CheckFailure(f"{label}: the mask should have shape (L, S) = {(L, S_)}, got {(L, L)}: S was ignored.")
    _expect_mask(got, expected, label=label, fingerprints=_causal_fingerprints(L, S_))
    if device is not None and _device_of(got) != _torch_device(device):
        raise CheckFailure(f"{label}: the mask should be on device {device!r}, got {_device_of(got)}.")


def visible_causal_mask(causal_mask) -> None:
    """Square, and L < S (queries are the last L of S positions)."""
    _check_causal_case(causal_mask, 4)
    _check_causal_case(causal_mask, 3, 5)
    passed("causal_mask", 2)


def hidden_causal_mask(causal_mask, seed: int = 21) -> None:
    """L > S, one query, one position, S given equal to L, a device argument, larger sizes."""
    rng = _rng(seed)
    _check_causal_case(causal_mask, 5, 3)
    _check_causal_case(causal_mask, 1, 7)
    _check_causal_case(causal_mask, 1)
    _check_causal_case(causal_mask, 6, 6)
    _check_causal_case(causal_mask, 2, 9, device="cpu")
    _check_causal_case(causal_mask, 4, device=CPU)
    L = int(rng.integers(8, 20))
    _check_causal_case(causal_mask, L, L + int(rng.integers(1, 9)))
    _check_causal_case(causal_mask, L + 3, L)
    passed("causal_mask", 8, hidden=True)


# ---------------------------------------------------------------------------------------------
# padding_mask


def _padding_fingerprints(lengths: np.ndarray, S: int) -> dict:
    j, n = T.np_arange(S)[None, :], lengths[:, None]
    return {
        "inverted: True must mark the real tokens (j < length), False the padding": lambda: ~(j < n),
        "off by one: position j is real iff j < length (positions count from 0), not j <= length": lambda: j <= n,
        "padded on the left: the real tokens come first, at positions 0 .. length-1": lambda: j >= S - n,
    }


def _check_padding_case(padding_mask, lengths, S: int, note: str = "") -> None:
    shown = (
        lengths
        if _isinstance(lengths, _list)
        else f"torch.tensor({_as64(lengths).astype(int).tolist()}, dtype={R.dtype_of(lengths)})"
    )
    label = f"padding_mask({shown}, S={S}){note}"
    values = np.asarray(lengths if _isinstance(lengths, _list) else _as64(lengths), dtype=np.int64)
    given = _list(lengths) if _isinstance(lengths, _list) else _as64(lengths)
    result = call(padding_mask, lengths, S, label=label)
    now = _list(lengths) if _isinstance(lengths, _list) else _as64(lengths)
    if not (now == given if _isinstance(lengths, _list) else T.np_array_equal(now, given)):
        raise CheckFailure(f"{label}: your function changed `lengths` in place.")
    _expect_mask(result, _padding64(values, S), label=label, fingerprints=_padding_fingerprints(values, S))


def visible_padding_mask(padding_mask) -> None:
    """A batch of three sequences padded to five positions."""
    _check_padding_case(padding_mask, R.from_numpy(np.array([3, 1, 5])), 5)
    passed("padding_mask", 1)


def hidden_padding_mask(padding_mask, seed: int = 22) -> None:
    """A list, a length of 0, a length of S, int32, one sequence, longer S."""
    rng = _rng(seed)
    _check_padding_case(padding_mask, [2, 0, 4], 4, " (a list)")
    _check_padding_case(padding_mask, _to(R.from_numpy(np.array([6, 1, 3, 6])), dtype=torch.int32), 6, " (int32)")
    _check_padding_case(padding_mask, [7], 7, " (one full sequence)")
    lengths = rng.integers(0, 12, size=5)
    _check_padding_case(padding_mask, R.from_numpy(lengths.astype(np.int64)), 12)
    passed("padding_mask", 4, hidden=True)


# {exercise: (visible points, hidden points)}, in the order the exercises appear.
POINTS = {
    "padding_mask": (1, 1),
    "causal_mask": (1, 1),
    "scaled_dot_product_attention": (3, 3),
}
