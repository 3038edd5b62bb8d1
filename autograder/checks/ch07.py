"""Checks for chapter 7, multi-head attention on a GPU.

Oracles, all computed here and never taken from ``solutions/``:

* ``benchmark``: a **simulated device** with a virtual clock. While the check runs it installs a fake
  CUDA runtime (``torch.cuda.is_available``, ``synchronize``, ``Event``, ``current_stream``, ...) and
  replaces ``time.perf_counter``, ``perf_counter_ns``, ``monotonic``, ``monotonic_ns`` and ``timeit.default_timer`` (and any
  alias of them in the student's globals) with the virtual clock. The workload handed to
  ``benchmark`` behaves like a CUDA kernel launch: it returns at once, having queued a known amount
  of device time; ``synchronize`` and CUDA events move the host clock to the moment the device
  finishes. Its first calls are slow (a compile or autotuning cost) and one timed call is an outlier.
  So a harness that does not synchronise measures only the launch (microseconds), one without
  warm-up sees the slow first calls, and one that reports the mean sees the outlier. The expected
  median and interquartile range follow exactly from the simulated durations. Nothing waits in real
  time, so the check is fast and deterministic, and a student who patches real clocks gains nothing.
  Everything patched is restored in a ``finally`` block. On the CPU path the fake says that CUDA is
  unavailable and every ``torch.cuda`` timing call raises, as on a machine without a GPU.
* ``FusedMultiHeadAttention``: multi-head self-attention written out in float64 NumPy, fed with the
  parameters of a real ``nn.MultiheadAttention`` that is loaded into the student's layer with
  ``load_state_dict`` (strict). A ``TorchFunctionMode`` records the operations of the forward pass:
  exactly two projections (the QKV matmul and ``out_proj``) and one ``scaled_dot_product_attention``.
  ``tests/test_ch07.py`` proves the oracle equals ``nn.MultiheadAttention``.
* ``attention_flops`` and ``naive_attention_bytes``: exact arithmetic.

Wrong answers are compared with the outputs of known mistakes (variants of the oracles) to name them.
"""

from __future__ import annotations

import builtins
import time
import timeit

import numpy as np
import torch

from autograder.checks import torch_refs as R
from autograder.checks import trusted as T
from autograder.checks.common import CheckFailure, call, diagnose, max_error, passed, show
from autograder.checks.objects import output_gradients, watched_call
from autograder.checks.torch_refs import BF16, BOOL, F8, F16, F32, F64
from autograder.grading.remote import current_remote, is_remote

# ---------------------------------------------------------------------------------------------
# References captured at import time (a student cell may rebind torch, numpy, time or builtins).
# Those most chapters share are in torch_refs (R.dtype_of, R.MHA, ...) and trusted (T.np_where, ...).
_zeros = torch.zeros
_make_subclass = torch.Tensor._make_subclass
_Tensor = torch.Tensor
_enable_grad = torch.enable_grad
_requires_grad_of = R.TB.__dict__["requires_grad"].__get__
_TorchFunctionMode = torch.overrides.TorchFunctionMode
_cuda = torch.cuda
_device = torch.device

_time_module = time
_timeit_module = timeit
_REAL_CLOCKS = {
    "perf_counter": time.perf_counter,
    "perf_counter_ns": time.perf_counter_ns,
    "monotonic": time.monotonic,
    "monotonic_ns": time.monotonic_ns,
}
_REAL_TIMEIT = timeit.default_timer
_real_perf_counter = time.perf_counter

_np_percentile = np.percentile
_np_median = np.median
_np_mean = np.mean
_np_std = np.std
_np_sort = np.sort
_np_floating = np.floating
_inf = float("inf")
_int = int
_float = float
_bool = bool
_str = str
_dict = dict
_len = len
_range = range
_enumerate = enumerate
_isinstance = isinstance
_getattr = builtins.getattr
_setattr = builtins.setattr
_hasattr = builtins.hasattr
_any = any
_all = all
_set = set
_tuple = tuple
_abs = abs
_max = max
_min = min
_sorted = sorted
_list = list
_id = id
_RuntimeError = RuntimeError


# =============================================================================================
# benchmark: a simulated asynchronous device with a virtual clock
# =============================================================================================

LAUNCH_MS = 0.004  # host time one "kernel launch" costs: it returns long before the device finishes
ATOL_MS = 0.03  # slack for the launch overheads a correct synchronize + perf_counter harness includes


class _Clock:
    """Virtual host time in seconds. Starts where the real perf_counter is, moves only when simulated."""

    def __init__(self):
        self.now = _real_perf_counter()

    def perf_counter(self) -> float:
        return self.now

    def perf_counter_ns(self) -> int:
        return _int(self.now * 1e9)


class _Device:
    """An in-order device queue: a launch returns at once; the work ends ``duration`` after the queue frees."""

    def __init__(self, clock: _Clock, warm_ms: list[float], timed_ms: list[float], cuda: bool):
        self.clock = clock
        self.durations = _list(warm_ms) + _list(timed_ms)
        self.cuda = cuda
        self.busy_until = clock.now
        self.calls = 0
        self.bad_args = False

    def launch(self) -> None:
        i = self.calls
        d = self.durations[i] if i < _len(self.durations) else self.durations[-1]
        self.calls += 1
        self.clock.now += LAUNCH_MS / 1e3
        if self.cuda:
            start = _max(self.clock.now, self.busy_until)
            self.busy_until = start + d / 1e3
        else:  # CPU work is synchronous: the call returns when it is done
            self.clock.now += d / 1e3
            self.busy_until = self.clock.now

    def synchronize(self, *args, **kwargs) -> None:
        self.clock.now = _max(self.clock.now, self.busy_until)


class _FakeCudaTensor(_Tensor):
    """A tensor that says it lives on a CUDA device; reading its values waits for the device."""

    _device: _Device | None = None

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def device(self):
        return _device("cuda", 0)

    def _sync(self):
        if _FakeCudaTensor._device is not None:
            _FakeCudaTensor._device.synchronize()

    def item(self):
        self._sync()
        return 0.0

    def cpu(self, *args, **kwargs):
        self._sync()
        return _zeros(1)

    def tolist(self):
        self._sync()
        return [0.0]


def _fake_cuda_tensor():
    return _make_subclass(_FakeCudaTensor, _zeros(4, 4))


