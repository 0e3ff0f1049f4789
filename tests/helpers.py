"""Test fixtures shared by several test files: a tiny offline chat policy and a synthetic sets.jsonl.

Imported as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``: no ``__init__.py``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The ChatML template of SmolLM2 (and Qwen), without the default system message."""


def make_tiny_policy(
    path: Path,
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """A randomly initialised Llama with a byte-level tokenizer and a ChatML chat template, saved to ``path``.

    Any text round-trips through the tokenizer (one token per byte), so the policy can be loaded by
    :class:`r4t_fast.llm.FanOutLM`, tuned by ``r4t train-rl`` and fitted to a fixed answer in seconds.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)  # deterministic random weights
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sets_jsonl(path: Path, n: int = 30) -> Path:
    """``n`` titled synthetic outfits ("red outfit 0", ...), 4 items each over 40 item ids, as sets.jsonl."""
    colours = ["red", "black", "blue", "white", "green", "grey"]
    kinds = ["scarf", "boots", "jacket", "shirt", "bag", "hat", "dress", "loafers"]
    with open(path, "w") as f:
        for i in range(n):
            c = colours[i % len(colours)]
            items = [
                {
                    "item_id": f"it{(i * 3 + j) % 40}",
                    "text": f"{colours[(i + j) % 6]} {kinds[(i * 3 + j) % 8]}",
                }
                for j in range(4)
            ]
            f.write(json.dumps({"set_id": f"s{i:03d}", "query": f"{c} outfit {i}", "items": items}) + "\n")
    return path


def kill_during_saves(
    save, load, check, tmp_path: Path, kills: int, seed: int, tmp_prefix: str = ".cat.tmp-"
) -> tuple[int, int]:
    """Fork a child that saves generation 1, 2, 3, ... in a loop; SIGKILL it after a random delay;
    load after each kill (``check(loaded, gen)`` returns the generation it found; ``tmp_prefix`` names
    the save's temporary siblings). Returns (kills, kills that left an unfinished temporary behind)."""
    rng = random.Random(seed)  # seeded: the same delays on every run
    t0 = time.perf_counter()
    save(1)
    once = time.perf_counter() - t0
    check(load(), 1)
    last, mid_write = 1, 0
    for _ in range(kills):
        start = last + 1
        pid = os.fork()
        if pid == 0:  # child: save forever, never return into pytest
            try:
                g = start
                while True:
                    save(g)
                    g += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 2.5 * once))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_write += any(p.name.startswith(tmp_prefix) for p in tmp_path.iterdir())
        loaded = load()  # previous or new version, never a broken one
        g = check(loaded, None)
        assert g >= last, f"went back from generation {last} to {g}"
        last = g
    return kills, mid_write


def noisy_tiny_model(seed: int = 2):
    """A ``tiny`` SetDenoiser with small random weights everywhere (its zero-initialised output layers
    would make every sample trivial), in eval mode."""
    import torch

    from r4t_fast.diffusion.model import SetDenoiser, get_preset

    torch.manual_seed(seed)
    m = SetDenoiser(get_preset("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m
