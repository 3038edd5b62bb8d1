"""The trust boundary in process: the wire format, the stand-ins, and every chapter's checks through them.

The judge (the grader's process) calls the student's objects through :class:`RemoteObject`
stand-ins; here the kernel's agent answers from a thread of this process (its own torch grad
mode, as a kernel has), through the same encoding as in grading. Every solution must pass
and every mutant must lose points and be named through the stand-ins, as it does in process.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import namespace

from autograder.checks.common import CheckFailure
from autograder.checks.runner import run_check
from autograder.course import CHAPTERS
from autograder.grading import agent, wire
from autograder.grading.judge import CellFacts, _definition, run_remote_check
from autograder.grading.remote import Remote, RemoteCallError, RemoteError, RemoteObject, is_remote
from autograder.mutants import mutants_of
from autograder.notebook_format import solution_sources

_POOL = concurrent.futures.ThreadPoolExecutor(1)


def _remote(ns: dict) -> Remote:
    agent.set_namespace(ns)
    return Remote(lambda request: _POOL.submit(agent.serve, request).result())


def _roundtrip(value):
    enc = wire.Encoder()
    tree = enc.encode(value)
    tree, arrays = wire.unpack(wire.pack(tree, enc.arrays))
    return wire.Decoder(arrays).decode(tree)


# -- the wire ------------------------------------------------------------------------------


def test_plain_data_crosses_exactly():
    value = {
        "n": 3,
        "big": 2**70,
        "x": -1.5,
        "inf": math.inf,
        "s": "é",
        "t": (1, None, True),
        "l": [np.float32(2.5), np.arange(6).reshape(2, 3)],
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        (1, 2): "tuple key",
    }
    back = _roundtrip(value)
    assert back["big"] == 2**70 and back["inf"] == math.inf and back["t"] == (1, None, True)
    assert type(back["l"][0]) is np.float32 and np.array_equal(back["l"][1], value["l"][1])
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], value["bf16"])
    assert back["dtype"] is torch.float16 and back[(1, 2)] == "tuple key"
    assert math.isnan(_roundtrip(math.nan))


def test_tensors_keep_their_layout_and_flags():
    base = torch.randn(2, 5, 3, 4)
    k = base.transpose(1, 2)  # a permuted view: its strides cross
    back = _roundtrip((k, torch.zeros(2, requires_grad=True), torch.randn(4)[::2]))
    assert back[0].stride() == k.stride() and torch.equal(back[0], k)
    assert back[1].requires_grad and type(back[1]) is torch.Tensor
    assert back[2].shape == (2,)


def test_what_is_not_data_does_not_cross():
    class Sub(torch.Tensor):
        pass

    for value in (torch.zeros(2).as_subclass(Sub), np.zeros(2).view(np.matrix), object(), lambda: 1, {"a": {1, 2}}):
        with pytest.raises(wire.WireError):
            wire.Encoder().encode(value)


def test_malformed_and_oversized_messages_are_refused():
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(wire.WireError):
        wire.unpack(wire.pack({"$nd": 0}, [])[:8] + b"{}" + b"junk")
    with pytest.raises(wire.WireError):
        wire.Decoder([np.array([object()], dtype=object)]).decode({"$nd": 0})
    with pytest.raises(wire.WireError):
        wire.pack("x" * 100, [], limit=50)
    for tree in ({"$t": 5, "dtype": "float32"}, {"$unknown": 1}, {"$dtype": "os"}, {"$h": 1}):
        with pytest.raises(wire.WireError):
            wire.Decoder([]).decode(tree)


def test_a_trusted_module_crosses_by_value():
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True, bias=False).double().eval()
    back = _roundtrip(mha)
    assert type(back) is torch.nn.MultiheadAttention and back is not mha and not back.training
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    assert torch.equal(back(x, x, x)[0], mha(x, x, x)[0])
    assert type(_roundtrip(OrderedDict(a=1))) is dict


# -- the stand-ins --------------------------------------------------------------------------


def test_stand_ins_answer_with_data_and_handles():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.proj(x)

    def lying():
        class Liar:
            def __eq__(self, other):
                return True

        return Liar()

    def raises(kind):
        raise {"assert": AssertionError, "ni": NotImplementedError, "fail": CheckFailure}[kind]("from the student")

    remote = _remote({"Layer": Layer, "lying": lying, "raises": raises, "inplace": lambda t: t.mul_(2)})
    layer = remote.lookup("Layer")()
    assert is_remote(layer) and isinstance(layer, torch.nn.Module) and isinstance(layer.proj, torch.nn.Linear)
    out = layer(torch.ones(1, 3))
    assert type(out) is torch.Tensor and out.shape == (1, 2)
    assert {n for n, _ in layer.named_parameters()} == {"proj.weight", "proj.bias"}
    liar = remote.lookup("lying")()
    assert type(liar) is RemoteObject and liar != 1, "an object with its own __eq__ stays in the kernel"
    with pytest.raises(RemoteError) as exc:
        remote.lookup("raises")("assert")
    assert not isinstance(exc.value, AssertionError), "a student's AssertionError must not look like a check's"
    with pytest.raises(NotImplementedError):
        remote.lookup("raises")("ni")
    with pytest.raises(CheckFailure):  # it can only fail a check
        remote.lookup("raises")("fail")
    t = torch.ones(2)
    remote.lookup("inplace")(t)
    assert torch.equal(t, torch.full((2,), 2.0)), "an input changed in place in the kernel is changed here too"


def test_an_answer_that_is_not_data_is_refused():
    for answer in (None, "not base64!", "AAAA"):
        with pytest.raises(RemoteCallError):
            Remote(lambda request, a=answer: a).lookup("x")


# -- every chapter's checks through the stand-ins ------------------------------------------------


def _facts(code: str, name: str) -> CellFacts:
    import ast

    node = _definition(code, name)
    return CellFacts(ast.get_source_segment(code, node) or "" if node else "", node is not None, False, set())


def _params():
    params = []
    for chapter in CHAPTERS:
        marks = [pytest.mark.slow] if chapter.key in ("ch08", "ch09", "ch10") else []  # Triton's interpreter; forked ranks
        for ex in chapter.exercises:
            params.append(pytest.param(chapter, ex, None, id=f"{chapter.key}-{ex.name}", marks=marks))
        for i, m in enumerate(mutants_of(chapter.key)):
            if marks and i % 3:
                continue  # slow chapters: every third mutant (all of them run in process in test_exercises)
            ex = next(e for e in chapter.exercises if e.name == m.exercise)
            params.append(pytest.param(chapter, ex, m, id=f"{chapter.key}-{m.id}", marks=marks))
    return params


@pytest.mark.parametrize(("chapter", "exercise", "mutant"), _params())
def test_checks_give_the_same_verdicts_through_the_stand_ins(chapter, exercise, mutant):
    code = mutant.code if mutant else solution_sources(chapter.solutions_module)[exercise.name]
    ns = namespace(chapter, replace={exercise.name: code} if mutant else None)
    verdicts = []
    for hidden in (False, True):
        direct = run_check(exercise, ns, hidden=hidden)
        judged = run_remote_check(exercise, _remote(ns), _facts(code, exercise.name), hidden)
        assert judged.passed == direct.passed, f"hidden={hidden}: in process {direct.message!r}, judged {judged.message!r}"
        verdicts.append(judged)
    if mutant is not None:
        messages = "\n".join(v.message for v in verdicts if not v.passed)
        assert messages, f"mutant {mutant.id} passes every check through the stand-ins"
        assert mutant.diagnosis.lower() in messages.lower(), f"no diagnosis {mutant.diagnosis!r} in:\n{messages}"


def test_a_failure_caused_by_an_earlier_exercise_names_it():
    """An unstable softmax (exercise 1) makes attend and dot_product_attention fail on large scores; their
    messages say that softmax is the cause, in process and through the stand-ins."""
    chapter = next(c for c in CHAPTERS if c.key == "ch01")
    unstable = next(m for m in mutants_of("ch01") if m.name == "no_max_shift")
    ns = namespace(chapter, replace={"softmax": unstable.code})
    sources = solution_sources(chapter.solutions_module)
    for ex in chapter.exercises[1:]:
        direct = run_check(ex, ns, hidden=True)
        judged = run_remote_check(ex, _remote(ns), _facts(sources[ex.name], ex.name), hidden=True)
        for outcome in (direct, judged):
            assert not outcome.passed and "it comes from your softmax (exercise 1)" in outcome.message, outcome.message
