"""The fused sampler's bf16 precision (``Retriever(precision="bf16")``) against float32, per model: what it
changes in the retrieved sets on a validation split, and what it saves in time.

For every ``--model`` (a retriever directory, its saved sampling defaults) on the titled queries of
``--split``:

* quality: ``evaluate`` of the retriever at precision fp32 and at bf16 (same queries, same seeds), the
  paired differences of ``recall_at_fair``, ``vendi`` and ``item_relevance`` (bootstrap 95 % CI), the
  share of identical sets, and the rows' relative change; whether bf16 meets the selection rule's
  tolerance (97 % / 97 % / 99 % of fp32's ``recall_at_fair`` / ``vendi`` / ``item_relevance``;
  ``r4t_fast.eval.selection.meets_tolerance``, the rule the pipeline applies to choose the precision);
* time: ``ops.sample_sets`` alone (the sampler, no grounding) and ``retrieve_embeddings`` at batch 1 / 8 /
  64, fp32 and bf16 alternating in ``--rounds`` rounds of timed calls after a warm-up; median per round,
  then the median of the rounds (one process; run with the machine otherwise idle).

    python benchmarks/bench_sampler_bf16.py --model runs/latency-w3-e1 --model runs/polyvore/diffusion
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ci_cell, environment, median_ms, paired_ci, write_results  # noqa: E402

BATCHES = (1, 8, 64)
CALLS = {1: 50, 8: 10, 64: 3}
TOL = (0.97, 0.97, 0.99)


def one_model(path: str, data, split: str, rounds: int) -> dict:
    from r4t_fast import ops
    from r4t_fast.data.datasets import query_text
    from r4t_fast.diffusion.retriever import Retriever
    from r4t_fast.diffusion.samplers import fused_packing, sampler_sigmas
    from r4t_fast.eval.evaluation import evaluate
    from r4t_fast.eval.selection import meets_tolerance
    from r4t_fast.kernels.sampler_pack import step_noise

    r = Retriever.from_pretrained(path)
    r.defaults["precision"] = "fp32"
    sets = [s for s in (data.dataset.get_set(i) for i in getattr(data.split, split)) if s.query is not None]
    q = torch.from_numpy(np.asarray(r.encoder.encode([query_text(s) for s in sets]), dtype=np.float32))
    rec, out = {}, {}
    for prec in ("fp32", "bf16"):
        r.defaults["precision"] = prec
        rec[prec] = evaluate(r, data.dataset, split, method_name="r4t-diffusion", data=data,
                             latency_batch_sizes=(), n_boot=100, progress=False)  # fmt: skip
        out[prec] = r.retrieve_embeddings(q)
    r.defaults["precision"] = "fp32"
    same = sum(
        list(a.item_indices) == list(b.item_indices) for a, b in zip(out["fp32"], out["bf16"], strict=True)
    )
    # the sampler's rows themselves (before grounding and ranking), same initial noise both ways
    pk0 = fused_packing(r.edm, q)[0]
    sig0 = sampler_sigmas(r.defaults["sampler"], r.defaults["steps"], r.model.cfg)
    shape, g = (len(q), r.model.cfg.set_size, r.model.cfg.dim), torch.Generator().manual_seed(0)
    x_all = torch.randn(shape, generator=g)
    z = step_noise(r.defaults["sampler"], sig0, shape, g)
    kw0 = dict(sampler=r.defaults["sampler"], guidance=r.defaults["guidance"], check_finite=False, noise=z)
    rows32 = ops.sample_sets(pk0, q, x_all * sig0[0], sig0, **kw0).rows
    rows16 = ops.sample_sets(pk0, q, x_all * sig0[0], sig0, precision="bf16", **kw0).rows
    rel = float((rows16 - rows32).norm() / rows32.norm())
    keys = ("recall_at_fair", "vendi", "item_relevance")
    m = {p: {k: rec[p]["metrics"][k] for k in keys} for p in rec}
    diffs = {k: paired_ci(rec["bf16"], rec["fp32"], k) for k in keys}

    # time
    cfg, o = r.model.cfg, r.defaults
    sig = sampler_sigmas(o["sampler"], o["steps"], cfg)
    times: dict[str, list[float]] = {}
    for b in BATCHES:
        qb = q[:b].contiguous() if b <= len(q) else q[torch.arange(b) % len(q)].contiguous()
        pk = fused_packing(r.edm, qb)[0]
        x0 = torch.randn(b, cfg.set_size, cfg.dim) * sig[0]
        for _ in range(rounds):
            for prec in ("fp32", "bf16"):
                samp = lambda: ops.sample_sets(pk, qb, x0, sig, sampler=o["sampler"], check_finite=False,  # noqa: E731
                                               guidance=o["guidance"], precision=prec)  # fmt: skip
                ret = lambda: r.retrieve_embeddings(qb, precision=prec)  # noqa: E731
                times.setdefault(f"sample_{prec}_b{b}", []).append(median_ms(samp, CALLS[b], per=b))
                times.setdefault(f"retrieve_{prec}_b{b}", []).append(median_ms(ret, CALLS[b], per=b))
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "model": Path(path).name if Path(path).name != "diffusion" else str(Path(path)),
        "defaults": {k: v for k, v in o.items() if k != "precision"},
        "queries": len(sets),
        "metrics": m,
        "bf16_minus_fp32": diffs,
        "meets_tolerance": meets_tolerance(m["bf16"], m["fp32"], TOL),
        "identical_sets": same,
        "rows_relative_change": rel,
        "rounds_ms_per_query": times,
        "median_ms_per_query": med,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="retriever directory (repeatable)")
    ap.add_argument("--dataset", default="polyvore")
    ap.add_argument("--split", default="val", choices=["train", "val"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="sampler_bf16")
    args = ap.parse_args()

    from r4t_fast import _threads, build_info
    from r4t_fast.data.prepare import load_eval_data

    torch.set_num_threads(_threads.resolve(0))
    if build_info().get("sampler_bf16") != "avx512_bf16":
        print("bench_sampler_bf16: no AVX512-BF16 here: bf16 runs emulated (no speed-up to measure)")
    env = environment()
    data = load_eval_data(args.dataset, encoder="minilm", progress=False)
    res = [one_model(p, data, args.split, args.rounds) for p in args.model]
    payload = {"benchmark": "sampler_bf16", "environment": env, "dataset": args.dataset, "split": args.split,
               "tolerance": TOL, "sampler_bf16": build_info().get("sampler_bf16"), "models": res}  # fmt: skip
    cmd = " ".join(f"--model {p}" for p in args.model)
    md = [
        "# Fused sampler: bf16 GEMMs vs float32",
        "",
        f"{env['date']} · {env['machine'].get('cpu')} · {build_info().get('sampler_bf16')} · load average at "
        f"start {env.get('load_average_1_5_15')} · commit {env.get('git_commit')} · command "
        f"`bench_sampler_bf16.py {cmd} --split {args.split}` · other jobs stopped.",
        "",
        "bf16: the forward pass's Linears on bf16-rounded inputs and weights, float32 accumulation "
        '(`ops.sample_sets(precision="bf16")`). Same queries and seeds both ways; differences bf16 − fp32 '
        "with paired bootstrap 95 % CIs (* = excludes 0).",
        "",
        "| model (defaults) | queries | recall_at_fair fp32 → bf16 | Δ (pt) | vendi fp32 → bf16 | Δ | "
        "item_relevance fp32 → bf16 | Δ | identical sets | rows' rel. change | meets tolerance |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for x in res:
        m, d = x["metrics"], x["bf16_minus_fp32"]
        dflt = ", ".join(
            f"{k} {v}" for k, v in x["defaults"].items() if k in ("sampler", "steps", "anchor", "pull")
        )
        md.append(
            f"| {x['model']} ({dflt}) | {x['queries']} | {100 * m['fp32']['recall_at_fair']:.2f} → "
            f"{100 * m['bf16']['recall_at_fair']:.2f} | {ci_cell(d['recall_at_fair'], 100, 2)} | "
            f"{m['fp32']['vendi']:.3f} → {m['bf16']['vendi']:.3f} | {ci_cell(d['vendi'], 1, 3)} | "
            f"{m['fp32']['item_relevance']:.4f} → {m['bf16']['item_relevance']:.4f} | "
            f"{ci_cell(d['item_relevance'], 1, 4)} | {x['identical_sets']} / {x['queries']} | "
            f"{x['rows_relative_change']:.2e} | {'yes' if x['meets_tolerance'] else 'no'} |"
        )
    md += [
        "",
        "## Time (ms per query, median of the rounds' medians; fp32 and bf16 alternating)",
        "",
        "| model | B | sampler fp32 | sampler bf16 | × | retrieve_embeddings fp32 | retrieve_embeddings bf16 "
        "| × |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in res:
        t = x["median_ms_per_query"]
        for b in BATCHES:
            s32, s16 = t[f"sample_fp32_b{b}"], t[f"sample_bf16_b{b}"]
            r32, r16 = t[f"retrieve_fp32_b{b}"], t[f"retrieve_bf16_b{b}"]
            md.append(f"| {x['model']} | {b} | {s32:.3f} | {s16:.3f} | {s32 / s16:.2f} | {r32:.3f} | "
                      f"{r16:.3f} | {r32 / r16:.2f} |")  # fmt: skip
    md += ["", f"{args.rounds} rounds; timed calls per round {CALLS} after one untimed call."]
    jp, mp = write_results(args.out, payload, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
