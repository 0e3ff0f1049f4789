"""Stage 1 of R4T: GRPO-tune a fan-out policy (FOLM) on set-level rewards (``r4t train-rl``).

The policy (any local Hugging Face chat causal LM; default SmolLM2-135M-Instruct via
:func:`r4t_fast.llm.resolve_policy`) reads the prompt of :func:`r4t_fast.llm.build_messages` and writes
``k`` subqueries; :class:`r4t_fast.rewards.RewardFunction` parses and scores them (OAR composite or WSCR
coverage). Training is TRL's ``GRPOTrainer`` (group size ``num_generations``, advantages standardised in
the group, PPO clip ``epsilon``) with the paper's *soft-PPO* terms added by :class:`SoftPPOGRPOTrainer`:

    per-token loss = -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)                 (TRL)
                     + beta1 * rho * (log pi_theta - log pi_old) + beta2 * (-log pi_theta)   (added)

with ``rho = pi_theta / pi_old``. The added terms act when a generation batch is reused for several
updates (``num_iterations > 1``); on the first pass ``rho = 1`` and, with ``beta1 = beta2``, their gradients
cancel exactly (``d/dtheta [rho log rho] = (1 + log rho) grad rho``, which is ``grad log pi`` at ``rho = 1``).

Outputs in ``--out`` (``runs/`` is git-ignored)::

    rl_config.json      the resolved RLConfig, command, seed, versions
    steps.jsonl         one line per optimizer step: reward, its terms, format-failure rate, fraction of
                        groups with zero reward spread, KL to the base policy, completion length, loss ...
    reward_curve.png    the curves of steps.jsonl
    checkpoint-N/       TRL checkpoints (LoRA adapter + optimizer + RNG), for --resume
    policy/             the final policy, LoRA merged: a plain HF model dir that FanOutLM and
                        ``r4t eval --method <out>/policy`` (method ``folm``) load
    eval/               with --evaluate: before/after table (Markdown + JSON), per-query values

CPU settings follow ``shared/NOTES.md``: ``use_cpu=True``, ``bf16=False``, no gradient checkpointing, no
vLLM; LoRA by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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

LOSS_TYPE_CHOICES = ("dapo", "grpo", "bnpo", "dr_grpo")
"""TRL loss aggregations the soft-PPO terms support (they are normalised the same way as the policy loss)."""

_CHATML_END = "<|im_end|>"
_POLICY_SUBDIR = "policy"
_STEPS_FILE = "steps.jsonl"
_CONFIG_FILE = "rl_config.json"
_CURVE_FILE = "reward_curve.png"


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------
def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (``metadata["help"]``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RLConfig:
    """Everything ``r4t train-rl`` needs; every field has help text (``RLConfig.help()``).

    Load from JSON with :meth:`from_file` (unknown keys are errors that list the valid ones).
    """

    # -- data ------------------------------------------------------------------------------------------
    dataset: str = _f("polyvore", "dataset: 'polyvore', 'spotify' or a sets.jsonl path")
    data_dir: str | None = _f(None, "directory holding polyvore/ and spotify_editorial/ (default: auto)")
    include_extra_items: bool = _f(
        True, "Polyvore: add the Polyvore-T test items to the catalog (as r4t eval)"
    )
    split_seed: int = _f(0, "seed of the 8:1:1 split (r4t_fast.evaluation.dataset_split; same as r4t eval)")
    train_split: str = _f("train", "split whose titles are the training queries: 'train', 'val' or 'test'")
    max_train_queries: int | None = _f(None, "use only the first N training queries (None: all)")
    cache_dir: str | None = _f(
        None, "cache root for embeddings/catalogs/splits (default $R4T_CACHE_DIR or ~/.cache)"
    )
    # -- policy ----------------------------------------------------------------------------------------
    policy: str = _f(
        "smollm2", "policy: 'smollm2' or a local Hugging Face causal-LM dir with a chat template"
    )
    lora: bool = _f(True, "train a LoRA adapter (merged into the saved policy); False = full fine-tuning")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "LoRA dropout (0 keeps pi_old and pi_theta comparable across passes)")
    lora_target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names LoRA adapts (Llama/SmolLM2 names)",
    )
    # -- prompt ----------------------------------------------------------------------------------------
    k: int = _f(10, "subqueries asked for per query (paper: 10)")
    one_shot: bool = _f(True, "include the worked example in the prompt (as FanOutLM does by default)")
    # -- reward ----------------------------------------------------------------------------------------
    task: str = _f("oar", "reward: 'oar' (0.6 g + 0.2 d + 0.2 a composite) or 'wscr' (reference coverage)")
    weights: list[float] = _f([0.6, 0.2, 0.2], "OAR weights (groundedness, diversity, alignment)")
    missing: str = _f(
        "query",
        "unwritten subqueries: 'query' (rows = raw query, as r4t eval), 'zero' (reward x n/k) or 'ignore'",
    )
    require_strict_format: bool = _f(
        False, "score 0 also for completions that parse but break the strict format"
    )
    budget_per_row: int = _f(10, "WSCR (and logged coverage): catalog items retrieved per subquery")
    encoder: str = _f("minilm", "frozen text encoder of the retriever: 'minilm', 'hashing:<dim>' or a path")
    # -- GRPO ------------------------------------------------------------------------------------------
    num_generations: int = _f(8, "completions per query (the GRPO group size G; paper: 8)")
    prompts_per_step: int = _f(1, "queries per optimizer step (batch = prompts_per_step * num_generations)")
    max_completion_length: int = _f(112, "max generated tokens per completion during training")
    temperature: float = _f(1.0, "sampling temperature of the training rollouts")
    top_p: float = _f(1.0, "nucleus mass of the training rollouts")
    learning_rate: float = _f(3e-4, "AdamW learning rate (LoRA; use ~1e-6 for full fine-tuning)")
    adam_beta1: float = _f(0.9, "AdamW beta1 (paper: 0.9)")
    adam_beta2: float = _f(0.95, "AdamW beta2 (paper: 0.95)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    lr_scheduler_type: str = _f("constant", "transformers scheduler name ('constant', 'cosine', ...)")
    warmup_steps: int = _f(0, "linear warm-up steps")
    epsilon: float = _f(0.2, "PPO clip epsilon (paper: 0.2)")
    beta: float = _f(0.0, "KL-to-reference penalty of TRL (paper: none, 0)")
    num_iterations: int = _f(2, "updates per generation batch (mu); > 1 activates the soft-PPO terms")
    loss_type: str = _f("dapo", f"TRL loss aggregation, one of {', '.join(LOSS_TYPE_CHOICES)}")
    scale_rewards: str = _f(
        "group", "advantage scaling: 'group' (standardise in the group, paper), 'batch', 'none'"
    )
    soft_ppo_beta1: float = _f(0.05, "soft-PPO beta1 of beta1 * rho * (log pi - log pi_old) (paper: 0.05)")
    soft_ppo_beta2: float = _f(0.05, "soft-PPO beta2 of beta2 * (-log pi) (paper: 0.05)")
    log_kl: bool = _f(
        True, "log KL(pi_theta || base) each step (LoRA: base = adapter disabled; one extra forward)"
    )
    # -- run -------------------------------------------------------------------------------------------
    max_steps: int = _f(60, "total optimizer steps (a resumed run continues up to this step)")
    save_steps: int = _f(10, "checkpoint every N steps")
    save_total_limit: int = _f(2, "checkpoints kept")
    seed: int = _f(0, "seed of sampling, LoRA init and data order")
    num_threads: int | None = _f(
        None,
        "torch CPU threads for training and evaluation (None: torch's default; 1 on an oversubscribed CPU)",
    )
    time_budget_minutes: float | None = _f(
        None, "stop training (checkpoint + policy saved) once this many minutes of training have passed"
    )
    # -- evaluation (--evaluate) -----------------------------------------------------------------------
    eval_splits: list[str] = _f(
        ["test"], "splits whose titles are the held-out queries (e.g. ['val', 'test'])"
    )
    eval_max_queries: int | None = _f(None, "evaluate only the first N held-out queries (None: all)")
    eval_max_new_tokens: int = _f(160, "max generated tokens per completion at evaluation (greedy)")
    eval_batch_size: int = _f(16, "queries per generate batch at evaluation")
    eval_n_boot: int = _f(2000, "bootstrap resamples of the paired CIs")

    # -- construction ----------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config") -> RLConfig:
        """Build from a dict; unknown keys raise ``ValueError`` listing the valid ones."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> RLConfig:
        """Load a JSON config (keys = field names; ``"//"``-prefixed keys are comments)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config: {p} is not a file")
        try:
            values = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config: {p} is not valid JSON ({exc})") from None
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if not k.startswith("//")}
        return cls.from_dict(values, where=f"config {p}")

    def replace(self, **changes: Any) -> RLConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""

        def pos_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")

        def choice(name: str, choices: Sequence[str]) -> None:
            v = getattr(self, name)
            if v not in choices:
                raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {v!r}")

        def number(name: str, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            if not ok or v < low or (open_low and v == low) or v > high:
                rule = f"{'>' if open_low else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
                raise ValueError(f"{name}: expected a number {rule}, got {v!r}")

        for name in ("lora_r", "lora_alpha", "k", "num_generations", "prompts_per_step"):
            pos_int(name)
        for name in ("max_completion_length", "budget_per_row", "num_iterations", "max_steps", "save_steps"):
            pos_int(name)
        for name in ("save_total_limit", "eval_max_new_tokens", "eval_batch_size", "eval_n_boot"):
            pos_int(name)
        for name in ("max_train_queries", "num_threads", "eval_max_queries"):
            pos_int(name, allow_none=True)
        if self.k > 64:
            raise ValueError(f"k: expected an int in [1, 64], got {self.k}")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations: GRPO needs at least 2 completions per query, got {self.num_generations}"
            )
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps: expected an int >= 0, got {self.warmup_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an int, got {self.seed!r}")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise ValueError(f"split_seed: expected an int, got {self.split_seed!r}")
        choice("task", ("oar", "wscr"))
        choice("missing", ("query", "zero", "ignore"))
        choice("loss_type", LOSS_TYPE_CHOICES)
        choice("scale_rewards", ("group", "batch", "none"))
        choice("train_split", ("train", "val", "test"))
        if not isinstance(self.eval_splits, list) or not self.eval_splits:
            raise ValueError(
                f"eval_splits: expected a non-empty list of split names, got {self.eval_splits!r}"
            )
        for s in self.eval_splits:
            if s not in ("train", "val", "test"):
                raise ValueError(f"eval_splits: expected names among 'train', 'val', 'test', got {s!r}")
        if self.train_split in self.eval_splits:
            raise ValueError(
                f"eval_splits: must not contain the training split {self.train_split!r}, "
                f"got {self.eval_splits}"
            )
        if not isinstance(self.weights, (list, tuple)) or len(self.weights) != 3:
            raise ValueError(
                f"weights: expected 3 numbers (groundedness, diversity, alignment), got {self.weights!r}"
            )
        for w in self.weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"weights: expected finite numbers, got {self.weights!r}")
        if not isinstance(self.lora_target_modules, list) or not all(
            isinstance(m, str) and m for m in self.lora_target_modules
        ):
            raise ValueError(
                f"lora_target_modules: expected a list of module names, got {self.lora_target_modules!r}"
            )
        number("lora_dropout", 0.0, 1.0)
        number("temperature", 0.0, open_low=True)
        number("top_p", 0.0, 1.0, open_low=True)
        number("learning_rate", 0.0, open_low=True)
        number("adam_beta1", 0.0, 1.0)
        number("adam_beta2", 0.0, 1.0)
        number("weight_decay", 0.0)
        number("max_grad_norm", 0.0, open_low=True)
        number("epsilon", 0.0, 1.0, open_low=True)
        number("beta", 0.0)
        number("soft_ppo_beta1", 0.0)
        number("soft_ppo_beta2", 0.0)
        if self.time_budget_minutes is not None:
            number("time_budget_minutes", 0.0, open_low=True)
        for name in ("dataset", "policy", "encoder", "lr_scheduler_type"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{name}: expected a non-empty string, got {v!r}")


# ----------------------------------------------------------------------------------------------------
# soft-PPO
# ----------------------------------------------------------------------------------------------------
def soft_ppo_per_token(
    per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor, beta1: float, beta2: float
) -> torch.Tensor:
    """The paper's soft-PPO terms per token: ``beta1 * rho * (log pi - log pi_old) + beta2 * (-log pi)``.

    ``rho = exp(log pi - log pi_old)``; ``pi_old`` is constant (detached). Shapes ``(B, T)``.

    >>> lp, old = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    >>> round(float(soft_ppo_per_token(lp, old, 0.05, 0.05)), 6)   # 0.05*e^0.5*0.5 + 0.05*1
    0.091218
    """
    if per_token_logps.shape != old_per_token_logps.shape:
        raise ValueError(
            f"old_per_token_logps: expected shape {tuple(per_token_logps.shape)}, "
            f"got {tuple(old_per_token_logps.shape)}"
        )
    log_ratio = per_token_logps - old_per_token_logps.detach()
    return beta1 * torch.exp(log_ratio) * log_ratio - beta2 * per_token_logps


def soft_ppo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta1: float = 0.05,
    beta2: float = 0.05,
    loss_type: str = "dapo",
    gradient_accumulation_steps: int = 1,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    num_processes: int = 1,
    steps_per_generation: int = 1,
    training: bool = True,
) -> torch.Tensor:
    """The soft-PPO terms, aggregated exactly like TRL 1.16 aggregates the policy loss of ``loss_type``.

    With ``x = soft_ppo_per_token(...)`` and ``m`` the completion mask (``G`` = gradient accumulation
    steps in training, 1 in evaluation):

    * ``grpo``: ``mean_b (sum_t x m / max(1, sum_t m)) / G``
    * ``bnpo``: ``(sum x m / max(1, sum m)) / G``
    * ``dr_grpo``: ``(sum x m / (B * max_completion_length)) / G``
    * ``dapo``: ``sum x m / (max(1, num_items_in_batch) / num_processes * G / steps_per_generation)``
      (the ``G / steps_per_generation`` factor only in training)

    >>> lp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    >>> m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    >>> round(float(soft_ppo_loss(lp, lp, m, loss_type="bnpo")), 6)    # rho = 1: 0.05 * mean(-log pi)
    0.058333
    """
    if loss_type not in LOSS_TYPE_CHOICES:
        raise ValueError(f"loss_type: expected one of {', '.join(LOSS_TYPE_CHOICES)}, got {loss_type!r}")
    if mask.shape != per_token_logps.shape:
        raise ValueError(f"mask: expected shape {tuple(per_token_logps.shape)}, got {tuple(mask.shape)}")
    x = soft_ppo_per_token(per_token_logps, old_per_token_logps, beta1, beta2) * mask
    accum = float(gradient_accumulation_steps) if training else 1.0
    if loss_type == "grpo":
        return (x.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accum
    if loss_type == "bnpo":
        return x.sum() / mask.sum().clamp(min=1.0) / accum
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("max_completion_length: required for loss_type='dr_grpo'")
        return x.sum() / (x.shape[0] * max_completion_length) / accum
    if num_items_in_batch is None:
        raise ValueError("num_items_in_batch: required for loss_type='dapo'")
    n = torch.as_tensor(num_items_in_batch, dtype=x.dtype, device=x.device).clamp(min=1.0) / num_processes
    if training:
        n = n * gradient_accumulation_steps / steps_per_generation
    return x.sum() / n


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def _make_trainer_class() -> type:
    from trl import GRPOTrainer

    class _SoftPPOGRPOTrainer(GRPOTrainer):
        """``trl.GRPOTrainer`` plus the paper's soft-PPO terms and a logged KL to the base policy.

        Extra keyword arguments: ``soft_ppo_beta1``, ``soft_ppo_beta2`` (default 0.05 each) and
        ``log_kl`` (LoRA policies with ``beta == 0``: compute the base policy's log-probs once per
        generation batch, adapter disabled, and log ``kl`` = mean over completion tokens of the k3
        estimator ``exp(r) - r - 1``, ``r = log pi_base - log pi_theta``; TRL logs ``kl`` itself when
        ``beta > 0``). The soft-PPO terms (:func:`soft_ppo_loss`) are added when ``num_iterations > 1``
        and logged as ``soft_ppo/penalty``.
        """

        def __init__(
            self,
            *args: Any,
            soft_ppo_beta1: float = 0.05,
            soft_ppo_beta2: float = 0.05,
            log_kl: bool = True,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            if self.loss_type not in LOSS_TYPE_CHOICES:
                raise ValueError(
                    f"args.loss_type: soft-PPO supports {', '.join(LOSS_TYPE_CHOICES)}, "
                    f"got {self.loss_type!r}"
                )
            if self.args.importance_sampling_level != "token":
                raise ValueError(
                    "args.importance_sampling_level: soft-PPO is per token, got "
                    f"{self.args.importance_sampling_level!r}"
                )
            self.soft_ppo_beta1 = float(soft_ppo_beta1)
            self.soft_ppo_beta2 = float(soft_ppo_beta2)
            self.log_kl = bool(log_kl)
            self._capture_logps = False
            self._captured_logps: torch.Tensor | None = None

        # -- the base policy's log-probs, for the KL metric ------------------------------------------
        def _kl_reference_available(self) -> bool:
            from peft import PeftModel

            return (
                self.log_kl
                and self.beta == 0.0
                and isinstance(self.accelerator.unwrap_model(self.model), PeftModel)
            )

        def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
            out = super()._generate_and_score_completions(inputs)
            if self.model.training and self._kl_reference_available():
                ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
                mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
                with torch.no_grad(), self.accelerator.unwrap_model(self.model).disable_adapter():
                    ref, _, _ = self._get_per_token_logps_and_entropies(
                        self.model,
                        ids,
                        mask,
                        out["completion_ids"].size(1),
                        batch_size=self.args.per_device_train_batch_size,
                    )
                out["r4t_ref_per_token_logps"] = ref
            return out

        # -- loss ------------------------------------------------------------------------------------
        def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
            result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if self._capture_logps:
                self._captured_logps = result[0]
            return result

        def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
            self._capture_logps, self._captured_logps = True, None
            try:
                loss = super()._compute_loss(model, inputs)
            finally:
                self._capture_logps = False
            logps, self._captured_logps = self._captured_logps, None
            if logps is None:  # pragma: no cover - TRL changed how it computes the log-probs
                raise RuntimeError("SoftPPOGRPOTrainer: could not capture the policy log-probs from TRL")
            mode = "train" if self.model.training else "eval"
            mask = inputs["completion_mask"]
            if "tool_mask" in inputs:
                mask = mask * inputs["tool_mask"]
            mask = mask.to(logps.dtype)
            old = inputs.get("old_per_token_logps")
            if self.num_iterations > 1 and old is not None:
                penalty = soft_ppo_loss(
                    logps,
                    old,
                    mask,
                    beta1=self.soft_ppo_beta1,
                    beta2=self.soft_ppo_beta2,
                    loss_type=self.loss_type,
                    gradient_accumulation_steps=self.current_gradient_accumulation_steps,
                    max_completion_length=self.max_completion_length,
                    num_items_in_batch=inputs.get("num_items_in_batch"),
                    num_processes=self.accelerator.num_processes,
                    steps_per_generation=self.args.steps_per_generation,
                    training=mode == "train",
                )
                loss = loss + penalty
                self._metrics[mode]["soft_ppo/penalty"].append(float(penalty.detach()))
                ratio = torch.exp(logps.detach() - old)
                self._metrics[mode]["soft_ppo/ratio_mean"].append(_masked_mean(ratio, mask))
            ref = inputs.get("r4t_ref_per_token_logps")
            if ref is not None:
                r = ref - logps.detach()
                self._metrics[mode]["kl"].append(_masked_mean(torch.exp(r) - r - 1.0, mask))
            return loss

    _SoftPPOGRPOTrainer.__name__ = _SoftPPOGRPOTrainer.__qualname__ = "SoftPPOGRPOTrainer"
    _SoftPPOGRPOTrainer.__module__ = __name__
    return _SoftPPOGRPOTrainer


_TRAINER_CLASS: type | None = None


def __getattr__(name: str) -> Any:  # SoftPPOGRPOTrainer is built on first use: importing trl is slow
    global _TRAINER_CLASS
    if name == "SoftPPOGRPOTrainer":
        if _TRAINER_CLASS is None:
            _TRAINER_CLASS = _make_trainer_class()
        return _TRAINER_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------
# per-step logs and the reward curve
# ----------------------------------------------------------------------------------------------------
_ALIASES = {
    "reward": "reward",
    "r4t/groundedness": "groundedness",
    "r4t/diversity": "diversity",
    "r4t/alignment": "alignment",
    "r4t/coverage": "coverage",
    "r4t/format_failure_rate": "format_failure_rate",
    "r4t/strict_format_failure_rate": "strict_format_failure_rate",
    "r4t/n_subqueries": "n_subqueries",
    "frac_reward_zero_std": "frac_zero_spread_groups",
    "kl": "kl",
    "completions/mean_length": "completion_length",
}


def _step_logger_class() -> type:
    from transformers import TrainerCallback

    class _StepLogger(TrainerCallback):
        """Appends one JSON line per ``on_log`` (every optimizer step with ``logging_steps=1``).

        Each line has ``step``, ``time`` (unix), ``elapsed_s`` (wall seconds of training so far, summed
        over resumed runs), TRL's keys and short aliases: ``reward``, ``groundedness``, ``diversity``,
        ``alignment``, ``coverage``, ``format_failure_rate``, ``frac_zero_spread_groups``, ``kl``,
        ``completion_length``.
        """

        def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None) -> None:
            self.path = Path(path)
            self.offset = 0.0
            if self.path.is_file():
                kept = []
                for line in self.path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if (
                        resume_step is not None
                        and rec.get("step", 0) <= resume_step
                        and "train_runtime" not in rec
                    ):
                        kept.append(line)
                        self.offset = max(self.offset, float(rec.get("elapsed_s", 0.0)))
                self.path.write_text("".join(f"{x}\n" for x in kept))
            self.t0 = time.time()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if not state.is_world_process_zero or not logs:
                return
            rec: dict[str, Any] = {
                "step": int(state.global_step),
                "time": round(time.time(), 3),
                "elapsed_s": round(self.offset + time.time() - self.t0, 3),
            }
            for key, value in logs.items():
                if isinstance(value, (int, float)) or value is None:
                    v = None if isinstance(value, float) and not math.isfinite(value) else value
                    rec[key] = v
                    if key in _ALIASES:
                        rec[_ALIASES[key]] = v
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    _StepLogger.__name__ = _StepLogger.__qualname__ = "StepLogger"
    return _StepLogger


def _time_budget_class() -> type:
    from transformers import TrainerCallback

    class _TimeBudget(TrainerCallback):
        """Stops training after ``minutes`` of wall time (checked after each optimizer step) and asks the
        Trainer to checkpoint that step, so ``--resume`` continues from it."""

        def __init__(self, minutes: float) -> None:
            self.seconds = 60.0 * minutes
            self.t0 = time.time()
            self.stopped_at: int | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if time.time() - self.t0 >= self.seconds and state.global_step < state.max_steps:
                control.should_training_stop = True
                control.should_save = True
                self.stopped_at = int(state.global_step)
            return control

    return _TimeBudget


def StepLogger(path: str | os.PathLike[str], resume_step: int | None = None) -> Any:  # noqa: N802
    """A ``transformers.TrainerCallback`` writing ``steps.jsonl`` (see the class docstring).

    On resume, lines after ``resume_step`` (steps that will be redone) are dropped first.
    """
    return _step_logger_class()(path, resume_step)


def _read_steps(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "train_runtime" not in rec:
                out.append(rec)
    return out


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    out = np.full_like(y, np.nan)
    for i in range(len(y)):
        seg = y[max(0, i - window + 1) : i + 1]
        seg = seg[np.isfinite(seg)]
        if seg.size:
            out[i] = seg.mean()
    return out


def plot_reward_curve(
    steps_jsonl: str | os.PathLike[str], png: str | os.PathLike[str], title: str = ""
) -> Path:
    """Plot ``steps.jsonl``: reward and its terms (top), format failures / zero-spread groups / KL (bottom).

    Each series is drawn at the steps that logged it (rewards: the generating steps), thin with markers
    per step and thick as a trailing mean over ``max(1, points // 8)`` points. Absent series are left
    out, and so is coverage when it is all zero (a large catalog with a small per-row budget).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _read_steps(Path(steps_jsonl))
    if not recs:
        raise ValueError(f"steps_jsonl: {steps_jsonl} has no step records")

    def draw(ax: Any, key: str, color: str, label: str | None = None, skip_zero: bool = False) -> bool:
        pts = [(r["step"], float(r[key])) for r in recs if isinstance(r.get(key), (int, float))]
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        if not pts or (skip_zero and not any(y != 0.0 for _, y in pts)):
            return False
        x = np.array([p[0] for p in pts], dtype=float)
        y = np.array([p[1] for p in pts])
        ax.plot(x, y, color=color, alpha=0.35, lw=1, marker=".", ms=4)
        ax.plot(x, _smooth(y, max(1, len(y) // 8)), color=color, lw=2, label=label or key)
        return True

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for key, color in (("reward", "k"), ("groundedness", "tab:blue"), ("diversity", "tab:green"),
                       ("alignment", "tab:orange"), ("coverage", "tab:purple")):  # fmt: skip
        draw(ax1, key, color, skip_zero=key == "coverage")
    ax1.set_ylabel("reward; terms over parsed completions")
    ax1.set_title(title or "GRPO reward")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="best", fontsize=8)
    draw(ax2, "format_failure_rate", "tab:red")
    draw(ax2, "frac_zero_spread_groups", "tab:gray")
    ax2.set_ylabel("rate")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    ax3 = ax2.twinx()
    if draw(ax3, "kl", "tab:cyan", "kl to base (right axis)"):
        ax3.set_ylabel("KL to base policy")
        ax3.legend(loc="upper right", fontsize=8)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------
# policy, data
# ----------------------------------------------------------------------------------------------------
def load_policy(spec: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, Path]:
    """Load a chat causal LM for training: ``(model, tokenizer, model_dir)``.

    Applies ``shared/NOTES.md``: removes a leftover quantization config (GGUF conversions), makes
    ``<|im_end|>`` the eos and pad token when the vocabulary has it (else pads with eos), pads on the
    left, and writes the ids into the model's config and generation config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..llm import resolve_policy

    path = resolve_policy(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"policy: {path} has no chat template; the fan-out prompt needs a chat model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if _CHATML_END in tokenizer.get_vocab():
        tokenizer.eos_token = _CHATML_END
        tokenizer.pad_token = _CHATML_END
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"policy: the tokenizer of {path} has neither {_CHATML_END} nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path


def _load_data(cfg: RLConfig) -> Any:
    from ..evaluation import load_eval_data

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
    from ..data import query_text

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

    from ..llm import build_messages

    rows = _split_rows(data, [cfg.train_split], cfg.max_train_queries)
    if not rows:
        raise ValueError(f"train_split: the {cfg.train_split!r} split of {cfg.dataset!r} has no titled set")
    return HFDataset.from_list(
        [{"prompt": build_messages(r["query"], cfg.k, one_shot=cfg.one_shot), **r} for r in rows]
    )


def _reward_function(cfg: RLConfig, data: Any) -> Any:
    from ..encoders import EmbeddingCache
    from ..llm import default_cache_dir
    from ..rewards import RewardFunction

    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir is not None else default_cache_dir()

    return RewardFunction(
        data.catalog,
        data.encoder,
        task=cfg.task,
        k=cfg.k,
        weights=cfg.weights,
        budget_per_row=cfg.budget_per_row,
        missing=cfg.missing,
        require_strict_format=cfg.require_strict_format,
        cache=EmbeddingCache(root / "embeddings"),  # the embedding cache r4t eval uses
    )


def _versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
    for pkg in ("r4t_fast", "torch", "transformers", "trl", "peft", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ----------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------
def save_policy(
    model: Any, tokenizer: Any, out_dir: str | os.PathLike[str], meta: dict[str, Any] | None = None
) -> Path:
    """Save a plain HF model dir loadable by :class:`r4t_fast.llm.FanOutLM` (LoRA adapters merged).

    A PEFT model is merged into a copy-free base (``merge_and_unload``); ``r4t_policy.json`` records
    ``meta`` (base policy, steps, config).
    """
    from peft import PeftModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "r4t_policy.json").write_text(json.dumps(meta or {}, indent=2, default=str) + "\n")
    return out


def _last_checkpoint(out: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    return Path(c) if out.is_dir() and (c := get_last_checkpoint(str(out))) else None


def train(
    cfg: RLConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Run GRPO + soft-PPO; write checkpoints, ``steps.jsonl``, the reward curve and ``policy/``.

    Args:
        cfg: the run configuration.
        out_dir: the run directory (created).
        resume: continue from the last ``checkpoint-N`` in ``out_dir`` (an error if there is none) up to
            ``cfg.max_steps`` total steps.
        command: the command line, recorded in ``rl_config.json``.

    Returns:
        a summary: ``steps``, ``train_wall_s``, ``policy_dir``, ``resumed_from``, first/last rewards.
    """
    from peft import LoraConfig
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
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    t_setup = time.time()
    data = _load_data(cfg)
    train_ds = build_train_dataset(cfg, data)
    reward_fn = _reward_function(cfg, data)
    model, tokenizer, model_dir = load_policy(cfg.policy)
    setup_s = time.time() - t_setup

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
    }
    cfg_path = out / _CONFIG_FILE
    history = json.loads(cfg_path.read_text()).get("runs", []) if (resume and cfg_path.is_file()) else []
    for h in history:  # a run that never wrote its end record was killed or crashed
        if h.get("status") == "running":
            h["status"] = "interrupted"
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    # written now and again at the end, so that a killed run leaves its trace ("status": "running")
    record["runs"] = [*history, {"started": started, "command": command, "status": "running",
                                 "resumed_from": record["resumed_from"]}]  # fmt: skip
    cfg_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    batch = cfg.num_generations * cfg.prompts_per_step
    args = GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
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
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        log_completions=False,
    )
    peft_config = None
    if cfg.lora:
        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
            task_type="CAUSAL_LM",
        )
    trainer_cls = __getattr__("SoftPPOGRPOTrainer")
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
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_s = time.time() - t0
    steps = int(trainer.state.global_step)
    policy_dir = save_policy(
        trainer.model,
        tokenizer,
        out / _POLICY_SUBDIR,
        meta={
            "base_policy": str(model_dir),
            "steps": steps,
            "config": cfg.to_dict(),
            "lora_merged": cfg.lora,
        },
    )
    recs = _read_steps(out / _STEPS_FILE)
    curve = None
    if recs:
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
    cfg_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
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
    }


