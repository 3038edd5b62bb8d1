"""The judge's side: stand-ins for the student's objects that only exchange data with the kernel.

A :class:`Remote` sends one request at a time through a transport (``str -> str``, base64 of
a :mod:`wire` message) and decodes the answer into plain data, or into a :class:`RemoteObject`
for anything that is not data. The checks call a ``RemoteObject`` as they would call the
student's function or class; every call, attribute and item goes to the kernel and comes back
as data. The check itself, its inputs, references and verdict stay in this process.

Exceptions raised in the kernel come back as :class:`RemoteError` subclasses of a few
built-in types (``NotImplementedError``, ``ValueError``...), never as ``AssertionError``, so
student code cannot raise a check's failure or success.
"""

from __future__ import annotations

import base64

from autograder.grading import wire

_TRUSTED_BASES = (
    "torch.nn.modules.activation.MultiheadAttention",
    "torch.nn.modules.transformer.TransformerEncoderLayer",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.module.Module",
    "torch.autograd.function.Function",
)


class RemoteCallError(RuntimeError):
    """The kernel could not answer (it died, timed out, or sent something that is not data)."""


class RemoteError(Exception):
    """An exception raised by the student's code in the kernel."""

    remote_type = "Exception"


_ERROR_CLASSES: dict[str, type] = {}


def _error_class(remote_type: str, mro: list) -> type:
    short = remote_type.rsplit(".", 1)[-1]
    if short == "CheckFailure":
        # raised in the kernel by an object of the checks the judge handed to student code (or by the
        # student, imitating one): it can only fail the check, never pass it
        from autograder.checks.common import CheckFailure

        return CheckFailure
    base = Exception
    for name in mro:
        builtin = name.removeprefix("builtins.")
        builtins_mapped = {
            "NotImplementedError": NotImplementedError,
            "ValueError": ValueError,
            "TypeError": TypeError,
            "IndexError": IndexError,
            "KeyError": KeyError,
            "AttributeError": AttributeError,
            "NameError": NameError,
        }
        if builtin in builtins_mapped:
            base = builtins_mapped[builtin]
            break
        if builtin in ("RuntimeError", "ArithmeticError", "LookupError"):
            base = RuntimeError
            break
    key = f"{short}:{base.__name__}"
    if key not in _ERROR_CLASSES:
        _ERROR_CLASSES[key] = type(short, (RemoteError, base), {"remote_type": short, "__module__": "builtins"})
    return _ERROR_CLASSES[key]


def _local_class(name: str, mro: list) -> type:
    """A local stand-in class for ``isinstance`` tests: named like the remote one, based on the
    most derived trusted torch class in its MRO (or ``object``)."""
    import importlib

    for base_name in mro:
        if base_name in _TRUSTED_BASES:
            module, _, cls = base_name.rpartition(".")
            try:
                base = getattr(importlib.import_module(module), cls)
            except (ImportError, AttributeError):
                continue
            key = (name, base_name)
            if key not in _CLASSES:
                _CLASSES[key] = type(name.rsplit(".", 1)[-1], (base,), {"__module__": "student", "__remote__": True})
            return _CLASSES[key]
    return RemoteObject


_CLASSES: dict[tuple, type] = {}


_current: list = []


def current_remote():
    """The kernel the running check talks to (None outside a judged check)."""
    return _current[-1] if _current else None


