"""R4T-Diffusion sampling: ms/query per sampler and NFE, eager and fused, against dense kNN in the same
run; the end-to-end latency tables of every method; quality against NFE on the validation split.

Question 1 (the grid): how long does ``Retriever.retrieve_embeddings(q, k=10, fused=False | True)``
(sampling + grounding; query embeddings given) take per query at batch 1, 8 and 64 for each sampler at
NFE 1, 2, 4, 8, 16, 31 (where the sampler reaches that count exactly) and at the retriever's saved default
(sampler, steps), with its saved guidance and anchor; and dense kNN (``ops.knn``, k = 10) over the same
catalog with the same query embeddings? With ``--quality-dataset``, what do the item-level metrics
(``r4t_fast.train.distill.quality_vs_nfe``) give at each grid point?

Question 2 (``--end-to-end``, ``--llm``, ``--folm POLICY`` -> ``results/latency_e2e.{json,md}``): from
query text to returned items, how long does every method take -- dense, MMR, DPP, R4T-Diffusion, and the
zero-shot LLM, best-of-N and FOLM fan-outs -- on the same query texts, with the protocol of
``r4t_fast.eval.latency`` (the one ``r4t eval`` and the pipeline use: a warm-up call, then >= 3 timed
calls per batch size, >= 2 for the LLM methods at batch 64; median, p25-p75, parts encode / generate /
rest), and from query embeddings for the non-LLM methods? Ratios to two significant figures with spread;
FOLM's and zero-shot's tokens/s compared (within 10 %: same base, LoRA merged).

    python benchmarks/bench_sampler.py                          # random cpu-small, clustered catalog
    python benchmarks/bench_sampler.py --quick                  # reduced grid, < 2 min
    python benchmarks/bench_sampler.py --prepare-model runs/oracle --dataset polyvore   # see below
    python benchmarks/bench_sampler.py --model runs/polyvore/diffusion --distilled runs/polyvore/distilled \\
        --default-distilled --end-to-end --llm --bon --folm runs/polyvore/rl/policy --split val
                                                                 # -> results/latency_e2e.{json,md}

Both paths are the real ``Retriever`` (what users get): ``eager`` is ``fused=False`` (PyTorch forwards,
the fused elementwise EDM step, ``ops.ground_sets``), ``fused`` is ``fused=True`` (sampling and grounding
in one ``ops.sample_sets`` call; the default on the CPU, ``--no-fused`` skips it). Their equality is
``tests/test_fused_sampler.py``'s business, not this benchmark's.

Queries: for the end-to-end tables or ``--quality-dataset`` the first 64 titled sets of the dataset's
``--split`` (``query_text``, as ``r4t eval``); otherwise synthetic embeddings near catalog rows. The LLM
methods are ``resolve_method``'s (``llm-zeroshot``, ``llm-bon``, ``folm``) on the retriever's catalog and
encoder with the pipeline's evaluation settings (constrained decoding, ``max_new_tokens`` 128).

``--prepare-model OUT`` makes a real trained model without the RL and synthesis stages: shards of
(query embedding, the reference set's item embeddings) pairs from the dataset's *train* split
(``OUT/shards``, each set's items cycled to the model's L = 10 rows), a cpu-small model trained on them
with the pipeline's cpu-small settings (``OUT/diffusion``, a retriever directory). Distil it with
``r4t distill --teacher OUT/diffusion --data OUT/shards --out OUT/distilled``.
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
from _harness import CPU_SMALL_EDM, RESULTS, environment, write_results
from r4t_fast import _threads, ops
from r4t_fast._internal import machine_description
from r4t_fast.data.catalog import Catalog
from r4t_fast.diffusion.model import SetDenoiser, get_preset
from r4t_fast.diffusion.retriever import Retriever
from r4t_fast.diffusion.samplers import fused_unavailable, nfe, steps_for_nfe

K = 10
NFE_GRID = (1, 2, 4, 8, 16, 31)
BATCHES = (1, 8, 64)
SAMPLERS_TIMED = ("euler", "euler_maruyama", "heun", "dpmpp_2m", "consistency")
REPEATS = {1: 9, 8: 5, 64: 3}


# ---------------------------------------------------------------------------------------------- paths
def retrieve(r: Retriever, q: torch.Tensor, sampler: str, steps: int, fused: bool) -> Any:
    """The real ``Retriever`` path users get: ``fused=False`` is the eager one (PyTorch forwards, the
    fused elementwise EDM step, ``ops.ground_sets``), ``fused=True`` the whole sampling and grounding in
    one ``ops.sample_sets`` call. Guidance and anchor are the retriever's saved defaults."""
    return r.retrieve_embeddings(
        q,
        K,
        steps=steps,
        sampler=sampler,
        guidance=r.defaults["guidance"],
        anchor=r.defaults["anchor"],
        seed=0,
        fused=fused,
    )


