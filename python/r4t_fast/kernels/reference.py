"""Pure-PyTorch reference implementations of every compiled kernel: the executable specification.

Each function has the same contract as its counterpart in :mod:`r4t_fast.ops` (see ``csrc/params.h``)
but takes and returns torch tensors only and does no validation. Tests compare the kernels against
these; they are also a readable statement of what the kernels compute.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

__all__ = ["knn", "ground", "ground_sets", "set_stats", "nearest_distance", "edm_step", "sample_sets"]


def knn(
    queries: torch.Tensor,
    catalog: torch.Tensor,
    k: int,
    metric: str = "ip",
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k in float64. IP: scores = q·c, descending. L2: scores = ||q − c||², ascending.

    ``allowed`` (optional bool (N,)): only those rows are searched (ids stay catalog row numbers). Ties
    are broken by ascending catalog id (stable sort). Slots past the number of searched rows hold id −1
    and score −inf (IP) or +inf (L2). Returns (scores (B, k) float32, ids (B, k) int64).

    L2 is expanded here (|q|² + |c|² − 2 q·c) but in float64, whose rounding error (~1e-16 |q|²) is far
    below the float32 kernels' own; the kernels accumulate (q − c)² directly (csrc/params.h).
    """
    if allowed is not None:
        rows = torch.nonzero(allowed.bool()).flatten()
        s, i = knn(queries, catalog[rows], k, metric)
        if rows.numel() == 0:
            return s, i  # nothing allowed: all sentinels
        return s, torch.where(i >= 0, rows[i.clamp_min(0)], i)
    q = queries.double()
    c = catalog.double()
    B, N = q.shape[0], c.shape[0]
    if metric == "ip":
        s = q @ c.T
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        fill = -math.inf
    else:
        s = (q * q).sum(1, keepdim=True) + (c * c).sum(1)[None, :] - 2.0 * (q @ c.T)
        s = s.clamp_min(0.0)
        order = torch.sort(s, dim=1, descending=False, stable=True).indices
        fill = math.inf
    kk = min(k, N)
    ids = torch.full((B, k), -1, dtype=torch.int64)
    scores = torch.full((B, k), fill, dtype=torch.float32)
    ids[:, :kk] = order[:, :kk]
    scores[:, :kk] = torch.gather(s, 1, order[:, :kk]).float()
    return scores, ids