class Remote:
    """One connection to a kernel: ``transport(request_b64) -> reply_b64``.

    ``with remote:`` makes it :func:`current_remote` (so ``torch_refs.manual_seed`` seeds the kernel too).
    """

    def __enter__(self):
        _current.append(self)
        return self

    def __exit__(self, *exc):
        _current.remove(self)

    def __init__(self, transport, limit: int = wire.MAX_BYTES):
        self.transport = transport
        self.limit = limit
        self.calls = 0

    def request(self, op: str, **fields):
        enc = wire.Encoder(self._handle_out)
        tree = enc.encode({"op": op, **fields})
        blob = base64.b64encode(wire.pack(tree, enc.arrays, self.limit)).decode()
        self.calls += 1
        answer = self.transport(blob)
        if type(answer) is not str:
            raise RemoteCallError("the kernel's answer is not text")
        try:
            reply_tree, arrays = wire.unpack(base64.b64decode(answer, validate=True), self.limit)
        except (ValueError, wire.WireError) as exc:
            raise RemoteCallError(f"the kernel's answer is not data: {exc}") from None
        if type(reply_tree) is not dict:
            raise RemoteCallError("the kernel's answer is malformed")
        if "error" in reply_tree:
            err = reply_tree["error"]
            if type(err) is not dict:
                raise RemoteCallError("the kernel's answer is malformed")
            remote_type = str(err.get("type", "Exception"))
            mro = [str(m) for m in err.get("mro", [])] if type(err.get("mro")) is list else []
            raise _error_class(remote_type, mro)(str(err.get("message", ""))[:4000])
        if "ok" not in reply_tree:
            raise RemoteCallError("the kernel's answer is malformed")
        try:
            decoder = wire.Decoder(arrays, self._handle_in)
            value = decoder.decode(reply_tree["ok"])
            mutated = decoder.decode(reply_tree["mutated"]) if "mutated" in reply_tree else []
        except (wire.WireError, KeyError, TypeError) as exc:
            raise RemoteCallError(f"the kernel's answer is not data: {exc}") from None
        if mutated:
            _write_back(fields, mutated)
        return value

    def _handle_out(self, obj):
        if type(obj) is RemoteObject or getattr(type(obj), "__remote__", False):
            if object.__getattribute__(obj, "_remote") is not self:
                raise wire.WireError("a handle of another kernel")
            return {"$h": object.__getattribute__(obj, "_id")}
        raise wire.WireError(f"cannot send a {type(obj).__module__}.{type(obj).__qualname__} to the kernel: only data crosses")

    def _handle_in(self, tree: dict):
        h = tree.get("$h")
        if type(h) is not int:
            raise wire.WireError("malformed handle")
        name = str(tree.get("type", "object"))[:200]
        mro = [str(m)[:200] for m in tree.get("mro", [])][:50] if type(tree.get("mro")) is list else []
        return make_proxy(self, h, name, mro, bool(tree.get("callable")), bool(tree.get("class")))

    def lookup(self, name: str, source: str | None = None):
        obj = self.request("lookup", name=name)
        if type(obj) is RemoteObject or getattr(type(obj), "__remote__", False):
            object.__setattr__(obj, "_source", source)
        return obj

    def new(self, cls: str, *args, **kwargs):
        """An object of one of the checks' classes (``agent.CONSTRUCTIBLE``), built in the kernel."""
        return self.request("new", cls=cls, args=tuple(args), kwargs=dict(kwargs))

    def probe(self, name: str, *args, **kwargs):
        """Run one of the checks' kernel-side parts (``agent.PROBES``) there; its report is data."""
        return self.request("probe", name=name, args=tuple(args), kwargs=dict(kwargs))

    def seed(self, n: int) -> None:
        self.request("seed", seed=int(n))

    def reset(self) -> None:
        self.request("reset")


def _write_back(fields: dict, mutated) -> None:
    """Copy inputs the student's code changed in place (in the kernel) into the judge's own tensors,
    so that the checks' "changed its input in place" tests see what happened there."""
    import torch

    args, kwargs = fields.get("args", ()), fields.get("kwargs", {})
    for item in mutated if type(mutated) is list else []:
        if type(item) is not tuple or len(item) != 2 or type(item[1]) is not torch.Tensor:
            continue
        where, new = item
        local = (
            args[where] if type(where) is int and 0 <= where < len(args) else kwargs.get(where) if type(where) is str else None
        )
        if type(local) is torch.Tensor and local.shape == new.shape and local.dtype == new.dtype:
            with torch.no_grad():
                local.copy_(new)


