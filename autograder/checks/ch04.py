"""Checks for chapter 4, multi-head attention.

The oracle is the textbook maths written out in float64 NumPy here (projections, heads as
blocks of features, 1/sqrt(E/H) scaling, masks, softmax with fully masked rows set to zero,
output projection), fed with the parameters of a real ``nn.MultiheadAttention`` through its
state dict. ``tests/test_ch04.py`` proves the oracle equals ``nn.MultiheadAttention``
wherever PyTorch's result is finite. For float32 inputs the tolerance is measured: the
oracle is also run in float32 arithmetic, and a student may be a few times further from the
float64 result than that. Wrong answers are compared with the outputs of known mistakes
(variants of the oracle) to name them.

Everything a student cell could rebind (numpy and torch functions, ``nn.MultiheadAttention``,
``nn.Module`` methods) is captured when this module is imported, before student code runs.
"""

from __future__ import annotations

import numpy as np

from autograder.checks import torch_refs as R
from autograder.checks import trusted as T
from autograder.checks.common import (
    CheckFailure,
    call,
    expect_close,
    expect_shape,
    max_error,
    names_used_in_methods,
    passed,
    show,
)
from autograder.checks.torch_refs import BOOL, F32, F64
from autograder.grading.remote import is_remote

# References captured at import time (the setup cell imports this module before student code).
# Those most chapters share are in torch_refs (R.dtype_of, R.MHA, ...) and trusted (T.np_where, ...).
_int = int
_float = float
_bool_t = bool
_str = str
_sorted = sorted
_set = set
_dict = dict
_sum = sum
_isinstance = isinstance
_issubclass = issubclass
_pinv = np.linalg.pinv

FORBIDDEN = {"MultiheadAttention", "multi_head_attention_forward", "_native_multi_head_attention"}


# ---------------------------------------------------------------------------------------------
# split_heads
# ---------------------------------------------------------------------------------------------

SPLIT_VIEW = (
    "view without transpose: (B, L, E) was reshaped straight to (B, H, L, E/H), so a 'head' holds "
    "pieces of several tokens. Reshape to (B, L, H, E/H) first, then .transpose(1, 2)."
)
SPLIT_INTERLEAVED = (
    "interleaved heads: head h took every H-th feature (h, h+H, h+2H, ...). Head h must hold the contiguous "
    "block of features h*D .. (h+1)*D - 1, which is how in_proj_weight is laid out: reshape to (B, L, H, D), not (B, L, D, H)."
)


def _split_fingerprints(x: np.ndarray, h: int) -> dict:
    b, n, e = x.shape
    d = e // h
    return {
        SPLIT_VIEW: lambda: x.reshape(b, h, n, d),
        SPLIT_INTERLEAVED: lambda: x.reshape(b, n, d, h).transpose(0, 3, 1, 2),
        "the last two axes are swapped: each head should be (L, D), one row per token": lambda: x.reshape(b, n, h, d).transpose(
            0, 2, 3, 1
        ),
    }


