"""Checks for chapter 5, Transformer blocks and what heads learn.

The oracle for ``TransformerBlock`` is the block written out in float64 NumPy here (layer
norm with eps 1e-5, multi-head self-attention with PyTorch's mask conventions, the
position-wise feed-forward network with ReLU or exact GELU, residual connections before or
after the norm), fed with the parameters of a real ``nn.TransformerEncoderLayer`` through its
state dict. ``tests/test_ch05.py`` proves that the oracle equals ``nn.TransformerEncoderLayer``
for both norm placements, both activations and every kind of mask used here. For float32
inputs the tolerance is measured: the oracle also runs in float32 arithmetic, and a student may
be a few times further from the float64 result than that. Wrong answers are compared with the
outputs of known mistakes (variants of the oracle) to name them.

The two head scores are checked against direct float64 sums over the attention matrices.

Everything a student cell could rebind (NumPy and torch functions, ``nn.TransformerEncoderLayer``,
``nn.Module`` methods, ``torch.autograd.grad``) is captured when this module is imported,
before student code runs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from autograder.checks import torch_refs as R
from autograder.checks import trusted as T
from autograder.checks.common import CheckFailure, call, expect_close, max_error, names_used_in_methods, passed, to_float64
from autograder.checks.objects import output_gradients
from autograder.checks.torch_refs import BOOL, F32, F64

# References captured at import time (the setup cell imports this module before student code).
# Those most chapters share are in torch_refs (R.dtype_of, R.MHA, ...) and trusted (T.np_where, ...).
_EncoderLayer = torch.nn.TransformerEncoderLayer
_np_sqrt = np.sqrt
_tanh = np.tanh
_erf = np.vectorize(math.erf, otypes=[np.float64])
_tril = np.tril
_eye = np.eye
_pi = math.pi
_float = float
_int = int
_abs = abs
_str = str
_isinstance = isinstance
_getattr = getattr
_hasattr = hasattr
_vars = vars
_cond = np.linalg.cond
_max = max
_lstsq = np.linalg.lstsq

EPS = 1e-5
FORBIDDEN = {
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "TransformerDecoderLayer",
    "TransformerDecoder",
    "Transformer",
    "_transformer_encoder_layer_fwd",
}


# ---------------------------------------------------------------------------------------------
# TransformerBlock: the float64 oracle and the mistakes it can imitate
# ---------------------------------------------------------------------------------------------

MISTAKES = {
    "pre_as_post": (
        "used post-norm, x = norm1(x + SA(x)), although norm_first=True. Pre-norm normalises the input of each "
        "sub-layer and adds the sub-layer's output to the un-normalised x: x = x + SA(norm1(x)), x = x + FF(norm2(x))."
    ),
    "post_as_pre": (
        "used pre-norm, x = x + SA(norm1(x)), although norm_first=False. Post-norm (the original Transformer) "
        "normalises after the residual sum: x = norm1(x + SA(x)), x = norm2(x + FF(x))."
    ),
    "no_res_attn": "no residual connection around self-attention: add the sub-layer's input x to its output.",
    "no_res_ffn": "no residual connection around the feed-forward network: add its input to its output.",
    "no_res": "no residual connections at all: each sub-layer's output must be added to its input (x + sublayer).",
    "res_from_normed": (
        "the residual adds the normalised x: with pre-norm the residual path carries the un-normalised x, "
        "x = x + SA(norm1(x)), not norm1(x) + SA(norm1(x))."
    ),
    "norms_swapped": "swapped norm1 and norm2: norm1 belongs to self-attention, norm2 to the feed-forward network.",
    "one_norm": "used norm1 for both sub-layers; the feed-forward sub-layer has its own norm2.",
    "no_norm2": "the feed-forward sub-layer skips norm2.",
    "parallel": (
        "the feed-forward network read the block's input instead of the output of the self-attention sub-layer "
        "(the two sub-layers run one after the other, not in parallel)."
    ),
    "final_norm": (
        "normalised the output of a pre-norm block. In pre-norm the block returns the residual sum; the final "
        "LayerNorm belongs after the last block of a stack, not inside each block."
    ),
    "act_other": "used the wrong activation: activation='relu' means F.relu, activation='gelu' means F.gelu.",
    "gelu_tanh": (
        "used the tanh approximation of GELU; nn.TransformerEncoderLayer uses the exact GELU, "
        "0.5 x (1 + erf(x / sqrt 2)) (F.gelu with its default approximate='none')."
    ),
    "no_act": "no activation between linear1 and linear2: the feed-forward network is then a single linear map.",
    "act_after_linear2": "applied the activation after linear2 as well; it belongs between linear1 and linear2 only.",
    "eps_1e-6": "LayerNorm eps should be 1e-5 (PyTorch's default), not 1e-6.",
    "eps_1e-12": "LayerNorm eps should be 1e-5 (PyTorch's default), not 1e-12.",
    "eps_0": "a LayerNorm without eps: use nn.LayerNorm(d_model), whose eps is 1e-5.",
    "no_affine": "the LayerNorms ignore their weight and bias (gamma and beta): use nn.LayerNorm modules norm1 and norm2.",
    "inverted": "inverted the boolean mask. As in nn.MultiheadAttention, True means NOT allowed (masked out).",
    "kpm_ignored": "key_padding_mask was ignored: pass it on to self-attention (True = padding, not attended).",
    "attn_mask_ignored": "attn_mask was ignored: pass it on to self-attention.",
    "causal_ignored": (
        "is_causal was ignored: with attn_mask=None, is_causal=True must hide the future (query i sees keys j <= i). "
        "Build the causal mask yourself: nn.MultiheadAttention needs an explicit attn_mask."
    ),
    "batch_first": (
        "self-attention mixed the sequences of the batch instead of the tokens of each sequence: nn.MultiheadAttention "
        "reads x as (L, B, E) unless it is created with batch_first=True."
    ),
    "no_scale": "attention scores were not scaled by 1/sqrt(head_dim).",
    "scale_E": "attention scores were scaled by 1/sqrt(d_model) instead of 1/sqrt(head_dim).",
}
SHAPE_HINT_AVERAGED = (
    "  Likely mistake: last_attention was averaged over heads. Keep one matrix per head: call self_attn with "
    "need_weights=True and average_attn_weights=False."
)
DROPOUT_EVAL = (
    "  Likely mistake: dropout is active in eval mode. After .eval() (self.training False) dropout must be off: use "
    "nn.Dropout modules, or F.dropout(x, p, training=self.training) (F.dropout's default is training=True)."
)
TUPLE_HINT = (
    "forward should return the output tensor (B, L, d_model) alone, like nn.TransformerEncoderLayer; keep the "
    "per-head weights in self.last_attention instead of returning them."
)


def _layer_norm(x: np.ndarray, g, b, eps: float, dtype, affine: bool = True) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mu) / _np_sqrt(var + dtype(eps))
    return y * g + b if affine else y


def _gelu(x: np.ndarray, dtype) -> np.ndarray:
    return T.np_array(0.5 * x * (1.0 + _erf(T.np_array(x, dtype=T.np_float64) / T.sqrt(2.0))), dtype=dtype)


def _gelu_tanh(x: np.ndarray, dtype) -> np.ndarray:
    return T.np_array(0.5 * x * (1.0 + _tanh(T.sqrt(2.0 / _pi) * (x + 0.044715 * x**3))), dtype=dtype)


def _additive(mask, dtype, variant: str) -> np.ndarray:
    if mask.dtype == T.np_bool:
        blocked = ~mask if variant == "inverted" else mask
        return T.np_where(blocked, dtype(-T.inf), dtype(0))
    return T.np_array(mask, dtype=dtype)


def _self_attention(p, x, h, *, kpm, am, causal, dtype, variant):
    """Multi-head self-attention as nn.MultiheadAttention computes it: (output, weights (B, H, L, L))."""
    b, n, e = x.shape
    d = e // h
    w_in, b_in = p["w_in"], p["b_in"]
    qkv = [x @ w_in[i * e : (i + 1) * e].T + b_in[i * e : (i + 1) * e] for i in range(3)]
    q, k, v = (t.reshape(b, n, h, d).transpose(0, 2, 1, 3) for t in qkv)
    scale = {"no_scale": 1.0, "scale_E": 1 / T.sqrt(e)}.get(variant, 1 / T.sqrt(d))
    scores = (q @ k.transpose(0, 1, 3, 2)) * dtype(scale)
    add = T.np_zeros((b, h, n, n), dtype=dtype)
    if variant == "attn_mask_ignored":
        am = None
    if am is None and causal and variant != "causal_ignored":
        am = T.np_triu(T.np_ones((n, n), dtype=T.np_bool), 1)
    if am is not None:
        a = _additive(am, dtype, variant)
        add = add + (a.reshape(b, h, n, n) if a.ndim == 3 else a)
    if kpm is not None and variant != "kpm_ignored":
        add = add + _additive(kpm, dtype, variant).reshape(b, 1, 1, n)
    with T.np_errstate(all="ignore"):
        scores = scores + add
        top = scores.max(axis=-1, keepdims=True)
        dead = top == -T.inf
        ex = T.np_exp(scores - T.np_where(dead, dtype(0), top))
        w = T.np_where(dead, dtype(0), ex / T.np_where(dead, dtype(1), ex.sum(axis=-1, keepdims=True)))
    merged = (w @ v).transpose(0, 2, 1, 3).reshape(b, n, e)
    return merged @ p["w_out"].T + p["b_out"], w


def _oracle(p, x, h, *, norm_first, activation, kpm=None, am=None, causal=False, dtype=T.np_float64, variant=""):
    """One encoder block written out: returns (output (B, L, E), per-head weights (B, H, L, L))."""
    p = {k: T.np_array(v, dtype=dtype) for k, v in p.items()}
    x = T.np_array(x, dtype=dtype)
    kpm = kpm if kpm is None or kpm.dtype == T.np_bool else T.np_array(kpm, dtype=dtype)
    am = am if am is None or am.dtype == T.np_bool else T.np_array(am, dtype=dtype)
    eps = {"eps_1e-6": 1e-6, "eps_1e-12": 1e-12, "eps_0": 0.0}.get(variant, EPS)
    n1, n2 = ("g2", "be2"), ("g1", "be1")
    if variant != "norms_swapped":
        n1, n2 = n2, n1
    if variant == "one_norm":
        n2 = n1

    def norm(t, which):
        return _layer_norm(t, p[which[0]], p[which[1]], eps, dtype, affine=variant != "no_affine")

    def act(t):
        kind = activation
        if variant == "act_other":
            kind = "gelu" if activation == "relu" else "relu"
        if variant == "no_act":
            return t
        if variant == "gelu_tanh" and kind == "gelu":
            return _gelu_tanh(t, dtype)
        return _gelu(t, dtype) if kind == "gelu" else T.np_where(t > 0, t, dtype(0))

    def sa(t):
        if variant == "batch_first":  # (B, L, E) read as (L, B, E): attention runs over the batch axis
            if kpm is not None or am is not None or causal:
                raise ValueError("the masks do not fit a batch read as a sequence")
            o, wt = _self_attention(p, t.transpose(1, 0, 2), h, kpm=None, am=None, causal=False, dtype=dtype, variant="")
            return o.transpose(1, 0, 2), wt
        return _self_attention(p, t, h, kpm=kpm, am=am, causal=causal, dtype=dtype, variant=variant)

    def ff(t):
        y = act(t @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]
        return act(y) if variant == "act_after_linear2" else y

    res1 = variant not in ("no_res_attn", "no_res")
    res2 = variant not in ("no_res_ffn", "no_res")
    pre = norm_first
    if variant == "pre_as_post" and norm_first:
        pre = False
    if variant == "post_as_pre" and not norm_first:
        pre = True
    if pre:
        h1 = norm(x, n1)
        a, w = sa(h1)
        base = h1 if variant == "res_from_normed" else x
        x1 = base + a if res1 else a
        ff_in = x if variant == "parallel" else x1
        h2 = ff_in if variant == "no_norm2" else norm(ff_in, n2)
        base = h2 if variant == "res_from_normed" else x1
        out = base + ff(h2) if res2 else ff(h2)
        if variant == "final_norm":
            out = _layer_norm(out, dtype(1), dtype(0), eps, dtype)
    else:
        a, w = sa(x)
        x1 = norm(x + a if res1 else a, n1)
        ff_in = x if variant == "parallel" else x1
        s = ff_in + ff(ff_in) if res2 else ff(ff_in)
        if variant == "parallel":
            s = x1 + ff(ff_in)
        out = s if variant == "no_norm2" else norm(s, n2)
    return out, w


def _random_params(rng, e: int, f: int) -> dict:
    """Parameters rounded to float32 (they travel through a float32 state dict); norms and biases non-trivial."""
    r = lambda *shape, std=1.0, mean=0.0: T.np_array(
        (mean + rng.normal(size=shape, scale=std)).astype(T.np_float32), dtype=T.np_float64
    )
    return {
        "w_in": r(3 * e, e, std=1 / T.sqrt(e)),
        "b_in": r(3 * e, std=0.3),
        "w_out": r(e, e, std=1 / T.sqrt(e)),
        "b_out": r(e, std=0.3),
        "w1": r(f, e, std=1 / T.sqrt(e)),
        "b1": r(f, std=0.3),
        "w2": r(e, f, std=1 / T.sqrt(f)),
        "b2": r(e, std=0.3),
        "g1": r(e, std=0.3, mean=1.0),
        "be1": r(e, std=0.3),
        "g2": r(e, std=0.3, mean=1.0),
        "be2": r(e, std=0.3),
    }


STATE_KEYS = {
    "self_attn.in_proj_weight": "w_in",
    "self_attn.in_proj_bias": "b_in",
    "self_attn.out_proj.weight": "w_out",
    "self_attn.out_proj.bias": "b_out",
    "linear1.weight": "w1",
    "linear1.bias": "b1",
    "linear2.weight": "w2",
    "linear2.bias": "b2",
    "norm1.weight": "g1",
    "norm1.bias": "be1",
    "norm2.weight": "g2",
    "norm2.bias": "be2",
}


def _torch_layer(e: int, h: int, f: int, *, dropout: float, norm_first: bool, activation: str, p: dict | None = None):
    """A real nn.TransformerEncoderLayer (batch_first) holding the parameters ``p``."""
    with R.fork_rng(devices=[]):
        ref = _EncoderLayer(e, h, f, dropout, activation, batch_first=True, norm_first=norm_first)
    if p is not None:
        R.module_load_state_dict(ref, {k: R.tensor_of(p[v], F32) for k, v in STATE_KEYS.items()})
    return ref


def _shapes(module) -> dict:
    return {k: T._tuple(v.shape) for k, v in R.module_state_dict(module).items()}


def _forbidden_names(cls) -> list[str]:
    """Uses of PyTorch's own layers (FORBIDDEN) in the methods of ``cls``."""
    return names_used_in_methods(cls, FORBIDDEN)


