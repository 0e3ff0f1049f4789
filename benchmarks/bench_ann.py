"""The grounding backends at scale: exact fused kernel vs usearch HNSW at 1M and 10M clustered items.

Question: past what catalog size does an ANN graph pay, what recall@k does it keep against exact
search, at what ms/query, and what does it cost in build time and memory (RSS)? Also: how fast does a
saved catalog load (verified, trusted, memory-mapped ``view=True``)?

Items and queries are clustered unit vectors (HNSW recall on i.i.d. Gaussians is meaningless), d = 128:
10M x 384 float32 is 15 GiB before any graph, beyond this 24 GiB machine with HNSW overhead; 128 keeps
1M and 10M on the same dimension. Searches go through the backends of ``r4t_fast.data.backends`` (the
layer ``Catalog.search`` calls); the Catalog itself (ids, save/load, view) is measured at 1M.

    python benchmarks/bench_ann.py                 # 1M + 10M -> results/ann_cpu.{json,md} (~20 min)
    python benchmarks/bench_ann.py --quick         # 100k, a smoke run (~1 min)
    python benchmarks/bench_ann.py --sizes 1000000 --build-budget-s 300
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, write_results  # noqa: E402
from r4t_fast.data.backends import ExactBackend, UsearchBackend  # noqa: E402

ITEMS_PER_CLUSTER = 1000
"""Items per cluster at every N (the local difficulty of the kNN problem grows with cluster size: at 100k,
recall@10 at ef = 64 is 0.996 with 400 items per cluster, 0.976 with 1000, 0.878 with 4000)."""


def clustered(n: int, d: int, seed: int, clusters: int, chunk: int = 1 << 20) -> torch.Tensor:
    """(n, d) float32 unit vectors around ``clusters`` random centres, generated in chunks (peak memory
    = the result + one chunk)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(12345).standard_normal((clusters, d), dtype=np.float32)
    out = torch.empty((n, d), dtype=torch.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        x = centers[rng.integers(0, clusters, hi - lo)]
        x += 0.5 * rng.standard_normal((hi - lo, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo:hi] = torch.from_numpy(x)
    return out


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_mib() -> float:
    return status_kib("VmRSS") / 1024


def recall(rows: torch.Tensor, truth: torch.Tensor) -> float:
    k = truth.shape[1]
    return float(
        np.mean([len(set(a) & set(b)) / k for a, b in zip(rows.tolist(), truth.tolist(), strict=True)])
    )


def time_search(fn, q: torch.Tensor, k: int, single: int) -> dict:
    """ms/query at B = 1 (median of ``single`` sequential queries) and for the whole batch."""
    fn(q[:1], k)  # warm up
    singles = []
    for i in range(single):
        t = time.perf_counter()
        fn(q[i : i + 1], k)
        singles.append(time.perf_counter() - t)
    t = time.perf_counter()
    _, rows = fn(q, k)
    batch = time.perf_counter() - t
    return {
        "ms_per_query_b1": 1e3 * float(np.median(singles)),
        "ms_per_query_batch": 1e3 * batch / q.shape[0],
        "batch": int(q.shape[0]),
        "rows": rows,
    }


def bench_size(
    n: int, d: int, k: int, n_queries: int, configs: list[dict], budget_s: float, work: Path
) -> dict:
    clusters = max(1, n // ITEMS_PER_CLUSTER)
    t = time.perf_counter()
    base_rss = rss_mib()
    x = clustered(n, d, seed=0, clusters=clusters)
    q = clustered(n_queries, d, seed=1, clusters=clusters)
    out: dict = {
        "n": n,
        "dim": d,
        "k": k,
        "clusters": clusters,
        "queries": n_queries,
        "generate_s": round(time.perf_counter() - t, 1),
        "embeddings_mib": round(x.numel() * 4 / 2**20),
        "rss_mib_embeddings": round(rss_mib() - base_rss),
    }
    print(f"[n={n:,}] generated in {out['generate_s']} s", flush=True)

    exact = ExactBackend()
    res = time_search(lambda qq, kk: exact.search(x, qq, kk), q, k, single=20)
    truth = res.pop("rows")
    out["exact"] = {key: round(v, 3) if isinstance(v, float) else v for key, v in res.items()}
    print(f"[n={n:,}] exact: {out['exact']}", flush=True)

    out["hnsw"] = []
    for cfg in configs:
        params = {k2: v for k2, v in cfg.items() if k2 not in ("ef_sweep", "save_view")}
        be = UsearchBackend(params)
        gc.collect()
        before = rss_mib()
        t = time.perf_counter()
        built = build_with_budget(be, x, budget_s)
        build_s = time.perf_counter() - t
        row: dict = {
            "params": params,
            "build_s": round(build_s, 1),
            "inserted": built,
            "complete": built == n,
            "build_rate_per_s": round(built / build_s) if build_s else None,
            "index_rss_mib": round(rss_mib() - before),
            "index_memory_usage_mib": round(be._index.memory_usage / 2**20),
        }
        print(f"[n={n:,}] built {params} in {build_s:.1f} s ({built:,} of {n:,})", flush=True)
        xs, ts = x, truth
        if built < n:  # the budget ran out: measure the graph over the rows inserted, against exact on them
            row["note"] = (
                f"build stopped by the {budget_s:.0f} s budget after {built:,} of {n:,} items; at that rate "
                f"the full build takes about {n / row['build_rate_per_s'] / 60:.0f} min (more: HNSW "
                f"insertion slows as log N); search below is over the first {built:,} items"
            )
            xs = x[:built]
            ts = exact.search(xs, q, k)[1]
            print(f"[n={n:,}]   {row['note']}", flush=True)
        row["search"] = []
        for ef in cfg.get("ef_sweep", [params.get("expansion_search", 64)]):
            be._index.expansion_search = ef
            res = time_search(lambda qq, kk: be.search(xs, qq, kk), q, k, single=64)
            rows = res.pop("rows")
            res = {key: round(v, 3) if isinstance(v, float) else v for key, v in res.items()}
            res["expansion_search"] = ef
            res[f"recall@{k}"] = round(recall(rows, ts), 4)
            row["search"].append(res)
            print(f"[n={n:,}]   ef={ef}: {res}", flush=True)
        if cfg.get("save_view") and built == n:
            row["view"] = view_in_fresh_process(be, x, q, k, truth, work / f"view-{n}")
            print(f"[n={n:,}]   view: {row['view']}", flush=True)
        out["hnsw"].append(row)
        be = None  # free the graph before the next one
        gc.collect()
    out["peak_rss_mib"] = round(status_kib("VmHWM") / 1024)
    return out


def build_with_budget(be: UsearchBackend, x: torch.Tensor, budget_s: float) -> int:
    """Insert rows chunk by chunk until done or ``budget_s`` is spent; returns the rows inserted."""
    n = x.shape[0]
    chunk = min(50_000, max(10_000, n // 40))  # small: the budget is checked between chunks
    be.build(x[:0])
    t = time.perf_counter()
    done = 0
    while done < n and time.perf_counter() - t < budget_s:
        hi = min(n, done + chunk)
        be.appended(x[:hi], done)
        done = hi
    return done


def view_in_fresh_process(
    be: UsearchBackend, x: torch.Tensor, q: torch.Tensor, k: int, truth, d: Path
) -> dict:
    """Save the graph + embeddings, then in a fresh process: memory-map both (``view=True``), search,
    and report load time, RSS and recall."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    be.save(d, x)
    save_file({"embeddings": x}, str(d / "embeddings.safetensors"))
    save_s = time.perf_counter() - t
    torch.save({"q": q, "truth": truth}, d / "queries.pt")
    code = f"""
import json, time, sys, numpy as np, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_ann import rss_mib, recall
from r4t_fast.data.backends import UsearchBackend
from r4t_fast.data.catalog import _mmap_safetensors
from pathlib import Path
d = Path({str(d)!r}); z = torch.load(d / "queries.pt"); q, truth = z["q"], z["truth"]
r0 = rss_mib(); t = time.perf_counter()
x = _mmap_safetensors(d / "embeddings.safetensors", "embeddings")
be = UsearchBackend.load(d, {x.shape[0]}, {x.shape[1]}, {be.params!r}, view=True)
load_s = time.perf_counter() - t; r1 = rss_mib()
be._index.expansion_search = {int(be._index.expansion_search)}
t = time.perf_counter(); _, rows = be.search(x, q, {k}); s = time.perf_counter() - t
print(json.dumps({{"load_s": round(load_s, 3), "rss_mib_after_load": round(r1 - r0),
    "rss_mib_after_search": round(rss_mib() - r0), "ms_per_query_batch": round(1e3 * s / q.shape[0], 3),
    "recall@{k}": round(recall(rows, truth), 4)}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr else f"rc {p.returncode}"}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["save_s"] = round(save_s, 1)
    res["note"] = "fresh process; RSS relative to the process before loading (pages touched by the search)"
    return res


def catalog_io(n: int, d: int, work: Path) -> dict:
    """Catalog save (crash-safe) and load (verified / trusted / view) times at size n, exact index."""
    from r4t_fast import Catalog

    x = clustered(n, d, seed=0, clusters=max(1, n // ITEMS_PER_CLUSTER))
    t = time.perf_counter()
    cat = Catalog([f"item-{j}" for j in range(n)], x, normalize=False)
    build_s = time.perf_counter() - t
    del x
    t = time.perf_counter()
    path = cat.save(work / "catalog")
    save_s = time.perf_counter() - t
    out = {"n": n, "dim": d, "construct_s": round(build_s, 2), "save_s": round(save_s, 2)}
    for label, kw in [
        ("load_verified_s", {}),
        ("load_trusted_s", {"verify": False}),
        ("load_view_trusted_s", {"view": True, "verify": False}),
    ]:
        t = time.perf_counter()
        Catalog.load(path, **kw)
        out[label] = round(time.perf_counter() - t, 2)
    return out


def markdown(payload: dict) -> str:
    env = payload["environment"]
    m = env["machine"]
    rkey = f"recall@{payload['k']}"
    lines = [
        "# Grounding backends at scale on the CPU: exact fused kernel vs usearch HNSW",
        "",
        f"{env['date']} — {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
        + ", ".join(f"{p} {v}" for p, v in env["versions"].items())
        + f"; r4t_fast SIMD: {env['build_info'].get('simd', '?')}",
        "",
        f"Load average (1/5/15 min) at the start: {payload['load_average_start']}, at the end: "
        f"{env['load_average_1_5_15']} (2 shared cores: compare within a run).",
        "",
        f"Clustered unit vectors ({ITEMS_PER_CLUSTER} items per cluster at every N: random centres, "
        "noise 0.5 per dimension), "
        f"d = {payload['dim']} (10M x 384 float32 = 15 GiB does not fit with a "
        f"graph in 24 GiB), k = {payload['k']}, {payload['queries']} queries; recall@k against the exact "
        "top-k of the same run; ms/query at B = 1 (median of sequential single queries) and in one batch. "
        "HNSW: usearch, inner product; scores are re-computed exactly for the candidates "
        "(`rerank` = candidates fetched).",
        "",
        "| N | method | build s | index RSS MiB | recall@k | ms/query B=1 | ms/query batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        e = r["exact"]
        lines.append(
            f"| {r['n']:,} | exact (ops.knn) | — | 0 | 1.0 | {e['ms_per_query_b1']:.2f} | "
            f"{e['ms_per_query_batch']:.2f} |"
        )
        for h in r["hnsw"]:
            p = h["params"]
            name = f"HNSW {p.get('quantization', 'f32')} M={p.get('connectivity', 16)}"
            if p.get("rerank"):
                name += f" rerank={p['rerank']}"
            if not h["complete"]:
                name += f" (graph over the first {h['inserted']:,})"
            for s in h["search"]:
                lines.append(
                    f"| {r['n']:,} | {name} ef={s['expansion_search']} | {h['build_s']} | "
                    f"{h['index_rss_mib']} | {s[rkey]:.3f} | {s['ms_per_query_b1']:.2f} | "
                    f"{s['ms_per_query_batch']:.3f} |"
                )
    lines += ["", "Build, memory and serving:", ""]
    for r in payload["results"]:
        lines.append(
            f"- N = {r['n']:,}: embeddings {r['embeddings_mib']} MiB; peak RSS of the run "
            f"{r['peak_rss_mib']} MiB."
        )
        for h in r["hnsw"]:
            lines.append(
                f"  - {h['params']}: {h['inserted']:,} items inserted in {h['build_s']} s "
                f"({h['build_rate_per_s']:,}/s); usearch memory_usage {h['index_memory_usage_mib']} MiB"
                + (f" — {h['note']}" if h.get("note") else "")
            )
            if h.get("view"):
                v = h["view"]
                lines.append(f"  - saved, then `view()` in a fresh process: {json.dumps(v)}")
    if payload.get("catalog_io"):
        c = payload["catalog_io"]
        lines += [
            "",
            f"Catalog persistence at N = {c['n']:,}, d = {c['dim']} (exact index; crash-safe save = write "
            "a new version, fsync + sha256 every file, switch a symlink): "
            f"construct {c['construct_s']} s, save {c['save_s']} s, "
            f"load verified (sha256) {c['load_verified_s']} s, trusted (`verify=False`) "
            f"{c['load_trusted_s']} s, memory-mapped and trusted (`view=True, verify=False`) "
            f"{c['load_view_trusted_s']} s (the rest of a trusted load is parsing and checking items.jsonl).",
        ]
    if payload.get("notes"):
        lines += ["", *payload["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100k items only, a smoke run")
    ap.add_argument("--sizes", default=None, help="comma-separated catalog sizes (default 1M,10M)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument(
        "--build-budget-s",
        type=float,
        default=360.0,
        help="stop an HNSW build of >= 5M items after this long",
    )
    ap.add_argument("--i8-small", action="store_true", help="also build an i8 graph at sizes < 5M")
    ap.add_argument("--name", default=None, help="result file stem (default ann_cpu, or ann_cpu_quick)")
    args = ap.parse_args()
    sizes = [100_000] if args.quick else [1_000_000, 10_000_000]
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    name = args.name or ("ann_cpu_quick" if args.quick else "ann_cpu")
    import os

    load_start = [round(v, 2) for v in os.getloadavg()]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_ann-") as tmp:
        work = Path(tmp)
        for n in sizes:
            big = n >= 5_000_000
            configs = (
                [
                    {
                        "quantization": "i8",
                        "connectivity": 16,
                        "expansion_add": 64,
                        "rerank": 40,
                        "ef_sweep": [64, 128],
                    }
                ]
                if big
                else [
                    {
                        "quantization": "f32",
                        "connectivity": 16,
                        "expansion_add": 64,
                        "ef_sweep": [32, 64, 128],
                        "save_view": True,
                    },
                ]
                + (
                    [
                        {
                            "quantization": "i8",
                            "connectivity": 16,
                            "expansion_add": 64,
                            "rerank": 40,
                            "ef_sweep": [64, 128],
                        }
                    ]
                    if args.i8_small or args.quick
                    else []
                )
            )
            budget = args.build_budget_s if big else float("inf")  # graphs up to 1M are always built fully
            results.append(bench_size(n, args.dim, args.k, args.queries, configs, budget, work))
        io_n = min(sizes[0], 1_000_000)
        cat_io = catalog_io(io_n, args.dim, work)
    payload = {
        "environment": environment(("usearch", "safetensors")),
        "load_average_start": load_start,
        "dim": args.dim,
        "k": args.k,
        "queries": args.queries,
        "results": results,
        "catalog_io": cat_io,
        "notes": [],
    }
    jp, mp = write_results(name, payload, markdown(payload))
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
