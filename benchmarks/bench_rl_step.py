"""Throughput of the RL stage (issue 19, lever 1): one RL step of the old settings and of the new, same run.

One "RL step" here is one generation batch and its ``num_iterations`` optimizer updates (TRL reuses a
generation batch for ``num_iterations`` steps), trained by :func:`r4t_fast.train.rl.train` exactly as
``r4t train-rl`` / the pipeline's RL stage do, on the same data, policy and thread count:

* ``old``: the ``cpu-small`` preset before issue 19: 1 prompt x 4 completions per step, cap 112 tokens;
* ``new``: 8 prompts x 8 completions per step (one batched generate call), cap by tokens per subquery
  (``tokens_per_subquery``; :func:`r4t_fast.train.rl_setup.completion_cap`);
* more configs with ``--configs`` (``new-mu1``: the new batch with ``num_iterations`` 1 and no KL
  forward, i.e. one backward per completion).

Per config it records the step log's split (generate / reward / other scoring / backward seconds), the
completions, the mean completion length, completions per second of training and per CPU-second
(per second / torch threads: the run holds the CPU alone under ``flock -x``), and the speed-up over
``old``. Output: ``--out`` JSON + Markdown with machine, versions, load average and date.

    flock -x /tmp/r4t_cpu.lock python benchmarks/bench_rl_step.py --out benchmarks/results/rl_step
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS: dict[str, dict[str, Any]] = {
    "old": {"num_generations": 4, "prompts_per_step": 1, "max_completion_length": 112, "num_iterations": 2},
    "new": {"num_generations": 8, "prompts_per_step": 8, "tokens_per_subquery": 5, "num_iterations": 2},
    "new-mu1": {
        "num_generations": 8,
        "prompts_per_step": 8,
        "tokens_per_subquery": 5,
        "num_iterations": 1,
        "log_kl": False,
    },
}
"""RLConfig overrides of each benchmarked setting (on top of the common ones in :func:`run_config`)."""
CONFIGS["new-mu1-top8"] = {**CONFIGS["new-mu1"], "lora_layers": 8}  # LoRA on the top 8 layers only
CONFIGS["new-mu1-top8-short"] = {**CONFIGS["new-mu1-top8"], "one_shot": False}  # no worked example
CONFIGS["new-mu1-top4"] = {**CONFIGS["new-mu1"], "lora_layers": 4}  # LoRA on the top 4 layers only


def run_config(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Train ``1 + args.batches`` generation batches of ``name`` (``num_iterations`` updates each); the
    first is an untimed warm-up, the others are timed; its record (sums over the timed batches, and each
    timed batch's completions/s with their median)."""
    from r4t_fast.train.rl import RLConfig, train
    from r4t_fast.train.rl_trainer import _read_steps

    over = CONFIGS[name]
    cfg = RLConfig(
        dataset=args.dataset,
        policy=args.policy,
        encoder=args.encoder,
        task="auto",
        temperature=0.7,
        learning_rate=3e-4,
        max_train_queries=args.max_train_queries,
        max_steps=over.get("num_iterations", 2) * (1 + args.batches),
        save_steps=1000,
        num_threads=args.threads,
        seed=0,
        **over,
    )
    cpu0, t0 = time.process_time(), time.perf_counter()
    summary = train(cfg, root / name, save=False)
    run_cpu, run_wall = time.process_time() - cpu0, time.perf_counter() - t0
    mu = over.get("num_iterations", 2)
    steps = _read_steps(root / name / "steps.jsonl")[mu:]  # the first generation batch is the warm-up
    per_batch = [steps[i : i + mu] for i in range(0, len(steps), mu)]
    rates = [
        sum(float(r.get("completions") or 0.0) for r in b) / sum(float(r.get("step_time") or 0.0) for r in b)
        for b in per_batch
    ]
    step_s = sum(float(r.get("step_time") or 0.0) for r in steps)
    comps = sum(float(r.get("completions") or 0.0) for r in steps)
    split = {k: round(sum(float(r.get(k) or 0.0) for r in steps), 2)
             for k in ("generate_s", "reward_s", "score_other_s", "backward_s")}  # fmt: skip
    lengths = [r["completion_length"] for r in steps if r.get("completion_length") is not None]
    record = json.loads((root / name / "rl_config.json").read_text())
    return {
        "config": over,
        "max_completion_length": record["rollouts"]["max_completion_length"],
        "updates": len(steps),
        "completions": comps,
        "step_s": round(step_s, 2),
        "split_s": split,
        "mean_completion_tokens": round(sum(lengths) / len(lengths), 1) if lengths else None,
        "completions_per_s": round(comps / step_s, 4) if step_s else None,
        "batch_completions_per_s": [round(x, 4) for x in rates],
        "median_completions_per_s": round(float(np.median(rates)), 4) if rates else None,
        "completions_per_cpu_s": round(comps / step_s / args.threads, 4) if step_s else None,
        "reward": [r.get("reward") for r in steps if r.get("reward") is not None],
        "copy_rate": [r.get("copy_rate") for r in steps if r.get("copy_rate") is not None],
        "setup_s": round(summary["setup_s"], 1),
        "train_call_wall_s": round(run_wall, 1),
        "train_call_cpu_s": round(run_cpu, 1),
    }


