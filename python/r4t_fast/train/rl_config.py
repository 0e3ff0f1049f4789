"""Configuration of ``r4t train-rl``: :class:`RLConfig` (every field with help text) and the TRL loss
aggregations the soft-PPO terms support (:data:`LOSS_TYPE_CHOICES`).

Kept apart from the trainer (as TRL keeps ``grpo_config.py`` apart from ``grpo_trainer.py``) so that
building, validating and printing a config imports neither trl nor transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r4t_fast._config import help_field
from r4t_fast._internal import MAX_K, check_choice, check_non_negative_int, check_positive_int
from r4t_fast.data.splits import SPLIT_NAMES
from r4t_fast.fanout.rewards import TASK_CHOICES
from r4t_fast.objectives import DEFAULT_WEIGHTS, composite

__all__ = ["LOSS_TYPE_CHOICES", "RLConfig"]

LOSS_TYPE_CHOICES = ("dapo", "grpo", "bnpo", "dr_grpo")
"""TRL loss aggregations the soft-PPO terms support (they are normalised the same way as the policy loss)."""

_WEIGHTS_TEXT = " + ".join(f"{w:g} {t}" for w, t in zip(DEFAULT_WEIGHTS, "gda", strict=True))


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------
_f = help_field


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
    split_seed: int = _f(0, "seed of the 8:1:1 split (r4t_fast.data.prepare.dataset_split; same as r4t eval)")
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
    lora_layers: int = _f(
        0,
        "LoRA on the top n decoder layers only (0 = all): the backward pass stops at the lowest adapted "
        "layer (issue 19's throughput; benchmarks/bench_rl_step.py)",
    )
    lora_dropout: float = _f(0.0, "LoRA dropout (0 keeps pi_old and pi_theta comparable across passes)")
    lora_target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names LoRA adapts (Llama/SmolLM2 names)",
    )
    # -- prompt ----------------------------------------------------------------------------------------
    k: int = _f(10, "subqueries asked for per query (paper: 10)")
    one_shot: bool = _f(True, "include the worked example in the prompt (as FanOutLM does by default)")
    constrained: bool = _f(
        True,
        "constrained decoding (fanout.constrained.FanOutConstraint) in training rollouts and evaluation: "
        "every answer is exactly k distinct short subqueries; needs max_completion_length and "
        "eval_max_new_tokens >= the constraint's min_new_tokens (raised to it with a warning)",
    )
    think: bool = _f(
        False,
        "ask for (and, constrained, force) a <think> block before the list; off for small policies "
        "(a 135M model gains nothing from it and it costs tokens)",
    )
    # -- reward ----------------------------------------------------------------------------------------
    task: str = _f(
        "auto",
        f"reward: 'oar' ({_WEIGHTS_TEXT} composite), 'wscr' (reference coverage), 'mixed' "
        "(mixed_weight * coverage + (1 - mixed_weight) * composite), 'soft' (smooth coverage: each "
        "reference item's best soft rank within the per-row budget, objectives.soft_coverage), "
        "'soft-mixed' (mixed_weight * soft + (1 - mixed_weight) * coverage) or 'auto' (= 'wscr' when "
        "every training query has reference items, else 'oar'; fanout.rewards.resolve_task)",
    )
    mixed_weight: float = _f(0.5, "tasks 'mixed' / 'soft-mixed': weight of the first term, in [0, 1]")
    soft_tau: float = _f(
        0.05, "tasks 'soft' / 'soft-mixed': sigmoid temperature of the smooth coverage (cosine)"
    )
    copy_penalty: float = _f(
        0.0,
        "reward minus copy_penalty * c / k for the c subqueries that copy the title (contain it or have "
        "cosine >= 0.95 with it; fanout.copies), in [0, 1]; 0 = off (copy_rate is logged anyway)",
    )
    forbid_title: bool = _f(
        False,
        "constrained rollouts and evaluation: no subquery may contain the title (case-folded) as a substring",
    )
    weights: list[float] = _f(list(DEFAULT_WEIGHTS), "OAR weights (groundedness, diversity, alignment)")
    missing: str = _f(
        "query",
        "unwritten subqueries: 'query' (rows = raw query, as r4t eval), 'zero' (reward x n/k) or 'ignore'",
    )
    require_strict_format: bool = _f(
        False, "score 0 also for completions that parse but break the strict format"
    )
    budget_per_row: int | None = _f(
        None,
        "WSCR (and logged coverage): catalog items retrieved per subquery; None: the fair budget's share "
        "(objectives.fair_budget(N, k) // k, as r4t eval's recall_at_fair: 66 on Polyvore)",
    )
    encoder: str = _f("minilm", "frozen text encoder of the retriever: 'minilm', 'hashing:<dim>' or a path")
    # -- GRPO ------------------------------------------------------------------------------------------
    num_generations: int = _f(8, "completions per query (the GRPO group size G; paper: 8)")
    prompts_per_step: int = _f(1, "queries per optimizer step (batch = prompts_per_step * num_generations)")
    micro_batch: int = _f(
        8,
        "completions per forward/backward pass; the step's batch is accumulated over batch / micro_batch "
        "passes (an 8 x 8 step in one pass takes > 24 GB here)",
    )
    max_completion_length: int = _f(112, "max generated tokens per completion during training")
    tokens_per_subquery: int | None = _f(
        None,
        "cap rollouts by what k short subqueries need: max_completion_length = the constraint's "
        "min_new_tokens + k * (tokens_per_subquery - 1) (train.rl_setup.completion_cap; constrained only); "
        "None: max_completion_length as given",
    )
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
    # -- expert iteration before GRPO (train.rl_expert) -----------------------------------------------
    expert_rounds: int = _f(
        0,
        "rounds of expert iteration before GRPO (0 = off, at most 3): sample expert_samples fan-outs per "
        "training title (constrained), keep the expert_keep best by the reward, LoRA SFT on them (TRL), "
        "merge (train.rl_expert)",
    )
    expert_samples: int = _f(8, "expert iteration: fan-outs sampled per training title (n)")
    expert_keep: int = _f(2, "expert iteration: best fan-outs kept per title (m <= n)")
    expert_epochs: int = _f(1, "expert iteration: SFT epochs over the kept fan-outs per round")
    expert_learning_rate: float = _f(2e-4, "expert iteration: SFT learning rate (LoRA)")
    expert_batch_size: int = _f(8, "expert iteration: SFT batch size (sampling batches 4x this)")
    expert_max_queries: int | None = _f(None, "expert iteration: use the first N training titles (None: all)")
    # -- run -------------------------------------------------------------------------------------------
    max_steps: int = _f(60, "total optimizer steps (a resumed run continues up to this step)")
    save_steps: int = _f(10, "checkpoint every N steps")
    save_total_limit: int = _f(2, "checkpoints kept")
    seed: int = _f(0, "seed of sampling, LoRA init and data order")
    num_threads: int | None = _f(
        None,
        "torch CPU threads for training and evaluation (None: the CPUs other processes leave free, "
        "r4t_fast._threads)",
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

        def pos_int(name: str, allow_none: bool = False, upper: int | None = None) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            setattr(self, name, check_positive_int(v, name, upper=upper))

        def choice(name: str, choices: Sequence[str]) -> None:
            check_choice(getattr(self, name), choices, name)

        def number(name: str, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            if not ok or v < low or (open_low and v == low) or v > high:
                rule = f"{'>' if open_low else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
                raise ValueError(f"{name}: expected a number {rule}, got {v!r}")

        for name in ("lora_r", "lora_alpha", "k", "num_generations", "prompts_per_step", "micro_batch"):
            pos_int(name, upper=MAX_K if name == "k" else None)
        for name in ("max_completion_length", "num_iterations", "max_steps", "save_steps"):
            pos_int(name)
        for name in ("save_total_limit", "eval_max_new_tokens", "eval_batch_size", "eval_n_boot"):
            pos_int(name)
        for name in ("max_train_queries", "num_threads", "eval_max_queries", "budget_per_row"):
            pos_int(name, allow_none=True)
        for name in ("expert_samples", "expert_keep", "expert_epochs", "expert_batch_size"):
            pos_int(name)
        self.expert_rounds = check_non_negative_int(self.expert_rounds, "expert_rounds")
        self.lora_layers = check_non_negative_int(self.lora_layers, "lora_layers")
        if self.expert_rounds > 3:
            raise ValueError(f"expert_rounds: expected 0..3, got {self.expert_rounds}")
        if self.expert_keep > self.expert_samples:
            raise ValueError(
                f"expert_keep: must be <= expert_samples ({self.expert_samples}), got {self.expert_keep}"
            )
        number("expert_learning_rate", 0.0, open_low=True)
        for name in ("tokens_per_subquery", "expert_max_queries"):
            pos_int(name, allow_none=True)
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations: GRPO needs at least 2 completions per query, got {self.num_generations}"
            )
        self.warmup_steps = check_non_negative_int(self.warmup_steps, "warmup_steps")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an int, got {self.seed!r}")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise ValueError(f"split_seed: expected an int, got {self.split_seed!r}")
        choice("task", TASK_CHOICES)
        number("mixed_weight", 0.0, 1.0)
        number("copy_penalty", 0.0, 1.0)
        number("soft_tau", 0.0, open_low=True)
        for name in ("constrained", "think", "one_shot", "lora", "forbid_title"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        choice("missing", ("query", "zero", "ignore"))
        choice("loss_type", LOSS_TYPE_CHOICES)
        choice("scale_rewards", ("group", "batch", "none"))
        choice("train_split", SPLIT_NAMES)
        if not isinstance(self.eval_splits, list) or not self.eval_splits:
            raise ValueError(
                f"eval_splits: expected a non-empty list of split names, got {self.eval_splits!r}"
            )
        for s in self.eval_splits:
            if s not in SPLIT_NAMES:
                names = ", ".join(map(repr, SPLIT_NAMES))
                raise ValueError(f"eval_splits: expected names among {names}, got {s!r}")
        if self.train_split in self.eval_splits:
            raise ValueError(
                f"eval_splits: must not contain the training split {self.train_split!r}, "
                f"got {self.eval_splits}"
            )
        if not isinstance(self.weights, (list, tuple)) or len(self.weights) != 3:
            raise ValueError(
                f"weights: expected 3 numbers (groundedness, diversity, alignment), got {self.weights!r}"
            )
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in self.weights):
            raise ValueError(f"weights: expected finite numbers, got {self.weights!r}")
        composite(0.0, 0.0, 0.0, self.weights)  # the OAR weight rule (3 finite numbers) lives there
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
