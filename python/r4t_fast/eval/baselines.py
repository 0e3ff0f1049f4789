"""Non-fan-out baselines for set retrieval: dense top-k, MMR and greedy DPP, behind one interface.

Every baseline turns query texts into one ``RetrievalResult`` per query with ``retrieve(texts, k)``:

* ``item_indices (k,)``: the retrieved catalog rows, in selection order;
* ``row_embeddings (k, dim)``: the embeddings the method retrieved *with* -- the raw query embedding
  repeated ``k`` times for every baseline here (none of them writes subqueries), the subquery or
  generated-row embeddings for fan-out methods. ``r4t_fast.objectives`` scores groundedness and alignment
  on these rows and diversity on the items;
* ``candidates (k, C)`` (only with ``n_candidates = C > 0``): a ranked candidate list per row for the
  Recall@K protocol (``metrics.union_candidates(candidates, b)`` is ``R`` at budget ``K = k * b``);
* ``scores (k,)``: ``cos(item, query)``, the cosine of each retrieved item with the query embedding.
  This is what ``RetrievalResult.scores`` means for every result type (these baselines, the LLM fan-out
  baselines, the diffusion retriever's ``RetrievedSet``; see :mod:`r4t_fast.data.results`) -- never a
  row or grounding score.

The paper's "no fan-out" baseline retrieves ``n * k`` items from the raw query. ``DenseBaseline`` lays
its top ``k * C`` items out column-major: ``candidates[i, j]`` is the query's rank ``j * k + i`` item, so
the first ``b`` columns are exactly its top ``k * b`` items for *every* budget ``b <= C``. ``MMRBaseline``
and ``DPPBaseline`` seed row ``i`` with their ``i``-th selected item and fill it with that item's ``C``
nearest catalog neighbours (the item itself first): a diversified set expanded item by item.

The LLM fan-out baselines (``llm-zeroshot``, ``llm-bon``) live in ``r4t_fast.eval.llm_baselines`` and
are loaded lazily by ``get_baseline``.

Encoders are any object with ``.dim`` and ``.encode(list[str]) -> np.ndarray (n, dim)`` float32 unit-norm
rows (rows are re-normalised here). Catalogs are ``r4t_fast.Catalog`` or anything with ``.embeddings``
``(N, dim)`` and, optionally, ``.search(queries, k) -> (scores, ids)`` returning row indices best first;
without ``.search`` the exact ``r4t_fast.ops.knn`` (inner product) is used.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from r4t_fast._internal import check_non_negative_int, check_positive_int, unit_rows
from r4t_fast.data.results import RetrievalResult

__all__ = [
    "Baseline",
    "DPPBaseline",
    "DenseBaseline",
    "MMRBaseline",
    "RetrievalResult",
    "available_baselines",
    "dpp_greedy",
    "get_baseline",
    "mmr_select",
    "register_baseline",
]


@runtime_checkable
class Baseline(Protocol):
    """What every baseline offers (the registry returns these)."""

    name: str

    def retrieve(self, query_texts: Sequence[str], k: int, *, n_candidates: int = 0) -> list[RetrievalResult]:
        """Retrieve ``k`` items per query (and ``n_candidates`` candidates per row when > 0)."""
        ...


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class _EmbeddingBaseline:
    """Shared plumbing: validated catalog/encoder, query encoding, kNN, item embeddings."""

    name = "base"

    def __init__(self, catalog: Any, encoder: Any) -> None:
        emb = getattr(catalog, "embeddings", None)
        if emb is None:
            raise ValueError(
                f"catalog: expected an object with .embeddings (N, dim), got {type(catalog).__name__}"
            )
        emb_t = torch.as_tensor(_to_numpy(emb)) if not isinstance(emb, torch.Tensor) else emb
        if emb_t.ndim != 2 or not emb_t.is_floating_point() or emb_t.shape[0] < 1:
            raise ValueError(
                f"catalog.embeddings: expected a non-empty float (N, dim) array, got {emb_t.shape}"
            )
        if not hasattr(encoder, "encode") or not hasattr(encoder, "dim"):
            raise ValueError(
                f"encoder: expected an object with .encode() and .dim, got {type(encoder).__name__}"
            )
        if int(encoder.dim) != emb_t.shape[1]:
            raise ValueError(
                f"encoder: expected .dim == catalog dim ({emb_t.shape[1]}), got encoder.dim = {encoder.dim}"
            )
        self.catalog = catalog
        self.encoder = encoder
        self._emb = emb_t
        self._n = int(emb_t.shape[0])
        self._dim = int(emb_t.shape[1])

    # -- building blocks -----------------------------------------------------------------------------
    def _encode(self, query_texts: Sequence[str]) -> np.ndarray:
        if isinstance(query_texts, str) or not all(isinstance(t, str) for t in query_texts):
            raise ValueError("query_texts: expected a list of strings")
        if len(query_texts) == 0:
            raise ValueError("query_texts: expected at least one query, got an empty list")
        q = np.asarray(self.encoder.encode(list(query_texts)), dtype=np.float32)
        if q.shape != (len(query_texts), self._dim):
            raise ValueError(
                f"encoder.encode: expected shape ({len(query_texts)}, {self._dim}), got {q.shape}"
            )
        return unit_rows(q).astype(np.float32)

    def _search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Top-``k`` row indices ``(B, k)`` int64; slots past the catalog size hold ``-1``."""
        kk = min(k, self._n)
        search = getattr(self.catalog, "search", None)
        if callable(search):
            _, ids = search(queries, kk)
        else:
            from r4t_fast.kernels import ops

            _, ids = ops.knn(queries, self._emb, kk, metric="ip")
        ids = _to_numpy(ids).astype(np.int64).reshape(queries.shape[0], kk)
        if kk < k:
            ids = np.concatenate([ids, np.full((ids.shape[0], k - kk), -1, dtype=np.int64)], axis=1)
        return ids

    def _items(self, ids: np.ndarray) -> np.ndarray:
        """Unit-norm float64 embeddings of catalog rows ``ids`` (any shape, ids >= 0)."""
        flat = torch.as_tensor(ids.reshape(-1), dtype=torch.int64, device=self._emb.device)
        out = self._emb[flat].to(torch.float64).cpu().numpy()
        return unit_rows(out).reshape(*ids.shape, self._dim)

    def _check_k(self, k: Any, n_candidates: Any) -> tuple[int, int]:
        k = check_positive_int(k, "k")
        if k > self._n:
            raise ValueError(f"k: expected an int in [1, {self._n}] (catalog size), got {k}")
        return k, check_non_negative_int(n_candidates, "n_candidates")

    def _seeded_candidates(self, items: np.ndarray, n_candidates: int) -> np.ndarray:
        """Row ``i``: the ``n_candidates`` nearest catalog rows of selected item ``i``."""
        seeds = self._items(items).astype(np.float32)
        cand = self._search(seeds, n_candidates)
        # an item is its own nearest neighbour; make that explicit even under score ties
        for i, item in enumerate(items):
            row = cand[i][cand[i] != item]
            cand[i] = np.concatenate([[item], row])[:n_candidates]
        return cand

    def _result(
        self, q: np.ndarray, items: np.ndarray, cand: np.ndarray | None, scores: np.ndarray
    ) -> RetrievalResult:
        k = items.shape[0]
        return RetrievalResult(
            item_indices=items.astype(np.int64),
            row_embeddings=np.repeat(q[None, :], k, axis=0).astype(np.float32),
            candidates=cand,
            scores=scores.astype(np.float32),
        )


