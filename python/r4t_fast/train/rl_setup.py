"""What a ``r4t train-rl`` run is built from: the evaluation data of the dataset, the query rows of a
split, the TRL training dataset, the reward function, and the versions recorded next to every result.

Shared by training (:mod:`r4t_fast.train.rl`) and the before/after evaluation
(:mod:`r4t_fast.train.rl_eval`).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from r4t_fast._internal import default_cache_dir, package_versions
from r4t_fast.train.rl_config import RLConfig

__all__ = ["build_train_dataset", "completion_cap", "lora_config", "micro_batch", "rollout_constraint"]

RECORDED_PACKAGES = ("r4t_fast", "torch", "transformers", "trl", "peft", "accelerate")
"""Distributions whose versions ``rl_config.json`` and ``before_after.json`` record."""


def _load_data(cfg: RLConfig) -> Any:
    """The dataset, catalog, encoder and split of ``cfg`` (:func:`r4t_fast.data.prepare.load_eval_data`,
    as ``r4t eval`` loads them)."""
    from r4t_fast.data.prepare import load_eval_data

    return load_eval_data(
        cfg.dataset,
        encoder=cfg.encoder,
        data_dir=cfg.data_dir,
        cache_dir=cfg.cache_dir,
        seed=cfg.split_seed,
        extra_items=cfg.include_extra_items,
        progress=False,
    )


def _split_rows(
    data: Any, splits: Sequence[str], limit: int | None, with_refs: bool = True
) -> list[dict[str, Any]]:
    """``{"set_id", "query", "reference"}`` per titled set of ``splits`` (split order, sorted ids)."""
    from r4t_fast.data.datasets import query_text

    by_id = {s.set_id: s for s in data.dataset.sets}
    rows = []
    for name in splits:
        for set_id in data.split[name]:
            s = by_id.get(set_id)
            if s is None or s.query is None:
                continue
            row: dict[str, Any] = {"set_id": set_id, "query": query_text(s)}
            if with_refs:
                row["reference"] = [int(i) for i in data.catalog.id_to_index(s.item_ids)]
            rows.append(row)
    return rows[:limit] if limit is not None else rows


def build_train_dataset(cfg: RLConfig, data: Any) -> Any:
    """The TRL dataset: columns ``prompt`` (chat messages), ``query`` and ``reference`` (catalog rows)."""
    from datasets import Dataset as HFDataset

    from r4t_fast.fanout.prompt import build_messages

    rows = _split_rows(data, [cfg.train_split], cfg.max_train_queries)
    if not rows:
        raise ValueError(f"train_split: the {cfg.train_split!r} split of {cfg.dataset!r} has no titled set")
    return HFDataset.from_list(
        [
            {"prompt": build_messages(r["query"], cfg.k, one_shot=cfg.one_shot, think=cfg.think), **r}
            for r in rows
        ]
    )


def rollout_constraint(cfg: RLConfig, tokenizer: Any, budget: int, name: str) -> tuple[Any, int]:
    """``(FanOutConstraint or None, max new tokens)`` of ``cfg``'s decoding with a cap of ``budget``.

    With ``cfg.constrained`` the constraint is ``FanOutConstraint(k, think=cfg.think)`` and a ``budget``
    below its :meth:`~r4t_fast.fanout.constrained.FanOutConstraint.min_new_tokens` is raised to it with a
    warning naming ``name`` (the config field); without, ``(None, budget)``.
    """
    if not cfg.constrained:
        return None, budget
    import warnings

    from r4t_fast.fanout.constrained import FanOutConstraint

    constraint = FanOutConstraint(
        k=cfg.k, think=cfg.think, forbid_title=bool(getattr(cfg, "forbid_title", False))
    )
    need = constraint.min_new_tokens(tokenizer)
    if budget < need:
        warnings.warn(
            f"{name}: constrained decoding of k={cfg.k} subqueries needs at least {need} new tokens with "
            f"this tokenizer; raised from {budget} to {need}",
            stacklevel=2,
        )
        budget = need
    return constraint, budget


def completion_cap(cfg: RLConfig, tokenizer: Any) -> int:
    """The rollouts' ``max_new_tokens``: ``cfg.max_completion_length``, or with ``cfg.tokens_per_subquery``
    (constrained rollouts) what ``k`` short subqueries need::

        cap = min_new_tokens(k) + k * (tokens_per_subquery - 1)

    ``min_new_tokens`` (:meth:`~r4t_fast.fanout.constrained.FanOutConstraint.min_new_tokens`) already
    holds the tags, the separators and one token per subquery; the constraint shares the rest fairly, so
    every subquery may use ``tokens_per_subquery`` tokens. Batched generation runs until the longest row
    ends, so the cap bounds every step's generate and backward cost.
    """
    if cfg.tokens_per_subquery is None or not cfg.constrained:
        return cfg.max_completion_length
    from r4t_fast.fanout.constrained import FanOutConstraint

    need = FanOutConstraint(k=cfg.k, think=cfg.think).min_new_tokens(tokenizer)
    return need + cfg.k * (cfg.tokens_per_subquery - 1)


CPU_TRAINER_ARGS: dict[str, Any] = {
    "use_cpu": True,
    "bf16": False,
    "fp16": False,
    "gradient_checkpointing": False,
    "report_to": [],
    "disable_tqdm": True,
}
"""The TRL trainer settings of every stage-1 trainer (GRPO, expert iteration's SFT) on this CPU:
``shared/NOTES.md`` (bf16 7.5x slower here, checkpointing 25 % slower), no loggers, no progress bars."""


def micro_batch(batch: int, limit: int) -> int:
    """Completions per forward/backward pass: the largest divisor of the step's ``batch`` that is at most
    ``limit`` (the step's gradient is accumulated over ``batch // micro_batch`` passes).

    >>> micro_batch(64, 8), micro_batch(12, 8), micro_batch(4, 8)
    (8, 6, 4)
    """
    return max(m for m in range(1, min(batch, limit) + 1) if batch % m == 0)


def lora_config(cfg: RLConfig, model: Any = None) -> Any:
    """The ``peft.LoraConfig`` of ``cfg`` (GRPO and expert iteration adapt the same modules).

    ``cfg.lora_layers = n > 0`` adapts only ``model``'s top ``n`` decoder layers: nothing below them
    needs a gradient, so autograd's graph (and the backward pass) starts at the lowest adapted layer."""
    from peft import LoraConfig

    layers = None
    if cfg.lora_layers:
        total = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if not isinstance(total, int):
            raise ValueError("lora_layers: needs a model whose config has num_hidden_layers")
        if cfg.lora_layers > total:
            raise ValueError(f"lora_layers: expected <= {total} (the policy's layers), got {cfg.lora_layers}")
        layers = list(range(total - cfg.lora_layers, total))
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def _reward_function(cfg: RLConfig, data: Any) -> Any:
    """The :class:`r4t_fast.fanout.rewards.RewardFunction` of ``cfg`` over ``data``'s catalog
    (:func:`r4t_fast.fanout.rewards.build_reward`; ``task="auto"`` is resolved on the training split's
    reference sets, so training and evaluation score with the same regime)."""
    from r4t_fast.data.encoders import EmbeddingCache
    from r4t_fast.fanout.rewards import build_reward
    from r4t_fast.objectives import fair_budget

    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir is not None else default_cache_dir()
    refs = None
    if cfg.task == "auto":
        refs = [r["reference"] for r in _split_rows(data, [cfg.train_split], cfg.max_train_queries)]
    return build_reward(
        cfg.task,
        data.catalog,
        data.encoder,
        references=refs,
        k=cfg.k,
        weights=cfg.weights,
        mixed_weight=cfg.mixed_weight,
        copy_penalty=cfg.copy_penalty,
        soft_tau=cfg.soft_tau,
        budget_per_row=cfg.budget_per_row or max(1, fair_budget(len(data.catalog), cfg.k) // cfg.k),
        missing=cfg.missing,
        require_strict_format=cfg.require_strict_format,
        cache=EmbeddingCache(root / "embeddings"),  # the embedding cache r4t eval uses
    )


def _versions() -> dict[str, str]:
    """Python and :data:`RECORDED_PACKAGES` versions (:func:`r4t_fast._internal.package_versions`), with
    the machine architecture and CPU count."""
    versions = package_versions(RECORDED_PACKAGES)
    return {
        "python": versions.pop("python"),
        "machine": platform.machine(),
        "cpus": str(os.cpu_count()),
        **versions,
    }
