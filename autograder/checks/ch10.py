"""Checks for chapter 10, heads across devices (tensor-parallel multi-head attention).

Oracles, all computed here and never taken from ``solutions/``:

* ``shard_heads``: the expected shard is built with NumPy index arrays, head by head (query
  rows of head j are j*D .. (j+1)*D - 1, key rows E + ..., value rows 2E + ...), and compared
  exactly (slicing does not round).
* ``TensorParallelMultiHeadAttention``: multi-head attention written out in float64 NumPy with
  the full weights, forward and backward (softmax's backward by hand); ``tests/test_ch10.py``
  proves both equal ``nn.MultiheadAttention`` and its autograd. The layer runs on 1 to 4 real
  ranks: processes forked from the grading kernel (so a class defined in a notebook cell is
  inherited, nothing is imported), joined in a gloo process group over a ``FileStore`` in a fresh
  temporary folder and the loopback interface. Each rank builds the layer from the contract's
  constructor, ``(embed_dim, num_heads, group=None, bias=True)``, in the default group or in a
  group the check makes (2 ranks of 3, and a rank alone), loads the shard that the check cuts
  itself (not the student's ``shard_heads``), runs the forward and, in the gradient cases,
  ``torch.autograd.grad`` of ``sum(out * G)`` with respect to the inputs and parameters, and
  writes the results to a file. Every rank must hold the single-device layer's input gradients
  in full and its own slices of the weight and bias gradients. The kernel waits with a hard
  deadline and kills stragglers, so a deadlock (an all-reduce on only some ranks) becomes a
  message, not a stuck grader. The children's stdout and stderr go to files, never to the
  notebook. While the gradient cases run, a dispatch mode notes each collective the layer calls
  and whether autograd was recording then (to name a plain in-place ``dist.all_reduce``).
  Where no loopback network exists, the ranks run as threads of the kernel whose
  ``torch.distributed.all_reduce``, ``get_rank`` and ``get_world_size`` are simulated (restored
  afterwards); the message of a failure says which of the two ran.

Wrong answers are compared with the outputs of known mistakes to name them. Everything a
student cell could rebind is captured when this module is imported, which the chapter's setup
cell does before any student code runs.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from autograder.checks import torch_refs as R
from autograder.checks import trusted as T
from autograder.checks.common import CheckFailure, call, diagnose, is_or_are, max_error, passed, show
from autograder.checks.torch_refs import BOOL, F32, F64
from autograder.grading.remote import current_remote, is_remote

# ---------------------------------------------------------------------------------------------
# References captured at import time (a student cell may rebind torch, numpy or os attributes).
# Those most chapters share are in torch_refs (R.dtype_of, R.MHA, ...) and trusted (T.np_where, ...).
_set_num_threads = torch.set_num_threads
_module_eval = torch.nn.Module.eval
_all_reduce = dist.all_reduce
_init_pg = dist.init_process_group
_dist_barrier = dist.barrier
_is_initialized = dist.is_initialized
_FileStore = dist.FileStore
_ReduceOp = dist.ReduceOp
_new_group = dist.new_group
_get_rank = dist.get_rank
_get_world_size = dist.get_world_size
_is_grad_enabled = torch.is_grad_enabled
_TorchDispatchMode = TorchDispatchMode
_detach = torch._C.TensorBase.detach
_requires_grad_of = torch._C.TensorBase.__dict__["requires_grad"].__get__

_fork = getattr(os, "fork", None)
_waitpid = os.waitpid
_kill = os.kill
_os_exit = os._exit
_os_open = os.open
_dup2 = os.dup2
_rename = os.rename
_path_join = os.path.join
_path_exists = os.path.exists
_environ = os.environ
_mkdtemp = tempfile.mkdtemp
_rmtree = shutil.rmtree
_pickle_dump = pickle.dump
_pickle_load = pickle.load
_open = open
_monotonic = time.monotonic
_sleep = time.sleep
_Thread = threading.Thread
_Barrier = threading.Barrier
_Lock = threading.Lock
_local = threading.local
_BrokenBarrier = threading.BrokenBarrierError
_timedelta = datetime.timedelta
_int = int
_float = float
_bool = bool
_str = str
_dict = dict
_list = list
_range = range
_enumerate = enumerate
_isinstance = isinstance
_getattr = getattr
_setattr = setattr
_sorted = sorted
_repr = repr

COLLECTIVE_TIMEOUT_S = 6.0  # gloo gives up on a collective after this long
DEADLINE_S = 20.0  # the kernel kills every rank still running after this long
GRACE_S = 0.5  # after one rank fails, the others get this long before they are killed

DEADLOCK = (
    "deadlock: a collective waits until every rank of the group calls it. Call every all-reduce on every rank of "
    "the group, the same number of times and in the same order (not under `if self.rank == 0:`), forward and backward."
)


# ---------------------------------------------------------------------------------------------
# Weights and the head-by-head slicing
# ---------------------------------------------------------------------------------------------


def _params(rng, e: int, bias: bool, dtype=F32) -> dict:
    """Random weights of a multi-head layer (rounded to ``dtype``), as float64 NumPy arrays."""
    s = 1 / T.sqrt(e)
    p = {"in_proj_weight": rng.normal(size=(3 * e, e), scale=s), "out_proj.weight": rng.normal(size=(e, e), scale=s)}
    if bias:
        p["in_proj_bias"] = rng.normal(size=3 * e, scale=0.5)
        p["out_proj.bias"] = rng.normal(size=e, scale=0.5)
    return {k: R.rounded(v, dtype) for k, v in p.items()}


def _features(heads, d: int) -> np.ndarray:
    """The feature (row) indices of the given heads within one E x E block."""
    return T.np_concat([T.np_arange(j * d, (j + 1) * d) for j in heads]).astype(_int)


def _rank_heads(r: int, p: int, h: int, variant: str = "") -> list[int]:
    per = h // p
    if variant == "round_robin":
        return [r + i * p for i in _range(per)]
    if variant == "reversed_ranks":
        r = p - 1 - r
    return _list(_range(r * per, (r + 1) * per))


def _shard(params: dict, r: int, p: int, h: int, variant: str = "") -> dict:
    """The shard of rank r (NumPy), or what a known mistake produces."""
    w = params["in_proj_weight"]
    e = w.shape[1]
    d = e // h
    cols = _features(_rank_heads(r, p, h, variant), d)
    rows = T.np_concat([cols, e + cols, 2 * e + cols])
    n = T._len(cols)
    if variant == "contiguous":
        rows = T.np_arange(r * 3 * n, (r + 1) * 3 * n)
    elif variant == "interleaved":  # [q, k, v] of the first head, then of the second, ...
        rows = T.np_concat([T.np_concat([c, e + c, 2 * e + c]) for c in (cols[i * d : (i + 1) * d] for i in _range(n // d))])
    elif variant == "kv_local_offset":  # K and V rows offset by the shard width instead of E
        rows = T.np_concat([cols, n + cols, 2 * n + cols])
    out = {"in_proj_weight": w[rows]}
    if "in_proj_bias" in params:
        b = params["in_proj_bias"]
        if variant == "bias_unsliced":
            out["in_proj_bias"] = b
        elif variant == "bias_contiguous":
            out["in_proj_bias"] = b[r * 3 * n : (r + 1) * 3 * n]
        else:
            out["in_proj_bias"] = b[rows]
    wo = params["out_proj.weight"]
    out["out_proj.weight"] = wo[cols, :] if variant == "out_rows" else wo[:, cols]
    if variant == "out_transposed":
        out["out_proj.weight"] = wo[cols, :].T
    if "out_proj.bias" in params:
        bo = params["out_proj.bias"]
        out["out_proj.bias"] = {"bias_divided": bo / p, "bias_rank0": bo if r == 0 else 0 * bo}.get(variant, bo)
    return out


# ---------------------------------------------------------------------------------------------
# shard_heads
# ---------------------------------------------------------------------------------------------

SHARD_MISTAKES = {
    "contiguous": (
        "sliced one contiguous block of the packed in_proj_weight (rows r*3E/p .. (r+1)*3E/p - 1). Those rows mix "
        "heads of Q, K and V that belong to other ranks: slice per head within each of Q, K and V "
        "(w_q, w_k, w_v = w.chunk(3); take the same rows of each; concatenate)."
    ),
    "interleaved": (
        "interleaved Q, K and V head by head ([q, k, v] of the first head, then of the second). Keep the packed "
        "layout of the full layer: all the rank's Q rows, then its K rows, then its V rows."
    ),
    "kv_local_offset": (
        "took the K and V rows at an offset of the shard width instead of E: in the full in_proj_weight W_k starts "
        "at row E and W_v at row 2E."
    ),
    "round_robin": (
        "assigned heads round-robin (rank r gets heads r, r+p, r+2p, ...). That is a valid split too, but the "
        "convention here is Megatron's contiguous block: rank r holds heads r*H/p .. (r+1)*H/p - 1."
    ),
    "reversed_ranks": "gave rank r the heads of rank p-1-r: the wrong head order across ranks. Rank 0 holds the first heads.",
    "out_rows": (
        "sliced rows of out_proj.weight instead of columns. The output projection maps the concatenated heads "
        "(its input features, the columns of the (E, E) weight) to E outputs: take out_proj.weight[:, cols]."
    ),
    "out_transposed": "returned out_proj.weight's rows, transposed: take the columns out_proj.weight[:, cols] directly.",
    "bias_unsliced": "left in_proj_bias whole: slice it with the same indices as the rows of in_proj_weight.",
    "bias_contiguous": (
        "sliced in_proj_bias as one contiguous block instead of per head within each of Q, K and V (the same "
        "indices as the weight rows)."
    ),
    "bias_divided": (
        "divided the output bias by world_size. In this chapter's convention every shard holds the whole "
        "out_proj.bias and the layer adds it once, after the all-reduce."
    ),
    "bias_rank0": (
        "kept the output bias on rank 0 only. In this chapter's convention every shard holds the whole "
        "out_proj.bias (so every rank can add it once, after the all-reduce)."
    ),
}


def _state_dict(params: dict, dtype, e: int, h: int, real_module: bool) -> dict:
    """The state dict handed to the student: a real ``nn.MultiheadAttention``'s, or a plain dict."""
    tensors = {k: R.tensor_of(v, dtype) for k, v in params.items()}
    if not real_module:
        return tensors
    with R.fork_rng(devices=[]):
        module = R.MHA(e, h, bias="in_proj_bias" in params, batch_first=True)
    R.module_to(module, dtype=dtype)
    R.module_load_state_dict(module, tensors)
    return R.module_state_dict(module)


