"""The item catalog: string ids, text, category and metadata per item, plus an L2-normalised embedding
matrix searched by a grounding backend: the exact fused kernel (``index="exact"``, default) or a
usearch HNSW graph (``index="usearch"``), see :mod:`r4t_fast.data.backends`.

On disk (``Catalog.save(dir)``), a crash-safe saved directory (:func:`r4t_fast._internal.save_dir_atomically`:
``dir`` is a symlink to the hidden version ``.dir.v<N>``, switched atomically)::

    dir/manifest.json          format, version, n, dim, dtype, index kind + params, sha256 + size per file
    dir/embeddings.safetensors "embeddings": (N, d) float32 or float16
    dir/items.jsonl            one {"id", "text", "category", "meta"} object per row, in row order
    dir/index.usearch          the HNSW graph (usearch only)
    dir/index_keys.npy         the graph key of every row, int64 (N,) (usearch only)

A save killed at any point leaves the previous version loadable; ``Catalog.load`` verifies sizes and
sha256 checksums (``verify=False`` skips the checksums for trusted fast loads) and validates every
manifest field and every item, refusing anything else with :class:`CatalogError` naming the file, the
line or the field.

A live catalog: :meth:`Catalog.add`, :meth:`Catalog.update` and :meth:`Catalog.remove` change items
without retraining; a usearch graph is updated incrementally, so a new item is retrievable at once
and a removed one is never returned. Item ids are the stable identity; row numbers (what
:meth:`search` returns) are positions in the current catalog and shift after a removal.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from r4t_fast._internal import SavedDirError, save_dir_atomically, unit_rows, verify_dir
from r4t_fast.data._jsonl import json_data
from r4t_fast.data.backends import (
    BACKENDS,
    INDEX_KINDS,
    ExactBackend,
    SearchBackend,
    UsearchBackend,
    check_index_params,
)
from r4t_fast.kernels._arrays import as_tensor, check_finite, check_mask, describe, to_library

__all__ = ["Catalog", "CatalogError"]

FORMAT = "r4t_fast.catalog"
FORMAT_VERSION = 2
_READS_VERSIONS = (1, 2)  # 1: no index_keys.npy (graph keys were row numbers)
_STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_EXACT = ExactBackend()
_SAFETENSORS_DTYPES = {"F32": (torch.float32, np.float32), "F16": (torch.float16, np.float16)}


class CatalogError(SavedDirError):
    """A catalog file is missing, truncated, edited or inconsistent (also a ``ValueError``)."""


def _normalize(e: torch.Tensor) -> torch.Tensor:
    """``unit_rows(e)``, refusing zero rows (a catalog item must have a direction)."""
    zero = (e.norm(dim=1) == 0).nonzero()
    if len(zero):
        raise ValueError(f"embeddings: row {int(zero[0, 0])} has zero norm and cannot be L2-normalised")
    return unit_rows(e)


def _as_list(values: Any, name: str) -> list[Any]:
    """A per-item argument as a list: any iterable (a generator included) but a str/bytes/mapping."""
    if isinstance(values, (str, bytes, Mapping)):
        raise ValueError(
            f"{name}: expected a sequence with one entry per item, got a {type(values).__name__} "
            f"({values!r:.40}); wrap a single entry in a list"
        )
    if isinstance(values, (np.ndarray, torch.Tensor)) and values.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d sequence, got an array of shape {tuple(values.shape)}")
    try:
        return list(values)
    except TypeError:
        raise ValueError(
            f"{name}: expected a sequence with one entry per item, got {type(values).__name__}"
        ) from None


def _item_meta(m: Any, j: int) -> dict[str, Any]:
    if m is None:
        return {}
    if not isinstance(m, Mapping):
        raise ValueError(f"metadata: item {j} must be a dict or None, got {type(m).__name__} ({m!r:.40})")
    return json_data(m, f"metadata: item {j}")


def _mmap_safetensors(path: Path, name: str) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file, memory-mapped copy-on-write (pages load on demand)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    info = header[name]
    tdtype, ndtype = _SAFETENSORS_DTYPES[info["dtype"]]
    shape = tuple(info["shape"])
    begin = info["data_offsets"][0]
    if math.prod(shape) == 0:
        return torch.zeros(shape, dtype=tdtype)
    arr = np.memmap(path, dtype=ndtype, mode="c", offset=8 + header_len + begin, shape=shape)
    return torch.from_numpy(arr)


class Catalog:
    """A set of items with embeddings, searchable by inner product (cosine on unit vectors), that can
    change while it serves (add / update / remove) and be saved crash-safely.

    Args:
        ids: unique non-empty string id per item: a sequence (or any iterable) of str, not a str.
        embeddings: float (N, d) array (torch, numpy); L2-normalised here unless ``normalize=False``
            (then rows must already be unit-norm within 1e-3).
        texts, categories, metadata: optional per-item text (str), category (str or None) and
            metadata (a dict of JSON data, or None; numpy scalars/arrays are converted to Python
            numbers/lists, NaN/inf and non-JSON objects are refused so a save cannot fail later).
        dtype: storage dtype of the embedding matrix, ``"float32"`` or ``"float16"`` (search always
            accumulates in float32).
        index: the grounding backend: ``"exact"`` (fused brute force, the default) or ``"usearch"``
            (HNSW; built on first search or with :meth:`build_index`, then updated incrementally).
        index_params: backend parameters (usearch: ``connectivity``, ``expansion_add``,
            ``expansion_search``, ``quantization``, ``rerank``; see
            :class:`~r4t_fast.data.backends.UsearchBackend`).

    Live changes and when to retrain. :meth:`add`, :meth:`update` and :meth:`remove` take effect at once, in
    every search; persist them with :meth:`save` (crash-safe). They need no retraining while the new items
    come from the *same embedding model* and resemble what the retriever was trained on: the diffusion model
    generates points in the embedding space, and grounding maps them to whatever items exist now. Retrain (and
    re-embed everything) when the embedding model changes; retrain when a large share of the catalog changed
    since training (as a rule of thumb a quarter or more of the items), when new categories or item kinds
    appear that no training set contained, or when the evaluation on fresh sets drops. Rebuild a usearch graph
    (:meth:`build_index`) after many removals/updates (``index_changes``; say a quarter of the rows): deleted
    nodes stay as tombstones and slowly cost recall and memory.

    Each change replaces ``embeddings`` by a new tensor (a reader holding the old one keeps a consistent
    snapshot) and costs one copy of the matrix: batch changes. ``revision`` counts them, so a holder of
    derived state (a device copy, a mask) can tell when to refresh it. Mutations are not thread-safe with
    respect to each other or to a concurrent :meth:`search`; serialise them.
    """

    def __init__(
        self,
        ids: Iterable[str],
        embeddings: Any,
        texts: Iterable[str] | None = None,
        categories: Iterable[str | None] | None = None,
        metadata: Iterable[dict | None] | None = None,
        *,
        dtype: str = "float32",
        normalize: bool = True,
        index: str = "exact",
        index_params: dict | None = None,
    ) -> None:
        if dtype not in _STORE_DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_STORE_DTYPES)}, got {dtype!r}")
        if index not in INDEX_KINDS:
            raise ValueError(f"index: expected one of {list(INDEX_KINDS)}, got {index!r}")
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.categories: list[str | None] = []
        self.metadata: list[dict] = []
        self._pos: dict[str, int] = {}
        self._dtype = _STORE_DTYPES[dtype]
        self.index_kind = index
        self._backend: SearchBackend = BACKENDS[index](index_params)
        self.revision = 0
        ids = _as_list(ids, "ids")
        e = self._check_embeddings(embeddings, len(ids), None, normalize)
        self.embeddings = torch.empty((0, e.shape[1]), dtype=self._dtype)
        self._append(ids, e, texts, categories, metadata)
        self.revision = 0

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

    def _check_fields(
        self, n: int, texts: Any, categories: Any, metadata: Any, default_text: str | None = ""
    ) -> tuple[list[Any], list[Any], list[Any]]:
        """Validated per-item texts, categories and metadata (``None`` lists where not given)."""
        given = texts is not None
        texts = self._per_item(texts, n, "texts", default_text)
        categories = self._per_item(categories, n, "categories", None)
        metadata = self._per_item(metadata, n, "metadata", None)
        for j, t in enumerate(texts):
            if (given or t is not None) and not isinstance(t, str):  # load refuses a text that is not a str
                raise ValueError(f"texts: item {j} must be a str, got {type(t).__name__}")
        for j, c in enumerate(categories):
            if c is not None and not isinstance(c, str):
                raise ValueError(f"categories: item {j} must be a str or None, got {type(c).__name__}")
        metadata = [_item_meta(m, j) for j, m in enumerate(metadata)]
        return texts, categories, metadata

    def _append(self, ids: list[Any], e: torch.Tensor, texts: Any, categories: Any, metadata: Any) -> None:
        n = len(ids)
        ids = [self._check_id(i, j) for j, i in enumerate(ids)]
        seen: set[str] = set()
        for i in ids:
            if i in self._pos or i in seen:
                raise ValueError(f"ids: duplicate item id {i!r}")
            seen.add(i)
        texts, categories, metadata = self._check_fields(n, texts, categories, metadata)
        start = len(self.ids)
        embeddings = torch.cat([self.embeddings, e.to(self._dtype)], dim=0)
        self.ids.extend(ids)
        self.texts.extend(texts)
        self.categories.extend(categories)
        self.metadata.extend(metadata)
        for j, i in enumerate(ids):
            self._pos[i] = start + j
        self.embeddings = embeddings
        if n:
            self._backend.appended(self.embeddings, start)
            self.revision += 1

    @staticmethod
    def _check_id(i: Any, j: int) -> str:
        if not isinstance(i, str) or not i:
            raise ValueError(f"ids: item {j} must be a non-empty str, got {i!r}")
        return str(i)

    @staticmethod
    def _per_item(values: Any, n: int, name: str, default: Any) -> list[Any]:
        if values is None:
            return [default] * n
        values = _as_list(values, name)
        if len(values) != n:
            raise ValueError(f"{name}: expected {n} entries (one per id), got {len(values)}")
        return values

    def _writable(self) -> None:
        if self.read_only:
            raise ValueError("catalog: read-only (loaded with view=True); load with view=False to change it")

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

    @property
    def backend(self) -> SearchBackend:
        """The grounding backend (:class:`~r4t_fast.data.backends.SearchBackend`)."""
        return self._backend

    @property
    def index_params(self) -> dict[str, Any]:
        return dict(self._backend.params)

    @property
    def read_only(self) -> bool:
        """True for a catalog loaded with ``view=True`` (memory-mapped files): changes are refused."""
        return bool(getattr(self, "_read_only", False) or self._backend.read_only)

    @property
    def index_changes(self) -> int:
        """Rows removed or updated since the usearch graph was built (0 for the exact backend)."""
        return int(getattr(self._backend, "changes", 0))

    def index_of(self, item_id: str) -> int:
        """Row number of ``item_id`` (KeyError naming the id if absent)."""
        try:
            return self._pos[item_id]
        except (KeyError, TypeError):
            raise KeyError(f"item_id: {item_id!r} is not in the catalog") from None

    def id_to_index(self, item_ids: Iterable[str]) -> np.ndarray:
        """Row numbers (int64) of several ids."""
        return np.array([self.index_of(i) for i in _as_list(item_ids, "item_ids")], dtype=np.int64)

    def __contains__(self, item_id: object) -> bool:
        try:
            return item_id in self._pos
        except TypeError:  # unhashable
            return False

    # ------------------------------------------------------------------ mutation
    def add(
        self,
        ids: Iterable[str],
        embeddings: Any,
        texts: Iterable[str] | None = None,
        categories: Iterable[str | None] | None = None,
        metadata: Iterable[dict | None] | None = None,
        *,
        normalize: bool = True,
    ) -> None:
        """Append items (new ids only; embeddings (M, d) of the catalog's dimension). Existing ids and
        row numbers are unchanged; the new items are searchable at once. Validated completely before
        anything changes."""
        self._writable()
        ids = _as_list(ids, "ids")
        e = self._check_embeddings(embeddings, len(ids), self.dim, normalize)
        self._append(ids, e, texts, categories, metadata)

    def update(
        self,
        ids: Iterable[str],
        embeddings: Any = None,
        *,
        texts: Iterable[str] | None = None,
        categories: Iterable[str | None] | None = None,
        metadata: Iterable[dict | None] | None = None,
        normalize: bool = True,
    ) -> None:
        """Change existing items in place (same ids, same rows): any of a new embedding (M, d), text,
        category and metadata (each a sequence with one entry per id). Validated completely before
        anything changes; the usearch graph is updated incrementally."""
        self._writable()
        ids = _as_list(ids, "ids")
        rows = []
        seen: set[str] = set()
        for j, i in enumerate(ids):
            i = self._check_id(i, j)
            if i in seen:
                raise ValueError(f"ids: {i!r} is given twice")
            seen.add(i)
            rows.append(self.index_of(i))
        n = len(rows)
        e = None if embeddings is None else self._check_embeddings(embeddings, n, self.dim, normalize)
        t, c, m = self._check_fields(n, texts, categories, metadata, default_text=None)
        if texts is not None:
            for r, v in zip(rows, t, strict=True):
                self.texts[r] = v
        if categories is not None:
            for r, v in zip(rows, c, strict=True):
                self.categories[r] = v
        if metadata is not None:
            for r, v in zip(rows, m, strict=True):
                self.metadata[r] = v
        if e is not None and n:
            idx = torch.tensor(rows, dtype=torch.int64)
            embeddings = self.embeddings.clone()
            embeddings.index_copy_(0, idx, e.to(self._dtype))
            self.embeddings = embeddings
            self._backend.updated(self.embeddings, np.asarray(rows, dtype=np.int64))
        if n:
            self.revision += 1

    def remove(self, ids: Iterable[str]) -> None:
        """Delete items by id (KeyError naming the first unknown id; then nothing is removed). Other
        items keep their ids; rows after a removed one move up. A removed item is never returned."""
        self._writable()
        drop = {self.index_of(i) for i in _as_list(ids, "ids")}
        if not drop:
            return
        keep = np.array([j for j in range(len(self)) if j not in drop], dtype=np.int64)
        self.embeddings = self.embeddings.index_select(0, torch.from_numpy(keep)).contiguous()
        self.ids = [self.ids[j] for j in keep]
        self.texts = [self.texts[j] for j in keep]
        self.categories = [self.categories[j] for j in keep]
        self.metadata = [self.metadata[j] for j in keep]
        self._pos = {i: j for j, i in enumerate(self.ids)}
        self._backend.removed(keep)
        self.revision += 1

    # ------------------------------------------------------------------ filters
    def filter_mask(self, allowed: Any) -> torch.Tensor:
        """Compile a query-time filter to a bool (N,) mask over the current rows (do it once and pass
        the mask to many searches; recompile after a change: see ``revision``).

        Args:
            allowed: a bool (N,) array or tensor (returned as a CPU tensor); an iterable of item ids
                (unknown ids raise KeyError); or a predicate ``f(category, metadata) -> bool`` called
                once per item.
        """
        n = len(self)
        if isinstance(allowed, (torch.Tensor, np.ndarray)):
            t, _ = as_tensor(allowed, "allowed")
            return check_mask(t.cpu(), "allowed", n, torch.empty(0))
        if callable(allowed):
            out = torch.zeros(n, dtype=torch.bool)
            for j, (c, m) in enumerate(zip(self.categories, self.metadata, strict=True)):
                v = allowed(c, m)
                if not isinstance(v, (bool, np.bool_)):
                    raise ValueError(
                        f"allowed: the predicate must return a bool, got {type(v).__name__} "
                        f"for item {self.ids[j]!r}"
                    )
                out[j] = bool(v)
            return out
        rows = self.id_to_index(_as_list(allowed, "allowed"))
        out = torch.zeros(n, dtype=torch.bool)
        out[torch.from_numpy(rows)] = True
        return out

    # ------------------------------------------------------------------ search
    def build_index(self, **params: Any) -> None:
        """(Re)build the usearch HNSW graph over the current rows (``index="usearch"`` catalogs only);
        ``params`` update ``index_params`` (connectivity, expansion_add, expansion_search,
        quantization ("f32", "f16", "bf16", "i8"), rerank)."""
        if not isinstance(self._backend, UsearchBackend):
            raise ValueError(f"build_index: the catalog's index is {self.index_kind!r}; use index='usearch'")
        self._writable()
        if len(self) == 0:
            raise ValueError("catalog: is empty; add items before building an index")
        self._backend.params = check_index_params("usearch", {**self._backend.params, **params})
        self._backend.build(self.embeddings)

    def search(
        self, queries: Any, k: int, *, exact: bool | None = None, allowed: Any = None
    ) -> tuple[Any, Any]:
        """Top-k items by inner product.

        Args:
            queries: float32 (B, d) (normalise them for cosine).
            k: results per query (an int >= 1); slots past the available items hold row -1 and
                score -inf.
            exact: force exact search (default: the catalog's backend).
            allowed: a query-time filter, anything :meth:`filter_mask` accepts (a bool (N,) mask is
                cheapest): only allowed rows are returned, k of them when that many exist.

        Returns:
            (scores float32 (B, k), rows int64 (B, k)) in the library of ``queries``, best first; map
            rows to ids with ``[catalog.ids[r] for r in rows]``.
        """
        if len(self) == 0:
            raise ValueError("catalog: is empty; add items before searching")
        q, lib = as_tensor(queries, "queries")
        if q.dim() != 2 or q.dtype != torch.float32 or q.shape[1] != self.dim:
            raise ValueError(f"queries: expected float32 (B, {self.dim}), got {describe(q)}")
        check_finite(q, "queries")
        mask = None if allowed is None else self.filter_mask(allowed)
        use_exact = exact if exact is not None else self.index_kind == "exact"
        backend = _EXACT if use_exact else self._backend
        s, r = backend.search(self.embeddings, q.detach().cpu(), k, allowed=mask)
        return to_library(s, lib), to_library(r, lib)

    # ------------------------------------------------------------------ persistence
    def _item_lines(self) -> Iterable[bytes]:
        for j, (i, t, c, m) in enumerate(
            zip(self.ids, self.texts, self.categories, self.metadata, strict=True)
        ):
            if not isinstance(t, str):  # texts edited after add: never write what load refuses
                raise ValueError(f"texts: item {j} ({i!r}) must be a str, got {type(t).__name__}")
            o = {"id": i, "text": t, "category": c, "meta": m}
            try:
                line = json.dumps(o, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError, RecursionError):  # metadata changed after it was added
                _item_meta(m, j)  # names the offending entry
                raise
            try:
                yield line.encode("utf-8") + b"\n"
            except UnicodeEncodeError:  # a lone surrogate: \u-escape it
                yield json.dumps(o, allow_nan=False).encode("ascii") + b"\n"

    def save(self, path: str | os.PathLike, *, keep: int = 2) -> Path:
        """Save into directory ``path``, crash-safely: the new version is written beside the old one
        (every file fsynced and checksummed) and switched in by one atomic rename, so a save that
        fails or is killed at any point leaves the previous version loadable (see
        :func:`r4t_fast._internal.save_dir_atomically`; ``keep`` versions stay on disk). Returns ``path``."""
        meta = {
            "n": len(self),
            "dim": self.dim,
            "dtype": self.dtype,
            "index": self.index_kind,
            "index_params": self.index_params,
            "index_changes": self.index_changes,
        }

        def write(tmp: Path) -> None:
            save_file({"embeddings": self.embeddings.contiguous()}, str(tmp / "embeddings.safetensors"))
            with open(tmp / "items.jsonl", "wb") as f:
                f.writelines(self._item_lines())
            self._backend.save(tmp, self.embeddings)

        return save_dir_atomically(
            path, write, format=FORMAT, format_version=FORMAT_VERSION, meta=meta, keep=keep
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True, view: bool = False) -> Catalog:
        """Load a catalog saved by :meth:`save`.

        Args:
            path: the catalog directory.
            verify: compare the sha256 checksum of every file (sizes, manifest fields and items are
                always checked); ``False`` only for trusted fast loads.
            view: memory-map the embeddings and the usearch graph (pages shared between processes,
                read on demand; with ``verify=False`` for a near-instant load), read-only serving.

        Raises:
            CatalogError: naming the file and the field or line at fault.
        """
        shown = Path(path)
        m = verify_dir(
            shown, format=FORMAT, format_versions=_READS_VERSIONS, verify=verify, error=CatalogError
        )
        d, mpath = m.path, shown / "manifest.json"

        def field(name: str, ok: Callable[[Any], bool], expected: str) -> Any:
            value = m.meta.get(name)
            if not ok(value):
                raise CatalogError(f"{mpath}: field {name!r}: expected {expected}, got {value!r}")
            return value

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        n = field("n", lambda v: is_int(v) and v >= 0, "a non-negative int")
        dim = field("dim", lambda v: is_int(v) and v >= 1, "a positive int")
        dtype = field(
            "dtype", lambda v: isinstance(v, str) and v in _STORE_DTYPES, f"one of {sorted(_STORE_DTYPES)}"
        )
        index = field(
            "index", lambda v: isinstance(v, str) and v in INDEX_KINDS, f"one of {list(INDEX_KINDS)}"
        )
        raw_params = field("index_params", lambda v: v is None or isinstance(v, dict), "an object")
        try:
            params = check_index_params(index, raw_params)
        except ValueError as exc:
            raise CatalogError(f"{mpath}: field 'index_params': {exc}") from None
        needed = ["embeddings.safetensors", "items.jsonl"]
        if index == "usearch":
            needed.append("index.usearch")
            if m.format_version >= 2:
                needed.append("index_keys.npy")
        for name in needed:
            if name not in m.files:
                raise CatalogError(f"{mpath}: field 'files': no entry for {name!r}")

        emb = cls._load_embeddings(d / "embeddings.safetensors", shown / "embeddings.safetensors", view)
        if emb.dtype != _STORE_DTYPES[dtype]:
            raise CatalogError(
                f"{shown / 'embeddings.safetensors'}: dtype {str(emb.dtype).replace('torch.', '')}, "
                f"manifest field 'dtype' says {dtype}"
            )
        if tuple(emb.shape) != (n, dim):
            raise CatalogError(
                f"{shown / 'embeddings.safetensors'}: shape {tuple(emb.shape)}, manifest fields 'n', 'dim' "
                f"say ({n}, {dim})"
            )
        ids, texts, cats, metas = cls._load_items(d / "items.jsonl", shown / "items.jsonl", n)

        cat = cls.__new__(cls)
        cat.ids, cat.texts, cat.categories, cat.metadata = ids, texts, cats, metas
        cat._pos = {i: j for j, i in enumerate(ids)}
        cat._dtype = _STORE_DTYPES[dtype]
        cat.embeddings = emb if view else emb.contiguous()
        cat.index_kind = index
        cat.revision = 0
        cat._read_only = view
        try:
            cat._backend = BACKENDS[index].load(d, n, dim, params, view=view)
        except CatalogError:
            raise
        except ValueError as exc:
            raise CatalogError(str(exc).replace(str(d), str(shown))) from None
        changes = m.meta.get("index_changes", 0)
        if hasattr(cat._backend, "changes") and isinstance(changes, int) and not isinstance(changes, bool):
            cat._backend.changes = max(0, changes)
        return cat

    @staticmethod
    def _load_embeddings(path: Path, shown: Path, view: bool) -> torch.Tensor:
        try:
            if view:
                return _mmap_safetensors(path, "embeddings")
            tensors = load_file(str(path))
            if set(tensors) != {"embeddings"}:
                raise CatalogError(f"{shown}: expected one tensor 'embeddings', got {sorted(tensors)}")
            return tensors["embeddings"]
        except CatalogError:
            raise
        except Exception as exc:  # safetensors raises several types on corrupt headers
            raise CatalogError(f"{shown}: unreadable ({type(exc).__name__}: {exc})") from None

    @staticmethod
    def _load_items(path: Path, shown: Path, n: int) -> tuple[list[str], list[str], list[Any], list[dict]]:
        ids: list[str] = []
        texts: list[str] = []
        cats: list[str | None] = []
        metas: list[dict] = []
        first: dict[str, int] = {}
        with open(path, "rb") as f:
            for ln, raw in enumerate(f, 1):
                where = f"{shown}:{ln}"
                try:
                    o = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise CatalogError(f"{where}: not valid UTF-8 ({exc.reason})") from None
                except RecursionError:
                    raise CatalogError(f"{where}: malformed item (nested too deeply)") from None
                except ValueError as exc:
                    raise CatalogError(f"{where}: malformed item ({exc})") from None
                if not isinstance(o, dict):
                    raise CatalogError(f"{where}: expected a JSON object, got {type(o).__name__}")
                i, t, c, meta = o.get("id"), o.get("text"), o.get("category"), o.get("meta")
                if not isinstance(i, str) or not i:
                    raise CatalogError(f"{where}: field 'id': expected a non-empty str, got {i!r:.60}")
                if i in first:
                    raise CatalogError(f"{where}: field 'id': duplicate id {i!r} (first at line {first[i]})")
                if not isinstance(t, str):
                    raise CatalogError(f"{where}: field 'text': expected a str, got {t!r:.60}")
                if c is not None and not isinstance(c, str):
                    raise CatalogError(f"{where}: field 'category': expected a str or null, got {c!r:.60}")
                if not isinstance(meta, dict):
                    raise CatalogError(f"{where}: field 'meta': expected an object, got {meta!r:.60}")
                first[i] = ln
                ids.append(i)
                texts.append(t)
                cats.append(c)
                metas.append(meta)
        if len(ids) != n:
            raise CatalogError(f"{shown}: {len(ids)} items, manifest field 'n' says {n}")
        return ids, texts, cats, metas
