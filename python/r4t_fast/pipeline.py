"""The main job: RL → synthesis → diffusion training → evaluation → report, end to end.

    r4t pipeline --dataset polyvore --preset cpu-small --out runs/polyvore

Stages and their outputs under ``--out``:

1. ``rl/``         GRPO + soft-PPO tuning of the fan-out policy (:mod:`r4t_fast.train.rl`); ``rl/policy``.
2. ``synthesis/``  the tuned policy sampled on the training queries (:mod:`r4t_fast.train.synthesis`).
3. ``diffusion/``  the set diffusion model trained on those pairs, saved with its catalog as a
   :class:`~r4t_fast.Retriever` directory (load with ``Retriever.from_pretrained``).
   ``selection.json``: the retrieval-time settings (query-anchored row share, guidance, sampler and
   steps) chosen on the **validation** split (:func:`r4t_fast.eval.selection.select_retrieval_settings`)
   and stored in the retriever's defaults before any test query is scored.
   ``distilled/`` (optional, ``settings.distill``): the chosen model distilled into a 1-4 step
   consistency model (:mod:`r4t_fast.train.distill`, on the same training pairs, the teacher's chosen
   guidance) and put through the same rule on validation (:func:`r4t_fast.eval.selection.select_distilled`,
   ``distill.json``); when a step count qualifies, it is the ``r4t-diffusion`` the test split scores.
4. ``eval/``       one ``r4t eval`` record per method on the test split, by default ``dense``, ``mmr``,
   ``dpp``, ``llm-zeroshot`` (the base policy), ``folm`` (the tuned policy) and ``r4t-diffusion``. The
   LLM methods are slow, so they are scored on the first ``eval.llm_limit`` test queries; every other
   method is scored on all of them *and* on that subset (``eval/same-queries/<method>.json``, its
   per-query values restricted to the LLM methods' queries: :func:`r4t_fast.eval.records.subset_record`),
   so all methods are compared on the same queries.
5. ``report/``     ``report.md`` + plots. It leads with one table: the item-level metrics
   (``recall_at_fair``, ``hit_at_fair``, ``item_relevance``, ``vendi``, ``category_coverage``, ``ild``) and
   ms/query at batch 8 of every method on the same queries, the best value per column in bold, then
   paired differences with 95% bootstrap CIs; the records on every test query follow as an appendix.

Each stage is skipped when its output exists (``--force`` reruns everything), so a killed pipeline
resumes where it stopped -- the diffusion stage within its training too, from the checkpoint it keeps
beside its output (``diffusion.checkpoint.pt``, every ``checkpoint_every`` steps:
:mod:`r4t_fast.train.checkpoint`; the stage's entry then says ``resumed_from_step``); ``pipeline.json``
records the preset, settings, commands and stage times (a skipped stage keeps the earlier run's entry
under ``earlier_run``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from r4t_fast._internal import atomic_write_text
from r4t_fast.diffusion.samplers import SAMPLING_DEFAULTS
from r4t_fast.pipeline_presets import (  # the presets' home; re-exported here
    DPP_VAL_CHOICE,
    MMR_VAL_CHOICE,
    PIPELINE_PRESETS,
    PRESETS,
    _merge,
)

__all__ = [
    "DEFAULT_METHODS",
    "DPP_VAL_CHOICE",
    "LLM_EVAL_METHODS",
    "MMR_VAL_CHOICE",
    "PIPELINE_PRESETS",
    "PRESETS",
    "run_pipeline",
]

DEFAULT_METHODS = (
    "dense", "mmr", "dpp", "llm-zeroshot", "llm-bon", "folm", "r4t-diffusion", "r4t-diffusion-rows"
)  # fmt: skip
"""What the pipeline evaluates by default: the non-fan-out baselines, the LLM fan-outs and R4T-Diffusion
(``r4t-diffusion-rows``: the same model with anchor 0, its rows alone without the query's own ranking)."""
LLM_EVAL_METHODS = frozenset({"llm-zeroshot", "folm", "llm-bon"})
"""Methods scored on the first ``eval.llm_limit`` test queries only (every other method also on those)."""
_VALID_METHODS = frozenset(DEFAULT_METHODS) | LLM_EVAL_METHODS

_EXTRA = ("train_config", "train_log", "n_pairs", "pairs_by_source")
"""The diffusion stage's notes kept in the retriever's config.json when the select stage re-saves it."""


def run_pipeline(
    dataset: str,
    out_dir: str | os.PathLike,
    *,
    preset: str = "cpu-small",
    overrides: dict[str, Any] | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    force: bool = False,
    skip_rl: bool = False,
    rl_policy: str | None = None,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage (see the module docstring); returns the ``pipeline.json`` record.

    ``rl_policy``: a policy already tuned by ``r4t train-rl`` (its directory) to use instead of running
    the RL stage again (recorded in ``pipeline.json``). ``threads``: torch CPU threads (on a shared
    machine, 1 avoids oversubscription).
    """
    if preset not in PIPELINE_PRESETS:
        raise ValueError(f"preset: unknown {preset!r}; valid choices: {sorted(PIPELINE_PRESETS)}")
    bad = set(methods) - _VALID_METHODS
    if bad:
        raise ValueError(f"methods: unknown {sorted(bad)}; valid choices: {sorted(_VALID_METHODS)}")
    cfg = _merge(PIPELINE_PRESETS[preset], overrides or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "dataset": dataset,
        "preset": preset,
        "settings": cfg,
        "stages": {},
        "command": " ".join(["r4t", *sys.argv[1:]]) if sys.argv else None,
    }
    t_all = time.perf_counter()
    # A resumed run keeps what the earlier run measured for each stage it skips (its wall time above all):
    # without it, pipeline.json of a killed-and-resumed run would only say "skipped".
    earlier: dict[str, Any] = {}
    if (out / "pipeline.json").is_file():
        try:
            earlier = json.loads((out / "pipeline.json").read_text()).get("stages") or {}
        except (json.JSONDecodeError, AttributeError):
            earlier = {}

    import torch

    from r4t_fast.data.prepare import load_eval_data

    if threads:
        torch.set_num_threads(int(threads))
    if rl_policy is not None and not (Path(rl_policy) / "config.json").is_file():
        raise FileNotFoundError(f"rl_policy: {rl_policy} is not a model directory (no config.json)")
    from r4t_fast.diffusion.options import query_budget_share
    from r4t_fast.diffusion.retriever import Retriever
    from r4t_fast.train import rl as rl_mod
    from r4t_fast.train.checkpoint import checkpoint_path, resumes
    from r4t_fast.train.diffusion import (
        DiffusionTrainConfig,
        config_pairs,
        final_loss,
        load_shards,
        train_diffusion,
    )
    from r4t_fast.train.synthesis import SynthesisConfig, synthesize

    def stage(name: str, fn) -> Any:
        t = time.perf_counter()
        print(f"[r4t pipeline] stage {name} ...", flush=True)
        res = fn()
        entry = {"wall_s": round(time.perf_counter() - t, 1), **(res or {})}
        if entry.get("skipped") == "exists" and isinstance(earlier.get(name), dict):
            prev = earlier[name]
            first = prev.get("earlier_run") if prev.get("skipped") else prev
            if first:
                entry["earlier_run"] = first
        record["stages"][name] = entry
        (out / "pipeline.json").write_text(json.dumps(record, indent=2, default=str))
        return res

    data = load_eval_data(
        dataset, encoder=cfg["encoder"], data_dir=data_dir, cache_dir=cache_dir, progress=progress
    )

    # 1. RL ---------------------------------------------------------------------------------------
    policy_dir = out / "rl" / "policy"

    def do_rl():
        if rl_policy is not None:
            return {"reused": str(rl_policy), "note": "policy tuned earlier by r4t train-rl"}
        if skip_rl:
            return {"skipped": "skip_rl: the base policy is used as the FOLM"}
        if policy_dir.is_dir() and not force:
            return {"skipped": "exists"}
        rcfg = rl_mod.RLConfig(
            **{
                **cfg["rl"],
                "dataset": dataset,
                "data_dir": data_dir,
                "cache_dir": cache_dir,
                "policy": cfg["policy"],
                "encoder": cfg["encoder"],
            }
        )
        summary = rl_mod.train(rcfg, out / "rl", command=record["command"])
        return {"summary": summary}

    stage("rl", do_rl)
    folm = str(rl_policy) if rl_policy else (str(policy_dir) if policy_dir.is_dir() else cfg["policy"])

    # 2. synthesis ----------------------------------------------------------------------------------
    syn_dir = out / "synthesis"

    def do_syn():
        if (syn_dir / "synthesis.json").is_file() and not force:
            return {"skipped": "exists"}
        scfg = SynthesisConfig(policy=folm, **cfg["synthesis"])
        s = synthesize(
            dataset,
            syn_dir,
            scfg,
            encoder=cfg["encoder"],
            data_dir=data_dir,
            cache_dir=cache_dir,
            progress=progress,
        )
        return {"counts": s["counts"], "n_queries": s["n_queries"]}

    stage("synthesis", do_syn)

    # 3. diffusion ----------------------------------------------------------------------------------
    dif_dir = out / "diffusion"

    def diffusion_pairs(dcfg: Any) -> Any:
        """The diffusion stage's training pairs (also the distill stage's: the teacher's own)."""
        shards = load_shards(syn_dir, "items") if dcfg.targets != "reference" else None
        return config_pairs(dcfg, shards=shards, data=data)

    def do_dif():
        if (dif_dir / "retriever.json").is_file() and not force:
            return {"skipped": "exists"}
        dcfg = DiffusionTrainConfig(**cfg["diffusion"])
        pairs = diffusion_pairs(dcfg)
        if len(pairs.cond) == 0:
            raise RuntimeError(
                f"diffusion: no (query, set) pairs for targets={dcfg.targets!r} (synthesis in {syn_dir}: "
                "see synthesis.json counts)"
            )
        select_fn = None
        if dcfg.select_every:  # early stopping on the rows' val recall (issue 18, lever 3)
            from r4t_fast.eval.selection import rows_recall_scorer

            keys = ("steps", "sampler", "guidance", "noise")
            sampling = {k: v for k, v in cfg["retriever"].items() if k in keys}
            select_fn = rows_recall_scorer(data, split="val", sampling=sampling)
        model, log = train_diffusion(
            pairs.cond,
            pairs.targets,
            dcfg,
            progress=progress,
            positives=pairs.positives,
            catalog=pairs.catalog,
            select_fn=select_fn,
            checkpoint=checkpoint_path(dif_dir),
        )
        r = Retriever(model, data.catalog, data.encoder, encoder_spec=cfg["encoder"], **cfg["retriever"])
        extra = {"train_config": vars(dcfg), "train_log": log, "n_pairs": len(pairs.cond)}
        r.save(dif_dir, extra={**extra, "pairs_by_source": pairs.counts})
        checkpoint_path(dif_dir).unlink(missing_ok=True)
        res = {"n_pairs": len(pairs.cond), "pairs_by_source": pairs.counts, "final_loss": final_loss(log)}
        resumed = resumes(log)
        if resumed:  # this stage's wall_s covers only the steps after the last resume
            res["resumed_from_step"] = resumed[-1]["step"]
            res["train_s_before_resume"] = round(resumed[-1]["elapsed_s"], 1)
        return res

    stage("diffusion", do_dif)

    # 3b. retrieval-time settings, chosen on the validation split -------------------------------------
    sel_path = out / "selection.json"

    def do_select():
        if sel_path.is_file() and not force:
            return {"skipped": "exists", **json.loads(sel_path.read_text())["chosen"]}
        from r4t_fast.eval.selection import select_retrieval_settings

        r = Retriever.from_pretrained(dif_dir, encoder=data.encoder)
        sc = cfg.get("select") or {}
        kw = {
            k: (tuple(map(tuple, v)) if k == "grid" else tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in sc.items()
            if k != "limit"
        }
        sel = select_retrieval_settings(r, data, split="val", limit=sc.get("limit"), progress=progress, **kw)
        extra = {k: v for k, v in json.loads((dif_dir / "config.json").read_text()).items() if k in _EXTRA}
        r.save(dif_dir, extra={**extra, "selection": sel})
        atomic_write_text(sel_path, json.dumps(sel, indent=2, default=str))
        return dict(sel["chosen"])

    stage("select", do_select)

    # 3c. optional: the chosen model distilled into a few-step consistency model --------------------
    dis_dir, dis_path = out / "distilled", out / "distill.json"

    def do_distill():
        dc = cfg.get("distill")
        if not dc:
            return {"skipped": "off (settings.distill is null)"}
        if dis_path.is_file() and not force:
            return {"skipped": "exists", "chosen": json.loads(dis_path.read_text())["chosen"]}
        from dataclasses import asdict

        from r4t_fast.eval.selection import select_distilled
        from r4t_fast.train.distill import DistillConfig, distill_consistency

        sel = json.loads(sel_path.read_text())
        teacher = Retriever.from_pretrained(dif_dir, encoder=data.encoder)
        dcfg = DistillConfig(**{"teacher_guidance": float(sel["chosen"]["guidance"]), **dc})
        pairs = diffusion_pairs(DiffusionTrainConfig(**cfg["diffusion"]))
        student, log = distill_consistency(teacher.model, pairs.cond, pairs.targets, dcfg, progress=progress)
        kw = {"sampler": "consistency", "steps": dcfg.sample_steps, "guidance": 0.0}
        sr = Retriever(student, data.catalog, data.encoder, encoder_spec=cfg["encoder"],
                       anchor=float(sel["chosen"]["anchor"]), **kw)  # fmt: skip
        limit = (cfg.get("select") or {}).get("limit")
        res = select_distilled(sr, data, sel["reference"], limit=limit, progress=progress)
        extra = {
            "distill_config": asdict(dcfg),
            "distill_log": log,
            "n_pairs": len(pairs.cond),
            "pairs_by_source": pairs.counts,
            "distilled_from": str(dif_dir),
            "selection": res,
        }
        sr.save(dis_dir, extra=extra)
        atomic_write_text(dis_path, json.dumps(res, indent=2, default=str))
        return {"chosen": res["chosen"], "n_pairs": len(pairs.cond), "final_loss": log[-1]["loss"]}

    stage("distill", do_distill)
    use_distilled = dis_path.is_file() and json.loads(dis_path.read_text()).get("chosen") is not None
    r4t_dir = dis_dir if use_distilled else dif_dir
    record["r4t_diffusion_model"] = str(r4t_dir)

    # 4. evaluation ---------------------------------------------------------------------------------
    from r4t_fast.eval.evaluation import evaluate
    from r4t_fast.eval.records import subset_record

    ev_dir = out / "eval"
    ev_dir.mkdir(exist_ok=True)
    same_dir = ev_dir / "same-queries"
    e = cfg["eval"]
    llm_kw = {"batch_size": e["llm_batch_size"], "max_new_tokens": e["llm_max_new_tokens"]}
    lat_kw: dict[str, Any] = {"latency_calls": e.get("latency_calls")}
    if e.get("latency_batches") is not None:
        lat_kw["latency_batch_sizes"] = tuple(e["latency_batches"])
    method_kwargs = e.get("method_kwargs") or {}

    def do_eval():
        done = {}
        for m in methods:
            path = ev_dir / f"{m}.json"
            if path.is_file() and not force:
                done[m] = "exists"
                continue
            kw: dict[str, Any] = {
                "data": data,
                "split": "test",
                "progress": progress,
                "command": record["command"],
                **lat_kw,
            }
            if m in ("r4t-diffusion", "r4t-diffusion-rows"):
                rr = Retriever.from_pretrained(r4t_dir, encoder=data.encoder)
                if m == "r4t-diffusion-rows":
                    rr.defaults["anchor"] = 0.0
                rec = evaluate(
                    rr,
                    data.dataset,
                    method_name=m,
                    limit=e["limit"],
                    **kw,
                )
                rec["query_share_of_budget"] = query_budget_share(rr.defaults["anchor"], 10)
            elif m in LLM_EVAL_METHODS:
                policy = folm if m == "folm" else cfg["policy"]
                ll = (e.get("llm_latency") or {}).get(m)
                if ll is not None:
                    calls = ll.get("calls")
                    kw["latency_batch_sizes"] = tuple(int(b) for b in ll["batches"])
                    kw["latency_calls"] = (
                        {int(b): int(c) for b, c in calls.items()} if isinstance(calls, dict) else calls
                    )
                rec = evaluate(
                    m,
                    data.dataset,
                    method_name=m,
                    limit=e["llm_limit"],
                    method_kwargs={"policy": policy, **llm_kw, **method_kwargs.get(m, {})},
                    **kw,
                )
            else:
                rec = evaluate(m, data.dataset, limit=e["limit"], method_kwargs=method_kwargs.get(m), **kw)
            path.write_text(json.dumps(rec, indent=2, default=str))
            done[m] = {
                "n_queries": rec["n_queries"],
                **{
                    k: rec["metrics"].get(k)
                    for k in ("recall_at_fair", "hit_at_fair", "item_relevance", "vendi")
                },
            }
        return {"methods": done, **same_queries()}

    def same_queries() -> dict[str, Any]:
        """Every method on the same queries: the full records restricted to the smallest record's queries."""
        recs = {
            m: json.loads((ev_dir / f"{m}.json").read_text())
            for m in methods
            if (ev_dir / f"{m}.json").is_file()
        }
        if not recs:
            return {"headline": [], "appendix": []}
        for m, rec in recs.items():
            if "query_ids_sha256" not in rec or "per_query" not in rec:
                raise RuntimeError(
                    f"{ev_dir / f'{m}.json'}: a record from before the same-query rule (issue 10); "
                    "rerun the evaluation with --force"
                )
        smallest = min(recs.values(), key=lambda r: r["n_queries"])
        ids = list(smallest["per_query"]["set_id"])
        headline, appendix = [], []
        for m, rec in recs.items():
            if rec["query_ids_sha256"] == smallest["query_ids_sha256"]:
                headline.append(str(ev_dir / f"{m}.json"))
                continue
            same_dir.mkdir(exist_ok=True)
            sub = subset_record(rec, ids)
            (same_dir / f"{m}.json").write_text(json.dumps(sub, indent=2, default=str))
            headline.append(str(same_dir / f"{m}.json"))
            appendix.append(str(ev_dir / f"{m}.json"))
        return {"headline": headline, "appendix": appendix, "headline_n_queries": len(ids)}

    stage("eval", do_eval)

    # 5. report -------------------------------------------------------------------------------------
    from r4t_fast.eval.report import render_report

    def do_report():
        files = same_queries()
        n_all = max((json.loads(Path(f).read_text())["n_queries"] for f in files["appendix"]), default=0)
        paths = render_report(
            files["headline"],
            out / "report",
            title=f"R4T pipeline on {dataset} ({record['preset']})",
            appendix=files["appendix"] or None,
            appendix_title=f"Appendix: all {n_all} test queries (the methods fast enough for all of them)",
        )
        return {"report": str(paths["markdown"]), **files}

    stage("report", do_report)
    record["wall_s"] = round(time.perf_counter() - t_all, 1)
    record["torch_threads"] = torch.get_num_threads()
    (out / "pipeline.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"[r4t pipeline] done in {record['wall_s']:.0f}s; report: {out / 'report' / 'report.md'}")
    return record


# ---------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="polyvore | spotify | PATH.jsonl")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--preset", default="cpu-small", choices=sorted(PIPELINE_PRESETS), help="budget preset")
    p.add_argument("--policy", default=None, help="base policy: smollm2 (default) or a local HF model dir")
    p.add_argument("--encoder", default=None, help="text encoder spec (default: the preset's)")
    p.add_argument(
        "--data-dir", default=None, help="data directory (default: $R4T_DATA_DIR or ../shared/data)"
    )
    p.add_argument("--cache-dir", default=None, help="cache directory (default: $R4T_CACHE_DIR)")
    p.add_argument("--skip-rl", action="store_true", help="use the base policy as the FOLM (no RL stage)")
    p.add_argument(
        "--rl-policy", default=None, help="reuse a policy tuned by r4t train-rl (skips the RL stage)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    p.add_argument("--methods", default=None, help="comma-separated methods to evaluate")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.KEY=JSON",
        help="override a preset value, e.g. --set diffusion.steps=500 (repeatable)",
    )


def _set_keys() -> dict[str, set[str]]:
    """What ``--set STAGE.KEY`` may change: each stage's config fields (``rl`` less what the pipeline
    sets itself), the Retriever's sampling defaults, ``select_retrieval_settings``'s grid arguments and
    the ``eval`` settings of the presets."""
    import inspect
    from dataclasses import fields

    from r4t_fast.eval.selection import select_retrieval_settings
    from r4t_fast.train.diffusion import DiffusionTrainConfig
    from r4t_fast.train.distill import DistillConfig
    from r4t_fast.train.rl_config import RLConfig
    from r4t_fast.train.synthesis import SynthesisConfig

    own = {"dataset", "data_dir", "cache_dir", "policy", "encoder"}  # set from the command line
    select = set(inspect.signature(select_retrieval_settings).parameters)
    return {
        "rl": {f.name for f in fields(RLConfig)} - own,
        "synthesis": {f.name for f in fields(SynthesisConfig)} - {"policy"},
        "diffusion": {f.name for f in fields(DiffusionTrainConfig)},
        "distill": {f.name for f in fields(DistillConfig)},
        "retriever": {
            *SAMPLING_DEFAULTS.as_dict(),
            *("anchor", "pull", "candidate_pull", "noise", "precision", "candidate_layout", "deep_share"),
        },
        "select": select - {"retriever", "data", "split", "apply", "progress"},
        "eval": {k for p in PIPELINE_PRESETS.values() for k in p["eval"]},
    }


def cli_main(args: argparse.Namespace) -> int:
    over: dict[str, Any] = {}
    valid = _set_keys() if args.set else {}  # every --set key is checked before any work
    for item in args.set:
        key, sep, val = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set: expected STAGE.KEY=JSON, got {item!r}")
        st, k = key.split(".", 1)
        if st not in valid:
            raise SystemExit(f"--set: unknown stage {st!r} in {item!r}; valid stages: {', '.join(valid)}")
        if k not in valid[st]:
            keys = ", ".join(sorted(valid[st]))
            raise SystemExit(f"--set: unknown key {k!r} of stage {st!r} in {item!r}; valid keys: {keys}")
        try:
            v = json.loads(val)
        except json.JSONDecodeError:
            v = val
        over.setdefault(st, {})[k] = v
    if args.policy:
        over["policy"] = args.policy
    if args.encoder:
        over["encoder"] = args.encoder
    kw = {}
    if args.methods:
        kw["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run_pipeline(
        args.dataset,
        args.out,
        preset=args.preset,
        overrides=over,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        force=args.force,
        skip_rl=args.skip_rl,
        rl_policy=args.rl_policy,
        threads=args.threads,
        **kw,
    )
    return 0
