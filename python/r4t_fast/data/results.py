"""What a retrieval returns: one ``RetrievalResult`` per query, the same type for every method.

``scores`` has one meaning for every result type: the cosine of each returned *item* with the *query*
embedding (``RetrievedSet`` of the diffusion retriever subclasses this and keeps that meaning; its
grounding score, row · item, is ``RetrievedSet.row_scores``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RetrievalResult"]


@dataclass(frozen=True)
class RetrievalResult:
    """One query's retrieved set.

    Attributes:
        item_indices: ``(k,)`` int64 catalog row indices in selection order (``-1``: no item).
        row_embeddings: ``(k, dim)`` float32 embeddings the method retrieved with (query or subqueries).
        candidates: ``(k, C)`` int64 ranked candidate ids per row (``-1`` pads), or ``None``.
        scores: ``(k,)`` float32 cosine of each item with the query embedding, or ``None``.
    """

    item_indices: np.ndarray
    row_embeddings: np.ndarray
    candidates: np.ndarray | None = None
    scores: np.ndarray | None = None
