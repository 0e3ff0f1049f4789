"""Tests for r4t_fast.train.rl: the soft-PPO terms by hand, the config, the step log and reward curve, and
a ``r4t train-rl`` smoke run (2 steps, resume for 1 more, load the saved policy with FanOutLM) with a tiny
randomly initialised Llama policy on a small synthetic sets.jsonl."""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_policy, sets_jsonl
from r4t_fast.train import rl

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------
# soft-PPO
# ----------------------------------------------------------------------------------------------------
LP = [[-1.0, -2.0, -0.5], [-0.25, -3.0, -1.5]]
OLD = [[-1.5, -1.0, -0.5], [-0.5, -2.0, -1.0]]
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]


def _by_hand(beta1: float, beta2: float) -> list[list[float]]:
    """beta1 * rho * (lp - old) + beta2 * (-lp), rho = exp(lp - old), element by element."""
    return [
        [beta1 * math.exp(lp - old) * (lp - old) - beta2 * lp for lp, old in zip(r_lp, r_old, strict=True)]
        for r_lp, r_old in zip(LP, OLD, strict=True)
    ]


def test_doctests() -> None:
    result = doctest.testmod(rl)
    assert result.attempted >= 2 and result.failed == 0


def test_soft_ppo_per_token_by_hand() -> None:
    got = rl.soft_ppo_per_token(torch.tensor(LP), torch.tensor(OLD), 0.05, 0.05)
    torch.testing.assert_close(got, torch.tensor(_by_hand(0.05, 0.05)), atol=1e-7, rtol=0)
    only1 = rl.soft_ppo_per_token(torch.tensor(LP), torch.tensor(OLD), 0.3, 0.0)
    torch.testing.assert_close(only1, torch.tensor(_by_hand(0.3, 0.0)), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="old_per_token_logps"):
        rl.soft_ppo_per_token(torch.zeros(2, 3), torch.zeros(2, 2), 0.05, 0.05)


