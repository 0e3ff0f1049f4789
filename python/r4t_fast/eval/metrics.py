"""``evaluate_sets``: score a batch of retrieved sets on every metric at once, as means and per-query
arrays (for paired bootstrap CIs, ``r4t_fast.eval.stats``).

Every formula it reports lives in ``r4t_fast.objectives`` (shared with the RL rewards); this module
only assembles them. The metrics come in two kinds, and only the first is compared across method
families (see :data:`HEADLINE_METRICS`):

* **item-level** -- computed on the ``k`` items a method returns and on its candidate union, with the
  same code for every method: ``recall_at_fair`` / ``hit_at_fair`` at the fair budget ``K``
  (:func:`~r4t_fast.objectives.fair_budget`, a union of exactly ``K`` distinct candidates read
  round-robin over the rows, :func:`~r4t_fast.objectives.round_robin_union`), ``item_relevance``,
  ``vendi`` and ``ild`` of the ``k`` items, ``category_coverage``; the paper's fixed-quota
  ``recall@K`` / ``hit@K`` (``K / k`` candidates per row, :func:`~r4t_fast.objectives.union_candidates`)
  and ``recall_at_fair_quota`` / ``hit_at_fair_quota`` (the fixed quota at the fair budget) are kept
  as secondary columns;
* **row-based** -- the paper's OAR composite and its terms, scored on the rows a method retrieved
  *with* (subqueries, generated rows; the raw query repeated for dense/MMR/DPP, whose row alignment is
  therefore 1 by construction): ``row_groundedness``, ``row_diversity``, ``row_alignment``,
  ``row_composite``. They compare fan-outs with fan-outs, never a fan-out with a non-fan-out method.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from r4t_fast.eval.stats import ConfidenceInterval, bootstrap_ci
from r4t_fast.objectives import (
    DEFAULT_WEIGHTS,
    alignment,
    catalog_matrix,
    category_coverage,
    composite,
    describe,
    diversity,
    fair_budget,
    groundedness,
    hit_at_k,
    id_list,
    intra_list_diversity,
    item_relevance,
    mrecall_at_k,
    recall_at_k,
    round_robin_union,
    to_tensor,
    union_candidates,
    vendi_over_runs,
    vendi_score,
)

__all__ = [
    "HEADLINE_METRICS",
    "ROW_METRICS",
    "SetMetrics",
    "evaluate_sets",
]

ArrayLike = Any

HEADLINE_METRICS = (
    "recall_at_fair",
    "hit_at_fair",
    "item_relevance",
    "vendi",
    "category_coverage",
    "ild",
)
"""Item-level metrics a report may put side by side for every method family (plus ``fair_budget``)."""

ROW_METRICS = ("row_groundedness", "row_diversity", "row_alignment", "row_composite")
"""Row-based OAR terms: secondary, comparable only between methods that write their own rows."""

_RENAMED = {
    "composite": "row_composite",
    "groundedness": "row_groundedness",
    "diversity": "row_diversity",
    "alignment": "row_alignment",
    "vendi_items": "vendi",
    "item_alignment": "item_relevance",
}
"""Names before issue 10 -> names now (looked up with a DeprecationWarning, never listed)."""


class _MetricDict(dict):
    """A plain dict whose pre-issue-10 keys still resolve (with a DeprecationWarning) for one release."""

    def __missing__(self, key: str) -> Any:
        new = _RENAMED.get(key)
        if new is None or new not in self:
            raise KeyError(key)
        warnings.warn(
            f"metric {key!r} is now {new!r} (issue 10: row-based terms are row_*; item-level relevance is "
            "item_relevance; vendi is always the Vendi of the k items)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self[new]


# ----------------------------------------------------------------------------------------------------
# the whole suite
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SetMetrics:
    """Result of ``evaluate_sets``.

    Attributes:
        means: metric name -> mean over queries (queries with a ``nan`` value left out; ``nan`` when no
            query has a value, e.g. ``category_coverage`` on a dataset without categories).
        per_query: metric name -> ``(queries,)`` float64 values, for (paired) bootstrap CIs.
        fair_budget: ``K`` of ``recall_at_fair`` / ``hit_at_fair`` (``None`` without references).
    """

    means: dict[str, float]
    per_query: dict[str, np.ndarray] = field(repr=False)
    fair_budget: int | None = None

    def ci(self, key: str, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> ConfidenceInterval:
        """Bootstrap CI of ``means[key]`` (queries with a ``nan`` value are left out)."""
        if key not in self.per_query:
            valid = ", ".join(sorted(self.per_query))
            raise ValueError(f"key: unknown metric {key!r}; valid choices: {valid}")
        v = self.per_query[key]
        return bootstrap_ci(v[np.isfinite(v)], n_boot=n_boot, seed=seed, alpha=alpha)


def _pad(seqs: Sequence[Any], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """List of ``(L_q, dim)`` (or a ``(Q, L, dim)`` array) -> padded float64 ``(Q, Lmax, dim)``, lengths."""
    if isinstance(seqs, (np.ndarray, torch.Tensor)):
        t, _ = to_tensor(seqs, name)
        if t.ndim != 3:
            raise ValueError(f"{name}: expected shape (queries, L, dim), got {describe(seqs)}")
        return t, torch.full((t.shape[0],), t.shape[1], dtype=torch.int64)
    parts = [to_tensor(s, f"{name}[{i}]")[0] for i, s in enumerate(seqs)]
    for i, p in enumerate(parts):
        if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] != parts[0].shape[1]:
            raise ValueError(f"{name}[{i}]: expected shape (L, {parts[0].shape[-1]}), got {describe(p)}")
    lengths = torch.tensor([p.shape[0] for p in parts], dtype=torch.int64)
    out = torch.zeros(len(parts), int(lengths.max()), parts[0].shape[1], dtype=torch.float64)
    for i, p in enumerate(parts):
        out[i, : p.shape[0]] = p.cpu()
    return out, lengths


def _budgets(budget_per_row: int | Sequence[int] | None) -> list[int] | None:
    if budget_per_row is None:
        return None
    items = [budget_per_row] if isinstance(budget_per_row, (int, np.integer)) else list(budget_per_row)
    for b in items:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ValueError(f"budget_per_row: expected positive ints, got {budget_per_row!r}")
    return sorted({int(b) for b in items})


def evaluate_sets(
    item_indices: Sequence[Any],
    row_embeddings: Sequence[Any],
    query_embeddings: ArrayLike,
    catalog_embeddings: Any,
    *,
    references: Sequence[Collection[int]] | None = None,
    candidates: Sequence[Any] | None = None,
    budget_per_row: int | Sequence[int] | None = None,
    fair_k: int | None = None,
    item_categories: Sequence[str | None] | None = None,
    run_row_embeddings: Sequence[Any] | None = None,
    mrecall_k: int | None = None,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    normalize: bool = True,
) -> SetMetrics:
    """Every set metric for a batch of queries, as means and per-query arrays (module docstring).

    Args:
        item_indices: per query, the retrieved catalog row indices, ranked (for fan-out: the item of
            each row, as ``ops.ground_sets`` returns them). A ``(Q, k)`` array or a list of 1-D arrays;
            ids ``< 0`` are ignored.
        row_embeddings: per query, the ``(L, dim)`` subquery / generated-row embeddings used (the raw
            query repeated for the no-fan-out baselines). ``(Q, L, dim)`` or a list.
        query_embeddings: ``(Q, dim)``.
        catalog_embeddings: ``(N, dim)`` or an object with ``.embeddings``.
        references: per query, the reference set ``Y`` as catalog row indices (WSCR); enables the
            recall/hit metrics, ``mrecall@k`` and ``category_coverage``.
        candidates: per query, ``(L, C)`` ranked candidate ids per row. They define the fair union (the
            first ``K`` distinct ids read round-robin over the rows) and the fixed-quota unions
            ``union_candidates(candidates, b)`` at ``K = L * b``. Without them the candidate lists are
            the query's items (one column), and the fair union holds only ``k`` items
            (``fair_union_size`` says so).
        budget_per_row: ``b`` (or several) of the fixed-quota Recall@K protocol, ``b <= C`` (default:
            ``C``, all candidates; none without candidates).
        fair_k: the fair budget ``K`` (default :func:`~r4t_fast.objectives.fair_budget` of the catalog
            size and the largest set size).
        item_categories: ``(N,)`` category per catalog row (``None`` = unknown). Without it (or when
            every entry is ``None``) ``category_coverage`` is ``nan`` for every query.
        run_row_embeddings: per query, ``(runs, L, dim)`` row embeddings of independent runs: adds
            ``vendi_runs`` (:func:`~r4t_fast.objectives.vendi_over_runs`, the paper's WSCR Vendi).
        mrecall_k: ``k`` of ``mrecall@k`` (default: the largest set size).
        weights: row composite weights (groundedness, diversity, alignment).
        normalize: ``[0, 1]`` forms of the row terms (default) or the paper's raw forms.

    Returns:
        ``SetMetrics`` with keys ``vendi``, ``item_relevance``, ``ild``, ``row_groundedness``,
        ``row_diversity``, ``row_alignment``, ``row_composite`` always; with references also
        ``recall_at_fair``, ``hit_at_fair``, ``fair_union_size``, ``recall_at_fair_quota``,
        ``hit_at_fair_quota`` (when ``K / L`` candidates per row exist), ``recall@K`` / ``hit@K`` per
        budget, ``mrecall@k`` and ``category_coverage``; ``vendi_runs`` with runs.
    """
    cat = catalog_matrix(catalog_embeddings, "catalog_embeddings")
    n_items = cat.shape[0]
    if isinstance(item_indices, (np.ndarray, torch.Tensor)):
        if item_indices.ndim != 2:
            raise ValueError(f"item_indices: expected shape (queries, k), got {describe(item_indices)}")
    item_lists = [id_list(r, f"item_indices[{i}]") for i, r in enumerate(item_indices)]
    item_lists = [[int(j) for j in r if int(j) >= 0] for r in item_lists]
    q = len(item_lists)
    for i, r in enumerate(item_lists):
        if not r:
            raise ValueError(f"item_indices[{i}]: expected at least one valid (>= 0) item id, got none")
        if max(r) >= n_items:
            raise ValueError(f"item_indices[{i}]: expected ids < {n_items} (catalog size), got {max(r)}")

    rows, row_len = _pad(row_embeddings, "row_embeddings")
    qe, _ = to_tensor(query_embeddings, "query_embeddings")
    if rows.shape[0] != q:
        raise ValueError(f"row_embeddings: expected {q} sets (one per query), got {rows.shape[0]}")
    if qe.shape != (q, rows.shape[-1]):
        raise ValueError(f"query_embeddings: expected shape ({q}, {rows.shape[-1]}), got {describe(qe)}")

    items, item_len = _pad(
        [cat[torch.tensor(r, device=cat.device)].double().cpu() for r in item_lists], "items"
    )
    rows = rows.to(cat.device)  # the nearest-item search runs where the catalog lives
    per: dict[str, np.ndarray] = _MetricDict()
    # item-level
    per["vendi"] = vendi_score(items, lengths=item_len).numpy()
    per["item_relevance"] = item_relevance(items, qe.cpu(), lengths=item_len).numpy()
    per["ild"] = intra_list_diversity(items, lengths=item_len).numpy()
    # row-based (the paper's OAR terms)
    g = groundedness(rows, cat, normalize=normalize, lengths=row_len).cpu().numpy()
    d = diversity(items, normalize=normalize, lengths=item_len).numpy()
    a = alignment(rows, qe.to(rows.device), normalize=normalize, lengths=row_len).cpu().numpy()
    per["row_groundedness"], per["row_diversity"], per["row_alignment"] = g, d, a
    per["row_composite"] = composite(g, d, a, weights)
    if run_row_embeddings is not None:
        if len(run_row_embeddings) != q:
            raise ValueError(f"run_row_embeddings: expected {q} entries, got {len(run_row_embeddings)}")
        per["vendi_runs"] = np.array(
            [
                float(vendi_over_runs(to_tensor(r, f"run_row_embeddings[{i}]")[0]))
                for i, r in enumerate(run_row_embeddings)
            ]
        )

    big_fair: int | None = None
    budgets = _budgets(budget_per_row)
    if references is not None:
        if len(references) != q:
            raise ValueError(f"references: expected {q} sets (one per query), got {len(references)}")
        k_set = max(len(r) for r in item_lists)
        if candidates is not None:
            if len(candidates) != q:
                raise ValueError(f"candidates: expected {q} arrays (one per query), got {len(candidates)}")
            cand = [np.asarray(c.detach().cpu() if isinstance(c, torch.Tensor) else c) for c in candidates]
            for i, c in enumerate(cand):
                if c.ndim != 2:
                    raise ValueError(f"candidates[{i}]: expected shape (L, C), got {describe(c)}")
            if budgets is None:
                budgets = [min(c.shape[1] for c in cand)]
        else:
            if budgets:
                raise ValueError("budget_per_row: only meaningful with candidates, got candidates=None")
            cand = [np.asarray(r, dtype=np.int64)[:, None] for r in item_lists]
            budgets = []
        big_fair = fair_budget(n_items, k_set) if fair_k is None else int(fair_k)
        if big_fair < 1:
            raise ValueError(f"fair_k: expected a positive int, got {fair_k!r}")
        fair_union = [round_robin_union(c, big_fair) for c in cand]
        per["recall_at_fair"] = recall_at_k(fair_union, references)
        per["hit_at_fair"] = hit_at_k(fair_union, references)
        per["fair_union_size"] = np.array([u.size for u in fair_union], dtype=np.float64)
        n_rows = max(c.shape[0] for c in cand)
        b_fair = big_fair // n_rows if big_fair % n_rows == 0 else 0
        if candidates is not None and b_fair >= 1 and all(c.shape[1] >= b_fair for c in cand):
            quota = [union_candidates(c, b_fair) for c in cand]
            per["recall_at_fair_quota"] = recall_at_k(quota, references)
            per["hit_at_fair_quota"] = hit_at_k(quota, references)
        for b in budgets:
            # K = k * b whatever the number of rows: a method with more rows than set items (the query-
            # anchored rows of the diffusion retriever) gets floor(K / L) per row, so keys line up
            big = k_set * b
            per_row = b if n_rows <= k_set else max(1, big // n_rows)
            retrieved = [union_candidates(c, per_row) for c in cand]
            per[f"recall@{big}"] = recall_at_k(retrieved, references)
            per[f"hit@{big}"] = hit_at_k(retrieved, references)
        mk = mrecall_k if mrecall_k is not None else k_set
        per[f"mrecall@{mk}"] = mrecall_at_k(item_lists, references, mk)
        if item_categories is not None and len(item_categories) != n_items:
            raise ValueError(
                f"item_categories: expected {n_items} entries (one per catalog row), "
                f"got {len(item_categories)}"
            )
        has_categories = item_categories is not None and any(c is not None for c in item_categories)
        if has_categories:
            per["category_coverage"] = category_coverage(
                [[item_categories[j] for j in r] for r in item_lists],
                [
                    [item_categories[int(j)] for j in id_list(y, f"references[{i}]")]
                    for i, y in enumerate(references)
                ],
            )
        else:
            per["category_coverage"] = np.full(q, np.nan)
    means: dict[str, float] = _MetricDict()
    for key, v in per.items():
        finite = v[np.isfinite(v)]
        means[key] = float(finite.mean()) if finite.size else float("nan")
    return SetMetrics(means=means, per_query=per, fair_budget=big_fair)