def _split_shape_hint(shape: tuple, b: int, n: int, e: int, h: int) -> str:
    d = e // h
    if shape == (b, h, n // h, e) and n % h == 0:
        return (
            "  Likely mistake: you split the sequence (L) into heads. Heads split the feature dimension E: every head "
            "sees all L tokens, through its own E/H features."
        )
    if shape == (b, n, h, d):
        return "  Likely mistake: you reshaped to (B, L, H, D) but forgot .transpose(1, 2) to bring the heads forward."
    if shape == (b, h, d, n):
        return "  Likely mistake: the last two axes are swapped: each head should be (L, D), one row per token."
    return ""


def _check_split_case(split_heads, x: np.ndarray, h: int, dtype=F32, note: str = "") -> None:
    b, n, e = x.shape
    label = f"split_heads(x, num_heads={h}) with x of shape {(b, n, e)}{note}"
    given = R.tensor_of(x, dtype)
    before = R.clone(given)
    result = call(split_heads, given, num_heads=h, label=label)
    actual = R.tensor_result(result, label=label, what="result", dtype=dtype)
    xx = T.tensor_to_float64(before)  # the input as the student's function saw it (rounded to dtype)
    expected = xx.reshape(b, n, h, e // h).transpose(0, 2, 1, 3)
    if T._tuple(actual.shape) != T._tuple(expected.shape):
        hint = _split_shape_hint(T._tuple(actual.shape), b, n, e, h)
        raise CheckFailure(
            f"{label}: the result should have shape (B, H, L, E/H) = {T._tuple(expected.shape)}, got {T._tuple(actual.shape)}."
            + ("\n" + hint if hint else "")
        )
    expect_close(actual, expected, label=label, atol=0.0, fingerprints=_split_fingerprints(xx, h))
    if not R.t_equal(given, before):
        raise CheckFailure(f"{label}: your function changed its input in place.")


def _check_split_raises(split_heads, e: int, h: int) -> None:
    label = f"split_heads(x, num_heads={h}) with x of shape (2, 3, {e})"
    x = R.tensor_of(T.np_array(T.np_zeros((2, 3, e))), F32)
    try:
        split_heads(x, num_heads=h)
    except ValueError:
        return
    except NotImplementedError:
        raise CheckFailure(f"{label}: not implemented yet (the cell still raises NotImplementedError).") from None
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(
            f"{label}: should raise ValueError because {e} is not divisible by {h}; it raised {T.type_name(exc)}: {exc}. "
            "Check E % num_heads yourself and raise ValueError with a clear message."
        ) from None
    raise CheckFailure(
        f"{label}: should raise ValueError because E = {e} is not divisible by num_heads = {h}; it returned a result "
        "instead (features were dropped or invented)."
    )


def visible_split_heads(split_heads) -> None:
    """A small tensor with distinct entries, two head counts, float64, and the ValueError."""
    x = np.arange(2 * 4 * 8, dtype=np.float64).reshape(2, 4, 8)
    _check_split_case(split_heads, x, 2)
    _check_split_case(split_heads, x, 4)
    _check_split_case(split_heads, np.arange(4 * 6, dtype=np.float64).reshape(1, 4, 6) / 7, 3, F64, " (float64)")
    _check_split_raises(split_heads, 6, 4)
    passed("split_heads", 4)


def hidden_split_heads(split_heads, seed: int = 41) -> None:
    """One head, one feature per head, odd sizes, L not divisible by H, one token."""
    rng = T.default_rng(seed)
    _check_split_case(split_heads, rng.normal(size=(2, 5, 6)), 1, note=" (one head)")
    _check_split_case(split_heads, rng.normal(size=(2, 5, 6)), 6, note=" (one feature per head)")
    _check_split_case(split_heads, rng.normal(size=(3, 7, 15)), 5, F64, " (float64, odd sizes)")
    _check_split_case(split_heads, rng.normal(size=(2, 7, 12)), 4, note=" (L = 7 not divisible by H)")
    _check_split_case(split_heads, rng.normal(size=(1, 1, 12)), 3, note=" (one token)")
    _check_split_case(split_heads, rng.normal(size=(2, 4, 16)), 4, note=" (L = H = D = 4)")
    _check_split_raises(split_heads, 10, 4)
    _check_split_raises(split_heads, 7, 2)
    passed("split_heads", 8, hidden=True)


# ---------------------------------------------------------------------------------------------
# merge_heads
# ---------------------------------------------------------------------------------------------

MERGE_VIEW = (
    "merged the heads without transpose: (B, H, L, D) was reshaped straight to (B, L, H*D), which mixes tokens. "
    "Transpose to (B, L, H, D) first, then reshape."
)
MERGE_INTERLEAVED = (
    "interleaved heads: feature d of head h landed at position d*H + h. Concatenate the heads: head h fills "
    "features h*D .. (h+1)*D - 1 (transpose(1, 2), not a permute that puts D before H)."
)
CONTIGUOUS_HINT = (
    "  Likely mistake: .view() after .transpose() needs a contiguous tensor. Call .contiguous() before .view(), "
    "or use .reshape(), which copies when it must."
)


def _merge_fingerprints(x: np.ndarray) -> dict:
    b, h, n, d = x.shape
    return {
        MERGE_VIEW: lambda: x.reshape(b, n, h * d),
        MERGE_INTERLEAVED: lambda: x.transpose(0, 2, 3, 1).reshape(b, n, h * d),
    }


def _check_merge_case(merge_heads, x: np.ndarray, dtype=F32, note: str = "", non_contiguous: bool = False) -> None:
    b, h, n, d = x.shape
    label = f"merge_heads(x) with x of shape {(b, h, n, d)}{note}"
    if non_contiguous:  # the same values, stored as (B, L, H, D) and transposed
        given = R.tensor_of(T.np_array(x.transpose(0, 2, 1, 3), copy=True), dtype).transpose(1, 2)
    else:
        given = R.tensor_of(x, dtype)
    before = R.clone(given)
    try:
        result = call(merge_heads, given, label=label)
    except CheckFailure as exc:
        if "view size is not compatible" in _str(exc) or "contiguous" in _str(exc):
            raise CheckFailure(f"{exc}\n{CONTIGUOUS_HINT}") from None
        raise
    actual = R.tensor_result(result, label=label, what="result", dtype=dtype)
    xx = T.tensor_to_float64(before)  # the input as the student's function saw it (rounded to dtype)
    expected = xx.transpose(0, 2, 1, 3).reshape(b, n, h * d)
    shape = T._tuple(actual.shape)
    if shape in ((b, n, d), (b, d, n)) and h > 1:
        raise CheckFailure(
            f"{label}: the result should have shape (B, L, H*D) = {(b, n, h * d)}, got {shape}.\n"
            "  Likely mistake: you summed or averaged the heads. merge_heads concatenates them: each head keeps its D features."
        )
    expect_close(actual, expected, label=label, atol=0.0, fingerprints=_merge_fingerprints(xx))
    if not R.t_equal(given, before):
        raise CheckFailure(f"{label}: your function changed its input in place.")


def visible_merge_heads(merge_heads) -> None:
    """Distinct entries, two shapes, float64."""
    _check_merge_case(merge_heads, np.arange(2 * 2 * 3 * 4, dtype=np.float64).reshape(2, 2, 3, 4))
    _check_merge_case(merge_heads, np.arange(1 * 4 * 3 * 2, dtype=np.float64).reshape(1, 4, 3, 2))
    _check_merge_case(merge_heads, np.arange(2 * 3 * 2 * 2, dtype=np.float64).reshape(2, 3, 2, 2) / 3, F64, " (float64)")
    passed("merge_heads", 3)


def hidden_merge_heads(merge_heads, seed: int = 42) -> None:
    """One head, D = 1, odd sizes, one token, and a non-contiguous input (as attention produces)."""
    rng = T.default_rng(seed)
    _check_merge_case(merge_heads, rng.normal(size=(2, 1, 5, 6)), note=" (one head)")
    _check_merge_case(merge_heads, rng.normal(size=(2, 6, 5, 1)), note=" (D = 1)")
    _check_merge_case(merge_heads, rng.normal(size=(3, 5, 7, 3)), F64, " (float64, odd sizes)")
    _check_merge_case(merge_heads, rng.normal(size=(2, 3, 1, 4)), note=" (one token)")
    _check_merge_case(merge_heads, rng.normal(size=(2, 4, 4, 4)), note=" (H = L = D = 4)")
    _check_merge_case(merge_heads, rng.normal(size=(2, 3, 5, 4)), note=" (a non-contiguous input)", non_contiguous=True)
    passed("merge_heads", 6, hidden=True)


# ---------------------------------------------------------------------------------------------
# MultiHeadAttention: the float64 oracle and the mistakes it can imitate
# ---------------------------------------------------------------------------------------------

MISTAKES = {
    "scale_E": "scaled the scores by 1/sqrt(E) (the full embed_dim). Each head's scores are dot products of D = E/H features: scale by 1/sqrt(E/H).",
    "scale_H": "scaled the scores by 1/sqrt(num_heads). The scale is 1/sqrt(head_dim) = 1/sqrt(E/H).",
    "no_scale": "did not scale the scores: divide them by sqrt(E/H), the head dimension.",
    "scale_D": "scaled the scores by 1/D instead of 1/sqrt(D), D = E/H.",
    "split_view": "split heads with a view without transpose: (B, L, E) reshaped straight to (B, H, L, D) mixes tokens inside each head.",
    "split_interleaved": "interleaved heads: head h took every H-th feature instead of the block h*D .. (h+1)*D - 1.",
    "merge_view": "merged the heads without transpose: (B, H, L, D) reshaped straight to (B, L, E) mixes tokens.",
    "no_out_proj": "no output projection: apply self.out_proj to the merged heads.",
    "inverted": "inverted the boolean mask. In nn.MultiheadAttention True means NOT allowed (masked out), the opposite of chapter 2's convention.",
    "kpm_ignored": "key_padding_mask was ignored: padded keys (True) must get -inf scores.",
    "attn_mask_ignored": "attn_mask was ignored: add it to the scores (bool True -> -inf, float masks as they are).",
    "causal_ignored": "is_causal was ignored: with attn_mask=None, is_causal=True must hide the future (key j > query i).",
    "mask3d_hb": "read a 3D attn_mask as (H, B, L, S); PyTorch's layout is (B*H, L, S), row b*H + h: view it as (B, H, L, S).",
    "float_as_bool": "treated a float mask as a boolean one. A float mask is added to the scores as it is.",
    "mask_after_softmax": "masked after the softmax: masked positions must get -inf before the softmax, so the rest renormalise to 1.",
    "softmax_queries": "took the softmax over the queries (dim -2) instead of over the keys (dim -1).",
    "self_only": "computed keys and values from `query`; in cross-attention they come from `key` and `value`.",
    "kv_swapped": "swapped key and value: scores use `key`, the weighted sum uses `value`.",
    "qkv_order": "took the projections out of in_proj_weight in the wrong order; its rows are W_q, W_k, W_v in that order.",
}
WEIGHT_MISTAKES = {
    "heads_sum": "summed the heads' weights; average_attn_weights=True means the mean over heads.",
    "first_head": "returned the weights of one head; average_attn_weights=True means the mean over all heads.",
}
FINITE_FILL = (
    "  Likely mistake: filled masked scores with a large finite negative number instead of -inf, so a fully masked query "
    "spreads its weight over keys it may not see. Its weights must be zero (and its output out_proj's bias)."
)
FULLY_MASKED = (
    "  Likely mistake: a fully masked query (all its keys masked) gave NaN: the softmax of a row of -inf is 0/0. "
    "Give such rows zero weights (their output is then out_proj's bias), not NaN."
)
DROPOUT_EVAL = (
    "  Likely mistake: dropout is active in eval mode. After model.eval() (self.training False) dropout must be off: "
    "use F.dropout(weights, p, training=self.training) or an nn.Dropout module."
)


def _oracle(p: dict, q, k, v, h: int, *, kpm=None, am=None, causal=False, dtype=T.np_float64, variant: str = ""):
    """Multi-head attention written out: returns (output (B, L, E), per-head weights (B, H, L, S))."""

    def f(a):
        return None if a is None else T.np_array(a, dtype=dtype)

    q, k, v = f(q), f(k), f(v)
    w_in, b_in, w_out, b_out = f(p["w_in"]), f(p["b_in"]), f(p["w_out"]), f(p["b_out"])
    if variant == "self_only":
        k = v = q
    if variant == "kv_swapped":
        k, v = v, k
    b, n, e = q.shape
    s = k.shape[1]
    d = e // h
    blocks = [w_in[:e], w_in[e : 2 * e], w_in[2 * e :]]
    bias = [b_in[:e], b_in[e : 2 * e], b_in[2 * e :]] if b_in is not None else [dtype(0)] * 3
    order = (1, 0, 2) if variant == "qkv_order" else (0, 1, 2)
    qp = q @ blocks[order[0]].T + bias[order[0]]
    kp = k @ blocks[order[1]].T + bias[order[1]]
    vp = v @ blocks[order[2]].T + bias[order[2]]

    def split(x):
        m = x.shape[1]
        if variant == "split_view":
            return x.reshape(b, h, m, d)
        if variant == "split_interleaved":
            return x.reshape(b, m, d, h).transpose(0, 3, 1, 2)
        return x.reshape(b, m, h, d).transpose(0, 2, 1, 3)

    qh, kh, vh = split(qp), split(kp), split(vp)
    scale = {"scale_E": 1 / T.sqrt(e), "scale_H": 1 / T.sqrt(h), "no_scale": 1.0, "scale_D": 1 / d}.get(variant, 1 / T.sqrt(d))
    scores = (qh @ kh.transpose(0, 1, 3, 2)) * dtype(scale)
    add = T.np_zeros((b, h, n, s), dtype=dtype)

    def additive(mask):
        if mask.dtype == T.np_bool:
            blocked = ~mask if variant == "inverted" else mask
            return T.np_where(blocked, dtype(-T.inf), dtype(0))
        if variant == "float_as_bool":
            return T.np_where(mask != 0, dtype(-T.inf), dtype(0))
        return T.np_array(mask, dtype=dtype)

    if variant == "attn_mask_ignored":
        am = None
    if am is None and causal and variant != "causal_ignored":
        am = T.np_triu(T.np_ones((n, s), dtype=T.np_bool), 1)
    if am is not None:
        a = additive(am)
        if a.ndim == 3:
            a = a.reshape(h, b, n, s).transpose(1, 0, 2, 3) if variant == "mask3d_hb" else a.reshape(b, h, n, s)
        add = add + a
    if kpm is not None and variant != "kpm_ignored":
        add = add + additive(kpm).reshape(b, 1, 1, s)
    axis = -2 if variant == "softmax_queries" else -1
    with T.np_errstate(all="ignore"):
        if variant == "mask_after_softmax":
            scores = scores + T.np_where(T.np_isinf(add), dtype(0), add)
        else:
            scores = scores + add
        top = scores.max(axis=axis, keepdims=True)
        dead = top == -T.inf
        ex = T.np_exp(scores - T.np_where(dead, dtype(0), top))
        total = ex.sum(axis=axis, keepdims=True)
        w = ex / total if variant == "nan_rows" else T.np_where(dead, dtype(0), ex / T.np_where(dead, dtype(1), total))
        if variant == "mask_after_softmax":
            w = T.np_where(add == -T.inf, dtype(0), w)
    heads_out = w @ vh
    merged = heads_out.reshape(b, n, e) if variant == "merge_view" else heads_out.transpose(0, 2, 1, 3).reshape(b, n, e)
    if variant == "no_out_proj":
        return merged, w
    out = merged @ w_out.T
    if b_out is not None:
        out = out + b_out
    return out, w


def _shapes(module) -> dict:
    return {k: T._tuple(v.shape) for k, v in R.module_state_dict(module).items()}


def _forbidden_names(cls) -> list[str]:
    """Uses of PyTorch's own layers (FORBIDDEN) in the methods of ``cls``."""
    return names_used_in_methods(cls, FORBIDDEN)


def _build(cls, e: int, h: int, *, dropout: float = 0.0, bias: bool = True, p: dict | None = None, dtype=F32):
    """Construct the student's layer, check its structure, load PyTorch's state dict into it."""
    args = f"{e}, {h}" + (f", dropout={dropout}" if dropout else "") + ("" if bias else ", bias=False")
    label = f"MultiHeadAttention({args})"
    with R.fork_rng(devices=[]):
        module = call(cls, e, h, dropout=dropout, bias=bias, label=label)
    if not _isinstance(module, R.Module):
        raise CheckFailure(f"{label}: should be an nn.Module (class MultiHeadAttention(nn.Module)), got {T.type_name(module)}.")
    if _isinstance(module, R.MHA):
        raise CheckFailure(f"{label}: build the layer yourself instead of subclassing nn.MultiheadAttention.")
    ref = R.mha_module(e, h, bias, p)
    want, got = _shapes(ref), _shapes(module)
    if want != got:
        missing = [k for k in want if k not in got]
        extra = [k for k in got if k not in want]
        wrong = [f"{k}: {got[k]} instead of {want[k]}" for k in want if k in got and got[k] != want[k]]
        details = []
        if missing:
            details.append(f"missing {missing}")
        if extra:
            details.append(f"unexpected {extra}")
        if wrong:
            details.append("wrong shapes: " + "; ".join(wrong))
        raise CheckFailure(
            f"{label}: its state dict should have the entries of nn.MultiheadAttention({args}, batch_first=True), "
            f"{want}; {', '.join(details)}. Use in_proj_weight (3E, E), in_proj_bias (3E) "
            "(register_parameter('in_proj_bias', None) when bias=False) and out_proj = nn.Linear(E, E, bias=bias)."
        )
    out_proj = getattr(module, "out_proj", None)
    if not _isinstance(out_proj, R.Linear):
        raise CheckFailure(f"{label}: out_proj should be an nn.Linear(E, E), got {T.type_name(out_proj)}.")
    try:
        R.module_load_state_dict(module, R.module_state_dict(ref))
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(f"{label}: load_state_dict(nn.MultiheadAttention(...).state_dict()) failed: {exc}") from None
    try:
        R.module_to(module, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(f"{label}: .to({dtype}) failed: {exc}") from None
    return module


def _check_built_by_hand(cls) -> None:
    forbidden = _forbidden_names(cls) if _isinstance(cls, type) or is_remote(cls) else []
    if forbidden:
        raise CheckFailure(
            "MultiHeadAttention: build the layer from split_heads, matrix products and a softmax; it uses PyTorch's own "
            f"multi-head attention ({', '.join(forbidden)})."
        )


def _describe_mask(name: str, m) -> str:
    if m is None:
        return ""
    kind = "bool" if m.dtype == T.np_bool else "float"
    return f", {name}={kind} {T._tuple(m.shape)}"


def _mask_tensor(m, dtype):
    if m is None:
        return None
    return R.tensor_of(m, BOOL) if m.dtype == T.np_bool else R.tensor_of(m, dtype)


def _fully_masked_rows(w: np.ndarray) -> bool:
    return bool(T.np_any(T.np_all(w == 0, axis=-1)))


def _wrong_only_where_fully_masked(got: np.ndarray, expected: np.ndarray, atol: float) -> bool:
    """True when ``got`` matches on every query with a visible key but not on the fully masked ones."""
    if T._tuple(got.shape) != T._tuple(expected.shape) or not T.np_isfinite(got).all():
        return False
    dead = T.np_all(expected == 0, axis=-1)
    if not T.np_any(dead):
        return False
    live_ok = max_error(got[~dead], expected[~dead]) <= atol
    return live_ok and float(T.np_max(T.np_abs(got[dead]))) > atol


def _run_case(
    module,
    p: dict,
    q: np.ndarray,
    k: np.ndarray | None,
    v: np.ndarray | None,
    h: int,
    *,
    kpm=None,
    am=None,
    causal: bool = False,
    need_weights: bool = True,
    average: bool = True,
    dtype=F32,
    defaults: bool = False,
    note: str = "",
    name: str = "MultiHeadAttention",
):
    """Run one forward pass and compare it with the oracle. ``k is None`` means self-attention."""
    self_attention = k is None
    k = q if k is None else k
    v = k if v is None else v
    b, n, e = q.shape
    s = k.shape[1]
    qt = R.tensor_of(q, dtype)
    kt = qt if self_attention else R.tensor_of(k, dtype)
    vt = kt if v is k else R.tensor_of(v, dtype)
    kpm_t, am_t = _mask_tensor(kpm, dtype), _mask_tensor(am, dtype)
    inputs = [t for t in (qt, kt, vt, kpm_t, am_t) if t is not None]
    before = [R.clone(t) for t in inputs]
    kwargs = {}
    if not defaults:
        kwargs = {"key_padding_mask": kpm_t, "need_weights": need_weights, "attn_mask": am_t, "average_attn_weights": average}
        if causal:
            kwargs["is_causal"] = True
    kind = "self-attention" if self_attention else "cross-attention"
    flags = (
        ""
        if defaults
        else f", need_weights={need_weights}, average_attn_weights={average}" + (", is_causal=True" if causal else "")
    )
    label = (
        f"{name}(query {(b, n, e)}, key {(b, s, e)}, value {(b, s, e)}{_describe_mask('key_padding_mask', kpm)}"
        f"{_describe_mask('attn_mask', am)}{flags}) [{kind}, {str(dtype).replace('torch.', '')}, {h} head{'s' if h > 1 else ''}{note}]"
    )
    result = call(module, qt, kt, vt, label=label, **kwargs)
    if T._type(result) is not T._tuple or T._len(result) != 2:
        raise CheckFailure(f"{label}: should return a tuple (attn_output, attn_weights), got {T.type_name(result)}.")
    out_t, w_t = result
    out = R.tensor_result(out_t, label=label, what="attn_output", dtype=dtype)
    for t, old in zip(inputs, before, strict=True):
        if not R.t_equal(t, old):
            raise CheckFailure(f"{label}: the layer changed one of its inputs in place.")

    exp_out, exp_w = _oracle(p, q, k, v, h, kpm=kpm, am=am, causal=causal)
    if dtype == F64:
        atol = 1e-9
    else:
        out32, w32 = _oracle(p, q, k, v, h, kpm=kpm, am=am, causal=causal, dtype=T.np_float32)
        err = max(
            max_error(T.np_array(out32, dtype=T.np_float64), exp_out), max_error(T.np_array(w32, dtype=T.np_float64), exp_w)
        )
        atol = max(2e-5, 8 * err)
    dead = _fully_masked_rows(exp_w)
    fp = lambda which, extra=None: {  # noqa: E731
        MISTAKES[m]: (
            lambda m=m: (extra or (lambda x: x))(_oracle(p, q, k, v, h, kpm=kpm, am=am, causal=causal, variant=m)[which])
        )
        for m in MISTAKES
    }

    if not need_weights:
        if w_t is not None:
            raise CheckFailure(f"{label}: with need_weights=False the weights should be None, got {T.type_name(w_t)}.")
    else:
        w = R.tensor_result(w_t, label=label, what="attn_weights", dtype=dtype)
        shape_avg, shape_heads = (b, n, s), (b, h, n, s)
        got_shape = T._tuple(w.shape)
        if average and got_shape == shape_heads and h > 1:
            raise CheckFailure(
                f"{label}: with average_attn_weights=True (the default) the weights should be the mean over heads, "
                f"shape (B, L, S) = {shape_avg}; got per-head weights {got_shape}."
            )
        if not average and got_shape == shape_avg and h > 1:
            raise CheckFailure(
                f"{label}: with average_attn_weights=False the weights should be per head, shape (B, H, L, S) = "
                f"{shape_heads}; got {got_shape}."
            )
        want_shape = shape_avg if average else shape_heads
        if got_shape != want_shape:
            hint = f"\n  Likely mistake: {MISTAKES['self_only']}" if got_shape[-1:] == (n,) and n != s else ""
            raise CheckFailure(f"{label}: the attention weights should have shape {want_shape}, got {got_shape}.{hint}")
        if dead and not T.np_isfinite(w).all():
            raise CheckFailure(f"{label}: the weights contain NaN.\n{FULLY_MASKED}")
        want_w = exp_w.mean(axis=1) if average else exp_w
        if dead and _wrong_only_where_fully_masked(w, want_w, atol):
            raise CheckFailure(
                f"{label}: the weights of a fully masked query (every key masked) should be zero.\n"
                f"  expected: {show(want_w)}\n  got:      {show(w)}\n{FINITE_FILL}"
            )
        if average:
            prints = fp(1, lambda x: x.mean(axis=1))
            prints[WEIGHT_MISTAKES["heads_sum"]] = lambda: exp_w.sum(axis=1)
            prints[WEIGHT_MISTAKES["first_head"]] = lambda: exp_w[:, 0]
            expect_close(
                w,
                exp_w.mean(axis=1),
                label=label,
                what="attention-weight tensor (averaged over heads)",
                atol=atol,
                fingerprints=prints,
            )
        else:
            expect_close(w, exp_w, label=label, what="attention-weight tensor (per head)", atol=atol, fingerprints=fp(1))
    if dead and not T.np_isfinite(out).all():
        raise CheckFailure(f"{label}: the output contains NaN.\n{FULLY_MASKED}")
    expect_close(out, exp_out, label=label, what="attn_output", atol=atol * 4, fingerprints=fp(0))
    return out


def _data(rng, b: int, n: int, e: int, scale: float = 1.0) -> np.ndarray:
    return T.np_array(rng.normal(size=(b, n, e), scale=scale).astype(T.np_float32), dtype=T.np_float64)


def _check_dropout_eval(cls, rng) -> None:
    """A layer built with dropout=0.5, in eval mode, must be deterministic and dropout-free."""
    e, h, b, n = 8, 2, 2, 5
    p = R.mha_params(rng, e, True)
    module = _build(cls, e, h, dropout=0.5, p=p)
    R.module_train(module, False)
    q = _data(rng, b, n, e)
    qt = R.tensor_of(q, F32)
    label = f"MultiHeadAttention({e}, {h}, dropout=0.5) after .eval(), called twice on the same input"
    with R.fork_rng(devices=[]):
        R.manual_seed(0)
        first = call(module, qt, qt, qt, need_weights=False, label=label)
        second = call(module, qt, qt, qt, need_weights=False, label=label)
    if T._type(first) is T._tuple and T._type(second) is T._tuple and T._len(first) == T._len(second) == 2:
        a = R.tensor_result(first[0], label=label, what="attn_output", dtype=F32)
        c = R.tensor_result(second[0], label=label, what="attn_output", dtype=F32)
        if T._tuple(a.shape) == T._tuple(c.shape) and not T.np_array_equal(a, c):
            raise CheckFailure(f"{label}: the two outputs differ (largest difference {max_error(a, c):.3g}).\n{DROPOUT_EVAL}")
    _run_case(module, p, q, None, None, h, average=False, note=", eval mode, dropout=0.5")


DROPOUT_PLACES = {
    "output": (
        "dropout acts on the layer's output (after out_proj). nn.MultiheadAttention drops attention weights: "
        "weights = F.dropout(softmax(scores), p, training=self.training), then weights @ v."
    ),
    "merged": (
        "dropout acts on the merged heads, before out_proj. nn.MultiheadAttention drops the attention weights "
        "(after the softmax, before the weighted sum of the values)."
    ),
    "span": (
        "the output is not out_proj of a weighted sum of the value vectors, so dropout acted somewhere other than "
        "the attention weights (on the values, the projections or the heads' outputs). Drop the weights: "
        "weights = F.dropout(softmax(scores), p, training=self.training), then weights @ v."
    ),
    "before_softmax": (
        "dropout acts before the softmax (on the scores, queries or keys): the weights the output was computed with "
        "still sum to 1 and none is exactly zero. Drop the weights after the softmax."
    ),
    "renormalised": (
        "the weights were renormalised after dropout (each row sums to 1 again). Dropout only zeroes weights and "
        "scales the kept ones by 1/(1-p); the rows then sum to 1 on average only."
    ),
    "not_rescaled": "the kept weights are not scaled by 1/(1-p) (F.dropout does both: it zeroes with probability p and rescales).",
    "one_minus_p": (
        "dropped with probability 1 - p instead of p (the kept weights are scaled by 1/p): the dropout argument is "
        "the probability of zeroing a weight."
    ),
    "shared_mask": (
        "the same dropout mask for every sequence of the batch and every head; draw an independent mask for every "
        "weight (F.dropout on the (B, H, L, S) weights does)."
    ),
    "need_weights_false": (
        "dropout is skipped when need_weights=False: the weights must be dropped whether or not they are returned "
        "(with F.scaled_dot_product_attention pass dropout_p=p if self.training else 0.0)."
    ),
    "returned_before": (
        "returned the attention weights before dropout. nn.MultiheadAttention returns the weights after dropout, "
        "the ones the output was computed with."
    ),
}


def _dropped_coefficients(out: np.ndarray, p: dict, vh: np.ndarray, h: int) -> tuple[np.ndarray, float]:
    """The weights (B, H, L, S) that ``out`` used, read back by undoing out_proj and solving against the values.

    Also returns the largest part of the merged heads that no weighted sum of the values explains.
    """
    b, n, e = out.shape
    merged = (out - p["b_out"]) @ _pinv(p["w_out"].T)  # (B, L, E): out_proj is square and invertible
    heads = merged.reshape(b, n, h, e // h).transpose(0, 2, 1, 3)  # (B, H, L, D)
    coef = heads @ _pinv(vh)  # (B, H, L, S): D > S, so the values are independent
    residual = float(T.np_max(T.np_abs(heads - coef @ vh)))
    return coef, residual


def _check_dropout_train(cls, rng) -> None:
    """Training mode: dropout must act on the attention weights, and the weights returned are the dropped ones.

    With head_dim larger than the number of keys, the per-head value vectors are independent, so
    the weights the layer actually used can be read back from its output (undo out_proj, solve
    against the values): each must be 0 or w / (1 - p), with about a fraction p of zeros. That
    holds only when dropout acts on the softmax output; dropout on the values, the output, the
    scores or the heads leaves a fingerprint that is named. float64, so the read-back is exact.
    """
    e, h, b, n, prob = 16, 2, 8, 5, 0.3
    p = R.mha_params(rng, e, True)
    module = _build(cls, e, h, dropout=prob, p=p, dtype=F64)
    R.module_train(module, True)
    x = _data(rng, b, n, e)
    exp_out, exp_w = _oracle(p, x, x, x, h)
    vh = _oracle_heads_v(p, x, h)
    xt = R.tensor_of(x, F64)
    torch_seed = _int(rng.integers(1, 2**31))
    for need, average in ((True, False), (False, True), (True, True)):
        label = (
            f"MultiHeadAttention({e}, {h}, dropout={prob}) in training mode [float64], self-attention on x of shape "
            f"{(b, n, e)}, need_weights={need}, average_attn_weights={average}"
        )
        with R.fork_rng(devices=[]):
            R.manual_seed(torch_seed)
            result = call(module, xt, xt, xt, need_weights=need, average_attn_weights=average, label=label)
        if T._type(result) is not T._tuple or T._len(result) != 2:
            raise CheckFailure(f"{label}: should return a tuple (attn_output, attn_weights), got {T.type_name(result)}.")
        out = R.tensor_result(result[0], label=label, what="attn_output", dtype=F64)
        expect_shape(out, exp_out.shape, label=label, what="attn_output")
        if max_error(out, exp_out) < 1e-9:
            place = (
                DROPOUT_PLACES["need_weights_false"]
                if not need
                else (
                    "dropout is not applied in training mode. Apply dropout (probability self.dropout) to the attention "
                    "weights when self.training is True."
                )
            )
            raise CheckFailure(f"{label}: the output equals the output without dropout.\n  Likely mistake: {place}")
        used = _dropout_weights_used(out, exp_out, exp_w, p, vh, h, prob, label)
        if need:
            want = used.mean(axis=1) if average else used
            w = R.tensor_result(result[1], label=label, what="attn_weights", dtype=F64)
            expect_shape(w, want.shape, label=label, what="attn_weights")
            if max_error(w, want) > 1e-8:
                before = exp_w.mean(axis=1) if average else exp_w
                hint = f"\n  Likely mistake: {DROPOUT_PLACES['returned_before']}" if max_error(w, before) <= 1e-8 else ""
                raise CheckFailure(
                    f"{label}: the returned weights are not the weights the output was computed with (the dropped-out "
                    f"weights).\n  expected: {show(want)}\n  got:      {show(w)}{hint}"
                )


def _dropout_weights_used(out, exp_out, exp_w, p, vh, h, prob, label) -> np.ndarray:
    """The dropped-out weights the layer used, after checking that they are a dropout of ``exp_w``; else a named failure."""
    scale = 1 / (1 - prob)

    def fail(key: str, detail: str = ""):
        raise CheckFailure(f"{label}: dropout acts in the wrong place{detail}.\n  Likely mistake: {DROPOUT_PLACES[key]}")

    tiny = 1e-8 * (1 + T.np_abs(exp_out))
    if T.np_all((T.np_abs(out) <= tiny) | (T.np_abs(out - exp_out * scale) <= tiny)):
        fail("output")
    coef, residual = _dropped_coefficients(out, p, vh, h)
    if residual > 1e-7:
        exp_merged = _dropped_coefficients(exp_out, p, vh, h)[0] @ vh
        merged = ((out - p["b_out"]) @ _pinv(p["w_out"].T)).reshape(exp_merged.shape[0], exp_merged.shape[2], -1)
        em = exp_merged.transpose(0, 2, 1, 3).reshape(merged.shape)
        if T.np_all((T.np_abs(merged) <= 1e-8) | (T.np_abs(merged - em * scale) <= 1e-8 * (1 + T.np_abs(em)))):
            fail("merged")
        fail("span", f" (a part of size {residual:.3g} of the heads' outputs is no weighted sum of the values)")
    tol = 1e-7 * (1 + T.np_abs(exp_w))
    zero = T.np_abs(coef) <= tol
    live = exp_w > 1e-3
    if not T.np_any(zero & live):
        if T.np_all(T.np_abs(coef.sum(axis=-1) - 1) <= 1e-7):
            fail("before_softmax")
        if T.np_all(zero | (T.np_abs(coef - exp_w) <= tol)):
            fail("output", " (no weight was dropped, yet the output differs)")
    for key, factor in (("not_rescaled", 1.0), ("one_minus_p", 1 / prob)):
        if factor != scale and T.np_all(zero | (T.np_abs(coef - exp_w * factor) <= tol)):
            fail(key)
    if T.np_all(zero | (T.np_abs(coef - exp_w * scale) <= tol)):
        dropped = float(zero[live].mean())
        if not (prob - 0.12 <= dropped <= prob + 0.12):
            raise CheckFailure(
                f"{label}: dropout zeroed {100 * dropped:.0f}% of the attention weights; with p = {prob} about "
                f"{100 * prob:.0f}% should be zero (each weight independently, with probability p)."
            )
        kept = ~zero
        if T.np_all(kept == kept[:1, :1]):
            fail("shared_mask")
        return coef
    sums = coef.sum(axis=-1)
    if T.np_any(zero & live) and T.np_all(T.np_abs(sums - 1) <= 1e-7):
        fail("renormalised")
    if T.np_all(T.np_abs(sums - 1) <= 1e-7):
        fail("before_softmax")
    bad = ~(zero | (T.np_abs(coef - exp_w * scale) <= tol))
    raise CheckFailure(
        f"{label}: the weights the output was computed with (read back from it) are not a dropout of the attention "
        f"weights: {_int(bad.sum())} of {bad.size} are neither 0 nor w / (1 - p).\n"
        f"  expected (before dropout): {show(exp_w[0, 0])}\n  used:                      {show(coef[0, 0])}\n"
        "  Dropout belongs on the softmax output: weights = F.dropout(weights, p, training=self.training)."
    )


def _oracle_heads_v(p: dict, q: np.ndarray, h: int) -> np.ndarray:
    """The per-head values (B, H, S, D) of self-attention on ``q``."""
    b, n, e = q.shape
    vp = q @ p["w_in"][2 * e :].T + p["b_in"][2 * e :]
    return vp.reshape(b, n, h, e // h).transpose(0, 2, 1, 3)


def visible_MultiHeadAttention(cls) -> None:
    """Structure and state dict, self- and cross-attention, both mask kinds, per-head weights, eval mode."""
    rng = T.default_rng(0)
    e, h = 8, 2
    p = R.mha_params(rng, e, True)
    module = _build(cls, e, h, p=p)
    _check_built_by_hand(cls)
    _build(cls, e, h, bias=False, p=R.mha_params(rng, e, False))
    x = _data(rng, 2, 4, e)
    _run_case(module, p, x, None, None, h, defaults=True, note=", default arguments")
    q, kv = _data(rng, 2, 3, e), _data(rng, 2, 5, e)
    _run_case(module, p, q, kv, None, h, average=False)
    k, v = _data(rng, 2, 5, e), _data(rng, 2, 5, e)
    kpm = np.array([[False, False, False, True, True], [False, False, False, False, True]])
    _run_case(module, p, q, k, v, h, kpm=kpm, average=False, note=", True = padding")
    causal = np.triu(np.ones((4, 4), dtype=bool), 1)
    _run_case(module, p, x, None, None, h, am=causal, average=False, note=", causal bool mask, True = not allowed")
    bias_mask = rng.normal(size=(3, 5)).astype(np.float32).astype(np.float64)
    _run_case(module, p, q, k, v, h, am=bias_mask, note=", float mask added to the scores")
    _run_case(module, p, q, k, v, h, kpm=kpm, need_weights=False)
    _check_dropout_eval(cls, rng)
    passed("MultiHeadAttention", 9)


def hidden_MultiHeadAttention(cls, seed: int = 44) -> None:
    """Odd sizes, float64, one head, D = 1, L = 1, S = 1, fully masked rows, 3D and float masks, both masks,
    is_causal, large values, no bias, and dropout in training mode."""
    rng = T.default_rng(seed)
    count = 0
    _build(cls, 8, 2)
    _check_built_by_hand(cls)

    def case(e, h, b, n, s, *, bias=True, dtype=F32, scale=1.0, self_attn=False, kv_same=False, **kw):
        nonlocal count
        p = R.mha_params(rng, e, bias)
        module = _build(cls, e, h, bias=bias, p=p, dtype=dtype)
        q = _data(rng, b, n, e, scale)
        k = None if self_attn else _data(rng, b, s, e, scale)
        v = None if (self_attn or kv_same) else _data(rng, b, s, e, scale)
        _run_case(module, p, q, k, v, h, dtype=dtype, **kw)
        count += 1

    case(15, 5, 3, 7, 7, dtype=F64, self_attn=True, average=False, note=", odd sizes")
    case(6, 1, 2, 4, 3, average=False, note=", one head")
    case(6, 6, 2, 3, 5, average=False, note=", one feature per head")
    case(8, 2, 2, 1, 6, note=", one query")
    case(8, 4, 2, 5, 1, average=False, note=", one key")
    case(12, 3, 2, 4, 6, bias=False, average=False, note=", bias=False")
    case(8, 2, 2, 4, 6, kv_same=True, average=False, note=", key is value")
    kpm = np.zeros((2, 5), dtype=bool)
    kpm[1] = True
    case(8, 2, 2, 3, 5, kpm=kpm, average=False, note=", every key of batch 1 padded")
    case(8, 2, 2, 3, 5, kpm=kpm, need_weights=False, note=", every key of batch 1 padded")
    am = np.zeros((4, 4), dtype=bool)
    am[2] = True
    case(8, 2, 2, 4, 4, self_attn=True, am=am, average=False, note=", query 2 may attend nothing")
    am3 = rng.random(size=(2 * 2, 3, 5)) < 0.4
    am3[1, 0] = True
    case(8, 2, 2, 3, 5, am=am3, average=False, note=", a 3D mask, one mask per (batch, head)")
    fm = rng.normal(size=(2 * 4, 3, 4)).astype(np.float32).astype(np.float64)
    fm[rng.random(size=fm.shape) < 0.3] = -np.inf
    case(8, 4, 2, 3, 4, am=fm, average=False, note=", a 3D float mask with -inf entries")
    fk = rng.normal(size=(2, 6)).astype(np.float32).astype(np.float64)
    fk[0, :2] = -np.inf
    case(8, 2, 2, 4, 6, kpm=fk, average=False, note=", a float key_padding_mask")
    both_k = rng.random(size=(3, 6)) < 0.3
    both_a = rng.random(size=(5, 6)) < 0.3
    case(8, 2, 3, 5, 6, kpm=both_k, am=both_a, average=False, note=", both masks")
    case(8, 2, 2, 5, 5, self_attn=True, causal=True, average=False, note=", is_causal=True without attn_mask")
    causal = np.triu(np.ones((5, 5), dtype=bool), 1)
    case(8, 2, 2, 5, 5, self_attn=True, am=causal, causal=True, note=", is_causal=True with its causal attn_mask")
    pad = np.zeros((2, 5), dtype=bool)
    pad[0, 3:] = True
    case(8, 2, 2, 5, 5, self_attn=True, kpm=pad, causal=True, average=False, note=", is_causal=True and padding")
    case(16, 4, 2, 6, 9, dtype=F64, scale=30.0, average=False, note=", large inputs (scores in the thousands)")
    case(16, 4, 2, 6, 9, scale=8.0, average=False, note=", large inputs")
    _check_dropout_eval(cls, rng)
    _check_dropout_train(cls, rng)
    passed("MultiHeadAttention", count + 2, hidden=True)


# ---------------------------------------------------------------------------------------------
# multi_head_attention_flops
# ---------------------------------------------------------------------------------------------


def _flops_parts(b: int, n: int, s: int, e: int) -> dict:
    return {
        "q": 2 * b * n * e * e,
        "kv": 4 * b * s * e * e,
        "scores": 2 * b * n * s * e,
        "mix": 2 * b * n * s * e,
        "out": 2 * b * n * e * e,
    }


def _flops_fingerprints(b: int, n: int, s: int, e: int, h: int) -> dict:
    c = _flops_parts(b, n, s, e)
    total = _sum(c.values())
    d = e // h
    return {
        "counted a multiply-add as 1 FLOP; it is 2 (one multiply, one add)": total // 2,
        "left out the projections (Q, K, V and output): they are matrix products too": c["scores"] + c["mix"],
        "left out the output projection (2·B·L·E² FLOPs)": total - c["out"],
        "left out the Q, K, V projections": c["scores"] + c["mix"] + c["out"],
        "computed the K and V projections from the L query tokens; they project the S key/value tokens": total
        - c["kv"]
        + 4 * b * n * e * e,
        "counted only one of the K and V projections": total - c["kv"] // 2,
        "counted Q·Kᵀ but not the weighted sum of the values (weights · V)": total - c["mix"],
        "multiplied the attention cost by num_heads with width E per head; each head works on D = E/H features": (
            total - c["scores"] - c["mix"] + h * (c["scores"] + c["mix"])
        ),
        "forgot the factor num_heads: every one of the H heads costs 2·B·L·S·D for Q·Kᵀ and again for weights·V": (
            total - c["scores"] - c["mix"] + (c["scores"] + c["mix"]) // h if e == h * d else -1
        ),
    }


def _check_flops_case(fn, b: int, n: int, s: int, e: int, h: int, note: str = "") -> None:
    label = f"multi_head_attention_flops(batch={b}, L={n}, S={s}, embed_dim={e}, num_heads={h}){note}"
    result = call(fn, b, n, s, e, h, label=label)
    if _isinstance(result, _bool_t) or not (_isinstance(result, _int) or _isinstance(result, T.np_integer)):
        hint = " Use // rather than /, or int(...), so the count stays exact." if _isinstance(result, _float) else ""
        raise CheckFailure(f"{label}: should return an int (an exact count of FLOPs), got {T.type_name(result)}.{hint}")
    got = _int(result)
    parts = _flops_parts(b, n, s, e)
    want = _sum(parts.values())
    if got == want:
        return
    lines = [
        f"{label}: expected {want:,} FLOPs, got {got:,}.",
        "  expected = Q projection 2·B·L·E² + K, V projections 2·2·B·S·E² + Q·Kᵀ 2·B·L·S·E + weights·V 2·B·L·S·E "
        "+ output projection 2·B·L·E²",
        f"           = {parts['q']:,} + {parts['kv']:,} + {parts['scores']:,} + {parts['mix']:,} + {parts['out']:,}",
    ]
    mistakes = [mistake for mistake, value in _flops_fingerprints(b, n, s, e, h).items() if value == got]
    if mistakes:
        lines.append("  Likely mistake: " + "; or ".join(mistakes) + ".")
    raise CheckFailure("\n".join(lines))


def visible_multi_head_attention_flops(fn) -> None:
    """Self-attention at two sizes, and cross-attention."""
    _check_flops_case(fn, 1, 4, 4, 8, 2)
    _check_flops_case(fn, 2, 16, 16, 64, 8)
    _check_flops_case(fn, 1, 3, 5, 8, 4, " (cross-attention, L != S)")
    passed("multi_head_attention_flops", 3)


def hidden_multi_head_attention_flops(fn) -> None:
    """One head and one feature per head, odd sizes, L much larger than S, and large exact counts."""
    for h in (1, 2, 4, 64):
        _check_flops_case(fn, 2, 10, 10, 64, h, f" ({h} head{'s' if h > 1 else ''}: the cost does not depend on H)")
    _check_flops_case(fn, 3, 7, 11, 15, 5, " (odd sizes)")
    _check_flops_case(fn, 4, 100, 3, 12, 3, " (L much larger than S)")
    _check_flops_case(fn, 1, 1, 1, 1, 1, " (one of everything)")
    _check_flops_case(fn, 64, 131071, 131071, 16384, 128, " (a count beyond 2**53: keep it an exact int)")
    passed("multi_head_attention_flops", 8, hidden=True)


# {exercise: (visible points, hidden points)}, in the order the exercises appear.
POINTS = {
    "split_heads": (1, 1),
    "merge_heads": (1, 1),
    "MultiHeadAttention": (4, 4),
    "multi_head_attention_flops": (1, 1),
}
