"""Evaluate a set-retrieval method on a dataset split and write one JSON record (``r4t eval``).

The protocol (WSCR, weakly supervised compositional retrieval):

* **catalog**: every item of the dataset (Polyvore: the outfits' items plus the Polyvore-T test items,
  about 19k), embedded with the encoder and cached: embeddings in an :class:`EmbeddingCache` under
  ``<cache>/embeddings``, the built :class:`~r4t_fast.Catalog` under ``<cache>/catalogs/<name>-<hash>``
  (the hash covers item ids, texts, categories and the encoder name). ``<cache>`` is ``$R4T_CACHE_DIR``
  or ``~/.cache/r4t_fast`` (see :mod:`r4t_fast.data.prepare`).
* **split**: :func:`r4t_fast.data.split_sets` 8:1:1 with ``seed``, saved once under ``<cache>/splits``
  and reloaded afterwards. A set's split depends only on its id and the seed.
* **queries**: the titles of the split's sets (:func:`r4t_fast.data.query_text`); sets without a usable
  title are skipped and counted (``config.n_skipped_untitled``). ``limit`` keeps the first ``limit``
  titled sets in split order (sorted set ids).
* **reference**: the set's own items (catalog rows).
* **metrics** (:func:`r4t_fast.eval.metrics.evaluate_sets`), the same code for every method. Item-level
  (the headline, comparable across method families): ``recall_at_fair`` / ``hit_at_fair`` at the fair
  budget ``fair_budget`` = ``K``, the multiple of ``k`` closest to 3.5 % of the catalog
  (:func:`r4t_fast.objectives.fair_budget`; Polyvore: 660), on a union of exactly ``K`` distinct
  candidates read round-robin over the ``k`` rows; ``item_relevance`` = mean ``(1 + cos(item, query))
  / 2`` over the ``k`` items; ``vendi`` (Vendi score of the ``k`` items, in ``[1, k]``), ``ild``;
  ``category_coverage`` (``null`` where items have no category). Secondary: the paper's fixed-quota
  ``recall@K`` / ``hit@K`` for every per-row budget ``b`` in ``budgets`` (``K = k * b``: ``recall@100``,
  ``recall@1000``, ``recall@5000``) and at the fair budget (``recall_at_fair_quota``), ``mrecall@k``,
  and the row-based OAR terms ``row_groundedness`` / ``row_diversity`` / ``row_alignment`` /
  ``row_composite`` (``[0, 1]`` forms), which score the rows a method retrieved *with* (the raw query
  for dense/MMR/DPP) and compare only fan-outs with fan-outs. Every metric gets a 95%
  percentile-bootstrap CI over queries, and ``per_query`` keeps the values by set id for paired
  comparisons. Every method is asked for ``max(max(budgets), K)`` candidates per row, so its union can
  reach ``K``; one that cannot is flagged (``flags``), never silently scored on fewer items.
* **identity**: ``query_ids_sha256`` (sha256 of the sorted set ids scored; :mod:`r4t_fast.eval.report`
  refuses to put records with different hashes in one table) and ``config.catalog`` (item count, ids and
  float32 embedding checksums). A method that brings its own catalog (a diffusion retriever directory)
  must bring the evaluation catalog: a mismatch is refused, saying whether the ids or the embeddings
  differ.
* **latency** (:mod:`r4t_fast.eval.latency`): median wall time per query of ``retrieve(queries, k)`` (the
  set only, no Recall candidates) over at least 8 timed calls per batch size (1, 8, 64) after a warm-up,
  with its spread (``latency_spread_ms_per_query``); the diffusion retriever also records
  ``latency_breakdown_ms`` {encode, sample, ground} per batch size.

Use it from Python with :func:`evaluate` -- any object with the baselines' ``retrieve`` protocol (or a
factory ``(catalog, encoder) -> retriever``) and a method name -- or from the shell::

    r4t eval --dataset polyvore --method dense --split test --out dense.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r4t_fast._internal import atomic_write_text, check_float, check_positive_int, check_seed
from r4t_fast.data.datasets import Dataset, query_text
from r4t_fast.data.prepare import EvalData, build_catalog, dataset_split, load_eval_data
from r4t_fast.data.splits import SPLIT_NAMES
from r4t_fast.eval.latency import (
    DEFAULT_LATENCY_BATCHES,
    MIN_LATENCY_CALLS,
    latency_record,
    measure_latency,
)
from r4t_fast.eval.methods import _is_policy_dir, _method_config, check_catalog, resolve_method
from r4t_fast.eval.records import (
    _fair_flags,
    _jsonable,
    environment,
    format_table,
    portable_paths,
    query_ids_sha256,
)

__all__ = [
    "LLM_METHODS",
    "check_catalog",
    "METHOD_CHOICES",
    "RECORD_METHODS",
    "EvalData",
    "add_cli_arguments",
    "build_catalog",
    "cli_main",
    "dataset_split",
    "environment",
    "evaluate",
    "load_eval_data",
    "measure_latency",
    "resolve_method",
]

METHOD_CHOICES = ("dense", "mmr", "dpp", "llm-zeroshot", "llm-bon")
"""Names ``--method`` accepts, besides a local policy directory (evaluated as ``folm``)."""
RECORD_METHODS = (
    "dense", "mmr", "dpp", "llm-zeroshot", "llm-bon", "folm", "r4t-diffusion", "r4t-diffusion-rows"
)  # fmt: skip
"""Method names used in records (``r4t-diffusion`` is the diffusion retriever of a later stage,
``r4t-diffusion-rows`` the same model with anchor 0: its rows alone)."""
LLM_METHODS = frozenset({"llm-zeroshot", "llm-bon", "folm"})
"""LLM fan-out methods (their quality-run batches are reused as latency calls where the sizes match)."""

DEFAULT_BUDGETS = (10, 100, 500)


# ----------------------------------------------------------------------------------------------------
# the evaluation
# ----------------------------------------------------------------------------------------------------
def _check_results(results: Sequence[Any], n: int, k: int, dim: int) -> None:
    if len(results) != n:
        raise ValueError(f"retrieve: expected {n} results (one per query), got {len(results)}")
    for i, r in enumerate(results):
        items = np.asarray(r.item_indices)
        rows = np.asarray(r.row_embeddings)
        if items.ndim != 1 or items.shape[0] < 1:
            raise ValueError(f"retrieve: result {i}: expected item_indices of shape (k,), got {items.shape}")
        if rows.ndim != 2 or rows.shape[1] != dim:
            raise ValueError(f"retrieve: result {i}: expected row_embeddings (L, {dim}), got {rows.shape}")


def _sets_of_split(data: EvalData, split: str, limit: int | None) -> tuple[list[Any], int]:
    if split not in SPLIT_NAMES:
        raise ValueError(f"split: expected one of {', '.join(SPLIT_NAMES)}, got {split!r}")
    by_id = {s.set_id: s for s in data.dataset.sets}
    chosen = [by_id[i] for i in data.split[split] if i in by_id]
    titled = [s for s in chosen if s.query is not None]
    skipped = len(chosen) - len(titled)
    if limit is not None:
        titled = titled[: check_positive_int(limit, "limit")]
    if not titled:
        raise ValueError(
            f"split: the {split!r} split of {data.dataset.name!r} has no set with a usable title "
            f"({len(chosen)} sets, {skipped} untitled)"
        )
    return titled, skipped


def _budgets(budgets: Sequence[int]) -> tuple[int, ...]:
    out = [check_positive_int(b, f"budgets[{i}]") for i, b in enumerate(budgets)]
    if not out:
        raise ValueError("budgets: expected at least one budget per row, got none")
    return tuple(sorted(set(out)))


def evaluate(
    method: Any,
    dataset: str | os.PathLike[str] | Dataset,
    split: str = "test",
    *,
    method_name: str | None = None,
    method_kwargs: dict[str, Any] | None = None,
    encoder: Any = "minilm",
    k: int = 10,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    limit: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    data: EvalData | None = None,
    batch_size: int = 64,
    latency_batch_sizes: Sequence[int] = DEFAULT_LATENCY_BATCHES,
    latency_calls: int | dict[int, int] | None = None,
    n_boot: int = 1000,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run ``method`` on a dataset split and return the evaluation record (see the module docstring).

    Args:
        method: a method name, a policy dir, a retriever object or a factory (see :func:`resolve_method`).
        dataset: ``"polyvore"``, ``"spotify"``, a ``sets.jsonl`` path or a ``Dataset``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        method_name: the record's method name (default: the registry name, ``folm`` or ``retriever.name``).
        method_kwargs: passed to the baseline's constructor (e.g. ``{"n": 5}`` for ``llm-bon``).
        encoder: encoder spec or object (must match the retriever's catalog for a retriever object).
        k: items per set (rows per fan-out).
        budgets: candidates per row for the fixed-quota Recall@K/Hit@K (``K = k * b``).
        limit: evaluate only the first ``limit`` titled sets of the split.
        seed: split seed.
        data_dir, cache_dir: see :func:`load_eval_data`.
        data: pre-loaded :class:`EvalData` (skips loading; ``dataset``/``encoder``/``seed`` are then ignored).
        batch_size: queries per ``retrieve`` call in the quality run.
        latency_batch_sizes: batch sizes for the latency measurement (empty: skip it).
        latency_calls: timed calls per batch size (an int or ``{batch: calls}``; default 8 for every
            method, :data:`r4t_fast.eval.latency.MIN_LATENCY_CALLS`).
        n_boot: bootstrap resamples for the CIs.
        progress: tqdm progress bars.
        command: the command line stored in the record (default: ``sys.argv``).

    Returns:
        The record: ``dataset``, ``method``, ``split``, ``n_queries``, ``query_ids_sha256``, ``metrics``
        (``fair_budget`` included), ``ci``, ``latency_ms_per_query``, ``latency_spread_ms_per_query``,
        ``latency_breakdown_ms`` (diffusion retriever only), ``flags``, ``machine``, ``versions``,
        ``command``, ``date``, ``config``, plus ``method_stats`` (the LLM methods' usable subqueries,
        no-subquery and strict-format-failure rates) and ``per_query`` (values by set id).
    """
    from tqdm.auto import tqdm

    from r4t_fast import objectives as M
    from r4t_fast.eval.metrics import evaluate_sets
    from r4t_fast.eval.stats import bootstrap_ci

    t_start = time.perf_counter()
    k = check_positive_int(k, "k")
    batch_size = check_positive_int(batch_size, "batch_size")
    budgets = _budgets(budgets)
    if data is None:
        data = load_eval_data(
            dataset, encoder=encoder, data_dir=data_dir, cache_dir=cache_dir, seed=seed, progress=progress
        )
    retriever, name = resolve_method(method, data, method_name=method_name, method_kwargs=method_kwargs)
    catalog = data.catalog
    source = os.fspath(method) if isinstance(method, (str, os.PathLike)) else None
    catalog_fp = check_catalog(retriever, catalog, source=source, target=data.dataset.name)
    sets, n_untitled = _sets_of_split(data, split, limit)
    if k > len(catalog):
        raise ValueError(f"k: expected an int <= catalog size ({len(catalog)}), got {k}")
    queries = [query_text(s) for s in sets]
    references = [catalog.id_to_index(s.item_ids) for s in sets]
    fair_k = M.fair_budget(len(catalog), k)
    n_cand = min(max(max(budgets), fair_k), len(catalog))

    # -- quality run ---------------------------------------------------------------------------------
    if callable(getattr(retriever, "reset_stats", None)):
        retriever.reset_stats()
    results: list[Any] = []
    batch_times: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(queries), desc=f"eval {name} on {data.dataset.name}/{split}", disable=not progress)
    for start in range(0, len(queries), batch_size):
        batch = queries[start : start + batch_size]
        t1 = time.perf_counter()
        results.extend(retriever.retrieve(batch, k, n_candidates=n_cand))
        batch_times.append((len(batch), time.perf_counter() - t1))
        bar.update(len(batch))
    bar.close()
    run_s = time.perf_counter() - t0
    _check_results(results, len(queries), k, catalog.dim)
    method_stats = dict(retriever.stats) if hasattr(retriever, "stats") else None

    # -- metrics -------------------------------------------------------------------------------------
    q_emb = np.asarray(data.encoder.encode(queries), dtype=np.float32)
    has_cands = all(r.candidates is not None for r in results)
    cands = [np.asarray(r.candidates) for r in results] if has_cands else None
    categories = catalog.categories if any(c is not None for c in catalog.categories) else None
    usable = [b for b in budgets if cands is not None and b <= min(c.shape[1] for c in cands)]
    sm = evaluate_sets(
        [np.asarray(r.item_indices) for r in results],
        [np.asarray(r.row_embeddings) for r in results],
        q_emb,
        catalog.embeddings,
        references=references,
        candidates=cands,
        budget_per_row=usable if cands is not None else None,
        fair_k=fair_k,
        item_categories=categories,
        mrecall_k=k,
    )
    per = dict(sm.per_query)
    means: dict[str, float | None] = {}
    ci: dict[str, list[float] | None] = {}
    for key in sorted(per):
        v = per[key]
        fin = v[np.isfinite(v)]
        means[key] = float(fin.mean()) if fin.size else None
        if fin.size >= 2:
            c = bootstrap_ci(fin, n_boot=n_boot, seed=0)
            ci[key] = [c.low, c.high]
        else:
            ci[key] = None
    means["fair_budget"] = fair_k

    # -- latency -------------------------------------------------------------------------------------
    is_llm = name in LLM_METHODS or hasattr(retriever, "lm")
    latency, latency_cfg, spread, breakdown = latency_record(
        retriever,
        queries,
        k,
        latency_batch_sizes,
        is_llm=is_llm,
        latency_calls=latency_calls,
        batch_size=batch_size,
        batch_times=batch_times,
        n_cand=n_cand,
    )

    machine, versions = environment()
    cfg: dict[str, Any] = {
        "encoder": getattr(data.encoder, "name", str(data.encoder)),
        "encoder_dim": int(data.encoder.dim),
        "k": k,
        "fair_budget": {
            "K": fair_k,
            "share": M.FAIR_BUDGET_SHARE,
            "rule": "K = the multiple of k closest to 3.5% of the catalog (r4t_fast.objectives.fair_budget); "
            "R = exactly K distinct candidates read round-robin over the k rows "
            "(r4t_fast.objectives.round_robin_union)",
        },
        "budgets_per_row": list(usable) if usable else [],
        "recall_protocol": "recall@K / hit@K and *_at_fair_quota: the paper's fixed quota, R = union of the "
        "first b candidates of each of the k rows, K = k * b (overlapping rows give |R| < K); "
        "reference = the set's own items",
        "vendi": "Vendi score of the k retrieved items (cosine kernel), in [1, k]",
        "item_relevance": "(1 + mean cos(item, query)) / 2 over the k retrieved items",
        "row_terms": "row_* = the paper's OAR terms on the rows the method retrieved with ([0, 1] forms; "
        "row_composite = 0.6 g + 0.2 d + 0.2 a); for dense/MMR/DPP the rows are the raw query, so they "
        "compare fan-outs with fan-outs only",
        "catalog": {
            **catalog_fp,
            "dir": data.catalog_dir,
            "has_categories": categories is not None,
        },
        "split": {
            "seed": data.split.seed,
            "ratios": list(data.split.ratios),
            "file": data.split_path,
            "n_sets": len(data.split[split]),
        },
        "n_skipped_untitled": n_untitled,
        "limit": limit,
        "query": "set title (r4t_fast.data.query_text)",
        "batch_size": batch_size,
        "n_candidates": n_cand if has_cands else 0,
        "n_boot": n_boot,
        "method": _method_config(retriever),
        "latency": latency_cfg,
        "quality_run_s": round(run_s, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
        "dataset_source": data.dataset.source,
    }
    record: dict[str, Any] = {
        "dataset": data.dataset.name,
        "method": name,
        "split": split,
        "n_queries": len(queries),
        "query_ids_sha256": query_ids_sha256(s.set_id for s in sets),
        "metrics": means,
        "ci": ci,
        "latency_ms_per_query": latency,
        "latency_spread_ms_per_query": spread,
        "machine": machine,
        "versions": versions,
        "command": command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg,
    }
    if breakdown:
        record["latency_breakdown_ms"] = breakdown
    if method_stats is not None:
        record["method_stats"] = method_stats
    record["per_query"] = {"set_id": [s.set_id for s in sets], **{key: per[key] for key in sorted(per)}}
    flags = _fair_flags(record)
    if not has_cands:
        flags.append("the method returned no candidate lists: recall/hit are scored on its k items only")
    record["flags"] = flags
    # paths relative to the cache root, the data directory or the working directory (records read the
    # same on every machine); the catalog cache lies in <cache root>/catalogs/
    cat_dir = Path(data.catalog_dir) if data.catalog_dir else None
    roots = [cache_dir] + ([cat_dir.parent.parent] if cat_dir and cat_dir.parent.name == "catalogs" else [])
    return portable_paths(_jsonable(record), cache_dirs=roots, data_dirs=[data_dir])


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------
def _int_list(text: str, name: str) -> list[int]:
    if text.strip().lower() in ("", "none", "off"):
        return []
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected comma-separated ints, got {text!r}") from None
    if any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"{name}: expected positive ints, got {text!r}")
    return out