def _make_cuda_fakes(device: _Device) -> dict:
    """The attributes of torch.cuda a benchmark may use, simulated on ``device``."""
    clock = device.clock

    class Event:
        def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False, **kwargs):
            self.enable_timing = enable_timing
            self.stamp = None

        def record(self, stream=None):
            self.stamp = _max(clock.now, device.busy_until)  # the device reaches the marker after queued work

        def query(self) -> bool:
            return self.stamp is None or clock.now >= self.stamp

        def synchronize(self):
            if self.stamp is not None:
                clock.now = _max(clock.now, self.stamp)

        def wait(self, stream=None):
            return None

        def elapsed_time(self, end) -> float:
            if not (self.enable_timing and _getattr(end, "enable_timing", False)):
                raise _RuntimeError(
                    "CUDA error: invalid resource handle (both events must be created with "
                    "torch.cuda.Event(enable_timing=True) to measure elapsed time)"
                )
            if self.stamp is None or _getattr(end, "stamp", None) is None:
                raise _RuntimeError("Both events must be recorded before calculating elapsed time.")
            if clock.now < _max(self.stamp, end.stamp):
                raise _RuntimeError(
                    "CUDA error: device not ready (elapsed_time on an event the device has not reached yet: "
                    "call end.synchronize() or torch.cuda.synchronize() first)"
                )
            return (end.stamp - self.stamp) * 1e3

    class Stream:
        def synchronize(self):
            device.synchronize()

        def query(self) -> bool:
            return clock.now >= device.busy_until

        def record_event(self, event=None):
            event = event if event is not None else Event()
            event.record(self)
            return event

        def wait_stream(self, other):
            return None

        def wait_event(self, event):
            return None

    stream = Stream()

    def nothing(*args, **kwargs):
        return None

    return {
        "is_available": lambda: True,
        "is_initialized": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_device_name": lambda *a, **k: "Simulated GPU",
        "synchronize": device.synchronize,
        "Event": Event,
        "current_stream": lambda *a, **k: stream,
        "default_stream": lambda *a, **k: stream,
        "empty_cache": nothing,
        "reset_peak_memory_stats": nothing,
        "max_memory_allocated": lambda *a, **k: 0,
    }


def _no_cuda(*args, **kwargs):
    raise _RuntimeError("Torch not compiled with CUDA enabled (this simulated machine has no GPU)")


class _NoCudaEvent:
    def __init__(self, *args, **kwargs):
        _no_cuda()


def _make_cpu_fakes() -> dict:
    return {
        "is_available": lambda: False,
        "is_initialized": lambda: False,
        "device_count": lambda: 0,
        "synchronize": _no_cuda,
        "Event": _NoCudaEvent,
        "current_stream": _no_cuda,
        "default_stream": _no_cuda,
    }


class _Patched:
    """Install the fakes and the virtual clock; restore every patched attribute on exit."""

    def __init__(self, fn, clock: _Clock, cuda_fakes: dict):
        self.fn = fn
        self.clock = clock
        self.cuda_fakes = cuda_fakes
        self.saved: list[tuple[object, str, object, bool]] = []

    def _set(self, target, name: str, value) -> None:
        had = _name_in(target, name)
        old = target.get(name) if _isinstance(target, _dict) else _getattr(target, name, None)
        self.saved.append((target, name, old, had))
        if _isinstance(target, _dict):
            target[name] = value
        else:
            _setattr(target, name, value)

    def __enter__(self):
        virtual = {  # every monotonic clock reads the virtual one (time.time is not monotonic: it stays real)
            "perf_counter": self.clock.perf_counter,
            "perf_counter_ns": self.clock.perf_counter_ns,
            "monotonic": self.clock.perf_counter,
            "monotonic_ns": self.clock.perf_counter_ns,
        }
        for name, value in self.cuda_fakes.items():
            self._set(_cuda, name, value)
        for name, value in virtual.items():
            self._set(_time_module, name, value)
        self._set(_timeit_module, "default_timer", self.clock.perf_counter)
        # Aliases such as `from time import perf_counter` in the student's cells.
        g = _getattr(self.fn, "__globals__", None)
        if _isinstance(g, _dict):
            for key, value in _list(g.items()):
                for name, real in _REAL_CLOCKS.items():
                    if value is real:
                        self._set(g, key, virtual[name])
                if value is _REAL_TIMEIT:
                    self._set(g, key, self.clock.perf_counter)
        return self

    def __exit__(self, *exc):
        for target, name, value, had in reversed(self.saved):
            if _isinstance(target, _dict):
                target[name] = value
            elif had:
                _setattr(target, name, value)
            else:
                try:
                    delattr(target, name)
                except AttributeError:
                    pass
        return False


def _name_in(target, name: str) -> bool:
    if _isinstance(target, _dict):
        return name in target
    return _hasattr(target, name)


def _workload(device: _Device, expected_args: tuple):
    """The function handed to benchmark: one simulated kernel launch per call."""

    def simulated_attention(*args):
        if _len(args) != _len(expected_args) or _any(a is not b for a, b in zip(args, expected_args, strict=False)):
            device.bad_args = True
        device.launch()
        if device.cuda:
            out = _fake_cuda_tensor()
            return out
        return None

    return simulated_attention


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    q25, q50, q75 = _np_percentile(T.np_array(values, dtype=T.np_float64), [25, 50, 75])
    return _float(q25), _float(q50), _float(q75)


BENCH_MISTAKES = {
    "no_sync": (
        "the timer stopped before the device finished: a CUDA launch returns as soon as the kernel is queued. "
        "Call torch.cuda.synchronize() before reading the clock (or time with torch.cuda.Event(enable_timing=True) "
        "and end.synchronize() before elapsed_time). time.time() is not a monotonic clock: use time.perf_counter() (or "
        "time.monotonic())."
    ),
    "mean": "reported the mean of the timed calls, not the median: one slow outlier drags the mean; use the median.",
    "included_warmup": "included the warm-up calls in the statistics: time only the `repeats` calls after the warm-up.",
    "leaked_warmup": (
        "the first timed call included the warm-up's queued work: synchronise after the warm-up calls, before the "
        "timed region starts."
    ),
    "seconds": "returned seconds, not milliseconds: multiply perf_counter differences by 1000 (elapsed_time is already in ms).",
    "microseconds": "returned microseconds, not milliseconds.",
    "lower_median": (
        "took the lower of the two middle values for an even number of calls (torch.median does that): the median of an "
        "even count is the mean of the two middle values (numpy.median, numpy.percentile(times, 50))."
    ),
    "total": "returned the total time of all the timed calls, not the median of one call.",
    "closure": (
        "took the CPU path because no argument is a CUDA tensor. When torch.cuda.is_available(), fn may launch CUDA "
        "work without CUDA arguments (a closure over CUDA tensors, a model on the GPU): synchronise, or time with CUDA "
        "events, whatever the arguments."
    ),
}
IQR_MISTAKES = {
    "range": "returned the range (max - min) instead of the interquartile range (75th minus 25th percentile).",
    "std": "returned the standard deviation instead of the interquartile range (75th minus 25th percentile).",
    "exclusive": (
        "used another percentile method: use linear interpolation, numpy.percentile(times, [25, 75]) "
        "(statistics.quantiles needs method='inclusive')."
    ),
    "q75": "returned the 75th percentile itself, not the 75th minus the 25th.",
    "seconds": BENCH_MISTAKES["seconds"],
    "leaked_warmup": BENCH_MISTAKES["leaked_warmup"],
}


def _exclusive_iqr(values: list[float]) -> float:
    """statistics.quantiles(values, n=4) (method 'exclusive'): the IQR a different convention gives."""
    data = _sorted(values)
    n = _len(data)
    m = n + 1

    def q(j: int) -> float:
        idx, mod = divmod(j * m, 4)
        if idx < 1:
            return data[0]
        if idx >= n:
            return data[-1]
        return data[idx - 1] + (data[idx] - data[idx - 1]) * mod / 4

    return q(3) - q(1)


