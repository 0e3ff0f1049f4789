"""Grounding backends: top-k inner-product search over the rows of a catalog, behind one small interface.

A :class:`~r4t_fast.Catalog` owns the item ids and the embedding matrix; its backend answers
``search`` and is told about every change (``appended`` / ``removed`` / ``updated``) so it can keep
a derived structure (a graph) in step without a rebuild. Two implementations:

- :class:`ExactBackend` (``index="exact"``, the default): the fused exact kernel ``ops.knn``; no state.
- :class:`UsearchBackend` (``index="usearch"``): a usearch HNSW graph, updated incrementally
  (``Index.add`` / ``Index.remove`` with stable integer keys), saved as ``index.usearch`` and, for
  read-only serving, memory-mapped with ``view=True`` (usearch ``Index.restore(view=True)``).

Anything that implements :class:`SearchBackend` (a sharded or remote index, say) can stand behind the
same catalog API; row numbers are the currency between catalog and backend.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from r4t_fast._internal import check_choice, check_non_negative_int, check_positive_int
from r4t_fast.kernels import ops

__all__ = ["BACKENDS", "INDEX_KINDS", "ExactBackend", "SearchBackend", "UsearchBackend", "check_index_params"]

INDEX_KINDS = ("exact", "usearch")
"""The ``Catalog(index=...)`` kinds."""
_NO_ROW = -1
_QUERY_CHUNK = 256  # queries re-scored at once (bounds the (chunk, fetch, d) gather)


@runtime_checkable
class SearchBackend(Protocol):
    """Top-k inner-product search over a catalog's rows, kept in step with the catalog's changes.

    Shapes: ``embeddings`` is the catalog's matrix (N, d) float32/float16 (unit rows), ``queries``
    float32 (B, d) on the CPU, ``allowed`` an optional bool (N,) mask; results are ``(scores float32
    (B, k), rows int64 (B, k))``, best first, slots past the available items holding row -1 and score
    -inf. Every returned row is allowed and distinct within its query.
    """

    kind: ClassVar[str]
    params: dict[str, Any]
    read_only: bool

    def search(
        self, embeddings: torch.Tensor, queries: torch.Tensor, k: int, *, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def appended(self, embeddings: torch.Tensor, start: int) -> None:
        """Rows ``start:`` of ``embeddings`` are new."""

    def removed(self, keep: np.ndarray) -> None:
        """Only the rows ``keep`` (sorted int64) remain, renumbered ``0..len(keep)-1`` in order."""

    def updated(self, embeddings: torch.Tensor, rows: np.ndarray) -> None:
        """The vectors of ``rows`` changed (now ``embeddings[rows]``)."""

    def save(self, directory: Path, embeddings: torch.Tensor) -> None:
        """Write the backend's files into ``directory`` (inside a crash-safe save)."""

    @classmethod
    def load(cls, directory: Path, n: int, dim: int, params: dict[str, Any], *, view: bool) -> SearchBackend:
        """The backend saved in ``directory`` for a catalog of ``n`` rows of dimension ``dim``."""


def _check_k(k: Any, b: int, n: int) -> int:
    k = check_positive_int(k, "k")
    if k > n and b * (k - n) > ops.MAX_SENTINEL_SLOTS:
        raise ValueError(
            f"k: {k} exceeds the catalog size N={n}, so the ({b}, {k}) result would hold {b * (k - n)} "
            f"sentinel slots (id -1), more than the limit of {ops.MAX_SENTINEL_SLOTS}; pass k <= {n}"
        )
    return k


