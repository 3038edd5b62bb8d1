"""Mutants of chapter 5: wrong TransformerBlock, previous_token_score and induction_score.

Most mutants of ``TransformerBlock`` are ``TEMPLATE`` (a correct block, written independently
of ``solutions/``) with one realistic mistake edited in; ``tests/test_ch05.py`` proves that the
template itself passes every check, so each mutant fails for its own mistake only.
"""

from autograder.mutants import Mutant, edit

TEMPLATE = """
class TransformerBlock(nn.Module):
    def __init__(self, d_model, num_heads, d_ff, dropout=0.0, norm_first=True, activation="relu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.p = dropout
        self.norm_first = norm_first
        self.act = {"relu": F.relu, "gelu": F.gelu}[activation]
        self.last_attention = None

    def _sa(self, h, attn_mask, key_padding_mask, is_causal):
        if is_causal and attn_mask is None:
            attn_mask = torch.triu(torch.ones(h.shape[1], h.shape[1], dtype=torch.bool), diagonal=1)
        out, w = self.self_attn(h, h, h, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                need_weights=True, average_attn_weights=False)
        self.last_attention = w.detach()
        return F.dropout(out, self.p, training=self.training)

    def _ff(self, h):
        h = F.dropout(self.act(self.linear1(h)), self.p, training=self.training)
        return F.dropout(self.linear2(h), self.p, training=self.training)

    def forward(self, x, attn_mask=None, key_padding_mask=None, is_causal=False):
        if self.norm_first:
            x = x + self._sa(self.norm1(x), attn_mask, key_padding_mask, is_causal)
            x = x + self._ff(self.norm2(x))
        else:
            x = self.norm1(x + self._sa(x, attn_mask, key_padding_mask, is_causal))
            x = self.norm2(x + self._ff(x))
        return x
"""

_PRE = """            x = x + self._sa(self.norm1(x), attn_mask, key_padding_mask, is_causal)
            x = x + self._ff(self.norm2(x))"""
_POST = """            x = self.norm1(x + self._sa(x, attn_mask, key_padding_mask, is_causal))
            x = self.norm2(x + self._ff(x))"""


def _block(name: str, diagnosis: str, *pairs: tuple[str, str]) -> Mutant:
    return Mutant("TransformerBlock", name, diagnosis, edit(TEMPLATE, *pairs))


