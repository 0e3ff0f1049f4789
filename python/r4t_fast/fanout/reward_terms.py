"""The pure reward terms of the fan-out LM, batched over a group: the dense retriever's candidates, the
OAR composite, WSCR coverage and its smooth form (formulas in :mod:`r4t_fast.fanout.rewards`, which
wraps them as a TRL reward function; the set properties themselves live in :mod:`r4t_fast.objectives`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from r4t_fast import objectives
from r4t_fast._internal import check_choice, check_positive_int

__all__ = [
    "OAR_MISSING_CHOICES",
    "OARTerms",
    "oar_reward",
    "retrieve_candidates",
    "soft_wscr_coverage",
    "wscr_coverage",
]

OAR_MISSING_CHOICES = ("zero", "ignore")
"""``missing`` of :func:`oar_reward`, which sees embeddings only (the ``"query"`` fill happens on text)."""


# ----------------------------------------------------------------------------------------------------
# input helpers
# ----------------------------------------------------------------------------------------------------
def _catalog_tensor(catalog: Any) -> torch.Tensor:
    """``(N, d)`` float32/float16 CPU-or-device tensor of a Catalog, tensor or array; validated."""
    emb = getattr(catalog, "embeddings", catalog)
    if isinstance(emb, np.ndarray):
        emb = torch.from_numpy(np.ascontiguousarray(emb))
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.is_floating_point():
        got = f"{type(emb).__name__} {tuple(getattr(emb, 'shape', ()))}"
        raise ValueError(f"catalog: expected a (N, dim) float array or an object with .embeddings, got {got}")
    if emb.shape[0] < 1:
        raise ValueError(f"catalog: expected at least one item, got shape {tuple(emb.shape)}")
    if emb.dtype not in (torch.float32, torch.float16):
        emb = emb.to(torch.float32)
    if not bool(torch.isfinite(emb).all()):
        raise ValueError("catalog: embeddings contain NaN or inf")
    return emb.contiguous()


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    objectives.composite(0.0, 0.0, 0.0, weights)  # validates: 3 finite numbers, error names `weights`
    return (float(weights[0]), float(weights[1]), float(weights[2]))


# ----------------------------------------------------------------------------------------------------
# pure reward functions
# ----------------------------------------------------------------------------------------------------
def retrieve_candidates(rows: Any, catalog: Any, budget: int = 1) -> np.ndarray:
    """The dense retriever: top-``budget`` catalog rows of every subquery by inner product, one kernel call.

    ``ids[..., j]`` = the ``j``-th best ``c`` by ``<e(q), e(c)>`` (cosine for unit-norm embeddings), ties
    by ascending catalog row, ``-1`` past the catalog size (see :func:`r4t_fast.ops.knn`).

    Args:
        rows: ``(..., d)`` subquery embeddings (any leading shape; flattened into one batch).
        catalog: ``(N, d)`` embeddings or an object with ``.embeddings`` (e.g. ``r4t_fast.Catalog``).
        budget: items per subquery, ``b >= 1``.

    Returns:
        int64 ``(..., budget)`` numpy array.

    >>> import numpy as np
    >>> rows = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    >>> retrieve_candidates(rows, np.eye(2, dtype=np.float32)).tolist()
    [[1], [0]]
    """
    from r4t_fast.kernels import ops

    budget = check_positive_int(budget, "budget")
    cat = _catalog_tensor(catalog)
    r = torch.as_tensor(np.asarray(rows, dtype=np.float32)) if not isinstance(rows, torch.Tensor) else rows
    r = r.detach().to(device=cat.device, dtype=torch.float32)
    if r.ndim < 1 or r.shape[-1] != cat.shape[1]:
        raise ValueError(f"rows: expected (..., {cat.shape[1]}) to match the catalog, got {tuple(r.shape)}")
    lead = tuple(r.shape[:-1])
    flat = r.reshape(-1, r.shape[-1]).contiguous()
    if flat.shape[0] == 0:
        return np.zeros((*lead, budget), dtype=np.int64)
    _, ids = ops.knn(flat, cat, budget, metric="ip", check_finite=True)
    return ids.cpu().numpy().astype(np.int64).reshape(*lead, budget)


@dataclass(frozen=True)
class OARTerms:
    """OAR reward terms of a batch of fan-outs (each ``(B,)`` float64).

    Attributes:
        reward: ``R = scale * composite(g, d, a)``, ``scale = n / k`` (``missing="zero"``) or 1.
        groundedness, diversity, alignment: the ``[0, 1]`` terms over the ``n`` written subqueries.
        scale: the completeness factor applied to the composite.
    """

    reward: np.ndarray
    groundedness: np.ndarray
    diversity: np.ndarray
    alignment: np.ndarray
    scale: np.ndarray


def oar_reward(
    subquery_emb: Any,
    query_emb: Any,
    catalog: Any,
    *,
    lengths: Any | None = None,
    k: int | None = None,
    weights: Sequence[float] = objectives.DEFAULT_WEIGHTS,
    missing: str = "zero",
    top1_ids: Any | None = None,
) -> OARTerms:
    """OAR composite reward of ``B`` fan-outs: ``R = (n/k) * (lg*r_ground + ld*r_div + la*r_align)``.

    ``r_ground``, ``r_div``, ``r_align`` are :func:`r4t_fast.objectives.groundedness`,
    :func:`~r4t_fast.objectives.diversity` (of the top-1 retrieved item of each subquery) and
    :func:`~r4t_fast.objectives.alignment` in their ``[0, 1]`` forms, combined by
    :func:`~r4t_fast.objectives.composite`; see the module docstring for the formulas.

    Args:
        subquery_emb: ``(B, L, d)`` subquery embeddings (padded; the first ``lengths[b]`` rows count).
        query_emb: ``(B, d)`` query embeddings.
        catalog: ``(N, d)`` item embeddings or an object with ``.embeddings``.
        lengths: ``(B,)`` written subqueries ``n`` per fan-out, ``1 <= n <= L`` (default ``L``).
        k: subqueries asked for (default ``L``); ``n > k`` is an error.
        weights: ``(lg, ld, la)``, default the paper's ``(0.6, 0.2, 0.2)``.
        missing: ``"zero"`` (default, scale ``n / k``) or ``"ignore"`` (scale 1).
        top1_ids: optional ``(B, L)`` top-1 catalog rows already retrieved (else one
            :func:`retrieve_candidates` call).

    >>> import numpy as np
    >>> cat = np.eye(3, dtype=np.float32)               # three orthogonal items
    >>> rows = np.eye(3, dtype=np.float32)[None, :2]     # two subqueries, each exactly an item
    >>> t = oar_reward(rows, np.array([[1.0, 1.0, 0.0]]), cat, k=2)
    >>> float(t.groundedness[0]), float(t.diversity[0]), round(float(t.alignment[0]), 4)
    (1.0, 1.0, 0.8536)
    >>> round(float(t.reward[0]), 4)                     # 0.6*1 + 0.2*1 + 0.2*0.8536
    0.9707
    >>> round(float(oar_reward(rows, np.array([[1.0, 1.0, 0.0]]), cat, k=4).reward[0]), 4)   # 2 of 4
    0.4854
    """
    weights = _check_weights(weights)
    missing = check_choice(missing, OAR_MISSING_CHOICES, "missing")
    if isinstance(subquery_emb, torch.Tensor):
        subquery_emb = subquery_emb.detach().cpu().to(torch.float64).numpy()
    x = np.asarray(subquery_emb, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] < 1:
        raise ValueError(f"subquery_emb: expected shape (B, L, d) with L >= 1, got {x.shape}")
    b, width, _ = x.shape
    n = np.full(b, width, np.int64) if lengths is None else np.asarray(lengths, np.int64).reshape(-1)
    if n.shape != (b,) or (n < 1).any() or (n > width).any():
        raise ValueError(f"lengths: expected {b} ints in [1, {width}], got {np.asarray(lengths).tolist()}")
    k = width if k is None else check_positive_int(k, "k")
    if (n > k).any():
        raise ValueError(f"lengths: expected at most k = {k} subqueries per fan-out, got {int(n.max())}")
    cat = _catalog_tensor(catalog)
    if top1_ids is None:
        top1 = retrieve_candidates(x.astype(np.float32), cat, 1)[..., 0]
    else:
        top1 = np.asarray(top1_ids, dtype=np.int64)
        if top1.shape != (b, width):
            raise ValueError(f"top1_ids: expected shape ({b}, {width}), got {top1.shape}")
    valid = np.arange(width)[None, :] < n[:, None]
    safe = np.where(valid & (top1 >= 0), top1, 0)
    items = cat[torch.from_numpy(safe.reshape(-1)).to(cat.device)].to(torch.float64).cpu().numpy()
    items = items.reshape(b, width, -1)
    g = objectives.groundedness(x, cat, lengths=n)
    d = objectives.diversity(items, lengths=n)
    a = objectives.alignment(x, np.asarray(query_emb, dtype=np.float64), lengths=n)
    scale = n / k if missing == "zero" else np.ones(b)
    r = scale * objectives.composite(g, d, a, weights)
    return OARTerms(
        reward=np.asarray(r, dtype=np.float64),
        groundedness=np.asarray(g, dtype=np.float64),
        diversity=np.asarray(d, dtype=np.float64),
        alignment=np.asarray(a, dtype=np.float64),
        scale=np.asarray(scale, dtype=np.float64),
    )


def wscr_coverage(candidates: Sequence[Any], references: Sequence[Any]) -> np.ndarray:
    """WSCR reward ``R = |Y ∩ R(Q)| / |Y|`` per fan-out, ``R(Q)`` = union of every subquery's candidates.

    Args:
        candidates: per fan-out, an ``(n, b)`` int array: the top-``b`` catalog rows of each of its ``n``
            written subqueries (``-1`` entries are ignored; ``n = 0`` rows retrieve nothing).
        references: per fan-out, the reference set ``Y`` as catalog rows (non-empty).

    Returns:
        ``(B,)`` float64 (:func:`r4t_fast.objectives.recall_at_k` over
        :func:`r4t_fast.objectives.union_candidates`).

    >>> import numpy as np
    >>> wscr_coverage([np.array([[1, 2], [3, 1]]), np.zeros((0, 2), np.int64)], [{1, 3, 7, 9}, {1}])
    array([0.5, 0. ])
    """
    if len(candidates) != len(references):
        raise ValueError(
            f"references: expected one reference set per fan-out ({len(candidates)}), got {len(references)}"
        )
    retrieved = []
    for i, c in enumerate(candidates):
        arr = np.asarray(c)
        if arr.ndim != 2 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"candidates[{i}]: expected integer ids of shape (n, b), got {arr.shape}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            retrieved.append(np.zeros(0, dtype=np.int64))
        else:
            retrieved.append(objectives.union_candidates(arr.astype(np.int64), arr.shape[1]))
    refs = [[int(j) for j in y] for y in references]
    return objectives.recall_at_k(retrieved, refs)


def soft_wscr_coverage(
    rows: Any,
    candidates: Any,
    catalog: Any,
    references: Sequence[Any],
    *,
    lengths: Any | None = None,
    tau: float = objectives.SOFT_COVERAGE_TAU,
) -> np.ndarray:
    """Smooth WSCR reward of ``B`` fan-outs (:func:`r4t_fast.objectives.soft_coverage`).

    ``R = (1/|Y|) sum_j max_i sigmoid((<e(q_i), e(y_j)> - t_i) / tau)`` with ``t_i`` the score of row
    ``i``'s last (``b``-th) retrieved item, i.e. each reference item's best soft rank against the per-row
    budget ``b``: inside some row's budget it counts more than 1/2, outside less, never exactly 0.

    Args:
        rows: ``(B, L, d)`` row embeddings (the first ``lengths[b]`` rows count).
        candidates: ``(B, L, b)`` the rows' top-``b`` catalog rows (:func:`retrieve_candidates`; ``-1``
            past the catalog size).
        catalog: ``(N, d)`` item embeddings or an object with ``.embeddings``.
        references: per fan-out, the reference set as catalog rows (non-empty).
        lengths: ``(B,)`` rows that count, ``1 <= n <= L`` (default ``L``).
        tau: the sigmoid's temperature, in cosine units.

    >>> import numpy as np
    >>> cat = np.eye(3, dtype=np.float32)
    >>> rows = cat[None, :2]                                  # rows = items 0 and 1
    >>> cand = retrieve_candidates(rows, cat, 1)              # each row's budget: its own item
    >>> r = soft_wscr_coverage(rows, cand, cat, [[0, 2]], tau=0.01)
    >>> round(float(r[0]), 3)    # item 0 on row 0's boundary (1/2), item 2 far outside (~0)
    0.25
    """
    cat = _catalog_tensor(catalog)
    x = np.asarray(rows.detach().cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.float64)
    cand = np.asarray(candidates, dtype=np.int64)
    if x.ndim != 3 or x.shape[2] != cat.shape[1]:
        raise ValueError(f"rows: expected (B, L, {cat.shape[1]}), got {x.shape}")
    b, width, _ = x.shape
    if cand.ndim != 3 or cand.shape[:2] != (b, width) or cand.shape[2] < 1:
        raise ValueError(f"candidates: expected shape ({b}, {width}, budget), got {cand.shape}")
    if len(references) != b:
        raise ValueError(f"references: expected {b} reference sets, got {len(references)}")
    n = np.full(b, width, np.int64) if lengths is None else np.asarray(lengths, np.int64).reshape(-1)
    if n.shape != (b,) or (n < 1).any() or (n > width).any():
        raise ValueError(f"lengths: expected {b} ints in [1, {width}], got {np.asarray(lengths).tolist()}")
    emb = cat.to(torch.float64).cpu().numpy()
    scores, bounds = [], []
    for i in range(b):
        ref = np.asarray([int(j) for j in references[i]], dtype=np.int64)
        if ref.size == 0 or (ref < 0).any() or (ref >= emb.shape[0]).any():
            raise ValueError(
                f"references[{i}]: expected a non-empty set of catalog rows in [0, {emb.shape[0]})"
            )
        r = x[i, : n[i]]
        scores.append(r @ emb[ref].T)
        c = cand[i, : n[i]]
        last = c[np.arange(c.shape[0]), (c >= 0).sum(axis=1) - 1]  # the b-th item (or the last valid one)
        bounds.append(np.einsum("ld,ld->l", r, emb[last]))
    return objectives.soft_coverage(scores, bounds, tau)
