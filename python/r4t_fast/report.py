"""Render evaluation records (``r4t eval`` JSON files) into a Markdown report and PNG plots.

``r4t report FILES... --out DIR`` writes:

* ``DIR/report.md``: three tables, one row per record -- WSCR retrieval (Recall@K, Hit@K, MRecall@k,
  category coverage, in %), set quality (Vendi and the OAR properties groundedness / diversity /
  alignment / composite, in % of their ``[0, 1]`` forms) and latency (ms per query at batch 1/8/64).
  Means come with their 95% bootstrap CI as ``mean (low-high)`` where the record has one;
* ``DIR/quality.png``: grouped bars of the key quality metrics per method, one panel per dataset, with
  the CIs as error bars;
* ``DIR/latency.png``: ms per query against batch size (log-log), one line per method and dataset.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "add_cli_arguments",
    "cli_main",
    "load_records",
    "markdown_report",
    "plot_latency",
    "plot_quality",
    "render_report",
]

_REQUIRED = ("dataset", "method", "split", "n_queries", "metrics")
_METHOD_ORDER = ("dense", "mmr", "dpp", "llm-zeroshot", "llm-bon", "folm", "r4t-diffusion")
_QUALITY_KEYS = (
    ("vendi", "Vendi", 1.0),
    ("groundedness", "ground.", 100.0),
    ("diversity", "div.", 100.0),
    ("alignment", "align.", 100.0),
    ("item_alignment", "item align.", 100.0),
    ("composite", "composite", 100.0),
    ("ild", "ILD", 100.0),
)
_RECALL = re.compile(r"^(recall|hit)@(\d+)$")


class ReportError(ValueError):
    """An input file is not an evaluation record."""


def load_records(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read evaluation records; each gets ``_path``. Raises :class:`ReportError` naming the bad file."""
    if not paths:
        raise ReportError("files: expected at least one evaluation record (.json)")
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ReportError(f"files: {path} does not exist")
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReportError(f"{path}: not a JSON file ({exc})") from None
        if not isinstance(rec, dict):
            raise ReportError(f"{path}: expected a JSON object (an r4t eval record)")
        missing = [k for k in _REQUIRED if k not in rec]
        if missing or not isinstance(rec.get("metrics"), dict):
            raise ReportError(f"{path}: not an r4t eval record (missing {', '.join(missing) or 'metrics'})")
        rec = dict(rec)
        rec["_path"] = str(path)
        out.append(rec)
    return _sorted(out)


def _sorted(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(r: dict[str, Any]) -> tuple[str, int, str]:
        m = str(r["method"])
        return (str(r["dataset"]), _METHOD_ORDER.index(m) if m in _METHOD_ORDER else len(_METHOD_ORDER), m)

    return sorted(records, key=key)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _cell(rec: dict[str, Any], key: str, scale: float, digits: int = 1) -> str:
    mean = _num(rec["metrics"].get(key))
    if mean is None:
        return "–"
    text = f"{mean * scale:.{digits}f}"
    ci = (rec.get("ci") or {}).get(key)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(v) is not None for v in ci):
        text += f" ({ci[0] * scale:.{digits}f}–{ci[1] * scale:.{digits}f})"
    return text


def _recall_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    ks = sorted({int(m.group(2)) for r in records for key in r["metrics"] if (m := _RECALL.match(key))})
    return [f"{kind}@{k}" for k in ks for kind in ("recall", "hit")]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _latency_note(rec: dict[str, Any]) -> str:
    lat = (rec.get("config") or {}).get("latency") or {}
    per = lat.get("per_batch") or {}
    if not per:
        return "–"
    return ", ".join(f"{b}: {v.get('queries', '?')} q" for b, v in per.items())


