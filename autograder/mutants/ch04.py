"""Mutants of chapter 4: wrong split_heads, merge_heads, MultiHeadAttention and FLOP counts.

Most mutants of ``MultiHeadAttention`` are ``TEMPLATE`` (the correct layer of
:mod:`autograder.provided.ch04`, written independently of ``solutions/``) with one realistic mistake edited in; ``tests/test_ch04.py`` proves that the
template itself passes every check, so each mutant fails for its own mistake only.
"""

import inspect

from autograder.mutants import Mutant, edit
from autograder.provided import ch04 as provided

TEMPLATE = inspect.getsource(provided.MultiHeadAttention)


def _mha(name: str, diagnosis: str, *pairs: tuple[str, str]) -> Mutant:
    return Mutant("MultiHeadAttention", name, diagnosis, edit(TEMPLATE, *pairs))


_SPLITS = (
    (".reshape(B, L, H, D).transpose(1, 2)", ".view(B, H, L, D)"),
    (".reshape(B, S, H, D).transpose(1, 2)", ".view(B, H, S, D)"),
)

MUTANTS = [
    # split_heads
    Mutant(
        "split_heads",
        "view_without_transpose",
        "view without transpose",
        """
        def split_heads(x, num_heads):
            B, L, E = x.shape
            if E % num_heads:
                raise ValueError("embed_dim must be divisible by num_heads")
            return x.view(B, num_heads, L, E // num_heads)
    """,
    ),
    Mutant(
        "split_heads",
        "split_sequence",
        "split the sequence",
        """
        def split_heads(x, num_heads):
            B, L, E = x.shape
            if E % num_heads:
                raise ValueError("embed_dim must be divisible by num_heads")
            return x.reshape(B, num_heads, L // num_heads, E)
    """,
    ),
    Mutant(
        "split_heads",
        "interleaved",
        "interleaved",
        """
        def split_heads(x, num_heads):
            B, L, E = x.shape
            if E % num_heads:
                raise ValueError("embed_dim must be divisible by num_heads")
            return x.reshape(B, L, E // num_heads, num_heads).permute(0, 3, 1, 2)
    """,
    ),
    Mutant(
        "split_heads",
        "no_value_error",
        "ValueError",
        """
        def split_heads(x, num_heads):
            B, L, E = x.shape
            return x.reshape(B, L, num_heads, E // num_heads).transpose(1, 2)
    """,
    ),
    Mutant(
        "split_heads",
        "no_transpose_at_all",
        "transpose(1, 2)",
        """
        def split_heads(x, num_heads):
            B, L, E = x.shape
            if E % num_heads:
                raise ValueError("embed_dim must be divisible by num_heads")
            return x.reshape(B, L, num_heads, E // num_heads)
    """,
    ),
    # merge_heads
    Mutant(
        "merge_heads",
        "reshape_without_transpose",
        "without transpose",
        """
        def merge_heads(x):
            B, H, L, D = x.shape
            return x.reshape(B, L, H * D)
    """,
    ),
    Mutant(
        "merge_heads",
        "view_after_transpose",
        "contiguous",
        """
        def merge_heads(x):
            B, H, L, D = x.shape
            return x.transpose(1, 2).view(B, L, H * D)
    """,
    ),
    Mutant(
        "merge_heads",
        "average_heads",
        "summed or averaged the heads",
        """
        def merge_heads(x):
            return x.mean(dim=1)
    """,
    ),
    Mutant(
        "merge_heads",
        "interleaved",
        "interleaved",
        """
        def merge_heads(x):
            B, H, L, D = x.shape
            return x.permute(0, 2, 3, 1).reshape(B, L, H * D)
    """,
    ),
    # MultiHeadAttention
    _mha("scale_sqrt_num_heads", "1/sqrt(num_heads)", ("/ math.sqrt(D)", "/ math.sqrt(H)")),
    _mha("scale_sqrt_embed_dim", "1/sqrt(E)", ("/ math.sqrt(D)", "/ math.sqrt(E)")),
    _mha("no_scale", "did not scale", ("/ math.sqrt(D)", "")),
    _mha("view_without_transpose", "view without transpose", *_SPLITS),
    _mha(
        "merge_without_transpose",
        "merged the heads without transpose",
        ("(weights @ v).transpose(1, 2).reshape", "(weights @ v).reshape"),
    ),
    _mha("no_output_projection", "no output projection", ("out = self.out_proj(out)", "pass")),
    _mha("dropout_in_eval_mode", "dropout is active in eval mode", ("training=self.training", "training=True")),
    _mha(
        "inverted_masks",
        "inverted the boolean mask",
        (".masked_fill(attn_mask, float", ".masked_fill(~attn_mask, float"),
        ('key_padding_mask, float("-inf"))', '~key_padding_mask, float("-inf"))'),
    ),
    _mha("nan_on_fully_masked_rows", "fully masked", (".nan_to_num(0.0)", "")),
    _mha(
        "finite_fill_value",
        "large finite negative number",
        ('masked_fill(attn_mask, float("-inf"))', "masked_fill(attn_mask, -1e9)"),
        ('key_padding_mask, float("-inf"))', "key_padding_mask, -1e9)"),
    ),
    _mha(
        "key_padding_mask_ignored",
        "key_padding_mask was ignored",
        ("scores = scores + key_padding_mask.view(B, 1, 1, S)", "pass"),
    ),
    _mha("attn_mask_ignored", "attn_mask was ignored", ("scores = scores + attn_mask", "pass")),
    _mha("is_causal_ignored", "is_causal was ignored", ("if attn_mask is None and is_causal:", "if False:")),
    _mha("mask_3d_heads_first", "(H, B, L, S)", ("attn_mask.view(B, H, L, S)", "attn_mask.view(H, B, L, S).transpose(0, 1)")),
    _mha(
        "float_mask_as_bool",
        "treated a float mask as a boolean",
        (
            "            if attn_mask.dim() == 3:",
            "            else:\n                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill("
            'attn_mask != 0, float("-inf"))\n            if attn_mask.dim() == 3:',
        ),
    ),
    _mha("softmax_over_queries", "over the queries", ("torch.softmax(scores, dim=-1)", "torch.softmax(scores, dim=-2)")),
    _mha(
        "self_attention_only",
        "computed keys and values from `query`",
        ("F.linear(key, w_k, b_k)", "F.linear(query, w_k, b_k)"),
        ("F.linear(value, w_v, b_v)", "F.linear(query, w_v, b_v)"),
        ("S = key.shape[1]", "S = query.shape[1]"),
    ),
    _mha(
        "key_value_swapped",
        "swapped key and value",
        ("F.linear(key, w_k, b_k)", "F.linear(value, w_k, b_k)"),
        ("F.linear(value, w_v, b_v)", "F.linear(key, w_v, b_v)"),
    ),
    _mha("qkv_order", "wrong order", ("w_q, w_k, w_v = ", "w_k, w_q, w_v = "), ("b_q, b_k, b_v = ", "b_k, b_q, b_v = ")),
    _mha("sum_of_heads", "summed the heads' weights", ("weights.mean(dim=1)", "weights.sum(dim=1)")),
    _mha(
        "dropout_not_rescaled",
        "1/(1-p)",
        (
            "weights = F.dropout(weights, p=self.dropout, training=self.training)",
            "if self.training and self.dropout > 0:\n            weights = weights * (torch.rand_like(weights) >= self.dropout)",
        ),
    ),
    _mha(
        "mask_after_softmax",
        "masked after the softmax",
        ("/ math.sqrt(D)\n", "/ math.sqrt(D)\n        blocked = None\n"),
        ("scores = scores + attn_mask", 'blocked = attn_mask == float("-inf")'),
        (
            "weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)\n",
            "weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)\n"
            "        if blocked is not None:\n            weights = weights.masked_fill(blocked, 0.0)\n",
        ),
    ),
    # multi_head_attention_flops
    Mutant(
        "multi_head_attention_flops",
        "no_projections",
        "left out the projections",
        """
        def multi_head_attention_flops(batch, L, S, embed_dim, num_heads):
            return 4 * batch * L * S * embed_dim
    """,
    ),
    Mutant(
        "multi_head_attention_flops",
        "multiply_add_is_one",
        "multiply-add as 1",
        """
        def multi_head_attention_flops(batch, L, S, embed_dim, num_heads):
            E = embed_dim
            return batch * L * E * E + 2 * batch * S * E * E + 2 * batch * L * S * E + batch * L * E * E
    """,
    ),
    Mutant(
        "multi_head_attention_flops",
        "heads_multiply_cost",
        "multiplied the attention cost by num_heads",
        """
        def multi_head_attention_flops(batch, L, S, embed_dim, num_heads):
            E = embed_dim
            attention = num_heads * (2 * batch * L * S * E + 2 * batch * L * S * E)
            return 2 * batch * L * E * E + 4 * batch * S * E * E + attention + 2 * batch * L * E * E
    """,
    ),
    Mutant(
        "multi_head_attention_flops",
        "kv_from_queries",
        "from the L query tokens",
        """
        def multi_head_attention_flops(batch, L, S, embed_dim, num_heads):
            E = embed_dim
            return 8 * batch * L * E * E + 4 * batch * L * S * E
    """,
    ),
    Mutant(
        "multi_head_attention_flops",
        "float_division",
        "should return an int",
        """
        def multi_head_attention_flops(batch, L, S, embed_dim, num_heads):
            E, D = embed_dim, embed_dim / num_heads
            return 4 * batch * L * E * E + 4 * batch * S * E * E + 4 * batch * num_heads * L * S * D
    """,
    ),
    Mutant(
        "multi_head_attention_flops",
        "one_head_only",
        "forgot the factor num_heads",
        """
        def multi_head_attention_flops(batch, L, S, embed_dim, num_heads):
            E, D = embed_dim, embed_dim // num_heads
            return 4 * batch * L * E * E + 4 * batch * S * E * E + 4 * batch * L * S * D
    """,
    ),
]

