"""The one missing-row rule: how a fan-out with fewer than ``k`` usable subqueries becomes ``k`` rows.

A completion that wrote ``n < k`` usable subqueries (short, malformed, cut off, repeated) keeps its
``n`` subqueries in order and gets the **raw query text** (whitespace-normalised) for each of the
``k - n`` missing rows; a completion with none is the raw query ``k`` times (the method then degrades
to dense retrieval of the query). RL (:class:`r4t_fast.fanout.rewards.RewardFunction` with
``missing="query"``), synthesis (:mod:`r4t_fast.train.synthesis`) and evaluation
(:mod:`r4t_fast.eval.llm_baselines`) all build their rows with :func:`fill_missing_rows`, so a policy
is trained, distilled and scored on the same rows.

Why the raw query: it is the only row that is certainly on topic, and it is what the no-fan-out
baseline retrieves with. Padding with it costs diversity (repeated rows share their top items) and buys
alignment, so neither a short list nor off-topic filler pays.
"""

from __future__ import annotations

from collections.abc import Sequence

from r4t_fast._internal import check_positive_int

__all__ = ["MISSING_ROW_RULE", "fill_missing_rows"]

MISSING_ROW_RULE = "missing rows are the raw query text (whitespace-normalised), after the written subqueries"
"""The rule in words, for records and configs."""


def fill_missing_rows(subqueries: Sequence[str], query: str, k: int) -> list[str]:
    """Exactly ``k`` rows: the first ``k`` subqueries, then the raw query for every missing row.

    Args:
        subqueries: the usable subqueries of one completion, in order (may be empty).
        query: the raw query text.
        k: rows wanted (subqueries asked for), ``k >= 1``.

    Returns:
        ``k`` strings; rows ``n..k-1`` are ``" ".join(query.split())``.

    >>> fill_missing_rows(["red scarf"], "  winter   walk ", 3)
    ['red scarf', 'winter walk', 'winter walk']
    >>> fill_missing_rows([], "beach", 2)
    ['beach', 'beach']
    >>> fill_missing_rows(["a", "b", "c"], "q", 2)
    ['a', 'b']
    """
    k = check_positive_int(k, "k")
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"query: expected a non-empty string, got {query!r}")
    if isinstance(subqueries, str):
        raise ValueError("subqueries: expected a sequence of strings, got one string")
    rows = [str(s) for s in list(subqueries)[:k]]
    return rows + [" ".join(query.split())] * (k - len(rows))
