"""Helpers shared by the chapter checks: calling student code, comparing, diagnosing.

Every failure is a :class:`CheckFailure` (an ``AssertionError``) whose message says what
was called, on which input, what was expected, what came back and, when the result
matches the fingerprint of a known mistake, which mistake it is.
"""

from __future__ import annotations

import ast
import contextvars
import inspect
import textwrap
import warnings
from collections.abc import Callable, Mapping

import numpy as np

from autograder.checks import trusted as T


class CheckFailure(AssertionError):
    """A failed check, with a message meant for the student."""


try:
    from autograder.grading.remote import RemoteCallError as _RemoteCallError
except ImportError:  # pragma: no cover

    class _RemoteCallError(Exception):
        pass


def show(a: np.ndarray, limit: int = 160) -> str:
    """A short, readable rendering of an array for messages."""
    text = T.np_array2string(T.np_asarray(a), precision=4, threshold=12, edgeitems=2, max_line_width=100)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def call(fn: Callable, *args, label: str, **kwargs):
    """Call student code; turn its exceptions into a message that names the call."""
    if not callable(fn):
        raise CheckFailure(f"{label}: expected a function or class, got {T.type_name(fn)}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with T.np_errstate(all="ignore"):
                return fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckFailure(f"{label}: not implemented yet (the cell still raises NotImplementedError).") from None
    except CheckFailure:
        raise
    except _RemoteCallError as exc:  # the kernel died, hung, or answered with something that is not data
        raise CheckFailure(f"{label}: {exc}") from None
    except Exception as exc:  # noqa: BLE001  (any student error becomes a message)
        raise CheckFailure(f"{label} raised {T.type_name(exc)}: {exc}") from None


def to_float64(result, *, label: str, what: str = "result", allow_tensor: bool = True) -> np.ndarray:
    """Validate the exact type of a student result and return a float64 NumPy copy."""
    if T._type(result) is T.ndarray:
        return T.ndarray_to_float64(result)
    if allow_tensor and T.is_tensor(result):
        return T.tensor_to_float64(result)
    wanted = "a NumPy array" + (" or a torch.Tensor" if allow_tensor else "")
    raise CheckFailure(f"{label}: the {what} should be {wanted}, got {T.type_name(result)}.")


_SINGULAR_S = ("ss", "us", "is", "bias", "lse", "logsumexp")


def is_or_are(what: str) -> str:
    """``"the weights are"``-style agreement: "are" when the last word of ``what`` is a plural noun."""
    words = what.split("(")[0].split()  # "weights (second element)": the noun before the aside
    last = words[-1].strip("`'\".,()") if words else ""
    return "are" if last.endswith("s") and not last.endswith(_SINGULAR_S) else "is"


def expect_shape(actual: np.ndarray, shape: tuple, *, label: str, what: str = "result") -> None:
    if T._tuple(actual.shape) != T._tuple(shape):
        raise CheckFailure(f"{label}: the {what} should have shape {T._tuple(shape)}, got {T._tuple(actual.shape)}.")


def max_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference, treating equal infinities and NaN-vs-NaN as agreement."""
    both_nan = T.np_isnan(actual) & T.np_isnan(expected)
    same_inf = T.np_isinf(actual) & (actual == expected)
    with T.np_errstate(invalid="ignore"):
        diff = T.np_abs(actual - expected)
    diff[both_nan | same_inf] = 0.0
    diff[T.np_isnan(diff)] = float("inf")
    return float(T.np_max(diff)) if diff.size else 0.0


def matches(actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float = 0.0) -> bool:
    if T._tuple(actual.shape) != T._tuple(expected.shape):
        return False
    scale = float(T.np_max(T.np_abs(expected[T.np_isfinite(expected)]))) if T.np_isfinite(expected).any() else 0.0
    return max_error(actual, expected) <= atol + rtol * scale


def diagnose(actual: np.ndarray, fingerprints: Mapping[str, Callable[[], np.ndarray]], atol: float) -> str | None:
    """Name the first known mistake whose output ``actual`` reproduces, if any."""
    for mistake, make in fingerprints.items():
        try:
            with T.np_errstate(all="ignore"):
                candidate = T.np_asarray(make(), dtype=T.np_float64)
        except Exception:  # noqa: BLE001  (a fingerprint that does not apply to this input)
            continue
        if matches(actual, candidate, atol):
            return mistake
    return None


def expect_close(
    actual: np.ndarray,
    expected: np.ndarray,
    *,
    label: str,
    atol: float,
    rtol: float = 0.0,
    what: str = "result",
    fingerprints: Mapping[str, Callable[[], np.ndarray]] | None = None,
) -> None:
    """Fail with expected/got/diagnosis when ``actual`` is not within tolerance of ``expected``."""
    expect_shape(actual, expected.shape, label=label, what=what)
    if matches(actual, expected, atol, rtol):
        return
    mistake = diagnose(actual, fingerprints or {}, atol=max(atol, 1e-6))
    lines = [
        f"{label}: the {what} {is_or_are(what)} wrong (largest error {max_error(actual, expected):.3g}, tolerance {atol:.1g}).",
        f"  expected: {show(expected)}",
        f"  got:      {show(actual)}",
    ]
    if not T.np_isfinite(actual).all() and T.np_isfinite(expected).all():
        lines.append("  Your result contains NaN or inf where the correct one is finite.")
    if mistake:
        lines.append(f"  Likely mistake: {mistake}")
    raise CheckFailure("\n".join(lines))


def source_tree(obj) -> ast.AST | None:
    """The syntax tree of a student function or class: from the exercise cell the judge read
    from the notebook when ``obj`` lives in the student's kernel, else from ``inspect``."""
    from autograder.grading.judge import source_of
    from autograder.grading.remote import is_remote

    try:
        if is_remote(obj):
            text = source_of(obj)
            if not text:
                return None
            tree = ast.parse(text)
            defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
            return defs[-1] if len(defs) == 1 else tree
        return ast.parse(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError, SyntaxError):
        return None


def loops_in(fn: Callable) -> list[str]:
    """Python-level loops in ``fn``'s source (for 'vectorise it' exercises); [] when unknown."""
    tree = source_tree(fn)
    if tree is None:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.While, ast.AsyncFor)):
            found.append(f"a {type(node).__name__.lower()} loop on line {node.lineno}")
        elif isinstance(node, (ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp)):
            found.append(f"a comprehension on line {node.lineno}")
        elif isinstance(node, ast.Attribute) and node.attr in {"vectorize", "apply_along_axis", "frompyfunc"}:
            found.append(f"np.{node.attr} on line {node.lineno}")
        elif isinstance(node, ast.Name) and node.id == "map":
            found.append(f"map() on line {node.lineno}")
    return found


