"""Checks for chapter 3: sinusoidal positional encodings and single-head self-attention.

Oracles are float64 NumPy computed here from the formulas (never from ``solutions/``):
the encoding matrix of Vaswani et al., and softmax(x W_q^T (x W_k^T)^T / sqrt(d_k)) x W_v^T
with weights the check itself copies into the student's ``W_q``, ``W_k`` and ``W_v``.
Gradients are compared with PyTorch autograd on a float64 oracle.

Everything a student cell could rebind (NumPy and torch functions, ``nn.Linear``,
builtins) is captured below when this module is imported, which the setup cell does
before any student code runs.
"""

from __future__ import annotations

import builtins
import math
import warnings

import numpy as np
import torch
import torch.nn as nn

from autograder.checks import trusted as T
from autograder.checks.common import CheckFailure, call, expect_close, expect_shape, max_error, passed, show
from autograder.checks.objects import module_to, output_gradients, parameter_names, set_parameters

# --- references captured at import time -------------------------------------------------
_ValueError = builtins.ValueError
_NotImplementedError = builtins.NotImplementedError
_Exception = builtins.Exception
_AttributeError = builtins.AttributeError
_getattr = builtins.getattr
_id = builtins.id
_dict = builtins.dict

_np_sin = np.sin
_np_cos = np.cos
_np_power = np.power
_np_empty = np.empty
_np_broadcast_to = np.broadcast_to

_Module = nn.Module
_Linear = nn.Linear
_module_to = nn.Module.to
_module_parameters = nn.Module.parameters
_TensorBase = torch._C.TensorBase
_copy_ = _TensorBase.copy_
_requires_grad_ = _TensorBase.requires_grad_
_no_grad = torch.no_grad
_t_matmul = torch.matmul
_t_transpose = torch.transpose
_t_softmax = torch.softmax
_t_mul = torch.mul
_t_sum = torch.sum
_t_from_numpy = torch.from_numpy
_autograd_grad = torch.autograd.grad
_float32 = torch.float32
_float64 = torch.float64

EPS32 = float(np.finfo(np.float32).eps)
PE_BASE = 10000.0

# =========================================================================================
# sinusoidal_positional_encoding
# =========================================================================================


