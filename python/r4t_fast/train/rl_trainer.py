"""The GRPO trainer of ``r4t train-rl``: the paper's soft-PPO terms, the small ``trl.GRPOTrainer``
subclass that adds them (:data:`SoftPPOGRPOTrainer`, built on first access because importing trl is
slow), the per-step JSONL logger and the time-budget callback.

The subclass overrides or calls private ``GRPOTrainer`` methods; :data:`OVERRIDDEN_TRL_HOOKS` lists them
with the parameters we rely on, and ``tests/test_trl_hooks.py`` checks them against the installed trl.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from r4t_fast._internal import check_choice
from r4t_fast.train.rl_config import LOSS_TYPE_CHOICES

__all__ = [
    "OVERRIDDEN_TRL_HOOKS",
    "SoftPPOGRPOTrainer",  # noqa: F822 - built on first access (module __getattr__)
    "StepLogger",
    "TRL_CONFIG_FIELDS_READ",
    "soft_ppo_loss",
    "soft_ppo_per_token",
    "trainer_class",
]

OVERRIDDEN_TRL_HOOKS: dict[str, tuple[Any, ...]] = {
    # overridden with this exact signature; called by TRL's training step
    "_compute_loss": ("self", "model", "inputs"),
    # overridden with this exact signature; its output dict gains "r4t_ref_per_token_logps"
    "_generate_and_score_completions": ("self", "inputs"),
    # overridden as a pass-through (*args, **kwargs) that keeps result[0] (the per-token log-probs), and
    # called as (model, input_ids, attention_mask, logits_to_keep, batch_size=...); more parameters may
    # follow (``...``)
    "_get_per_token_logps_and_entropies": (
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        ...,
    ),
    # overridden as a timed pass-through (the step log's time split)
    "training_step": ("self", "model", "inputs", "num_items_in_batch"),
}
"""Private ``trl.GRPOTrainer`` methods :data:`SoftPPOGRPOTrainer` overrides or calls: name -> the
parameter names we rely on, in order. A trailing ``...`` means TRL may add parameters after them;
otherwise the signature must match exactly (our override has that signature)."""

TRL_CONFIG_FIELDS_READ = ("importance_sampling_level", "steps_per_generation", "per_device_train_batch_size")
"""``GRPOConfig`` fields :data:`SoftPPOGRPOTrainer` reads from ``self.args``."""


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
    check_choice(loss_type, LOSS_TYPE_CHOICES, "loss_type")
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
            check_choice(self.loss_type, LOSS_TYPE_CHOICES, "args.loss_type (soft-PPO)")
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
            self._r4t_times = {"generate": 0.0, "reward": 0.0, "score": 0.0, "completions": 0.0}
            self._r4t_micro, self._r4t_total = 0, 0.0
            _time_generate(self.model, self._r4t_times)

        # -- the step's wall time split: generate / reward / other scoring / loss + backward ---------
        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any) -> Any:
            # summed over the micro-batches of one optimizer step (RLConfig.micro_batch), logged once
            times = self._r4t_times
            if self._r4t_micro == 0:
                for key in times:
                    times[key] = 0.0
                self._r4t_total = 0.0
            t0 = time.perf_counter()
            out = super().training_step(model, inputs, num_items_in_batch)
            self._r4t_total += time.perf_counter() - t0
            self._r4t_micro = (self._r4t_micro + 1) % max(1, int(self.current_gradient_accumulation_steps))
            if self._r4t_micro:
                return out
            total = self._r4t_total
            metrics = self._metrics["train"]
            metrics["time/generate_s"].append(times["generate"])
            metrics["time/reward_s"].append(times["reward"])
            metrics["time/score_other_s"].append(
                max(0.0, times["score"] - times["generate"] - times["reward"])
            )
            metrics["time/backward_s"].append(max(0.0, total - times["score"]))
            metrics["time/completions"].append(times["completions"])
            return out

        # -- the base policy's log-probs, for the KL metric ------------------------------------------
        def _kl_reference_available(self) -> bool:
            from peft import PeftModel

            return (
                self.log_kl
                and self.beta == 0.0
                and isinstance(self.accelerator.unwrap_model(self.model), PeftModel)
            )

        def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
            t0 = time.perf_counter()
            out = self._r4t_generate_and_score(inputs)
            if self.model.training:
                self._r4t_times["score"] += time.perf_counter() - t0
                self._r4t_times["reward"] += sum(
                    float(getattr(f, "last_seconds", 0.0)) for f in self.reward_funcs
                )
                self._r4t_times["completions"] += float(out["completion_ids"].shape[0])
            return out

        def _r4t_generate_and_score(self, inputs: Any) -> dict[str, Any]:
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


def _time_generate(model: Any, times: dict[str, float]) -> None:
    """Wrap ``model.generate`` (on this object, as :func:`~r4t_fast.fanout.constrained.install_constraint`
    does; a constraint installed later wraps this one) so that ``times["generate"]`` sums its seconds."""
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times["generate"] += time.perf_counter() - t0

    model.generate = generate


_TRAINER_CLASS: type | None = None


def trainer_class() -> type:
    """``SoftPPOGRPOTrainer``, built (and trl imported) on the first call."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        _TRAINER_CLASS = _make_trainer_class()
    return _TRAINER_CLASS


