"""Mutants of chapter 7: wrong benchmark, FusedMultiHeadAttention, attention_flops and naive_attention_bytes.

Most mutants are a template (a correct implementation written independently of ``solutions/``)
with one realistic mistake edited in; ``tests/test_ch07.py`` proves that every template passes
every check, so each mutant fails for its own mistake only. ``benchmark`` has two templates, one
timing with CUDA events and one with ``torch.cuda.synchronize()`` around ``time.perf_counter()``:
the checks accept both.
"""

from autograder.mutants import Mutant, edit

BENCH_SYNC_TEMPLATE = """
def benchmark(fn, *args, warmup=3, repeats=20):
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn(*args)
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    q1, q3 = np.percentile(times, [25, 75])
    return {"median_ms": float(np.median(times)), "iqr_ms": float(q3 - q1)}
"""

BENCH_EVENTS_TEMPLATE = """
def benchmark(fn, *args, warmup=3, repeats=20):
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1000)
    q1, q3 = np.percentile(times, [25, 75])
    return {"median_ms": float(np.median(times)), "iqr_ms": float(q3 - q1)}
"""

FUSED_TEMPLATE = """
class FusedMultiHeadAttention(nn.Module):
    def __init__(self, embed_dim, num_heads, bias=True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, L, E = x.shape
        H, D = self.num_heads, self.head_dim
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.split(E, dim=-1)
        q = q.reshape(B, L, H, D).transpose(1, 2)
        k = k.reshape(B, L, H, D).transpose(1, 2)
        v = v.reshape(B, L, H, D).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(B, L, E)
        return self.out_proj(out)
"""

FLOPS_TEMPLATE = """
def attention_flops(batch, heads, L, S, head_dim, causal=False, mode="fwd"):
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
    if mode not in factor:
        raise ValueError(f"unknown mode {mode!r}")
    flops = 4 * batch * heads * L * S * head_dim * factor[mode]
    if causal:
        flops = flops / 2
    return float(flops)
"""

BYTES_TEMPLATE = """
def naive_attention_bytes(batch, heads, L, S, dtype):
    return 2 * batch * heads * L * S * dtype.itemsize
"""

TEMPLATES = {
    "benchmark": BENCH_SYNC_TEMPLATE,
    "FusedMultiHeadAttention": FUSED_TEMPLATE,
    "attention_flops": FLOPS_TEMPLATE,
    "naive_attention_bytes": BYTES_TEMPLATE,
}
EXTRA_TEMPLATES = {"benchmark": [BENCH_EVENTS_TEMPLATE]}


def _m(exercise: str, name: str, diagnosis: str, *pairs: tuple[str, str], template: str | None = None) -> Mutant:
    return Mutant(exercise, name, diagnosis, edit(template or TEMPLATES[exercise], *pairs))


