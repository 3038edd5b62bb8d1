"""Checks for chapter 1, attention as a soft lookup (NumPy).

Oracles are float64 PyTorch (``torch.softmax``) where torch is installed, else a float64
NumPy softmax (max-shifted, all ``-inf`` slices to zeros), and plain float64 matrix products,
computed here on copies of the inputs, never taken from ``solutions/``. Chapter 1 needs NumPy
alone.
"""

from __future__ import annotations

import numpy as np

from autograder.checks import trusted as T
from autograder.checks.common import CheckFailure, call, expect_close, expect_shape, loops_in, passed, sibling, to_float64

ATOL = 1e-6


def _softmax64(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = T.np_array(x, dtype=T.np_float64)
    if T.Tensor is not None:
        return T.tensor_to_float64(T.torch_softmax(T.torch_from_numpy(x), dim=axis))
    with T.np_errstate(invalid="ignore", over="ignore"):
        m = T.np_max(x, axis=axis, keepdims=True)
        m = T.np_where(T.np_isfinite(m), m, 0.0)
        e = T.np_exp(x - m)
        total = e.sum(axis=axis, keepdims=True)
        return e / total


def _softmax_fingerprints(x: np.ndarray, axis: int) -> dict:
    x = np.asarray(x, dtype=np.float64)
    other_axes = [a for a in range(x.ndim) if a != axis % x.ndim]
    prints = {
        f"normalised over axis {a} instead of axis={axis}: pass `axis` to max and sum, with keepdims=True": (
            lambda a=a: _softmax64(x, a)
        )
        for a in other_axes
    }
    prints.update(
        {
            "divided the raw scores by their sum; softmax exponentiates first: exp(x) / sum(exp(x))": lambda: (
                x / x.sum(axis=axis, keepdims=True)
            ),
            "returned exp(x) without dividing by the sum, so the weights do not add up to 1": lambda: np.exp(
                x - x.max(axis=axis, keepdims=True)
            ),
            "returned the log-softmax (x - logsumexp) instead of the softmax": lambda: np.log(_softmax64(x, axis)),
            "the sum was taken over the whole array instead of along `axis`": lambda: (
                np.exp(x - x.max()) / np.exp(x - x.max()).sum()
            ),
        }
    )
    return prints


def _check_softmax_case(softmax, x: np.ndarray, axis: int, note: str = "") -> None:
    given = np.array(x, copy=True)
    label = f"softmax(x, axis={axis}) with x of shape {x.shape}{note}"
    result = call(softmax, given, axis=axis, label=label)
    actual = to_float64(result, label=label, allow_tensor=False)
    expected = _softmax64(x, axis)
    if not np.isfinite(actual).all() and np.isfinite(expected).all() and np.abs(x[np.isfinite(x)]).max(initial=0) > 500:
        raise CheckFailure(
            f"{label}: got NaN or inf for inputs as large as {np.abs(x[np.isfinite(x)]).max():.0f}.\n"
            "  Likely mistake: exp overflowed. Subtract the maximum along `axis` before exponentiating "
            "(softmax(x) = softmax(x - max(x)))."
        )
    expect_close(actual, expected, label=label, atol=ATOL, fingerprints=_softmax_fingerprints(x, axis))
    if not np.array_equal(given, x, equal_nan=True):
        raise CheckFailure(f"{label}: your function changed its input array in place; work on a copy.")


def visible_softmax(softmax) -> None:
    """A vector, a batch of rows, and the other axis."""
    _check_softmax_case(softmax, np.array([1.0, 2.0, 3.0]), -1)
    _check_softmax_case(softmax, np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]), -1)
    _check_softmax_case(softmax, np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 1.0]]), 0)
    _check_softmax_case(softmax, np.array([10.0, -np.inf, 10.0]), -1, " containing -inf")
    _check_softmax_case(softmax, np.array([[1000.0, 999.0, -1000.0], [-800.0, -801.0, -803.0]]), -1, " and large scores")
    passed("softmax", 5)


def hidden_softmax(softmax, seed: int = 1) -> None:
    """Huge logits, -inf entries, three dimensions, odd sizes."""
    rng = np.random.default_rng(seed)
    _check_softmax_case(softmax, np.array([1e4, 1e4 - 1.0, -1e4]), -1, " and entries of size 1e4")
    _check_softmax_case(softmax, np.array([[-1e4, -1e4 + 2.0], [1000.0, 999.0]]), -1, " and entries of size 1e4")
    _check_softmax_case(softmax, rng.normal(size=(3, 5, 7)) * 4, 1)
    _check_softmax_case(softmax, rng.normal(size=(4, 3)), 0)
    x = rng.normal(size=(2, 6))
    x[0, [1, 4]] = -np.inf
    x[1, 0] = -np.inf
    _check_softmax_case(softmax, x, -1, " containing -inf")
    _check_softmax_case(softmax, np.array([7.0]), 0, " of one element")
    _check_softmax_case(softmax, rng.normal(size=(5, 1, 3)), -2, " of size 1 along axis")
    passed("softmax", 7, hidden=True)


