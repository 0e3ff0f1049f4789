"""Copies of the title: subqueries that repeat the request instead of adding content (issue 19).

A subquery ``q`` of a fan-out for the title ``t`` is a **copy** when either

* its normalised text contains the normalised title as whole words (:func:`normalise_text`: case
  folded, every run of characters other than letters and digits one space), e.g. ``"black pencil skirt
  with"`` for the title ``"Black Pencil Skirt"``; or
* its embedding is nearly the title's: ``cos(e(q), e(t)) >= COPY_COSINE`` (0.95) with the frozen encoder
  of the retriever (unit rows: the inner product).

``copy_rate`` is the share of the usable (written) subqueries that are copies: the fill rows of the
missing-row rule (the raw query) are not written subqueries and are not counted. The RL step logs
(:class:`r4t_fast.fanout.rewards.RewardBatch`) and the LLM methods' ``method_stats``
(:class:`r4t_fast.eval.llm_baselines.FanOutStats`) report it beside ``usable_subqueries``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["COPY_COSINE", "copy_mask", "normalise_text", "title_key"]

COPY_COSINE = 0.95
"""A subquery whose embedding has at least this cosine with the title's counts as a copy."""

_NON_WORD = re.compile(r"[^\w]+|_+")


def normalise_text(text: str) -> str:
    """Case-folded words of ``text`` joined by single spaces (punctuation and underscores are breaks).

    >>> normalise_text("  Black PENCIL-skirt, with!")
    'black pencil skirt with'
    """
    if not isinstance(text, str):
        raise ValueError(f"text: expected a string, got {type(text).__name__}")
    return " ".join(_NON_WORD.sub(" ", text.casefold()).split())


def title_key(title: str) -> str:
    """The normalised title a subquery must not contain (:func:`normalise_text`)."""
    return normalise_text(title)


def copy_mask(
    subqueries: Sequence[str],
    title: str,
    subquery_emb: Any | None = None,
    title_emb: Any | None = None,
    threshold: float = COPY_COSINE,
) -> np.ndarray:
    """Which subqueries of one fan-out copy its title (module docstring): ``(n,)`` bool.

    Args:
        subqueries: the ``n`` written subqueries.
        title: the request (the query text the policy was given).
        subquery_emb: optional ``(n, d)`` unit embeddings of the subqueries (with ``title_emb``: the
            cosine rule; without, only the text rule).
        title_emb: optional ``(d,)`` unit embedding of the title.
        threshold: the cosine at or above which a subquery is a copy.

    >>> copy_mask(["black pencil skirt with", "red pencils", "pencil skirt"], "Black pencil skirt").tolist()
    [True, False, False]
    >>> e = np.array([[1.0, 0.0], [0.6, 0.8]])
    >>> copy_mask(["a", "b"], "zz", e, np.array([1.0, 0.0])).tolist()
    [True, False]
    """
    if isinstance(subqueries, str):
        raise ValueError("subqueries: expected a sequence of strings, got a single str")
    key = title_key(title)
    n = len(subqueries)
    out = np.zeros(n, dtype=bool)
    if key:
        padded = f" {key} "
        out[:] = [padded in f" {normalise_text(q)} " for q in subqueries]
    if (subquery_emb is None) != (title_emb is None):
        raise ValueError("subquery_emb / title_emb: give both (the cosine rule) or neither (text only)")
    if subquery_emb is not None and n:
        e = np.asarray(subquery_emb, dtype=np.float64)
        t = np.asarray(title_emb, dtype=np.float64).reshape(-1)
        if e.ndim != 2 or e.shape[0] != n or e.shape[1] != t.shape[0]:
            raise ValueError(
                f"subquery_emb: expected shape ({n}, {t.shape[0]}) to match subqueries and title_emb, "
                f"got {e.shape}"
            )
        out |= e @ t >= float(threshold)
    return out