def _signature(e, h, f, dropout, norm_first, activation) -> str:
    return f"TransformerBlock({e}, {h}, {f}, dropout={dropout}, norm_first={norm_first}, activation={activation!r})"


def _build(cls, e, h, f, *, dropout=0.0, norm_first=True, activation="relu", p=None, dtype=F32, train=True, ctor_defaults=False):
    """Construct the student's block, check its structure, load nn.TransformerEncoderLayer's state dict into it.

    With ``ctor_defaults`` the block is built as ``TransformerBlock(e, h, f)``: its defaults must be dropout=0.0,
    norm_first=True, activation="relu".
    """
    label = f"TransformerBlock({e}, {h}, {f})" if ctor_defaults else _signature(e, h, f, dropout, norm_first, activation)
    with R.fork_rng(devices=[]):
        if ctor_defaults:
            module = call(cls, e, h, f, label=label)
        else:
            module = call(cls, e, h, f, dropout=dropout, norm_first=norm_first, activation=activation, label=label)
    if not _isinstance(module, R.Module):
        raise CheckFailure(f"{label}: should be an nn.Module (class TransformerBlock(nn.Module)), got {T.type_name(module)}.")
    if _isinstance(module, _EncoderLayer):
        raise CheckFailure(f"{label}: build the block yourself instead of subclassing nn.TransformerEncoderLayer.")
    forbidden = _forbidden_names(T._type(module))
    if forbidden:
        raise CheckFailure(
            f"{label}: build the block from self-attention, LayerNorm and Linear layers; it uses PyTorch's own "
            f"Transformer layers ({', '.join(forbidden)})."
        )
    ref = _torch_layer(e, h, f, dropout=dropout, norm_first=norm_first, activation=activation, p=p)
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
            f"{label}: its state dict should have the entries of nn.TransformerEncoderLayer({e}, {h}, {f}, batch_first=True), "
            f"{want}; {', '.join(details)}. Use self_attn (chapter 4's multi-head attention, or nn.MultiheadAttention("
            "d_model, num_heads, batch_first=True)), linear1 = nn.Linear(d_model, d_ff), linear2 = nn.Linear(d_ff, d_model), "
            "norm1 and norm2 = nn.LayerNorm(d_model)."
        )
    try:
        R.module_load_state_dict(module, R.module_state_dict(ref))
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(f"{label}: load_state_dict(nn.TransformerEncoderLayer(...).state_dict()) failed: {exc}") from None
    try:
        R.module_to(module, dtype=dtype)
        R.module_train(module, train)
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(f"{label}: .to({dtype}) or .train({train}) failed: {exc}") from None
    return module


