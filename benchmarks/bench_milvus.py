"""The Milvus backend beside exact search and usearch HNSW, same run: recall@10 against exact and ms/query at
100k and 1M items, and whether grounding through Milvus gives the exact backend's sets on Polyvore.

Items: the Polyvore catalog's MiniLM embeddings (18,800 x 384), grown to N by jittered copies of its own
items (each copy = an item + Gaussian noise, renormalised: Polyvore-like neighbourhoods, not i.i.d.
Gaussians, on which ANN recall means nothing). Queries: Polyvore validation titles (MiniLM). Milvus runs
as Milvus Lite (embedded, a local file) with its default index (``AUTOINDEX``) unless ``--index-type``.

    python benchmarks/bench_milvus.py                      # 100k and 1M -> results/serve/milvus_cpu.{json,md}
    python benchmarks/bench_milvus.py --sizes 100000       # 100k only
    python benchmarks/bench_milvus.py --model DIR          # also ground a trained retriever's rows

A size whose Milvus build exceeds ``--build-budget-s`` is reported as not run. usearch HNSW is built up to
``--usearch-max`` items (its 1M build took ~13 min on this machine kind: benchmarks/results/ann_cpu.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, write_results  # noqa: E402
from r4t_fast.data.backends import ExactBackend, MilvusBackend, UsearchBackend, ground_sets  # noqa: E402
from r4t_fast.kernels import ops  # noqa: E402

K = 10


def grow(base: torch.Tensor, n: int, noise: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``base`` followed by jittered copies of its rows up to n rows (unit norm), and each row's source."""
    src = np.arange(min(n, len(base)))
    if n <= len(base):
        return base[:n].contiguous(), src
    rng = np.random.default_rng(seed)
    out = torch.empty((n, base.shape[1]), dtype=torch.float32)
    out[: len(base)] = base
    b = base.numpy()
    picks = [src]
    for lo in range(len(base), n, 1 << 17):
        hi = min(n, lo + (1 << 17))
        pick = rng.integers(0, len(b), hi - lo)
        x = b[pick] + noise * rng.standard_normal((hi - lo, b.shape[1]), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo:hi] = torch.from_numpy(x)
        picks.append(pick)
    return out, np.concatenate(picks)


def recall(rows: torch.Tensor, ref: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(rows, ref, strict=True))
    return hits / ref.numel()


def time_search(be, emb: torch.Tensor, q: torch.Tensor, allowed=None) -> dict:
    be.search(emb, q[:4], K, allowed=allowed)  # warm-up (and a lazy build)
    singles = []
    for i in range(min(32, len(q))):
        t = time.perf_counter()
        be.search(emb, q[i : i + 1], K, allowed=allowed)
        singles.append(time.perf_counter() - t)
    t = time.perf_counter()
    s, r = be.search(emb, q, K, allowed=allowed)
    batch = time.perf_counter() - t
    return {
        "ms_per_query_b1": round(1000 * float(np.median(singles)), 3),
        "ms_per_query_batch": round(1000 * batch / len(q), 3),
        "rows": r,
    }


