"""What a server serves: an immutable snapshot (retriever + its live catalog), swapped atomically.

A :class:`Snapshot` is never changed after it is published. A catalog change (``POST /v1/catalog``) is
applied to a *copy* of the current catalog; the copy is saved crash-safely when the server persists its
catalog (``catalog_dir``), then published by one reference assignment. A batch reads the snapshot once
when it starts, so it sees the old catalog or the new one, never half of a change; a request that
arrives after a change was acknowledged runs in a later batch, on the new catalog.

:func:`run_batch` is the batched call of the micro-batcher: the queries of every request that shares
options are encoded once and retrieved in one call (one ``Retriever.retrieve_embeddings`` for ``r4t``,
one catalog search for ``dense``/``mmr``/``dpp``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r4t_fast._internal import unit_rows
from r4t_fast.data.catalog import Catalog
from r4t_fast.diffusion.retriever import Retriever
from r4t_fast.eval.baselines import dpp_greedy, mmr_select
from r4t_fast.serve.schemas import CatalogUpdate, Filter, RetrieveRequest

__all__ = ["ConflictError", "RequestError", "ServeState", "Snapshot", "copy_catalog", "run_batch"]

_MASK_CACHE = 64


class RequestError(ValueError):
    """A request the server cannot answer as asked (HTTP 400); the message names the field."""


class ConflictError(RequestError):
    """A request this server's configuration cannot serve (HTTP 409); the message names the field."""


def copy_catalog(cat: Catalog) -> Catalog:
    """An independent copy of an exact-index ``cat``, in O(N) pointer copies (no re-validation).

    Shares what a Catalog never changes in place: the embedding matrix (every change replaces the
    tensor), the item dicts (a change replaces a list entry) and the stateless exact backend; copies the
    per-item lists and the id -> row table, which ``add`` extends in place.
    """
    if cat.index_kind != "exact":
        raise ValueError(f"catalog: copy_catalog needs index='exact', got {cat.index_kind!r}")
    new = copy.copy(cat)
    new.ids, new.texts = list(cat.ids), list(cat.texts)
    new.categories, new.metadata = list(cat.categories), list(cat.metadata)
    new._pos = dict(cat._pos)  # the id -> row table (private to Catalog; extended in place by add)
    return new


@dataclass
class Snapshot:
    """One published state: the retriever grounding on ``catalog`` (never mutated once published)."""

    retriever: Retriever
    revision: int
    _categories: np.ndarray | None = None
    _masks: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def catalog(self) -> Catalog:
        return self.retriever.catalog

    def categories(self) -> np.ndarray:
        if self._categories is None:
            self._categories = np.array(
                ["" if c is None else c for c in self.catalog.categories], dtype=object
            )
        return self._categories

    def mask(self, flt: Filter | None, k: int) -> torch.Tensor | None:
        """The filter as a bool (N,) mask (cached per snapshot); RequestError when fewer than k pass."""
        if flt is None or flt == Filter():
            return None
        key = flt.key()
        with self._lock:
            hit = self._masks.get(key)
        if hit is None:
            hit = self._compile(flt)
            with self._lock:
                self._masks[key] = hit
                while len(self._masks) > _MASK_CACHE:
                    self._masks.popitem(last=False)
        if (n := int(hit.sum())) < k:
            raise RequestError(f"filter: only {n} catalog items pass the filter, fewer than k={k}")
        return hit

    def _compile(self, flt: Filter) -> torch.Tensor:
        cat = self.catalog
        m = np.ones(len(cat), dtype=bool)
        if flt.ids is not None:
            unknown = [i for i in flt.ids if i not in cat]
            if unknown:
                raise RequestError(f"filter.ids: {len(unknown)} unknown item ids, e.g. {unknown[0]!r}")
            sel = np.zeros(len(cat), dtype=bool)
            sel[cat.id_to_index(flt.ids)] = True
            m &= sel
        if flt.categories is not None:
            m &= np.isin(self.categories(), np.array(flt.categories, dtype=object))
        if flt.metadata:
            want = flt.metadata
            for j in np.flatnonzero(m):
                meta = cat.metadata[j]
                if any(
                    key not in meta or meta[key] != v or type(meta[key]) is not type(v)
                    for key, v in want.items()
                ):
                    m[j] = False
        return torch.from_numpy(m)


