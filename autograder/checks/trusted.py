"""Primitives captured when the checks are first imported, before student code runs.

A student cell may rebind ``np.allclose``, ``torch.allclose``, ``numpy.testing`` or even
builtins; the checks only use the references held here, compute their own references,
and touch student results only through ``as_float64`` below, which checks the exact type.
"""

import builtins
import math

import numpy as np

_type = builtins.type
_isinstance = builtins.isinstance
_len = builtins.len
_tuple = builtins.tuple
_list = builtins.list
_dict = builtins.dict
_repr = builtins.repr

ndarray = np.ndarray
np_array = np.array
np_asarray = np.asarray
np_float64 = np.float64
np_isnan = np.isnan
np_isinf = np.isinf
np_isfinite = np.isfinite
np_abs = np.abs
np_max = np.max
np_array2string = np.array2string
np_errstate = np.errstate
np_exp = np.exp
np_where = np.where
np_arange = np.arange
np_zeros = np.zeros
np_ones = np.ones
np_triu = np.triu
np_concat = np.concatenate
np_swapaxes = np.swapaxes
np_array_equal = np.array_equal
np_any = np.any
np_all = np.all
np_float32 = np.float32
np_bool = np.bool_
np_integer = np.integer
default_rng = np.random.default_rng
sqrt = math.sqrt
inf = math.inf

try:
    import torch as _torch

    Tensor = _torch.Tensor
    _tensor_base = _torch._C.TensorBase
    _detach = _tensor_base.detach
    _to = _tensor_base.to
    _numpy = _tensor_base.numpy
    torch_float64 = _torch.float64
    torch_from_numpy = _torch.from_numpy
    torch_softmax = _torch.softmax
    torch_sdpa = _torch.nn.functional.scaled_dot_product_attention
except ImportError:  # chapter 1 needs NumPy only
    _torch = None
    Tensor = None


def type_name(obj: object) -> str:
    t = _type(obj)
    if t.__module__ == "autograder.grading.remote":
        from autograder.grading.remote import is_remote, remote_type_name

        if is_remote(obj):  # a stand-in for an object in the student's kernel
            return remote_type_name(obj)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def is_tensor(obj: object) -> bool:
    return Tensor is not None and _type(obj) is Tensor


def tensor_to_float64(t) -> np.ndarray:
    """A detached float64 NumPy copy of an exact ``torch.Tensor``."""
    cpu = _to(_detach(t), device="cpu", dtype=torch_float64)
    return np_array(_numpy(cpu), dtype=np_float64, copy=True)


def ndarray_to_float64(a) -> np.ndarray:
    """A float64 copy of an exact ``np.ndarray`` (subclasses are rejected by the caller)."""
    return ndarray.astype(a, np_float64, copy=True)
