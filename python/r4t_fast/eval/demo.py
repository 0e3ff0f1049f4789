"""A quick retrieval demo on a real catalog: ``r4t demo [--dataset polyvore] [--query TEXT ...]``.

Loads (or, the first time, builds and caches) the dataset's catalog embedded with MiniLM -- the same
cached catalog ``r4t eval`` uses -- then retrieves ``k`` items per intent with the dense baseline (top-k
of the query embedding) and with MMR (relevance traded against redundancy), and prints the item texts
side by side. The first run embeds about 19k Polyvore item texts (a few minutes on a laptop CPU); later
runs load the cached catalog in well under a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from r4t_fast._internal import check_float, check_positive_int

__all__ = ["DEFAULT_QUERIES", "DemoResult", "add_cli_arguments", "cli_main", "run_demo"]

DEFAULT_QUERIES = ("summer beach outfit", "office look for a rainy day", "cozy winter weekend at home")


@dataclass(frozen=True)
class DemoResult:
    """What the demo retrieved for one query.

    Attributes:
        query: the intent.
        method: ``"dense"`` or ``"mmr"``.
        texts, categories: the ``k`` items, in selection order.
        scores: ``(k,)`` cosine of each item with the query.
        ms: wall time of the retrieval call, in milliseconds.
    """

    query: str
    method: str
    texts: list[str]
    categories: list[str | None]
    scores: list[float]
    ms: float


def run_demo(
    queries: Sequence[str] = DEFAULT_QUERIES,
    dataset: str | os.PathLike[str] = "polyvore",
    *,
    k: int = 5,
    encoder: Any = "minilm",
    mmr_lambda: float = 0.5,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[list[DemoResult], dict[str, float]]:
    """Retrieve ``k`` items per query with dense top-k and MMR on the dataset's cached catalog.

    Returns:
        ``(results, timings)``: one :class:`DemoResult` per (query, method), queries in order, dense first;
        ``timings`` has ``load_s`` (dataset, encoder and catalog) and ``retrieve_ms``.
    """
    from r4t_fast.data.datasets import load_dataset
    from r4t_fast.data.encoders import get_encoder
    from r4t_fast.data.prepare import build_catalog
    from r4t_fast.eval.baselines import DenseBaseline, MMRBaseline

    if isinstance(queries, str) or not queries or not all(isinstance(q, str) and q.strip() for q in queries):
        raise ValueError(f"queries: expected a non-empty list of non-empty strings, got {queries!r}")
    k = check_positive_int(k, "k")
    mmr_lambda = check_float(mmr_lambda, "mmr_lambda", low=0.0, high=1.0)  # before minutes of loading
    t0 = time.perf_counter()
    name = os.fspath(dataset)
    ds = load_dataset(name, data_dir, **({"include_extra": True} if name.lower() == "polyvore" else {}))
    enc = get_encoder(encoder) if isinstance(encoder, (str, os.PathLike)) else encoder
    catalog, _ = build_catalog(ds, enc, cache_dir=cache_dir, progress=progress)
    load_s = time.perf_counter() - t0
    methods = [("dense", DenseBaseline(catalog, enc)), ("mmr", MMRBaseline(catalog, enc, lambda_=mmr_lambda))]
    out: list[DemoResult] = []
    total_ms = 0.0
    for q in queries:
        for label, method in methods:
            t1 = time.perf_counter()
            (res,) = method.retrieve([q], k)
            ms = 1000.0 * (time.perf_counter() - t1)
            total_ms += ms
            rows = [int(i) for i in res.item_indices if i >= 0]
            out.append(
                DemoResult(
                    query=q,
                    method=label,
                    texts=[catalog.texts[i] for i in rows],
                    categories=[catalog.categories[i] for i in rows],
                    scores=[float(s) for s in (res.scores if res.scores is not None else [])],
                    ms=ms,
                )
            )
    return out, {"load_s": load_s, "retrieve_ms": total_ms, "catalog_items": float(len(catalog))}


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``r4t demo``."""
    parser.add_argument(
        "--dataset", default="polyvore", help="polyvore (default), spotify or a sets.jsonl path"
    )
    parser.add_argument(
        "--query",
        action="append",
        default=None,
        help="an intent to retrieve for (repeatable; default: 3 examples)",
    )
    parser.add_argument("--k", type=int, default=5, help="items per intent (default 5)")
    parser.add_argument("--encoder", default="minilm", help="encoder spec (default minilm)")
    parser.add_argument("--mmr-lambda", type=float, default=0.5, help="MMR relevance weight (default 0.5)")
    parser.add_argument("--data-dir", default=None, help="data dir (default $R4T_DATA_DIR, ../shared/data)")
    parser.add_argument("--cache-dir", default=None, help="cache root ($R4T_CACHE_DIR, ~/.cache/r4t_fast)")


def cli_main(args: argparse.Namespace) -> int:
    """``r4t demo``: print dense and MMR items for each intent."""
    from r4t_fast.data.datasets import DataError

    queries = args.query or list(DEFAULT_QUERIES)
    try:
        check_positive_int(args.k, "--k")  # the command line's names, before anything is loaded
        check_float(args.mmr_lambda, "--mmr-lambda", low=0.0, high=1.0)
        results, timings = run_demo(
            queries,
            args.dataset,
            k=args.k,
            encoder=args.encoder,
            mmr_lambda=args.mmr_lambda,
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
        )
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"r4t demo: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"catalog: {int(timings['catalog_items'])} items of {args.dataset} "
        f"(loaded in {timings['load_s']:.1f} s); k = {args.k}"
    )
    width = 52
    for q in queries:
        dense, mmr = (next(r for r in results if r.query == q and r.method == m) for m in ("dense", "mmr"))
        print(f"\n== {q}   (dense {dense.ms:.0f} ms, mmr {mmr.ms:.0f} ms)")
        print(f"   {'dense top-k':<{width}}  {'MMR (lambda = ' + str(args.mmr_lambda) + ')':<{width}}")
        for i in range(max(len(dense.texts), len(mmr.texts))):
            a = _clip(dense.texts[i], width) if i < len(dense.texts) else ""
            b = _clip(mmr.texts[i], width) if i < len(mmr.texts) else ""
            print(f"{i + 1:>2} {a:<{width}}  {b:<{width}}")
    return 0
