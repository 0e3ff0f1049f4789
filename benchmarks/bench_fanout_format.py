"""Does every teacher answer hold a fan-out? SmolLM2-135M before/after constrained decoding (issue 11).

Question: with the default policy on Polyvore titles, how many usable subqueries does one answer hold,
how often does it hold none, how often is the strict format broken, and what does an answer cost in
tokens and seconds — for the previous prompt (unconstrained), the new short prompt (unconstrained),
and the new prompt with :class:`r4t_fast.fanout.FanOutConstraint` (one-shot and zero-shot)?
Optionally (``--xgrammar``, when the package is importable) the same with an xgrammar grammar of
exactly k strings (format only, no distinctness), to size the library alternative.

Queries: the first ``--n`` val-split set ids (sorted) of ``r4t_fast.data.splits.split_sets`` (seed 0,
8:1:1) over the titled Polyvore sets, as ``query_text``. Every variant runs greedy at batch 16 and
sampled (T = 0.9, top-p 1) at batch 48, ``max_new_tokens`` = 128 (the pipeline's cap), k = 10.

    python benchmarks/bench_fanout_format.py --threads 1            # -> results/fanout_format.{json,md}
    python benchmarks/bench_fanout_format.py --n 4 --runs greedy_b16:after --out fanout_format_smoke
    PYTHONPATH=<dir with xgrammar> python benchmarks/bench_fanout_format.py --xgrammar   # + xgrammar
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, environment, write_results  # noqa: E402
from r4t_fast.data.datasets import load_dataset, query_text  # noqa: E402
from r4t_fast.data.splits import split_sets  # noqa: E402
from r4t_fast.fanout import FanOutConstraint, FanOutLM, resolve_policy  # noqa: E402
from r4t_fast.fanout import prompt as prompt_mod  # noqa: E402

K = 10
MAX_NEW_TOKENS = 128

# The prompt of r4t_fast before issue 11 (verbatim), to measure "before" in the same run.
LEGACY_SYSTEM = (
    "You write search queries for a catalog of fashion items and music.\n"
    "Given a request, write {k} search queries for it. The queries are diverse but on the same topic: "
    "each one adds or changes one to three words of the request.\n"
    "Answer in this format and nothing else:\n"
    "<think>one short sentence about what to search for</think>\n"
    '<queries>["query 1", "query 2", ...]</queries>\n'
    "The JSON list holds exactly {k} different queries."
)
LEGACY_QUERY = "autumn picnic in the park"
LEGACY_THOUGHT = "An autumn picnic needs warm layers, picnic gear and mellow music."
LEGACY_SUBQUERIES = (
    "autumn picnic plaid blanket", "autumn park knit sweater", "autumn picnic wicker basket",
    "autumn picnic ankle boots", "autumn park acoustic folk songs", "autumn picnic wool scarf",
    "autumn park corduroy jacket", "autumn picnic mellow indie playlist", "autumn picnic felt hat",
    "autumn park cozy coffee songs",
)  # fmt: skip


def legacy_messages(query: str, k: int) -> list[dict[str, str]]:
    answer = prompt_mod.format_answer(LEGACY_SUBQUERIES[:k], LEGACY_THOUGHT)
    return [
        {"role": "system", "content": LEGACY_SYSTEM.format(k=k)},
        {"role": "user", "content": f"Request: {LEGACY_QUERY}"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": f"Request: {' '.join(query.split())}"},
    ]


class _Timed:
    """Wraps a logits processor and adds up the seconds spent in it."""

    def __init__(self, inner: Any, clock: list[float]) -> None:
        self.inner, self.clock = inner, clock

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        out = self.inner(input_ids, scores)
        self.clock[0] += time.perf_counter() - t
        return out


class BenchLM(FanOutLM):
    """FanOutLM with a switchable prompt (legacy / new), an optional xgrammar processor and a clock
    on the constraint processor."""

    legacy = False
    xgrammar: Any = None  # a compiled xgrammar grammar
    clock: list[float]

    def prompt_text(self, query: str, k: int = 10, *, one_shot: bool = True, think: bool = True) -> str:
        if not self.legacy:
            return super().prompt_text(query, k, one_shot=one_shot, think=think)
        return self.tokenizer.apply_chat_template(
            legacy_messages(query, k), tokenize=False, add_generation_prompt=True
        )

    def _processors(self, repetition_penalty, prompt_width, constraint, max_new_tokens):  # type: ignore[override]
        processors = super()._processors(repetition_penalty, prompt_width, constraint, max_new_tokens)
        if self.xgrammar is not None:
            import xgrammar as xgr
            from transformers import LogitsProcessorList

            processors = LogitsProcessorList([xgr.contrib.hf.LogitsProcessor(self.xgrammar)])
        if processors is not None:
            processors = type(processors)([_Timed(p, self.clock) for p in processors])
        return processors


def xgrammar_grammar(lm: FanOutLM, k: int, max_chars: int) -> Any:
    """Exactly k JSON strings of 1..max_chars safe characters in the tags (xgrammar EBNF)."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(lm.tokenizer, vocab_size=lm.model.config.vocab_size)
    string = f'"\\"" [a-zA-Z0-9] [a-zA-Z0-9 \\-&/.+\']{{0,{max_chars - 1}}} "\\""'
    ebnf = f'root ::= "<queries>[" str ("," " " str){{{k - 1}}} "]</queries>"\nstr ::= {string}\n'
    return xgr.GrammarCompiler(info).compile_grammar(ebnf)