def run_size(n: int, base: torch.Tensor, cats: np.ndarray, q: torch.Tensor, args, db: str) -> list[dict]:
    emb, src = grow(base, n, args.noise, seed=n)
    out = []
    exact = time_search(ExactBackend(), emb, q)
    ref = exact.pop("rows")
    out.append({"n": n, "backend": "exact (ops.knn)", "build_s": 0.0, "recall@10": 1.0, **exact})
    # a filter: the items whose category (that of their source item) is one of the 5 most frequent
    values, counts = np.unique(cats, return_counts=True)
    mask = torch.from_numpy(np.isin(cats[src], values[np.argsort(-counts)[:5]]))
    ref_f = ExactBackend().search(emb, q, K, allowed=mask)[1]
    rows = [("usearch HNSW f32 (M=16, ef=64)", lambda: UsearchBackend({"expansion_add": 64}))]
    rows = rows if n <= args.usearch_max else []
    rows.append(
        (
            f"milvus lite {args.index_type} (fetch k)",
            lambda: MilvusBackend({"uri": db, "index_type": args.index_type, "rerank": 0}),
        ),
    )
    for name, make in rows:
        be = make()
        t = time.perf_counter()
        be.build(emb)
        build = time.perf_counter() - t
        res = time_search(be, emb, q)
        got = res.pop("rows")
        filt = be.search(emb, q, K, allowed=mask)[1]
        row = {
            "n": n,
            "backend": name,
            "build_s": round(build, 1),
            "recall@10": round(recall(got, ref), 4),
            **res,
            "filtered_recall@10": round(recall(filt, ref_f), 4),
            "filtered_all_allowed": bool(mask[filt[filt >= 0]].all()),
        }
        print(row, flush=True)
        out.append(row)
        if isinstance(be, MilvusBackend) and args.rerank:  # the same collection, more candidates per query
            be.params["rerank"] = args.rerank
            res = time_search(be, emb, q)
            got = res.pop("rows")
            filt = be.search(emb, q, K, allowed=mask)[1]
            row = {
                **row,
                "backend": f"milvus lite {args.index_type} rerank={args.rerank}",
                "recall@10": round(recall(got, ref), 4),
                **res,
            }
            row["filtered_recall@10"] = round(recall(filt, ref_f), 4)
            row["filtered_all_allowed"] = bool(mask[filt[filt >= 0]].all())
            print(row, flush=True)
            out.append(row)
        del be  # the collection stays in the run's temporary file (dropping 1M rows took minutes)
    return out


def sets_equal(base: torch.Tensor, q: torch.Tensor, model: str | None, db: str) -> dict:
    """Ground 10-row sets through Milvus and through the exact kernel on the real Polyvore catalog."""
    if model:
        from r4t_fast.diffusion.retriever import Retriever

        r = Retriever.from_pretrained(model)
        rows = torch.from_numpy(np.stack([s.row_embeddings for s in r.retrieve_embeddings(q, 10)]))
        source = f"rows sampled by {model}"
    else:
        g = torch.Generator().manual_seed(0)
        rows = torch.nn.functional.normalize(
            q[:, None, :] + 0.05 * torch.randn(len(q), 10, q.shape[1], generator=g),
            dim=2,
        )
        source = "query + N(0, 0.05^2) jitter, 10 rows per query"
    rows = rows.float().contiguous()
    be = MilvusBackend({"uri": db})
    be.build(base)
    ids, _ = ground_sets(be, base, rows)
    ref, _ = ops.ground_sets(rows, base)
    same = [a.tolist() == b.tolist() for a, b in zip(ids, ref, strict=True)]
    return {
        "catalog_items": len(base),
        "sets": len(same),
        "rows": source,
        "identical_sets": sum(same),
        "item_agreement": round(float((ids == ref).float().mean()), 4),
        "distinct_within_every_set": all(len(set(s.tolist())) == s.numel() for s in ids),
    }


