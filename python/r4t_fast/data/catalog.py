"""The item catalog: string ids, text, category and metadata per item, plus an L2-normalised embedding
matrix searched by exact fused kNN (``index="exact"``) or a usearch HNSW graph (``index="usearch"``).

On disk (``Catalog.save(dir)``)::

    dir/manifest.json          format version, sizes, dtype, index kind, sha256 + size of every file
    dir/embeddings.safetensors "embeddings": (N, d) float32 or float16
    dir/items.jsonl            one {"id", "text", "category", "meta"} object per row, in row order
    dir/index.usearch          optional HNSW graph (keys = row numbers)

Every file is written to a temporary name and renamed into place, the manifest last, so a crash never
leaves a catalog that loads silently wrong: ``Catalog.load`` verifies every checksum and refuses a
truncated or edited file with :class:`CatalogError`.

Item ids are the stable identity: ``add`` refuses duplicates and ``remove`` deletes rows without
renaming anything; row numbers (the ``ids`` returned by :meth:`search`) are positions in the current
catalog and shift after a removal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from r4t_fast._internal import atomic_write, atomic_write_text, check_positive_int, sha256_file, unit_rows
from r4t_fast.kernels import ops
from r4t_fast.kernels._arrays import as_tensor, check_finite, describe, to_library

__all__ = ["Catalog", "CatalogError"]

FORMAT_VERSION = 1
_INDEX_KINDS = ("exact", "usearch")
_STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class CatalogError(ValueError):
    """A catalog file is missing, truncated, edited or inconsistent."""


def _normalize(e: torch.Tensor) -> torch.Tensor:
    """``unit_rows(e)``, refusing zero rows (a catalog item must have a direction)."""
    zero = (e.norm(dim=1) == 0).nonzero()
    if len(zero):
        raise ValueError(f"embeddings: row {int(zero[0, 0])} has zero norm and cannot be L2-normalised")
    return unit_rows(e)


class Catalog:
    """A fixed set of items with embeddings, searchable by inner product (cosine on unit vectors).

    Args:
        ids: unique string id per item (N,).
        embeddings: float (N, d) array (torch, numpy); L2-normalised here unless ``normalize=False``
            (then rows must already be unit-norm within 1e-3).
        texts, categories, metadata: optional per-item text, category (str or None) and JSON-able dict.
        dtype: storage dtype of the embedding matrix, ``"float32"`` or ``"float16"`` (search always
            accumulates in float32).
        index: ``"exact"`` (fused brute force, the default) or ``"usearch"`` (HNSW; built on first
            search or with :meth:`build_index`).
    """

    def __init__(
        self,
        ids: Sequence[str],
        embeddings: Any,
        texts: Sequence[str] | None = None,
        categories: Sequence[str | None] | None = None,
        metadata: Sequence[dict] | None = None,
        *,
        dtype: str = "float32",
        normalize: bool = True,
        index: str = "exact",
        index_params: dict | None = None,
    ) -> None:
        if dtype not in _STORE_DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_STORE_DTYPES)}, got {dtype!r}")
        if index not in _INDEX_KINDS:
            raise ValueError(f"index: expected one of {list(_INDEX_KINDS)}, got {index!r}")
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.categories: list[str | None] = []
        self.metadata: list[dict] = []
        self._pos: dict[str, int] = {}
        self._dtype = _STORE_DTYPES[dtype]
        self.index_kind = index
        self.index_params = dict(index_params or {})
        self._index = None
        e = self._check_embeddings(embeddings, len(ids), None, normalize)
        self.embeddings = torch.empty((0, e.shape[1]), dtype=self._dtype)
        self._append(ids, e, texts, categories, metadata)

    # ------------------------------------------------------------------ construction helpers
    def _check_embeddings(self, embeddings: Any, n: int, dim: int | None, normalize: bool) -> torch.Tensor:
        e, _ = as_tensor(embeddings, "embeddings")
        if e.dim() != 2 or not e.is_floating_point():
            raise ValueError(f"embeddings: expected a float (N, d) matrix, got {describe(e)}")
        if e.shape[0] != n:
            raise ValueError(f"embeddings: expected {n} rows (one per id), got {describe(e)}")
        if dim is not None and e.shape[1] != dim:
            raise ValueError(f"embeddings: expected dimension {dim}, got {describe(e)}")
        if e.shape[1] == 0:
            raise ValueError(f"embeddings: dimension must be >= 1, got {describe(e)}")
        e = e.detach().to("cpu", torch.float32)
        check_finite(e, "embeddings")
        if normalize:
            e = _normalize(e)
        elif e.shape[0] and float((e.norm(dim=1) - 1).abs().max()) > 1e-3:
            raise ValueError("embeddings: rows must be unit-norm when normalize=False")
        return e.contiguous()

    def _append(self, ids, e, texts, categories, metadata) -> None:
        n = len(ids)
        ids = [self._check_id(i, j) for j, i in enumerate(ids)]
        seen: set[str] = set()
        for i in ids:
            if i in self._pos or i in seen:
                raise ValueError(f"ids: duplicate item id {i!r}")
            seen.add(i)
        texts = self._per_item(texts, n, "texts", "")
        categories = self._per_item(categories, n, "categories", None)
        metadata = self._per_item(metadata, n, "metadata", None)
        for j, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts: item {j} must be a str, got {type(t).__name__}")
        metadata = [dict(m) if m else {} for m in metadata]
        base = len(self.ids)
        self.ids.extend(ids)
        self.texts.extend(texts)
        self.categories.extend(categories)
        self.metadata.extend(metadata)
        for j, i in enumerate(ids):
            self._pos[i] = base + j
        self.embeddings = torch.cat([self.embeddings, e.to(self._dtype)], dim=0)
        self._index = None

    @staticmethod
    def _check_id(i: Any, j: int) -> str:
        if not isinstance(i, str) or not i:
            raise ValueError(f"ids: item {j} must be a non-empty str, got {i!r}")
        return i

    @staticmethod
    def _per_item(values, n: int, name: str, default):
        if values is None:
            return [default] * n
        values = list(values)
        if len(values) != n:
            raise ValueError(f"{name}: expected {n} entries (one per id), got {len(values)}")
        return values

    # ------------------------------------------------------------------ basic properties
    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"Catalog(n={len(self)}, dim={self.dim}, dtype={str(self._dtype).replace('torch.', '')}, "
            f"index={self.index_kind!r})"
        )

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def dtype(self) -> str:
        return "float16" if self._dtype == torch.float16 else "float32"

    def index_of(self, item_id: str) -> int:
        """Row number of ``item_id`` (KeyError naming the id if absent)."""
        try:
            return self._pos[item_id]
        except KeyError:
            raise KeyError(f"item_id: {item_id!r} is not in the catalog") from None

    def id_to_index(self, item_ids: Iterable[str]) -> np.ndarray:
        """Row numbers (int64) of several ids."""
        return np.array([self.index_of(i) for i in item_ids], dtype=np.int64)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._pos

    # ------------------------------------------------------------------ mutation
    def add(
        self,
        ids: Sequence[str],
        embeddings: Any,
        texts: Sequence[str] | None = None,
        categories: Sequence[str | None] | None = None,
        metadata: Sequence[dict] | None = None,
        *,
        normalize: bool = True,
    ) -> None:
        """Append items (new ids only). Existing ids and row numbers are unchanged."""
        e = self._check_embeddings(embeddings, len(ids), self.dim, normalize)
        self._append(ids, e, texts, categories, metadata)

    def remove(self, ids: Iterable[str]) -> None:
        """Delete items by id. Other items keep their ids; rows after a removed one move up."""
        drop = set()
        for i in ids:
            drop.add(self.index_of(i))
        if not drop:
            return
        keep = [j for j in range(len(self)) if j not in drop]
        idx = torch.tensor(keep, dtype=torch.int64)
        self.embeddings = self.embeddings.index_select(0, idx).contiguous()
        self.ids = [self.ids[j] for j in keep]
        self.texts = [self.texts[j] for j in keep]
        self.categories = [self.categories[j] for j in keep]
        self.metadata = [self.metadata[j] for j in keep]
        self._pos = {i: j for j, i in enumerate(self.ids)}
        self._index = None

    # ------------------------------------------------------------------ search
    def build_index(self, **params: Any) -> None:
        """Build the usearch HNSW graph over the current rows (params: connectivity, expansion_add,
        expansion_search, quantization ("f32", "f16", "i8"))."""
        from usearch.index import Index

        if len(self) == 0:
            raise ValueError("catalog: is empty; add items before building an index")
        p = {**self.index_params, **params}
        self.index_params = p
        idx = Index(
            ndim=self.dim,
            metric="ip",
            dtype=p.get("quantization", "f16" if self._dtype == torch.float16 else "f32"),
            connectivity=p.get("connectivity"),
            expansion_add=p.get("expansion_add"),
            expansion_search=p.get("expansion_search", 64),
        )
        idx.add(np.arange(len(self), dtype=np.uint64), self.embeddings.float().numpy())
        self._index = idx

    def search(self, queries: Any, k: int, *, exact: bool | None = None) -> tuple[Any, Any]:
        """Top-k items by inner product.

        Args:
            queries: float32 (B, d) (normalise them for cosine).
            k: results per query; slots past ``len(self)`` hold row -1 and score -inf.
            exact: force exact search (default: exact unless the catalog's index is ``"usearch"``).

        Returns:
            (scores float32 (B, k), rows int64 (B, k)) in the library of ``queries``; map rows to
            ids with ``[catalog.ids[r] for r in rows]``.
        """
        if len(self) == 0:
            raise ValueError("catalog: is empty; add items before searching")
        use_exact = exact if exact is not None else self.index_kind == "exact"
        q, lib = as_tensor(queries, "queries")
        check_finite(q, "queries")
        if use_exact:  # the catalog was validated when built: skip its finiteness pass
            return ops.knn(queries, self.embeddings, k, check_finite=False)
        if q.dim() != 2 or q.dtype != torch.float32 or q.shape[1] != self.dim:
            raise ValueError(f"queries: expected float32 (B, {self.dim}), got {describe(q)}")
        k = check_positive_int(k, "k")
        if self._index is None:
            self.build_index()
        B = q.shape[0]
        kk = min(k, len(self))
        scores = torch.full((B, k), -float("inf"), dtype=torch.float32)
        rows = torch.full((B, k), -1, dtype=torch.int64)
        if B:
            m = self._index.search(q.detach().cpu().numpy(), kk)
            keys = np.asarray(m.keys, dtype=np.int64).reshape(B, -1)
            dist = np.asarray(m.distances, dtype=np.float32).reshape(B, -1)
            counts = np.asarray(m.counts).reshape(B)
            for b in range(B):
                c = int(counts[b])
                rows[b, :c] = torch.from_numpy(keys[b, :c])
                scores[b, :c] = torch.from_numpy(1.0 - dist[b, :c])
        return to_library(scores, lib), to_library(rows, lib)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the catalog into directory ``path`` (created if needed), atomically per file, the
        manifest last. Returns the directory."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        files: dict[str, Any] = {}

        def record(name: str) -> None:
            p = d / name
            files[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}

        atomic_write(
            d / "embeddings.safetensors",
            lambda p: save_file({"embeddings": self.embeddings.contiguous()}, str(p)),
        )
        record("embeddings.safetensors")

        def write_items(p: Path) -> None:
            with open(p, "w", encoding="utf-8") as f:
                for i, t, c, m in zip(self.ids, self.texts, self.categories, self.metadata, strict=True):
                    f.write(json.dumps({"id": i, "text": t, "category": c, "meta": m}, ensure_ascii=False))
                    f.write("\n")

        atomic_write(d / "items.jsonl", write_items)
        record("items.jsonl")
        if self.index_kind == "usearch":
            if self._index is None:
                self.build_index()
            atomic_write(d / "index.usearch", lambda p: self._index.save(str(p)))
            record("index.usearch")
        manifest = {
            "format": "r4t_fast.catalog",
            "format_version": FORMAT_VERSION,
            "n": len(self),
            "dim": self.dim,
            "dtype": self.dtype,
            "index": self.index_kind,
            "index_params": self.index_params,
            "files": files,
        }
        atomic_write_text(d / "manifest.json", json.dumps(manifest, indent=2))
        return d

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True) -> Catalog:
        """Load a catalog saved by :meth:`save`, verifying sizes and sha256 checksums of every file."""
        d = Path(path)
        mpath = d / "manifest.json"
        if not mpath.is_file():
            raise CatalogError(f"path: no catalog at {d} (missing manifest.json)")
        try:
            manifest = json.loads(mpath.read_text())
            files = manifest["files"]
            n, dim, dtype, index = manifest["n"], manifest["dim"], manifest["dtype"], manifest["index"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CatalogError(f"{mpath}: corrupt manifest ({exc})") from exc
        if manifest.get("format") != "r4t_fast.catalog" or manifest.get("format_version") != FORMAT_VERSION:
            raise CatalogError(f"{mpath}: not an r4t_fast catalog of format version {FORMAT_VERSION}")
        for name in ["embeddings.safetensors", "items.jsonl"] + (
            ["index.usearch"] if index == "usearch" else []
        ):
            p = d / name
            if name not in files or not p.is_file():
                raise CatalogError(f"{p}: missing catalog file")
            if p.stat().st_size != files[name]["bytes"]:
                raise CatalogError(
                    f"{p}: size {p.stat().st_size} bytes, manifest says {files[name]['bytes']} (truncated?)"
                )
            if verify and sha256_file(p) != files[name]["sha256"]:
                raise CatalogError(f"{p}: checksum mismatch (file edited or corrupt)")
        try:
            emb = load_file(str(d / "embeddings.safetensors"))["embeddings"]
        except Exception as exc:  # safetensors raises several types on corrupt headers
            raise CatalogError(f"{d / 'embeddings.safetensors'}: unreadable ({exc})") from exc
        ids, texts, cats, metas = [], [], [], []
        with open(d / "items.jsonl", encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                try:
                    o = json.loads(line)
                    ids.append(o["id"])
                    texts.append(o["text"])
                    cats.append(o["category"])
                    metas.append(o["meta"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CatalogError(f"{d / 'items.jsonl'}:{ln}: malformed item ({exc})") from exc
        if emb.shape != (n, dim) or len(ids) != n:
            raise CatalogError(
                f"{d}: inconsistent sizes (manifest {n}x{dim}, "
                f"embeddings {tuple(emb.shape)}, items {len(ids)})"
            )
        cat = cls.__new__(cls)
        cat.ids, cat.texts, cat.categories, cat.metadata = ids, texts, cats, metas
        cat._pos = {i: j for j, i in enumerate(ids)}
        if len(cat._pos) != n:
            raise CatalogError(f"{d / 'items.jsonl'}: duplicate item ids")
        cat._dtype = _STORE_DTYPES[dtype]
        cat.embeddings = emb.to(cat._dtype).contiguous()
        cat.index_kind = index
        cat.index_params = manifest.get("index_params", {})
        cat._index = None
        if index == "usearch":
            from usearch.index import Index

            cat._index = Index.restore(str(d / "index.usearch"))
            if cat._index is None or len(cat._index) != n:
                raise CatalogError(f"{d / 'index.usearch'}: unreadable or does not match the catalog")
            cat._index.expansion_search = int(cat.index_params.get("expansion_search", 64))
        return cat