def _bench_candidates(warm: list[float], timed: list[float], cuda: bool) -> tuple[dict, dict]:
    """What each known mistake would report as median and as IQR."""
    _, med, _ = _percentiles(timed)
    q25, _, q75 = _percentiles(timed)
    medians = {
        "mean": _float(_np_mean(T.np_array(timed))),
        "included_warmup": _percentiles(warm + timed)[1] if warm else None,
        "seconds": med / 1e3,
        "microseconds": med * 1e3,
        "total": _float(sum(timed)),
    }
    if _len(timed) % 2 == 0:
        medians["lower_median"] = _float(_np_sort(T.np_array(timed))[_len(timed) // 2 - 1])
    leaked_iqr = None
    if cuda and warm:
        leaked = [timed[0] + sum(warm)] + timed[1:]
        l25, l50, l75 = _percentiles(leaked)
        medians["leaked_warmup"] = l50
        leaked_iqr = l75 - l25
    iqrs = {
        "leaked_warmup": None,
        "range": _max(timed) - _min(timed),
        "std": _float(_np_std(T.np_array(timed))),
        "exclusive": _exclusive_iqr(timed),
        "q75": q75,
        "seconds": (q75 - q25) / 1e3,
    }
    iqrs["leaked_warmup"] = leaked_iqr
    return medians, {k: v for k, v in iqrs.items() if v is not None}


UNIT_SCALE = {"seconds": 1e3, "microseconds": 1e-3}  # compare a mistake in other units after converting back to ms


def _close_ms(got: float, candidate: float, scale: float, slack: float = 1.0) -> bool:
    return _abs(got * scale - candidate * scale) <= slack * ATOL_MS + 1e-6 * _abs(candidate * scale)


def _number(result: dict, key: str, label: str) -> float:
    value = result[key]
    if _isinstance(value, _bool) or not (_isinstance(value, (_float, _int)) or _isinstance(value, (_np_floating, T.np_integer))):
        hint = " (a tensor: convert with float(...) or .item())" if T._isinstance(value, _Tensor) else ""
        raise CheckFailure(f"{label}: result[{key!r}] should be a float (milliseconds), got {T.type_name(value)}{hint}.")
    return _float(value)


def _run_benchmark(
    bench, warm: list[float], timed: list[float], *, cuda: bool, extra_args: tuple = (), note: str = "", closure: bool = False
):
    """Run ``bench`` on a simulated workload; compare its median and IQR with the exact simulated ones."""
    warmup, repeats = _len(warm), _len(timed)
    where = "a simulated asynchronous CUDA device" if cuda else "a simulated CPU-only machine (CUDA unavailable)"
    shown_args = "".join(", " + a for a in [repr(a) for a in extra_args] + ([] if closure else ["x_cuda" if cuda else "x_cpu"]))
    label = f"benchmark(fn{shown_args}, warmup={warmup}, repeats={repeats}) on {where}{note}"
    if is_remote(bench):  # the simulation runs where the student's code runs; the verdict stays here
        run = current_remote().probe(SIMULATE, bench, _list(warm), _list(timed), cuda, _tuple(extra_args), closure, label)
    else:
        run = simulate_benchmark(bench, warm, timed, cuda, extra_args, closure, label)
    if T._type(run) is not _dict or not {"result", "calls", "bad_args", "error"} <= _set(run):
        raise CheckFailure(f"{label}: the simulated run did not report back.")
    if run["error"] is not None:
        text = _str(run["error"])
        hint = ""
        if "device not ready" in text:
            hint = "\n  Likely mistake: called elapsed_time before the end event was reached: call end.synchronize() first."
        elif "enable_timing" in text:
            hint = "\n  Likely mistake: create the events with torch.cuda.Event(enable_timing=True)."
        elif "not compiled with CUDA" in text:
            hint = (
                "\n  Likely mistake: used torch.cuda on a machine without CUDA. Use the CUDA path only when "
                "torch.cuda.is_available(); otherwise time.perf_counter() alone."
            )
        elif "is_cuda" in text:
            hint = "\n  Likely mistake: not every argument is a tensor: test isinstance(a, torch.Tensor) and a.is_cuda."
        raise CheckFailure(text + hint)
    result = run["result"]
    device = _Reported(run["calls"], run["bad_args"])
    if T._type(result) is not _dict:
        raise CheckFailure(f"{label}: should return a dict {{'median_ms': ..., 'iqr_ms': ...}}, got {T.type_name(result)}.")
    for key in ("median_ms", "iqr_ms"):
        if key not in result:
            raise CheckFailure(f"{label}: the result has no key {key!r}; it has {_sorted(map(_str, result))}.")
    median, iqr = _number(result, "median_ms", label), _number(result, "iqr_ms", label)
    if device.bad_args:
        raise CheckFailure(f"{label}: fn was not called with the arguments given to benchmark: call fn(*args).")
    if device.calls != warmup + repeats:
        lines = [
            f"{label}: fn should be called warmup + repeats = {warmup + repeats} times, it was called {device.calls} time{'' if device.calls == 1 else 's'}."
        ]
        if device.calls == repeats and warmup:
            lines.append("  Likely mistake: no warm-up: call fn(*args) `warmup` times before the timed calls, untimed.")
        raise CheckFailure("\n".join(lines))
    q25, want_median, q75 = _percentiles(timed)
    want_iqr = q75 - q25
    medians, iqrs = _bench_candidates(warm, timed, cuda)
    context = f"  the {repeats} timed calls took (ms, simulated): {show(T.np_array(timed))}; the {warmup} warm-up calls: {warm}"
    if _abs(median - want_median) > ATOL_MS + 1e-6 * want_median:
        lines = [f"{label}: median_ms should be {want_median:.4g}, got {median:.4g}.", context]
        found = [k for k, v in medians.items() if v is not None and _close_ms(median, v, UNIT_SCALE.get(k, 1.0))]
        if found:
            lines.append(f"  Likely mistake: {BENCH_MISTAKES[found[0]]}")
        elif 0 <= median < 0.05 * want_median:
            lines.append(f"  Likely mistake: {BENCH_MISTAKES['closure' if closure and cuda else 'no_sync']}")
        raise CheckFailure("\n".join(lines))
    if _abs(iqr - want_iqr) > 2 * ATOL_MS + 1e-6 * want_iqr:
        lines = [f"{label}: iqr_ms should be {want_iqr:.4g} (75th minus 25th percentile, linear), got {iqr:.4g}.", context]
        found = [k for k, v in iqrs.items() if _close_ms(iqr, v, UNIT_SCALE.get(k, 1.0), 2)]
        if found:
            lines.append(f"  Likely mistake: {IQR_MISTAKES[found[0]]}")
        elif cuda and iqr < 0.05 * _max(want_iqr, 1e-9) and median >= 0:
            lines.append(f"  Likely mistake: {BENCH_MISTAKES['no_sync']}")
        raise CheckFailure("\n".join(lines))


SIMULATE = "autograder.checks.ch07.simulate_benchmark"


class _Reported:
    """What the simulated device saw, as reported by the process that ran the student's benchmark."""

    def __init__(self, calls, bad_args):
        self.calls = calls if T._type(calls) is _int else -1
        self.bad_args = _bool(bad_args)


def simulate_benchmark(bench, warm: list, timed: list, cuda: bool, extra_args: tuple, closure: bool, label: str) -> dict:
    """Run ``bench`` on the simulated device (where the student's code runs): what it returned and what the device saw.

    ``{"result", "calls", "bad_args", "error"}``; ``error`` is the failure message when ``bench`` raised.
    """
    warmup, repeats = _len(warm), _len(timed)
    clock = _Clock()
    device = _Device(clock, warm, timed, cuda)
    _FakeCudaTensor._device = device
    args = _tuple(extra_args) + (() if closure else (_fake_cuda_tensor(),) if cuda else (_zeros(4, 4),))
    fn = _workload(device, args)
    fakes = _make_cuda_fakes(device) if cuda else _make_cpu_fakes()
    try:
        with _Patched(bench, clock, fakes):
            result = call(bench, fn, *args, warmup=warmup, repeats=repeats, label=label)
    except CheckFailure as exc:
        return {"result": None, "calls": device.calls, "bad_args": device.bad_args, "error": _str(exc)}
    finally:
        _FakeCudaTensor._device = None
    if T._type(result) is _dict:  # only plain numbers go back: a tensor value would be a fake CUDA tensor
        result = {
            k: (v if T._type(v) in (_int, _float, _bool, _str) or v is None else _float_or_none(v)) for k, v in result.items()
        }
    return {"result": result, "calls": device.calls, "bad_args": device.bad_args, "error": None}


def _float_or_none(v):
    try:
        return _float(v)
    except Exception:  # noqa: BLE001
        return T.type_name(v)


def _durations(rng, n: int, base: float, spread: float) -> list[float]:
    return [_float(round(v, 3)) for v in base + spread * rng.random(n)]


def visible_benchmark(bench) -> None:
    """An asynchronous device with slow first calls and an outlier; a CPU-only machine."""
    rng = T.default_rng(70)
    timed = _durations(rng, 7, 4.0, 3.0)
    timed[2] = 45.0  # one call hit something slow: the mean moves, the median does not
    _run_benchmark(bench, [60.0] * 5, timed, cuda=True, note=", first calls slow (compilation), one outlier")
    timed = _durations(rng, 5, 2.0, 2.0)
    timed[0] = 30.0
    _run_benchmark(bench, [25.0, 25.0], timed, cuda=False)
    passed("benchmark", 2)


def hidden_benchmark(bench, seed: int = 71) -> None:
    """An even count, a leaking warm-up, no warm-up at all, non-tensor arguments, a single call, CPU again."""
    rng = T.default_rng(seed)
    count = 0

    def case(warm, timed, **kw):
        nonlocal count
        _run_benchmark(bench, warm, timed, **kw)
        count += 1

    timed = _durations(rng, 8, 3.0, 4.0)
    timed[5] = 40.0
    case([50.0] * 4, timed, cuda=True, note=", an even number of timed calls")
    case([120.0] * 4, _durations(rng, 3, 1.0, 1.0), cuda=True, note=", long warm-up work still queued")
    case([], _durations(rng, 9, 0.5, 0.5), cuda=True, note=", warmup=0")
    case([80.0] * 2, _durations(rng, 5, 6.0, 2.0), cuda=True, extra_args=(3, "causal"), note=", non-tensor arguments")
    case([10.0], [7.5], cuda=True, note=", a single timed call (IQR 0)")
    timed = _durations(rng, 6, 1.0, 3.0)
    timed[3] = 20.0
    case([15.0] * 6, timed, cuda=False, note=", an even number of timed calls")
    if CLOSURES_ON_CUDA:
        case([40.0] * 3, _durations(rng, 7, 2.0, 2.0), cuda=True, closure=True,
             note=", fn a closure over CUDA tensors: no arguments at all")  # fmt: skip
    passed("benchmark", count, hidden=True)


# The contract: benchmark synchronises whenever torch.cuda.is_available(), also for a closure with no tensor
# arguments (the hidden check's closure case).
CLOSURES_ON_CUDA = True


# =============================================================================================
# FusedMultiHeadAttention: float64 oracle, structure, and the operations of the forward pass
# =============================================================================================

FUSED_MISTAKES = {
    "qkv_kqv": (
        "split the QKV projection in the wrong order (K first): in_proj_weight's rows and the 3E outputs of the "
        "matmul are Q, then K, then V (nn.MultiheadAttention's layout)."
    ),
    "qkv_order": (
        "split the QKV projection in the wrong order: in_proj_weight's rows and the 3E outputs of the matmul are Q, "
        "then K, then V (nn.MultiheadAttention's layout)."
    ),
    "per_head_layout": (
        "split the QKV output per head first, (B, L, H, 3*D), as some fused checkpoints store it: nn.MultiheadAttention's "
        "layout is (B, L, 3, H, D): all of Q, then all of K, then all of V."
    ),
    "split_view": (
        "split heads with .view(B, H, L, D) without a transpose: reshape to (B, L, H, D), then .transpose(1, 2), "
        "so each head gets a contiguous block of D features at every position."
    ),
    "merge_view": (
        "merged heads with .reshape(B, L, E) without a transpose: SDPA returns (B, H, L, D); call .transpose(1, 2) "
        "first, then reshape to (B, L, E)."
    ),
    "inverted_mask": (
        "inverted the boolean mask. This layer follows F.scaled_dot_product_attention: True = MAY attend. "
        "nn.MultiheadAttention (and chapter 4's layer) use the opposite convention, True = may NOT attend; "
        "pass attn_mask to SDPA unchanged."
    ),
    "mask_ignored": "ignored attn_mask: pass it to F.scaled_dot_product_attention(..., attn_mask=attn_mask).",
    "causal_ignored": "ignored is_causal: pass it to F.scaled_dot_product_attention(..., is_causal=is_causal).",
    "always_causal": "applied a causal mask although is_causal=False.",
    "no_out_proj": "forgot the output projection: apply self.out_proj to the merged heads.",
    "no_in_bias": "ignored in_proj_bias: F.linear(x, self.in_proj_weight, self.in_proj_bias).",
    "scale_E": "scaled by 1/sqrt(embed_dim): each head's scores are dot products of D = E/H features; SDPA's default 1/sqrt(D) is right.",
    "scale_D": "scaled by 1/head_dim instead of 1/sqrt(head_dim): leave SDPA's default scale.",
    "no_scale": "passed scale=1.0: leave SDPA's default scale, 1/sqrt(head_dim).",
    "kv_swapped": "swapped keys and values: the outputs of the QKV matmul are Q, then K, then V.",
}
PROJ_OPS = {"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "einsum"}
SDPA_OPS = {"scaled_dot_product_attention"}
SOFTMAX_OPS = {"softmax", "_softmax", "log_softmax"}


def _mha_params(rng, e: int, bias: bool) -> dict:
    """Parameters rounded to float32, biases non-zero; the input projection a little larger than chapter 6's."""
    return R.mha_params(rng, e, bias, in_gain=1.2)


def _softmax_allowed(scores: np.ndarray, allowed: np.ndarray | None, additive: np.ndarray | None) -> np.ndarray:
    """Softmax over the last axis; disallowed entries get weight 0; a row with nothing allowed gives zeros (as SDPA)."""
    with T.np_errstate(all="ignore"):
        s = scores if additive is None else scores + additive
        if allowed is not None:
            s = T.np_where(allowed, s, -_inf)
        top = s.max(axis=-1, keepdims=True)
        top = T.np_where(T.np_isfinite(top), top, 0.0)
        ex = T.np_exp(s - top)
        total = ex.sum(axis=-1, keepdims=True)
        return T.np_where(total > 0, ex / T.np_where(total > 0, total, 1.0), 0.0)


def _fused_oracle(
    p: dict, x: np.ndarray, h: int, *, mask: np.ndarray | None = None, causal: bool = False, variant: str = "", dtype=T.np_float64
) -> np.ndarray:
    """Self-attention (B, L, E) with SDPA's mask semantics (bool True = may attend, float added), or a mistake."""
    x = T.np_array(x, dtype=dtype)
    b, n, e = x.shape
    d = e // h
    qkv = x @ T.np_array(p["w_in"], dtype=dtype).T
    if p["b_in"] is not None and variant != "no_in_bias":
        qkv = qkv + T.np_array(p["b_in"], dtype=dtype)
    if variant == "per_head_layout":
        parts = qkv.reshape(b, n, h, 3, d)
        q, k, v = (parts[:, :, :, i, :].reshape(b, n, e) for i in _range(3))
    else:
        q, k, v = qkv[..., :e], qkv[..., e : 2 * e], qkv[..., 2 * e :]
    order = {"qkv_kqv": (1, 0, 2), "kv_swapped": (0, 2, 1)}.get(variant)
    if order is not None:
        q, k, v = ((q, k, v)[i] for i in order)

    def split(a):
        if variant == "split_view":
            return a.reshape(b, h, n, d)
        return a.reshape(b, n, h, d).transpose(0, 2, 1, 3)

    qh, kh, vh = split(q), split(k), split(v)
    scale = {"scale_E": 1 / T.sqrt(e), "scale_D": 1 / d, "no_scale": 1.0}.get(variant, 1 / T.sqrt(d))
    scores = (qh @ kh.transpose(0, 1, 3, 2)) * dtype(scale)
    allowed = None
    additive = None
    use_mask = mask is not None and variant != "mask_ignored"
    if use_mask and mask.dtype == T.np_bool:
        allowed = ~mask if variant == "inverted_mask" else mask
        allowed = allowed & T.np_ones(scores.shape, dtype=T.np_bool)
    elif use_mask:
        additive = T.np_array(mask, dtype=dtype)
    use_causal = (causal and variant != "causal_ignored") or variant == "always_causal"
    if use_causal:
        tri = T.np_arange(n)[None, :] <= T.np_arange(n)[:, None]
        allowed = tri if allowed is None else (allowed & tri)
    weights = _softmax_allowed(scores, allowed, additive)
    heads = weights @ vh
    merged = heads.reshape(b, n, e) if variant == "merge_view" else heads.transpose(0, 2, 1, 3).reshape(b, n, e)
    if variant == "no_out_proj":
        return merged
    out = merged @ T.np_array(p["w_out"], dtype=dtype).T
    if p["b_out"] is not None:
        out = out + T.np_array(p["b_out"], dtype=dtype)
    return out


class _OpRecorder(_TorchFunctionMode):
    """Records the name of every torch function the forward pass calls at its own level."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(_str(_getattr(func, "__name__", func)))
        return func(*args, **(kwargs or {}))


def _fused_label(e: int, h: int, bias: bool | None) -> str:
    return f"FusedMultiHeadAttention({e}, {h}" + ("" if bias is None else f", bias={bias}") + ")"


def _build_fused(cls, e: int, h: int, bias: bool | None, p: dict | None, dtype=F32):
    """Construct the student's layer, check its parameters, load ``p`` from a real nn.MultiheadAttention."""
    label = _fused_label(e, h, bias)
    with R.fork_rng(devices=[]):
        module = call(cls, e, h, label=label) if bias is None else call(cls, e, h, bias=bias, label=label)
    if not _isinstance(module, R.Module):
        raise CheckFailure(
            f"{label}: should be an nn.Module (class FusedMultiHeadAttention(nn.Module)), got {T.type_name(module)}."
        )
    has_bias = True if bias is None else _bool(bias)
    want = {"in_proj_weight": (3 * e, e), "out_proj.weight": (e, e)}
    if has_bias:
        want.update({"in_proj_bias": (3 * e,), "out_proj.bias": (e,)})
    got = {k: T._tuple(R.shape_of(v)) for k, v in R.named_parameters(module)}
    if got != want:
        hint = ""
        if _any(k.startswith(("q_proj", "k_proj", "v_proj")) for k in got):
            hint = (
                "\n  Likely mistake: three separate projections. Keep chapter 4's parameters: one in_proj_weight (3E, E) "
                "holding W_q, W_k, W_v stacked, so that nn.MultiheadAttention's state dict loads and one matmul computes Q, K and V."
            )
        elif bias is None and "in_proj_bias" not in got:
            hint = "\n  Likely mistake: bias should default to True, as in nn.MultiheadAttention."
        raise CheckFailure(
            f"{label}: the parameters should be {{name: shape}} = {want} (nn.MultiheadAttention's), got {got}.{hint}"
        )
    if not _isinstance(_getattr(module, "out_proj", None), R.Linear):
        raise CheckFailure(f"{label}: self.out_proj should be an nn.Linear({e}, {e}), got {T.type_name(module.out_proj)}.")
    if p is not None:
        ref = R.torch_mha(e, h, has_bias, p)
        try:
            R.module_load_state_dict(module, R.module_state_dict(ref), strict=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckFailure(f"{label}: load_state_dict(nn.MultiheadAttention(...).state_dict()) failed: {exc}") from None
        R.module_train(module, False)
        try:
            R.module_to(module, dtype=dtype)
        except Exception as exc:  # noqa: BLE001
            raise CheckFailure(f"{label}: module.to({R.dname(dtype)}) failed: {exc}") from None
    return module


def _check_ops(names: list[str], label: str) -> None:
    proj = [n for n in names if n in PROJ_OPS]
    sdpa = [n for n in names if n in SDPA_OPS]
    soft = [n for n in names if n in SOFTMAX_OPS]
    if "multi_head_attention_forward" in names:
        raise CheckFailure(
            f"{label}: the forward pass calls nn.MultiheadAttention's own multi_head_attention_forward; write the layer "
            "with one QKV matmul and F.scaled_dot_product_attention."
        )
    if _len(sdpa) != 1 or soft:
        extra = f" and {_len(soft)} softmax call(s)" if soft else ""
        raise CheckFailure(
            f"{label}: the forward pass should call F.scaled_dot_product_attention exactly once; it called it "
            f"{_len(sdpa)} time(s){extra}. Likely mistake: computed the scores and the softmax yourself; let SDPA "
            "(one fused kernel on a GPU) do the attention."
        )
    if _len(proj) != 2:
        hint = ""
        if _len(proj) == 4:
            hint = (
                "\n  Likely mistake: three separate projections for Q, K and V (plus out_proj). The point of the "
                "layer is ONE QKV matmul: F.linear(x, self.in_proj_weight, self.in_proj_bias), then split the 3E outputs."
            )
        raise CheckFailure(
            f"{label}: the forward pass should do exactly two matmuls outside SDPA (one for Q, K and V together, "
            f"one in out_proj); it did {_len(proj)}: {proj}.{hint}"
        )


def _mask_np(rng, shape: tuple) -> np.ndarray:
    """A boolean mask in which every row has at least one True and one False."""
    m = rng.random(shape) < 0.6
    *lead, n, s = shape
    m[..., 0] = True
    m[..., -1] = False if s > 1 else True
    return m


def _run_fused(cls, rng, e, h, b, n, *, bias=True, dtype=F32, mask=None, causal=False, default_call=False, scale=1.0, note=""):
    p = _mha_params(rng, e, bias)
    module = _build_fused(cls, e, h, bias, p, dtype)
    x = R.rounded(rng.normal(size=(b, n, e), scale=scale), dtype)
    xt = R.tensor_of(x, dtype)
    before = R.clone(xt)
    mask_t = None
    mask_desc = ""
    if mask is not None:
        mask_t = R.tensor_of(mask, BOOL) if mask.dtype == T.np_bool else R.tensor_of(mask, dtype)
        mask_desc = f", attn_mask {('bool' if mask.dtype == T.np_bool else 'float')} {T._tuple(mask.shape)}"
    if default_call:
        desc = "(x)"
    else:
        desc = f"(x{', attn_mask=mask' if mask is not None else ''}, is_causal={causal})"
    label = f"{_fused_label(e, h, bias)}{desc} with x of shape {(b, n, e)} [{R.dname(dtype)}{mask_desc}{note}]"
    with R.no_grad():
        if default_call:
            result, calls = call(watched_call, module, xt, label=label)
        else:
            result, calls = call(watched_call, module, xt, attn_mask=mask_t, is_causal=causal, label=label)
    op_names = [_str(c.get("name")) for c in calls if T._type(c) is _dict]
    if not T.is_tensor(result):
        raise CheckFailure(f"{label}: should return a torch.Tensor (B, L, E), got {T.type_name(result)}.")
    if R.dtype_of(result) != dtype:
        raise CheckFailure(
            f"{label}: the output should keep the input's dtype {R.dname(dtype)}, got {R.dname(R.dtype_of(result))}."
        )
    out = T.tensor_to_float64(result)
    if not R.t_equal(xt, before):
        raise CheckFailure(f"{label}: the layer changed its input in place.")
    mask_np = None if mask is None else (mask if mask.dtype == T.np_bool else R.rounded(mask, dtype))
    expected = _fused_oracle(p, x, h, mask=mask_np, causal=causal)
    if dtype == F64:
        atol = 1e-9
    elif dtype == F32:
        err = max_error(
            T.np_array(_fused_oracle(p, x, h, mask=mask_np, causal=causal, dtype=T.np_float32), dtype=T.np_float64), expected
        )
        atol = max(4e-5, 16 * err)
    else:  # half precision: twice PyTorch's own nn.MultiheadAttention error at this dtype, plus a margin
        ref = R.torch_mha(e, h, bias, p, dtype)
        ref_mask = R.tensor_of(T.np_triu(T.np_ones((n, n), dtype=T.np_bool), 1), BOOL) if causal else None  # True = not allowed
        if mask is not None:
            ref_mask = R.tensor_of(~mask, BOOL) if mask.dtype == T.np_bool else mask_t
        with R.no_grad():
            ref_out, _ = R.mha_forward(ref, xt, xt, xt, attn_mask=ref_mask, need_weights=False)
        atol = 2 * max_error(T.tensor_to_float64(ref_out), expected) + 2e-2
    if T._tuple(out.shape) != (b, n, e):
        raise CheckFailure(f"{label}: the output should have shape {(b, n, e)}, got {T._tuple(out.shape)}.")
    if max_error(out, expected) > atol:
        prints = {
            FUSED_MISTAKES[m]: (lambda m=m: _fused_oracle(p, x, h, mask=mask_np, causal=causal, variant=m))
            for m in FUSED_MISTAKES
        }
        if mask is None and not causal:
            for m in ("inverted_mask", "mask_ignored", "causal_ignored"):
                prints.pop(FUSED_MISTAKES[m])
        mistake = diagnose(out, prints, atol=max(atol, 1e-6))
        lines = [
            f"{label}: the output is wrong (largest error {max_error(out, expected):.3g}, tolerance {atol:.1g}).",
            f"  expected: {show(expected)}",
            f"  got:      {show(out)}",
        ]
        if not T.np_isfinite(out).all():
            lines.append("  Your result contains NaN or inf where the correct one is finite.")
        if mistake:
            lines.append(f"  Likely mistake: {mistake}")
        raise CheckFailure("\n".join(lines))
    _check_ops(op_names, label)


def _expect_value_error(make, label: str, why: str, otherwise: str = "") -> None:
    """``make()`` must raise ValueError (``why`` says why); anything else fails with a message."""
    try:
        with R.fork_rng(devices=[]):
            make()
    except ValueError:
        return
    except NotImplementedError:
        raise CheckFailure(f"{label}: not implemented yet (the cell still raises NotImplementedError).") from None
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(f"{label}: should raise ValueError {why}; it raised {T.type_name(exc)}: {exc}.") from None
    raise CheckFailure(f"{label}: should raise ValueError {why}.{otherwise}")


def _check_fused_raises(cls, e: int, h: int) -> None:
    why = f"because embed_dim = {e} is not a multiple of num_heads = {h}"
    _expect_value_error(lambda: cls(e, h), _fused_label(e, h, None), why)


def _check_fused_gradients(cls, rng, e: int = 8, h: int = 2, b: int = 2, n: int = 5) -> None:
    """Training needs gradients: those of the layer's parameters and input equal nn.MultiheadAttention's (float64)."""
    p = _mha_params(rng, e, True)
    module = _build_fused(cls, e, h, True, p, F64)
    ref = R.torch_mha(e, h, True, p, F64)
    label = f"{_fused_label(e, h, True)}(x, is_causal=True) with x of shape {(b, n, e)} [float64, gradients of a weighted sum]"
    weights = R.tensor_of(rng.normal(size=(b, n, e)), F64)
    future = R.tensor_of(T.np_triu(T.np_ones((n, n), dtype=T.np_bool), 1), BOOL)
    x_np = rng.normal(size=(b, n, e))
    grads = {}
    no_grad_message = (
        f"{label}: the output does not require grad, so no gradient reaches the parameters. "
        "Likely mistake: the forward pass runs under torch.no_grad() or detaches a tensor (.detach(), .data); "
        "a layer must stay differentiable so that it can be trained."
    )
    x = R.requires_grad_(R.tensor_of(x_np, F64), True)
    with _enable_grad():
        reply = call(
            output_gradients,
            module,
            x,
            output_index=None,
            grad_output=weights,
            params=["in_proj_weight", "in_proj_bias", "out_proj.weight"],
            inputs=(0,),
            is_causal=True,
            label=label,
        )
    got = reply["grads"]
    if not T.is_tensor(reply["result"]) or not reply["requires_grad"]:
        raise CheckFailure(no_grad_message)
    if T._type(got) is not _list or _len(got) != 4 or not _all(g is None or T.is_tensor(g) for g in got):
        raise CheckFailure(f"{label}: the gradients came back as {T.type_name(got)}, not four tensors.")
    grads["yours"] = got[1:] + got[:1]  # x first in the reply; last here
    x = R.requires_grad_(R.tensor_of(x_np, F64), True)
    with _enable_grad():
        out, _ = R.mha_forward(ref, x, x, x, attn_mask=future, need_weights=False)
        params = [ref.in_proj_weight, ref.in_proj_bias, ref.out_proj.weight, x]
        grads["reference"] = R.autograd_grad(R.t_sum(R.t_mul(out, weights)), params, allow_unused=True)
    names = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "x"]
    for what, got, want in zip(names, grads["yours"], grads["reference"], strict=True):
        if got is None:
            raise CheckFailure(
                f"{label}: no gradient reaches {what}. Likely mistake: {what} is used through .detach() or .data, "
                "or under torch.no_grad(), in the forward pass."
            )
        error = max_error(T.tensor_to_float64(got), T.tensor_to_float64(want))
        if error > 1e-9:
            raise CheckFailure(
                f"{label}: the gradient with respect to {what} differs from nn.MultiheadAttention's by {error:.3g}."
            )


def visible_FusedMultiHeadAttention(cls) -> None:
    """Parameters, the default call, a causal call, a boolean mask (True = may attend), float64."""
    rng = T.default_rng(72)
    _build_fused(cls, 8, 2, None, None)
    _run_fused(cls, rng, 8, 2, 2, 5, default_call=True)
    _run_fused(cls, rng, 12, 3, 2, 6, causal=True)
    _run_fused(cls, rng, 8, 2, 2, 5, mask=_mask_np(rng, (5, 5)))
    _run_fused(cls, rng, 8, 4, 1, 4, dtype=F64, causal=True)
    passed("FusedMultiHeadAttention", 5)


def hidden_FusedMultiHeadAttention(cls, seed: int = 73) -> None:
    """No bias, float masks, per-batch and per-head masks, one head, head_dim 1, one token, bfloat16, large inputs."""
    rng = T.default_rng(seed)
    count = 0

    def case(*args, **kw):
        nonlocal count
        _run_fused(cls, rng, *args, **kw)
        count += 1

    case(12, 4, 2, 7, bias=False, causal=True, note=", bias=False")
    case(12, 3, 2, 6, mask=rng.normal(size=(6, 6)) * 2.0, note=", an additive float mask")
    case(8, 2, 3, 5, mask=_mask_np(rng, (3, 1, 5, 5)), note=", a mask per sequence")
    case(8, 4, 2, 4, mask=_mask_np(rng, (2, 4, 4, 4)), note=", a mask per sequence and head")
    case(6, 1, 2, 5, causal=True, note=", one head")
    case(5, 5, 2, 4, note=", head_dim = 1")
    case(8, 2, 3, 1, causal=True, note=", one token")
    case(16, 4, 2, 9, dtype=F64, mask=rng.normal(size=(2, 4, 9, 9)), note=", float64, float mask per head")
    case(16, 4, 2, 6, dtype=BF16, causal=True, note=", bfloat16")
    case(16, 2, 2, 8, scale=5.0, causal=True, note=", large inputs")
    _check_fused_gradients(cls, rng)
    _check_fused_raises(cls, 10, 4)
    passed("FusedMultiHeadAttention", count + 2, hidden=True)


# =============================================================================================
# attention_flops
# =============================================================================================

MODE_FACTORS = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def _flops_candidates(b, h, L, S, d, causal, mode) -> dict:
    base = 4.0 * b * h * L * S * d
    c = 0.5 if causal else 1.0
    f = MODE_FACTORS[mode]
    want = base * c * f
    out = {
        "did not halve the FLOPs for causal=True: the causal mask skips half of the L x S score matrix.": base * f
        if causal
        else None,
        (
            "counted 2 * B * H * L * S * D: attention has TWO matmuls (QK^T and PV), each 2 * L * S * D per head "
            "(a multiply-add is 2 FLOPs)."
        ): want / 2,
        "counted one FLOP per multiply-add and only one matmul: use 4 * B * H * L * S * D.": want / 4,
        "counted L * L instead of L * S: the score matrix is L queries by S keys.": want * L / S if L != S else None,
        "forgot the number of heads: every head does its own L x S attention.": want / h if h > 1 else None,
        "forgot the batch size.": want / b if b > 1 else None,
        "forgot head_dim: each score is a dot product of head_dim features.": want / d if d > 1 else None,
        "halved causal twice (or quartered it): causal is exactly half of the forward.": want / 2 if causal else None,
        "halved the FLOPs although causal=False.": want / 2 if not causal else None,
    }
    if mode == "bwd":
        out["used a backward factor of 2: the backward pass is 2.5 times the forward (FlashAttention's convention)."] = (
            base * c * 2.0
        )
        out["returned the forward FLOPs for mode='bwd': multiply by 2.5."] = base * c
        out["returned forward + backward for mode='bwd': 'bwd' is 2.5 times the forward, 'fwd_bwd' 3.5."] = base * c * 3.5
    if mode == "fwd_bwd":
        out["returned only the backward for mode='fwd_bwd': add the forward, 1 + 2.5 = 3.5 times the forward."] = base * c * 2.5
        out["used a backward factor of 2 in fwd_bwd: 1 + 2.5 = 3.5 times the forward."] = base * c * 3.0
        out["returned the forward FLOPs for mode='fwd_bwd': multiply by 3.5."] = base * c
    return {k: v for k, v in out.items() if v is not None and v != want}


def _check_flops_case(fn, b, h, L, S, d, causal=False, mode="fwd", *, defaults=False, note="") -> None:
    if defaults:
        label = f"attention_flops({b}, {h}, {L}, {S}, {d}){note}"
        result = call(fn, b, h, L, S, d, label=label)
    else:
        label = f"attention_flops({b}, {h}, {L}, {S}, {d}, causal={causal}, mode={mode!r}){note}"
        result = call(fn, b, h, L, S, d, causal=causal, mode=mode, label=label)
    if _isinstance(result, _bool) or not _isinstance(result, (_float, _int, _np_floating, T.np_integer)):
        hint = " (a tensor: return a Python float)" if T._isinstance(result, _Tensor) else ""
        raise CheckFailure(f"{label}: should return a float, got {T.type_name(result)}{hint}.")
    got = _float(result)
    want = 4.0 * b * h * L * S * d * (0.5 if causal else 1.0) * MODE_FACTORS[mode]
    if _abs(got - want) <= 1e-9 * want:
        return
    lines = [
        f"{label}: expected {want:.6g} FLOPs, got {got:.6g}.",
        f"  expected = 4 * B * H * L * S * D{' / 2 (causal)' if causal else ''} * {MODE_FACTORS[mode]} ({mode})",
    ]
    found = [m for m, v in _flops_candidates(b, h, L, S, d, causal, mode).items() if _abs(got - v) <= 1e-9 * _abs(v)]
    if _len(found) == 1:
        lines.append(f"  Likely mistake: {found[0]}")
    elif found:
        lines.append("  Likely mistake, one of: " + " OR ".join(found))
    raise CheckFailure("\n".join(lines))


def _check_flops_rejects(fn, mode: str) -> None:
    _expect_value_error(
        lambda: fn(1, 1, 8, 8, 4, mode=mode),
        f"attention_flops(1, 1, 8, 8, 4, mode={mode!r})",
        "for an unknown mode (the modes are 'fwd', 'bwd' and 'fwd_bwd')",
        " A silent default turns a typo into a wrong TFLOP/s figure.",
    )


def visible_attention_flops(fn) -> None:
    """The forward at 4096 tokens, causal, backward, forward + backward, the defaults, an unknown mode."""
    _check_flops_case(fn, 1, 16, 4096, 4096, 128, defaults=True, note=" (defaults: forward, not causal)")
    _check_flops_case(fn, 2, 8, 1024, 1024, 64, causal=True)
    _check_flops_case(fn, 4, 12, 512, 512, 64, mode="bwd")
    _check_flops_case(fn, 4, 12, 512, 512, 64, causal=True, mode="fwd_bwd")
    _check_flops_rejects(fn, "backward")
    passed("attention_flops", 5)


def hidden_attention_flops(fn) -> None:
    """L != S, odd sizes, every mode with and without causal, one of everything, huge counts, more bad modes."""
    count = 0
    for causal in (False, True):
        for mode in ("fwd", "bwd", "fwd_bwd"):
            _check_flops_case(fn, 3, 5, 7, 11, 13, causal=causal, mode=mode, note=" (odd sizes, L != S)")
            count += 1
    _check_flops_case(fn, 1, 1, 1, 1, 1, note=" (one of everything)")
    _check_flops_case(fn, 2, 7, 1, 4097, 128, note=" (one query against a long cache)")
    _check_flops_case(fn, 64, 64, 131072, 131072, 256, causal=True, mode="fwd_bwd", note=" (a count beyond 2**53)")
    count += 3
    for mode in ("fwd+bwd", "FWD"):
        _check_flops_rejects(fn, mode)
        count += 1
    passed("attention_flops", count, hidden=True)


# =============================================================================================
# naive_attention_bytes
# =============================================================================================


def _itemsize(dtype) -> int:
    return _int(R.element_size(R.t_empty((), dtype=dtype)))


def _naive_candidates(b: int, h: int, L: int, S: int, size: int) -> dict:
    n = b * h * L * S
    want = 2 * n * size
    out = {
        "counted one L x S matrix: a naive layer holds two at once, the scores and the softmax weights.": n * size,
        "counted three L x S matrices; this chapter counts the two that live at once: the scores and the weights.": 3 * n * size,
        "forgot the bytes per element of dtype (that is a number of elements): multiply by dtype.itemsize.": 2 * n,
        "counted bits per element instead of bytes (torch.finfo(dtype).bits is in bits: divide by 8).": want * 8,
        "assumed 4 bytes per element (float32) whatever the dtype: use dtype.itemsize.": 2 * n * 4,
        "assumed 2 bytes per element whatever the dtype: use dtype.itemsize.": 2 * n * 2,
        "forgot the number of heads: every head has its own L x S matrices.": want // h,
        "forgot the batch size: every sequence has its own L x S matrices.": want // b,
        "counted L * L instead of L * S.": 2 * b * h * L * L * size,
        "counted S * S instead of L * S.": 2 * b * h * S * S * size,
    }
    return {k: v for k, v in out.items() if v != want}


def _check_bytes_case(fn, b: int, h: int, L: int, S: int, dtype, note: str = "") -> None:
    label = f"naive_attention_bytes(batch={b}, heads={h}, L={L}, S={S}, dtype={dtype}){note}"
    try:
        result = call(fn, b, h, L, S, dtype, label=label)
    except CheckFailure as exc:
        text = _str(exc)
        if "finfo" in text or "not a floating point" in text.lower():
            raise CheckFailure(
                f"{text}\n  Likely mistake: torch.finfo only knows floating-point dtypes; the size in bytes of any dtype is "
                "dtype.itemsize (or torch.empty((), dtype=dtype).element_size())."
            ) from None
        raise
    if _isinstance(result, _bool) or not _isinstance(result, (_int, T.np_integer)):
        hint = " Use integer arithmetic (or int(...)) so the count stays exact." if _isinstance(result, _float) else ""
        raise CheckFailure(
            f"{label}: should return an int (an exact number of bytes), got {T.type_name(result)} {result!r}.{hint}"
        )
    got = _int(result)
    size = _itemsize(dtype)
    want = 2 * b * h * L * S * size
    if got == want:
        return
    lines = [
        f"{label}: expected {want:,} bytes, got {got:,}.",
        f"  expected = 2 (scores and weights) * batch * heads * L * S * {size} bytes per {R.dname(dtype)} element",
    ]
    found = [m for m, v in _naive_candidates(b, h, L, S, size).items() if v == got]
    if _len(found) > 1:  # several mistakes explain this value: keep those that also explain a probe with distinct sizes
        try:
            probe = _int(call(fn, 3, 5, 7, 11, F64, label="probe"))
            consistent = [m for m in found if _naive_candidates(3, 5, 7, 11, 8).get(m) == probe]
            found = consistent or found
        except Exception:  # noqa: BLE001  (a probe the student's function cannot handle)
            pass
    if _len(found) == 1:
        lines.append(f"  Likely mistake: {found[0]}")
    elif found:
        lines.append("  Likely mistake, one of: " + " OR ".join(found))
    raise CheckFailure("\n".join(lines))


def visible_naive_attention_bytes(fn) -> None:
    """bfloat16 at 4096 tokens (exactly 1 GiB), float32 with L != S, float16 with a batch."""
    _check_bytes_case(fn, 1, 16, 4096, 4096, BF16, " (16 heads, 4096 tokens: 1 GiB)")
    _check_bytes_case(fn, 2, 4, 100, 300, F32, " (L != S)")
    _check_bytes_case(fn, 8, 32, 2048, 2048, F16)
    passed("naive_attention_bytes", 3)


def hidden_naive_attention_bytes(fn) -> None:
    """float64, odd sizes, one of everything, a count beyond 2**53, float8."""
    cases = [
        (3, 5, 7, 11, F64, " (odd sizes, float64)"),
        (1, 1, 1, 1, F32, " (one of everything)"),
        (5, 3, 1, 4097, BF16, " (one query, a long context)"),
        (4099, 128, 131072, 131072, F32, " (a count beyond 2**53: keep it an exact int)"),
    ]
    if F8 is not None:
        cases.append((2, 8, 1024, 1024, F8, " (float8)"))
    for args in cases:
        _check_bytes_case(fn, *args)
    passed("naive_attention_bytes", _len(cases), hidden=True)


# {exercise: (visible points, hidden points)}, in the order the exercises appear.
POINTS = {
    "benchmark": (2, 2),
    "FusedMultiHeadAttention": (2, 2),
    "attention_flops": (1, 1),
    "naive_attention_bytes": (1, 1),
}
