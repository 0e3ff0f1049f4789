"""Exact kNN: r4t_fast fused top-k against numpy, torch, faiss-cpu and usearch, in the same run.

Question: how fast is exact inner-product top-k (k = 10) over N catalog rows for a batch of B queries,
and how much extra memory does it take? Catalogs are clustered unit vectors (float32).

    python benchmarks/bench_knn.py                    # CPU grid -> results/knn_cpu.{json,md}
    python benchmarks/bench_knn.py --quick            # small grid, for a smoke run
    python benchmarks/bench_knn.py --device cuda      # GPU: r4t vs torch vs cupy -> results/knn_cuda.*
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _harness import environment, timeit, write_results  # noqa: E402
from r4t_fast import ops  # noqa: E402


def clustered(n: int, d: int, seed: int, clusters: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d), dtype=np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def numpy_topk(q: np.ndarray, c: np.ndarray, k: int):
    s = q @ c.T
    idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(s, idx, 1)
    o = np.argsort(-part, axis=1)
    return np.take_along_axis(part, o, 1), np.take_along_axis(idx, o, 1)


def torch_topk(q: torch.Tensor, c: torch.Tensor, k: int):
    return torch.topk(q @ c.T, k, dim=1)


def peak_rss_extra(method: str, B: int, N: int, d: int, k: int) -> float:
    """Peak RSS growth (MiB) of one search in a fresh process, catalog and queries already resident.

    The kernel's high-water mark is reset (``/proc/self/clear_refs`` = 5) after the inputs are built, so
    the number is VmHWM after the search minus VmRSS before it."""
    code = f"""
