"""What goes into an evaluation record next to the numbers: the machine and package versions
(:func:`environment`), the identity of the queries scored (:func:`query_ids_sha256`) and of the catalog
(:func:`catalog_fingerprint`, :func:`catalog_mismatch`), a record restricted to a subset of its
queries (:func:`subset_record`), the paired difference of two records on their common queries
(:func:`paired_difference`), JSON-safe values (``_jsonable``), machine-independent paths
(:func:`portable_paths`) and the plain-text table ``r4t eval`` prints (:func:`format_table`).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r4t_fast._internal import default_cache_dir, machine_description, package_versions

__all__ = [
    "catalog_fingerprint",
    "catalog_mismatch",
    "environment",
    "format_table",
    "paired_difference",
    "per_query_values",
    "local_path",
    "portable_paths",
    "query_ids_sha256",
    "subset_record",
]

_VERSION_PACKAGES = ("torch", "numpy", "transformers", "sentence-transformers", "usearch")
"""Distributions whose versions every record states (those not installed are left out)."""


# ----------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------
CACHE_ROOT = "$R4T_CACHE_DIR"
DATA_ROOT = "$R4T_DATA_DIR"
"""How a record writes a path under the cache root / the data directory (``$R4T_CACHE_DIR/splits/...``):
records read the same on every machine; paths under the working directory are written relative to it
(``runs/polyvore/rl/policy``)."""


def _roots(cache_dirs: Iterable[Any], data_dirs: Iterable[Any], base: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for dirs, name in ((cache_dirs, CACHE_ROOT), (data_dirs, DATA_ROOT), ((base,), "")):
        for d in dirs:
            if d is None:
                continue
            for form in {os.path.abspath(os.fspath(d)), os.path.realpath(os.fspath(d))}:
                if len(Path(form).parts) > 2:  # never a bare / or /home: it would eat every path
                    out.append((form.rstrip("/"), name))
    return sorted(out, key=lambda r: -len(r[0]))  # the longest (innermost) root first


def portable_paths(
    record: Any,
    *,
    cache_dirs: Iterable[Any] = (),
    data_dirs: Iterable[Any] = (),
    base: Any = None,
) -> Any:
    """``record`` with every absolute path under a cache root (``cache_dirs`` and the default), a data
    directory (``data_dirs`` and the default) or ``base`` (default: the working directory) rewritten:
    ``$R4T_CACHE_DIR/...``, ``$R4T_DATA_DIR/...`` or relative to ``base``, inside any string (a
    comma-joined ``dataset_source`` included). Other strings and values are returned unchanged.

    >>> portable_paths({"f": "/srv/c/splits/a.json, /srv/d/x.txt"}, cache_dirs=["/srv/c"],
    ...                data_dirs=["/srv/d"], base="/srv/run")
    {'f': '$R4T_CACHE_DIR/splits/a.json, $R4T_DATA_DIR/x.txt'}
    """
    from r4t_fast.data.datasets import default_data_dir

    base = os.getcwd() if base is None else base
    roots = _roots([*cache_dirs, default_cache_dir()], [*data_dirs, default_data_dir()], base)
    end = r"(/|(?=$|[\s,;:'\"]))"  # the root itself, or a path below it
    pats = [(re.compile(r"(?<![\w.$/-])" + re.escape(root) + end), name) for root, name in roots]

    def fix(text: str) -> str:
        for pat, name in pats:  # under the working directory: relative ("." for itself)
            text = pat.sub(lambda m, n=name: n + m.group(1) if n else ("" if m.group(1) else "."), text)
        return text

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return fix(x) if "/" in x else x
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(record)


def local_path(text: str, *, cache_dir: Any = None, data_dir: Any = None) -> Path:
    """A path a record stores (:func:`portable_paths`) on this machine: ``$R4T_CACHE_DIR`` and
    ``$R4T_DATA_DIR`` expand to ``cache_dir`` / ``data_dir`` (default: this machine's roots); any other
    path is returned as it is (relative ones are relative to the working directory of the run).

    >>> str(local_path("$R4T_CACHE_DIR/splits/a.json", cache_dir="/srv/c"))
    '/srv/c/splits/a.json'
    """
    from r4t_fast.data.datasets import default_data_dir

    for name, root in (
        (CACHE_ROOT, cache_dir or default_cache_dir()),
        (DATA_ROOT, data_dir or default_data_dir()),
    ):
        if root is not None and (text == name or text.startswith(name + "/")):
            return Path(root) / text[len(name) + 1 :]
    return Path(text)


def environment() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(machine, versions)`` recorded next to every number (CPU, cores, memory, GPU; package versions)."""
    from r4t_fast._version import __version__
    from r4t_fast.kernels._backend import build_info

    machine = machine_description()
    found = package_versions(_VERSION_PACKAGES)
    versions: dict[str, Any] = {"python": found.pop("python"), "r4t_fast": __version__}
    versions.update({pkg: v for pkg, v in found.items() if v != "not installed"})
    versions["build_info"] = _jsonable(build_info())
    return machine, versions


# ----------------------------------------------------------------------------------------------------
# identities: the queries and the catalog a record was scored on
# ----------------------------------------------------------------------------------------------------
def query_ids_sha256(set_ids: Iterable[Any]) -> str:
    """sha256 (hex) of the sorted set ids a record scored, one per line (UTF-8, ``\\n``-joined).

    Two records with the same hash were scored on exactly the same queries, whatever their order.

    >>> query_ids_sha256(["b", "a"]) == query_ids_sha256(["a", "b"]) != query_ids_sha256(["a"])
    True
    """
    ids = sorted(str(i) for i in set_ids)
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def catalog_fingerprint(catalog: Any) -> dict[str, Any]:
    """``{"n_items", "dim", "ids_sha256", "embeddings_sha256"}`` of a catalog.

    ``ids_sha256`` hashes the item ids in row order (``\\n``-joined); ``embeddings_sha256`` the float32
    bytes of the ``(N, d)`` embedding matrix (C order), so a catalog stored in float16 and one stored in
    float32 with the same values differ only if their float32 values differ.
    """
    emb = getattr(catalog, "embeddings", None)
    ids = getattr(catalog, "ids", None)
    if emb is None or ids is None:
        raise ValueError(
            f"catalog: expected an object with .ids and .embeddings, got {type(catalog).__name__}"
        )
    if hasattr(emb, "detach"):
        emb = emb.detach().cpu().float().numpy()
    arr = np.ascontiguousarray(np.asarray(emb, dtype=np.float32))
    return {
        "n_items": int(arr.shape[0]),
        "dim": int(arr.shape[1]) if arr.ndim == 2 else None,
        "ids_sha256": hashlib.sha256("\n".join(str(i) for i in ids).encode("utf-8")).hexdigest(),
        "embeddings_sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
    }


def catalog_mismatch(method_fp: dict[str, Any], eval_fp: dict[str, Any]) -> str | None:
    """``None`` when two fingerprints agree, else one sentence saying which part differs."""
    if method_fp["ids_sha256"] != eval_fp["ids_sha256"]:
        return (
            f"item ids differ (retriever: {method_fp['n_items']} items, ids sha256 "
            f"{method_fp['ids_sha256'][:12]}; evaluation: {eval_fp['n_items']} items, ids sha256 "
            f"{eval_fp['ids_sha256'][:12]})"
        )
    if method_fp["embeddings_sha256"] != eval_fp["embeddings_sha256"]:
        return (
            f"embeddings differ (same {eval_fp['n_items']} item ids; float32 embedding sha256 "
            f"{method_fp['embeddings_sha256'][:12]} (retriever, dim {method_fp['dim']}) vs "
            f"{eval_fp['embeddings_sha256'][:12]} (evaluation, dim {eval_fp['dim']}))"
        )
    return None


# ----------------------------------------------------------------------------------------------------
# a record on a subset of its queries
# ----------------------------------------------------------------------------------------------------
def _values(v: Sequence[Any]) -> np.ndarray:
    return np.array([np.nan if x is None else float(x) for x in v], dtype=np.float64)


def subset_record(
    record: dict[str, Any], set_ids: Sequence[str], *, n_boot: int | None = None
) -> dict[str, Any]:
    """The record restricted to the queries ``set_ids``: means and CIs recomputed from its per-query values.

    Every metric of a record is a mean of per-query values, so scoring a method on a subset of the
    queries it was run on is exactly this restriction (the fair budget and the catalog do not change).
    ``query_ids_sha256`` and ``n_queries`` describe the subset; ``config.subset_of`` names the full run.
    ``latency_*`` and ``method_stats`` are those of the full run (a note says so). Raises ValueError when
    a set id was not scored by ``record`` or the record has no per-query values.
    """
    from r4t_fast.eval.stats import bootstrap_ci

    per = record.get("per_query")
    if not isinstance(per, dict) or "set_id" not in per:
        raise ValueError(f"record: {record.get('method')!r} has no per-query values to restrict")
    pos = {sid: i for i, sid in enumerate(per["set_id"])}
    missing = [s for s in set_ids if s not in pos]
    if missing:
        raise ValueError(
            f"set_ids: {len(missing)} of {len(set_ids)} were not scored by the {record.get('method')!r} "
            f"record (e.g. {missing[0]!r})"
        )
    idx = [pos[s] for s in set_ids]
    out = copy.deepcopy({k: v for k, v in record.items() if k != "per_query" and not k.startswith("_")})
    boots = n_boot if n_boot is not None else int((record.get("config") or {}).get("n_boot", 1000))
    new_per: dict[str, Any] = {"set_id": list(set_ids)}
    for key, vals in per.items():
        if key == "set_id":
            continue
        v = _values(vals)[idx]
        new_per[key] = v
        fin = v[np.isfinite(v)]
        out["metrics"][key] = float(fin.mean()) if fin.size else None
        if key in out.get("ci", {}):
            out["ci"][key] = None
            if fin.size >= 2:
                c = bootstrap_ci(fin, n_boot=boots, seed=0)
                out["ci"][key] = [c.low, c.high]
    out["n_queries"] = len(set_ids)
    out["query_ids_sha256"] = query_ids_sha256(set_ids)
    cfg = out.setdefault("config", {})
    cfg["subset_of"] = {
        "n_queries": record.get("n_queries"),
        "query_ids_sha256": record.get("query_ids_sha256"),
        "rule": "the full record's per-query values restricted to these set ids; latency and "
        "method_stats are the full run's",
    }
    out["flags"] = _fair_flags(out)
    out["per_query"] = new_per
    return _jsonable(out)


def _fair_flags(record: dict[str, Any]) -> list[str]:
    """The record's flags, with the fair-union flag recomputed from ``per_query.fair_union_size``."""
    flags = [f for f in record.get("flags") or [] if not f.startswith("fair union")]
    per = record.get("per_query") or {}
    big_k = (record.get("metrics") or {}).get("fair_budget")
    sizes = per.get("fair_union_size")
    if sizes is not None and big_k:
        v = _values(sizes)
        short = int((v < big_k).sum())
        if short:
            flags.append(
                f"fair union short of K = {int(big_k)} for {short} of {v.size} queries (smallest "
                f"{int(np.nanmin(v))} items): the method did not supply enough distinct candidates"
            )
    return flags


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
# printing
# ----------------------------------------------------------------------------------------------------
def format_table(record: dict[str, Any]) -> str:
    """A plain-text table of one record's metrics (mean and 95% CI), latency and flags."""
    cat = (record.get("config") or {}).get("catalog") or {}
    lines = [
        f"{record['method']} on {record['dataset']}/{record['split']} "
        f"({record['n_queries']} queries, catalog {cat.get('n_items', '?')} items, "
        f"query ids sha256 {str(record.get('query_ids_sha256', '?'))[:12]})",
        f"{'metric':<22} {'mean':>9}   95% CI",
    ]
    for key, v in record["metrics"].items():
        c = (record.get("ci") or {}).get(key)
        mean = "n/a" if v is None else (f"{v:.0f}" if key == "fair_budget" else f"{v:.4f}")
        ci = "" if not c else f"[{c[0]:.4f}, {c[1]:.4f}]"
        lines.append(f"{key:<22} {mean:>9}   {ci}")
    lat = record.get("latency_ms_per_query") or {}
    if lat:
        parts = ", ".join(f"batch {b}: {ms:.2f}" for b, ms in lat.items() if ms is not None)
        lines.append(f"latency ms/query (median): {parts}")
    brk = record.get("latency_breakdown_ms") or {}
    for b, parts in brk.items():
        lines.append(
            f"  batch {b} breakdown ms/query: "
            + ", ".join(f"{name} {ms:.2f}" for name, ms in parts.items() if ms is not None)
        )
    stats = record.get("method_stats")
    if stats:
        lines.append(
            f"fan-out: usable subqueries {stats.get('usable_subqueries', 0):.2f}, no subquery "
            f"{stats.get('no_subquery_rate', 0):.1%}, strict format failures "
            f"{stats.get('strict_format_failure_rate', 0):.1%}, missing rows "
            f"{stats.get('missing_row_rate', 0):.1%}, "
            f"mean new tokens {stats.get('mean_new_tokens', 0):.0f}"
        )
    for flag in record.get("flags") or []:
        lines.append(f"FLAG: {flag}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# reading records (report and plots)
# ----------------------------------------------------------------------------------------------------
METHOD_ORDER = (
    "dense", "mmr", "dpp", "llm-zeroshot", "llm-bon", "folm", "r4t-diffusion", "r4t-diffusion-rows"
)  # fmt: skip
"""The order methods appear in tables and plots."""

HEADLINE_COLUMNS = (
    ("recall_at_fair", "R@fair", 100.0, 1),
    ("hit_at_fair", "H@fair", 100.0, 1),
    ("item_relevance", "item rel.", 100.0, 1),
    ("vendi", "Vendi", 1.0, 2),
    ("category_coverage", "cat. cov.", 100.0, 1),
    ("ild", "ILD", 100.0, 1),
)
"""(metric, column label, scale, digits) of the headline table; higher is better for each."""


def sort_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(r: dict[str, Any]) -> tuple[str, str, int, str, str]:
        m = str(r["method"])
        rank = METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)
        return (str(r["dataset"]), str(r["split"]), rank, m, str(r.get("_path", "")))

    return sorted(records, key=key)


def num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def per_query_values(rec: dict[str, Any], key: str) -> dict[str, float] | None:
    """``{set_id: value}`` of ``rec["per_query"][key]`` (non-finite values left out); None without it."""
    per = rec.get("per_query") or {}
    ids, vals = per.get("set_id"), per.get(key)
    if not isinstance(ids, list) or not isinstance(vals, list) or len(ids) != len(vals):
        return None
    return {sid: float(v) for sid, v in zip(ids, vals, strict=True) if num(v) is not None}


def paired_difference(
    a: dict[str, Any], b: dict[str, Any], key: str, *, n_boot: int = 1000, seed: int = 0
) -> tuple[Any, int] | None:
    """(paired bootstrap CI of ``a − b`` for ``key``, number of queries) over the queries both records
    scored (:func:`r4t_fast.eval.stats.paired_bootstrap_ci`); None when they share none."""
    from r4t_fast.eval.stats import paired_bootstrap_ci

    va, vb = _common_values(a, b, key)
    if not va:
        return None
    ci = paired_bootstrap_ci(va, vb, n_boot=n_boot, seed=seed)
    return ci, len(va)


def _common_values(a: dict[str, Any], b: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    """``key``'s per-query values of ``a`` and ``b`` over the queries both scored, in ``a``'s order."""
    pa, pb = per_query_values(a, key), per_query_values(b, key)
    common = [sid for sid in (pa or {}) if pb is not None and sid in pb]
    return [pa[s] for s in common], [pb[s] for s in common]  # type: ignore[index]


def paired_z(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    """The paired z of record ``a`` over ``b`` on ``key``: the mean per-query difference ``a − b`` over
    the queries both scored, divided by its standard error (the sample sd / sqrt(n)). A difference that
    is the same on every query gives ±inf (0 when it is 0); None when they share fewer than 2 queries.

    A margin in standard errors, not in relative units: a setting chosen on a few validation queries
    by it is one whose lead holds across those queries, not a near-tie on a noisy metric.
    """
    va, vb = _common_values(a, b, key)
    if len(va) < 2:
        return None
    d = np.asarray(va, dtype=np.float64) - np.asarray(vb, dtype=np.float64)
    mean, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(len(d))
    if se <= 1e-12 * max(1.0, abs(mean)):
        return 0.0 if abs(mean) <= 1e-12 else math.copysign(math.inf, mean)
    return mean / se