_WORD = re.compile(r"[^\W_]+")


def _words(text: str) -> set[str]:
    return {w.casefold() for w in _WORD.findall(text)}


def summarise(queries: list[str], outs: list[list[Any]], timing: Any, constraint: FanOutConstraint | None,
              example_items: set[str], processor_s: float) -> dict[str, Any]:  # fmt: skip
    flat = [(q, o) for q, row in zip(queries, outs, strict=True) for o in row]
    n = len(flat)
    subqueries = [s for _, o in flat for s in o.subqueries]
    overlap = [bool(_words(s) & _words(q)) for q, o in flat for s in o.subqueries]
    check = constraint or FanOutConstraint(k=K)
    return {
        "n_answers": n,
        "usable_subqueries": sum(o.parse.n_valid for _, o in flat) / n,
        "no_subquery_rate": sum(o.parse.n_valid == 0 for _, o in flat) / n,
        "strict_format_failure_rate": sum(not o.parse.format_ok for _, o in flat) / n,
        "constraint_satisfied_rate": sum(check.check(o.text) is None for _, o in flat) / n,
        "unfinished_rate": sum(not o.finished for _, o in flat) / n,
        "tokens_per_answer": sum(o.n_tokens for _, o in flat) / n,
        "seconds_per_answer": timing.wall_s / n,
        "generate_tokens_per_s": timing.tokens_per_s,
        "processor_share_of_generate": processor_s / timing.generate_s if timing.generate_s else None,
        "words_per_subquery": sum(len(s.split()) for s in subqueries) / max(len(subqueries), 1),
        "subqueries_sharing_a_word_with_query": (sum(overlap) / len(overlap)) if overlap else 0.0,
        "subqueries_copied_from_example": (
            sum(s.casefold() in example_items for s in subqueries) / len(subqueries) if subqueries else 0.0
        ),
        "wall_s": timing.wall_s,
        "batch_size": timing.batch_size,
        "examples": [{"query": q, "text": o.text} for q, o in flat[:3]],
    }


VARIANTS = {
    # name: (legacy prompt, constrained, one_shot, xgrammar)
    "before": (True, False, True, False),
    "prompt_only": (False, False, True, False),
    "after": (False, True, True, False),
    "after_zero_shot": (False, True, False, False),
    "xgrammar": (False, False, True, True),
}
REGIMES = {"greedy_b16": (0.0, 16), "t0.9_b48": (0.9, 48)}
DEFAULT_RUNS = [
    *(f"greedy_b16:{v}" for v in ("before", "prompt_only", "after", "after_zero_shot")),
    "t0.9_b48:before",
    "t0.9_b48:after",
]


