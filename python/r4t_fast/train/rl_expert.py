"""Expert iteration before GRPO (issue 19, lever 2; RAFT / ReST-EM in its cheapest form).

Each round: the current policy samples ``expert_samples`` (n) fan-outs per training title with the
rollouts' constrained decoding; the stage's reward (:func:`r4t_fast.train.rl_setup._reward_function`, the
same one GRPO optimises) scores them; the best ``expert_keep`` (m) of each title become supervised
examples (prompt = :func:`r4t_fast.fanout.prompt.build_messages`, completion = the answer re-written in
the strict format by :func:`~r4t_fast.fanout.prompt.format_answer`); TRL's ``SFTTrainer`` fine-tunes a
LoRA adapter on them (loss on the completion only), which is merged into the next round's policy. The
sampling, scoring and filtering is synthesis's own (:func:`r4t_fast.train.synthesis.sample_and_select`).

``r4t train-rl`` runs ``expert_rounds`` rounds (``RLConfig``; 0 = off) before GRPO, which then starts
from the last round's policy. Outputs in ``--out``: ``expert/round-N/policy`` (merged, saved
crash-safely) and ``expert/expert.json`` (per round: mean reward of all samples and of the kept ones,
counts, wall seconds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from r4t_fast._internal import atomic_write_text
from r4t_fast.train.rl_config import RLConfig

__all__ = ["expert_iteration", "expert_examples"]


def expert_examples(queries: list[str], sel: Any, cfg: RLConfig) -> list[dict[str, Any]]:
    """The SFT rows of the kept samples: ``{"prompt": messages, "completion": [assistant message]}``."""
    from r4t_fast.fanout.prompt import build_messages, format_answer

    rows = []
    for r in sel.keep_rows:
        qi = sel.flat[r][0]
        answer = format_answer(sel.scored.subqueries[r][: cfg.k])
        rows.append(
            {
                "prompt": build_messages(queries[qi], cfg.k, one_shot=cfg.one_shot, think=cfg.think),
                "completion": [{"role": "assistant", "content": answer}],
            }
        )
    return rows


def _sft_round(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], cfg: RLConfig, out: Path
) -> tuple[Any, float]:
    """LoRA SFT over ``rows`` (TRL ``SFTTrainer``, completion-only loss): (merged model, training loss)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from r4t_fast.train.rl_setup import CPU_TRAINER_ARGS, lora_config

    args = SFTConfig(
        output_dir=str(out),
        **CPU_TRAINER_ARGS,
        per_device_train_batch_size=cfg.expert_batch_size,
        num_train_epochs=cfg.expert_epochs,
        learning_rate=cfg.expert_learning_rate,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        completion_only_loss=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(cfg, model),
    )
    result = trainer.train()
    return trainer.model.merge_and_unload(), float(getattr(result, "training_loss", float("nan")))


def expert_iteration(cfg: RLConfig, data: Any, train_rows: list[dict[str, Any]], out_dir: Path) -> Path:
    """Run ``cfg.expert_rounds`` rounds from ``cfg.policy`` on ``train_rows`` (``{"query", "reference"}``);
    returns the last round's policy directory (module docstring)."""
    from r4t_fast.fanout.generation import FanOutLM
    from r4t_fast.fanout.policy import resolve_policy
    from r4t_fast.train.rl_policy import load_policy, save_policy
    from r4t_fast.train.rl_setup import _reward_function, rollout_constraint
    from r4t_fast.train.synthesis import sample_and_select

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = train_rows[: cfg.expert_max_queries] if cfg.expert_max_queries else train_rows
    queries = [r["query"] for r in rows]
    references = [r["reference"] for r in rows]
    reward_fn = _reward_function(cfg, data)
    policy = resolve_policy(cfg.policy)
    record: dict[str, Any] = {"rounds": [], "reward_task": reward_fn.task, "n_queries": len(queries)}
    for rnd in range(1, cfg.expert_rounds + 1):
        t0 = time.time()
        model, tokenizer, _ = load_policy(str(policy))
        constraint, max_new = rollout_constraint(
            cfg, tokenizer, cfg.max_completion_length, "max_completion_length"
        )
        lm = FanOutLM.from_model(model, tokenizer, device="cpu")
        lm.one_shot = cfg.one_shot  # sample with the prompt the SFT rows and GRPO use
        sel = sample_and_select(
            queries, lm, reward_fn, k=cfg.k, samples=cfg.expert_samples, keep=cfg.expert_keep,
            temperature=cfg.temperature, max_new_tokens=max_new, batch_size=cfg.expert_batch_size * 4,
            seed=cfg.seed + rnd, constrained=constraint if constraint is not None else False,
            think=cfg.think, min_subqueries=1, references=references,
        )  # fmt: skip
        examples = expert_examples(queries, sel, cfg)
        if not examples:
            raise ValueError(f"expert_rounds: round {rnd} kept no sample (no completion had a subquery)")
        model.train()
        merged, loss = _sft_round(model, tokenizer, examples, cfg, out / f"round-{rnd}" / "sft")
        policy = save_policy(
            merged, tokenizer, out / f"round-{rnd}" / "policy",
            meta={"base_policy": str(policy), "expert_round": rnd, "config": cfg.to_dict()},
        )  # fmt: skip
        rewards = np.asarray(sel.scored.reward, dtype=np.float64)
        record["rounds"].append({
            "round": rnd, "sampled": sel.counts["sampled"], "kept": sel.counts["kept"],
            "mean_reward_sampled": float(rewards.mean()),
            "mean_reward_kept": float(rewards[sel.keep_rows].mean()),
            "copy_rate": sel.scored.summary().get("copy_rate"), "sft_loss": loss,
            "policy": str(policy), "wall_s": round(time.time() - t0, 1),
        })  # fmt: skip
        atomic_write_text(out / "expert.json", json.dumps(record, indent=2, default=str) + "\n")
    return Path(policy)
