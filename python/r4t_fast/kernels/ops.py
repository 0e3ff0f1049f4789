"""Public kernels: validate -> dispatch by device -> the compiled core (``r4t_fast._C``).

Inputs may be torch tensors, numpy arrays or (on GPU) cupy arrays; they are viewed without copies where
the layout allows (unit stride along the feature axis; any row stride). Outputs are returned in the
library of the first array argument. CPU arrays run the C++/OpenMP kernels, CUDA tensors the CUDA
kernels on the caller's current stream. The pure-PyTorch twins live in :mod:`r4t_fast.reference`.

Sentinels: when fewer than ``k`` results exist (``k > N``) the missing slots hold id ``-1`` and score
``-inf`` (metric ``"ip"``) or ``+inf`` (metric ``"l2"``). Ties are ordered by ascending catalog id.
"""

from __future__ import annotations

from typing import Any

import torch

from r4t_fast.kernels import _backend
from r4t_fast.kernels._arrays import (
    as_tensor,
    check_matrix,
    check_positive_int,
    check_same_device,
    cuda_stream_ptr,
    describe,
    to_library,
)

__all__ = [
    "knn",
    "ground",
    "ground_sets",
    "set_stats",
    "vendi_score",
    "mean_pairwise_cosine",
    "nearest_distance",
    "edm_step",
]

_METRICS = {"ip": 0, "l2": 1}
_F32 = (torch.float32,)
_CAT = (torch.float32, torch.float16)


def _metric(metric: str) -> int:
    if metric not in _METRICS:
        raise ValueError(f"metric: expected one of {sorted(_METRICS)}, got {metric!r}")
    return _METRICS[metric]


def _threads(num_threads: int | None) -> int:
    if num_threads is None:
        return 0
    return check_positive_int(num_threads, "num_threads")


def _catalog(catalog: Any, d: int | None, check_finite: bool) -> torch.Tensor:
    c, _ = as_tensor(catalog, "catalog")
    c = check_matrix(c, "catalog", ndim=2, dtypes=_CAT, shape_doc="(N, d)", dim=d, finite=check_finite)
    if c.shape[0] == 0:
        raise ValueError(f"catalog: is empty, got {describe(c)}; add items before searching")
    return c


