"""The data room: datasets and their loaders, splits, the catalog, text encoders and the preparation
that training and evaluation share (catalog + split, cached).

- :mod:`~r4t_fast.data.datasets`: Polyvore, Spotify and any ``sets.jsonl``; ``query_text``;
- :mod:`~r4t_fast.data.splits`: reproducible train/val/test splits and their files;
- :mod:`~r4t_fast.data.catalog`: :class:`~r4t_fast.Catalog` (ids, texts, embeddings, save/load);
- :mod:`~r4t_fast.data.encoders`: text encoders (MiniLM, hashing), with
  :mod:`~r4t_fast.data.pca` (PCA) and :mod:`~r4t_fast.data.embedding_cache` (the embedding cache);
- :mod:`~r4t_fast.data.prepare`: :func:`load_eval_data` (a dataset's catalog and split, cached);
- :mod:`~r4t_fast.data.results`: :class:`RetrievalResult`, what every method returns.

The names of the old ``r4t_fast.data`` module are re-exported here.
"""

from __future__ import annotations

from r4t_fast.data.datasets import (
    DATA_DIR_ENV,
    DATASETS,
    DataError,
    Dataset,
    Item,
    ItemSet,
    MissingDataError,
    default_data_dir,
    load_dataset,
    load_jsonl,
    load_polyvore,
    load_spotify,
    query_text,
)
from r4t_fast.data.splits import SPLIT_NAMES, Split, load_split, save_split, split_sets

__all__ = [
    "DATA_DIR_ENV",
    "DATASETS",
    "SPLIT_NAMES",
    "DataError",
    "Dataset",
    "Item",
    "ItemSet",
    "MissingDataError",
    "Split",
    "default_data_dir",
    "load_dataset",
    "load_jsonl",
    "load_polyvore",
    "load_spotify",
    "load_split",
    "query_text",
    "save_split",
    "split_sets",
]
