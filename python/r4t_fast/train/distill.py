"""Few-step sets: consistency distillation of a trained EDM set model, and quality against NFE.

The student f_θ starts as a copy of the teacher and keeps its EDM parametrisation
f(x, σ) = c_skip·x + c_out·F; it learns the *consistency function* of the teacher: the map from a noisy
set (x, σ) to the end (σ = 0) of the teacher's probability-flow ODE trajectory through it. It is then
sampled with ``SAMPLERS["consistency"]`` in 1–4 steps (one network evaluation each; Song et al. 2023,
Algorithm 1). Two ways to learn f (``DistillConfig.method``):

``"ode"`` (default): regress the teacher's own solution. At every level σ the consistency sampler
evaluates (:func:`consistency_levels`: σ_max, σ_data and the Karras levels between), pairs
x = x0 + σ·z are drawn from the training data and solved to σ = 0 by the teacher (16 Heun steps); the
loss is ‖f_θ(x, σ) − solution‖² / σ_data² per element. This is direct ODE distillation (Luhman & Luhman
2021) at the consistency levels: the target is what the bootstrap below converges to, known up front.

``"cd"``: Song et al.'s bootstrapped consistency distillation (Algorithm 2). Karras levels
σ_1 = σ_min < … < σ_N = σ_max, n ~ U{1, …, N−1}, x_{n+1} = x0 + σ_{n+1}·z, x̂_n = one teacher Heun step
from σ_{n+1} to σ_n, loss = d(f_θ(x_{n+1}, σ_{n+1}), f_θ⁻(x̂_n, σ_n)) with f_θ⁻ an EMA of θ (decay μ)
and f⁻(x̂_1, σ_1) := x̂_1 (the boundary condition f(x, σ_min) = x; EDM's c_skip(σ_min) is
1 − O(σ_min²/σ_d²), so the network meets it to that order elsewhere).

Measured on tests/test_distill.py's mode-coverage problem (3 modes per query, teacher Heun 16 steps
covering 0.92 of them; 600 steps, lr 1e-3, EMA 0.98): ``"ode"`` covers 0.69 / 0.86 / 0.89 at 1 / 2 / 3 steps;
``"cd"`` 0.47 / 0.00 / 0.00 (N = 10, μ = 0) or 0.58 / 0.42 / 0.53 (N = 18, μ = 0.95). The bootstrap
passes information up one level per round of training, which a CPU budget of a few hundred to a few
thousand steps does not allow; the regression does not wait. Its price is up front:
``levels × pool_size × 31`` teacher evaluations (5 levels; 2,048 pairs each by default).

Why consistency distillation and not progressive distillation (PD): PD halves the step count per
phase, so 31 NFE → 1 takes five successive trainings, each learning two teacher steps and inheriting the
previous phase's errors, and each phase's student serves a single step count. Here one training serves
1, 2, 3 and 4 steps, and on a 2-core CPU one phase is what fits the budget.

**Quality against NFE** (:func:`quality_vs_nfe`): a :class:`~r4t_fast.Retriever` scored at each
(sampler, steps) on held-out queries with the item-level metrics of :mod:`r4t_fast.objectives`:
``recall_at_fair`` (recall of the reference set over a K-distinct round-robin union of the rows'
candidates, K = ``fair_budget``),
``vendi`` (of the k items), ``item_relevance`` (mean (1 + cos(item, query)) / 2), ``row_groundedness``.

CLI: ``r4t distill --teacher runs/x/diffusion --data runs/x/synthesis --out runs/x/distilled`` (the pairs
are the teacher's own training targets by default: teacher shards, reference sets or both).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from r4t_fast import _threads
from r4t_fast._internal import (
    atomic_write_text,
    check_positive_int,
    check_seed,
    save_dir_atomically,
    unit_rows,
)
from r4t_fast.diffusion.model import EDM, SetDenoiser, clone_for_ema, ema_update, load_model, save_model
from r4t_fast.diffusion.samplers import SAMPLERS, karras_sigmas, nfe, sampler_sigmas, steps_for_nfe
from r4t_fast.kernels.ops import check_device

__all__ = [
    "DEFAULT_NFE_GRID",
    "DistillConfig",
    "distill_consistency",
    "nfe_grid",
    "quality_vs_nfe",
    "save_distilled",
]


@dataclass
class DistillConfig:
    """Settings of a consistency-distillation run (the loop is :func:`distill_consistency`)."""

    method: str = field(
        default="ode",
        metadata={
            "help": "ode: regress the teacher's ODE solution at the consistency sampler's levels; "
            "cd: Song et al.'s bootstrapped consistency distillation"
        },
    )
    steps: int = field(default=1500, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=128, metadata={"help": "sets per batch"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (Adam)"})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps"})
    pool_size: int = field(
        default=2048, metadata={"help": "ode: (x, teacher solution) pairs precomputed per noise level"}
    )
    teacher_steps: int = field(
        default=16, metadata={"help": "ode: Heun steps of the teacher's solution from each level"}
    )
    levels: int = field(default=18, metadata={"help": "cd: N, Karras levels the teacher steps between"})
    rho: float = field(default=7.0, metadata={"help": "ρ of the Karras levels"})
    sigma_min: float | None = field(
        default=None, metadata={"help": "lowest level; None = max(teacher sigma_min, 2e-3), as sampling"}
    )
    teacher_solver: str = field(default="heun", metadata={"help": "teacher ODE step: heun | euler"})
    teacher_guidance: float = field(default=0.0, metadata={"help": "classifier-free guidance of the teacher"})
    target_ema: float = field(
        default=0.95, metadata={"help": "μ: EMA decay of the target network f⁻ (CM paper for CD: 0.95)"}
    )
    ema: float = field(default=0.99, metadata={"help": "EMA decay of the saved weights"})
    loss: str = field(default="l2", metadata={"help": "distance: l2 | pseudo_huber (iCT)"})
    huber_c: float = field(
        default=1e-3, metadata={"help": "pseudo_huber: c, in units of σ_data per element (iCT's c)"}
    )
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0 = off)"})
    sample_steps: int = field(
        default=2, metadata={"help": "consistency steps recorded as the distilled model's default (1-4)"}
    )
    min_reward: float | None = field(default=None, metadata={"help": "drop pairs with reward below this"})
    seed: int = field(default=0, metadata={"help": "seed for batches, levels and noise"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: r4t_fast._threads rule)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    log_every: int = field(default=50, metadata={"help": "steps between log lines"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            setattr(self, name, check_positive_int(getattr(self, name), name))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup: expected an int >= 0, got {self.warmup!r}")
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 2:
            raise ValueError(f"levels: expected an int >= 2, got {self.levels!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        for name in ("target_ema", "ema"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a value in [0, 1), got {getattr(self, name)}")
        if self.method not in ("ode", "cd"):
            raise ValueError(f"method: expected 'ode' or 'cd', got {self.method!r}")
        for name in ("pool_size", "teacher_steps"):
            setattr(self, name, check_positive_int(getattr(self, name), name))
        if self.teacher_solver not in ("heun", "euler"):
            raise ValueError(f"teacher_solver: expected 'heun' or 'euler', got {self.teacher_solver!r}")
        if self.loss not in ("l2", "pseudo_huber"):
            raise ValueError(f"loss: expected 'l2' or 'pseudo_huber', got {self.loss!r}")
        if not self.huber_c > 0:
            raise ValueError(f"huber_c: expected > 0, got {self.huber_c}")
        if self.sigma_min is not None and not self.sigma_min > 0:
            raise ValueError(f"sigma_min: expected > 0 or None, got {self.sigma_min}")
        if not math.isfinite(self.teacher_guidance):
            raise ValueError(f"teacher_guidance: expected a finite float, got {self.teacher_guidance}")
        if isinstance(self.sample_steps, bool) or self.sample_steps not in (1, 2, 3, 4):
            raise ValueError(f"sample_steps: expected 1, 2, 3 or 4, got {self.sample_steps!r}")


# ---------------------------------------------------------------------------------------------- loop
def _lr_at(step: int, cfg: DistillConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr


def _teacher_denoise(edm: EDM, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, w: float):
    D = edm.denoise(x, sigma, cond)
    if w:
        drop = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        D = (1 + w) * D - w * edm.denoise(x, sigma, cond, drop)
    return D


def _teacher_step(
    edm: EDM, x: torch.Tensor, s_hi: torch.Tensor, s_lo: torch.Tensor, cond: torch.Tensor, cfg: DistillConfig
) -> torch.Tensor:
    """One step of the teacher's probability-flow ODE from σ_hi to σ_lo (per example; Heun or Euler)."""
    hi, lo = s_hi.view(-1, 1, 1), s_lo.view(-1, 1, 1)
    d1 = (x - _teacher_denoise(edm, x, s_hi, cond, cfg.teacher_guidance)) / hi
    xe = x + (lo - hi) * d1
    if cfg.teacher_solver == "euler":
        return xe
    d2 = (xe - _teacher_denoise(edm, xe, s_lo, cond, cfg.teacher_guidance)) / lo
    return x + (lo - hi) * 0.5 * (d1 + d2)


