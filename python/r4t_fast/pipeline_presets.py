"""The budgets of ``r4t pipeline``: one dict of stage settings per preset (``cpu-small``, ``cpu-full``,
``smoke``), and the MMR / DPP settings chosen on validation. Apart from the pipeline that runs them (the
house rule: configs live apart from what runs them); ``r4t_fast.pipeline`` re-exports every name."""

from __future__ import annotations

import copy
from typing import Any

from r4t_fast.diffusion.samplers import SAMPLING_DEFAULTS

__all__ = ["DPP_VAL_CHOICE", "MMR_VAL_CHOICE", "PIPELINE_PRESETS", "PRESETS"]

MMR_VAL_CHOICE: dict[str, Any] = {"lambda_": 0.9}
DPP_VAL_CHOICE: dict[str, Any] = {"theta": 0.9}
"""MMR / DPP settings chosen on the validation splits (benchmarks/results/eval/val-sweep/README.md)."""

# Budgets per preset. cpu-small: the first look, 1 h 56 min from setup to report on the 2-core AVX2 CPU
# since issue 18 (benchmarks/results/pipeline/polyvore/7-cpu-small: setup 4 min, RL 15, synthesis 30,
# diffusion 21, select 2, eval 43 -- of which the three LLM baselines ~42).
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": {
        "encoder": "minilm",
        "policy": "smollm2",
        # issue 19: rollouts batched across prompts (8 x 8 per step, one generate call, the backward in
        # passes of 8) and capped by what k short subqueries need: 57 + 10 * (5 - 1) = 97 tokens with
        # SmolLM2 (sampled constrained answers take 90 tokens, ~4.3 per subquery:
        # benchmarks/results/fanout_format.json); one update per generation batch (on that first pass the
        # soft-PPO terms' gradients cancel: train/rl.py), LoRA on the top 4 of 30 layers, no KL metric
        # pass: 4.8x the old step's completions per second, medians of 3 timed batches after a warm-up,
        # same run (benchmarks/results/rl_step/polyvore_top4.md; top 8 layers: 3.9x, polyvore_repeated.md)
        "rl": {
            "num_generations": 8,
            "prompts_per_step": 8,
            "micro_batch": 8,
            "max_completion_length": 112,
            "tokens_per_subquery": 5,
            "temperature": 0.7,
            "num_iterations": 1,
            "lora_layers": 4,
            "log_kl": False,
            "learning_rate": 3e-4,
            "lora": True,
            "max_steps": 30,
            "save_steps": 10,
            "time_budget_minutes": 12,
        },
        # constrained decoding, the RL stage's reward ('auto': WSCR where references exist) ranks the
        # samples of each query and the best `keep` are kept
        "synthesis": {
            "samples": 4,
            "keep": 2,
            "max_queries": 256,
            "max_new_tokens": 96,
            "batch_size": 32,
            "temperature": 0.9,
            "queries_per_shard": 32,
            "reward": "auto",
        },
        # teacher pairs + reference_samples k-row draws of every titled train-split set; issue 18: the
        # rows' retrieval loss on 4-step Euler samples, early stopping on the rows' val recall (the
        # cpu-small model on Polyvore val: rows alone 5.0 -> 10.6 % R@fair, benchmarks/results/rows/
        # polyvore_val.md unroll4-w1, selected step 750; 1,000 steps: ~25 min here)
        "diffusion": {
            "preset": "cpu-small",
            "steps": 1000,
            "batch_size": 128,
            "lr": 5e-4,
            "warmup": 100,
            "ema": 0.995,
            "targets": "both",
            "reference_samples": 8,
            "retrieval_weight": 1.0,
            "retrieval_unroll": 4,
            "select_every": 250,
        },
        # the Euler-4 sampler the rows were trained through (4 NFE: no distillation stage)
        "retriever": {"sampler": "euler", "steps": 4, "guidance": 0.0},
        # the few-step stage (issue 12): DistillConfig fields (r4t_fast.train.distill), None = off
        "distill": None,
        # the anchor share, the query pull and the ranked layout traced on val by the guard-rail rule
        # (issue 18), a smaller grid than cpu-full's
        "select": {
            "rule": "rails",
            "anchors": [0.0, 0.1, 0.3, 0.5],
            "guidances": [0.0],
            "pulls": [0.0, 0.2, 0.4, 1.0],
            "candidate_pulls": [None],
            "deep_shares": [0.1],
            "deep_margin": 0.02,
            "grid": [["euler", 4], ["euler", 2]],
        },
        "eval": {
            "llm_limit": 48,
            "limit": None,
            "llm_batch_size": 8,
            "llm_max_new_tokens": 128,
            "latency_calls": 8,
            # LLM methods: seconds per call, so fewer timed calls; batch 8 reuses the quality run's
            # batches (5 timed calls after the first); the FOLM and zero-shot are also timed at 64 with
            # a warm-up and 2 timed calls (issue 20: same protocol, tokens/s compared at 8 and 64)
            "llm_latency": {
                "folm": {"batches": [8, 64], "calls": {"8": 5, "64": 2}},
                "llm-zeroshot": {"batches": [8, 64], "calls": {"8": 5, "64": 2}},
                "llm-bon": {"batches": [8], "calls": 5},
            },
            # chosen on the validation splits (benchmarks/results/eval/val-sweep/); the LLM fan-outs keep
            # each query's title out of their subqueries (issue 19: Polyvore val, the cpu-full policy,
            # copy_rate 25.9 -> 6.7 %, R@fair -0.29 [-1.44, +0.81] pt; 5-cpu-full/eval_val_forbid_title/)
            "method_kwargs": {
                "mmr": MMR_VAL_CHOICE,
                "dpp": DPP_VAL_CHOICE,
                "folm": {"forbid_title": True},
                "llm-zeroshot": {"forbid_title": True},
                "llm-bon": {"forbid_title": True},
            },
        },
    },
    # For tests and a first look: minutes, meaningless numbers.
    "smoke": {
        "encoder": "hashing:32",
        "policy": "smollm2",
        "rl": {
            "num_generations": 2,
            "max_completion_length": 80,
            "max_steps": 1,
            "save_steps": 1,
            "lora": True,
            "max_train_queries": 4,
        },
        "synthesis": {
            "samples": 2,
            "max_queries": 6,
            "max_new_tokens": 80,
            "batch_size": 8,
            "min_subqueries": 1,
            "queries_per_shard": 3,
        },
        "diffusion": {
            "preset": "tiny",
            "steps": 20,
            "batch_size": 16,
            "warmup": 5,
            "log_every": 5,
            "targets": "both",
            "reference_samples": 1,
            "retrieval_weight": 1.0,
            "retrieval_unroll": 2,
            "retrieval_batch": 8,
            "select_every": 10,
        },
        "distill": None,
        "retriever": {
            "steps": 4,
            "sampler": SAMPLING_DEFAULTS.sampler,
            "guidance": SAMPLING_DEFAULTS.guidance,
        },
        "select": {
            "limit": 3,
            "anchors": [0.0, 0.3],
            "guidances": [0.0],
            "grid": [["heun", 4], ["euler", 1]],
        },
        "eval": {
            "llm_limit": 3,
            "limit": 3,
            "llm_batch_size": 4,
            "llm_max_new_tokens": 80,
            "latency_calls": 1,
            "latency_batches": [1, 8],
            "llm_latency": {"folm": {"batches": [4], "calls": {"4": 1}}},
        },
    },
}

