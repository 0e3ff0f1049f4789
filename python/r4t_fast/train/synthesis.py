"""Stage 2: sample the (tuned) fan-out policy many times per training query and store objective-aligned
(query embedding, target set) pairs for the diffusion stage.

For each training query the policy writes ``samples`` (n) fan-outs at ``temperature``, by default with
constrained decoding (:class:`r4t_fast.fanout.constrained.FanOutConstraint`: exactly ``k`` distinct
short subqueries, ``think`` off). Every fan-out is scored by the **training reward** of the RL stage
(:func:`r4t_fast.train.rl_setup._reward_function` over :func:`r4t_fast.fanout.rewards.build_reward`:
``reward="auto"`` is ``"wscr"`` when every query of the split has reference items, else ``"oar"``), and
the ``keep`` (m) best of each query are kept (all by default). Every kept fan-out yields

* ``cond``               (D,)   the query embedding (the diffusion condition);
* ``targets_items``      (k, D) embeddings of the grounded catalog items   (OAR targets);
* ``targets_subqueries`` (k, D) embeddings of the subquery texts           (WSCR targets);
* ``items``              (k,)   catalog rows of the grounded items (distinct, ``ops.ground_sets``);
* ``reward``             ()     the training reward of the fan-out.

A fan-out with fewer than ``k`` usable subqueries gets the raw query for its missing rows (the one
missing-row rule, :func:`r4t_fast.fanout.missing.fill_missing_rows`, as in RL and evaluation; grounding
still gives distinct items); one with fewer than ``min_subqueries`` is dropped and counted.

Output: ``shard-00000.safetensors``, ... (one per chunk of ``queries_per_shard`` queries, written
atomically; its metadata holds the queries and the chunk's counts), ``space.json`` (encoder and
dataset), ``synthesis.json`` (config, counts summed over every shard: ``sampled``, ``kept``,
``dropped_format``, ``dropped_filter``, ``dropped``). A rerun skips the shards that exist, so a killed
run loses at most the shard in flight.

Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE > 1``) rank ``r`` writes the shards ``i`` with
``i % world == r`` (:func:`r4t_fast.train.targets.rank_items`); rank 0 then waits for every shard and
writes ``space.json`` and ``synthesis.json`` alone (no process group is needed: a failing rank ends the
launch).

CLI: ``r4t synthesize --dataset polyvore --policy runs/x/rl/policy --out runs/x/synthesis``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from r4t_fast._internal import atomic_write, atomic_write_text, check_choice, check_positive_int, check_seed
from r4t_fast.train.targets import process_info, rank_items, stack_counts

__all__ = [
    "ScoredSamples",
    "SynthesisConfig",
    "sample_and_select",
    "shard_counts",
    "synthesize",
    "synthesize_queries",
]

COUNT_KEYS = ("sampled", "kept", "dropped_format", "dropped_filter", "dropped")
"""Per-shard counts (``dropped = dropped_format + dropped_filter``; ``sampled = kept + dropped``)."""


@dataclass
class SynthesisConfig:
    """Settings of a synthesis run."""

    policy: str = field(default="smollm2", metadata={"help": "policy spec: smollm2 or a local HF model dir"})
    samples: int = field(default=8, metadata={"help": "fan-outs sampled per training query, n (paper: 128)"})
    keep: int | None = field(
        default=None, metadata={"help": "keep the m best fan-outs per query by the reward (None: all n)"}
    )
    reward: str = field(
        default="auto",
        metadata={
            "help": "reward that ranks and is stored with each fan-out, as RL's task: 'oar', 'wscr', "
            "'mixed' or 'auto' (= 'wscr' when every query of the split has reference items, else 'oar')"
        },
    )
    mixed_weight: float = field(default=0.5, metadata={"help": "reward 'mixed': weight of the coverage term"})
    budget_per_row: int | None = field(
        default=None, metadata={"help": "WSCR items per subquery (None: the fair share, as RL)"}
    )
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature (paper: 0.9)"})
    k: int = field(default=10, metadata={"help": "subqueries per fan-out = rows per target set"})
    constrained: bool = field(
        default=True,
        metadata={"help": "constrained decoding: exactly k distinct short subqueries (fanout.constrained)"},
    )
    think: bool = field(default=False, metadata={"help": "ask for (and, constrained, force) a <think> block"})
    max_new_tokens: int = field(
        default=128,
        metadata={
            "help": "generation cap per fan-out (constrained: raised, with a warning, to the constraint's "
            "min_new_tokens; the constraint shares it among the k subqueries)"
        },
    )
    batch_size: int = field(default=16, metadata={"help": "sequences per generation batch"})
    min_subqueries: int = field(default=3, metadata={"help": "drop fan-outs with fewer usable subqueries"})
    max_queries: int | None = field(default=None, metadata={"help": "use at most this many training queries"})
    queries_per_shard: int = field(default=32, metadata={"help": "queries per output shard"})
    split: str = field(default="train", metadata={"help": "split whose queries are sampled"})
    seed: int = field(default=0, metadata={"help": "sampling seed (shard i uses seed + i)"})
    device: str = field(
        default="cpu", metadata={"help": "policy device: cpu or cuda (cuda:LOCAL_RANK when launched)"}
    )
    wait_poll_s: float = field(
        default=2.0, metadata={"help": "multi-process: seconds between rank 0's checks for the other shards"}
    )

    def __post_init__(self) -> None:
        for name in ("samples", "k", "max_new_tokens", "batch_size", "queries_per_shard", "min_subqueries"):
            setattr(self, name, check_positive_int(getattr(self, name), name))
        for name in ("keep", "max_queries", "budget_per_row"):
            if getattr(self, name) is not None:
                setattr(self, name, check_positive_int(getattr(self, name), name))
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature: expected a finite float > 0 for sampling, got {self.temperature}")
        if self.min_subqueries > self.k:
            raise ValueError(f"min_subqueries: must be <= k ({self.k}), got {self.min_subqueries}")
        if self.keep is not None and self.keep > self.samples:
            raise ValueError(f"keep: must be <= samples ({self.samples}), got {self.keep}")
        from r4t_fast.fanout.rewards import TASK_CHOICES

        check_choice(self.reward, TASK_CHOICES, "reward")
        for name in ("constrained", "think"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")


def _select(reward: np.ndarray, usable: np.ndarray, keep: int | None) -> list[int]:
    """Indices of the ``keep`` highest rewards among ``usable`` ones (ties: earlier sample first).

    >>> _select(np.array([0.1, 0.9, 0.5, 0.9]), np.array([True, True, True, False]), 2)
    [1, 2]
    """
    idx = [int(i) for i in np.flatnonzero(usable)]
    idx.sort(key=lambda i: -float(reward[i]))
    return sorted(idx if keep is None else idx[:keep])


@dataclass
class ScoredSamples:
    """Fan-outs sampled for a list of queries, scored by a reward and filtered (:func:`sample_and_select`).

    Attributes:
        flat: ``(query index, GenerationOutput)`` of every sample, query by query.
        scored: the reward's :class:`~r4t_fast.fanout.rewards.RewardBatch` over ``flat``.
        keep_rows: indices into ``flat`` of the kept samples (the ``keep`` best usable ones per query).
        counts: ``sampled``, ``kept``, ``dropped_format``, ``dropped_filter``, ``dropped``,
            ``generated_tokens``, ``finished`` (and ``generate_s`` when the policy times its calls).
    """

    flat: list[tuple[int, Any]]
    scored: Any
    keep_rows: list[int]
    counts: dict[str, Any]


def sample_and_select(
    queries: list[str],
    lm: Any,
    reward_fn: Any,
    *,
    k: int,
    samples: int,
    keep: int | None,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    constrained: Any = True,
    think: bool = False,
    min_subqueries: int = 1,
    references: list[list[int]] | None = None,
) -> ScoredSamples:
    """Reward-filtered sampling, shared by synthesis and expert iteration (``train.rl_expert``): ``samples``
    fan-outs per query from ``lm`` (``constrained``: a bool or a ``FanOutConstraint``), scored by
    ``reward_fn`` (a :class:`~r4t_fast.fanout.rewards.RewardFunction`; ``references`` are the queries'
    reference sets for coverage rewards), the ``keep`` best with at least ``min_subqueries`` usable
    subqueries kept per query (ties: earlier sample first)."""
    gens = lm.generate(
        queries,
        k=k,
        num_samples=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        constrained=constrained,
        think=think,
    )
    timing = getattr(lm, "last_timing", None)
    flat = [(qi, g) for qi, per_query in enumerate(gens) for g in per_query]
    refs = None if references is None else [references[qi] for qi, _ in flat]
    scored = reward_fn.score([g.text for _, g in flat], [queries[qi] for qi, _ in flat], refs)
    n_sub = np.array([min(len(s), k) for s in scored.subqueries])
    usable = n_sub >= min_subqueries
    counts: dict[str, Any] = {key: 0 for key in COUNT_KEYS}
    counts["sampled"] = len(flat)
    counts["dropped_format"] = int((~usable).sum())
    keep_rows: list[int] = []
    start = 0
    for per_query in gens:
        rows = np.arange(start, start + len(per_query))
        keep_rows += [int(rows[j]) for j in _select(scored.reward[rows], usable[rows], keep)]
        start += len(per_query)
    counts["kept"] = len(keep_rows)
    counts["dropped_filter"] = int(usable.sum()) - len(keep_rows)
    counts["dropped"] = counts["dropped_format"] + counts["dropped_filter"]
    counts["generated_tokens"] = int(sum(g.n_tokens for _, g in flat))
    counts["finished"] = int(sum(g.finished for _, g in flat))
    if timing is not None:
        counts["generate_s"] = float(timing.generate_s)
    return ScoredSamples(flat, scored, keep_rows, counts)


def synthesize_queries(
    queries: list[str],
    lm: Any,
    encoder: Any,
    catalog: Any,
    cfg: SynthesisConfig,
    seed: int,
    *,
    reward_fn: Any = None,
    references: list[list[int]] | None = None,
    max_new_tokens: int | None = None,
    cache: Any = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Sample, score, filter, embed and ground fan-outs for ``queries``. Returns (tensors, counts).

    ``reward_fn`` is a :class:`r4t_fast.fanout.rewards.RewardFunction` (default: OAR over ``catalog``);
    ``references`` the queries' reference sets (catalog rows), needed by WSCR/mixed rewards."""
    from r4t_fast.data.encoders import encode_cached
    from r4t_fast.fanout.missing import fill_missing_rows
    from r4t_fast.fanout.rewards import build_reward
    from r4t_fast.kernels import ops

    if reward_fn is None:
        reward_fn = build_reward("oar", catalog, encoder, k=cfg.k, cache=cache)
    sel = sample_and_select(
        queries, lm, reward_fn, k=cfg.k, samples=cfg.samples, keep=cfg.keep, temperature=cfg.temperature,
        max_new_tokens=max_new_tokens or cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed,
        constrained=cfg.constrained, think=cfg.think, min_subqueries=cfg.min_subqueries,
        references=references,
    )  # fmt: skip
    flat, scored, keep_rows, counts = sel.flat, sel.scored, sel.keep_rows, sel.counts
    D = encoder.dim
    if not keep_rows:
        return {
            "cond": torch.zeros((0, D)),
            "targets_items": torch.zeros((0, cfg.k, D)),
            "targets_subqueries": torch.zeros((0, cfg.k, D)),
            "items": torch.zeros((0, cfg.k), dtype=torch.int64),
            "reward": torch.zeros(0),
        }, counts
    keep_q = [flat[r][0] for r in keep_rows]
    rows_text = [
        fill_missing_rows(scored.subqueries[r][: cfg.k], queries[flat[r][0]], cfg.k) for r in keep_rows
    ]
    texts = [s for subs in rows_text for s in subs]
    uniq = list(dict.fromkeys([*texts, *queries]))
    emb = torch.from_numpy(np.asarray(encode_cached(encoder, uniq, cache), dtype=np.float32))
    pos = {t: i for i, t in enumerate(uniq)}
    s_emb = emb[torch.tensor([pos[t] for t in texts])].view(len(keep_rows), cfg.k, D)
    ids, _ = ops.ground_sets(s_emb.contiguous(), catalog.embeddings, check_finite=False)
    item_emb = catalog.embeddings.float()[ids.clamp_min(0)]
    cond = emb[torch.tensor([pos[queries[qi]] for qi in keep_q])]
    reward = torch.as_tensor(scored.reward[keep_rows], dtype=torch.float32)
    return {
        "cond": cond.contiguous(),
        "targets_items": item_emb.contiguous(),
        "targets_subqueries": s_emb.contiguous(),
        "items": ids.contiguous(),
        "reward": reward.contiguous(),
    }, counts


