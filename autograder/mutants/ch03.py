"""Mutants of chapter 3: wrong positional encodings and wrong self-attention modules."""

from autograder.mutants import Mutant

MUTANTS = [
    # ---- sinusoidal_positional_encoding -------------------------------------------------
    Mutant(
        "sinusoidal_positional_encoding",
        "concatenated",
        "concatenated the sines and the cosines",
        """
        def sinusoidal_positional_encoding(L, d_model):
            if d_model % 2:
                raise ValueError("d_model must be even")
            pos = torch.arange(L, dtype=torch.float32)[:, None]
            angles = pos / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
            return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    """,
    ),
    Mutant(
        "sinusoidal_positional_encoding",
        "exponent_i_over_d",
        "i/d_model instead of 2i/d_model",
        """
        def sinusoidal_positional_encoding(L, d_model):
            if d_model % 2:
                raise ValueError("d_model must be even")
            pos = torch.arange(L, dtype=torch.float32)[:, None]
            i = torch.arange(d_model // 2, dtype=torch.float32)
            angles = pos / 10000 ** (i / d_model)
            pe = torch.zeros(L, d_model)
            pe[:, 0::2] = torch.sin(angles)
            pe[:, 1::2] = torch.cos(angles)
            return pe
    """,
    ),
    Mutant(
        "sinusoidal_positional_encoding",
        "sin_cos_swapped",
        "swapped sin and cos",
        """
        def sinusoidal_positional_encoding(L, d_model):
            if d_model % 2:
                raise ValueError("d_model must be even")
            pos = torch.arange(L, dtype=torch.float32)[:, None]
            div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
            pe = torch.zeros(L, d_model)
            pe[:, 0::2] = torch.cos(pos * div)
            pe[:, 1::2] = torch.sin(pos * div)
            return pe
    """,
    ),
    Mutant(
        "sinusoidal_positional_encoding",
        "odd_d_model_accepted",
        "ValueError",
        """
        def sinusoidal_positional_encoding(L, d_model):
            pos = torch.arange(L, dtype=torch.float32)[:, None]
            div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
            pe = torch.zeros(L, d_model)
            pe[:, 0::2] = torch.sin(pos * div)
            pe[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
            return pe
    """,
    ),
    Mutant(
        "sinusoidal_positional_encoding",
        "own_column_index",
        "share the frequency",
        """
        def sinusoidal_positional_encoding(L, d_model):
            if d_model % 2:
                raise ValueError("d_model must be even")
            pos = torch.arange(L, dtype=torch.float32)[:, None]
            j = torch.arange(d_model, dtype=torch.float32)
            angles = pos / 10000 ** (j / d_model)
            pe = torch.sin(angles)
            pe[:, 1::2] = torch.cos(angles[:, 1::2])
            return pe
    """,
    ),
    Mutant(
        "sinusoidal_positional_encoding",
        "exponent_sign",
        "instead of dividing",
        """
        def sinusoidal_positional_encoding(L, d_model):
            if d_model % 2:
                raise ValueError("d_model must be even")
            pos = torch.arange(L, dtype=torch.float32)[:, None]
            div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (math.log(10000.0) / d_model))
            pe = torch.zeros(L, d_model)
            pe[:, 0::2] = torch.sin(pos * div)
            pe[:, 1::2] = torch.cos(pos * div)
            return pe
    """,
    ),
    Mutant(
        "sinusoidal_positional_encoding",
        "positions_from_one",
        "counted from 1",
        """
        def sinusoidal_positional_encoding(L, d_model):
            if d_model % 2:
                raise ValueError("d_model must be even")
            pos = torch.arange(1, L + 1, dtype=torch.float32)[:, None]
            angles = pos / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
            pe = torch.zeros(L, d_model)
            pe[:, 0::2] = torch.sin(angles)
            pe[:, 1::2] = torch.cos(angles)
            return pe
    """,
    ),
    Mutant(
        "sinusoidal_positional_encoding",
        "float64",
        "float32",
        """
        def sinusoidal_positional_encoding(L, d_model):
            if d_model % 2:
                raise ValueError("d_model must be even")
            pos = torch.arange(L, dtype=torch.float64)[:, None]
            angles = pos / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
            pe = torch.zeros(L, d_model, dtype=torch.float64)
            pe[:, 0::2] = torch.sin(angles)
            pe[:, 1::2] = torch.cos(angles)
            return pe
    """,
    ),
    # ---- SelfAttention -------------------------------------------------------------------
    Mutant(
        "SelfAttention",
        "scale_one_over_d_k",
        "1/d_k instead of 1/sqrt(d_k)",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1) / self.d_k
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                if mask is not None:
                    weights = weights.masked_fill(~mask, 0.0)
                return weights @ self.W_v(x), weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "unscaled",
        "did not scale the scores",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                if mask is not None:
                    weights = weights.masked_fill(~mask, 0.0)
                return weights @ self.W_v(x), weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "scale_by_d_model",
        "1/sqrt(d_model)",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_model = d_model
                self.W_q = nn.Linear(d_model, d_k or d_model, bias=bias)
                self.W_k = nn.Linear(d_model, d_k or d_model, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1) / math.sqrt(self.d_model)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                if mask is not None:
                    weights = weights.masked_fill(~mask, 0.0)
                return weights @ self.W_v(x), weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "softmax_over_queries",
        "query axis",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1) / math.sqrt(self.d_k)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = torch.softmax(scores, dim=1)
                return weights @ self.W_v(x), weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "x_as_values",
        "used x itself as the values",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1) / math.sqrt(self.d_k)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                if mask is not None:
                    weights = weights.masked_fill(~mask, 0.0)
                return weights @ x, weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "inverted_mask",
        "inverted mask",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1) / math.sqrt(self.d_k)
                if mask is not None:
                    scores = scores.masked_fill(mask, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                return weights @ self.W_v(x), weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "nan_on_fully_masked_rows",
        "NaN on a fully masked row",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1) / math.sqrt(self.d_k)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                return weights @ self.W_v(x), weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "finite_fill_uniform_rows",
        "uniform weights",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1) / math.sqrt(self.d_k)
                if mask is not None:
                    scores = scores.masked_fill(~mask, -1e9)
                weights = torch.softmax(scores, dim=-1)
                return weights @ self.W_v(x), weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "mask_after_softmax",
        "after the softmax",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1) / math.sqrt(self.d_k)
                weights = torch.softmax(scores, dim=-1)
                if mask is not None:
                    weights = weights * mask
                return weights @ self.W_v(x), weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "bias_always_on",
        "bias",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k)
                self.W_k = nn.Linear(d_model, self.d_k)
                self.W_v = nn.Linear(d_model, d_v or d_model)

            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1) / math.sqrt(self.d_k)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                if mask is not None:
                    weights = weights.masked_fill(~mask, 0.0)
                return weights @ self.W_v(x), weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "bias_ignored_in_forward",
        "ignored the biases",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

            def forward(self, x, mask=None):
                q, k, v = x @ self.W_q.weight.T, x @ self.W_k.weight.T, x @ self.W_v.weight.T
                scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                if mask is not None:
                    weights = weights.masked_fill(~mask, 0.0)
                return weights @ v, weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "queries_keys_swapped",
        "swapped the roles of queries and keys",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

            def forward(self, x, mask=None):
                scores = self.W_k(x) @ self.W_q(x).transpose(-2, -1) / math.sqrt(self.d_k)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                if mask is not None:
                    weights = weights.masked_fill(~mask, 0.0)
                return weights @ self.W_v(x), weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "d_v_defaults_to_d_k",
        "d_v defaults to d_model",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or self.d_k, bias=bias)

            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1) / math.sqrt(self.d_k)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                if mask is not None:
                    weights = weights.masked_fill(~mask, 0.0)
                return weights @ self.W_v(x), weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "detached_output",
        "gradient",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_k = nn.Linear(d_model, self.d_k, bias=bias)
                self.W_v = nn.Linear(d_model, d_v or d_model, bias=bias)

            @torch.no_grad()
            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1) / math.sqrt(self.d_k)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                if mask is not None:
                    weights = weights.masked_fill(~mask, 0.0)
                return weights @ self.W_v(x), weights
    """,
    ),
    Mutant(
        "SelfAttention",
        "linear_in_out_swapped",
        "swapped in_features and out_features",
        """
        class SelfAttention(nn.Module):
            def __init__(self, d_model, d_k=None, d_v=None, bias=False):
                super().__init__()
                self.d_k = d_k or d_model
                self.W_q = nn.Linear(self.d_k, d_model, bias=bias)
                self.W_k = nn.Linear(self.d_k, d_model, bias=bias)
                self.W_v = nn.Linear(d_v or d_model, d_model, bias=bias)

            def forward(self, x, mask=None):
                scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1) / math.sqrt(self.d_k)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                if mask is not None:
                    weights = weights.masked_fill(~mask, 0.0)
                return weights @ self.W_v(x), weights
    """,
    ),
]