def make_proxy(remote: Remote, h: int, name: str, mro: list, is_callable: bool, is_class: bool):
    cls = _local_class(name, mro) if not is_class else RemoteObject
    proxy = object.__new__(RemoteObject)
    if cls is not RemoteObject:
        # an instance of a torch class: isinstance(proxy, nn.Module) holds, as it does in the kernel
        proxy = object.__new__(_proxy_type(cls))
    for key, value in (
        ("_remote", remote),
        ("_id", h),
        ("_type", name),
        ("_mro", tuple(mro)),
        ("_callable", is_callable),
        ("_is_class", is_class),
        ("_source", None),
    ):
        object.__setattr__(proxy, key, value)
    return proxy


_PROXY_TYPES: dict[type, type] = {}


def _proxy_type(cls: type) -> type:
    """``RemoteObject`` behaviour with ``__class__`` reporting the stand-in class ``cls``."""
    if cls not in _PROXY_TYPES:
        _PROXY_TYPES[cls] = type(
            "RemoteObject", (RemoteObject,), {"__class__": property(lambda self, c=cls: c), "__remote__": True}
        )
    return _PROXY_TYPES[cls]


def is_remote(obj) -> bool:
    return isinstance(obj, RemoteObject) and type(obj).__module__ == __name__


def remote_type_name(obj) -> str:
    name = object.__getattribute__(obj, "_type")
    return name.removeprefix("builtins.").removeprefix("__main__.")


def remote_source(obj) -> str | None:
    """The exercise cell's source, as the judge read it from the notebook (None if unknown)."""
    return object.__getattribute__(obj, "_source") if is_remote(obj) else None


class RemoteObject:
    """An object that lives in the student's kernel."""

    __slots__ = ("_remote", "_id", "_type", "_mro", "_callable", "_is_class", "_source", "__weakref__")

    def _ask(self, op: str, **fields):
        return object.__getattribute__(self, "_remote").request(op, target=self, **fields)

    def __call__(self, *args, **kwargs):
        return self._ask("call", args=tuple(args), kwargs=dict(kwargs))

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", name=name)

    def __setattr__(self, name: str, value) -> None:
        self._ask("setattr", name=name, value=value)

    def __getitem__(self, key):
        return self._ask("getitem", key=key)

    def __len__(self) -> int:
        n = self._ask("len")
        if type(n) is not int or n < 0:
            raise RemoteCallError("len() of a kernel object is not a non-negative int")
        return n

    def __iter__(self):
        items = self._ask("list")
        if type(items) is not list:
            raise RemoteCallError("iterating a kernel object gave no list")
        return iter(items)

    def __repr__(self) -> str:
        try:
            text = self._ask("repr")
        except Exception:  # noqa: BLE001
            text = None
        name = remote_type_name(self)
        return f"<{name} in the student's kernel{': ' + text[:200] if type(text) is str else ''}>"

    def __bool__(self) -> bool:
        return True

    def __eq__(self, other):
        return self is other

    def __hash__(self) -> int:
        return id(self)


def remote_grad(obj, *args, output_index=None, grad_output, wrt, wrt_obj=None, **kwargs):
    """Call ``obj`` in the kernel and differentiate there: ``{"result", "requires_grad", "grads"}``.

    The kernel computes d sum(out * grad_output) / d target for each target of ``wrt``:
    ``{"arg": i}`` for the i-th positional input (sent with ``requires_grad``), or
    ``{"attr": "W_q.weight"}`` for an attribute path of ``wrt_obj`` (default ``obj``).
    """
    return object.__getattribute__(obj, "_remote").request(
        "grad",
        target=obj,
        args=tuple(args),
        kwargs=dict(kwargs),
        output_index=output_index,
        grad_output=grad_output,
        wrt_obj=wrt_obj,
        wrt=list(wrt),
    )


def remote_watch(obj, *args, **kwargs) -> dict:
    """Call ``obj`` in the kernel under a recorder of torch functions: ``{"result", "calls"}``
    (what the kernel reports: evidence, not proof)."""
    return object.__getattribute__(obj, "_remote").request("watch", target=obj, args=tuple(args), kwargs=dict(kwargs))