def __getattr__(name: str) -> Any:  # SoftPPOGRPOTrainer is built on first use: importing trl is slow
    if name == "SoftPPOGRPOTrainer":
        return trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------
# per-step logs and the time budget
# ----------------------------------------------------------------------------------------------------
_ALIASES = {
    "reward": "reward",
    "r4t/groundedness": "groundedness",
    "r4t/diversity": "diversity",
    "r4t/alignment": "alignment",
    "r4t/coverage": "coverage",
    "r4t/no_subquery_rate": "no_subquery_rate",
    "r4t/strict_format_failure_rate": "strict_format_failure_rate",
    "r4t/usable_subqueries": "usable_subqueries",
    "r4t/copy_rate": "copy_rate",
    "r4t/soft_coverage": "soft_coverage",
    "time/generate_s": "generate_s",
    "time/reward_s": "reward_s",
    "time/score_other_s": "score_other_s",
    "time/backward_s": "backward_s",
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
        ``alignment``, ``coverage``, ``soft_coverage``, ``no_subquery_rate``, ``usable_subqueries``,
        ``copy_rate``, ``frac_zero_spread_groups``, ``kl``, ``completion_length``; the step's wall time
        split ``generate_s`` (inside ``model.generate``), ``reward_s`` (the reward function),
        ``score_other_s`` (the rest of scoring: old / base log-probs, advantages) and ``backward_s`` (the
        loss's forward and backward), ``completions`` generated in the step, and ``completions_per_s``:
        completions generated so far per second of training (``elapsed_s``, summed over resumed runs).
        """

        def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None) -> None:
            self.path = Path(path)
            self.offset = 0.0
            self.completions = 0.0
            main = os.environ.get("RANK", "0") == "0"  # under accelerate launch only rank 0 writes
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
                        self.completions += float(rec.get("completions") or 0.0)
                if main:
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
            if isinstance(logs.get("time/completions"), (int, float)):
                rec["completions"] = float(logs["time/completions"])
                self.completions += rec["completions"]
                rec["completions_per_s"] = round(self.completions / max(rec["elapsed_s"], 1e-9), 4)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    _StepLogger.__name__ = _StepLogger.__qualname__ = "StepLogger"
    return _StepLogger


def _time_budget_class() -> type:
    from transformers import TrainerCallback

    class _TimeBudget(TrainerCallback):
        """Stops training after ``minutes`` of wall time (checked after each optimizer step) and asks the
        Trainer to checkpoint that step, so ``--resume`` continues from it. With several processes the
        main process's clock decides (broadcast), so that all stop at the same step."""

        def __init__(self, minutes: float) -> None:
            self.seconds = 60.0 * minutes
            self.t0 = time.time()
            self.stopped_at: int | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            elapsed = time.time() - self.t0
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                t = torch.tensor([elapsed], dtype=torch.float64)
                torch.distributed.broadcast(t, src=0)
                elapsed = float(t)
            if elapsed >= self.seconds and state.global_step < state.max_steps:
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
    """The step records of a ``steps.jsonl`` (unreadable lines and the end-of-training record skipped)."""
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
