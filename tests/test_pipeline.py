"""`r4t pipeline` end to end at the smoke preset: tiny random policy, hashing encoder, synthetic sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import make_tiny_policy, sets_jsonl
from r4t_fast.diffusion.options import query_budget_share
from r4t_fast.pipeline import DEFAULT_METHODS, PIPELINE_PRESETS, run_pipeline

ANSWER = '<queries>["red scarf", "black boots", "blue jacket"]</queries><|im_end|>'


def _parrot_policy(path: Path) -> Path:
    """The tiny random Llama, fitted for a few seconds to always answer ``ANSWER`` (so the pipeline's
    synthesis stage gets parseable fan-outs from a model that is still only a test fixture)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r4t_fast.fanout.prompt import build_messages

    make_tiny_policy(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rows = []
    for q in ("red outfit 1", "blue outfit 7", "grey outfit 12"):
        prompt = tok.apply_chat_template(
            build_messages(q, 3, one_shot=False), tokenize=False, add_generation_prompt=True
        )
        p_ids = tok(prompt)["input_ids"]
        a_ids = tok(ANSWER)["input_ids"]
        rows.append((torch.tensor([p_ids + a_ids]), len(p_ids)))
    model.train()
    for _ in range(60):
        for ids, n_prompt in rows:
            labels = ids.clone()
            labels[:, :n_prompt] = -100
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(path)
    return path


def test_pipeline_smoke_end_to_end_and_resume(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("R4T_CACHE_DIR", str(tmp_path / "cache"))
    policy = _parrot_policy(tmp_path / "tiny-policy")
    data = sets_jsonl(tmp_path / "sets.jsonl", n=40)
    out = tmp_path / "run"
    over = {
        "policy": str(policy),
        "rl": {
            "k": 3,
            "one_shot": False,
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_target_modules": ["q_proj", "v_proj"],
        },
        "synthesis": {"k": 3},
        # every test query for the fast methods, the first 3 for the LLM ones: exercises the same-queries rule
        "eval": {"limit": None, "llm_limit": 3},
        # the optional few-step stage, tolerance of its rule left at issue 12's
        "distill": {"steps": 2, "pool_size": 4, "teacher_steps": 2, "batch_size": 4, "warmup": 1},
    }
    rec = run_pipeline(
        str(data),
        out,
        preset="smoke",
        overrides=over,
        progress=False,
        methods=("r4t-diffusion", "r4t-diffusion-rows", "folm", "dense"),
    )
    assert set(rec["stages"]) == {"rl", "synthesis", "diffusion", "select", "distill", "eval", "report"}
    dis = json.loads((out / "distill.json").read_text())
    assert [r["steps"] for r in dis["rows"]] == [1, 2, 3, 4] and dis["reference"]["nfe"] == 7
    assert all(r["sampler"] == "consistency" and r["n_queries"] == 3 for r in dis["rows"])
    used = out / ("distilled" if dis["chosen"] else "diffusion")
    assert rec["r4t_diffusion_model"] == str(used) and (out / "distilled" / "retriever.json").is_file()
    assert (out / "rl" / "policy").is_dir()
    assert (out / "diffusion" / "retriever.json").is_file()
    assert not (out / "diffusion.checkpoint.pt").exists()  # the training checkpoint goes once it is saved
    recs = {
        m: json.loads((out / "eval" / f"{m}.json").read_text()) for m in ("r4t-diffusion", "folm", "dense")
    }
    # issue 18: the rows' retrieval loss and early stopping ran in the diffusion stage; the rows alone
    # (anchor 0) are evaluated beside the retriever, with the query's share of the budget recorded
    log = json.loads((out / "diffusion" / "config.json").read_text())["train_log"]
    assert [r["step"] for r in log if "select" in r] == [10, 20] and any("selected" in r for r in log)
    assert all(r["row_loss"] > 0 for r in log if "loss" in r)
    rows = json.loads((out / "eval" / "r4t-diffusion-rows.json").read_text())
    assert rows["method"] == "r4t-diffusion-rows" and rows["query_share_of_budget"] == 0.0
    anchor = json.loads((used / "retriever.json").read_text())["defaults"]["anchor"]
    assert recs["r4t-diffusion"]["query_share_of_budget"] == query_budget_share(anchor, 10)
    for m, r in recs.items():
        assert r["method"] == m and r["n_queries"] > 0 and "recall_at_fair" in r["metrics"]
        assert "row_composite" in r["metrics"] and "composite" not in r["metrics"]
    assert recs["folm"]["n_queries"] == 3 < recs["dense"]["n_queries"] == recs["r4t-diffusion"]["n_queries"]
    # per-method LLM latency settings (eval.llm_latency): the FOLM timed at batch 4 only
    assert set(recs["folm"]["latency_ms_per_query"]) == {"4"}
    assert set(recs["dense"]["latency_ms_per_query"]) == {"1", "8"}
    assert "latency_breakdown_ms" in recs["r4t-diffusion"]
    # every method is also scored on the LLM methods' queries, and the headline uses those
    for m in ("dense", "r4t-diffusion"):
        sub = json.loads((out / "eval" / "same-queries" / f"{m}.json").read_text())
        assert sub["query_ids_sha256"] == recs["folm"]["query_ids_sha256"] and sub["n_queries"] == 3
        assert sub["config"]["subset_of"]["query_ids_sha256"] == recs[m]["query_ids_sha256"]
    md = (out / "report" / "report.md").read_text()
    head = md[: md.index("## Appendix")]
    assert "3 queries" in head and "| r4t-diffusion | 3 |" in head and "| folm | 3 |" in head
    first_table = head[head.index("| method") :].split("\n\n")[0]
    assert "R@fair" in first_table.splitlines()[0] and "ms/query @8" in first_table.splitlines()[0]
    assert "Paired differences against **r4t-diffusion**" in head
    assert f"all {recs['dense']['n_queries']} test queries" in md
    # A second run resumes: every stage is skipped.
    rec2 = run_pipeline(
        str(data),
        out,
        preset="smoke",
        overrides=over,
        progress=False,
        methods=("r4t-diffusion", "folm", "dense"),
    )
    assert rec2["stages"]["rl"]["skipped"] == "exists"
    assert rec2["stages"]["diffusion"]["skipped"] == "exists"
    assert rec2["stages"]["distill"]["skipped"] == "exists"
    # ... and keeps the first run's record of what it skipped (its wall time)
    for name in ("rl", "synthesis", "diffusion"):
        assert rec2["stages"][name]["earlier_run"] == rec["stages"][name]
    saved = json.loads((out / "pipeline.json").read_text())["stages"]
    assert saved["diffusion"]["earlier_run"]["wall_s"] == rec["stages"]["diffusion"]["wall_s"] > 0


def test_pipeline_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"preset: unknown 'big'; valid choices: \['cpu-full', 'cpu-small', 'smoke'\]"
    ):
        run_pipeline("polyvore", tmp_path, preset="big")
    with pytest.raises(ValueError, match="methods: unknown"):
        run_pipeline("polyvore", tmp_path, preset="smoke", methods=("bm25",))
    assert set(PIPELINE_PRESETS) == {"cpu-full", "cpu-small", "smoke"}
    assert DEFAULT_METHODS[:7] == ("dense", "mmr", "dpp", "llm-zeroshot", "llm-bon", "folm", "r4t-diffusion")
    assert DEFAULT_METHODS[7:] == ("r4t-diffusion-rows",)  # issue 18: the rows alone, anchor 0


def test_every_presets_stage_settings_build_valid_configs() -> None:
    """A preset's rl / diffusion settings are fields of RLConfig / DiffusionTrainConfig with valid values
    (a renamed or mistyped field fails here, not after an hour of the pipeline)."""
    from r4t_fast.train.diffusion import DiffusionTrainConfig
    from r4t_fast.train.rl_config import RLConfig

    for name, preset in PIPELINE_PRESETS.items():
        rl = RLConfig(**preset["rl"])
        DiffusionTrainConfig(**preset["diffusion"])
        if name != "smoke":  # issue 19's throughput setting (benchmarks/results/rl_step/)
            assert (rl.num_generations, rl.prompts_per_step, rl.micro_batch) == (8, 8, 8)
            assert (rl.num_iterations, rl.lora_layers, rl.log_kl) == (1, 4, False)
