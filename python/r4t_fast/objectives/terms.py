"""Set-level objectives of R4T: the OAR terms (groundedness, Vendi diversity, alignment), their composite,
WSCR coverage of a reference set (recall, hit, MRecall, category coverage) and the item-level metrics
every method is compared on (item relevance, the fair budget and its round-robin candidate union).

These are the properties a retrieved set is scored on -- the RL reward (``r4t_fast.fanout.rewards``)
and the evaluation (``r4t_fast.eval.metrics``) both call these functions, so each formula has one home.
Every function here is pure and computes exactly the formula in its docstring. They accept torch
tensors or numpy arrays, one set ``(k, d)`` or a batch of sets ``(batch, k, d)``, compute in float64 and
return the input's library (numpy in -> numpy out, torch in -> torch out on the same device): a 0-d result
for one set, ``(batch,)`` for a batch. They are batched, deterministic and not differentiable (inputs are
detached).

Conventions shared with ``r4t_fast.ops.set_stats`` (see ``csrc/params.h``):

* the cosine kernel normalises rows first; an all-zero row has similarity 0 to every other row and 1 to
  itself (so ``K_ii = 1`` always and ``trace(K / n) = 1``);
* ``lengths`` (``(batch,)`` ints) marks how many leading rows of each padded set count.

Normalisations (the paper states the raw forms; the project's rewards and reports use ``[0, 1]`` forms):

========================  ==========================================  ================================
property                  paper (raw)                                 default here (``normalize=True``)
========================  ==========================================  ================================
groundedness              ``1 - mean_i min_c ||e(q_i) - e(c)||_2``    ``1 - mean_dist / 2`` in [0, 1]
diversity                 ``Vendi(top-1 items)`` in [1, k]            ``Vendi / k`` in [1/k, 1]
alignment                 ``mean_i cos(e(q_i), e(q))`` in [-1, 1]     ``(1 + mean cos) / 2`` in [0, 1]
========================  ==========================================  ================================

For unit-norm embeddings ``||a - b|| <= 2``, so the paper's groundedness lies in ``[-1, 1]`` and the
normalised one is exactly ``(1 + raw) / 2``; both forms are affine in the raw quantities, so they rank
sets identically. ``composite`` weights whatever components it is given (paper: 0.6 / 0.2 / 0.2). The
weights mean different things in the two forms: with the raw forms the Vendi term spans ``[1, k]`` and
outweighs the others, with the ``[0, 1]`` forms all three terms span comparable ranges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from r4t_fast._internal import unit_rows

__all__ = [
    "DEFAULT_WEIGHTS",
    "alignment",
    "catalog_matrix",
    "composite",
    "describe",
    "diversity",
    "groundedness",
    "intra_list_diversity",
    "item_relevance",
    "nearest_distance",
    "to_tensor",
    "vendi_over_runs",
    "vendi_score",
]

ArrayLike = Any  # torch.Tensor | np.ndarray (kept loose so numpy scalars and lists also pass)
T = TypeVar("T")

DEFAULT_WEIGHTS: tuple[float, float, float] = (0.6, 0.2, 0.2)
"""The paper's OAR reward weights (groundedness, diversity, alignment)."""


# ----------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------
def describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"torch.{str(x.dtype).removeprefix('torch.')} {tuple(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"numpy.{x.dtype} {x.shape}"
    return type(x).__name__


def to_tensor(x: ArrayLike, name: str) -> tuple[torch.Tensor, bool]:
    """Return ``(float64 tensor, was_numpy)``; raises a ValueError naming ``name`` on bad input."""
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name}: expected a floating-point array, got {describe(x)}")
        return x.detach().to(torch.float64), False
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: expected a torch tensor or numpy array, got {describe(x)}") from exc
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected a floating-point array, got {describe(arr)}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)), True


def _out(t: torch.Tensor, as_numpy: bool) -> Any:
    return t.cpu().numpy() if as_numpy else t


def _as_sets(x: ArrayLike, name: str) -> tuple[torch.Tensor, bool, bool]:
    """``(k, d)`` or ``(batch, k, d)`` -> ``(batch, k, d)`` float64, was_numpy, was_batched."""
    t, as_np = to_tensor(x, name)
    if t.ndim == 2:
        return t.unsqueeze(0), as_np, False
    if t.ndim == 3:
        return t, as_np, True
    raise ValueError(f"{name}: expected shape (k, dim) or (batch, k, dim), got {describe(x)}")


def _finish(values: torch.Tensor, as_np: bool, batched: bool) -> Any:
    return _out(values if batched else values[0], as_np)