_vars = vars  # captured: the checks below must see the class as defined, not a patched ``vars``


def names_used_in_methods(cls: type, names: set[str]) -> list[str]:
    """Uses of any of ``names`` (as a name or an attribute) in the methods of ``cls``; [] when the source is unknown."""
    found = []
    from autograder.grading.remote import is_remote

    if is_remote(cls):
        tree = source_tree(cls)
        body = tree.body if isinstance(tree, ast.ClassDef) else []
        methods = [(n.name, n) for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    else:
        methods = []
        for attr, fn in _vars(cls).items():
            if not inspect.isfunction(fn):
                continue
            try:
                methods.append((attr, ast.parse(textwrap.dedent(inspect.getsource(fn)))))
            except (OSError, TypeError, SyntaxError):
                continue
    for attr, tree in methods:
        for node in ast.walk(tree):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name in names:
                found.append(f"{name} in {attr}")
    return found


_namespace_var: contextvars.ContextVar = contextvars.ContextVar("student_namespace", default=None)


def sibling(name: str):
    """Another exercise's object where the student's code lives (the kernel in grading, the namespace in a
    self-check), to say which earlier exercise a failure comes from; None when it is not defined."""
    from autograder.grading.remote import current_remote

    remote = current_remote()
    if remote is not None:
        try:
            return remote.lookup(name)
        except Exception:  # noqa: BLE001  (not defined there, or the kernel cannot answer)
            return None
    namespace = _namespace_var.get()
    return namespace.get(name) if isinstance(namespace, Mapping) else None


def passed(name: str, count: int, hidden: bool = False) -> None:
    kind = "hidden" if hidden else "visible"
    print(f"\u2714 {name}: {count} {kind} check{'' if count == 1 else 's'} passed")
