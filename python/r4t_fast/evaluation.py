"""Evaluate a set-retrieval method on a dataset split and write one JSON record (``r4t eval``).

The protocol (WSCR, weakly supervised compositional retrieval):

* **catalog**: every item of the dataset (Polyvore: the outfits' items plus the Polyvore-T test items,
  about 19k), embedded with the encoder and cached: embeddings in an :class:`EmbeddingCache` under
  ``<cache>/embeddings``, the built :class:`~r4t_fast.Catalog` under ``<cache>/catalogs/<name>-<hash>``
  (the hash covers item ids, texts, categories and the encoder name). ``<cache>`` is ``$R4T_CACHE_DIR``
  or ``~/.cache/r4t_fast`` (see :func:`r4t_fast.llm.default_cache_dir`).
* **split**: :func:`r4t_fast.data.split_sets` 8:1:1 with ``seed``, saved once under ``<cache>/splits``
  and reloaded afterwards. A set's split depends only on its id and the seed.
* **queries**: the titles of the split's sets (:func:`r4t_fast.data.query_text`); sets without a usable
  title are skipped and counted (``config.n_skipped_untitled``). ``limit`` keeps the first ``limit``
  titled sets in split order (sorted set ids).
* **reference**: the set's own items (catalog rows).
* **metrics** (:func:`r4t_fast.metrics.evaluate_sets`): ``recall@K`` / ``hit@K`` for every per-row budget
  ``b`` in ``budgets`` (``K = k * b``; for ``k = 10``: ``recall@100``, ``recall@1000``, ``recall@5000``),
  ``mrecall@k`` of the ``k`` retrieved items, ``vendi`` (Vendi score of the ``k`` retrieved items, in
  ``[1, k]``), the OAR properties ``groundedness`` / ``diversity`` / ``alignment`` / ``composite`` in
  their ``[0, 1]`` forms, ``ild`` and ``category_coverage`` (where the catalog has categories). Every
  metric gets a 95% percentile-bootstrap CI over queries.
* **latency**: wall time per query of ``retrieve(queries, k)`` (the set only, no Recall candidates) at
  batch sizes 1, 8 and 64 after one warm-up call, on a small sample for LLM methods (stated in
  ``config.latency``).

Use it from Python with :func:`evaluate` -- any object with the baselines' ``retrieve`` protocol (or a
factory ``(catalog, encoder) -> retriever``) and a method name -- or from the shell::

    r4t eval --dataset polyvore --method dense --split test --out dense.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset, Split, load_dataset, load_split, query_text, save_split, split_sets

__all__ = [
    "LLM_METHODS",
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
RECORD_METHODS = ("dense", "mmr", "dpp", "llm-zeroshot", "llm-bon", "folm", "r4t-diffusion")
"""Method names used in records (``r4t-diffusion`` is the diffusion retriever of a later stage)."""
LLM_METHODS = frozenset({"llm-zeroshot", "llm-bon", "folm"})
"""Methods whose latency is measured on a small sample."""

DEFAULT_BUDGETS = (10, 100, 500)
DEFAULT_LATENCY_BATCHES = (1, 8, 64)
# calls per batch size (after one warm-up call): cheap methods / LLM methods
_LATENCY_CALLS = {1: 16, 8: 4, 64: 2}
_LLM_LATENCY_CALLS = {1: 2, 8: 1, 64: 1}
_SPLIT_NAMES = ("train", "val", "test")


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from .llm import default_cache_dir

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
    from .catalog import Catalog, CatalogError
    from .encoders import EmbeddingCache, encode_cached

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
        from .encoders import get_encoder

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


# ----------------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------------
def _is_policy_dir(text: str) -> bool:
    return Path(text).expanduser().is_dir()


def resolve_method(
    method: Any,
    data: EvalData,
    *,
    method_name: str | None = None,
    method_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, str]:
    """Build the retriever for ``method`` on ``data``'s catalog; returns ``(retriever, method name)``.

    ``method`` is a registered baseline name (``dense``, ``mmr``, ``dpp``, ``llm-zeroshot``, ``llm-bon``),
    ``"folm"`` (with ``policy=`` in ``method_kwargs``), a diffusion retriever directory (``r4t-diffusion``,
    one holding ``retriever.json``), a local policy directory (``folm``), an object with
    ``retrieve(query_texts, k, *, n_candidates)`` or a factory ``(catalog, encoder) -> such an object``.

    Raises:
        ValueError: an unknown name (the message lists the valid choices).
    """
    from .baselines import available_baselines, get_baseline

    kwargs = dict(method_kwargs or {})
    if isinstance(method, (str, os.PathLike)):
        text = os.fspath(method)
        if text in available_baselines():
            try:
                return get_baseline(text, catalog=data.catalog, encoder=data.encoder, **kwargs), text
            except TypeError as exc:  # an argument the method's constructor does not take
                raise ValueError(f"method_kwargs: {sorted(kwargs)} not accepted by {text!r}: {exc}") from exc
        if (Path(text).expanduser() / "retriever.json").is_file():  # a diffusion retriever directory
            from .retriever import Retriever

            name = method_name or "r4t-diffusion"
            return Retriever.from_pretrained(text, encoder=data.encoder, **kwargs), name
        if text == "folm" or _is_policy_dir(text):
            from .fanout import LLMFanOutBaseline

            if text != "folm":
                kwargs["policy"] = text
            if "policy" not in kwargs:
                raise ValueError(
                    "method: 'folm' needs a tuned policy: pass --method MODEL_DIR or --policy DIR"
                )
            name = method_name or "folm"
            try:
                return LLMFanOutBaseline(data.catalog, data.encoder, name=name, **kwargs), name
            except TypeError as exc:
                raise ValueError(f"method_kwargs: {sorted(kwargs)} not accepted by {name!r}: {exc}") from exc
        raise ValueError(
            f"method: unknown method {text!r}; valid choices: {', '.join(available_baselines())}, "
            "or a local policy directory (evaluated as 'folm')"
        )
    if callable(getattr(method, "retrieve", None)) and not isinstance(method, type):
        retriever = method
    elif callable(method):
        retriever = method(data.catalog, data.encoder)
        if not callable(getattr(retriever, "retrieve", None)):
            raise ValueError("method: the factory did not return an object with .retrieve()")
    else:
        raise ValueError(
            "method: expected a method name, a policy dir, a retriever or a factory, "
            f"got {type(method).__name__}"
        )
    name = method_name or getattr(retriever, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError("method_name: required when the retriever has no .name")
    return retriever, name


def _method_config(retriever: Any) -> dict[str, Any]:
    cfg = getattr(retriever, "config", None)
    if callable(cfg):
        out = dict(cfg())
    else:
        out = {}
        for attr in ("lambda_", "pool", "theta"):
            if hasattr(retriever, attr):
                out[attr] = getattr(retriever, attr)
    out["class"] = f"{type(retriever).__module__}.{type(retriever).__qualname__}"
    return _jsonable(out)


# ----------------------------------------------------------------------------------------------------
# latency
# ----------------------------------------------------------------------------------------------------
def measure_latency(
    retriever: Any,
    queries: Sequence[str],
    k: int,
    batch_sizes: Sequence[int] = DEFAULT_LATENCY_BATCHES,
    calls: dict[int, int] | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Mean wall time per query of ``retriever.retrieve(batch, k)`` at each batch size.

    Batches are filled by cycling through ``queries``; one untimed warm-up call (batch 1) runs first.
    A retriever with an int ``batch_size`` attribute (the LLM baselines' generation batch) has it set to
    the measured batch size during the measurement, so a batch of ``B`` queries is one forward batch.

    Args:
        retriever: object with ``retrieve(query_texts, k, *, n_candidates=0)``.
        queries: the query pool (non-empty).
        k: set size.
        batch_sizes: batch sizes to time.
        calls: timed calls per batch size (default 16 / 4 / 2 for batch 1 / 8 / 64, else 1).

    Returns:
        ``({str(batch): ms per query}, {str(batch): {"calls", "queries", "batch_ms"}})``.
    """
    if not queries:
        raise ValueError("queries: expected at least one query for the latency measurement")
    calls = dict(_LATENCY_CALLS if calls is None else calls)
    pool = list(queries)
    had_bs = isinstance(getattr(retriever, "batch_size", None), int)
    old_bs = retriever.batch_size if had_bs else None
    ms: dict[str, float] = {}
    detail: dict[str, Any] = {}
    cursor = 0
    try:
        if had_bs:
            retriever.batch_size = 1
        retriever.retrieve(pool[:1], k)
        for b in batch_sizes:
            b = int(b)
            n_calls = max(1, int(calls.get(b, 1)))
            if had_bs:
                retriever.batch_size = b
            times = []
            for _ in range(n_calls):
                batch = [pool[(cursor + i) % len(pool)] for i in range(b)]
                cursor += b
                t0 = time.perf_counter()
                retriever.retrieve(batch, k)
                times.append(time.perf_counter() - t0)
            mean_s = float(np.mean(times))
            ms[str(b)] = 1000.0 * mean_s / b
            detail[str(b)] = {
                "calls": n_calls,
                "queries": n_calls * b,
                "batch_ms": [round(1000.0 * t, 3) for t in times],
            }
    finally:
        if had_bs:
            retriever.batch_size = old_bs
    return ms, detail