def _distance(
    pred: torch.Tensor, target: torch.Tensor, cfg: DistillConfig, sigma_data: float
) -> torch.Tensor:
    """Per-example distance on the σ_data scale: mean squared error / σ_d² (l2), or
    √(that + c²) − c (pseudo-Huber)."""
    mse = ((pred - target) ** 2).mean(dim=(1, 2)) / sigma_data**2
    if cfg.loss == "l2":
        return mse
    c = cfg.huber_c
    return (mse + c * c).sqrt() - c


def distill_levels(cfg: DistillConfig, teacher_cfg: Any) -> list[float]:
    """cd: σ_1 < … < σ_N, the Karras levels of the bootstrap (ascending)."""
    smin = cfg.sigma_min if cfg.sigma_min is not None else max(teacher_cfg.sigma_min, 2e-3)
    return sorted(karras_sigmas(cfg.levels, smin, teacher_cfg.sigma_max, cfg.rho)[:-1])


def consistency_levels(cfg: DistillConfig, teacher_cfg: Any, max_steps: int = 4) -> list[float]:
    """ode: every level at which ``generate_sets(..., sampler="consistency")`` evaluates the model in 1 to
    ``max_steps`` steps (:func:`~r4t_fast.diffusion.samplers.sampler_sigmas`), descending."""
    levels = {s for n in range(1, max_steps + 1) for s in sampler_sigmas("consistency", n, teacher_cfg)}
    return sorted((s for s in levels if s > 0), reverse=True)