# ----------------------------------------------------------------------------------------------------
# before/after evaluation
# ----------------------------------------------------------------------------------------------------
def _eval_policy(
    name: str,
    policy: str | os.PathLike[str],
    rows: list[dict[str, Any]],
    data: Any,
    cfg: RLConfig,
    reward_fns: dict[str, Any],
) -> dict[str, Any]:
    """Greedy fan-outs of one policy on ``rows``; per-query rewards and r4t-eval-style metrics.

    ``reward_fns``: ``"train"`` (the run's reward), ``"nk"`` (``missing="zero"``: the terms over the
    written subqueries and the ``n/k`` reward) and ``"fill"`` (``missing="query"``).
    """
    from .. import metrics, ops
    from ..llm import FanOutLM

    queries = [r["query"] for r in rows]
    refs = [r["reference"] for r in rows]
    lm = FanOutLM(policy)
    t0 = time.time()
    outs = lm.generate(
        queries,
        k=cfg.k,
        temperature=0.0,
        max_new_tokens=cfg.eval_max_new_tokens,
        batch_size=cfg.eval_batch_size,
        one_shot=cfg.one_shot,
    )
    gen_s = time.time() - t0
    texts = [o[0].text for o in outs]
    batch = reward_fns["train"].score(texts, queries, refs)
    nk = reward_fns["nk"].score(texts, queries, refs)
    fill = reward_fns["fill"].score(texts, queries, refs)
    # the protocol of r4t eval / r4t_fast.fanout: missing rows = the raw query, rows grounded without repeats
    fan_rows = [
        s + [" ".join(q.split())] * (cfg.k - len(s)) for s, q in zip(batch.subqueries, queries, strict=True)
    ]
    uniq = list(dict.fromkeys([t for r in fan_rows for t in r] + queries))
    emb = reward_fns["train"]._encode(uniq)
    pos = {t: i for i, t in enumerate(uniq)}
    row_emb = np.stack([emb[[pos[t] for t in r]] for r in fan_rows]).astype(np.float32)
    q_emb = emb[[pos[q] for q in queries]]
    items, _ = ops.ground_sets(torch.from_numpy(row_emb), data.catalog.embeddings)
    sm = metrics.evaluate_sets(items.numpy(), row_emb, q_emb, data.catalog.embeddings, references=refs)
    per_query = {
        "reward": batch.reward,
        "reward_nk": nk.reward,
        "reward_fill": fill.reward,
        "groundedness": nk.groundedness,
        "diversity": nk.diversity,
        "alignment": nk.alignment,
        "vendi_top1": nk.diversity * nk.n_subqueries,
        "coverage": nk.coverage,
        "n_subqueries": batch.n_subqueries.astype(np.float64),
        "parse_ok": batch.parse_ok.astype(np.float64),
        "format_ok": batch.format_ok.astype(np.float64),
        "eval_composite": sm.per_query["composite"],
        "eval_groundedness": sm.per_query["groundedness"],
        "eval_diversity": sm.per_query["diversity"],
        "eval_alignment": sm.per_query["alignment"],
        "eval_vendi": sm.per_query["vendi_items"],
    }
    finished = np.array([o[0].finished for o in outs], dtype=np.float64)
    n_tokens = np.array([o[0].n_tokens for o in outs], dtype=np.float64)
    return {
        "name": name,
        "policy": str(policy),
        "generate_wall_s": round(gen_s, 1),
        "per_query": per_query,
        "completions": texts,
        "finished_rate": float(finished.mean()),
        "mean_new_tokens": float(n_tokens.mean()),
        "examples": [{"query": q, "completion": t} for q, t in list(zip(queries, texts, strict=True))[:8]],
    }