def _exact(
    embeddings: torch.Tensor, queries: torch.Tensor, k: int, allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if allowed is None:
        return ops.knn(queries, embeddings, k, check_finite=False)
    return ops.knn(queries, embeddings, k, check_finite=False, allowed=allowed)


class ExactBackend:
    """Exact search with the fused kernel (``ops.knn``): always right, O(N d) per query, no state."""

    kind: ClassVar[str] = "exact"
    PARAMS: ClassVar[dict[str, str]] = {}

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = check_index_params("exact", params)
        self.read_only = False

    def search(
        self, embeddings: torch.Tensor, queries: torch.Tensor, k: int, *, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _exact(embeddings, queries, k, allowed)

    def appended(self, embeddings: torch.Tensor, start: int) -> None:
        pass

    def removed(self, keep: np.ndarray) -> None:
        pass

    def updated(self, embeddings: torch.Tensor, rows: np.ndarray) -> None:
        pass

    def save(self, directory: Path, embeddings: torch.Tensor) -> None:
        pass

    @classmethod
    def load(cls, directory: Path, n: int, dim: int, params: dict[str, Any], *, view: bool) -> ExactBackend:
        return cls(params)


_QUANTIZATIONS = ("f32", "f16", "bf16", "i8")


class UsearchBackend:
    """A usearch HNSW graph over the rows (inner product), built on first search or :meth:`build`.

    Keys are stable integers, not row numbers: a removal deletes the removed keys from the graph
    (usearch marks them deleted) and renumbers rows in a key -> row table, an addition inserts new
    keys, an update deletes the old key and inserts a new one. Scores are always recomputed exactly
    against the catalog's stored embeddings for the candidates the graph returns, so an ``"i8"``
    graph still reports true inner products; ``rerank`` > k fetches more candidates per query and
    keeps the k best (raises recall of coarse quantizations). A query the graph cannot fill with k
    allowed rows (tiny or heavily filtered catalogs) falls back to exact search.

    Params (``index_params``): ``connectivity`` (graph degree, usearch default 16), ``expansion_add``
    (build effort, default 128), ``expansion_search`` (query effort, default 64), ``quantization``
    (``"f32"``, ``"f16"``, ``"bf16"``, ``"i8"``; default the catalog's storage dtype), ``rerank``
    (candidates fetched per query, default 0 = k).

    Deletions leave tombstones and degrade the graph slowly: rebuild (``Catalog.build_index()``)
    after a large share (say a quarter) of the rows were removed or updated; ``changes`` counts them.
    """

    kind: ClassVar[str] = "usearch"
    PARAMS: ClassVar[dict[str, str]] = {
        "connectivity": "a positive int",
        "expansion_add": "a positive int",
        "expansion_search": "a positive int",
        "quantization": f"one of {', '.join(_QUANTIZATIONS)}",
        "rerank": "a non-negative int",
    }
    FILES: ClassVar[tuple[str, ...]] = ("index.usearch", "index_keys.npy")

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = check_index_params("usearch", params)
        self.read_only = False
        self.changes = 0
        self._build_lock = threading.Lock()
        self._index: Any = None
        self._keys = np.zeros(0, dtype=np.int64)  # row -> key
        self._rows = np.zeros(0, dtype=np.int64)  # key -> row (or -1)

    # ------------------------------------------------------------------ graph
    @property
    def built(self) -> bool:
        return self._index is not None

    def build(self, embeddings: torch.Tensor) -> None:
        """(Re)build the graph over all rows; keys become ``0..N-1``."""
        from usearch.index import Index

        p = self.params
        index = Index(
            ndim=int(embeddings.shape[1]),
            metric="ip",
            dtype=p.get("quantization", "f16" if embeddings.dtype == torch.float16 else "f32"),
            connectivity=p.get("connectivity"),
            expansion_add=p.get("expansion_add"),
            expansion_search=p.get("expansion_search", 64),
        )
        n = int(embeddings.shape[0])
        keys = np.arange(n, dtype=np.int64)
        if n:
            index.add(keys.astype(np.uint64), _np32(embeddings), threads=0)
        self._index, self._keys, self._rows, self.changes = index, keys, keys.copy(), 0

    def _writable(self) -> None:
        if self.read_only:
            raise ValueError(
                "catalog: its usearch index is memory-mapped read-only (loaded with view=True); "
                "load it with view=False to change it"
            )

    def appended(self, embeddings: torch.Tensor, start: int) -> None:
        self._writable()
        if self._index is None:
            return
        m = int(embeddings.shape[0]) - start
        keys = np.arange(len(self._rows), len(self._rows) + m, dtype=np.int64)
        self._index.add(keys.astype(np.uint64), _np32(embeddings[start:]), threads=0)
        self._keys = np.concatenate([self._keys, keys])
        self._rows = np.concatenate([self._rows, np.arange(start, start + m, dtype=np.int64)])

    def removed(self, keep: np.ndarray) -> None:
        self._writable()
        if self._index is None:
            return
        gone = np.ones(len(self._keys), dtype=bool)
        gone[keep] = False
        dead = self._keys[gone]
        if len(dead):
            self._index.remove(dead.astype(np.uint64))
        self._rows[dead] = _NO_ROW
        self._keys = self._keys[keep]
        self._rows[self._keys] = np.arange(len(keep), dtype=np.int64)
        self.changes += len(dead)

    def updated(self, embeddings: torch.Tensor, rows: np.ndarray) -> None:
        self._writable()
        if self._index is None:
            return
        old = self._keys[rows]
        self._index.remove(old.astype(np.uint64))
        self._rows[old] = _NO_ROW
        keys = np.arange(len(self._rows), len(self._rows) + len(rows), dtype=np.int64)
        self._index.add(
            keys.astype(np.uint64), _np32(embeddings.index_select(0, torch.from_numpy(rows))), threads=0
        )
        self._keys[rows] = keys
        self._rows = np.concatenate([self._rows, rows.astype(np.int64)])
        self.changes += len(rows)

    # ------------------------------------------------------------------ search
    def search(
        self, embeddings: torch.Tensor, queries: torch.Tensor, k: int, *, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(embeddings.shape[0])
        b = int(queries.shape[0])
        k = _check_k(k, b, n)
        if self._index is None:
            self._writable()
            with self._build_lock:  # concurrent first searches build the graph once
                if self._index is None:
                    self.build(embeddings)
        n_ok = n if allowed is None else int(allowed.sum())
        kk = min(k, n_ok)
        scores = torch.full((b, k), -math.inf, dtype=torch.float32)
        rows = torch.full((b, k), _NO_ROW, dtype=torch.int64)
        if b == 0 or kk == 0:
            return scores, rows
        if allowed is not None and n_ok * 20 < n:  # a selective filter: the masked exact kernel is cheaper
            return _exact(embeddings, queries, k, allowed)
        fetch = max(kk, int(self.params.get("rerank", 0)))
        if allowed is not None:
            fetch = math.ceil(fetch * n / n_ok) + 8
        fetch = min(fetch, n)
        for lo in range(0, b, _QUERY_CHUNK):
            hi = min(b, lo + _QUERY_CHUNK)
            s, r = self._search_chunk(embeddings, queries[lo:hi], k, kk, fetch, allowed)
            scores[lo:hi], rows[lo:hi] = s, r
        return scores, rows

    def _search_chunk(
        self,
        embeddings: torch.Tensor,
        queries: torch.Tensor,
        k: int,
        kk: int,
        fetch: int,
        allowed: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = int(queries.shape[0])
        scores = torch.full((b, k), -math.inf, dtype=torch.float32)
        rows = torch.full((b, k), _NO_ROW, dtype=torch.int64)
        cand = self._candidates(queries, fetch)  # (b, fetch) rows, -1 where none
        valid = cand >= 0
        safe = cand.clamp_min(0)
        if allowed is not None:
            valid &= allowed.index_select(0, safe.flatten()).view_as(cand)
        # index_select, not embeddings[safe]: 2-d advanced indexing is ~1000x slower here (torch 2.13)
        vecs = embeddings.index_select(0, safe.flatten()).view(b, -1, embeddings.shape[1]).float()
        exact = torch.einsum("bd,bfd->bf", queries, vecs)
        exact = exact.masked_fill(~valid, -math.inf)
        top, order = exact.sort(dim=1, descending=True, stable=True)
        top, order = top[:, :kk], order[:, :kk]
        got = torch.gather(cand, 1, order)
        ok = torch.gather(valid, 1, order)
        scores[:, :kk] = top.masked_fill(~ok, -math.inf)
        rows[:, :kk] = got.masked_fill(~ok, _NO_ROW)
        short = (ok.sum(dim=1) < kk).nonzero().flatten()
        if len(short):  # the graph found too few (allowed) rows: exact search for those queries
            s2, r2 = _exact(embeddings, queries[short], k, allowed)
            scores[short], rows[short] = s2, r2
        return scores, rows

    def _candidates(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        q = queries.detach().cpu().numpy()
        m = self._index.search(q, count, threads=0)
        b = q.shape[0]
        keys = np.asarray(m.keys, dtype=np.int64).reshape(b, -1)
        # usearch returns a Matches (no .counts) for one query and a BatchMatches for several
        counts = np.asarray(m.counts).reshape(b) if hasattr(m, "counts") else np.array([len(m)])
        out = np.full((b, count), _NO_ROW, dtype=np.int64)
        width = min(keys.shape[1], count)
        live = np.arange(width)[None, :] < counts[:, None]
        k = keys[:, :width]
        known = live & (k >= 0) & (k < len(self._rows))
        out[:, :width][known] = self._rows[k[known]]
        return torch.from_numpy(out)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path, embeddings: torch.Tensor) -> None:
        if self._index is None:
            self.build(embeddings)
        self._index.save(str(directory / "index.usearch"))
        np.save(directory / "index_keys.npy", self._keys, allow_pickle=False)

    @classmethod
    def load(cls, directory: Path, n: int, dim: int, params: dict[str, Any], *, view: bool) -> UsearchBackend:
        """Restore ``index.usearch`` (memory-mapped and read-only with ``view=True``).

        Raises ``ValueError`` naming the file when it is unreadable or does not match the catalog.
        """
        from usearch.index import Index

        be = cls(params)
        path = directory / "index.usearch"
        try:
            index = Index.restore(str(path), view=view)
        except Exception as exc:  # usearch raises RuntimeError/ValueError on a corrupt file
            raise ValueError(f"{path}: unreadable usearch index ({exc})") from None
        if index is None or index.ndim != dim or len(index) != n:
            got = "nothing" if index is None else f"{len(index)} vectors of dimension {index.ndim}"
            raise ValueError(f"{path}: does not match the catalog ({n} rows of dimension {dim}), holds {got}")
        kpath = directory / "index_keys.npy"
        if kpath.is_file():
            try:
                keys = np.load(kpath, allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise ValueError(f"{kpath}: unreadable ({exc})") from None
            if (
                keys.dtype != np.int64
                or keys.shape != (n,)
                or (n and (keys.min() < 0 or len(np.unique(keys)) != n))
            ):
                raise ValueError(
                    f"{kpath}: expected {n} distinct non-negative int64 keys, got {keys.dtype} {keys.shape}"
                )
        else:  # format 1: keys are row numbers
            keys = np.arange(n, dtype=np.int64)
        rows = np.full(int(keys.max()) + 1 if n else 0, _NO_ROW, dtype=np.int64)
        rows[keys] = np.arange(n, dtype=np.int64)
        index.expansion_search = int(be.params.get("expansion_search", 64))
        be._index, be._keys, be._rows, be.read_only = index, keys, rows, view
        return be


def _np32(e: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(e.detach().to("cpu", torch.float32).numpy())


BACKENDS: dict[str, type] = {"exact": ExactBackend, "usearch": UsearchBackend}
"""Backend class per ``Catalog(index=...)`` kind."""


def check_index_params(kind: str, params: Any) -> dict[str, Any]:
    """Validated copy of ``index_params`` for backend ``kind``: unknown keys and bad values raise a
    ``ValueError`` naming the key, the rule and the value."""
    check_choice(kind, INDEX_KINDS, "index")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"index_params: expected a dict, got {type(params).__name__}")
    allowed = {"exact": ExactBackend.PARAMS, "usearch": UsearchBackend.PARAMS}[kind]
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in allowed:
            valid = ", ".join(repr(k) for k in allowed) or "none"
            raise ValueError(f"index_params: unknown key {key!r} for index={kind!r} (valid: {valid})")
        name = f"index_params[{key!r}]"
        if key == "quantization":
            out[key] = check_choice(value, _QUANTIZATIONS, name)
        elif key == "rerank":
            out[key] = check_non_negative_int(value, name)
        else:
            out[key] = check_positive_int(value, name)
    return out