@torch.no_grad()
def _ode_pool(
    t_edm: EDM,
    cond: torch.Tensor,
    targets: torch.Tensor,
    levels: Sequence[float],
    cfg: DistillConfig,
    g: torch.Generator,
    progress: bool,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per level σ: (pair index (P,), x = x0 + σ·z (P, L, d), the teacher's Heun solution from (x, σ)
    to 0 (P, L, d)), with P = ``pool_size`` pairs drawn at random (rows in random order)."""
    n, L, d = targets.shape
    dev = targets.device
    smin = cfg.sigma_min if cfg.sigma_min is not None else max(t_edm.cfg.sigma_min, 2e-3)
    heun = SAMPLERS["heun"]
    pool = []
    chunk = 512
    bar = tqdm(total=len(levels) * cfg.pool_size, desc="teacher solutions", disable=not progress)
    for sigma in levels:
        idx = torch.randint(0, n, (cfg.pool_size,), generator=g)
        xs, ys = [], []
        for start in range(0, cfg.pool_size, chunk):
            i = idx[start : start + chunk]
            perm = torch.argsort(torch.rand(len(i), L, generator=g), dim=1).to(dev)
            c = cond[i.to(dev)]
            x0 = t_edm.center(torch.gather(targets[i.to(dev)], 1, perm[:, :, None].expand(-1, -1, d)), c)
            x = x0 + sigma * torch.randn(x0.shape, generator=g).to(dev)
            sched = karras_sigmas(cfg.teacher_steps, min(smin, sigma / 2), sigma)
            ys.append(heun(t_edm, x, sched, c, guidance=cfg.teacher_guidance, generator=g))
            xs.append(x)
            bar.update(len(i))
        pool.append((idx, torch.cat(xs), torch.cat(ys)))
    bar.close()
    return pool


def distill_consistency(
    teacher: SetDenoiser,
    cond: torch.Tensor,
    targets: torch.Tensor,
    cfg: DistillConfig,
    out_dir: str | os.PathLike | None = None,
    extra_meta: dict | None = None,
    progress: bool = True,
) -> tuple[SetDenoiser, list[dict]]:
    """Distil ``teacher`` on pairs cond (n, cond_dim) -> targets (n, L, d) (the teacher's training data
    or any sample of it). Returns (EMA student, log rows); with ``out_dir`` also saves it
    (:func:`save_distilled`).

    ``cfg.method = "ode"``: the student f(x, σ) regresses the teacher's 16-step Heun solution from (x, σ)
    to σ = 0, at each level the consistency sampler uses (:func:`consistency_levels`), over a pool of
    pairs computed once. That solution *is* the consistency function the bootstrap of ``"cd"`` converges
    to (the probability-flow ODE's map to σ = 0), so no level waits for the one below it to be learned:
    on the mode-coverage problem it reached in 600 steps what ``"cd"`` (Song et al. 2023, Algorithm 2)
    did not (numbers in the module docstring).
    It costs ``levels × pool_size × (2·teacher_steps − 1)`` teacher evaluations up front.
    """
    from r4t_fast.train.diffusion import _check_pairs

    _check_pairs(cond, targets)
    tcfg = teacher.cfg
    n, L, d = targets.shape
    if (L, d, cond.shape[1]) != (tcfg.set_size, tcfg.dim, tcfg.cond_dim):
        raise ValueError(
            f"targets: pairs of shape cond (n, {cond.shape[1]}), targets (n, {L}, {d}) do not match the "
            f"teacher (cond_dim {tcfg.cond_dim}, set_size {tcfg.set_size}, dim {tcfg.dim})"
        )
    torch.set_num_threads(_threads.resolve(cfg.threads))  # 0: the package's rule
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    teacher = teacher.to(dev).eval().requires_grad_(False)
    t_edm = EDM(teacher)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    student.freqs.requires_grad_(False)  # fixed Fourier features, as in training
    target_net, ema = clone_for_ema(student), clone_for_ema(student)
    s_edm, f_edm = EDM(student), EDM(target_net)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.99))
    cond, targets = cond.to(dev), targets.to(dev)
    sd = tcfg.sigma_data
    t0 = time.perf_counter()
    if cfg.method == "ode":
        ode_levels = consistency_levels(cfg, tcfg)
        pool = _ode_pool(t_edm, cond, targets, ode_levels, cfg, g, progress)
        pool_pair = torch.cat([p[0] for p in pool]).to(dev)
        pool_x, pool_y = torch.cat([p[1] for p in pool]), torch.cat([p[2] for p in pool])
        pool_sigma = torch.tensor(ode_levels, dtype=torch.float32).repeat_interleave(cfg.pool_size).to(dev)
    else:
        levels = torch.tensor(distill_levels(cfg, tcfg), dtype=torch.float32)
    t_pool = time.perf_counter() - t0
    log: list[dict] = []
    running = 0.0
    bar = tqdm(range(cfg.steps), desc="distill", disable=not progress)
    for step in bar:
        B = min(cfg.batch_size, n) if cfg.method == "cd" else cfg.batch_size
        if cfg.method == "ode":
            j = torch.randint(0, len(pool_x), (B,), generator=g).to(dev)
            c, x_in, target, sigma = cond[pool_pair[j]], pool_x[j], pool_y[j], pool_sigma[j]
        else:
            idx = torch.randint(0, n, (B,), generator=g)
            perm = torch.argsort(torch.rand(B, L, generator=g), dim=1)  # random row order
            c = cond[idx.to(dev)]
            x0 = torch.gather(targets[idx.to(dev)], 1, perm.to(dev)[:, :, None].expand(-1, -1, d))
            x0 = t_edm.center(x0, c)
            lv = torch.randint(0, cfg.levels - 1, (B,), generator=g)
            s_lo, sigma = levels[lv].to(dev), levels[lv + 1].to(dev)
            x_in = x0 + sigma.view(-1, 1, 1) * torch.randn(x0.shape, generator=g).to(dev)
            with torch.no_grad():
                x_lo = _teacher_step(t_edm, x_in, sigma, s_lo, c, cfg)
                target = f_edm.denoise(x_lo, s_lo, c)
                target = torch.where((lv == 0).to(dev).view(-1, 1, 1), x_lo, target)  # f(x, σ_min) = x
        pred = s_edm.denoise(x_in, sigma, c)
        loss = _distance(pred, target, cfg, sd).mean()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if cfg.method == "cd":
            ema_update(target_net, student, cfg.target_ema)
        ema_update(ema, student, cfg.ema if step >= cfg.warmup else 0.0)
        running += float(loss.detach())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            k = (step % cfg.log_every) + 1
            row = {"step": step + 1, "loss": running / k, "elapsed_s": time.perf_counter() - t0}
            log.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            running = 0.0
    ema.eval()
    if out_dir is not None:
        meta = {
            "n_pairs": n,
            "distill_wall_s": time.perf_counter() - t0,
            "teacher_solutions_s": t_pool,
            **(extra_meta or {}),
        }
        save_distilled(ema, out_dir, cfg, log, meta=meta)
    return ema, log


# ---------------------------------------------------------------------------------------------- saving
def _is_model_dir(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def save_distilled(
    student: SetDenoiser,
    out_dir: str | os.PathLike,
    cfg: DistillConfig,
    log: Sequence[dict] = (),
    *,
    teacher_dir: str | os.PathLike | None = None,
    meta: dict | None = None,
) -> Path:
    """Save the distilled model directory ``out_dir`` crash-safely (:func:`save_dir_atomically`).

    It is a normal model directory (:func:`~r4t_fast.diffusion.load_model`) whose ``config.json``
    records ``"sampling": {"sampler": "consistency", "steps": cfg.sample_steps, "guidance": 0.0}``, plus
    ``distill_log.jsonl``. When ``teacher_dir`` is a retriever directory (``retriever.json`` +
    ``catalog/``) the catalog is copied and ``retriever.json`` gets those sampling defaults, so
    ``Retriever.from_pretrained(out_dir)`` samples in ``cfg.sample_steps`` consistency steps.
    """
    sampling = {"sampler": "consistency", "steps": cfg.sample_steps, "guidance": 0.0}
    tdir = Path(teacher_dir) if teacher_dir is not None else None
    extra = {
        **(meta or {}),
        "distill_config": asdict(cfg),
        "distilled_from": None if tdir is None else str(tdir),
        "method": "consistency distillation (Song et al. 2023)",
        "sampling": sampling,
    }

    def write(tmp: Path) -> None:
        save_model(student, tmp, extra=extra)
        atomic_write_text(tmp / "distill_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
        if tdir is not None and (tdir / "retriever.json").is_file() and (tdir / "catalog").is_dir():
            shutil.copytree(tdir / "catalog", tmp / "catalog")
            rmeta = json.loads((tdir / "retriever.json").read_text())
            rmeta["defaults"] = {**rmeta.get("defaults", {}), **sampling}
            atomic_write_text(tmp / "retriever.json", json.dumps(rmeta, indent=2))

    retriever = tdir is not None and (tdir / "retriever.json").is_file() and (tdir / "catalog").is_dir()
    return save_dir_atomically(  # checksummed like every saved directory, so a load can verify it
        out_dir,
        write,
        format="r4t_fast.retriever" if retriever else "r4t_fast.diffusion",
        legacy=lambda p: (p / "model.safetensors").is_file(),
    )


# ---------------------------------------------------------------------------------------------- quality
DEFAULT_NFE_GRID: tuple[int, ...] = (1, 2, 4, 8, 16, 31)
"""The NFE counts the issue reports quality and latency at."""


def nfe_grid(
    samplers: Sequence[str] = ("heun", "dpmpp_2m", "euler"), nfes: Sequence[int] = DEFAULT_NFE_GRID
) -> list[tuple[str, int]]:
    """(sampler, steps) for every sampler and NFE count it can reach exactly (``steps_for_nfe``).

    >>> nfe_grid(["heun", "dpmpp_2m"], [1, 2, 31])
    [('heun', 1), ('heun', 16), ('dpmpp_2m', 1), ('dpmpp_2m', 2), ('dpmpp_2m', 31)]
    """
    out = []
    for s in samplers:
        for n in nfes:
            steps = steps_for_nfe(s, n)
            if steps is not None:
                out.append((s, steps))
    return out


@torch.no_grad()
def quality_vs_nfe(
    retriever: Any,
    query_emb: Any,
    references: Sequence[Sequence[int]],
    grid: Sequence[tuple[str, int]] | None = None,
    *,
    k: int | None = None,
    budget: int | None = None,
    seed: int = 0,
    guidance: float = 0.0,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Item-level quality of ``retriever`` at each (sampler, steps) of ``grid`` on the same queries.

    Args:
        retriever: a :class:`~r4t_fast.Retriever` (query and rows in one space: ``cond_dim == dim``).
        query_emb: (Q, cond_dim) float32 query embeddings.
        references: per query, the reference set as catalog row indices.
        grid: (sampler, steps) pairs (default: :func:`nfe_grid`, plus ``("consistency", 1..4)`` when
            the retriever's default sampler is ``consistency``, i.e. it was distilled).
        k: items per set (default: the model's set size).
        budget: candidate budget K (default: ``r4t_fast.objectives.fair_budget`` of the catalog).

    Returns:
        one dict per grid point: ``sampler``, ``steps``, ``nfe``, ``fair_budget``, and the means over
        queries of ``recall_at_fair`` (|Y ∩ U_K| / |Y|, U_K = ``round_robin_union`` of the k rows'
        candidates), ``vendi`` (Vendi score of the k items, cosine kernel), ``item_relevance``
        (mean over the k items of (1 + cos(item, query)) / 2) and ``row_groundedness``
        (1 − mean_rows min_c ‖row − c‖ / 2), plus ``queries``. Every formula is
        :mod:`r4t_fast.objectives`'s.
    """
    from r4t_fast.objectives import (
        fair_budget,
        groundedness,
        item_relevance,
        recall_at_k,
        round_robin_union,
        vendi_score,
    )

    cfg = retriever.model.cfg
    if cfg.cond_dim != cfg.dim:
        raise ValueError(f"retriever: item relevance needs cond_dim == dim, got {cfg.cond_dim}, {cfg.dim}")
    q = torch.as_tensor(np.asarray(query_emb, dtype=np.float32))
    if q.dim() != 2 or q.shape[0] != len(references):
        raise ValueError(f"query_emb: expected ({len(references)}, {cfg.cond_dim}), got {tuple(q.shape)}")
    k = cfg.set_size if k is None else k
    cat = retriever.catalog.embeddings.float()
    K = fair_budget(len(retriever.catalog), k) if budget is None else int(budget)
    if grid is None:
        grid = nfe_grid()
        if getattr(retriever, "defaults", {}).get("sampler") == "consistency":
            grid += [("consistency", s) for s in (1, 2, 3, 4)]
    qn = unit_rows(q)
    rows_out = []
    for sampler, steps in grid:
        if sampler not in SAMPLERS:
            raise ValueError(f"grid: unknown sampler {sampler!r}; valid choices: {sorted(SAMPLERS)}")
        recall, vendi, rel, ground = [], [], [], []
        for start in range(0, q.shape[0], batch_size):
            qb = q[start : start + batch_size]
            sets = retriever.retrieve_embeddings(
                qb, k, n_candidates=K, steps=steps, sampler=sampler, guidance=guidance, seed=seed
            )
            ids = torch.from_numpy(np.stack([s.item_indices for s in sets]))
            items = cat[ids.clamp_min(0)].double()
            rows = torch.from_numpy(np.stack([s.row_embeddings for s in sets])).double()
            unions = [round_robin_union(s.candidates, K) for s in sets]
            recall.append(recall_at_k(unions, [list(r) for r in references[start : start + len(sets)]]))
            vendi.append(vendi_score(items).numpy())
            rel.append(item_relevance(items, qn[start : start + len(sets)].double()).numpy())
            ground.append(groundedness(rows, cat).numpy())
        rows_out.append(
            {
                "sampler": sampler,
                "steps": steps,
                "nfe": nfe(sampler, steps),
                "fair_budget": K,
                "queries": int(q.shape[0]),
                "recall_at_fair": float(np.concatenate(recall).mean()),
                "vendi": float(np.concatenate(vendi).mean()),
                "item_relevance": float(np.concatenate(rel).mean()),
                "row_groundedness": float(np.concatenate(ground).mean()),
            }
        )
    return rows_out


# ---------------------------------------------------------------------------------------------- CLI
class _InputError(ValueError):
    """A bad command-line input: reported in one line, exit status 2."""


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    from r4t_fast.train.diffusion import add_pair_arguments
    from r4t_fast.train.targets import TARGET_CHOICES

    p.add_argument("--teacher", required=True, help="trained model or retriever directory (the teacher)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    add_pair_arguments(p)
    p.add_argument(
        "--targets",
        default=None,
        choices=TARGET_CHOICES,
        help="the pairs distilled on: teacher (--data shards), reference (--dataset's train sets) or "
        "both; default: the teacher's own training targets (its train_config), else teacher",
    )
    p.add_argument(
        "--reference-samples",
        type=int,
        default=None,
        help="targets reference/both: k-row draws per reference set (default: the teacher's)",
    )
    for f in fields(DistillConfig):
        typ: Any = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], float)
        p.add_argument(
            f"--{f.name.replace('_', '-')}", type=typ, default=f.default, help=f.metadata.get("help")
        )


def _check_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    teacher, out = Path(args.teacher), Path(args.out)
    if not teacher.is_dir():
        raise _InputError(f"--teacher: {teacher} is not a directory")
    if not _is_model_dir(teacher):
        raise _InputError(
            f"--teacher: {teacher} is not a diffusion model directory (needs config.json and "
            "model.safetensors; r4t train-diffusion writes one)"
        )
    if args.data is not None:
        data = Path(args.data)
        if not data.is_dir():
            raise _InputError(f"--data: {data} is not a directory")
        if not any(data.glob("shard-*.safetensors")):
            raise _InputError(f"--data: no shard-*.safetensors files in {data} (run `r4t synthesize` first)")
    if out.exists() and not out.is_dir():
        raise _InputError(f"--out: {out} exists and is not a directory")
    if out.resolve() == teacher.resolve():
        raise _InputError(f"--out: {out} is the teacher directory; choose another")
    return teacher, out


def cli_main(args: argparse.Namespace) -> int:
    from r4t_fast.train.diffusion import cli_pairs

    try:
        check_device(args.device, "--device", kernels=False)
        check_seed(args.seed, "--seed")
        teacher_dir, out = _check_inputs(args)
        cfg = DistillConfig(**{f.name: getattr(args, f.name) for f in fields(DistillConfig)})
        try:
            teacher, tmeta = load_model(teacher_dir, device=cfg.device)
        except (ValueError, FileNotFoundError) as exc:
            raise _InputError(f"--teacher: {exc}") from exc
        tcfg = tmeta.get("train_config") or {}
        targets = args.targets or tcfg.get("targets") or "teacher"
        ref_samples = args.reference_samples or tcfg.get("reference_samples") or 4
        try:
            pairs, pmeta = cli_pairs(
                args,
                targets,
                k=tcfg.get("k"),
                reference_samples=ref_samples,
                min_reward=cfg.min_reward,
                seed=int(tcfg.get("seed", 0)),
            )
        except (ValueError, FileNotFoundError) as exc:
            msg = str(exc)
            named = msg.startswith(("data:", "dataset:", "target", "encoder:"))
            raise _InputError(msg if named else f"--data: {msg}") from exc
        cond, targets_t = pairs.cond, pairs.targets
        if not len(cond):
            raise _InputError(f"--min-reward: no pair has reward >= {cfg.min_reward}")
        tc = teacher.cfg
        if targets_t.shape[1:] != (tc.set_size, tc.dim) or cond.shape[1] != tc.cond_dim:
            raise _InputError(
                f"--data: pairs cond (n, {cond.shape[1]}), targets (n, {targets_t.shape[1]}, "
                f"{targets_t.shape[2]}) do not match the teacher (cond_dim {tc.cond_dim}, "
                f"set_size {tc.set_size}, dim {tc.dim})"
            )
    except (_InputError, ValueError) as exc:
        print(f"r4t distill: error: {exc}", file=sys.stderr)
        return 2
    student, log = distill_consistency(teacher, cond, targets_t, cfg)
    meta = {"n_pairs": int(len(cond)), "targets": targets, "teacher_config": tcfg or None, **pmeta}
    if "space" in tmeta:
        meta["space"] = tmeta["space"]
    save_distilled(student, out, cfg, log, teacher_dir=teacher_dir, meta=meta)
    print(
        f"saved {out}: distilled {teacher_dir} on {len(cond)} pairs ({targets}) in {cfg.steps} steps, "
        f"final loss {log[-1]['loss']:.4f}; sample with sampler=consistency, steps={cfg.sample_steps}"
    )
    return 0
