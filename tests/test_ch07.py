"""Chapter 7 beyond the generic tests: the solutions against PyTorch, the checks' oracles and simulated
device, the numbers the chapter quotes, the plotting of recorded GPU runs, and GPU tests that skip
cleanly without CUDA."""

from __future__ import annotations

import json
import math
import time
import timeit

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import namespace

from autograder.checks import ch07 as checks
from autograder.checks import torch_refs
from autograder.checks.runner import run_check
from autograder.course import ROOT, find_chapter
from autograder.mutants import ch07 as mutants
from autograder.notebook_format import read
from solutions.ch07_multi_head_attention_on_gpu import (
    FusedMultiHeadAttention,
    attention_flops,
    benchmark,
    naive_attention_bytes,
)

matplotlib.use("Agg")
CHAPTER = find_chapter("07")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


def _reference(embed_dim: int, num_heads: int, bias: bool = True, dtype=torch.float32) -> nn.MultiheadAttention:
    torch.manual_seed(embed_dim * 10 + num_heads)
    mha = nn.MultiheadAttention(embed_dim, num_heads, bias=bias, batch_first=True).eval()
    if bias:  # PyTorch initialises the biases to zero: make them count
        with torch.no_grad():
            mha.in_proj_bias.normal_(0, 0.5)
            mha.out_proj.bias.normal_(0, 0.5)
    return mha.to(dtype)


def _fused_from(mha: nn.MultiheadAttention, bias: bool = True) -> FusedMultiHeadAttention:
    fused = FusedMultiHeadAttention(mha.embed_dim, mha.num_heads, bias=bias).eval()
    fused.load_state_dict(mha.state_dict())  # strict: same names and shapes
    return fused.to(mha.in_proj_weight.dtype)


