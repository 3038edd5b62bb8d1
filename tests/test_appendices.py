"""The appendices: every myth's claim holds, the Keras mapping is exact, the instructors' page names real options.

The myths and Keras notebooks assert their own claims cell by cell. The fast tests here run those
cells in process (and recompute the key numbers independently, with PyTorch only); the slow
tests execute both notebooks in a kernel exactly as the book does (no error, no stderr) and look
for each cell's verdict line in the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import sys
import warnings
from pathlib import Path

import matplotlib
import nbformat
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from autograder.course import ROOT

MYTHS = ROOT / "chapters" / "appendix_myths_and_mistakes.ipynb"
KERAS_NB = ROOT / "chapters" / "appendix_keras.ipynb"
INSTRUCTORS = ROOT / "chapters" / "appendix_for_instructors.md"
F64 = torch.float64

# The verdict line each myth cell prints once its assertions have passed.
MYTH_VERDICTS = {
    "myth1": "verdict 1: heads split the features, not the sequence",
    "myth2": "verdict 2: the FLOP count is the same for every number of heads",
    "myth2-softmax": "verdict 2b: the softmax and the L x S tensors grow with B*H*L*S",
    "myth3": "verdict 3: PyTorch scales by 1/sqrt(head_dim)",
    "myth4": "verdict 4: the cost grows quadratically in n",
    "myth4-traffic": "verdict 4b: a fused kernel re-reads K and V once per query tile",
    "myth5": "verdict 5: masking after the softmax leaks the future",
    "myth6": "verdict 6: NaN from a plain softmax and from nn.MultiheadAttention's weights",
    "myth6-grad": "verdict 6b: one fully masked sequence makes the loss NaN",
    "myth7": "verdict 7: very different attention weights give the same output",
    "myth7b": "verdict 7b: weight, contribution, effect of removal and gradient rank the keys differently",
    "myth8": "verdict 8: without positions",
    "myth9": "verdict 9: the hand computation matches PyTorch",
}

# Diagnosis phrases the myths appendix quotes, and the chapter whose checks or mutants must contain them.
QUOTED_DIAGNOSES = [
    ("ch04", "you split the sequence (L) into heads. Heads split the feature dimension E: every head sees all L tokens"),
    ("ch04", "split heads with a view without transpose: (B, L, E) reshaped straight to (B, H, L, D) mixes tokens"),
    ("ch04", "multiplied the attention cost by num_heads with width E per head; each head works on D = E/H features"),
    ("ch04", "forgot the factor num_heads: every one of the H heads costs 2·B·L·S·D for Q·Kᵀ and again for weights·V"),
    ("ch04", "scaled the scores by 1/sqrt(num_heads). The scale is 1/sqrt(head_dim) = 1/sqrt(E/H)"),
    ("ch02", "scaled the scores by 1/d instead of 1/sqrt(d)"),
    ("ch04", "left out the projections (Q, K, V and output): they are matrix products too"),
    ("ch02", "applied the mask after the softmax: zeroing weights leaves rows that no longer sum to 1"),
    ("ch04", "masked after the softmax: masked positions must get -inf before the softmax, so the rest renormalise to 1"),
    ("ch02", "whose keys are all masked got NaN"),
    ("ch02", "got uniform weights 1/S, so it averages keys it must not see"),
    ("ch04", "a fully masked query (all its keys masked) gave NaN: the softmax of a row of -inf is 0/0"),
    ("ch03", "NaN on a fully masked row"),
    ("ch03", "self-attention without a mask should be permutation-equivariant"),
    ("ch03", "concatenated the sines and the cosines"),
    ("ch03", "swapped sin and cos"),
    ("ch01", "over the queries"),
    ("ch01", "values instead of the keys"),
    ("ch07", "scaled by 1/sqrt(embed_dim): each head's scores are dot products of D = E/H features"),
    ("ch10", "scaled the scores by 1/sqrt(E/p), the width of the rank's slice. The scale is per head: 1/sqrt(head_dim)"),
    ("ch07", "counted L * L instead of L * S: the score matrix is L queries by S keys."),
    ("ch08", "created a tensor as large as the whole (L, S) score matrix"),
]


def _code_cells(path: Path) -> dict[str, nbformat.NotebookNode]:
    return {c.id: c for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "code"}


@contextlib.contextmanager
def _notebook_process_state():
    """Cells change process-wide settings (threads, warnings, print options, backend): put them back."""
    threads = torch.get_num_threads()
    backend = matplotlib.get_backend()
    matplotlib.use("Agg")
    try:
        with warnings.catch_warnings():
            yield
    finally:
        torch.set_num_threads(threads)
        torch.set_printoptions(profile="default")
        import matplotlib.pyplot as plt

        plt.close("all")
        matplotlib.use(backend)


def _run_cells(path: Path, ids: list[str], namespace: dict | None = None) -> str:
    """Execute the given code cells of a notebook in one namespace; return what they printed."""
    cells = _code_cells(path)
    ns = namespace if namespace is not None else {"get_ipython": lambda: None}
    out = io.StringIO()
    with _notebook_process_state(), contextlib.redirect_stdout(out):
        for cell_id in ids:
            exec(compile(cells[cell_id].source, f"<{path.stem}:{cell_id}>", "exec"), ns)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Myths: each cell's own assertions, run in process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell_id", list(MYTH_VERDICTS))
def test_myth_cell_holds(cell_id: str) -> None:
    printed = _run_cells(MYTHS, ["setup", cell_id])
    assert MYTH_VERDICTS[cell_id] in printed, printed[-2000:]


def test_every_myth_cell_has_a_verdict() -> None:
    """A new myth cell must be added to MYTH_VERDICTS, so that the tests run it."""
    myth_cells = {i for i, c in _code_cells(MYTHS).items() if "verdict" in c.source}
    assert myth_cells == set(MYTH_VERDICTS)


@pytest.mark.parametrize(("chapter", "phrase"), QUOTED_DIAGNOSES)
def test_quoted_diagnosis_exists(chapter: str, phrase: str) -> None:
    """The appendix quotes the feedback word for word; the phrase must still be in that chapter's catalogue."""
    text = nbformat.read(str(MYTHS), as_version=4)
    prose = " ".join(c.source for c in text.cells if c.cell_type == "markdown")
    assert phrase in prose, f"the appendix no longer quotes {phrase!r}: update QUOTED_DIAGNOSES"
    source = "".join((ROOT / "autograder" / kind / f"{chapter}.py").read_text() for kind in ("checks", "mutants"))
    catalogue = re.sub(r'"\s*\n\s*f?"', "", source)  # join implicitly concatenated string literals
    assert phrase in catalogue, f"{phrase!r} is no longer in autograder/checks|mutants/{chapter}.py: update the appendix"


