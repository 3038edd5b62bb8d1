"""Chapter 1: attention as a soft lookup (NumPy)."""

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax of ``x`` along ``axis``.

    Stable for entries as large as 1e4 in magnitude; entries equal to ``-inf``
    get weight exactly 0. Returns an array of the same shape as ``x``.
    """
    ### BEGIN SOLUTION
    x = np.asarray(x, dtype=np.result_type(x, np.float32))
    shift = np.max(x, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(shift), shift, 0.0)
    e = np.exp(x - shift)
    return e / np.sum(e, axis=axis, keepdims=True)
    ### END SOLUTION


def attend(
    query: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Soft lookup of one query.

    query (d,), keys (n, d), values (n, d_v) -> (output (d_v,), weights (n,)),
    with unscaled scores ``keys @ query`` turned into weights by ``softmax``.
    """
    ### BEGIN SOLUTION
    scores = keys @ query
    weights = softmax(scores)
    return weights @ values, weights
    ### END SOLUTION


def dot_product_attention(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Soft lookup of many queries at once, without a Python loop.

    queries (m, d), keys (n, d), values (n, d_v) -> (output (m, d_v), weights (m, n)).
    Row i of the result equals ``attend(queries[i], keys, values)``.
    """
    ### BEGIN SOLUTION
    scores = queries @ keys.T
    weights = softmax(scores, axis=-1)
    return weights @ values, weights
    ### END SOLUTION
