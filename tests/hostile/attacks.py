"""Attacks on the grade itself: cells that try to score points the notebook's code has not earned.

Each attack is one code cell, put right after the setup cell of a **blank** notebook (the
release notebook: every exercise still raises NotImplementedError) and of a **correct** one
(the reference solutions filled in). On the blank notebook every exercise must score 0 in
both ``check`` and ``grade``; on the correct one every exercise keeps its points. Where the
attack can be seen in the notebook's source, the grade is flagged for the instructor.

They are grouped by the class of attack the design must withstand, not by a known exploit:
replacing or wrapping the checks, rewriting later cells, forging output, reading hidden
inputs, references or the salt, and returning objects that lie. ``{key}`` is the chapter's
checks module (``ch01``), ``{target}`` its last exercise (the one a lying implementation replaces:
no other exercise calls it, so on the correct notebook only its points are at stake).
"""

from __future__ import annotations

from dataclasses import dataclass

SUCCESS = "\\u2714 {target}: 9 visible checks passed"


@dataclass(frozen=True)
class Attack:
    name: str
    kind: str
    source: str  # a cell placed after the setup cell
    exercise: str | None = None  # replaces the cell of the chapter's last exercise instead (a lying implementation)
    flagged: bool = True  # the static review can see it


ATTACKS = [
    # -- replacing or wrapping the check functions ------------------------------------------
    Attack(
        "setattr_checks",
        "replace checks",
        """
        import autograder.checks.{key} as _c

        def _ok(*args, **kwargs):
            print("{success}")

        for _n in list(vars(_c)):
            if _n.startswith(("visible_", "hidden_")):
                setattr(_c, _n, _ok)
        """,
    ),
    Attack(
        "sys_modules",
        "replace checks",
        """
        import sys
        import types

        class _Fake(types.ModuleType):
            def __getattr__(self, name):
                return lambda *a, **k: print("{success}")

        for _k in [k for k in sys.modules if k.startswith("autograder")]:
            sys.modules[_k] = _Fake(_k)
        """,
    ),
    Attack(
        "importlib_getattr",
        "replace checks",
        """
        import importlib

        _m = importlib.import_module("auto" + "grader.che" + "cks.{key}")
        _common = importlib.import_module("auto" + "grader.checks.common")
        for _n in dir(_m):
            if _n[:4] in ("hidd", "visi"):
                try:
                    getattr(_m, _n).__code__ = (lambda *a, **k: print("{success}")).__code__
                except (AttributeError, ValueError):
                    setattr(_m, _n, lambda *a, **k: print("{success}"))
        setattr(_common, "call", lambda fn, *a, **k: None)
        """,
    ),
    Attack(
        "gc_code_swap",
        "replace checks",
        """
        import gc

        def _ok(*args, **kwargs):
            print("{success}")

        for _f in gc.get_objects():
            if type(_f).__name__ == "function" and (getattr(_f, "__module__", None) or "").startswith("autograder"):
                try:
                    _f.__code__ = _ok.__code__
                except ValueError:
                    pass
        """,
    ),
    Attack(
        "wrap_agent",
        "replace checks",
        """
        import sys

        _state = sys.__dict__.get("_ahh_agent_state")
        import builtins
        _real_eval = builtins.eval
        builtins.eval = lambda src, *a: _real_eval(src, *a)
        """,
    ),
    # -- rewriting later cells before they run ------------------------------------------------
    Attack(
        "input_transformer",
        "rewrite cells",
        """
        def _rewrite(lines):
            text = "".join(lines)
            if "visible_" in text or "hidden_" in text or "autograder" in text:
                return ['print("{success}")\\n']
            return lines

        get_ipython().input_transformers_cleanup.append(_rewrite)
        get_ipython().input_transformers_post.append(_rewrite)
        """,
    ),
    Attack(
        "ast_transformer",
        "rewrite cells",
        """
        import ast

        class _Swap(ast.NodeTransformer):
            def visit_Module(self, node):
                text = ast.unparse(node)
                if "visible_" in text or "hidden_" in text or "serve" in text:
                    return ast.parse('print("{success}")')
                return node

        get_ipython().ast_transformers.append(_Swap())
        """,
    ),
    Attack(
        "run_cell_replaced",
        "rewrite cells",
        """
        _ip = get_ipython()
        _real = _ip.run_cell

        def run_cell(raw_cell, *args, **kwargs):
            if "visible_" in raw_cell or "hidden_" in raw_cell:
                raw_cell = 'print("{success}")'
            return _real(raw_cell, *args, **kwargs)

        _ip.run_cell = run_cell
        _ip.should_run_async = lambda *a, **k: False
        _ip.run_cell_magic = lambda *a, **k: print("{success}")
        """,
    ),
    Attack(
        "events",
        "rewrite cells",
        """
        def _before(info):
            if "hidden_" in (info.raw_cell or "") or "visible_" in (info.raw_cell or ""):
                print("{success}")
                raise SystemExit

        get_ipython().events.register("pre_run_cell", _before)
        get_ipython().events.register("post_run_cell", lambda result: setattr(result, "error_in_exec", None))
        """,
    ),
    # -- forging output -----------------------------------------------------------------------
    Attack(
        "print_success",
        "forge output",
        """
        import autograder.checks.common as _c

        for _grade in ("visible", "hidden"):
            print("{success}".replace("visible", _grade))
        _c.passed("{target}", 9)
        """,
    ),
    Attack(
        "custom_exception_handler",
        "forge output",
        """
        _ip = get_ipython()
        _ip.set_custom_exc((BaseException,), lambda shell, etype, value, tb, tb_offset=None: print("{success}"))
        _ip.showtraceback = lambda *a, **k: print("{success}")
        """,
    ),
    Attack(
        "stdout_replaced",
        "forge output",
        """
        import sys

        class _Forger:
            def __init__(self, real):
                self.real = real

            def write(self, text):
                return self.real.write(text.replace("Error", "ok").replace("not implemented", "{success}"))

            def flush(self):
                return self.real.flush()

        sys.stdout = _Forger(sys.stdout)
        sys.stderr = _Forger(sys.stdout)
        """,
    ),
    Attack(
        "clear_output",
        "forge output",
        """
        from IPython.display import clear_output

        def _after(result):
            clear_output()
            print("{success}")

        get_ipython().events.register("post_run_cell", _after)
        """,
    ),
    # -- reading hidden inputs, references or the salt ----------------------------------------
    Attack(
        "read_salt",
        "read secrets",
        """
        import os
        import sys

        _salt = os.environ.get("AHH_HIDDEN_SALT")
        _seeding = sys.modules.get("autograder.checks.seeding")
        _found = {{"env": _salt, "module": getattr(_seeding, "_salt", None)}}
        for _root in ("/tmp", ".", ".."):
            try:
                _found[_root] = sorted(os.listdir(_root))[:20]
            except OSError:
                pass
        print("salt and files:", _found)
        """,
    ),
    Attack(
        "caller_frame",
        "read secrets",
        """
        import sys

        def {target}(*args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None:
                for name in ("expected", "want", "ref", "reference", "oracle"):
                    if name in frame.f_locals:
                        return frame.f_locals[name]
                frame = frame.f_back
            raise NotImplementedError()
        """,
        exercise="{target}",
    ),
    # -- objects that lie ---------------------------------------------------------------------
    Attack(
        "always_equal",
        "lying objects",
        """
        def {target}(*args, **kwargs):
            class Liar:
                shape = getattr(args[0], "shape", ())
                dtype = getattr(args[0], "dtype", None)

                def __eq__(self, other):
                    return True

                def __array__(self, *a, **k):
                    raise TypeError("no")

                def __getattr__(self, name):
                    return self

                def __call__(self, *a, **k):
                    return self

            return Liar()
        """,
        exercise="{target}",
    ),
    Attack(
        "array_subclass",
        "lying objects",
        """
        import numpy as np

        class _Liar(np.ndarray):
            def __eq__(self, other):
                return np.ones(np.shape(other), dtype=bool)

            def __array_ufunc__(self, *a, **k):
                return True

        def {target}(*args, **kwargs):
            return np.zeros(np.shape(args[0]) if args else ()).view(_Liar)
        """,
        exercise="{target}",
    ),
    Attack(
        "tensor_subclass",
        "lying objects",
        """
        import numpy as np
        try:
            import torch

            class _Liar(torch.Tensor):
                @classmethod
                def __torch_function__(cls, func, types, args=(), kwargs=None):
                    if func.__name__ in ("allclose", "equal", "eq", "__eq__"):
                        return True
                    return super().__torch_function__(func, types, args, kwargs or {{}})

            def {target}(*args, **kwargs):
                first = args[0]
                shape = tuple(first.shape) if hasattr(first, "shape") else ()
                return torch.zeros(shape).as_subclass(_Liar)
        except ImportError:
            def {target}(*args, **kwargs):
                raise NotImplementedError()
        """,
        exercise="{target}",
    ),
]


def render(attack: Attack, key: str, target: str) -> str:
    import textwrap

    success = SUCCESS.format(target=target)
    return textwrap.dedent(attack.source).strip().format(key=key, target=target, success=success) + "\n"