def markdown(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    lines = [
        "# Fan-out format: SmolLM2-135M before/after constrained decoding (issue 11, lever 1)",
        "",
        f"{env['date']} — {env['machine']['cpu']}, {env['machine']['cores']} cores, torch threads "
        f"{env.get('torch_threads')}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "",
        f"Load average (1/5/15 min) at the start {payload['load_start']} and end "
        f"{env['load_average_1_5_15']}: "
        "the 2 cores were shared with other jobs, so seconds are inflated; compare variants of the same "
        "regime, run back to back.",
        "",
        f"{payload['n_queries']} Polyvore val titles (first sorted set ids of split_sets seed 0), k = {K}, "
        f"max_new_tokens = {MAX_NEW_TOKENS}. `before` = the previous prompt (250-token prompt, 108-token "
        "example answer with a think block), unconstrained; `prompt_only` = the new short prompt "
        "(think=False), unconstrained; `after` = new prompt + FanOutConstraint (k=10, <= 8 words, "
        "<= 60 chars, think=False); `after_zero_shot` = the same without the worked example; "
        "`xgrammar` = new prompt + an xgrammar grammar of exactly 10 strings (format only).",
        "",
        "| regime | variant | usable subqueries /10 | no-subquery rate | strict-format failures | "
        "tokens/answer | s/answer | processor share | words/subquery | share with query word | "
        "copied from example |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for regime, rows in payload["results"].items():
        for variant, r in rows.items():
            share = r["processor_share_of_generate"]
            lines.append(
                f"| {regime} | {variant} | {r['usable_subqueries']:.2f} | {r['no_subquery_rate']:.1%} | "
                f"{r['strict_format_failure_rate']:.1%} | {r['tokens_per_answer']:.1f} | "
                f"{r['seconds_per_answer']:.2f} | {'—' if share is None else f'{share:.1%}'} | "
                f"{r['words_per_subquery']:.2f} | {r['subqueries_sharing_a_word_with_query']:.1%} | "
                f"{r['subqueries_copied_from_example']:.1%} |"
            )
    lines += ["", "Examples (first query of each variant, greedy):", ""]
    for variant, r in payload["results"].get("greedy_b16", {}).items():
        ex = r["examples"][0]
        lines.append(f"- `{variant}` — {ex['query']!r}: `{ex['text'][:300]}`")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=48, help="number of val titles")
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, metavar="REGIME:VARIANT",
                    help=f"regimes {sorted(REGIMES)}, variants {sorted(VARIANTS)}")  # fmt: skip
    ap.add_argument("--xgrammar", action="store_true", help="add the xgrammar variant (needs xgrammar)")
    ap.add_argument("--out", default="fanout_format", help="results/<out>.{json,md}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="keep the runs of results/<out>.partial.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = [round(x, 2) for x in os.getloadavg()]

    ds = load_dataset("polyvore")
    by_id = {s.set_id: s for s in ds.query_sets}
    ids = sorted(split_sets(ds.query_sets).val)[: args.n]
    queries = [query_text(by_id[i]) for i in ids]
    lm = BenchLM(resolve_policy("smollm2"))
    lm.clock = [0.0]
    runs = [tuple(r.split(":", 1)) for r in args.runs] + (
        [("greedy_b16", "xgrammar")] if args.xgrammar else []
    )
    for regime, variant in runs:
        if regime not in REGIMES or variant not in VARIANTS:
            raise SystemExit(
                f"--runs: unknown {regime}:{variant}; regimes {sorted(REGIMES)}, variants {sorted(VARIANTS)}"
            )
    example_items = {s.casefold() for s in prompt_mod._EXAMPLE_SUBQUERIES} | {
        s.casefold() for s in LEGACY_SUBQUERIES
    }
    grammar = xgrammar_grammar(lm, K, 60) if any(v == "xgrammar" for _, v in runs) else None
    lm.generate(queries[:1], k=K, max_new_tokens=4, batch_size=1)  # warm-up
    partial = RESULTS / f"{args.out}.partial.json"
    results: dict[str, dict[str, Any]] = (
        json.loads(partial.read_text()) if args.resume and partial.is_file() else {}
    )
    for regime, variant in runs:
        if variant in results.get(regime, {}):
            continue
        temperature, batch = REGIMES[regime]
        legacy, constrained, one_shot, use_xgr = VARIANTS[variant]
        lm.legacy, lm.xgrammar = legacy, (grammar if use_xgr else None)
        lm.clock[0] = 0.0
        constraint = FanOutConstraint(k=K) if constrained else None
        outs = lm.generate(
            queries, k=K, temperature=temperature, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch,
            seed=0, one_shot=one_shot, constrained=constraint or False, think=legacy,
        )  # fmt: skip
        r = summarise(queries, outs, lm.last_timing, constraint, example_items, lm.clock[0])
        r["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
        results.setdefault(regime, {})[variant] = r
        print(f"{regime} {variant}: usable {r['usable_subqueries']:.2f} none {r['no_subquery_rate']:.1%} "
              f"strict-fail {r['strict_format_failure_rate']:.1%} tok {r['tokens_per_answer']:.1f} "
              f"s/ans {r['seconds_per_answer']:.2f}", flush=True)  # fmt: skip
        RESULTS.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(results, indent=2) + "\n")
    extra = ("transformers", "trl", "tokenizers") + (("xgrammar",) if grammar is not None else ())
    payload = {
        "question": __doc__.split("\n")[0],
        "environment": environment(extra),
        "load_start": load_start,
        "n_queries": len(queries),
        "queries": queries,
        "k": K,
        "max_new_tokens": MAX_NEW_TOKENS,
        "constraint": dict(FanOutConstraint(k=K).__dict__),
        "threads": args.threads,
        "results": results,
    }
    write_results(args.out, payload, markdown(payload))
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
