"""Mutants of chapter 6: wrong KVCache, decode_step, GroupedQueryAttention and kv_cache_bytes.

Most mutants are a template (a correct implementation written independently of ``solutions/``)
with one realistic mistake edited in; ``tests/test_ch06.py`` proves that every template passes
every check, so each mutant fails for its own mistake only.
"""

from autograder.mutants import Mutant, edit

CACHE_TEMPLATE = """
class KVCache:
    def __init__(self):
        self.k = None
        self.v = None

    def update(self, k, v):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def __len__(self):
        return 0 if self.k is None else self.k.shape[2]
"""

DECODE_TEMPLATE = """
def decode_step(mha, x_t, cache):
    B, _, E = x_t.shape
    H = mha.num_heads
    D = E // H
    qkv = F.linear(x_t, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.split(E, dim=-1)
    q = q.view(B, 1, H, D).transpose(1, 2)
    k = k.view(B, 1, H, D).transpose(1, 2)
    v = v.view(B, 1, H, D).transpose(1, 2)
    k_all, v_all = cache.update(k, v)
    scores = q @ k_all.transpose(-2, -1) / math.sqrt(D)
    weights = scores.softmax(dim=-1)
    out = (weights @ v_all).transpose(1, 2).reshape(B, 1, E)
    out = mha.out_proj(out)
    return out
"""

GQA_TEMPLATE = """
class GroupedQueryAttention(nn.Module):
    def __init__(self, embed_dim, num_heads, num_kv_heads, bias=False):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        self.h, self.kv, self.d = num_heads, num_kv_heads, embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.d, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.d, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x, is_causal=False):
        B, L, E = x.shape
        q = self.q_proj(x).view(B, L, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kv, self.d).transpose(1, 2)
        g = self.h // self.kv
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d)
        if is_causal:
            mask = torch.ones(L, L, dtype=torch.bool).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(B, L, E)
        return self.out_proj(out)
"""

BYTES_TEMPLATE = """
def kv_cache_bytes(batch, seq_len, num_layers, num_kv_heads, head_dim, dtype):
    return 2 * batch * seq_len * num_layers * num_kv_heads * head_dim * dtype.itemsize
"""

TEMPLATES = {
    "KVCache": CACHE_TEMPLATE,
    "decode_step": DECODE_TEMPLATE,
    "GroupedQueryAttention": GQA_TEMPLATE,
    "kv_cache_bytes": BYTES_TEMPLATE,
}


def _m(exercise: str, name: str, diagnosis: str, *pairs: tuple[str, str]) -> Mutant:
    return Mutant(exercise, name, diagnosis, edit(TEMPLATES[exercise], *pairs))