# ----------------------------------------------------------------------------------------------------
# selection rules (pure functions, usable on any pool)
# ----------------------------------------------------------------------------------------------------
def mmr_select(relevance: np.ndarray, similarity: np.ndarray, k: int, lambda_: float) -> np.ndarray:
    """Maximal marginal relevance (Carbonell & Goldstein, 1998) over a pool of ``P`` candidates.

    Greedy: ``s_t = argmax_{i not in S} lambda * rel_i - (1 - lambda) * max_{j in S} sim_ij`` (the max over
    the empty set is 0, so the first pick is the most relevant). Ties go to the lower pool position,
    so with ``lambda = 1`` the result is the pool's own order.

    Args:
        relevance: ``(P,)`` relevance of each pool item to the query.
        similarity: ``(P, P)`` pairwise similarity of the pool items.
        k: items to select, ``1 <= k <= P``.
        lambda_: trade-off in ``[0, 1]``; 1 = pure relevance, 0 = pure novelty.

    Returns:
        ``(k,)`` int64 pool positions in selection order.

    >>> import numpy as np
    >>> rel = np.array([0.9, 0.89, 0.5])
    >>> sim = np.array([[1.0, 0.99, 0.0], [0.99, 1.0, 0.0], [0.0, 0.0, 1.0]])
    >>> mmr_select(rel, sim, 2, 1.0).tolist(), mmr_select(rel, sim, 2, 0.5).tolist()
    ([0, 1], [0, 2])
    """
    rel = np.asarray(relevance, dtype=np.float64)
    sim = np.asarray(similarity, dtype=np.float64)
    p = rel.shape[0]
    if rel.ndim != 1 or sim.shape != (p, p):
        raise ValueError(f"similarity: expected shape ({p}, {p}) to match relevance, got {sim.shape}")
    k = check_positive_int(k, "k")
    if k > p:
        raise ValueError(f"k: expected an int in [1, {p}] (pool size), got {k}")
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_: expected a float in [0, 1], got {lambda_!r}")
    redundancy = np.zeros(p)
    taken = np.zeros(p, dtype=bool)
    out = np.empty(k, dtype=np.int64)
    for t in range(k):
        score = lambda_ * rel - (1.0 - lambda_) * redundancy
        score[taken] = -np.inf
        j = int(np.argmax(score))
        out[t] = j
        taken[j] = True
        redundancy = sim[:, j] if t == 0 else np.maximum(redundancy, sim[:, j])
    return out