def _pe64(
    L: int,
    d: int,
    *,
    pair_exponent: str = "2i",
    layout: str = "interleaved",
    swap: bool = False,
    divide: bool = True,
    start: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The encoding matrix in float64, or one of its common wrong variants: (pe, angle of each entry)."""
    pos = T.np_arange(start, start + L, dtype=np.float64)[:, None]
    i = T.np_arange(d // 2, dtype=np.float64)
    exponent = {"2i": 2 * i / d, "i": i / d}[pair_exponent]
    freq = _np_power(PE_BASE, -exponent) if divide else _np_power(PE_BASE, exponent)
    ang = pos * freq[None, :]
    first, second = (_np_cos(ang), _np_sin(ang)) if swap else (_np_sin(ang), _np_cos(ang))
    if layout == "concatenated":
        return T.np_concat([first, second], axis=1), T.np_concat([ang, ang], axis=1)
    pe = _np_empty((L, d), dtype=np.float64)
    angles = _np_empty((L, d), dtype=np.float64)
    pe[:, 0::2], pe[:, 1::2] = first, second
    angles[:, 0::2], angles[:, 1::2] = ang, ang
    return pe, angles


def _pe_own_index64(L: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Every column j uses its own exponent j/d_model (odd columns get (2i+1)/d_model)."""
    pos = T.np_arange(L, dtype=np.float64)[:, None]
    j = T.np_arange(d, dtype=np.float64)
    ang = pos * _np_power(PE_BASE, -j / d)[None, :]
    pe = _np_sin(ang)
    pe[:, 1::2] = _np_cos(ang[:, 1::2])
    return pe, ang


def _pe_fingerprints(L: int, d: int) -> dict:
    return {
        "concatenated the sines and the cosines (all sin columns first, then all cos columns); the encoding interleaves "
        "them: column 2i holds sin, column 2i+1 holds cos of the same angle": lambda: _pe64(L, d, layout="concatenated"),
        "swapped sin and cos: even columns (0, 2, 4, ...) hold sin, odd columns hold cos": lambda: _pe64(L, d, swap=True),
        "used the exponent i/d_model instead of 2i/d_model for the pair (2i, 2i+1) (torch.arange(0, d_model, 2) already "
        "counts 2i)": lambda: _pe64(L, d, pair_exponent="i"),
        "gave each column its own frequency (exponent j/d_model, so (2i+1)/d_model for the cos columns); both columns of "
        "a pair share the frequency of column 2i": lambda: _pe_own_index64(L, d),
        "multiplied the position by 10000^(2i/d_model) instead of dividing by it (check the sign of the exponent)": lambda: _pe64(
            L, d, divide=False
        ),
        "positions counted from 1 instead of 0 (row 0 should be sin 0 = 0, cos 0 = 1)": lambda: _pe64(L, d, start=1),
        "concatenated the cosines first and the sines second; the encoding interleaves them, sin in even columns": lambda: _pe64(
            L, d, layout="concatenated", swap=True
        ),
    }


def _angle_tolerance(angles: np.ndarray) -> np.ndarray:
    """Error to allow on sin/cos of angles computed in float32: a few float32 ulps of the angle, per entry."""
    return 2e-6 + 4 * EPS32 * T.np_abs(angles)


def _pe_diagnose(actual: np.ndarray, L: int, d: int) -> str | None:
    """Name the wrong variant that ``actual`` reproduces (looser: wrong angles can reach 1e7, where float32 rounds coarsely)."""
    for mistake, make in _pe_fingerprints(L, d).items():
        pe, angles = make()
        if T._tuple(pe.shape) != T._tuple(actual.shape):
            continue
        with T.np_errstate(all="ignore"):
            if (T.np_abs(actual - pe) <= 1e-5 + 4 * _angle_tolerance(angles)).all():
                return mistake
    return None


def _check_pe_case(pe, L: int, d: int, note: str = "") -> None:
    label = f"sinusoidal_positional_encoding({L}, {d}){note}"
    result = call(pe, L, d, label=label)
    if not T.is_tensor(result):
        raise CheckFailure(f"{label}: should return a torch.Tensor, got {T.type_name(result)}.")
    if result.dtype != _float32:
        raise CheckFailure(
            f"{label}: should return a float32 tensor (PyTorch's default dtype), got {result.dtype}. A float64 encoding "
            "added to float32 embeddings would silently turn the whole model into float64."
        )
    actual = T.tensor_to_float64(result)
    expected, angles = _pe64(L, d)
    if T._tuple(actual.shape) == (d, L) and L != d:
        raise CheckFailure(
            f"{label}: got shape {(d, L)}, the transpose; return one row per position: shape (L, d_model) = {(L, d)}."
        )
    expect_shape(actual, expected.shape, label=label, what="encoding")
    with T.np_errstate(all="ignore"):
        ok = (T.np_abs(actual - expected) <= _angle_tolerance(angles)).all()
    if ok:
        return
    worst = max_error(actual, expected)
    lines = [
        f"{label}: the encoding is wrong (largest error {worst:.3g}).",
        f"  expected: {show(expected)}",
        f"  got:      {show(actual)}",
    ]
    if not T.np_isfinite(actual).all():
        lines.append("  Your result contains NaN or inf.")
    mistake = _pe_diagnose(actual, L, d)
    if mistake:
        lines.append(f"  Likely mistake: {mistake}")
    raise CheckFailure("\n".join(lines))


def _check_pe_odd(pe, L: int, d: int) -> None:
    label = f"sinusoidal_positional_encoding({L}, {d}) (odd d_model)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = pe(L, d)
    except _ValueError:
        return
    except _NotImplementedError:
        raise CheckFailure(f"{label}: not implemented yet (the cell still raises NotImplementedError).") from None
    except _Exception as exc:  # noqa: BLE001  (any other error is the wrong one)
        raise CheckFailure(
            f"{label} raised {T.type_name(exc)}: {exc}\n  It should raise ValueError with a clear message: sin and cos come "
            "in pairs, so d_model must be even. Check d_model % 2 before computing anything."
        ) from None
    shape = f" of shape {T._tuple(result.shape)}" if T.is_tensor(result) else ""
    raise CheckFailure(
        f"{label}: returned {T.type_name(result)}{shape} instead of raising ValueError. sin and cos come in pairs, so an odd "
        "d_model has a column without its partner; raise ValueError rather than silently dropping or padding a column."
    )


def visible_sinusoidal_positional_encoding(pe) -> None:
    """Two small matrices, and ValueError for an odd d_model."""
    _check_pe_case(pe, 4, 6)
    _check_pe_case(pe, 10, 8)
    _check_pe_odd(pe, 4, 5)
    passed("sinusoidal_positional_encoding", 3)


def hidden_sinusoidal_positional_encoding(pe) -> None:
    """One position, d_model = 2, long sequences, wide models, several odd widths."""
    _check_pe_case(pe, 1, 2, " (one position, one pair)")
    _check_pe_case(pe, 7, 2, " (d_model = 2)")
    _check_pe_case(pe, 3, 128, " (L < d_model)")
    _check_pe_case(pe, 50, 16)
    _check_pe_case(pe, 513, 512, " (a long sequence)")
    _check_pe_case(pe, 2048, 6, " (positions up to 2047)")
    for L, d in ((3, 1), (5, 7), (2, 33)):
        _check_pe_odd(pe, L, d)
    passed("sinusoidal_positional_encoding", 9, hidden=True)


# =========================================================================================
# SelfAttention
# =========================================================================================


class _Params:
    """Projection weights (float64 NumPy) that the check copies into the student's module."""

    def __init__(self, rng, d_model: int, d_k: int, d_v: int, bias: bool, gain: float, np_dtype) -> None:
        def mat(rows: int, cols: int) -> np.ndarray:
            return (rng.normal(size=(rows, cols)) * gain / math.sqrt(cols)).astype(np_dtype).astype(np.float64)

        def vec(n: int) -> np.ndarray | None:
            return (rng.normal(size=n) * 0.5).astype(np_dtype).astype(np.float64) if bias else None

        self.Wq, self.Wk, self.Wv = mat(d_k, d_model), mat(d_k, d_model), mat(d_v, d_model)
        self.bq, self.bk, self.bv = vec(d_k), vec(d_k), vec(d_v)


def _lin(x: np.ndarray, W: np.ndarray, b: np.ndarray | None, use_bias: bool = True) -> np.ndarray:
    y = x @ W.T
    return y + b if (use_bias and b is not None) else y


def _softmax_np(s: np.ndarray, axis: int) -> np.ndarray:
    """Softmax in float64; a slice that is all -inf comes out NaN (0/0), as in PyTorch."""
    with T.np_errstate(all="ignore"):
        m = s.max(axis=axis, keepdims=True)
        m = T.np_where(T.np_isfinite(m), m, 0.0)
        e = T.np_exp(s - m)
        return e / e.sum(axis=axis, keepdims=True)


def _sa64(
    x,
    P: _Params,
    mask=None,
    *,
    scale: float,
    axis: int = -1,
    fill: float = -math.inf,
    full_rows: str = "zero",
    q_from: str = "q",
    k_from: str = "k",
    v_from: str = "v",
    use_bias: bool = True,
    after: bool = False,
    invert: bool = False,
    transpose_scores: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Self-attention in float64 NumPy, or one of its common wrong variants: (out, weights)."""
    proj = {
        "q": lambda: _lin(x, P.Wq, P.bq, use_bias),
        "k": lambda: _lin(x, P.Wk, P.bk, use_bias),
        "v": lambda: _lin(x, P.Wv, P.bv, use_bias),
        "x": lambda: x,
    }
    q, k, v = proj[q_from](), proj[k_from](), proj[v_from]()
    with T.np_errstate(all="ignore"):
        s = q @ T.np_swapaxes(k, -1, -2) * scale
        if transpose_scores:
            s = T.np_swapaxes(s, -1, -2)
        m = None
        if mask is not None:
            m = _np_broadcast_to(mask, s.shape)
            if invert:
                m = ~m
            if not after:
                s = T.np_where(m, s, fill)
        w = _softmax_np(s, axis)
        if m is not None:
            if after:
                w = w * m
            elif full_rows == "zero":
                w = T.np_where(m.any(axis=-1, keepdims=True), w, 0.0)
        return w @ v, w


def _sa_variants(x, P: _Params, mask, d_model: int, d_k: int, d_v: int) -> dict:
    """{mistake: kwargs of _sa64 reproducing it}; the first one whose output matches names the mistake."""
    s = 1 / math.sqrt(d_k)
    v = {
        "did not scale the scores: divide q·k by sqrt(d_k) before the softmax": _dict(scale=1.0),
        "scaled the scores by 1/d_k instead of 1/sqrt(d_k)": _dict(scale=1 / d_k),
        "multiplied the scores by sqrt(d_k) instead of dividing by it": _dict(scale=math.sqrt(d_k)),
    }
    if d_model != d_k:
        v["scaled the scores by 1/sqrt(d_model); the scale uses the width of queries and keys, 1/sqrt(d_k)"] = _dict(
            scale=1 / math.sqrt(d_model)
        )
    if d_v != d_k:
        v["scaled the scores by 1/sqrt(d_v); the scale uses the width of queries and keys, 1/sqrt(d_k)"] = _dict(
            scale=1 / math.sqrt(d_v)
        )
    v.update(
        {
            "took the softmax over the query axis (dim=1 or dim=-2); each query's weights over the keys must sum to 1, so "
            "normalise over the last axis (dim=-1)": _dict(scale=s, axis=-2),
            "took the softmax over the batch axis (dim=0); normalise each query's scores over the keys (dim=-1)": _dict(
                scale=s, axis=0
            ),
            "swapped the roles of queries and keys (scores = K Q^T, so weights[b, i, j] pairs key i with query j)": _dict(
                scale=s, transpose_scores=True
            ),
            "used W_q for both the queries and the keys; the keys come from W_k": _dict(scale=s, k_from="q"),
            "used W_k for both the queries and the keys; the queries come from W_q": _dict(scale=s, q_from="k"),
            "used x itself as the values (no W_v); the values are W_v(x)": _dict(scale=s, v_from="x"),
            "used x itself as the queries and keys (no W_q, W_k)": _dict(scale=s, q_from="x", k_from="x"),
            "ignored the biases of W_q, W_k, W_v (call the nn.Linear modules, or add .bias)": _dict(scale=s, use_bias=False),
        }
    )
    if mask is not None:
        v.update(
            {
                "inverted mask: True means the query MAY attend to that key (PyTorch's convention, chapter 2), so fill the "
                "scores where the mask is False": _dict(scale=s, invert=True),
                "inverted mask (and NaN where all keys are masked): True means the query MAY attend to that key": _dict(
                    scale=s, invert=True, full_rows="nan"
                ),
                "applied the mask after the softmax (zeroing weights without renormalising); mask the scores before it": _dict(
                    scale=s, after=True
                ),
                "filled masked scores with 0 instead of -inf, so masked keys still get weight": _dict(
                    scale=s, fill=0.0, full_rows="keep"
                ),
                "a query whose keys are all masked got uniform weights (a finite fill such as -1e9 makes softmax spread the "
                "weight evenly); it should get zero weights and a zero output": _dict(scale=s, fill=-1e9, full_rows="keep"),
                "took the softmax over the query axis (dim=-2) of the masked scores; normalise over the keys (dim=-1)": _dict(
                    scale=s, axis=-2, full_rows="nan"
                ),
            }
        )
    return v


def _build(cls, d_model: int, d_k, d_v, bias) -> tuple[nn.Module, str, int, int]:
    """Construct the student's module and check its W_q, W_k, W_v; returns (module, call text, d_k, d_v)."""
    args = [f"{d_model}"]
    kwargs = {}
    for name, val in (("d_k", d_k), ("d_v", d_v), ("bias", bias)):
        if val is not None:
            kwargs[name] = val
            args.append(f"{name}={val}")
    ctor = f"SelfAttention({', '.join(args)})"
    module = call(cls, d_model, label=ctor, **kwargs)
    if not T._isinstance(module, _Module):
        raise CheckFailure(f"{ctor}: should create an nn.Module, got {T.type_name(module)}. Subclass nn.Module.")
    dk = d_model if d_k is None else d_k
    dv = d_model if d_v is None else d_v
    has_bias = bool(bias)
    registered = parameter_names(module)
    for attr, out_dim, dim_name in (("W_q", dk, "d_k"), ("W_k", dk, "d_k"), ("W_v", dv, "d_v")):
        try:
            lin = _getattr(module, attr)
        except _AttributeError:
            raise CheckFailure(
                f"{ctor}: the module has no attribute `{attr}`; create self.{attr} = nn.Linear(...) in __init__."
            ) from None
        except _Exception as exc:  # noqa: BLE001
            raise CheckFailure(f"{ctor}: reading `{attr}` raised {T.type_name(exc)}: {exc}") from None
        want = f"nn.Linear({d_model}, {out_dim}, bias={has_bias})"
        if not T._isinstance(lin, _Linear):
            raise CheckFailure(f"{ctor}: `{attr}` should be {want}, got {T.type_name(lin)}.")
        shape = T._tuple(lin.weight.shape)
        if shape != (out_dim, d_model):
            hint = ""
            if shape == (d_model, out_dim):
                hint = " You swapped in_features and out_features: nn.Linear(in_features, out_features) maps d_model to d."
            elif attr == "W_v" and d_v is None and shape == (dk, d_model):
                hint = " d_v defaults to d_model (not to d_k) when it is not given."
            elif (d_k is None and attr != "W_v") or (d_v is None and attr == "W_v"):
                hint = f" {dim_name} defaults to d_model when it is not given."
            raise CheckFailure(
                f"{ctor}: `{attr}` should be {want}, whose weight has shape ({out_dim}, {d_model}); got weight shape {shape}.{hint}"
            )
        if has_bias and lin.bias is None:
            raise CheckFailure(f"{ctor}: `{attr}` has no bias, but bias=True was asked for: pass bias=bias to nn.Linear.")
        if not has_bias and lin.bias is not None:
            raise CheckFailure(
                f"{ctor}: `{attr}` has a bias, but bias=False (the default) was asked for: pass bias=bias to nn.Linear "
                "(nn.Linear's own default is bias=True)."
            )
        if f"{attr}.weight" not in registered:
            raise CheckFailure(
                f"{ctor}: `{attr}` is not registered as a submodule; assign it as self.{attr} after super().__init__()."
            )
    return module, ctor, dk, dv


def _load(module: nn.Module, P: _Params, dtype) -> None:
    """Copy the check's weights into the student's projections, converting the module to ``dtype``."""
    if dtype == _float64:
        module_to(module, _float64)
    values = {}
    for attr, W, b in (("W_q", P.Wq, P.bq), ("W_k", P.Wk, P.bk), ("W_v", P.Wv, P.bv)):
        values[f"{attr}.weight"] = _t_from_numpy(W.astype(np.float64))
        if b is not None:
            values[f"{attr}.bias"] = _t_from_numpy(b.astype(np.float64))
    set_parameters(module, values)


def _unpack(result, label: str):
    if T._type(result) is not T._tuple or T._len(result) != 2:
        raise CheckFailure(f"{label}: forward should return a tuple (out, weights), got {T.type_name(result)}.")
    out, w = result
    for what, t in (("output", out), ("weights", w)):
        if not T.is_tensor(t):
            raise CheckFailure(f"{label}: the {what} should be a torch.Tensor, got {T.type_name(t)}.")
    return out, w


def _describe_mask(mask: np.ndarray | None) -> str:
    if mask is None:
        return ""
    full = ~mask.any(axis=-1)
    extra = " (some queries have every key masked)" if full.any() else ""
    return f", bool mask of shape {T._tuple(mask.shape)}{extra}"


def _sa_case(
    cls,
    *,
    B: int,
    L: int,
    d_model: int,
    d_k=None,
    d_v=None,
    bias=None,
    dtype: str = "float32",
    mask=None,
    x_scale: float = 1.0,
    gain: float = 1.5,
    seed: int = 0,
    note: str = "",
) -> tuple:
    """Run one case; returns (module, x tensor, P, dk, dv) for further checks."""
    module, ctor, dk, dv = _build(cls, d_model, d_k, d_v, bias)
    rng = T.default_rng(seed)
    np_dtype = T.np_float32 if dtype == "float32" else np.float64
    P = _Params(rng, d_model, dk, dv, bool(bias), gain, np_dtype)
    _load(module, P, _float32 if dtype == "float32" else _float64)
    x = (rng.normal(size=(B, L, d_model)) * x_scale).astype(np_dtype)
    x64 = x.astype(np.float64)
    label = f"{ctor} with weights set by the check, called on x of shape {(B, L, d_model)} ({dtype}){_describe_mask(mask)}{note}"
    x_t = _t_from_numpy(x.copy())
    if mask is None:
        result = call(module, x_t, label=label)
    else:
        result = call(module, x_t, mask=_t_from_numpy(mask.copy()), label=label)
    out_t, w_t = _unpack(result, label)
    want_dtype = _float32 if dtype == "float32" else _float64
    if out_t.dtype != want_dtype or w_t.dtype != want_dtype:
        raise CheckFailure(f"{label}: out and weights should be {want_dtype} like x, got {out_t.dtype} and {w_t.dtype}.")
    out, w = T.tensor_to_float64(out_t), T.tensor_to_float64(w_t)
    exp_out, exp_w = _sa64(x64, P, mask, scale=1 / math.sqrt(dk))
    if T._tuple(w.shape) != T._tuple(exp_w.shape):
        raise CheckFailure(
            f"{label}: the weights should have shape (B, L, L) = {T._tuple(exp_w.shape)}, got {T._tuple(w.shape)}."
        )
    if T._tuple(out.shape) != T._tuple(exp_out.shape):
        hint = ""
        if out.shape[-1:] == (d_model,) and dv != d_model:
            hint = " Its last dimension is d_model: you used x itself as the values; the values are W_v(x), of width d_v."
        raise CheckFailure(
            f"{label}: the output should have shape (B, L, d_v) = {T._tuple(exp_out.shape)}, got {T._tuple(out.shape)}.{hint}"
        )
    atol = 3e-5 if dtype == "float32" else 1e-9
    _check_nan_rows(label, w, out, mask, exp_w)
    variants = _sa_variants(x64, P, mask, d_model, dk, dv)
    prints_w = {k: (lambda kw=kw: _sa64(x64, P, mask, **kw)[1]) for k, kw in variants.items()}
    prints_o = {k: (lambda kw=kw: _sa64(x64, P, mask, **kw)[0]) for k, kw in variants.items()}
    try:
        expect_close(w, exp_w, label=label, what="weight matrix", atol=atol, rtol=atol, fingerprints=prints_w)
        expect_close(out, exp_out, label=label, what="output", atol=atol, rtol=atol, fingerprints=prints_o)
    except CheckFailure as failure:
        message = str(failure)
        if "Likely mistake" not in message:
            message += _extra_diagnosis(module, x, w, out, mask, label)
        raise CheckFailure(message) from None
    if not T.np_array_equal(T.tensor_to_float64(x_t), x64):
        raise CheckFailure(f"{label}: forward changed its input x in place; work on new tensors.")
    return module, x_t, P, dk, dv


def _extra_diagnosis(module: nn.Module, x: np.ndarray, w: np.ndarray, out: np.ndarray, mask, label: str) -> str:
    """Hints for failures no fingerprint explains: overflow, or a layer that is not permutation-equivariant."""
    if not (T.np_isfinite(w).all() and T.np_isfinite(out).all()):
        return (
            "\n  Likely mistake: exp overflowed on large scores; use torch.softmax (or subtract each row's maximum "
            "before exponentiating)."
        )
    if mask is not None or x.shape[1] < 2:
        return ""
    perm = T.np_arange(x.shape[1])[::-1].copy()
    try:
        out2, w2 = _unpack(call(module, _t_from_numpy(x[:, perm].copy()), label=label), label)
        out2, w2 = T.tensor_to_float64(out2), T.tensor_to_float64(w2)
        if max_error(out2, out[:, perm]) > 1e-4 or max_error(w2, w[:, perm][:, :, perm]) > 1e-4:
            return (
                "\n  Likely mistake: the module is not permutation-equivariant (reversing the rows of x does not reverse "
                "the output rows); position information belongs to the input (x + PE), not inside the layer."
            )
    except _Exception:  # noqa: BLE001  (the hint is optional; CheckFailure is an Exception too)
        pass
    return ""


def _check_nan_rows(label: str, w: np.ndarray, out: np.ndarray, mask, exp_w: np.ndarray) -> None:
    """A fully masked query row must give zeros, not NaN (softmax of all -inf is 0/0)."""
    if mask is None:
        return
    full = ~_np_broadcast_to(mask, exp_w.shape).any(axis=-1)  # (B, L)
    if not full.any():
        return
    nan_rows = T.np_isnan(w).any(axis=-1) | T.np_isnan(out).any(axis=-1)
    if (nan_rows & full).any():
        b, i = (int(a[0]) for a in T.np_where(nan_rows & full))
        raise CheckFailure(
            f"{label}: query {i} of batch {b} has every key masked, and its weights came back as NaN: {show(w[b, i])}.\n"
            "  Likely mistake: NaN on a fully masked row. softmax of a row that is all -inf is 0/0 = NaN; a query that may "
            "attend to nothing should get zero weights and a zero output (e.g. zero the masked weights after the softmax)."
        )


def _check_equivariance(cls, *, B: int, L: int, d_model: int, seed: int, dtype: str = "float64") -> None:
    """Permuting the rows of x must permute the rows of the output, and rows and columns of the weights."""
    module, ctor, dk, dv = _build(cls, d_model, None, None, None)
    rng = T.default_rng(seed)
    P = _Params(rng, d_model, dk, dv, False, 1.5, np.float64)
    _load(module, P, _float64)
    x = rng.normal(size=(B, L, d_model))
    perm = rng.permutation(L)
    while (perm == T.np_arange(L)).all():
        perm = rng.permutation(L)
    label = f"{ctor} on x of shape {(B, L, d_model)} and on x[:, perm] with perm = {perm.tolist()}"
    out1, w1 = _unpack(call(module, _t_from_numpy(x.copy()), label=label), label)
    out2, w2 = _unpack(call(module, _t_from_numpy(x[:, perm].copy()), label=label), label)
    out1, w1, out2, w2 = (T.tensor_to_float64(t) for t in (out1, w1, out2, w2))
    if T._tuple(out1.shape) != (B, L, dv) or T._tuple(w1.shape) != (B, L, L) or out2.shape != out1.shape or w2.shape != w1.shape:
        raise CheckFailure(
            f"{label}: expected out {(B, L, dv)} and weights {(B, L, L)}, got {T._tuple(out1.shape)} and {T._tuple(w1.shape)}."
        )
    err_out = max_error(out2, out1[:, perm])
    err_w = max_error(w2, w1[:, perm][:, :, perm])
    if err_out > 1e-9 or err_w > 1e-9:
        raise CheckFailure(
            f"{label}: self-attention without a mask should be permutation-equivariant: permuting the rows of x permutes "
            f"the output rows the same way (and the weights' rows and columns). Largest error: output {err_out:.3g}, "
            f"weights {err_w:.3g}.\n  Likely mistake: the module is not permutation-equivariant; does it add position "
            "information (positional encodings belong to the input, x + PE, not inside the layer) or mix the batch?"
        )


def _check_gradients(module: nn.Module, x_t, P: _Params, dk: int, label: str, seed: int) -> None:
    """The output must be differentiable with respect to W_q, W_k, W_v, with the right gradients."""
    rng = T.default_rng(seed)
    out = _unpack(call(module, x_t, label=label), label)[0]
    G = _t_from_numpy(rng.normal(size=T._tuple(out.shape)))
    params = [f"{a}.weight" for a in ("W_q", "W_k", "W_v")]
    reply = call(output_gradients, module, x_t, output_index=0, grad_output=G, params=params, label=label)
    if not reply["requires_grad"]:
        raise CheckFailure(
            f"{label}: the output carries no gradient, so W_q, W_k and W_v could never be learned. Likely mistake: a "
            "detach(), .data, torch.no_grad() or a trip through NumPy inside forward."
        )
    got = reply["grads"]
    if T._type(got) is not T._list or T._len(got) != 3 or not all(g is None or T.is_tensor(g) for g in got):
        raise CheckFailure(f"{label}: the gradients came back as {T.type_name(got)}, not three tensors.")
    # float64 autograd oracle built from captured torch functions
    x64 = _t_from_numpy(T.tensor_to_float64(x_t))
    Ws = [_requires_grad_(_t_from_numpy(W.copy())) for W in (P.Wq, P.Wk, P.Wv)]
    q, k, v = (_t_matmul(x64, _t_transpose(W, 0, 1)) for W in Ws)
    w = _t_softmax(_t_mul(_t_matmul(q, _t_transpose(k, -1, -2)), 1 / math.sqrt(dk)), -1)
    want = _autograd_grad(_t_sum(_t_mul(_t_matmul(w, v), G)), Ws)
    for name, g, e in zip(("W_q", "W_k", "W_v"), got, want, strict=True):
        if g is None:
            raise CheckFailure(
                f"{label}: the output does not depend on {name}.weight (no gradient reaches it), so it could never be learned. "
                f"Likely mistake: forward does not use {name}, or cuts the gradient (detach(), .data, torch.no_grad(), NumPy)."
            )
        expect_close(
            T.tensor_to_float64(g),
            T.tensor_to_float64(e),
            label=label,
            what=f"gradient of sum(out * G) with respect to {name}.weight",
            atol=1e-8,
            rtol=1e-8,
        )


def _causal(L: int) -> np.ndarray:
    return T.np_arange(L)[None, :] <= T.np_arange(L)[:, None]


def _padding(lengths, L: int) -> np.ndarray:
    """(B, 1, L): True at the first ``length`` keys of each sequence."""
    return (T.np_arange(L)[None, :] < T.np_asarray(lengths)[:, None])[:, None, :]


def visible_SelfAttention(cls) -> None:
    """Default sizes, d_k != d_v, permutation equivariance, a causal mask, a padding mask with biases."""
    _sa_case(cls, B=2, L=4, d_model=4, note=" (defaults: d_k = d_v = d_model, no bias)")
    _sa_case(cls, B=2, L=5, d_model=6, d_k=4, d_v=3, note=" (d_k != d_v)")
    _check_equivariance(cls, B=2, L=5, d_model=4, seed=1)
    _sa_case(cls, B=2, L=4, d_model=4, mask=_causal(4), seed=2, note=" (causal mask, shared by the batch)")
    _sa_case(cls, B=2, L=5, d_model=6, d_k=4, bias=True, mask=_padding([3, 4], 5), seed=3, note=" (padding mask, biases)")
    passed("SelfAttention", 5)


def hidden_SelfAttention(cls) -> None:
    """Biases, float64, odd sizes, large scores, fully masked rows, default d_v, gradients."""
    _sa_case(cls, B=3, L=7, d_model=5, d_k=3, d_v=2, bias=True, dtype="float64", seed=10, note=" (biases, odd sizes)")
    _sa_case(cls, B=1, L=1, d_model=4, d_k=2, dtype="float64", seed=11, note=" (a single token)")
    _sa_case(cls, B=2, L=6, d_model=8, d_k=4, seed=12, note=" (d_v defaults to d_model)")
    _sa_case(
        cls,
        B=2,
        L=6,
        d_model=8,
        d_k=2,
        d_v=8,
        bias=False,
        dtype="float64",
        x_scale=30.0,
        seed=13,
        note=" (scores in the thousands)",
    )
    rng = T.default_rng(14)
    mask = rng.random((3, 6, 6)) < 0.6
    mask[0, 2] = False
    mask[2, 5] = False
    _sa_case(cls, B=3, L=6, d_model=4, dtype="float64", mask=mask, seed=14, note=" (random mask)")
    _sa_case(
        cls,
        B=3,
        L=5,
        d_model=6,
        d_k=4,
        d_v=6,
        mask=_padding([5, 0, 2], 5),
        seed=15,
        note=" (a sequence with no real token: every key masked)",
    )
    _sa_case(
        cls, B=2, L=5, d_model=4, dtype="float64", mask=_causal(5)[None], bias=True, seed=16, note=" (causal mask (1, L, L))"
    )
    _check_equivariance(cls, B=3, L=9, d_model=6, seed=17)
    module, x_t, P, dk, _ = _sa_case(cls, B=2, L=5, d_model=6, d_k=4, d_v=3, dtype="float64", seed=18, note=" (gradients)")
    _check_gradients(module, x_t, P, dk, "SelfAttention(6, d_k=4, d_v=3) backward through sum(out * G)", seed=19)
    passed("SelfAttention", 9, hidden=True)


# {exercise: (visible points, hidden points)}, in the order the exercises appear.
POINTS = {
    "SelfAttention": (3, 3),
    "sinusoidal_positional_encoding": (2, 2),
}
