"""Pure-PyTorch reference implementations of every compiled kernel: the executable specification.

Each function has the same contract as its counterpart in :mod:`r4t_fast.ops` (see ``csrc/params.h``)
but takes and returns torch tensors only and does no validation. Tests compare the kernels against
these; they are also a readable statement of what the kernels compute.
"""

from __future__ import annotations

import math

import torch

__all__ = ["knn", "ground", "ground_sets", "set_stats", "nearest_distance", "edm_step"]


def knn(
    queries: torch.Tensor, catalog: torch.Tensor, k: int, metric: str = "ip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k. IP: scores = q·c, descending. L2: scores = ||q − c||², ascending.

    Ties are broken by ascending catalog id (stable sort). Slots past N hold id −1 and score −inf (IP)
    or +inf (L2). Returns (scores (B, k) float32, ids (B, k) int64).
    """
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
    rows: torch.Tensor, catalog: torch.Tensor, candidates: int | None = None, metric: str = "ip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map every row of each (L, d) set to a distinct catalog item: kNN candidates, then greedy."""
    B, L, d = rows.shape
    C = min(candidates or L, catalog.shape[0])
    s, i = knn(rows.reshape(B * L, d), catalog, C, metric)
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