def markdown(p: dict) -> str:
    env = p["environment"]
    lines = [
        "# Milvus backend beside exact and usearch (CPU)",
        "",
        f"{env['date']} · {env['machine']['cpu']} ({env['machine']['cores']} cores) · load average before "
        f"{env['load_average_1_5_15']}, after {p['load_average_after']} · pymilvus "
        f"{env['versions'].get('pymilvus')} · milvus-lite {env['versions'].get('milvus-lite')} · usearch "
        f"{env['versions'].get('usearch')} · torch {env['versions'].get('torch')}",
        "",
        f"Items: Polyvore's {p['polyvore_items']:,} MiniLM item embeddings (d = 384), grown by jittered "
        f"copies (noise {p['noise']} per dimension, renormalised). Queries: {p['queries']} Polyvore "
        "validation titles. k = 10; recall@10 against the exact top-10 of the same run; ms/query at B = 1 "
        f"(median of 32 single queries) and in one batch of {p['queries']}. Filter: items in Polyvore's 5 "
        "most frequent categories.",
        "",
        "| N | backend | build s | recall@10 | ms/query B=1 | ms/query batch | filtered recall@10 "
        "| filter honoured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in p["results"]:
        lines.append(
            f"| {r['n']:,} | {r['backend']} | {r['build_s']} | {r['recall@10']} | {r['ms_per_query_b1']} "
            f"| {r['ms_per_query_batch']} | {r.get('filtered_recall@10', 1.0)} "
            f"| {r.get('filtered_all_allowed', True)} |"
        )
    for n, why in p["not_run"].items():
        lines.append(f"| {int(n):,} | milvus lite | not run: {why} | | | | | |")
    s = p["grounding"]
    lines += [
        "",
        f"Grounding through Milvus vs the exact kernel on the real Polyvore catalog "
        f"({s['catalog_items']:,} items, {s['sets']} sets of {s['rows']}): {s['identical_sets']} / "
        f"{s['sets']} identical sets, item agreement {s['item_agreement']}, distinct items within every "
        f"set: {s['distinct_within_every_set']}.",
        "",
    ]
    if p.get("note"):
        lines += [f"Note: {p['note']}", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--index-type", default="AUTOINDEX")
    ap.add_argument(
        "--rerank", type=int, default=40, help="also search fetching this many candidates (0: no)"
    )
    ap.add_argument("--usearch-max", type=int, default=100_000)
    ap.add_argument(
        "--build-budget-s", type=float, default=900.0, help="skip a size whose build would exceed it"
    )
    ap.add_argument("--model", default=None, help="a Retriever dir whose sampled rows are grounded")
    ap.add_argument("--note", default="", help="a remark stored with the record (e.g. what else ran)")
    ap.add_argument("--out", default="serve/milvus_cpu")
    args = ap.parse_args()
    env = environment(("pymilvus", "milvus-lite", "usearch"))
    from r4t_fast.data.prepare import load_eval_data

    data = load_eval_data("polyvore", encoder="minilm", progress=False)
    base = data.catalog.embeddings.float().contiguous()
    cats = np.array([c or "" for c in data.catalog.categories], dtype=object)
    by_id = {s.set_id: s for s in data.dataset.sets}
    texts = [by_id[i].query for i in data.split.val if by_id[i].query][: args.queries]
    q = torch.from_numpy(np.asarray(data.encoder.encode(texts), dtype=np.float32))
    q = torch.nn.functional.normalize(q, dim=1).contiguous()
    results, not_run, grounding = [], {}, {}

    def write() -> None:
        payload = {
            "environment": env,
            "polyvore_items": len(base),
            "noise": args.noise,
            "queries": len(q),
            "results": results,
            "not_run": not_run,
            "grounding": grounding,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "note": args.note,
        }
        jp, mp = write_results(args.out, payload, markdown(payload))
        print(f"wrote {jp} and {mp}", flush=True)

    tmp = Path(tempfile.gettempdir()) / "r4t_bench_milvus"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    db = str(tmp / "bench.db")
    grounding.update(sets_equal(base, q[:128], args.model, db))
    print(grounding, flush=True)
    rate = None  # measured milvus build rate (items/s), to skip sizes beyond the budget
    for n in [int(x) for x in args.sizes.split(",")]:
        if rate is not None and n / rate > args.build_budget_s:
            not_run[str(n)] = f"estimated build {n / rate:.0f} s > budget {args.build_budget_s:.0f} s"
            continue
        rows = run_size(n, base, cats, q, args, db)
        results += rows
        m = [r for r in rows if r["backend"].startswith("milvus")]
        if m and m[0]["build_s"] > 0:
            rate = n / m[0]["build_s"]
        write()  # after every size: a record survives a later failure
    write()
    shutil.rmtree(tmp, ignore_errors=True)
    sys.stdout.flush()
    os._exit(0)  # Milvus Lite's teardown of a 1M-row file can take minutes; everything is written
    return 0


if __name__ == "__main__":
    sys.exit(main())
