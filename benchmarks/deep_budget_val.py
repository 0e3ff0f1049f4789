"""Where R4T-Diffusion's recall at the paper's budget (R@5000, fixed quota per row) goes, on a validation
split: the retriever's candidate layout (row 0 and the appended query rows hold the query's ranking
interleaved, each rank once) against a share of the 5,000 given to the query's own ranking, the rest as
equal quotas of the diffusion rows; the diffusion rows alone; dense kNN's top 5,000 beside them. Same
queries, the retriever's saved defaults.

    python benchmarks/deep_budget_val.py --model runs/polyvore-cpu-full/diffusion   # ~1 minute
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, write_results  # noqa: E402

BUDGET = 5000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="retriever directory")
    ap.add_argument("--dataset", default="polyvore")
    ap.add_argument("--split", default="val", choices=["train", "val"])
    ap.add_argument("--out", default="rows/deep_budget_val")
    args = ap.parse_args()

    from r4t_fast import ops
    from r4t_fast.data.datasets import query_text
    from r4t_fast.data.prepare import load_eval_data
    from r4t_fast.diffusion.retriever import Retriever
    from r4t_fast.objectives import union_candidates

    env = environment()
    r = Retriever.from_pretrained(args.model)
    data = load_eval_data(args.dataset, encoder="minilm", progress=False)
    cat = data.catalog
    sets = [
        s for s in (data.dataset.get_set(i) for i in getattr(data.split, args.split)) if s.query is not None
    ]
    q = torch.from_numpy(np.asarray(r.encoder.encode([query_text(s) for s in sets]), dtype=np.float32))
    refs = [set(np.asarray(cat.id_to_index(s.item_ids)).tolist()) for s in sets]
    k = r.model.cfg.set_size
    out = r.retrieve_embeddings(q, k, n_candidates=-(-BUDGET // (k - 1)))  # enough for the rows alone
    rank = ops.knn(q, cat.embeddings.float(), BUDGET)[1].numpy()

    def rec(ids, ref: set) -> float:
        return len(set(np.asarray(ids).tolist()) & ref) / len(ref)

    res: dict[str, list[float]] = {"retriever's layout": [], "diffusion rows alone": []}
    shares = (0.5, 0.7, 0.9)
    for i, s in enumerate(out):
        c = np.asarray(s.candidates)  # rows 1..k-1 sampled; 0 and k.. the ranking (k - 1 + m rows)
        res["retriever's layout"].append(rec(union_candidates(c, BUDGET // c.shape[0]), refs[i]))
        res["diffusion rows alone"].append(rec(union_candidates(c[1:k], BUDGET // (k - 1)), refs[i]))
        for share in shares:
            nq = int(BUDGET * share)
            u = set(rank[i, :nq].tolist()) | set(
                union_candidates(c[1:k], max(1, (BUDGET - nq) // (k - 1))).tolist()
            )
            res.setdefault(f"query's ranking {share:.0%} + rows' quotas", []).append(
                len(u & refs[i]) / len(refs[i])
            )
        res.setdefault("dense kNN (top 5,000)", []).append(rec(rank[i], refs[i]))
    means = {key: float(np.mean(v)) for key, v in res.items()}
    payload = {
        "benchmark": "deep_budget_val",
        "environment": env,
        "model": args.model,
        "defaults": r.defaults,
        "split": args.split,
        "queries": len(sets),
        "recall_at_5000": means,
        "per_query": res,
    }
    md = [
        "# R@5000 of R4T-Diffusion's candidates: where the paper's budget goes",
        "",
        f"{env['date']} · {env['machine'].get('cpu')} · commit {env.get('git_commit')} · command "
        f"`deep_budget_val.py --model {args.model} --split {args.split}` · {len(sets)} {args.split} "
        "queries · "
        f"defaults {', '.join(f'{a} {b}' for a, b in r.defaults.items() if a != 'seed')}.",
        "",
        "| candidates | R@5000 (%) |",
        "|---|---:|",
        *[f"| {key} | {100 * v:.2f} |" for key, v in means.items()],
        "",
        "Fixed quota per row (the paper's protocol, `union_candidates`): floor(5,000 / rows) each.",
    ]
    write_results(args.out, payload, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
