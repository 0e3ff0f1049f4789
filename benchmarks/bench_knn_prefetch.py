"""Software prefetch in the direct / small-B kNN paths, on and off, by catalog size (the thresholds in
csrc/cpu/knn.cpp).

For each catalog (N x 384, fp32, clustered unit vectors) and batch B (1: a dense query; 11: a set's 10
rows and its anchor at batch 1) one process per setting (``R4T_KNN_PREFETCH`` is read once per process)
times ``ops.knn(q, catalog, 10)``; the settings alternate over ``--rounds`` rounds so that the machine's
drift hits both alike; the record keeps each round's median and their median.

    python benchmarks/bench_knn_prefetch.py            # about 2 minutes, machine alone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, write_results  # noqa: E402

CHILD = r"""
import json, sys, time
import numpy as np, torch
from r4t_fast import ops
N, B, calls = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
c = torch.nn.functional.normalize(torch.randn(N, 384, generator=g), dim=1).contiguous()
q = torch.nn.functional.normalize(c[:B] + 0.3 * torch.randn(B, 384, generator=g), dim=1).contiguous()
for _ in range(5):
    ops.knn(q, c, 10, check_finite=False)
ts = []
for _ in range(calls):
    t0 = time.perf_counter()
    ops.knn(q, c, 10, check_finite=False)
    ts.append(time.perf_counter() - t0)
print(json.dumps({"ms": 1000 * float(np.median(ts)), "plan": ops.knn_plan(B, N, 384, 10)}))
"""


def run(n: int, b: int, flag: str, calls: int) -> dict:
    env = {**os.environ, "R4T_KNN_PREFETCH": flag}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), str(b), str(calls)], env=env, check=True, capture_output=True,
        text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="6000,18800", help="catalog rows (x 384 fp32)")
    ap.add_argument("--batches", default="1,11")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default="knn_prefetch_cpu")
    args = ap.parse_args()
    env = environment()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        for b in (int(x) for x in args.batches.split(",")):
            per = {"0": [], "1": []}
            for _ in range(args.rounds):
                for flag in ("0", "1"):
                    per[flag].append(run(n, b, flag, args.calls)["ms"])
            off, on = float(np.median(per["0"])), float(np.median(per["1"]))
            mb = round(n * 384 * 4 / 2**20, 1)
            rows.append(
                {"N": n, "B": b, "MB": mb, "off_ms": per["0"], "on_ms": per["1"], "off_median": off,
                 "on_median": on, "on_over_off": on / off}
            )  # fmt: skip
            print(f"N={n} B={b}: off {off:.3f} ms, on {on:.3f} ms ({on / off:.2f}x)", flush=True)
    md = [
        "# kNN software prefetch on / off (direct and small-B paths)",
        "",
        f"{env['date']} · {env['machine'].get('cpu')} · load average at start "
        f"{env.get('load_average_1_5_15')}"
        f" · command `bench_knn_prefetch.py` · {args.rounds} alternating rounds of one process per setting, "
        f"{args.calls} timed calls each (after 5 untimed), median per round, then the median of the rounds.",
        "",
        "| catalog | MiB | B | off: ms | on: ms | on ÷ off |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['N']:,} x 384 | {r['MB']} | {r['B']} | {r['off_median']:.3f} | {r['on_median']:.3f} | "
            f"{r['on_over_off']:.2f} |"
        )
    md.append("")
    md.append("`R4T_KNN_PREFETCH=0|1` forces the prefetch off / on (the kernel's rule: csrc/cpu/knn.cpp).")
    md.append("Other jobs on the machine were stopped (SIGSTOP) for the run.")
    jp, mp = write_results(args.out, {"benchmark": "knn_prefetch", "environment": env, "rows": rows},
                           "\n".join(md) + "\n")  # fmt: skip
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