def ground(
    cand_scores: torch.Tensor, cand_ids: torch.Tensor, higher_is_better: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy de-duplicated grounding of (S, L, C) candidate lists (rules in csrc/params.h)."""
    S, L, C = cand_ids.shape
    worst = -math.inf if higher_is_better else math.inf
    out_ids = torch.full((S, L), -1, dtype=torch.int64)
    out_scores = torch.full((S, L), worst, dtype=torch.float32)
    for s in range(S):
        pairs = [
            (float(cand_scores[s, r, c]), r, int(cand_ids[s, r, c]))
            for r in range(L)
            for c in range(C)
            if int(cand_ids[s, r, c]) >= 0
        ]
        sign = -1.0 if higher_is_better else 1.0
        pairs.sort(key=lambda p: (sign * p[0], p[1], p[2]))
        used: set[int] = set()
        for score, r, item in pairs:
            if out_ids[s, r] >= 0 or item in used:
                continue
            out_ids[s, r] = item
            out_scores[s, r] = score
            used.add(item)
    return out_ids, out_scores


def ground_sets(
    rows: torch.Tensor,
    catalog: torch.Tensor,
    candidates: int | None = None,
    metric: str = "ip",
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map every row of each (L, d) set to a distinct catalog item (only ``allowed`` items when a mask
    is given): kNN candidates, then greedy."""
    B, L, d = rows.shape
    C = min(candidates or L, catalog.shape[0])
    s, i = knn(rows.reshape(B * L, d), catalog, C, metric, allowed)
    return ground(s.reshape(B, L, C), i.reshape(B, L, C), higher_is_better=(metric == "ip"))


def set_stats(x: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vendi score (cosine kernel) and mean off-diagonal cosine of each (L, d) set, in float64."""
    S, L, _ = x.shape
    vendi = torch.zeros(S, dtype=torch.float32)
    mean_cos = torch.zeros(S, dtype=torch.float32)
    for s in range(S):
        n = L if lengths is None else max(0, min(L, int(lengths[s])))
        if n == 0:
            continue
        v = x[s, :n].double()
        norm = v.norm(dim=1, keepdim=True)
        v = torch.where(norm > 0, v / norm.clamp_min(1e-300), torch.zeros_like(v))
        K = v @ v.T
        K.fill_diagonal_(1.0)
        if n > 1:
            mean_cos[s] = float((K.sum() - n) / (n * (n - 1)))
        lam = torch.linalg.eigvalsh(K / n)
        lam = lam[lam > 1e-15]
        vendi[s] = float(torch.exp(-(lam * lam.log()).sum()))
    return vendi, mean_cos


def nearest_distance(rows: torch.Tensor, catalog: torch.Tensor) -> torch.Tensor:
    """L2 distance of each row (..., d) to its nearest catalog row."""
    flat = rows.reshape(-1, rows.shape[-1])
    s, _ = knn(flat, catalog, 1, "l2")
    return s[:, 0].sqrt().reshape(rows.shape[:-1])


def edm_step(
    x: torch.Tensor,
    f_cond: torch.Tensor,
    f_uncond: torch.Tensor | None,
    noise: torch.Tensor | None,
    *,
    sigma: float,
    c_skip: float,
    c_out: float,
    guidance: float,
    h: float,
    noise_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EDM sampler step (csrc/params.h, EdmStepParams). Returns (x_next, denoised)."""
    f = f_cond if f_uncond is None else (1.0 + guidance) * f_cond - guidance * f_uncond
    D = c_skip * x + c_out * f
    dx = (x - D) / sigma
    xn = x + h * dx
    if noise is not None:
        xn = xn + noise_scale * noise
    return xn, D


def sample_sets(
    model: torch.nn.Module,
    cond: torch.Tensor,
    x_init: torch.Tensor,
    sigmas: list[float],
    *,
    sampler: str = "heun",
    guidance: float = 0.0,
    noise: torch.Tensor | None = None,
    catalog: torch.Tensor | None = None,
    candidates: int | None = None,
    group: int = 1,
    metric: str = "ip",
    allowed: torch.Tensor | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The fused set sampler (csrc/set_sampler_params.h, ``ops.sample_sets``) with the eager SetDenoiser
    ``model``: EDM preconditioning and classifier-free guidance as ``diffusion.model.EDM``, each step as
    ``diffusion.samplers``; rows in data space (+ cond_offset · cond), then grounded per ``group`` sets
    as :func:`ground_sets`. Runs in the dtype of ``x_init`` and ``model`` (float64 for a tight spec).
    Returns (rows (B, L, d), ids, scores (B / group, group · L)); ids/scores None without a catalog.
    ``precision="bf16"``: the forward pass's Linears (not ``sigma_mlp`` / ``ada``) on bf16-rounded inputs
    and weights (:func:`bf16_linears`), accumulated in the model's dtype."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: expected 'fp32' or 'bf16', got {precision!r}")
    if precision == "bf16":
        with bf16_linears(model):
            return sample_sets(
                model, cond, x_init, sigmas, sampler=sampler, guidance=guidance, noise=noise, catalog=catalog,
                candidates=candidates, group=group, metric=metric, allowed=allowed,
            )  # fmt: skip
    cfg = model.cfg
    sd, smin, B = cfg.sigma_data, cfg.sigma_min, cond.shape[0]
    guided = guidance != 0.0

    def denoise(x: torch.Tensor, s: float) -> torch.Tensor:
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
        xin = (torch.cat([x, x]) if guided else x) * (1.0 / math.sqrt(s**2 + sd**2))
        cn = torch.full((xin.shape[0],), math.log(s) / 4.0, dtype=x.dtype)
        drop = (torch.arange(xin.shape[0]) >= B) if guided else None
        f = model(xin, cn, torch.cat([cond, cond]) if guided else cond, drop)
        f = (1.0 + guidance) * f[:B] - guidance * f[B:] if guided else f
        return c_skip * x + c_out * f

    x, old, h_last = x_init.clone(), None, 0.0
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        if sampler == "consistency":
            if i > 0:
                x = x + math.sqrt(max(s * s - smin * smin, 0.0)) * noise[i]
            x = denoise(x, s)
            continue
        D = denoise(x, s)
        if sampler == "euler":
            x = x + (sn - s) * ((x - D) / s)
        elif sampler == "euler_maruyama":
            up = math.sqrt(max(sn**2 * (s**2 - sn**2) / s**2, 0.0))
            down = math.sqrt(max(sn**2 - up**2, 0.0))
            x = x + (down - s) * ((x - D) / s) + (up * noise[i] if up > 0 else 0.0)
        elif sampler == "heun":
            xe = x + (sn - s) * ((x - D) / s)
            x = xe if sn == 0 else x + (sn - s) * 0.5 * ((x - D) / s + (xe - denoise(xe, sn)) / sn)
        elif sampler == "dpmpp_2m":
            if sn == 0:
                x = D
                break
            h = math.log(s) - math.log(sn)
            d = D if old is None else (1 + 1 / (2 * h_last / h)) * D - (1 / (2 * h_last / h)) * old
            x = (sn / s) * x - math.expm1(-h) * d
            old, h_last = D, h
        else:
            raise ValueError(f"sampler: unknown {sampler!r}")
    rows = x + cfg.cond_offset * cond[:, None, :].to(x.dtype) if cfg.cond_offset else x
    if catalog is None:
        return rows, None, None
    L, d = rows.shape[1], rows.shape[2]
    ids, scores = ground_sets(rows.reshape(B // group, group * L, d), catalog, candidates, metric, allowed)
    return rows, ids, scores


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


@contextlib.contextmanager
def bf16_linears(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, every ``nn.Linear`` of ``model`` except the noise-level MLP (``sigma_mlp``,
    ``ada``) computes ``bf16(x) · bf16(W)^T + b`` in the model's dtype: the fused sampler's
    ``precision="bf16"`` (bf16 = round to nearest even; products of bf16 values are exact in float32)."""
    saved, hooks = [], []
    try:
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.startswith(("sigma_mlp", "ada")):
                saved.append((mod, mod.weight.data))
                mod.weight.data = _bf16(mod.weight.data)
                hooks.append(mod.register_forward_pre_hook(lambda _m, args: (_bf16(args[0]), *args[1:])))
        yield
    finally:
        for h in hooks:
            h.remove()
        for mod, w in saved:
            mod.weight.data = w


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, precision: str = "fp32"
) -> torch.Tensor:
    """The fused sampler's GEMM (:func:`r4t_fast.ops.sampler_linear`) in float64: ``x · weightᵀ + bias``,
    with ``precision="bf16"`` on x and weight rounded to bf16 first (their products are exact in float32;
    the kernel sums them in float32)."""
    if precision not in ("fp32", "bf16", "bf16-emulated"):
        raise ValueError(f"precision: expected 'fp32', 'bf16' or 'bf16-emulated', got {precision!r}")
    if precision != "fp32":
        x, weight = _bf16(x), _bf16(weight)
    return x.double() @ weight.double().T + bias.double()