def test_myths_links_every_chapter_label() -> None:
    prose = " ".join(c.source for c in nbformat.read(str(MYTHS), as_version=4).cells if c.cell_type == "markdown")
    assert prose.startswith("(app-myths-and-mistakes)=")
    for label in ("dot-product-attention", "scaled-dot-product-attention", "self-attention", "multi-head-attention"):
        assert f"{{ref}}`ch-{label}`" in prose
    for label in (
        "transformer-block",
        "kv-cache-and-gqa",
        "multi-head-attention-on-gpu",
        "flash-attention",
        "heads-across-devices",
    ):
        assert f"{{ref}}`ch-{label}`" in prose


# ---------------------------------------------------------------------------------------------
# Myths: the key numbers, recomputed independently of the notebook
# ---------------------------------------------------------------------------------------------


def _counted_flops(layer: nn.MultiheadAttention, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        layer(x, x, x, need_weights=True)  # the plain bmm path, which the counter sees
    return counter.get_total_flops()


def test_flops_do_not_depend_on_heads() -> None:
    E, L = 64, 32
    x = torch.randn(1, L, E)
    counts = {H: _counted_flops(nn.MultiheadAttention(E, H, batch_first=True).train(), x) for H in (1, 2, 8, 64)}
    assert set(counts.values()) == {8 * L * E * E + 4 * L * L * E}, counts


def test_flops_are_quadratic_in_length() -> None:
    E = 16
    layer = nn.MultiheadAttention(E, 2, batch_first=True).train()
    small, large = (_counted_flops(layer, torch.randn(1, n, E)) for n in (256, 512))
    assert (small, large) == (8 * 256 * E * E + 4 * 256**2 * E, 8 * 512 * E * E + 4 * 512**2 * E)
    assert math.log2(large / small) > 1.8  # doubling n nearly quadruples the cost once n >> 2E


def test_scale_is_one_over_sqrt_head_dim() -> None:
    torch.manual_seed(0)
    E, H, L = 96, 4, 5
    D = E // H
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=F64).eval()
    x = torch.randn(1, L, E, dtype=F64)
    with torch.no_grad():
        reference = mha(x, x, x)[0]
        q, k, v = (t.view(1, L, H, D).transpose(1, 2) for t in F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))

        def error(scale: float) -> float:
            heads = torch.softmax(scale * q @ k.transpose(-2, -1), -1) @ v
            return (mha.out_proj(heads.transpose(1, 2).reshape(1, L, E)) - reference).abs().max().item()

        assert error(D**-0.5) < 1e-12
        assert error(H**-0.5) > 1e-3 and error(E**-0.5) > 1e-3


