"""Stage 1 of R4T: GRPO-tune a fan-out policy (FOLM) on set-level rewards (``r4t train-rl``).

The policy (any local Hugging Face chat causal LM; default SmolLM2-135M-Instruct via
:func:`r4t_fast.fanout.policy.resolve_policy`) reads the prompt of
:func:`r4t_fast.fanout.prompt.build_messages` and writes ``k`` subqueries;
:class:`r4t_fast.fanout.rewards.RewardFunction` parses and scores them (OAR composite or WSCR coverage).
Training is TRL's ``GRPOTrainer`` (group size ``num_generations``, advantages standardised in the group,
PPO clip ``epsilon``) with the paper's *soft-PPO* terms added by :class:`SoftPPOGRPOTrainer`:

    per-token loss = -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)                 (TRL)
                     + beta1 * rho * (log pi_theta - log pi_old) + beta2 * (-log pi_theta)   (added)

with ``rho = pi_theta / pi_old``. The added terms act when a generation batch is reused for several
updates (``num_iterations > 1``); on the first pass ``rho = 1`` and, with ``beta1 = beta2``, their gradients
cancel exactly (``d/dtheta [rho log rho] = (1 + log rho) grad rho``, which is ``grad log pi`` at ``rho = 1``).

Rollouts use the same constrained decoding as every other stage (``constrained=True``, ``think=False`` by
default): :func:`r4t_fast.fanout.constrained.install_constraint` on the trainer's model, so every
completion is exactly ``k`` distinct short subqueries; ``max_completion_length`` below the constraint's
``min_new_tokens`` is raised to it (with a warning, recorded in ``rl_config.json``). The rewards are
:func:`r4t_fast.fanout.rewards.build_reward`'s (``task``: auto / oar / wscr / mixed).

Multi-process (``accelerate launch --num_processes N [--cpu] -m r4t_fast.cli train-rl ...``): TRL splits
the batch over the processes; only the main one writes ``rl_config.json``, ``steps.jsonl``, the curve,
``policy/`` and the evaluation (the Trainer saves checkpoints on it too).

Outputs in ``--out`` (``runs/`` is git-ignored)::

    rl_config.json      the resolved RLConfig, command, seed, versions
    steps.jsonl         one line per optimizer step: reward, its terms, format-failure rate, fraction of
                        groups with zero reward spread, KL to the base policy, completion length, loss ...
    reward_curve.png    the curves of steps.jsonl
    checkpoint-N/       TRL checkpoints (LoRA adapter + optimizer + RNG), for --resume
    policy/             the final policy, LoRA merged, saved crash-safely (a symlink to a version with a
                        sha256 manifest, verified on load): a HF model dir that FanOutLM and
                        ``r4t eval --method <out>/policy`` (method ``folm``) load
    eval/               with --evaluate: before/after table (Markdown + JSON), per-query values

CPU settings follow ``shared/NOTES.md``: ``use_cpu=True``, ``bf16=False``, no gradient checkpointing, no
vLLM; LoRA by default.

Layout (as TRL splits ``grpo_config.py`` / ``grpo_trainer.py``): :mod:`r4t_fast.train.rl_config`
(:class:`RLConfig`), :mod:`r4t_fast.train.rl_trainer` (soft-PPO terms, the ``GRPOTrainer`` subclass, the
step logger), :mod:`r4t_fast.train.rl_setup` (data, training dataset, reward, recorded versions) and
:mod:`r4t_fast.train.rl_eval` (before/after evaluation, reward curve). This module loads and saves the
policy, runs :func:`train` and the CLI, and re-exports the public names of the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from r4t_fast import _threads
from r4t_fast._internal import atomic_write_text, check_seed
from r4t_fast.train.rl_config import LOSS_TYPE_CHOICES, RLConfig
from r4t_fast.train.rl_eval import _TABLE_ROWS as _TABLE_ROWS
from r4t_fast.train.rl_eval import _eval_policy as _eval_policy
from r4t_fast.train.rl_eval import (
    evaluate_policies,
    format_before_after,
    plot_reward_curve,
    rebuild_before_after,
    summary_table,
)
from r4t_fast.train.rl_policy import load_policy, save_policy
from r4t_fast.train.rl_setup import (
    CPU_TRAINER_ARGS,
    _load_data,
    _reward_function,
    _versions,
    build_train_dataset,
    completion_cap,
    lora_config,
    micro_batch,
    rollout_constraint,
)
from r4t_fast.train.rl_setup import _split_rows as _split_rows
from r4t_fast.train.rl_trainer import _ALIASES as _ALIASES
from r4t_fast.train.rl_trainer import (
    StepLogger,
    _read_steps,
    _time_budget_class,
    soft_ppo_loss,
    soft_ppo_per_token,
    trainer_class,
)

__all__ = [
    "LOSS_TYPE_CHOICES",
    "RLConfig",
    "SoftPPOGRPOTrainer",  # noqa: F822 - built on first access (module __getattr__)
    "StepLogger",
    "add_cli_arguments",
    "build_train_dataset",
    "cli_main",
    "evaluate_policies",
    "load_policy",
    "plot_reward_curve",
    "rebuild_before_after",
    "save_policy",
    "soft_ppo_loss",
    "soft_ppo_per_token",
    "summary_table",
    "train",
]

# the ``name as name`` imports above re-export private names ``rl.<name>`` users relied on before the split

__test__ = {  # doctest.testmod(rl) also runs the doctests of the soft-PPO terms (now in rl_trainer)
    "soft_ppo_per_token": soft_ppo_per_token,
    "soft_ppo_loss": soft_ppo_loss,
}

_POLICY_SUBDIR = "policy"
_STEPS_FILE = "steps.jsonl"
_CONFIG_FILE = "rl_config.json"
_CURVE_FILE = "reward_curve.png"


def __getattr__(name: str) -> Any:  # SoftPPOGRPOTrainer is built on first use: importing trl is slow
    if name == "SoftPPOGRPOTrainer":
        return trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _world_size() -> int:
    """Processes of this run (``accelerate launch --num_processes N`` sets ``WORLD_SIZE``)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _is_main_process() -> bool:
    """True on the process that writes records (rank 0; the only one without ``accelerate launch``)."""
    return _world_size() == 1 or os.environ.get("RANK", "0") == "0"


