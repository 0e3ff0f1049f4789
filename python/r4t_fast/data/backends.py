"""Grounding backends: top-k inner-product search over the rows of a catalog, behind one small interface.

A :class:`~r4t_fast.Catalog` owns the item ids and the embedding matrix; its backend answers
``search`` and is told about every change (``appended`` / ``removed`` / ``updated``) so it can keep
a derived structure (a graph) in step without a rebuild. Two implementations:

- :class:`ExactBackend` (``index="exact"``, the default): the fused exact kernel ``ops.knn``; no state.
- :class:`UsearchBackend` (``index="usearch"``): a usearch HNSW graph, updated incrementally
  (``Index.add`` / ``Index.remove`` with stable integer keys), saved as ``index.usearch`` and, for
  read-only serving, memory-mapped with ``view=True`` (usearch ``Index.restore(view=True)``).

- :class:`MilvusBackend` (``index="milvus"``): a Milvus collection through pymilvus' batch search
  (Milvus Lite, an embedded local file, by default; a Milvus server or cluster by ``uri``): the path for
  catalogs beyond one machine. Filters are pushed down as key expressions where they are short.

:func:`ground_sets` grounds generated sets through any backend with the distinct-item guarantee of
``ops.ground_sets`` (L candidates per row; sets a backend could not fill are re-fetched wider).

Anything that implements :class:`SearchBackend` (a sharded or remote index, say) can stand behind the
same catalog API; row numbers are the currency between catalog and backend.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from r4t_fast._internal import check_choice, check_non_negative_int, check_positive_int
from r4t_fast.kernels import ops

__all__ = [
    "BACKENDS",
    "INDEX_KINDS",
    "ExactBackend",
    "MilvusBackend",
    "SearchBackend",
    "UsearchBackend",
    "check_index_params",
    "ground_sets",
]

INDEX_KINDS = ("exact", "usearch", "milvus")
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


_MILVUS_INDEXES = ("AUTOINDEX", "FLAT", "IVF_FLAT", "HNSW")
_MILVUS_TOPK = 16384  # Milvus' largest limit per search
_MILVUS_EXPR_IDS = 16384  # longest key list pushed down as a filter expression
_MILVUS_INSERT = 5000  # rows per insert call
_MILVUS_RERANK = 40  # default candidates per query (AUTOINDEX recall@10 at 100k: 0.984 -> 1.0)
MILVUS_TOKEN_ENV = "R4T_MILVUS_TOKEN"  # a server's token: from the environment, never on disk


class MilvusBackend(UsearchBackend):
    """A Milvus collection over the rows (inner product) through pymilvus' ``MilvusClient``: ``uri`` a
    Milvus Lite file (embedded; default: a file in the temp directory) or ``http://host:19530`` for a server
    or cluster (token from ``R4T_MILVUS_TOKEN``). Stable int64 primary keys as with usearch (removal
    deletes keys, update upserts, addition inserts: a removed item is never returned). Candidates from one
    batch search per chunk of queries, re-scored exactly; a query left short falls back to exact search.
    A filter of at most 16,384 allowed (or refused) keys is pushed down as ``key in [...]``; wider ones
    over-fetch and filter afterwards. Params: ``uri``, ``collection`` (default ``r4t_<hex>``), ``index_type``
    (``AUTOINDEX`` default, ``FLAT``, ``IVF_FLAT``, ``HNSW``), ``rerank`` (candidates per query, default 40).
    A saved catalog keeps uri and collection in its manifest and reconnects on load (or rebuilds)."""

    kind: ClassVar[str] = "milvus"
    PARAMS: ClassVar[dict[str, str]] = {
        "uri": "a Milvus Lite file path or an http(s):// URI",
        "collection": "a collection name (letters, digits, _)",
        "index_type": f"one of {', '.join(_MILVUS_INDEXES)}",
        "rerank": "a non-negative int",
    }

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        p = check_index_params("milvus", params)
        p.setdefault("uri", os.path.join(tempfile.gettempdir(), "r4t_milvus.db"))
        p.setdefault("collection", f"r4t_{uuid.uuid4().hex[:16]}")
        p.setdefault("rerank", _MILVUS_RERANK)
        super().__init__({})
        self.params = p
        self._client: Any = None
        self._tls = threading.local()

    def _connect(self) -> Any:
        if self._client is None:
            from pymilvus import MilvusClient

            token = os.environ.get(MILVUS_TOKEN_ENV, "")
            self._client = MilvusClient(uri=self.params["uri"], **({"token": token} if token else {}))
        return self._client

    def _insert(self, keys: np.ndarray, vecs: np.ndarray, *, upsert: bool = False) -> None:
        c, name = self._connect(), self.params["collection"]
        call = c.upsert if upsert else c.insert
        for lo in range(0, len(keys), _MILVUS_INSERT):
            hi = min(len(keys), lo + _MILVUS_INSERT)
            call(name, [{"key": int(k), "vec": v} for k, v in zip(keys[lo:hi], vecs[lo:hi], strict=True)])

    def build(self, embeddings: torch.Tensor) -> None:
        """(Re)create the collection with every row; keys become ``0..N-1``."""
        from pymilvus import DataType

        c, name = self._connect(), self.params["collection"]
        if c.has_collection(name):
            c.drop_collection(name)
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=int(embeddings.shape[1]))
        ip = c.prepare_index_params()
        ip.add_index(
            field_name="vec", index_type=self.params.get("index_type", "AUTOINDEX"), metric_type="IP"
        )
        c.create_collection(name, schema=schema, index_params=ip)
        n = int(embeddings.shape[0])
        keys = np.arange(n, dtype=np.int64)
        self._insert(keys, _np32(embeddings))
        c.flush(name)
        self._index, self._keys, self._rows, self.changes = c, keys, keys.copy(), 0

    def appended(self, embeddings: torch.Tensor, start: int) -> None:
        if self._index is None:
            return
        m = int(embeddings.shape[0]) - start
        keys = np.arange(len(self._rows), len(self._rows) + m, dtype=np.int64)
        self._insert(keys, _np32(embeddings[start:]))
        self._keys = np.concatenate([self._keys, keys])
        self._rows = np.concatenate([self._rows, np.arange(start, start + m, dtype=np.int64)])

    def removed(self, keep: np.ndarray) -> None:
        if self._index is None:
            return
        gone = np.ones(len(self._keys), dtype=bool)
        gone[keep] = False
        dead = self._keys[gone]
        if len(dead):
            self._index.delete(self.params["collection"], ids=[int(x) for x in dead])
        self._rows[dead] = _NO_ROW
        self._keys = self._keys[keep]
        self._rows[self._keys] = np.arange(len(keep), dtype=np.int64)
        self.changes += len(dead)

    def updated(self, embeddings: torch.Tensor, rows: np.ndarray) -> None:
        if self._index is None:
            return
        vecs = _np32(embeddings.index_select(0, torch.from_numpy(rows)))
        self._insert(self._keys[rows], vecs, upsert=True)  # same keys, new vectors
        self.changes += len(rows)

    def _filter_expr(self, allowed: torch.Tensor) -> str | None:
        """``key in [...]`` / ``key not in [...]`` for a mask, or None when both lists are too long."""
        ok = allowed.numpy()
        keys_ok, keys_no = self._keys[ok], self._keys[~ok]
        if len(keys_ok) <= _MILVUS_EXPR_IDS:
            return f"key in [{','.join(map(str, keys_ok.tolist()))}]"
        if len(keys_no) <= _MILVUS_EXPR_IDS:
            return f"key not in [{','.join(map(str, keys_no.tolist()))}]" if len(keys_no) else ""
        return None

    def search(
        self, embeddings: torch.Tensor, queries: torch.Tensor, k: int, *, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, b = int(embeddings.shape[0]), int(queries.shape[0])
        if self._index is None:
            with self._build_lock:
                if self._index is None:
                    self.build(embeddings)
        expr = None if allowed is None else self._filter_expr(allowed.cpu())
        if expr is None:  # no filter, or too wide to push down: over-fetch and filter afterwards
            self._tls.expr = ""
            return super().search(embeddings, queries, k, allowed=allowed)
        k = _check_k(k, b, n)
        kk = min(k, int(allowed.sum()))
        scores = torch.full((b, k), -math.inf, dtype=torch.float32)
        rows = torch.full((b, k), _NO_ROW, dtype=torch.int64)
        if b == 0 or kk == 0:
            return scores, rows
        fetch = min(max(kk, int(self.params.get("rerank", 0))), _MILVUS_TOPK)
        self._tls.expr = expr
        try:
            for lo in range(0, b, _QUERY_CHUNK):
                hi = min(b, lo + _QUERY_CHUNK)
                scores[lo:hi], rows[lo:hi] = self._search_chunk(
                    embeddings, queries[lo:hi], k, kk, fetch, allowed
                )
        finally:
            self._tls.expr = ""
        return scores, rows

    def _candidates(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        q = queries.detach().cpu().float().numpy()
        count = min(count, _MILVUS_TOPK)
        hits = self._index.search(
            self.params["collection"],
            data=[row for row in q],
            limit=count,
            filter=getattr(self._tls, "expr", ""),
            output_fields=["key"],
            anns_field="vec",
            search_params={"metric_type": "IP"},
        )
        out = np.full((q.shape[0], count), _NO_ROW, dtype=np.int64)
        for i, hit in enumerate(hits):
            keys = np.fromiter((h["key"] for h in hit), dtype=np.int64, count=len(hit))
            known = (keys >= 0) & (keys < len(self._rows))
            rows = np.full(len(keys), _NO_ROW, dtype=np.int64)
            rows[known] = self._rows[keys[known]]
            out[i, : len(rows)] = rows
        return torch.from_numpy(out)

    def save(self, directory: Path, embeddings: torch.Tensor) -> None:
        if self._index is None:
            self.build(embeddings)
        np.save(directory / "index_keys.npy", self._keys, allow_pickle=False)

    @classmethod
    def load(cls, directory: Path, n: int, dim: int, params: dict[str, Any], *, view: bool) -> MilvusBackend:
        """Reconnect to the saved collection (rebuilt from the catalog on first search when it no longer
        holds ``n`` rows); ``view`` is refused (a Milvus collection is not memory-mapped)."""
        be = cls(params)
        kpath = directory / "index_keys.npy"
        keys = np.load(kpath, allow_pickle=False) if kpath.is_file() else np.arange(n, dtype=np.int64)
        if keys.dtype != np.int64 or keys.shape != (n,):
            raise ValueError(f"{kpath}: expected {n} int64 keys, got {keys.dtype} {keys.shape}")
        c = be._connect()
        name = be.params["collection"]
        if c.has_collection(name) and int(c.get_collection_stats(name).get("row_count", -1)) == n:
            rows = np.full(int(keys.max()) + 1 if n else 0, _NO_ROW, dtype=np.int64)
            rows[keys] = np.arange(n, dtype=np.int64)
            be._index, be._keys, be._rows = c, keys, rows
        return be


def ground_sets(
    backend: SearchBackend,
    embeddings: torch.Tensor,
    rows: torch.Tensor,
    *,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground (B, L, d) float32 rows to distinct items per set through ``backend`` (the rule of
    ``ops.ground_sets``: each row's L nearest allowed items, then greedy by score, no item twice).

    With L candidates per row every row finds a free item when the backend's lists are full; a set an
    approximate backend left short is re-fetched with twice the candidates (then exactly): every row gets
    a distinct allowed item when at least L are allowed. Returns (ids int64 (B, L), scores float32 (B, L)).
    """
    B, L, d = rows.shape
    n_ok = int(embeddings.shape[0]) if allowed is None else int(allowed.sum())
    if n_ok < L:
        raise ValueError(f"allowed: only {n_ok} items are allowed, fewer than the L={L} rows of a set")
    ids = torch.full((B, L), _NO_ROW, dtype=torch.int64)
    scores = torch.full((B, L), -math.inf, dtype=torch.float32)
    todo = torch.arange(B)
    c = L
    while len(todo):
        be = backend if c < n_ok else ExactBackend()
        s, r = be.search(embeddings, rows[todo].reshape(-1, d).contiguous(), min(c, n_ok), allowed=allowed)
        g_ids, g_scores = ops.ground(s.reshape(len(todo), L, -1).contiguous(), r.reshape(len(todo), L, -1))
        ids[todo], scores[todo] = g_ids, g_scores
        todo = todo[(g_ids < 0).any(dim=1)]
        c *= 2
    return ids, scores