MUTANTS = [
    # KVCache
    _m(
        "KVCache",
        "first_chunk_twice",
        "appended twice",
        ("            self.k, self.v = k, v\n        else:\n", "            self.k, self.v = k, v\n"),
        ("            self.k = torch.cat", "        self.k = torch.cat"),
        ("            self.v = torch.cat", "        self.v = torch.cat"),
    ),
    _m(
        "KVCache",
        "return_new_chunk_twice",
        "appended twice",
        ("        return self.k, self.v", "        return torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)"),
    ),
    _m(
        "KVCache",
        "not_stored",
        "does not keep the earlier chunks",
        ("        if self.k is None:", "        return k, v\n        if self.k is None:"),
        ("return 0 if self.k is None else self.k.shape[2]", "return 0"),
    ),
    _m(
        "KVCache",
        "heads_axis",
        "instead of the time axis",
        ("torch.cat([self.k, k], dim=2)", "torch.cat([self.k, k], dim=1)"),
        ("torch.cat([self.v, v], dim=2)", "torch.cat([self.v, v], dim=1)"),
    ),
    _m(
        "KVCache",
        "feature_axis",
        "instead of the time axis",
        ("torch.cat([self.k, k], dim=2)", "torch.cat([self.k, k], dim=-1)"),
        ("torch.cat([self.v, v], dim=2)", "torch.cat([self.v, v], dim=-1)"),
    ),
    _m(
        "KVCache",
        "len_counts_chunks",
        "chunks",
        ("        self.v = None\n", "        self.v = None\n        self.n = 0\n"),
        ("        return self.k, self.v", "        self.n += 1\n        return self.k, self.v"),
        ("return 0 if self.k is None else self.k.shape[2]", "return self.n"),
    ),
    Mutant(
        "KVCache",
        "class_attribute_storage",
        "share their storage",
        """
        class KVCache:
            keys = []
            values = []

            def update(self, k, v):
                self.keys.append(k)
                self.values.append(v)
                return torch.cat(self.keys, dim=2), torch.cat(self.values, dim=2)

            def __len__(self):
                return sum(k.shape[2] for k in self.keys)
        """,
    ),
    _m("KVCache", "len_batch", "dim 0 (batch)", ("self.k.shape[2]", "self.k.shape[0]")),
    # decode_step
    Mutant(
        "decode_step",
        "sdpa_is_causal_top_left",
        "top-left",
        DECODE_TEMPLATE.replace(
            """    scores = q @ k_all.transpose(-2, -1) / math.sqrt(D)
    weights = scores.softmax(dim=-1)
    out = (weights @ v_all).transpose(1, 2).reshape(B, 1, E)
""",
            """    out = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
    out = out.transpose(1, 2).reshape(B, 1, E)
""",
        ),
    ),
    _m(
        "decode_step",
        "tril_mask_top_left",
        "top-left",
        (
            "    weights = scores.softmax(dim=-1)",
            "    S = k_all.shape[2]\n    mask = torch.ones(1, S, dtype=torch.bool).tril()\n"
            "    weights = scores.masked_fill(~mask, float('-inf')).softmax(dim=-1)",
        ),
    ),
    _m(
        "decode_step",
        "only_new_token",
        "only to the new token",
        ("q @ k_all.transpose(-2, -1)", "q @ k.transpose(-2, -1)"),
        ("(weights @ v_all)", "(weights @ v)"),
    ),
    _m("decode_step", "no_out_proj", "output projection", ("    out = mha.out_proj(out)\n", "")),
    _m("decode_step", "scale_sqrt_embed_dim", "1/sqrt(embed_dim)", ("/ math.sqrt(D)", "/ math.sqrt(E)")),
    _m("decode_step", "no_scale", "did not scale", ("/ math.sqrt(D)", "")),
    _m(
        "decode_step",
        "update_twice",
        "twice",
        ("    k_all, v_all = cache.update(k, v)\n", "    cache.update(k, v)\n    k_all, v_all = cache.update(k, v)\n"),
    ),
    _m("decode_step", "no_cache_update", "cache.update", ("cache.update(k, v)", "(k, v)")),
    _m(
        "decode_step",
        "heads_not_transposed",
        "transpose(1, 2)",
        ("    k = k.view(B, 1, H, D).transpose(1, 2)\n", "    k = k.view(B, 1, H, D)\n"),
        ("    v = v.view(B, 1, H, D).transpose(1, 2)\n", "    v = v.view(B, 1, H, D)\n"),
    ),
    _m("decode_step", "softmax_over_queries", "over the queries", ("scores.softmax(dim=-1)", "scores.softmax(dim=-2)")),
    _m("decode_step", "kv_swapped", "where the key belongs", ("cache.update(k, v)", "cache.update(v, k)")),
    # GroupedQueryAttention
    _m(
        "GroupedQueryAttention",
        "repeat_instead_of_repeat_interleave",
        "repeat_interleave",
        ("k = k.repeat_interleave(g, dim=1)", "k = k.repeat(1, g, 1, 1)"),
        ("v = v.repeat_interleave(g, dim=1)", "v = v.repeat(1, g, 1, 1)"),
    ),
    _m(
        "GroupedQueryAttention",
        "expand_wrong_axis",
        "repeat_interleave",
        (
            "k = k.repeat_interleave(g, dim=1)",
            "k = k.unsqueeze(1).expand(B, g, self.kv, L, self.d).reshape(B, self.h, L, self.d)",
        ),
        (
            "v = v.repeat_interleave(g, dim=1)",
            "v = v.unsqueeze(1).expand(B, g, self.kv, L, self.d).reshape(B, self.h, L, self.d)",
        ),
    ),
    _m("GroupedQueryAttention", "is_causal_ignored", "is_causal", ("        if is_causal:\n", "        if False:\n")),
    _m("GroupedQueryAttention", "diagonal_masked", "diagonal", (".tril()", ".tril(-1)")),
    _m("GroupedQueryAttention", "scale_sqrt_embed_dim", "1/sqrt(embed_dim)", ("/ math.sqrt(self.d)", "/ math.sqrt(E)")),
    _m(
        "GroupedQueryAttention",
        "mha_sized_kv_projections",
        "num_kv_heads * head_dim",
        ("nn.Linear(embed_dim, num_kv_heads * self.d, bias=bias)", "nn.Linear(embed_dim, embed_dim, bias=bias)"),
        ("view(B, L, self.kv, self.d)", "view(B, L, self.h, self.d)"),
        ("k = k.repeat_interleave(g, dim=1)", "pass"),
        ("v = v.repeat_interleave(g, dim=1)", "pass"),
    ),
    _m(
        "GroupedQueryAttention",
        "no_value_error",
        "ValueError",
        (
            '        if num_heads % num_kv_heads:\n            raise ValueError("num_heads must be a multiple of num_kv_heads")\n',
            "",
        ),
    ),
    _m("GroupedQueryAttention", "no_out_proj", "output projection", ("return self.out_proj(out)", "return out")),
    _m("GroupedQueryAttention", "bias_default_true", "default to False", ("bias=False):", "bias=True):")),
    # kv_cache_bytes
    _m("kv_cache_bytes", "no_factor_two", "factor 2", ("return 2 * batch", "return batch")),
    _m("kv_cache_bytes", "no_dtype_size", "bytes per element", (" * dtype.itemsize", "")),
    _m("kv_cache_bytes", "bits_not_bytes", "bits", ("dtype.itemsize", "torch.finfo(dtype).bits")),
    _m("kv_cache_bytes", "float_result", "should return an int", ("dtype.itemsize", "(torch.finfo(dtype).bits / 8)")),
    _m("kv_cache_bytes", "assumes_float16", "assumed 2 bytes", ("dtype.itemsize", "2")),
    _m("kv_cache_bytes", "forgot_layers", "num_layers", (" * num_layers", "")),
]

