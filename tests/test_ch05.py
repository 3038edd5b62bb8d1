"""Chapter 5: the block is nn.TransformerEncoderLayer, the checks' oracle is too, and the mutant template is correct."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import namespace

from autograder.checks import ch05 as checks
from autograder.course import find_chapter
from autograder.mutants.ch05 import TEMPLATE
from autograder.provided import ch04 as provided
from solutions.ch05_transformer_block import TransformerBlock, induction_score, previous_token_score

COMBOS = [(nf, act) for nf in (True, False) for act in ("relu", "gelu")]
COMBO_IDS = [f"{'pre' if nf else 'post'}-{act}" for nf, act in COMBOS]
E, H, FF, B, L = 12, 3, 20, 3, 6


def _masks(dtype=torch.float32) -> dict:
    """Every kind of mask the chapter uses; no query is left without a key."""
    g = torch.Generator().manual_seed(5)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, 4:] = True
    kpm[2, 2:] = True
    float_mask = torch.randn(L, L, generator=g, dtype=dtype).masked_fill(causal, float("-inf"))
    mask3d = torch.rand(B * H, L, L, generator=g) < 0.4
    mask3d[:, :, 0] = False
    float_kpm = torch.zeros(B, L, dtype=dtype).masked_fill(kpm, float("-inf"))
    return {
        "none": {},
        "causal": {"attn_mask": causal},
        "padding": {"key_padding_mask": kpm},
        "causal+padding": {"attn_mask": causal, "key_padding_mask": kpm},
        "float": {"attn_mask": float_mask},
        "3d": {"attn_mask": mask3d},
        "float-padding": {"key_padding_mask": float_kpm},
    }


def _torch_layer(norm_first: bool, activation: str, seed: int = 0) -> nn.TransformerEncoderLayer:
    """nn.TransformerEncoderLayer with random parameters, LayerNorm weights and biases included."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, H, FF, 0.0, activation, batch_first=True, norm_first=norm_first)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 1 / p.shape[-1] ** 0.5))
        for norm in (layer.norm1, layer.norm2):
            norm.weight.add_(1.0)
    return layer


@pytest.mark.parametrize(("norm_first", "activation"), COMBOS, ids=COMBO_IDS)
def test_state_dicts_load_both_ways(norm_first, activation):
    ref = _torch_layer(norm_first, activation)
    block = TransformerBlock(E, H, FF, norm_first=norm_first, activation=activation)
    assert list(block.state_dict()) == list(ref.state_dict())
    block.load_state_dict(ref.state_dict())
    fresh = nn.TransformerEncoderLayer(E, H, FF, 0.0, activation, batch_first=True, norm_first=norm_first)
    fresh.load_state_dict(block.state_dict())
    assert block.norm1.eps == block.norm2.eps == 1e-5


@pytest.mark.parametrize("mask", list(_masks()))
@pytest.mark.parametrize(("norm_first", "activation"), COMBOS, ids=COMBO_IDS)
def test_block_matches_torch_encoder_layer(norm_first, activation, mask):
    ref = _torch_layer(norm_first, activation)
    block = TransformerBlock(E, H, FF, norm_first=norm_first, activation=activation)
    block.load_state_dict(ref.state_dict())
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(1))
    kwargs = _masks()[mask]
    for train in (True, False):
        ref.train(train)
        block.train(train)
        want = ref(x, src_mask=kwargs.get("attn_mask"), src_key_padding_mask=kwargs.get("key_padding_mask"))
        got = block(x, **kwargs)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # last_attention: what nn.MultiheadAttention reports per head, on the input self-attention sees.
    h = ref.norm1(x) if norm_first else x
    _, weights = ref.self_attn(
        h,
        h,
        h,
        attn_mask=kwargs.get("attn_mask"),
        key_padding_mask=kwargs.get("key_padding_mask"),
        need_weights=True,
        average_attn_weights=False,
    )
    assert block.last_attention.shape == (B, H, L, L)
    torch.testing.assert_close(block.last_attention, weights.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("norm_first", "activation"), COMBOS, ids=COMBO_IDS)
