"""Issue 19's levers in ``r4t train-rl``: rollouts batched across prompts, the cap by tokens per subquery,
the step log's time split and completions per second, copy_rate and the smooth coverage in the step log,
the copy penalty and forbid_title reaching the reward and the rollouts. A tiny random Llama on a
synthetic sets.jsonl (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import make_tiny_policy, sets_jsonl

pytest.importorskip("trl")


def test_train_rl_levers_reach_the_step_log(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from r4t_fast.cli import main
    from r4t_fast.fanout.constrained import FanOutConstraint
    from r4t_fast.train.rl_config import RLConfig
    from r4t_fast.train.rl_setup import completion_cap, rollout_constraint

    policy = make_tiny_policy(tmp_path / "tiny-policy")
    data = sets_jsonl(tmp_path / "sets.jsonl")
    k, per_subquery = 3, 3
    cfg = {
        "encoder": "hashing:64",
        "cache_dir": str(tmp_path / "cache"),
        "k": k,
        "one_shot": False,
        "task": "soft-mixed",
        "mixed_weight": 0.5,
        "copy_penalty": 0.5,
        "forbid_title": True,
        "num_generations": 2,
        "prompts_per_step": 3,
        "micro_batch": 2,  # the step's 6 completions in 3 forward/backward passes
        "tokens_per_subquery": per_subquery,
        "num_iterations": 1,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "save_steps": 5,
        "num_threads": 1,
        "eval_splits": ["val", "test"],
    }
    (tmp_path / "rl.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    argv = ["train-rl", "--dataset", str(data), "--policy", str(policy), "--out", str(out)]
    assert main([*argv, "--config", str(tmp_path / "rl.json"), "--max-steps", "2"]) == 0

    tok = AutoTokenizer.from_pretrained(policy)
    need = FanOutConstraint(k=k).min_new_tokens(tok)
    record = json.loads((out / "rl_config.json").read_text())
    assert record["rollouts"]["max_completion_length"] == need + k * (per_subquery - 1)
    assert record["reward_task"] == "soft-mixed"
    assert record["rollouts"]["micro_batch"] == 2
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "train_runtime" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["completions"] == 6.0  # 3 prompts x 2 completions, one generate call per step
        assert r["generate_s"] > 0 and r["reward_s"] > 0 and r["backward_s"] > 0
        assert r["generate_s"] + r["reward_s"] + r["score_other_s"] + r["backward_s"] <= r["step_time"] + 1e-3
        assert 0.0 <= r["copy_rate"] <= 1.0 and 0.0 < r["soft_coverage"] < 1.0
    assert steps[1]["completions_per_s"] == pytest.approx(12.0 / steps[1]["elapsed_s"], rel=1e-3)

    rl_cfg = RLConfig.from_dict({**cfg, "dataset": str(data), "policy": str(policy)})
    constraint, cap = rollout_constraint(rl_cfg, tok, completion_cap(rl_cfg, tok), "max_completion_length")
    assert constraint.forbid_title and cap == need + k * (per_subquery - 1)
    assert completion_cap(rl_cfg.replace(tokens_per_subquery=None), tok) == rl_cfg.max_completion_length
    with pytest.raises(ValueError, match="tokens_per_subquery"):
        rl_cfg.replace(tokens_per_subquery=0)
    with pytest.raises(ValueError, match="copy_penalty"):
        rl_cfg.replace(copy_penalty=1.5)
    with pytest.raises(ValueError, match="soft_tau"):
        rl_cfg.replace(soft_tau=0.0)
    with pytest.raises(ValueError, match="forbid_title"):
        rl_cfg.replace(forbid_title="yes")