BACKENDS: dict[str, type] = {"exact": ExactBackend, "usearch": UsearchBackend, "milvus": MilvusBackend}
"""Backend class per ``Catalog(index=...)`` kind."""


def check_index_params(kind: str, params: Any) -> dict[str, Any]:
    """Validated copy of ``index_params`` for backend ``kind``: unknown keys and bad values raise a
    ``ValueError`` naming the key, the rule and the value."""
    check_choice(kind, INDEX_KINDS, "index")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"index_params: expected a dict, got {type(params).__name__}")
    allowed = {
        "exact": ExactBackend.PARAMS,
        "usearch": UsearchBackend.PARAMS,
        "milvus": MilvusBackend.PARAMS,
    }[kind]
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in allowed:
            valid = ", ".join(repr(k) for k in allowed) or "none"
            raise ValueError(f"index_params: unknown key {key!r} for index={kind!r} (valid: {valid})")
        name = f"index_params[{key!r}]"
        if key in ("uri", "collection") and (not isinstance(value, str) or not value):
            raise ValueError(f"{name}: expected a non-empty str, got {value!r}")
        if key == "collection" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", value):
            raise ValueError(
                f"{name}: expected letters, digits and _ (not starting with a digit), got {value!r}"
            )
        if key in ("uri", "collection"):
            out[key] = value
        elif key == "index_type":
            out[key] = check_choice(value, _MILVUS_INDEXES, name)
        elif key == "quantization":
            out[key] = check_choice(value, _QUANTIZATIONS, name)
        elif key == "rerank":
            out[key] = check_non_negative_int(value, name)
        else:
            out[key] = check_positive_int(value, name)
    return out