def _method_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--method-arg: expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``r4t eval``."""
    parser.add_argument("--dataset", required=True, help="polyvore, spotify or a sets.jsonl path")
    parser.add_argument(
        "--method",
        required=True,
        help=f"one of {', '.join(METHOD_CHOICES)}, or a tuned policy directory (evaluated as 'folm')",
    )
    parser.add_argument(
        "--split", default="test", choices=SPLIT_NAMES, help="split to evaluate (default test)"
    )
    parser.add_argument("--out", required=True, help="where to write the JSON record")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N titled sets")
    parser.add_argument("--encoder", default="minilm", help="encoder spec: minilm, hashing:64 or a path")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument(
        "--data-dir", default=None, help="data directory (default $R4T_DATA_DIR or ../shared/data)"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="cache root (default $R4T_CACHE_DIR or ~/.cache/r4t_fast)"
    )
    parser.add_argument(
        "--k", type=int, default=10, help="items per set / subqueries per fan-out (default 10)"
    )
    parser.add_argument(
        "--budgets",
        type=lambda s: _int_list(s, "--budgets"),
        default=list(DEFAULT_BUDGETS),
        help="candidates per row for Recall@K, comma-separated (default 10,100,500: K = 100, 1000, 5000)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="queries per retrieve call (default 64)")
    parser.add_argument(
        "--latency-batches",
        type=lambda s: _int_list(s, "--latency-batches"),
        default=list(DEFAULT_LATENCY_BATCHES),
        help="batch sizes for the latency measurement (default 1,8,64; 'none' to skip)",
    )
    parser.add_argument(
        "--latency-calls",
        type=int,
        default=MIN_LATENCY_CALLS,
        help=f"timed calls per latency batch size, after a warm-up (default {MIN_LATENCY_CALLS})",
    )
    parser.add_argument(
        "--policy", default=None, help="LLM methods: policy name or model dir (default smollm2)"
    )
    parser.add_argument("--temperature", type=float, default=None, help="LLM methods: sampling temperature")
    parser.add_argument("--bon-n", type=int, default=None, help="llm-bon: samples per query (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="LLM methods: generation cap (160)")
    parser.add_argument(
        "--method-arg",
        type=_method_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra constructor argument of the method (JSON value), e.g. lambda_=0.3; repeatable",
    )
    parser.add_argument(
        "--no-extra-items", action="store_true", help="polyvore: leave the Polyvore-T items out"
    )
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (torch.set_num_threads); on a machine shared with other heavy jobs, 1 "
        "avoids thread oversubscription (default: torch's default)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _check_out_file(out: str | os.PathLike[str], name: str = "--out") -> Path:
    """``out`` as a Path, checked before a long run: a file path (not an existing directory) whose
    nearest existing parent is a directory this process can write (missing parents are made at write
    time). Raises ValueError (a directory), NotADirectoryError or PermissionError, naming ``name``."""
    if not os.fspath(out):
        raise ValueError(f"{name}: expected a JSON file path, got ''")
    path = Path(out).expanduser()
    if path.is_dir():
        raise ValueError(f"{name}: {os.fspath(out)!r} is a directory; expected a JSON file path")
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{name}: cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{name}: cannot write {path}: no write permission in {parent}")
    return path


def _check_cli_args(args: argparse.Namespace, kwargs: dict[str, Any]) -> None:
    """Every cheap check of ``r4t eval``'s arguments, before anything is loaded (the catalog's embedding
    alone takes minutes cold): ValueError naming the argument."""
    import inspect

    from r4t_fast.eval.baselines import _REGISTRY

    if args.limit is not None:
        check_positive_int(args.limit, "--limit")
    for name in ("k", "batch_size", "n_boot"):
        check_positive_int(getattr(args, name), "--" + name.replace("_", "-"))
    check_seed(args.seed, "--seed")
    m = args.method
    retriever_dir = (Path(m).expanduser() / "retriever.json").is_file()
    if m not in METHOD_CHOICES and m != "folm" and not retriever_dir and not _is_policy_dir(m):
        raise ValueError(
            f"--method: unknown method {m!r}; valid choices: {', '.join(sorted(METHOD_CHOICES))}, folm "
            "(with --policy), a tuned policy dir (config.json) or a retriever dir (retriever.json)"
        )
    factory = _REGISTRY.get(m)
    params = inspect.signature(factory).parameters if isinstance(factory, type) else {}
    for key, value in kwargs.items():
        if params and key not in params:
            valid = ", ".join(p for p in params if p not in ("self", "catalog", "encoder"))
            raise ValueError(f"--method-arg: {key!r} is not an argument of {m}; valid: {valid}")
        ann = str(params[key].annotation) if key in params else ""
        if "float" in ann or (not params and key in ("temperature", "lambda_", "theta")):
            check_float(value, f"--method-arg {key}")
        elif ann == "int" or key in ("n", "pool", "max_new_tokens", "batch_size"):
            check_positive_int(value, f"--method-arg {key}")


def _command(args: argparse.Namespace) -> str:
    """The command line of this run: ``sys.argv`` when run as ``r4t eval``, else rebuilt from ``args``."""
    if sys.argv[1:2] == ["eval"]:
        return shlex.join(["r4t", *sys.argv[1:]])
    parts = ["r4t", "eval"]
    for key, value in sorted(vars(args).items()):
        if key == "command" or value is None or value is False or value == []:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            if key == "method_arg":
                for k, v in value:
                    parts += [flag, f"{k}={json.dumps(v)}"]
            else:
                parts += [flag, ",".join(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def cli_main(args: argparse.Namespace) -> int:
    """``r4t eval``: evaluate, print the table, write the record. Returns the exit status."""
    from r4t_fast.data.datasets import DataError

    if args.threads is not None:
        if args.threads < 1:
            print(f"r4t eval: error: --threads: expected a positive int, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # for OpenMP runtimes loaded later
        torch.set_num_threads(args.threads)
    if args.latency_calls < 1:
        print(
            f"r4t eval: error: --latency-calls: expected a positive int, got {args.latency_calls}",
            file=sys.stderr,
        )
        return 2
    kwargs: dict[str, Any] = dict(args.method_arg)
    llm = args.method in LLM_METHODS or args.method == "folm" or _is_policy_dir(args.method)
    if args.policy is not None:
        kwargs["policy"] = args.policy
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    if args.bon_n is not None:
        if args.method != "llm-bon":
            print("r4t eval: error: --bon-n: only valid with --method llm-bon", file=sys.stderr)
            return 2
        kwargs["n"] = args.bon_n
    if not llm and any(key in kwargs for key in ("policy", "temperature", "max_new_tokens")):
        print(
            "r4t eval: error: --policy/--temperature/--max-new-tokens: only valid with an LLM method "
            f"({', '.join(sorted(LLM_METHODS))} or a policy dir), got --method {args.method}",
            file=sys.stderr,
        )
        return 2
    try:
        _check_cli_args(args, kwargs)
        out = _check_out_file(args.out)
        data = load_eval_data(
            args.dataset,
            encoder=args.encoder,
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
            seed=args.seed,
            extra_items=not args.no_extra_items,
            progress=not args.no_progress,
        )
        record = evaluate(
            args.method,
            args.dataset,
            args.split,
            method_kwargs=kwargs,
            k=args.k,
            budgets=args.budgets,
            limit=args.limit,
            data=data,
            batch_size=args.batch_size,
            latency_batch_sizes=args.latency_batches,
            latency_calls=args.latency_calls,
            n_boot=args.n_boot,
            progress=not args.no_progress,
            command=_command(args),
        )
    except (
        DataError,
        ValueError,
        ImportError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
    ) as exc:
        print(f"r4t eval: error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    print(format_table(record))
    print(f"wrote {out}")
    return 0
