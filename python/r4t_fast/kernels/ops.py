"""Public kernels: validate -> dispatch by device -> the compiled core (``r4t_fast._C``).

Inputs may be torch tensors, numpy arrays or (on GPU) cupy arrays; they are viewed without copies where
the layout allows (unit stride along the feature axis; any row stride). Outputs are returned in the
library of the first array argument. CPU arrays run the C++/OpenMP kernels, CUDA tensors the CUDA
kernels on the caller's current stream. The pure-PyTorch twins live in :mod:`r4t_fast.reference`.

Sentinels: when fewer than ``k`` results exist (``k > N``, or more than the rows a filter allows) the
missing slots hold id ``-1`` and score ``-inf`` (metric ``"ip"``) or ``+inf`` (metric ``"l2"``). Ties are
ordered by ascending catalog id. Scores that overflow float32 (finite inputs near 3e38) stay attached to
real items: ``+-inf`` ranks as such and NaN (``inf - inf`` in a dot product) ranks below every other
item, so whenever ``N >= k`` every returned id is a real item.

Filters: ``allowed=`` takes a (N,) bool mask; excluded rows are skipped inside the kernel (before any
arithmetic), so a filtered query still gets its ``k`` best *allowed* items.

Threads: the kernels release the GIL; concurrent calls from several Python threads are safe and give
the same results as sequential calls. Every argument error raises ``ValueError`` (wrong types raise
:class:`~r4t_fast.kernels._arrays.ArgumentTypeError`, also a ``TypeError``) naming the argument.
"""

from __future__ import annotations

from typing import Any

import torch

from r4t_fast.kernels import _backend
from r4t_fast.kernels._arrays import (
    ArgumentTypeError,
    as_tensor,
    check_bool,
    check_mask,
    check_matrix,
    check_positive_int,
    check_real,
    check_same_device,
    cuda_stream_ptr,
    describe,
    memory_range,
    to_library,
)
from r4t_fast.kernels._backend import check_device  # noqa: F401  (ops.check_device: the device check)
from r4t_fast.kernels._rules import (  # the argument rules ops and sample_ops share
    _F32,
    MAX_RESULT_SLOTS,
    MAX_SENTINEL_SLOTS,
    _allowed,
    _catalog,
    _check_k,
    _check_slots,
    _metric,
    _threads,
)
from r4t_fast.kernels.coarse import CoarseCatalog, _coarse, coarse_catalog, coarse_supported
from r4t_fast.kernels.sample_ops import SampledSets, _schedule, sample_sets, sampler_linear  # noqa: F401

__all__ = [
    "MAX_RESULT_SLOTS",
    "MAX_SENTINEL_SLOTS",
    "knn",
    "knn_plan",
    "CoarseCatalog",
    "coarse_catalog",
    "coarse_supported",
    "ground",
    "ground_sets",
    "set_stats",
    "vendi_score",
    "mean_pairwise_cosine",
    "nearest_distance",
    "edm_step",
]


