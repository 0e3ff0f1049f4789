"""Training pairs of the diffusion stage and the split of work between processes.

Where the (query embedding, k target rows) pairs of ``r4t train-diffusion`` come from, option ``targets``:

* ``"teacher"``: the synthesis shards of ``r4t synthesize`` (the tuned policy's grounded fan-outs);
* ``"reference"``: the dataset's own curated sets of the **train** split (never val or test): each titled
  set of ``n`` items gives ``reference_samples`` targets of ``k`` rows, a random subset (n >= k) or all
  of its items in a random order with the ``k - n`` remaining rows re-drawn from its items (n < k);
  the condition is the set's query embedded by the catalog's encoder (untitled sets are skipped);
* ``"both"``: the two concatenated (the counts of each are recorded).

:func:`process_info` reads the process rank and count that ``accelerate launch`` / ``torchrun`` set
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) without importing accelerate; :func:`rank_items` is the one
rule that splits work between them (item ``i`` goes to rank ``i % world``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from r4t_fast._internal import check_choice, check_k, check_positive_int

__all__ = [
    "TARGET_CHOICES",
    "ProcessInfo",
    "TrainingPairs",
    "process_info",
    "rank_items",
    "reference_targets",
    "stack_counts",
    "training_pairs",
]

TARGET_CHOICES = ("teacher", "reference", "both")
"""Sources of diffusion training targets (module docstring)."""


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in a multi-process launch (``world == 1``: a plain run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the summaries and the saved model."""
        return self.rank == 0


def process_info(env: dict[str, str] | None = None) -> ProcessInfo:
    """Rank, world size and local rank from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (as set by
    ``accelerate launch`` and ``torchrun``); ``ProcessInfo(0, 1, 0)`` when they are absent.

    >>> process_info({"RANK": "1", "WORLD_SIZE": "2"})
    ProcessInfo(rank=1, world=2, local_rank=1)
    >>> process_info({}).world
    1
    """
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", env.get("LOCAL_RANK", "0")))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(
            f"WORLD_SIZE/RANK/LOCAL_RANK: expected integers in the environment ({exc})"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK: expected 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    return ProcessInfo(rank, world, local)


def rank_items(n: int, info: ProcessInfo) -> list[int]:
    """Indices ``i < n`` this process owns: ``i % world == rank`` (all of them in a plain run).

    >>> rank_items(5, ProcessInfo(1, 2))
    [1, 3]
    """
    return list(range(info.rank, n, info.world))


@dataclass
class TrainingPairs:
    """Pairs ``cond (n, cond_dim) -> targets (n, k, d)`` with ``reward (n,)`` (``nan``: reference
    pairs), ``counts`` (pairs per source, sets used and skipped) and ``positives`` (n, P) int64: the
    catalog indices of each pair's whole reference set (``-1`` = padding; all ``-1`` for teacher pairs),
    what the rows' retrieval loss (:mod:`r4t_fast.train.row_loss`) covers; None when no pair has one;
    ``catalog`` (N, d): the item embeddings ``positives`` index."""

    cond: torch.Tensor
    targets: torch.Tensor
    reward: torch.Tensor
    counts: dict[str, int]
    positives: torch.Tensor | None = None
    catalog: torch.Tensor | None = None


def reference_targets(
    data: Any, k: int, samples: int = 4, *, seed: int = 0, split: str = "train"
) -> TrainingPairs:
    """``samples`` k-row targets per titled set of the ``split`` (only ``"train"`` is allowed) of
    ``data`` (a :class:`r4t_fast.data.prepare.EvalData`), rows = catalog item embeddings, cond = the
    set's query embedded by ``data.encoder`` (the catalog's)."""
    from r4t_fast.data.datasets import query_text

    if split != "train":
        raise ValueError(f"split: reference targets come from the train split only, got {split!r}")
    k = check_k(k)
    samples = check_positive_int(samples, "reference_samples")
    by_id = {s.set_id: s for s in data.dataset.sets}
    cat = data.catalog.embeddings.float()
    rng = np.random.default_rng(seed)
    queries: list[str] = []
    rows: list[np.ndarray] = []
    sets: list[np.ndarray] = []
    counts = {"sets": 0, "sets_untitled": 0, "sets_without_items": 0, "sets_short": 0}
    for set_id in data.split.train:
        s = by_id.get(set_id)
        if s is None or s.query is None:
            counts["sets_untitled"] += 1
            continue
        ids = np.asarray(data.catalog.id_to_index(s.item_ids), dtype=np.int64)
        ids = ids[ids >= 0]
        if ids.size == 0:
            counts["sets_without_items"] += 1
            continue
        counts["sets"] += 1
        counts["sets_short"] += int(ids.size < k)
        q = query_text(s)
        for _ in range(samples):
            if ids.size >= k:
                pick = rng.permutation(ids)[:k]
            else:  # every item once, the remaining rows re-drawn from the set's items
                pick = rng.permutation(np.concatenate([ids, rng.choice(ids, k - ids.size)]))
            rows.append(pick)
            sets.append(ids)
            queries.append(q)
    counts["reference"] = len(rows)
    d = cat.shape[1]
    if not rows:
        return TrainingPairs(torch.zeros(0, d), torch.zeros(0, k, d), torch.zeros(0), counts)
    uniq = list(dict.fromkeys(queries))
    emb = torch.from_numpy(np.asarray(data.encoder.encode(uniq), dtype=np.float32))
    pos = {q: i for i, q in enumerate(uniq)}
    cond = emb[torch.tensor([pos[q] for q in queries])]
    targets = cat[torch.from_numpy(np.stack(rows))]
    positives = torch.full((len(sets), max(len(s) for s in sets)), -1, dtype=torch.int64)
    for i, s in enumerate(sets):
        positives[i, : len(s)] = torch.from_numpy(s)
    return TrainingPairs(
        cond.contiguous(),
        targets.contiguous(),
        torch.full((len(rows),), float("nan")),
        counts,
        positives,
        cat,
    )