def markdown(rec: dict[str, Any]) -> str:
    env = rec["environment"]
    lines = [
        "# One RL step: old vs new settings (issue 19, lever 1)",
        "",
        f"{env['date']}, {env['machine']['cpu']} ({env['machine']['cores']} cores), torch threads "
        f"{rec['threads']}, load average before {env['load_average_1_5_15']}, after "
        f"{rec['load_average_after']}; dataset {rec['dataset']}, policy {rec['policy']}; "
        f"versions {env['versions']}. Command: `{env['command']}`.",
        "",
        "| setting | prompts x completions | cap | updates | completions | mean tokens | step s "
        "| generate | reward | other scoring | backward | completions/s (per timed batch) | median "
        "| per CPU-s | vs old |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = rec["results"].get("old", {}).get("median_completions_per_s")
    for name, r in rec["results"].items():
        c, s = r["config"], r["split_s"]
        med = r["median_completions_per_s"]
        ratio = f"{med / base:.2f}x" if base and med else "-"
        each = ", ".join(f"{x:.3f}" for x in r["batch_completions_per_s"])
        lines.append(
            f"| {name} | {c['prompts_per_step']} x {c['num_generations']} | {r['max_completion_length']} | "
            f"{r['updates']} | {r['completions']:.0f} | {r['mean_completion_tokens']} | {r['step_s']} | "
            f"{s['generate_s']} | {s['reward_s']} | {s['score_other_s']} | {s['backward_s']} | "
            f"{each} | {med} | {round(med / rec['threads'], 4)} | {ratio} |"
        )
    lines += [
        "",
        f"Each setting: one untimed warm-up generation batch, then {rec['batches']} timed ones. Seconds are "
        "sums over the timed batches' updates (the step log's split); completions/s per timed batch, their "
        "median, and the median's ratio to the old setting's.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="polyvore")
    p.add_argument("--policy", default="smollm2")
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--configs", default="old,new", help=f"comma-separated, among {', '.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every config")
    p.add_argument("--max-train-queries", type=int, default=64)
    p.add_argument("--batches", type=int, default=3, help="timed generation batches after one warm-up")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names:
        valid = ", ".join(CONFIGS)
        print(
            f"bench_rl_step: error: --configs: expected names among {valid}, got {bad or names}",
            file=sys.stderr,
        )
        return 2
    if args.batches < 1:
        print(f"bench_rl_step: error: --batches: expected an int >= 1, got {args.batches}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"bench_rl_step: error: --threads: expected an int >= 1, got {args.threads}", file=sys.stderr)
        return 2
    from r4t_fast import _threads

    _threads.configure()
    import torch

    torch.set_num_threads(args.threads)
    from _harness import environment

    env = environment(("transformers", "trl", "peft"))
    import os

    results: dict[str, Any] = {}
    rec = {"environment": env, "dataset": args.dataset, "policy": args.policy, "threads": args.threads,
           "batches": args.batches, "load_average_after": None, "results": results}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_rl_step-") as tmp:
        for name in names:  # the record is rewritten after each config: a cut run keeps what finished
            results[name] = run_config(name, args, Path(tmp))
            print(name, json.dumps(results[name]), flush=True)
            rec["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            text = markdown(rec)
            if args.out:
                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.with_suffix(".json").write_text(json.dumps(rec, indent=2) + "\n")
                out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
