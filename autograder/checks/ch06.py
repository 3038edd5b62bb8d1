"""Checks for chapter 6, decoding with a KV cache and grouped-query attention.

Oracles, all computed here and never taken from ``solutions/``:

* ``KVCache``: the NumPy concatenation of the chunks handed to ``update`` (exact).
* ``decode_step``: causal self-attention over the whole prefix written out in float64 NumPy,
  fed with the parameters of a real ``nn.MultiheadAttention``; the hidden check also runs that
  ``nn.MultiheadAttention`` (float64, causal mask) and requires the two to agree. The step gets
  the checks' own :class:`ReferenceKVCache`, which records every ``update``, so grading of
  ``decode_step`` does not depend on the student's ``KVCache``.
* ``GroupedQueryAttention``: float64 NumPy with the ``repeat_interleave`` convention (query head h
  uses key/value head h // (H / KV)); ``tests/test_ch06.py`` proves it equals
  ``F.scaled_dot_product_attention(..., enable_gqa=True)``.
* ``kv_cache_bytes``: exact integer arithmetic, bytes per element from a tensor of that dtype.

Wrong answers are compared with the outputs of known mistakes (variants of the oracles) to name
them. Everything a student cell could rebind is captured when this module is imported, which the
chapter's setup cell does before any student code runs.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap

import numpy as np
import torch

from autograder.checks import torch_refs as R
from autograder.checks import trusted as T
from autograder.checks.common import CheckFailure, call, diagnose, is_or_are, max_error, passed, show, source_tree
from autograder.checks.objects import new_object, watched_call
from autograder.checks.torch_refs import BF16, BOOL, F8, F16, F32, F64, I8
from autograder.grading.remote import is_remote

# ---------------------------------------------------------------------------------------------
# References captured at import time (a student cell may rebind torch or numpy attributes).
# Those most chapters share are in torch_refs (R.dtype_of, R.MHA, ...) and trusted (T.np_where, ...).
_cat = torch.cat
_torch_dtype = torch.dtype

_re_search = re.search
_np_repeat = np.repeat
_np_tile = np.tile
_int = int
_float = float
_bool = bool
_str = str
_sum = sum
_range = range
_enumerate = enumerate
_isinstance = isinstance
_hasattr = hasattr
_getattr = getattr
_vars = vars
_TorchFunctionMode = torch.overrides.TorchFunctionMode
_sdpa_fn = torch.nn.functional.scaled_dot_product_attention
_shape_of = R.shape_of

DIM_NAMES = {0: "batch", 1: "heads", 2: "time", 3: "head_dim"}


# ---------------------------------------------------------------------------------------------
# Small helpers


def _as_result(result, *, label: str, what: str, dtype) -> np.ndarray:
    """A float64 copy of an exact ``torch.Tensor`` result of the expected dtype."""
    if not T.is_tensor(result):
        raise CheckFailure(f"{label}: the {what} should be a torch.Tensor, got {T.type_name(result)}.")
    if dtype is not None and R.dtype_of(result) != dtype:
        raise CheckFailure(
            f"{label}: the {what} should keep the input's dtype {R.dname(dtype)}, got {R.dname(R.dtype_of(result))}."
        )
    return T.tensor_to_float64(result)


def _pair(result, *, label: str, names: str) -> tuple:
    if T._type(result) is not T._tuple or T._len(result) != 2:
        extra = f" of length {T._len(result)}" if T._type(result) in (tuple, list) else ""
        raise CheckFailure(f"{label}: should return a tuple ({names}), got {T.type_name(result)}{extra}.")
    return result


def _fail(
    label: str, what: str, actual: np.ndarray, expected: np.ndarray, atol: float, mistakes: list[str], extra: str = ""
) -> None:
    lines = [f"{label}: the {what} {is_or_are(what)} wrong."]
    if T._tuple(actual.shape) != T._tuple(expected.shape):
        lines[0] = f"{label}: the {what} should have shape {T._tuple(expected.shape)}, got {T._tuple(actual.shape)}."
    else:
        lines[0] = (
            f"{label}: the {what} {is_or_are(what)} wrong (largest error {max_error(actual, expected):.3g}, tolerance {atol:.1g})."
        )
    lines += [f"  expected: {show(expected)}", f"  got:      {show(actual)}"]
    if not T.np_isfinite(actual).all() and T.np_isfinite(expected).all():
        lines.append("  Your result contains NaN or inf where the correct one is finite.")
    for mistake in mistakes:
        lines.append(f"  Likely mistake: {mistake}")
    if extra:
        lines.append(extra)
    raise CheckFailure("\n".join(lines))


def _expect(
    actual: np.ndarray, expected: np.ndarray, *, label: str, what: str, atol: float, fingerprints: dict, extra: str = ""
) -> None:
    """Like ``expect_close``, but a shape mismatch is diagnosed too (a cache of the wrong length has a known cause)."""
    if T._tuple(actual.shape) == T._tuple(expected.shape) and max_error(actual, expected) <= atol:
        return
    mistake = diagnose(actual, fingerprints, atol=max(atol, 1e-12))
    _fail(label, what, actual, expected, atol, [mistake] if mistake else [], extra)


def _forbidden(cls_or_fn, names: set[str]) -> list[str]:
    """Uses of ``names`` (as identifiers, attributes or keywords) in the source of a function or a class's methods
    (for an object in the student's kernel: in its cell as the grader read it from the notebook)."""
    if is_remote(cls_or_fn):
        tree = source_tree(cls_or_fn)
        body = tree.body if isinstance(tree, (ast.ClassDef, ast.Module)) else [tree] if tree is not None else []
        trees = [(n.name, n) for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        trees = [(m.name, m) for _, n in trees for m in (n.body if isinstance(n, ast.ClassDef) else [n])]
    else:
        fns = [cls_or_fn] if inspect.isfunction(cls_or_fn) else [f for f in _vars(cls_or_fn).values() if inspect.isfunction(f)]
        trees = []
        for fn in fns:
            try:
                trees.append((fn.__name__, ast.parse(textwrap.dedent(inspect.getsource(fn)))))
            except (OSError, TypeError, SyntaxError):
                continue
    found = []
    for fn_name, tree in trees:
        for node in ast.walk(tree):
            name = None
            if _isinstance(node, ast.Name):
                name = node.id
            elif _isinstance(node, ast.Attribute):
                name = node.attr
            elif _isinstance(node, ast.keyword):
                name = node.arg
            elif _isinstance(node, ast.Constant) and _isinstance(node.value, _str):
                name = node.value  # a keyword spelled as a string: **{"enable_gqa": True}
            if name in names:
                found.append(f"{name} in {fn_name}")
    return found


# ---------------------------------------------------------------------------------------------
# KVCache
# ---------------------------------------------------------------------------------------------

CACHE_TWICE = (
    "a chunk was appended twice. A common cause: the first chunk is stored *and* then concatenated again "
    "(an `if self.keys is None:` without an `else:`), or update concatenates the new chunk once to store and once to return."
)
CACHE_NOT_STORED = (
    "update returned only the new chunk: the cache does not keep the earlier chunks. Store the concatenation "
    "in the object (self.keys = torch.cat([self.keys, k], dim=2)) and return what is stored."
)
CACHE_OLD = "update returned what the cache held before this chunk: append first, then return everything held."
CACHE_PREPENDED = "put the new chunk before the earlier ones: new tokens go at the end of the time axis."
CACHE_SWAPPED = "returned the values where the keys belong (or the other way round): return (k_all, v_all), in that order."
CACHE_SHARED = (
    "two KVCache objects share their storage. A class attribute (such as `keys = []` in the class body) or a "
    "mutable default argument is shared by every instance: create the storage in __init__ (self.keys = None)."
)


def _cache_axis_mistake(axis: int) -> str:
    return (
        f"concatenated along dim {axis} ({DIM_NAMES[axis]}) instead of the time axis: chunks are (B, H, T, D) and "
        "tokens are appended along dim 2 (torch.cat([..., k], dim=2))."
    )


def _cache_fingerprints(prev: list[np.ndarray], new: np.ndarray, other_expected: np.ndarray) -> dict:
    chunks = prev + [new]
    prints = {}
    for j in _range(T._len(chunks)):
        doubled = chunks[: j + 1] + chunks[j:]
        prints[CACHE_TWICE + f" Here chunk {j + 1} appears twice."] = lambda d=doubled: T.np_concat(d, axis=2)
    prints[CACHE_TWICE + " Here every chunk appears twice."] = lambda: T.np_concat([c for c in chunks for _ in (0, 1)], axis=2)
    if prev:
        prints[CACHE_NOT_STORED] = lambda: new
        prints[CACHE_OLD] = lambda: T.np_concat(prev, axis=2)
        prints[CACHE_PREPENDED] = lambda: T.np_concat([new] + prev, axis=2)
        for axis in (0, 1, 3):
            prints[_cache_axis_mistake(axis)] = lambda a=axis: T.np_concat(chunks, axis=a)
    prints[CACHE_SWAPPED] = lambda: other_expected
    return prints


def _call_update(cache, k, v, label: str):
    """cache.update(k, v); a failed torch.cat along the wrong axis is named."""
    try:
        return call(cache.update, k, v, label=label)
    except CheckFailure as exc:
        text = _str(exc)
        found = _re_search(r"must match except in dimension (-?\d+)", text)
        if found and _int(found.group(1)) % 4 != 2:
            axis = _int(found.group(1)) % 4
            raise CheckFailure(f"{text}\n  Likely mistake: {_cache_axis_mistake(axis)}") from None
        raise


def _len_of(cache, *, label: str) -> int:
    result = call(T._len, cache, label=label)
    return _int(result)


def _cache_len_mistakes(got: int, total: int, calls: int, shape: tuple) -> list[str]:
    found = []
    if got == 0 and total > 0:
        found.append(
            "len(cache) is still 0 after an update: the cache does not keep the earlier chunks (or __len__ does not look "
            "at them). Store what update receives in the object and count the tokens along dim 2."
        )
    if got == calls:
        found.append(
            "len(cache) counts the calls to update (chunks), not the tokens. Chunks may hold several tokens "
            "(a whole prompt at once): return the length of the time axis, dim 2."
        )
    for axis in (0, 1, 3):
        if got == shape[axis] and axis != 2:
            found.append(f"len(cache) returned the size of dim {axis} ({DIM_NAMES[axis]}); the tokens are along dim 2 (time).")
    return found[:1]


def _check_cache_run(cls, rng, b: int, h: int, d: int, sizes: list[int], dtype=F32, note: str = "") -> None:
    """Feed chunks of ``sizes`` tokens into a new cache; after each, check (k_all, v_all) and len."""
    desc = f"chunks of {sizes} tokens, k and v (B, H, T, D) = ({b}, {h}, T, {d}), {R.dname(dtype)}{note}"
    cache = call(cls, label=f"KVCache() [{desc}]")
    empty = _len_of(cache, label=f"len(KVCache()) of a new cache [{desc}]")
    if empty != 0:
        raise CheckFailure(
            f"len(KVCache()) of a new cache should be 0, got {empty!r}."
            + (f"\n  Likely mistake: a brand-new cache already holds tokens: {CACHE_SHARED}" if empty > 0 else "")
        )
    ks, vs = [], []
    for i, t in _enumerate(sizes):
        held = _sum(sizes[:i])
        label = f"cache.update(k, v) #{i + 1}: a chunk of {t} token(s) after {held} held [{desc}]"
        k = R.rounded(rng.normal(size=(b, h, t, d)), dtype)
        v = R.rounded(rng.normal(size=(b, h, t, d)) + 10.0, dtype)  # values far from keys: a swap is visible
        kt, vt = R.tensor_of(k, dtype), R.tensor_of(v, dtype)
        k_before, v_before = R.clone(kt), R.clone(vt)
        k_all, v_all = _pair(_call_update(cache, kt, vt, label), label=label, names="k_all, v_all")
        k_got = _as_result(k_all, label=label, what="k_all", dtype=dtype)
        v_got = _as_result(v_all, label=label, what="v_all", dtype=dtype)
        k_want, v_want = T.np_concat(ks + [k], axis=2), T.np_concat(vs + [v], axis=2)
        _expect(
            k_got, k_want, label=label, what="k_all (every key held)", atol=0.0, fingerprints=_cache_fingerprints(ks, k, v_want)
        )
        _expect(
            v_got, v_want, label=label, what="v_all (every value held)", atol=0.0, fingerprints=_cache_fingerprints(vs, v, k_want)
        )
        if not (R.t_equal(kt, k_before) and R.t_equal(vt, v_before)):
            raise CheckFailure(f"{label}: update changed the chunk it was given in place.")
        ks.append(k)
        vs.append(v)
        got = _len_of(cache, label=f"len(cache) after update #{i + 1} [{desc}]")
        if got != held + t:
            lines = [
                f"len(cache) after {i + 1} update(s) of {sizes[: i + 1]} tokens should be {held + t} (tokens held), got {got}."
            ]
            lines += [f"  Likely mistake: {m}" for m in _cache_len_mistakes(got, held + t, i + 1, (b, h, held + t, d))]
            raise CheckFailure("\n".join(lines))


def _check_cache_independent(cls, rng) -> None:
    """Two caches must not share storage (class attributes, mutable defaults)."""
    label = "two caches: a = KVCache(); b = KVCache(); a.update(k, v) with 3 tokens; then len(b) and b.update(k2, v2)"
    a = call(cls, label=label)
    other = call(cls, label=label)
    for cache in (a, other):
        n = _len_of(cache, label=label)
        if n != 0:
            raise CheckFailure(f"{label}: a new cache should hold 0 tokens, it holds {n}.\n  Likely mistake: {CACHE_SHARED}")
    k = R.rounded(rng.normal(size=(1, 2, 3, 4)), F32)
    _call_update(a, R.tensor_of(k, F32), R.tensor_of(k + 1, F32), label)
    n = _len_of(other, label=label)
    if n != 0:
        raise CheckFailure(f"{label}: len(b) should be 0, got {n}.\n  Likely mistake: {CACHE_SHARED}")
    k2 = R.rounded(rng.normal(size=(1, 2, 1, 4)), F32)
    k_all, _ = _pair(
        _call_update(other, R.tensor_of(k2, F32), R.tensor_of(k2 + 1, F32), label), label=label, names="k_all, v_all"
    )
    got = _as_result(k_all, label=label, what="k_all of b", dtype=F32)
    if T._tuple(got.shape) != (1, 2, 1, 4) or not T.np_array_equal(got, k2):
        raise CheckFailure(
            f"{label}: b.update should return only b's own chunk, shape (1, 2, 1, 4); got shape {T._tuple(got.shape)}.\n"
            f"  Likely mistake: {CACHE_SHARED}"
        )


def visible_KVCache(cls) -> None:
    """An empty cache, a prompt of 5 tokens and two single tokens; single tokens from an empty cache."""
    rng = T.default_rng(60)
    _check_cache_run(cls, rng, 2, 3, 4, [5, 1, 1], note=", a prompt then two tokens")
    _check_cache_run(cls, rng, 1, 2, 3, [1, 1, 1, 1], note=", one token at a time")
    passed("KVCache", 2)


def hidden_KVCache(cls, seed: int = 61) -> None:
    """Independent caches, odd sizes, long runs, chunks of several sizes, float16 and bfloat16."""
    rng = T.default_rng(seed)
    _check_cache_independent(cls, rng)
    _check_cache_run(cls, rng, 3, 5, 7, [2, 1, 4, 1, 3], note=", chunks of several sizes")
    _check_cache_run(cls, rng, 1, 1, 1, [9] + [1] * 20, note=", one head of size 1, 20 decoding steps")
    _check_cache_run(cls, rng, 2, 4, 8, [3, 1, 1], F16, note=", float16")
    _check_cache_run(cls, rng, 2, 2, 6, [1, 2, 1], BF16, note=", bfloat16")
    _check_cache_run(cls, rng, 4, 2, 3, [1, 6], F64, note=", float64")
    passed("KVCache", 6, hidden=True)


# ---------------------------------------------------------------------------------------------
# decode_step: float64 oracle, the checks' own cache, and the mistakes the oracle can imitate
# ---------------------------------------------------------------------------------------------

DECODE_MISTAKES = {
    "top_left": (
        "top-left aligned causal mask: the new token saw only key 0. F.scaled_dot_product_attention(..., is_causal=True) "
        "and torch.ones(L, S).tril() align the mask top-left; with one query and S keys the new token is the LAST "
        "position and may see every key (chapter 2's causal_mask(1, S) is all True)."
    ),
    "only_new": (
        "attended only to the new token: attend over everything in the cache, the (k_all, v_all) that cache.update "
        "returns, not over the new key and value alone."
    ),
    "before_update": "attended over the cache before adding the new token's key and value: a token must also see itself.",
    "no_out_proj": "forgot the output projection: apply mha.out_proj to the merged heads.",
    "scale_E": "scaled the scores by 1/sqrt(embed_dim); each head's scores are dot products of D = E/H features: scale by 1/sqrt(D).",
    "scale_H": "scaled the scores by 1/sqrt(num_heads); the scale is 1/sqrt(head_dim).",
    "no_scale": "did not scale the scores: divide them by sqrt(head_dim).",
    "scale_D": "scaled the scores by 1/head_dim instead of 1/sqrt(head_dim).",
    "softmax_queries": "took the softmax over the queries (dim -2), which with one query gives every key weight 1: use dim=-1.",
    "split_interleaved": "interleaved heads: head h took every H-th feature instead of the block h*D .. (h+1)*D - 1.",
    "qkv_order": "took W_q, W_k, W_v out of in_proj_weight in the wrong order; its rows are W_q, W_k, W_v, in that order.",
    "no_bias": "ignored in_proj_bias: add each projection's bias (it is None only when the layer has bias=False).",
    "kv_swapped": "swapped keys and values: the scores use the keys, the weighted sum uses the values.",
}
CHUNK_MISTAKES = {
    "q": "appended the query to the cache instead of the key.",
    "v": "appended the value where the key belongs (or the other way round): cache.update(k, v).",
    "no_bias": DECODE_MISTAKES["no_bias"],
    "qkv_order": DECODE_MISTAKES["qkv_order"],
    "split_interleaved": DECODE_MISTAKES["split_interleaved"],
}
CACHE_API_HINT = (
    "  decode_step must use the cache only through cache.update(k, v) and len(cache): the tests hand it a cache of their "
    "own (ReferenceKVCache), not your KVCache."
)


def _heads(p: dict, x: np.ndarray, h: int, variant: str = "", dtype=T.np_float64) -> tuple:
    """Per-head queries, keys and values (B, H, N, D) of self-attention on x (B, N, E), or of a mistake."""
    x = T.np_array(x, dtype=dtype)
    b, n, e = x.shape
    d = e // h
    w = T.np_array(p["w_in"], dtype=dtype)
    blocks = [w[:e], w[e : 2 * e], w[2 * e :]]
    if p["b_in"] is None or variant == "no_bias":
        bias = [dtype(0)] * 3
    else:
        bb = T.np_array(p["b_in"], dtype=dtype)
        bias = [bb[:e], bb[e : 2 * e], bb[2 * e :]]
    order = (1, 0, 2) if variant == "qkv_order" else (0, 1, 2)
    proj = [x @ blocks[i].T + bias[i] for i in order]
    if variant == "kv_swapped":
        proj = [proj[0], proj[2], proj[1]]

    def split(a):
        if variant == "split_interleaved":
            return a.reshape(b, n, d, h).transpose(0, 3, 1, 2)
        return a.reshape(b, n, h, d).transpose(0, 2, 1, 3)

    return split(proj[0]), split(proj[1]), split(proj[2])


def _softmax_masked(scores: np.ndarray, allowed: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax with disallowed entries at -inf; a row with nothing allowed gives NaN (as PyTorch's softmax does)."""
    with T.np_errstate(all="ignore"):
        s = T.np_where(allowed, scores, -T.inf)
        top = s.max(axis=axis, keepdims=True)
        ex = T.np_exp(s - top)
        return ex / ex.sum(axis=axis, keepdims=True)


def _causal_oracle(p: dict, x: np.ndarray, h: int, variant: str = "", dtype=T.np_float64) -> np.ndarray:
    """Output (B, N, E) of causal self-attention at every position of x (B, N, E), or of a known mistake."""
    qh, kh, vh = _heads(p, x, h, variant, dtype)
    b, n, e = T._tuple(T.np_asarray(x).shape)
    d = e // h
    scale = {"scale_E": 1 / T.sqrt(e), "scale_H": 1 / T.sqrt(h), "no_scale": 1.0, "scale_D": 1 / d}.get(variant, 1 / T.sqrt(d))
    scores = (qh @ kh.transpose(0, 1, 3, 2)) * dtype(scale)
    i = T.np_arange(n)[:, None]
    j = T.np_arange(n)[None, :]
    allowed = {"top_left": j == 0 + 0 * i, "only_new": j == i, "before_update": j < i}.get(variant, j <= i)
    if variant == "softmax_queries":
        weights = T.np_where(allowed, dtype(1), dtype(0)) * T.np_ones(scores.shape, dtype=dtype)
    else:
        weights = _softmax_masked(scores, allowed)
    merged = (weights @ vh).transpose(0, 2, 1, 3).reshape(b, n, e)
    if variant == "no_out_proj":
        return merged
    out = merged @ T.np_array(p["w_out"], dtype=dtype).T
    if p["b_out"] is not None:
        out = out + T.np_array(p["b_out"], dtype=dtype)
    return out


def _torch_causal_reference(p: dict, x: np.ndarray, h: int, bias: bool) -> np.ndarray:
    """Full causal self-attention over x by PyTorch's own nn.MultiheadAttention, in float64."""
    b, n, e = T._tuple(x.shape)
    ref = R.torch_mha(e, h, bias, p, F64)
    xt = R.tensor_of(x, F64)
    future = R.tensor_of(T.np_triu(T.np_ones((n, n), dtype=T.np_bool), 1), BOOL)  # True = not allowed
    out, _ = R.mha_forward(ref, xt, xt, xt, attn_mask=future, need_weights=False)
    return T.tensor_to_float64(out)


class ReferenceKVCache:
    """The cache the checks hand to ``decode_step``: ``update(k, v)`` and ``len()``, every update recorded."""

    def __init__(self, b: int, h: int, d: int, dtype, label: str):
        self._want = (b, h, d)
        self._dtype = dtype
        self._label = label
        self._k = None
        self._v = None
        self.log: list[tuple[np.ndarray, np.ndarray]] = []

    def _validate(self, name: str, t) -> tuple:
        b, h, d = self._want
        if not T.is_tensor(t):
            raise CheckFailure(
                f"{self._label}: cache.update(k, v) got {T.type_name(t)} for {name}; it takes tensors (B, H, T, D)."
            )
        shape = T._tuple(R.shape_of(t))
        if T._len(shape) == 4 and shape[0] == b and shape[1] == h and shape[3] == d:
            if R.dtype_of(t) != self._dtype:
                raise CheckFailure(
                    f"{self._label}: cache.update got {name} of dtype {R.dname(R.dtype_of(t))}; keep the dtype of x_t "
                    f"({R.dname(self._dtype)})."
                )
            return shape
        e = h * d
        hint = ""
        if shape == (b, 1, h, d) and h != 1:
            hint = "\n  Likely mistake: you reshaped to (B, 1, H, D) but forgot .transpose(1, 2) to bring the heads forward."
        elif shape in ((b, 1, e), (b, e)):
            hint = "\n  Likely mistake: the cache holds keys and values split into heads, (B, H, 1, D), not the (B, 1, E) projection."
        elif shape == (b, h, d):
            hint = "\n  Likely mistake: keep the time axis: one token is (B, H, 1, D)."
        raise CheckFailure(
            f"{self._label}: cache.update(k, v) got {name} of shape {shape}; one token's {name} split into heads "
            f"should be (B, H, 1, D) = {(b, h, 1, d)}.{hint}"
        )

    def update(self, k, v):
        sk, sv = self._validate("k", k), self._validate("v", v)
        if sk != sv:
            raise CheckFailure(f"{self._label}: cache.update(k, v) got k {sk} and v {sv}; they should have the same shape.")
        self.log.append((T.tensor_to_float64(k), T.tensor_to_float64(v)))
        if self._k is None:
            self._k, self._v = R.clone(k), R.clone(v)
        else:
            self._k, self._v = _cat([self._k, k], dim=2), _cat([self._v, v], dim=2)
        return self._k, self._v

    def __len__(self) -> int:
        return 0 if self._k is None else _int(R.shape_of(self._k)[2])

    def clear_log(self) -> None:
        self.log.clear()


def _prefill(cache: ReferenceKVCache, p: dict, x: np.ndarray, h: int, dtype) -> None:
    """Put the keys and values of the prompt x (B, P, E) into ``cache``, as a prefill would."""
    _, kh, vh = _heads(p, x, h)
    cache.update(R.tensor_of(kh, dtype), R.tensor_of(vh, dtype))
    cache.clear_log()


def _step_atol(p: dict, x: np.ndarray, h: int, dtype) -> float:
    if dtype == F64:
        return 1e-9
    err = max_error(T.np_array(_causal_oracle(p, x, h, dtype=T.np_float32), dtype=T.np_float64), _causal_oracle(p, x, h))
    return max(2e-5, 8 * err)


def _run_decode(
    decode_step,
    rng,
    *,
    e: int,
    h: int,
    b: int,
    prompt: int,
    steps: int,
    bias: bool = True,
    dtype=F32,
    scale: float = 1.0,
    torch_reference: bool = False,
    note: str = "",
) -> None:
    """Decode ``steps`` tokens after a prompt of ``prompt`` tokens; compare every step with full causal attention."""
    d = e // h
    p = R.mha_params(rng, e, bias)
    n = prompt + steps
    x = R.rounded(rng.normal(size=(b, n, e), scale=scale), dtype)
    expected = _causal_oracle(p, x, h)
    if torch_reference:
        try:
            by_torch = _torch_causal_reference(p, x, h, bias)
        except Exception:  # noqa: BLE001  (only a notebook that rewrote torch gets here)
            by_torch = expected + T.inf
        if T._tuple(by_torch.shape) != T._tuple(expected.shape) or max_error(by_torch, expected) > 1e-8:
            raise CheckFailure(
                "The reference nn.MultiheadAttention no longer agrees with float64 maths: something in the notebook has "
                "changed torch (for example by assigning to nn.MultiheadAttention.forward or F.multi_head_attention_forward). "
                "Remove that code and restart the kernel."
            )
    _, k_heads, v_heads = _heads(p, x, h)
    chunk_prints = {
        m: (lambda m=m: _heads(p, x, h, "" if m in ("q", "v") else m)[{"q": 0, "v": 2}.get(m, 1)]) for m in CHUNK_MISTAKES
    }
    atol = _step_atol(p, x, h, dtype)
    mha = R.torch_mha(e, h, bias, p, dtype)
    weights_before = R.clone(mha.in_proj_weight)
    where = f"nn.MultiheadAttention({e}, {h}{'' if bias else ', bias=False'}, batch_first=True), B = {b}, {R.dname(dtype)}"
    start = f"a cache prefilled with a {prompt}-token prompt" if prompt else "an empty cache"
    cache = new_object(ReferenceKVCache, b, h, d, dtype, label=f"decode_step [{where}]")
    if prompt:
        _prefill(cache, p, x[:, :prompt], h, dtype)
    fingerprints_cache: dict = {}

    def variant(m: str) -> np.ndarray:
        if m not in fingerprints_cache:
            fingerprints_cache[m] = _causal_oracle(p, x, h, m)
        return fingerprints_cache[m]

    for t in _range(steps):
        pos = prompt + t
        label = (
            f"decode_step(mha, x_t, cache) for the token at position {pos} after {start}, step {t + 1} of {steps} [{where}{note}]"
        )
        cache._label = label
        x_t = R.tensor_of(x[:, pos : pos + 1], dtype)
        x_before = R.clone(x_t)
        calls_before = T._len(cache.log)
        try:
            result = call(decode_step, mha, x_t, cache, label=label)
        except CheckFailure as exc:
            text = _str(exc)
            if "ReferenceKVCache" in text or "has no attribute" in text:
                raise CheckFailure(f"{text}\n{CACHE_API_HINT}") from None
            if "NoneType" in text and not bias:
                raise CheckFailure(
                    f"{text}\n  Likely mistake: with bias=False, mha.in_proj_bias is None: project without a bias then."
                ) from None
            raise
        calls = T._len(cache.log) - calls_before
        if calls == 0:
            raise CheckFailure(
                f"{label}: decode_step did not call cache.update(k, v). The new token's key and value must be appended "
                "to the cache, so that later tokens can attend to it (len(cache) should grow by 1 per step)."
            )
        if calls > 1:
            raise CheckFailure(
                f"{label}: decode_step called cache.update {calls} times in one step, so the new token's key and value "
                f"were appended {calls} times (twice or more); len(cache) should grow by exactly 1 per step."
            )
        k_chunk, v_chunk = cache.log[-1]
        if T._tuple(k_chunk.shape) != (b, h, 1, d):
            raise CheckFailure(
                f"{label}: cache.update got a chunk of {k_chunk.shape[2]} tokens for one new token; append (B, H, 1, D)."
            )
        _expect(
            k_chunk,
            k_heads[:, :, pos : pos + 1],
            label=label,
            what="key appended to the cache (the new token's key, split into heads)",
            atol=atol,
            fingerprints={CHUNK_MISTAKES[m]: (lambda f=f, pos=pos: f()[:, :, pos : pos + 1]) for m, f in chunk_prints.items()},
        )
        _expect(
            v_chunk,
            v_heads[:, :, pos : pos + 1],
            label=label,
            what="value appended to the cache (the new token's value, split into heads)",
            atol=atol,
            fingerprints={
                CHUNK_MISTAKES["v"]: lambda pos=pos: k_heads[:, :, pos : pos + 1],
                CHUNK_MISTAKES["no_bias"]: lambda pos=pos: _heads(p, x, h, "no_bias")[2][:, :, pos : pos + 1],
                CHUNK_MISTAKES["qkv_order"]: lambda pos=pos: _heads(p, x, h, "qkv_order")[2][:, :, pos : pos + 1],
            },
        )
        out = _as_result(result, label=label, what="output", dtype=dtype)
        if T._tuple(out.shape) == (b, e):
            raise CheckFailure(
                f"{label}: the output should have shape (B, 1, E) = {(b, 1, e)}, got {(b, e)}: keep the time axis."
            )
        if T._tuple(out.shape) == (b, h, 1, d):
            raise CheckFailure(
                f"{label}: the output should have shape (B, 1, E) = {(b, 1, e)}, got the per-head output {(b, h, 1, d)}: "
                "merge the heads and apply mha.out_proj."
            )
        _expect(
            out,
            expected[:, pos : pos + 1],
            label=label,
            what="output",
            atol=atol * 4,
            fingerprints={DECODE_MISTAKES[m]: (lambda m=m, pos=pos: variant(m)[:, pos : pos + 1]) for m in DECODE_MISTAKES},
        )
        if not R.t_equal(x_t, x_before):
            raise CheckFailure(f"{label}: decode_step changed x_t in place.")
    if T._len(cache) != n:
        raise CheckFailure(
            f"decode_step [{where}{note}]: after {steps} steps the cache should hold {n} tokens, it holds {T._len(cache)}."
        )
    if not R.t_equal(mha.in_proj_weight, weights_before):
        raise CheckFailure(
            f"decode_step [{where}{note}]: decode_step changed mha.in_proj_weight in place; leave the layer as it is."
        )


def visible_decode_step(decode_step) -> None:
    """Five steps from an empty cache; three steps after a prompt of four tokens."""
    rng = T.default_rng(62)
    _run_decode(decode_step, rng, e=8, h=2, b=2, prompt=0, steps=5)
    _run_decode(decode_step, rng, e=8, h=2, b=1, prompt=4, steps=3)
    passed("decode_step", 2)


def hidden_decode_step(decode_step, seed: int = 63) -> None:
    """16 steps against PyTorch's own causal nn.MultiheadAttention, prompts, no bias, one head, D = 1,
    float64, large inputs."""
    rng = T.default_rng(seed)
    count = 0

    def case(**kw):
        nonlocal count
        _run_decode(decode_step, rng, torch_reference=True, **kw)
        count += 1

    case(e=12, h=3, b=2, prompt=0, steps=16, note=", 16 steps against nn.MultiheadAttention with a causal mask")
    case(e=12, h=4, b=3, prompt=7, steps=5, note=", after a 7-token prompt")
    case(e=6, h=1, b=2, prompt=2, steps=4, bias=False, note=", one head, bias=False")
    case(e=4, h=4, b=2, prompt=0, steps=4, note=", head_dim = 1")
    case(e=8, h=4, b=2, prompt=3, steps=4, dtype=F64, note=", float64")
    case(e=16, h=4, b=1, prompt=5, steps=3, scale=6.0, note=", large inputs")
    passed("decode_step", count, hidden=True)


# ---------------------------------------------------------------------------------------------
# GroupedQueryAttention
# ---------------------------------------------------------------------------------------------

GQA_MISTAKES = {
    "tiled": (
        "repeated the key/value heads in the wrong order (`repeat`, `tile` or `expand` along a new leading axis): query "
        "head h must use KV head h // (num_heads // num_kv_heads), which is what k.repeat_interleave(group, dim=1) gives; "
        "k.repeat(1, group, 1, 1) gives KV head h % num_kv_heads."
    ),
    "causal_ignored": "is_causal was ignored: with is_causal=True token i must not see tokens j > i.",
    "always_causal": "applied the causal mask although is_causal=False: by default every token sees every token.",
    "diag_hidden": "the causal mask hid the diagonal (triu(0) instead of triu(1)): each token must see itself.",
    "inverted_causal": "inverted the causal mask: tokens saw the future and not the past.",
    "scale_E": "scaled the scores by 1/sqrt(embed_dim); scale by 1/sqrt(head_dim), head_dim = embed_dim // num_heads.",
    "scale_kv": "scaled the scores by 1/sqrt(num_kv_heads * head_dim) (the width of k_proj); scale by 1/sqrt(head_dim).",
    "no_scale": "did not scale the scores: divide them by sqrt(head_dim).",
    "scale_D": "scaled the scores by 1/head_dim instead of 1/sqrt(head_dim).",
    "no_out_proj": "forgot the output projection: apply self.out_proj to the merged heads.",
    "split_view": "split heads with a view without transpose: (B, L, E) reshaped straight to (B, H, L, D) mixes tokens.",
    "merge_view": "merged the heads without transpose: (B, H, L, D) reshaped straight to (B, L, E) mixes tokens.",
    "softmax_queries": "took the softmax over the queries (dim -2) instead of over the keys (dim -1).",
    "kv_swapped": "swapped keys and values: the scores use k_proj, the weighted sum uses v_proj.",
}


def _gqa_params(rng, e: int, h: int, kv: int, bias: bool) -> dict:
    d = e // h

    def r(*shape, std=1.0):
        return T.np_array(rng.normal(size=shape, scale=std).astype(T.np_float32), dtype=T.np_float64)

    s = 1 / T.sqrt(e)
    p = {"q_proj": (r(e, e, std=s), r(e, std=0.5) if bias else None)}
    p["k_proj"] = (r(kv * d, e, std=s), r(kv * d, std=0.5) if bias else None)
    p["v_proj"] = (r(kv * d, e, std=s), r(kv * d, std=0.5) if bias else None)
    p["out_proj"] = (r(e, e, std=s), r(e, std=0.5) if bias else None)
    return p


def _gqa_oracle(p: dict, x: np.ndarray, h: int, kv: int, causal: bool, variant: str = "", dtype=T.np_float64) -> np.ndarray:
    """Grouped-query self-attention (B, L, E) written out, or a known mistake."""
    x = T.np_array(x, dtype=dtype)
    b, n, e = x.shape
    d = e // h
    g = h // kv

    def lin(name, a):
        w, bias = p[name]
        out = a @ T.np_array(w, dtype=dtype).T
        return out if bias is None else out + T.np_array(bias, dtype=dtype)

    def split(a, heads):
        if variant == "split_view":
            return a.reshape(b, heads, n, d)
        return a.reshape(b, n, heads, d).transpose(0, 2, 1, 3)

    q = split(lin("q_proj", x), h)
    k = split(lin("k_proj", x), kv)
    v = split(lin("v_proj", x), kv)
    if variant == "kv_swapped":
        k, v = v, k
    if variant == "tiled":
        k, v = _np_tile(k, (1, g, 1, 1)), _np_tile(v, (1, g, 1, 1))
    else:
        k, v = _np_repeat(k, g, axis=1), _np_repeat(v, g, axis=1)
    scale = {"scale_E": 1 / T.sqrt(e), "scale_kv": 1 / T.sqrt(kv * d), "no_scale": 1.0, "scale_D": 1 / d}.get(
        variant, 1 / T.sqrt(d)
    )
    scores = (q @ k.transpose(0, 1, 3, 2)) * dtype(scale)
    i = T.np_arange(n)[:, None]
    j = T.np_arange(n)[None, :]
    use_causal = (causal and variant != "causal_ignored") or variant == "always_causal"
    allowed = T.np_ones((n, n), dtype=T.np_bool)
    if use_causal:
        allowed = {"diag_hidden": j < i, "inverted_causal": j >= i}.get(variant, j <= i)
    axis = -2 if variant == "softmax_queries" else -1
    w = _softmax_masked(scores, allowed, axis)
    heads_out = w @ v
    merged = heads_out.reshape(b, n, e) if variant == "merge_view" else heads_out.transpose(0, 2, 1, 3).reshape(b, n, e)
    if variant == "no_out_proj":
        return merged
    return lin("out_proj", merged)


def _gqa_label(e: int, h: int, kv: int, bias: bool | None) -> str:
    return f"GroupedQueryAttention({e}, {h}, {kv}" + ("" if bias is None else f", bias={bias}") + ")"


def _build_gqa(cls, e: int, h: int, kv: int, bias: bool | None, p: dict | None, dtype=F32):
    """Construct the student's layer, check its projections, load ``p`` into it."""
    label = _gqa_label(e, h, kv, bias)
    with R.fork_rng(devices=[]):
        module = call(cls, e, h, kv, label=label) if bias is None else call(cls, e, h, kv, bias=bias, label=label)
    if not _isinstance(module, R.Module):
        raise CheckFailure(
            f"{label}: should be an nn.Module (class GroupedQueryAttention(nn.Module)), got {T.type_name(module)}."
        )
    used = _forbidden(cls, {"enable_gqa", "MultiheadAttention"})
    if used:
        raise CheckFailure(
            f"{label}: do the grouping yourself (repeat_interleave the key/value heads); the layer uses {', '.join(used)}."
        )
    d = e // h
    has_bias = _bool(bias)
    want = {"q_proj": (e, e), "k_proj": (e, kv * d), "v_proj": (e, kv * d), "out_proj": (e, e)}
    for name, (fan_in, fan_out) in want.items():
        layer = _getattr(module, name, None)
        if not _isinstance(layer, R.Linear):
            raise CheckFailure(f"{label}: self.{name} should be an nn.Linear({fan_in}, {fan_out}), got {T.type_name(layer)}.")
        if (layer.in_features, layer.out_features) != (fan_in, fan_out):
            hint = ""
            if name in ("k_proj", "v_proj") and layer.out_features == e and kv != h:
                hint = (
                    f"\n  Likely mistake: {name} is as wide as in multi-head attention. It maps E to num_kv_heads * head_dim = "
                    f"{kv} * {d} = {kv * d}: these smaller projections (and the smaller cache) are the point of GQA."
                )
            raise CheckFailure(
                f"{label}: self.{name} should be nn.Linear({fan_in}, {fan_out}), got nn.Linear({layer.in_features}, "
                f"{layer.out_features}).{hint}"
            )
        if (layer.bias is not None) != has_bias:
            if bias is None:
                raise CheckFailure(
                    f"{label}: bias should default to False (decoders such as Llama and Mistral use no bias in attention); "
                    f"self.{name} has a bias."
                )
            raise CheckFailure(f"{label}: self.{name} should {'have' if has_bias else 'have no'} bias (bias={bias}).")
    names = {k for k, _ in R.named_parameters(module)}
    expected_names = {f"{n}.{w}" for n in want for w in (("weight", "bias") if has_bias else ("weight",))}
    if names != expected_names:
        raise CheckFailure(f"{label}: the layer's parameters should be exactly {sorted(expected_names)}; got {sorted(names)}.")
    if p is not None:
        state = {}
        for name, (w, b) in p.items():
            state[f"{name}.weight"] = R.tensor_of(w, F32)
            if b is not None:
                state[f"{name}.bias"] = R.tensor_of(b, F32)
        try:
            R.module_load_state_dict(module, state, strict=False)
            R.module_to(module, dtype=dtype)
        except Exception as exc:  # noqa: BLE001
            raise CheckFailure(f"{label}: loading weights into the projections failed: {exc}") from None
    return module


GQA_SHORTCUT = (
    "let F.scaled_dot_product_attention do the grouping (enable_gqa=True, or key/value heads fewer than the query "
    "heads): repeat each key/value head num_heads // num_kv_heads times yourself (repeat_interleave on the head axis) "
    "so that keys and values have num_heads heads."
)


def _sdpa_groups_heads(calls: list) -> bool:
    """Whether a recorded call of F.scaled_dot_product_attention grouped heads for the caller
    (enable_gqa=True, or keys with fewer heads than the queries)."""
    for c in calls:
        if T._type(c) is not T._dict or c.get("name") != "scaled_dot_product_attention":
            continue
        args, kwargs, shapes = c.get("args") or [], c.get("kwargs") or {}, c.get("shapes") or []
        gqa = kwargs.get("enable_gqa", args[7] if T._len(args) > 7 else False)
        q, k = (T._list(shapes) + [None, None])[:2]
        heads_differ = T._type(q) is T._list and T._type(k) is T._list and T._len(q) >= 3 and T._len(k) >= 3 and q[-3] != k[-3]
        if gqa is True or heads_differ:
            return True
    return False


def _run_gqa(cls, rng, e, h, kv, b, n, *, causal=False, bias=False, dtype=F32, scale=1.0, default_call=False, note=""):
    p = _gqa_params(rng, e, h, kv, bias)
    module = _build_gqa(cls, e, h, kv, bias, p, dtype)
    x = R.rounded(rng.normal(size=(b, n, e), scale=scale), dtype)
    xt = R.tensor_of(x, dtype)
    before = R.clone(xt)
    kind = {1: "MQA", h: "MHA"}.get(kv, f"GQA, {h // kv} query heads per KV head")
    call_desc = "(x)" if default_call else f"(x, is_causal={causal})"
    label = f"{_gqa_label(e, h, kv, bias)}{call_desc} with x of shape {(b, n, e)} [{kind}, {R.dname(dtype)}{note}]"
    if default_call:
        result, calls = call(watched_call, module, xt, label=label)
    else:
        result, calls = call(watched_call, module, xt, is_causal=causal, label=label)
    if _sdpa_groups_heads(calls):
        raise CheckFailure(f"{label}: do the grouping yourself; the layer let {GQA_SHORTCUT}")
    out = _as_result(result, label=label, what="output", dtype=dtype)
    if not R.t_equal(xt, before):
        raise CheckFailure(f"{label}: the layer changed its input in place.")
    expected = _gqa_oracle(p, x, h, kv, causal)
    if dtype == F64:
        atol = 1e-9
    else:
        err = max_error(T.np_array(_gqa_oracle(p, x, h, kv, causal, dtype=T.np_float32), dtype=T.np_float64), expected)
        atol = max(4e-5, 16 * err)
    prints = {GQA_MISTAKES[m]: (lambda m=m: _gqa_oracle(p, x, h, kv, causal, m)) for m in GQA_MISTAKES}
    _expect(out, expected, label=label, what="output", atol=atol, fingerprints=prints)


def _check_gqa_raises(cls, e: int, h: int, kv: int) -> None:
    label = _gqa_label(e, h, kv, None)
    try:
        with R.fork_rng(devices=[]):
            cls(e, h, kv)
    except ValueError:
        return
    except NotImplementedError:
        raise CheckFailure(f"{label}: not implemented yet (the cell still raises NotImplementedError).") from None
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(
            f"{label}: should raise ValueError because num_heads = {h} is not a multiple of num_kv_heads = {kv}; it raised "
            f"{T.type_name(exc)}: {exc}. Check num_heads % num_kv_heads yourself and raise ValueError."
        ) from None
    raise CheckFailure(
        f"{label}: should raise ValueError because num_heads = {h} is not a multiple of num_kv_heads = {kv} (the query "
        "heads cannot be split into equal groups); it built a layer instead."
    )


def visible_GroupedQueryAttention(cls) -> None:
    """Structure, GQA with and without the causal mask, MQA, MHA, the default call, the ValueError."""
    rng = T.default_rng(64)
    _build_gqa(cls, 8, 4, 2, None, None)  # bias defaults to False
    _run_gqa(cls, rng, 8, 4, 2, 2, 5, default_call=True)
    _run_gqa(cls, rng, 8, 4, 2, 2, 5, causal=True)
    _run_gqa(cls, rng, 8, 4, 1, 1, 4, causal=True)
    _run_gqa(cls, rng, 8, 2, 2, 2, 3)
    _check_gqa_raises(cls, 8, 4, 3)
    passed("GroupedQueryAttention", 6)


def hidden_GroupedQueryAttention(cls, seed: int = 65) -> None:
    """Groups of 2 and 3, bias, float64, one token, one head per group, odd sizes, large inputs, more ValueErrors."""
    rng = T.default_rng(seed)
    count = 0

    def case(*args, **kw):
        nonlocal count
        _run_gqa(cls, rng, *args, **kw)
        count += 1

    case(12, 6, 3, 2, 7, causal=True, note=", groups of 2")
    case(12, 6, 2, 2, 7, causal=True, note=", groups of 3")
    case(12, 6, 2, 3, 6, note=", groups of 3, not causal")
    case(16, 8, 4, 2, 5, causal=True, bias=True, note=", bias=True")
    case(12, 6, 3, 2, 6, causal=True, dtype=F64)
    case(8, 4, 2, 2, 1, causal=True, note=", one token")
    case(6, 6, 3, 2, 5, causal=True, note=", head_dim = 1")
    case(20, 4, 4, 1, 9, causal=True, bias=True, note=", MHA with bias")
    case(16, 4, 1, 2, 6, scale=6.0, causal=True, note=", large inputs")
    _check_gqa_raises(cls, 12, 6, 4)
    _check_gqa_raises(cls, 16, 8, 3)
    passed("GroupedQueryAttention", count + 2, hidden=True)


# ---------------------------------------------------------------------------------------------
# kv_cache_bytes
# ---------------------------------------------------------------------------------------------


def _itemsize(dtype) -> int:
    return _int(R.element_size(R.t_empty((), dtype=dtype)))


def _bytes_candidates(b: int, s: int, n_layers: int, kv: int, d: int, size: int) -> dict:
    """What each known mistake returns for these arguments."""
    elements = b * s * n_layers * kv * d
    want = 2 * elements * size
    return {
        "forgot the factor 2: the cache holds two tensors, K and V, for every token of every layer.": elements * size,
        (
            "forgot the bytes per element of dtype: that is the number of elements, not of bytes. Multiply by the dtype's "
            "size, dtype.itemsize (2 for float16, 4 for float32)."
        ): 2 * elements,
        "forgot both the factor 2 (K and V) and the bytes per element of dtype.": elements,
        "counted bits per element instead of bytes (torch.finfo(dtype).bits is in bits: divide by 8).": want * 8,
        "assumed 4 bytes per element (float32) whatever the dtype: use the dtype's size, dtype.itemsize.": 2 * elements * 4,
        "assumed 2 bytes per element (float16) whatever the dtype: use the dtype's size, dtype.itemsize.": 2 * elements * 2,
        "forgot num_layers: every layer keeps its own K and V.": want // n_layers,
        "forgot the batch size: every sequence of the batch has its own cache.": want // b,
        "forgot head_dim.": want // d,
        "forgot seq_len: the cache holds K and V for every token.": want // s,
    }


BYTES_PROBES = [(3, 5, 7, 2, 11, F64), (3, 5, 7, 2, 11, F16), (3, 5, 7, 2, 11, I8), (1, 2, 3, 4, 5, F32)]


def _bytes_mistakes(fn, args: tuple, got: int) -> list[str]:
    """Mistakes that explain ``got``; when several do, keep those that also explain the results on a few probes."""
    size = _itemsize(args[-1])
    want = 2 * _prod(args[:-1]) * size
    found = [m for m, v in _bytes_candidates(*args[:-1], size).items() if v == got and v != want]
    if T._len(found) < 2:
        return found
    consistent = list(found)
    for probe in BYTES_PROBES:
        try:
            value = _int(call(fn, *probe, label="probe"))
        except Exception:  # noqa: BLE001  (a probe the student's function cannot handle)
            continue
        candidates = _bytes_candidates(*probe[:-1], _itemsize(probe[-1]))
        consistent = [m for m in consistent if candidates[m] == value]
    return consistent or found


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _check_bytes_case(fn, b: int, s: int, n_layers: int, kv: int, d: int, dtype, note: str = "") -> None:
    label = f"kv_cache_bytes(batch={b}, seq_len={s}, num_layers={n_layers}, num_kv_heads={kv}, head_dim={d}, dtype={dtype}){note}"
    try:
        result = call(fn, b, s, n_layers, kv, d, dtype, label=label)
    except CheckFailure as exc:
        text = _str(exc)
        if "finfo" in text or "int8" in text or "not a floating point" in text.lower():
            raise CheckFailure(
                f"{text}\n  Likely mistake: torch.finfo only knows floating-point dtypes; the size in bytes of any dtype is "
                "dtype.itemsize (or torch.empty((), dtype=dtype).element_size())."
            ) from None
        raise
    if _isinstance(result, _bool) or not (_isinstance(result, _int) or _isinstance(result, T.np_integer)):
        hint = " Use // rather than /, or int(...), so the count stays exact." if _isinstance(result, _float) else ""
        raise CheckFailure(
            f"{label}: should return an int (an exact number of bytes), got {T.type_name(result)} {result!r}.{hint}"
        )
    got = _int(result)
    size = _itemsize(dtype)
    want = 2 * b * s * n_layers * kv * d * size
    if got == want:
        return
    lines = [
        f"{label}: expected {want:,} bytes, got {got:,}.",
        f"  expected = 2 (K and V) * batch * seq_len * num_layers * num_kv_heads * head_dim * {size} bytes per {R.dname(dtype)} element",
    ]
    mistakes = _bytes_mistakes(fn, (b, s, n_layers, kv, d, dtype), got)
    if T._len(mistakes) == 1:
        lines.append(f"  Likely mistake: {mistakes[0]}")
    elif mistakes:
        lines.append("  Likely mistake, one of: " + " OR ".join(mistakes))
    raise CheckFailure("\n".join(lines))


def visible_kv_cache_bytes(fn) -> None:
    """A small float32 cache, Llama 2 7B at 4096 tokens in float16, Llama 2 70B with a batch in bfloat16."""
    _check_bytes_case(fn, 1, 1024, 4, 8, 64, F32)
    _check_bytes_case(fn, 1, 4096, 32, 32, 128, F16, " (Llama 2 7B, a full 4096-token context)")
    _check_bytes_case(fn, 8, 4096, 80, 8, 128, BF16, " (Llama 2 70B: GQA with 8 KV heads, a batch of 8)")
    passed("kv_cache_bytes", 3)


def hidden_kv_cache_bytes(fn) -> None:
    """float64, int8 and float8 caches, odd sizes, one of everything, and a count beyond 2**53."""
    count = 0
    cases = [
        (3, 7, 5, 3, 11, F64, " (odd sizes, float64)"),
        (1, 1, 1, 1, 1, F32, " (one of everything)"),
        (2, 8192, 32, 8, 128, I8, " (an int8 cache, as quantised caches use)"),
        (16, 4096, 32, 8, 128, F16, " (Mistral 7B's shape, a batch of 16)"),
        (5, 3000, 7, 1, 64, BF16, " (multi-query: one KV head)"),
        (4097, 10000019, 126, 16, 128, F32, " (a count beyond 2**53: keep it an exact int)"),
    ]
    if F8 is not None:
        cases.append((1, 32768, 80, 8, 128, F8, " (a float8 cache)"))
    for args in cases:
        _check_bytes_case(fn, *args)
        count += 1
    passed("kv_cache_bytes", count, hidden=True)


# {exercise: (visible points, hidden points)}, in the order the exercises appear.
POINTS = {
    "KVCache": (1, 1),
    "decode_step": (2, 2),
    "kv_cache_bytes": (1, 1),
    "GroupedQueryAttention": (2, 2),
}
