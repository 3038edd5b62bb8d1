"""Chapter 4: multi-head attention (PyTorch)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Split the feature dimension of ``x`` into ``num_heads`` heads.

    x (B, L, E) -> (B, H, L, E // H), where head h holds features h*D .. (h+1)*D - 1
    of every token (D = E // H). The sequence is not split: every head sees all L tokens.
    Raises ValueError when E is not divisible by ``num_heads``.
    """
    ### BEGIN SOLUTION
    batch, length, embed_dim = x.shape
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    head_dim = embed_dim // num_heads
    return x.reshape(batch, length, num_heads, head_dim).transpose(1, 2)
    ### END SOLUTION


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """Undo ``split_heads``: (B, H, L, D) -> (B, L, H * D), heads side by side per token."""
    ### BEGIN SOLUTION
    batch, num_heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, num_heads * head_dim)
    ### END SOLUTION


class MultiHeadAttention(nn.Module):
    """Multi-head attention, a drop-in for ``nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)``.

    Parameters have PyTorch's names and shapes: ``in_proj_weight`` (3E, E) holding W_q, W_k, W_v
    stacked in that order, ``in_proj_bias`` (3E) (None when ``bias=False``) and ``out_proj``, an
    ``nn.Linear(E, E)``; so ``load_state_dict(torch_module.state_dict())`` works.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        ### BEGIN SOLUTION
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = True
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # The same initialisation as PyTorch's module.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)
        ### END SOLUTION

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (B, L, E), key and value (B, S, E) -> (attn_output (B, L, E), attn_weights).

        Masks follow ``nn.MultiheadAttention``: a bool mask marks with True what may NOT be
        attended to; a float mask is added to the scores. ``key_padding_mask`` is (B, S);
        ``attn_mask`` is (L, S) or (B * H, L, S). ``is_causal=True`` with no ``attn_mask``
        lets query i see keys j <= i (the convention of ``F.scaled_dot_product_attention``);
        with an ``attn_mask`` it is only a hint and the mask is used. A query whose keys are
        all masked gets zero weights, not NaN. Dropout acts on the weights, in training only.
        ``attn_weights`` is (B, L, S) averaged over heads, (B, H, L, S) with
        ``average_attn_weights=False``, or None with ``need_weights=False``.
        """
        ### BEGIN SOLUTION
        batch, tgt_len, embed_dim = query.shape
        src_len = key.shape[1]
        heads = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = split_heads(F.linear(query, w_q, b_q), heads)  # (B, H, L, D)
        k = split_heads(F.linear(key, w_k, b_k), heads)  # (B, H, S, D)
        v = split_heads(F.linear(value, w_v, b_v), heads)  # (B, H, S, D)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, L, S)

        def additive(mask: torch.Tensor) -> torch.Tensor:
            if mask.dtype == torch.bool:  # True = not allowed -> -inf
                return torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(mask, float("-inf"))
            return mask.to(scores.dtype)

        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            mask = additive(attn_mask)
            scores = scores + (mask.view(batch, heads, tgt_len, src_len) if mask.dim() == 3 else mask)
        if key_padding_mask is not None:
            scores = scores + additive(key_padding_mask).view(batch, 1, 1, src_len)

        # A row of -inf would give 0/0 = NaN: give such rows zero weights instead.
        all_masked = scores.amax(dim=-1, keepdim=True) == float("-inf")
        weights = torch.softmax(scores.masked_fill(all_masked, 0.0), dim=-1).masked_fill(all_masked, 0.0)
        if self.dropout > 0.0:
            weights = F.dropout(weights, p=self.dropout, training=self.training)
        output = self.out_proj(merge_heads(weights @ v))
        if not need_weights:
            return output, None
        return output, weights.mean(dim=1) if average_attn_weights else weights
        ### END SOLUTION


def multi_head_attention_flops(batch: int, L: int, S: int, embed_dim: int, num_heads: int) -> int:
    """Floating-point operations of one forward pass of multi-head attention (a multiply-add = 2).

    With B = batch and E = embed_dim, counting matrix products only (no bias, scale, softmax):
      Q projection      2*B*L*E*E   (L query tokens, E x E weights)
      K, V projections  2 * 2*B*S*E*E
      Q K^T             2*B*L*S*E   (H heads of 2*B*L*S*D each, D = E / H)
      weights . V       2*B*L*S*E
      output projection 2*B*L*E*E
    Total 4*B*L*E^2 + 4*B*S*E^2 + 4*B*L*S*E: it does not depend on ``num_heads``.
    """
    ### BEGIN SOLUTION
    head_dim = embed_dim // num_heads
    q_proj = 2 * batch * L * embed_dim * embed_dim
    kv_proj = 2 * (2 * batch * S * embed_dim * embed_dim)
    scores = num_heads * 2 * batch * L * S * head_dim
    mix = num_heads * 2 * batch * L * S * head_dim
    out_proj = 2 * batch * L * embed_dim * embed_dim
    return q_proj + kv_proj + scores + mix + out_proj
    ### END SOLUTION
