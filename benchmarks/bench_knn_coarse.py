"""The knn kernel's int8 coarse path (``ops.coarse_catalog``; csrc/cpu/knn_coarse.cpp) against the exact
search, on the rows R4T-Diffusion really grounds: how often the result differs, and the time.

For every titled query of ``--split`` the retriever (``--model``, its saved defaults) samples a set; its
rows plus the query (the anchor) are the B = k + 1 grounding queries of a batch-1 call. Reported:

* exactness: the share of those rows whose top-k ids are identical with / without the int8 copy, the
  mean recall of the exact top-k, and the share of whole retrieved sets that are identical;
* time: ``ops.knn`` of one call's rows (B = 11, k = 10) and ``retrieve_embeddings`` at batch 1, exact
  and coarse alternating in ``--rounds`` rounds of ``--calls`` timed calls (after a warm-up), median
  per round, then the median of the rounds (one process, machine otherwise idle).

    python benchmarks/bench_knn_coarse.py --model runs/latency-w3-e1     # about 1 minute
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, median_ms, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="retriever directory")
    ap.add_argument("--dataset", default="polyvore", help="dataset of the query texts")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--out", default="knn_coarse_cpu")
    args = ap.parse_args()

    from r4t_fast import ops
    from r4t_fast.data.datasets import query_text
    from r4t_fast.data.prepare import load_eval_data
    from r4t_fast.diffusion.retriever import Retriever

    if not ops.coarse_supported():
        raise SystemExit("bench_knn_coarse: this CPU / build has no AVX-512 VNNI (the coarse path)")
    env = environment()
    r = Retriever.from_pretrained(args.model)
    data = load_eval_data(args.dataset, encoder="minilm", progress=False)
    split = getattr(data.split, args.split)
    sets = [s for s in (data.dataset.get_set(i) for i in split) if s.query is not None]
    q = torch.from_numpy(np.asarray(r.encoder.encode([query_text(s) for s in sets]), dtype=np.float32))
    cat = r.catalog.embeddings
    cc = ops.coarse_catalog(cat)
    k = r.model.cfg.set_size

    # exactness on the real grounding rows
    r.coarse = None
    coarse_sets = r.retrieve_embeddings(q, k)
    r.coarse = False
    exact_sets = r.retrieve_embeddings(q, k)
    pairs = zip(coarse_sets, exact_sets, strict=True)
    same_sets = sum(list(a.item_indices) == list(b.item_indices) for a, b in pairs)
    same_rows, recall, n_rows, calls = 0, 0.0, 0, []
    for i, s in enumerate(exact_sets):
        rows = torch.cat([torch.from_numpy(s.row_embeddings), q[i : i + 1]]).contiguous()
        _, ie = ops.knn(rows, cat, k, check_finite=False)
        _, ic = ops.knn(rows, cat, k, check_finite=False, coarse=cc)
        for a, b in zip(ie.tolist(), ic.tolist(), strict=True):
            same_rows += a == b
            recall += len(set(a) & set(b)) / k
            n_rows += 1
        calls.append(rows)
    print(f"{n_rows} rows: identical top-{k} {same_rows}/{n_rows}, sets identical {same_sets}/{len(sets)}")

    # time: one call's rows, and the whole batch-1 retrieval, alternating
    rows0 = calls[0]
    per = {"knn_exact": [], "knn_coarse": [], "r4t_exact": [], "r4t_coarse": []}
    q1 = q[:1].contiguous()
    for _ in range(args.rounds):
        per["knn_exact"].append(
            median_ms(lambda: ops.knn(rows0, cat, k, check_finite=False), args.calls, warmup=5)
        )
        per["knn_coarse"].append(
            median_ms(lambda: ops.knn(rows0, cat, k, check_finite=False, coarse=cc), args.calls, warmup=5)
        )
        r.coarse = False
        per["r4t_exact"].append(median_ms(lambda: r.retrieve_embeddings(q1, k), args.calls, warmup=5))
        r.coarse = None
        per["r4t_coarse"].append(median_ms(lambda: r.retrieve_embeddings(q1, k), args.calls, warmup=5))
    med = {key: float(np.median(v)) for key, v in per.items()}
    print({key: round(v, 3) for key, v in med.items()})

    payload = {
        "benchmark": "knn_coarse",
        "environment": env,
        "model": Path(args.model).name,
        "dataset": args.dataset,
        "split": args.split,
        "queries": len(sets),
        "rows": n_rows,
        "k": k,
        "identical_rows": same_rows,
        "mean_recall_of_exact": recall / n_rows,
        "identical_sets": same_sets,
        "rounds": per,
        "median_ms": med,
        "plan": ops.knn_plan(rows0.shape[0], cat.shape[0], cat.shape[1], k, coarse=True),
        "coarse_bytes": cc.codes.numel(),
        "catalog_bytes": cat.numel() * cat.element_size(),
    }
    md = [
        "# kNN int8 coarse path vs exact, on R4T-Diffusion's grounding rows",
        "",
        f"{env['date']} · {env['machine'].get('cpu')} · load average at start "
        f"{env.get('load_average_1_5_15')} · command `bench_knn_coarse.py --model {Path(args.model).name} "
        f"--split {args.split}` · other jobs stopped.",
        "",
        f"Catalog {cat.shape[0]:,} x {cat.shape[1]} ({payload['catalog_bytes'] / 2**20:.1f} MiB fp32; "
        f"int8 copy {payload['coarse_bytes'] / 2**20:.1f} MiB). Rows: each of the {len(sets)} {args.split} "
        f"queries' sampled set plus the query itself ({n_rows} rows, top-{k} each).",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| rows whose top-{k} ids are identical (coarse vs exact) | {same_rows} / {n_rows} |",
        f"| mean recall of the exact top-{k} | {recall / n_rows:.4f} |",
        f"| retrieved sets identical (retrieve_embeddings, coarse vs exact) | {same_sets} / {len(sets)} |",
        f"| knn of one call's {rows0.shape[0]} rows, exact: ms | {med['knn_exact']:.3f} |",
        f"| knn of one call's {rows0.shape[0]} rows, int8 coarse: ms | {med['knn_coarse']:.3f} |",
        f"| retrieve_embeddings batch 1, exact grounding: ms | {med['r4t_exact']:.3f} |",
        f"| retrieve_embeddings batch 1, int8 coarse grounding: ms | {med['r4t_coarse']:.3f} |",
        "",
        f"{args.rounds} alternating rounds of {args.calls} timed calls each (after 5 untimed); medians per "
        "round in the JSON.",
    ]
    jp, mp = write_results(args.out, payload, "\n".join(md) + "\n")
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
