"""The attention benchmark harness (benchmarks/attention.py).

On a CPU: the command runs the correctness gate and takes no timings; the FLOP counts, the
peak table, the statistics, the alternating order, the ratios, the out-of-memory and
unsupported handling and the plots are checked directly; a dry run drives the whole GPU code
path on the CPU with the CUDA timer swapped for a wall clock (its numbers are not
measurements and are never written anywhere but tmp_path). With CUDA: the quick sweep for real.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from autograder.course import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import attention as bench  # noqa: E402
from benchmarks import attention_measure as am  # noqa: E402
from benchmarks import attention_plots as plots  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (speed is only measured on one)")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
# A number followed by a unit of time or throughput: what the CPU mode must never print.
TIMING = re.compile(r"\d\s*(ms|s|TFLOP/s|GiB)\b")


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


# ---------------------------------------------------------------- the command without a GPU


@no_cuda
def test_cpu_mode_runs_the_gate_and_prints_no_timings(tmp_path):
    out = tmp_path / "results"
    result = _run("benchmarks/attention.py", "--quick", "--out", str(out))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "speed ratios need a CUDA GPU; no timings were taken" in result.stdout
    for impl in ("naive", "ch04", "nn.MultiheadAttention", "sdpa:math"):
        assert re.search(rf"^\s+{re.escape(impl)}\s+ok\s+gate passed", result.stdout, re.M), log
    assert not TIMING.search(result.stdout), f"the CPU mode printed a timing: {TIMING.search(result.stdout)[0]!r}"
    assert not out.exists() or not any(out.iterdir()), "the CPU mode wrote a result"


@no_cuda
def test_module_form_runs_one_suite(tmp_path):
    result = _run("-m", "benchmarks.attention", "--suite", "kernels", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "correctness gate, kernels on the CPU" in result.stdout
    assert "correctness gate, layers" not in result.stdout
    assert re.search(r"^\s+triton\s+(ok|unsupported)\s", result.stdout, re.M), result.stdout


def test_unknown_suite_is_refused():
    result = _run("benchmarks/attention.py", "--suite", "layers,backward")
    assert result.returncode == 2 and "--suite takes any of layers, kernels, training" in result.stderr


# ---------------------------------------------------------------- arithmetic


def test_attention_flops():
    assert am.attention_flops(2, 3, 5, 7, 11) == 4 * 2 * 3 * 5 * 7 * 11
    assert am.attention_flops(2, 3, 5, 7, 11, causal=True) == 2 * 2 * 3 * 5 * 7 * 11
    # the kernels' benchmark shape: B*N = 16k, H*D = 2048, N = 4k -> 4 * 16k * 4k * 2048 FLOPs
    assert am.attention_flops(4, 16, 4096, 4096, 128) == 4 * 16384 * 4096 * 2048


def test_layer_flops_equal_chapter_4s_count():
    ch04 = pytest.importorskip("solutions.ch04_multi_head_attention")
    for batch, length, embed_dim, heads in [(2, 8, 16, 4), (32, 512, 1024, 16), (1, 16384, 2048, 16)]:
        assert am.layer_flops(batch, length, embed_dim, heads) == ch04.multi_head_attention_flops(
            batch, length, length, embed_dim, heads
        )
    assert am.layer_flops(1, 4, 8, 2) == 4 * 1 * 2 * 4 * 4 * 4 + 8 * 1 * 4 * 64


def test_tflops():
    assert am.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert am.tflops(1e12, 0.5) == pytest.approx(2000.0)
    assert am.tflops(1e12, None) is None


def _row(suite, impl, ms, seq_len=1024, head_dim=128, causal=False, status="ok", batch=16, heads=16):
    flops = am.attention_flops(batch, heads, seq_len, seq_len, head_dim, causal)
    fields = {"status": status}
    if status == "ok":
        fields.update(median_ms=ms, iqr_ms=ms / 10, tflops=am.tflops(flops, ms), peak_mem_bytes=2**30)
    return am.make_row(suite, impl, batch, heads, seq_len, head_dim, causal, **fields)


def test_ratios():
    rows = [
        _row("layers", "fused", 2.0),
        _row("layers", "nn.MultiheadAttention", 5.0),
        _row("layers", "sdpa:default", 2.2),
        _row("kernels", "triton", 4.0),
        _row("kernels", "sdpa:default", 3.0),
        _row("kernels", "sdpa:flash", 3.2),
        _row("kernels", "sdpa:cudnn", 2.0),
        _row("kernels", "sdpa:math", 1.0, status="oom"),  # not ok: never the best
        _row("kernels", "triton", 1.0, seq_len=2048),
        _row("kernels", "sdpa:default", 3.0, seq_len=2048),
        _row("kernels", "sdpa:efficient", 4.0, seq_len=2048),
    ]
    ratios = am.compute_ratios(rows, peak=989.0)
    layers, kernels = ratios["layers"], ratios["kernels"]
    assert layers["fused/nn.MultiheadAttention"]["points"][0]["value"] == pytest.approx(2.5)
    assert layers["fused/sdpa:default"]["points"][0]["value"] == pytest.approx(1.1)
    assert layers["fused/peak"]["points"][0]["value"] == pytest.approx(rows[0]["tflops"] / 989.0)
    best = kernels["triton/best_sdpa"]["points"]
    assert [(p["seq_len"], p["best"], p["value"]) for p in best] == [
        (1024, "sdpa:cudnn", pytest.approx(0.5)),
        (2048, "sdpa:efficient", pytest.approx(4.0)),
    ]
    assert kernels["triton/sdpa:default"]["geomean"] == pytest.approx(math.sqrt(0.75 * 3.0))
    assert "above 1 means ours is faster" in ratios["definition"]


def test_ratios_without_a_peak_leave_it_out():
    ratios = am.compute_ratios([_row("kernels", "triton", 1.0), _row("kernels", "sdpa:default", 2.0)], peak=None)
    assert "triton/peak" not in ratios["kernels"] and "layers" not in ratios
    assert "omitted" in ratios["peak_note"]
    assert am.speed_ratio(None, 1.0) is None and am.speed_ratio(2.0, 1.0) == 0.5
    assert am.fraction_of_peak(494.5, 989.0) == 0.5 and am.fraction_of_peak(1.0, None) is None


@pytest.mark.parametrize(
    ("name", "memory", "sms", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 85e9, 132, 989.0),
        ("NVIDIA H100 SXM5 80GB", None, None, 989.0),
        ("NVIDIA H100 PCIe", 85e9, 114, 756.0),
        ("NVIDIA H100", None, 132, 989.0),
        ("NVIDIA H100", None, 114, 756.0),
        ("NVIDIA H100", None, None, None),
        ("NVIDIA H200", 150e9, 132, 989.0),
        ("NVIDIA H100 NVL", 100e9, 132, None),
        ("NVIDIA H200 NVL", 150e9, 132, None),
        ("NVIDIA GH200 480GB", 100e9, 132, None),
        ("NVIDIA A100-SXM4-80GB", 85e9, 108, None),
        ("NVIDIA GeForce RTX 4090", 25e9, 128, None),
    ],
)
def test_peak_detection(name, memory, sms, peak):
    found, note = am.detect_peak(name, memory, sms)
    assert found == peak, note
    assert name in note
    if peak is None:
        assert "omitted" in note


def test_device_slug():
    assert am.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert am.device_slug("NVIDIA H200") == "h200"
    assert am.device_slug("!!!") == "unknown-device"


# ---------------------------------------------------------------- statistics and order


def test_median_iqr_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 4, 7, 16, 33):
        samples = rng.exponential(1.0, n).tolist()
        q25, q50, q75 = np.percentile(samples, [25, 50, 75])
        median, iqr = am.median_iqr(samples)
        assert median == pytest.approx(q50) and iqr == pytest.approx(q75 - q25)
    assert am.median_iqr([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError):
        am.median_iqr([])


def test_order_alternates_between_rounds():
    assert am.alternating_orders(["a", "b", "c"], 4) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"], ["c", "b", "a"]]
    calls = []

    def sampler(name):
        return lambda: calls.append(name) or float(len(calls))

    samples = am.round_robin({n: sampler(n) for n in "abc"}, rounds=3, per_round=2)
    assert "".join(calls) == "aabbcc" + "ccbbaa" + "aabbcc"
    assert samples["a"] == [1.0, 2.0, 11.0, 12.0, 13.0, 14.0]
    assert all(len(v) == 6 for v in samples.values())


# ---------------------------------------------------------------- failures


def test_guarded_sorts_out_of_memory_and_unsupported():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB\nmore detail")

    def no_kernel():
        warnings.warn("Flash attention kernel not used because:", UserWarning, stacklevel=1)
        warnings.warn("Flash attention requires the head dimension to be at most 256\nmore", UserWarning, stacklevel=1)
        raise RuntimeError("No available kernel. Aborting execution.\nsecond line")

    assert am.guarded(oom) == ("oom", "CUDA out of memory. Tried to allocate 32.00 GiB", None)
    status, note, value = am.guarded(no_kernel)
    assert (status, value) == ("unsupported", None)
    assert note == (
        "RuntimeError: No available kernel. Aborting execution. "
        "(warnings: Flash attention kernel not used because:; Flash attention requires the head dimension to be at most 256)"
    )
    assert am.guarded(lambda: 42) == ("ok", "", 42)
    assert am.guarded(lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: out of memory")))[0] == "oom"


def test_make_row_follows_the_schema():
    row = am.make_row("kernels", "triton", 1, 2, 3, 4, True)
    assert tuple(row) == am.ROW_KEYS and row["dtype"] == "bfloat16" and row["status"] == "ok"
    with pytest.raises(ValueError):
        am.make_row("kernels", "triton", 1, 2, 3, 4, True, status="skipped")
    with pytest.raises(KeyError):
        am.make_row("kernels", "triton", 1, 2, 3, 4, True, speed=1.0)


def test_gate_catches_a_wrong_layer_and_a_wrong_dtype():
    mha32 = bench.make_mha(32, 4, torch.device("cpu"))
    mha = bench.copy.deepcopy(mha32).to(torch.bfloat16)

    def scaled_by_d(x):  # 1/D instead of 1/sqrt(D)
        q, k, v = (
            t.unflatten(-1, (4, 8)).transpose(1, 2)
            for t in torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
        )
        out = torch.softmax(q @ k.transpose(-2, -1) / 8, -1) @ v
        return torch.nn.functional.linear(out.transpose(1, 2).flatten(2), mha.out_proj.weight, mha.out_proj.bias)

    impls = {
        "naive": lambda x: bench.naive_layer(mha, x),
        "scaled_by_d": scaled_by_d,
        "fp32": lambda x: bench.naive_layer(mha, x).float(),
        "gone": "unavailable: test",
    }
    with torch.no_grad():
        verdicts = bench.gate_layers(impls, mha32, batch=2, length=12)
    assert verdicts["naive"][0] == "ok"
    assert verdicts["scaled_by_d"][0] == "wrong" and "gate failed" in verdicts["scaled_by_d"][1]
    assert verdicts["fp32"] == ("wrong", "returned (2, 12, 32) torch.float32, expected (2, 12, 32) torch.bfloat16")
    assert verdicts["gone"] == ("unsupported", "unavailable: test")


def test_a_wrong_course_layer_fails_the_run(monkeypatch, capsys):
    ch04 = pytest.importorskip("solutions.ch04_multi_head_attention")

    class DropsOutputBias(ch04.MultiHeadAttention):  # a realistic slip: the output projection without its bias
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x, x, x, need_weights=False)[0] - self.out_proj.bias

    module = types.ModuleType("wrong_fused_layer")
    module.FusedMultiHeadAttention = DropsOutputBias
    monkeypatch.setitem(sys.modules, "wrong_fused_layer", module)
    monkeypatch.setattr(bench, "CH07", ("wrong_fused_layer", "FusedMultiHeadAttention"))
    with torch.no_grad():
        assert bench.cpu_gate(["layers"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^\s+fused\s+wrong\s+gate failed", out, re.M), out
    assert re.search(r"^\s+ch04\s+ok\s+gate passed", out, re.M), out


def test_missing_chapter_module_is_reported_not_fatal(monkeypatch):
    monkeypatch.setattr(bench, "CH08", ("solutions.ch99_not_written_yet", "flash_attention"))
    impls = bench.kernel_impls(causal=False)
    assert isinstance(impls["triton"], str) and impls["triton"].startswith("unavailable: solutions.ch99_not_written_yet")
    assert callable(impls["sdpa:default"])


def test_training_gate_checks_the_gradients(monkeypatch):
    """The forward + backward gate compares the output and dq, dk, dv with float64 autograd (math SDPA): a wrong
    gradient is "wrong", SDPA itself passes, and a missing chapter 9 is reported, not fatal."""
    monkeypatch.setattr(bench, "CH09", ("solutions.ch99_not_written_yet", "TritonFlashAttentionFunction"))
    impls = bench.training_impls(causal=True)
    assert isinstance(impls["triton"], str) and impls["triton"].startswith("unavailable: solutions.ch99_not_written_yet")
    right = impls["sdpa:default"]

    def dk_without_the_scale(q, k, v, grad_out):
        out, dq, dk, dv = right(q, k, v, grad_out)
        return out, dq, dk * math.sqrt(q.shape[-1]), dv

    def dv_float32(q, k, v, grad_out):
        out, dq, dk, dv = right(q, k, v, grad_out)
        return out, dq, dk, dv.float()

    shape = (1, 2, 24, 16)
    verdicts = bench.gate_training(
        {"sdpa:default": right, "bad": dk_without_the_scale, "f32": dv_float32, "triton": impls["triton"]},
        shape,
        True,
        torch.device("cpu"),
    )
    assert verdicts["sdpa:default"][0] == "ok", verdicts
    assert verdicts["bad"][0] == "wrong" and "dk" in verdicts["bad"][1]
    assert verdicts["f32"][0] == "wrong" and "dv" in verdicts["f32"][1]
    assert verdicts["triton"][0] == "unsupported"


def test_training_flops_are_three_and_a_half_forwards():
    fwd = am.attention_flops(2, 4, 1024, 1024, 64, True)
    assert am.attention_flops(2, 4, 1024, 1024, 64, True, mode="fwd+bwd") == 3.5 * fwd
    assert am.attention_flops(2, 4, 1024, 1024, 64, False, mode="bwd") == 2.5 * 2 * fwd


@no_cuda
@pytest.mark.skipif(
    importlib.util.find_spec("solutions.ch09_flash_attention_backward") is None, reason="chapter 9 is not written yet"
)
def test_cpu_mode_gates_chapter_9s_backward(tmp_path):
    """Without CUDA, the training suite gates the Triton forward + backward (float32, interpreted) and SDPA's."""
    result = _run("benchmarks/attention.py", "--suite", "training", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\s+triton\s+ok\s+gradient gate passed", result.stdout, re.M), result.stdout
    assert re.search(r"^\s+sdpa:default\s+ok\s+gradient gate passed", result.stdout, re.M), result.stdout
    assert not TIMING.search(result.stdout)


# ---------------------------------------------------------------- the GPU code path, dry, on the CPU


@pytest.fixture
def cpu_as_gpu(monkeypatch):
    """Run gpu_run on the CPU: a wall clock instead of CUDA events, no CUDA calls, tiny shapes.
    The results are not measurements: they are written to tmp_path only."""
    import time

    def wall_chunk(fn, reps):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) * 1e3 / reps

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(bench, "time_chunk", wall_chunk)
    monkeypatch.setattr(bench, "peak_memory", lambda fn: (fn(), 12345)[1])
    monkeypatch.setattr(bench, "describe_device", lambda device: ("CPU DRY RUN (not a GPU)", None, None))
    monkeypatch.setattr(
        bench, "GPU_GATE", {"layers": {"batch": 2, "seq_len": 8}, "kernels": {"batch": 1, "heads": 2, "seq_len": 8}}
    )
    monkeypatch.setattr(bench, "CH08", ("solutions.ch99_not_written_yet", "flash_attention"))
    return bench.Sweep(
        name="quick",
        layer_dims=(32,),
        layer_heads=4,
        layer_lengths=(16, 32),
        kernel_lengths=(16, 32),
        kernel_head_dims=(16,),
        kernel_causal=(False, True),
        layer_batch=2,
        tokens=64,
        kernel_hidden=32,
        rounds=2,
        per_round=1,
        chunk_ms=0.5,
        warmup_ms=0.0,
    )


