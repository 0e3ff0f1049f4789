"""R4T-Diffusion sampling: ms/query per sampler and NFE, against dense kNN in the same run, and quality
against NFE on the validation split.

Question: how long does ``Retriever.retrieve_embeddings(q, k=10)`` (sampling + grounding; query
embeddings given, so no text encoding) take per query at batch 1, 8 and 64 for each sampler at NFE 1, 2,
4, 8, 16, 31 (where the sampler reaches that count exactly), and dense kNN (``ops.knn``, k = 10) over
the same catalog with the same query embeddings? With ``--quality-dataset``, what do the item-level
metrics (``r4t_fast.train.distill.quality_vs_nfe``) give at each grid point?

    python benchmarks/bench_sampler.py                          # random cpu-small, clustered catalog
    python benchmarks/bench_sampler.py --quick                  # reduced grid, < 2 min
    python benchmarks/bench_sampler.py --prepare-model runs/oracle --dataset polyvore   # see below
    python benchmarks/bench_sampler.py --model runs/oracle/diffusion --distilled runs/oracle/distilled \\
        --quality-dataset polyvore                               # -> results/sampler_cpu.{json,md}

``--prepare-model OUT`` makes a real trained model without the RL and synthesis stages: shards of
(query embedding, the reference set's item embeddings) pairs from the dataset's *train* split
(``OUT/shards``, each set's items cycled to the model's L = 10 rows), a cpu-small model trained on them
with the pipeline's cpu-small settings (``OUT/diffusion``, a retriever directory). Distil it with
``r4t distill --teacher OUT/diffusion --data OUT/shards --out OUT/distilled``.

The eager path is today's (PyTorch forwards + the fused elementwise step + fused grounding). The fused
path (``ops.sample_sets``: the whole set in one ``_C`` call) is one flag away: ``--fused`` adds a row
per grid point through :func:`fused_retrieve` (it needs k = L; its equality with the eager path is
``tests/test_fused_sampler.py``'s business, not this benchmark's).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, environment, write_results
from r4t_fast import ops
from r4t_fast._internal import machine_description
from r4t_fast.data.catalog import Catalog
from r4t_fast.diffusion.model import SetDenoiser, get_preset
from r4t_fast.diffusion.retriever import Retriever
from r4t_fast.diffusion.samplers import nfe, steps_for_nfe

K = 10
NFE_GRID = (1, 2, 4, 8, 16, 31)
BATCHES = (1, 8, 64)
SAMPLERS_TIMED = ("euler", "euler_maruyama", "heun", "dpmpp_2m", "consistency")
REPEATS = {1: 9, 8: 5, 64: 3}


# ---------------------------------------------------------------------------------------------- paths
def eager_retrieve(r: Retriever, q: torch.Tensor, sampler: str, steps: int) -> Any:
    """Today's path: PyTorch forwards, the fused elementwise EDM step, fused grounding."""
    return r.retrieve_embeddings(q, K, steps=steps, sampler=sampler, guidance=0.0, seed=0)


def fused_available() -> bool:
    return hasattr(ops, "sample_sets")