# ----------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(machine, versions)`` recorded next to every number (CPU, cores, memory, GPU; package versions)."""
    import torch

    import r4t_fast

    machine: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
    }
    try:
        machine["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        pass
    machine["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        machine["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    versions: dict[str, Any] = {"python": sys.version.split()[0], "r4t_fast": r4t_fast.__version__}
    for pkg in ("torch", "numpy", "transformers", "sentence-transformers", "usearch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    versions["build_info"] = _jsonable(r4t_fast.build_info())
    return machine, versions


def _jsonable(x: Any) -> Any:
    """Recursively turn numpy scalars/arrays, paths and tuples into JSON types; nan/inf -> None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


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
    if split not in _SPLIT_NAMES:
        raise ValueError(f"split: expected one of {', '.join(_SPLIT_NAMES)}, got {split!r}")
    by_id = {s.set_id: s for s in data.dataset.sets}
    chosen = [by_id[i] for i in data.split[split] if i in by_id]
    titled = [s for s in chosen if s.query is not None]
    skipped = len(chosen) - len(titled)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit: expected a positive int or None, got {limit!r}")
        titled = titled[:limit]
    if not titled:
        raise ValueError(
            f"split: the {split!r} split of {data.dataset.name!r} has no set with a usable title "
            f"({len(chosen)} sets, {skipped} untitled)"
        )
    return titled, skipped


def _budgets(budgets: Sequence[int]) -> tuple[int, ...]:
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ValueError(f"budgets: expected positive ints (candidates per row), got {budgets!r}")
        out.append(int(b))
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
    latency_calls: dict[int, int] | None = None,
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
        budgets: candidates per row for Recall@K/Hit@K (``K = k * b``).
        limit: evaluate only the first ``limit`` titled sets of the split.
        seed: split seed.
        data_dir, cache_dir: see :func:`load_eval_data`.
        data: pre-loaded :class:`EvalData` (skips loading; ``dataset``/``encoder``/``seed`` are then ignored).
        batch_size: queries per ``retrieve`` call in the quality run.
        latency_batch_sizes: batch sizes for the latency measurement (empty: skip it).
        latency_calls: timed calls per batch size (default: 16/4/2 for 1/8/64; LLM methods 2/1/1).
        n_boot: bootstrap resamples for the CIs.
        progress: tqdm progress bars.
        command: the command line stored in the record (default: ``sys.argv``).

    Returns:
        The record: ``dataset``, ``method``, ``split``, ``n_queries``, ``metrics``, ``ci``,
        ``latency_ms_per_query``, ``machine``, ``versions``, ``command``, ``date``, ``config``, plus
        ``method_stats`` (LLM format failures and the like, where the method counts them) and
        ``per_query`` (per-query values by set id, for paired comparisons).
    """
    from tqdm.auto import tqdm

    from . import metrics as M

    t_start = time.perf_counter()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    budgets = _budgets(budgets)
    if data is None:
        data = load_eval_data(
            dataset, encoder=encoder, data_dir=data_dir, cache_dir=cache_dir, seed=seed, progress=progress
        )
    retriever, name = resolve_method(method, data, method_name=method_name, method_kwargs=method_kwargs)
    sets, n_untitled = _sets_of_split(data, split, limit)
    catalog = data.catalog
    if k > len(catalog):
        raise ValueError(f"k: expected an int <= catalog size ({len(catalog)}), got {k}")
    queries = [query_text(s) for s in sets]
    references = [catalog.id_to_index(s.item_ids) for s in sets]
    n_cand = min(max(budgets), len(catalog))

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
    sm = M.evaluate_sets(
        [np.asarray(r.item_indices) for r in results],
        [np.asarray(r.row_embeddings) for r in results],
        q_emb,
        catalog.embeddings,
        references=references,
        candidates=cands if usable else None,
        budget_per_row=usable[0] if usable else None,
        item_categories=categories,
        mrecall_k=k,
    )
    per = dict(sm.per_query)
    # relevance of the retrieved items themselves: (1 + mean_i cos(e(item_i), e(q))) / 2, the alignment
    # formula applied to the items (``alignment`` proper scores the rows, i.e. the subqueries)
    per["item_alignment"] = np.array(
        [
            float(
                M.alignment(
                    catalog.embeddings[np.asarray(r.item_indices)[np.asarray(r.item_indices) >= 0]], q
                )
            )
            for r, q in zip(results, q_emb, strict=True)
        ]
    )
    cand_list = cands if cands is not None else []
    for b in usable[1:]:
        union = [M.union_candidates(c, b) for c in cand_list]
        big_k = max(c.shape[0] for c in cand_list) * b
        per[f"recall@{big_k}"] = M.recall_at_k(union, references)
        per[f"hit@{big_k}"] = M.hit_at_k(union, references)
    means: dict[str, float | None] = {}
    ci: dict[str, list[float] | None] = {}
    for key in sorted(per):
        v = per[key]
        fin = v[np.isfinite(v)]
        means[key] = float(fin.mean()) if fin.size else None
        if fin.size >= 2:
            c = M.bootstrap_ci(fin, n_boot=n_boot, seed=0)
            ci[key] = [c.low, c.high]
        else:
            ci[key] = None

    # -- latency -------------------------------------------------------------------------------------
    is_llm = name in LLM_METHODS or hasattr(retriever, "lm")
    latency: dict[str, float | None] = {}
    latency_cfg: dict[str, Any] = {"batch_sizes": list(latency_batch_sizes)}
    if latency_batch_sizes:
        calls = latency_calls if latency_calls is not None else (_LLM_LATENCY_CALLS if is_llm else None)
        # LLM methods: a batch size equal to the run's batch size is timed on the run's full batches
        # (the Recall candidates cost milliseconds next to seconds of generation)
        reused = {
            int(b): [t for n, t in batch_times if n == int(b)]
            for b in latency_batch_sizes
            if is_llm and int(b) == batch_size and any(n == int(b) for n, _ in batch_times)
        }
        todo = [int(b) for b in latency_batch_sizes if int(b) not in reused]
        pool = queries[: max(int(b) for b in latency_batch_sizes)]
        lat, detail = measure_latency(retriever, pool, k, todo, calls) if todo else ({}, {})
        for b, times in reused.items():
            lat[str(b)] = 1000.0 * float(np.mean(times)) / b
            detail[str(b)] = {
                "calls": len(times),
                "queries": len(times) * b,
                "batch_ms": [round(1000.0 * t, 3) for t in times],
                "source": f"the quality run's full batches (n_candidates={n_cand})",
            }
        latency = {str(int(b)): lat[str(int(b))] for b in latency_batch_sizes}
        latency_cfg.update(
            {
                "protocol": "mean wall time of retrieve(batch, k) per query, n_candidates=0, after one "
                "warm-up call; batches cycle through the first max(batch) evaluated queries",
                "sample": "small sample (LLM method)" if is_llm else "regular",
                "query_pool": len(pool),
                "per_batch": {str(int(b)): detail[str(int(b))] for b in latency_batch_sizes},
            }
        )

    machine, versions = environment()
    cfg: dict[str, Any] = {
        "encoder": getattr(data.encoder, "name", str(data.encoder)),
        "encoder_dim": int(data.encoder.dim),
        "k": k,
        "budgets_per_row": list(usable) if usable else [],
        "recall_protocol": "R = union of the first b candidates of each of the k rows, K = k * b; "
        "reference = the set's own items",
        "vendi": "Vendi score of the k retrieved items (cosine kernel), in [1, k]",
        "oar_form": "[0, 1] forms of r4t_fast.metrics; composite = 0.6 g + 0.2 d + 0.2 a",
        "item_alignment": "(1 + mean cos(item, query)) / 2 over the k retrieved items (relevance of the set)",
        "catalog": {
            "n_items": len(catalog),
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
        "method": _method_config(retriever),
        "latency": latency_cfg,
        "quality_run_s": round(run_s, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
        "dataset_source": data.dataset.source,
    }
    record = {
        "dataset": data.dataset.name,
        "method": name,
        "split": split,
        "n_queries": len(queries),
        "metrics": means,
        "ci": ci,
        "latency_ms_per_query": latency,
        "machine": machine,
        "versions": versions,
        "command": command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg,
    }
    if method_stats is not None:
        record["method_stats"] = method_stats
    record["per_query"] = {"set_id": [s.set_id for s in sets], **{key: per[key] for key in sorted(per)}}
    return _jsonable(record)


# ----------------------------------------------------------------------------------------------------
# printing and CLI
# ----------------------------------------------------------------------------------------------------
def format_table(record: dict[str, Any]) -> str:
    """A plain-text table of one record's metrics (mean and 95% CI) and latency."""
    lines = [
        f"{record['method']} on {record['dataset']}/{record['split']} "
        f"({record['n_queries']} queries, catalog {record['config']['catalog']['n_items']} items)",
        f"{'metric':<20} {'mean':>9}   95% CI",
    ]
    for key, v in record["metrics"].items():
        c = record["ci"].get(key)
        mean = "n/a" if v is None else f"{v:.4f}"
        ci = "" if not c else f"[{c[0]:.4f}, {c[1]:.4f}]"
        lines.append(f"{key:<20} {mean:>9}   {ci}")
    lat = record.get("latency_ms_per_query") or {}
    if lat:
        parts = ", ".join(f"batch {b}: {ms:.2f}" for b, ms in lat.items() if ms is not None)
        lines.append(f"latency ms/query: {parts}")
    stats = record.get("method_stats")
    if stats:
        lines.append(
            f"fan-out: format failures {stats.get('format_failure_rate', 0):.1%}, fallback rows "
            f"{stats.get('fallback_row_rate', 0):.1%}, mean new tokens {stats.get('mean_new_tokens', 0):.0f}"
        )
    return "\n".join(lines)


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
        "--split", default="test", choices=_SPLIT_NAMES, help="split to evaluate (default test)"
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
    from .data import DataError

    if args.threads is not None:
        if args.threads < 1:
            print(f"r4t eval: error: --threads: expected a positive int, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # for OpenMP runtimes loaded later
        torch.set_num_threads(args.threads)
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
            n_boot=args.n_boot,
            progress=not args.no_progress,
            command=_command(args),
        )
    except (DataError, ValueError, FileNotFoundError, ImportError) as exc:
        print(f"r4t eval: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out)
    print(format_table(record))
    print(f"wrote {out}")
    return 0
