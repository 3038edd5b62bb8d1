"""Chapter 3: self-attention with learned projections, and positional encodings."""

import math

import torch
import torch.nn as nn


class SelfAttention(nn.Module):
    """Single-head self-attention: queries, keys and values are linear maps of the same x.

    ``W_q``, ``W_k``: nn.Linear(d_model, d_k); ``W_v``: nn.Linear(d_model, d_v), with biases
    only when ``bias=True``; d_k and d_v default to d_model.
    ``forward(x (B, L, d_model), mask=None) -> (out (B, L, d_v), weights (B, L, L))``:
    scores scaled by 1/sqrt(d_k); ``mask`` is bool, broadcastable to (B, L, L), True where a
    query may attend to a key; a query with every key masked gets zero weights and a zero output.
    """

    def __init__(self, d_model: int, d_k: int | None = None, d_v: int | None = None, bias: bool = False):
        super().__init__()
        ### BEGIN SOLUTION
        self.d_model = d_model
        self.d_k = d_model if d_k is None else d_k
        self.d_v = d_model if d_v is None else d_v
        self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
        self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
        self.W_v = nn.Linear(d_model, self.d_v, bias=bias)
        ### END SOLUTION

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ### BEGIN SOLUTION
        q, k, v = self.W_q(x), self.W_k(x), self.W_v(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)  # (B, L, L): row = query, column = key
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if mask is not None:
            weights = weights.masked_fill(~mask, 0.0)  # a fully masked row is NaN after softmax: make it 0
        return weights @ v, weights
        ### END SOLUTION


def sinusoidal_positional_encoding(L: int, d_model: int) -> torch.Tensor:
    """Sinusoidal positional encodings of Vaswani et al., shape (L, d_model), float32.

    Column pair (2i, 2i+1) holds sin and cos of pos / 10000**(2i / d_model):
    ``PE[pos, 2i] = sin(pos / 10000**(2i/d_model))`` and
    ``PE[pos, 2i+1] = cos(pos / 10000**(2i/d_model))``, positions counted from 0.
    Raises ValueError when ``d_model`` is odd (sin and cos come in pairs).
    """
    ### BEGIN SOLUTION
    if d_model % 2 != 0:
        raise ValueError(f"d_model must be even (sin and cos come in pairs), got {d_model}")
    pos = torch.arange(L, dtype=torch.float64)[:, None]  # (L, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (d_model/2,)
    angles = pos / 10000.0 ** (two_i / d_model)  # (L, d_model/2)
    pe = torch.empty(L, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles)
    return pe.to(torch.float32)
    ### END SOLUTION
