"""The data that crosses between the student's kernel and the trusted judge: no code, ever.

A message is a JSON tree plus a list of arrays, packed into one byte string: an 8-byte
length, the UTF-8 JSON, then an ``.npz`` archive read back with ``allow_pickle=False``.
The tree holds ``None``, booleans, numbers and strings as they are, and tagged objects:

``{"$f": "nan"|"inf"|"-inf"}``  a non-finite float
``{"$tuple": [...]}``  ``{"$dict": [[key, value], ...]}``  (a JSON list is a Python list)
``{"$nd": i}``  array ``i``, an exact ``np.ndarray`` of a numeric or bool dtype
``{"$t": i, "dtype": "bfloat16", "rg": bool, "device": "cpu"}``  a ``torch.Tensor`` (array ``i``)
``{"$np": "float32", "v": 1.5}``  a NumPy scalar
``{"$dtype": "float16"}``  ``{"$device": "cpu"}``  torch dtypes and devices
``{"$h": 3, "type": "mod.Class", "mro": [...], "callable": true}``  a handle on an object
that stays in the kernel (anything else)

:func:`decode` builds only these types, each of the exact class named; whatever the kernel
sends, the judge receives plain data or a handle it can only ask questions through. Sizes
and nesting are bounded (:class:`WireError` otherwise).
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections import OrderedDict as _OrderedDict

import numpy as np

MAX_BYTES = 256 * 1024 * 1024
MAX_DEPTH = 64
MAX_ITEMS = 1_000_000
_NUMERIC_KINDS = set("biufc")
_TORCH_DTYPES = (
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
)


class WireError(ValueError):
    """A message that is not plain data, or too large, or malformed."""


def _torch():
    try:
        import torch
    except ImportError:  # chapter 1 runs with NumPy alone
        return None
    return torch


# -- packing ------------------------------------------------------------------------------


def pack(tree, arrays: list[np.ndarray], limit: int = MAX_BYTES) -> bytes:
    head = json.dumps(tree, allow_nan=False, separators=(",", ":")).encode()
    buf = io.BytesIO()
    np.savez(buf, *arrays) if arrays else None
    body = buf.getvalue()
    if len(head) + len(body) + 8 > limit:
        raise WireError(f"message of {(len(head) + len(body)) / 1e6:.1f} MB exceeds the limit of {limit / 1e6:.0f} MB")
    return struct.pack("<Q", len(head)) + head + body


def unpack(blob: bytes, limit: int = MAX_BYTES) -> tuple[object, list[np.ndarray]]:
    if not isinstance(blob, bytes | bytearray) or len(blob) < 8:
        raise WireError("malformed message: too short")
    if len(blob) > limit:
        raise WireError(f"message of {len(blob) / 1e6:.1f} MB exceeds the limit of {limit / 1e6:.0f} MB")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise WireError("malformed message: bad length")
    try:
        tree = json.loads(blob[8 : 8 + n].decode())
    except (ValueError, RecursionError) as exc:
        raise WireError(f"malformed message: {exc}") from None
    arrays: list[np.ndarray] = []
    body = bytes(blob[8 + n :])
    if body:
        try:
            with np.load(io.BytesIO(body), allow_pickle=False) as npz:
                arrays = [np.array(npz[f"arr_{i}"], copy=True) for i in range(len(npz.files))]
        except Exception as exc:  # noqa: BLE001  (anything malformed, object arrays included)
            raise WireError(f"malformed arrays: {type(exc).__name__}: {exc}") from None
    return tree, arrays


# -- encoding -----------------------------------------------------------------------------


def _float(x: float):
    if math.isfinite(x):
        return x
    return {"$f": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


class Encoder:
    """Turns a value into a tree and arrays; ``handle(obj)`` is asked for what is not plain data."""

    def __init__(self, handle=None):
        self.arrays: list[np.ndarray] = []
        self.handle = handle
        self.items = 0

    def array(self, a: np.ndarray) -> int:
        self.arrays.append(np.array(a, copy=True, order="C"))
        return len(self.arrays) - 1

    def encode(self, value, depth: int = 0):
        self.items += 1
        if depth > MAX_DEPTH or self.items > MAX_ITEMS:
            raise WireError("value nested too deeply or too large")
        t = type(value)
        if value is None or t is bool or t is str:
            return value
        if t is int:
            return value if -(2**63) <= value < 2**63 else {"$bigint": str(value)}
        if t is float:
            return _float(value)
        if t is tuple:
            return {"$tuple": [self.encode(v, depth + 1) for v in value]}
        if t is list:
            return [self.encode(v, depth + 1) for v in value]
        if t is dict or t is _OrderedDict:
            return {"$dict": [[self.encode(k, depth + 1), self.encode(v, depth + 1)] for k, v in value.items()]}
        if t is np.ndarray and value.dtype.kind in _NUMERIC_KINDS:
            return {"$nd": self.array(value)}
        if isinstance(value, np.generic) and t.__module__ == "numpy" and value.dtype.kind in _NUMERIC_KINDS:
            v = value.item()
            return {
                "$np": value.dtype.name,
                "v": _float(v) if isinstance(v, float) else v if not isinstance(v, complex) else str(v),
            }
        torch = _torch()
        if torch is not None:
            if t is torch.Tensor or t is torch.nn.Parameter:
                return self.tensor(value, torch)
            if t is torch.dtype:
                return {"$dtype": str(value).removeprefix("torch.")}
            if t is torch.nn.MultiheadAttention:
                return self.module(value, depth)
            if t is torch.device:
                return {"$device": str(value)}
            if t is torch.Size:
                return {"$tuple": [int(v) for v in value]}
        if self.handle is None:
            raise WireError(f"cannot send a {t.__module__}.{t.__qualname__}: only data crosses")
        return self.handle(value)

    def module(self, m, depth: int) -> dict:
        """A trusted ``nn.MultiheadAttention`` by value: its constructor arguments, weights and mode."""
        init = {
            "embed_dim": m.embed_dim,
            "num_heads": m.num_heads,
            "dropout": float(m.dropout),
            "bias": m.in_proj_bias is not None,
            "add_bias_kv": m.bias_k is not None,
            "add_zero_attn": bool(m.add_zero_attn),
            "kdim": m.kdim,
            "vdim": m.vdim,
            "batch_first": bool(m.batch_first),
        }
        dtype = next(iter(m.parameters())).dtype
        return {
            "$module": "MultiheadAttention",
            "init": self.encode(init, depth + 1),
            "state": self.encode(dict(m.state_dict()), depth + 1),
            "dtype": str(dtype).removeprefix("torch."),
            "training": bool(m.training),
        }

    def tensor(self, t, torch) -> dict:
        name = str(t.dtype).removeprefix("torch.")
        if name not in _TORCH_DTYPES:
            raise WireError(f"tensors of dtype {name} are not supported")
        if t.layout != torch.strided:
            raise WireError(f"only dense tensors cross, not {t.layout}")
        data = torch.Tensor.detach(t).to("cpu")
        if name == "bfloat16":
            data = data.view(torch.int16)
        tree = {"dtype": name, "rg": bool(t.requires_grad), "device": str(t.device)}
        # a permuted view of a dense buffer (a transpose, say) keeps its strides across: its data goes in memory order
        perm = sorted(range(data.dim()), key=lambda i: -data.stride(i))
        if data.dim() > 1 and perm != list(range(data.dim())) and data.permute(perm).is_contiguous() and 0 not in data.shape:
            tree["perm"] = perm
            data = data.permute(perm)
        tree["$t"] = self.array(data.contiguous().numpy())
        return tree


# -- decoding -----------------------------------------------------------------------------


class Decoder:
    """Builds plain data from a tree; ``handle(tree)`` resolves ``{"$h": ...}`` entries."""

    def __init__(self, arrays: list[np.ndarray], handle=None):
        self.arrays = arrays
        self.handle = handle

    def _array(self, i) -> np.ndarray:
        if type(i) is not int or not 0 <= i < len(self.arrays):
            raise WireError("malformed message: bad array index")
        a = self.arrays[i]
        if type(a) is not np.ndarray or a.dtype.kind not in _NUMERIC_KINDS:
            raise WireError("malformed message: not a numeric array")
        return a

    def decode(self, tree, depth: int = 0):
        if depth > MAX_DEPTH:
            raise WireError("value nested too deeply")
        t = type(tree)
        if tree is None or t in (bool, int, float, str):
            return tree
        if t is list:
            return [self.decode(v, depth + 1) for v in tree]
        if t is not dict or len(tree) == 0:
            raise WireError("malformed message: unknown value")
        if "$f" in tree:
            return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[tree["$f"]]
        if "$bigint" in tree:
            return int(str(tree["$bigint"]))
        if "$tuple" in tree:
            return tuple(self.decode(v, depth + 1) for v in _list(tree["$tuple"]))
        if "$dict" in tree:
            out = {}
            for pair in _list(tree["$dict"]):
                if type(pair) is not list or len(pair) != 2:
                    raise WireError("malformed message: bad dict entry")
                key = self.decode(pair[0], depth + 1)
                if type(key) not in (str, int, float, bool, tuple) and key is not None:
                    raise WireError("malformed message: dict keys must be strings or numbers")
                out[key] = self.decode(pair[1], depth + 1)
            return out
        if "$nd" in tree:
            return np.array(self._array(tree["$nd"]), copy=True)
        if "$np" in tree:
            dtype = np.dtype(str(tree["$np"]))
            v = tree.get("v")
            return dtype.type(complex(v) if dtype.kind == "c" else self.decode(v, depth + 1))
        if "$t" in tree:
            return self._tensor(tree)
        if "$dtype" in tree:
            torch = _torch()
            name = str(tree["$dtype"])
            value = getattr(torch, name, None) if torch is not None and name.isidentifier() else None
            if type(value) is not getattr(torch, "dtype", None):
                raise WireError(f"unknown dtype {name!r}")
            return value
        if "$module" in tree:
            return self._module(tree, depth)
        if "$device" in tree:
            torch = _torch()
            if torch is None:
                raise WireError("no torch here")
            return torch.device(str(tree["$device"]))
        if "$h" in tree:
            if self.handle is None:
                raise WireError("malformed message: unexpected handle")
            return self.handle(tree)
        raise WireError("malformed message: unknown tag")

    def _module(self, tree: dict, depth: int):
        torch = _torch()
        if torch is None or tree.get("$module") != "MultiheadAttention":
            raise WireError("unknown module")
        init = self.decode(tree.get("init"), depth + 1)
        state = self.decode(tree.get("state"), depth + 1)
        dtype = getattr(torch, str(tree.get("dtype")), None)
        if type(init) is not dict or type(state) is not dict or type(dtype) is not torch.dtype:
            raise WireError("malformed module")
        allowed = {"embed_dim", "num_heads", "dropout", "bias", "add_bias_kv", "add_zero_attn", "kdim", "vdim", "batch_first"}
        if not set(init) <= allowed:
            raise WireError("malformed module")
        try:
            m = torch.nn.MultiheadAttention(**init).to(dtype)
            m.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001
            raise WireError(f"malformed module: {exc}") from None
        m.train(tree.get("training") is True)
        return m

    def _tensor(self, tree: dict):
        torch = _torch()
        if torch is None:
            raise WireError("a tensor was sent where torch is not installed")
        a = self._array(tree["$t"])
        name = str(tree.get("dtype"))
        if name not in _TORCH_DTYPES:
            raise WireError(f"unknown tensor dtype {name!r}")
        t = torch.from_numpy(np.array(a, copy=True))
        if name == "bfloat16":
            if a.dtype != np.int16:
                raise WireError("malformed bfloat16 tensor")
            t = t.view(torch.bfloat16)
        elif str(t.dtype).removeprefix("torch.") != name:
            raise WireError(f"tensor data of dtype {t.dtype} labelled {name}")
        perm = tree.get("perm")
        if perm is not None:
            if type(perm) is not list or sorted(perm) != list(range(t.dim())) or not all(type(i) is int for i in perm):
                raise WireError("malformed tensor layout")
            inverse = [perm.index(i) for i in range(t.dim())]
            t = t.permute(inverse)
        if tree.get("rg") is True and t.is_floating_point():
            t.requires_grad_(True)
        return t


def _list(v) -> list:
    if type(v) is not list:
        raise WireError("malformed message: expected a list")
    return v
