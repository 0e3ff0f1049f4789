"""The recall-diversity frontier (issue 18, lever 5): R4T-Diffusion's knobs against MMR, DPP and dense.

On the **validation** split: a trained retriever at every ``anchor`` x ``pull`` x ``candidate_pull`` of
the grid (the knobs traced; ``--candidate-pulls`` empty: the lists read around the items' rows), with
``--deep-shares`` also the ranked candidate layout at each deep share where the fair rails hold, dense
kNN, MMR (lambda 0.3 / 0.5 / 0.7 / 0.9) and DPP (theta 0.3 / 0.6 / 0.9). Two choices are
made on validation only, by rules stated in the output:

* **per baseline setting B** (``--per-baseline-rule``): among the R4T settings whose ``recall_at_fair``
  and ``vendi`` are both at least B's, the one with the largest smaller margin; ``z`` (the default) counts
  a margin in paired standard errors over the val queries (:func:`r4t_fast.eval.records.paired_z`),
  ``relative`` in units of B's value (``min(dR / R_B, dV / V_B)``, the rule of the records before
  2026-12-07); when none dominates B, the setting with the largest such margin all the same (it is then
  reported as missing);
* **the default** (what ``Retriever.from_pretrained`` should use): among the R4T settings with
  ``recall_at_fair >= dense - 0.01``, ``item_relevance >= dense - 0.08``, ``vendi >= MMR(lambda 0.9) +
  1.0`` and ``recall@5000 >= dense + --deep-margin`` (the issue's guard rails), the highest
  ``recall_at_fair``; without one, among those meeting the first three the highest ``recall@5000``; else
  the setting with the highest ``recall_at_fair + vendi / 100`` (reported as missing the rails).

Then the **test** split, once: the chosen settings and every baseline on the same queries, with paired
95 % bootstrap CIs of R4T minus the baseline. Writes ``--results``.json / .md and the frontier plots of
both splits next to them. Records are reused when present.

    python benchmarks/frontier.py --retriever runs/rows-polyvore/rows-w1-t0.05 --dataset polyvore \\
        --out runs/frontier-polyvore --results rows/polyvore_frontier
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import RESULTS, ci_cell, environment, finish, paired_ci  # noqa: E402

KEYS = ("recall_at_fair", "vendi", "item_relevance", "recall@5000", "hit_at_fair")
MMR_LAMBDAS = (0.3, 0.5, 0.7, 0.9)
DPP_THETAS = (0.3, 0.6, 0.9)


Setting = tuple  # (anchor, pull, candidate pull | None, deep share | None: the rows layout)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _pulls_or_none(text: str) -> list[float | None]:
    """``0,-0.6,none``: floats, ``none`` = the items' own pull."""
    return [None if x.strip().lower() == "none" else float(x) for x in text.split(",") if x]


def margin(r: dict[str, float], b: dict[str, float]) -> float:
    """The smaller relative margin of ``r`` over ``b`` on recall_at_fair and vendi (> = 0: r dominates).

    >>> margin({"recall_at_fair": 0.2, "vendi": 6.0}, {"recall_at_fair": 0.1, "vendi": 5.0})
    0.2
    """
    return min(
        (r["recall_at_fair"] - b["recall_at_fair"]) / max(b["recall_at_fair"], 1e-9),
        (r["vendi"] - b["vendi"]) / max(b["vendi"], 1e-9),
    )


