"""Plots of an attention benchmark result: time, TFLOP/s and peak memory against sequence length.

``plot_result(result, json_path)`` writes ``<json stem>-<suite>-<metric>.png`` next to the JSON,
one figure per suite and metric, one panel per model size (layers: E; kernels: D and causal),
each titled with the device, the date and the versions. Only points with status "ok" are drawn;
each panel lists the points that are missing and why (out of memory, unsupported, wrong).
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks import attention_measure as am

METRICS = {
    "time": ("median_ms", "median ms per call (log; band: ± IQR/2)", "time"),
    "tflops": ("tflops", "achieved TFLOP/s", "throughput"),
    "memory": ("peak_mem_bytes", "peak memory allocated (GiB)", "peak memory"),
}
SUITE_TITLES = {
    "layers": "Self-attention layers, bf16 forward (FLOPs: attention + projections)",
    "kernels": "Attention kernels, bf16 forward (FLOPs: attention only)",
    "training": "Attention kernels, bf16 forward + backward (FLOPs: 3.5 x the forward's)",
}
IMPL_ORDER = (*am.LAYER_IMPLS, "triton")


def _panel_key(suite: str, row: dict) -> tuple:
    return (row["heads"] * row["head_dim"],) if suite == "layers" else (row["head_dim"], row["causal"])


def _panel_title(suite: str, key: tuple, rows: list[dict]) -> str:
    batches = sorted({r["batch"] for r in rows})
    tokens = sorted({r["batch"] * r["seq_len"] for r in rows})
    heads = sorted({r["heads"] for r in rows})
    size = f"B = {batches[0]}" if len(batches) == 1 else f"B·N = {tokens[0]}" if len(tokens) == 1 else "B varies"
    if suite == "layers":
        return f"E = {key[0]}, H = {heads[0]}, {size}"
    return f"D = {key[0]}, H = {heads[0]}, {size}, {'causal' if key[1] else 'not causal'}"


def _short(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def subtitle(result: dict) -> str:
    v = result["versions"]
    parts = [
        f"{name} {v[key]}"
        for key, name in (("torch", "torch"), ("triton", "Triton"), ("cuda", "CUDA"), ("cudnn", "cuDNN"), ("driver", "driver"))
        if v.get(key)
    ]
    return f"{result['device']}, {result['date']}; " + ", ".join(parts)


def plot_result(result: dict, json_path: Path) -> list[Path]:
    """Write the PNGs of ``result`` next to ``json_path``; returns their paths ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (redraw later with --plot-only FILE.json)")
        return []
    colours = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(IMPL_ORDER)}
    written = []
    for suite in ("layers", "kernels", "training"):
        rows = [r for r in result["rows"] if r["suite"] == suite]
        if not rows:
            continue
        panels: dict[tuple, list[dict]] = {}
        for row in rows:
            panels.setdefault(_panel_key(suite, row), []).append(row)
        keys = sorted(panels)
        impls = {r["impl"] for r in rows if r["status"] == "ok"}
        ncol = min(max(len(impls) + 1, 1), 3 * len(keys))
        legend_rows = math.ceil((len(impls) + 1) / ncol)
        height = 4.4 + 0.28 * legend_rows
        for metric, (field, ylabel, what) in METRICS.items():
            fig, axes = plt.subplots(1, len(keys), figsize=(max(6.4, 5.2 * len(keys)), height), squeeze=False)
            for ax, key in zip(axes[0], keys, strict=True):
                _draw_panel(ax, suite, key, panels[key], field, metric, colours, result["peak_tflops"])
                ax.set_ylabel(ylabel)
            handles, labels = axes[0][0].get_legend_handles_labels()
            for ax in axes[0][1:]:
                for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
                    if label not in labels:
                        handles.append(h)
                        labels.append(label)
            fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
            fig.suptitle(f"{SUITE_TITLES[suite]}: {what}\n{subtitle(result)}", fontsize=10)
            fig.tight_layout(rect=(0, (0.28 * legend_rows + 0.1) / height, 1, 1))
            path = json_path.with_name(f"{json_path.stem}-{suite}-{metric}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _draw_panel(ax, suite: str, key: tuple, rows: list[dict], field: str, metric: str, colours: dict, peak: float | None) -> None:
    missing: dict[str, list[str]] = {}
    lengths = sorted({r["seq_len"] for r in rows})
    for impl in IMPL_ORDER:
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["seq_len"])
        ok = [r for r in mine if r["status"] == "ok" and r[field] is not None]
        for r in mine:
            if r["status"] != "ok":
                missing.setdefault(f"{impl}: {r['status']}", []).append(_short(r["seq_len"]))
        if not ok:
            continue
        xs = [r["seq_len"] for r in ok]
        ys = [r[field] / 2**30 if metric == "memory" else r[field] for r in ok]
        style = "-" if impl in ("fused", "triton") else "--" if impl.startswith("sdpa:") else "-."
        ax.plot(
            xs,
            ys,
            style,
            marker="o",
            markersize=4,
            linewidth=2.2 if impl in ("fused", "triton") else 1.3,
            color=colours[impl],
            label=impl,
        )
        if metric == "time":
            lo = [max(r["median_ms"] - r["iqr_ms"] / 2, r["median_ms"] / 20) for r in ok]  # > 0 on a log axis
            hi = [r["median_ms"] + r["iqr_ms"] / 2 for r in ok]
            ax.fill_between(xs, lo, hi, color=colours[impl], alpha=0.2, linewidth=0)
    if metric == "tflops" and peak:
        ax.axhline(peak, color="black", linestyle=":", linewidth=1, label=f"peak {peak:g} TFLOP/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_short(n) for n in lengths])
    if metric == "time" and ax.lines:
        ax.set_yscale("log")
    ax.set_xlabel("sequence length L" if suite == "layers" else "sequence length N")
    ax.set_title(_panel_title(suite, key, rows), fontsize=9)
    ax.grid(True, alpha=0.3)
    if missing:
        lines = [f"{what} at {', '.join(at)}" for what, at in missing.items()]
        shown = lines if len(lines) <= 6 else [*lines[:5], f"... and {len(lines) - 5} more"]
        box = {"facecolor": "white", "alpha": 0.85, "edgecolor": "lightgray", "boxstyle": "round"}
        ax.text(
            0.98,
            0.98,
            "not drawn:\n" + "\n".join(shown),
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=6,
            color="dimgray",
            bbox=box,
        )