def _describe_mask(name: str, m) -> str:
    if m is None:
        return ""
    kind = "bool" if m.dtype == T.np_bool else "float"
    return f", {name}={kind} {T._tuple(m.shape)}"


def _mask_tensor(m, dtype):
    if m is None:
        return None
    return R.tensor_of(m, BOOL) if m.dtype == T.np_bool else R.tensor_of(m, dtype)


def _forward(module, label: str, xt, kwargs: dict):
    try:
        result = call(module, xt, label=label, **kwargs)
    except CheckFailure as exc:
        if "Need attn_mask" in _str(exc):
            raise CheckFailure(f"{exc}\n  Likely mistake: {MISTAKES['causal_ignored']}") from None
        raise
    if T._type(result) in (T._tuple, list):
        raise CheckFailure(f"{label}: returned a {T.type_name(result)}; {TUPLE_HINT}")
    return result


def _block_case(
    module,
    p: dict,
    x: np.ndarray,
    h: int,
    *,
    norm_first: bool,
    activation: str,
    kpm=None,
    am=None,
    causal: bool = False,
    dtype=F32,
    defaults: bool = False,
    mode: str = "training mode",
    note: str = "",
    sig: str = "",
) -> np.ndarray:
    """Run the student's block once and compare its output and last_attention with the oracle."""
    b, n, e = x.shape
    xt = R.tensor_of(x, dtype)
    kpm_t, am_t = _mask_tensor(kpm, dtype), _mask_tensor(am, dtype)
    inputs = [t for t in (xt, kpm_t, am_t) if t is not None]
    before = [R.clone(t) for t in inputs]
    kwargs = {}
    if not defaults:
        kwargs = {"attn_mask": am_t, "key_padding_mask": kpm_t}
        if causal:
            kwargs["is_causal"] = True
    call_text = "(x)" if defaults else f"(x{_describe_mask('attn_mask', am)}{_describe_mask('key_padding_mask', kpm)}"
    if not defaults:
        call_text += ", is_causal=True)" if causal else ")"
    label = f"{sig}{call_text} with x of shape {(b, n, e)} [{_str(dtype).replace('torch.', '')}, {mode}{note}]"
    result = _forward(module, label, xt, kwargs)
    out = R.tensor_result(result, label=label, what="output", dtype=dtype)
    for t, old in zip(inputs, before, strict=True):
        if not R.t_equal(t, old):
            raise CheckFailure(f"{label}: the block changed one of its inputs in place.")

    args = {"norm_first": norm_first, "activation": activation, "kpm": kpm, "am": am, "causal": causal}
    exp_out, exp_w = _oracle(p, x, h, **args)
    if dtype == F64:
        atol = 1e-8
    else:
        out32, w32 = _oracle(p, x, h, dtype=T.np_float32, **args)
        err = max(
            max_error(T.np_array(out32, dtype=T.np_float64), exp_out), max_error(T.np_array(w32, dtype=T.np_float64), exp_w)
        )
        atol = max(2e-5, 8 * err)
    prints = {MISTAKES[m]: (lambda m=m: _oracle(p, x, h, variant=m, **args)[0]) for m in MISTAKES}
    if T._tuple(out.shape) != (b, n, e):
        raise CheckFailure(f"{label}: the output should have shape (B, L, d_model) = {(b, n, e)}, got {T._tuple(out.shape)}.")
    expect_close(out, exp_out, label=label, what="output", atol=atol * 4, fingerprints=prints)

    la = _getattr(module, "last_attention", None)
    wlabel = f"{label}, then block.last_attention"
    if la is None:
        raise CheckFailure(
            f"{wlabel}: is None or missing. Keep the per-head attention weights of the last forward in "
            "self.last_attention, shape (B, num_heads, L, L)."
        )
    w = R.tensor_result(la, label=wlabel, what="last_attention", dtype=None)
    shape = T._tuple(w.shape)
    if shape != (b, h, n, n):
        hint = ""
        if shape == (b, n, n) and h > 1:
            hint = "\n" + SHAPE_HINT_AVERAGED
        elif shape == (b * h, n, n):
            hint = "\n  Likely mistake: the heads are folded into the batch: view the weights as (B, H, L, L)."
        raise CheckFailure(f"{wlabel}: should have shape (B, H, L, L) = {(b, h, n, n)}, got {shape}.{hint}")
    wprints = {MISTAKES[m]: (lambda m=m: _oracle(p, x, h, variant=m, **args)[1]) for m in MISTAKES}
    # the same budget as the output: float32 softmax rounding differs from the float32 oracle's by a few ulps of
    # the scores, which large inputs make large (seen at 2.8e-5 against a 2e-5 estimate)
    expect_close(w, exp_w, label=wlabel, what="per-head attention-weight tensor", atol=atol * 4, fingerprints=wprints)
    return out