MUTANTS = [
    # TransformerBlock
    _block("post_norm_when_norm_first", "used post-norm", ("if self.norm_first:", "if False:")),
    _block("pre_norm_always", "used pre-norm", ("if self.norm_first:", "if True:")),
    _block(
        "post_norm_by_default", "used post-norm", ("d_ff, dropout=0.0, norm_first=True,", "d_ff, dropout=0.0, norm_first=False,")
    ),
    _block(
        "no_residual_around_attention",
        "no residual connection around self-attention",
        ("x = x + self._sa(self.norm1(x)", "x = self._sa(self.norm1(x)"),
        ("self.norm1(x + self._sa(x,", "self.norm1(self._sa(x,"),
    ),
    _block(
        "no_residual_around_ffn",
        "no residual connection around the feed-forward network",
        ("x = x + self._ff(self.norm2(x))", "x = self._ff(self.norm2(x))"),
        ("self.norm2(x + self._ff(x))", "self.norm2(self._ff(x))"),
    ),
    _block(
        "residual_from_normalised_x",
        "the residual adds the normalised x",
        (
            _PRE,
            "            h = self.norm1(x)\n            x = h + self._sa(h, attn_mask, key_padding_mask, is_causal)\n"
            "            h = self.norm2(x)\n            x = h + self._ff(h)",
        ),
    ),
    _block(
        "norms_swapped",
        "swapped norm1 and norm2",
        (_PRE, _PRE.replace("norm1", "normA").replace("norm2", "norm1").replace("normA", "norm2")),
        (_POST, _POST.replace("norm1", "normA").replace("norm2", "norm1").replace("normA", "norm2")),
    ),
    _block("dropout_in_eval_mode", "dropout is active in eval mode", ("self.p, training=self.training)", "self.p)")),
    _block(
        "dropout_never",
        "dropout is not applied in training mode",
        ("self.p, training=self.training)", "0.0)"),
        ("dropout=dropout, batch_first=True", "batch_first=True"),
    ),
    _block("always_relu", "wrong activation", ('{"relu": F.relu, "gelu": F.gelu}[activation]', "F.relu")),
    _block(
        "gelu_tanh",
        "tanh approximation",
        ('"gelu": F.gelu}', '"gelu": lambda t: F.gelu(t, approximate="tanh")}'),
    ),
    _block("no_activation", "no activation between linear1 and linear2", ("self.act(self.linear1(h))", "self.linear1(h)")),
    _block("last_attention_averaged", "averaged over heads", ("average_attn_weights=False", "average_attn_weights=True")),
    _block(
        "is_causal_passed_to_torch",
        "build the causal mask yourself",
        (
            "        if is_causal and attn_mask is None:\n            attn_mask = torch.triu(torch.ones(h.shape[1], h.shape[1], "
            "dtype=torch.bool), diagonal=1)\n",
            "",
        ),
        ("need_weights=True, average_attn_weights=False)", "need_weights=True, average_attn_weights=False, is_causal=is_causal)"),
    ),
    _block(
        "is_causal_ignored",
        "is_causal was ignored",
        (
            "        if is_causal and attn_mask is None:\n            attn_mask = torch.triu(torch.ones(h.shape[1], h.shape[1], "
            "dtype=torch.bool), diagonal=1)\n",
            "",
        ),
    ),
    _block(
        "mask_inverted",
        "inverted the boolean mask",
        (
            "key_padding_mask=key_padding_mask, attn_mask=attn_mask,",
            "key_padding_mask=None if key_padding_mask is None else ~key_padding_mask, attn_mask=attn_mask,",
        ),
    ),
    _block("no_batch_first", "batch_first=True", ("dropout=dropout, batch_first=True", "dropout=dropout")),
    _block("eps_1e-6", "eps should be 1e-5", ("nn.LayerNorm(d_model)", "nn.LayerNorm(d_model, eps=1e-6)")),
    _block("returns_tuple", "alone", ("        return x\n", "        return x, self.last_attention\n")),
    _block(
        "residual_detached",
        "hidden from autograd",
        ("x = x + self._sa(self.norm1(x)", "x = x.detach() + self._sa(self.norm1(x)"),
        ("self.norm1(x + self._sa(x,", "self.norm1(x.detach() + self._sa(x,"),
    ),
    # previous_token_score
    Mutant(
        "previous_token_score",
        "diagonal",
        "read the diagonal",
        """
        def previous_token_score(weights):
            return torch.diagonal(weights, dim1=-2, dim2=-1).mean(dim=-1)
    """,
    ),
    Mutant(
        "previous_token_score",
        "next_token",
        "read key i + 1",
        """
        def previous_token_score(weights):
            return torch.diagonal(weights, offset=1, dim1=-2, dim2=-1).mean(dim=-1)
    """,
    ),
    Mutant(
        "previous_token_score",
        "divided_by_L",
        "averaged over all L queries",
        """
        def previous_token_score(weights):
            L = weights.shape[-1]
            return torch.diagonal(weights, offset=-1, dim1=-2, dim2=-1).sum(dim=-1) / L
    """,
    ),
    Mutant(
        "previous_token_score",
        "diagonal_default_dims",
        "dim1=-2, dim2=-1",
        """
        def previous_token_score(weights):
            return torch.diagonal(weights, offset=-1).mean(dim=-1)
    """,
    ),
    Mutant(
        "previous_token_score",
        "averaged_over_heads",
        "averaged over the heads too",
        """
        def previous_token_score(weights):
            L = weights.shape[-1]
            return torch.stack([weights[:, i, i - 1] for i in range(1, L)]).mean()
    """,
    ),
    # induction_score
    Mutant(
        "induction_score",
        "off_by_one",
        "the earlier occurrence",
        """
        def induction_score(weights, period):
            L = weights.shape[-1]
            i = torch.arange(period, L)
            return weights[:, i, i - period].mean(dim=-1)
    """,
    ),
    Mutant(
        "induction_score",
        "all_queries",
        "averaged over all L queries",
        """
        def induction_score(weights, period):
            L = weights.shape[-1]
            i = torch.arange(period, L)
            return weights[:, i, i - period + 1].sum(dim=-1) / L
    """,
    ),
    Mutant(
        "induction_score",
        "whole_diagonal",
        "included query period - 1",
        """
        def induction_score(weights, period):
            return torch.diagonal(weights, offset=1 - period, dim1=-2, dim2=-1).mean(dim=-1)
    """,
    ),
    Mutant(
        "induction_score",
        "transposed",
        "rows are queries",
        """
        def induction_score(weights, period):
            L = weights.shape[-1]
            i = torch.arange(period, L)
            return weights[:, i - period + 1, i].mean(dim=-1)
    """,
    ),
    Mutant(
        "induction_score",
        "loop_sums",
        "summed over the queries",
        """
        def induction_score(weights, period):
            total = 0
            for i in range(period, weights.shape[-1]):
                total = total + weights[:, i, i - period + 1]
            return total
    """,
    ),
]

