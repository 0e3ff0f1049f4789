"""Which reward moves the fan-out policy (issue 19, lever 3), measured through expert iteration (lever 2).

One sampling pass: the base policy writes ``--samples`` constrained fan-outs (titles forbidden as
substrings) for each of the first ``--titles`` training titles. For every reward task of ``--tasks``
(``r4t_fast.fanout.rewards.TASK_CHOICES``: ``wscr`` coverage at the fair per-row budget, ``soft`` its
smooth version, ``soft-mixed``, ``oar``) the **same** samples are scored by that reward, the best one per
title is kept (:func:`r4t_fast.train.synthesis.sample_and_select`, ties: earlier sample) and a LoRA SFT
round from the base policy is trained on them (:func:`r4t_fast.train.rl_expert`'s round). Every tuned
policy and the zero-shot base then write greedy fan-outs for the first ``--val`` **validation** titles
(:func:`r4t_fast.train.rl_eval.evaluate_policies`): coverage of the reference set at the per-row budget
(the ``recall_at_fair`` proxy the RL stage reports), the ``r4t eval`` composite, Vendi, copy rate, with
paired 95 % bootstrap CIs against zero-shot. The samples are shared, so the tasks differ only in which
sample each title keeps.

    python benchmarks/rl_reward_val.py --dataset polyvore --out runs/rl-reward-val \\
        --results rl/reward_val_polyvore --tasks wscr,soft,soft-mixed,oar --titles 128 --samples 4 --val 48
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ci_cell, environment, finish  # noqa: E402

ROWS = ("coverage", "eval_composite", "eval_vendi", "eval_alignment", "copy_rate", "usable_subqueries")


class _Replay:
    """A stand-in policy that answers ``generate`` with the samples drawn once (every task scores them)."""

    def __init__(self, gens: list[list[Any]]) -> None:
        self.gens = gens

    def generate(self, queries: list[str], **_: Any) -> list[list[Any]]:
        if len(queries) != len(self.gens):
            raise ValueError(f"queries: {len(queries)} titles, {len(self.gens)} were sampled")
        return self.gens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="polyvore")
    ap.add_argument("--config", default=None, help="an RLConfig JSON (default: training/<dataset>/rl.json)")
    ap.add_argument("--out", required=True, help="work directory (policies, evaluation)")
    ap.add_argument("--results", required=True, help="results name under benchmarks/results/")
    ap.add_argument("--tasks", default="wscr,soft,soft-mixed,oar")
    ap.add_argument("--titles", type=int, default=128, help="training titles sampled")
    ap.add_argument("--samples", type=int, default=4, help="fan-outs per title")
    ap.add_argument("--val", type=int, default=48, help="validation titles evaluated")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from r4t_fast.fanout.generation import FanOutLM
    from r4t_fast.fanout.policy import resolve_policy
    from r4t_fast.train.rl_config import RLConfig
    from r4t_fast.train.rl_eval import evaluate_policies
    from r4t_fast.train.rl_expert import _sft_round, expert_examples
    from r4t_fast.train.rl_policy import load_policy, save_policy
    from r4t_fast.train.rl_setup import (
        _load_data,
        _reward_function,
        _split_rows,
        completion_cap,
        rollout_constraint,
    )
    from r4t_fast.train.synthesis import sample_and_select

    torch.set_num_threads(args.threads)
    root = Path(__file__).resolve().parents[1]
    cfg = RLConfig.from_file(args.config or root / "training" / args.dataset / "rl.json")
    cfg = cfg.replace(
        dataset=args.dataset, forbid_title=True, lora_layers=8, expert_keep=1, expert_samples=args.samples,
        expert_batch_size=16, num_threads=args.threads, eval_splits=["val"], eval_max_queries=args.val,
        tokens_per_subquery=5,
    )  # fmt: skip
    tasks = [t for t in args.tasks.split(",") if t]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = _load_data(cfg)
    rows = _split_rows(data, [cfg.train_split], args.titles)
    queries, refs = [r["query"] for r in rows], [r["reference"] for r in rows]
    base = resolve_policy(cfg.policy)

    samples_path = out / "samples.json"
    model, tokenizer, _ = load_policy(str(base))
    cap = completion_cap(cfg, tokenizer)  # what k short subqueries need (the RL stage's rollouts)
    constraint, max_new = rollout_constraint(cfg, tokenizer, cap, "max_completion_length")
    lm = FanOutLM.from_model(model, tokenizer, device="cpu")
    lm.one_shot = cfg.one_shot
    t_gen = time.time()
    gens = lm.generate(
        queries, k=cfg.k, num_samples=args.samples, temperature=cfg.temperature, max_new_tokens=max_new,
        batch_size=cfg.expert_batch_size * 4, seed=cfg.seed + 1, constrained=constraint, think=cfg.think,
    )  # fmt: skip
    gen_s = time.time() - t_gen
    samples_path.write_text(json.dumps([[g.text for g in per] for per in gens], indent=1))

    per_task: dict[str, Any] = {}
    kept: dict[str, dict[int, int]] = {}
    policies: dict[str, str] = {"zero-shot": str(base)}
    for task in tasks:
        tcfg = cfg.replace(task=task)
        sel = sample_and_select(
            queries, _Replay(gens), _reward_function(tcfg, data), k=cfg.k, samples=args.samples, keep=1,
            temperature=cfg.temperature, max_new_tokens=max_new, batch_size=1, seed=0, min_subqueries=1,
            references=refs,
        )  # fmt: skip
        examples = expert_examples(queries, sel, tcfg)
        pol = out / task / "policy"
        if not (pol / "config.json").is_file():
            model, tokenizer, _ = load_policy(str(base))
            model.train()
            merged, loss = _sft_round(model, tokenizer, examples, tcfg, out / task / "sft")
            save_policy(merged, tokenizer, pol, meta={"base_policy": str(base), "task": task})
        else:
            loss = None
        rewards = sel.scored.reward
        per_task[task] = {
            "kept": len(sel.keep_rows),
            "mean_reward_sampled": float(rewards.mean()),
            "mean_reward_kept": float(rewards[sel.keep_rows].mean()),
            "sft_loss": loss,
        }
        kept[task] = {sel.flat[r][0]: r for r in sel.keep_rows}  # title -> the flat row it keeps
        policies[task] = str(pol)
    # how often two tasks keep the same sample of a title (the tasks differ only there)
    same = {
        f"{a} / {b}": sum(kept[a].get(q) == r for q, r in kept[b].items()) / max(len(kept[b]), 1)
        for i, a in enumerate(tasks)
        for b in tasks[i + 1 :]
    }
    record = evaluate_policies(cfg, policies, out / "eval", baseline="zero-shot")
    table = record["table"]
    res = {
        **environment(),
        "dataset": args.dataset,
        "config": cfg.to_dict(),
        "titles": len(queries),
        "samples_per_title": args.samples,
        "generate_s": round(gen_s, 1),
        "tasks": per_task,
        "same_sample_kept": same,
        "val_queries": record["n_queries"],
        "table": {name: {k: table[name].get(k) for k in ROWS} for name in policies},
        "wall_s": round(time.time() - t0, 1),
    }

    def cell(name: str, key: str, scale: float, nd: int) -> str:
        e = table[name].get(key) or {}
        mean = e.get("mean")
        txt = "–" if mean is None else f"{scale * mean:.{nd}f}"
        d = e.get("diff_vs_zero-shot")
        if d:
            d = {
                "mean": d["mean"],
                "low": d["ci95"][0],
                "high": d["ci95"][1],
                "excludes_zero": d["excludes_zero"],
            }
            txt += f" ({ci_cell(d, scale, nd)})"
        return txt

    md = [
        f"# Which reward moves the fan-out policy: expert iteration on {args.dataset} (val)",
        "",
        f"Command: `{res['command']}` ({res['date']}). One sampling pass: {len(queries)} train titles x "
        f"{args.samples} constrained fan-outs of the base policy (titles forbidden, T = {cfg.temperature}, "
        f"{gen_s:.0f} s); per task the best sample of each title by that task's reward, one LoRA SFT round "
        f"from the base; greedy fan-outs on {record['n_queries']} val titles, paired 95 % bootstrap CIs "
        "against zero-shot (`*`: the CI excludes 0). Coverage = the reference items within the per-row "
        "budget of some subquery (the RL stage's recall proxy), in points.",
        "",
        "| policy | reward kept / sampled | coverage | r4t-eval composite | Vendi | copy rate | usable |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in policies:
        t = per_task.get(name)
        rk = "–" if t is None else f"{t['mean_reward_kept']:.3f} / {t['mean_reward_sampled']:.3f}"
        md.append(
            f"| {name} | {rk} | {cell(name, 'coverage', 100, 1)} | {cell(name, 'eval_composite', 1, 4)} "
            f"| {cell(name, 'eval_vendi', 1, 2)} | {cell(name, 'copy_rate', 100, 1)} "
            f"| {cell(name, 'usable_subqueries', 1, 1)} |"
        )
    md += ["", "Titles for which two tasks keep the same sample: "
           + ", ".join(f"{k} {100 * v:.0f} %" for k, v in same.items()) + "."]  # fmt: skip
    md += ["", f"Torch threads: {args.threads}."]
    return finish(args.results, res, md)


if __name__ == "__main__":
    raise SystemExit(main())
