"""Chapter 8 beyond the generic tests: the solutions against float64 SDPA over many shapes, the
memory proof, the Triton kernel under the interpreter (and on a GPU when there is one), the
checks' oracles and mutant templates, and the numbers the chapter quotes."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before Triton is imported: run kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


from autograder.checks import ch08 as checks  # noqa: E402
from autograder.course import ROOT, find_chapter  # noqa: E402
from autograder.notebook_format import read  # noqa: E402
from solutions.ch08_flash_attention import flash_attention, tiled_attention  # noqa: E402

CHAPTER = find_chapter("08")
CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
needs_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (compiled Triton); this run has none")


def bottom_right(L: int, S: int, device="cpu") -> torch.Tensor:
    """Chapter 2's causal_mask: query i sees key j iff j <= i + (S - L)."""
    return torch.arange(S, device=device) <= torch.arange(L, device=device)[:, None] + (S - L)


def reference(q, k, v, causal: bool) -> torch.Tensor:
    """Float64 SDPA with an explicit bottom-right mask (zeros for a query that sees no key)."""
    mask = bottom_right(q.shape[-2], k.shape[-2], q.device) if causal else None
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)


def reference_lse(q, k, causal: bool) -> torch.Tensor:
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(~bottom_right(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return torch.logsumexp(scores, dim=-1)


# ---------------------------------------------------------------------------------------------
# tiled_attention


@pytest.mark.parametrize(
    ("lead", "L", "S", "d", "dv", "block"),
    [
        ((), 1, 1, 1, 1, 64),
        ((), 17, 17, 8, 8, 4),
        ((2,), 33, 65, 16, 5, 16),
        ((2, 3), 40, 23, 8, 8, 7),
        ((1, 2), 23, 40, 32, 32, 64),
        ((3,), 64, 64, 64, 64, 64),
        ((2,), 100, 37, 4, 12, 1),
        ((1, 1), 9, 130, 16, 16, 128),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_float64_equals_sdpa_and_logsumexp(lead, L, S, d, dv, block, causal):
    torch.manual_seed(L * 1000 + S)
    q, k = torch.randn(*lead, L, d, dtype=torch.float64) * 2, torch.randn(*lead, S, d, dtype=torch.float64) * 2
    v = torch.randn(*lead, S, dv, dtype=torch.float64)
    out, lse = tiled_attention(q, k, v, block_size=block, causal=causal)
    assert out.shape == (*lead, L, dv) and out.dtype == torch.float64
    assert lse.shape == (*lead, L) and lse.dtype == torch.float64
    torch.testing.assert_close(out, reference(q, k, v, causal), atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, reference_lse(q, k, causal), atol=1e-12, rtol=1e-13)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_tiled_low_precision_keeps_dtype_and_float32_logsumexp(dtype, atol):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, n, 16).to(dtype) for n in (30, 45, 45))
    out, lse = tiled_attention(q, k, v, block_size=16, causal=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, k, v, True), atol=atol, rtol=0)
    torch.testing.assert_close(lse.double(), reference_lse(q, k, True), atol=1e-5, rtol=1e-6)


def test_tiled_huge_scores_and_queries_that_see_nothing():
    """Scores near 1e4 do not overflow; with L > S causal, the first L - S queries see no key."""
    q = torch.randn(1, 12, 8, dtype=torch.float64) * 100
    k = torch.randn(1, 5, 8, dtype=torch.float64) * 100
    v = torch.randn(1, 5, 3, dtype=torch.float64)
    out, lse = tiled_attention(q, k, v, block_size=2, causal=True)
    assert torch.isfinite(out).all()
    assert (out[:, :7] == 0).all() and torch.isneginf(lse[:, :7]).all()
    torch.testing.assert_close(out, reference(q, k, v, True), atol=1e-10, rtol=0)
    torch.testing.assert_close(lse[:, 7:], reference_lse(q, k, True)[:, 7:], atol=1e-9, rtol=0)


MEMORY_PROOF = """
import resource, sys
import torch
sys.path.insert(0, {root!r})
from solutions.ch08_flash_attention import tiled_attention
torch.set_num_threads(1)
N, D = 16384, 16                            # the float32 N x N score matrix alone: 1 GiB
q, k, v = (torch.randn(N, D) for _ in range(3))
size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
limit = size + 512 * 2**20                  # what PyTorch already maps, plus 512 MiB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out, lse = tiled_attention(q, k, v)         # the default block of 64 keys
assert out.shape == (N, D) and torch.isfinite(out).all() and torch.isfinite(lse).all()
check = torch.softmax(q[:5] @ k.T / 4.0, dim=-1) @ v
assert (out[:5] - check).abs().max() < 1e-5
print("tiled ok")
try:
    torch.softmax(q @ k.T / 4.0, dim=-1) @ v
    print("naive ran")
except RuntimeError as exc:
    print("naive failed:", str(exc).splitlines()[0][:200])
"""


def test_tiled_runs_where_the_score_matrix_does_not_fit():
    """In a process capped at 512 MiB above PyTorch's own mappings, tiled attention at N = 16384
    (a 1 GiB float32 score matrix) works and naive attention runs out of memory."""
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROOF.format(root=str(ROOT))], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "tiled ok"
    assert lines[1].startswith("naive failed:") and "alloc" in lines[1], lines[1]