# Dropout missing from one of its four places, or in a place of its own: each passed the check that only compared
# two training calls; the checks now read each dropout back from the output.
_SA_DROP = "return F.dropout(out, self.p, training=self.training)"
_FF_INNER = "h = F.dropout(self.act(self.linear1(h)), self.p, training=self.training)"
_FF_OUT = "return F.dropout(self.linear2(h), self.p, training=self.training)"
MUTANTS += [
    _block(
        "no_dropout_on_attention_weights",
        "no dropout on the attention weights",
        ("dropout=dropout, batch_first=True", "batch_first=True"),
    ),
    _block("no_dropout_after_attention", "no dropout on the output of self-attention", (_SA_DROP, "return out")),
    _block("no_dropout_inside_ffn", "no dropout inside the feed-forward network", (_FF_INNER, "h = self.act(self.linear1(h))")),
    _block("no_dropout_after_ffn", "no dropout on the output of the feed-forward network", (_FF_OUT, "return self.linear2(h)")),
    _block(
        "dropout_before_activation",
        "wrong place: it acts on the activation's output",
        (_FF_INNER, "h = self.act(F.dropout(self.linear1(h), self.p, training=self.training))"),
    ),
    _block(
        "dropout_on_ffn_input",
        "wrong place: it acts on the activation's output",
        (_FF_INNER, "h = self.act(self.linear1(F.dropout(h, self.p, training=self.training)))"),
    ),
    _block(
        "dropout_on_residual_sum",
        "dropout acts on the residual sum",
        (_SA_DROP, "return out"),
        (
            "x = x + self._sa(self.norm1(x), attn_mask, key_padding_mask, is_causal)",
            "x = F.dropout(x + self._sa(self.norm1(x), attn_mask, key_padding_mask, is_causal), self.p, training=self.training)",
        ),
        (
            "x = self.norm1(x + self._sa(x, attn_mask, key_padding_mask, is_causal))",
            "x = self.norm1(F.dropout(x + self._sa(x, attn_mask, key_padding_mask, is_causal), self.p, training=self.training))",
        ),
    ),
    _block(
        "dropout_on_attention_input",
        "dropout in the attention sub-layer is in the wrong place",
        (
            "out, w = self.self_attn(h, h, h,",
            "h = F.dropout(h, self.p, training=self.training)\n        out, w = self.self_attn(h, h, h,",
        ),
    ),
    _block(
        "dropout_after_final_norm",
        "dropout acts after the final LayerNorm",
        (_FF_OUT, "return self.linear2(h)"),
        ("x = self.norm2(x + self._ff(x))", "x = F.dropout(self.norm2(x + self._ff(x)), self.p, training=self.training)"),
        ("x = x + self._ff(self.norm2(x))", "x = x + F.dropout(self._ff(self.norm2(x)), self.p, training=self.training)"),
    ),
]
