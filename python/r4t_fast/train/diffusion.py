"""Stage 3: train the set diffusion model on (query embedding, target set) pairs.

Input: a directory of synthesis shards (``shard-*.safetensors`` with ``cond`` (n, cond_dim) float32,
``targets`` (n, L, d) float32 and optionally ``reward`` (n,)), as written by
:mod:`r4t_fast.train.synthesis`, or tensors passed directly to :func:`train_diffusion`.

Rows of every target set are randomly permuted each time a batch is drawn (the model must not depend
on row order). Adam with linear warm-up then cosine decay; an EMA of the weights is what gets saved.
σ_data is measured from the training targets unless given.

Training targets (``targets``, :mod:`r4t_fast.train.targets`): ``"teacher"`` (the synthesis shards),
``"reference"`` (the dataset's own train-split sets, ``reference_samples`` k-row draws per set) or
``"both"``; the saved ``config.json`` records the pairs of each source (``pairs``).

Under ``accelerate launch --num_processes N [--cpu]`` (``WORLD_SIZE > 1``) the model is wrapped in DDP
by ``accelerate.Accelerator``; rank ``r`` draws its batches (``batch_size // N`` sets) from the pairs
``i % N == r`` with its own seed, gradients are averaged, and rank 0 alone saves. A plain run imports
no accelerate and behaves as before. The output directory is saved crash-safely
(:func:`r4t_fast._internal.save_dir_atomically`, format :data:`FORMAT`); :func:`load_trained` verifies
it on load.

CLI: ``r4t train-diffusion --data runs/x/synthesis --out runs/x/diffusion --preset cpu-small``;
``r4t train-diffusion --targets reference --dataset polyvore --out runs/x/diffusion-ref``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from r4t_fast import _threads
from r4t_fast._internal import (
    check_save_target,
    check_seed,
    save_dir_atomically,
    verify_dir,
)
from r4t_fast.diffusion.model import (
    EDM,
    SetDenoiser,
    clone_for_ema,
    ema_update,
    get_preset,
    load_model,
    save_model,
    shift_rows,
)
from r4t_fast.diffusion.samplers import SAMPLING_DEFAULTS, sampler_sigmas
from r4t_fast.kernels.ops import check_device
from r4t_fast.train.checkpoint import (
    capture,
    checkpoint_path,
    fingerprint,
    load_checkpoint,
    restore,
    resumes,
    save_checkpoint,
)
from r4t_fast.train.diffusion_config import DiffusionTrainConfig
from r4t_fast.train.row_loss import row_retrieval_loss
from r4t_fast.train.targets import TARGET_CHOICES, TrainingPairs, process_info, rank_items, training_pairs

__all__ = [
    "FORMAT",
    "DiffusionTrainConfig",
    "final_loss",
    "load_shards",
    "load_trained",
    "train_diffusion",
    "unrolled_rows",
]

FORMAT = "r4t_fast.diffusion"
"""``format`` of the manifest of a ``r4t train-diffusion`` output directory."""


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


def config_pairs(
    cfg: DiffusionTrainConfig, *, shards: dict[str, torch.Tensor] | None, data: Any
) -> TrainingPairs:
    """The training pairs ``cfg`` asks for (``targets``, ``k``, ``reference_samples``, ``min_reward``,
    ``seed``): :func:`r4t_fast.train.targets.training_pairs` over ``shards`` and ``data``."""
    return training_pairs(
        cfg.targets,
        shards=shards,
        data=data,
        k=cfg.k,
        reference_samples=cfg.reference_samples,
        min_reward=cfg.min_reward,
        seed=cfg.seed,
    )


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
    *,
    positives: torch.Tensor | None = None,
    catalog: torch.Tensor | None = None,
    select_fn: Callable[[SetDenoiser], float] | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> tuple[SetDenoiser, list[dict]]:
    """Train on pairs cond (n, cond_dim) -> targets (n, L, d). Returns (EMA model, log rows).

    ``cfg.retrieval_weight > 0`` adds the rows' retrieval loss (:mod:`r4t_fast.train.row_loss`): it needs
    ``positives`` (n, P) (catalog indices of each pair's reference set, -1 = padding) and ``catalog``
    (N, d). ``select_fn(model) -> score`` (higher is better) with ``cfg.select_every > 0`` scores the EMA
    model every ``select_every`` steps and at the end; the best-scoring weights are returned and saved
    (early stopping on a validation metric; the log's ``select`` rows record every score).

    When ``out_dir`` is given, the EMA model is saved there (config.json + model.safetensors) with
    the training config and log (``train_log.jsonl``), crash-safely, by rank 0 only (:func:`save_trained`;
    load with :func:`load_trained`). Launched with ``WORLD_SIZE > 1``, every rank must call it with the
    same pairs (module docstring).

    ``checkpoint`` (a file; default with ``out_dir``: :func:`r4t_fast.train.checkpoint.checkpoint_path`
    of it): every ``cfg.checkpoint_every`` steps and at the last one the whole training state is saved
    there, and a run started again with the same settings and pairs resumes from it
    (:mod:`r4t_fast.train.checkpoint`; the log gets a ``resumed`` row). It is deleted once ``out_dir`` is
    saved; a caller that saves the model itself deletes it after that. Off under ``WORLD_SIZE > 1``.
    """
    _check_pairs(cond, targets)
    use_rows = cfg.retrieval_weight > 0
    if use_rows:
        if positives is None or catalog is None:
            raise ValueError(
                "retrieval_weight: the rows' retrieval loss needs reference sets (positives and the catalog; "
                "use targets 'reference' or 'both')"
            )
        if positives.dim() != 2 or positives.shape[0] != cond.shape[0]:
            raise ValueError(f"positives: expected ({cond.shape[0]}, P) int64, got {tuple(positives.shape)}")
        if catalog.dim() != 2 or catalog.shape[1] != targets.shape[2]:
            raise ValueError(f"catalog: expected (N, {targets.shape[2]}), got {tuple(catalog.shape)}")
        if int(positives.max()) >= catalog.shape[0]:
            raise ValueError(f"positives: indices must be < the catalog size {catalog.shape[0]}")
    if cfg.select_every and select_fn is None:
        raise ValueError("select_every: needs a select_fn (the validation score of the EMA model)")
    torch.set_num_threads(_threads.resolve(cfg.threads))  # 0: the package's rule
    n, L, d = targets.shape
    shape = {"set_size": L, "dim": d, "cond_dim": int(cond.shape[1])}
    for key, v in shape.items():
        if key in cfg.overrides and cfg.overrides[key] != v:
            raise ValueError(
                f"overrides: {key}={cfg.overrides[key]} contradicts the training data ({key}={v})"
            )
    init = _init_model(cfg.init_from, shape) if cfg.init_from else None
    if init is not None:  # fine-tune: the saved model's config (its sigma_data, cond_offset) and weights
        mcfg = init.cfg
    else:
        offset = resolve_cond_offset(cfg.cond_offset, cond, targets)
        sigma_data = cfg.sigma_data or float(shift_rows(targets, cond, -offset).std())
        mcfg = get_preset(
            cfg.preset, **{**shape, "sigma_data": sigma_data, "cond_offset": offset, **cfg.overrides}
        )
    proc = process_info()
    if checkpoint is None and out_dir is not None:
        checkpoint = checkpoint_path(out_dir)
    ckpt = Path(checkpoint) if checkpoint is not None and cfg.checkpoint_every and proc.world == 1 else None
    if ckpt is not None:  # on the pairs as given, before any move to the device
        tensors = {"cond": cond, "targets": targets, "positives": positives, "catalog": catalog}
        fp = fingerprint(cfg, mcfg, tensors if use_rows else {"cond": cond, "targets": targets})
    dev = torch.device(cfg.device)
    acc = None
    if proc.world > 1:  # launched: DDP through accelerate (imported only here)
        from accelerate import Accelerator

        acc = Accelerator(cpu=dev.type == "cpu")
        dev = acc.device
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    g = torch.Generator().manual_seed(cfg.seed + proc.rank)
    model = SetDenoiser(mcfg)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model = model.to(dev).train()
    ema = clone_for_ema(model)
    edm = EDM(model)
    if acc is not None:
        edm.model = acc.prepare(model)  # forward through the DDP wrapper: gradients are all-reduced
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    local = torch.tensor(rank_items(n, proc), dtype=torch.long)
    if local.numel() == 0:
        raise ValueError(f"targets: {n} pairs cannot be shared by {proc.world} processes")
    batch = min(max(1, cfg.batch_size // proc.world), local.numel())
    cond, targets = cond.to(dev), targets.to(dev)
    if use_rows:
        positives, catalog = positives.to(dev), catalog.float().to(dev)
        q_budget = cfg.retrieval_query_budget if cond.shape[1] == targets.shape[2] else 0
        row_kw = {
            "tau": cfg.retrieval_tau,
            "query_budget": q_budget,
            "deep_budget": cfg.retrieval_deep_budget if cfg.retrieval_deep_weight > 0 else 0,
            "deep_tau": cfg.retrieval_deep_tau,
        }
        if cfg.retrieval_unroll:
            unroll_sigmas = sampler_sigmas("euler", cfg.retrieval_unroll, mcfg)
            # 'fixed': the one draw a Retriever with noise='fixed' and the default seed starts from
            fixed_seed = SAMPLING_DEFAULTS.seed if cfg.retrieval_noise == "fixed" else None
    log: list[dict] = []
    start, elapsed0 = 0, 0.0
    running = running_rows = 0.0
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    state = load_checkpoint(ckpt, fp) if ckpt is not None else None
    if state is not None:
        start, elapsed0, log, (running, running_rows), best = restore(state, model, ema, opt, g, dev)
    t0 = time.perf_counter() - elapsed0
    bar = tqdm(
        range(start, cfg.steps),
        desc="train-diffusion",
        initial=start,
        total=cfg.steps,
        disable=not progress or not proc.is_main,
    )
    for step in bar:
        idx = local[torch.randint(0, local.numel(), (batch,), generator=g)].to(dev)
        perm = torch.argsort(torch.rand(len(idx), L, generator=g), dim=1).to(dev)  # random row order
        x0 = torch.gather(targets[idx], 1, perm[:, :, None].expand(-1, -1, d))
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        if use_rows and cfg.retrieval_unroll:
            loss = edm.loss(x0, cond[idx], generator=g)
            sub = idx[: cfg.retrieval_batch]
            rows = unrolled_rows(edm, cond[sub], unroll_sigmas, generator=g, fixed_seed=fixed_seed)
            rl = row_retrieval_loss(rows, positives[sub], catalog, query=cond[sub], **row_kw)
        elif use_rows:
            loss, rows, kept = edm.loss(x0, cond[idx], generator=g, return_denoised=True)
            sub = torch.nonzero(kept[: cfg.retrieval_batch], as_tuple=True)[0]
            rl = row_retrieval_loss(
                rows[sub],
                positives[idx[sub]],
                catalog,
                query=cond[idx[sub]],
                **row_kw,
            )
        if use_rows:
            running_rows += float(rl.loss.detach())
            loss = loss + cfg.retrieval_weight * rl.loss
            if rl.deep is not None:
                loss = loss + cfg.retrieval_deep_weight * rl.deep
        else:
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
            if acc is not None:  # the mean over the ranks' batches
                running = float(acc.reduce(torch.tensor([running], device=dev), reduction="mean")[0])
            row = {
                "step": step + 1,
                "loss": running / k,
                "lr": _lr_at(step, cfg),
                "elapsed_s": time.perf_counter() - t0,
            }
            if use_rows:
                row["row_loss"] = running_rows / k
            log.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            running = running_rows = 0.0
        if (
            select_fn is not None
            and cfg.select_every
            and ((step + 1) % cfg.select_every == 0 or step + 1 == cfg.steps)
        ):
            ema.eval()
            score = float(select_fn(ema))
            log.append({"step": step + 1, "select": score, "elapsed_s": time.perf_counter() - t0})
            if best is None or score > best[0]:
                best = (score, step + 1, {k: v.detach().clone() for k, v in ema.state_dict().items()})
        if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            elapsed = time.perf_counter() - t0
            state = capture(step + 1, elapsed, model, ema, opt, g, log, (running, running_rows), best)
            save_checkpoint(ckpt, fp, state)
    if best is not None:
        ema.load_state_dict(best[2])
        log.append({"step": best[1], "selected": best[0]})
    ema.eval()
    if out_dir is not None and proc.is_main:
        meta = {
            "train_config": asdict(cfg),
            "n_pairs": n,
            "world_size": proc.world,
            "train_wall_s": time.perf_counter() - t0,
            **(extra_meta or {}),
        }
        if use_rows and cfg.retrieval_unroll and "sampling" not in meta:
            # the sampler the rows were trained through: a Retriever built from this directory uses it
            meta["sampling"] = {"sampler": "euler", "steps": cfg.retrieval_unroll, "guidance": 0.0}
            meta["sampling"]["noise"] = "fixed" if cfg.retrieval_noise == "fixed" else "query"
        save_trained(ema, out_dir, meta, log)
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)
    if acc is not None:
        acc.wait_for_everyone()  # every rank returns once the model is saved
    return ema, log


def _is_legacy_model(p: Path) -> bool:
    """A plain model directory of the writer's older layout (no manifest)."""
    return (p / "model.safetensors").is_file()


def final_loss(log: list[dict]) -> float:
    """The last logged training loss of a :func:`train_diffusion` log (its last rows may be
    ``select`` / ``selected`` rows of early stopping).

    >>> final_loss([{"step": 5, "loss": 0.5}, {"step": 5, "select": 0.1}, {"step": 5, "selected": 0.1}])
    0.5
    """
    return next(float(r["loss"]) for r in reversed(log) if "loss" in r)


def unrolled_rows(
    edm: EDM,
    cond: torch.Tensor,
    sigmas: list[float],
    generator: torch.Generator | None = None,
    *,
    fixed_seed: int | None = None,
) -> torch.Tensor:
    """Rows (B, L, d) in the data space that Euler steps over ``sigmas`` (decreasing, last 0) draw from
    pure noise for ``cond`` (B, cond_dim), guidance 0, **with** the graph through every step -- the
    Retriever's ``euler`` sampler (:func:`r4t_fast.diffusion.samplers.sample_euler`) made
    differentiable, for a loss on what retrieval actually grounds. ``fixed_seed``: every set starts from
    the one draw of that torch seed (a Retriever's ``noise='fixed'``), not from ``generator``."""
    cfg = edm.cfg
    B = cond.shape[0]
    if fixed_seed is not None:
        one = torch.randn((1, cfg.set_size, cfg.dim), generator=torch.Generator().manual_seed(fixed_seed))
        x = one.expand(B, -1, -1).to(cond.device) * sigmas[0]
    else:
        x = torch.randn((B, cfg.set_size, cfg.dim), generator=generator).to(cond.device) * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        D = edm.denoise(x, torch.full((B,), float(s), device=cond.device), cond)
        x = D if s_next == 0 else x + (s_next - s) * (x - D) / s
    return edm.uncenter(x, cond)


def save_trained(model: SetDenoiser, out_dir: str | os.PathLike, meta: dict, log: list[dict]) -> Path:
    """Save ``model`` (``config.json`` with ``meta``, ``model.safetensors``) and ``train_log.jsonl`` as
    one crash-safe directory (:func:`r4t_fast._internal.save_dir_atomically`, format :data:`FORMAT`)."""

    def write(tmp: Path) -> None:
        save_model(model, tmp, extra=meta)
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))

    return save_dir_atomically(out_dir, write, format=FORMAT, legacy=_is_legacy_model)


