"""Resumable training checkpoints of the set-model trainer (:func:`r4t_fast.train.diffusion.train_diffusion`).

A checkpoint is one file (``torch.save``, written atomically: :func:`r4t_fast._internal.atomic_write`)
holding everything the next step depends on: the weights, the EMA weights, the optimizer state, the
batch/noise generator and torch's global RNG, the log so far, the running loss sums and the early-stopping
best. Resuming from it with the same thread count gives the very weights of a run that was never stopped
(tests/test_checkpoint.py); another thread count may round float reductions differently.

It carries a fingerprint of what it was trained on -- the training config (less the fields that do not
change the weights: :data:`NOT_FINGERPRINTED`), the model config and the bytes of the training pairs --
and is only resumed when the fingerprint matches; an unreadable or foreign checkpoint is reported and
training starts from step 0 (the file is a cache of work, never a user's data).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from r4t_fast._internal import atomic_write

__all__ = [
    "NOT_FINGERPRINTED",
    "capture",
    "checkpoint_path",
    "fingerprint",
    "load_checkpoint",
    "restore",
    "resumes",
    "save_checkpoint",
]

NOT_FINGERPRINTED = ("threads", "device", "checkpoint_every", "log_every")
"""Training-config fields a resumed run may change (they do not change the weights)."""

_FORMAT = "r4t_fast.train_checkpoint"


def checkpoint_path(out: str | os.PathLike) -> Path:
    """Where the trainer of output ``out`` keeps its checkpoint: the sibling file ``<out>.checkpoint.pt``."""
    p = Path(os.path.abspath(out))
    return p.with_name(p.name + ".checkpoint.pt")


def fingerprint(cfg: Any, model_cfg: Any, tensors: dict[str, torch.Tensor | None]) -> str:
    """Hex sha256 of the training config (less :data:`NOT_FINGERPRINTED`), the model config and the
    shapes, dtypes and bytes of ``tensors`` (None entries are recorded as absent)."""
    h = hashlib.sha256()
    c = {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    h.update(json.dumps({"train": c, "model": asdict(model_cfg)}, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, fp: str, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists and dicts of them) with fingerprint ``fp``."""
    payload = {"format": _FORMAT, "fingerprint": fp, **state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path, fp: str) -> dict[str, Any] | None:
    """The state saved at ``path`` when it exists, reads and matches fingerprint ``fp``; else None
    (with a warning naming the file when one exists but cannot be resumed)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: start again, say so
        warnings.warn(f"checkpoint: {path} is unreadable ({exc}); training starts from step 0", stacklevel=3)
        return None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        warnings.warn(
            f"checkpoint: {path} is not a training checkpoint; training starts from step 0", stacklevel=3
        )
        return None
    if state.get("fingerprint") != fp:
        warnings.warn(
            f"checkpoint: {path} was written for other settings or training pairs; training starts from "
            "step 0 and replaces it",
            stacklevel=3,
        )
        return None
    return state


Best = tuple[float, int, dict[str, torch.Tensor]]
"""Early stopping's best so far: (score, step, EMA weights)."""


def capture(
    step: int,
    elapsed_s: float,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
    log: list[dict],
    running: tuple[float, float],
    best: Best | None,
) -> dict[str, Any]:
    """The trainer's state after ``step`` steps, for :func:`save_checkpoint`."""
    return {
        "step": step,
        "elapsed_s": elapsed_s,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "generator": generator.get_state(),
        "rng": torch.get_rng_state(),
        "log": log,
        "running": list(running),
        "best": None if best is None else {"score": best[0], "step": best[1], "weights": best[2]},
    }


def restore(
    state: dict[str, Any],
    model: torch.nn.Module,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[int, float, list[dict], tuple[float, float], Best | None]:
    """Load a :func:`capture` state into the trainer's objects; returns (step, elapsed_s, log + a
    ``resumed`` row, running loss sums, best)."""
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"])
    step, elapsed = int(state["step"]), float(state["elapsed_s"])
    b = state["best"]
    best = (
        None
        if b is None
        else (float(b["score"]), int(b["step"]), {k: v.to(device) for k, v in b["weights"].items()})
    )
    log = [*state["log"], {"step": step, "resumed": True, "elapsed_s": elapsed}]
    r0, r1 = state["running"]
    return step, elapsed, log, (float(r0), float(r1)), best


def resumes(log: list[dict]) -> list[dict]:
    """The ``resumed`` rows (step, elapsed_s) :func:`restore` added to a training log, in order."""
    return [row for row in log if row.get("resumed")]
