"""Mutants of chapter 10: wrong shard_heads and TensorParallelMultiHeadAttention.

Each mutant is a template (a correct implementation written independently of ``solutions/``) with
one realistic mistake edited in; ``tests/test_ch10.py`` proves that every template passes every
check, so each mutant fails for its own mistake only.
"""

from autograder.mutants import Mutant, edit

SHARD_TEMPLATE = """
def shard_heads(state_dict, rank, world_size, num_heads):
    W = state_dict["in_proj_weight"]
    E = W.shape[1]
    if num_heads % world_size != 0:
        raise ValueError("num_heads must be divisible by world_size")
    D = E // num_heads
    per_rank = num_heads // world_size
    heads = list(range(rank * per_rank, (rank + 1) * per_rank))
    idx = torch.cat([torch.arange(h * D, (h + 1) * D) for h in heads])
    rows = torch.cat([idx, idx + E, idx + 2 * E])
    shard = {"in_proj_weight": W[rows].clone()}
    if "in_proj_bias" in state_dict:
        shard["in_proj_bias"] = state_dict["in_proj_bias"][rows].clone()
    shard["out_proj.weight"] = state_dict["out_proj.weight"][:, idx].clone()
    if "out_proj.bias" in state_dict:
        shard["out_proj.bias"] = state_dict["out_proj.bias"].clone()
    return shard
"""

LAYER_TEMPLATE = """
class TensorParallelMultiHeadAttention(nn.Module):
    class F(torch.autograd.Function):  # f: identity forward, all-reduce of the gradient backward
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            g = g.clone()
            dist.all_reduce(g, group=ctx.group)
            return g, None

    class G(torch.autograd.Function):  # g: all-reduce forward, identity backward
        @staticmethod
        def forward(ctx, x, group):
            x = x.clone()
            dist.all_reduce(x, group=group)
            return x

        @staticmethod
        def backward(ctx, g):
            return g, None

    def __init__(self, embed_dim, num_heads, group=None, bias=True):
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if num_heads % self.world_size != 0:
            raise ValueError("num_heads must be divisible by the group's size")
        self.h = num_heads // self.world_size
        self.d = embed_dim // num_heads
        local = self.h * self.d
        self.in_proj_weight = nn.Parameter(torch.randn(3 * local, embed_dim) * 0.02)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * local)) if bias else None
        self.out_proj = nn.Linear(local, embed_dim, bias=bias)

    def forward(self, query, key=None, value=None, key_padding_mask=None, attn_mask=None, is_causal=False):
        if key is None:
            key = query
        if value is None:
            value = key
        B, L, E = query.shape
        S = key.shape[1]
        f = self.F.apply
        xq = f(query, self.group)
        xk = xq if key is query else f(key, self.group)
        xv = xk if value is key else (xq if value is query else f(value, self.group))
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(xq, wq, bq).view(B, L, self.h, self.d).transpose(1, 2)
        k = F.linear(xk, wk, bk).view(B, S, self.h, self.d).transpose(1, 2)
        v = F.linear(xv, wv, bv).view(B, S, self.h, self.d).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool).triu(1)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(B, L, self.h * self.d)
        out = out @ self.out_proj.weight.T
        out = self.G.apply(out, self.group)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        return out
"""

TEMPLATES = {"shard_heads": SHARD_TEMPLATE, "TensorParallelMultiHeadAttention": LAYER_TEMPLATE}


def _m(exercise: str, name: str, diagnosis: str, *pairs: tuple[str, str]) -> Mutant:
    return Mutant(exercise, name, diagnosis, edit(TEMPLATES[exercise], *pairs))


ROWS = "    rows = torch.cat([idx, idx + E, idx + 2 * E])\n"
LAYER = "TensorParallelMultiHeadAttention"
G_CALL = "        out = self.G.apply(out, self.group)\n"

