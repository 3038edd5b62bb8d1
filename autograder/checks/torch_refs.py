"""PyTorch references and helpers shared by the checks of chapters 2 and later.

Like :mod:`autograder.checks.trusted`, this module captures its references when it is first
imported: :mod:`autograder.checks` imports it before the chapter modules, and the setup cell
imports the package before any student code runs, so a student cell that later rebinds
``torch.from_numpy``, ``nn.Module.load_state_dict`` or ``nn.MultiheadAttention`` changes
nothing here. References only one chapter needs stay in that chapter's module.

Chapter 1 needs NumPy only: without torch this module imports, holds ``torch = None``, and
defines nothing else.
"""

from __future__ import annotations

import numpy as np

from autograder.checks import trusted as T
from autograder.checks.common import CheckFailure

_str = str
_f32 = np.float32
_f64 = np.float64
_sqrt = T.sqrt

try:
    import torch
except ImportError:  # chapter 1 needs NumPy only
    torch = None

if torch is not None:
    TB = torch._C.TensorBase
    dtype_of = TB.__dict__["dtype"].__get__
    shape_of = TB.__dict__["shape"].__get__
    clone = TB.clone
    element_size = TB.element_size
    requires_grad_ = TB.requires_grad_
    from_numpy = torch.from_numpy
    t_equal = torch.equal
    t_empty = torch.empty
    t_mul = torch.mul
    t_sum = torch.sum
    no_grad = torch.no_grad
    autograd_grad = torch.autograd.grad
    fork_rng = torch.random.fork_rng
    sdpa = torch.nn.functional.scaled_dot_product_attention
    Module = torch.nn.Module
    Linear = torch.nn.Linear
    MHA = torch.nn.MultiheadAttention
    from autograder.grading.remote import current_remote, is_remote

    def _either(fn, name: str):
        """``fn(module, ...)`` on a real module; the module's own method ``name`` when it lives in the kernel."""

        def method(obj, *args, **kwargs):
            if is_remote(obj):
                return getattr(obj, name)(*args, **kwargs)
            return fn(obj, *args, **kwargs)

        method.__name__ = name
        return method

    _manual_seed = torch.manual_seed

    def manual_seed(seed: int):
        """Seed torch here and, while a check runs on a student's kernel, there too (dropout masks)."""
        remote = current_remote()
        if remote is not None:
            remote.seed(seed)
        return _manual_seed(seed)

    mha_forward = _either(torch.nn.MultiheadAttention.forward, "forward")
    module_to = _either(torch.nn.Module.to, "to")
    module_train = _either(torch.nn.Module.train, "train")
    module_state_dict = _either(torch.nn.Module.state_dict, "state_dict")
    module_load_state_dict = _either(torch.nn.Module.load_state_dict, "load_state_dict")
    named_parameters = _either(torch.nn.Module.named_parameters, "named_parameters")
    F16, BF16, F32, F64, I8 = torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8
    F8 = getattr(torch, "float8_e4m3fn", None)
    BOOL = torch.bool


def dname(dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return _str(dtype).replace("torch.", "")


def tensor_of(a, dtype, device=None):
    """A fresh tensor of ``dtype`` (on ``device``, default the CPU) holding ``a`` (rounded to ``dtype``)."""
    return T._to(from_numpy(T.np_array(a, copy=True)), device=device, dtype=dtype)


def rounded(a, dtype):
    """``a`` rounded to ``dtype`` and widened back to float64: the exact values the student receives."""
    return T.tensor_to_float64(tensor_of(a, dtype))


def tensor_result(result, *, label: str, what: str, dtype):
    """A float64 copy of an exact ``torch.Tensor`` result of the expected dtype (``None``: any)."""
    if not T.is_tensor(result):
        raise CheckFailure(f"{label}: the {what} should be a torch.Tensor, got {T.type_name(result)}.")
    if dtype is not None and dtype_of(result) != dtype:
        raise CheckFailure(f"{label}: the {what} should keep the input's dtype {dtype}, got {dtype_of(result)}.")
    return T.tensor_to_float64(result)


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention: random parameters and a real layer holding them


def mha_params(rng, e: int, bias: bool, in_gain: float = 1.0) -> dict:
    """Parameters rounded to float32 (they travel through a float32 state dict), biases non-zero.

    ``w_in`` has standard deviation ``in_gain / sqrt(e)``, ``w_out`` ``1 / sqrt(e)``; the biases 0.5.
    """

    def r(*shape, std=1.0):
        return T.np_array(rng.normal(size=shape, scale=std).astype(_f32), dtype=_f64)

    return {
        "w_in": r(3 * e, e, std=in_gain / _sqrt(e)),
        "b_in": r(3 * e, std=0.5) if bias else None,
        "w_out": r(e, e, std=1 / _sqrt(e)),
        "b_out": r(e, std=0.5) if bias else None,
    }


def mha_module(e: int, h: int, bias: bool, p: dict | None = None):
    """A real nn.MultiheadAttention (batch_first, float32, in training mode) holding the parameters ``p``."""
    with fork_rng(devices=[]):
        ref = MHA(e, h, bias=bias, batch_first=True)
    if p is not None:
        state = {"in_proj_weight": tensor_of(p["w_in"], F32), "out_proj.weight": tensor_of(p["w_out"], F32)}
        if bias:
            state["in_proj_bias"] = tensor_of(p["b_in"], F32)
            state["out_proj.bias"] = tensor_of(p["b_out"], F32)
        module_load_state_dict(ref, state)
    return ref


def torch_mha(e: int, h: int, bias: bool, p: dict, dtype=None):
    """A real nn.MultiheadAttention (batch_first) holding the parameters ``p``, in eval mode, at ``dtype`` (float32)."""
    ref = mha_module(e, h, bias, p)
    module_train(ref, False)
    module_to(ref, dtype=F32 if dtype is None else dtype)
    return ref