def training_pairs(
    targets: str,
    *,
    shards: dict[str, torch.Tensor] | None = None,
    data: Any = None,
    k: int | None = None,
    reference_samples: int = 4,
    min_reward: float | None = None,
    seed: int = 0,
) -> TrainingPairs:
    """The pairs of ``targets`` (:data:`TARGET_CHOICES`): teacher ``shards`` (:func:`load_shards`'s
    dict, filtered by ``min_reward``), the reference sets of ``data``'s train split, or both.

    ``k`` (rows of a reference target) defaults to the shards' set size, else 10; with ``"both"`` it
    must equal it. ``counts`` records ``teacher``, ``reference``, ``teacher_below_min_reward`` and the
    reference sets used / skipped."""
    targets = check_choice(targets, TARGET_CHOICES, "targets")
    parts: list[TrainingPairs] = []
    counts: dict[str, int] = {"teacher": 0, "reference": 0}
    if targets in ("teacher", "both"):
        if shards is None:
            raise ValueError(f"targets: {targets!r} needs the synthesis shards (--data)")
        cond, tgt, reward = shards["cond"], shards["targets"], shards["reward"]
        if min_reward is not None:
            keep = reward >= min_reward
            counts["teacher_below_min_reward"] = int((~keep).sum())
            cond, tgt, reward = cond[keep], tgt[keep], reward[keep]
        counts["teacher"] = int(cond.shape[0])
        parts.append(TrainingPairs(cond, tgt, reward, {}))
        if k is not None and targets == "both" and int(k) != tgt.shape[1]:
            raise ValueError(f"k: reference targets must match the shards' set size {tgt.shape[1]}, got {k}")
        k = int(tgt.shape[1]) if k is None else k
    if targets in ("reference", "both"):
        if data is None:
            raise ValueError(f"targets: {targets!r} needs the dataset (--dataset) for its reference sets")
        ref = reference_targets(data, 10 if k is None else k, reference_samples, seed=seed)
        counts.update(ref.counts)
        if parts and ref.cond.shape[0] and ref.cond.shape[1] != parts[0].cond.shape[1]:
            raise ValueError(
                f"dataset: its encoder gives {ref.cond.shape[1]}-d queries, the shards "
                f"{parts[0].cond.shape[1]}-d (use the synthesis encoder)"
            )
        parts.append(ref)
    return TrainingPairs(
        torch.cat([p.cond for p in parts]),
        torch.cat([p.targets for p in parts]),
        torch.cat([p.reward for p in parts]),
        counts,
        _cat_positives(parts),
        next((p.catalog for p in parts if p.catalog is not None), None),
    )


def _cat_positives(parts: Sequence[TrainingPairs]) -> torch.Tensor | None:
    """The parts' ``positives`` stacked, padded with -1 (teacher parts: all -1); None if none has any."""
    if all(p.positives is None for p in parts):
        return None
    width = max(p.positives.shape[1] for p in parts if p.positives is not None)
    out = torch.full((sum(len(p.cond) for p in parts), width), -1, dtype=torch.int64)
    at = 0
    for p in parts:
        if p.positives is not None:
            out[at : at + len(p.cond), : p.positives.shape[1]] = p.positives
        at += len(p.cond)
    return out


def stack_counts(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Key-wise sum of count dicts (numbers only; other values are ignored)."""
    out: dict[str, Any] = {}
    for row in rows:
        for key, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[key] = out.get(key, 0) + v
    return out
