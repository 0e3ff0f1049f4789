"""Query-time filters: what does ``allowed=mask`` cost inside the fused kernels?

Question: at 1M catalog items, how much slower is a filtered exact top-k (``ops.knn(..., allowed=mask)``)
and a filtered set grounding (``ops.ground_sets(..., allowed=mask)``) than the same call without a filter,
and than searching a catalog that holds only the allowed rows (the best a pre-filtered index can do)?
Target (issue 13): overhead <= 10 %. Baseline in the same run: torch matmul + masked_fill + topk.

    python benchmarks/bench_filter.py            # N = 1M -> results/filter_cpu.{json,md}
    python benchmarks/bench_filter.py --quick    # N = 100k, fewer cases -> results/filter_cpu_quick.*

Masks: all rows allowed (the pure cost of the mechanism: the same work plus reading the mask), random 50 %,
10 % and 1 % of rows, and one contiguous 10 % block (a category stored together).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, timeit, write_results  # noqa: E402
from bench_knn import clustered, cpu_flags  # noqa: E402
from r4t_fast import ops  # noqa: E402


def masks(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    block = np.zeros(n, bool)
    block[n // 3 : n // 3 + n // 10] = True
    return {
        "all allowed": np.ones(n, bool),
        "random 50%": rng.random(n) < 0.5,
        "random 10%": rng.random(n) < 0.1,
        "random 1%": rng.random(n) < 0.01,
        "block 10%": block,
    }


def torch_filtered_topk(q: torch.Tensor, c: torch.Tensor, k: int, m: torch.Tensor):
    return torch.topk((q @ c.T).masked_fill_(~m, -torch.inf), k, dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 100k and fewer cases (smoke run)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5, help="timed runs per case (best is reported)")
    args = p.parse_args()
    N = 100_000 if args.quick else 1_000_000
    d, k = 128, args.k
    batches = [1, 64] if args.quick else [1, 64, 1024]
    c = clustered(N, d, 0)
    ct = torch.from_numpy(c)
    ms = masks(N, 1)
    rows = []
    for B in batches:
        qt = torch.from_numpy(clustered(B, d, 2))
        rep = args.repeat if B * N <= 64 * 1_000_000 else max(2, args.repeat // 2)
        base = timeit(lambda: ops.knn(qt, ct, k, check_finite=False), repeat=rep)
        for name, m in ms.items():
            mt = torch.from_numpy(m)
            sliced = torch.from_numpy(np.ascontiguousarray(c[m]))
            t_mask = timeit(lambda: ops.knn(qt, ct, k, check_finite=False, allowed=mt), repeat=rep)
            t_slice = timeit(lambda: ops.knn(qt, sliced, k, check_finite=False), repeat=rep)
            t_torch = None
            if B <= 64:
                t_torch = timeit(lambda: torch_filtered_topk(qt, ct, k, mt), repeat=rep)
            s, i = ops.knn(qt, ct, k, check_finite=False, allowed=mt)  # the answer is the sliced search's
            ss, si = ops.knn(qt, sliced, k, check_finite=False)
            idx = np.flatnonzero(m)
            real = si >= 0
            assert bool(m[i[i >= 0].numpy()].all()) and torch.equal(i[real], torch.from_numpy(idx)[si[real]])
            row = {
                "op": "knn",
                "N": N,
                "d": d,
                "B": B,
                "k": k,
                "mask": name,
                "allowed": int(m.sum()),
                "times": {"no filter": base, "allowed=mask": t_mask, "sliced catalog": t_slice},
            }
            if t_torch is not None:
                row["times"]["torch masked_fill+topk"] = t_torch
            row["overhead_vs_unfiltered"] = t_mask["min_s"] / base["min_s"] - 1
            row["overhead_vs_sliced"] = t_mask["min_s"] / t_slice["min_s"] - 1
            rows.append(row)
            print(
                f"knn B={B} {name:12s} none {base['min_s'] * 1e3:8.2f} ms  "
                f"mask {t_mask['min_s'] * 1e3:8.2f} ms  "
                f"sliced {t_slice['min_s'] * 1e3:8.2f} ms  vs-none {row['overhead_vs_unfiltered']:+.1%}  "
                f"vs-sliced {row['overhead_vs_sliced']:+.1%}",
                flush=True,
            )
    # Grounding: 64 sets of 10 rows (the retriever's batch), with and without a filter.
    S, L = 64, 10
    sets = torch.from_numpy(clustered(S * L, d, 3).reshape(S, L, d))
    base = timeit(lambda: ops.ground_sets(sets, ct, check_finite=False), repeat=args.repeat)
    for name in ("all allowed", "random 10%", "block 10%"):
        mt = torch.from_numpy(ms[name])
        t_mask = timeit(lambda: ops.ground_sets(sets, ct, check_finite=False, allowed=mt), repeat=args.repeat)
        ids, _ = ops.ground_sets(sets, ct, check_finite=False, allowed=mt)
        assert bool(mt[ids.flatten()].all()) and all(len(set(r)) == L for r in ids.tolist())
        row = {
            "op": "ground_sets",
            "N": N,
            "d": d,
            "B": S,
            "L": L,
            "mask": name,
            "allowed": int(ms[name].sum()),
            "times": {"no filter": base, "allowed=mask": t_mask},
            "overhead_vs_unfiltered": t_mask["min_s"] / base["min_s"] - 1,
        }
        rows.append(row)
        print(
            f"ground_sets {S}x{L} {name:12s} overhead vs none {row['overhead_vs_unfiltered']:+.1%}",
            flush=True,
        )

    env = environment(("faiss-cpu",))
    env["machine"]["cpu_flags"] = cpu_flags()
    worst = max(r["overhead_vs_unfiltered"] for r in rows)
    worst_all = max(r["overhead_vs_unfiltered"] for r in rows if r["mask"] == "all allowed")
    worst_sliced = max(r["overhead_vs_sliced"] for r in rows if "overhead_vs_sliced" in r)
    payload = {
        "benchmark": "filter_cpu",
        "environment": env,
        "results": rows,
        "summary": {
            "max_overhead_vs_unfiltered": worst,
            "max_overhead_all_allowed": worst_all,
            "max_overhead_vs_sliced_catalog": worst_sliced,
            "target": 0.10,
        },
    }
    md = [
        f"# Query-time filters inside the kernels (N = {N:,}, d = {d}, k = {k})",
        "",
        f"{env['date']} — {env['machine']['cpu']}, {env['machine']['cores']} cores "
        f"(SIMD: {', '.join(env['machine']['cpu_flags'])}); torch {env['versions'].get('torch')}, "
        f"numpy {env['versions'].get('numpy')}; r4t_fast SIMD clone: {env['build_info']['simd']}",
        "",
        f"Load average at the end of the run: {env['load_average_1_5_15']}. Times: best of "
        f"{args.repeat} runs (fewer for B = 1024), ms. Catalog: clustered unit vectors, float32.",
        "",
        "Overhead = time with `allowed=mask` / time of the same call without a filter − 1 (negative: "
        "faster, since excluded rows are skipped before any arithmetic). *vs sliced* compares with "
        "searching a catalog holding only the allowed rows (`catalog[mask]`, built outside the timing): "
        "the cost of the mask mechanism itself.",
        "",
        "| op | B | mask | allowed | no filter ms | allowed=mask ms | overhead | sliced ms | vs sliced "
        "| torch masked ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms_or_dash(t: dict | None, digits: int = 2) -> str:
        return "—" if t is None else f"{t['min_s'] * 1e3:.{digits}f}"

    for r in rows:
        t = r["times"]
        shape = f"{r['B']}×{r['L']}" if "L" in r else str(r["B"])
        vs_sliced = f"{r['overhead_vs_sliced']:+.1%}" if "overhead_vs_sliced" in r else "—"
        md.append(
            f"| {r['op']} | {shape} | {r['mask']} | {r['allowed']:,} | {ms_or_dash(t['no filter'])} | "
            f"{ms_or_dash(t['allowed=mask'])} | {r['overhead_vs_unfiltered']:+.1%} | "
            f"{ms_or_dash(t.get('sliced catalog'))} | {vs_sliced} | "
            f"{ms_or_dash(t.get('torch masked_fill+topk'), 1)} |"
        )
    md += [
        "",
        f"Largest overhead against the unfiltered call: {worst:+.1%} (with every row allowed: "
        f"{worst_all:+.1%}); against the sliced catalog: {worst_sliced:+.1%}. Target: <= +10 %.",
        "",
        f"Command: `{env['command']}`",
        "",
    ]
    write_results("filter_cpu" + ("_quick" if args.quick else ""), payload, "\n".join(md))


if __name__ == "__main__":
    main()
