"""Data preparation shared by training and evaluation: a dataset's catalog (embedded, cached on disk)
and its 8:1:1 split (saved once), bundled as :class:`EvalData`.

* **catalog**: every item of the dataset, embedded with the encoder and cached: embeddings in an
  :class:`~r4t_fast.data.encoders.EmbeddingCache` under ``<cache>/embeddings``, the built
  :class:`~r4t_fast.Catalog` under ``<cache>/catalogs/<name>-<hash>`` (the hash covers item ids, texts,
  categories and the encoder name). ``<cache>`` is ``$R4T_CACHE_DIR`` or ``~/.cache/r4t_fast``.
* **split**: :func:`r4t_fast.data.split_sets` 8:1:1 with ``seed``, saved once under ``<cache>/splits``
  and reloaded afterwards. A set's split depends only on its id and the seed.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r4t_fast.data.datasets import Dataset, load_dataset
from r4t_fast.data.splits import Split, load_split, save_split, split_sets

__all__ = ["EvalData", "build_catalog", "dataset_split", "load_eval_data"]


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from r4t_fast._internal import default_cache_dir

    return default_cache_dir()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"


# ----------------------------------------------------------------------------------------------------
# data: catalog + split, cached
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalData:
    """Everything an evaluation needs besides the method.

    Attributes:
        dataset: the loaded sets.
        catalog: ``r4t_fast.Catalog`` of ``dataset.catalog_items`` (row order = that list's order).
        encoder: the text encoder the catalog was embedded with.
        split: the 8:1:1 split of the dataset's sets.
        catalog_dir: where the catalog is cached (``None`` when built in memory only).
        split_path: where the split is saved (``None`` when not saved).
    """

    dataset: Dataset
    catalog: Any
    encoder: Any
    split: Split
    catalog_dir: Path | None = None
    split_path: Path | None = None


def _fingerprint(parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def build_catalog(
    dataset: Dataset,
    encoder: Any,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[Any, Path | None]:
    """The catalog of ``dataset.catalog_items`` embedded with ``encoder``, cached on disk.

    Returns:
        ``(catalog, catalog_dir)``; ``catalog.embeddings`` is float32 ``(N, encoder.dim)``, unit rows;
        ``catalog_dir`` is ``None`` when ``use_cache`` is False.
    """
    from r4t_fast.data.catalog import Catalog, CatalogError
    from r4t_fast.data.encoders import EmbeddingCache, encode_cached

    items = dataset.catalog_items
    if not items:
        raise ValueError(f"dataset: {dataset.name!r} has no items to build a catalog from")
    key = _fingerprint(
        [encoder.name, str(encoder.dim)] + [f"{it.item_id}\t{it.text}\t{it.category}" for it in items]
    )
    root = _cache_root(cache_dir)
    cat_dir = root / "catalogs" / f"{_safe(dataset.name)}-{key[:16]}" if use_cache else None
    if cat_dir is not None and (cat_dir / "manifest.json").is_file():
        try:
            cat = Catalog.load(cat_dir)
            if len(cat) == len(items) and cat.dim == encoder.dim:
                return cat, cat_dir
        except CatalogError as exc:
            print(f"r4t: rebuilding the cached catalog at {cat_dir}: {exc}", file=sys.stderr)
    texts = [it.text for it in items]
    cache = EmbeddingCache(root / "embeddings") if use_cache else None
    emb = encode_cached(encoder, texts, cache, batch_size=128, show_progress=progress)
    cat = Catalog([it.item_id for it in items], emb, texts, [it.category for it in items])
    if cat_dir is not None:
        cat.save(cat_dir)
    return cat, cat_dir


def dataset_split(
    dataset: Dataset,
    seed: int = 0,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> tuple[Split, Path | None]:
    """The deterministic 8:1:1 split of all of ``dataset``'s sets, saved once and reloaded afterwards.

    The file is ``<cache>/splits/<name>-<hash of the set ids>-seed<seed>.json``; a saved split whose ids
    do not match the dataset's is recomputed (the assignment of a set never changes: it depends only on
    its id and the seed).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    ids = sorted(s.set_id for s in dataset.sets)
    path = None
    if use_cache:
        key = _fingerprint(ids)[:16]
        path = _cache_root(cache_dir) / "splits" / f"{_safe(dataset.name)}-{key}-seed{seed}.json"
        if path.is_file():
            try:
                split = load_split(path)
                if sorted(split.train + split.val + split.test) == ids and split.seed == seed:
                    return split, path
            except ValueError:
                pass
    split = split_sets(dataset, seed=seed, ratios=(0.8, 0.1, 0.1))
    if path is not None:
        save_split(split, path)
    return split, path


def load_eval_data(
    dataset: str | os.PathLike[str] | Dataset,
    *,
    encoder: Any = "minilm",
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    extra_items: bool = True,
    use_cache: bool = True,
    progress: bool = True,
) -> EvalData:
    """Load a dataset, its cached catalog and its cached split.

    Args:
        dataset: ``"polyvore"``, ``"spotify"``, a ``sets.jsonl`` path or a loaded ``Dataset``.
        encoder: an encoder spec for :func:`r4t_fast.encoders.get_encoder` (``"minilm"``, ``"hashing:64"``,
            a path) or an encoder object.
        data_dir: where the named datasets live (default: :func:`r4t_fast.data.default_data_dir`).
        cache_dir: cache root (default ``$R4T_CACHE_DIR`` or ``~/.cache/r4t_fast``).
        seed: split seed.
        extra_items: Polyvore only: add the Polyvore-T test items to the catalog (about 10k more items).
        use_cache: read and write the catalog/split/embedding caches.
        progress: show the embedding progress bar.
    """
    if isinstance(dataset, Dataset):
        ds = dataset
    else:
        if not isinstance(dataset, (str, os.PathLike)):
            raise ValueError(
                f"dataset: expected a name, a .jsonl path or a Dataset, got {type(dataset).__name__}"
            )
        text = os.fspath(dataset)
        kwargs: dict[str, Any] = {}
        if text.lower() == "polyvore" and extra_items:
            kwargs["include_extra"] = True
        ds = load_dataset(text, data_dir, **kwargs)
    if isinstance(encoder, (str, os.PathLike)):
        from r4t_fast.data.encoders import get_encoder

        enc = get_encoder(encoder)
    elif hasattr(encoder, "encode") and hasattr(encoder, "dim") and hasattr(encoder, "name"):
        enc = encoder
    else:
        raise ValueError(
            "encoder: expected a spec such as 'minilm' or an encoder with .encode/.dim/.name, "
            f"got {encoder!r}"
        )
    catalog, cat_dir = build_catalog(ds, enc, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    split, split_path = dataset_split(ds, seed, cache_dir=cache_dir, use_cache=use_cache)
    return EvalData(ds, catalog, enc, split, cat_dir, split_path)