# ---------------------------------------------------------------------------------------------
# FusedMultiHeadAttention against nn.MultiheadAttention


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 3e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_equals_nn_multihead_attention(dtype, atol, bias):
    mha = _reference(32, 4, bias, dtype)
    fused = _fused_from(mha, bias)
    x = torch.randn(3, 11, 32, dtype=dtype)
    future = torch.ones(11, 11, dtype=torch.bool).triu(1)  # nn.MultiheadAttention: True = blocked
    blocked = torch.rand(11, 11) < 0.4
    blocked[:, 0] = False  # every query keeps a key
    additive = torch.randn(11, 11, dtype=dtype)
    with torch.no_grad():
        want = mha(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(fused(x), want, atol=atol, rtol=0)
        want = mha(x, x, x, attn_mask=future, need_weights=False)[0]
        torch.testing.assert_close(fused(x, is_causal=True), want, atol=atol, rtol=0)
        torch.testing.assert_close(fused(x, attn_mask=~future), want, atol=atol, rtol=0)
        want = mha(x, x, x, attn_mask=blocked, need_weights=False)[0]
        torch.testing.assert_close(fused(x, attn_mask=~blocked), want, atol=atol, rtol=0)  # SDPA: True = may attend
        want = mha(x, x, x, attn_mask=additive, need_weights=False)[0]
        torch.testing.assert_close(fused(x, attn_mask=additive), want, atol=atol, rtol=0)  # float masks agree


def test_fused_padding_mask_and_state_dict_round_trip():
    mha = _reference(24, 3)
    fused = _fused_from(mha)
    assert set(fused.state_dict()) == set(mha.state_dict())
    x = torch.randn(2, 7, 24)
    is_token = torch.arange(7)[None, :] < torch.tensor([7, 4])[:, None]
    with torch.no_grad():
        want = mha(x, x, x, key_padding_mask=~is_token, need_weights=False)[0]
        torch.testing.assert_close(fused(x, attn_mask=is_token[:, None, None, :]), want, atol=3e-6, rtol=0)
    back = nn.MultiheadAttention(24, 3, batch_first=True)
    back.load_state_dict(fused.state_dict())  # and the other way round


def test_fused_does_one_qkv_matmul_and_one_sdpa():
    fused = FusedMultiHeadAttention(16, 4).eval()
    recorder = checks._OpRecorder()
    with torch.no_grad(), recorder:
        fused(torch.randn(2, 5, 16), is_causal=True)
    assert [n for n in recorder.names if n in checks.PROJ_OPS] == ["linear", "linear"]
    assert recorder.names.count("scaled_dot_product_attention") == 1
    assert not set(recorder.names) & checks.SOFTMAX_OPS


def test_fused_rejects_uneven_heads():
    with pytest.raises(ValueError):
        FusedMultiHeadAttention(10, 4)


def test_fused_oracle_equals_nn_multihead_attention():
    """The checks' float64 oracle (SDPA's mask convention) agrees with nn.MultiheadAttention (the opposite one)."""
    rng = np.random.default_rng(0)
    for e, h, bias in [(12, 3, True), (8, 8, False), (16, 1, True)]:
        p = checks._mha_params(rng, e, bias)
        x = rng.normal(size=(2, 6, e))
        mha = torch_refs.torch_mha(e, h, bias, p, torch.float64)
        xt = torch.from_numpy(x)
        allowed = checks._mask_np(rng, (6, 6))
        with torch.no_grad():
            plain = mha(xt, xt, xt, need_weights=False)[0].numpy()
            masked = mha(xt, xt, xt, attn_mask=torch.from_numpy(~allowed), need_weights=False)[0].numpy()
            causal = mha(xt, xt, xt, attn_mask=torch.ones(6, 6, dtype=torch.bool).triu(1), need_weights=False)[0].numpy()
        np.testing.assert_allclose(checks._fused_oracle(p, x, h), plain, atol=1e-12)
        np.testing.assert_allclose(checks._fused_oracle(p, x, h, mask=allowed), masked, atol=1e-12)
        np.testing.assert_allclose(checks._fused_oracle(p, x, h, causal=True), causal, atol=1e-12)
        inverted = checks._fused_oracle(p, x, h, mask=allowed, variant="inverted_mask")
        assert np.abs(inverted - masked).max() > 1e-3  # the fingerprint really differs


# ---------------------------------------------------------------------------------------------
# benchmark: the real one on CPU, the simulated device of the checks


def test_benchmark_times_a_known_cpu_workload():
    result = benchmark(time.sleep, 0.003, warmup=1, repeats=5)
    assert set(result) == {"median_ms", "iqr_ms"}
    assert all(type(v) is float for v in result.values())
    assert 3.0 <= result["median_ms"] < 60.0 and result["iqr_ms"] >= 0.0


def test_benchmark_calls_warmup_plus_repeats():
    calls = []
    benchmark(lambda: calls.append(1), warmup=4, repeats=9)
    assert len(calls) == 13


@pytest.mark.parametrize("template", [mutants.BENCH_SYNC_TEMPLATE, mutants.BENCH_EVENTS_TEMPLATE], ids=["sync", "events"])
@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
def test_both_ways_of_timing_cuda_pass(template, hidden):
    """synchronize + perf_counter and CUDA events are both correct."""
    ex = next(e for e in CHAPTER.exercises if e.name == "benchmark")
    outcome = run_check(ex, namespace(CHAPTER, replace={"benchmark": template}), hidden=hidden)
    assert outcome.passed, outcome.message


def test_benchmark_with_an_imported_perf_counter_passes():
    """`from time import perf_counter` binds the real clock in the student's globals; the check swaps it too."""
    code = mutants.BENCH_SYNC_TEMPLATE.replace("time.perf_counter()", "perf_counter()")
    ex = next(e for e in CHAPTER.exercises if e.name == "benchmark")
    ns = namespace(CHAPTER, replace={"benchmark": "from time import perf_counter\n" + code})
    for hidden in (False, True):
        outcome = run_check(ex, ns, hidden=hidden)
        assert outcome.passed, outcome.message


def test_simulated_device_restores_everything():
    before = {name: getattr(torch.cuda, name) for name in ("is_available", "synchronize", "Event", "current_stream")}
    clocks = (time.perf_counter, time.perf_counter_ns, time.monotonic, time.monotonic_ns, timeit.default_timer)
    ns = namespace(CHAPTER)
    alias = time.perf_counter
    ns["my_clock"] = alias
    for hidden in (False, True):
        run_check(next(e for e in CHAPTER.exercises if e.name == "benchmark"), ns, hidden=hidden)
    assert {name: getattr(torch.cuda, name) for name in before} == before
    assert (time.perf_counter, time.perf_counter_ns, time.monotonic, time.monotonic_ns, timeit.default_timer) == clocks
    assert ns["my_clock"] is alias
    assert torch.cuda.is_available() == (before["is_available"]())


def test_simulated_device_restores_after_a_crash():
    ex = next(e for e in CHAPTER.exercises if e.name == "benchmark")
    is_available = torch.cuda.is_available
    ns = namespace(CHAPTER, replace={"benchmark": "def benchmark(fn, *args, warmup=3, repeats=20):\n    raise KeyError('x')\n"})
    assert not run_check(ex, ns).passed
    assert torch.cuda.is_available is is_available and time.perf_counter is checks._real_perf_counter


@pytest.mark.parametrize(
    "cheat",
    [
        # a fixed answer
        "def benchmark(fn, *args, warmup=3, repeats=20):\n    return {'median_ms': 5.0, 'iqr_ms': 1.0}\n",
        # a clock of its own that advances by a plausible amount per call
        "def benchmark(fn, *args, warmup=3, repeats=20):\n"
        "    import time\n"
        "    time.perf_counter = lambda c=iter(range(10**6)): next(c) * 0.005\n"
        "    for _ in range(warmup + repeats):\n        fn(*args)\n"
        "    return {'median_ms': 5.0, 'iqr_ms': 0.0}\n",
    ],
    ids=["constant", "patched_clock"],
)
def test_benchmark_check_is_not_fooled(cheat):
    ex = next(e for e in CHAPTER.exercises if e.name == "benchmark")
    real = time.perf_counter
    try:
        ns = namespace(CHAPTER, replace={"benchmark": cheat})
        for hidden in (False, True):
            assert not run_check(ex, ns, hidden=hidden).passed
    finally:
        time.perf_counter = real


def test_simulated_device_exact_statistics():
    """The virtual clock makes the expected numbers exact: the solution reports them to within launch overheads."""
    rng = np.random.default_rng(3)
    timed = [float(v) for v in 2 + 3 * rng.random(9)]
    checks._run_benchmark(benchmark, [30.0] * 3, timed, cuda=True)
    checks._run_benchmark(benchmark, [30.0] * 3, timed, cuda=False)


def test_checks_are_fast():
    ns = namespace(CHAPTER)
    for ex in CHAPTER.exercises:
        for hidden in (False, True):
            start = time.perf_counter()
            outcome = run_check(ex, ns, hidden=hidden)
            assert outcome.passed, outcome.message
            assert time.perf_counter() - start < 3.0, f"{ex.name} {'hidden' if hidden else 'visible'} is slow"


# ---------------------------------------------------------------------------------------------
# attention_flops, naive_attention_bytes and the numbers the chapter quotes


def test_flops_conventions():
    fwd = attention_flops(2, 3, 5, 7, 11)
    assert fwd == 4 * 2 * 3 * 5 * 7 * 11 and isinstance(fwd, float)
    assert attention_flops(2, 3, 5, 7, 11, causal=True) == fwd / 2
    assert attention_flops(2, 3, 5, 7, 11, mode="bwd") == 2.5 * fwd
    assert attention_flops(2, 3, 5, 7, 11, causal=True, mode="fwd_bwd") == 3.5 * fwd / 2
    with pytest.raises(ValueError):
        attention_flops(1, 1, 1, 1, 1, mode="backward")


def test_flops_of_the_two_matmuls_by_counting():
    """4 * B * H * L * S * D is exactly the multiply-adds of Q K^T and P V, times 2."""
    b, h, n, s, d = 2, 3, 5, 7, 4
    macs = b * h * n * s * d * 2  # (L x D)(D x S) and (L x S)(S x D)
    assert attention_flops(b, h, n, s, d) == 2 * macs


def test_bytes_quoted_in_the_chapter():
    gib = 2**30
    assert naive_attention_bytes(1, 16, 4096, 4096, torch.bfloat16) == gib
    assert naive_attention_bytes(2, 4, 100, 300, torch.float32) == 2 * 2 * 4 * 100 * 300 * 4
    assert isinstance(naive_attention_bytes(4099, 128, 131072, 131072, torch.float32), int)
    # The naive matrices of one 32-head layer exceed 80 GB from N = 25,001 and 141 GB from N = 33,190 (bf16).
    per_token2 = naive_attention_bytes(1, 32, 1, 1, torch.bfloat16)
    assert per_token2 * 25000**2 <= 80e9 < per_token2 * 25001**2
    assert per_token2 * 33189**2 <= 141e9 < per_token2 * 33190**2


def test_bytes_match_what_pytorch_allocates():
    """The two L x S tensors of a naive forward are exactly naive_attention_bytes."""
    q = k = torch.randn(2, 3, 40, 8)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    weights = torch.softmax(scores, dim=-1)
    held = scores.numel() * scores.element_size() + weights.numel() * weights.element_size()
    assert held == naive_attention_bytes(2, 3, 40, 40, torch.float32)


def test_intensity_and_roofline_numbers_quoted():
    s = 2
    n, d = 4096, 128
    flops = attention_flops(1, 1, n, n, d)
    fused = flops / (4 * n * d * s)
    naive = flops / (4 * n * d * s + 2 * naive_attention_bytes(1, 1, n, n, torch.bfloat16))
    assert fused == n / s == 2048
    assert math.isclose(naive, n * d / (s * (n + d)))
    assert round(naive, 1) == 62.1 and naive < d / s
    assert round(989 / 3.35) == 295 and round(989 / 4.8) == 206
    assert round(3.35 * naive) == 208 and round(4.8 * naive) == 298  # TFLOP/s bounds of the naive version


# ---------------------------------------------------------------------------------------------
# The notebook's recorded-run helpers, on a synthetic file of benchmarks/attention.py's schema


def _helpers() -> dict:
    """Run the notebook's helper cell (it starts with a known comment) in a fresh namespace."""
    nb = read(CHAPTER.notebook)
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Recorded GPU runs: helpers"))
    import matplotlib.pyplot as plt

    ns = {"plt": plt, "np": np, "torch": torch}
    exec(cell.source, ns)
    return ns


def _row(impl, seq_len, status="ok", **kw):
    row = {
        "suite": "layers",
        "impl": impl,
        "batch": 4,
        "heads": 16,
        "seq_len": seq_len,
        "head_dim": 64,
        "causal": False,
        "dtype": "bfloat16",
        "median_ms": 0.01 * seq_len if status == "ok" else None,
        "iqr_ms": 0.001 if status == "ok" else None,
        "tflops": 100.0 + seq_len / 100 if status == "ok" else None,
        "peak_mem_bytes": 2**20 * seq_len if status == "ok" else None,
        "status": status,
        "note": "",
    }
    row.update(kw)
    return row


def _write_run(path, date, device="NVIDIA H200", rows=None):
    run = {
        "schema": 1,
        "device": device,
        "peak_tflops": 989.0,
        "date": date,
        "versions": {"torch": "2.13.0", "triton": "3.9.0", "cuda": "12.8", "cudnn": "91000"},
        "ratios": {},
        "rows": rows
        if rows is not None
        else [_row(i, n) for i in ("naive", "fused", "sdpa:flash") for n in (1024, 2048, 4096)]
        + [_row("naive", 8192, status="oom", note="CUDA out of memory")]
        + [_row("fused", 1024, suite="kernels")],
    }
    path.write_text(json.dumps(run))
    return run


def test_recorded_run_plotting(tmp_path):
    import matplotlib.pyplot as plt

    ns = _helpers()
    _write_run(tmp_path / "2026-01-02-h100.json", "2026-01-02", device="NVIDIA H100 80GB HBM3")
    _write_run(tmp_path / "2026-03-04-h200.json", "2026-03-04")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": 2, "rows": []}))
    runs = ns["load_recorded_runs"](tmp_path)
    assert [p.name for p, _ in runs] == ["2026-01-02-h100.json", "2026-03-04-h200.json"]
    path, run = ns["newest_run"](runs)
    assert path.name == "2026-03-04-h200.json"
    fig, shape, missing = ns["plot_recorded_run"](run, "layers")
    try:
        title = fig._suptitle.get_text()
        for text in ("NVIDIA H200", "2026-03-04", "PyTorch 2.13.0", "Triton 3.9.0", "CUDA 12.8", "cuDNN 91000", "B = 4"):
            assert text in title
        assert shape == (4, 16, 64, False, "bfloat16")
        time_ax, tflops_ax, mem_ax = fig.axes[:3]
        labels = [line.get_label() for line in time_ax.get_lines()]
        assert labels == ["naive (chapter 4's steps)", "FusedMultiHeadAttention", "SDPA flash"]
        naive_line = time_ax.get_lines()[0]
        assert list(naive_line.get_xdata()) == [1024, 2048, 4096]  # the oom point is not drawn
        assert [(r["impl"], r["seq_len"], r["status"]) for r in missing] == [("naive", 8192, "oom")]
        assert any(line.get_label().startswith("peak 989") for line in tflops_ax.get_lines())
        mem = mem_ax.get_lines()[1].get_ydata()
        assert np.allclose(mem, [2**20 * n / 2**30 for n in (1024, 2048, 4096)])
    finally:
        plt.close(fig)


def test_recorded_run_without_layers_rows(tmp_path):
    ns = _helpers()
    run = _write_run(tmp_path / "k.json", "2026-01-01", rows=[_row("sdpa:flash", 1024, suite="kernels")])
    assert ns["plot_recorded_run"](run, "layers") == (None, None, [])
    assert ns["newest_run"](ns["load_recorded_runs"](tmp_path / "missing")) is None


def test_committed_results_can_be_drawn():
    """Every recorded run committed to the course (benchmarks/results/*.json with rows) is one the notebook can draw."""
    import matplotlib.pyplot as plt

    ns = _helpers()
    results = ROOT / "benchmarks" / "results"
    with_rows = [
        p for p in sorted(results.glob("*.json")) if isinstance(json.loads(p.read_text()), dict) and "rows" in p.read_text()
    ]
    runs = ns["load_recorded_runs"](results)
    assert [p for p, _ in runs] == with_rows
    for path, run in runs:
        fig, shape, _ = ns["plot_recorded_run"](run, "layers")
        if fig is not None:
            assert run["device"] in fig._suptitle.get_text(), path.name
            plt.close(fig)


def test_checks_never_import_solutions():
    for name in ("checks/ch07.py", "mutants/ch07.py"):
        text = (ROOT / "autograder" / name).read_text()
        assert "import solutions" not in text and "from solutions" not in text


# ---------------------------------------------------------------------------------------------
# On a GPU


@CUDA
def test_fused_bf16_on_cuda_matches_nn_multihead_attention():
    mha = _reference(256, 8).cuda()
    fused = _fused_from(mha).cuda()
    x = torch.randn(4, 300, 256, device="cuda")
    with torch.no_grad():
        exact = mha.double()(x.double(), x.double(), x.double(), need_weights=False)[0]
        mha.float()
        ref_bf16 = mha.bfloat16()(x.bfloat16(), x.bfloat16(), x.bfloat16(), need_weights=False)[0]
        ours = fused.bfloat16()(x.bfloat16())
    assert ours.dtype == torch.bfloat16
    ref_err = (ref_bf16.double() - exact).abs().max().item()
    our_err = (ours.double() - exact).abs().max().item()
    assert our_err <= 2 * ref_err + 1e-2


@CUDA
def test_fused_causal_bf16_on_cuda_uses_a_fused_backend():
    fused = FusedMultiHeadAttention(512, 8).cuda().bfloat16().eval()
    x = torch.randn(2, 1024, 512, device="cuda", dtype=torch.bfloat16)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = fused(x, is_causal=True)
    assert out.shape == x.shape and torch.isfinite(out).all()


@CUDA
def test_benchmark_on_cuda_waits_for_the_gpu():
    """torch.cuda._sleep queues a kernel that spins for a number of cycles: an unsynchronised timer sees ~0."""
    x = torch.zeros(1, device="cuda")

    def spin(t):
        torch.cuda._sleep(50_000_000)  # tens of milliseconds on current GPUs
        return t

    result = benchmark(spin, x, warmup=2, repeats=5)
    start = time.perf_counter()
    spin(x)
    launch_ms = (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    assert result["median_ms"] > 10 * launch_ms
    assert result["median_ms"] > 1.0


@CUDA
def test_fused_matches_sdpa_backends_on_cuda():
    torch.manual_seed(0)
    fused = FusedMultiHeadAttention(256, 4).cuda().bfloat16().eval()
    x = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):
            want = fused(x, is_causal=True).float()
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            with sdpa_kernel(backend):
                got = fused(x, is_causal=True).float()
            assert (got - want).abs().max().item() < 3e-2


@pytest.mark.parametrize(
    ("prefix", "clock", "scale"),
    [
        ("", "time.monotonic()", "1000"),
        ("", "time.monotonic_ns()", "1e-6"),
        ("", "time.perf_counter_ns()", "1e-6"),
        ("from time import monotonic\n", "monotonic()", "1000"),
        ("from time import monotonic_ns as now\n", "now()", "1e-6"),
    ],
    ids=["monotonic", "monotonic_ns", "perf_counter_ns", "imported_monotonic", "aliased_monotonic_ns"],
)
def test_any_monotonic_clock_passes(prefix, clock, scale):
    """The contract: perf_counter, perf_counter_ns, monotonic and monotonic_ns are all correct clocks."""
    code = mutants.BENCH_SYNC_TEMPLATE.replace("time.perf_counter()", clock).replace("* 1000)", f"* {scale})")
    assert code != mutants.BENCH_SYNC_TEMPLATE
    ex = next(e for e in CHAPTER.exercises if e.name == "benchmark")
    ns = namespace(CHAPTER, replace={"benchmark": prefix + code})
    for hidden in (False, True):
        outcome = run_check(ex, ns, hidden=hidden)
        assert outcome.passed, outcome.message


def test_closure_case_passes_the_contracts_rule_and_names_the_cpu_path():
    """A harness that synchronises whenever CUDA is available passes the closure case; one that looks for a
    CUDA argument times a closure (no arguments) on the CPU path and is told so."""
    assert checks.CLOSURES_ON_CUDA
    ex = next(e for e in CHAPTER.exercises if e.name == "benchmark")
    rule = "cuda = torch.cuda.is_available()"
    argument_rule = "cuda = torch.cuda.is_available() and any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)"
    for template in (mutants.BENCH_SYNC_TEMPLATE, mutants.BENCH_EVENTS_TEMPLATE):
        assert rule in template
        for hidden in (False, True):
            outcome = run_check(ex, namespace(CHAPTER, replace={"benchmark": template}), hidden=hidden)
            assert outcome.passed, outcome.message
        old = template.replace(rule, argument_rule)
        outcome = run_check(ex, namespace(CHAPTER, replace={"benchmark": old}), hidden=True)
        assert not outcome.passed and "took the CPU path because no argument is a CUDA tensor" in outcome.message