def test_dry_run_of_the_gpu_path(cpu_as_gpu, monkeypatch, tmp_path, capsys):
    real_naive = bench.naive_layer

    def naive_oom_at_32(mha, x):
        if x.shape[1] >= 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (simulated)")
        return real_naive(mha, x)

    monkeypatch.setattr(bench, "naive_layer", naive_oom_at_32)
    with torch.no_grad():
        code = bench.gpu_run(["layers", "kernels"], cpu_as_gpu, tmp_path, device=torch.device("cpu"))
    assert code == 0
    [path] = tmp_path.glob("*.json")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-cpu-dry-run-not-a-gpu-quick\.json", path.name)
    result = bench.load_result(path)
    assert list(result) == ["schema", "device", "peak_tflops", "date", "versions", "rows", "ratios"]
    assert result["peak_tflops"] is None and set(result["versions"]) >= {"torch", "triton", "cuda", "cudnn"}
    rows = {(r["suite"], r["impl"], r["seq_len"], r["causal"]): r for r in result["rows"]}
    assert len(result["rows"]) == 2 * len(am.LAYER_IMPLS) + 4 * len(am.KERNEL_IMPLS)
    assert rows["layers", "naive", 16, False]["status"] == "ok"
    assert rows["layers", "naive", 32, False]["status"] == "oom" and "simulated" in rows["layers", "naive", 32, False]["note"]
    assert rows["layers", "naive", 32, False]["median_ms"] is None
    assert rows["layers", "sdpa:efficient", 16, False]["status"] == "unsupported"  # no such backend on a CPU
    assert (
        rows["kernels", "triton", 32, True]["status"] == "unsupported"
        and "unavailable" in rows["kernels", "triton", 32, True]["note"]
    )
    ok = rows["kernels", "sdpa:math", 32, True]
    assert ok["status"] == "ok" and ok["median_ms"] > 0 and ok["iqr_ms"] >= 0 and ok["peak_mem_bytes"] == 12345
    assert ok["tflops"] == pytest.approx(am.attention_flops(2, 2, 32, 32, 16, True) / (ok["median_ms"] * 1e-3) / 1e12)
    assert "SDPA backend seen by torch.profiler" in rows["kernels", "sdpa:default", 16, False]["note"]
    fused = rows["layers", "fused", 16, False]
    if bench.load_optional(*bench.CH07)[0] is not None:
        assert fused["status"] == "ok" and "SDPA backend seen by torch.profiler" in fused["note"]
    else:  # chapter 7's module is not there: reported, not fatal
        assert fused["status"] == "unsupported" and fused["note"].startswith("unavailable")
    ratios = result["ratios"]
    seen = {(b["suite"], b["impl"], b["seq_len"], b["causal"]): b["backend"] for b in ratios["sdpa_backend_seen"]}
    assert seen["kernels", "sdpa:default", 16, False] == "flash"  # PyTorch's CPU flash kernel, as the profiler names it
    assert ratios["complete"] and ratios["sweep"] == "quick" and "peak_note" in ratios
    assert len(ratios["layers"]["fused/nn.MultiheadAttention"]["points"]) == 2
    assert ratios["kernels"]["triton/sdpa:default"]["points"] == []  # no triton, no ratio
    pngs = sorted(p.name.removeprefix(path.stem) for p in tmp_path.glob("*.png"))
    assert pngs == sorted(f"-{s}-{m}.png" for s in ("layers", "kernels") for m in plots.METRICS)
    assert "fused/nn.MultiheadAttention" in capsys.readouterr().out