PRESETS = PIPELINE_PRESETS  # deprecated name (0.1); model presets are r4t_fast.diffusion.MODEL_PRESETS


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# cpu-full: the committed headline run, <= 150 min on the 2-core CPU (512 training queries in synthesis,
# >= 20,000 diffusion pairs with the reference draws, every test query for every method)
PIPELINE_PRESETS["cpu-full"] = _merge(
    PIPELINE_PRESETS["cpu-small"],
    {
        "rl": {"max_steps": 60, "save_steps": 20, "time_budget_minutes": 25},
        # 0.63 constrained answers/s at batch 32 (cpu-small run, 2026-12-02): 2,048 answers ~ 55 min
        "synthesis": {"samples": 4, "keep": 2, "max_queries": 512, "batch_size": 64},
        # issue 18's stages as in cpu-small (row loss on Euler-4 samples, early stopping, the Euler-4
        # retriever, no distillation), with more steps and reference draws
        "diffusion": {"steps": 1500, "reference_samples": 16},
        # the query-anchored row's share, the pull and the candidate lists' own pull traced on val; the
        # guard-rail rule with its R@5000 rail (issue 18; benchmarks/results/rows/polyvore_frontier.md chose
        # anchor 0.1, pull 0.3 without the deep rail; polyvore_frontier_cpull.md anchor 0.5, pull 1.5,
        # candidate pull -0.6 on a fixed-noise model with it): cpu-small's rule on a wider grid
        "select": {
            "anchors": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
            "pulls": [0.0, 0.1, 0.2, 0.3, 0.4, 1.0, 1.5],
            "candidate_pulls": [None, 0.0, -0.6],
            # the ranked candidate layout past the fair budget, traced where the fair rails hold
            # (benchmarks/results/rows/polyvore_frontier_ranked.md)
            "deep_shares": [0.1, 0.2, 0.3],
            "grid": [["euler", 4], ["euler", 2], ["euler", 1]],
        },
        "eval": {"llm_limit": 100_000},
    },
)
