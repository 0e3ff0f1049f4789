import json, sys
from r4t_fast import _threads
_threads.configure()
from r4t_fast.eval.evaluation import evaluate
from r4t_fast.eval.records import paired_difference
recs = {}
for one_shot in (True, False):
    recs[one_shot] = evaluate("llm-zeroshot", "polyvore", "val", limit=48, method_kwargs={"one_shot": one_shot, "max_new_tokens": 128, "batch_size": 8},
                              latency_batch_sizes=(), progress=False, method_name=f"llm-zeroshot-oneshot-{one_shot}")
    json.dump(recs[one_shot], open(f"benchmarks/results/rl_step/prompt_val/zeroshot_{'one_shot' if one_shot else 'short'}.json", "w"), default=str)
    m = recs[one_shot]["metrics"]; st = recs[one_shot].get("method_stats", {})
    print(one_shot, {k: m.get(k) for k in ("recall_at_fair", "vendi", "item_relevance")}, {k: st.get(k) for k in ("usable_subqueries", "copy_rate", "mean_new_tokens")}, flush=True)
for key in ("recall_at_fair", "vendi", "item_relevance"):
    print(key, "short - one-shot", paired_difference(recs[False], recs[True], key))
