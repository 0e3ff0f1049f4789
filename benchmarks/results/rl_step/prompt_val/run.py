"""Zero-shot SmolLM2 on 48 Polyvore val queries with and without the worked example in the prompt (the
RL prompt's `one_shot`), same queries, paired CIs. Run from the repository root:
`python benchmarks/results/rl_step/prompt_val/run.py` (about 3 minutes on 2 cores)."""

import json
from pathlib import Path

from r4t_fast import _threads

_threads.configure()
from r4t_fast.eval.evaluation import evaluate  # noqa: E402
from r4t_fast.eval.records import paired_difference  # noqa: E402

HERE = Path(__file__).resolve().parent
LLM = {"max_new_tokens": 128, "batch_size": 8}
recs = {}
for one_shot in (True, False):
    name = "one_shot" if one_shot else "short"
    recs[one_shot] = evaluate(
        "llm-zeroshot",
        "polyvore",
        "val",
        limit=48,
        method_kwargs={"one_shot": one_shot, **LLM},
        latency_batch_sizes=(),
        progress=False,
        method_name=f"llm-zeroshot-oneshot-{one_shot}",
    )
    (HERE / f"zeroshot_{name}.json").write_text(json.dumps(recs[one_shot], default=str))
    m, st = recs[one_shot]["metrics"], recs[one_shot].get("method_stats", {})
    print(one_shot, {k: m.get(k) for k in ("recall_at_fair", "vendi", "item_relevance")}, flush=True)
    print({k: st.get(k) for k in ("usable_subqueries", "copy_rate", "mean_new_tokens")}, flush=True)
for key in ("recall_at_fair", "vendi", "item_relevance"):
    print(key, "short - one-shot", paired_difference(recs[False], recs[True], key))
