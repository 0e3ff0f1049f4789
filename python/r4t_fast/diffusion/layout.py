"""The diffusion retriever's ``"ranked"`` candidate layout: one order of distinct candidates, budget-aware.

The ``"rows"`` layout returns each row's own nearest items (the paper's subquery lists; with the query-
anchored rows, the query's ranking interleaved over ``m`` rows). Rows that share items waste a
fixed-quota budget (``union_candidates``: ``K = L * b`` nominal, fewer distinct), and the query's share is
the same at every depth. The ``"ranked"`` layout keeps what the ``"rows"`` layout gives at the fair
budget and spends the rest of the budget on distinct items:

1. the first ``fair_k`` candidates are exactly the ``"rows"`` layout's round-robin union of ``fair_k``
   (:func:`r4t_fast.objectives.round_robin_union`: the fair-budget metrics are unchanged);
2. past it, the query's own ranking takes ``deep_share`` of the candidates and the round-robin union of
   the model rows' lists (read deeper than ``C``, so that overlapping rows still fill the budget) the
   rest, interleaved; ids already taken are skipped;
3. the order is laid out column-major over the rows, so a round-robin union of any ``K`` or a fixed
   quota of ``b`` per row reads its first ``K`` (``L * b``) candidates: every budget gets distinct items,
   as the dense baseline's top ``K`` is.
"""

from __future__ import annotations

import numpy as np

from r4t_fast.objectives import round_robin_union

__all__ = ["CANDIDATE_LAYOUTS", "rank_candidates"]

CANDIDATE_LAYOUTS = ("rows", "ranked")
"""``candidates`` layouts of the diffusion retriever: each row's own list, or one distinct order (above)."""


def _interleave(query: np.ndarray, rows: np.ndarray, share: float) -> np.ndarray:
    """``query`` and ``rows`` merged so that about ``share`` of every prefix comes from ``query``."""
    key_q = (np.arange(query.size) + 1.0) / share if share > 0 else np.full(query.size, np.inf)
    key_r = (np.arange(rows.size) + 1.0) / (1.0 - share) if share < 1 else np.full(rows.size, np.inf)
    both = np.concatenate([query, rows])
    return both[np.argsort(np.concatenate([key_q, key_r]), kind="stable")]  # ties: the query first


def _first_occurrences(seq: np.ndarray) -> np.ndarray:
    _, first = np.unique(seq, return_index=True)
    return seq[np.sort(first)]


def rank_candidates(
    lists: np.ndarray,
    query_ranking: np.ndarray | None,
    row_lists: np.ndarray,
    fair_k: int,
    deep_share: float,
) -> np.ndarray:
    """One query's ``"ranked"`` candidates (module docstring), the same shape as ``lists``.

    Args:
        lists: ``(L, C)`` ids of the ``"rows"`` layout (``-1`` = no item).
        query_ranking: the query's own ranking (``-1`` padded), or None (no anchor: rows only).
        row_lists: ``(F, C')`` the model rows' own lists (those of ``lists`` that are not the query's
            ranking), as deep as wanted (``C' >= C``).
        fair_k: the budget whose candidates stay the ``"rows"`` layout's round-robin union.
        deep_share: in [0, 1], the query's ranking's share past ``fair_k``.

    Returns:
        ``(L, C)`` int64 ids, distinct apart from ``-1``, which pads the end when fewer exist.

    >>> lists = np.array([[0, 2, 4], [1, 0, 5]])      # row 0: the query's ranking, row 1: a model row
    >>> rank_candidates(lists, np.array([0, 2, 4, 6]), lists[1:], fair_k=2, deep_share=0.5)
    array([[0, 2, 5],
           [1, 4, 6]])
    """
    L, C = lists.shape
    total = L * C
    head = round_robin_union(lists, min(fair_k, total))
    tail = round_robin_union(row_lists, total) if row_lists.size else np.empty(0, np.int64)
    if query_ranking is not None:
        q = query_ranking[query_ranking >= 0].astype(np.int64)
        tail = _interleave(q, tail, deep_share)
    seq = _first_occurrences(np.concatenate([head, tail]))[:total]  # head first: it stays whole
    out = np.full(total, -1, dtype=np.int64)
    out[: seq.size] = seq
    return out.reshape(C, L).T.copy()