def _knn_into(
    q: torch.Tensor, c: torch.Tensor, k: int, metric: int, threads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    B, d = q.shape
    N = c.shape[0]
    scores = torch.empty((B, k), dtype=torch.float32, device=q.device)
    ids = torch.empty((B, k), dtype=torch.int64, device=q.device)
    if B == 0:
        return scores, ids
    C = _backend.lib()
    dtype = 1 if c.dtype == torch.float16 else 0
    args = (q.data_ptr(), q.stride(0), c.data_ptr(), c.stride(0), dtype, metric, B, N, d, k)
    if q.is_cuda:
        _backend.require_cuda("queries")
        C.knn_cuda(*args, scores.data_ptr(), ids.data_ptr(), cuda_stream_ptr(q))
    else:
        C.knn_cpu(*args, scores.data_ptr(), ids.data_ptr(), threads)
    return scores, ids


def knn(
    queries: Any,
    catalog: Any,
    k: int,
    *,
    metric: str = "ip",
    check_finite: bool = True,
    num_threads: int | None = None,
) -> tuple[Any, Any]:
    """Exact top-k search, fused (the (B, N) score matrix is never materialised).

    Args:
        queries: float32 (B, d).
        catalog: float32 or float16 (N, d), N >= 1, same device as ``queries``.
        k: number of results per query, >= 1. ``k > N`` fills slots N..k-1 with the sentinel (id -1).
        metric: ``"ip"`` (inner product, larger is better) or ``"l2"`` (squared L2 distance, smaller
            is better).
        check_finite: reject NaN/inf inputs (one extra pass over the catalog; switch off for catalogs
            already validated, e.g. a :class:`~r4t_fast.Catalog`).
        num_threads: CPU threads (default: OpenMP's default).

    Returns:
        (scores float32 (B, k), ids int64 (B, k)), best first; equal scores by ascending id.
    """
    q, lib = as_tensor(queries, "queries")
    q = check_matrix(q, "queries", ndim=2, dtypes=_F32, shape_doc="(B, d)", finite=check_finite)
    c = _catalog(catalog, q.shape[1], check_finite)
    check_same_device(q, "queries", c, "catalog")
    k = check_positive_int(k, "k")
    s, i = _knn_into(q, c, k, _metric(metric), _threads(num_threads))
    return to_library(s, lib), to_library(i, lib)


def ground(
    cand_scores: Any,
    cand_ids: Any,
    *,
    higher_is_better: bool = True,
    num_threads: int | None = None,
) -> tuple[Any, Any]:
    """Greedy grounding without repeats: each row of a set takes one of its candidates, no item twice
    per set.

    All (row, candidate) pairs of a set are visited best score first (ties: lower row, then lower item
    id); a pair is taken if its row is open and its item unused. Candidates with id -1 are ignored.

    Args:
        cand_scores: float32 (S, L, C); cand_ids: int64 (S, L, C), e.g. from :func:`knn`.

    Returns:
        (ids int64 (S, L), scores float32 (S, L)); a row left without a candidate gets id -1 and score
        -inf (+inf when ``higher_is_better`` is False).
    """
    s, lib = as_tensor(cand_scores, "cand_scores")
    i, _ = as_tensor(cand_ids, "cand_ids")
    if s.dim() != 3 or s.dtype != torch.float32:
        raise ValueError(f"cand_scores: expected float32 (S, L, C), got {describe(s)}")
    if i.dim() != 3 or i.dtype != torch.int64:
        raise ValueError(f"cand_ids: expected int64 (S, L, C), got {describe(i)}")
    if s.shape != i.shape:
        raise ValueError(f"cand_scores and cand_ids: shapes differ, {tuple(s.shape)} vs {tuple(i.shape)}")
    if s.shape[1] == 0 or s.shape[2] == 0:
        raise ValueError(f"cand_scores: L and C must be >= 1, got shape {tuple(s.shape)}")
    check_same_device(s, "cand_scores", i, "cand_ids")
    if bool(torch.isnan(s).any()):
        raise ValueError("cand_scores: contains NaN")
    s, i = s.contiguous(), i.contiguous()
    S, L, C = s.shape
    out_ids = torch.empty((S, L), dtype=torch.int64, device=s.device)
    out_scores = torch.empty((S, L), dtype=torch.float32, device=s.device)
    if S > 0:
        lib_c = _backend.lib()
        args = (s.data_ptr(), i.data_ptr(), S, L, C, bool(higher_is_better))
        if s.is_cuda:
            _backend.require_cuda("cand_scores")
            lib_c.ground_cuda(*args, out_ids.data_ptr(), out_scores.data_ptr(), cuda_stream_ptr(s))
        else:
            lib_c.ground_cpu(*args, out_ids.data_ptr(), out_scores.data_ptr(), _threads(num_threads))
    return to_library(out_ids, lib), to_library(out_scores, lib)


def ground_sets(
    rows: Any,
    catalog: Any,
    *,
    candidates: int | None = None,
    metric: str = "ip",
    check_finite: bool = True,
    num_threads: int | None = None,
) -> tuple[Any, Any]:
    """Ground generated sets to catalog items, no item repeated within a set.

    Each of the B·L rows gets its ``candidates`` nearest items (default L, which guarantees a distinct
    item for every row whenever N >= L), then :func:`ground` assigns greedily by score.

    Args:
        rows: float32 (B, L, d) generated embeddings.
        catalog: float32 or float16 (N, d).

    Returns:
        (ids int64 (B, L), scores float32 (B, L)); rows that cannot get a distinct item (N < L) get the
        sentinel id -1.
    """
    r, lib = as_tensor(rows, "rows")
    r = check_matrix(r, "rows", ndim=3, dtypes=_F32, shape_doc="(B, L, d)", finite=check_finite)
    c = _catalog(catalog, r.shape[2], check_finite)
    check_same_device(r, "rows", c, "catalog")
    B, L, d = r.shape
    if L == 0:
        raise ValueError(f"rows: set length L must be >= 1, got {describe(r)}")
    cand = L if candidates is None else check_positive_int(candidates, "candidates")
    cand = min(cand, c.shape[0])
    m = _metric(metric)
    s, i = _knn_into(r.reshape(B * L, d), c, cand, m, _threads(num_threads))
    ids, scores = ground(
        s.reshape(B, L, cand), i.reshape(B, L, cand), higher_is_better=(m == 0), num_threads=num_threads
    )
    return to_library(ids, lib), to_library(scores, lib)


def set_stats(x: Any, lengths: Any | None = None, *, num_threads: int | None = None) -> tuple[Any, Any]:
    """Per-set diversity statistics with the cosine kernel.

    For each set, rows are L2-normalised, K = X Xᵀ (K_ii = 1) over the n counted rows, and

    * vendi = exp(−Σ λ_i log λ_i), λ the eigenvalues of K / n (in [1, n]; 0 for an empty set);
    * mean_cos = mean of K_ij over i ≠ j (0 when n < 2).

    Args:
        x: float32 (S, L, d).
        lengths: optional int64 (S,): only the first ``lengths[s]`` rows of set s count.

    Returns:
        (vendi float32 (S,), mean_cos float32 (S,)).
    """
    t, lib = as_tensor(x, "x")
    t = check_matrix(t, "x", ndim=3, dtypes=_F32, shape_doc="(S, L, d)")
    S, L, d = t.shape
    if L == 0:
        raise ValueError(f"x: set length L must be >= 1, got {describe(t)}")
    lp = 0
    ln = None
    if lengths is not None:
        ln, _ = as_tensor(lengths, "lengths")
        if ln.shape != (S,) or ln.dtype != torch.int64:
            raise ValueError(f"lengths: expected int64 ({S},), got {describe(ln)}")
        if bool((ln < 0).any()) or bool((ln > L).any()):
            raise ValueError(f"lengths: values must lie in [0, {L}]")
        check_same_device(t, "x", ln, "lengths")
        ln = ln.contiguous()
        lp = ln.data_ptr()
    vendi = torch.empty(S, dtype=torch.float32, device=t.device)
    mean_cos = torch.empty(S, dtype=torch.float32, device=t.device)
    if S > 0:
        C = _backend.lib()
        if t.is_cuda:
            _backend.require_cuda("x")
            C.set_stats_cuda(
                t.data_ptr(), lp, S, L, d, vendi.data_ptr(), mean_cos.data_ptr(), cuda_stream_ptr(t)
            )
        else:
            C.set_stats_cpu(
                t.data_ptr(), lp, S, L, d, vendi.data_ptr(), mean_cos.data_ptr(), _threads(num_threads)
            )
    return to_library(vendi, lib), to_library(mean_cos, lib)


def vendi_score(x: Any, lengths: Any | None = None) -> Any:
    """Vendi score of each (L, d) set with the cosine kernel: float32 (S,). See :func:`set_stats`."""
    return set_stats(x, lengths)[0]


def mean_pairwise_cosine(x: Any, lengths: Any | None = None) -> Any:
    """Mean off-diagonal cosine similarity of each (L, d) set: float32 (S,). See :func:`set_stats`."""
    return set_stats(x, lengths)[1]


def nearest_distance(
    rows: Any, catalog: Any, *, check_finite: bool = True, num_threads: int | None = None
) -> Any:
    """L2 distance from each row to its nearest catalog row: rows (..., d) -> float32 (...)."""
    r, lib = as_tensor(rows, "rows")
    if r.dim() < 1:
        raise ValueError(f"rows: expected float32 (..., d), got {describe(r)}")
    lead = tuple(r.shape[:-1])
    flat = r.reshape(-1, r.shape[-1]) if r.dim() != 2 else r
    flat = check_matrix(flat, "rows", ndim=2, dtypes=_F32, shape_doc="(..., d)", finite=check_finite)
    c = _catalog(catalog, flat.shape[1], check_finite)
    check_same_device(flat, "rows", c, "catalog")
    s, _ = _knn_into(flat, c, 1, 1, _threads(num_threads))
    return to_library(s[:, 0].sqrt().reshape(lead), lib)


def edm_step(
    x: torch.Tensor,
    f_cond: torch.Tensor,
    f_uncond: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    sigma: float,
    c_skip: float,
    c_out: float,
    guidance: float = 0.0,
    h: float,
    noise_scale: float = 0.0,
    out: torch.Tensor | None = None,
    denoised: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One fused EDM sampler step (elementwise; formula in ``csrc/params.h``, reference in
    :func:`r4t_fast.reference.edm_step`): D = c_skip·x + c_out·((1+w)·F_c − w·F_u),
    x' = x + h·(x − D)/σ + noise_scale·z.

    All tensors float32, same shape and device, contiguous. ``out`` may be ``x`` (in place). Returns
    (x', D) where D is written only when ``denoised`` is given (else None).
    """
    named = {"x": x, "f_cond": f_cond, "f_uncond": f_uncond, "noise": noise, "out": out, "denoised": denoised}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32 or t.shape != x.shape or t.device != x.device or not t.is_contiguous():
            raise ValueError(
                f"{name}: expected contiguous float32 {tuple(x.shape)} on {x.device}, got {describe(t)}"
                + ("" if t.is_contiguous() else " (non-contiguous)")
            )
    if not sigma > 0:
        raise ValueError(f"sigma: expected > 0, got {sigma}")
    if guidance != 0.0 and f_uncond is None:
        raise ValueError("f_uncond: required when guidance != 0")
    if noise_scale != 0.0 and noise is None:
        raise ValueError("noise: required when noise_scale != 0")
    if out is None:
        out = torch.empty_like(x)
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    args = (ptr(x), ptr(f_cond), ptr(f_uncond), ptr(noise), ptr(out), ptr(denoised), x.numel())
    scalars = (float(sigma), float(c_skip), float(c_out), float(guidance), float(h), float(noise_scale))
    C = _backend.lib()
    if x.numel() > 0:
        if x.is_cuda:
            _backend.require_cuda("x")
            C.edm_step_cuda(*args, *scalars, cuda_stream_ptr(x))
        else:
            C.edm_step_cpu(*args, *scalars, 0)
    return out, denoised