def test_tiled_largest_tensor_is_a_tile():
    rec = checks._Recorder()
    q, k, v = (torch.randn(256, 8) for _ in range(3))
    with rec:
        tiled_attention(q, k, v, block_size=32, causal=True)
    assert rec.largest == 256 * 32


# ---------------------------------------------------------------------------------------------
# flash_attention under the interpreter (or compiled, on a GPU)

KERNEL_SHAPES = [
    (1, 1, 16, 16, 16),
    (1, 2, 37, 37, 16),
    (2, 1, 45, 29, 32),
    (1, 1, 23, 50, 64),
    (1, 1, 33, 33, 128),
    (2, 2, 1, 20, 16),
    (1, 1, 20, 1, 32),
]


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_flash_attention_equals_float64_sdpa(shape, causal, dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter computes bfloat16 tl.dot wrongly (Triton 3.x); bfloat16 is tested on a GPU")
    b, h, L, S, d = shape
    torch.manual_seed(L * 100 + S)
    q, k, v = (torch.randn(b, h, n, d, device=DEVICE).to(dtype) for n in (L, S, S))
    out = flash_attention(q, k, v, causal=causal)
    assert out.shape == (b, h, L, d) and out.dtype == dtype and out.device == q.device
    ref = reference(q, k, v, causal)
    sdpa_err = (
        (F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right(L, S, DEVICE) if causal else None).double() - ref)
        .abs()
        .max()
    )
    floor = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert (out.double() - ref).abs().max() <= max(4 * sdpa_err.item(), floor)


@pytest.mark.parametrize(
    ("lead", "L", "S", "causal"),
    [((3,), 20, 45, False), ((2,), 40, 23, True), ((1, 2), 37, 50, True), ((), 33, 33, True)],
)
def test_flash_attention_logsumexp_3d_and_4d(lead, L, S, causal):
    """return_lse: float32 natural-log logsumexp of the visible scaled scores, shape (..., L), -inf where no key is seen."""
    torch.manual_seed(L + S)
    q, k, v = (torch.randn(*lead, n, 16, device=DEVICE) * 2 for n in (L, S, S))
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (*lead, L) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, k, v, causal), atol=1e-5, rtol=0)  # scores of size ~4
    expected = reference_lse(q, k, causal)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected))
    torch.testing.assert_close(lse.double(), expected, atol=2e-5, rtol=0)
    assert torch.equal(flash_attention(q, k, v, causal=causal), out)  # the same kernel without return_lse


def test_flash_attention_any_layout_and_one_compilation():
    """Strided inputs (a (B, L, H, D) buffer seen as (B, H, L, D)) work; the kernel is built once."""
    torch.manual_seed(5)
    buffers = [torch.randn(2, n, 3, 16, device=DEVICE) for n in (21, 34, 34)]
    q, k, v = (t.transpose(1, 2) for t in buffers)
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), reference(q, k, v, True), atol=2e-6, rtol=0)
    kernel = flash_attention.kernel
    flash_attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert flash_attention.kernel is kernel


def test_flash_attention_queries_that_see_nothing_get_zeros():
    q, k, v = (torch.randn(1, 1, n, 16, device=DEVICE) for n in (40, 10, 10))
    out = flash_attention(q, k, v, causal=True)
    assert torch.isfinite(out).all() and (out[0, 0, :30] == 0).all()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("L", "S"), [(1024, 1024), (1000, 1000), (333, 1200), (1200, 333)])
def test_flash_attention_on_gpu(dtype, d, causal, L, S):
    torch.manual_seed(d + L)
    q, k, v = (torch.randn(2, 4, n, d, device="cuda", dtype=dtype) for n in (L, S, S))
    out = flash_attention(q, k, v, causal=causal)
    ref = reference(q, k, v, causal)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right(L, S, "cuda") if causal else None)
    assert (out.double() - ref).abs().max() <= max(4 * (sdpa.double() - ref).abs().max().item(), 2e-2)