def fused_retrieve(r: Retriever, q: torch.Tensor, sampler: str, steps: int) -> Any:
    """The fused path: sampling and grounding of the batch in one ``ops.sample_sets`` call (weights
    packed once per model, cached), with the eager path's initial noise and schedule (k = L: one set per
    query, as at k = 10 with the cpu-small model)."""
    if not fused_available():
        raise SystemExit("bench_sampler: --fused needs ops.sample_sets, which this build does not have")
    from r4t_fast.diffusion.samplers import sampler_sigmas
    from r4t_fast.kernels.sampler_pack import pack_denoiser, step_noise

    cfg = r.model.cfg
    sig = sampler_sigmas(sampler, steps, cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((q.shape[0], cfg.set_size, cfg.dim), generator=g) * sig[0]
    noise = step_noise(sampler, sig, tuple(x.shape), g)
    return ops.sample_sets(
        pack_denoiser(r.model),
        q,
        x,
        sig,
        sampler=sampler,
        noise=noise,
        catalog=r._cat_dev,
        check_finite=False,
    )


PATHS = {"eager": eager_retrieve, "fused": fused_retrieve}


# ---------------------------------------------------------------------------------------------- models
def clustered(n: int, d: int, seed: int, clusters: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g)
    x = centers[torch.randint(0, clusters, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def random_retriever(n_items: int = 18_800, d: int = 384) -> Retriever:
    """A randomly initialised cpu-small model (Polyvore's shape: 384-d MiniLM rows, L = 10) over a clustered
    catalog of Polyvore's size. Latency does not depend on the weights."""
    torch.manual_seed(0)
    model = SetDenoiser(get_preset("cpu-small", dim=d, cond_dim=d, sigma_data=0.05)).eval()
    with torch.no_grad():  # zero-initialised output layers: give every layer some signal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cat = Catalog([f"i{j}" for j in range(n_items)], clustered(n_items, d, 0), None)
    return Retriever(model, cat)


def _reference_pairs(data: Any, set_ids: list[str], L: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(query embeddings, targets (n, L, d) = each set's item rows cycled to L, reference row indices)."""
    ds = data.dataset
    sets = [s for s in (ds.get_set(i) for i in set_ids) if s.query is not None]
    emb = data.catalog.embeddings.float()
    q = torch.from_numpy(np.asarray(data.encoder.encode([s.query for s in sets]), dtype=np.float32))
    refs, targets = [], []
    for s in sets:
        idx = [data.catalog.index_of(i) for i in s.item_ids]
        refs.append(idx)
        targets.append(emb[[idx[j % len(idx)] for j in range(L)]])
    return q, torch.stack(targets), refs


def prepare_model(out: Path, dataset: str, steps: int, threads: int) -> None:
    from safetensors.torch import save_file

    from r4t_fast._internal import atomic_write
    from r4t_fast.data.prepare import load_eval_data
    from r4t_fast.train.diffusion import DiffusionTrainConfig, train_diffusion

    data = load_eval_data(dataset, progress=False)
    L = get_preset("cpu-small").set_size
    cond, targets, _ = _reference_pairs(data, data.split.train, L)
    shard = {"cond": cond.contiguous(), "targets_items": targets.contiguous()}
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    atomic_write(shards / "shard-00000.safetensors", lambda p: save_file(shard, str(p)))
    print(f"{len(cond)} train pairs -> {shards}", flush=True)
    # the pipeline's cpu-small diffusion settings (PIPELINE_PRESETS["cpu-small"]["diffusion"])
    cfg = DiffusionTrainConfig(
        preset="cpu-small", steps=steps, batch_size=128, lr=5e-4, warmup=100, ema=0.995, threads=threads
    )
    model, log = train_diffusion(cond, targets, cfg, progress=False)
    r = Retriever(model, data.catalog, data.encoder, encoder_spec="minilm")
    r.save(out / "diffusion", extra={"train_config": asdict(cfg), "train_log": log, "data": "reference sets"})
    print(f"trained {steps} steps, final loss {log[-1]['loss']:.4f} -> {out / 'diffusion'}", flush=True)


# ---------------------------------------------------------------------------------------------- timing
def grid(quick: bool) -> list[tuple[str, int]]:
    nfes = (1, 4, 16, 31) if quick else NFE_GRID
    samplers = ("euler", "heun", "dpmpp_2m", "consistency") if quick else SAMPLERS_TIMED
    out = []
    for s in samplers:
        for n in nfes:
            steps = steps_for_nfe(s, n)
            if steps is not None and (s != "consistency" or steps <= 4):
                out.append((s, steps))
        if s == "heun" and not quick:  # heun reaches odd counts only: also 3, 7, 15
            out += [("heun", st) for st in (2, 4, 8)]
    return sorted(set(out), key=lambda p: (SAMPLERS_TIMED.index(p[0]), p[1]))


def _batches(args) -> tuple[int, ...]:
    return (1, 8) if args.quick else BATCHES


def _paired(fn, dense, repeat: int) -> tuple[list[float], list[float]]:
    """Seconds of ``fn()`` and ``dense()`` called alternately ``repeat`` times after one warm-up of each,
    so that both see the same machine load (the 2 cores are shared)."""
    fn(), dense()
    a, b = [], []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        dense()
        b.append(time.perf_counter() - t)
    return a, b


def run_latency(args, teacher: Retriever, student: Retriever | None, pool: torch.Tensor) -> list[dict]:
    """One row per (batch, sampler, steps, path): median ms/query, and the median ms/query of dense kNN
    timed alternately with it (``vs_dense`` is the ratio of the two); plus one dense-knn row per batch
    (the median over all its paired calls)."""
    rows = []
    paths = ["eager"] + (["fused"] if args.fused else [])
    batches = _batches(args)
    reps = {b: max(1, REPEATS[b] // (3 if args.quick else 1)) for b in batches}
    cat = teacher._cat_dev
    for B in batches:
        q = pool[:B].contiguous()

        def dense():
            return ops.knn(q, cat, K, check_finite=False)

        dense_all = []
        for sampler, steps in grid(args.quick):
            r = student if (sampler == "consistency" and student is not None) else teacher
            for path in paths:
                fn = PATHS[path]
                ts, td = _paired(lambda: fn(r, q, sampler, steps), dense, reps[B])
                dense_all += td
                ms, dms = 1e3 * float(np.median(ts)) / B, 1e3 * float(np.median(td)) / B
                rows.append(
                    {
                        "method": "r4t-diffusion",
                        "path": path,
                        "sampler": sampler,
                        "steps": steps,
                        "nfe": nfe(sampler, steps),
                        "batch": B,
                        "ms_per_query": ms,
                        "min_ms_per_query": 1e3 * min(ts) / B,
                        "repeat": reps[B],
                        "dense_ms_per_query": dms,
                        "vs_dense": ms / dms,
                    }
                )
                print(
                    f"B={B:3d} {path:5s} {sampler:14s} steps={steps:2d} NFE={nfe(sampler, steps):2d} "
                    f"{ms:8.2f} ms/query, dense {dms:6.2f} ({ms / dms:6.1f}x)",
                    flush=True,
                )
        rows.append(
            {
                "method": "dense-knn",
                "batch": B,
                "ms_per_query": 1e3 * float(np.median(dense_all)) / B,
                "min_ms_per_query": 1e3 * min(dense_all) / B,
                "repeat": len(dense_all),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------- quality
def dense_quality(r: Retriever, q: torch.Tensor, refs: list) -> dict:
    """The same item-level metrics for dense kNN (the query's top k items; its top K as the union)."""
    from r4t_fast.objectives import fair_budget, item_relevance, recall_at_k, vendi_score

    cat = r.catalog.embeddings.float()
    big = fair_budget(len(r.catalog), K)
    _, ids = ops.knn(q.contiguous(), cat, big, check_finite=False)
    items = cat[ids[:, :K]].double()
    return {
        "sampler": "-",
        "steps": 0,
        "nfe": 0,
        "fair_budget": big,
        "queries": int(q.shape[0]),
        "recall_at_fair": float(recall_at_k(list(ids.numpy()), refs).mean()),
        "vendi": float(vendi_score(items).mean()),
        "item_relevance": float(item_relevance(items, q.double()).mean()),
        "row_groundedness": float("nan"),
    }


def run_quality(args, teacher: Retriever, student: Retriever | None) -> tuple[list[dict], dict]:
    from r4t_fast.data.prepare import load_eval_data
    from r4t_fast.train.distill import nfe_grid, quality_vs_nfe

    data = load_eval_data(args.quality_dataset, progress=False)
    if len(data.catalog) != len(teacher.catalog) or data.catalog.ids != teacher.catalog.ids:
        raise SystemExit("bench_sampler: the model's catalog is not the dataset's catalog")
    q, _, refs = _reference_pairs(data, getattr(data.split, args.split), teacher.model.cfg.set_size)
    rows = []
    g = nfe_grid(("heun", "dpmpp_2m", "euler"), NFE_GRID)
    t0 = time.perf_counter()
    for row in quality_vs_nfe(teacher, q, refs, g, k=K):
        rows.append({"model": "teacher", **row})
        print(json.dumps(rows[-1]), flush=True)
    rows.append({"model": "dense-knn", **dense_quality(teacher, q, refs)})
    print(json.dumps(rows[-1]), flush=True)
    if student is not None:
        for row in quality_vs_nfe(student, q, refs, [("consistency", s) for s in (1, 2, 3, 4)], k=K):
            rows.append({"model": "distilled", **row})
            print(json.dumps(rows[-1]), flush=True)
    info = {
        "dataset": args.quality_dataset,
        "split": args.split,
        "queries": len(q),
        "wall_s": time.perf_counter() - t0,
    }
    return rows, info


# ---------------------------------------------------------------------------------------------- report
def _markdown(env: dict, machine: dict, setup: dict, lat: list[dict], qual: list[dict], qinfo: dict) -> str:
    md = [
        "# R4T-Diffusion sampling on the CPU: ms/query per sampler and NFE, dense kNN in the same run",
        "",
        f"{env['date']} — {machine['cpu']}, {machine['cores']} cores, "
        f"torch threads {machine['torch_threads']}; "
        f"torch {env['versions'].get('torch')}; r4t_fast SIMD: {env['build_info'].get('simd')}",
        "",
        f"Load average (1, 5, 15 min) at the end of the run: {env['load_average_1_5_15']}. The 2 cores are "
        "shared with other jobs: compare the ratios, taken in the same run, rather than absolute times.",
        "",
        f"Model: {setup['model']}. Catalog: {setup['catalog']}. k = {K}; times are the median of "
        f"{' / '.join(str(v) for v in setup['repeats'].values())} calls at batch "
        f"{' / '.join(str(b) for b in setup['repeats'])} after one warm-up, ms per query of "
        "`retrieve_embeddings(q, k=10)` (sampling + grounding; query embeddings given). Dense kNN "
        "(`ops.knn(q, catalog, 10)`, same queries) is called alternately with every grid point, and "
        "each ratio (×) is to those paired calls, so both sides saw the same load; the dense row is "
        "the median over all of them. NFE = network evaluations (`samplers.nfe`). "
        f"Consistency rows: {setup.get('distilled', 'the same model (latency only)')}.",
        "",
    ]
    batches = sorted({r["batch"] for r in lat})
    dense = {r["batch"]: r["ms_per_query"] for r in lat if r["method"] == "dense-knn"}
    md += [
        "| sampler | steps | NFE | path | " + " | ".join(f"B={b} ms (× dense)" for b in batches) + " |",
        "|---|---|---|---|" + "---|" * len(batches),
        "| dense kNN | – | – | ops.knn | " + " | ".join(f"{dense[b]:.2f}" for b in batches) + " |",
    ]
    keys = sorted(
        {(r["sampler"], r["steps"], r["path"]) for r in lat if r["method"] == "r4t-diffusion"},
        key=lambda x: (SAMPLERS_TIMED.index(x[0]), x[1], x[2]),
    )
    for s, st, p in keys:
        cells = []
        for b in batches:
            hit = [
                r
                for r in lat
                if r.get("sampler") == s and r.get("steps") == st and r.get("path") == p and r["batch"] == b
            ]
            cells.append(f"{hit[0]['ms_per_query']:.2f} ({hit[0]['vs_dense']:.1f}×)" if hit else "—")
        md.append(f"| {s} | {st} | {nfe(s, st)} | {p} | " + " | ".join(cells) + " |")
    if qual:
        md += [
            "",
            f"## Quality against NFE: {qinfo['dataset']} {qinfo['split']} split, {qinfo['queries']} queries",
            "",
            "Item-level metrics of `r4t_fast.train.distill.quality_vs_nfe` (seed 0, guidance 0): "
            f"`recall_at_fair` over a {qual[0]['fair_budget']}-distinct round-robin candidate union "
            "(3.5 % of the catalog), `vendi` of the k items, "
            "`item_relevance` = mean (1 + cos(item, query)) / 2, "
            "`row_groundedness` = 1 − mean nearest-item distance / 2. Ratios are to the teacher's Heun "
            "16 steps (31 NFE).",
            "",
            "| model | sampler | steps | NFE | recall_at_fair % | vendi | item_relevance "
            "| row_groundedness |",
            "|---|---|---|---|---|---|---|---|",
        ]
        ref = next(
            (r for r in qual if r["model"] == "teacher" and r["sampler"] == "heun" and r["nfe"] == 31), None
        )

        def pct(r, key):
            return f" ({100 * r[key] / ref[key]:.0f} %)" if ref else ""

        for r in qual:
            md.append(
                f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | "
                f"{100 * r['recall_at_fair']:.1f}{pct(r, 'recall_at_fair')} | "
                f"{r['vendi']:.2f}{pct(r, 'vendi')} | "
                f"{r['item_relevance']:.4f}{pct(r, 'item_relevance')} | {r['row_groundedness']:.4f} |"
            )
    md += ["", f"Command: `{env['command']}`", ""]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="retriever directory (default: a random cpu-small model)")
    ap.add_argument("--distilled", help="retriever directory of the distilled model (consistency rows)")
    ap.add_argument("--quick", action="store_true", help="reduced grid (< 2 min)")
    ap.add_argument("--fused", action="store_true", help="also time the fused path (needs ops.sample_sets)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--quality-dataset", help="also score quality against NFE on this dataset's split")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument(
        "--quality-only", action="store_true", help="recompute quality, keep results/NAME.json's latency"
    )
    ap.add_argument(
        "--prepare-model", metavar="OUT", help="make shards + a trained cpu-small model, then exit"
    )
    ap.add_argument("--dataset", default="polyvore", help="--prepare-model: the dataset")
    ap.add_argument("--train-steps", type=int, default=2000, help="--prepare-model: optimizer steps")
    ap.add_argument("--out", default="sampler_cpu", help="results name under benchmarks/results/")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prepare_model:
        prepare_model(Path(args.prepare_model), args.dataset, args.train_steps, args.threads)
        return
    if args.fused and not fused_available():
        raise SystemExit("bench_sampler: --fused needs ops.sample_sets, which this build does not have")
    if args.model:
        teacher = Retriever.from_pretrained(args.model)
        setup = {
            "model": f"trained, {args.model}",
            "catalog": f"the model's, {len(teacher.catalog):,} × {teacher.catalog.dim}",
        }
    else:
        teacher = random_retriever()
        setup = {
            "model": "randomly initialised cpu-small (d = 384, L = 10; latency does not depend on weights)",
            "catalog": f"clustered unit vectors, {len(teacher.catalog):,} × {teacher.catalog.dim} "
            "(Polyvore's size)",
        }
    student = Retriever.from_pretrained(args.distilled) if args.distilled else None
    if student is not None:
        setup["distilled"] = args.distilled
    n_par = sum(p.numel() for p in teacher.model.parameters())
    setup["parameters"] = n_par
    pool = torch.nn.functional.normalize(
        teacher.catalog.embeddings[
            torch.randperm(len(teacher.catalog), generator=torch.Generator().manual_seed(1))[:64]
        ].float()
        + 0.3 * clustered(64, teacher.catalog.dim, 2),
        dim=1,
    )
    t0 = time.perf_counter()
    setup["repeats"] = {b: max(1, REPEATS[b] // (3 if args.quick else 1)) for b in _batches(args)}
    name = args.out + ("_quick" if args.quick else "")
    if args.quality_only:
        old = json.loads((RESULTS / f"{name}.json").read_text())
        lat, setup = old["latency"], {**old["setup"], **{k: v for k, v in setup.items() if k != "repeats"}}
    else:
        lat = run_latency(args, teacher, student, pool)

    def save(qual: list[dict], qinfo: dict) -> tuple[Path, Path]:
        env, machine = environment(), machine_description()
        payload = {
            "benchmark": "sampler_cpu",
            "environment": env,
            "machine": machine,
            "setup": {**setup, "k": K, "quick": args.quick, "wall_s": time.perf_counter() - t0},
            "latency": lat,
            "quality": qual,
            "quality_setup": qinfo,
        }
        return write_results(name, payload, _markdown(env, machine, setup, lat, qual, qinfo))

    if not args.quality_only:
        jp, mp = save([], {})  # the latency first: a failure in the quality part keeps it
    if args.quality_dataset:
        jp, mp = save(*run_quality(args, teacher, student))
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
