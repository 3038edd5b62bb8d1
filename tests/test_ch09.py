"""Chapter 9 beyond the generic tests: the solutions against float64 autograd over many shapes, gradcheck,
the memory of the tiled backward, the Triton kernels under the interpreter (and on a GPU when there is one),
split-KV decoding, the checks' own oracles and probes, and the numbers the chapter quotes.

The generic tests prove the rest: solutions pass and skeletons fail (test_exercises, test_remote), every
mutant template passes every check and every mutant loses points and is named (test_exercises), also
through the judge's stand-ins (test_remote)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

if not torch.cuda.is_available():  # before Triton is imported: run kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import namespace  # noqa: E402

from autograder.checks import ch09 as checks  # noqa: E402
from autograder.checks.common import CheckFailure  # noqa: E402
from autograder.course import find_chapter  # noqa: E402
from autograder.mutants.ch09 import MUTANTS  # noqa: E402
from solutions.ch09_flash_attention_backward import (  # noqa: E402
    FlashAttentionFunction,
    TritonFlashAttentionFunction,
    flash_attention,
    flash_attention_backward,
    flash_attention_backward_tiled,
    flash_decode,
    tiled_attention,
)

CHAPTER = find_chapter("09")
CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
needs_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (compiled Triton); this run has none")


def autograd_grads(q, k, v, g, causal: bool):
    """Float64 gradients of SDPA (math backend) with an explicit bottom-right causal mask."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    L, S = q.shape[-2], k.shape[-2]
    mask = (torch.arange(S, device=q.device) <= torch.arange(L, device=q.device)[:, None] + (S - L)) if causal else None
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.detach(), torch.autograd.grad(out, (q, k, v), g.double())