def _expert_policy(cfg: RLConfig, data: Any, out: Path) -> Path:
    """The policy GRPO starts from after ``cfg.expert_rounds`` rounds of expert iteration
    (:mod:`r4t_fast.train.rl_expert`, in ``out/expert``); a run that finished them (a resumed one) reuses
    the last round's policy."""
    from r4t_fast.train.rl_expert import expert_iteration  # imports down: rl_expert never imports rl

    if _world_size() > 1:
        raise ValueError(
            "expert_rounds: expert iteration runs in one process; run it without accelerate launch"
        )
    record = out / "expert" / "expert.json"
    if record.is_file():
        rounds = json.loads(record.read_text()).get("rounds", [])
        if len(rounds) >= cfg.expert_rounds and Path(rounds[-1]["policy"]).is_dir():
            return Path(rounds[-1]["policy"])
    return expert_iteration(
        cfg, data, _split_rows(data, [cfg.train_split], cfg.max_train_queries), out / "expert"
    )


def _last_checkpoint(out: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    return Path(c) if out.is_dir() and (c := get_last_checkpoint(str(out))) else None


def train(
    cfg: RLConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    command: str | None = None,
    save: bool = True,
) -> dict[str, Any]:
    """Run GRPO + soft-PPO; write checkpoints, ``steps.jsonl``, the reward curve and ``policy/``.

    Args:
        cfg: the run configuration.
        out_dir: the run directory (created).
        resume: continue from the last ``checkpoint-N`` in ``out_dir`` (an error if there is none) up to
            ``cfg.max_steps`` total steps.
        command: the command line, recorded in ``rl_config.json``.
        save: write ``policy/`` at the end (False: benchmarks that only time the steps).

    Returns:
        a summary: ``steps``, ``train_wall_s``, ``policy_dir``, ``resumed_from``, first/last rewards.
    """
    from trl import GRPOConfig

    out = Path(out_dir)
    checkpoint = None
    if resume:
        checkpoint = _last_checkpoint(out)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint-N directory in {out}")
    elif _last_checkpoint(out) is not None:
        raise FileExistsError(f"out: {out} already holds checkpoints; pass --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(_threads.resolve(cfg.num_threads))  # None: the package's rule
    t_setup = time.time()
    main = _is_main_process()
    with contextlib.ExitStack() as stack:
        if _world_size() > 1:  # the main process fills the caches (catalog, embeddings, SmolLM2) first
            from accelerate import PartialState

            stack.enter_context(PartialState(cpu=True).main_process_first())
        data = _load_data(cfg)
        train_ds = build_train_dataset(cfg, data)
        reward_fn = _reward_function(cfg, data)
        expert = _expert_policy(cfg, data, out) if cfg.expert_rounds else None
        model, tokenizer, model_dir = load_policy(str(expert) if expert else cfg.policy)
    constraint, max_completion = rollout_constraint(
        cfg, tokenizer, completion_cap(cfg, tokenizer), "max_completion_length"
    )
    setup_s = time.time() - t_setup

    batch = cfg.num_generations * cfg.prompts_per_step
    micro = micro_batch(batch, cfg.micro_batch)  # completions per forward/backward pass
    record = {
        "config": cfg.to_dict(),
        "command": command,
        "seed": cfg.seed,
        "policy_dir": str(model_dir),
        "n_train_queries": len(train_ds),
        "catalog_items": len(data.catalog),
        "split_file": str(data.split_path) if data.split_path else None,
        "versions": _versions(),
        "resumed_from": str(checkpoint) if checkpoint else None,
        "reward_task": reward_fn.task,  # cfg.task with 'auto' resolved
        "expert_policy": str(expert) if expert else None,  # GRPO's start after expert iteration
        "rollouts": {"constrained": constraint is not None, "think": cfg.think,
                     "max_completion_length": max_completion, "world_size": _world_size(),
                     "micro_batch": micro},
    }  # fmt: skip
    cfg_path = out / _CONFIG_FILE
    history = json.loads(cfg_path.read_text()).get("runs", []) if (resume and cfg_path.is_file()) else []
    for h in history:  # a run that never wrote its end record was killed or crashed
        if h.get("status") == "running":
            h["status"] = "interrupted"
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    # written now and again at the end, so that a killed run leaves its trace ("status": "running")
    record["runs"] = [*history, {"started": started, "command": command, "status": "running",
                                 "resumed_from": record["resumed_from"]}]  # fmt: skip
    if main:
        atomic_write_text(cfg_path, json.dumps(record, indent=2, default=str) + "\n")
    args = GRPOConfig(
        output_dir=str(out),
        **CPU_TRAINER_ARGS,
        use_vllm=False,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,  # TRL generates the whole batch at once
        num_generations=cfg.num_generations,
        max_completion_length=max_completion,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        learning_rate=cfg.learning_rate,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        epsilon=cfg.epsilon,
        beta=cfg.beta,
        num_iterations=cfg.num_iterations,
        loss_type=cfg.loss_type,
        scale_rewards=cfg.scale_rewards,
        max_steps=cfg.max_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        log_completions=False,
    )
    peft_config = lora_config(cfg, model) if cfg.lora else None
    trainer_cls = trainer_class()
    resume_step = None
    if checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        resume_step = int(state.get("global_step", 0))
    logger = StepLogger(out / _STEPS_FILE, resume_step=resume_step if resume else -1)
    callbacks = [logger]
    budget = None
    if cfg.time_budget_minutes is not None:
        budget = _time_budget_class()(cfg.time_budget_minutes)
        callbacks.append(budget)
    trainer = trainer_cls(
        model=model,
        reward_funcs=[reward_fn],
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        soft_ppo_beta1=cfg.soft_ppo_beta1,
        soft_ppo_beta2=cfg.soft_ppo_beta2,
        log_kl=cfg.log_kl,
    )
    if constraint is not None:  # TRL's rollouts call trainer.model.generate (PEFT and DDP unwrap to it)
        from r4t_fast.fanout.constrained import install_constraint

        install_constraint(trainer.model, constraint, tokenizer)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_s = time.time() - t0
    steps = int(trainer.state.global_step)
    policy_dir = out / _POLICY_SUBDIR
    meta = {"base_policy": str(model_dir), "steps": steps, "config": cfg.to_dict(), "lora_merged": cfg.lora,
            "reward_task": reward_fn.task, "rollouts": record["rollouts"]}  # fmt: skip
    if main and save:  # records, the policy and the curve are written by one process only
        policy_dir = save_policy(trainer.model, tokenizer, policy_dir, meta=meta)
    trainer.accelerator.wait_for_everyone()
    recs = _read_steps(out / _STEPS_FILE)
    curve = None
    if recs and main:
        curve = plot_reward_curve(
            out / _STEPS_FILE, out / _CURVE_FILE, title=f"GRPO on {cfg.dataset}: {cfg.task} reward"
        )
    rewards = [r["reward"] for r in recs if r.get("reward") is not None]
    run = {
        "started": started,
        "status": "finished",
        "command": command,
        "resumed_from": record["resumed_from"],
        "setup_s": round(setup_s, 1),
        "train_wall_s": round(train_s, 1),
        "end_step": steps,
        "train_loss": float(getattr(result, "training_loss", float("nan"))),
        "stopped_by_time_budget_at": budget.stopped_at if budget is not None else None,
    }
    record["runs"] = [*history, run]
    if main:
        atomic_write_text(cfg_path, json.dumps(record, indent=2, default=str) + "\n")
    return {
        "steps": steps,
        "train_wall_s": train_s,
        "setup_s": setup_s,
        "policy_dir": str(policy_dir),
        "reward_curve": str(curve) if curve else None,
        "resumed_from": record["resumed_from"],
        "stopped_by_time_budget_at": run["stopped_by_time_budget_at"],
        "first_rewards": rewards[:5],
        "last_rewards": rewards[-5:],
        "reward_totals": dict(reward_fn.totals),
        "is_main_process": main,
    }


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``r4t train-rl`` arguments."""
    parser.add_argument("--dataset", help="'polyvore', 'spotify' or a sets.jsonl path (overrides the config)")
    parser.add_argument("--policy", help="'smollm2' or a local HF model dir (overrides the config)")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, logs, policy/)")
    parser.add_argument("--config", help="JSON config (RLConfig fields), e.g. training/polyvore/rl.json")
    parser.add_argument("--max-steps", type=int, help="total optimizer steps (overrides the config)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field (VALUE parsed as JSON, else a string); repeatable",
    )
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="after training, compare the base policy (zero-shot) and the tuned one on the held-out queries",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="skip training; evaluate --out/policy against the base policy",
    )


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def config_from_args(args: argparse.Namespace) -> RLConfig:
    """The RLConfig of a parsed ``r4t train-rl`` command line (file, then --set, then named flags)."""
    values = RLConfig.from_file(args.config).to_dict() if args.config else {}
    values.update(_parse_overrides(args.set))
    if args.dataset is not None:
        values["dataset"] = args.dataset
    if args.policy is not None:
        values["policy"] = args.policy
    if args.max_steps is not None:
        values["max_steps"] = args.max_steps
    return RLConfig.from_dict(values, where="train-rl options")


def cli_main(args: argparse.Namespace) -> int:
    """Entry point of ``r4t train-rl``."""
    from r4t_fast.fanout.policy import check_policy_spec

    try:
        cfg = config_from_args(args)
        check_policy_spec(cfg.policy, "--policy" if args.policy is not None else "policy")  # before loading
        check_seed(cfg.seed, "seed")
    except (ValueError, FileNotFoundError) as exc:
        print(f"r4t train-rl: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(_threads.resolve(cfg.num_threads))  # None: the package's rule
    out = Path(args.out)
    command = "r4t " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    if not args.eval_only:
        try:
            summary = train(cfg, out, resume=args.resume, command=command)
        except (FileNotFoundError, FileExistsError, ValueError) as exc:
            print(f"r4t train-rl: error: {exc}", file=sys.stderr)
            return 2
        if not summary["is_main_process"]:
            return 0  # the main process prints the summary and evaluates
        print(json.dumps(summary, indent=2, default=str))
    if (args.evaluate or args.eval_only) and _is_main_process():
        policy_dir = out / _POLICY_SUBDIR
        if not (policy_dir / "config.json").is_file():
            print(f"r4t train-rl: error: no trained policy at {policy_dir}", file=sys.stderr)
            return 2
        from r4t_fast.fanout.policy import resolve_policy

        record = evaluate_policies(
            cfg, {"zero-shot": str(resolve_policy(cfg.policy)), "tuned": str(policy_dir)}, out / "eval"
        )
        print(format_before_after(record))
    return 0