MUTANTS = [
    # benchmark
    _m(
        "benchmark",
        "no_synchronize",
        "stopped before the device finished",
        ("        if cuda:\n            torch.cuda.synchronize()\n        times", "        times"),
    ),
    _m(
        "benchmark",
        "time_time_clock",
        "stopped before the device finished",
        ("start = time.perf_counter()", "start = time.time()"),
        ("(time.perf_counter() - start)", "(time.time() - start)"),
    ),
    _m("benchmark", "mean_not_median", "not the median", ("float(np.median(times))", "float(np.mean(times))")),
    _m("benchmark", "no_warmup", "no warm-up", ("    for _ in range(warmup):\n        fn(*args)\n", "")),
    _m(
        "benchmark",
        "warmup_timed_too",
        "included the warm-up",
        ("    for _ in range(warmup):\n        fn(*args)\n", ""),
        ("for _ in range(repeats):", "for _ in range(warmup + repeats):"),
    ),
    _m(
        "benchmark",
        "no_sync_after_warmup",
        "queued work",
        ("    if cuda:\n        torch.cuda.synchronize()\n    times = []", "    times = []"),
    ),
    _m("benchmark", "seconds", "not milliseconds", ("(time.perf_counter() - start) * 1000", "(time.perf_counter() - start)")),
    _m("benchmark", "iqr_is_std", "standard deviation", ('"iqr_ms": float(q3 - q1)', '"iqr_ms": float(np.std(times))')),
    _m(
        "benchmark",
        "torch_median",
        "lower of the two middle values",
        ("float(np.median(times))", "torch.tensor(times).median().item()"),
    ),
    _m(
        "benchmark",
        "any_tensor_means_cuda",
        "used torch.cuda on a machine without CUDA",
        ("cuda = torch.cuda.is_available()", "cuda = any(isinstance(a, torch.Tensor) for a in args)"),
    ),
    _m(
        "benchmark",
        "cuda_argument_only",
        "took the CPU path because no argument is a CUDA tensor",
        (
            "cuda = torch.cuda.is_available()",
            "cuda = torch.cuda.is_available() and any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)",
        ),
    ),
    _m(
        "benchmark",
        "events_without_timing",
        "enable_timing=True",
        ("torch.cuda.Event(enable_timing=True)", "torch.cuda.Event()"),
        template=BENCH_EVENTS_TEMPLATE,
    ),
    _m(
        "benchmark",
        "elapsed_before_sync",
        "before the end event was reached",
        ("            end.synchronize()\n", ""),
        template=BENCH_EVENTS_TEMPLATE,
    ),
    _m(
        "benchmark",
        "is_cuda_on_every_arg",
        "not every argument is a tensor",
        ("cuda = torch.cuda.is_available()", "cuda = torch.cuda.is_available() and any(a.is_cuda for a in args)"),
    ),
    # FusedMultiHeadAttention
    _m("FusedMultiHeadAttention", "qkv_split_order", "wrong order", ("q, k, v = qkv.split(", "k, q, v = qkv.split(")),
    _m(
        "FusedMultiHeadAttention",
        "view_without_transpose",
        "split heads with",
        ("q = q.reshape(B, L, H, D).transpose(1, 2)", "q = q.reshape(B, H, L, D)"),
        ("k = k.reshape(B, L, H, D).transpose(1, 2)", "k = k.reshape(B, H, L, D)"),
        ("v = v.reshape(B, L, H, D).transpose(1, 2)", "v = v.reshape(B, H, L, D)"),
    ),
    _m(
        "FusedMultiHeadAttention",
        "merge_without_transpose",
        "merged heads",
        ("out = out.transpose(1, 2).reshape(B, L, E)", "out = out.reshape(B, L, E)"),
    ),
    _m(
        "FusedMultiHeadAttention",
        "mask_convention_of_nn_multihead_attention",
        "inverted the boolean mask",
        (
            "        out = F.scaled_dot_product_attention(",
            "        if attn_mask is not None and attn_mask.dtype == torch.bool:\n"
            "            attn_mask = ~attn_mask  # chapter 4: True = not allowed\n"
            "        out = F.scaled_dot_product_attention(",
        ),
    ),
    _m(
        "FusedMultiHeadAttention",
        "three_projections",
        "three separate projections",
        (
            "        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)\n        q, k, v = qkv.split(E, dim=-1)\n",
            "        w_q, w_k, w_v = self.in_proj_weight.chunk(3)\n"
            "        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3\n"
            "        q, k, v = F.linear(x, w_q, b_q), F.linear(x, w_k, b_k), F.linear(x, w_v, b_v)\n",
        ),
    ),
    _m(
        "FusedMultiHeadAttention",
        "separate_parameters",
        "three separate projections",
        (
            "        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))\n"
            "        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim)) if bias else None\n",
            "        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)\n"
            "        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)\n"
            "        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)\n",
        ),
        ("        nn.init.xavier_uniform_(self.in_proj_weight)\n", ""),
        (
            "        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)\n        q, k, v = qkv.split(E, dim=-1)\n",
            "        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)\n",
        ),
    ),
    _m("FusedMultiHeadAttention", "no_out_proj", "output projection", ("return self.out_proj(out)", "return out")),
    _m(
        "FusedMultiHeadAttention",
        "scale_sqrt_embed_dim",
        "1/sqrt(embed_dim)",
        ("is_causal=is_causal)", "is_causal=is_causal, scale=1 / math.sqrt(E))"),
    ),
    _m("FusedMultiHeadAttention", "mask_ignored", "ignored attn_mask", ("attn_mask=attn_mask, ", "")),
    _m("FusedMultiHeadAttention", "causal_ignored", "ignored is_causal", (", is_causal=is_causal)", ")")),
    _m(
        "FusedMultiHeadAttention",
        "no_in_proj_bias",
        "ignored in_proj_bias",
        ("F.linear(x, self.in_proj_weight, self.in_proj_bias)", "F.linear(x, self.in_proj_weight)"),
    ),
    _m(
        "FusedMultiHeadAttention",
        "softmax_by_hand",
        "softmax yourself",
        (
            "        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)\n",
            "        scores = q @ k.transpose(-2, -1) / math.sqrt(D)\n"
            "        if is_causal:\n"
            "            attn_mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()\n"
            "        if attn_mask is not None:\n"
            "            if attn_mask.dtype == torch.bool:\n"
            "                scores = scores.masked_fill(~attn_mask, float('-inf'))\n"
            "            else:\n"
            "                scores = scores + attn_mask\n"
            "        out = torch.softmax(scores, dim=-1) @ v\n",
        ),
    ),
    _m(
        "FusedMultiHeadAttention",
        "no_grad_in_forward",
        "torch.no_grad()",
        (
            "        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)\n",
            "        with torch.no_grad():  # inference only\n"
            "            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)\n",
        ),
    ),
    # attention_flops
    _m("attention_flops", "causal_not_halved", "did not halve", ("    if causal:\n        flops = flops / 2\n", "")),
    _m("attention_flops", "one_matmul", "TWO matmuls", ("flops = 4 * batch", "flops = 2 * batch")),
    _m("attention_flops", "backward_factor_2", "factor of 2", ('"bwd": 2.5, "fwd_bwd": 3.5', '"bwd": 2.0, "fwd_bwd": 3.0')),
    _m("attention_flops", "fwd_bwd_is_backward", "only the backward", ('"fwd_bwd": 3.5', '"fwd_bwd": 2.5')),
    _m(
        "attention_flops",
        "unknown_mode_is_forward",
        "should raise ValueError",
        ('    if mode not in factor:\n        raise ValueError(f"unknown mode {mode!r}")\n', ""),
        ("factor[mode]", "factor.get(mode, 1.0)"),
    ),
    _m("attention_flops", "L_squared", "L * L instead of L * S", ("* L * S *", "* L * L *")),
    # naive_attention_bytes
    _m("naive_attention_bytes", "one_matrix", "one L x S matrix", ("return 2 * batch", "return batch")),
    _m("naive_attention_bytes", "float32_always", "assumed 4 bytes", ("dtype.itemsize", "4")),
    _m("naive_attention_bytes", "bits_not_bytes", "bits per element", ("dtype.itemsize", "torch.finfo(dtype).bits")),
    _m("naive_attention_bytes", "no_batch", "forgot the batch size", ("2 * batch * heads", "2 * heads")),
    _m("naive_attention_bytes", "L_squared", "L * L instead of L * S", ("* L * S *", "* L * L *")),
    _m(
        "naive_attention_bytes",
        "float_bytes",
        "should return an int",
        ("dtype.itemsize", "torch.finfo(dtype).bits / 8"),
    ),
]

# The contract's rule, which both templates follow: synchronise whenever torch.cuda.is_available() (fn may be a
# closure over CUDA tensors, with no arguments). The mutant cuda_argument_only takes the CUDA path only for CUDA
# arguments and fails the checks' closure case.
BENCH_ANY_CUDA_TEMPLATE = BENCH_SYNC_TEMPLATE
