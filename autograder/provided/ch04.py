"""Chapter 4's multi-head attention, as the course provides it to chapter 5's setup cell.

Written independently of ``solutions/`` (grading works without it); chapter 4's mutants are
this class with one mistake edited in, so the class is also proved correct by chapter 4's checks.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiHeadAttention(nn.Module):
    """A drop-in for ``nn.MultiheadAttention(embed_dim, num_heads, dropout, bias=bias, batch_first=True)``.

    Same parameters (``in_proj_weight`` (3E, E), ``in_proj_bias`` (3E), ``out_proj``), same call and mask
    semantics (bool True = may not attend, float masks added); a query whose keys are all masked gets zeros.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True):
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):  # fmt: skip
        """query (B, L, E), key and value (B, S, E) -> (out (B, L, E), weights (B, L, S) or (B, H, L, S) or None)."""
        B, L, E = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w_q, b_q).reshape(B, L, H, D).transpose(1, 2)
        k = F.linear(key, w_k, b_k).reshape(B, S, H, D).transpose(1, 2)
        v = F.linear(value, w_v, b_v).reshape(B, S, H, D).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=scores.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(B, H, L, S)
            scores = scores + attn_mask
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                key_padding_mask = torch.zeros_like(key_padding_mask, dtype=scores.dtype).masked_fill(
                    key_padding_mask, float("-inf"))  # fmt: skip
            scores = scores + key_padding_mask.view(B, 1, 1, S)
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        weights = F.dropout(weights, p=self.dropout, training=self.training)
        out = (weights @ v).transpose(1, 2).reshape(B, L, E)
        out = self.out_proj(out)
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=1) if average_attn_weights else weights)