MUTANTS = [
    # shard_heads
    _m(
        "shard_heads",
        "contiguous_block",
        "one contiguous block",
        (ROWS, ROWS + "    n = 3 * per_rank * D\n    rows = torch.arange(rank * n, (rank + 1) * n)\n"),
    ),
    _m("shard_heads", "out_proj_rows", "rows of out_proj.weight", ('["out_proj.weight"][:, idx]', '["out_proj.weight"][idx, :]')),
    _m(
        "shard_heads",
        "round_robin_heads",
        "round-robin",
        ("range(rank * per_rank, (rank + 1) * per_rank)", "range(rank, num_heads, world_size)"),
    ),
    _m(
        "shard_heads",
        "reversed_rank_order",
        "wrong head order across ranks",
        ("heads = list(range(rank * per_rank", "rank = world_size - 1 - rank\n    heads = list(range(rank * per_rank"),
    ),
    _m(
        "shard_heads",
        "qkv_interleaved_per_head",
        "interleaved",
        (ROWS, "    rows = torch.cat([torch.cat([i, i + E, i + 2 * E]) for i in idx.split(D)])\n"),
    ),
    _m(
        "shard_heads",
        "kv_offset_local",
        "W_k starts at row E",
        (ROWS, "    n = len(idx)\n    rows = torch.cat([idx, idx + n, idx + 2 * n])\n"),
    ),
    _m(
        "shard_heads",
        "bias_divided_by_world_size",
        "divided the output bias",
        ('state_dict["out_proj.bias"].clone()', 'state_dict["out_proj.bias"] / world_size'),
    ),
    _m(
        "shard_heads",
        "in_proj_bias_contiguous",
        "in_proj_bias as one contiguous block",
        (
            'state_dict["in_proj_bias"][rows].clone()',
            'state_dict["in_proj_bias"][rank * len(rows) : (rank + 1) * len(rows)].clone()',
        ),
    ),
    _m(
        "shard_heads",
        "no_value_error",
        "should raise ValueError",
        ('        raise ValueError("num_heads must be divisible by world_size")\n', "        pass\n"),
    ),
    # TensorParallelMultiHeadAttention: the forward pass
    _m(
        LAYER,
        "bias_on_every_rank",
        "bias on every rank",
        (
            "        out = out @ self.out_proj.weight.T\n        out = self.G.apply(out, self.group)\n"
            "        if self.out_proj.bias is not None:\n            out = out + self.out_proj.bias\n",
            "        out = self.out_proj(out)\n        out = self.G.apply(out, self.group)\n",
        ),
    ),
    _m(LAYER, "missing_all_reduce", "no all-reduce", ("        out = self.G.apply(out, self.group)\n", "")),
    _m(
        LAYER,
        "averaged_like_data_parallel",
        "averaged the partial outputs",
        (G_CALL, G_CALL + "        out = out / self.world_size\n"),
    ),
    _m(LAYER, "scale_by_local_width", "1/sqrt(E/p)", ("/ math.sqrt(self.d)", "/ math.sqrt(self.h * self.d)")),
    _m(
        LAYER,
        "all_heads_on_each_rank",
        "all num_heads heads",
        (
            "        self.h = num_heads // self.world_size\n        self.d = embed_dim // num_heads\n",
            "        self.h = num_heads\n        self.d = embed_dim // num_heads // self.world_size\n",
        ),
        ("        local = self.h * self.d\n", "        local = embed_dim // self.world_size\n"),
    ),  # fmt: skip
    _m(
        LAYER,
        "all_reduce_on_rank_0_only",
        "deadlock",
        (G_CALL, "        if self.rank == 0:\n    " + G_CALL),
    ),
    _m(
        LAYER,
        "causal_ignored",
        "ignored is_causal",
        ("        if attn_mask is None and is_causal:\n            attn_mask = torch.ones(L, S, dtype=torch.bool).triu(1)\n", ""),
    ),
    _m(
        LAYER,
        "forgot_output_bias",
        "forgot the output projection's bias",
        ("            out = out + self.out_proj.bias\n", "            pass\n"),
    ),
    # TensorParallelMultiHeadAttention: the contract's constructor and group
    _m(
        LAYER,
        "old_signature_rank_world_size",
        "still asks for rank and world_size",
        (
            "    def __init__(self, embed_dim, num_heads, group=None, bias=True):\n",
            "    def __init__(self, embed_dim, num_heads, rank, world_size, group=None, bias=True):\n",
        ),
        (
            "        self.rank = dist.get_rank(group)\n        self.world_size = dist.get_world_size(group)\n",
            "        self.rank, self.world_size = rank, world_size\n",
        ),
    ),  # fmt: skip
    _m(
        LAYER,
        "rank_and_size_of_the_world",
        "ignored `group`",
        ("dist.get_rank(group)", "dist.get_rank()"),
        ("dist.get_world_size(group)", "dist.get_world_size()"),
    ),
    _m(
        LAYER,
        "all_reduce_without_group",
        "ignored `group` in the all-reduce",
        ("dist.all_reduce(g, group=ctx.group)", "dist.all_reduce(g)"),
        ("dist.all_reduce(x, group=group)", "dist.all_reduce(x)"),
    ),
    _m(
        LAYER,
        "grad_all_reduce_without_group",
        "ignored `group` in the backward pass",
        ("dist.all_reduce(g, group=ctx.group)", "dist.all_reduce(g)"),
    ),
    # TensorParallelMultiHeadAttention: the backward pass (the forward is right in all of these)
    _m(
        LAYER,
        "in_place_all_reduce_no_backward",
        "has no backward",
        ("        f = self.F.apply\n", "        f = lambda x, group: x\n"),
        (G_CALL, "        dist.all_reduce(out, group=self.group)\n"),
    ),
    _m(
        LAYER,
        "missing_f_at_the_input",
        "no f at the input",
        ("        f = self.F.apply\n", "        f = lambda x, group: x\n"),
    ),
    _m(
        LAYER,
        "f_on_the_query_only",
        "only some inputs went through f",
        ("        xk = xq if key is query else f(key, self.group)\n", "        xk = xq if key is query else key\n"),
        ("else f(value, self.group))", "else value)"),
    ),
    _m(
        LAYER,
        "torch_distributed_nn_all_reduce",
        "multiplies the gradients by world_size",
        ("        f = self.F.apply\n", "        f = lambda x, group: x\n"),
        (
            G_CALL,
            "        from torch.distributed.nn.functional import all_reduce\n\n        out = all_reduce(out, group=self.group)\n",
        ),
    ),
    _m(
        LAYER,
        "g_backward_all_reduces",
        "multiplies the gradients by world_size",
        (
            "        def backward(ctx, g):\n            return g, None\n",
            "        def backward(ctx, g):\n            g = g.clone()\n            dist.all_reduce(g)\n            return g, None\n",
        ),
    ),  # fmt: skip
    _m(
        LAYER,
        "f_backward_averages",
        "averaged the input's gradient",
        (
            "            return g, None\n\n    class G(",
            "            return g / dist.get_world_size(ctx.group), None\n\n    class G(",
        ),
    ),
    _m(
        LAYER,
        "bias_split_across_ranks",
        "split the output bias across the ranks",
        (
            "        out = out @ self.out_proj.weight.T\n        out = self.G.apply(out, self.group)\n"
            "        if self.out_proj.bias is not None:\n            out = out + self.out_proj.bias\n",
            "        out = out @ self.out_proj.weight.T\n        if self.out_proj.bias is not None:\n"
            "            out = out + self.out_proj.bias / self.world_size\n"
            "        out = self.G.apply(out, self.group)\n",
        ),
    ),
]
