"""The kernel's side of trusted grading: answer the judge's calls on the student's objects.

Runs in the student's (sandboxed) kernel, so nothing here is trusted: it only calls what the
judge asks for and sends back what came out, as data (:mod:`autograder.grading.wire`).
Objects that are not plain data stay here, in a table, and go back as handles. The judge
reaches :func:`serve` through an ``execute_request``'s ``user_expressions`` (evaluated with
plain ``eval``: no input or AST transformers, no cell of the notebook).

The expression carries this module and :mod:`~autograder.grading.wire` as source
(:func:`expression`), built in a namespace of its own (once per kernel, kept on ``sys`` under
the source's hash), so a notebook that replaced or rewrote the course's modules in the kernel
(``sys.modules``, ``__code__`` swaps through ``gc``) has not touched the code that answers; the
table of objects lives on ``sys`` too.
"""

from __future__ import annotations

import base64
import contextlib
import sys
import warnings

try:
    wire  # noqa: B018  (defined when this source runs as the self-contained agent, see expression())
except NameError:
    from autograder.grading import wire

_state = sys.__dict__.setdefault("_ahh_agent_state", {"objects": {}, "ids": {}, "namespace": None})
_objects: dict[int, object] = _state["objects"]
_ids: dict[int, int] = _state["ids"]
MAX_LIST = 100_000
MAX_REPR = 2000


def set_namespace(ns: dict | None) -> None:
    """Serve the names of ``ns`` instead of the kernel's (for tests that judge in one process)."""
    _state["namespace"] = ns
    _objects.clear()
    _ids.clear()


def _namespace() -> dict:
    if _state["namespace"] is not None:
        return _state["namespace"]
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            return shell.user_ns
    except ImportError:
        pass
    import __main__

    return vars(__main__)


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def handle(obj) -> dict:
    key = id(obj)
    if key not in _ids:
        _ids[key] = len(_objects) + 1
        _objects[_ids[key]] = obj
    t = type(obj)
    try:
        mro = [_qualname(c) for c in t.__mro__]
    except Exception:  # noqa: BLE001
        mro = []
    return {"$h": _ids[key], "type": _qualname(t), "mro": mro, "callable": callable(obj), "class": isinstance(obj, type)}


def _resolve(tree: dict):
    h = tree.get("$h")
    if h not in _objects:
        raise wire.WireError(f"no object {h!r} in the kernel (the kernel may have restarted)")
    return _objects[h]


def _seed(n: int) -> None:
    import random

    random.seed(n)
    try:
        import numpy as np

        np.random.seed(n % 2**32)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(n)
    except ImportError:
        pass


def _path(obj, path: str):
    for part in path.split(".") if path else []:
        obj = getattr(obj, part)
    return obj


def _grad(fn, args, kwargs, output_index, grad_output, wrt_obj, wrt):
    """Call ``fn``, then d sum(out * grad_output) / d each target of ``wrt``."""
    import torch

    result = fn(*args, **kwargs)
    out = result[output_index] if output_index is not None else result
    if type(out) is not torch.Tensor or not out.requires_grad:
        return {"result": result, "requires_grad": False, "grads": []}
    targets, where = [], []
    for w in wrt:
        if "arg" in w:
            targets.append(args[w["arg"]])
        else:
            targets.append(_path(wrt_obj if wrt_obj is not None else fn, w["attr"]))
        where.append(w)
    grads = torch.autograd.grad((out * grad_output.to(out.dtype)).sum(), targets, allow_unused=True)
    return {"result": result, "requires_grad": True, "grads": list(grads)}


# Classes of the course's checks the judge may have built in the kernel (objects it hands to student code).
CONSTRUCTIBLE = {"autograder.checks.ch06.ReferenceKVCache"}
# Parts of checks that must run where the student's code runs (a simulated device, patched clocks).
PROBES = {
    "autograder.checks.ch07.simulate_benchmark",
    "autograder.checks.ch08.observe_call",
    "autograder.checks.ch09.observe_function",
    "autograder.checks.ch10.run_jobs_on_ranks",
}
MAX_RECORDS = 10_000


def _simple(v):
    return v if v is None or type(v) in (bool, int, float, str) else None


def watched(fn, args, kwargs):
    """Call ``fn`` under a TorchFunctionMode that records every torch function it calls at its own level.

    Each record: ``{"name", "module", "shapes": [shape or None per positional argument],
    "args": [simple values or None], "kwargs": {name: simple value}}``. Returns (result, records).
    """
    import torch

    records = []

    class _Recorder(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, a=(), kw=None):
            kw = kw or {}
            if len(records) < MAX_RECORDS:
                records.append(
                    {
                        "name": str(getattr(func, "__name__", func)),
                        "module": str(getattr(func, "__module__", "") or ""),
                        "shapes": [list(x.shape) if isinstance(x, torch.Tensor) else None for x in a],
                        "args": [_simple(x) for x in a],
                        "kwargs": {str(k): _simple(v) for k, v in kw.items()},
                    }
                )
            return func(*a, **kw)

    with _Recorder():
        result = fn(*args, **kwargs)
    return result, records