def test_dry_run_of_the_training_suite(cpu_as_gpu, monkeypatch, tmp_path):
    """Forward + backward rows at every shape, SDPA's backend named per row, FLOPs 3.5 forwards, ratios and plots."""
    monkeypatch.setattr(bench, "CH09", ("solutions.ch99_not_written_yet", "TritonFlashAttentionFunction"))
    monkeypatch.setitem(bench.GPU_GATE, "training", {"batch": 1, "heads": 2, "seq_len": 8})
    with torch.no_grad():  # as gpu_run's caller does: the suite turns gradients on where it needs them
        assert bench.gpu_run(["training"], cpu_as_gpu, tmp_path, device=torch.device("cpu")) == 0
    [path] = tmp_path.glob("*.json")
    result = bench.load_result(path)
    rows = {(r["impl"], r["seq_len"], r["causal"]): r for r in result["rows"]}
    assert {r["suite"] for r in result["rows"]} == {"training"} and len(rows) == 4 * len(am.TRAINING_IMPLS)
    assert rows["triton", 32, True]["status"] == "unsupported" and "unavailable" in rows["triton", 32, True]["note"]
    ok = rows["sdpa:default", 32, True]
    assert ok["status"] == "ok" and "SDPA backend seen by torch.profiler: flash" in ok["note"]
    assert ok["tflops"] == pytest.approx(am.attention_flops(2, 2, 32, 32, 16, True, "fwd+bwd") / (ok["median_ms"] * 1e-3) / 1e12)
    assert result["ratios"]["training"]["triton/best_sdpa"]["points"] == []  # no triton, no ratio
    assert sorted(p.name.removeprefix(path.stem) for p in tmp_path.glob("*.png")) == sorted(
        f"-training-{m}.png" for m in plots.METRICS
    )