# The grouping left to SDPA: the name check found enable_gqa=True written out, but not these; the forward pass now
# runs under a watch on F.scaled_dot_product_attention.
_GROUPING = (
    "        g = self.h // self.kv\n        k = k.repeat_interleave(g, dim=1)\n        v = v.repeat_interleave(g, dim=1)\n"
    "        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d)\n"
    "        if is_causal:\n            mask = torch.ones(L, L, dtype=torch.bool).tril()\n"
    '            scores = scores.masked_fill(~mask, float("-inf"))\n'
    "        weights = torch.softmax(scores, dim=-1)\n        out = (weights @ v).transpose(1, 2).reshape(B, L, E)\n"
)
MUTANTS += [
    _m(
        "GroupedQueryAttention",
        "enable_gqa_spelled_as_a_string",
        "enable_gqa",
        (
            _GROUPING,
            "        opts = {'enable_gqa': True}\n"
            "        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, **opts)\n"
            "        out = out.transpose(1, 2).reshape(B, L, E)\n",
        ),
    ),
    _m(
        "GroupedQueryAttention",
        "enable_gqa_through_a_helper",
        "let F.scaled_dot_product_attention do the grouping",
        (
            _GROUPING,
            "        out = _attend(q, k, v, is_causal).transpose(1, 2).reshape(B, L, E)\n",
        ),
        (
            "class GroupedQueryAttention(nn.Module):",
            "def _attend(q, k, v, causal, _options=dict(zip(['enable_gqa'], [True]))):\n"
            "    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **_options)\n\n\n"
            "class GroupedQueryAttention(nn.Module):",
        ),
    ),
]
