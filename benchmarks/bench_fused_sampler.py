"""Fused set sampling (``ops.sample_sets``, one ``_C`` call) against the eager PyTorch path
(``diffusion.samplers.generate_sets``) at equal NFE, in the same run.

Question: how many ms per query does sampling one set cost at batch 1, 8 and 64, eager vs fused, for
16 Heun steps (31 NFE) and 4 / 8 steps of Euler and DPM-Solver++(2M)? Model: the cpu-small preset with
random weights (ada/out perturbed: the default init zeros them; speed does not depend on the values).
Both paths draw the same initial noise and schedule, so they return the same sets (max |diff| is
recorded). Eager and fused runs alternate (min and median of ``--repeat`` each), so a machine shared
with other jobs slows both alike; the load average is recorded before and after.

    python benchmarks/bench_fused_sampler.py            # full grid -> results/fused_sampler_cpu.{json,md}
    python benchmarks/bench_fused_sampler.py --quick    # B = 1, 8; heun 16 and euler 4 (about a minute)
    python benchmarks/bench_fused_sampler.py --threads 1   # both paths on one thread
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, write_results  # noqa: E402
from r4t_fast.diffusion.model import EDM, SetDenoiser, get_preset  # noqa: E402
from r4t_fast.diffusion.samplers import SAMPLERS, eager_sample_sets, nfe, sampler_sigmas  # noqa: E402
from r4t_fast.kernels import ops  # noqa: E402
from r4t_fast.kernels.sampler_pack import pack_denoiser  # noqa: E402

GRID = [("heun", 16), ("euler", 4), ("euler", 8), ("dpmpp_2m", 4), ("dpmpp_2m", 8)]
QUICK = [("heun", 16), ("euler", 4)]


def random_model(preset: str, seed: int = 0) -> SetDenoiser:
    torch.manual_seed(seed)
    m = SetDenoiser(get_preset(preset)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("ada.1.weight", "out.weight"):
                p.normal_(0.0, 0.5 / math.sqrt(p.shape[1]))
            elif name in ("ada.1.bias", "out.bias", "null_cond"):
                p.normal_(0.0, 0.1)
    return m


def fused_generate(
    m: SetDenoiser, cond: torch.Tensor, steps: int, sampler: str, guidance: float, seed: int, threads=None
):
    """generate_sets' contract through the fused kernel: same schedule, same initial noise."""
    cfg = m.cfg
    sig = sampler_sigmas(sampler, steps, cfg)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((cond.shape[0], cfg.set_size, cfg.dim), generator=g) * sig[0]
    pk = pack_denoiser(m)
    return ops.sample_sets(pk, cond, x, sig, sampler=sampler, guidance=guidance, num_threads=threads).rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="B = 1, 8 and two samplers")
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per path and grid point")
    ap.add_argument("--threads", type=int, default=None, help="torch and OpenMP threads (default: theirs)")
    ap.add_argument("--name", default="fused_sampler_cpu", help="results/<name>.{json,md}")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = [g for g in (QUICK if args.quick else GRID) if g[0] in SAMPLERS]
    batches = args.batches or ([1, 8] if args.quick else [1, 8, 64])
    repeat = args.repeat or (3 if args.quick else 5)
    m = random_model(args.preset)
    edm = EDM(m)
    pack_denoiser(m)  # once per model (cached); timed calls only check the cache key
    env = environment()
    load0 = os.getloadavg()
    rows = []
    for B in batches:
        cond = torch.nn.functional.normalize(
            torch.randn(B, m.cfg.cond_dim, generator=torch.Generator().manual_seed(B))
        )
        for sampler, steps in grid:
            sig = sampler_sigmas(sampler, steps, edm.cfg)
            eager_out = eager_sample_sets(edm, cond, sig, sampler=sampler, guidance=args.guidance, seed=0)
            fused_out = fused_generate(m, cond, steps, sampler, args.guidance, 0, args.threads)
            diff = float((eager_out - fused_out).abs().max())
            scale = float(eager_out.abs().max())
            reps = max(1, repeat if B < 64 or steps <= 8 else repeat - 2)
            te, tf = [], []
            for _ in range(reps):  # alternate, so load changes hit both paths
                t = time.perf_counter()
                eager_sample_sets(edm, cond, sig, sampler=sampler, guidance=args.guidance, seed=0)
                te.append(time.perf_counter() - t)
                t = time.perf_counter()
                fused_generate(m, cond, steps, sampler, args.guidance, 0, args.threads)
                tf.append(time.perf_counter() - t)
            r = {
                "batch": B,
                "sampler": sampler,
                "steps": steps,
                "nfe": nfe(sampler, steps),
                "guidance": args.guidance,
                "eager_ms_per_query": {"min": min(te) * 1e3 / B, "median": statistics.median(te) * 1e3 / B},
                "fused_ms_per_query": {"min": min(tf) * 1e3 / B, "median": statistics.median(tf) * 1e3 / B},
                "speedup_min": min(te) / min(tf),
                "speedup_median": statistics.median(te) / statistics.median(tf),
                "max_abs_diff": diff,
                "row_scale": scale,
                "repeat": reps,
            }
            rows.append(r)
            e_ms, f_ms = r["eager_ms_per_query"]["min"], r["fused_ms_per_query"]["min"]
            print(
                f"B={B:3d} {sampler:9s} steps={steps:2d} NFE={r['nfe']:2d}  eager {e_ms:8.2f}"
                f"  fused {f_ms:7.2f} ms/query  x{r['speedup_min']:.1f}"
                f" (median x{r['speedup_median']:.1f})  max|diff| {diff:.1e} (scale {scale:.2f})",
                flush=True,
            )
    env["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    env["load_average_before"] = [round(x, 2) for x in load0]
    env["threads"] = {
        "torch": torch.get_num_threads(),
        "fused": args.threads or env["build_info"]["openmp_threads"],
    }
    payload = {
        "question": __doc__.split("\n\n")[1],
        "preset": args.preset,
        "environment": env,
        "results": rows,
    }
    md = [
        f"# Fused vs eager set sampling ({args.preset}, guidance {args.guidance})",
        "",
        f"{env['machine']['cpu']}, {env['machine']['cores']} cores, SIMD {env['build_info']['simd']}, torch "
        f"{env['versions'].get('torch')} ({torch.get_num_threads()} threads); load average before "
        f"{env['load_average_before']}, after {env['load_average_after']}. Min of {repeat} alternating runs.",
        "",
        "| batch | sampler | steps | NFE | eager ms/query | fused ms/query | speed-up (min / median) "
        "| max abs diff |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['batch']} | {r['sampler']} | {r['steps']} | {r['nfe']} | "
            f"{r['eager_ms_per_query']['min']:.2f} | {r['fused_ms_per_query']['min']:.2f} | "
            f"{r['speedup_min']:.1f}x / {r['speedup_median']:.1f}x | "
            f"{r['max_abs_diff']:.1e} |"
        )
    jp, mp = write_results(args.name, payload, "\n".join(md) + "\n")
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