def shard_counts(path: str | os.PathLike) -> dict[str, Any] | None:
    """The counts a shard's metadata records (``None`` for shards written before they were recorded)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["counts"]) if "counts" in meta else None


def _reward_setup(cfg: SynthesisConfig, data: Any, cache_dir: str | None) -> Any:
    """The RL stage's reward of ``cfg.reward`` over ``data`` (one definition: ``rl_setup``)."""
    from r4t_fast.train.rl_config import RLConfig
    from r4t_fast.train.rl_setup import _reward_function

    others = [s for s in ("test", "val", "train") if s != cfg.split]
    rl = RLConfig(
        dataset="synthesis",
        train_split=cfg.split,
        eval_splits=others[:1],
        max_train_queries=cfg.max_queries,
        cache_dir=cache_dir,
        task=cfg.reward,
        mixed_weight=cfg.mixed_weight,
        budget_per_row=cfg.budget_per_row,
        k=cfg.k,
        constrained=cfg.constrained,
        think=cfg.think,
    )
    return _reward_function(rl, data)


def _wait_for(paths: list[Path], poll_s: float) -> None:
    while True:
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            return
        time.sleep(poll_s)


def synthesize(
    dataset: Any,
    out_dir: str | os.PathLike,
    cfg: SynthesisConfig,
    *,
    encoder: Any = "minilm",
    data_dir: str | None = None,
    cache_dir: str | None = None,
    lm: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run synthesis for the ``cfg.split`` queries of ``dataset`` into ``out_dir`` (resumable; rank ``r``
    of a multi-process launch writes its shards, rank 0 the summaries). Returns the summary (rank 0) or
    this rank's counts."""
    from r4t_fast.data.prepare import load_eval_data
    from r4t_fast.fanout.generation import FanOutLM
    from r4t_fast.fanout.policy import resolve_policy
    from r4t_fast.train.rl_setup import _split_rows, rollout_constraint

    proc = process_info()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_eval_data(dataset, encoder=encoder, data_dir=data_dir, cache_dir=cache_dir, progress=progress)
    rows = _split_rows(data, [cfg.split], cfg.max_queries)  # the RL stage's query rows
    if not rows:
        raise ValueError(f"dataset: no titled sets in split {cfg.split!r}")
    queries = [r["query"] for r in rows]
    references = [r["reference"] for r in rows]
    reward_fn = _reward_setup(cfg, data, cache_dir)
    if lm is None:
        device = cfg.device
        if device == "cuda" and proc.world > 1:
            device = f"cuda:{proc.local_rank}"
        lm = FanOutLM(resolve_policy(cfg.policy), device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, max_new = rollout_constraint(cfg, lm.tokenizer, cfg.max_new_tokens, "max_new_tokens")
    for w in caught:
        if proc.is_main:
            warnings.warn(str(w.message), stacklevel=2)
    space = {
        "encoder": data.encoder.name,
        "encoder_spec": os.fspath(encoder) if isinstance(encoder, (str, os.PathLike)) else None,
        "dim": data.encoder.dim,
        "dataset": data.dataset.name,
        "dataset_spec": os.fspath(dataset) if isinstance(dataset, (str, os.PathLike)) else None,
        "catalog_size": len(data.catalog),
        "catalog_dir": str(data.catalog_dir) if data.catalog_dir else None,
    }
    if proc.is_main:
        atomic_write_text(out / "space.json", json.dumps(space, indent=2))
    n_shards = (len(queries) + cfg.queries_per_shard - 1) // cfg.queries_per_shard
    paths = [out / f"shard-{i:05d}.safetensors" for i in range(n_shards)]
    mine = {"shards_written": 0, "shards_skipped": 0}
    t0 = time.perf_counter()
    for i in tqdm(rank_items(n_shards, proc), desc="synthesize", disable=not progress or not proc.is_main):
        if paths[i].is_file():
            mine["shards_skipped"] += 1
            continue
        lo, hi = i * cfg.queries_per_shard, (i + 1) * cfg.queries_per_shard
        tensors, counts = synthesize_queries(
            queries[lo:hi], lm, data.encoder, data.catalog, cfg, cfg.seed + i,
            reward_fn=reward_fn, references=references[lo:hi], max_new_tokens=max_new, cache=reward_fn.cache,
        )  # fmt: skip
        meta = {"queries": json.dumps(queries[lo:hi]), "counts": json.dumps(counts)}
        atomic_write(paths[i], lambda p, t=tensors, m=meta: save_file(t, str(p), metadata=m))
        mine["shards_written"] += 1
    mine_wall = time.perf_counter() - t0
    if not proc.is_main:
        return {"rank": proc.rank, "counts": mine, "wall_s": mine_wall}
    _wait_for(paths, cfg.wait_poll_s)
    per_shard = [shard_counts(p) for p in paths]
    totals = stack_counts([c for c in per_shard if c is not None])
    totals = {**{key: 0 for key in COUNT_KEYS}, **totals}
    totals["shards_without_counts"] = sum(c is None for c in per_shard)
    if proc.world == 1:
        totals.update(mine)
    wall = time.perf_counter() - t0
    summary = {
        "config": asdict(cfg),
        "reward": reward_fn.task,
        "max_new_tokens": max_new,
        "n_queries": len(queries),
        "n_shards": n_shards,
        "world_size": proc.world,
        "counts": totals,
        "rank0": {**mine, "wall_s": mine_wall},
        "tokens_per_answer": totals.get("generated_tokens", 0) / max(1, totals["sampled"]),
        "wall_s": wall,
        "space": space,
    }
    atomic_write_text(out / "synthesis.json", json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="polyvore | spotify | PATH.jsonl")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--encoder", default="minilm", help="text encoder spec (default: minilm)")
    p.add_argument(
        "--data-dir", default=None, help="data directory (default: $R4T_DATA_DIR or ../shared/data)"
    )
    p.add_argument("--cache-dir", default=None, help="cache directory (default: $R4T_CACHE_DIR)")
    ints = ("samples", "keep", "k", "max_new_tokens", "batch_size", "min_subqueries", "max_queries")
    ints += ("queries_per_shard", "seed", "budget_per_row")
    for f in fields(SynthesisConfig):
        flag, help_ = f"--{f.name.replace('_', '-')}", f.metadata.get("help")
        if f.name in ("constrained", "think"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        floats = ("temperature", "mixed_weight", "wait_poll_s")
        typ = int if f.name in ints else (float if f.name in floats else str)
        p.add_argument(flag, type=typ, default=f.default, help=help_)


def cli_main(args: argparse.Namespace) -> int:
    from r4t_fast.fanout.policy import check_policy_spec

    cfg = SynthesisConfig(**{f.name: getattr(args, f.name) for f in fields(SynthesisConfig)})
    check_policy_spec(cfg.policy, "--policy")  # before the encoder and the dataset are loaded
    check_seed(cfg.seed, "--seed")
    s = synthesize(
        args.dataset, args.out, cfg, encoder=args.encoder, data_dir=args.data_dir, cache_dir=args.cache_dir
    )
    print(json.dumps(s["counts"]), f"{s['wall_s']:.1f}s")
    return 0
