"""Chapter 6: decoding with a KV cache, and grouped-query attention (PyTorch)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCache:
    """The keys and values of every token seen so far, for one attention layer.

    ``update(k, v)`` appends a chunk of keys and a chunk of values, each of shape (B, H, T, D),
    along the time axis (dim 2), and returns everything held so far: (k_all, v_all), each
    (B, H, T_total, D). ``len(cache)`` is the number of tokens held: 0 for a new cache.
    """

    def __init__(self):
        ### BEGIN SOLUTION
        self.keys = None
        self.values = None
        ### END SOLUTION

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k and v (B, H, T, D) after the tokens already held; return (k_all, v_all)."""
        ### BEGIN SOLUTION
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = torch.cat([self.keys, k], dim=2)
            self.values = torch.cat([self.values, v], dim=2)
        return self.keys, self.values
        ### END SOLUTION

    def __len__(self) -> int:
        """The number of tokens held (the length of the time axis), 0 when empty."""
        ### BEGIN SOLUTION
        return 0 if self.keys is None else self.keys.shape[2]
        ### END SOLUTION


def decode_step(mha: nn.Module, x_t: torch.Tensor, cache: "KVCache") -> torch.Tensor:
    """One step of causal self-attention for the newest token, with a KV cache.

    mha: an ``nn.MultiheadAttention(E, H, batch_first=True)`` (or chapter 4's drop-in); use its
    ``in_proj_weight`` (3E, E), ``in_proj_bias`` (3E, or None) and ``out_proj``.
    x_t (B, 1, E): the newest token. cache: holds the keys and values (B, H, t, D) of the t
    tokens before it; use it only through ``cache.update(k, v)`` and ``len(cache)``.
    Appends the new token's key and value to the cache and returns (B, 1, E): the output of
    causal self-attention at the newest position, over all t + 1 tokens.
    """
    ### BEGIN SOLUTION
    batch, _, embed_dim = x_t.shape
    heads = mha.num_heads
    head_dim = embed_dim // heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, 1, E) -> (B, H, 1, D)
        return t.reshape(batch, 1, heads, head_dim).transpose(1, 2)

    q = split(F.linear(x_t, w_q, b_q))
    k_all, v_all = cache.update(split(F.linear(x_t, w_k, b_k)), split(F.linear(x_t, w_v, b_v)))
    # The newest token is the last position, so causal_mask(1, S) lets it see every key: no mask needed.
    scores = q @ k_all.transpose(-2, -1) / math.sqrt(head_dim)  # (B, H, 1, S)
    weights = torch.softmax(scores, dim=-1)
    out = (weights @ v_all).transpose(1, 2).reshape(batch, 1, embed_dim)
    return mha.out_proj(out)
    ### END SOLUTION


class GroupedQueryAttention(nn.Module):
    """Causal or bidirectional self-attention in which groups of query heads share keys and values.

    ``num_heads`` query heads of size D = embed_dim // num_heads share ``num_kv_heads`` key/value
    heads: query head h uses key/value head h // (num_heads // num_kv_heads) (the
    ``repeat_interleave`` convention). ``num_kv_heads == num_heads`` is multi-head attention,
    ``num_kv_heads == 1`` is multi-query attention. Projections: ``q_proj`` (E -> E), ``k_proj`` and
    ``v_proj`` (E -> num_kv_heads * D), ``out_proj`` (E -> E), all ``nn.Linear`` with ``bias=bias``.
    Raises ValueError when num_heads is not a multiple of num_kv_heads.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        super().__init__()
        ### BEGIN SOLUTION
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        ### END SOLUTION

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """x (B, L, E) -> (B, L, E). With ``is_causal=True`` token i sees tokens j <= i."""
        ### BEGIN SOLUTION
        batch, length, embed_dim = x.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).reshape(batch, length, kv_heads, head_dim).transpose(1, 2)  # (B, KV, L, D)
        v = self.v_proj(x).reshape(batch, length, kv_heads, head_dim).transpose(1, 2)
        group = heads // kv_heads
        k = k.repeat_interleave(group, dim=1)  # (B, H, L, D): KV head g serves query heads g*group ... (g+1)*group - 1
        v = v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        if is_causal:
            future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, embed_dim)
        return self.out_proj(out)
        ### END SOLUTION


def kv_cache_bytes(batch: int, seq_len: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of the KV cache of a decoder: K and V for every token, layer and key/value head.

    2 (K and V) * batch * seq_len * num_layers * num_kv_heads * head_dim * (bytes per element of
    ``dtype``, a torch.dtype). Returns an exact int.
    """
    ### BEGIN SOLUTION
    bytes_per_element = torch.empty((), dtype=dtype).element_size()
    return 2 * batch * seq_len * num_layers * num_kv_heads * head_dim * bytes_per_element
    ### END SOLUTION
