"""Render evaluation records (``r4t eval`` JSON files) into a Markdown report and PNG plots.

``r4t report FILES... --out DIR`` writes ``DIR/report.md``, ``DIR/quality.png`` and ``DIR/latency.png``.
The report has one section per dataset and split; records of one section must have been scored on the
same queries (the same ``query_ids_sha256``) -- otherwise the report is refused with a one-line error,
because means over different queries do not compare. Each section leads with:

* **the headline table**: the item-level metrics that mean the same for every method family --
  ``recall_at_fair`` / ``hit_at_fair`` at the fair budget ``K``, ``item_relevance``, ``vendi`` of the ``k``
  items, ``category_coverage``, ``ild`` (means with 95% bootstrap CIs, in %; Vendi raw) -- and ms per
  query at batch 8, the best value of each column in bold;
* **paired differences** of every method against a reference method (``--reference``; default
  ``r4t-diffusion`` when present, else ``dense``): per-query differences on the same queries with a 95%
  paired bootstrap CI (:func:`r4t_fast.eval.stats.paired_bootstrap_ci`), ``*`` where the CI excludes 0;

then the secondary tables: the paper's fixed-quota Recall/Hit@K (and at the fair budget), the row-based
OAR terms (``row_*``: scored on the rows a method retrieved with, so they compare fan-outs with fan-outs
only, never in the headline), latency (median and p25-p75 over the timed calls, the diffusion
retriever's encode/sample/ground breakdown), the LLM methods' output quality and the list of records.
``--appendix FILE`` adds records on other queries (e.g. every test query, for the methods fast enough)
as a separate part with its own sections.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from r4t_fast.eval.plots import plot_frontier, plot_latency, plot_quality
from r4t_fast.eval.records import HEADLINE_COLUMNS, paired_difference
from r4t_fast.eval.records import num as _num
from r4t_fast.eval.records import sort_records as _sorted

__all__ = [
    "HEADLINE_COLUMNS",
    "ReportError",
    "add_cli_arguments",
    "cli_main",
    "group_records",
    "load_records",
    "markdown_report",
    "plot_latency",
    "plot_quality",
    "render_report",
]

_REQUIRED = ("dataset", "method", "split", "n_queries", "metrics")
_ROW_COLUMNS = (
    ("row_groundedness", "row ground.", 100.0, 1),
    ("row_diversity", "row div.", 100.0, 1),
    ("row_alignment", "row align.", 100.0, 1),
    ("row_composite", "row composite", 100.0, 1),
)
_HEADLINE_BATCH = "8"
_RECALL = re.compile(r"^(recall|hit)@(\d+)$")


class ReportError(ValueError):
    """An input file is not an evaluation record, or records cannot share a table."""


def load_records(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read evaluation records; each gets ``_path``. Raises :class:`ReportError` naming the bad file.

    A record without ``query_ids_sha256`` (written before the same-query rule) is refused: it cannot be
    checked against the others.
    """
    if not paths:
        raise ReportError("files: expected at least one evaluation record (.json)")
    out = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            n = len(list(path.glob("*.json")))
            raise ReportError(
                f"files: {path} is a directory ({n} .json records in it); pass the record files, "
                f"e.g. {path}/*.json"
            )
        if not path.is_file():
            raise ReportError(
                f"files: {path} does not exist" if not path.exists() else f"files: {path} is not a file"
            )
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReportError(f"{path}: not a JSON file ({exc})".replace("\n", " ")) from None
        if not isinstance(rec, dict):
            raise ReportError(f"{path}: expected a JSON object (an r4t eval record)")
        missing = [k for k in _REQUIRED if k not in rec]
        if missing or not isinstance(rec.get("metrics"), dict):
            raise ReportError(f"{path}: not an r4t eval record (missing {', '.join(missing) or 'metrics'})")
        if not isinstance(rec.get("query_ids_sha256"), str):
            raise ReportError(
                f"{path}: no query_ids_sha256 (a record from before the same-query rule); "
                "regenerate it with r4t eval"
            )
        rec = dict(rec)
        rec["_path"] = str(path)
        out.append(rec)
    return _sorted(out)


