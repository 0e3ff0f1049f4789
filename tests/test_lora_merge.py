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


def test_lora_layers_adapts_only_the_top_layers_and_backward_stops_there(tmp_path: Path) -> None:
    """``RLConfig.lora_layers = n``: adapters on the top n decoder layers only, and the layers below carry
    no autograd graph (issue 19's throughput lever)."""
    from transformers import AutoModelForCausalLM

    from r4t_fast.train.rl_config import RLConfig
    from r4t_fast.train.rl_setup import lora_config

    base = make_tiny_policy(tmp_path / "base", num_hidden_layers=4)
    model = AutoModelForCausalLM.from_pretrained(base)
    wrapped = peft.get_peft_model(model, lora_config(RLConfig(lora_layers=1), model))
    adapted = {
        int(n.split(".layers.")[1].split(".")[0]) for n, _ in wrapped.named_parameters() if "lora_" in n
    }
    assert adapted == {3}
    seen: list[bool] = []

    def grad_of_output(module, inputs, out) -> None:
        seen.append((out[0] if isinstance(out, tuple) else out).requires_grad)

    hooks = [layer.register_forward_hook(grad_of_output) for layer in wrapped.base_model.model.model.layers]
    wrapped(torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
    for h in hooks:
        h.remove()
    assert seen == [False, False, False, True]  # no graph below the adapted layer
    every = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora_config(RLConfig(), None))
    assert {
        int(n.split(".layers.")[1].split(".")[0]) for n, _ in every.named_parameters() if "lora_" in n
    } == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="lora_layers: expected <= 4"):
        lora_config(RLConfig(lora_layers=5), model)
    with pytest.raises(ValueError, match="lora_layers"):
        RLConfig(lora_layers=-1)
