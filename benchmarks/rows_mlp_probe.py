"""What the rows' budget asks of their training (issue 18's R@5000 target): a probe without diffusion.

A small MLP writes L rows around the query embedding (``normalize(q + MLP(q))``, or with a random input
vector beside ``q``: stochastic rows, as a sampler's noise makes them) and is trained with the project's
row retrieval loss (:func:`r4t_fast.train.row_loss.row_retrieval_loss`: Hungarian-matched softmax
cross-entropy over the whole catalog) on the train split's titled sets, at each temperature of
``--taus`` (a comma list inside one variant is the mean of those losses). After every epoch the rows are
scored on the **validation** split: the rows alone at the fair budget (round-robin union of K distinct
items) and at the paper's budget (R@5000: 5,000 // L candidates per row), and with the query's own
ranking taking 10 / 30 / 50 % of the 5,000; dense kNN beside them. Same queries, one thread.

    python benchmarks/rows_mlp_probe.py --variant tau0.05:0.05 --variant tau0.2:0.2 \\
        --variant mixed:0.05,0.2 --variant noisy-tau0.05:0.05:noise   # ~5 minutes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, write_results  # noqa: E402

BUDGET = 5000
SHARES = (0.1, 0.3, 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="polyvore")
    ap.add_argument("--rows", type=int, default=9, help="rows L written per query")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument(
        "--variant", action="append", required=True,
        help="name:taus[:noise] (taus comma-separated; 'noise': a 16-d N(0, 1) input beside the query)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="rows/mlp_probe_val")
    args = ap.parse_args()

    from r4t_fast import ops
    from r4t_fast.data.datasets import query_text
    from r4t_fast.data.prepare import load_eval_data
    from r4t_fast.objectives import fair_budget, round_robin_union, union_candidates
    from r4t_fast.train.row_loss import row_retrieval_loss

    torch.set_num_threads(1)
    env = environment()
    data = load_eval_data(args.dataset, encoder="minilm", progress=False)
    cat = data.catalog.embeddings.float()
    d, L = cat.shape[1], args.rows
    big_k = fair_budget(len(cat), 10)

    def split(name: str) -> tuple[torch.Tensor, list[np.ndarray]]:
        sets = [data.dataset.get_set(i) for i in getattr(data.split, name)]
        sets = [s for s in sets if s.query is not None]
        q = torch.from_numpy(np.asarray(data.encoder.encode([query_text(s) for s in sets]), dtype=np.float32))
        return q, [np.asarray(data.catalog.id_to_index(s.item_ids)) for s in sets]

    q_train, r_train = split("train")
    q_val, r_val = split("val")
    pos = torch.full((len(r_train), max(len(r) for r in r_train)), -1, dtype=torch.int64)
    for i, r in enumerate(r_train):
        pos[i, : len(r)] = torch.from_numpy(r)
    rank = ops.knn(q_val, cat, BUDGET)[1].numpy()

    def rec(u: np.ndarray, ref: np.ndarray) -> float:
        return len(set(u.tolist()) & set(ref.tolist())) / len(ref)

    dense = {
        "dense_fair": float(np.mean([rec(rank[i, :big_k], r) for i, r in enumerate(r_val)])),
        "dense_5000": float(np.mean([rec(rank[i], r) for i, r in enumerate(r_val)])),
    }
    variants = []
    for spec in args.variant:
        name, taus_s, *rest = spec.split(":")
        taus = [float(t) for t in taus_s.split(",")]
        noisy = bool(rest and rest[0] == "noise")
        torch.manual_seed(args.seed)
        net = nn.Sequential(nn.Linear(d + 16 * noisy, 1024), nn.GELU(), nn.Linear(1024, L * d))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)

        def rows_of(q: torch.Tensor, gen: torch.Generator | None = None, net=net, noisy=noisy) -> Any:
            x = torch.cat([q, torch.randn(q.shape[0], 16, generator=gen)], 1) if noisy else q
            return F.normalize(net(x).view(-1, L, d) + q[:, None], dim=-1)

        epochs, t0 = [], time.perf_counter()
        for ep in range(args.epochs):
            perm = torch.randperm(len(q_train))
            for s in range(0, len(q_train), 64):
                idx = perm[s : s + 64]
                rows = rows_of(q_train[idx])
                loss = sum(row_retrieval_loss(rows, pos[idx], cat, tau=t).loss for t in taus) / len(taus)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                rows = rows_of(q_val, torch.Generator().manual_seed(1))
            cand = ops.knn(rows.reshape(-1, d).contiguous(), cat, -(-BUDGET // L))[1].view(len(q_val), L, -1)
            cand = cand.numpy()
            pairs = list(zip(cand, r_val, strict=True))
            m = {
                "epoch": ep + 1,
                "rows_fair": float(np.mean([rec(round_robin_union(c, big_k), r) for c, r in pairs])),
                "rows_5000": float(np.mean([rec(union_candidates(c, BUDGET // L), r) for c, r in pairs])),
            }
            for share in SHARES:
                nq = int(BUDGET * share)
                m[f"query{share:.0%}_5000"] = float(
                    np.mean(
                        [
                            rec(np.union1d(rank[i, :nq], union_candidates(cand[i], (BUDGET - nq) // L)), r)
                            for i, r in enumerate(r_val)
                        ]
                    )
                )
            epochs.append(m)
            print(name, {k: round(100 * v, 2) if k != "epoch" else v for k, v in m.items()}, flush=True)
        variants.append(
            {"name": name, "taus": taus, "noise": noisy, "epochs": epochs, "wall_s": time.perf_counter() - t0}
        )
    payload = {
        "benchmark": "rows_mlp_probe",
        "environment": env,
        "dataset": args.dataset,
        "rows": L,
        "fair_budget": big_k,
        "queries": len(q_val),
        "dense": dense,
        "variants": variants,
    }
    cols = ["rows_fair", "rows_5000", *(f"query{s:.0%}_5000" for s in SHARES)]
    md = [
        f"# Rows' budget vs their training temperature: an MLP probe ({args.dataset} val)",
        "",
        f"{env['date']} · {env['machine'].get('cpu')} · commit {env.get('git_commit')} · command "
        f"`{env['command']}` · {len(q_val)} val queries · L = {L} rows · fair K = {big_k}. Recall in %, "
        "mean over the last 3 epochs (range in brackets); dense kNN: "
        f"fair {100 * dense['dense_fair']:.2f}, R@5000 {100 * dense['dense_5000']:.2f}.",
        "",
        "| variant | taus | stochastic rows | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---:|" * len(cols),
    ]
    for v in variants:
        last = v["epochs"][-3:]
        cells = []
        for c in cols:
            x = [100 * e[c] for e in last]
            cells.append(f"{np.mean(x):.1f} ({min(x):.1f}-{max(x):.1f})")
        noisy = "yes" if v["noise"] else "no"
        md.append(f"| {v['name']} | {v['taus']} | {noisy} | " + " | ".join(cells) + " |")
    write_results(args.out, payload, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