_TABLE_ROWS = (
    ("reward", "this run's training reward (format failures 0)"),
    ("reward_nk", "composite 0.6/0.2/0.2 x n/k (missing='zero'), format failures 0"),
    ("reward_fill", "composite 0.6/0.2/0.2, missing rows = raw query (missing='query'), format failures 0"),
    ("groundedness", "r_ground over the written subqueries"),
    ("diversity", "r_div = Vendi(top-1 items) / n over the written subqueries"),
    ("alignment", "r_align over the written subqueries"),
    ("vendi_top1", "Vendi of the top-1 items of the written subqueries, in [1, n]"),
    ("eval_composite", "composite, r4t-eval protocol (missing rows = raw query)"),
    ("eval_vendi", "Vendi of the k grounded items, r4t-eval protocol"),
    ("eval_alignment", "alignment, r4t-eval protocol"),
    ("eval_groundedness", "groundedness, r4t-eval protocol"),
    ("eval_diversity", "diversity (Vendi / k), r4t-eval protocol"),
    ("coverage", "coverage of the reference set (top-b items per written subquery)"),
    ("n_subqueries", "usable subqueries parsed (of k)"),
    ("parse_ok", "completions with >= 1 usable subquery"),
    ("format_ok", "completions in the strict format"),
)
"""Rows of the before/after table: per-query key, label. The written-subquery terms are undefined
(``nan``) for format failures, so their means and paired CIs use the queries where both policies
wrote at least one subquery (``n`` / ``n_paired`` in the JSON)."""