def _knn_into(
    q: torch.Tensor,
    c: torch.Tensor,
    k: int,
    metric: int,
    threads: int,
    allowed: torch.Tensor | None = None,
    coarse: tuple[int, int, float] = (0, 0, 0.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    B, d = q.shape
    N = c.shape[0]
    scores = torch.empty((B, k), dtype=torch.float32, device=q.device)
    ids = torch.empty((B, k), dtype=torch.int64, device=q.device)
    if B == 0:
        return scores, ids
    C = _backend.lib()
    dtype = 1 if c.dtype == torch.float16 else 0
    mask = 0 if allowed is None else allowed.data_ptr()
    args = (q.data_ptr(), q.stride(0), c.data_ptr(), c.stride(0), dtype, metric, B, N, d, k, mask)
    if q.is_cuda:
        _backend.require_cuda("queries")
        dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
        nbytes = C.knn_cuda_workspace_bytes(dtype, metric, B, N, d, k, dev)
        # Scratch from torch's caching allocator on the current stream: reused, never a private cudaMalloc.
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=q.device)
        C.knn_cuda(*args, scores.data_ptr(), ids.data_ptr(), ws.data_ptr(), nbytes, dev, cuda_stream_ptr(q))
    else:
        C.knn_cpu(*args, scores.data_ptr(), ids.data_ptr(), threads, *coarse)
    return scores, ids


def knn(
    queries: Any,
    catalog: Any,
    k: int,
    *,
    metric: str = "ip",
    check_finite: bool = True,
    num_threads: int | None = None,
    allowed: Any | None = None,
    coarse: CoarseCatalog | None = None,
) -> tuple[Any, Any]:
    """Exact top-k search, fused (the (B, N) score matrix is never materialised).

    Args:
        queries: float32 (B, d).
        catalog: float32 or float16 (N, d), N >= 1, same device as ``queries``.
        k: number of results per query, >= 1 (int or numpy integer). ``k > N`` fills slots N..k-1 with
            the sentinel (id -1); at most ``MAX_SENTINEL_SLOTS`` sentinel slots per call.
        metric: ``"ip"`` (inner product, larger is better) or ``"l2"`` (squared L2 distance
            sum((q - c)^2), computed without norm expansion; smaller is better).
        check_finite: reject NaN/inf inputs (one extra pass over the catalog; switch off for catalogs
            already validated, e.g. a :class:`~r4t_fast.Catalog`).
        num_threads: CPU threads (default: OpenMP's default), at most 1024.
        allowed: optional bool (N,) mask, same device as ``catalog``: only rows with ``True`` can be
            returned (a query-time filter, applied inside the kernel). Fewer than ``k`` allowed rows
            leave sentinel slots.
        coarse: optional :func:`coarse_catalog` copy of ``catalog`` (CPU). Inner-product searches of 2 to
            16 queries on a CPU with AVX-512 VNNI (:func:`coarse_supported`) then scan the int8 copy (four
            multiply-adds per instruction and lane, a quarter of the bytes) for each query's ``2 k + 32``
            best rows and re-score those exactly against ``catalog``: the result equals the exact one
            unless a true top-k row falls outside the int8 pass's list (how often, on real rows:
            ``benchmarks/results/knn_coarse_cpu.md``). Ignored where the path does not apply.

    Returns:
        (scores float32 (B, k), ids int64 (B, k)), best first; equal scores by ascending id.
    """
    q, lib = as_tensor(queries, "queries")
    finite = check_bool(check_finite, "check_finite")
    q = check_matrix(q, "queries", ndim=2, dtypes=_F32, shape_doc="(B, d)", finite=finite)
    c = _catalog(catalog, q.shape[1], finite)
    check_same_device(q, "queries", c, "catalog")
    k = _check_k(k, q.shape[0], c.shape[0])
    m = _metric(metric)
    mask = _allowed(allowed, c)
    s, i = _knn_into(q, c, k, m, _threads(num_threads), mask, _coarse(coarse, c))
    return to_library(s, lib), to_library(i, lib)


def knn_plan(
    batch: int,
    n: int,
    dim: int,
    k: int,
    *,
    num_threads: int | None = None,
    allowed: Any | None = None,
    coarse: bool = False,
) -> dict[str, Any]:
    """How the CPU :func:`knn` kernel will run a search of ``batch`` queries over ``n`` rows of ``dim``
    features (``coarse``: with an int8 copy given; inner product): ``{"isa", "threads", "path" ("direct",
    "small", "gemm" or "coarse"), "n_allowed", "keff" (the heap size,
    min(k, allowed rows)), "query_chunk", "tile_rows", "k_block", "prefetch"}`` (k_block < dim:
    K-blocking; prefetch: the direct / small-B paths prefetch rows ahead, for fp32 catalogs over 16 MiB;
    ``R4T_KNN_PREFETCH=0|1`` in the environment forces it)."""
    B = check_positive_int(batch, "batch")
    N = check_positive_int(n, "n")
    d = check_positive_int(dim, "dim")
    k = check_positive_int(k, "k")
    mask = 0
    if allowed is not None:
        t = check_mask(allowed, "allowed", N, torch.empty(0))
        mask = t.data_ptr()
    co = check_bool(coarse, "coarse")
    return dict(_backend.lib().knn_cpu_plan(B, N, d, k, mask, _threads(num_threads), co))


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
        cand_scores: float32 (S, L, C), no NaN; cand_ids: int64 (S, L, C), e.g. from :func:`knn`.

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
    hib = check_bool(higher_is_better, "higher_is_better")
    ids, scores = _ground_into(s.contiguous(), i.contiguous(), hib, _threads(num_threads))
    return to_library(ids, lib), to_library(scores, lib)


def _ground_into(
    s: torch.Tensor, i: torch.Tensor, higher_is_better: bool, threads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    S, L, C = s.shape
    out_ids = torch.empty((S, L), dtype=torch.int64, device=s.device)
    out_scores = torch.empty((S, L), dtype=torch.float32, device=s.device)
    if S > 0:
        lib_c = _backend.lib()
        outs = (out_ids.data_ptr(), out_scores.data_ptr())
        args = (s.data_ptr(), i.data_ptr(), S, L, C, higher_is_better, *outs)
        if s.is_cuda:
            _backend.require_cuda("cand_scores")
            dev = s.device.index if s.device.index is not None else torch.cuda.current_device()
            nbytes = lib_c.ground_cuda_workspace_bytes(S, L, C, dev)
            ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=s.device)
            lib_c.ground_cuda(*args, ws.data_ptr(), nbytes, dev, cuda_stream_ptr(s))
        else:
            lib_c.ground_cpu(*args, threads)
    return out_ids, out_scores


def ground_sets(
    rows: Any,
    catalog: Any,
    *,
    candidates: int | None = None,
    metric: str = "ip",
    check_finite: bool = True,
    num_threads: int | None = None,
    allowed: Any | None = None,
) -> tuple[Any, Any]:
    """Ground generated sets to catalog items, no item repeated within a set.

    Each of the B·L rows gets its ``candidates`` nearest items (default L, which guarantees a distinct
    item for every row whenever at least L items are eligible), then :func:`ground` assigns greedily by
    score.

    Args:
        rows: float32 (B, L, d) generated embeddings.
        catalog: float32 or float16 (N, d).
        allowed: optional bool (N,) mask (a query-time filter, honoured inside the kernel): only allowed
            items are candidates, so with at least L allowed items every row of a set gets a distinct
            allowed item.

    Returns:
        (ids int64 (B, L), scores float32 (B, L)); rows that cannot get a distinct item (fewer than L
        eligible items) get the sentinel id -1 and score -inf (+inf for ``"l2"``).
    """
    r, lib = as_tensor(rows, "rows")
    finite = check_bool(check_finite, "check_finite")
    r = check_matrix(r, "rows", ndim=3, dtypes=_F32, shape_doc="(B, L, d)", finite=finite)
    c = _catalog(catalog, r.shape[2], finite)
    check_same_device(r, "rows", c, "catalog")
    B, L, d = r.shape
    if L == 0:
        raise ValueError(f"rows: set length L must be >= 1, got {describe(r)}")
    cand = L if candidates is None else check_positive_int(candidates, "candidates")
    cand = min(cand, c.shape[0])
    _check_slots(B * L, cand, "candidates")
    m = _metric(metric)
    mask = _allowed(allowed, c)
    threads = _threads(num_threads)
    s, i = _knn_into(r.reshape(B * L, d), c, cand, m, threads, mask)
    # No NaN check here: NaN scores only come from float32 overflow and rank last in both kernels.
    ids, scores = _ground_into(s.reshape(B, L, cand), i.reshape(B, L, cand), m == 0, threads)
    return to_library(ids, lib), to_library(scores, lib)


def set_stats(x: Any, lengths: Any | None = None, *, num_threads: int | None = None) -> tuple[Any, Any]:
    """Per-set diversity statistics with the cosine kernel.

    For each set, rows are L2-normalised, K = X Xᵀ (K_ii = 1) over the n counted rows, and

    * vendi = exp(−Σ λ_i log λ_i), λ the eigenvalues of K / n (in [1, n]; 0 for an empty set);
      an all-zero row among the counted ones has no direction and is refused (ValueError naming it);
    * mean_cos = mean of K_ij over i ≠ j (0 when n < 2).

    Args:
        x: float32 (S, L, d).
        lengths: optional int64 (S,): only the first ``lengths[s]`` rows of set s count.

    Returns:
        (vendi float32 (S,), mean_cos float32 (S,)).
    """
    t, lib = as_tensor(x, "x")
    t = check_matrix(t, "x", ndim=3, dtypes=_F32, shape_doc="(S, L, d)")
    threads = _threads(num_threads)
    S, L, d = t.shape
    if L == 0:
        raise ValueError(f"x: set length L must be >= 1, got {describe(t)}")
    lp = 0
    ln = None
    if lengths is not None:
        ln, _ = as_tensor(lengths, "lengths")
        if tuple(ln.shape) != (S,) or ln.dtype != torch.int64:
            raise ValueError(f"lengths: expected int64 ({S},), got {describe(ln)}")
        if bool((ln < 0).any()) or bool((ln > L).any()):
            raise ValueError(f"lengths: values must lie in [0, {L}]")
        check_same_device(t, "x", ln, "lengths")
        ln = ln.contiguous()
        lp = ln.data_ptr()
    zero = t.abs().amax(dim=2) == 0  # (S, L): a zero row has no direction, so no defined similarity
    if ln is not None:
        zero &= torch.arange(L, device=t.device)[None, :] < ln[:, None]
    if bool(zero.any()):
        s, j = (int(v) for v in zero.nonzero()[0])
        raise ValueError(
            f"x: row {j} of set {s} is all zeros (no direction: its cosine and the set's Vendi score are "
            f"undefined; {int(zero.sum())} zero row(s) counted in all); drop them or shorten lengths"
        )
    vendi = torch.empty(S, dtype=torch.float32, device=t.device)
    mean_cos = torch.empty(S, dtype=torch.float32, device=t.device)
    if S > 0:
        C = _backend.lib()
        if t.is_cuda:
            _backend.require_cuda("x")
            dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
            C.set_stats_cuda(
                t.data_ptr(), lp, S, L, d, vendi.data_ptr(), mean_cos.data_ptr(), dev, cuda_stream_ptr(t)
            )
        else:
            C.set_stats_cpu(t.data_ptr(), lp, S, L, d, vendi.data_ptr(), mean_cos.data_ptr(), threads)
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
    finite = check_bool(check_finite, "check_finite")
    flat = check_matrix(flat, "rows", ndim=2, dtypes=_F32, shape_doc="(..., d)", finite=finite)
    c = _catalog(catalog, flat.shape[1], finite)
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
    :func:`r4t_fast.kernels.reference.edm_step`): D = c_skip·x + c_out·((1+w)·F_c − w·F_u),
    x' = x + h·(x − D)/σ + noise_scale·z.

    All tensors float32, same shape and device, contiguous. Scalars are finite real numbers (int, float
    or numpy numbers; not bool or str), ``sigma`` > 0. ``out`` may be ``x`` (in place) and each output
    may be the very same memory as an input, but outputs must not *partially* overlap an input, and
    ``denoised`` must not overlap ``out`` (both would be written). Returns (x', D) where D is written only
    when ``denoised`` is given (else None).
    """
    named = {"x": x, "f_cond": f_cond, "f_uncond": f_uncond, "noise": noise, "out": out, "denoised": denoised}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: expected a CPU or CUDA tensor, got one on {t.device}")
        if t.dtype != torch.float32 or t.shape != x.shape or t.device != x.device or not t.is_contiguous():
            raise ValueError(
                f"{name}: expected contiguous float32 {tuple(x.shape)} on {x.device}, got {describe(t)}"
                + ("" if t.is_contiguous() else " (non-contiguous)")
            )
    sigma_f = check_real(sigma, "sigma", positive=True)
    scalars = (
        sigma_f,
        check_real(c_skip, "c_skip"),
        check_real(c_out, "c_out"),
        check_real(guidance, "guidance"),
        check_real(h, "h"),
        check_real(noise_scale, "noise_scale"),
    )
    if scalars[3] != 0.0 and f_uncond is None:
        raise ValueError(f"f_uncond: required when guidance != 0, got guidance={guidance!r}")
    if scalars[5] != 0.0 and noise is None:
        raise ValueError(f"noise: required when noise_scale != 0, got noise_scale={noise_scale!r}")
    if x.numel() > 0:
        _check_step_aliasing(named)
    if out is None:
        out = torch.empty_like(x)
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    args = (ptr(x), ptr(f_cond), ptr(f_uncond), ptr(noise), ptr(out), ptr(denoised), x.numel())
    C = _backend.lib()
    if x.numel() > 0:
        if x.is_cuda:
            _backend.require_cuda("x")
            dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
            C.edm_step_cuda(*args, *scalars, dev, cuda_stream_ptr(x))
        else:
            C.edm_step_cpu(*args, *scalars, 0)
    return out, denoised


def _check_step_aliasing(named: dict[str, torch.Tensor | None]) -> None:
    """Outputs may coincide exactly with an input (each element is read before it is written) but not
    overlap one partially, and the two outputs must not overlap at all."""
    ranges = {n: memory_range(t) for n, t in named.items() if t is not None}

    def overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return a[0] < b[1] and b[0] < a[1]

    if "out" in ranges and "denoised" in ranges and overlap(ranges["out"], ranges["denoised"]):
        raise ValueError("denoised: must not share memory with out (both are written); pass separate tensors")
    for o in ("out", "denoised"):
        if o not in ranges:
            continue
        for i in ("x", "f_cond", "f_uncond", "noise"):
            if i in ranges and ranges[o] != ranges[i] and overlap(ranges[o], ranges[i]):
                raise ValueError(
                    f"{o}: partially overlaps {i} (the results would depend on the write order); pass "
                    f"{i} itself or a separate tensor"
                )


# ------------------------------------------------------------------------------------ fused set sampler
# ops.sample_sets lives in its own module (kernels/sample_ops.py) and is re-exported here.

__all__ += ["sample_sets", "SampledSets"]