# ---------------------------------------------------------------- plots from a JSON


def _synthetic_result() -> dict:
    """A SYNTHETIC FIXTURE in the result schema (made-up numbers, only to exercise the plots)."""
    rows = []
    for n in (1024, 2048, 4096):
        rows.append(_row("layers", "fused", n / 1024, seq_len=n, batch=16384 // n))
        rows.append(_row("layers", "naive", 3 * n / 1024, seq_len=n, batch=16384 // n, status="oom" if n == 4096 else "ok"))
        for causal in (False, True):
            rows.append(_row("kernels", "triton", n / 2048, seq_len=n, causal=causal, batch=16384 // n))
            rows.append(_row("kernels", "sdpa:cudnn", n / 3000, seq_len=n, causal=causal, batch=16384 // n))
    return {
        "schema": 1,
        "device": "SYNTHETIC TEST FIXTURE (not a measurement)",
        "peak_tflops": 989.0,
        "date": "2000-01-01",
        "versions": {"torch": "0.0", "triton": None, "cuda": None, "cudnn": None},
        "rows": rows,
        "ratios": am.compute_ratios(rows, 989.0),
    }


def test_plot_only_redraws_from_a_json(tmp_path, capsys):
    path = tmp_path / "2000-01-01-synthetic.json"
    path.write_text(json.dumps(_synthetic_result()))
    assert bench.main(["--plot-only", str(path)]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC TEST FIXTURE" in out and "triton/best_sdpa" in out
    for suite in ("layers", "kernels"):
        for metric in plots.METRICS:
            png = tmp_path / f"2000-01-01-synthetic-{suite}-{metric}.png"
            assert png.stat().st_size > 10_000, png
    assert "SYNTHETIC TEST FIXTURE" in plots.subtitle(_synthetic_result()) and "torch 0.0" in plots.subtitle(_synthetic_result())


def test_load_result_refuses_another_schema(tmp_path):
    bad = _synthetic_result()
    bad["rows"][0]["speed"] = 1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="does not follow the schema"):
        bench.load_result(path)
    path.write_text(json.dumps({"schema": 2}))
    with pytest.raises(ValueError, match="not a schema-1"):
        bench.load_result(path)


# ---------------------------------------------------------------- on a GPU


@needs_cuda
@pytest.mark.slow
def test_quick_run_on_the_gpu(tmp_path):
    result = _run("benchmarks/attention.py", "--quick", "--out", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    [path] = tmp_path.glob("*-quick.json")
    data = bench.load_result(path)
    by = {(r["suite"], r["impl"]): r for r in data["rows"]}
    assert by["kernels", "sdpa:default"]["status"] == "ok" and by["kernels", "sdpa:default"]["tflops"] > 0
    assert by["layers", "nn.MultiheadAttention"]["status"] == "ok"
    assert data["ratios"]["complete"] is True
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert len(list(tmp_path.glob("*.png"))) == (6 if has_matplotlib else 0)


@needs_cuda
def test_cuda_timer_measures_a_known_sleep():
    """time_chunk on a GPU kernel that spins for a known time (torch.cuda._sleep cycles), against the wall clock."""
    import time

    torch.cuda.synchronize()
    start = time.perf_counter()
    ms = bench.time_chunk(lambda: torch.cuda._sleep(10_000_000), 3)
    wall_ms = (time.perf_counter() - start) * 1e3 / 3
    assert 0.5 * wall_ms < ms <= wall_ms * 1.05 + 0.05
