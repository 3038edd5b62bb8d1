"""Working with a student's module the same way whether it is here or in the student's kernel.

During grading the checks run in the grader's process and the student's module is a stand-in
(:class:`autograder.grading.remote.RemoteObject`) whose calls go to the kernel; in the tests
and the self-check it is the real object. These helpers do each job both ways, with captured
references for the real object (a student cell may rebind ``nn.Module.to`` and the like).
"""

from __future__ import annotations

import builtins

import torch
import torch.nn as nn

from autograder.grading.remote import is_remote, remote_grad

_module_to = nn.Module.to
_named_parameters = nn.Module.named_parameters
_copy_ = torch._C.TensorBase.copy_
_no_grad = torch.no_grad
_autograd_grad = torch.autograd.grad
_getattr = builtins.getattr
_Tensor = torch.Tensor
_type = builtins.type


def module_to(module, *args, **kwargs):
    """``module.to(...)``; returns the module."""
    if is_remote(module):
        return module.to(*args, **kwargs)
    return _module_to(module, *args, **kwargs)


def parameter_names(module) -> set[str]:
    """Names of the registered parameters (``"W_q.weight"``, ...)."""
    items = module.named_parameters() if is_remote(module) else _named_parameters(module)
    return {name for name, _ in items}


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


def output_gradients(module, *args, output_index, grad_output, params: list[str], **kwargs) -> dict:
    """Call the module, then d sum(out * grad_output) / d each parameter of ``params``.

    Returns ``{"result", "requires_grad", "grads"}`` with ``grads`` in the order of ``params``
    (None where no gradient reaches a parameter); empty when the output carries no gradient.
    """
    if is_remote(module):
        return remote_grad(
            module, *args, output_index=output_index, grad_output=grad_output, wrt=[{"attr": p} for p in params], **kwargs
        )
    result = module(*args, **kwargs)
    out = result[output_index] if output_index is not None else result
    if _type(out) is not _Tensor or not out.requires_grad:
        return {"result": result, "requires_grad": False, "grads": []}
    targets = [_path(module, p) for p in params]
    grads = _autograd_grad((out * grad_output).sum(), targets, allow_unused=True)
    return {"result": result, "requires_grad": True, "grads": list(grads)}
