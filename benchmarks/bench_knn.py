"""Exact kNN: r4t_fast fused top-k against numpy, torch, faiss-cpu and usearch, in the same run.

Question: how fast is exact inner-product top-k (k = 10) over N catalog rows for a batch of B queries,
and how much extra memory does it take? Catalogs are clustered unit vectors (float32).

    python benchmarks/bench_knn.py                    # CPU grid -> results/knn_cpu.{json,md}
    python benchmarks/bench_knn.py --quick            # small grid, for a smoke run
    python benchmarks/bench_knn.py --device cuda      # GPU: r4t vs torch vs cupy -> results/knn_cuda.*

The CPU run also states how close the kernel comes to the compute floor at N = 100k, d = 128, B = 1024:
2 * N * d * B FLOP at the machine's peak FMA rate, which the benchmark measures itself
(r4t_fast.kernels._backend.peak_flops: 24 independent FMA chains per thread on the active SIMD clone),
and what limits it (top-k upkeep: k = 10 against k = 1; threading: 2 threads against 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _harness import environment, timeit, write_results  # noqa: E402
from r4t_fast import ops  # noqa: E402
from r4t_fast.kernels import _backend  # noqa: E402

FLOOR_CASE = (100_000, 128, 1024)  # N, d, B


def cpu_flags() -> list[str]:
    """The SIMD feature flags of this CPU that matter for the kernels (from /proc/cpuinfo)."""
    want = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl")
    want += ("avx512_fp16", "avx512_bf16", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in want if f in have]
    except OSError:
        pass
    return []


def floor_report(k: int, rows: list[dict]) -> dict:
    """Fraction of the compute floor reached at FLOOR_CASE, and the measurements that explain the gap."""
    N, d, B = FLOOR_CASE
    c = torch.from_numpy(clustered(N, d, 0))
    q = torch.from_numpy(clustered(B, d, 1))
    flop = 2.0 * N * d * B
    peak = _backend.peak_flops(0, 0.5)
    peak1 = _backend.peak_flops(1, 0.5)
    grid = [r for r in rows if (r["N"], r["d"], r["B"]) == FLOOR_CASE]
    t = grid[0]["times"]["r4t_fast"] if grid else timeit(lambda: ops.knn(q, c, k, check_finite=False))
    t_k1 = timeit(lambda: ops.knn(q, c, 1, check_finite=False))
    t_1 = timeit(lambda: ops.knn(q, c, k, check_finite=False, num_threads=1))
    t_1k1 = timeit(lambda: ops.knn(q, c, 1, check_finite=False, num_threads=1))
    plan = ops.knn_plan(B, N, d, k)
    rep = {
        "case": {"N": N, "d": d, "B": B, "k": k},
        "flop": flop,
        "peak_flops_all_threads": peak,
        "peak_flops_one_thread": peak1,
        "floor_s": flop / peak,
        "r4t_s": t["min_s"],
        "fraction_of_floor": flop / peak / t["min_s"],
        "ratio_to_floor": t["min_s"] / (flop / peak),
        "fraction_k1": flop / peak / t_k1["min_s"],
        "fraction_one_thread": flop / peak1 / t_1["min_s"],
        "fraction_one_thread_k1": flop / peak1 / t_1k1["min_s"],
        "thread_speedup": t_1["min_s"] / t["min_s"],
        "plan": plan,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cores": os.cpu_count(),
    }
    return rep


def floor_text(f: dict) -> list[str]:
    N, d, B = (f["case"][x] for x in ("N", "d", "B"))
    lim = []
    topk1 = f["fraction_one_thread_k1"] / f["fraction_one_thread"] - 1
    topk2 = f["fraction_k1"] / f["fraction_of_floor"] - 1
    lim.append(
        f"top-k upkeep (heap admission and inserts for k = {f['case']['k']}): {topk1:+.0%} time against "
        f"k = 1 on one thread ({topk2:+.0%} with {f['plan']['threads']} threads, where sharing adds noise)"
    )
    lim.append(
        f"threading: {f['plan']['threads']} threads run {f['thread_speedup']:.2f}× the 1-thread time "
        f"(ideal {f['plan']['threads']}×; the cores are shared with other jobs when the load average exceeds "
        "the core count)"
    )
    lim.append(
        f"one thread reaches {f['fraction_one_thread']:.0%} of one core's peak at k = {f['case']['k']} and "
        f"{f['fraction_one_thread_k1']:.0%} at k = 1: "
        "the rest is the per-micro-tile work outside the FMA loop (accumulator set-up, the vector admission "
        "test against 48 thresholds every 8 rows, loop overhead) and L1 refills of the catalog rows"
    )
    load, cores = f.get("load_average_1min"), f.get("cores")
    if load is not None and cores and load > cores:
        lim.insert(
            0,
            f"the machine was shared during the run (1-minute load average {load:.1f} on {cores} cores): "
            "wall-clock times include waiting for a core, so this fraction is a lower bound",
        )
    return [
        f"Compute floor at N = {N:,}, d = {d}, B = {B}: {f['flop'] / 1e9:.1f} GFLOP at the measured peak of "
        f"{f['peak_flops_all_threads'] / 1e9:.0f} GFLOP/s ({f['peak_flops_one_thread'] / 1e9:.0f} per core; "
        f"24 independent {f['plan']['isa']} FMA chains per thread) = {f['floor_s'] * 1e3:.1f} ms. r4t_fast: "
        f"{f['r4t_s'] * 1e3:.1f} ms = **{f['fraction_of_floor']:.0%} of the floor** "
        f"({f['ratio_to_floor']:.2f}× the floor time; issue 12's target: within 1.25×). What limits it:",
        "",
        *[f"- {x}" for x in lim],
    ]


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


# Peak extra memory each method needs for the (B = 1024, N = 1M) search, GiB, with a margin: numpy's
# (B, N) float32 scores plus argpartition's copies come to ~15 GiB on a 24 GiB machine.
MEMORY_NEEDED_GIB = {"r4t": 2, "torch": 6, "numpy": 18}


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def measure_memory(method: str, k: int) -> dict:
    row = {"method": method, "B": 1024, "N": 1_000_000, "d": 128, "peak_rss_extra_mib": None}
    free = mem_available_gib()
    if free < MEMORY_NEEDED_GIB[method] + 3.5:  # + the catalog, queries and interpreter
        row["skipped"] = f"{free:.1f} GiB available, {MEMORY_NEEDED_GIB[method]} GiB needed"
    else:
        row["peak_rss_extra_mib"] = peak_rss_extra(method, 1024, 1_000_000, 128, k)
    return row


def memory_line(m: dict) -> str:
    if m["peak_rss_extra_mib"] is None:
        return f"- {m['method']}: not measured ({m['skipped']})"
    return f"- {m['method']}: {m['peak_rss_extra_mib']:.0f} MiB"


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
        payload["memory"].append(measure_memory(method, args.k))
        print(payload["memory"][-1], flush=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path = RESULTS / "knn_cpu.md"
    md = md_path.read_text().split("\nPeak extra RSS")[0].rstrip("\n")
    md += "\n\nPeak extra RSS of one search (B = 1024, N = 1M, d = 128), fresh process:\n\n"
    md += "\n".join(memory_line(m) for m in payload["memory"]) + "\n"
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
                # The baselines materialise the (B, N) float32 score matrix (numpy: ~3 copies with
                # argpartition): skip one rather than let the OOM killer end the run on a shared machine.
                scores_gib = B * N * 4 / 2**30
                skipped = {}
                for name, copies in (("torch matmul+topk", 1.5), ("numpy matmul+argpartition", 3.5)):
                    if mem_available_gib() < copies * scores_gib + 2:
                        skipped[name] = (
                            f"needs ~{copies * scores_gib:.0f} GiB, {mem_available_gib():.1f} available"
                        )
                if "torch matmul+topk" not in skipped:
                    res["torch matmul+topk"] = timeit(lambda: torch_topk(qt, ct, k), repeat=rep)
                if "numpy matmul+argpartition" not in skipped:
                    res["numpy matmul+argpartition"] = timeit(lambda: numpy_topk(q, c, k), repeat=rep)
                res["faiss IndexFlatIP"] = timeit(lambda: index.search(q, k), repeat=rep)
                if B * N <= 64 * 100_000:  # usearch exact is ~10x slower than numpy; skip the largest cases
                    res["usearch exact"] = timeit(
                        lambda: usearch_search(c, q, k, metric="ip", exact=True), repeat=rep
                    )
                # Check the answers agree (scores, tie-tolerant).
                s, _ = ops.knn(qt, ct, k, check_finite=False)
                if "torch matmul+topk" in res:
                    ts, _ = torch_topk(qt, ct, k)
                    assert torch.allclose(s, ts, atol=1e-4), "r4t_fast and torch disagree"
                row = {"N": N, "d": d, "B": B, "k": k, "times": res}
                if skipped:
                    row["skipped"] = skipped
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
            memory.append(measure_memory(method, k))
            print(memory[-1], flush=True)
    floor = floor_report(k, rows)
    print(
        json.dumps({x: floor[x] for x in ("fraction_of_floor", "fraction_k1", "fraction_one_thread")}),
        flush=True,
    )
    env = environment(("faiss-cpu", "usearch"))
    env["machine"]["cpu_flags"] = cpu_flags()
    payload = {"benchmark": "knn_cpu", "environment": env, "results": rows, "memory": memory, "floor": floor}
    write_results("knn_cpu" + ("_quick" if args.quick else ""), payload, render_cpu(payload))


def render_cpu(payload: dict) -> str:
    """The markdown report of a CPU run (also rebuilt from the .json by --render)."""
    env, rows, memory, floor = payload["environment"], payload["results"], payload["memory"], payload["floor"]
    k = floor["case"]["k"]
    md = [
        f"# Exact kNN on the CPU (k = {k})",
        "",
        f"{env['date']} — {env['machine']['cpu']}, "
        f"{env['machine']['cores']} cores (SIMD flags: {', '.join(env['machine']['cpu_flags'])}); torch "
        f"{env['versions'].get('torch')}, faiss-cpu {env['versions'].get('faiss-cpu')}, usearch "
        f"{env['versions'].get('usearch')}; r4t_fast SIMD clone: {env['build_info']['simd']}",
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
    slower = [
        f"{r['N']:,}/{r['d']}/{r['B']} vs {m}"
        for r in rows
        for m, x in r["speedup_vs"].items()
        if m in ("torch matmul+topk", "faiss IndexFlatIP") and x < 1
    ]
    md += [
        "",
        "r4t_fast ≥ torch and ≥ faiss-cpu at every grid point."
        if not slower
        else "Grid points where r4t_fast is slower: " + "; ".join(slower) + ".",
    ]
    md += ["", *floor_text(floor)]
    if memory:
        md += ["", "Peak extra RSS of one search (B = 1024, N = 1M, d = 128), fresh process:", ""]
        md += [memory_line(m) for m in memory]
    md += ["", f"Command: `{env['command']}`", ""]
    return "\n".join(md)


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
    p.add_argument("--render", action="store_true", help="rebuild results/knn_cpu.md from the .json")
    args = p.parse_args()
    if args.render:
        from _harness import RESULTS

        name = "knn_cpu" + ("_quick" if args.quick else "")
        (RESULTS / f"{name}.md").write_text(render_cpu(json.loads((RESULTS / f"{name}.json").read_text())))
    elif args.memory_only:
        run_memory_only(args)
    elif args.device == "cuda":
        run_cuda(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