def test_fully_masked_query() -> None:
    torch.manual_seed(0)
    q = k = v = torch.randn(1, 2, 3, 4, dtype=F64)
    allowed = torch.ones(3, 3, dtype=torch.bool)
    allowed[0] = False
    assert (F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)[0, :, 0] == 0).all()
    assert torch.isnan(torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~allowed, float("-inf")), -1)[0, :, 0]).all()
    mha = nn.MultiheadAttention(8, 2, batch_first=True, dtype=F64).eval()
    x = torch.randn(1, 3, 8, dtype=F64)
    with torch.no_grad():
        out, weights = mha(x, x, x, attn_mask=~allowed)
    assert torch.isnan(weights[0, 0]).all() and torch.isnan(out[0, 0]).all()


def test_mask_after_softmax_sees_the_future() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(5, 4, dtype=F64) for _ in range(3))
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()
    k2 = k.clone()
    k2[-1] += 1.0
    after = lambda kk: (torch.softmax(q @ kk.T / 2, -1) * allowed) @ v
    before = lambda kk: F.scaled_dot_product_attention(q, kk, v, attn_mask=allowed)
    assert (after(k2) - after(k))[:-1].abs().amax(-1).min() > 1e-6
    assert (before(k2) - before(k))[:-1].abs().max() == 0