AOT_COMPILE = """
import ast, os, sys, textwrap, warnings
os.environ.pop("TRITON_INTERPRET", None)     # compile for a GPU, although this machine may have none
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# The kernel and its GPU configurations are nested in flash_attention (built on its first call): read both from
# the module's source, so every configuration that triton.autotune may pick on an H100/H200 is compiled here.
source = open({path!r}).read()
tree = ast.parse(source)
node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "flash_forward")
table = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "HOPPER_CONFIGS")
configs = ast.literal_eval(table.value)
start = min(d.lineno for d in node.decorator_list)
text = textwrap.dedent("\\n".join(source.splitlines()[start - 1 : node.end_lineno]))
with open({module!r}, "w") as f:
    f.write("import triton\\nimport triton.language as tl\\n\\n\\n" + text + "\\n")
sys.path.insert(0, os.path.dirname({module!r}))
from flash_kernel import flash_forward as fn

names = fn.arg_names
pointers = ("Q", "K", "V", "Out", "Lse")
aligned_strides = [n for n in names if n.startswith("stride_") and not n.endswith("d")]
# every configuration, in both of its dtype's paths through the loops (causal: diagonal steps; not: the tail)
cases = [(dt, d, causal, cfg) for cfg in configs["16-bit"] for dt, d, causal in (("bf16", 128, True), ("fp16", 64, False))]
cases += [("fp32", d, causal, cfg) for cfg in configs["float32"] for d, causal in ((128, True), (64, False))]
for dtype, d, causal, (block_m, block_n, warps, stages) in cases:
    sig = {{n: ("*fp32" if n == "Lse" else "*" + dtype) if n in pointers else "fp32" if n == "qk_scale" else "i32"
           for n in names}}
    const = {{"D": d, "CAUSAL": causal, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": d, "FP32_DOT": dtype == "fp32"}}
    for n in ("stride_qd", "stride_kd", "stride_vd", "stride_od"):  # contiguous inputs: Triton specialises 1
        const[n] = 1
    for n in const:
        sig[n] = "constexpr"
    aligned = {{(names.index(n),): [["tt.divisibility", 16]] for n in names if n in pointers or n in aligned_strides}}
    kernel = triton.compile(ASTSource(fn, sig, const, aligned), target=GPUTarget("cuda", 90, 32),
                            options={{"num_warps": warps, "num_stages": stages}})
    pipelined = kernel.asm["ttgir"].count("async_copy_global_to_local")
    print(dtype, d, causal, block_m, block_n, warps, stages, kernel.metadata.shared, pipelined, len(kernel.asm["cubin"]))
print("configs", len(configs["16-bit"]), len(configs["float32"]))
"""


@pytest.mark.slow
def test_kernel_compiles_for_hopper_without_a_gpu(tmp_path):
    """Triton compiles the kernel ahead of time for sm_90 (H100/H200) down to a cubin with its bundled ptxas, in every
    configuration that triton.autotune may choose on such a GPU, for 16-bit and float32 inputs, causal and not: the GPU
    code path is at least well-formed, fits in shared memory, and its loads are software-pipelined."""
    ptxas = __import__("pathlib").Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton wheel has no bundled ptxas (the sm_90 compile toolchain)")
    script = AOT_COMPILE.format(
        path=str(ROOT / "solutions" / "ch08_flash_attention.py"), module=str(tmp_path / "flash_kernel.py")
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    *rows, last = [line.split() for line in result.stdout.splitlines()]
    halves, fp32s = int(last[1]), int(last[2])
    assert halves >= 2 and fp32s >= 1, "autotune needs a choice of configurations"
    assert len(rows) == 2 * (halves + fp32s)
    for dtype, d, causal, *config, shared, pipelined, cubin in rows:
        where = f"{dtype} D={d} causal={causal} (BLOCK_M, BLOCK_N, warps, stages) = {config}"
        assert int(shared) <= 227 * 1024, f"{where}: {shared} bytes of shared memory"
        assert int(pipelined) > 0, f"{where}: the key/value loads are not pipelined"
        assert int(cubin) > 0


# ---------------------------------------------------------------------------------------------
# The checks: oracles against PyTorch, detection of cheating, templates of the mutants


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("L", "S", "block"), [(7, 7, 3), (12, 5, 2), (5, 12, 16)])
def test_check_oracle_online_equals_sdpa(causal, L, S, block):
    torch.manual_seed(L + S)
    q, k, v = (torch.randn(2, n, 4, dtype=torch.float64) for n in (L, S, S))
    out, lse = checks._online(q.numpy(), k.numpy(), v.numpy(), causal, block)
    torch.testing.assert_close(torch.from_numpy(out), reference(q, k, v, causal), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.from_numpy(lse), reference_lse(q, k, causal), atol=1e-12, rtol=0)


