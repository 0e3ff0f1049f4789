"""A tiny saved Retriever directory for the serve tests (hashing encoder: no model loads; ~1 s)."""

from __future__ import annotations

from pathlib import Path

import torch

from r4t_fast import Catalog
from r4t_fast.data.encoders import HashingEncoder
from r4t_fast.diffusion.model import SetDenoiser, get_preset
from r4t_fast.diffusion.retriever import Retriever

COLOURS = ("red", "blue", "green", "black", "white", "grey")
KINDS = ("shirt", "shoe", "bag", "hat", "skirt", "scarf", "dress", "boots")


def tiny_retriever(seed: int = 2) -> Retriever:
    """A random tiny SetDenoiser (set size 4) over 48 items "item <colour> <kind>" with categories and
    metadata ``{"colour": ..., "in_stock": bool}``; encoder ``hashing:16``, 4 sampler steps."""
    torch.manual_seed(seed)
    model = SetDenoiser(get_preset("tiny")).eval()
    with torch.no_grad():  # zero-initialised output layers would make every sample trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc = HashingEncoder(dim=16, seed=0)
    texts = [f"item {c} {k}" for c in COLOURS for k in KINDS]
    cat = Catalog(
        [f"id{j}" for j in range(len(texts))],
        enc.encode(texts),
        texts,
        categories=[t.split()[2] for t in texts],
        metadata=[{"colour": t.split()[1], "in_stock": j % 2 == 0} for j, t in enumerate(texts)],
    )
    return Retriever(model, cat, enc, encoder_spec="hashing:16", steps=4)


def tiny_retriever_dir(path: Path) -> Path:
    tiny_retriever().save(path)
    return path
