"""Working with a student's module the same way whether it is here or in the student's kernel.

During grading the checks run in the grader's process and the student's module is a stand-in
(:class:`autograder.grading.remote.RemoteObject`) whose calls go to the kernel; in the tests
and the self-check it is the real object. These helpers do each job both ways, with captured
references for the real object (a student cell may rebind ``nn.Module.to`` and the like).
"""

from __future__ import annotations

import builtins

import torch

from autograder.checks import torch_refs as R
from autograder.grading.remote import current_remote, is_remote, remote_grad, remote_watch

# ``module.to(...)`` on either kind of module (torch_refs' captured method, or the stand-in's own); returns it
module_to = R.module_to
_copy_ = torch._C.TensorBase.copy_
_no_grad = torch.no_grad
_autograd_grad = torch.autograd.grad
_getattr = builtins.getattr
_Tensor = torch.Tensor
_type = builtins.type


def parameter_names(module) -> set[str]:
    """Names of the registered parameters (``"W_q.weight"``, ...)."""
    return {name for name, _ in R.named_parameters(module)}


def _path(obj, path: str):
    for part in path.split("."):
        obj = _getattr(obj, part)
    return obj


def set_parameters(module, values: dict) -> None:
    """Copy ``{"W_q.weight": tensor, ...}`` into the module's parameters (no gradient recorded)."""
    if is_remote(module):
        module.load_state_dict(values, strict=False)
        return
    with _no_grad():
        for path, value in values.items():
            _copy_(_path(module, path), value)


def output_gradients(module, *args, output_index, grad_output, params: list[str], inputs: tuple = (), **kwargs) -> dict:
    """Call the module, then d sum(out * grad_output) / d each positional input in ``inputs`` and each
    parameter in ``params`` (in that order).

    Returns ``{"result", "requires_grad", "grads"}`` (None where no gradient reaches a target);
    ``grads`` is empty when the output carries no gradient.
    """
    if is_remote(module):
        wrt = [{"arg": i} for i in inputs] + [{"attr": p} for p in params]
        return remote_grad(module, *args, output_index=output_index, grad_output=grad_output, wrt=wrt, **kwargs)
    result = module(*args, **kwargs)
    out = result[output_index] if output_index is not None else result
    if _type(out) is not _Tensor or not out.requires_grad:
        return {"result": result, "requires_grad": False, "grads": []}
    targets = [args[i] for i in inputs] + [_path(module, p) for p in params]
    grads = _autograd_grad((out * grad_output).sum(), targets, allow_unused=True)
    return {"result": result, "requires_grad": True, "grads": list(grads)}


def watched_call(fn, *args, **kwargs) -> tuple:
    """``fn(*args, **kwargs)`` with a record of the torch functions it called: (result, records).

    Records are those of :func:`autograder.grading.agent.watched`; for an object in the kernel they
    are what the kernel reports.
    """
    if is_remote(fn):
        reply = remote_watch(fn, *args, **kwargs)
        if _type(reply) is not dict or _type(reply.get("calls")) is not list:
            raise TypeError("the kernel's record of the call is malformed")
        return reply["result"], reply["calls"]
    from autograder.grading.agent import watched

    return watched(fn, args, kwargs)


def new_object(cls, *args, **kwargs):
    """An instance of one of the checks' own classes, made where the student's code runs."""
    remote = current_remote()
    if remote is not None:
        return remote.new(f"{cls.__module__}.{cls.__qualname__}", *args, **kwargs)
    return cls(*args, **kwargs)
