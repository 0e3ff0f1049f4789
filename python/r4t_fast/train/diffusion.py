"""Stage 3: train the set diffusion model on (query embedding, target set) pairs.

Input: a directory of synthesis shards (``shard-*.safetensors`` with ``cond`` (n, cond_dim) float32,
``targets`` (n, L, d) float32 and optionally ``reward`` (n,)), as written by
:mod:`r4t_fast.train.synthesis`, or tensors passed directly to :func:`train_diffusion`.

Rows of every target set are randomly permuted each time a batch is drawn (the model must not depend
on row order). Adam with linear warm-up then cosine decay; an EMA of the weights is what gets saved.
σ_data is measured from the training targets unless given.

CLI: ``r4t train-diffusion --data runs/x/synthesis --out runs/x/diffusion --preset cpu-small``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from r4t_fast._internal import check_positive_int
from r4t_fast.diffusion.model import (
    EDM,
    SetDenoiser,
    clone_for_ema,
    ema_update,
    get_preset,
    save_model,
    shift_rows,
)

__all__ = ["DiffusionTrainConfig", "load_shards", "train_diffusion"]


@dataclass
class DiffusionTrainConfig:
    """Settings of a diffusion training run."""

    preset: str = field(default="cpu-small", metadata={"help": "model preset: paper | cpu-small | tiny"})
    steps: int = field(default=3000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=128, metadata={"help": "sets per batch"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (Adam)"})
    warmup: int = field(default=200, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    ema: float = field(default=0.999, metadata={"help": "EMA decay of the saved weights (paper: 0.9999)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0 = off)"})
    sigma_data: float | None = field(default=None, metadata={"help": "data std; None = measure"})
    cond_offset: float | str = field(
        default="auto",
        metadata={
            "help": "query-centred targets x0 - a * query: a float, 'fit' (least squares over the pairs) "
            "or 'auto' (fit when query and rows share a dimension, else 0)"
        },
    )
    min_reward: float | None = field(default=None, metadata={"help": "drop pairs with reward below this"})
    seed: int = field(default=0, metadata={"help": "seed for init, batches and noise"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch default)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    log_every: int = field(default=50, metadata={"help": "steps between log lines"})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"help": "model config overrides"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            setattr(self, name, check_positive_int(getattr(self, name), name))
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema: expected a value in [0, 1), got {self.ema}")
        if isinstance(self.cond_offset, str):
            if self.cond_offset not in ("auto", "fit"):
                raise ValueError(f"cond_offset: expected a float, 'fit' or 'auto', got {self.cond_offset!r}")
        elif isinstance(self.cond_offset, bool) or not math.isfinite(float(self.cond_offset)):
            raise ValueError(f"cond_offset: expected a finite float, 'fit' or 'auto', got {self.cond_offset}")


def load_shards(path: str | os.PathLike, target: str = "items") -> dict[str, torch.Tensor]:
    """Concatenate every ``shard-*.safetensors`` in ``path`` into {cond, targets, reward}.

    ``target``: ``"items"`` (embeddings of the grounded items, OAR) or ``"subqueries"`` (subquery text
    embeddings, WSCR); read from ``targets_<target>`` (or a plain ``targets`` tensor)."""
    if target not in ("items", "subqueries"):
        raise ValueError(f"target: expected 'items' or 'subqueries', got {target!r}")
    d = Path(path)
    shards = sorted(d.glob("shard-*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"data: no shard-*.safetensors files in {d} (run `r4t synthesize` first)")
    parts: dict[str, list[torch.Tensor]] = {"cond": [], "targets": [], "reward": []}
    for s in shards:
        try:
            t = load_file(str(s))
        except Exception as exc:  # corrupt shard: name it
            raise ValueError(f"{s}: unreadable shard ({exc})") from exc
        key = f"targets_{target}" if f"targets_{target}" in t else "targets"
        if "cond" not in t or key not in t:
            raise ValueError(f"{s}: expected tensors 'cond' and 'targets_{target}', got {sorted(t)}")
        parts["cond"].append(t["cond"].float())
        parts["targets"].append(t[key].float())
        parts["reward"].append(t.get("reward", torch.full((t["cond"].shape[0],), float("nan"))).float())
    out = {k: torch.cat(v) for k, v in parts.items()}
    return out


def _check_pairs(cond: torch.Tensor, targets: torch.Tensor) -> None:
    if cond.dim() != 2:
        raise ValueError(f"cond: expected (n, cond_dim), got {tuple(cond.shape)}")
    if targets.dim() != 3 or targets.shape[0] != cond.shape[0]:
        raise ValueError(f"targets: expected ({cond.shape[0]}, L, d), got {tuple(targets.shape)}")
    if targets.shape[0] == 0:
        raise ValueError("targets: no training pairs")
    for name, t in (("cond", cond), ("targets", targets)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or inf")


def _lr_at(step: int, cfg: DiffusionTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def resolve_cond_offset(spec: float | str, cond: torch.Tensor, targets: torch.Tensor) -> float:
    """The query offset ``a`` of query-centred targets ``x0 - a * q``.

    ``'fit'``: the least-squares scalar a = Σ_i Σ_l <x0_il, q_i> / (L · Σ_i ‖q_i‖²), i.e. the scale of the
    query that best explains every row (rows and query in one embedding space). ``'auto'``: ``'fit'``
    when ``cond`` and the rows have the same dimension, else 0. A number is used as given.
    """
    if not isinstance(spec, str):
        return float(spec)
    if spec == "auto" and cond.shape[1] != targets.shape[2]:
        return 0.0
    if cond.shape[1] != targets.shape[2]:
        raise ValueError(
            f"cond_offset: 'fit' needs query dim == row dim, got {cond.shape[1]}, {targets.shape[2]}"
        )
    q = cond.double()
    num = float(torch.einsum("nld,nd->", targets.double(), q))
    den = float(targets.shape[1] * (q * q).sum())
    return num / den if den > 0 else 0.0


def train_diffusion(
    cond: torch.Tensor,
    targets: torch.Tensor,
    cfg: DiffusionTrainConfig,
    out_dir: str | os.PathLike | None = None,
    extra_meta: dict | None = None,
    progress: bool = True,
) -> tuple[SetDenoiser, list[dict]]:
    """Train on pairs cond (n, cond_dim) -> targets (n, L, d). Returns (EMA model, log rows).

    When ``out_dir`` is given, the EMA model is saved there (config.json + model.safetensors) with
    the training config and log (``train_log.jsonl``).
    """
    _check_pairs(cond, targets)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    n, L, d = targets.shape
    offset = resolve_cond_offset(cfg.cond_offset, cond, targets)
    sigma_data = cfg.sigma_data or float(shift_rows(targets, cond, -offset).std())
    shape = {"set_size": L, "dim": d, "cond_dim": int(cond.shape[1])}
    for key, v in shape.items():
        if key in cfg.overrides and cfg.overrides[key] != v:
            raise ValueError(
                f"overrides: {key}={cfg.overrides[key]} contradicts the training data ({key}={v})"
            )
    mcfg = get_preset(
        cfg.preset, **{**shape, "sigma_data": sigma_data, "cond_offset": offset, **cfg.overrides}
    )
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    model = SetDenoiser(mcfg).to(dev).train()
    ema = clone_for_ema(model)
    edm = EDM(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    cond, targets = cond.to(dev), targets.to(dev)
    log: list[dict] = []
    t0 = time.perf_counter()
    running = 0.0
    bar = tqdm(range(cfg.steps), desc="train-diffusion", disable=not progress)
    for step in bar:
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g).to(dev)
        perm = torch.argsort(torch.rand(len(idx), L, generator=g), dim=1).to(dev)  # random row order
        x0 = torch.gather(targets[idx], 1, perm[:, :, None].expand(-1, -1, d))
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = edm.loss(x0, cond[idx], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, model, cfg.ema if step >= cfg.warmup else 0.0)
        running += float(loss.detach())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            k = (step % cfg.log_every) + 1
            row = {
                "step": step + 1,
                "loss": running / k,
                "lr": _lr_at(step, cfg),
                "elapsed_s": time.perf_counter() - t0,
            }
            log.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            running = 0.0
    ema.eval()
    if out_dir is not None:
        meta = {
            "train_config": asdict(cfg),
            "n_pairs": n,
            "train_wall_s": time.perf_counter() - t0,
            **(extra_meta or {}),
        }
        save_model(ema, out_dir, extra=meta)
        with open(Path(out_dir) / "train_log.jsonl", "w") as f:
            for row in log:
                f.write(json.dumps(row) + "\n")
    return ema, log


# ---------------------------------------------------------------------------------------------- CLI
def _float_or_name(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="directory of synthesis shards (r4t synthesize --out)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument(
        "--target", default="items", choices=["items", "subqueries"], help="target kind (OAR: items)"
    )
    for f in fields(DiffusionTrainConfig):
        if f.name == "overrides":
            continue
        typ = {"int": int, "float": float, "str": str}.get(
            str(f.type).split(" ")[0].replace("|", "").strip(), None
        )
        if f.name == "sigma_data" or f.name == "min_reward":
            typ = float
        if f.name == "cond_offset":
            typ = _float_or_name
        p.add_argument(
            f"--{f.name.replace('_', '-')}", type=typ or str, default=f.default, help=f.metadata.get("help")
        )


def cli_main(args: argparse.Namespace) -> int:
    cfg = DiffusionTrainConfig(
        **{f.name: getattr(args, f.name) for f in fields(DiffusionTrainConfig) if f.name != "overrides"}
    )
    data = load_shards(args.data, args.target)
    cond, targets = data["cond"], data["targets"]
    if cfg.min_reward is not None:
        keep = data["reward"] >= cfg.min_reward
        cond, targets = cond[keep], targets[keep]
    meta = {}
    space = Path(args.data) / "space.json"
    if space.is_file():
        meta["space"] = json.loads(space.read_text())
    _, log = train_diffusion(cond, targets, cfg, args.out, extra_meta=meta)
    print(f"saved {args.out}: {len(cond)} pairs, final loss {log[-1]['loss']:.4f}")
    return 0