def _init_dir(path: str | os.PathLike, name: str = "init_from") -> Path:
    """The directory of a saved set model to fine-tune (checked before any slow work)."""
    d = Path(path)
    if not ((d / "config.json").is_file() and (d / "model.safetensors").is_file()):
        raise FileNotFoundError(
            f"{name}: {d} is not a saved set model (needs config.json and model.safetensors)"
        )
    return d


def _init_model(path: str | os.PathLike, shape: dict[str, int]) -> SetDenoiser:
    """``init_from``: the saved set model to fine-tune (an r4t train-diffusion or Retriever directory,
    its manifest verified), checked against the training data's sizes before any step."""
    model, _ = load_trained(_init_dir(path), format=None)
    for key, v in shape.items():
        if getattr(model.cfg, key) != v:
            raise ValueError(
                f"init_from: {path} has {key}={getattr(model.cfg, key)}, the training data {key}={v}"
            )
    return model


def load_trained(
    path: str | os.PathLike, device: str = "cpu", *, verify: bool = True, format: str | None = FORMAT
) -> tuple[SetDenoiser, dict]:
    """Load a ``r4t train-diffusion`` directory, checking its manifest (sizes, and sha256 with
    ``verify``) first; a plain directory without a manifest loads unverified. ``format=None`` accepts
    any saved directory holding the model's files (a Retriever's too)."""
    d = Path(path)
    if d.is_symlink() or (d / "manifest.json").is_file():
        d = verify_dir(d, format=format, verify=verify).path
    return load_model(d, device=device)