def markdown_report(records: Sequence[dict[str, Any]], *, title: str = "Evaluation results") -> str:
    """The Markdown report of several records (see the module docstring)."""
    records = _sorted(list(records))
    lines = [f"# {title}", ""]
    rkeys = _recall_keys(records)
    mrk = sorted({key for r in records for key in r["metrics"] if key.startswith("mrecall@")})
    has_cov = any(_num(r["metrics"].get("category_coverage")) is not None for r in records)
    lines += [
        "## Set retrieval against the reference set (WSCR), % with 95% bootstrap CI",
        "",
        "Recall@K / Hit@K: the union of the first K/k candidates of each of the k = 10 rows "
        "(subqueries or repeated query) against the set's own items; MRecall@k on the k retrieved items.",
        "",
    ]
    header = ["dataset", "method", "n"] + [k.replace("recall", "R").replace("hit", "H") for k in rkeys]
    header += [k.replace("mrecall", "MR") for k in mrk] + (["cat. cov."] if has_cov else [])
    rows = []
    for r in records:
        row = [str(r["dataset"]), str(r["method"]), str(r["n_queries"])]
        row += [_cell(r, k, 100.0) for k in rkeys + mrk]
        if has_cov:
            row.append(_cell(r, "category_coverage", 100.0))
        rows.append(row)
    lines += _table(header, rows) + [""]

    lines += [
        "## Set quality: Vendi of the k items (raw, in [1, k]) and OAR properties (% of their [0, 1] forms)",
        "",
        "composite = 0.6 groundedness + 0.2 diversity + 0.2 alignment (the paper's OAR reward weights). "
        "Groundedness and alignment score the rows the method retrieved with (the subqueries; the raw query "
        "for dense/MMR/DPP, hence alignment 100); item align. = (1 + mean cos(item, query)) / 2 scores the "
        "retrieved items' relevance.",
        "",
    ]
    qkeys = [q for q in _QUALITY_KEYS if any(_num(r["metrics"].get(q[0])) is not None for r in records)]
    header = ["dataset", "method", "n"] + [label for _, label, _ in qkeys]
    rows = [
        [str(r["dataset"]), str(r["method"]), str(r["n_queries"])]
        + [_cell(r, key, scale, 2 if scale == 1.0 else 1) for key, _, scale in qkeys]
        for r in records
    ]
    lines += _table(header, rows) + [""]

    batches = sorted({int(b) for r in records for b in (r.get("latency_ms_per_query") or {})})
    if batches:
        lines += ["## Latency, ms per query (wall clock, the set only)", ""]
        header = ["dataset", "method"] + [f"batch {b}" for b in batches] + ["queries timed", "machine"]
        rows = []
        for r in records:
            lat = r.get("latency_ms_per_query") or {}
            cells = []
            for b in batches:
                v = _num(lat.get(str(b)))
                cells.append("–" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}"))
            mach = r.get("machine") or {}
            m = f"{mach.get('cpu', '?')}, {mach.get('cores', '?')} cores"
            if mach.get("torch_threads"):
                m += f", {mach['torch_threads']} thread(s)"
            if mach.get("gpu"):
                m += f", {mach['gpu']}"
            rows.append([str(r["dataset"]), str(r["method"]), *cells, _latency_note(r), m])
        lines += _table(header, rows) + [""]

    notes = []
    for r in records:
        st = r.get("method_stats")
        if st:
            notes.append(
                f"- {r['dataset']} / {r['method']}: {st.get('n_completions', '?')} completions, format "
                f"failures {100 * st.get('format_failure_rate', 0):.0f}%, rows filled with the raw query "
                f"{100 * st.get('fallback_row_rate', 0):.0f}%, "
                f"mean {st.get('mean_new_tokens', 0):.0f} new tokens."
            )
    if notes:
        lines += ["## LLM fan-out output quality", "", *notes, ""]
    lines += ["## Records", ""]
    for r in records:
        cfg = r.get("config") or {}
        lines.append(
            f"- `{Path(r['_path']).name if '_path' in r else '?'}`: {r['dataset']}/{r['split']}, "
            f"{r['method']}, {r['n_queries']} queries"
            + (f" (limit {cfg['limit']})" if cfg.get("limit") else "")
            + (
                f", {cfg['n_skipped_untitled']} untitled sets skipped"
                if cfg.get("n_skipped_untitled")
                else ""
            )
            + f"; {r.get('date', '?')}; `{r.get('command', '?')}`"
        )
    lines.append("")
    return "\n".join(lines)


def _bar_keys(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    rk = [k for k in _recall_keys(records) if k.endswith("@1000") or k.endswith("@5000")]
    if not rk:
        rk = _recall_keys(records)[:2]
    keys = [(k, k.replace("recall", "R").replace("hit", "H")) for k in rk]
    keys += [(k, label) for k, label, s in _QUALITY_KEYS if s == 100.0 and k != "ild"]
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


def render_report(
    files: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    title: str = "Evaluation results",
    notes: str | None = None,
) -> dict[str, Path]:
    """Load ``files`` and write ``report.md``, ``quality.png`` and ``latency.png`` into ``out_dir``.

    Args:
        files: evaluation records (JSON files written by ``r4t eval``).
        out_dir: output directory (created if needed).
        title: the report's title.
        notes: Markdown appended to the report under "## Notes" (protocol choices, caveats).

    Returns:
        ``{"markdown": path, "quality": path, "latency": path}`` (``latency`` absent when no record has
        latency numbers).
    """
    records = load_records(files)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"out_dir: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    text = markdown_report(records, title=title)
    if notes:
        text = text.rstrip("\n") + "\n\n## Notes\n\n" + notes.strip() + "\n"
    text = text.rstrip("\n") + "\n\n![quality per method](quality.png)\n"
    paths: dict[str, Path] = {"quality": plot_quality(records, out / "quality.png")}
    lat = plot_latency(records, out / "latency.png")
    if lat is not None:
        paths["latency"] = lat
        text += "\n![latency vs batch size](latency.png)\n"
    md.write_text(text, encoding="utf-8")
    paths["markdown"] = md
    return paths


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``r4t report``."""
    parser.add_argument("files", nargs="+", help="evaluation records written by `r4t eval`")
    parser.add_argument("--out", required=True, help="output directory (report.md, quality.png, latency.png)")
    parser.add_argument("--title", default="Evaluation results", help="report title")
    parser.add_argument("--notes", default=None, help="a Markdown file appended to the report as '## Notes'")


def cli_main(args: argparse.Namespace) -> int:
    """``r4t report``: render the records; prints the Markdown and the written paths."""
    try:
        notes = None
        if args.notes is not None:
            try:
                notes = Path(args.notes).read_text(encoding="utf-8")
            except OSError as exc:
                raise ReportError(f"--notes: cannot read {args.notes} ({exc})") from None
        paths = render_report(args.files, args.out, title=args.title, notes=notes)
    except ReportError as exc:
        print(f"r4t report: error: {exc}", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text(encoding="utf-8"))
    for kind, p in paths.items():
        print(f"wrote {kind}: {p}")
    return 0
