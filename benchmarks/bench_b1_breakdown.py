"""Where the time of one batch-1 fused retrieval goes (issue 12's batch-1 target), against dense kNN.

Times, hot (each call repeated back to back, single thread): dense kNN of the query; ``ops.knn`` of the
set's rows alone (B = L); the fused sampler without grounding (``catalog=None``) and with it; the full
``Retriever.retrieve_embeddings`` with and without the query-anchored row. The differences give the
cost of each part; the compute floor of the grounding kNN (2 · L · N · d FLOP at the peak FMA rate
measured by ``bench_knn``'s probe, ``_backend.peak_flops``) says how far a faster kernel could take it.

    python benchmarks/bench_b1_breakdown.py --model runs/polyvore-small/distilled
    python benchmarks/bench_b1_breakdown.py --untrained   # no model: a random cpu-small, consistency 2 steps

Issue 20 adds the rows with the anchor (the query's own nearest item): before, a second ``ops.knn`` over
the catalog after the fused call; now the anchor rides in the fused call's grounding pass (``B = L + 1``).
Without a trained model (``--untrained``) the rows are a random cpu-small model's over Polyvore's MiniLM
catalog: the time does not depend on the weights (the grounding's heap work a little on the rows).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from r4t_fast import _threads  # noqa: E402

_threads.configure(int(os.environ.get("R4T_B1_THREADS", "1")))  # before torch starts its pool
import torch  # noqa: E402

from _harness import environment, median_ms, write_results  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="retriever directory")
    ap.add_argument(
        "--untrained",
        action="store_true",
        help="no --model: a randomly initialised cpu-small over Polyvore's catalog (consistency, 2 steps, "
        "anchor 0.3: the pipeline's distilled default)",
    )
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--query", default="summer beach outfit", help="query text (encoded by the retriever)")
    ap.add_argument("--out", default="sampler_b1_breakdown", help="results name under benchmarks/results/")
    args = ap.parse_args()
    if bool(args.model) == bool(args.untrained):
        ap.error("pass exactly one of --model DIR and --untrained")
    from r4t_fast import ops
    from r4t_fast.diffusion.retriever import Retriever
    from r4t_fast.diffusion.samplers import fused_sample_sets, sampler_sigmas

    if args.model:
        r = Retriever.from_pretrained(args.model)
    else:
        from bench_sampler import eval_data, random_retriever

        data = eval_data("polyvore")
        r = random_retriever(catalog=data.catalog, encoder=data.encoder)
        r.defaults.update(sampler="consistency", steps=2, guidance=0.0, anchor=0.3)
        args.model = "untrained cpu-small (random weights), Polyvore MiniLM catalog"
    cat, cfg, d = r._cat_dev, r.model.cfg, r.defaults
    if r.encoder is None:
        raise SystemExit("bench_b1_breakdown: the retriever has no text encoder")
    q = torch.from_numpy(np.asarray(r.encoder.encode([args.query]), dtype=np.float32)).contiguous()
    sig = sampler_sigmas(d["sampler"], d["steps"], cfg)
    kw = dict(sampler=d["sampler"], guidance=d["guidance"], seed=0, check_finite=False)
    rows = fused_sample_sets(r.edm, q, sig, **kw).rows.contiguous()  # the model's own rows for the query
    n = args.repeat
    parts = {
        "dense kNN (B = 1, k = 10)": median_ms(lambda: ops.knn(q, cat, 10, check_finite=False), n),
        f"ops.knn of the set's rows (B = {cfg.set_size})": median_ms(
            lambda: ops.knn(rows[0].contiguous(), cat, cfg.set_size, check_finite=False), n
        ),
        f"ops.knn of the set's rows + the anchor (B = {cfg.set_size + 1}, one pass)": median_ms(
            lambda: ops.knn(torch.cat([rows[0], q]).contiguous(), cat, cfg.set_size, check_finite=False), n
        ),
        "ops.ground_sets of one set": median_ms(
            lambda: ops.ground_sets(rows.contiguous(), cat, check_finite=False), n
        ),
        "fused sampling, no grounding": median_ms(lambda: fused_sample_sets(r.edm, q, sig, **kw), n),
        "fused sampling + grounding (one call)": median_ms(
            lambda: fused_sample_sets(r.edm, q, sig, catalog=cat, **kw), n
        ),
        "fused sampling + grounding, then the anchor's own ops.knn pass (before issue 20)": median_ms(
            lambda: (
                fused_sample_sets(r.edm, q, sig, catalog=cat, **kw),
                ops.knn(q, cat, 1, check_finite=False),
            ),
            n,
        ),
        "fused sampling + grounding + anchor (one call)": median_ms(
            lambda: fused_sample_sets(r.edm, q, sig, catalog=cat, anchor=q, anchor_k=1, **kw), n
        ),
        "retrieve_embeddings, anchor 0": median_ms(
            lambda: r.retrieve_embeddings(q, anchor=0.0, fused=True), n
        ),
        f"retrieve_embeddings, anchor {d['anchor']:g} (the default)": median_ms(
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
        f"{env['date']}; {env['machine']['cpu']} ({env['build_info']['simd']}), "
        f"{_threads.decided()['threads']} thread(s), load average {env['load_average_1_5_15']}, "
        f"hot caches (each call repeated {n}×, median). "
        f"Model: {args.model} ({d['sampler']} {d['steps']} steps, w = {d['guidance']:g}); catalog "
        f"{len(r.catalog):,} × {cfg.dim}; query {args.query!r} and the model's rows for it. Command: "
        f"`{env['command']}`.",
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
        {
            **env,
            "parts_ms": parts,
            "peak_gflops_1thread": peak,
            "model": args.model,
            "threads": _threads.decided(),
        },
        "\n".join(md) + "\n",
    )
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