def test_is_causal_without_mask_is_the_causal_mask(norm_first, activation):
    ref = _torch_layer(norm_first, activation)
    block = TransformerBlock(E, H, FF, norm_first=norm_first, activation=activation)
    block.load_state_dict(ref.state_dict())
    x = torch.randn(B, L, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    torch.testing.assert_close(block(x, is_causal=True), ref(x, src_mask=causal, is_causal=True), atol=2e-5, rtol=1e-5)


def _params_of(layer: nn.TransformerEncoderLayer) -> dict:
    state = layer.state_dict()
    return {short: state[long].double().numpy() for long, short in checks.STATE_KEYS.items()}


@pytest.mark.parametrize("mask", list(_masks()))
@pytest.mark.parametrize(("norm_first", "activation"), COMBOS, ids=COMBO_IDS)
def test_checks_oracle_is_torch_encoder_layer(norm_first, activation, mask):
    """The float64 NumPy oracle of the checks equals nn.TransformerEncoderLayer in float64."""
    ref = _torch_layer(norm_first, activation).double()
    x = torch.randn(B, L, E, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kwargs = _masks(torch.float64)[mask]
    am, kpm = kwargs.get("attn_mask"), kwargs.get("key_padding_mask")
    want = ref(x, src_mask=am, src_key_padding_mask=kpm).detach().numpy()
    got, weights = checks._oracle(
        _params_of(ref),
        x.numpy(),
        H,
        norm_first=norm_first,
        activation=activation,
        am=None if am is None else am.numpy(),
        kpm=None if kpm is None else kpm.numpy(),
    )
    np.testing.assert_allclose(got, want, atol=1e-10)
    h = ref.norm1(x) if norm_first else x
    _, torch_weights = ref.self_attn(h, h, h, attn_mask=am, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
    np.testing.assert_allclose(weights, torch_weights.detach().numpy(), atol=1e-12)


def test_checks_oracle_is_causal():
    ref = _torch_layer(True, "gelu").double()
    x = torch.randn(B, L, E, dtype=torch.float64)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    want = ref(x, src_mask=causal, is_causal=True).detach().numpy()
    got, _ = checks._oracle(_params_of(ref), x.numpy(), H, norm_first=True, activation="gelu", causal=True)
    np.testing.assert_allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
def test_mutant_template_passes(hidden):
    """The correct block the TransformerBlock mutants are edited from passes every check."""
    ns = namespace(find_chapter("05"), replace={"TransformerBlock": TEMPLATE})
    check = checks.hidden_TransformerBlock if hidden else checks.visible_TransformerBlock
    check(ns["TransformerBlock"])


def test_scores_on_a_hand_made_example():
    period, n = 3, 6
    weights = torch.zeros(2, n, n)
    weights[0, 0, 0] = 1.0
    weights[0, torch.arange(1, n), torch.arange(0, n - 1)] = 1.0  # head 0: always the previous token
    for i in range(n):  # head 1: an induction head after the first repeat, its own token before
        weights[1, i, i - period + 1 if i >= period else i] = 1.0
    torch.testing.assert_close(previous_token_score(weights), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(induction_score(weights, period), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
def test_block_on_chapter_4s_attention_passes(hidden):
    """The contract's block: self_attn is chapter 4's MultiHeadAttention (what the setup cell provides), not PyTorch's.

    The setup cell imports autograder.provided.ch04's layer (the one chapter 4's mutants are edited from,
    independent of solutions/); the checks, dropout placement included, accept a block built on it.
    """
    ns = namespace(find_chapter("05"))
    assert ns["MultiHeadAttention"] is provided.MultiHeadAttention
    block = TEMPLATE.replace(
        "nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)",
        "MultiHeadAttention(d_model, num_heads, dropout=dropout)",
    )
    assert block != TEMPLATE
    exec(compile(block, "<block on chapter 4's attention>", "exec"), ns)
    check = checks.hidden_TransformerBlock if hidden else checks.visible_TransformerBlock
    check(ns["TransformerBlock"])


@pytest.mark.parametrize("seed", range(6))
def test_dropout_placement_check_holds_for_any_seed(seed):
    """The read-back of the four dropouts holds for the solution and for the mutant template, whatever the seed."""
    ns = namespace(find_chapter("05"), replace={"TransformerBlock": TEMPLATE})
    for cls in (TransformerBlock, ns["TransformerBlock"]):
        checks._check_dropout_train(cls, np.random.default_rng(seed))
