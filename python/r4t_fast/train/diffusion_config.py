"""Configuration of ``r4t train-diffusion``: :class:`DiffusionTrainConfig` (every field with help text).

Kept apart from the trainer (:mod:`r4t_fast.train.diffusion`, which re-exports it), as
:mod:`r4t_fast.train.rl_config` is kept apart from the RL trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from r4t_fast._config import help_field
from r4t_fast._internal import check_choice, check_non_negative_int, check_positive_int
from r4t_fast.train.targets import TARGET_CHOICES

__all__ = ["DiffusionTrainConfig"]


@dataclass
class DiffusionTrainConfig:
    """Settings of a diffusion training run."""

    preset: str = help_field("cpu-small", "model preset: paper | cpu-small | tiny")
    steps: int = help_field(3000, "optimizer steps")
    batch_size: int = help_field(128, "sets per batch")
    lr: float = help_field(3e-4, "peak learning rate (Adam)")
    warmup: int = help_field(200, "linear warm-up steps")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    ema: float = help_field(0.999, "EMA decay of the saved weights (paper: 0.9999)")
    grad_clip: float = help_field(1.0, "gradient norm clip (0 = off)")
    sigma_data: float | None = help_field(None, "data std; None = measure")
    cond_offset: float | str = help_field(
        "auto",
        "query-centred targets x0 - a * query: a float, 'fit' (least squares over the pairs) "
        "or 'auto' (fit when query and rows share a dimension, else 0)",
    )
    min_reward: float | None = help_field(None, "drop pairs with reward below this")
    seed: int = help_field(0, "seed for init, batches and noise")
    threads: int = help_field(0, "torch CPU threads (0: r4t_fast._threads rule)")
    device: str = help_field("cpu", "cpu or cuda")
    log_every: int = help_field(50, "steps between log lines")
    checkpoint_every: int = help_field(
        100,
        "steps between resumable checkpoints of the whole training state (0 = off): r4t "
        "train-diffusion and r4t pipeline keep it beside the output (<out>.checkpoint.pt), resume from it "
        "when started again with the same settings and pairs, and delete it once the model is saved",
    )
    overrides: dict[str, Any] = help_field({}, "model config overrides")
    targets: str = help_field(
        "teacher",
        "training targets: 'teacher' (synthesis shards), 'reference' (the dataset's train-split "
        "sets; needs --dataset) or 'both' (concatenated)",
    )
    reference_samples: int = help_field(4, "targets 'reference'/'both': k-row draws per reference set")
    k: int | None = help_field(None, "rows of a reference target (None: the shards' set size, else 10)")
    retrieval_weight: float = help_field(
        0.0,
        "weight of the rows' retrieval loss beside the EDM loss (0 = off; needs reference "
        "sets: targets reference/both; r4t_fast.train.row_loss)",
    )
    retrieval_tau: float = help_field(0.05, "retrieval loss: softmax temperature over cosine scores")
    retrieval_batch: int = help_field(64, "retrieval loss: sets of each batch that take it (the first ones)")
    retrieval_query_budget: int = help_field(
        0,
        "retrieval loss: reference items the query itself ranks within this many take no loss "
        "(the query-anchored row as a competitor; 0 = off)",
    )
    retrieval_deep_weight: float = help_field(
        0.0,
        "retrieval loss: weight of its deep-budget term, a soft rank of each assigned reference "
        "item under its row against retrieval_deep_budget (0 = off; the R@5000 budget: issue 18)",
    )
    retrieval_deep_budget: int = help_field(
        500, "deep-budget term: candidates per row it asks each item to be within"
    )
    retrieval_deep_tau: float = help_field(
        0.02, "deep-budget term: sigmoid temperature of the soft rank (cosine units)"
    )
    retrieval_unroll: int = help_field(
        0,
        "retrieval loss on: 0 = the denoiser's clean-set prediction at the EDM training noise "
        "level; n > 0 = the rows an n-step Euler sampler (the Retriever's sampler 'euler', n steps, "
        "guidance 0) draws from pure noise, differentiated through every step (DRaFT-style)",
    )
    retrieval_noise: str = help_field(
        "random",
        "retrieval_unroll's initial noise: 'random' (a fresh draw per set, as a Retriever with "
        "noise='query' samples) or 'fixed' (one draw of the default sampling seed, shared by every set: "
        "the rows a Retriever with noise='fixed' and that seed grounds -- one deterministic set of rows "
        "per query)",
    )
    init_from: str | None = help_field(
        None,
        "fine-tune: a saved set model (an r4t train-diffusion or Retriever directory) whose weights and "
        "model config (sigma_data, cond_offset, sizes) start the run instead of a fresh init; the "
        "model preset and overrides are then not used (issue 18, lever 2: a trained sampler fine-tuned "
        "on the rows' retrieval loss)",
    )
    select_every: int = help_field(
        0,
        "steps between validation scores of the EMA model (0 = off); the best-scoring weights "
        "are kept (early stopping; needs a select_fn, e.g. the rows' val recall)",
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "reference_samples", "retrieval_batch"):
            setattr(self, name, check_positive_int(getattr(self, name), name))
        for name in ("retrieval_query_budget", "retrieval_unroll", "select_every", "checkpoint_every"):
            setattr(self, name, check_non_negative_int(getattr(self, name), name))
        if self.init_from is not None and self.overrides:
            raise ValueError(
                f"overrides: {sorted(self.overrides)} would be ignored: a fine-tune (init_from) keeps the "
                "saved model's config"
            )
        if self.retrieval_noise not in ("random", "fixed"):
            raise ValueError(f"retrieval_noise: expected 'random' or 'fixed', got {self.retrieval_noise!r}")
        if not (math.isfinite(self.retrieval_weight) and self.retrieval_weight >= 0):
            raise ValueError(f"retrieval_weight: expected a finite float >= 0, got {self.retrieval_weight}")
        for name in ("retrieval_tau", "retrieval_deep_tau"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite float > 0, got {v}")
        if not (math.isfinite(self.retrieval_deep_weight) and self.retrieval_deep_weight >= 0):
            raise ValueError(
                f"retrieval_deep_weight: expected a finite float >= 0, got {self.retrieval_deep_weight}"
            )
        self.retrieval_deep_budget = check_positive_int(self.retrieval_deep_budget, "retrieval_deep_budget")
        if self.k is not None:
            self.k = check_positive_int(self.k, "k")
        check_choice(self.targets, TARGET_CHOICES, "targets")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: expected a finite float > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema: expected a value in [0, 1), got {self.ema}")
        if isinstance(self.cond_offset, str):
            if self.cond_offset not in ("auto", "fit"):
                raise ValueError(f"cond_offset: expected a float, 'fit' or 'auto', got {self.cond_offset!r}")
        elif isinstance(self.cond_offset, bool) or not math.isfinite(float(self.cond_offset)):
            raise ValueError(f"cond_offset: expected a finite float, 'fit' or 'auto', got {self.cond_offset}")