def _same(a: Any, b: Any) -> bool:
    """JSON equality without Python's ``True == 1``: a bool matches only a bool."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _item(snap: Snapshot, row: int, score: float, source: dict[str, Any]) -> dict[str, Any]:
    cat = snap.catalog
    return {
        "id": cat.ids[row],
        "text": cat.texts[row],
        "category": cat.categories[row],
        "score": float(score) if math.isfinite(score) else None,
        **source,
    }


def _r4t(snap: Snapshot, req: RetrieveRequest, q: np.ndarray, mask: torch.Tensor | None) -> list[dict]:
    opts = {k: getattr(req, k) for k in ("steps", "guidance", "seed", "anchor", "pull")}
    sets = snap.retriever.retrieve_embeddings(torch.from_numpy(q), req.k, allowed=mask, **opts)
    anchored = bool((req.anchor if req.anchor is not None else snap.retriever.defaults["anchor"]) > 0)
    out = []
    for s in sets:
        items = []
        for j, row in enumerate(s.item_indices.tolist()):
            score = float(s.scores[j]) if s.scores is not None else float("nan")
            rs = float(s.row_scores[j])
            src = {"source": "query", "rank": 0} if anchored and j == 0 else {"source": "row", "row": j}
            src["row_score"] = rs if math.isfinite(rs) else None
            items.append(_item(snap, row, score, src))
        out.append({"items": items})
    return out


def _query_side(snap: Snapshot, req: RetrieveRequest, q: np.ndarray, mask: torch.Tensor | None) -> list[dict]:
    """dense (the query's top k), mmr and dpp (re-ranking the query's top ``pool``)."""
    cat = snap.catalog
    qn = unit_rows(q.astype(np.float32))
    width = req.k if req.method == "dense" else min(max(req.pool, req.k), len(cat))
    scores, rows = cat.search(torch.from_numpy(qn), width, allowed=mask)
    scores, rows = scores.numpy(), rows.numpy()
    out = []
    for b in range(q.shape[0]):
        ok = rows[b] >= 0
        ids, rel = rows[b][ok], scores[b][ok].astype(np.float64)
        if req.method == "dense":
            pick = np.arange(min(req.k, len(ids)))
        else:
            e = cat.embeddings.index_select(0, torch.from_numpy(ids)).double().numpy()
            if req.method == "mmr":
                pick = mmr_select(rel, e @ e.T, req.k, req.mmr_lambda)
            else:  # the quality x similarity kernel of DPPBaseline
                r = np.exp(req.dpp_theta / (2.0 * (1.0 - req.dpp_theta)) * rel)
                pick = dpp_greedy(r[:, None] * (e @ e.T) * r[None, :], req.k)
                if len(pick) < req.k:  # kernel rank exhausted: fill by relevance
                    rest = np.setdiff1d(np.arange(len(ids)), pick)
                    pick = np.concatenate([pick, rest[: req.k - len(pick)]])
        items = [
            _item(snap, int(ids[p]), rel[p], {"source": "query", "rank": int(p)}) for p in np.asarray(pick)
        ]
        out.append({"items": items})
    return out


def run_batch(snap: Snapshot, req: RetrieveRequest, texts: list[str]) -> list[dict]:
    """One batched call for every query of the requests sharing ``req``'s options (``texts`` in order)."""
    r = snap.retriever
    if req.k > len(snap.catalog):
        raise RequestError(f"k: {req.k} exceeds the catalog size ({len(snap.catalog)})")
    mask = snap.mask(req.filter, req.k)
    q = np.asarray(r.encoder.encode(texts), dtype=np.float32)
    if req.method == "r4t":
        try:
            return _r4t(snap, req, q, mask)
        except ValueError as exc:  # the retriever's checks name the argument (anchor, pull, ...)
            raise RequestError(str(exc)) from None
    return _query_side(snap, req, q, mask)


