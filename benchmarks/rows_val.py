"""Rows that retrieve (issue 18): the levers of the set model's training, measured on validation.

Every variant trains a set model on the dataset's own train-split reference sets (no RL stage needed:
``targets reference``) with the settings of ``--base`` plus the variant's overrides, keeps the
best-scoring EMA weights when ``select_every`` is set (early stopping on the rows' val recall), saves a
``Retriever`` under ``--out/<variant>`` and scores it on the **validation** split with ``r4t eval``'s
yardstick twice: the rows alone (``anchor 0``, reported as ``r4t-diffusion-rows``) and with the
query-anchored row at ``--anchor``. The table gives each row's metrics and its paired difference (95 %
bootstrap CI over the same queries) against ``--baseline`` (the EDM-only model). Records are reused
when present (the script resumes).

    python benchmarks/rows_val.py --dataset polyvore --out runs/rows-polyvore --results rows/polyvore_val \\
        --variant edm: --variant rows-w1:retrieval_weight=1 \\
        --variant rows-w1-t0.1:retrieval_weight=1,retrieval_tau=0.1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import CPU_SMALL_EDM, ci_cell, environment, finish, paired_ci  # noqa: E402

KEYS = ("recall_at_fair", "vendi", "item_relevance", "recall@5000")


def base_config() -> dict[str, Any]:
    """The cpu-small model's EDM training settings (``_harness.CPU_SMALL_EDM``), 2,000 steps, on
    reference targets, one thread: every lever is a variant's override of these, so the committed
    records' commands keep their meaning."""
    return {
        **CPU_SMALL_EDM,
        "steps": 2000,
        "targets": "reference",
        "reference_samples": 8,
        "threads": 1,
        "log_every": 100,
    }


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value,key=value`` -> (name, overrides); ``model.<field>`` goes to the model overrides."""
    name, _, rest = text.partition(":")
    over: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, _, val = part.partition("=")
        if key.startswith("model."):
            over.setdefault("overrides", {})[key[6:]] = _value(val)
        elif key.startswith("sample."):
            over.setdefault("sampling", {})[key[7:]] = _value(val)
        else:
            over[key] = _value(val)
    return name, over


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="polyvore")
    ap.add_argument("--out", required=True, help="work directory (trained variants, records)")
    ap.add_argument("--results", required=True, help="results name under benchmarks/results/")
    ap.add_argument("--variant", action="append", required=True, help="name:key=value,... (see module doc)")
    ap.add_argument("--anchor", type=float, default=0.3, help="query share of the anchored evaluation")
    ap.add_argument("--select-every", type=int, default=250, help="steps between val scores (0 = off)")
    ap.add_argument(
        "--baseline", default=None, help="variant the others are compared to (default: the first)"
    )
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()

    import torch

    from r4t_fast.data.prepare import load_eval_data
    from r4t_fast.diffusion.retriever import Retriever
    from r4t_fast.diffusion.samplers import SAMPLING_DEFAULTS
    from r4t_fast.eval.evaluation import evaluate
    from r4t_fast.eval.selection import rows_recall_scorer
    from r4t_fast.train.diffusion import DiffusionTrainConfig, config_pairs, train_diffusion

    torch.set_num_threads(1)
    BASE = base_config()
    out = Path(args.out)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    data = load_eval_data(args.dataset, encoder=args.encoder, data_dir=args.data_dir, progress=False)
    sampling = {key: v for key, v in SAMPLING_DEFAULTS.as_dict().items()}
    t_start = time.perf_counter()

    def record(slug: str, r: Retriever) -> Path:
        path = out / "eval" / f"{slug}.json"
        if not path.is_file():
            rec = evaluate(
                r, data.dataset, "val", data=data, method_name="r4t-diffusion", latency_batch_sizes=(),
                progress=False,
            )  # fmt: skip
            path.write_text(json.dumps(rec, indent=2, default=str))
        return path

    rows: list[dict[str, Any]] = []
    pairs_cache: dict[tuple, Any] = {}
    base_name = args.baseline or parse_variant(args.variant[0])[0]
    for spec in args.variant:
        name, over = parse_variant(spec)
        d = out / name
        vs = {**sampling, **over.get("sampling", {})}  # the variant's retrieval-time sampler
        train_over = {key: v for key, v in over.items() if key != "sampling"}
        cfg = DiffusionTrainConfig(**{**BASE, "select_every": args.select_every, **train_over})
        select = rows_recall_scorer(data, split="val", sampling=vs)
        if not (d / "retriever.json").is_file():
            print(f"[rows] train {name}: {over}", flush=True)
            key = (cfg.targets, cfg.reference_samples, cfg.seed)
            if key not in pairs_cache:
                pairs_cache[key] = config_pairs(cfg, shards=None, data=data)
            pairs = pairs_cache[key]
            t = time.perf_counter()

            model, log = train_diffusion(
                pairs.cond, pairs.targets, cfg, progress=False, positives=pairs.positives,
                catalog=pairs.catalog, select_fn=select if cfg.select_every else None,
            )  # fmt: skip
            wall = time.perf_counter() - t
            r = Retriever(model, data.catalog, data.encoder, encoder_spec=args.encoder, **vs)
            r.save(d, extra={"train_config": vars(cfg), "n_pairs": len(pairs.cond), "train_wall_s": wall})
            (d.parent / f"{name}.train_log.json").write_text(json.dumps([*log, {"train_wall_s": wall}]))
            print(
                f"[rows] {name}: {wall:.0f} s; selects {[x for x in log if 'select' in x][-8:]}", flush=True
            )
        r = Retriever.from_pretrained(d, encoder=data.encoder)
        log = json.loads((out / f"{name}.train_log.json").read_text())
        sel = next((x for x in log if "selected" in x), None)
        for anchor in (0.0, args.anchor):
            r.defaults["anchor"] = anchor
            slug = f"{name}-a{anchor:g}"
            p = record(slug, r)
            row = {
                "variant": name,
                "overrides": over,
                "anchor": anchor,
                "record": str(p),
                "selected_step": sel and sel["step"],
                "train_wall_s": next((x["train_wall_s"] for x in log if "train_wall_s" in x), None),
            }
            row["against"] = None if name == base_name else f"{base_name}-a{anchor:g}"
            row["slug"] = slug
            rows.append(row)
            print(f"[rows] {slug}: {json.loads(p.read_text())['metrics']['recall_at_fair']:.4f}", flush=True)

    recs = {r["slug"]: json.loads(Path(r["record"]).read_text()) for r in rows}
    for r in rows:
        rec = recs[r["slug"]]
        r["n_queries"] = rec["n_queries"]
        r["metrics"] = {key: rec["metrics"].get(key) for key in KEYS}
        if r["against"] in recs:
            r["paired"] = {key: paired_ci(rec, recs[r["against"]], key) for key in KEYS[:3]}
    res = {
        **environment(),
        "dataset": args.dataset,
        "split": "val",
        "base_config": BASE,
        "sampling": sampling,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }
    md = [
        f"# Rows that retrieve: training levers on {args.dataset} (val split)",
        "",
        f"Command: `{res['command']}` ({res['date']}). Base: cpu-small set model on reference targets "
        f"({BASE['steps']} steps, batch {BASE['batch_size']}); sampling {sampling}. Anchor 0 = the rows "
        f"alone; Δ = row − {base_name} at the same anchor, 95 % paired bootstrap CI, `*` = CI "
        "excludes 0. Recall and relevance in points (×100).",
        "",
        "| variant | overrides | anchor | sel. step | n | R@fair | R@5000 | Vendi | item rel. | ΔR@fair "
        "| ΔVendi |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]

        def cell(key: str, scale: float, digits: int, r: dict = r) -> str:
            return ci_cell((r.get("paired") or {}).get(key), scale, digits)

        r500 = m.get("recall@5000")
        md.append(
            f"| {r['variant']} | {r['overrides'] or '–'} | {r['anchor']:g} | {r['selected_step'] or '–'} "
            f"| {r['n_queries']} | {100 * m['recall_at_fair']:.1f} "
            f"| {'–' if r500 is None else f'{100 * r500:.1f}'} | {m['vendi']:.2f} "
            f"| {100 * m['item_relevance']:.1f} | {cell('recall_at_fair', 100, 1)} | {cell('vendi', 1, 2)} |"
        )
    return finish(args.results, res, md)


if __name__ == "__main__":
    raise SystemExit(main())