def _data(rng, b: int, n: int, e: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    return T.np_array((shift + rng.normal(size=(b, n, e), scale=scale)).astype(T.np_float32), dtype=T.np_float64)


def _case(
    cls,
    rng,
    e,
    h,
    f,
    b,
    n,
    *,
    norm_first=True,
    activation="relu",
    dtype=F32,
    train=True,
    scale=1.0,
    shift=0.0,
    ctor_defaults=False,
    **kw,
):
    """Build a block with fresh random parameters and run one forward pass."""
    p = _random_params(rng, e, f)
    module = _build(
        cls, e, h, f, norm_first=norm_first, activation=activation, p=p, dtype=dtype, train=train, ctor_defaults=ctor_defaults
    )
    x = _data(rng, b, n, e, scale, shift)
    sig = f"TransformerBlock({e}, {h}, {f})" if ctor_defaults else _signature(e, h, f, 0.0, norm_first, activation)
    mode = "training mode" if train else "eval mode"
    return _block_case(module, p, x, h, norm_first=norm_first, activation=activation, dtype=dtype, mode=mode, sig=sig, **kw)


def _check_dropout_eval(cls, rng, norm_first: bool) -> None:
    """A block built with dropout=0.5, in eval mode, must be deterministic and dropout-free."""
    e, h, f, b, n = 8, 2, 16, 2, 5
    p = _random_params(rng, e, f)
    module = _build(cls, e, h, f, dropout=0.5, norm_first=norm_first, p=p, train=False)
    x = _data(rng, b, n, e)
    xt = R.tensor_of(x, F32)
    sig = _signature(e, h, f, 0.5, norm_first, "relu")
    label = f"{sig} after .eval(), called twice on the same x of shape {(b, n, e)}"
    with R.fork_rng(devices=[]):
        R.manual_seed(0)
        first = _forward(module, label, xt, {})
        second = _forward(module, label, xt, {})
    a = R.tensor_result(first, label=label, what="output", dtype=F32)
    c = R.tensor_result(second, label=label, what="output", dtype=F32)
    if T._tuple(a.shape) == T._tuple(c.shape) and not T.np_array_equal(a, c):
        raise CheckFailure(f"{label}: the two outputs differ (largest difference {max_error(a, c):.3g}).\n{DROPOUT_EVAL}")
    try:
        _block_case(module, p, x, h, norm_first=norm_first, activation="relu", mode="eval mode", sig=sig, defaults=True)
    except CheckFailure as exc:
        raise CheckFailure(f"{exc}\n{DROPOUT_EVAL}") from None


DROPOUT_SITES = {
    "weights": (
        "no dropout on the attention weights: build self_attn with dropout=dropout (nn.MultiheadAttention and "
        "chapter 4's MultiHeadAttention drop the weights themselves, in training mode)."
    ),
    "attn_out": "no dropout on the output of self-attention: x = x + dropout(SA(norm1(x))) (dropout1 in nn.TransformerEncoderLayer).",
    "ff_inner": (
        "no dropout inside the feed-forward network: it acts after the activation, linear2(dropout(activation(linear1(x))))."
    ),
    "ff_out": "no dropout on the output of the feed-forward network: x = x + dropout(FF(norm2(x))) (dropout2).",
    "residual": (
        "dropout acts on the residual sum x + sublayer(x) (some outputs are exactly 0); it belongs on the sub-layer's "
        "output only, before the residual addition."
    ),
    "after_norm": (
        "dropout acts after the final LayerNorm of a post-norm block (its output tokens no longer have mean 0 and "
        "variance 1); dropout belongs on the sub-layers' outputs, before the residual sum and the norm."
    ),
    "ff_place": (
        "dropout inside the feed-forward network is in the wrong place: it acts on the activation's output, "
        "linear2(dropout(activation(linear1(x)))), not on linear1's output or on the network's input."
    ),
    "attn_place": (
        "dropout in the attention sub-layer is in the wrong place: self_attn drops its attention weights, then "
        "the block drops self_attn's output; nothing drops the normalised input or the values."
    ),
    "rescale": "dropped values are not scaled by 1/(1-p); use nn.Dropout or F.dropout, which zero with probability p and rescale.",
}


def _drop_fraction(label: str, where: str, zero: np.ndarray, prob: float) -> None:
    frac = _float(zero.mean()) if zero.size else prob
    if not (prob - 0.12 <= frac <= prob + 0.12):
        raise CheckFailure(
            f"{label}: dropout {where} zeroed {100 * frac:.0f}% of its entries; with p = {prob} about {100 * prob:.0f}% "
            "should be zero (each entry independently, with probability p)."
        )


def _read_back(label, y: np.ndarray, base: np.ndarray, bias: np.ndarray, rows: np.ndarray, prob: float, site: str, missing: str):
    """``y`` (G, N): each entry 0 (dropped) or (rows @ c + bias) / (1 - p) with ``c`` a dropout of ``base`` (G, K).

    ``rows`` (G, N, K). Solves for ``c`` on the kept entries of each group; returns the zeros of ``y`` and of ``c``.
    """
    scale = 1 / (1 - prob)
    zero_y = T.np_abs(y) <= 1e-12
    zero_c = []
    k = base.shape[-1]
    for g in range(y.shape[0]):
        kept = ~zero_y[g]
        if kept.sum() < k + 2:
            continue  # too few kept entries to read c back
        a, target = rows[g][kept], y[g][kept] / scale - bias[kept]
        c = _lstsq(a, target, rcond=None)[0]
        residual = _float(T.np_max(T.np_abs(a @ c - target)))
        # The block's float64 arithmetic differs from this float64 oracle by rounding (about 1e-8 here), and
        # the solve amplifies it by the condition number of the kept rows. Kept weights (w / (1 - p)) and
        # undropped ones (w) differ by a third, so a loose tolerance still tells them apart.
        amplification = _max(1.0, _float(_cond(a)))
        tol = 1e-6 * amplification * (1 + T.np_abs(base[g]))
        zc = T.np_abs(c) <= tol
        if residual > 1e-6 * amplification * (1 + _float(T.np_max(T.np_abs(target)))):
            raise CheckFailure(f"{label}: dropout acts in the wrong place.\n  Likely mistake: {DROPOUT_SITES[site]}")
        if not T.np_all(zc | (T.np_abs(c - base[g] * scale) <= tol)):
            if T.np_all(T.np_abs(c - base[g]) <= tol):
                raise CheckFailure(f"{label}: one of the four dropouts is missing.\n  Likely mistake: {DROPOUT_SITES[missing]}")
            if T.np_all(zc | (T.np_abs(c - base[g]) <= tol)):
                raise CheckFailure(f"{label}: dropout acts, but not as it should.\n  Likely mistake: {DROPOUT_SITES['rescale']}")
            raise CheckFailure(f"{label}: dropout acts in the wrong place.\n  Likely mistake: {DROPOUT_SITES[site]}")
        zero_c.append(zc)
    return zero_y, (T.np_concat(zero_c) if zero_c else T.np_zeros(0, dtype=T.np_bool))


def _as_float32(p: dict) -> dict:
    """``p`` rounded to float32, as the block receives it through a float32 state dict."""
    return {k: T.np_array(v.astype(T.np_float32), dtype=T.np_float64) for k, v in p.items()}


def _placement_run(module, x: np.ndarray, label: str, torch_seed: int) -> np.ndarray:
    with R.fork_rng(devices=[]):
        R.manual_seed(torch_seed)
        result = _forward(module, label, R.tensor_of(x, F64), {})
    out = R.tensor_result(result, label=label, what="output", dtype=F64)
    if T._tuple(out.shape) != T._tuple(x.shape):
        raise CheckFailure(
            f"{label}: the output should have shape (B, L, d_model) = {T._tuple(x.shape)}, got {T._tuple(out.shape)}."
        )
    return out


def _check_dropout_train(cls, rng) -> None:
    """Training mode: dropout acts in nn.TransformerEncoderLayer's four places, and nowhere else.

    Read back from the output, in float64, with parameters that isolate one sub-layer at a time:
    with linear2 = 0 a pre-norm block returns x + dropout(SA(norm1(x))); out_proj is diagonal with
    a bias, so a dropped entry of SA's output is exactly 0 and a kept one reveals the heads' output,
    from which (head_dim > L) the dropped attention weights are solved. With out_proj = 0 the block
    returns x + dropout(linear2(dropout(gelu(linear1(norm2(x)))))), read back the same way. A
    post-norm block must return tokens with mean 0 and variance 1 when norm2 has gamma 1 and beta 0.
    """
    prob = 0.25
    torch_seed = _int(rng.integers(1, 2**31))

    # (1) attention: the weights and self-attention's output.
    e, h, f, b, n = 32, 2, 8, 4, 4
    d = e // h
    p = _random_params(rng, e, f)
    diag = rng.uniform(0.5, 1.5, size=e)
    p["w_out"], p["w2"], p["b2"] = _eye(e) * diag, p["w2"] * 0, p["b2"] * 0
    p = _as_float32(p)
    module = _build(cls, e, h, f, dropout=prob, p=p, dtype=F64, train=True)
    x = _data(rng, b, n, e)
    label = f"{_signature(e, h, f, prob, True, 'relu')} in training mode [float64], linear2 = 0, on x of shape {(b, n, e)}"
    out = _placement_run(module, x, label, torch_seed)
    if T.np_any(T.np_abs(out) <= 1e-12):
        raise CheckFailure(f"{label}: dropout acts in the wrong place.\n  Likely mistake: {DROPOUT_SITES['residual']}")
    y = out - x
    h1 = _layer_norm(x, p["g1"], p["be1"], EPS, T.np_float64)
    sa, w = _self_attention(p, h1, h, kpm=None, am=None, causal=False, dtype=T.np_float64, variant="")
    if max_error(y, sa) < 1e-9:
        raise CheckFailure(
            f"{label}: the output equals the output without dropout: dropout is not applied in training mode. Apply "
            "dropout (probability `dropout`) to the attention weights, after self-attention, inside the feed-forward "
            "network and after it, as nn.TransformerEncoderLayer does, and only while self.training is True."
        )
    vp = (h1 @ p["w_in"][2 * e :].T + p["b_in"][2 * e :]).reshape(b, n, h, d)  # values (B, S, H, D)
    # groups (b, i, head): y[b, i, head block] = (diag * (w_used[b, head, i] @ v[b, :, head]) + b_out) / (1 - p)
    ys = (y / diag).reshape(b, n, h, d).transpose(0, 2, 1, 3).reshape(b * h * n, d)
    bias = (p["b_out"] / diag).reshape(h, d)
    rows = T.np_array([vp[bi, :, hi].T for bi in range(b) for hi in range(h) for _ in range(n)])
    bases = w.reshape(b * h * n, n)
    if not T.np_any(T.np_abs(y) <= 1e-12):
        raise CheckFailure(
            f"{label}: no entry of self-attention's output was dropped.\n  Likely mistake: {DROPOUT_SITES['attn_out']}"
        )
    zero_y, zero_w = [], []
    for hi in range(h):
        idx = T.np_array([g for g in range(b * h * n) if (g // n) % h == hi])
        zy, zw = _read_back(label, ys[idx], bases[idx], bias[hi], rows[idx], prob, "attn_place", "weights")
        zero_y.append(zy)
        zero_w.append(zw)
    zero_w = T.np_concat(zero_w)
    if zero_w.size and not T.np_any(zero_w):
        raise CheckFailure(f"{label}: no attention weight was dropped.\n  Likely mistake: {DROPOUT_SITES['weights']}")
    _drop_fraction(label, "on self-attention's output", T.np_concat(zero_y), prob)
    _drop_fraction(label, "on the attention weights", zero_w, prob)

    # (2) the feed-forward network: inside and after it (gelu, so dropout before the activation is visible).
    e, h, f, b, n = 16, 2, 6, 8, 5
    p = _random_params(rng, e, f)
    p["w_out"], p["b_out"] = p["w_out"] * 0, p["b_out"] * 0
    p["b1"] = p["b1"] + 1.0
    p = _as_float32(p)
    module = _build(cls, e, h, f, dropout=prob, activation="gelu", p=p, dtype=F64, train=True)
    x = _data(rng, b, n, e)
    label = f"{_signature(e, h, f, prob, True, 'gelu')} in training mode [float64], out_proj = 0, on x of shape {(b, n, e)}"
    out = _placement_run(module, x, label, torch_seed)
    if T.np_any(T.np_abs(out) <= 1e-12):
        raise CheckFailure(f"{label}: dropout acts in the wrong place.\n  Likely mistake: {DROPOUT_SITES['residual']}")
    y = (out - x).reshape(b * n, e)
    h2 = _layer_norm(x, p["g2"], p["be2"], EPS, T.np_float64)
    act = _gelu(h2 @ p["w1"].T + p["b1"], T.np_float64).reshape(b * n, f)
    if not T.np_any(T.np_abs(y) <= 1e-12):
        raise CheckFailure(
            f"{label}: no entry of the feed-forward output was dropped.\n  Likely mistake: {DROPOUT_SITES['ff_out']}"
        )
    rows = T.np_array([p["w2"]] * (b * n))
    zero_y, zero_a = _read_back(label, y, act, p["b2"], rows, prob, "ff_place", "ff_inner")
    if zero_a.size and not T.np_any(zero_a):
        raise CheckFailure(f"{label}: no activation was dropped.\n  Likely mistake: {DROPOUT_SITES['ff_inner']}")
    _drop_fraction(label, "on the feed-forward output", zero_y, prob)
    _drop_fraction(label, "after the activation", zero_a, prob)

    # (3) post-norm: the block ends with norm2, so (gamma 1, beta 0) each output token has mean 0 and variance 1.
    e, h, f, b, n = 8, 2, 16, 2, 6
    p = _random_params(rng, e, f)
    p["g2"], p["be2"] = p["g2"] * 0 + 1, p["be2"] * 0
    module = _build(cls, e, h, f, dropout=prob, norm_first=False, p=p, dtype=F64, train=True)
    x = _data(rng, b, n, e)
    label = (
        f"{_signature(e, h, f, prob, False, 'relu')} in training mode [float64], norm2 without affine, on x of shape {(b, n, e)}"
    )
    out = _placement_run(module, x, label, torch_seed)
    mean, var = out.mean(axis=-1), out.var(axis=-1)
    if _float(T.np_max(T.np_abs(mean))) > 1e-6 or _float(T.np_max(T.np_abs(var - 1))) > 1e-3:
        raise CheckFailure(f"{label}: dropout acts in the wrong place.\n  Likely mistake: {DROPOUT_SITES['after_norm']}")


def _check_gradients(cls, rng) -> None:
    """float64: every parameter gets a gradient, and d(out)/dx agrees with finite differences."""
    e, h, f, b, n = 6, 2, 10, 2, 4
    for norm_first in (True, False):
        p = _random_params(rng, e, f)
        module = _build(cls, e, h, f, norm_first=norm_first, p=p, dtype=F64)
        sig = _signature(e, h, f, 0.0, norm_first, "relu")
        x, v, w = _data(rng, b, n, e), _data(rng, b, n, e), _data(rng, b, n, e)
        label = f"{sig} in float64: the gradient of sum(w * block(x)) with x of shape {(b, n, e)}"
        xt = R.requires_grad_(R.tensor_of(x, F64))
        wt = R.tensor_of(w, F64)
        names = [name for name, _ in R.named_parameters(module)]
        try:
            reply = output_gradients(module, xt, output_index=None, grad_output=wt, params=names, inputs=(0,))
        except NotImplementedError:
            raise CheckFailure(f"{label}: not implemented yet (the cell still raises NotImplementedError).") from None
        except Exception as exc:  # noqa: BLE001
            raise CheckFailure(
                f"{label} could not be computed ({T.type_name(exc)}: {exc}). Part of the block is cut off from autograd: "
                "no .detach(), .data, torch.no_grad() or NumPy round trips in forward."
            ) from None
        out = reply["result"]
        if not T.is_tensor(out):
            raise CheckFailure(f"{label}: the output should be a torch.Tensor, got {T.type_name(out)}.")
        if not reply["requires_grad"]:
            raise CheckFailure(
                f"{label} could not be computed (the output carries no gradient). Part of the block is cut off from "
                "autograd: no .detach(), .data, torch.no_grad() or NumPy round trips in forward."
            )
        grads = reply["grads"]
        if (
            T._type(grads) is not T._list
            or T._len(grads) != 1 + T._len(names)
            or not all(t is None or T.is_tensor(t) for t in grads)
        ):
            raise CheckFailure(f"{label}: the gradients came back as {T.type_name(grads)}, not one tensor per parameter.")
        cut = [name for name, g in zip(names, grads[1:], strict=True) if g is None]
        if cut:
            raise CheckFailure(
                f"{label}: no gradient reaches {cut}. Every parameter must take part in the output, through operations "
                "autograd can follow (no .detach(), .data or torch.no_grad())."
            )
        g = T.tensor_to_float64(grads[0]) if grads[0] is not None else None
        if g is None:
            raise CheckFailure(f"{label}: no gradient reaches the input x: part of the block is cut off from autograd.")
        step = 1e-6
        with R.fork_rng(devices=[]):
            plus = T.tensor_to_float64(_forward(module, label, R.tensor_of(x + step * v, F64), {}))
            minus = T.tensor_to_float64(_forward(module, label, R.tensor_of(x - step * v, F64), {}))
        numeric = _float(((plus - minus) * w).sum() / (2 * step))
        analytic = _float((g * v).sum())
        if _abs(numeric - analytic) > 1e-5 * (1 + abs(numeric)):
            raise CheckFailure(
                f"{label}: the directional derivative from autograd is {analytic:.6g}, but finite differences of your "
                f"forward give {numeric:.6g}. Part of the computation is hidden from autograd (for example a residual "
                "added as x.detach() or x.data)."
            )


def visible_TransformerBlock(cls) -> None:
    """Both norm placements, both activations, a causal mask, padding, is_causal, and dropout off in eval mode."""
    rng = T.default_rng(0)
    _case(cls, rng, 8, 2, 16, 2, 5, defaults=True, ctor_defaults=True, note=", defaults: norm_first=True, activation='relu'")
    causal = T.np_triu(T.np_ones((5, 5), dtype=T.np_bool), 1)
    _case(cls, rng, 8, 2, 16, 2, 5, norm_first=False, am=causal, note=", causal bool mask, True = not allowed")
    kpm = T.np_array([[False, False, False, True, True], [False, False, False, False, True]])
    _case(cls, rng, 8, 2, 16, 2, 5, activation="gelu", kpm=kpm, note=", True = padding")
    _case(cls, rng, 8, 4, 12, 2, 6, norm_first=False, activation="gelu", causal=True, train=False, note=", no attn_mask")
    _check_dropout_eval(cls, rng, norm_first=True)
    passed("TransformerBlock", 5)


def hidden_TransformerBlock(cls, seed: int = 51) -> None:
    """Odd sizes, float64, one head, d_ff < d_model, L = 1, float and 3D masks, both masks, is_causal with padding,
    large and tiny inputs (LayerNorm eps), last_attention refreshed, dropout in eval and training mode, gradients."""
    rng = T.default_rng(seed)
    count = 0

    def case(*args, **kw):
        nonlocal count
        _case(cls, rng, *args, **kw)
        count += 1

    for norm_first in (True, False):
        case(15, 5, 7, 3, 7, norm_first=norm_first, activation="gelu", dtype=F64, train=False, note=", odd sizes")
        case(6, 1, 4, 2, 5, norm_first=norm_first, note=", one head, d_ff < d_model")
        case(8, 2, 16, 2, 1, norm_first=norm_first, activation="gelu", note=", one token")
        fm = rng.normal(size=(5, 5)).astype(T.np_float32).astype(T.np_float64)
        fm[T.np_triu(T.np_ones((5, 5), dtype=T.np_bool), 1)] = -T.inf
        case(8, 2, 16, 2, 5, norm_first=norm_first, am=fm, note=", a float mask with -inf above the diagonal")
        am3 = rng.random(size=(2 * 2, 4, 4)) < 0.4
        am3[:, :, 0] = False
        case(8, 2, 16, 2, 4, norm_first=norm_first, activation="gelu", am=am3, note=", a 3D mask, one per (batch, head)")
        kpm = T.np_zeros((3, 6), dtype=T.np_bool)
        kpm[0, 4:] = True
        kpm[2, 1:] = True
        case(8, 4, 8, 3, 6, norm_first=norm_first, kpm=kpm, causal=True, note=", is_causal=True and padding")
        both = rng.random(size=(6, 6)) < 0.3
        both[:, 0] = False
        case(8, 2, 16, 3, 6, norm_first=norm_first, kpm=kpm, am=both, train=False, note=", both masks")
        case(8, 2, 16, 2, 5, norm_first=norm_first, activation="gelu", scale=20.0, note=", large inputs")
        case(8, 2, 16, 2, 5, norm_first=norm_first, activation="gelu", scale=1e-3, shift=2.0, note=", nearly constant tokens")
    causal = T.np_triu(T.np_ones((5, 5), dtype=T.np_bool), 1)
    case(8, 2, 16, 2, 5, am=causal, causal=True, dtype=F64, note=", is_causal=True with its causal mask")

    # last_attention belongs to the LAST call: a second call with another length must replace it.
    p = _random_params(rng, 8, 16)
    module = _build(cls, 8, 2, 16, p=p, train=False)
    sig = _signature(8, 2, 16, 0.0, True, "relu")
    for n in (6, 3):
        _block_case(
            module,
            p,
            _data(rng, 2, n, 8),
            2,
            norm_first=True,
            activation="relu",
            mode="eval mode",
            sig=sig,
            note=f", call {1 if n == 6 else 2} of 2",
        )
    count += 1

    _check_dropout_eval(cls, rng, norm_first=False)
    _check_dropout_train(cls, rng)
    _check_gradients(cls, rng)
    passed("TransformerBlock", count + 3, hidden=True)


# ---------------------------------------------------------------------------------------------
# previous_token_score and induction_score
# ---------------------------------------------------------------------------------------------


def _offset_mean(w: np.ndarray, offset: int, start: int, denominator: int | None = None) -> np.ndarray:
    """Mean over queries i = start .. L-1 of w[:, i, i + offset] (or their sum / denominator)."""
    n = w.shape[-1]
    rows = T.np_arange(start, n)
    rows = rows[(rows + offset >= 0) & (rows + offset < n)]
    vals = w[:, rows, rows + offset]
    return vals.sum(axis=-1) / (denominator if denominator is not None else T._len(rows))


def _causal_weights(rng, h: int, n: int, scale: float = 2.0, causal: bool = True) -> np.ndarray:
    s = rng.normal(size=(h, n, n)) * scale
    if causal:
        s = T.np_where(T.np_triu(T.np_ones((n, n), dtype=T.np_bool), 1), -T.inf, s)
    e = T.np_exp(s - s.max(axis=-1, keepdims=True))
    return T.np_array((e / e.sum(axis=-1, keepdims=True)).astype(T.np_float32), dtype=T.np_float64)


def _score_result(fn, args: tuple, *, label: str, h: int, n: int, given: torch.Tensor) -> np.ndarray:
    before = R.clone(given)
    result = call(fn, *args, label=label)
    actual = to_float64(result, label=label)
    if not R.t_equal(given, before):
        raise CheckFailure(f"{label}: your function changed the weights in place; work on a copy.")
    shape = T._tuple(actual.shape)
    if shape != (h,):
        hint = ""
        if shape == ():
            hint = "\n  Likely mistake: you averaged over the heads too. Return one score per head: average over queries only."
        elif shape == (n,) and n != h:
            hint = (
                "\n  Likely mistake: one number per position instead of per head. torch.diagonal takes its diagonal "
                "from dims 0 and 1 by default: pass dim1=-2, dim2=-1 to read each head's (L, L) matrix."
            )
        elif T._len(shape) == 2:
            hint = "\n  Likely mistake: the result is not averaged over the queries yet: take the mean over the last axis."
        raise CheckFailure(f"{label}: should return one score per head, shape (H,) = {(h,)}, got {shape}.{hint}")
    return actual


PREV_MISTAKES = {
    "diag": "read the diagonal (key i, the query's own token) instead of key i - 1, the token before it",
    "next": (
        "read key i + 1 instead of key i - 1 (rows are queries, columns are keys: weights[h, i, i - 1]; "
        "torch.diagonal's offset -1 is the diagonal below the main one)"
    ),
    "all_queries": "averaged over all L queries; query 0 has no previous token and must be left out: divide by L - 1",
    "sum": "summed over the queries instead of averaging: divide by the number of queries, L - 1",
}


def _prev_fingerprints(w: np.ndarray) -> dict:
    n = w.shape[-1]
    return {
        PREV_MISTAKES["diag"]: lambda: _offset_mean(w, 0, 0),
        PREV_MISTAKES["diag"] + " (over queries 1 .. L-1)": lambda: _offset_mean(w, 0, 1),
        PREV_MISTAKES["next"]: lambda: _offset_mean(w, 1, 0),
        PREV_MISTAKES["all_queries"]: lambda: _offset_mean(w, -1, 1, n),
        PREV_MISTAKES["sum"]: lambda: _offset_mean(w, -1, 1, 1),
    }


def _check_prev_case(fn, w: np.ndarray, dtype=F32, note: str = "") -> None:
    h, n, _ = w.shape
    label = f"previous_token_score(weights) with weights of shape {(h, n, n)}{note}"
    given = R.tensor_of(w, dtype)
    actual = _score_result(fn, (given,), label=label, h=h, n=n, given=given)
    expected = _offset_mean(w, -1, 1)
    atol = 1e-9 if dtype == F64 else 1e-6
    expect_close(actual, expected, label=label, what="result (one score per head)", atol=atol, fingerprints=_prev_fingerprints(w))


def _toy_heads(n: int) -> np.ndarray:
    """Three heads on L = n: a perfect previous-token head, causal uniform attention, attention to itself."""
    prev = _eye(n, k=-1)
    prev[0, 0] = 1.0
    uniform = _tril(T.np_ones((n, n))) / T.np_arange(1, n + 1)[:, None]
    return T.np_array([prev, uniform, _eye(n)], dtype=T.np_float64)


def visible_previous_token_score(fn) -> None:
    """Three hand-made heads (scores 1, the causal average, 0) and random causal attention."""
    _check_prev_case(fn, _toy_heads(5), note=" (previous-token, uniform causal and self heads)")
    _check_prev_case(fn, _causal_weights(T.default_rng(0), 4, 7), note=" (random causal attention)")
    passed("previous_token_score", 2)


def hidden_previous_token_score(fn, seed: int = 52) -> None:
    """L = 2, one head, non-causal weights, float64, many heads, long sequences."""
    rng = T.default_rng(seed)
    _check_prev_case(fn, _causal_weights(rng, 3, 2), note=" (L = 2: one query counts)")
    _check_prev_case(fn, _causal_weights(rng, 1, 6), note=" (one head)")
    _check_prev_case(fn, _causal_weights(rng, 5, 6, causal=False), note=" (attention to every key, not causal)")
    _check_prev_case(fn, _causal_weights(rng, 3, 9, causal=False), F64, " (float64)")
    _check_prev_case(fn, _causal_weights(rng, 12, 12), note=" (H = L)")
    _check_prev_case(fn, _causal_weights(rng, 4, 64, scale=4.0), note=" (L = 64)")
    passed("previous_token_score", 6, hidden=True)


IND_MISTAKES = {
    "occurrence": (
        "read key i - period, the earlier occurrence of the query's own token, instead of key i - period + 1, the "
        "token that came after it (an induction head looks at what followed last time)"
    ),
    "from_period_minus_1": (
        "included query period - 1: its token has not occurred before. Average over the queries i = period .. L-1 "
        "only (a diagonal that starts at query period - 1 has one entry too many)"
    ),
    "all_queries": "averaged over all L queries; only the L - period queries i >= period count: divide by L - period",
    "previous": "measured attention to the previous token (key i - 1) instead of key i - period + 1",
    "transposed": "read weights[h, i - period + 1, i]: rows are queries and columns are keys, so read weights[h, i, i - period + 1]",
    "two_ahead": "read key i - period + 2: the token after the previous occurrence sits at i - period + 1",
    "sum": "summed over the queries instead of averaging: divide by the number of queries, L - period",
}


def _ind_fingerprints(w: np.ndarray, period: int) -> dict:
    n = w.shape[-1]
    return {
        IND_MISTAKES["occurrence"]: lambda: _offset_mean(w, -period, period),
        IND_MISTAKES["from_period_minus_1"]: lambda: _offset_mean(w, 1 - period, period - 1),
        IND_MISTAKES["all_queries"]: lambda: _offset_mean(w, 1 - period, period, n),
        IND_MISTAKES["previous"]: lambda: _offset_mean(w, -1, 1),
        IND_MISTAKES["previous"] + " over the queries i >= period": lambda: _offset_mean(w, -1, period),
        IND_MISTAKES["transposed"]: lambda: _offset_mean(w, period - 1, 1),
        IND_MISTAKES["transposed"] + " (from query 0)": lambda: _offset_mean(w, period - 1, 0),
        IND_MISTAKES["two_ahead"]: lambda: _offset_mean(w, 2 - period, period),
        IND_MISTAKES["sum"]: lambda: _offset_mean(w, 1 - period, period, 1),
    }


def _check_ind_case(fn, w: np.ndarray, period: int, dtype=F32, note: str = "") -> None:
    h, n, _ = w.shape
    label = f"induction_score(weights, period={period}) with weights of shape {(h, n, n)}{note}"
    given = R.tensor_of(w, dtype)
    actual = _score_result(fn, (given, period), label=label, h=h, n=n, given=given)
    expected = _offset_mean(w, 1 - period, period)
    atol = 1e-9 if dtype == F64 else 1e-6
    expect_close(
        actual, expected, label=label, what="result (one score per head)", atol=atol, fingerprints=_ind_fingerprints(w, period)
    )


def _toy_induction(period: int) -> np.ndarray:
    """Three heads on a sequence repeated twice: a perfect induction head, a previous-token head, uniform causal."""
    n = 2 * period
    ind = T.np_zeros((n, n))
    for i in range(n):
        ind[i, i - period + 1 if i >= period else 0] = 1.0
    prev = _eye(n, k=-1)
    prev[0, 0] = 1.0
    uniform = _tril(T.np_ones((n, n))) / T.np_arange(1, n + 1)[:, None]
    return T.np_array([ind, prev, uniform], dtype=T.np_float64)


def visible_induction_score(fn) -> None:
    """Hand-made induction, previous-token and uniform heads; random attention on three repeats."""
    _check_ind_case(fn, _toy_induction(4), 4, note=" (induction, previous-token and uniform causal heads)")
    _check_ind_case(fn, _causal_weights(T.default_rng(1), 4, 9), 3, note=" (random causal attention, three repeats)")
    passed("induction_score", 2)


def hidden_induction_score(fn, seed: int = 53) -> None:
    """period 1 and 2, period = L - 1 (one query), non-causal weights, float64, long sequences."""
    rng = T.default_rng(seed)
    _check_ind_case(fn, _causal_weights(rng, 3, 6), 1, note=" (period 1: every token repeats the last)")
    _check_ind_case(fn, _causal_weights(rng, 3, 8), 2, note=" (period 2)")
    _check_ind_case(fn, _causal_weights(rng, 2, 7), 6, note=" (period = L - 1: one query counts)")
    _check_ind_case(fn, _causal_weights(rng, 5, 10, causal=False), 4, note=" (attention to every key, not causal)")
    _check_ind_case(fn, _causal_weights(rng, 4, 11), 5, F64, " (float64, odd length)")
    _check_ind_case(fn, _causal_weights(rng, 6, 64, scale=4.0), 20, note=" (L = 64, period 20)")
    passed("induction_score", 6, hidden=True)


# {exercise: (visible points, hidden points)}, in the order the exercises appear.
POINTS = {
    "TransformerBlock": (3, 3),
    "previous_token_score": (1, 1),
    "induction_score": (1, 1),
}