# ---------------------------------------------------------------------------------------------- CLI
def _float_or_name(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def add_pair_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments :func:`cli_pairs` reads (``r4t train-diffusion`` and ``r4t distill``)."""
    p.add_argument(
        "--data",
        default=None,
        help="directory of synthesis shards (r4t synthesize --out); targets teacher/both",
    )
    p.add_argument(
        "--target", default="items", choices=["items", "subqueries"], help="target kind (OAR: items)"
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="targets reference/both: polyvore | spotify | PATH.jsonl (default: the shards' space.json)",
    )
    p.add_argument(
        "--encoder", default=None, help="targets reference/both: encoder spec (default: space.json)"
    )
    p.add_argument(
        "--data-dir", default=None, help="data directory (default: $R4T_DATA_DIR or ../shared/data)"
    )
    p.add_argument("--cache-dir", default=None, help="cache directory (default: $R4T_CACHE_DIR)")


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output model directory")
    add_pair_arguments(p)
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
        extra = {"choices": TARGET_CHOICES} if f.name == "targets" else {}
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=typ or str,
            default=f.default,
            help=f.metadata.get("help"),
            **extra,
        )


def _space(data_dir: str | None) -> dict[str, Any]:
    """The shards' ``space.json`` (``{}`` when absent), after checking that they come from the train split."""
    if data_dir is None:
        return {}
    d = Path(data_dir)
    syn = d / "synthesis.json"
    if syn.is_file():
        split = json.loads(syn.read_text()).get("config", {}).get("split", "train")
        if split != "train":
            raise ValueError(f"data: {d} was synthesized from the {split!r} split; train only on 'train'")
    space = d / "space.json"
    return json.loads(space.read_text()) if space.is_file() else {}


def cli_pairs(
    args: argparse.Namespace,
    targets: str,
    *,
    k: int | None,
    reference_samples: int,
    min_reward: float | None,
    seed: int,
) -> tuple[TrainingPairs, dict[str, Any]]:
    """The training pairs of the command-line arguments ``--data`` (synthesis shards), ``--target``,
    ``--dataset``, ``--encoder``, ``--data-dir``, ``--cache-dir`` for ``targets``; shared by
    ``r4t train-diffusion`` and ``r4t distill``. Returns (pairs, meta for the saved model)."""
    shards = data = None
    space = _space(args.data)
    if targets in ("teacher", "both"):
        if args.data is None:
            raise ValueError(f"data: --data (synthesis shards) is required with --targets {targets}")
        shards = load_shards(args.data, args.target)
    if targets in ("reference", "both"):
        from r4t_fast.data.prepare import load_eval_data

        if args.target != "items":
            raise ValueError("target: reference sets give item embeddings only; use --target items")
        dataset = args.dataset or space.get("dataset_spec")
        if not dataset:
            raise ValueError(f"dataset: --dataset is required with --targets {targets}")
        encoder = args.encoder or space.get("encoder_spec") or "minilm"
        data = load_eval_data(
            dataset, encoder=encoder, data_dir=args.data_dir, cache_dir=args.cache_dir, progress=False
        )
        if space.get("encoder") and data.encoder.name != space["encoder"]:
            raise ValueError(
                f"encoder: {data.encoder.name!r} differs from the shards' {space['encoder']!r} (space.json)"
            )
    pairs = training_pairs(
        targets,
        shards=shards,
        data=data,
        k=k,
        reference_samples=reference_samples,
        min_reward=min_reward,
        seed=seed,
    )
    meta: dict[str, Any] = {"pairs": pairs.counts}
    if space:
        meta["space"] = space
    if data is not None:
        meta["reference_dataset"] = {
            "dataset": data.dataset.name,
            "dataset_spec": os.fspath(dataset),
            "encoder": data.encoder.name,
            "encoder_spec": encoder if isinstance(encoder, str) else None,
        }
    return pairs, meta


def cli_main(args: argparse.Namespace) -> int:
    # --out first: a directory the final save would refuse must fail now, not after every training step
    check_save_target(Path(os.path.abspath(args.out)), FORMAT, _is_legacy_model, name="--out")
    check_device(args.device, "--device", kernels=False)
    check_seed(args.seed, "--seed")
    cfg = DiffusionTrainConfig(
        **{f.name: getattr(args, f.name) for f in fields(DiffusionTrainConfig) if f.name != "overrides"}
    )
    if cfg.init_from:  # before the pairs are built
        _init_dir(cfg.init_from, "--init-from")
    pairs, meta = cli_pairs(
        args,
        cfg.targets,
        k=cfg.k,
        reference_samples=cfg.reference_samples,
        min_reward=cfg.min_reward,
        seed=cfg.seed,
    )
    _, log = train_diffusion(
        pairs.cond,
        pairs.targets,
        cfg,
        args.out,
        extra_meta=meta,
        positives=pairs.positives,
        catalog=pairs.catalog,
    )
    if process_info().is_main:
        src = ", ".join(f"{k} {pairs.counts[k]}" for k in ("teacher", "reference"))
        resumed = "".join(f", resumed at step {r['step']}" for r in resumes(log))
        print(f"saved {args.out}: {len(pairs.cond)} pairs ({src}), final loss {final_loss(log):.4f}{resumed}")
    return 0