def dpp_greedy(kernel: np.ndarray, k: int, *, eps: float = 1e-10) -> np.ndarray:
    """Greedy MAP inference for a DPP: the fast algorithm of Chen, Zhang & Zhou (NeurIPS 2018).

    Adds ``j = argmax_i log det(L_{S+i}) - log det(L_S)`` one item at a time, with incremental Cholesky
    factors: ``d_i^2`` is the gain ``det(L_{S+i}) / det(L_S)``; after picking ``j``,
    ``e_i = (L_ji - <c_j, c_i>) / d_j``, ``c_i <- [c_i, e_i]``, ``d_i^2 <- d_i^2 - e_i^2``. Stops early when
    the best gain is ``< eps`` (the kernel's rank is exhausted), so it may return fewer than ``k``
    positions. ``O(k^2 P)`` time. Ties go to the lower position.

    Args:
        kernel: ``(P, P)`` symmetric PSD kernel ``L``.
        k: maximum number of items.
        eps: smallest gain ``d_j^2`` accepted.

    Returns:
        ``(m,)`` int64 positions, ``m <= k``, in selection order.

    >>> import numpy as np
    >>> L = np.array([[1.0, 0.99, 0.0], [0.99, 1.0, 0.0], [0.0, 0.0, 0.9]])
    >>> dpp_greedy(L, 2).tolist()
    [0, 2]
    """
    lk = np.asarray(kernel, dtype=np.float64)
    if lk.ndim != 2 or lk.shape[0] != lk.shape[1]:
        raise ValueError(f"kernel: expected a square (P, P) matrix, got {lk.shape}")
    k = check_positive_int(k, "k")
    p = lk.shape[0]
    k = min(k, p)
    cis = np.zeros((k, p))
    gains = np.diag(lk).copy()
    taken = np.zeros(p, dtype=bool)
    out: list[int] = []
    while True:
        masked = np.where(taken, -np.inf, gains)
        j = int(np.argmax(masked))
        if masked[j] < eps:
            break
        out.append(j)
        taken[j] = True
        t = len(out) - 1
        if len(out) == k:
            break
        e = (lk[j] - cis[:t, j] @ cis[:t]) / math.sqrt(gains[j])
        cis[t] = e
        gains = gains - e * e
    return np.asarray(out, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------------
class DenseBaseline(_EmbeddingBaseline):
    """No fan-out: the top-``k`` catalog items of the raw query embedding (the paper's "n·k items").

    ``row_embeddings`` is the query repeated ``k`` times. With ``n_candidates = C`` the query's top
    ``k * C`` items are laid out column-major in ``candidates (k, C)`` (see the module docstring), so any
    per-row budget ``b`` gives exactly the query's top ``k * b``.
    """

    name = "dense"

    def retrieve(self, query_texts: Sequence[str], k: int, *, n_candidates: int = 0) -> list[RetrievalResult]:
        """Top-``k`` per query; see the class docstring for ``candidates``."""
        k, c = self._check_k(k, n_candidates)
        q = self._encode(query_texts)
        ranked = self._search(q, max(k, k * c))
        out = []
        for b in range(q.shape[0]):
            items = ranked[b, :k]
            cand = ranked[b, : k * c].reshape(c, k).T.copy() if c else None
            scores = self._items(items) @ q[b].astype(np.float64)
            out.append(self._result(q[b], items, cand, scores))
        return out


class MMRBaseline(_EmbeddingBaseline):
    """Maximal marginal relevance over the query's top-``pool`` items (cosine relevance and similarity).

    ``lambda_ = 1`` reproduces ``DenseBaseline`` (pool order, up to float32 near-ties of the search);
    smaller values trade relevance for novelty. ``row_embeddings`` is the query repeated; candidates are
    item-seeded (module docstring).
    """

    name = "mmr"

    def __init__(self, catalog: Any, encoder: Any, lambda_: float = 0.5, pool: int = 100) -> None:
        super().__init__(catalog, encoder)
        if not 0.0 <= float(lambda_) <= 1.0:
            raise ValueError(f"lambda_: expected a float in [0, 1], got {lambda_!r}")
        self.lambda_ = float(lambda_)
        self.pool = check_positive_int(pool, "pool")

    def retrieve(self, query_texts: Sequence[str], k: int, *, n_candidates: int = 0) -> list[RetrievalResult]:
        """MMR-selected ``k`` items per query."""
        k, c = self._check_k(k, n_candidates)
        if k > self.pool:
            raise ValueError(f"k: expected an int <= pool ({self.pool}), got {k}; build with a larger pool")
        q = self._encode(query_texts)
        pool_ids = self._search(q, min(self.pool, self._n))
        out = []
        for b in range(q.shape[0]):
            ids = pool_ids[b][pool_ids[b] >= 0]
            e = self._items(ids)
            rel = e @ q[b].astype(np.float64)
            pick = mmr_select(rel, e @ e.T, k, self.lambda_)
            items = ids[pick]
            cand = self._seeded_candidates(items, c) if c else None
            out.append(self._result(q[b], items, cand, rel[pick]))
        return out


class DPPBaseline(_EmbeddingBaseline):
    """Greedy DPP MAP over the query's top-``pool`` items (Chen et al., 2018), quality x similarity kernel.

    ``L_ij = r_i * S_ij * r_j`` with ``S_ij = cos(e_i, e_j)`` (PSD) and quality ``r_i = exp(alpha * rel_i)``,
    ``rel_i = cos(e_i, e(q))``, ``alpha = theta / (2 (1 - theta))``. Then
    ``log det L_Y = (theta / (1 - theta)) * sum_{i in Y} rel_i + log det S_Y``: ``theta`` in ``[0, 1)``
    weighs relevance against diversity (0 = pure diversity). When the kernel's rank runs out before ``k``
    items (``S`` has rank ``<= dim``), the remaining slots take the most relevant unselected pool items.
    ``row_embeddings`` is the query repeated; candidates are item-seeded (module docstring).
    """

    name = "dpp"

    def __init__(self, catalog: Any, encoder: Any, pool: int = 100, theta: float = 0.5) -> None:
        super().__init__(catalog, encoder)
        if not 0.0 <= float(theta) < 1.0:
            raise ValueError(f"theta: expected a float in [0, 1), got {theta!r}")
        self.theta = float(theta)
        self.pool = check_positive_int(pool, "pool")

    def retrieve(self, query_texts: Sequence[str], k: int, *, n_candidates: int = 0) -> list[RetrievalResult]:
        """DPP-selected ``k`` items per query."""
        k, c = self._check_k(k, n_candidates)
        if k > self.pool:
            raise ValueError(f"k: expected an int <= pool ({self.pool}), got {k}; build with a larger pool")
        q = self._encode(query_texts)
        pool_ids = self._search(q, min(self.pool, self._n))
        alpha = self.theta / (2.0 * (1.0 - self.theta))
        out = []
        for b in range(q.shape[0]):
            ids = pool_ids[b][pool_ids[b] >= 0]
            e = self._items(ids)
            rel = e @ q[b].astype(np.float64)
            r = np.exp(alpha * rel)
            pick = dpp_greedy(r[:, None] * (e @ e.T) * r[None, :], k)
            if pick.shape[0] < k:  # rank exhausted: fill by relevance (pool order)
                rest = np.setdiff1d(np.arange(ids.shape[0]), pick, assume_unique=True)
                rest = rest[np.argsort(-rel[rest], kind="stable")]
                pick = np.concatenate([pick, rest[: k - pick.shape[0]]])
            items = ids[pick]
            cand = self._seeded_candidates(items, c) if c else None
            out.append(self._result(q[b], items, cand, rel[pick]))
        return out


# ----------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------
def _lazy(module: str, attr: str, name: str) -> Callable[..., Baseline]:
    def factory(**kwargs: Any) -> Baseline:
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ImportError(
                f"baseline {name!r} needs {module}.{attr}, which could not be loaded: {exc}"
            ) from exc
        return cls(**kwargs)

    factory.__doc__ = f"Lazily builds {module}.{attr}."
    return factory


_REGISTRY: dict[str, Callable[..., Baseline]] = {
    "dense": DenseBaseline,
    "mmr": MMRBaseline,
    "dpp": DPPBaseline,
    # LLM fan-out baselines: implemented in r4t_fast.fanout, imported only when asked for.
    "llm-zeroshot": _lazy("r4t_fast.eval.llm_baselines", "LLMFanOutBaseline", "llm-zeroshot"),
    "llm-bon": _lazy("r4t_fast.eval.llm_baselines", "BestOfNBaseline", "llm-bon"),
}


def available_baselines() -> list[str]:
    """Registered baseline names, sorted."""
    return sorted(_REGISTRY)


def register_baseline(name: str, factory: Callable[..., Baseline], *, overwrite: bool = False) -> None:
    """Add a baseline factory under ``name`` (``overwrite=True`` to replace one)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"name: {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def get_baseline(name: str, /, **kwargs: Any) -> Baseline:
    """Build the baseline registered as ``name`` with ``kwargs`` (e.g. ``catalog=..., encoder=...``).

    >>> get_baseline("bm25")
    Traceback (most recent call last):
    ...
    ValueError: name: unknown baseline 'bm25'; valid choices: dense, dpp, llm-bon, llm-zeroshot, mmr
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(
            f"name: unknown baseline {name!r}; valid choices: {', '.join(available_baselines())}"
        )
    return factory(**kwargs)
