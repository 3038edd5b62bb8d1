"""Mutants of chapter 1: wrong softmax, attend and dot_product_attention."""

from autograder.mutants import Mutant

MUTANTS = [
    Mutant(
        "softmax",
        "no_max_shift",
        "overflow",
        """
        def softmax(x, axis=-1):
            e = np.exp(x)
            return e / e.sum(axis=axis, keepdims=True)
    """,
    ),
    Mutant(
        "softmax",
        "axis_ignored",
        "axis",
        """
        def softmax(x, axis=-1):
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)
    """,
    ),
    Mutant(
        "softmax",
        "sum_normalised",
        "divided the raw scores by their sum",
        """
        def softmax(x, axis=-1):
            return x / x.sum(axis=axis, keepdims=True)
    """,
    ),
    Mutant(
        "softmax",
        "no_keepdims_axis0",
        "axis",
        """
        def softmax(x, axis=-1):
            e = np.exp(x - np.max(x))
            return e / e.sum(axis=0)
    """,
    ),
    Mutant(
        "softmax",
        "not_normalised",
        "do not add up to 1",
        """
        def softmax(x, axis=-1):
            return np.exp(x - x.max(axis=axis, keepdims=True))
    """,
    ),
    Mutant(
        "attend",
        "scaled",
        "1/sqrt(d)",
        """
        def attend(query, keys, values):
            weights = softmax(keys @ query / np.sqrt(query.shape[-1]))
            return weights @ values, weights
    """,
    ),
    Mutant(
        "attend",
        "no_softmax",
        "without a softmax",
        """
        def attend(query, keys, values):
            weights = keys @ query
            return weights @ values, weights
    """,
    ),
    Mutant(
        "attend",
        "swapped_outputs",
        "wrong order",
        """
        def attend(query, keys, values):
            weights = softmax(keys @ query)
            return weights, weights @ values
    """,
    ),
    Mutant(
        "attend",
        "values_as_keys",
        "values instead of the keys",
        """
        def attend(query, keys, values):
            weights = softmax(values @ query)
            return weights @ values, weights
    """,
    ),
    Mutant(
        "dot_product_attention",
        "softmax_over_queries",
        "over the queries",
        """
        def dot_product_attention(queries, keys, values):
            weights = softmax(queries @ keys.T, axis=0)
            return weights @ values, weights
    """,
    ),
    Mutant(
        "dot_product_attention",
        "loop_over_queries",
        "vectorised",
        """
        def dot_product_attention(queries, keys, values):
            outs, weights = zip(*[attend(q, keys, values) for q in queries])
            return np.stack(outs), np.stack(weights)
    """,
    ),
    Mutant(
        "dot_product_attention",
        "scaled",
        "1/sqrt(d)",
        """
        def dot_product_attention(queries, keys, values):
            weights = softmax(queries @ keys.T / np.sqrt(queries.shape[-1]))
            return weights @ values, weights
    """,
    ),
    Mutant(
        "dot_product_attention",
        "transposed_weights",
        "transpose",
        """
        def dot_product_attention(queries, keys, values):
            weights = softmax(queries @ keys.T)
            return weights @ values, weights.T
    """,
    ),
]