# Dropout in the wrong place: each of these passed the checks that only compared two training calls or the
# returned weights; the checks now read the weights back from the output.
_DROP = "weights = F.dropout(weights, p=self.dropout, training=self.training)"
MUTANTS += [
    _mha(
        "dropout_on_output",
        "dropout acts on the layer's output",
        (_DROP, "pass"),
        ("out = self.out_proj(out)", "out = F.dropout(self.out_proj(out), p=self.dropout, training=self.training)"),
    ),
    _mha(
        "dropout_on_merged_heads",
        "dropout acts on the merged heads",
        (_DROP, "pass"),
        ("out = self.out_proj(out)", "out = self.out_proj(F.dropout(out, p=self.dropout, training=self.training))"),
    ),
    _mha(
        "dropout_on_values",
        "somewhere other than the attention weights",
        (_DROP, "v = F.dropout(v, p=self.dropout, training=self.training)"),
    ),
    _mha(
        "weights_returned_before_dropout",
        "returned the attention weights before dropout",
        (_DROP, "used = F.dropout(weights, p=self.dropout, training=self.training)"),
        ("out = (weights @ v)", "out = (used @ v)"),
    ),
    _mha(
        "dropout_only_when_weights_returned",
        "dropout is skipped when need_weights=False",
        ("training=self.training)", "training=self.training and need_weights)"),
    ),
    _mha(
        "dropout_mask_shared_across_batch_and_heads",
        "the same dropout mask for every sequence",
        (
            _DROP,
            "if self.training and self.dropout > 0:\n"
            "            keep = torch.rand(L, S) >= self.dropout\n"
            "            weights = weights * keep / (1 - self.dropout)",
        ),
    ),
    _mha(
        "renormalised_after_dropout",
        "renormalised after dropout",
        (_DROP, _DROP + "\n        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)"),
    ),
    _mha(
        "dropout_on_scores",
        "dropout acts before the softmax",
        (
            "weights = torch.softmax(scores, dim=-1)",
            "weights = torch.softmax(F.dropout(scores, p=self.dropout, training=self.training), dim=-1)",
        ),
        (_DROP, "pass"),
    ),
]