def test_soft_ppo_loss_aggregation_by_hand() -> None:
    """The added loss term, for every TRL aggregation, equals the formula computed element by element."""
    x = _by_hand(0.05, 0.05)
    masked = [[v * m for v, m in zip(rx, rm, strict=True)] for rx, rm in zip(x, MASK, strict=True)]
    seq_means = [sum(r) / sum(m) for r, m in zip(masked, MASK, strict=True)]
    total, n_tok = sum(map(sum, masked)), sum(map(sum, MASK))
    lp, old, mask = torch.tensor(LP), torch.tensor(OLD), torch.tensor(MASK)
    expect = {
        "grpo": sum(seq_means) / 2 / 2,  # mean over sequences, / 2 accumulation steps
        "bnpo": total / n_tok / 2,
        "dr_grpo": total / (2 * 8) / 2,  # B * max_completion_length
        "dapo": total / (10.0 / 1 * 2 / 4),  # num_items / processes * accum / steps_per_generation
    }
    for loss_type, want in expect.items():
        got = rl.soft_ppo_loss(
            lp,
            old,
            mask,
            beta1=0.05,
            beta2=0.05,
            loss_type=loss_type,
            gradient_accumulation_steps=2,
            max_completion_length=8,
            num_items_in_batch=torch.tensor(10.0),
            steps_per_generation=4,
        )
        assert float(got) == pytest.approx(want, rel=1e-6), loss_type
    # in evaluation there is no accumulation: dapo uses num_items / processes only
    ev = rl.soft_ppo_loss(lp, old, mask, loss_type="dapo", num_items_in_batch=10.0, training=False)
    assert float(ev) == pytest.approx(total / 10.0, rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        rl.soft_ppo_loss(lp, old, mask, loss_type="cispo")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        rl.soft_ppo_loss(lp, old, mask, loss_type="dapo")
    with pytest.raises(ValueError, match="mask"):
        rl.soft_ppo_loss(lp, old, mask[:, :2], loss_type="grpo")


def test_soft_ppo_changes_the_gradient_as_the_formula_says() -> None:
    """d/dlp of beta1*rho*log(rho) - beta2*lp = beta1*(1 + log rho)*rho - beta2 per token: zero on the
    first pass (rho = 1, beta1 = beta2), nonzero once the batch is reused (rho != 1)."""
    mask = torch.tensor(MASK)
    lp = torch.tensor(LP, requires_grad=True)
    rl.soft_ppo_loss(lp, lp.detach(), mask, loss_type="bnpo").backward()
    assert lp.grad is not None and torch.allclose(lp.grad, torch.zeros_like(lp), atol=1e-8)
    lp = torch.tensor(LP, requires_grad=True)
    rl.soft_ppo_loss(lp, torch.tensor(OLD), mask, loss_type="bnpo").backward()
    r = torch.tensor(LP) - torch.tensor(OLD)
    want = (0.05 * (1 + r) * torch.exp(r) - 0.05) * mask / mask.sum()
    assert lp.grad is not None and torch.allclose(lp.grad, want, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# config, logs, curve
# ----------------------------------------------------------------------------------------------------
def test_config_defaults_help_and_errors(tmp_path: Path) -> None:
    cfg = rl.RLConfig()
    assert cfg.num_generations == 8 and cfg.weights == [0.6, 0.2, 0.2]
    assert (cfg.soft_ppo_beta1, cfg.soft_ppo_beta2) == (0.05, 0.05)
    helps = rl.RLConfig.help()
    assert helps and all(h.strip() for h in helps.values())
    with pytest.raises(ValueError, match="unknown key"):
        rl.RLConfig.from_dict({"num_generation": 4})
    with pytest.raises(ValueError, match="num_generations"):
        rl.RLConfig(num_generations=1)
    with pytest.raises(ValueError, match="loss_type"):
        rl.RLConfig(loss_type="cispo")
    with pytest.raises(ValueError, match="eval_splits"):
        rl.RLConfig(eval_splits=["train"])
    with pytest.raises(ValueError, match="weights"):
        rl.RLConfig(weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="temperature"):
        rl.RLConfig(temperature=0.0)
    assert (cfg.constrained, cfg.think, cfg.task, cfg.mixed_weight) == (True, False, "auto", 0.5)
    with pytest.raises(ValueError, match="task"):
        rl.RLConfig(task="coverage")
    with pytest.raises(ValueError, match="mixed_weight"):
        rl.RLConfig(task="mixed", mixed_weight=-0.1)
    with pytest.raises(ValueError, match="constrained"):
        rl.RLConfig(constrained="yes")
    with pytest.raises(ValueError, match="think"):
        rl.RLConfig(think=1)
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        rl.RLConfig.from_file(p)


@pytest.mark.parametrize("name", ["polyvore", "spotify"])
def test_shipped_configs_load(name: str) -> None:
    paths = sorted((REPO / "training" / name).glob("rl*.json"))
    assert paths
    for path in paths:
        assert rl.RLConfig.from_file(path).dataset == name, path


def test_step_logger_resume_and_plot(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    logger = rl.StepLogger(path)

    class State:
        is_world_process_zero = True
        global_step = 0

    for step in (1, 2, 3):
        State.global_step = step
        logs = {"reward": 0.1 * step, "r4t/groundedness": 0.5, "frac_reward_zero_std": 0.0, "kl": 0.01 * step}
        logger.on_log(None, State, None, logs=logs)
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[1]["groundedness"] == 0.5 and recs[2]["frac_zero_spread_groups"] == 0.0
    rl.StepLogger(path, resume_step=2)  # steps after the checkpoint are dropped
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    png = rl.plot_reward_curve(path, tmp_path / "curve.png")
    assert png.stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------
# smoke run: tiny random Llama policy, synthetic sets.jsonl
# ----------------------------------------------------------------------------------------------------
def test_train_rl_smoke_resume_and_load(tmp_path: Path) -> None:
    from r4t_fast.cli import main
    from r4t_fast.fanout.generation import FanOutLM

    policy = make_tiny_policy(tmp_path / "tiny-policy")
    data = sets_jsonl(tmp_path / "sets.jsonl")
    cfg = {
        "encoder": "hashing:64",
        "cache_dir": str(tmp_path / "cache"),
        "k": 3,
        "one_shot": False,
        "num_generations": 2,
        "max_completion_length": 8,
        "num_iterations": 2,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "save_steps": 1,
        "num_threads": 2,
        "eval_splits": ["val", "test"],
        "eval_max_queries": 2,
        "eval_max_new_tokens": 4,
        "eval_batch_size": 2,
        "eval_n_boot": 20,
    }
    cfg_path = tmp_path / "rl.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    base = [
        "train-rl",
        "--dataset",
        str(data),
        "--policy",
        str(policy),
        "--out",
        str(out),
        "--config",
        str(cfg_path),
    ]

    with pytest.warns(UserWarning, match="max_completion_length"):  # 8 < the constraint's minimum
        assert main([*base, "--max-steps", "2"]) == 0
    assert (out / "checkpoint-2").is_dir()
    record = json.loads((out / "rl_config.json").read_text())
    assert record["reward_task"] == "wscr"  # task 'auto' with reference sets
    assert record["rollouts"]["constrained"] is True and record["rollouts"]["think"] is False
    assert record["rollouts"]["max_completion_length"] > 8
    recs = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "train_runtime" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in (
        "reward",
        "no_subquery_rate",
        "frac_zero_spread_groups",
        "kl",
        "completion_length",
        "loss",
    ):
        assert key in steps[0], key
    # constrained rollouts: even a random model writes k = 3 distinct usable subqueries
    assert steps[0]["no_subquery_rate"] == 0.0 and steps[0]["usable_subqueries"] == 3.0
    assert steps[0]["strict_format_failure_rate"] == 0.0
    assert "soft_ppo/penalty" in steps[1]  # the generation batch of step 1 is reused at step 2
    assert (out / "reward_curve.png").is_file()

    assert main([*base, "--max-steps", "3"]) == 2  # checkpoints exist: refuses to start over
    assert main([*base, "--max-steps", "3", "--resume"]) == 0
    assert (out / "checkpoint-3").is_dir()
    recs = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "train_runtime" not in r] == [1, 2, 3]
    record = json.loads((out / "rl_config.json").read_text())
    assert len(record["runs"]) == 2 and record["runs"][1]["resumed_from"].endswith("checkpoint-2")
    assert record["runs"][1]["end_step"] == 3

    lm = FanOutLM(out / "policy")
    outs = lm.generate(["red outfit"], k=3, max_new_tokens=4)
    assert len(outs) == 1 and len(outs[0]) == 1 and isinstance(outs[0][0].text, str)
    meta = json.loads((out / "policy" / "r4t_policy.json").read_text())
    assert meta["steps"] == 3 and meta["lora_merged"] is True
    # saved crash-safely: a symlink to a version with a manifest, verified on load
    assert (out / "policy").is_symlink() and (out / "policy" / "manifest.json").is_file()
    from r4t_fast._internal import SavedDirError
    from r4t_fast.fanout.policy import resolve_policy

    assert resolve_policy(out / "policy") == (out / "policy").resolve()

    assert main([*base, "--eval-only"]) == 0
    ev = json.loads((out / "eval" / "before_after.json").read_text())
    assert ev["n_queries"] == 2 and set(ev["table"]) == {"zero-shot", "tuned"}
    assert "diff_vs_zero-shot" in ev["table"]["tuned"]["reward"]
    assert (out / "eval" / "before_after.md").read_text().startswith("#")
    rebuilt = rl.rebuild_before_after(out / "eval")  # from per_query.jsonl, no generation
    assert rebuilt["table"]["tuned"]["reward"] == ev["table"]["tuned"]["reward"]
    # the evaluation decodes as the rollouts do: constrained, k usable subqueries for both policies
    assert ev["decoding"]["constrained"] is True and ev["decoding"]["think"] is False
    for name in ("zero-shot", "tuned"):
        assert ev["table"][name]["usable_subqueries"]["mean"] == 3.0
        assert ev["table"][name]["parse_ok"]["mean"] == 1.0

    weights = next((out / "policy").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # same size, one byte flipped
    with pytest.raises(SavedDirError, match="sha256|checksum"):
        resolve_policy(out / "policy")