def _with_derived(per_query: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(per_query)
    if "vendi_top1" not in out and "diversity" in out and "n_subqueries" in out:
        out["vendi_top1"] = np.asarray(out["diversity"], dtype=np.float64) * np.asarray(out["n_subqueries"])
    return out


def summary_table(
    per_query: dict[str, dict[str, Any]], baseline: str, n_boot: int = 2000
) -> dict[str, dict[str, Any]]:
    """Means, bootstrap 95% CIs and paired 95% CIs of the difference to ``baseline`` per table row.

    Args:
        per_query: policy name -> metric key -> ``(queries,)`` values (``nan`` = undefined).
        baseline: the policy the others are compared with.
        n_boot: bootstrap resamples.
    """
    from ..metrics import bootstrap_ci, paired_bootstrap_ci

    if baseline not in per_query:
        raise ValueError(f"baseline: {baseline!r} is not one of the policies {list(per_query)}")
    values = {
        n: _with_derived({k: np.asarray(v, dtype=np.float64) for k, v in d.items()})
        for n, d in per_query.items()
    }
    table: dict[str, dict[str, Any]] = {}
    for name, vals in values.items():
        entry: dict[str, Any] = {}
        for key, _ in _TABLE_ROWS:
            if key not in vals:
                continue
            v = vals[key]
            fin = v[np.isfinite(v)]
            ci = bootstrap_ci(fin, n_boot=n_boot) if fin.size else None
            entry[key] = {
                "mean": float(fin.mean()) if fin.size else None,
                "ci95": [ci.low, ci.high] if ci else None,
                "n": int(fin.size),
            }
            if name != baseline and key in values[baseline]:
                b = values[baseline][key]
                both = np.isfinite(v) & np.isfinite(b)
                if both.any():
                    d = paired_bootstrap_ci(v[both], b[both], n_boot=n_boot)
                    entry[key]["diff_vs_" + baseline] = {
                        "mean": d.mean,
                        "ci95": [d.low, d.high],
                        "excludes_zero": d.excludes_zero,
                        "n_paired": int(both.sum()),
                    }
        table[name] = entry
    return table


def rebuild_before_after(eval_dir: str | os.PathLike[str], n_boot: int | None = None) -> dict[str, Any]:
    """Recompute the table of ``eval_dir/before_after.json`` from ``per_query.jsonl`` (no generation);
    rewrites ``before_after.json`` and ``before_after.md``."""
    d = Path(eval_dir)
    record = json.loads((d / "before_after.json").read_text())
    lines = [json.loads(x) for x in (d / "per_query.jsonl").read_text().splitlines() if x.strip()]
    names = list(record["policies"])
    per_query = {
        n: {
            k: np.array([np.nan if ln[n][k] is None else ln[n][k] for ln in lines], dtype=np.float64)
            for k in lines[0][n]
            if k != "completion"
        }
        for n in names
    }
    n_boot = n_boot or int(record.get("n_boot", 2000))
    record["table"] = summary_table(per_query, record["baseline"], n_boot)
    record["n_boot"] = n_boot
    (d / "before_after.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (d / "before_after.md").write_text(format_before_after(record))
    return record


def evaluate_policies(
    cfg: RLConfig,
    policies: dict[str, str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Before/after table: each policy's greedy fan-outs on the held-out queries, paired CIs vs ``baseline``.

    For every query of ``cfg.eval_splits`` (titled sets, first ``eval_max_queries``) each policy writes
    one greedy completion (``eval_max_new_tokens``). Reported per policy (rows: :data:`_TABLE_ROWS`):
    the run's training reward and the composite under both missing-subquery rules (``n/k`` and query
    fill; :class:`r4t_fast.rewards.RewardFunction`, format failures 0), the OAR terms and the Vendi over
    the written subqueries, the metrics of the ``r4t eval`` protocol (missing rows = raw query, grounded
    without repeats, :func:`r4t_fast.metrics.evaluate_sets`), coverage, failure rates and wall times.
    Each other policy gets paired bootstrap 95% CIs (:func:`r4t_fast.metrics.paired_bootstrap_ci`) of
    its difference to ``baseline`` (default: the first policy).

    Writes ``before_after.json``, ``before_after.md`` and ``per_query.jsonl`` (per-query values and the
    completion texts) into ``out_dir``; :func:`rebuild_before_after` re-renders the table from them.
    """
    if not policies:
        raise ValueError("policies: expected at least one name -> policy dir")
    baseline = baseline or next(iter(policies))
    if baseline not in policies:
        raise ValueError(f"baseline: {baseline!r} is not one of the policies {list(policies)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = _load_data(cfg)
    rows = _split_rows(data, cfg.eval_splits, cfg.eval_max_queries)
    if not rows:
        raise ValueError(f"eval_splits: no titled set in {cfg.eval_splits} of {cfg.dataset!r}")
    from ..metrics import DEFAULT_WEIGHTS

    reward_fns = {
        "train": _reward_function(cfg, data),
        # the comparison rows use the paper's weights (metrics.DEFAULT_WEIGHTS) whatever the run trained with
        "nk": _reward_function(cfg.replace(missing="zero", weights=list(DEFAULT_WEIGHTS)), data),
        "fill": _reward_function(cfg.replace(missing="query", weights=list(DEFAULT_WEIGHTS)), data),
    }
    results = {name: _eval_policy(name, p, rows, data, cfg, reward_fns) for name, p in policies.items()}
    table = summary_table({n: r["per_query"] for n, r in results.items()}, baseline, cfg.eval_n_boot)
    record = {
        "dataset": cfg.dataset,
        "eval_splits": cfg.eval_splits,
        "n_queries": len(rows),
        "k": cfg.k,
        "decoding": {"temperature": 0.0, "max_new_tokens": cfg.eval_max_new_tokens, "one_shot": cfg.one_shot},
        "reward": {"task": cfg.task, "weights": cfg.weights, "missing": cfg.missing, "encoder": cfg.encoder},
        "baseline": baseline,
        "policies": {
            n: {k: v for k, v in r.items() if k not in ("per_query", "completions")}
            for n, r in results.items()
        },
        "table": table,
        "n_boot": cfg.eval_n_boot,
        "eval_wall_s": round(time.time() - t0, 1),
        "versions": _versions(),
    }
    (out / "before_after.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    with open(out / "per_query.jsonl", "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            line = {"set_id": r["set_id"], "query": r["query"]}
            for name, res in results.items():
                line[name] = {
                    k: (None if not np.isfinite(v[i]) else float(v[i])) for k, v in res["per_query"].items()
                }
                line[name]["completion"] = res["completions"][i]
            f.write(json.dumps(line) + "\n")
    (out / "before_after.md").write_text(format_before_after(record))
    return record


def format_before_after(record: dict[str, Any]) -> str:
    """The before/after record as a Markdown table."""
    names = list(record["table"])
    base = record["baseline"]
    head = (
        "| metric | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"{n} − {base} (paired 95% CI)" for n in names if n != base)
        + " |"
    )
    sep = "|---" * (1 + len(names) + len(names) - 1) + "|"
    lines = [
        f"# {record['dataset']}: {record['n_queries']} held-out queries ({'+'.join(record['eval_splits'])}), "
        f"k = {record['k']}, greedy, max_new_tokens = {record['decoding']['max_new_tokens']}",
        "",
        head,
        sep,
    ]
    for key, label in _TABLE_ROWS:
        if any(key not in record["table"][n] for n in names):
            continue
        cells = []
        for n in names:
            e = record["table"][n][key]
            nq = "" if e["n"] == record["n_queries"] else f" (n={e['n']})"
            cells.append("–" if e["mean"] is None else f"{e['mean']:.4f}{nq}")
        diffs = []
        for n in names:
            if n == base:
                continue
            d = record["table"][n][key].get("diff_vs_" + base)
            if d is None:
                diffs.append("–")
                continue
            np_ = "" if d["n_paired"] == record["n_queries"] else f" (n={d['n_paired']})"
            diffs.append(f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]{np_}")
        lines.append(f"| {key}: {label} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
    lines.append("")
    for n in names:
        p = record["policies"][n]
        lines.append(
            f"- **{n}** (`{p['policy']}`): generation {p['generate_wall_s']} s for "
            f"{record['n_queries']} queries, mean {p['mean_new_tokens']:.1f} new tokens, "
            f"{100 * p['finished_rate']:.0f}% ended before the cap"
        )
    lines.append(f"- evaluation wall time {record['eval_wall_s']} s")
    return "\n".join(lines) + "\n"


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
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"r4t train-rl: {exc}", file=sys.stderr)
        return 2
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    out = Path(args.out)
    command = "r4t " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    if not args.eval_only:
        try:
            summary = train(cfg, out, resume=args.resume, command=command)
        except (FileNotFoundError, FileExistsError, ValueError) as exc:
            print(f"r4t train-rl: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=2, default=str))
    if args.evaluate or args.eval_only:
        policy_dir = out / _POLICY_SUBDIR
        if not (policy_dir / "config.json").is_file():
            print(f"r4t train-rl: no trained policy at {policy_dir}", file=sys.stderr)
            return 2
        from ..llm import resolve_policy

        record = evaluate_policies(
            cfg, {"zero-shot": str(resolve_policy(cfg.policy)), "tuned": str(policy_dir)}, out / "eval"
        )
        print(format_before_after(record))
    return 0