class ServeState:
    """The published snapshot and the serialised catalog changes of one server.

    Args:
        retriever: the loaded retriever (its catalog is the starting catalog unless ``catalog_dir`` holds
            a saved one).
        model_path: shown in ``/v1/info``.
        catalog_dir: where accepted catalog changes are saved crash-safely (and loaded from at start);
            None keeps them in memory only.
    """

    def __init__(self, retriever: Retriever, *, model_path: str = "", catalog_dir: str | None = None) -> None:
        if retriever.encoder is None:
            raise ValueError("model: the retriever has no text encoder (encoder_spec); the server needs one")
        self.model_path = model_path
        self.catalog_dir = None if catalog_dir is None else Path(catalog_dir)
        if self.catalog_dir is not None and self.catalog_dir.exists():
            retriever = retriever.with_catalog(Catalog.load(self.catalog_dir))
        self.snapshot = Snapshot(retriever, 0)
        self._update_lock = threading.Lock()

    def apply(self, upd: CatalogUpdate) -> Snapshot:
        """Apply ``upd`` to a copy, persist it (when configured), publish it; returns the new snapshot.

        Raises RequestError naming the field when an id is unknown or duplicated (nothing changes)."""
        with self._update_lock:
            old = self.snapshot
            if old.catalog.index_kind != "exact":  # a copy would rebuild the graph / collection each time
                raise ConflictError(
                    f"catalog: live updates through the server need index='exact'; this catalog's index is "
                    f"{old.catalog.index_kind!r} (change it offline with Catalog.add / update / remove)"
                )
            cat = copy_catalog(old.catalog)
            enc = old.retriever.encoder
            try:
                if upd.remove:
                    cat.remove(upd.remove)
                if upd.update:
                    self._update(cat, upd, enc)
                if upd.add:
                    self._add(cat, upd, enc)
            except KeyError as exc:
                raise RequestError(str(exc.args[0]) if exc.args else str(exc)) from None
            except ValueError as exc:
                raise RequestError(str(exc)) from None
            if self.catalog_dir is not None:
                cat.save(self.catalog_dir)
            new = Snapshot(old.retriever.with_catalog(cat), old.revision + 1)
            self.snapshot = new  # the one atomic switch
            return new

    @staticmethod
    def _vectors(items: list, enc: Any, dim: int, field: str) -> np.ndarray:
        vecs = np.zeros((len(items), dim), dtype=np.float32)
        need = [j for j, it in enumerate(items) if it.embedding is None]
        if need:
            vecs[need] = np.asarray(enc.encode([items[j].text for j in need]), dtype=np.float32)
        for j, it in enumerate(items):
            if it.embedding is not None:
                if len(it.embedding) != dim:
                    raise RequestError(
                        f"{field}[{j}].embedding: expected {dim} numbers, got {len(it.embedding)}"
                    )
                vecs[j] = it.embedding
        return vecs

    def _add(self, cat: Catalog, upd: CatalogUpdate, enc: Any) -> None:
        items = upd.add
        vecs = self._vectors(items, enc, cat.dim, "add")
        cat.add(
            [it.id for it in items],
            vecs,
            texts=[it.text or "" for it in items],
            categories=[it.category for it in items],
            metadata=[it.metadata for it in items],
        )

    def _update(self, cat: Catalog, upd: CatalogUpdate, enc: Any) -> None:
        for it in upd.update:  # one field set at a time: only the given fields change
            vec = None
            if it.embedding is not None or it.text is not None:
                vec = self._vectors([it], enc, cat.dim, "update")
            cat.update(
                [it.id],
                vec,
                texts=None if it.text is None else [it.text],
                categories=None if it.category is None else [it.category],
                metadata=None if it.metadata is None else [it.metadata],
            )

    def info(self) -> dict[str, Any]:
        from r4t_fast.kernels._backend import build_info

        snap = self.snapshot
        cats = snap.categories()
        values, counts = np.unique(cats[cats != ""], return_counts=True)
        top = [str(v) for v in values[np.argsort(-counts, kind="stable")][:200]]
        return {
            "model": os.fspath(self.model_path),
            "config": json.loads(json.dumps(snap.retriever.config(), default=str)),
            "catalog": {
                "items": len(snap.catalog),
                "dim": snap.catalog.dim,
                "index": snap.catalog.index_kind,
                "revision": snap.revision,
                "categories": top,
            },
            "build_info": build_info(),
        }
