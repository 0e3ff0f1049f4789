"""Stage 2: sample the (tuned) fan-out policy many times per training query and store objective-aligned
(query embedding, target set) pairs for the diffusion stage.

For each training query the policy writes ``samples`` fan-outs at ``temperature``; each fan-out's
subqueries are embedded and grounded to distinct catalog items. Every sample yields

* ``cond``               (D,)   the query embedding (the diffusion condition);
* ``targets_items``      (k, D) embeddings of the grounded catalog items   (OAR targets);
* ``targets_subqueries`` (k, D) embeddings of the subquery texts           (WSCR targets);
* ``items``              (k,)   catalog rows of the grounded items;
* ``reward``             ()     the composite OAR reward 0.6·g + 0.2·d + 0.2·a (r4t_fast.objectives).

A fan-out with fewer than ``k`` usable subqueries gets the raw query for its missing rows (the one
missing-row rule, :func:`r4t_fast.fanout.missing.fill_missing_rows`, as in RL and evaluation; grounding
still gives distinct items); one with fewer than ``min_subqueries`` is dropped and counted.

Output: ``shard-00000.safetensors``, ... (one per chunk of ``queries_per_shard`` queries, written
atomically), ``space.json`` (encoder and dataset), ``synthesis.json`` (config and counts). A rerun
skips the shards that exist, so a killed run loses at most the shard in flight.

CLI: ``r4t synthesize --dataset polyvore --policy runs/x/rl/policy --out runs/x/synthesis``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from r4t_fast._internal import atomic_write, check_positive_int

__all__ = ["SynthesisConfig", "synthesize"]


@dataclass
class SynthesisConfig:
    """Settings of a synthesis run."""

    policy: str = field(default="smollm2", metadata={"help": "policy spec: smollm2 or a local HF model dir"})
    samples: int = field(default=8, metadata={"help": "fan-outs per training query (paper: 128)"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature (paper: 0.9)"})
    k: int = field(default=10, metadata={"help": "subqueries per fan-out = rows per target set"})
    max_new_tokens: int = field(default=160, metadata={"help": "generation cap per fan-out"})
    batch_size: int = field(default=16, metadata={"help": "sequences per generation batch"})
    min_subqueries: int = field(default=3, metadata={"help": "drop fan-outs with fewer usable subqueries"})
    max_queries: int | None = field(default=None, metadata={"help": "use at most this many training queries"})
    queries_per_shard: int = field(default=32, metadata={"help": "queries per output shard"})
    split: str = field(default="train", metadata={"help": "split whose queries are sampled"})
    seed: int = field(default=0, metadata={"help": "sampling seed (shard i uses seed + i)"})

    def __post_init__(self) -> None:
        for name in ("samples", "k", "max_new_tokens", "batch_size", "queries_per_shard", "min_subqueries"):
            setattr(self, name, check_positive_int(getattr(self, name), name))
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected > 0 for sampling, got {self.temperature}")
        if self.min_subqueries > self.k:
            raise ValueError(f"min_subqueries: must be <= k ({self.k}), got {self.min_subqueries}")


def synthesize_queries(
    queries: list[str],
    lm: Any,
    encoder: Any,
    catalog: Any,
    cfg: SynthesisConfig,
    seed: int,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Sample, embed, ground and score fan-outs for ``queries``. Returns (tensors, counts)."""
    from r4t_fast import objectives
    from r4t_fast.fanout.missing import fill_missing_rows
    from r4t_fast.kernels import ops

    gens = lm.generate(
        queries,
        k=cfg.k,
        num_samples=cfg.samples,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=seed,
    )
    counts = {"fanouts": 0, "kept": 0, "dropped_format": 0}
    keep_q, keep_sub = [], []
    for qi, per_query in enumerate(gens):
        for g in per_query:
            counts["fanouts"] += 1
            subs = list(g.subqueries)[: cfg.k]
            if len(subs) < cfg.min_subqueries:
                counts["dropped_format"] += 1
                continue
            keep_q.append(qi)
            keep_sub.append(fill_missing_rows(subs, queries[qi], cfg.k))
    counts["kept"] = len(keep_q)
    D = encoder.dim
    if not keep_q:
        empty = torch.zeros((0, D))
        return {
            "cond": empty,
            "targets_items": torch.zeros((0, cfg.k, D)),
            "targets_subqueries": torch.zeros((0, cfg.k, D)),
            "items": torch.zeros((0, cfg.k), dtype=torch.int64),
            "reward": torch.zeros(0),
        }, counts
    q_emb = torch.from_numpy(np.asarray(encoder.encode(queries), dtype=np.float32))
    flat = [s for subs in keep_sub for s in subs]
    s_emb = torch.from_numpy(np.asarray(encoder.encode(flat), dtype=np.float32)).view(len(keep_q), cfg.k, D)
    ids, _ = ops.ground_sets(s_emb, catalog.embeddings, check_finite=False)
    cat = catalog.embeddings.float()
    item_emb = cat[ids.clamp_min(0)]
    cond = q_emb[torch.tensor(keep_q)]
    g = objectives.groundedness(s_emb, cat)
    d = objectives.diversity(item_emb)
    a = objectives.alignment(s_emb, cond)
    reward = torch.as_tensor(objectives.composite(g, d, a), dtype=torch.float32)
    return {
        "cond": cond.contiguous(),
        "targets_items": item_emb.contiguous(),
        "targets_subqueries": s_emb.contiguous(),
        "items": ids.contiguous(),
        "reward": reward.contiguous(),
    }, counts


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
    """Run synthesis for the ``cfg.split`` queries of ``dataset`` into ``out_dir`` (resumable)."""
    from r4t_fast.data.prepare import load_eval_data
    from r4t_fast.fanout.generation import FanOutLM
    from r4t_fast.fanout.policy import resolve_policy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_eval_data(dataset, encoder=encoder, data_dir=data_dir, cache_dir=cache_dir, progress=progress)
    ids = set(getattr(data.split, cfg.split))
    sets = [s for s in data.dataset.query_sets if s.set_id in ids]
    sets.sort(key=lambda s: s.set_id)
    if cfg.max_queries is not None:
        sets = sets[: cfg.max_queries]
    if not sets:
        raise ValueError(f"dataset: no titled sets in split {cfg.split!r}")
    from r4t_fast.data.datasets import query_text

    queries = [query_text(s) for s in sets]
    if lm is None:
        lm = FanOutLM(resolve_policy(cfg.policy))
    space = {
        "encoder": data.encoder.name,
        "dim": data.encoder.dim,
        "dataset": data.dataset.name,
        "catalog_size": len(data.catalog),
        "catalog_dir": str(data.catalog_dir) if data.catalog_dir else None,
    }
    (out / "space.json").write_text(json.dumps(space, indent=2))
    n_shards = (len(queries) + cfg.queries_per_shard - 1) // cfg.queries_per_shard
    totals = {"fanouts": 0, "kept": 0, "dropped_format": 0, "shards_skipped": 0}
    t0 = time.perf_counter()
    for i in tqdm(range(n_shards), desc="synthesize", disable=not progress):
        path = out / f"shard-{i:05d}.safetensors"
        if path.is_file():
            totals["shards_skipped"] += 1
            continue
        chunk = queries[i * cfg.queries_per_shard : (i + 1) * cfg.queries_per_shard]
        tensors, counts = synthesize_queries(chunk, lm, data.encoder, data.catalog, cfg, cfg.seed + i)
        for key, v in counts.items():
            totals[key] += v
        atomic_write(
            path, lambda p, t=tensors, c=chunk: save_file(t, str(p), metadata={"queries": json.dumps(c)})
        )
    summary = {
        "config": asdict(cfg),
        "n_queries": len(queries),
        "n_shards": n_shards,
        "counts": totals,
        "wall_s": time.perf_counter() - t0,
        "space": space,
    }
    (out / "synthesis.json").write_text(json.dumps(summary, indent=2))
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
    for f in fields(SynthesisConfig):
        typ = {
            "samples": int,
            "k": int,
            "max_new_tokens": int,
            "batch_size": int,
            "min_subqueries": int,
            "max_queries": int,
            "queries_per_shard": int,
            "seed": int,
            "temperature": float,
        }.get(f.name, str)
        p.add_argument(
            f"--{f.name.replace('_', '-')}", type=typ, default=f.default, help=f.metadata.get("help")
        )


def cli_main(args: argparse.Namespace) -> int:
    cfg = SynthesisConfig(**{f.name: getattr(args, f.name) for f in fields(SynthesisConfig)})
    s = synthesize(
        args.dataset, args.out, cfg, encoder=args.encoder, data_dir=args.data_dir, cache_dir=args.cache_dir
    )
    print(json.dumps(s["counts"]), f"{s['wall_s']:.1f}s")
    return 0