def fused_unsupported(r: Retriever, q: torch.Tensor) -> str | None:
    """Why ``retrieve_embeddings(fused=True)`` cannot run for ``r`` (None: it can)."""
    return fused_unavailable(r.edm, q)


# ---------------------------------------------------------------------------------------------- models
def clustered(n: int, d: int, seed: int, clusters: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g)
    x = centers[torch.randint(0, clusters, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def random_retriever(
    n_items: int = 18_800, d: int = 384, catalog: Catalog | None = None, encoder: Any = None
) -> Retriever:
    """A randomly initialised cpu-small model (Polyvore's shape: 384-d MiniLM rows, L = 10) over a clustered
    catalog of Polyvore's size (or over ``catalog``, with ``encoder``, when given). Latency does not
    depend on the weights."""
    d = catalog.dim if catalog is not None else d
    torch.manual_seed(0)
    model = SetDenoiser(get_preset("cpu-small", dim=d, cond_dim=d, sigma_data=0.05)).eval()
    with torch.no_grad():  # zero-initialised output layers: give every layer some signal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if catalog is None:
        catalog = Catalog([f"i{j}" for j in range(n_items)], clustered(n_items, d, 0), None)
    return Retriever(model, catalog, encoder)


_DATA: dict[str, Any] = {}


def eval_data(name: str, encoder: Any = None) -> Any:
    """``load_eval_data(name)`` once per run (``encoder``: an already loaded encoder to reuse)."""
    from r4t_fast.data.prepare import load_eval_data

    if name not in _DATA:
        _DATA[name] = load_eval_data(name, encoder=encoder or "minilm", progress=False)
    return _DATA[name]


def query_texts(data: Any, split: str, n: int = max(BATCHES)) -> tuple[list[str], int]:
    """The first ``n`` titled sets' queries of ``split`` (``query_text``, as ``r4t eval``), cycled when the
    split has fewer; and how many distinct queries there are."""
    from r4t_fast.data.datasets import query_text

    sets = [s for s in (data.dataset.get_set(i) for i in getattr(data.split, split)) if s.query is not None]
    if not sets:
        raise SystemExit(f"bench_sampler: the {split} split has no titled set")
    texts = [query_text(s) for s in sets[:n]]
    return [texts[i % len(texts)] for i in range(n)], len(texts)


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
    cfg = DiffusionTrainConfig(**CPU_SMALL_EDM, steps=steps, threads=threads)
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


def _order(sampler: str) -> int:
    return SAMPLERS_TIMED.index(sampler) if sampler in SAMPLERS_TIMED else len(SAMPLERS_TIMED)


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
    (the median over all its paired calls). The grid always holds the retriever's default (sampler,
    steps) (``default: true``); every row uses its retriever's saved guidance and anchor."""
    rows = []
    paths = ["eager"] + (["fused"] if args.fused else [])
    batches = _batches(args)
    reps = {b: max(1, REPEATS[b] // (3 if args.quick else 1)) for b in batches}
    cat = teacher._cat_dev
    head = student if (student is not None and args.default_distilled) else teacher
    default = (head.defaults["sampler"], head.defaults["steps"])
    points = grid(args.quick)
    if default not in points:
        points = sorted([*points, default], key=lambda p: (_order(p[0]), p[1]))
    for B in batches:
        q = pool[:B].contiguous()

        def dense():
            return ops.knn(q, cat, K, check_finite=False)

        dense_all = []
        for sampler, steps in points:
            r = student if (sampler == "consistency" and student is not None) else teacher
            for path in paths:
                fused = path == "fused"
                ts, td = _paired(lambda: retrieve(r, q, sampler, steps, fused), dense, reps[B])
                dense_all += td
                ms, dms = 1e3 * float(np.median(ts)) / B, 1e3 * float(np.median(td)) / B
                rows.append(
                    {
                        "method": "r4t-diffusion",
                        "path": path,
                        "sampler": sampler,
                        "steps": steps,
                        "nfe": nfe(sampler, steps),
                        "guidance": r.defaults["guidance"],
                        "anchor": r.defaults["anchor"],
                        "default": r is head and (sampler, steps) == default,
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


E2E_CALLS = {1: 50, 8: 20, 64: 6}
"""Timed calls per batch size of the non-LLM methods in the end-to-end tables (50 at batch 1, where a call
takes milliseconds and the shared machine's noise moves a median of 9 by 20 %)."""
E2E_BLOCK = 10
"""The non-LLM methods take turns in rounds of ``E2E_BLOCK`` untimed and then ``E2E_BLOCK`` timed calls
each (``measure_latency_interleaved(block=..., warmup=...)``): each is timed in its steady state (a
batch-1 dense search needs ~7 calls to get its catalog back into the L3 after another method ran), and
the machine's drift over the minutes of the run falls on every method alike."""
LLM_CALLS = {8: 3, 64: 3}
"""The LLM methods' (seconds per call): >= 3 at both batch sizes, so every quoted ratio rests on >= 3 timed
calls per side (issue 20 asked >= 2 at batch 64; the review rule is >= 3)."""
LLM_METHODS = ("llm-zeroshot", "llm-bon", "folm")


def e2e_methods(args, r4t: Retriever, data: Any) -> dict[str, Any]:
    """Every method of the pipeline's table on ``data``'s catalog and encoder (``r4t``: the diffusion
    retriever, over the same catalog): dense, MMR and DPP at the pipeline's validation choices, R4T-Diffusion
    and, with ``--llm``, the zero-shot LLM, best-of-N and (``--folm``) the tuned policy, every LLM with the
    pipeline's evaluation settings (max_new_tokens 128, constrained decoding, batch = the batch)."""
    from r4t_fast.eval.methods import resolve_method
    from r4t_fast.pipeline import DPP_VAL_CHOICE, MMR_VAL_CHOICE

    kw = {"mmr": MMR_VAL_CHOICE, "dpp": DPP_VAL_CHOICE}
    out: dict[str, Any] = {
        n: resolve_method(n, data, method_kwargs=kw.get(n))[0] for n in ("dense", "mmr", "dpp")
    }
    out["r4t-diffusion"] = r4t
    llm_kw = {"max_new_tokens": 128, "batch_size": 8}
    if args.llm:
        out["llm-zeroshot"] = resolve_method("llm-zeroshot", data, method_kwargs=llm_kw)[0]
    if args.bon:
        out["llm-bon"] = resolve_method("llm-bon", data, method_kwargs=llm_kw)[0]
    if args.folm:
        out["folm"] = resolve_method("folm", data, method_kwargs={**llm_kw, "policy": args.folm})[0]
    return out


def run_end_to_end(methods: dict[str, Any], texts: list[str], quick: bool = False) -> dict[str, Any]:
    """Both tables with :mod:`r4t_fast.eval.latency`'s protocol (the one ``r4t eval`` and the pipeline
    use): from query text to items (every method) and from query embeddings (the non-LLM methods), on the
    same query texts; the diffusion retriever's sample / ground split; FOLM vs zero-shot tokens/s.
    ``quick``: batches 1 and 8 (LLM: 8), 3 calls each (a smoke run, not the record)."""
    from r4t_fast.eval.latency import (
        diffusion_breakdown,
        embedding_latency_interleaved,
        measure_latency_interleaved,
    )

    text: dict[str, Any] = {}
    emb: dict[str, Any] = {}
    every = (1, 8) if quick else BATCHES
    fast = {n: m for n, m in methods.items() if n not in LLM_METHODS}
    calls = 3 if quick else E2E_CALLS
    block = 2 if quick else E2E_BLOCK
    t0 = time.perf_counter()
    for name, (_, det) in measure_latency_interleaved(
        fast, texts, K, every, calls, block=block, warmup=block
    ).items():
        text[name] = det
        med = ", ".join(f"B={b}: {det[str(b)]['median']:.3g}" for b in every)
        print(f"{name:14s} ms/query from text {med}", flush=True)
    for name, (_, det) in embedding_latency_interleaved(
        fast, texts, K, every, calls, block=block, warmup=block
    ).items():
        emb[name] = det
    print(f"non-LLM methods, both tables: {time.perf_counter() - t0:.0f} s", flush=True)
    llms = {n: m for n, m in methods.items() if n in LLM_METHODS}
    if llms:  # seconds per call: interleaved call by call, so the machine's drift falls on each alike
        t0 = time.perf_counter()
        batches = (8,) if quick else (8, 64)
        got = measure_latency_interleaved(llms, texts, K, batches, 3 if quick else LLM_CALLS)
        for name, (_, det) in got.items():
            text[name] = det
            med = ", ".join(f"B={b}: {det[str(b)]['median']:.3g}" for b in batches)
            print(f"{name:14s} ms/query from text {med}", flush=True)
        print(f"LLM methods interleaved: {time.perf_counter() - t0:.0f} s", flush=True)
    out: dict[str, Any] = {"text": text, "embeddings": emb, "batches": list(every), "quick": quick}
    out["calls"] = {"llm": 3 if quick else LLM_CALLS, "other": 3 if quick else E2E_CALLS}
    r4t = methods["r4t-diffusion"]
    if r4t.encoder is not None:
        out["r4t_sample_ground_ms"] = diffusion_breakdown(r4t, texts, K, every, out["calls"]["other"])
    if "folm" in text and "llm-zeroshot" in text:
        from r4t_fast.eval.latency import tokens_per_s_agreement

        out["tokens_per_s_folm_vs_zeroshot"] = {
            b: tokens_per_s_agreement(text["folm"][b], text["llm-zeroshot"][b]) for b in text["folm"]
        }
    return out


def e2e_markdown(env: dict, setup: dict, e2e: dict[str, Any]) -> str:
    from r4t_fast.eval.latency import format_ratio, latency_table

    m = env["machine"]
    text, emb = e2e["text"], e2e["embeddings"]
    md = [
        "# Latency from query text to items, every method, same queries, same run",
        "",
        f"{env['date']} · {m['cpu']} · {m['cores']} cores · torch {env['versions'].get('torch')} · "
        f"threads {env.get('torch_threads')} · load average at start {env['load_average_1_5_15']} · "
        f"commit {env.get('git_commit')} · command `{env['command']}`",
        "",
        f"Model: {setup['model']}. Catalog: {setup['catalog']}. Queries: {setup['queries']}.",
        "",
        "Protocol (`r4t_fast.eval.latency.measure_latency_interleaved`; `r4t eval` and the pipeline time one "
        "method at a time with `measure_latency`, its one-method case): per batch size untimed warm-up "
        "calls of `retrieve(batch, k=10)` and timed calls "
        f"({e2e['calls']['other']} for dense / MMR / DPP / R4T-Diffusion, taking turns in rounds of "
        f"{E2E_BLOCK} untimed and {E2E_BLOCK} timed calls each — each method in its steady state, its own "
        f"data warm in the caches, the machine's drift spread over all; {e2e['calls']['llm']} for the LLM "
        "methods, "
        "interleaved call by call — zero-shot, best-of-N, FOLM, zero-shot, … on the same batches "
        "(`measure_latency_interleaved`) — so the machine's drift over their minutes falls on each "
        "alike); median ms per query (p25–p75 over the calls). Parts (ms per query, medians): e = text "
        "encoder (the queries; an LLM method's subqueries too), g = the policy's generate, r = the rest "
        "(search, sampling, grounding, assembling the results). Ratios: two significant figures, the spread "
        "from the p25/p75 of both sides.",
        "",
        "## From query text (× = ÷ R4T-Diffusion)",
        "",
        *latency_table(text, e2e["batches"], reference="r4t-diffusion"),
        "",
        "R4T-Diffusion ÷ dense kNN, from text: "
        + ", ".join(
            f"B = {b}: {format_ratio(text['r4t-diffusion'].get(str(b)), text['dense'].get(str(b)))}"
            for b in e2e["batches"]
        )
        + ".",
        "",
        "## From query embeddings (non-LLM methods; × = ÷ dense kNN)",
        "",
        "The same `retrieve` calls with the encoder answering from embeddings computed beforehand "
        "(`embedding_latency_interleaved`, the same rounds).",
        "",
        *latency_table(emb, e2e["batches"], reference="dense"),
    ]
    sg = e2e.get("r4t_sample_ground_ms")
    if sg:
        md += [
            "",
            "R4T-Diffusion's parts timed separately (`diffusion_breakdown`: encode / sample / ground, "
            "ms per query): "
            + "; ".join(f"B = {b}: " + " / ".join(f"{v:.3g}" for v in sg[b].values()) for b in sg)
            + ".",
        ]
    agree = e2e.get("tokens_per_s_folm_vs_zeroshot")
    if agree:
        md += [
            "",
            "FOLM vs zero-shot generation rate (same base model and settings; LoRA merged): "
            + "; ".join(
                f"B = {b}: {a['a']:.1f} vs {a['b']:.1f} tokens/s "
                f"({'within' if a['within_10pct'] else 'NOT within'} 10 %)"
                + (
                    f", {a['positions_a']:.1f} vs {a['positions_b']:.1f} decoded positions/s, padding "
                    f"included ({'within' if a['positions_within_10pct'] else 'NOT within'} 10 %)"
                    if "positions_a" in a
                    else ""
                )
                for b, a in agree.items()
                if a
            )
            + ".",
        ]
    return "\n".join(md) + "\n"


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
    from r4t_fast.train.distill import nfe_grid, quality_vs_nfe

    data = eval_data(args.quality_dataset, teacher.encoder)
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
def _setting(r: dict | None) -> str:
    if r is None:
        return "—"
    return (
        f"{r['sampler']} {r['steps']} steps ({r['nfe']} NFE), w = {r['guidance']:g}, anchor = {r['anchor']:g}"
    )


def _comparison(setup: dict, lat: list[dict]) -> list[str]:
    """The table of the default setting (eager and fused) against dense kNN and FOLM."""
    defaults = [r for r in lat if r.get("method") == "r4t-diffusion" and r.get("default")]
    if not defaults:
        return []
    batches = sorted({r["batch"] for r in lat if r["method"] == "dense-knn"})
    dense = {r["batch"]: r["ms_per_query"] for r in lat if r["method"] == "dense-knn"}
    by = {(r["path"], r["batch"]): r for r in defaults}

    def ms(x: float | None) -> str:
        return "—" if x is None else (f"{x:.2f}" if x < 100 else f"{x:,.0f}")

    def ratio(a: float | None, b: float | None) -> str:
        return "—" if a is None or b is None else f"{a / b:,.1f}×"

    def get(path: str, b: int) -> float | None:
        r = by.get((path, b))
        return None if r is None else r["ms_per_query"]

    setting = _setting(next(iter(by.values())))
    head = " | ".join(f"B={b}" for b in batches)
    md = [
        "",
        "## R4T-Diffusion vs dense kNN, same queries, same run",
        "",
        f"Queries: {setup.get('queries', 'synthetic query embeddings')}. ms per query at each batch size. "
        f"R4T-Diffusion: the retriever's saved default setting ({setting}), "
        "`retrieve_embeddings(q, k=10, fused=False | True)` on the queries' embeddings from the retriever's "
        "encoder (text encoding not timed), median as above; dense kNN: `ops.knn(q, catalog, 10)` on the "
        "same embeddings, the median over its paired calls. From query text, every method: latency_e2e.md.",
    ]
    md += [
        "",
        f"| method | {head} |",
        "|---|" + "---|" * len(batches),
        "| dense kNN (`ops.knn`) | " + " | ".join(ms(dense.get(b)) for b in batches) + " |",
        "| R4T-Diffusion eager, default setting | " + " | ".join(ms(get("eager", b)) for b in batches) + " |",
        "| R4T-Diffusion fused, default setting | " + " | ".join(ms(get("fused", b)) for b in batches) + " |",
        "| speed-up fused vs eager (eager ÷ fused) | "
        + " | ".join(ratio(get("eager", b), get("fused", b)) for b in batches)
        + " |",
        "| fused ÷ dense kNN (paired calls) | "
        + " | ".join(f"{by[('fused', b)]['vs_dense']:.1f}×" if ("fused", b) in by else "—" for b in batches)
        + " |",
    ]
    return md


def _markdown(env: dict, machine: dict, setup: dict, lat: list[dict], qual: list[dict], qinfo: dict) -> str:
    d = setup.get("defaults")
    used = (
        f"Every diffusion row uses the retriever's saved guidance w = {d['guidance']:g} and anchor = "
        f"{d['anchor']:g} (`Retriever.defaults`; the grid sets only sampler and steps); the default "
        f"setting ({d['sampler']} {d['steps']} steps) is marked ★. "
        if d
        else ""
    )
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
        f"Model: {setup['model']}. Catalog: {setup['catalog']}. "
        f"Queries: {setup.get('queries', 'synthetic query embeddings')}. k = {K}; times are the median of "
        f"{' / '.join(str(v) for v in setup['repeats'].values())} calls at batch "
        f"{' / '.join(str(b) for b in setup['repeats'])} after one warm-up, ms per query of "
        "`Retriever.retrieve_embeddings(q, k=10, seed=0, fused=...)` (sampling + grounding; query "
        "embeddings given): path `eager` is `fused=False` (PyTorch forwards, the fused elementwise step, "
        "`ops.ground_sets`), `fused` is `fused=True` (one `ops.sample_sets` call). " + used + "Dense kNN "
        "(`ops.knn(q, catalog, 10)`, same queries) is called alternately with every grid point, and "
        "each ratio (×) is to those paired calls, so both sides saw the same load; the dense row is "
        "the median over all of them. NFE = network evaluations (`samplers.nfe`). "
        f"Consistency rows: {setup.get('distilled', 'the same model (latency only)')}.",
        "",
    ]
    diff = [r for r in lat if r["method"] == "r4t-diffusion"]
    batches = sorted({r["batch"] for r in diff})
    dense = {r["batch"]: r["ms_per_query"] for r in lat if r["method"] == "dense-knn"}
    md += [
        "| sampler | steps | NFE | path | " + " | ".join(f"B={b} ms (× dense)" for b in batches) + " |",
        "|---|---|---|---|" + "---|" * len(batches),
        "| dense kNN | – | – | ops.knn | " + " | ".join(f"{dense[b]:.2f}" for b in batches) + " |",
    ]
    keys = sorted(
        {(r["sampler"], r["steps"], r["path"]) for r in diff},
        key=lambda x: (_order(x[0]), x[1], x[2]),
    )
    for s, st, p in keys:
        cells, star = [], ""
        for b in batches:
            hit = [
                r
                for r in diff
                if r["sampler"] == s and r["steps"] == st and r["path"] == p and r["batch"] == b
            ]
            cells.append(f"{hit[0]['ms_per_query']:.2f} ({hit[0]['vs_dense']:.1f}×)" if hit else "—")
            star = star or ("★" if hit and hit[0].get("default") else "")
        md.append(f"| {s} | {st} | {nfe(s, st)} | {p}{star and ' ' + star} | " + " | ".join(cells) + " |")
    md += _comparison(setup, lat)
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
    ap.add_argument(
        "--default-distilled",
        action="store_true",
        help="R4T-Diffusion's default setting is the --distilled model's saved default (the pipeline's "
        "distill stage chose it on validation) instead of --model's",
    )
    ap.add_argument("--quick", action="store_true", help="reduced grid (< 2 min without --folm)")
    ap.add_argument(
        "--fused",
        dest="fused",
        action="store_true",
        default=None,
        help="time the fused path (retrieve_embeddings(fused=True)) too: the default where it can run; "
        "with the flag, an error where it cannot",
    )
    ap.add_argument("--no-fused", dest="fused", action="store_false", help="skip the fused rows")
    ap.add_argument(
        "--folm",
        metavar="POLICY",
        help="the end-to-end tables (results/latency_e2e) with the tuned policy (a directory) as FOLM",
    )
    ap.add_argument("--llm", action="store_true", help="end-to-end tables: also the zero-shot LLM fan-out")
    ap.add_argument("--bon", action="store_true", help="end-to-end tables: also the best-of-N LLM fan-out")
    ap.add_argument(
        "--untrained-distilled",
        action="store_true",
        help="no --model: the random cpu-small retriever at the pipeline's distilled default (consistency, "
        "2 steps, w = 0, anchor 0.3) instead of Retriever's defaults",
    )
    ap.add_argument(
        "--end-to-end",
        action="store_true",
        help="only the end-to-end tables (every method from query text and from embeddings; real queries)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: r4t_fast._threads' rule)")
    ap.add_argument("--quality-dataset", help="also score quality against NFE on this dataset's split")
    ap.add_argument(
        "--split", default="val", choices=["train", "val", "test"], help="quality and query-text split"
    )
    ap.add_argument(
        "--quality-only", action="store_true", help="recompute quality, keep results/NAME.json's latency"
    )
    ap.add_argument(
        "--prepare-model", metavar="OUT", help="make shards + a trained cpu-small model, then exit"
    )
    ap.add_argument(
        "--dataset",
        default="polyvore",
        help="--prepare-model: the dataset; also the query texts' dataset without --quality-dataset",
    )
    ap.add_argument("--train-steps", type=int, default=2000, help="--prepare-model: optimizer steps")
    ap.add_argument(
        "--out",
        default="sampler_cpu",
        help="results name under benchmarks/results/ (the end-to-end tables: latency_e2e unless given)",
    )
    args = ap.parse_args()
    torch.set_num_threads(_threads.resolve(args.threads))
    if args.prepare_model:
        prepare_model(Path(args.prepare_model), args.dataset, args.train_steps, args.threads)
        return
    if args.quality_dataset and not args.model:
        ap.error("--quality-dataset needs --model (a random model's catalog is not the dataset's)")
    e2e = bool(args.end_to_end or args.folm or args.llm or args.bon)
    real = bool(e2e or args.quality_dataset)  # real query texts: the dataset's split titles
    qname = args.quality_dataset or args.dataset
    if args.model:
        teacher = Retriever.from_pretrained(args.model)
        dflt = ", ".join(f"{k} {v}" for k, v in teacher.defaults.items() if k != "seed")
        setup = {
            "model": f"trained, {args.model} (its saved defaults: {dflt})",
            "catalog": f"the model's, {len(teacher.catalog):,} × {teacher.catalog.dim}",
        }
    elif real:  # a random model over the dataset's catalog, with its encoder (FOLM needs both)
        data = eval_data(qname)
        teacher = random_retriever(catalog=data.catalog, encoder=data.encoder)
        if args.untrained_distilled:
            teacher.defaults.update(sampler="consistency", steps=2, guidance=0.0, anchor=0.3)
        setup = {
            "model": f"randomly initialised cpu-small (d = {teacher.catalog.dim}, L = 10; latency does not "
            "depend on weights)" + (", at the distilled default" if args.untrained_distilled else ""),
            "catalog": f"{qname}'s, {len(teacher.catalog):,} × {teacher.catalog.dim}",
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
    setup["defaults"] = dict(teacher.defaults)
    if student is not None:
        setup["distilled_defaults"] = dict(student.defaults)
    if args.default_distilled:
        if student is None:
            raise SystemExit("bench_sampler: --default-distilled needs --distilled")
        setup["default_is_distilled"] = True
    texts: list[str] = []
    if real:
        if teacher.encoder is None:
            raise SystemExit("bench_sampler: real queries need the retriever's text encoder (it has none)")
        texts, n_distinct = query_texts(eval_data(qname, teacher.encoder), args.split)
        pool = torch.from_numpy(np.asarray(teacher.encoder.encode(texts), dtype=np.float32)).contiguous()
        enc = teacher.encoder_spec or getattr(teacher.encoder, "name", "given")
        setup["queries"] = (
            f"the first {len(texts)} titled {args.split}-split sets of {qname} (`query_text`, "
            f"{n_distinct} distinct), embedded by the retriever's encoder ({enc})"
        )
        setup["query_texts"] = texts
    else:
        pool = torch.nn.functional.normalize(
            teacher.catalog.embeddings[
                torch.randperm(len(teacher.catalog), generator=torch.Generator().manual_seed(1))[:64]
            ].float()
            + 0.3 * clustered(64, teacher.catalog.dim, 2),
            dim=1,
        )
        setup["queries"] = "synthetic: 64 catalog rows + 0.3 × clustered noise, renormalised"
    why = fused_unsupported(teacher, pool[:1])
    if args.fused is None:
        args.fused = why is None
        if why is not None:
            print(f"bench_sampler: no fused rows ({why})", flush=True)
    elif args.fused and why is not None:
        raise SystemExit(f"bench_sampler: --fused cannot run: {why}")
    if e2e:  # every method on the same query texts, R4T-Diffusion at its default (--default-distilled)
        r4t = student if args.default_distilled else teacher
        data = eval_data(qname, teacher.encoder)
        res = run_end_to_end(e2e_methods(args, r4t, data), texts, quick=args.quick)
        env = environment(("transformers", "peft"))
        payload = {"benchmark": "latency_e2e", "environment": env, "machine": machine_description()}
        payload.update(setup=setup, **res)
        name = ("latency_e2e" if args.out == "sampler_cpu" else args.out) + ("_quick" if args.quick else "")
        jp, mp = write_results(name, payload, e2e_markdown(env, setup, res))
        print(f"wrote {jp} and {mp}")
        if args.end_to_end:
            return
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
        jp, mp = save([], {})  # the latency first: a failure in a later part keeps it
    if args.quality_dataset:
        jp, mp = save(*run_quality(args, teacher, student))
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