def _dispatch(op: str, req: dict):
    if op == "lookup":
        ns = _namespace()
        name = req["name"]
        if name not in ns:
            raise NameError(f"name {name!r} is not defined")
        return ns[name]
    if op == "reset":
        _objects.clear()
        _ids.clear()
        return None
    if op == "seed":
        _seed(int(req["seed"]))
        return None
    if op in ("probe", "new"):  # one of the checks' own functions or classes, by its allow-listed name
        import importlib

        name, allowed = (str(req["name"]), PROBES) if op == "probe" else (str(req["cls"]), CONSTRUCTIBLE)
        if name not in allowed:
            raise ValueError(f"the judge may not use {name} here")
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)(*req.get("args", ()), **req.get("kwargs", {}))
    target = req["target"]
    if op == "call":
        return target(*req.get("args", ()), **req.get("kwargs", {}))
    if op == "getattr":
        return getattr(target, req["name"])
    if op == "setattr":
        setattr(target, req["name"], req["value"])
        return None
    if op == "getitem":
        return target[req["key"]]
    if op == "len":
        return int(len(target))
    if op == "list":
        out = []
        for item in target:
            out.append(item)
            if len(out) > MAX_LIST:
                raise ValueError(f"more than {MAX_LIST} items")
        return out
    if op == "repr":
        return str(repr(target))[:MAX_REPR]
    if op == "watch":
        result, records = watched(target, req.get("args", ()), req.get("kwargs", {}))
        return {"result": result, "calls": records}
    if op == "grad":
        return _grad(target, req["args"], req["kwargs"], req["output_index"], req["grad_output"], req.get("wrt_obj"), req["wrt"])
    raise ValueError(f"unknown operation {op!r}")


def _snapshot(req: dict) -> list:
    """(where, tensor, copy) for each tensor argument at the top level of a call's args and kwargs."""
    try:
        import torch
    except ImportError:
        return []
    out = []
    for i, a in enumerate(req.get("args", ()) if type(req.get("args", ())) is tuple else ()):
        if type(a) is torch.Tensor:
            out.append((i, a, a.detach().clone()))
    kwargs = req.get("kwargs", {})
    for k, a in kwargs.items() if type(kwargs) is dict else ():
        if type(a) is torch.Tensor:
            out.append((str(k), a, a.detach().clone()))
    return out


def _changed(snapshots: list) -> list:
    import torch

    changed = []
    for where, t, before in snapshots:
        same = t.shape == before.shape and t.dtype == before.dtype and torch.equal(t.detach(), before)
        if not same and not (
            t.is_floating_point()
            and torch.equal(t.detach().isnan(), before.isnan())
            and torch.equal(torch.nan_to_num(t.detach()), torch.nan_to_num(before))
        ):
            changed.append((where, t.detach()))
    return changed


def serve(request: str) -> str:
    """Decode a request, do it, encode what came back (or the exception) as base64 text."""
    try:
        tree, arrays = wire.unpack(base64.b64decode(request))
        req = wire.Decoder(arrays, _resolve).decode(tree)
        op = req.pop("op")
        snapshots = _snapshot(req)
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")
            try:
                import numpy as np

                stack.enter_context(np.errstate(all="ignore"))
            except ImportError:
                pass
            value = _dispatch(op, req)
        enc = wire.Encoder(handle)
        reply = {"ok": enc.encode(value)}
        changed = _changed(snapshots)
        if changed:  # inputs the student's code changed in place: the judge sees them changed too
            reply["mutated"] = enc.encode(changed)
    except BaseException as exc:  # noqa: BLE001  (every failure of student code goes back as data)
        name = _qualname(type(exc))
        try:
            message = str(exc)[:4000]
        except Exception:  # noqa: BLE001
            message = "(the exception's message could not be read)"
        mro = [_qualname(c) for c in type(exc).__mro__]
        reply, enc = {"error": {"type": name, "mro": mro, "message": message}}, wire.Encoder()
    return base64.b64encode(wire.pack(reply, enc.arrays)).decode()


_PROGRAM: str | None = None


def expression(request: str) -> str:
    """The ``user_expressions`` entry that answers ``request`` in the kernel (trusted side)."""
    global _PROGRAM
    if _PROGRAM is None:
        import zlib
        from pathlib import Path

        wire_src = Path(wire.__file__).read_text()
        agent_src = Path(__file__).read_text()
        program = (
            "import types as _types\n"
            "_W = {'__name__': 'ahh_wire'}\n"
            f"exec(compile({wire_src!r}, '<ahh-wire>', 'exec'), _W)\n"
            "wire = _types.SimpleNamespace(**{k: v for k, v in _W.items() if not k.startswith('__')})\n"
            f"exec(compile({agent_src!r}, '<ahh-agent>', 'exec'), globals())\n"
        )
        _PROGRAM = base64.b64encode(zlib.compress(program.encode(), 6)).decode()
    import hashlib

    key = hashlib.sha256(_PROGRAM.encode()).hexdigest()[:16]
    # built once per kernel (compiling it costs about 5 ms) and kept under its hash on ``sys``, out of the
    # way of the course's modules; a kernel that tampers with it there can only spoil its own answers
    build = (
        "(lambda d: (exec(compile(__import__('zlib').decompress(__import__('base64').b64decode("
        f"'{_PROGRAM}')), '<ahh-agent>', 'exec'), d), d['serve'])[1])({{'__name__': 'ahh_agent'}})"
    )
    return (
        f"(lambda c: (c.get('{key}') or c.setdefault('{key}', {build}))('{request}'))"
        "(__import__('sys').__dict__.setdefault('_ahh_agents', {}))"
    )
