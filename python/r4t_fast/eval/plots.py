"""The report's plots: quality per method (grouped bars with CIs) and latency against batch size."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from r4t_fast.eval.records import HEADLINE_COLUMNS
from r4t_fast.eval.records import num as _num
from r4t_fast.eval.records import sort_records as _sorted

__all__ = ["plot_frontier", "plot_latency", "plot_quality"]


def _bar_keys(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    keys = [(key, label) for key, label, scale, _ in HEADLINE_COLUMNS if scale == 100.0]
    return [(k, lab) for k, lab in keys if any(_num(r["metrics"].get(k)) is not None for r in records)]


def plot_quality(records: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Grouped bars (metric groups x methods), one panel per dataset, CIs as error bars; saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = _sorted(list(records))
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    keys = _bar_keys(records)
    methods = list(dict.fromkeys(r["method"] for r in records))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(
        len(datasets), 1, figsize=(max(9.0, 1.3 * len(keys) + 5), 3.6 * len(datasets)), squeeze=False
    )
    for ax, ds in zip(axes[:, 0], datasets, strict=True):
        recs = [r for r in records if r["dataset"] == ds]
        width = 0.8 / max(len(recs), 1)
        x = np.arange(len(keys))
        for j, r in enumerate(recs):
            vals, lo, hi = [], [], []
            for key, _ in keys:
                v = _num(r["metrics"].get(key))
                v = np.nan if v is None else 100.0 * v
                ci = (r.get("ci") or {}).get(key)
                ok = isinstance(ci, list) and len(ci) == 2 and all(_num(c) is not None for c in ci)
                vals.append(v)
                lo.append(max(v - 100.0 * ci[0], 0.0) if ok and np.isfinite(v) else 0.0)
                hi.append(max(100.0 * ci[1] - v, 0.0) if ok and np.isfinite(v) else 0.0)
            ax.bar(
                x + (j - (len(recs) - 1) / 2) * width,
                vals,
                width,
                yerr=[lo, hi],
                capsize=2,
                label=f"{r['method']} (n={r['n_queries']})",
                color=colors[r["method"]],
            )
        ax.set_xticks(x, [label for _, label in keys])
        ax.set_ylabel("%")
        ax.set_ylim(0, 105)
        ax.set_title(f"{ds} ({recs[0]['split']} split): quality per method, 95% CI")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_latency(records: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path | None:
    """ms per query against batch size, log-log, one line per (dataset, method); ``None`` if no latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in _sorted(list(records)) if r.get("latency_ms_per_query")]
    if not records:
        return None
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in records:
        pts = sorted(
            (int(b), v)
            for b, ms in r["latency_ms_per_query"].items()
            if (v := _num(ms)) is not None and v > 0
        )
        if not pts:
            continue
        ls = styles[datasets.index(r["dataset"]) % len(styles)]
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            ls,
            marker="o",
            color=colors[r["method"]],
            label=f"{r['method']} / {r['dataset']}",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({int(b) for r in records for b in r["latency_ms_per_query"]})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (queries per call)")
    ax.set_ylabel("ms per query (log)")
    mach = records[0].get("machine") or {}
    where = f"{mach.get('cpu', 'unknown machine')}, {mach.get('cores', '?')} cores"
    if mach.get("torch_threads"):
        where += f", {mach['torch_threads']} torch thread(s)"
    if mach.get("gpu"):
        where += f", {mach['gpu']}"
    ax.set_title(f"Latency per query vs batch size ({where})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_frontier(
    points: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "recall vs diversity"
) -> Path:
    """``recall_at_fair`` (x100) against ``vendi``, one marker per point, one colour and line per
    ``family`` (points of a family joined in the given order: a knob traced); saves a PNG.

    Each point: ``{"family": str, "label": str, "recall_at_fair": float, "vendi": float}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(dict.fromkeys(p["family"] for p in points))
    colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(fams)}
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for f in fams:
        pts = [p for p in points if p["family"] == f]
        xs = [p["vendi"] for p in pts]
        ys = [100.0 * p["recall_at_fair"] for p in pts]
        ax.plot(xs, ys, "-o" if len(pts) > 1 else "o", color=colors[f], label=f, markersize=5)
        for p, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(p["label"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("Vendi (diversity of the k items)")
    ax.set_ylabel("recall_at_fair (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