def randn(*shape, dtype=torch.float64, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# flash_attention_backward_tiled and FlashAttentionFunction


@pytest.mark.parametrize(
    ("lead", "L", "S", "d", "dv", "block"),
    [
        ((), 1, 1, 1, 1, 64),
        ((), 17, 17, 8, 8, 4),
        ((2,), 33, 65, 16, 5, 16),
        ((2, 3), 40, 23, 8, 8, 7),
        ((1, 2), 23, 40, 32, 32, 64),
        ((2,), 100, 37, 4, 12, 1),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_backward_float64_equals_autograd(lead, L, S, d, dv, block, causal):
    torch.manual_seed(L * 100 + S)
    q, k, v = randn(*lead, L, d, scale=2), randn(*lead, S, d, scale=2), randn(*lead, S, dv)
    g = randn(*lead, L, dv)
    out, lse = tiled_attention(q, k, v, causal=causal)
    ref_out, ref = autograd_grads(q, k, v, g, causal)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    got = flash_attention_backward_tiled(q, k, v, out, lse, g, causal=causal, block_size=block)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.float64 and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)


def test_tiled_backward_queries_that_see_nothing_get_zero_gradients():
    q, k, v, g = randn(2, 12, 8, scale=30), randn(2, 5, 8, scale=30), randn(2, 5, 3), randn(2, 12, 3)
    out, lse = tiled_attention(q, k, v, causal=True)
    dq, dk, dv = flash_attention_backward_tiled(q, k, v, out, lse, g, causal=True, block_size=2)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and (dq[:, :7] == 0).all()
    for a, b in zip((dq, dk, dv), autograd_grads(q, k, v, g, True)[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_tiled_backward_low_precision_keeps_dtypes(dtype, atol):
    torch.manual_seed(5)
    q, k, v, g = (randn(2, 2, n, 16, dtype=dtype) for n in (30, 45, 45, 30))
    out, lse = tiled_attention(q, k, v, causal=True)
    got = flash_attention_backward_tiled(q, k, v, out, lse, g, causal=True, block_size=16)
    for a, b in zip(got, autograd_grads(q, k, v, g, True)[1], strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=atol * max(1.0, b.abs().max().item()), rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_function_passes_gradcheck_and_saves_five_tensors(causal):
    torch.manual_seed(6)
    q, k, v = (randn(2, 2, n, 4).requires_grad_() for n in (6, 9, 9))
    assert torch.autograd.gradcheck(lambda q, k, v: FlashAttentionFunction.apply(q, k, v, causal), (q, k, v))
    out = FlashAttentionFunction.apply(q, k, v, causal)
    assert [tuple(t.shape) for t in out.grad_fn.saved_tensors] == [
        (2, 2, 6, 4),
        (2, 2, 9, 4),
        (2, 2, 9, 4),
        (2, 2, 6, 4),
        (2, 2, 6),
    ]


def test_tiled_backward_largest_tensor_is_a_tile():
    """The dispatch-mode recorder the checks use sees (L, block) tiles at most, never (L, S)."""
    q, k, v, g = (torch.randn(n, 16) for n in (300, 500, 500, 300))
    out, lse = tiled_attention(q, k, v)
    run = checks._observed(
        flash_attention_backward_tiled, (q, k, v, out, lse, g), {"block_size": 50}, guard=False, count_launches=False, label="t"
    )
    assert run["largest"] <= 300 * 50 < 300 * 500, run["largest_shape"]


def test_quoted_flop_ratio_is_five_products_over_two():
    """The chapter glues the ratio that FlopCounterMode measures; it is 10 L S D / 4 L S D exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, g = (torch.randn(2, n, 32) for n in (256, 320, 320, 256))
    with FlopCounterMode(display=False) as fwd:
        out, lse = tiled_attention(q, k, v, block_size=64)
    with FlopCounterMode(display=False) as bwd:
        flash_attention_backward_tiled(q, k, v, out, lse, g, block_size=64)
    assert fwd.get_total_flops() == 4 * 2 * 256 * 320 * 32
    assert bwd.get_total_flops() == 10 * 2 * 256 * 320 * 32


# ---------------------------------------------------------------------------------------------
# The Triton backward (interpreted on the CPU) and TritonFlashAttentionFunction


@pytest.mark.parametrize(
    ("lead", "L", "S", "d", "causal"),
    [
        ((1, 1), 16, 16, 16, False),
        ((2,), 37, 45, 16, True),
        ((1, 2), 45, 30, 24, True),
        ((3,), 20, 61, 8, False),
        ((1, 1), 70, 70, 40, True),
    ],
)
def test_triton_backward_float32_equals_autograd(lead, L, S, d, causal):
    torch.manual_seed(L + S)
    q, k, v = (randn(*lead, n, d, dtype=torch.float32, device=DEVICE) for n in (L, S, S))
    g = randn(*lead, L, d, dtype=torch.float32, device=DEVICE)
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    got = flash_attention_backward(q, k, v, out, lse, g, causal=causal)
    for a, b in zip(got, autograd_grads(q, k, v, g, causal)[1], strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=0)


def test_triton_backward_any_layout_and_one_compilation():
    """Transposed (non-contiguous) inputs give the same gradients; the kernels are built once and kept."""
    torch.manual_seed(8)
    base = [randn(1, n, 2, 16, dtype=torch.float32, device=DEVICE) for n in (20, 28, 28, 20)]
    q, k, v, g = (t.transpose(1, 2) for t in base)  # (1, 2, n, 16) views with permuted strides
    out, lse = flash_attention(q, k, v, return_lse=True)
    first = flash_attention_backward(q, k, v, out, lse, g)
    kernels = flash_attention_backward.kernels
    second = flash_attention_backward(*(t.contiguous() for t in (q, k, v, out)), lse, g.contiguous())
    assert flash_attention_backward.kernels is kernels
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_triton_function_matches_the_tiled_function():
    torch.manual_seed(9)
    leaves = [randn(1, 2, n, 16, dtype=torch.float32, device=DEVICE).requires_grad_() for n in (40, 56, 56)]
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    TritonFlashAttentionFunction.apply(*leaves, True).square().sum().backward()
    FlashAttentionFunction.apply(*copies, True).square().sum().backward()
    for a, b in zip(leaves, copies, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=0)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_backward_on_gpu(dtype, causal):
    torch.manual_seed(10)
    q, k, v, g = (randn(2, 4, n, 64, dtype=dtype, device="cuda") for n in (500, 700, 700, 500))
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    got = flash_attention_backward(q, k, v, out, lse, g, causal=causal)
    for a, b in zip(got, autograd_grads(q, k, v, g, causal)[1], strict=True):
        assert a.dtype == dtype
        err = (a.double() - b).abs().max().item() / max(1.0, b.abs().max().item())
        assert err < (2e-2 if dtype == torch.bfloat16 else 4e-3), err


# ---------------------------------------------------------------------------------------------
# flash_decode


@pytest.mark.parametrize(
    ("B", "H", "H_kv", "S", "d", "splits"),
    [(1, 1, 1, 1, 4, 1), (2, 4, 2, 10, 8, 3), (1, 6, 3, 5, 4, 8), (2, 8, 1, 33, 16, 4), (1, 4, 4, 64, 8, 64)],
)
def test_flash_decode_equals_attention(B, H, H_kv, S, d, splits):
    torch.manual_seed(S * 10 + splits)
    q, k, v = randn(B, H, 1, d, scale=5), randn(B, H_kv, S, d, scale=5), randn(B, H_kv, S, d)
    group = H // H_kv
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
    torch.testing.assert_close(flash_decode(q, k, v, splits), ref, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# The checks: their oracles, their probes, and the mutants' diagnoses


@pytest.mark.parametrize("causal", [False, True])
def test_check_oracles_agree(causal):
    """The NumPy backward the fingerprints start from equals autograd; the oracle's lse is the logsumexp."""
    rng = torch.Generator().manual_seed(11)
    q, k, v, g = (torch.randn(2, n, 4, generator=rng, dtype=torch.float64).numpy() for n in (7, 5, 5, 7))
    out, lse, dq, dk, dv = checks._oracle(q, k, v, g, causal)
    ref_out, ref = autograd_grads(*(torch.from_numpy(a) for a in (q, k, v, g)), causal)
    assert abs(out - ref_out.numpy()).max() < 1e-12
    for a, b in zip(checks._grads_np(q, k, v, out, lse, g, causal), (dq, dk, dv), strict=True):
        assert abs(a - b).max() < 1e-12
    for a, b in zip((dq, dk, dv), ref, strict=True):
        assert abs(a - b.numpy()).max() < 1e-12


def test_gradcheck_in_the_checks_rejects_a_backward_off_by_a_little():
    """The judge's own gradcheck fails a backward whose gradients are 1e-4 too large (no fingerprint needed)."""

    def slightly_off(q, k, v, out, lse, grad_out, causal=False, block_size=64):
        dq, dk, dv = flash_attention_backward_tiled(q, k, v, out, lse, grad_out, causal=causal, block_size=block_size)
        return dq * (1 + 1e-4), dk, dv

    import numpy as np

    with pytest.raises(CheckFailure, match="numerical derivative"):
        checks._tiled_gradcheck(slightly_off, np.random.default_rng(0), False)
    checks._tiled_gradcheck(flash_attention_backward_tiled, np.random.default_rng(0), True)


def test_saved_tensor_probe_reports_what_the_node_saved():
    q, k, v, g = (torch.randn(1, n, 4, dtype=torch.float64) for n in (5, 6, 6, 5))
    run = checks.observe_function(FlashAttentionFunction, False, False, "probe", q, k, v, g)
    assert run["error"] is None and run["ctx_tensors"] == [] and run["launches"] == 0
    assert [tuple(t.shape) for t in run["saved"]] == [(1, 5, 4), (1, 6, 4), (1, 6, 4), (1, 5, 4), (1, 5)]
    assert [tuple(t.shape) for t in run["grads"]] == [(1, 5, 4), (1, 6, 4), (1, 6, 4)]


def test_every_diagnosis_is_a_phrase_of_the_checks():
    """Each mutant's diagnosis quotes one of the checks' named messages (or PyTorch's own autograd error)."""
    messages = [value.lower() for name, value in vars(checks).items() if name.isupper() and isinstance(value, str)]
    for m in MUTANTS:
        if m.diagnosis == "incorrect number of gradients":  # autograd's message for a missing None
            continue
        assert any(m.diagnosis.lower() in text for text in messages), m.id


def test_strided_inputs_of_the_checks_are_views_a_kernel_cannot_index_as_contiguous():
    """The hidden Triton case's q, k, v, grad_out: transposed views whose (BH, L, D) reshape is still not contiguous
    (so a kernel that skips .contiguous() reads the wrong rows), holding exactly the values asked for."""
    import numpy as np

    for lead in ((1, 2), (3,)):
        a = np.random.default_rng(0).normal(size=lead + (20, 16))
        t = checks._strided(a, torch.float32, "cpu")
        assert tuple(t.shape) == a.shape and not t.is_contiguous()
        assert not t.reshape(-1, 20, 16).is_contiguous()
        assert torch.equal(t, torch.from_numpy(a).float())


def test_function_probe_reports_the_largest_tensors_of_forward_and_backward():
    q, k, v, g = (torch.randn(1, 2, n, 4, dtype=torch.float64) for n in (10, 150, 150, 10))
    run = checks.observe_function(FlashAttentionFunction, False, False, "probe", q, k, v, g)
    assert run["error"] is None
    for key in ("forward_largest", "backward_largest"):
        n, shape = run[key]
        assert 0 < n < 2 * 10 * 150, (key, n, shape)  # tiles of 64 keys, never the (1, 2, 10, 150) scores
    assert not any("scaled_dot_product" in op for op in run["ops"])


def test_catalogue_covers_the_classic_mistakes():
    names = {m.name for m in MUTANTS}
    for expected in ("forgot_delta", "p_without_lse", "top_left_causal", "dk_without_scale", "dq_overwritten",
                     "dq_stored_not_added", "combine_without_max", "head_map_modulo", "saves_the_weights",
                     "computes_in_float16", "block_size_hardcoded", "backward_by_sdpa_autograd",
                     "grad_out_assumed_contiguous", "logsumexp_from_pytorch_scores"):  # fmt: skip
        assert expected in names


def test_visible_checks_are_deterministic_and_quick():
    import time

    ns = namespace(CHAPTER)
    for ex in CHAPTER.exercises:
        start = time.perf_counter()
        getattr(checks, f"visible_{ex.name}")(ns[ex.name])
        assert time.perf_counter() - start < 15, ex.name


TRAINING_UNDER_A_CAP = """
import resource, sys
import torch
sys.path.insert(0, {root!r})
from solutions.ch09_flash_attention_backward import FlashAttentionFunction
torch.set_num_threads(1)
N, D = 8192, 16  # one float32 N x N matrix: 256 MiB
q, k, v = (torch.randn(N, D, requires_grad=True) for _ in range(3))
FlashAttentionFunction.apply(q[:64], k[:64], v[:64], True).sum().backward()  # autograd's threads start before the cap
q.grad = k.grad = v.grad = None
mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + 128 * 2**20,) * 2)  # 128 MiB more than PyTorch maps already
FlashAttentionFunction.apply(q, k, v, True).sum().backward()
print("flash", all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v)))
for t in (q, k, v):
    t.grad = None
try:
    (torch.softmax(q @ k.T / 4.0, dim=-1) @ v).sum().backward()
    print("autograd ran")
except RuntimeError as exc:
    print("autograd failed:", str(exc).splitlines()[0][:200])
"""


@pytest.mark.slow
def test_training_step_runs_where_the_weights_do_not_fit():
    """Capped at 128 MiB above PyTorch's own mappings, a causal forward + backward at N = 8192 works through
    FlashAttentionFunction, and plain attention under autograd (one 256 MiB N x N matrix) runs out of memory."""
    import subprocess
    import sys

    from autograder.course import ROOT

    script = TRAINING_UNDER_A_CAP.format(root=str(ROOT))
    # glibc's malloc otherwise keeps freed tiles in a heap that grows by chance (its mmap threshold adapts): with a
    # fixed threshold every tile is mapped and unmapped, so the address space measures what is alive
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "flash True", lines
    assert lines[1].startswith("autograd failed:") and "alloc" in lines[1], lines[1]


AOT_COMPILE_BACKWARD = """
import ast, os, sys, textwrap, warnings
os.environ.pop("TRITON_INTERPRET", None)     # compile for a GPU, although this machine may have none
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# The kernels are nested in flash_attention_backward (built on its first call): read them from the module's source.
source = open({path!r}).read()
names = ("preprocess", "dkdv_kernel", "dq_kernel")
nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name in names]
assert sorted(n.name for n in nodes) == sorted(names), [n.name for n in nodes]
lines = source.splitlines()
text = "\\n\\n".join(textwrap.dedent("\\n".join(lines[min(d.lineno for d in n.decorator_list) - 1 : n.end_lineno]))
                     for n in nodes)
with open({module!r}, "w") as f:
    f.write("import triton\\nimport triton.language as tl\\n\\n\\n" + text + "\\n")
sys.path.insert(0, os.path.dirname({module!r}))
import backward_kernels as bk

FLOAT32 = ("LSE", "Delta", "scale")
for dtype, d, causal, (block_m, block_n, warps, stages) in (
    ("bf16", 128, True, (64, 64, 8, 2)), ("fp16", 64, False, (64, 64, 4, 2)), ("fp32", 128, True, (32, 32, 8, 2))
):
    for fn in (bk.preprocess, bk.dkdv_kernel, bk.dq_kernel):
        arg_names = fn.arg_names
        sig = {{n: ("fp32" if n == "scale" else "*fp32" if n in FLOAT32 else "i32" if n in ("L", "S") else "*" + dtype)
               for n in arg_names}}
        const = {{"D": d, "CAUSAL": causal, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": d,
                  "FP32_DOT": dtype == "fp32"}}
        const = {{n: v for n, v in const.items() if n in arg_names}}
        for n in const:
            sig[n] = "constexpr"
        aligned = {{(arg_names.index(n),): [["tt.divisibility", 16]] for n in arg_names if sig[n].startswith("*")}}
        kernel = triton.compile(ASTSource(fn, sig, const, aligned), target=GPUTarget("cuda", 90, 32),
                                options={{"num_warps": warps, "num_stages": stages}})
        print(fn.__name__, dtype, d, causal, kernel.metadata.shared, len(kernel.asm["cubin"]))
"""


@pytest.mark.slow
def test_backward_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """Triton compiles the three backward kernels ahead of time for sm_90 (H100/H200) with its bundled ptxas, at the
    GPU tile sizes flash_attention_backward uses, for bfloat16, float16 and float32, causal and not: the GPU path (the
    dtype casts before tl.dot included, which the interpreter does not check) is well-formed and fits in shared memory."""
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton wheel has no bundled ptxas (the sm_90 compile toolchain)")
    script = AOT_COMPILE_BACKWARD.format(path=str(CHAPTER.solutions_module), module=str(tmp_path / "backward_kernels.py"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    assert len(rows) == 9, result.stdout
    for name, dtype, d, causal, shared, cubin in rows:
        assert int(shared) <= 227 * 1024, f"{name} {dtype} D={d} causal={causal}: {shared} bytes of shared memory"
        assert int(cubin) > 0
