"""Validation ablation of the R4T levers (issue 11): one table, every comparison on the same val queries.

Starts from a finished pipeline run (``r4t pipeline --out RUN``: ``RUN/pipeline.json``, ``RUN/rl/policy``,
``RUN/synthesis``, ``RUN/diffusion``, ``RUN/selection.json``, optionally ``RUN/distilled``) and measures
each lever of issue 11 on the **validation** split, with the yardstick of ``r4t eval``:

* fan-out teacher (first ``--llm-limit`` val queries): zero-shot without / with constrained decoding,
  the RL policy (FOLM) against zero-shot, and an RL policy trained with the OAR reward instead of the
  run's reward (trained here with the run's RL settings, ``--skip-oar`` to leave it out);
* diffusion (every val query, the run's chosen retrieval settings): training targets teacher /
  reference / both, the number of pairs (reference draws per set), the query-anchored row, the
  distilled few-step model, and the query pull (``Retriever(pull=...)``) on the evaluated retriever;
* the classical baselines (dense, MMR, DPP at the run's settings) on the same queries.

Every row is one ``evaluate`` record under ``--out/eval`` (reused when present: the script resumes);
the table gives each row's metrics and its paired difference (95 % bootstrap CI over the common
queries) against the row it ablates. Writes ``--results``.json / .md.

    python benchmarks/ablation_val.py --run runs/polyvore-small --out runs/polyvore-small/ablation \\
        --results pipeline/polyvore/4-cpu-small/ablation_val
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ci_cell, environment, finish, paired_ci  # noqa: E402

KEYS = ("recall_at_fair", "vendi", "item_relevance", "hit_at_fair", "row_groundedness")


def _row(name: str, group: str, path: Path, against: str | None) -> dict[str, Any]:
    return {"name": name, "group": group, "record": str(path), "against": against}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished r4t pipeline output directory")
    ap.add_argument("--out", required=True, help="work directory (records, trained variants)")
    ap.add_argument(
        "--results", required=True, help="results name under benchmarks/results/ (.json / .md written)"
    )
    ap.add_argument("--llm-limit", type=int, default=48, help="val queries for the LLM rows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--skip-oar", action="store_true", help="leave out the OAR-reward RL run")
    ap.add_argument(
        "--pulls",
        type=lambda t: [float(x) for x in t.split(",")],
        default=[0.4, 0.8, 1.2],
        help="query pulls scored on the evaluated retriever (comma-separated)",
    )
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()

    import torch

    from r4t_fast.data.prepare import load_eval_data
    from r4t_fast.diffusion.retriever import Retriever
    from r4t_fast.eval.evaluation import evaluate
    from r4t_fast.train import rl as rl_mod
    from r4t_fast.train.diffusion import DiffusionTrainConfig, config_pairs, load_shards, train_diffusion

    if args.threads:
        torch.set_num_threads(args.threads)
    run, out = Path(args.run), Path(args.out)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    pipe = json.loads((run / "pipeline.json").read_text())
    st = pipe["settings"]
    chosen = json.loads((run / "selection.json").read_text())["chosen"]
    dataset = pipe["dataset"]
    data = load_eval_data(dataset, encoder=st["encoder"], data_dir=args.data_dir, progress=False)
    e = st["eval"]
    llm_kw = {"batch_size": e["llm_batch_size"], "max_new_tokens": e["llm_max_new_tokens"]}
    t_start = time.perf_counter()

    def record(slug: str, method: Any, **kw: Any) -> Path:
        path = out / "eval" / f"{slug}.json"
        if not path.is_file():
            t = time.perf_counter()
            print(f"[ablation] {slug} ...", flush=True)
            rec = evaluate(
                method, data.dataset, "val", data=data, latency_batch_sizes=(), progress=False, **kw
            )
            path.write_text(json.dumps(rec, indent=2, default=str))
            print(f"[ablation] {slug}: {time.perf_counter() - t:.0f} s", flush=True)
        return path

    rows: list[dict[str, Any]] = []
    lim = args.llm_limit
    # -- fan-out teacher ---------------------------------------------------------------------------
    zs_kw = {"policy": st["policy"], **llm_kw}
    p = record("zeroshot-free", "llm-zeroshot", method_name="llm-zeroshot", limit=lim,
               method_kwargs={**zs_kw, "constrained": False})  # fmt: skip
    rows.append(_row("zero-shot, free-running", "teacher: constrained decoding", p, "zero-shot, constrained"))
    p = record("zeroshot", "llm-zeroshot", method_name="llm-zeroshot", limit=lim, method_kwargs=zs_kw)
    rows.append(_row("zero-shot, constrained", "teacher: constrained decoding", p, None))
    folm_kw = {**llm_kw, "policy": str(run / "rl" / "policy")}
    p = record("folm", "folm", method_name="folm", limit=lim, method_kwargs=folm_kw)
    task = json.loads((run / "rl" / "rl_config.json").read_text())["config"]["task"]
    rows.append(_row(f"FOLM (RL, task {task})", "teacher: RL vs zero-shot", p, "zero-shot, constrained"))
    if not args.skip_oar:
        oar_dir = out / "rl-oar"
        if not (oar_dir / "policy").is_dir():
            print("[ablation] RL with the OAR reward ...", flush=True)
            cfg = rl_mod.RLConfig(**{**st["rl"], "dataset": dataset, "policy": st["policy"],
                                     "encoder": st["encoder"], "task": "oar"})  # fmt: skip
            resume = any(oar_dir.glob("checkpoint-*"))
            rl_mod.train(cfg, oar_dir, resume=resume, command="benchmarks/ablation_val.py (OAR arm)")
        p = record("folm-oar", "folm", method_name="folm", limit=lim,
                   method_kwargs={**llm_kw, "policy": str(oar_dir / "policy")})  # fmt: skip
        rows.append(_row("FOLM (RL, task oar)", "teacher: OAR vs WSCR reward", p, f"FOLM (RL, task {task})"))

    # -- diffusion ---------------------------------------------------------------------------------
    base_dcfg = dict(st["diffusion"])
    shards = load_shards(run / "synthesis", "items")
    sel = {k: chosen[k] for k in ("sampler", "steps", "guidance", "anchor")}

    def variant(name: str, **over: Any) -> Retriever:
        d = out / f"diffusion-{name}"
        if not (d / "retriever.json").is_file():
            print(f"[ablation] diffusion {name} ...", flush=True)
            dcfg = DiffusionTrainConfig(**{**base_dcfg, **over})
            pairs = config_pairs(dcfg, shards=shards if dcfg.targets != "reference" else None, data=data)
            model, log = train_diffusion(pairs.cond, pairs.targets, dcfg, progress=False)
            r = Retriever(model, data.catalog, data.encoder, encoder_spec=st["encoder"], **sel)
            r.save(
                d,
                extra={
                    "train_config": vars(dcfg),
                    "n_pairs": len(pairs.cond),
                    "pairs_by_source": pairs.counts,
                },
            )
        return Retriever.from_pretrained(d, encoder=data.encoder)

    main_r = Retriever.from_pretrained(run / "diffusion", encoder=data.encoder)
    main_r.defaults.update(sel)
    both = base_dcfg.get("targets", "both")
    n_ref = base_dcfg.get("reference_samples", 4)
    main_name = f"targets {both}, {n_ref} draws/set, anchor {sel['anchor']}"
    p = record("r4t", main_r, method_name="r4t-diffusion")
    rows.append(_row(main_name, "diffusion targets", p, None))
    for t in ("teacher", "reference"):
        if t != both:
            p = record(f"r4t-{t}", variant(t, targets=t), method_name="r4t-diffusion")
            rows.append(_row(f"targets {t}", "diffusion targets", p, main_name))
    few = max(1, n_ref // 4)
    p = record(f"r4t-draws{few}", variant(f"draws{few}", reference_samples=few), method_name="r4t-diffusion")
    rows.append(_row(f"targets {both}, {few} draws/set", "number of pairs", p, main_name))
    main_r.defaults["anchor"] = 0.0
    p = record("r4t-anchor0", main_r, method_name="r4t-diffusion")
    rows.append(_row("no query-anchored row", "anchor row", p, main_name))
    if (run / "distilled" / "retriever.json").is_file():
        dr = Retriever.from_pretrained(run / "distilled", encoder=data.encoder)
        dr.defaults["anchor"] = sel["anchor"]
        for n in (1, 2, 4):
            dr.defaults.update(sampler="consistency", steps=n, guidance=0.0)
            p = record(f"r4t-distilled-{n}", dr, method_name="r4t-diffusion")
            rows.append(_row(f"distilled, {n} consistency step(s)", "few-step", p, main_name))
    # the query pull (retrieval time): rows moved toward the query before grounding
    dpath = run / "distill.json"
    dchosen = json.loads(dpath.read_text()).get("chosen") if dpath.is_file() else None
    head = Retriever.from_pretrained(run / ("distilled" if dchosen else "diffusion"), encoder=data.encoder)
    head.defaults.update(dchosen or sel)
    head_name = "r4t-diffusion as evaluated (pull 0)"
    p = record("r4t-head", head, method_name="r4t-diffusion")
    rows.append(_row(head_name, "query pull", p, None))
    for pl in args.pulls:
        head.defaults["pull"] = pl
        p = record(f"r4t-head-pull{pl:g}", head, method_name="r4t-diffusion")
        rows.append(_row(f"pull {pl:g}", "query pull", p, head_name))
    for m in ("dense", "mmr", "dpp"):
        kw = (e.get("method_kwargs") or {}).get(m)
        p = record(m, m, method_kwargs=kw)
        rows.append(_row(m if not kw else f"{m} {kw}", "baselines", p, main_name))
    # issue 11's Vendi yardstick: MMR at lambda = 0.5
    p = record("mmr-0.5", "mmr", method_kwargs={"lambda_": 0.5})
    rows.append(_row("mmr {'lambda_': 0.5}", "baselines", p, main_name))

    # -- table -------------------------------------------------------------------------------------
    recs = {r["name"]: json.loads(Path(r["record"]).read_text()) for r in rows}
    for r in rows:
        rec = recs[r["name"]]
        r["n_queries"] = rec["n_queries"]
        r["metrics"] = {k: rec["metrics"].get(k) for k in KEYS}
        for k in ("usable_subqueries", "no_subquery_rate"):
            if k in (rec.get("method_stats") or {}):
                r["metrics"][k] = rec["method_stats"][k]
        if r["against"]:
            r["paired"] = {k: paired_ci(rec, recs[r["against"]], k) for k in KEYS[:3]}
    res = {
        **environment(),
        "run": str(run),
        "split": "val",
        "chosen_settings": sel,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }
    md = [
        f"# Validation ablation of {run} ({dataset}, val split)",
        "",
        f"Command: `{res['command']}` ({res['date']}). Retrieval settings of the run: {sel}.",
        "Each row: its own val queries (LLM rows: the first "
        f"{lim}); Δ = row − the row it ablates, on their common queries, 95 % paired bootstrap CI, "
        "`*` = CI excludes 0. R@fair and relevance in points (×100).",
        "",
        "| group | row | n | R@fair | Vendi | item rel. | usable subq. | no-subq. | vs | ΔR@fair | ΔVendi "
        "| Δrel. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]

        def cell(key: str, scale: float, digits: int, r: dict = r) -> str:
            return ci_cell((r.get("paired") or {}).get(key), scale, digits)

        us = m.get("usable_subqueries")
        ns = m.get("no_subquery_rate")
        md.append(
            f"| {r['group']} | {r['name']} | {r['n_queries']} | {100 * m['recall_at_fair']:.1f} "
            f"| {m['vendi']:.2f} "
            f"| {100 * m['item_relevance']:.1f} | {'–' if us is None else f'{us:.2f}'} "
            f"| {'–' if ns is None else f'{100 * ns:.0f} %'} | {r['against'] or '–'} "
            f"| {cell('recall_at_fair', 100, 1)} | {cell('vendi', 1, 2)} | {cell('item_relevance', 100, 1)} |"
        )
    return finish(args.results, res, md)


if __name__ == "__main__":
    raise SystemExit(main())