def z_margin(r: dict[str, Any], b: dict[str, Any]) -> float:
    """The smaller paired z of record ``r`` over record ``b`` on recall_at_fair and vendi (>= 0: ``r``
    dominates ``b`` on the mean of the common queries); -inf when the records share no queries."""
    from r4t_fast.eval.records import paired_z

    zs = [paired_z(r, b, k) for k in ("recall_at_fair", "vendi")]
    return min(-math.inf if z is None else z for z in zs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--retriever", required=True, help="a saved Retriever directory")
    ap.add_argument("--dataset", default="polyvore")
    ap.add_argument("--out", required=True, help="work directory (evaluation records)")
    ap.add_argument("--results", required=True, help="results name under benchmarks/results/")
    ap.add_argument("--anchors", type=_floats, default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--pulls", type=_floats, default=[0.0, 0.4])
    ap.add_argument(
        "--deep-margin", type=float, default=0.02,
        help="the default's R@5000 rail on val: at least dense's plus this (issue 18: above dense, CI > 0)",
    )  # fmt: skip
    ap.add_argument(
        "--candidate-pulls", type=_pulls_or_none, default=[None],
        help="pulls of the rows the candidate lists are read around, apart from the items' pull "
        "(Retriever candidate_pull), traced with the grid; 'none' = the items' pull (the default)",
    )  # fmt: skip
    ap.add_argument(
        "--deep-shares", type=_floats, default=[],
        help="the ranked candidate layout (Retriever candidate_layout='ranked') at these deep_share values, "
        "traced for every setting that meets the fair rails (its fair-budget metrics are the rows layout's)",
    )  # fmt: skip
    ap.add_argument(
        "--per-baseline-rule", choices=("z", "relative"), default="z",
        help="the margin the setting chosen for each baseline maximises on val: 'z' in paired standard "
        "errors (a lead that holds across the queries), 'relative' in units of the baseline's value",
    )  # fmt: skip
    ap.add_argument("--val-only", action="store_true", help="trace the grid on val, print it, stop")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()

    import torch

    from r4t_fast.data.prepare import load_eval_data
    from r4t_fast.diffusion.options import query_budget_share
    from r4t_fast.diffusion.retriever import Retriever
    from r4t_fast.eval.evaluation import evaluate
    from r4t_fast.eval.plots import plot_frontier
    from r4t_fast.eval.selection import DEFAULT_RAILS, choose_by_rails, meets_fair_rails

    torch.set_num_threads(1)
    out = Path(args.out)
    (out / "val").mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    data = load_eval_data(args.dataset, encoder=args.encoder, data_dir=args.data_dir, progress=False)
    r = Retriever.from_pretrained(args.retriever, encoder=data.encoder)
    base_defaults = dict(r.defaults)
    t0 = time.perf_counter()

    def rec(split: str, slug: str, method: Any, **kw: Any) -> dict[str, Any]:
        path = out / split / f"{slug}.json"
        if not path.is_file():
            print(f"[frontier] {split} {slug}", flush=True)
            res = evaluate(
                method, data.dataset, split, data=data, latency_batch_sizes=(), progress=False, **kw
            )
            path.write_text(json.dumps(res, indent=2, default=str))
        return json.loads(path.read_text())

    def r4t(split: str, anchor: float, pull: float, cpull: float | None, ds: float | None) -> dict[str, Any]:
        layout = "rows" if ds is None else "ranked"
        r.defaults.update(base_defaults, anchor=anchor, pull=pull, candidate_pull=cpull)
        r.defaults.update(candidate_layout=layout, deep_share=ds)
        cp = ("" if cpull is None else f"-cp{cpull:g}") + ("" if ds is None else f"-ranked{ds:g}")
        return rec(split, f"r4t-a{anchor:g}-p{pull:g}{cp}", r, method_name="r4t-diffusion")

    def label(s: Setting) -> str:
        return (f"anchor {s[0]:g}, pull {s[1]:g}" + ("" if s[2] is None else f", candidate pull {s[2]:g}")
                + ("" if s[3] is None else f", ranked, deep share {s[3]:g}"))  # fmt: skip

    def as_dict(s: Setting) -> dict[str, Any]:
        return {"anchor": s[0], "pull": s[1], "candidate_pull": s[2], "deep_share": s[3]}

    def baselines(split: str) -> dict[str, dict[str, Any]]:
        b = {"dense": rec(split, "dense", "dense")}
        for lam in MMR_LAMBDAS:
            b[f"mmr λ {lam:g}"] = rec(split, f"mmr-{lam:g}", "mmr", method_kwargs={"lambda_": lam})
        for th in DPP_THETAS:
            b[f"dpp θ {th:g}"] = rec(split, f"dpp-{th:g}", "dpp", method_kwargs={"theta": th})
        return b

    def m(x: dict[str, Any]) -> dict[str, float]:
        return {k: x["metrics"].get(k) for k in KEYS}

    # -- validation: trace the knob, choose ------------------------------------------------------------
    cpulls: list[float | None] = list(dict.fromkeys(args.candidate_pulls)) or [None]
    grid: list[Setting] = [(a, p, c, None) for c in cpulls for p in args.pulls for a in args.anchors]
    if None in cpulls:  # candidate pull == pull is the setting without one: traced once
        grid = [st for st in grid if st[2] is None or st[2] != st[1]]
    val_full = {s: r4t("val", *s) for s in grid}
    val_r4t = {s: m(x) for s, x in val_full.items()}
    val_b_full = baselines("val")
    val_b = {name: m(x) for name, x in val_b_full.items()}
    dense, mmr9 = val_b["dense"], val_b["mmr λ 0.9"]
    # the ranked candidate layout changes only the deep budget: traced where the fair rails hold
    ranked = [
        (*s[:3], ds)
        for s in grid
        if meets_fair_rails(val_r4t[s], dense, mmr9, DEFAULT_RAILS)
        for ds in (args.deep_shares if s[0] > 0 else args.deep_shares[:1])
    ]
    val_full.update({s: r4t("val", *s) for s in ranked})
    val_r4t.update({s: m(val_full[s]) for s in ranked})
    grid += ranked
    if args.val_only:
        for key, x in [*val_r4t.items(), *val_b.items()]:
            print(key, {k: None if v is None else round(v, 4) for k, v in x.items()}, flush=True)
        return 0
    choices: dict[str, dict[str, Any]] = {}
    for name, b in val_b.items():
        if name == "dense":
            continue

        def score(s: Setting, name: str = name, b: dict[str, float] = b) -> float:
            if args.per_baseline_rule == "relative":
                return margin(val_r4t[s], b)
            return z_margin(val_full[s], val_b_full[name])

        best = max(grid, key=score)
        choices[name] = {"setting": best, "val_margin": max(min(score(best), 1e9), -1e9)}  # JSON: finite
    i, tier = choose_by_rails([val_r4t[s] for s in grid], dense, mmr9, deep_margin=args.deep_margin)
    default = grid[i]

    # -- test, once: the chosen settings and every baseline ----------------------------------------------
    # the set model's own rows (anchor 0, no pull, rows layout), reported on test too
    rows_alone: Setting = (0.0, 0.0, None, None)
    chosen = list(dict.fromkeys([rows_alone, default, *(c["setting"] for c in choices.values())]))
    test_r4t = {s: r4t("test", *s) for s in chosen}
    test_b = baselines("test")
    r.defaults.update(base_defaults)

    rows = []
    for name, c in choices.items():
        s = c["setting"]
        a, b = test_r4t[s], test_b[name]
        dr, dv = paired_ci(a, b, "recall_at_fair"), paired_ci(a, b, "vendi")
        rows.append(
            {
                "baseline": name,
                "r4t_setting": as_dict(s),
                "val_dominates": c["val_margin"] >= 0,
                "test_r4t": m(a),
                "test_baseline": m(b),
                "d_recall": dr,
                "d_vendi": dv,
                "met": bool(dr and dv and dr["mean"] >= 0 and dv["mean"] >= 0),
            }
        )
    d_test = test_r4t[default]
    default_row = {
        "setting": as_dict(default),
        "query_share_of_budget": query_budget_share(default[0], 10),
        "val_meets_rails": tier == "all",
        "val_tier": tier,
        "test": m(d_test),
        "vs": {
            name: {
                k: paired_ci(d_test, b, k)
                for k in ("recall_at_fair", "vendi", "item_relevance", "recall@5000")
            }
            for name, b in test_b.items()
        },
    }
    res = {
        **environment(),
        "dataset": args.dataset,
        "retriever": args.retriever,
        "retriever_defaults": base_defaults,
        "grid": {
            "anchors": args.anchors,
            "pulls": args.pulls,
            "candidate_pulls": cpulls,
            "deep_shares": args.deep_shares,
        },  # fmt: skip
        "val": {
            "r4t": [{**as_dict(s), **val_r4t[s]} for s in grid],
            "baselines": val_b,
            "n_queries": rec("val", "dense", "dense")["n_queries"],
        },
        "rules": {
            "per_baseline": "among R4T settings with recall_at_fair and vendi >= the baseline's on val, "
            + (
                "the one with the largest min(dR/R_B, dV/V_B)"
                if args.per_baseline_rule == "relative"
                else "the one with the largest min(z_R, z_V), z = paired mean difference / its standard "
                "error over the val queries (r4t_fast.eval.records.paired_z)"
            )
            + "; if none dominates, the largest such margin anyway",
            "default": "on val: recall_at_fair >= dense - 0.01, item_relevance >= dense - 0.08, vendi >= "
            f"MMR(lambda 0.9) + 1.0 and recall@5000 >= dense + {args.deep_margin:g}; among those the highest "
            "recall_at_fair; else among those meeting the first three the highest recall@5000; else the "
            "highest R + V/100 (r4t_fast.eval.selection.choose_by_rails)",
        },
        "test": {
            "rows": rows,
            "default": default_row,
            "rows_alone": {"val": m(r4t("val", *rows_alone)), "test": m(test_r4t[rows_alone])},
            "n_queries": test_b["dense"]["n_queries"],
        },
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    base = RESULTS / args.results
    base.parent.mkdir(parents=True, exist_ok=True)
    for split, pts_r, pts_b in (
        ("val", val_r4t, val_b),
        ("test", {s: m(x) for s, x in test_r4t.items()}, {k: m(x) for k, x in test_b.items()}),
    ):
        pts = []
        for c in cpulls:
            for p in args.pulls:
                fam = f"r4t pull {p:g}" + ("" if c is None else f" cp {c:g}")
                pts += [
                    {"family": fam, "label": f"a{a:g}", **pts_r[(a, p, c, None)]}
                    for a in args.anchors
                    if (a, p, c, None) in pts_r
                ]
        pts += [{"family": "mmr", "label": n[4:], **x} for n, x in pts_b.items() if n.startswith("mmr")]
        pts += [{"family": "dpp", "label": n[4:], **x} for n, x in pts_b.items() if n.startswith("dpp")]
        pts += [{"family": "dense", "label": "dense", **pts_b["dense"]}]
        plot_frontier(
            pts, base.parent / f"{base.name}_{split}.png", f"{args.dataset} {split}: recall vs Vendi"
        )

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}"

    md = [
        f"# Recall–diversity frontier on {args.dataset}",
        "",
        f"Command: `{res['command']}` ({res['date']}); retriever `{args.retriever}` "
        f"(defaults {base_defaults}). Val: {res['val']['n_queries']} queries; test: "
        f"{res['test']['n_queries']} queries, touched once. Plots: `{base.name}_val.png`, "
        f"`{base.name}_test.png`.",
        "",
        "## Validation: the knob traced",
        "",
        "| setting | R@fair | Vendi | item rel. | R@5000 |",
        "|---|---|---|---|---|",
    ]
    for st, x in val_r4t.items():
        md.append(f"| r4t {label(st)} | {pct(x['recall_at_fair'])} | {x['vendi']:.2f} "
                  f"| {pct(x['item_relevance'])} | {pct(x['recall@5000'])} |")  # fmt: skip
    for name, x in val_b.items():
        md.append(f"| {name} | {pct(x['recall_at_fair'])} | {x['vendi']:.2f} | {pct(x['item_relevance'])} "
                  f"| {pct(x['recall@5000'])} |")  # fmt: skip
    md += [
        "",
        "## Test: each baseline setting against the R4T setting chosen for it on val",
        "",
        f"Rule: {res['rules']['per_baseline']}. Met = both paired point estimates >= 0.",
        "",
        "| baseline | R4T setting | R4T R@fair | base R@fair | ΔR@fair (95 % CI) | R4T Vendi | base Vendi "
        "| ΔVendi (95 % CI) | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s, a, b = row["r4t_setting"], row["test_r4t"], row["test_baseline"]
        md.append(
            f"| {row['baseline']} | {label(tuple(s.values()))} | {pct(a['recall_at_fair'])} "
            f"| {pct(b['recall_at_fair'])} | {ci_cell(row['d_recall'], 100, 1)} | {a['vendi']:.2f} "
            f"| {b['vendi']:.2f} | {ci_cell(row['d_vendi'], 1, 2)} | {'yes' if row['met'] else 'no'} |"
        )
    ra = m(test_r4t[rows_alone])
    md += [
        "",
        f"The rows alone (anchor 0, pull 0) on test: R@fair {pct(ra['recall_at_fair'])}, "
        f"Vendi {ra['vendi']:.2f}, item rel. {pct(ra['item_relevance'])}, R@5000 {pct(ra['recall@5000'])}.",
    ]
    dt = default_row["test"]
    md += [
        "",
        "## Test: the default setting chosen on val",
        "",
        f"Rule: {res['rules']['default']}. Chosen: {label(default)} (query's own "
        f"ranking: {100 * default_row['query_share_of_budget']:.0f} % of the candidate budget; val rails "
        f"met: {default_row['val_meets_rails']}). Test: R@fair {pct(dt['recall_at_fair'])}, Vendi "
        f"{dt['vendi']:.2f}, item rel. {pct(dt['item_relevance'])}, R@5000 {pct(dt['recall@5000'])}.",
        "",
        "| vs | ΔR@fair | ΔVendi | Δitem rel. | ΔR@5000 |",
        "|---|---|---|---|---|",
    ]
    for name, v in default_row["vs"].items():
        md.append(
            f"| {name} | {ci_cell(v['recall_at_fair'], 100, 1)} | {ci_cell(v['vendi'], 1, 2)} "
            f"| {ci_cell(v['item_relevance'], 100, 1)} | {ci_cell(v['recall@5000'], 100, 1)} |"
        )
    return finish(args.results, res, md)


if __name__ == "__main__":
    raise SystemExit(main())