def _check_shard_case(fn, rng, e: int, h: int, p: int, *, bias=True, dtype=F32, real_module=True, note="") -> int:
    params = _params(rng, e, bias, dtype)
    count = 0
    for r in _range(p - 1, -1, -1):  # the last rank first: on rank 0 several mistakes cut the same rows
        sd = _state_dict(params, dtype, e, h, real_module)
        before = {k: R.clone(v) for k, v in sd.items()}
        label = f"shard_heads(state_dict of a ({e}, {h}) layer{'' if bias else ' without bias'}, rank={r}, world_size={p}, num_heads={h}) [{R.dname(dtype)}{note}]"
        result = call(fn, sd, r, p, h, label=label)
        for k, v in before.items():
            if not R.t_equal(sd[k], v):
                raise CheckFailure(f"{label}: changed state_dict[{k!r}] in place; return new tensors instead.")
        _compare_shard(result, params, r, p, h, dtype, label)
        count += 1
    return count


def _compare_shard(result, params: dict, r: int, p: int, h: int, dtype, label: str) -> None:
    want = _shard(params, r, p, h)
    if not _isinstance(result, _dict):
        raise CheckFailure(f"{label}: should return a dict of tensors, got {T.type_name(result)}.")
    keys = _sorted(_str(k) for k in result.keys())
    if keys != _sorted(want):
        extra = ""
        if "out_proj.bias" in want and "out_proj.bias" not in keys:
            extra = (
                "\n  Likely mistake: the shard needs the whole out_proj.bias too (the layer adds it once, after the all-reduce)."
            )
        raise CheckFailure(f"{label}: the shard should have exactly the keys {_sorted(want)}, got {keys}.{extra}")
    got = {}
    for k in want:
        v = result[k]
        if not T.is_tensor(v):
            raise CheckFailure(f"{label}: shard[{k!r}] should be a torch.Tensor, got {T.type_name(v)}.")
        if R.dtype_of(v) != dtype:
            raise CheckFailure(f"{label}: shard[{k!r}] should keep the dtype {R.dname(dtype)}, got {R.dname(R.dtype_of(v))}.")
        got[k] = T.tensor_to_float64(v)
    bad = [k for k in want if T._tuple(got[k].shape) != T._tuple(want[k].shape) or not T.np_array_equal(got[k], want[k])]
    if not bad:
        return
    mistake = None
    for variant, text in SHARD_MISTAKES.items():
        try:
            cand = _shard(params, r, p, h, variant)
        except Exception:  # noqa: BLE001  (a variant that does not apply here)
            continue
        if all(T._tuple(got[k].shape) == T._tuple(cand[k].shape) and T.np_array_equal(got[k], cand[k]) for k in bad):
            if all(T._tuple(got[k].shape) == T._tuple(cand[k].shape) and T.np_array_equal(got[k], cand[k]) for k in want):
                mistake = text
                break
    k = bad[0]
    lines = []
    if T._tuple(got[k].shape) != T._tuple(want[k].shape):
        lines.append(f"{label}: shard[{k!r}] should have shape {T._tuple(want[k].shape)}, got {T._tuple(got[k].shape)}.")
    else:
        lines.append(f"{label}: shard[{k!r}] holds the wrong numbers (largest difference {max_error(got[k], want[k]):.3g}).")
        lines += [f"  expected: {show(want[k])}", f"  got:      {show(got[k])}"]
    if T._len(bad) > 1:
        lines.append(f"  Also wrong: {', '.join(bad[1:])}.")
    if mistake:
        lines.append(f"  Likely mistake: {mistake}")
    else:
        lines.append(
            f"  Rank {r} of {p} holds heads {_rank_heads(r, p, h)[0]} .. {_rank_heads(r, p, h)[-1]}: their rows in each of "
            "W_q, W_k, W_v (stacked in that order), the same entries of in_proj_bias, the matching columns of "
            "out_proj.weight, and the whole out_proj.bias."
        )
    raise CheckFailure("\n".join(lines))


def _expect_value_error(fn_or_cls, args: tuple, label: str, why: str, kwargs: dict | None = None) -> None:
    try:
        with R.fork_rng(devices=[]):
            fn_or_cls(*args, **(kwargs or {}))
    except ValueError:
        return
    except NotImplementedError:
        raise CheckFailure(f"{label}: not implemented yet (the cell still raises NotImplementedError).") from None
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(f"{label}: should raise ValueError ({why}); it raised {T.type_name(exc)}: {exc}.") from None
    raise CheckFailure(f"{label}: should raise ValueError ({why}); it returned without an error.")


def visible_shard_heads(fn) -> None:
    """Two and four ranks, with and without bias; the ValueError for heads that do not split evenly."""
    rng = T.default_rng(90)
    count = _check_shard_case(fn, rng, 8, 4, 2)
    count += _check_shard_case(fn, rng, 8, 4, 4, bias=False)
    sd = _state_dict(_params(rng, 12, True), F32, 12, 6, True)
    _expect_value_error(
        fn, (sd, 0, 4, 6), "shard_heads(state_dict, rank=0, world_size=4, num_heads=6)", "6 heads do not split over 4 ranks"
    )
    passed("shard_heads", count + 1)