def _attention64(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = _softmax64(q @ k.T, -1)
    return w @ v, w


def _attention_fingerprints(q, k, v, which: str) -> dict:
    """Wrong outputs (which='out') or weights (which='w') of common mistakes; q is (m, d)."""
    d = q.shape[-1]
    s = q @ k.T
    idx = 0 if which == "out" else 1
    prints = {
        "scaled the scores by 1/sqrt(d); chapter 1 uses unscaled scores q·k (scaling comes in chapter 2)": lambda: _pick(
            _softmax64(s / np.sqrt(d), -1), v, idx
        ),
        "scaled the scores by 1/d; chapter 1 uses unscaled scores q·k": lambda: _pick(_softmax64(s / d, -1), v, idx),
        "used the raw scores as weights without a softmax": lambda: _pick(s, v, idx),
        "normalised the scores by their sum instead of a softmax": lambda: _pick(s / s.sum(-1, keepdims=True), v, idx),
        "took the softmax over the queries (axis 0) instead of over the keys (the last axis)": lambda: _pick(
            _softmax64(s, 0), v, idx
        ),
        "compared the query with the values instead of the keys": lambda: _pick(_softmax64(q @ v.T, -1), v, idx),
    }
    return prints


def _pick(w: np.ndarray, v: np.ndarray, idx: int) -> np.ndarray:
    return (w @ v) if idx == 0 else w


def _unpack_pair(result, *, label: str, names: tuple[str, str]) -> tuple:
    if T._type(result) is not T._tuple or T._len(result) != 2:
        raise CheckFailure(
            f"{label}: should return a tuple ({names[0]}, {names[1]}), got {T.type_name(result)}"
            + (f" of length {T._len(result)}" if T._type(result) in (tuple, list) else "")
            + "."
        )
    return result


def _blame_softmax(label: str, actual: np.ndarray, expected: np.ndarray, scores: np.ndarray, who: str) -> None:
    """When ``actual`` has NaN or inf where the answer is finite, and the student's own softmax (exercise 1) gives
    NaN or inf on these scores, say that the failure comes from softmax."""
    if T.np_isfinite(actual).all() or not T.np_isfinite(expected).all():
        return
    softmax = sibling("softmax")
    if softmax is None:
        return
    try:
        weights = to_float64(
            call(softmax, np.array(scores, copy=True), axis=-1, label="softmax"), label="softmax", allow_tensor=False
        )
    except CheckFailure:
        return
    if not T.np_isfinite(weights).all():
        raise CheckFailure(
            f"{label}: the result contains NaN or inf, and it comes from your softmax (exercise 1): on these scores "
            f"(as large as {float(T.np_max(T.np_abs(scores))):.0f}) softmax returns NaN or inf, and {who} uses it.\n"
            "  Likely mistake: softmax is not stable for large scores. Fix it first: subtract the maximum along `axis` "
            "before exponentiating; its visible test has a case with large scores."
        )


def _check_attend_case(attend, q, k, v, note: str = "") -> None:
    label = f"attend(query, keys, values) with query {q.shape}, keys {k.shape}, values {v.shape}{note}"
    args = [np.array(a, copy=True) for a in (q, k, v)]
    out, w = _unpack_pair(call(attend, *args, label=label), label=label, names=("output", "weights"))
    out = to_float64(out, label=label, what="output", allow_tensor=False)
    w = to_float64(w, label=label, what="weights", allow_tensor=False)
    exp_out, exp_w = _attention64(q[None, :], k, v)
    if out.shape == exp_w[0].shape and w.shape == exp_out[0].shape and out.shape != w.shape:
        raise CheckFailure(f"{label}: the tuple is in the wrong order; return (output, weights).")
    if w.shape == exp_w[0].shape:
        _blame_softmax(label, w, exp_w[0], (q[None, :] @ k.T)[0], "attend")
    expect_close(
        w,
        exp_w[0],
        label=label,
        what="weights",
        atol=ATOL,
        fingerprints={m: (lambda f=f: f()[0]) for m, f in _attention_fingerprints(q[None, :], k, v, "w").items()},
    )
    expect_close(
        out,
        exp_out[0],
        label=label,
        what="output",
        atol=ATOL,
        fingerprints={m: (lambda f=f: f()[0]) for m, f in _attention_fingerprints(q[None, :], k, v, "out").items()},
    )


def visible_attend(attend) -> None:
    """The worked example of the chapter and a small random case."""
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    values = np.array([[10.0, 0.0], [0.0, 10.0], [5.0, 5.0]])
    _check_attend_case(attend, np.array([1.0, 0.0]), keys, values, " (the worked example)")
    rng = np.random.default_rng(0)
    _check_attend_case(attend, rng.normal(size=3), rng.normal(size=(4, 3)), rng.normal(size=(4, 2)))
    passed("attend", 2)


def hidden_attend(attend, seed: int = 2) -> None:
    """d_v != d, one key, large scores, many keys."""
    rng = np.random.default_rng(seed)
    _check_attend_case(attend, rng.normal(size=4), rng.normal(size=(6, 4)), rng.normal(size=(6, 7)), " (d_v != d)")
    _check_attend_case(attend, rng.normal(size=3), rng.normal(size=(1, 3)), rng.normal(size=(1, 5)), " (one key)")
    _check_attend_case(
        attend, rng.normal(size=8) * 30, rng.normal(size=(5, 8)) * 30, rng.normal(size=(5, 2)), " (scores in the thousands)"
    )
    _check_attend_case(attend, rng.normal(size=2), rng.normal(size=(50, 2)), rng.normal(size=(50, 3)), " (50 keys)")
    passed("attend", 4, hidden=True)


def _check_dpa_case(dpa, q, k, v, note: str = "") -> None:
    label = f"dot_product_attention(queries, keys, values) with queries {q.shape}, keys {k.shape}, values {v.shape}{note}"
    args = [np.array(a, copy=True) for a in (q, k, v)]
    out, w = _unpack_pair(call(dpa, *args, label=label), label=label, names=("output", "weights"))
    out = to_float64(out, label=label, what="output", allow_tensor=False)
    w = to_float64(w, label=label, what="weights", allow_tensor=False)
    exp_out, exp_w = _attention64(q, k, v)
    m, n = exp_w.shape
    if w.shape == (n, m) and m != n:
        raise CheckFailure(
            f"{label}: the weights should have shape (m, n) = {(m, n)}, one row per query; got {w.shape}, the transpose."
        )
    if w.shape == exp_w.shape:
        _blame_softmax(label, w, exp_w, q @ k.T, "dot_product_attention")
    expect_close(w, exp_w, label=label, what="weights", atol=ATOL, fingerprints=_attention_fingerprints(q, k, v, "w"))
    expect_shape(out, exp_out.shape, label=label, what="output")
    expect_close(out, exp_out, label=label, what="output", atol=ATOL, fingerprints=_attention_fingerprints(q, k, v, "out"))


def _check_vectorised(dpa) -> None:
    loops = loops_in(dpa)
    if loops:
        raise CheckFailure(
            "dot_product_attention should be vectorised: one matrix product for all queries, no Python loop "
            f"over them. Found {', '.join(loops)}."
        )


def visible_dot_product_attention(dpa) -> None:
    """Matrix form on a small example; must agree row by row with attend."""
    rng = np.random.default_rng(0)
    _check_dpa_case(dpa, rng.normal(size=(2, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 2)))
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    values = np.array([[10.0, 0.0], [0.0, 10.0], [5.0, 5.0]])
    _check_dpa_case(dpa, np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), keys, values, " (the worked example)")
    _check_vectorised(dpa)
    passed("dot_product_attention", 3)


def hidden_dot_product_attention(dpa, seed: int = 3) -> None:
    """m != n, one query, large scores, d_v != d, no loops."""
    rng = np.random.default_rng(seed)
    _check_dpa_case(dpa, rng.normal(size=(5, 4)), rng.normal(size=(3, 4)), rng.normal(size=(3, 6)), " (m != n, d_v != d)")
    _check_dpa_case(dpa, rng.normal(size=(1, 3)), rng.normal(size=(7, 3)), rng.normal(size=(7, 3)), " (one query)")
    _check_dpa_case(
        dpa, rng.normal(size=(4, 16)) * 20, rng.normal(size=(9, 16)) * 20, rng.normal(size=(9, 2)), " (scores in the thousands)"
    )
    _check_dpa_case(dpa, rng.normal(size=(64, 8)), rng.normal(size=(33, 8)), rng.normal(size=(33, 5)), " (64 queries, 33 keys)")
    _check_vectorised(dpa)
    passed("dot_product_attention", 5, hidden=True)


# {exercise: (visible points, hidden points)}, in the order the exercises appear.
POINTS = {
    "softmax": (2, 2),
    "attend": (2, 1),
    "dot_product_attention": (2, 2),
}
