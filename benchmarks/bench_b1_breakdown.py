"""Where the time of one batch-1 fused retrieval goes (issue 12's batch-1 target), against dense kNN.

Times, hot (each call repeated back to back, single thread): dense kNN of the query; ``ops.knn`` of the
set's rows alone (B = L); the fused sampler without grounding (``catalog=None``) and with it; the full
``Retriever.retrieve_embeddings`` with and without the query-anchored row. The differences give the
cost of each part; the compute floor of the grounding kNN (2 · L · N · d FLOP at the peak FMA rate
measured by ``bench_knn``'s probe, ``_backend.peak_flops``) says how far a faster kernel could take it.

    python benchmarks/bench_b1_breakdown.py --model runs/polyvore-small/distilled
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, write_results  # noqa: E402


def _ms(fn, n: int) -> float:
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="retriever directory")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--query", default="summer beach outfit", help="query text (encoded by the retriever)")
    ap.add_argument("--out", default="sampler_b1_breakdown", help="results name under benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from r4t_fast import ops
    from r4t_fast.diffusion.retriever import Retriever
    from r4t_fast.diffusion.samplers import fused_sample_sets, sampler_sigmas

    r = Retriever.from_pretrained(args.model)
    cat, cfg, d = r._cat_dev, r.model.cfg, r.defaults
    if r.encoder is None:
        raise SystemExit("bench_b1_breakdown: the retriever has no text encoder")
    q = torch.from_numpy(np.asarray(r.encoder.encode([args.query]), dtype=np.float32)).contiguous()
    sig = sampler_sigmas(d["sampler"], d["steps"], cfg)
    kw = dict(sampler=d["sampler"], guidance=d["guidance"], seed=0, check_finite=False)
    rows = fused_sample_sets(r.edm, q, sig, **kw).rows.contiguous()  # the model's own rows for the query
    n = args.repeat
    parts = {
        "dense kNN (B = 1, k = 10)": _ms(lambda: ops.knn(q, cat, 10, check_finite=False), n),
        f"ops.knn of the set's rows (B = {cfg.set_size})": _ms(
            lambda: ops.knn(rows[0].contiguous(), cat, cfg.set_size, check_finite=False), n
        ),
        "ops.ground_sets of one set": _ms(
            lambda: ops.ground_sets(rows.contiguous(), cat, check_finite=False), n
        ),
        "fused sampling, no grounding": _ms(lambda: fused_sample_sets(r.edm, q, sig, **kw), n),
        "fused sampling + grounding (one call)": _ms(
            lambda: fused_sample_sets(r.edm, q, sig, catalog=cat, **kw), n
        ),
        "retrieve_embeddings, anchor 0": _ms(lambda: r.retrieve_embeddings(q, anchor=0.0, fused=True), n),
        f"retrieve_embeddings, anchor {d['anchor']:g} (the default)": _ms(
            lambda: r.retrieve_embeddings(q, fused=True), n
        ),
    }
    from r4t_fast.kernels import _backend

    peak = float(_backend.peak_flops(1, 0.5)) / 1e9  # bench_knn's probe: FLOP/s of one thread
    env = environment()
    dense = parts["dense kNN (B = 1, k = 10)"]
    flop = 2 * cfg.set_size * len(r.catalog) * cfg.dim
    md = [
        "# Batch-1 fused retrieval: where the time goes",
        "",
        f"{env['date']}; {env['machine']['cpu']}, 1 thread, hot caches (each call repeated {n}×, median). "
        f"Model: {args.model} ({d['sampler']} {d['steps']} steps, w = {d['guidance']:g}); catalog "
        f"{len(r.catalog):,} × {cfg.dim}; query {args.query!r} and the model's rows for it. Command: "
        f"`python benchmarks/bench_b1_breakdown.py --model {args.model}`.",
        "",
        "| part | ms | × dense kNN |",
        "|---|---|---|",
        *[f"| {k} | {v:.2f} | {v / dense:.1f}× |" for k, v in parts.items()],
        "",
        f"Grounding kNN of {cfg.set_size} rows: {flop / 1e6:.0f} MFLOP"
        + (
            f"; at the measured single-thread peak of {peak:.0f} GFLOP/s that is {flop / peak / 1e6:.2f} ms"
            if peak
            else ""
        )
        + ".",
    ]
    write_results(
        args.out,
        {**env, "parts_ms": parts, "peak_gflops_1thread": peak, "model": args.model},
        "\n".join(md) + "\n",
    )
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
