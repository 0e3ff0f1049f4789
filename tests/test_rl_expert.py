"""Expert iteration before GRPO (issue 19, lever 2) on the tiny offline policy: one round samples
constrained fan-outs, keeps the best by the stage's reward, fine-tunes (TRL SFT, LoRA) on them, and GRPO
starts from the merged result; the kept answers become more likely under the new policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_policy, sets_jsonl

pytest.importorskip("trl")


def _completion_logprob(model_dir: Path, rows: list[dict]) -> float:
    """Mean log-probability per token of the rows' completions given their prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for r in rows:
        prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        full = prompt + r["completion"][0]["content"]
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        picked = logp[torch.arange(targets.shape[0]), targets][len(p_ids) - 1 :]
        total, count = total + float(picked.sum()), count + picked.numel()
    return total / count


def test_expert_iteration_then_grpo(tmp_path: Path) -> None:
    from r4t_fast.cli import main
    from r4t_fast.train.rl_config import RLConfig

    torch.set_num_threads(1)
    policy = make_tiny_policy(tmp_path / "tiny-policy")
    data = sets_jsonl(tmp_path / "sets.jsonl")
    cfg = {
        "encoder": "hashing:64",
        "cache_dir": str(tmp_path / "cache"),
        "k": 2,
        "one_shot": False,
        "num_generations": 2,
        "num_iterations": 1,
        "max_completion_length": 24,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "expert_rounds": 1,
        "expert_samples": 4,
        "expert_keep": 1,
        "expert_epochs": 5,
        "expert_learning_rate": 0.02,
        "expert_batch_size": 1,
        "expert_max_queries": 4,
        "save_steps": 5,
        "num_threads": 1,
        "eval_splits": ["val", "test"],
    }
    (tmp_path / "rl.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    argv = ["train-rl", "--dataset", str(data), "--policy", str(policy), "--out", str(out)]
    assert main([*argv, "--config", str(tmp_path / "rl.json"), "--max-steps", "1"]) == 0

    record = json.loads((out / "expert" / "expert.json").read_text())
    (rnd,) = record["rounds"]
    assert rnd["sampled"] == 4 * 4 and rnd["kept"] == 4  # the best 1 of 4 samples for each of 4 titles
    assert rnd["mean_reward_kept"] >= rnd["mean_reward_sampled"]
    new_policy = Path(rnd["policy"])
    rl_record = json.loads((out / "rl_config.json").read_text())
    assert rl_record["expert_policy"] == str(new_policy)
    assert Path(rl_record["policy_dir"]).resolve() == new_policy.resolve()  # GRPO started from it

    # the kept answers (rebuilt the same way: same seed, same policy) are likelier after the SFT round
    from r4t_fast.fanout.generation import FanOutLM
    from r4t_fast.train.rl_expert import expert_examples
    from r4t_fast.train.rl_setup import _load_data, _reward_function, _split_rows, rollout_constraint
    from r4t_fast.train.synthesis import sample_and_select

    rl_cfg = RLConfig.from_dict({**cfg, "dataset": str(data), "policy": str(policy)})
    d = _load_data(rl_cfg)
    rows = _split_rows(d, ["train"], None)[:4]
    lm = FanOutLM(policy)
    constraint, cap = rollout_constraint(rl_cfg, lm.tokenizer, 24, "max_completion_length")
    sel = sample_and_select(
        [r["query"] for r in rows], lm, _reward_function(rl_cfg, d), k=2, samples=4, keep=1,
        temperature=rl_cfg.temperature, max_new_tokens=cap, batch_size=4, seed=rl_cfg.seed + 1,
        constrained=constraint, references=[r["reference"] for r in rows],
    )  # fmt: skip
    examples = expert_examples([r["query"] for r in rows], sel, rl_cfg)
    assert len(examples) == 4
    assert _completion_logprob(new_policy, examples) > _completion_logprob(policy, examples) + 0.1

    with pytest.raises(ValueError, match="expert_keep"):
        rl_cfg.replace(expert_keep=5)
    with pytest.raises(ValueError, match="expert_rounds"):
        rl_cfg.replace(expert_rounds=4)
