"""The policy of ``r4t train-rl``: loaded for training (:func:`load_policy`) and saved with LoRA merged,
crash-safely (:func:`save_policy`); shared by GRPO (:mod:`r4t_fast.train.rl`) and expert iteration
(:mod:`r4t_fast.train.rl_expert`), re-exported by :mod:`r4t_fast.train.rl`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from r4t_fast.fanout.prompt import CHATML_END

__all__ = ["load_policy", "save_policy"]


# ----------------------------------------------------------------------------------------------------
# policy
# ----------------------------------------------------------------------------------------------------
def load_policy(spec: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, Path]:
    """Load a chat causal LM for training: ``(model, tokenizer, model_dir)``.

    Applies ``shared/NOTES.md``: removes a leftover quantization config (GGUF conversions), makes
    ``<|im_end|>`` the eos and pad token when the vocabulary has it (else pads with eos), pads on the
    left, and writes the ids into the model's config and generation config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r4t_fast.fanout.policy import resolve_policy

    path = resolve_policy(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"policy: {path} has no chat template; the fan-out prompt needs a chat model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if CHATML_END in tokenizer.get_vocab():
        tokenizer.eos_token = CHATML_END
        tokenizer.pad_token = CHATML_END
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"policy: the tokenizer of {path} has neither {CHATML_END} nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path


# ----------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------
def save_policy(
    model: Any, tokenizer: Any, out_dir: str | os.PathLike[str], meta: dict[str, Any] | None = None
) -> Path:
    """Save a HF model dir loadable by :class:`r4t_fast.fanout.generation.FanOutLM` (LoRA merged),
    crash-safely.

    A PEFT model is merged into a copy-free base (``merge_and_unload``); ``r4t_policy.json`` records
    ``meta`` (base policy, steps, config). The directory is written by
    :func:`r4t_fast._internal.save_dir_atomically` (format :data:`~r4t_fast.fanout.policy.POLICY_FORMAT`):
    ``out_dir`` is a symlink to a complete version with a sha256 manifest, switched atomically, so a
    crash leaves the previous policy or the new one; :func:`~r4t_fast.fanout.policy.resolve_policy`
    (hence ``FanOutLM``, ``r4t eval``) verifies it on load.
    """
    from peft import PeftModel

    from r4t_fast._internal import save_dir_atomically
    from r4t_fast.fanout.policy import POLICY_FORMAT, POLICY_META

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / POLICY_META).write_text(json.dumps(meta or {}, indent=2, default=str) + "\n")

    return save_dir_atomically(
        out_dir, write, format=POLICY_FORMAT, meta={"steps": (meta or {}).get("steps")}
    )