def _name(rec: dict[str, Any]) -> str:
    return Path(rec["_path"]).name if "_path" in rec else f"{rec['dataset']}/{rec['method']}"


def group_records(records: Sequence[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """``[(dataset, split, records)]``, one group per table; raises :class:`ReportError` when the records
    of one dataset and split were scored on different queries (different ``query_ids_sha256``)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in _sorted(list(records)):
        groups.setdefault((str(r["dataset"]), str(r["split"])), []).append(r)
    out = []
    for (ds, split), recs in groups.items():
        by_hash: dict[str, list[str]] = {}
        for r in recs:
            by_hash.setdefault(str(r.get("query_ids_sha256")), []).append(f"{_name(r)} (n={r['n_queries']})")
        if len(by_hash) > 1:
            parts = "; ".join(f"{h[:12]}: {', '.join(names)}" for h, names in by_hash.items())
            raise ReportError(
                f"{ds}/{split}: records scored on different queries cannot share a table "
                f"(query_ids_sha256 {parts}); score every method on the same queries "
                "(r4t eval --limit N for all, or r4t_fast.eval.records.subset_record)"
            )
        out.append((ds, split, recs))
    return out


def _fmt(v: float, digits: int) -> str:
    return f"{v:.{digits}f}"


def _cell(rec: dict[str, Any], key: str, scale: float, digits: int = 1, bold: bool = False) -> str:
    mean = _num(rec["metrics"].get(key))
    if mean is None:
        return "–"
    text = _fmt(mean * scale, digits)
    if bold:
        text = f"**{text}**"
    ci = (rec.get("ci") or {}).get(key)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(v) is not None for v in ci):
        text += f" ({_fmt(ci[0] * scale, digits)}–{_fmt(ci[1] * scale, digits)})"
    return text


def _ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _recall_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    ks = sorted({int(m.group(2)) for r in records for key in r["metrics"] if (m := _RECALL.match(key))})
    return [f"{kind}@{k}" for k in ks for kind in ("recall", "hit")]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _labels(records: Sequence[dict[str, Any]]) -> list[str]:
    """Row labels: the method, plus the file name where a method appears twice in one table."""
    methods = [str(r["method"]) for r in records]
    return [
        m if methods.count(m) == 1 else f"{m} (`{Path(r.get('_path', '?')).stem}`)"
        for m, r in zip(methods, records, strict=True)
    ]


def _best(records: Sequence[dict[str, Any]], get: Any, lower: bool = False) -> float | None:
    vals = [v for r in records if (v := get(r)) is not None]
    if len(vals) < 2 or min(vals) == max(vals):  # nothing to single out
        return None
    return min(vals) if lower else max(vals)


def _fair_k(records: Sequence[dict[str, Any]]) -> str:
    ks = sorted({int(v) for r in records if (v := _num(r["metrics"].get("fair_budget"))) is not None})
    return "K = " + "/".join(str(k) for k in ks) if ks else "K = ?"


def _headline(records: Sequence[dict[str, Any]]) -> list[str]:
    cols = [c for c in HEADLINE_COLUMNS if any(c[0] in r["metrics"] for r in records)]
    lat = lambda r: _num((r.get("latency_ms_per_query") or {}).get(_HEADLINE_BATCH))  # noqa: E731
    best = {key: _best(records, lambda r, key=key: _num(r["metrics"].get(key))) for key, *_ in cols}
    best_lat = _best(records, lat, lower=True)
    header = ["method", "n"] + [
        f"{label} ({_fair_k(records)})" if key == "recall_at_fair" else label for key, label, _, _ in cols
    ]
    header.append(f"ms/query @{_HEADLINE_BATCH}")
    rows = []
    for label, r in zip(_labels(records), records, strict=True):
        row = [label, str(r["n_queries"])]
        for key, _, scale, digits in cols:
            v = _num(r["metrics"].get(key))
            row.append(_cell(r, key, scale, digits, bold=v is not None and v == best[key]))
        ms = lat(r)
        text = _ms(ms)
        row.append(f"**{text}**" if ms is not None and ms == best_lat else text)
        rows.append(row)
    return _table(header, rows)


def _reference(records: Sequence[dict[str, Any]], reference: str | None) -> dict[str, Any] | None:
    methods = [str(r["method"]) for r in records]
    for want in ([reference] if reference else []) + ["r4t-diffusion", "dense"]:
        if want in methods:
            return records[methods.index(want)]
    return records[0] if records else None


def _differences(records: Sequence[dict[str, Any]], reference: str | None, n_boot: int) -> list[str]:
    ref = _reference(records, reference)
    if ref is None or len(records) < 2:
        return []
    cols = [c for c in HEADLINE_COLUMNS if any(c[0] in r["metrics"] for r in records)]
    ref_label = _labels(records)[records.index(ref)]
    lines = [
        f"Paired differences against **{ref_label}** on the same queries (method − {ref_label}; same "
        "units as above; 95% paired bootstrap CI over queries; `*`: the CI excludes 0).",
        "",
    ]
    header = ["method"] + [label for _, label, _, _ in cols]
    rows = []
    for label, r in zip(_labels(records), records, strict=True):
        if r is ref:
            continue
        row = [label]
        for key, _, scale, digits in cols:
            diff = paired_difference(r, ref, key, n_boot=n_boot)
            if diff is None:
                row.append("–")
                continue
            ci = diff[0]
            mark = "*" if ci.excludes_zero else ""
            lo, hi = f"{ci.low * scale:+.{digits}f}", f"{ci.high * scale:+.{digits}f}"
            row.append(f"{ci.mean * scale:+.{digits}f}{mark} ({lo}, {hi})")
        rows.append(row)
    return lines + _table(header, rows)


def _secondary_recall(records: Sequence[dict[str, Any]]) -> list[str]:
    keys = [
        k for k in ("recall_at_fair_quota", "hit_at_fair_quota") if any(k in r["metrics"] for r in records)
    ]
    keys += _recall_keys(records)
    keys += sorted({key for r in records for key in r["metrics"] if key.startswith("mrecall@")})
    if not keys:
        return []
    labels = {"recall_at_fair_quota": "R@fair quota", "hit_at_fair_quota": "H@fair quota"}
    header = ["method"] + [
        labels.get(k, k.replace("mrecall", "MR").replace("recall", "R").replace("hit", "H")) for k in keys
    ]
    rows = [
        [label] + [_cell(r, k, 100.0) for k in keys]
        for label, r in zip(_labels(records), records, strict=True)
    ]
    return [
        "Secondary: the paper's fixed-quota protocol -- R@K / H@K take the first K/k candidates of each of "
        'the k rows, so rows that overlap give fewer than K items; "fair quota" is that protocol at the '
        "fair budget. MR@k (MRecall) on the k items. %.",
        "",
        *_table(header, rows),
    ]


def _row_terms(records: Sequence[dict[str, Any]]) -> list[str]:
    cols = [c for c in _ROW_COLUMNS if any(c[0] in r["metrics"] for r in records)]
    if not cols:
        return []
    header = ["method"] + [label for _, label, _, _ in cols]
    rows = [
        [label] + [_cell(r, key, scale, digits) for key, _, scale, digits in cols]
        for label, r in zip(_labels(records), records, strict=True)
    ]
    return [
        "Secondary, row-based: the paper's OAR terms on the rows each method retrieved *with* "
        "(row composite = 0.6 ground. + 0.2 div. + 0.2 align., % of their [0, 1] forms). Dense, MMR and "
        "DPP retrieve with the raw query, so their row alignment is 100 by construction: compare these "
        "columns between fan-out methods only.",
        "",
        *_table(header, rows),
    ]


def _latency(records: Sequence[dict[str, Any]]) -> list[str]:
    batches = sorted({int(b) for r in records for b in (r.get("latency_ms_per_query") or {})})
    if not batches:
        return []
    has_brk = any(r.get("latency_breakdown_ms") for r in records)
    header = ["method"] + [f"batch {b}" for b in batches] + ["calls"]
    header += [f"encode / sample / ground @{_HEADLINE_BATCH}"] if has_brk else []
    header.append("machine")
    rows = []
    for label, r in zip(_labels(records), records, strict=True):
        lat = r.get("latency_ms_per_query") or {}
        spread = r.get("latency_spread_ms_per_query") or {}
        cells = []
        for b in batches:
            v = _num(lat.get(str(b)))
            sp = spread.get(str(b)) or {}
            text = _ms(v)
            if v is not None and _num(sp.get("p25")) is not None and _num(sp.get("p75")) is not None:
                text += f" ({_ms(sp['p25'])}–{_ms(sp['p75'])})"
            cells.append(text)
        cfg = (r.get("config") or {}).get("latency") or {}
        calls = cfg.get("min_calls")
        cells.append("–" if calls is None else f"≥ {calls}")
        if has_brk:
            brk = (r.get("latency_breakdown_ms") or {}).get(_HEADLINE_BATCH) or {}
            parts = [_num(brk.get(p)) for p in ("encode", "sample", "ground")]
            cells.append(" / ".join(_ms(v) for v in parts) if any(v is not None for v in parts) else "–")
        mach = r.get("machine") or {}
        m = f"{mach.get('cpu', '?')}, {mach.get('cores', '?')} cores"
        if mach.get("torch_threads"):
            m += f", {mach['torch_threads']} thread(s)"
        if mach.get("gpu"):
            m += f", {mach['gpu']}"
        rows.append([label, *cells, m])
    return [
        "Latency, ms per query: median (p25–p75) over the timed calls of `retrieve(batch, k)` after a "
        "warm-up (the set only, no Recall candidates).",
        "",
        *_table(header, rows),
    ]


def _flags(records: Sequence[dict[str, Any]]) -> list[str]:
    out = [f"- **flag**, {_name(r)}: {f}" for r in records for f in (r.get("flags") or [])]
    return out + [""] if out else []


def _llm_notes(records: Sequence[dict[str, Any]]) -> list[str]:
    notes = []
    for r in records:
        st = r.get("method_stats")
        if not st or "no_subquery_rate" not in st:
            continue
        k = (r.get("config") or {}).get("k", "k")
        notes.append(
            f"- {r['dataset']} / {r['method']}: {st.get('n_completions', '?')} completions; usable "
            f"subqueries {st.get('usable_subqueries', 0):.2f} of {k}; no usable subquery "
            f"{100 * st.get('no_subquery_rate', 0):.0f}%; strict-format failures "
            f"{100 * st.get('strict_format_failure_rate', 0):.0f}%; rows filled with the raw query "
            f"{100 * st.get('missing_row_rate', 0):.0f}%; mean {st.get('mean_new_tokens', 0):.0f} new tokens."
        )
    return ["## LLM fan-out output quality", "", *notes, ""] if notes else []


def _record_list(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for r in records:
        cfg = r.get("config") or {}
        sub = cfg.get("subset_of")
        lines.append(
            f"- `{_name(r)}`: {r['dataset']}/{r['split']}, {r['method']}, {r['n_queries']} queries"
            + (f" (limit {cfg['limit']})" if cfg.get("limit") else "")
            + (f" (subset of a {sub.get('n_queries')}-query run)" if isinstance(sub, dict) else "")
            + (
                f", {cfg['n_skipped_untitled']} untitled sets skipped"
                if cfg.get("n_skipped_untitled")
                else ""
            )
            + f"; {r.get('date', '?')}; `{r.get('command', '?')}`"
        )
    return lines


def _sections(records: Sequence[dict[str, Any]], level: str, reference: str | None, n_boot: int) -> list[str]:
    lines: list[str] = []
    for ds, split, recs in group_records(records):
        h = str(recs[0]["query_ids_sha256"])
        lines += [
            f"{level} {ds} / {split}: {recs[0]['n_queries']} queries (query ids sha256 `{h[:12]}`)",
            "",
            "Item-level metrics on the same queries, % with 95% bootstrap CI (Vendi raw, in [1, k]); "
            "R@fair / H@fair: exactly K distinct candidates read round-robin over the k rows, K = the "
            "multiple of k closest to 3.5% of the catalog; ms/query: median at batch 8; best value per "
            "column in bold.",
            "",
            *_headline(recs),
            "",
            *_flags(recs),
        ]
        diff = _differences(recs, reference, n_boot)
        if diff:
            lines += [*diff, ""]
        for part in (_secondary_recall(recs), _row_terms(recs), _latency(recs)):
            if part:
                lines += [*part, ""]
    return lines


def markdown_report(
    records: Sequence[dict[str, Any]],
    *,
    title: str = "Evaluation results",
    reference: str | None = None,
    appendix: Sequence[dict[str, Any]] | None = None,
    appendix_title: str = "Appendix: records on other queries",
    n_boot: int = 1000,
) -> str:
    """The Markdown report of several records (see the module docstring).

    Raises:
        ReportError: records of one dataset and split scored on different queries.
    """
    records = _sorted(list(records))
    lines = [f"# {title}", "", *_sections(records, "##", reference, n_boot)]
    everything = list(records)
    if appendix:
        appendix = _sorted(list(appendix))
        lines += [f"## {appendix_title}", "", *_sections(appendix, "###", reference, n_boot)]
        everything += appendix
    lines += _llm_notes(everything)
    lines += ["## Records", "", *_record_list(everything), ""]
    return "\n".join(lines)


def render_report(
    files: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    title: str = "Evaluation results",
    notes: str | None = None,
    reference: str | None = None,
    appendix: Sequence[str | os.PathLike[str]] | None = None,
    appendix_title: str = "Appendix: records on other queries",
) -> dict[str, Path]:
    """Load ``files`` and write ``report.md``, ``quality.png``, ``frontier.png`` (recall_at_fair against
    Vendi, one point per method and dataset) and ``latency.png`` into ``out_dir``.

    Args:
        files: evaluation records (JSON files written by ``r4t eval``).
        out_dir: output directory (created if needed).
        title: the report's title.
        notes: Markdown appended to the report under "## Notes" (protocol choices, caveats).
        reference: the method the paired differences are taken against (default ``r4t-diffusion``
            when present, else ``dense``).
        appendix: records on other queries (e.g. every test query), reported in their own sections.
        appendix_title: the heading of the appendix.

    Returns:
        ``{"markdown": path, "quality": path, "frontier": path, "latency": path}`` (``frontier`` absent
        when no record has both recall_at_fair and vendi, ``latency`` when none has latency numbers).

    Raises:
        ReportError: a file is not a record, or records of one table were scored on different queries.
    """
    records = load_records(files)
    extra = load_records(appendix) if appendix else None
    text = markdown_report(
        records, title=title, reference=reference, appendix=extra, appendix_title=appendix_title
    )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"out_dir: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    if notes:
        text = text.rstrip("\n") + "\n\n## Notes\n\n" + notes.strip() + "\n"
    text = text.rstrip("\n") + "\n\n![quality per method](quality.png)\n"
    paths: dict[str, Path] = {"quality": plot_quality(records, out / "quality.png")}
    points = [
        {"family": r["method"], "label": r["dataset"], "recall_at_fair": rf, "vendi": v}
        for r in records
        if (rf := _num(r["metrics"].get("recall_at_fair"))) is not None
        and (v := _num(r["metrics"].get("vendi"))) is not None
    ]
    if points:  # the recall-diversity plane: every method of the report, the same queries
        paths["frontier"] = plot_frontier(points, out / "frontier.png", f"{title}: recall_at_fair vs Vendi")
        text += "\n![recall vs Vendi per method](frontier.png)\n"
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
    parser.add_argument(
        "--reference",
        default=None,
        help="method the paired differences are taken against (default r4t-diffusion, else dense)",
    )
    parser.add_argument(
        "--appendix",
        action="append",
        default=[],
        metavar="FILE",
        help="a record on other queries, reported in an appendix (repeatable)",
    )


def cli_main(args: argparse.Namespace) -> int:
    """``r4t report``: render the records; prints the Markdown and the written paths."""
    try:
        notes = None
        if args.notes is not None:
            try:
                notes = Path(args.notes).read_text(encoding="utf-8")
            except OSError as exc:
                raise ReportError(f"--notes: cannot read {args.notes} ({exc})") from None
        paths = render_report(
            args.files,
            args.out,
            title=args.title,
            notes=notes,
            reference=args.reference,
            appendix=args.appendix or None,
        )
    except ReportError as exc:
        print(f"r4t report: error: {exc}", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text(encoding="utf-8"))
    for kind, p in paths.items():
        print(f"wrote {kind}: {p}")
    return 0