def _lengths_mask(
    lengths: ArrayLike | None, batch: int, k: int, device: torch.device, name: str = "emb"
) -> torch.Tensor:
    """``(batch, k)`` bool mask of the counted rows; validates ``lengths``."""
    if k < 1:
        raise ValueError(f"{name}: expected at least one row per set, got k = 0")
    if lengths is None:
        return torch.ones(batch, k, dtype=torch.bool, device=device)
    lt = torch.as_tensor(np.asarray(lengths) if not isinstance(lengths, torch.Tensor) else lengths)
    lt = lt.to(device=device).reshape(-1)
    if lt.is_floating_point() or lt.numel() != batch:
        raise ValueError(f"lengths: expected {batch} integers (one per set), got {describe(lengths)}")
    if bool(((lt < 1) | (lt > k)).any()):
        raise ValueError(f"lengths: expected values in [1, {k}], got {lt.tolist()}")
    return torch.arange(k, device=device)[None, :] < lt[:, None]


def _cosine_gram(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(batch, k, k)`` cosine kernel with ``K_ii = 1`` on counted rows, zero rows/cols elsewhere."""
    u = unit_rows(x)
    gram = u @ u.transpose(-1, -2)
    eye = torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
    gram = torch.where(eye, torch.ones_like(gram), gram)
    pair = mask[:, :, None] & mask[:, None, :]
    return torch.where(pair, gram, torch.zeros_like(gram))


# ----------------------------------------------------------------------------------------------------
# Vendi and set diversity
# ----------------------------------------------------------------------------------------------------
def _vendi(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    gram = _cosine_gram(x, mask)
    n = mask.sum(-1).to(torch.float64)
    lam = torch.linalg.eigvalsh(gram / n[:, None, None]).clamp_min(0.0)
    return torch.exp(torch.special.entr(lam).sum(-1))


def vendi_score(emb: ArrayLike, *, lengths: ArrayLike | None = None) -> Any:
    """Vendi score of a set with the cosine kernel (Friedman & Dieng, 2023).

    ``VS(X) = exp(-sum_i lam_i log lam_i)``, ``lam`` = eigenvalues of ``K / n``, ``K_ij = cos(x_i, x_j)``
    (``K_ii = 1``), ``0 log 0 = 0``. ``VS`` is in ``[1, n]``: 1 for ``n`` identical rows, ``n`` for
    ``n`` orthogonal rows. Eigenvalues by ``torch.linalg.eigvalsh`` in float64.

    Args:
        emb: ``(n, dim)`` or ``(batch, n, dim)`` embeddings (need not be normalised).
        lengths: optional ``(batch,)``: only the first ``lengths[b]`` rows of set ``b`` count.

    Returns:
        0-d for one set, ``(batch,)`` for a batch; float64 in the input's library.

    >>> import numpy as np
    >>> round(float(vendi_score(np.eye(3))), 6)          # three orthogonal rows
    3.0
    >>> round(float(vendi_score(np.ones((4, 2)))), 6)    # four identical rows
    1.0
    >>> round(float(vendi_score(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))), 4)
    1.8899
    """
    x, as_np, batched = _as_sets(emb, "emb")
    mask = _lengths_mask(lengths, x.shape[0], x.shape[1], x.device)
    return _finish(_vendi(x, mask), as_np, batched)


def diversity(top1_item_emb: ArrayLike, *, normalize: bool = True, lengths: ArrayLike | None = None) -> Any:
    """OAR diversity: Vendi score of the top-1 retrieved item of each subquery.

    ``r_div = VS(e(c_1), ..., e(c_k)) / k`` in ``[1/k, 1]`` (``normalize=True``, the project's form), or the
    paper's raw ``VS`` in ``[1, k]`` (``normalize=False``). With ``lengths``, ``k`` is the set's length.

    Args:
        top1_item_emb: ``(k, dim)`` or ``(batch, k, dim)`` item embeddings, one per subquery/row.
        normalize: divide by ``k`` (default) or return the raw Vendi score.
        lengths: optional ``(batch,)`` counted rows per set.

    >>> import numpy as np
    >>> float(diversity(np.eye(4)))
    1.0
    >>> float(diversity(np.ones((4, 3))))
    0.25
    """
    x, as_np, batched = _as_sets(top1_item_emb, "top1_item_emb")
    mask = _lengths_mask(lengths, x.shape[0], x.shape[1], x.device, "top1_item_emb")
    vs = _vendi(x, mask)
    if normalize:
        vs = vs / mask.sum(-1).to(torch.float64)
    return _finish(vs, as_np, batched)


def intra_list_diversity(emb: ArrayLike, *, lengths: ArrayLike | None = None) -> Any:
    """Intra-list diversity: mean pairwise cosine distance of a set.

    ``ILD = (2 / (n (n - 1))) * sum_{i<j} (1 - cos(x_i, x_j))``, in ``[0, 2]``; defined as 0 when
    ``n < 2``. Equals ``1 - mean_cos`` of ``ops.set_stats`` for ``n >= 2``.

    Args:
        emb: ``(n, dim)`` or ``(batch, n, dim)``.
        lengths: optional ``(batch,)`` counted rows per set.

    >>> import numpy as np
    >>> float(intra_list_diversity(np.eye(3)))
    1.0
    >>> float(intra_list_diversity(np.array([[1.0, 0.0], [-1.0, 0.0]])))
    2.0
    """
    x, as_np, batched = _as_sets(emb, "emb")
    mask = _lengths_mask(lengths, x.shape[0], x.shape[1], x.device)
    gram = _cosine_gram(x, mask)
    n = mask.sum(-1).to(torch.float64)
    pairs = n * (n - 1)
    off_sum = gram.sum((-1, -2)) - n
    ild = torch.where(pairs > 0, 1.0 - off_sum / pairs.clamp_min(1.0), torch.zeros_like(n))
    return _finish(ild, as_np, batched)


def vendi_over_runs(run_embeddings: ArrayLike) -> Any:
    """The paper's WSCR Vendi: diversity across ``N`` independent runs for the same query.

    Each run ``r`` produced ``L`` subquery / generated-row embeddings ``E_r = (e_r1, ..., e_rL)``. It is
    represented by the plain (un-normalised) mean ``m_r = (1/L) sum_l e_rl``; the score is the cosine-kernel
    Vendi of the ``N`` run vectors: ``VS(m_1, ..., m_N)`` in ``[1, N]`` (the paper uses ``N = 5``). The
    kernel normalises each ``m_r``, so only its direction counts; an all-zero mean counts as a zero row.
    The paper reports this number on an unstated scale; this function returns the raw score.

    Args:
        run_embeddings: ``(N, L, dim)`` for one query or ``(batch, N, L, dim)``.

    Returns:
        0-d for one query, ``(batch,)`` for a batch; float64 in the input's library.

    >>> import numpy as np
    >>> runs = np.stack([np.eye(3)[[0, 1]], np.eye(3)[[1, 0]]])   # 2 runs, same rows, other order
    >>> round(float(vendi_over_runs(runs)), 6)
    1.0
    """
    t, as_np = to_tensor(run_embeddings, "run_embeddings")
    if t.ndim == 3:
        batched = False
        t = t.unsqueeze(0)
    elif t.ndim == 4:
        batched = True
    else:
        raise ValueError(
            "run_embeddings: expected shape (runs, L, dim) or (batch, runs, L, dim), "
            f"got {describe(run_embeddings)}"
        )
    if t.shape[1] < 1 or t.shape[2] < 1:
        raise ValueError(f"run_embeddings: expected at least one run and one row, got {describe(t)}")
    means = t.mean(dim=2)
    mask = torch.ones(means.shape[:2], dtype=torch.bool, device=means.device)
    return _finish(_vendi(means, mask), as_np, batched)


# ----------------------------------------------------------------------------------------------------
# OAR reward properties
# ----------------------------------------------------------------------------------------------------
def catalog_matrix(catalog: Any, name: str = "catalog") -> torch.Tensor:
    emb = getattr(catalog, "embeddings", catalog)
    if isinstance(emb, np.ndarray):
        emb = torch.from_numpy(emb)
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.is_floating_point():
        raise ValueError(
            f"{name}: expected a (N, dim) float array or an object with .embeddings, got {describe(emb)}"
        )
    if emb.shape[0] < 1:
        raise ValueError(f"{name}: expected a non-empty catalog, got {describe(emb)}")
    return emb


def _nearest_id_ops(q32: torch.Tensor, cat: torch.Tensor) -> torch.Tensor | None:
    """Nearest catalog row per query with the fused ``ops.knn`` (L2, k = 1); None if not usable here."""
    if cat.dtype not in (torch.float32, torch.float16) or not bool(torch.isfinite(q32).all()):
        return None
    try:
        from r4t_fast.kernels import ops

        _, ids = ops.knn(q32.contiguous(), cat, 1, metric="l2")
    except ImportError:  # kernels not built (or no CUDA kernels for a CUDA tensor): use the torch path
        return None
    return ids[:, 0]


def _nearest_id_torch(q32: torch.Tensor, cat: torch.Tensor, chunk_elems: int) -> torch.Tensor:
    m = q32.shape[0]
    best = torch.full((m,), -math.inf, dtype=torch.float32, device=q32.device)
    best_id = torch.zeros(m, dtype=torch.int64, device=q32.device)
    step = max(1024, chunk_elems // max(m, 1))
    for start in range(0, cat.shape[0], step):
        c = cat[start : start + step].to(torch.float32)
        score = 2.0 * (q32 @ c.T) - (c * c).sum(-1)[None, :]
        val, idx = score.max(dim=1)
        better = val > best
        best = torch.where(better, val, best)
        best_id = torch.where(better, idx + start, best_id)
    return best_id


def _nearest(
    rows: torch.Tensor, catalog: torch.Tensor, chunk_elems: int = 1 << 24, use_ops: bool = True
) -> torch.Tensor:
    """Exact L2 distance of each ``(M, dim)`` float64 row to its nearest catalog row -> ``(M,)`` float64.

    The nearest row is found in float32 -- by the fused ``ops.knn`` kernel when it is built (no ``(M, N)``
    score matrix), else by torch matmuls over catalog chunks (``argmax 2<q,c> - ||c||^2``) -- and the
    distance to it is then recomputed directly in float64, so near-zero distances are not lost to
    cancellation. Only float32 near-ties can pick a different (equally near, to ~1e-7) row.
    """
    cat = catalog.to(device=rows.device)
    if cat.dtype not in (torch.float32, torch.float16, torch.float64):
        cat = cat.to(torch.float32)
    q32 = rows.to(torch.float32)
    best_id = _nearest_id_ops(q32, cat) if use_ops else None
    if best_id is None:
        best_id = _nearest_id_torch(q32, cat, chunk_elems)
    nearest = cat[best_id].to(torch.float64)
    return torch.linalg.vector_norm(rows - nearest, dim=-1)


def nearest_distance(rows: ArrayLike, catalog: Any) -> Any:
    """L2 distance from every row to its nearest catalog row: ``min_c ||x - e(c)||_2``.

    Args:
        rows: ``(..., dim)`` embeddings.
        catalog: ``(N, dim)`` array/tensor, or an object with ``.embeddings`` (e.g. ``r4t_fast.Catalog``).

    Returns:
        ``(...)`` float64 distances in the input's library.

    >>> import numpy as np
    >>> nearest_distance(np.array([[3.0, 4.0], [1.0, 0.0]]), np.zeros((1, 2)))
    array([5., 1.])
    """
    x, as_np = to_tensor(rows, "rows")
    cat = catalog_matrix(catalog)
    if x.ndim < 1 or x.shape[-1] != cat.shape[1]:
        raise ValueError(f"rows: expected (..., {cat.shape[1]}) to match catalog, got {describe(rows)}")
    flat = x.reshape(-1, x.shape[-1])
    return _out(_nearest(flat, cat).reshape(x.shape[:-1]), as_np)


def groundedness(
    subquery_emb: ArrayLike,
    catalog: Any,
    *,
    normalize: bool = True,
    lengths: ArrayLike | None = None,
) -> Any:
    """OAR groundedness: how close each subquery lands to a real catalog item.

    Paper form (``normalize=False``): ``r_ground = 1 - (1/k) sum_i min_c ||e(q_i) - e(c)||_2``.
    Project form (``normalize=True``, default): ``1 - mean_dist / 2``, which for unit-norm embeddings
    (distances in ``[0, 2]``) is in ``[0, 1]`` and equals ``(1 + paper) / 2``. Values are not clipped:
    non-unit inputs can leave the range, which is then visible rather than hidden.

    Args:
        subquery_emb: ``(k, dim)`` or ``(batch, k, dim)`` subquery / generated-row embeddings.
        catalog: ``(N, dim)`` item embeddings, or an object with ``.embeddings``.
        normalize: project form (default) or the paper's raw form.
        lengths: optional ``(batch,)`` counted rows per set.

    >>> import numpy as np
    >>> cat = np.eye(2)
    >>> float(groundedness(np.array([[1.0, 0.0], [0.0, 1.0]]), cat))    # every row is an item
    1.0
    >>> float(groundedness(np.array([[-1.0, 0.0]]), np.array([[1.0, 0.0]]), normalize=False))
    -1.0
    """
    x, as_np, batched = _as_sets(subquery_emb, "subquery_emb")
    cat = catalog_matrix(catalog)
    if x.shape[-1] != cat.shape[1]:
        raise ValueError(
            f"subquery_emb: expected last dim {cat.shape[1]} to match catalog, got {describe(subquery_emb)}"
        )
    mask = _lengths_mask(lengths, x.shape[0], x.shape[1], x.device, "subquery_emb")
    dist = _nearest(x.reshape(-1, x.shape[-1]), cat).reshape(x.shape[:2])
    mean_dist = (dist * mask).sum(-1) / mask.sum(-1).to(torch.float64)
    g = 1.0 - mean_dist / 2.0 if normalize else 1.0 - mean_dist
    return _finish(g, as_np, batched)


def alignment(
    subquery_emb: ArrayLike,
    query_emb: ArrayLike,
    *,
    normalize: bool = True,
    lengths: ArrayLike | None = None,
) -> Any:
    """OAR alignment: how close the subqueries stay to the query.

    Paper form (``normalize=False``): ``r_align = (1/k) sum_i cos(e(q_i), e(q))`` in ``[-1, 1]``.
    Project form (``normalize=True``, default): ``(1 + r_align) / 2`` in ``[0, 1]``. A zero vector has
    cosine 0 with everything.

    Args:
        subquery_emb: ``(k, dim)`` or ``(batch, k, dim)``.
        query_emb: ``(dim,)`` for one set or ``(batch, dim)``.
        normalize: project form (default) or the paper's raw form.
        lengths: optional ``(batch,)`` counted rows per set.

    >>> import numpy as np
    >>> float(alignment(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1.0, 0.0]), normalize=False))
    0.5
    >>> float(alignment(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1.0, 0.0])))
    0.75
    """
    x, as_np, batched = _as_sets(subquery_emb, "subquery_emb")
    q, _ = to_tensor(query_emb, "query_emb")
    q = q.to(x.device)
    expected = (x.shape[-1],) if not batched else (x.shape[0], x.shape[-1])
    if tuple(q.shape) != expected:
        raise ValueError(f"query_emb: expected shape {expected}, got {describe(query_emb)}")
    q = q.reshape(x.shape[0], x.shape[-1])
    mask = _lengths_mask(lengths, x.shape[0], x.shape[1], x.device, "subquery_emb")
    cos = (unit_rows(x) * unit_rows(q)[:, None, :]).sum(-1)
    mean_cos = (cos * mask).sum(-1) / mask.sum(-1).to(torch.float64)
    a = (1.0 + mean_cos) / 2.0 if normalize else mean_cos
    return _finish(a, as_np, batched)


def item_relevance(item_emb: ArrayLike, query_emb: ArrayLike, *, lengths: ArrayLike | None = None) -> Any:
    """Item-level relevance of a retrieved set: ``(1/k) sum_i (1 + cos(e(c_i), e(q))) / 2`` in ``[0, 1]``.

    The mean over the ``k`` returned *items* (not the rows a method retrieved with) of the cosine to the
    query, mapped to ``[0, 1]``: the same formula as the project form of :func:`alignment`, applied to the
    items, so it means the same for every method family (for dense/MMR/DPP the rows are the raw query and
    their row alignment is 1 by construction; their item relevance is not).

    Args:
        item_emb: ``(k, dim)`` or ``(batch, k, dim)`` embeddings of the retrieved catalog items.
        query_emb: ``(dim,)`` for one set or ``(batch, dim)``.
        lengths: optional ``(batch,)`` counted items per set.

    >>> import numpy as np
    >>> float(item_relevance(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1.0, 0.0])))  # cos 1 and 0
    0.75
    >>> float(item_relevance(np.array([[-1.0, 0.0]]), np.array([1.0, 0.0])))
    0.0
    """
    try:
        return alignment(item_emb, query_emb, normalize=True, lengths=lengths)
    except ValueError as exc:
        raise ValueError(str(exc).replace("subquery_emb", "item_emb")) from None


def composite(g: T, d: T, a: T, weights: Sequence[float] = DEFAULT_WEIGHTS) -> T:
    """The OAR reward: ``R = w_g * g + w_d * d + w_a * a`` (paper: ``w = (0.6, 0.2, 0.2)``).

    Works elementwise on floats, numpy arrays and torch tensors. The weights are used as given (not
    renormalised); the paper also tried 4:3:3 and 2:4:4.

    >>> round(composite(1.0, 0.5, 0.5), 12)
    0.8
    >>> composite(1.0, 0.0, 0.0, weights=(0.4, 0.3, 0.3))
    0.4
    """
    if len(weights) != 3:
        raise ValueError(f"weights: expected 3 numbers (groundedness, diversity, alignment), got {weights!r}")
    w = [float(v) for v in weights]
    if not all(math.isfinite(v) for v in w):
        raise ValueError(f"weights: expected finite numbers, got {weights!r}")
    return w[0] * g + w[1] * d + w[2] * a  # type: ignore[operator,return-value]