def test_self_attention_without_positions_is_permutation_equivariant() -> None:
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=F64).eval()
    x = torch.randn(1, 6, 8, dtype=F64)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        assert (block(x[:, perm]) - block(x)[:, perm]).abs().max() < 1e-12
        position = torch.arange(6, dtype=F64)[:, None] * torch.ones(8, dtype=F64)
        assert (block(x[:, perm] + position) - block(x + position)[:, perm]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Keras: the notebook's mapping cell (tag keras-mapping), tested as it stands on the page
# ---------------------------------------------------------------------------------------------


def _mapping_namespace() -> dict:
    cells = [c for c in nbformat.read(str(KERAS_NB), as_version=4).cells if "keras-mapping" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell of the Keras appendix carries the tag keras-mapping"
    # The names the notebook's setup cell imports (running the cell itself would change global torch settings).
    ns: dict = {"np": np, "torch": torch, "nn": torch.nn, "F": torch.nn.functional}
    exec(compile(cells[0].source, "<appendix_keras:keras-mapping>", "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def keras_torch():
    """Keras on the PyTorch backend, or a skip that says why."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"  # must be set before keras is first imported
    keras = pytest.importorskip("keras", reason='Keras is an optional extra: pip install "attention-head-by-head[keras]"')
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras was already imported with the {keras.backend.backend()} backend in this process")
    return keras


def _pair(keras, E: int, H: int, dtype: torch.dtype, seed: int = 0):
    ns = _mapping_namespace()
    torch.manual_seed(seed)
    mha_torch = nn.MultiheadAttention(E, H, batch_first=True, dtype=dtype).eval()
    with torch.no_grad():
        mha_torch.in_proj_bias.normal_()
        mha_torch.out_proj.bias.normal_()
    mha_keras = keras.layers.MultiHeadAttention(num_heads=H, key_dim=E // H, dtype=str(dtype).removeprefix("torch."))
    mha_keras.build((2, 3, E), (2, 4, E))
    ns["torch_mha_to_keras"](mha_torch, mha_keras)
    return ns, mha_torch, mha_keras


@pytest.mark.parametrize(
    ("E", "H", "dtype", "tol"), [(12, 3, torch.float32, 1e-5), (10, 5, torch.float64, 1e-12), (8, 1, torch.float64, 1e-12)]
)
def test_keras_mapping_gives_equal_outputs_and_weights(keras_torch, E: int, H: int, dtype: torch.dtype, tol: float) -> None:
    _, mha_torch, mha_keras = _pair(keras_torch, E, H, dtype)
    x, memory = torch.randn(2, 3, E, dtype=dtype), torch.randn(2, 4, E, dtype=dtype)
    padding = torch.tensor([[False] * 4, [False, False, True, True]])
    with torch.no_grad():
        ref, ref_w = mha_torch(x, memory, memory, key_padding_mask=padding, average_attn_weights=False)
    out, scores = mha_keras(
        query=x, value=memory, attention_mask=~padding[:, None, :].expand(2, 3, 4), return_attention_scores=True
    )
    assert out.dtype == dtype and tuple(scores.shape) == (2, H, 3, 4)
    assert (out.detach() - ref).abs().max().item() < tol
    assert (scores.detach() - ref_w).abs().max().item() < tol
    fused = mha_keras(query=x, value=memory, attention_mask=~padding[:, None, :].expand(2, 3, 4))
    assert (fused.detach() - ref).abs().max().item() < 1e-5  # Keras's fused path computes in float32 (see the appendix)


def test_keras_mapping_round_trip_is_exact(keras_torch) -> None:
    ns, mha_torch, mha_keras = _pair(keras_torch, 12, 4, torch.float64)
    back = nn.MultiheadAttention(12, 4, batch_first=True, dtype=F64)
    ns["keras_mha_to_torch"](mha_keras, back)
    for name, tensor in mha_torch.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_keras_mapping_refuses_mismatched_layers(keras_torch) -> None:
    ns, _, mha_keras = _pair(keras_torch, 12, 3, torch.float32)
    with pytest.raises(ValueError, match="should be"):
        ns["torch_mha_to_keras"](nn.MultiheadAttention(12, 4, batch_first=True), mha_keras)
    with pytest.raises(ValueError, match="kdim"):
        ns["torch_mha_to_keras"](nn.MultiheadAttention(12, 3, batch_first=True, bias=False), mha_keras)
    unbuilt = keras_torch.layers.MultiHeadAttention(num_heads=3, key_dim=4)
    with pytest.raises(ValueError, match="build"):
        ns["torch_mha_to_keras"](nn.MultiheadAttention(12, 3, batch_first=True), unbuilt)


def test_keras_notebook_cells_hold(keras_torch) -> None:
    ids = [i for i in _code_cells(KERAS_NB)]
    printed = _run_cells(KERAS_NB, ids)
    assert "skipped" not in printed
    for marker in ("all 8 weight tensors identical: True", "mismatched layers are refused", "weights all zero: True"):
        assert marker in printed, printed[-2000:]


def test_keras_notebook_runs_without_keras(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Keras the page still executes: it says how to install it and skips the comparisons."""
    monkeypatch.setitem(sys.modules, "keras", None)  # `import keras` now raises ImportError
    monkeypatch.setenv("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "torch"))
    printed = _run_cells(KERAS_NB, list(_code_cells(KERAS_NB)))
    assert 'pip install "attention-head-by-head[keras]"' in printed
    skipped = printed.count("skipped: Keras on the PyTorch backend is not available")
    assert skipped == len(_code_cells(KERAS_NB)) - 2  # every cell but the setup and the mapping


# ---------------------------------------------------------------------------------------------
# For instructors: the page's commands and options exist
# ---------------------------------------------------------------------------------------------


def _cli_options() -> dict[str, set[str]]:
    from autograder.cli import parser

    subparsers = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {verb: {o for a in p._actions for o in a.option_strings} for verb, p in subparsers.choices.items()}


def test_instructors_page_uses_real_commands_and_options() -> None:
    text = INSTRUCTORS.read_text()
    assert text.startswith("(app-for-instructors)=")
    options = _cli_options()
    commands = re.findall(r"python -m autograder (\w+)([^\n`]*)", text)
    assert {verb for verb, _ in commands} >= {"release", "grade", "check", "sync"}
    for verb, rest in commands:
        assert verb in options, f"`python -m autograder {verb}` is not a command"
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
            assert option in options[verb], f"`python -m autograder {verb}` has no option {option}"


# ---------------------------------------------------------------------------------------------
# Slow: the notebooks as the book executes them (a kernel; no error, nothing on stderr)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("path", [MYTHS, KERAS_NB], ids=lambda p: p.stem)
def test_appendix_notebook_executes_like_the_book(path: Path, tmp_path: Path) -> None:
    from autograder.book import execute

    nb = execute(nbformat.read(str(path), as_version=4), path.name, tmp_path)  # raises on an error or stderr
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    markers = MYTH_VERDICTS.values() if path == MYTHS else ["identical: True", "mismatched layers are refused"]
    for marker in markers:
        assert marker in text, marker
    if path == MYTHS:
        figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
        assert figures >= 2
