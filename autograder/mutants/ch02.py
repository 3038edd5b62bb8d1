"""Mutants of chapter 2: wrong causal_mask, padding_mask and scaled_dot_product_attention."""

from autograder.mutants import Mutant

MUTANTS = [
    # ---- causal_mask ------------------------------------------------------------------------
    Mutant(
        "causal_mask",
        "top_left",
        "top-left aligned",
        """
        def causal_mask(L, S=None, device=None):
            S = L if S is None else S
            return torch.ones(L, S, dtype=torch.bool, device=device).tril()
    """,
    ),
    Mutant(
        "causal_mask",
        "strict",
        "off by one",
        """
        def causal_mask(L, S=None, device=None):
            S = L if S is None else S
            i = torch.arange(L, device=device)[:, None]
            j = torch.arange(S, device=device)[None, :]
            return j < i + (S - L)
    """,
    ),
    Mutant(
        "causal_mask",
        "inverted",
        "inverted",
        """
        def causal_mask(L, S=None, device=None):
            S = L if S is None else S
            return torch.ones(L, S, dtype=torch.bool, device=device).triu(diagonal=S - L + 1)
    """,
    ),
    Mutant(
        "causal_mask",
        "upper_triangle",
        "upper triangle",
        """
        def causal_mask(L, S=None, device=None):
            S = L if S is None else S
            return torch.ones(L, S, dtype=torch.bool, device=device).triu(diagonal=S - L)
    """,
    ),
    Mutant(
        "causal_mask",
        "ignores_S",
        "S was ignored",
        """
        def causal_mask(L, S=None, device=None):
            return torch.ones(L, L, dtype=torch.bool, device=device).tril()
    """,
    ),
    Mutant(
        "causal_mask",
        "float_mask",
        "bool",
        """
        def causal_mask(L, S=None, device=None):
            S = L if S is None else S
            return torch.ones(L, S, device=device).tril(diagonal=S - L)
    """,
    ),
    # ---- padding_mask -----------------------------------------------------------------------
    Mutant(
        "padding_mask",
        "inverted",
        "inverted",
        """
        def padding_mask(lengths, S):
            lengths = torch.as_tensor(lengths)
            return torch.arange(S)[None, :] >= lengths[:, None]
    """,
    ),
    Mutant(
        "padding_mask",
        "leq",
        "off by one",
        """
        def padding_mask(lengths, S):
            lengths = torch.as_tensor(lengths)
            return torch.arange(S)[None, :] <= lengths[:, None]
    """,
    ),
    Mutant(
        "padding_mask",
        "left_padding",
        "padded on the left",
        """
        def padding_mask(lengths, S):
            lengths = torch.as_tensor(lengths)
            return torch.arange(S)[None, :] >= S - lengths[:, None]
    """,
    ),
    Mutant(
        "padding_mask",
        "transposed",
        "the transpose",
        """
        def padding_mask(lengths, S):
            lengths = torch.as_tensor(lengths)
            return torch.arange(S)[:, None] < lengths[None, :]
    """,
    ),
    Mutant(
        "padding_mask",
        "long_mask",
        "bool",
        """
        def padding_mask(lengths, S):
            lengths = torch.as_tensor(lengths)
            return (torch.arange(S)[None, :] < lengths[:, None]).long()
    """,
    ),
    # ---- scaled_dot_product_attention -------------------------------------------------------
    Mutant(
        "scaled_dot_product_attention",
        "one_over_d",
        "1/d instead of 1/sqrt(d)",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            q, k, v = q.double(), k.double(), v.double()
            scores = q @ k.transpose(-2, -1) / q.shape[-1]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "no_scale",
        "did not scale",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            q, k, v = q.to(work), k.to(work), v.to(work)
            scores = q @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "scale_by_dv",
        "d_v",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            q, k, v = q.double(), k.double(), v.double()
            scores = q @ k.transpose(-2, -1) / math.sqrt(v.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "softmax_over_queries",
        "over the queries",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            q, k, v = q.double(), k.double(), v.double()
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-2).nan_to_num(0.0)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "inverted_mask",
        "inverted the mask",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            q, k, v = q.double(), k.double(), v.double()
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "mask_after_softmax",
        "after the softmax",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            q, k, v = q.double(), k.double(), v.double()
            weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            if mask is not None:
                weights = weights * mask
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "scores_times_mask",
        "multiplied the scores by the mask",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            q, k, v = q.double(), k.double(), v.double()
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores * mask
            weights = torch.softmax(scores, dim=-1)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "mask_ignored",
        "ignored the mask",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            q, k, v = q.double(), k.double(), v.double()
            weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "nan_when_fully_masked",
        "got NaN",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            q, k, v = q.to(work), k.to(work), v.to(work)
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "fill_minus_1e9_native_dtype",
        "overflows float16",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, -1e9)
            weights = torch.softmax(scores, dim=-1)
            return weights @ v, weights
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "fill_minus_1e9_float32",
        "uniform weights",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            q, k, v = q.to(work), k.to(work), v.to(work)
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, -1e9)
            weights = torch.softmax(scores, dim=-1)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "computed_in_half_precision",
        "compute in float32",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            return weights @ v, weights
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "dtype_not_restored",
        "dtype",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            q, k, v = q.float(), k.float(), v.float()
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            return weights @ v, weights
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "always_float32",
        "lower precision than torch.float64",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            q, k, v = q.float(), k.float(), v.float()
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            return (weights @ v).to(dtype), weights.to(dtype)
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "swapped_outputs",
        "wrong order",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            dtype = q.dtype
            q, k, v = q.double(), k.double(), v.double()
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            return weights.to(dtype), (weights @ v).to(dtype)
    """,
    ),
    Mutant(
        "scaled_dot_product_attention",
        "torch_sdpa_inside",
        "F.scaled_dot_product_attention",
        """
        def scaled_dot_product_attention(q, k, v, mask=None):
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).nan_to_num(0.0)
            return out, weights
    """,
    ),
]