import numpy as np, torch, sys
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).resolve().parent)!r})
from bench_knn import clustered, torch_topk, numpy_topk
from r4t_fast import ops
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
c = clustered({N}, {d}, 0); q = clustered({B}, {d}, 1)
ct, qt = torch.from_numpy(c), torch.from_numpy(q)
ops.knn(qt[:8], ct[:1000], {k}); torch_topk(qt[:8], ct[:1000], {k})  # warm up libraries
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
if {method!r} == "r4t": ops.knn(qt, ct, {k}, check_finite=False)
elif {method!r} == "torch": torch_topk(qt, ct, {k})
else: numpy_topk(q, c, {k})
print((status("VmHWM") - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_memory_only(args) -> None:
    """Re-measure only the memory table of an existing results/knn_cpu.json."""
    from _harness import RESULTS

    path = RESULTS / "knn_cpu.json"
    payload = json.loads(path.read_text())
    payload["memory"] = []
    for method in ("r4t", "torch", "numpy"):
        payload["memory"].append(
            {
                "method": method,
                "B": 1024,
                "N": 1_000_000,
                "d": 128,
                "peak_rss_extra_mib": peak_rss_extra(method, 1024, 1_000_000, 128, args.k),
            }
        )
        print(payload["memory"][-1], flush=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path = RESULTS / "knn_cpu.md"
    md = md_path.read_text().split("\nPeak extra RSS")[0].rstrip("\n")
    md += "\n\nPeak extra RSS of one search (B = 1024, N = 1M, d = 128), fresh process:\n\n"
    md += "\n".join(f"- {m['method']}: {m['peak_rss_extra_mib']:.0f} MiB" for m in payload["memory"]) + "\n"
    md_path.write_text(md)


def run_cpu(args) -> None:
    import faiss
    from usearch.index import search as usearch_search

    grid_n = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    grid_d = [128] if args.quick else [128, 384]
    grid_b = [1, 64] if args.quick else [1, 64, 1024]
    k = args.k
    rows = []
    for d in grid_d:
        for N in grid_n:
            c = clustered(N, d, 0)
            ct = torch.from_numpy(c)
            index = faiss.IndexFlatIP(d)
            index.add(c)
            for B in grid_b:
                q = clustered(B, d, 1)
                qt = torch.from_numpy(q)
                big = B * N * d >= 1024 * 1_000_000 * 128
                rep = 1 if big else 3
                res = {}
                res["r4t_fast"] = timeit(lambda: ops.knn(qt, ct, k, check_finite=False), repeat=rep)
                res["torch matmul+topk"] = timeit(lambda: torch_topk(qt, ct, k), repeat=rep)
                res["numpy matmul+argpartition"] = timeit(lambda: numpy_topk(q, c, k), repeat=rep)
                res["faiss IndexFlatIP"] = timeit(lambda: index.search(q, k), repeat=rep)
                if B * N <= 64 * 100_000:  # usearch exact is ~10x slower than numpy; skip the largest cases
                    res["usearch exact"] = timeit(
                        lambda: usearch_search(c, q, k, metric="ip", exact=True), repeat=rep
                    )
                # Check the answers agree (scores, tie-tolerant).
                s, _ = ops.knn(qt, ct, k, check_finite=False)
                ts, _ = torch_topk(qt, ct, k)
                assert torch.allclose(s, ts, atol=1e-4), "r4t_fast and torch disagree"
                row = {"N": N, "d": d, "B": B, "k": k, "times": res}
                base = res["r4t_fast"]["min_s"]
                row["speedup_vs"] = {m: r["min_s"] / base for m, r in res.items() if m != "r4t_fast"}
                rows.append(row)
                print(
                    json.dumps({kk: row[kk] for kk in ("N", "d", "B")}),
                    {m: round(r["min_s"] * 1e3, 2) for m, r in res.items()},
                    flush=True,
                )
    memory = []
    if not args.quick:
        for method in ("r4t", "torch", "numpy"):
            memory.append(
                {
                    "method": method,
                    "B": 1024,
                    "N": 1_000_000,
                    "d": 128,
                    "peak_rss_extra_mib": peak_rss_extra(method, 1024, 1_000_000, 128, k),
                }
            )
            print(memory[-1], flush=True)
    env = environment(("faiss-cpu", "usearch"))
    payload = {"benchmark": "knn_cpu", "environment": env, "results": rows, "memory": memory}
    md = [
        f"# Exact kNN on the CPU (k = {k})",
        "",
        f"{env['date']} — {env['machine']['cpu']}, "
        f"{env['machine']['cores']} cores; torch {env['versions'].get('torch')}, faiss-cpu "
        f"{env['versions'].get('faiss-cpu')}, usearch {env['versions'].get('usearch')}; "
        f"r4t_fast SIMD: {env['build_info']['simd']}",
        "",
        f"Load average at the end of the run: {env['load_average_1_5_15']} (the 2 cores may be shared with "
        "other jobs: compare the ratios, which are taken in the same run, rather than absolute times).",
        "",
        "Times are the best of 3 runs (1 for the largest cases), milliseconds; ratios = other / r4t_fast "
        "(> 1: r4t_fast faster).",
        "",
        "| N | d | B | r4t_fast ms | torch ms (×) | numpy ms (×) | faiss ms (×) | usearch exact ms (×) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["times"]

        def cell(m, t=t, r=r):
            if m not in t:
                return "—"
            return f"{t[m]['min_s'] * 1e3:.1f} ({r['speedup_vs'][m]:.2f})"

        md.append(
            f"| {r['N']:,} | {r['d']} | {r['B']} | {t['r4t_fast']['min_s'] * 1e3:.1f} | "
            f"{cell('torch matmul+topk')} | {cell('numpy matmul+argpartition')} | "
            f"{cell('faiss IndexFlatIP')} | {cell('usearch exact')} |"
        )
    if memory:
        md += ["", "Peak extra RSS of one search (B = 1024, N = 1M, d = 128), fresh process:", ""]
        md += [f"- {m['method']}: {m['peak_rss_extra_mib']:.0f} MiB" for m in memory]
    md += ["", f"Command: `{env['command']}`", ""]
    write_results("knn_cpu" + ("_quick" if args.quick else ""), payload, "\n".join(md))


def run_cuda(args) -> None:
    import cupy

    k = args.k
    rows = []
    sync = torch.cuda.synchronize
    for d in [128, 384]:
        for N in [100_000, 1_000_000]:
            c = torch.from_numpy(clustered(N, d, 0)).cuda()
            ch = c.half()
            for B in [1, 64, 1024]:
                q = torch.from_numpy(clustered(B, d, 1)).cuda()
                res = {
                    "r4t_fast f32": timeit(
                        lambda: ops.knn(q, c, k, check_finite=False), sync=sync, repeat=10
                    ),
                    "r4t_fast f16": timeit(
                        lambda: ops.knn(q, ch, k, check_finite=False), sync=sync, repeat=10
                    ),
                    "torch matmul+topk f32": timeit(lambda: torch_topk(q, c, k), sync=sync, repeat=10),
                    "torch matmul+topk f16": timeit(
                        lambda: torch_topk(q.half(), ch, k), sync=sync, repeat=10
                    ),
                }
                qc, cc = cupy.from_dlpack(q), cupy.from_dlpack(c)

                def cupy_topk(qc=qc, cc=cc):
                    s = qc @ cc.T
                    return cupy.argpartition(-s, k, axis=1)[:, :k]

                res["cupy matmul+argpartition f32"] = timeit(cupy_topk, sync=sync, repeat=10)
                flops = 2.0 * B * N * d
                row = {
                    "N": N,
                    "d": d,
                    "B": B,
                    "k": k,
                    "times": res,
                    "tflops_r4t_f16": flops / res["r4t_fast f16"]["min_s"] / 1e12,
                }
                rows.append(row)
                print(N, d, B, {m: round(r["min_s"] * 1e3, 3) for m, r in res.items()}, flush=True)
    env = environment(("cupy-cuda13x",))
    md = [
        "# Exact kNN on the GPU",
        "",
        f"{env['date']} — {env.get('gpu')}",
        "",
        "| N | d | B | " + " | ".join(rows[0]["times"]) + " | r4t f16 TFLOP/s |",
        "|---|---|---|" + "---|" * (len(rows[0]["times"]) + 1),
    ]
    for r in rows:
        md.append(
            f"| {r['N']:,} | {r['d']} | {r['B']} | "
            + " | ".join(f"{v['min_s'] * 1e3:.3f}" for v in r["times"].values())
            + f" | {r['tflops_r4t_f16']:.1f} |"
        )
    write_results(
        "knn_cuda", {"benchmark": "knn_cuda", "environment": env, "results": rows}, "\n".join(md) + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="small grid (smoke run)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--memory-only", action="store_true", help="re-measure the memory table only")
    args = p.parse_args()
    if args.memory_only:
        run_memory_only(args)
    elif args.device == "cuda":
        run_cuda(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