def hidden_shard_heads(fn, seed: int = 91) -> None:
    """One rank, eight ranks, float64, plain dicts, wide heads, more ValueErrors."""
    rng = T.default_rng(seed)
    count = _check_shard_case(fn, rng, 12, 6, 3, dtype=F64, real_module=False, note=", a plain dict")
    count += _check_shard_case(fn, rng, 16, 8, 8, note=", one head per rank")
    count += _check_shard_case(fn, rng, 8, 2, 1, note=", one rank holds everything")
    count += _check_shard_case(fn, rng, 24, 4, 2, dtype=F64, bias=False, note=", head_dim 6")
    count += _check_shard_case(fn, rng, 32, 8, 2, note=", four heads per rank")
    sd = _state_dict(_params(rng, 16, True), F32, 16, 8, True)
    _expect_value_error(
        fn, (sd, 1, 3, 8), "shard_heads(state_dict, rank=1, world_size=3, num_heads=8)", "8 heads do not split over 3 ranks"
    )
    passed("shard_heads", count + 1, hidden=True)


# ---------------------------------------------------------------------------------------------
# The float64 oracle of the whole layer, forward and backward, and the outputs of known mistakes
# ---------------------------------------------------------------------------------------------


def _softmax_rows(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax over the last axis with disallowed entries removed; a row with nothing allowed gives zeros."""
    with T.np_errstate(all="ignore"):
        s = T.np_where(allowed, scores, -T.inf)
        top = s.max(axis=-1, keepdims=True)
        top = T.np_where(T.np_isfinite(top), top, 0.0)
        ex = T.np_where(allowed, T.np_exp(s - top), 0.0)
        total = ex.sum(axis=-1, keepdims=True)
        return T.np_where(total > 0, ex / T.np_where(total > 0, total, 1.0), 0.0)


def _additive(mask) -> tuple[np.ndarray, np.ndarray]:
    """(additive float mask, allowed bool) of a student-convention mask: bool True = not allowed."""
    if mask.dtype == T.np_bool:
        return T.np_zeros(mask.shape), ~mask
    return mask, T.np_isfinite(mask) | (mask > 0)


def _masked(case: dict, scores: np.ndarray, variant: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(scores with the case's masks added, allowed (B, 1 or h, L, S)), or what a masking mistake gives."""
    bsz, _, lq, ls = scores.shape
    allowed = T.np_ones((bsz, 1, lq, ls), dtype=T.np_bool)
    if case.get("attn_mask") is not None and variant != "attn_mask_ignored":
        add, ok = _additive(case["attn_mask"])
        if variant == "inverted_masks" and case["attn_mask"].dtype == T.np_bool:
            ok = ~ok
        scores = scores + add
        allowed = allowed & ok
    elif case.get("is_causal") and variant != "causal_ignored":
        i, j = T.np_arange(lq)[:, None], T.np_arange(ls)[None, :]
        allowed = allowed & (j <= i)
    if case.get("key_padding_mask") is not None and variant != "padding_ignored":
        add, ok = _additive(case["key_padding_mask"])
        if variant == "inverted_masks" and case["key_padding_mask"].dtype == T.np_bool:
            ok = ~ok
        scores = scores + add[:, None, None, :]
        allowed = allowed & ok[:, None, None, :]
    return scores, allowed


def _projected(params: dict, case: dict, cols) -> list[np.ndarray]:
    """The query, key and value inputs through the features ``cols`` of W_q, W_k and W_v (and their biases):
    three (B, T, len(cols)) arrays."""
    w, b = params["in_proj_weight"], params.get("in_proj_bias")
    e = case["query"].shape[-1]
    out = []
    for offset, x in zip((0, e, 2 * e), (case["query"], case["key"], case["value"]), strict=True):
        y = x @ w[offset + cols].T
        out.append(y if b is None else y + b[offset + cols])
    return out


def _heads_out(params: dict, case: dict, heads_idx: list[int], h: int, variant: str = "") -> np.ndarray:
    """Attention outputs (B, L, len(heads_idx)*D) of the given heads, written out in float64."""
    e = case["query"].shape[-1]
    d = e // h
    cols = _features(heads_idx, d)
    n_heads = T._len(heads_idx)
    if variant == "all_heads_local":  # the rank's features split into all h heads
        d, n_heads = T._len(cols) // h, h

    def split(a):
        bsz, t, _ = a.shape
        if variant == "split_view":
            return a.reshape(bsz, n_heads, t, d)
        return a.reshape(bsz, t, n_heads, d).transpose(0, 2, 1, 3)

    q, k, v = (split(a) for a in _projected(params, case, cols))
    scale = {"scale_local_width": 1 / T.sqrt(T._len(cols)), "scale_embed": 1 / T.sqrt(e), "no_scale": 1.0}.get(
        variant, 1 / T.sqrt(d)
    )
    scores, allowed = _masked(case, (q @ k.transpose(0, 1, 3, 2)) * scale, variant)
    out = _softmax_rows(scores, allowed) @ v
    bsz, _, lq, _ = out.shape
    if variant == "merge_view":
        return out.reshape(bsz, lq, n_heads * d)
    return out.transpose(0, 2, 1, 3).reshape(bsz, lq, n_heads * d)


def _heads_backward(params: dict, case: dict, heads_idx: list[int], h: int, grad_out: np.ndarray) -> tuple[dict, list]:
    """The gradients of sum(Y * grad_out), Y = the given heads through their columns of W_O (no bias), in float64.

    Returns (parameter gradients in the full layer's layout, zero outside these heads and for the
    output bias; [d query input, d key input, d value input]). Written out by hand: softmax's
    backward dS = P * (dP - rowsum(dP * P)); ``tests/test_ch10.py`` proves it equals autograd.
    """
    q_in, k_in, v_in = case["query"], case["key"], case["value"]
    e = q_in.shape[-1]
    d = e // h
    w = params["in_proj_weight"]
    b = params.get("in_proj_bias")
    cols = _features(heads_idx, d)
    n = T._len(cols)

    def split(a):  # (B, T, n) -> (B, h_r, T, D)
        return a.reshape(a.shape[0], a.shape[1], n // d, d).transpose(0, 2, 1, 3)

    def merge(a):  # (B, h_r, T, D) -> (B, T, n)
        return a.transpose(0, 2, 1, 3).reshape(a.shape[0], a.shape[2], n)

    q, k, v = (split(a) for a in _projected(params, case, cols))
    scale = 1 / T.sqrt(d)
    scores, allowed = _masked(case, (q @ k.transpose(0, 1, 3, 2)) * scale)
    weights = _softmax_rows(scores, allowed)
    heads = merge(weights @ v)
    d_heads = split(grad_out @ params["out_proj.weight"][:, cols])
    d_weights = d_heads @ v.transpose(0, 1, 3, 2)
    d_scores = weights * (d_weights - (d_weights * weights).sum(axis=-1, keepdims=True))
    d_proj = [
        merge(d_scores @ k) * scale,
        merge(d_scores.transpose(0, 1, 3, 2) @ q) * scale,
        merge(weights.transpose(0, 1, 3, 2) @ d_heads),
    ]
    grads = {"in_proj_weight": T.np_zeros(w.shape), "out_proj.weight": T.np_zeros(params["out_proj.weight"].shape)}
    grads["out_proj.weight"][:, cols] = grad_out.reshape(-1, e).T @ heads.reshape(-1, n)
    if b is not None:
        grads["in_proj_bias"] = T.np_zeros(b.shape)
        grads["out_proj.bias"] = T.np_zeros(e)
    d_inputs = []
    for offset, dy, x in zip((0, e, 2 * e), d_proj, (q_in, k_in, v_in), strict=True):
        grads["in_proj_weight"][offset + cols] = dy.reshape(-1, n).T @ x.reshape(-1, e)
        if b is not None:
            grads["in_proj_bias"][offset + cols] = dy.reshape(-1, n).sum(axis=0)
        d_inputs.append(dy @ w[offset + cols])
    return grads, d_inputs


def _per_argument(d_inputs: list, mode: str) -> list:
    """Gradients of the tensors the call passes: x once (self), (query, key) with value = key, or all three."""
    dq, dk, dv = d_inputs
    if mode == "self":
        return [dq + dk + dv]
    if mode == "query_key":
        return [dq, dk + dv]
    return [dq, dk, dv]


def _full_backward(params: dict, case: dict, h: int, grad_out: np.ndarray) -> tuple[dict, list]:
    """The single-device layer's gradients: (parameters, the call's arguments)."""
    grads, d_inputs = _heads_backward(params, case, _list(_range(h)), h, grad_out)
    if "out_proj.bias" in grads:
        grads["out_proj.bias"] = grad_out.reshape(-1, grad_out.shape[-1]).sum(axis=0)
    return grads, _per_argument(d_inputs, case["mode"])


def _partial(params: dict, case: dict, r: int, p: int, h: int, variant: str = "") -> np.ndarray:
    """Rank r's share of the output: its heads through its columns of the output projection (no bias)."""
    heads_idx = _rank_heads(r, p, h)
    cols = _features(heads_idx, case["query"].shape[-1] // h)
    return _heads_out(params, case, heads_idx, h, variant) @ params["out_proj.weight"][:, cols].T


def _bias(params: dict) -> np.ndarray:
    return params.get("out_proj.bias", T.np_float64(0.0))


def _oracle(params: dict, case: dict, h: int, variant: str = "") -> np.ndarray:
    """The full layer's output (B, L, E) in float64, or that of a mistake made in every head."""
    return _heads_out(params, case, _list(_range(h)), h, variant) @ params["out_proj.weight"].T + _bias(params)


F_AND_G = (
    "Megatron's pair does it: f (identity forward, all-reduce of the gradient backward) on each input before "
    "the projections, g (all-reduce forward, identity backward) on the partial output."
)

LAYER_MISTAKES = {
    "bias_every_rank": (
        "added the output bias on every rank before the all-reduce, so the sum holds it world_size times. Add the "
        "bias once: after the all-reduce (or on rank 0 only)."
    ),
    "no_all_reduce": (
        "no all-reduce: each rank returned only its own heads' share of the output. Sum the partial outputs over the "
        "ranks of self.group (g: an all-reduce forward) before adding the bias."
    ),
    "averaged": (
        "averaged the partial outputs (all-reduce, then divide by world_size) as data parallelism does with "
        "gradients. Each rank holds different heads: the full output is their sum, not their mean."
    ),
    "no_bias": "forgot the output projection's bias: add out_proj.bias once, after the all-reduce.",
    "scale_local_width": (
        "scaled the scores by 1/sqrt(E/p), the width of the rank's slice. The scale is per head: 1/sqrt(head_dim), "
        "the same as on one device."
    ),
    "scale_embed": "scaled the scores by 1/sqrt(embed_dim); the scale is 1/sqrt(head_dim) with head_dim = E // num_heads.",
    "all_heads_local": (
        "split the rank's features into all num_heads heads. A rank holds only num_heads // world_size heads, each "
        "of the full head_dim = E // num_heads."
    ),
    "split_view": "split heads with view/reshape to (B, h, T, D) directly: reshape to (B, T, h, D), then transpose(1, 2).",
    "merge_view": "merged heads with reshape without transpose: transpose(1, 2) back to (B, L, h, D) before reshaping.",
    "inverted_masks": "inverted a bool mask: True means *not allowed*, as in nn.MultiheadAttention and chapter 4.",
    "padding_ignored": "ignored key_padding_mask.",
    "attn_mask_ignored": "ignored attn_mask.",
    "causal_ignored": "ignored is_causal: with is_causal=True and no attn_mask, query i sees only keys j <= i.",
    "no_scale": "did not scale the scores by 1/sqrt(head_dim).",
    "group_ignored": (
        "ignored `group` in the all-reduce: it summed over every rank of the world (the default group), so the "
        "partial outputs of the other groups' ranks were added in too. Pass group=self.group to every collective."
    ),
}

GRAD_MISTAKES = {
    "in_place": (
        "dist.all_reduce in place on a tensor that autograd records: a plain all_reduce has no backward (PyTorch "
        "warns so), autograd lets the gradient through it unchanged, and nothing sums the input's gradient over "
        "the ranks, so each rank's input gradient is only its own heads' share. " + F_AND_G
    ),
    "no_f": (
        "no all-reduce of the input's gradient in the backward pass (no f at the input): each rank's input gradient "
        "is only its own heads' share; the true gradient is the sum of the shares over the ranks. " + F_AND_G
    ),
    "one_input_only": (
        "only some inputs went through f: the gradient of this argument is still only this rank's share. Pass "
        "every input (query, key and value; x once in self-attention) through f before its projection."
    ),
    "grad_summed_at_output": (
        "the output's all-reduce also sums the gradient in the backward pass (as torch.distributed.nn.functional."
        "all_reduce does), which multiplies the gradients by world_size: every rank already holds the whole "
        "gradient of the replicated output. g's backward is the identity; f sums the input's gradient."
    ),
    "averaged_grad": (
        "averaged the input's gradient over the ranks (all-reduce, then divide by world_size): the ranks' shares add "
        "up to the gradient, so f's backward is their sum, not their mean."
    ),
    "bias_split": (
        "split the output bias across the ranks (b / world_size on every rank, before the sum): the output is right "
        "but each copy of the bias gets 1/world_size of its gradient. Add the whole bias once, after the sum."
    ),
    "group_ignored_backward": (
        "ignored `group` in the backward pass: the input's gradient was summed over every rank of the world (the "
        "default group), not over the ranks of self.group. Pass the group to f and use it in its backward."
    ),
    "no_grad": (
        "no gradient reached it: the output does not depend on it through autograd (a detach(), torch.no_grad(), "
        "`.data`, or a new tensor built from its values?)."
    ),
}


def _layer_fingerprints(params: dict, case: dict, r: int, p: int, h: int, n_groups: int = 1) -> dict:
    full = lambda: _oracle(params, case, h)  # noqa: E731
    total = lambda: sum(_partial(params, case, q, p, h) for q in _range(p))  # noqa: E731
    prints = {
        LAYER_MISTAKES["bias_every_rank"]: lambda: total() + p * _bias(params),
        LAYER_MISTAKES["no_all_reduce"]: lambda: _partial(params, case, r, p, h) + _bias(params),
        LAYER_MISTAKES["no_all_reduce"] + " ": lambda: _partial(params, case, r, p, h),
        LAYER_MISTAKES["averaged"]: lambda: total() / p + _bias(params),
        LAYER_MISTAKES["no_bias"]: lambda: full() - _bias(params),
    }
    if n_groups > 1:  # every group runs the same layer: a world-wide sum adds n_groups copies of it
        prints[LAYER_MISTAKES["group_ignored"]] = lambda: n_groups * (full() - _bias(params)) + _bias(params)
    for v in ("scale_local_width", "scale_embed", "all_heads_local", "split_view", "merge_view", "no_scale"):
        prints[LAYER_MISTAKES[v]] = lambda v=v: sum(_partial(params, case, q, p, h, v) for q in _range(p)) + _bias(params)
    for v in ("inverted_masks", "padding_ignored", "attn_mask_ignored", "causal_ignored"):
        prints[LAYER_MISTAKES[v]] = lambda v=v: _oracle(params, case, h, v)
    return prints


# ---------------------------------------------------------------------------------------------
# Running one class on several ranks
# ---------------------------------------------------------------------------------------------

_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
_recording = _local()  # the thread's current list of (collective, grad mode on), or None


class _CollectiveRecorder(_TorchDispatchMode):
    """Notes every collective operator the layer calls, and whether autograd was recording at the time."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in _COLLECTIVE_NAMESPACES:
            self.calls.append((func.name(), _is_grad_enabled()))
        return func(*args, **(kwargs or {}))


def _rank_body(cls, jobs: list, r: int, p: int, new_group) -> list:
    """What rank r runs: every job on rank r. Returns one (ok, result-or-message) per job; stops at a failure."""
    out = []
    groups: dict = {}
    for job in jobs:
        try:
            for ranks in job.get("groups") or ():  # every rank creates every group, in the same order
                if T._tuple(ranks) not in groups:
                    groups[T._tuple(ranks)] = new_group(_list(ranks))
            out.append((True, _run_job_on_rank(cls, job, r, p, groups)))
        except CheckFailure as exc:
            out.append((False, _str(exc)))
            break
    return out


def _place(job: dict, r: int, p: int, groups: dict) -> tuple:
    """(group object or None, this rank's index in it, its size, a description) for world rank r."""
    for ranks in job.get("groups") or ():
        if r in ranks:
            return groups[T._tuple(ranks)], _list(ranks).index(r), T._len(ranks), f"ranks {_list(ranks)} of the world's {p}"
    return None, r, p, f"the default group of {p}"


def _ctor_label(job: dict, r: int, p: int) -> str:
    args = f"{job['e']}, {job['h']}"
    for ranks in job.get("groups") or ():
        if r in ranks:
            args += f", group=<a group of ranks {_list(ranks)}>"
    if job["bias"] is not None:
        args += f", bias={job['bias']}"
    return f"TensorParallelMultiHeadAttention({args})"


def _construct(cls, job: dict, r: int, p: int, groups: dict):
    group, _gr, gp, where = _place(job, r, p, groups)
    label = f"{_ctor_label(job, r, p)} on rank {r} ({where})"
    kwargs = {}
    if group is not None:
        kwargs["group"] = group
    if job["bias"] is not None:
        kwargs["bias"] = job["bias"]
    try:
        with R.fork_rng(devices=[]):
            return call(cls, job["e"], job["h"], label=label, **kwargs), label
    except CheckFailure as exc:
        text = _str(exc)
        if "TypeError" in text and ("rank" in text or "world_size" in text):
            text += (
                "\n  Likely mistake: the constructor still asks for rank and world_size. It is "
                "TensorParallelMultiHeadAttention(embed_dim, num_heads, group=None, bias=True) and reads both from "
                "the group: dist.get_rank(group), dist.get_world_size(group) (group=None: the default group)."
            )
        elif group is not None and "ValueError" in text:
            text += (
                f"\n  Likely mistake: the layer ignored `group`. This rank's group has {gp} rank(s), which share the "
                f"{job['h']} heads evenly, so the ValueError came from another size: take the rank and the size from "
                "dist.get_rank(group) and dist.get_world_size(group)."
            )
        raise CheckFailure(text) from None


def _run_job_on_rank(cls, job: dict, r: int, p: int, groups: dict):
    if job.get("kind") == "value_error":
        _group, _gr, gp, where = _place(job, r, p, groups)
        _expect_value_error(
            cls, (job["e"], job["h"]), f"{_ctor_label(job, r, p)} on rank {r} ({where})",
            f"{job['h']} heads do not split over {gp} ranks",
        )  # fmt: skip
        return None
    e, bias, dtype = job["e"], job["bias"], job["dtype"]
    layer, label = _construct(cls, job, r, p, groups)
    _group, gr, gp, _where = _place(job, r, p, groups)
    if not _isinstance(layer, R.Module):
        raise CheckFailure(f"{label}: should build an nn.Module (class ...(nn.Module)), got {T.type_name(layer)}.")
    n = e // gp
    want = {"in_proj_weight": (3 * n, e), "out_proj.weight": (e, n)}
    if bias is not False:
        want.update({"in_proj_bias": (3 * n,), "out_proj.bias": (e,)})
    params = _dict(R.named_parameters(layer))
    got = {k: T._tuple(v.shape) for k, v in params.items()}
    if got != want:
        hint = ""
        if got.get("in_proj_weight") == (3 * e, e):
            hint = "\n  Likely mistake: the layer holds the full (3E, E) projection; a rank holds only its 3E/p rows."
        elif got.get("out_proj.weight") == (n, e):
            hint = "\n  Likely mistake: out_proj holds rows; a rank holds columns: nn.Linear(E // world_size, E)."
        elif bias is None and "in_proj_bias" not in got:
            hint = "\n  Likely mistake: bias should default to True, as in nn.MultiheadAttention."
        elif gp != p and got.get("in_proj_weight") == (3 * (e // p), e):
            hint = (
                f"\n  Likely mistake: the layer ignored `group`: it split the heads over the world's {p} ranks, not over "
                f"the {gp} rank{'' if gp == 1 else 's'} of its group (dist.get_world_size(group))."
            )
        raise CheckFailure(
            f"{label}: the parameters should be exactly {want} (name: shape); got {got}. Name them as nn.MultiheadAttention "
            f"does so that load_state_dict(shard_heads(...)) works.{hint}"
        )
    shard = {k: R.tensor_of(v, dtype) for k, v in job["shards"][(gp, gr)].items()}
    try:
        R.module_to(layer, dtype=dtype)
        R.module_load_state_dict(layer, shard)
        _module_eval(layer)
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(f"{label}: load_state_dict(shard) failed: {exc}") from None
    args = [R.tensor_of(a, dtype) for a in job["inputs"]]
    kwargs = {}
    for name, value in job["kwargs"].items():
        kwargs[name] = (
            value
            if not _isinstance(value, np.ndarray)
            else (R.tensor_of(value, BOOL) if value.dtype == T.np_bool else R.tensor_of(value, dtype))
        )
    before = [R.clone(a) for a in args]
    call_label = f"{label}{job['call']} on rank {r} of {p}"
    grad_out = job.get("grad_out")
    fwd_calls: list = []
    if grad_out is None:
        with R.no_grad():
            result = call(layer, *args, label=call_label, **kwargs)
    else:
        for a in args:
            R.requires_grad_(a)
        _recording.calls = fwd_calls
        try:
            with _CollectiveRecorder(fwd_calls):
                result = call(layer, *args, label=call_label, **kwargs)
        finally:
            _recording.calls = None
    if not T.is_tensor(result):
        hint = " (return only the output tensor, not a tuple with weights)" if T._type(result) in (tuple, list) else ""
        raise CheckFailure(f"{call_label}: should return a torch.Tensor{hint}, got {T.type_name(result)}.")
    if R.dtype_of(result) != dtype:
        raise CheckFailure(
            f"{call_label}: the output should keep the input's dtype {R.dname(dtype)}, got {R.dname(R.dtype_of(result))}."
        )
    for a, b in zip(args, before, strict=True):
        if not R.t_equal(_detach(a), b):
            raise CheckFailure(f"{call_label}: the layer changed its input in place.")
    out = T.tensor_to_float64(_detach(result))
    if grad_out is None:
        return out
    names = _sorted(want)
    wrt = args + [params[k] for k in names]
    if not _requires_grad_of(result):
        raise CheckFailure(
            f"{call_label}: the output does not require grad although the inputs and parameters do, so nothing can "
            "be trained: the forward pass left autograd (torch.no_grad, detach, .data or a copy without history?)."
        )
    bwd_calls: list = []
    _recording.calls = bwd_calls
    try:
        with _CollectiveRecorder(bwd_calls):
            grads = call(
                R.autograd_grad, [result], wrt, grad_outputs=[R.tensor_of(grad_out, dtype)], allow_unused=True,
                label=f"torch.autograd.grad(output of {call_label}, inputs and parameters, grad_outputs=G)",
            )  # fmt: skip
    finally:
        _recording.calls = None
    as_array = lambda g: None if g is None else T.tensor_to_float64(g)  # noqa: E731
    return {
        "out": out,
        "d_args": [as_array(g) for g in grads[: T._len(args)]],
        "d_params": {k: as_array(g) for k, g in zip(names, grads[T._len(args) :], strict=True)},
        "fwd": _list(fwd_calls),
        "bwd": _list(bwd_calls),
    }


def _child(r: int, p: int, tmp: str, body) -> None:
    """Rank r in a forked process: silence its output, join the gloo group, run ``body``, write the result."""
    status = {"rank": r}
    try:
        fd = _os_open(_path_join(tmp, f"out{r}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        _dup2(fd, 1)
        _dup2(fd, 2)
        sys.stdout = sys.stderr = io.StringIO()
        _set_num_threads(1)
        _environ["GLOO_SOCKET_IFNAME"] = "lo"
        # A notebook cannot swap the collectives or the group queries under the checks.
        dist.all_reduce, dist.get_rank, dist.get_world_size, dist.new_group = _all_reduce, _get_rank, _get_world_size, _new_group
        try:
            store = _FileStore(_path_join(tmp, "store"), p)
            _init_pg("gloo", store=store, rank=r, world_size=p, timeout=_timedelta(seconds=COLLECTIVE_TIMEOUT_S))
            # Every rank waits until all have joined: a rank that ran ``body`` and exited at once (a
            # skeleton raises at construction) would otherwise break its peers' connection set-up.
            _dist_barrier()
        except Exception as exc:  # noqa: BLE001
            status["setup_error"] = f"{T.type_name(exc)}: {exc}"
        else:
            status["results"] = body(r)
    except BaseException as exc:  # noqa: BLE001  (anything: report it, never return into the kernel's code)
        status["crash"] = f"{T.type_name(exc)}: {exc}"
    try:
        with _open(_path_join(tmp, f"r{r}.tmp"), "wb") as f:
            _pickle_dump(status, f)
        _rename(_path_join(tmp, f"r{r}.tmp"), _path_join(tmp, f"r{r}.pkl"))
    finally:
        _os_exit(0)


SETUP_ATTEMPTS = 3  # gloo's connection set-up can fail transiently on a loaded machine: start the ranks again


def _run_forked(p: int, body, failed=None, deadline: float | None = None) -> list[dict] | None:
    """Run body(rank) on p forked processes joined by gloo; None when gloo cannot start here (no loopback).

    Returns one status dict per rank: {"rank", "results"} or {"rank", "crash" | "setup_error" | "timeout"}.
    When a rank crashes, or ``failed(results)`` is true for a rank's results, the others are killed soon after.
    When some ranks fail to join the group (a transient connection error) and none ran ``body``, all are
    started again, up to ``SETUP_ATTEMPTS`` times in all.
    """
    for _attempt in _range(SETUP_ATTEMPTS):
        statuses = _run_forked_once(p, body, failed, deadline)
        if statuses is None or not any("setup_error" in s for s in statuses) or any("results" in s for s in statuses):
            return statuses
    return statuses


def _run_forked_once(p: int, body, failed=None, deadline: float | None = None) -> list[dict] | None:
    deadline = DEADLINE_S if deadline is None else deadline
    if _is_initialized():
        raise CheckFailure(
            "this kernel already has a default process group (dist.init_process_group ran in the notebook's own "
            "process). The checks start their own ranks: restart the kernel and run the cells again without calling "
            "init_process_group outside a worker function."
        )
    tmp = _mkdtemp(prefix="ch10-ranks-")
    pids = []
    try:
        with T.np_errstate(all="ignore"):
            for r in _range(p):
                sys.stdout.flush()
                sys.stderr.flush()
                pid = _fork()
                if pid == 0:
                    _child(r, p, tmp, body)
                pids.append(pid)
        start = _monotonic()
        alive = dict(_enumerate(pids))
        first_done = None
        while alive and _monotonic() - start < deadline:
            for r, pid in _list(alive.items()):
                if _waitpid(pid, os.WNOHANG)[0] != 0:
                    del alive[r]
                    if first_done is None:
                        path = _path_join(tmp, f"r{r}.pkl")
                        st = {"crash": "died"}
                        if _path_exists(path):
                            with _open(path, "rb") as f:
                                st = _pickle_load(f)
                        if "setup_error" in st or "crash" in st or (failed is not None and failed(st.get("results"))):
                            first_done = _monotonic()
            if first_done is not None and _monotonic() - first_done > GRACE_S:
                break
            _sleep(0.005)
        timed_out = _sorted(alive)
        for pid in alive.values():
            with contextlib.suppress(OSError):
                _kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                _waitpid(pid, 0)
        pids = []
        statuses = []
        for r in _range(p):
            path = _path_join(tmp, f"r{r}.pkl")
            if _path_exists(path):
                with _open(path, "rb") as f:
                    statuses.append(_pickle_load(f))
            else:
                statuses.append({"rank": r, "timeout": r in timed_out})
        if all("setup_error" in s for s in statuses):
            return None
        return statuses
    finally:
        for pid in pids:  # only if something above failed half-way
            with contextlib.suppress(OSError):
                _kill(pid, signal.SIGKILL)
                _waitpid(pid, 0)
        _rmtree(tmp, ignore_errors=True)


def run_on_ranks(world_size: int, worker, *args, timeout: float = 30.0) -> list:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` ranks; return their results in rank order.

    The ranks are processes forked from this one (so they know every function and class defined
    in the notebook), joined in a gloo process group over a file store in a fresh temporary
    folder; their stdout and stderr go to files. Results travel back pickled. The machinery is the
    one the checks use. Raises RuntimeError naming each rank that failed, or that was still running
    after ``timeout`` seconds (it is then killed).
    """
    _warm_up()
    statuses = _run_forked(world_size, lambda r: worker(r, world_size, *args), deadline=timeout)
    if statuses is None:
        raise RuntimeError("gloo could not start: this machine offers no loopback network interface")
    problems = []
    for s in statuses:
        if "crash" in s or "setup_error" in s:
            problems.append(f"rank {s['rank']}: {s.get('crash') or s.get('setup_error')}")
        elif s.get("timeout"):
            problems.append(
                f"rank {s['rank']}: still running after {timeout:g} s (killed); a collective that not every rank calls?"
            )
    if problems:
        raise RuntimeError("\n".join(problems))
    return [s["results"] for s in statuses]


_thread_rank = _local()


class _ThreadGroup:
    """A process group of the thread fallback: the world ranks it holds."""

    def __init__(self, ranks):
        self.ranks = _list(ranks)

    def rank(self) -> int:
        return self.ranks.index(_thread_rank.r) if _thread_rank.r in self.ranks else -1

    def size(self) -> int:
        return T._len(self.ranks)


def _run_threads(p: int, body) -> list[dict]:
    """Fallback without loopback networking: p threads; dist.all_reduce, get_rank, get_world_size simulated."""
    lock = _Lock()
    state: dict = {}  # members -> (barrier, {rank: tensor})

    def shared(members: tuple):
        with lock:
            if members not in state:
                state[members] = (_Barrier(T._len(members), timeout=COLLECTIVE_TIMEOUT_S), {})
            return state[members]

    def members_of(group) -> tuple:
        return T._tuple(_range(p)) if group is None else T._tuple(group.ranks)

    def fake_all_reduce(tensor, op=_ReduceOp.SUM, group=None, async_op=False):
        if _getattr(_recording, "calls", None) is not None:
            _recording.calls.append(("allreduce_", _is_grad_enabled()))
        members = members_of(group)
        barrier, slots = shared(members)
        slots[_thread_rank.r] = R.clone(_detach(tensor))
        barrier.wait()
        total = slots[members[0]]
        for other in members[1:]:
            total = total + slots[other]
        barrier.wait()
        with R.no_grad():
            tensor.copy_(total)
        return None

    def get_rank(group=None):
        return _thread_rank.r if group is None else group.rank()

    def get_world_size(group=None):
        return p if group is None else group.size()

    statuses: list = [{"rank": r, "timeout": True} for r in _range(p)]

    def run(r):
        _thread_rank.r = r
        try:
            statuses[r] = {"rank": r, "results": body(r, _ThreadGroup)}
        except _BrokenBarrier:
            statuses[r] = {"rank": r, "timeout": True}
        except BaseException as exc:  # noqa: BLE001
            statuses[r] = {"rank": r, "crash": f"{T.type_name(exc)}: {exc}"}
        if "results" not in statuses[r] or (statuses[r]["results"] and not statuses[r]["results"][-1][0]):
            with lock:
                for barrier, _slots in state.values():
                    barrier.abort()

    saved = (dist.all_reduce, dist.get_rank, dist.get_world_size)
    dist.all_reduce, dist.get_rank, dist.get_world_size = fake_all_reduce, get_rank, get_world_size
    try:
        threads = [_Thread(target=run, args=(r,), daemon=True) for r in _range(p)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S)
    finally:
        dist.all_reduce, dist.get_rank, dist.get_world_size = saved
    return statuses


_warmed_up: list = []


def _warm_up() -> None:
    """One tiny backward under a dispatch mode, here, before forking: the first one in a process costs seconds
    (lazy initialisation), and every forked rank would otherwise pay it again."""
    if _warmed_up:
        return
    x = R.requires_grad_(R.tensor_of(T.np_ones(2), F32))
    with _CollectiveRecorder([]):
        y = R.t_sum(R.t_mul(x, 2.0))
    R.autograd_grad([y], [x])
    _warmed_up.append(True)


def _run_ranks(p: int, body) -> tuple[list[dict], str]:
    """Run body(rank, new_group) on p ranks: gloo processes where possible, else threads."""
    if _fork is not None:
        statuses = _run_forked(p, lambda r: body(r, _new_group), failed=lambda results: _bool(results) and not results[-1][0])
        if statuses is not None:
            return statuses, f"{p} gloo process{'es' if p > 1 else ''}"
    return _run_threads(p, body), f"{p} simulated ranks (threads; no loopback network here)"


# ---------------------------------------------------------------------------------------------
# TensorParallelMultiHeadAttention
# ---------------------------------------------------------------------------------------------


def _case(
    rng, e, h, p, b, lq, *, ls=None, bias=True, dtype=F32, cross=False, mode="self", masks=(), causal=False, scale=1.0,
    grad=False, groups=None,
):  # fmt: skip
    """A job: weights, shards, inputs, the call and, with ``grad``, a gradient for the output (the loss sum(out * G)).

    ``groups``: lists of world ranks that partition the p ranks; each rank runs the layer in its own group.
    """
    params = _params(rng, e, bias is not False, dtype)
    ls = lq if ls is None else ls
    query = R.rounded(rng.normal(size=(b, lq, e), scale=scale), dtype)
    key = R.rounded(rng.normal(size=(b, ls, e), scale=scale), dtype) if cross else query
    value = R.rounded(rng.normal(size=(b, ls, e), scale=scale), dtype) if cross and mode != "query_key" else key
    inputs, call_text = [query], "(x"
    if mode == "cross":
        inputs += [key, value]
        call_text = "(query, key, value"
    elif mode == "query_key":
        inputs += [key]
        call_text = "(query, key"
    kwargs: dict = {}
    case = {"query": query, "key": key, "value": value, "is_causal": causal, "mode": mode}
    if "padding" in masks:
        lengths = rng.integers(1, ls + 1, size=b)
        lengths[0] = ls
        pad = T.np_arange(ls)[None, :] >= lengths[:, None]
        kwargs["key_padding_mask"] = pad
        case["key_padding_mask"] = pad
        call_text += ", key_padding_mask=<bool (B, S), True at padding>"
    if "bool_attn" in masks:
        am = rng.random((lq, ls)) < 0.3
        am[:, 0] = False
        kwargs["attn_mask"] = am
        case["attn_mask"] = am
        call_text += ", attn_mask=<bool (L, S), True = not allowed>"
    if "float_attn" in masks:
        am = R.rounded(rng.normal(size=(lq, ls)), dtype)
        kwargs["attn_mask"] = am
        case["attn_mask"] = am
        call_text += ", attn_mask=<float (L, S), added to the scores>"
    if causal:
        kwargs["is_causal"] = True
        call_text += ", is_causal=True"
    call_text += ")"
    sizes = [T._len(g) for g in groups] if groups else [p]
    shards = {(gp, gr): _shard(params, gr, gp, h) for gp in sizes for gr in _range(gp)}
    inputs_desc = f"x of shape {(b, lq, e)}" if mode == "self" else f"query {(b, lq, e)}, key/value {(b, ls, e)}"
    job = {
        "e": e, "h": h, "bias": bias, "dtype": dtype, "shards": shards, "inputs": inputs, "kwargs": kwargs,
        "call": call_text, "params": params, "case": case, "desc": f"{inputs_desc}, {R.dname(dtype)}",
        "groups": groups,
    }  # fmt: skip
    if grad:
        job["grad_out"] = R.rounded(rng.normal(size=(b, lq, e)), dtype)
        job["desc"] += ", gradients of sum(out * G)"
    return job


def _value_error_job(e: int, h: int, groups=None) -> dict:
    return {"kind": "value_error", "e": e, "h": h, "bias": None, "groups": groups}


def _rank_failures(statuses: list[dict], how: str) -> None:
    """Raise the first rank's own error (the others may only be waiting for it), then any timeout."""
    for s in statuses:
        if "crash" in s or "setup_error" in s:
            raise CheckFailure(
                f"TensorParallelMultiHeadAttention on {how}: rank {s['rank']} failed: {s.get('crash') or s.get('setup_error')}"
            )
        for ok, value in s.get("results", []):
            if not ok:
                # How gloo reports a peer that left without joining the collective depends on timing:
                # a timeout, or the peer's socket closed or reset.
                if any(sign in value.lower() for sign in ("timed out", "connection closed", "connection reset")):
                    value += f"\n  Likely mistake: {DEADLOCK}"
                raise CheckFailure(f"[{how}] {value}")
    for s in statuses:
        if s.get("timeout"):
            others = ", ".join(f"rank {t['rank']} {'finished' if 'results' in t else 'stuck'}" for t in statuses if t is not s)
            raise CheckFailure(
                f"TensorParallelMultiHeadAttention on {how}: rank {s['rank']} did not finish within {DEADLINE_S:.0f} s "
                f"({others or 'no other ranks'}).\n  Likely mistake: {DEADLOCK}"
            )


def _tolerance(expected: np.ndarray, dtype) -> float:
    if dtype == F64:
        return 1e-9
    return 4e-5 * max(1.0, float(T.np_max(T.np_abs(expected))) if expected.size else 1.0)


def _group_of(job: dict, r: int, p: int) -> tuple[int, int, int]:
    """(this rank's index in its group, the group's size, the number of groups) for world rank r."""
    for ranks in job.get("groups") or ():
        if r in ranks:
            return _list(ranks).index(r), T._len(ranks), T._len(job["groups"])
    return r, p, 1


def _collective_note(result: dict) -> str:
    fwd, bwd = result["fwd"], result["bwd"]
    if not fwd and not bwd:
        return ""
    return (
        f"\n  On this rank the layer called {T._len(fwd)} collective(s) in the forward pass "
        f"({', '.join(_sorted({n for n, _ in fwd})) or 'none'}) and {T._len(bwd)} in the backward pass."
    )


def _wrong(what: str, got: np.ndarray, want: np.ndarray, atol: float, mistake: str | None, reference: str) -> str:
    """The message of a wrong output or gradient: the error, both values, and the mistake if one was recognised."""
    lines = [
        f"{what} {is_or_are(what)} wrong (largest error {max_error(got, want):.3g}, tolerance {atol:.1g}).",
        f"  expected ({reference}): {show(want)}",
        f"  got:      {show(got)}",
    ]
    if mistake:
        lines.append(f"  Likely mistake: {mistake.strip()}")
    return "\n".join(lines)


def _judge_gradients(job: dict, result: dict, r: int, p: int, label: str) -> None:
    """Compare rank r's gradients with the single-device layer's; name the mistake when its fingerprint matches."""
    gr, gp, n_groups = _group_of(job, r, p)
    h, dtype, params, case = job["h"], job["dtype"], job["params"], job["case"]
    grads, d_args = _full_backward(params, case, h, job["grad_out"])
    arg_names = {"self": ["x"], "query_key": ["query", "key"]}.get(case["mode"], ["query", "key", "value"])
    in_place = any(on for _name, on in result["fwd"])
    note = _collective_note(result)
    for i, (name, want) in enumerate(zip(arg_names, d_args, strict=True)):
        got = result["d_args"][i]
        lab = f"{label}: rank {r}'s gradient of {name}"
        if got is None:
            raise CheckFailure(f"{lab} is None.\n  Likely mistake: {GRAD_MISTAKES['no_grad']}")
        atol = _tolerance(want, dtype)
        if max_error(got, want) <= atol:
            continue
        heads_r = _rank_heads(gr, gp, h)

        def share(i=i, heads_r=heads_r):  # this rank's heads' share of the argument's gradient
            return _per_argument(_heads_backward(params, case, heads_r, h, job["grad_out"])[1], case["mode"])[i]

        first_ok = i > 0 and max_error(result["d_args"][0], d_args[0]) <= _tolerance(d_args[0], dtype)
        share_text = GRAD_MISTAKES["one_input_only" if first_ok else ("in_place" if in_place else "no_f")]
        prints = {
            share_text: share,
            GRAD_MISTAKES["grad_summed_at_output"]: lambda share=share: gp * share(),
            GRAD_MISTAKES["grad_summed_at_output"] + " ": lambda want=want: gp * want,
            GRAD_MISTAKES["averaged_grad"]: lambda want=want: want / gp,
        }
        if n_groups > 1:
            prints[GRAD_MISTAKES["group_ignored_backward"]] = lambda want=want: n_groups * want
        mistake = diagnose(got, prints, atol=atol)
        raise CheckFailure(_wrong(lab, got, want, atol, mistake, "the single-device layer's") + note)
    want_params = _shard(grads, gr, gp, h)
    for name in _sorted(want_params):
        want, got = want_params[name], result["d_params"][name]
        lab = f"{label}: rank {r}'s gradient of {name}"
        if name == "out_proj.bias" and gr > 0 and (got is None or not T.np_any(got)):
            continue  # the bias added on rank 0 only, before the sum: the other ranks' copies are never used
        if got is None:
            raise CheckFailure(f"{lab} is None.\n  Likely mistake: {GRAD_MISTAKES['no_grad']}")
        atol = _tolerance(want, dtype)
        if max_error(got, want) <= atol:
            continue
        prints = {GRAD_MISTAKES["grad_summed_at_output"]: lambda want=want: gp * want}
        if name == "out_proj.bias":
            prints[GRAD_MISTAKES["bias_split"]] = lambda want=want: want / gp
        mistake = diagnose(got, prints, atol=atol)
        reference = "the single-device layer's gradient, sliced as shard_heads slices the weight"
        raise CheckFailure(_wrong(lab, got, want, atol, mistake, reference) + note)


def _judge(jobs: list[dict], statuses: list[dict], p: int, how: str) -> int:
    """Compare every rank's outputs (and gradients) with the oracle; raise the first failure with a diagnosis."""
    _rank_failures(statuses, how)
    count = 0
    for i, job in enumerate(jobs):
        count += 1
        if job.get("kind") == "value_error":
            continue
        expected = _oracle(job["params"], job["case"], job["h"])
        atol = _tolerance(expected, job["dtype"])
        for r, s in enumerate(statuses):
            result = s["results"][i][1]
            out = result["out"] if _isinstance(result, _dict) else result
            label = f"{_ctor_label(job, r, p)}{job['call']} with {job['desc']} [{how}]"
            if T._tuple(out.shape) != T._tuple(expected.shape):
                raise CheckFailure(
                    f"{label}: rank {r}'s output should have shape {T._tuple(expected.shape)}, got {T._tuple(out.shape)}."
                )
            if max_error(out, expected) > atol:
                gr, gp, n_groups = _group_of(job, r, p)
                mistake = diagnose(out, _layer_fingerprints(job["params"], job["case"], gr, gp, job["h"], n_groups), atol=atol)
                raise CheckFailure(_wrong(f"{label}: rank {r}'s output", out, expected, atol, mistake, "the single-device layer"))
        if job.get("grad_out") is not None:
            for r, s in enumerate(statuses):
                label = f"{_ctor_label(job, r, p)}{job['call']} with {job['desc']} [{how}]"
                _judge_gradients(job, s["results"][i][1], r, p, label)
    return count


RANKS = "autograder.checks.ch10.run_jobs_on_ranks"


def run_jobs_on_ranks(cls, p: int, jobs: list) -> dict:
    """Run ``jobs`` on ``p`` ranks forked from the process where the student's class lives: what each rank saw.

    Returns data only, ``{"statuses": [per rank], "how": str}``; the verdict is :func:`_judge`'s.
    """
    _warm_up()
    statuses, how = _run_ranks(p, lambda r, new_group: _rank_body(cls, jobs, r, p, new_group))
    return {"statuses": statuses, "how": how}


def _run_jobs(cls, jobs_by_p: dict) -> int:
    count = 0
    for p, jobs in jobs_by_p.items():
        if is_remote(cls):  # the ranks fork from the student's kernel; their outputs come back as data
            reply = current_remote().probe(RANKS, cls, p, jobs)
        else:
            reply = run_jobs_on_ranks(cls, p, jobs)
        if T._type(reply) is not T._dict or T._type(reply.get("statuses")) is not T._list or T._len(reply["statuses"]) != p:
            raise CheckFailure(f"TensorParallelMultiHeadAttention on {p} ranks: the ranks did not report back.")
        count += _judge(jobs, reply["statuses"], p, _str(reply.get("how", "")))
    return count


def visible_TensorParallelMultiHeadAttention(cls) -> None:
    """2 ranks (default call; cross-attention with padding and gradients); 3 ranks with gradients, in the default
    group and in groups of 2 and 1; 4 ranks causal; the ValueError."""
    rng = T.default_rng(92)
    jobs = {
        2: [
            _case(rng, 8, 4, 2, 2, 5, bias=None),
            _case(rng, 8, 4, 2, 2, 4, ls=6, cross=True, mode="cross", masks=("padding",), grad=True),
        ],
        3: [
            _case(rng, 12, 6, 3, 2, 5, grad=True, causal=True),
            _case(rng, 8, 4, 3, 2, 4, grad=True, groups=[[0, 1], [2]]),  # 4 heads: 3 ranks cannot split them
        ],
        4: [_case(rng, 16, 4, 4, 2, 6, causal=True), _value_error_job(12, 6)],
    }
    count = _run_jobs(cls, jobs)
    passed("TensorParallelMultiHeadAttention", count)


def hidden_TensorParallelMultiHeadAttention(cls, seed: int = 93) -> None:
    """1-4 ranks; gradients on 2 and 3 ranks; groups (2 ranks of 3, and each rank alone); float64; masks; L != S."""
    rng = T.default_rng(seed)
    jobs = {
        1: [_case(rng, 8, 2, 1, 2, 4, causal=True, grad=True)],
        2: [
            _case(rng, 12, 6, 2, 2, 5, dtype=F64, masks=("bool_attn", "padding"), grad=True),
            _case(rng, 8, 2, 2, 3, 3, ls=7, bias=False, cross=True, mode="cross", masks=("float_attn",), grad=True),
            _case(rng, 8, 4, 2, 2, 4, ls=5, cross=True, mode="query_key", grad=True),
            _case(rng, 16, 4, 2, 1, 6, scale=5.0, causal=True),
        ],
        3: [
            _case(rng, 12, 6, 3, 2, 4, ls=5, dtype=F64, cross=True, mode="cross", masks=("padding",), grad=True),
            _case(rng, 16, 4, 3, 2, 5, grad=True, groups=[[0], [1, 2]]),  # 4 heads: 3 ranks cannot split them
            _case(rng, 8, 2, 3, 2, 3, ls=4, dtype=F64, cross=True, mode="query_key", grad=True, groups=[[0, 2], [1]]),
            _value_error_job(16, 8),
        ],
        4: [
            _case(rng, 16, 8, 4, 2, 5, dtype=F64, causal=True, masks=("padding",)),
            _case(rng, 24, 4, 4, 2, 3, ls=4, cross=True, mode="cross", bias=False),
        ],
    }
    count = _run_jobs(cls, jobs)
    passed("TensorParallelMultiHeadAttention", count, hidden=True)


# {exercise: (visible points, hidden points)}, in the order the exercises appear.
POINTS = {
    "shard_heads": (1, 1),
    "TensorParallelMultiHeadAttention": (2, 2),
}
