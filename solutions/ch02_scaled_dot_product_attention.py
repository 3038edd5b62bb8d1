"""Chapter 2: scaled dot-product attention and masks (PyTorch)."""

import math

import torch


def padding_mask(lengths, S: int) -> torch.Tensor:
    """Boolean key-padding mask of shape (B, S): True at the real tokens.

    ``lengths`` (a 1-D tensor or a list of B ints) holds the true length of each
    sequence of a batch padded to S positions; position j of sequence b is real
    iff j < lengths[b].
    """
    ### BEGIN SOLUTION
    lengths = torch.as_tensor(lengths)
    positions = torch.arange(S, device=lengths.device)
    return positions < lengths.unsqueeze(-1)
    ### END SOLUTION


def causal_mask(L: int, S: int | None = None, device=None) -> torch.Tensor:
    """Boolean causal mask of shape (L, S); True where a query may attend.

    The L queries are the last L positions of a sequence of S keys (S defaults to L),
    so query i sits at position i + (S - L) and sees key j iff j <= i + (S - L).
    """
    ### BEGIN SOLUTION
    S = L if S is None else S
    i = torch.arange(L, device=device).unsqueeze(-1)
    j = torch.arange(S, device=device)
    return j <= i + (S - L)
    ### END SOLUTION


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with an optional boolean mask.

    q (..., L, d), k (..., S, d), v (..., S, d_v); leading dimensions broadcast.
    mask: bool, broadcastable to (..., L, S), True = may attend.
    Returns (out (..., L, d_v), weights (..., L, S)), both in the dtype of q.
    Scores are scaled by 1/sqrt(d). A query whose keys are all masked gets zero
    weights and a zero output (not NaN). float16 and bfloat16 inputs are computed
    in float32 and the results cast back.
    """
    ### BEGIN SOLUTION
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.bool, device=scores.device)
        scores = torch.where(mask, scores, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        # A row of -inf scores gives 0/0 = NaN; the contract says such a query gets zeros.
        weights = torch.where(mask.any(dim=-1, keepdim=True), weights, 0.0)
    out = weights @ v
    return out.to(dtype), weights.to(dtype)
    ### END SOLUTION
