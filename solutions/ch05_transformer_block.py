"""Chapter 5: Transformer blocks and what heads learn (PyTorch)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from autograder.provided.ch04 import MultiHeadAttention  # the setup cell's import: chapter 4's layer


class TransformerBlock(nn.Module):
    """One Transformer encoder block, state-dict compatible with ``nn.TransformerEncoderLayer``.

    ``TransformerBlock(d_model, num_heads, d_ff, dropout, norm_first, activation)`` has the
    parameters of ``nn.TransformerEncoderLayer(d_model, num_heads, d_ff, dropout, activation,
    batch_first=True, norm_first=norm_first)`` under the same names: ``self_attn`` (chapter 4's
    multi-head attention: ``in_proj_weight``, ``in_proj_bias``, ``out_proj``), ``linear1``
    (d_model -> d_ff), ``linear2`` (d_ff -> d_model), ``norm1`` and ``norm2``
    (``nn.LayerNorm(d_model)``, eps 1e-5). ``activation`` is ``"relu"`` or ``"gelu"`` (exact GELU).

    ``forward(x (B, L, d_model), attn_mask=None, key_padding_mask=None, is_causal=False)``
    returns a tensor (B, L, d_model):

    * pre-norm (``norm_first=True``):   x = x + SA(norm1(x));  x = x + FF(norm2(x))
    * post-norm (``norm_first=False``): x = norm1(x + SA(x));  x = norm2(x + FF(x))

    where SA is self-attention followed by dropout and FF(x) = dropout(linear2(dropout(act(linear1(x))))).
    Masks follow ``nn.MultiheadAttention`` (bool True = may NOT attend; float masks are added
    to the scores). ``is_causal=True`` without ``attn_mask`` hides the future (query i sees
    keys j <= i); with an ``attn_mask`` the mask is used. Dropout acts in training mode only.
    The per-head attention weights of the last forward are kept, detached, in
    ``self.last_attention`` (B, num_heads, L, L).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        norm_first: bool = True,
        activation: str = "relu",
    ):
        super().__init__()
        ### BEGIN SOLUTION
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation should be 'relu' or 'gelu', got {activation!r}")
        # Chapter 4's layer, from the setup cell; nn.MultiheadAttention(..., batch_first=True) is the same drop-in.
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.dropout = nn.Dropout(dropout)  # inside the feed-forward network
        self.dropout1 = nn.Dropout(dropout)  # after self-attention
        self.dropout2 = nn.Dropout(dropout)  # after the feed-forward network
        self.activation = F.relu if activation == "relu" else F.gelu
        self.norm_first = norm_first
        self.last_attention = None
        ### END SOLUTION

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        ### BEGIN SOLUTION
        if is_causal and attn_mask is None:
            length = x.shape[1]
            attn_mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)

        def attend(h: torch.Tensor) -> torch.Tensor:
            out, weights = self.self_attn(
                h,
                h,
                h,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                need_weights=True,
                average_attn_weights=False,
            )
            self.last_attention = weights.detach()
            return self.dropout1(out)

        def feed_forward(h: torch.Tensor) -> torch.Tensor:
            return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(h)))))

        if self.norm_first:
            x = x + attend(self.norm1(x))
            x = x + feed_forward(self.norm2(x))
        else:
            x = self.norm1(x + attend(x))
            x = self.norm2(x + feed_forward(x))
        return x
        ### END SOLUTION


def previous_token_score(weights: torch.Tensor) -> torch.Tensor:
    """How much each head looks at the previous token.

    weights (H, L, L): one attention matrix per head, row = query i, column = key j.
    Returns (H,): for each head, the mean over the queries i = 1, ..., L-1 of
    ``weights[h, i, i - 1]``. Query 0 has no previous token and is left out, so a head
    that always attends to the previous token scores exactly 1.
    """
    ### BEGIN SOLUTION
    return torch.diagonal(weights, offset=-1, dim1=-2, dim2=-1).mean(dim=-1)
    ### END SOLUTION


def induction_score(weights: torch.Tensor, period: int) -> torch.Tensor:
    """How much each head acts as an induction head on a sequence that repeats every ``period`` tokens.

    weights (H, L, L) as in ``previous_token_score``; 1 <= period < L. The token at position i
    last occurred at i - period, so an induction head at query i looks at the token that
    came next, key i - period + 1. Returns (H,): for each head, the mean over the queries
    i = period, ..., L-1 (those whose token has occurred before) of
    ``weights[h, i, i - period + 1]``.
    """
    ### BEGIN SOLUTION
    length = weights.shape[-1]
    queries = torch.arange(period, length, device=weights.device)
    return weights[..., queries, queries - period + 1].mean(dim=-1)
    ### END SOLUTION
