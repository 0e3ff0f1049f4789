"""Reproducible train/val/test splits of a dataset's sets, keyed by set id, and their JSON files.

A set's split depends only on its id and the seed (see :func:`split_sets`), so adding sets never moves
the others. :func:`save_split` / :func:`load_split` write and read the split file (format
``r4t_fast.split/1``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from r4t_fast._internal import atomic_write_text
from r4t_fast.data._jsonl import DataError, MissingDataError, _load_json, _type_name
from r4t_fast.data.datasets import Dataset, ItemSet

__all__ = ["SPLIT_NAMES", "Split", "load_split", "save_split", "split_sets"]

SPLIT_NAMES = ("train", "val", "test")
_SPLIT_FORMAT = "r4t_fast.split/1"


@dataclass(frozen=True)
class Split(Mapping[str, list[str]]):
    """Set ids per split; a read-only mapping ``{"train", "val", "test"} -> sorted list of set ids``.

    Also records how it was made: ``seed`` and ``ratios`` (train, val, test).
    """

    train: list[str]
    val: list[str]
    test: list[str]
    seed: int
    ratios: tuple[float, float, float]

    def __getitem__(self, key: str) -> list[str]:
        if key not in SPLIT_NAMES:
            raise KeyError(f"split: unknown split {key!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(SPLIT_NAMES)

    def __len__(self) -> int:
        return len(SPLIT_NAMES)

    def of(self, set_id: str) -> str:
        """The name of the split holding ``set_id``; ``KeyError`` if none does."""
        for name in SPLIT_NAMES:
            if set_id in getattr(self, name):
                return name
        raise KeyError(f"set_id: {set_id!r} is in no split")


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(r) for r in ratios)
    except (TypeError, ValueError):
        raise ValueError(f"ratios: expected three numbers (train, val, test), got {ratios!r}") from None
    if len(values) != 3 or any(not math.isfinite(r) or r < 0 for r in values):
        raise ValueError(f"ratios: expected three non-negative numbers (train, val, test), got {ratios!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"ratios: must sum to 1, got {ratios!r} (sum {sum(values)})")
    return values  # type: ignore[return-value]


def _unit_hash(seed: int, set_id: str) -> float:
    """A number in [0, 1) from sha256(f"{seed}:{set_id}") (first 8 bytes, big-endian)."""
    digest = hashlib.sha256(f"{seed}:{set_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_sets(
    sets: Dataset | Iterable[ItemSet | str],
    seed: int = 0,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
) -> Split:
    """Split sets into train/val/test by hashing each set id with the seed.

    A set goes to train if ``u < ratios[0]``, to val if ``u < ratios[0] + ratios[1]``, else to test,
    with ``u = int(sha256(f"{seed}:{set_id}")[:8]) / 2**64``. The assignment of a set depends only on
    its id and the seed (not on input order or on the other sets), so split sizes follow the ratios
    only approximately (binomially). Every list is sorted.

    Args:
        sets: a Dataset, ItemSets or set ids (pass ``dataset.query_sets`` to split only titled sets).
        seed: integer seed.
        ratios: (train, val, test) fractions, non-negative, summing to 1.

    Raises:
        ValueError: bad ratios or seed, or a set id given twice.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected int, got {type(seed).__name__}")
    r = _check_ratios(ratios)
    ids: list[str] = []
    for s in sets:
        if isinstance(s, ItemSet):
            ids.append(s.set_id)
        elif isinstance(s, str):
            ids.append(s)
        else:
            raise TypeError(f"sets: expected ItemSet or str elements, got {type(s).__name__}")
    dupes = [k for k, c in Counter(ids).items() if c > 1]
    if dupes:
        raise ValueError(f"sets: {len(dupes)} set id(s) given more than once, e.g. {dupes[0]!r}")
    out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for set_id in sorted(ids):
        u = _unit_hash(seed, set_id)
        name = "train" if u < r[0] else "val" if u < r[0] + r[1] else "test"
        out[name].append(set_id)
    return Split(out["train"], out["val"], out["test"], seed=seed, ratios=r)


def save_split(split: Split, path: str | os.PathLike[str]) -> None:
    """Write a split as JSON (format tag, seed, ratios, counts and the id lists); atomic replace."""
    if not isinstance(split, Split):
        raise TypeError(f"split: expected a Split (from split_sets/load_split), got {type(split).__name__}")
    doc = {
        "format": _SPLIT_FORMAT,
        "method": 'sha256(f"{seed}:{set_id}")[:8] / 2**64 against cumulative ratios',
        "seed": split.seed,
        "ratios": list(split.ratios),
        "counts": {name: len(split[name]) for name in SPLIT_NAMES},
        **{name: list(split[name]) for name in SPLIT_NAMES},
    }
    atomic_write_text(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def load_split(path: str | os.PathLike[str]) -> Split:
    """Read a split written by :func:`save_split`.

    Raises:
        MissingDataError: no such file.
        DataError: not a split file, or an id listed in two splits.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"path: split file {path} not found")
    doc = _load_json(path)
    if not isinstance(doc, dict) or doc.get("format") != _SPLIT_FORMAT:
        raise DataError(f"{path}: not a split file (expected 'format': {_SPLIT_FORMAT!r})")
    try:
        seed = doc["seed"]
        ratios = _check_ratios(doc["ratios"])
        lists = {name: doc[name] for name in SPLIT_NAMES}
    except (KeyError, ValueError) as exc:
        raise DataError(f"{path}: malformed split file ({exc})") from None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"{path}: 'seed' must be an integer, got {_type_name(seed)}")
    for name, ids in lists.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DataError(f"{path}: {name!r} must be a list of set id strings")
    counts = Counter(i for ids in lists.values() for i in ids)
    dupes = [k for k, c in counts.items() if c > 1]
    if dupes:
        raise DataError(f"{path}: {len(dupes)} set id(s) listed twice, e.g. {dupes[0]!r}")
    return Split(
        sorted(lists["train"]), sorted(lists["val"]), sorted(lists["test"]), seed=seed, ratios=ratios
    )
