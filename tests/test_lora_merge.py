"""Every LLM inference path runs merged weights: FanOutLM loads a LoRA adapter directory (a training
checkpoint) with the adapter merged into its base (merge_and_unload), giving the adapter model's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_policy

peft = pytest.importorskip("peft")


def test_adapter_dir_is_merged_for_inference(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from r4t_fast.fanout.generation import FanOutLM

    base = make_tiny_policy(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(model, cfg)
    wrapped.save_pretrained(tmp_path / "adapter")
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(base)
    lm = FanOutLM(tmp_path / "adapter")
    assert lm.lora_merged
    assert not any("lora" in n for n, _ in lm.model.named_parameters())  # plain layers, no adapter
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = wrapped.eval()(ids).logits
        got = lm.model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    plain = FanOutLM(base)
    assert not plain.lora_merged