def test_flash_check_rejects_a_function_that_launches_no_kernel():
    def numpy_attention(q, k, v, causal=False):  # right numbers, no kernel and no torch maths
        qn, kn, vn = (t.double().numpy() for t in (q, k, v))
        out, _ = checks._online(qn, kn, vn, causal, 16)
        return torch.from_numpy(out).to(q.dtype)

    with pytest.raises(AssertionError, match="did not launch a Triton kernel"):
        checks.visible_flash_attention(numpy_attention)


def test_flash_check_names_only_attention_arithmetic():
    assert checks._is_torch_math("aten.bmm.default") and checks._is_torch_math("aten._softmax.default")
    assert checks._is_torch_math("aten._scaled_dot_product_flash_attention_for_cpu.default")
    for harmless in ("aten.expand.default", "aten.empty_like.default", "aten.copy_.default", "aten.set_.source_Storage"):
        assert not checks._is_torch_math(harmless)


# ---------------------------------------------------------------------------------------------
# The numbers the chapter quotes, computed by the notebook's own functions


def _notebook_function(name: str):
    """A function defined in a code cell of the chapter, executed with the setup cell's globals."""
    for cell in read(CHAPTER.notebook).cells:
        if cell.cell_type == "code" and f"def {name}(" in cell.source:
            tree = ast.parse(cell.source)
            node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
            ns = {"math": math, "np": __import__("numpy")}
            exec(compile(ast.Module(body=[node], type_ignores=[]), "<notebook>", "exec"), ns)
            return ns[name]
    raise AssertionError(f"no cell of {CHAPTER.notebook.name} defines {name}")


def test_quoted_memory_numbers():
    one_head_bytes = _notebook_function("one_head_bytes")
    small, big = one_head_bytes(16384)
    assert big == 2**30  # "At N = 16384 one head's score matrix takes 1 GiB"
    assert big / small == 64  # "sixty-four times the inputs and the output together"


def test_quoted_tile_counts_and_the_plan_against_brute_force():
    plan_of = _notebook_function("causal_tile_plan")
    plan = plan_of(1024, 1024, 128, 64)
    assert plan.size == 128 and (plan > 0).sum() == 72 and (plan == 2).sum() == 16  # "Of the 128 tiles, 72 run ..."
    for L, S, bm, bn in [(1024, 1024, 128, 64), (100, 37, 16, 16), (37, 100, 16, 32), (64, 64, 16, 16), (1, 50, 16, 16)]:
        visible = bottom_right(L, S)
        plan = plan_of(L, S, bm, bn)
        for i in range(plan.shape[0]):
            for j in range(plan.shape[1]):
                tile = visible[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn]
                full = tile.all() and tile.shape[1] == bn
                if plan[i, j] == 0:
                    assert not tile.any(), (L, S, i, j)  # a skipped tile has no visible key
                elif plan[i, j] == 1:
                    assert full, (L, S, i, j)  # an unmasked tile is entirely visible and complete
                # plan 2 (masked) is always safe


# ---------------------------------------------------------------------------------------------
# triton.jit inside a notebook cell, executed by nbclient as the book does

NOTEBOOK_CELLS = [
    'import os, torch\nif not torch.cuda.is_available():\n    os.environ.setdefault("TRITON_INTERPRET", "1")\n'
    "import triton\nimport triton.language as tl",
    textwrap.dedent(
        """
        def add_one(x):
            kernel = getattr(add_one, "kernel", None)
            if kernel is None:

                @triton.jit
                def add_one_kernel(X, Y, n, BLOCK: tl.constexpr):
                    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
                    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) + 1.0, mask=offs < n)

                kernel = add_one.kernel = add_one_kernel
            y = torch.empty_like(x)
            kernel[(triton.cdiv(x.numel(), 16),)](x, y, x.numel(), BLOCK=16)
            return y
        """
    ),
    'x = torch.arange(40.0, device="cuda" if torch.cuda.is_available() else "cpu")\n'
    "k1 = (add_one(x), add_one.kernel)[1]\nassert (add_one(x) == x + 1).all() and add_one.kernel is k1\nprint('ok')",
]


@pytest.mark.slow
def test_triton_jit_nested_in_a_notebook_cell():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in NOTEBOOK_CELLS])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    assert nb.cells[-1].outputs[0]["text"].strip() == "ok"


@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
def test_kernel_with_gpu_sized_tiles_passes(hidden):
    """The template with 128 x 64 tiles (what a kernel sized for a GPU uses) passes: the big-tile mutants fail for
    their own mistake only, which the hidden case with L = 264 (three query tiles of 128) exposes."""
    from conftest import namespace

    from autograder.mutants.ch08 import TEMPLATES_BIG_TILES

    ns = namespace(find_chapter("08"), replace=TEMPLATES_BIG_TILES)
    check = checks.hidden_flash_attention if hidden else checks.visible_flash_attention
    check(ns["flash_attention"])
