"""Tests for r4t_fast.fanout: LLM fan-out baselines on a tiny catalog (hashing encoder).

The policy is either a scripted test double (exact control over completions) or a tiny randomly
initialised Llama with a byte-level tokenizer and a ChatML template, built offline in a temp dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import make_tiny_policy
from r4t_fast import Catalog
from r4t_fast.data.encoders import HashingEncoder
from r4t_fast.eval.baselines import get_baseline
from r4t_fast.eval.llm_baselines import BestOfNBaseline, LLMFanOutBaseline
from r4t_fast.fanout.generation import GenerationOutput
from r4t_fast.fanout.missing import MISSING_ROW_RULE, fill_missing_rows
from r4t_fast.fanout.parser import parse_subqueries

COLORS = ["red", "blue", "green", "black", "white", "pink"]
KINDS = ["dress", "jeans", "sneakers", "handbag", "scarf", "jacket", "sandals"]


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_policy(
        tmp_path_factory.mktemp("tiny_policy"),
        hidden_size=16,
        num_hidden_layers=1,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def world() -> tuple[Catalog, HashingEncoder]:
    enc = HashingEncoder(dim=32)
    texts = [f"{c} {k}" for c in COLORS for k in KINDS]
    cat = Catalog(
        [f"i{j}" for j in range(len(texts))], enc.encode(texts), texts, [t.split()[1] for t in texts]
    )
    return cat, enc


def _answer(queries: list[str], k: int) -> str:
    return f"<think>x</think>\n<queries>{json.dumps(queries[:k])}</queries>"


class ScriptedLM:
    """Returns ``script(query, sample)`` as the completion; records the calls."""

    def __init__(self, script) -> None:
        self.script = script
        self.calls: list[dict] = []
        self.last_timing = None

    def generate(self, queries, k=10, num_samples=1, temperature=0.0, **kwargs):
        self.calls.append({"queries": list(queries), "k": k, "n": num_samples, "t": temperature, **kwargs})
        out = []
        for q in queries:
            row = []
            for s in range(num_samples):
                text = self.script(q, s)
                p = parse_subqueries(text, k)
                row.append(GenerationOutput(text, p.queries, p.ok, 5, True, p))
            out.append(row)
        return out


def test_scripted_fanout_grounds_distinct_items_and_candidates(world) -> None:
    cat, enc = world
    lm = ScriptedLM(lambda q, s: _answer(["red dress", "blue jeans", "green scarf", "black sandals"], 4))
    base = LLMFanOutBaseline(cat, enc, policy=lm, k=4)
    res = base.retrieve(["party outfit", "weekend look"], 4, n_candidates=6)
    assert len(res) == 2
    for r in res:
        assert r.item_indices.shape == (4,) and r.item_indices.dtype == np.int64
        assert len(set(r.item_indices.tolist())) == 4
        assert r.row_embeddings.shape == (4, 32) and r.row_embeddings.dtype == np.float32
        assert r.candidates is not None and r.candidates.shape == (4, 6)
        # each subquery is exactly an item text: grounding picks that item, first candidate too
        got = [cat.texts[i] for i in r.item_indices]
        assert got == ["red dress", "blue jeans", "green scarf", "black sandals"]
        assert [cat.texts[c] for c in r.candidates[:, 0]] == got
        np.testing.assert_allclose(r.row_embeddings, enc.encode(got), atol=1e-6)
    st = base.stats
    assert st["n_completions"] == 2 and st["n_strict_format_failures"] == 0 and st["n_missing_rows"] == 0
    assert st["usable_subqueries"] == 4 and st["no_subquery_rate"] == 0
    assert lm.calls[0]["k"] == 4 and lm.calls[0]["t"] == 0.0


def test_forbid_title_reaches_the_constraint(world) -> None:
    from r4t_fast.fanout.constrained import FanOutConstraint

    cat, enc = world
    lm = ScriptedLM(lambda q, s: _answer(["red dress", "blue jeans"], 2))
    LLMFanOutBaseline(cat, enc, policy=lm, k=2).retrieve(["party outfit"], 2)
    assert lm.calls[-1]["constrained"] is True  # default: the plain constraint
    base = LLMFanOutBaseline(cat, enc, policy=lm, k=2, forbid_title=True)
    base.retrieve(["party outfit"], 2)
    c = lm.calls[-1]["constrained"]
    assert isinstance(c, FanOutConstraint) and c.forbid_title and c.k == 2 and c.think is False
    assert base.config()["forbid_title"] is True
    with pytest.raises(ValueError, match="forbid_title"):
        LLMFanOutBaseline(cat, enc, policy=lm, forbid_title=True, constrained=False)
    with pytest.raises(ValueError, match="forbid_title"):
        LLMFanOutBaseline(cat, enc, policy=lm, forbid_title="yes")


def test_short_and_malformed_outputs_get_the_raw_query_for_missing_rows(world) -> None:
    cat, enc = world
    scripts = {"short": _answer(["pink handbag"], 3), "garbage": "I cannot help with that."}
    lm = ScriptedLM(lambda q, s: scripts[q])
    base = LLMFanOutBaseline(cat, enc, policy=lm, k=3)
    short, garbage = base.retrieve(["short", "garbage"], 3)
    qe = enc.encode(["short", "garbage"])
    np.testing.assert_allclose(short.row_embeddings[0], enc.encode(["pink handbag"])[0], atol=1e-6)
    np.testing.assert_allclose(short.row_embeddings[1:], np.repeat(qe[:1], 2, 0), atol=1e-6)
    np.testing.assert_allclose(garbage.row_embeddings, np.repeat(qe[1:], 3, 0), atol=1e-6)
    # repeated raw-query rows still ground to distinct items
    assert len(set(garbage.item_indices.tolist())) == 3
    st = base.stats  # one meaning per word (issue 10)
    assert st["n_completions"] == 2
    assert st["n_strict_format_failures"] == 2  # short list and no list at all break the strict format
    assert st["strict_format_failure_rate"] == 1.0
    assert st["n_no_subquery"] == 1 and st["no_subquery_rate"] == 0.5  # only "garbage" has none
    assert st["usable_subqueries"] == pytest.approx(0.5)  # (1 + 0) / 2 completions
    assert st["n_missing_rows"] == 2 + 3 and st["n_rows"] == 6
    assert st["missing_row_rate"] == pytest.approx(5 / 6)
    assert not {"format_failure_rate", "fallback_row_rate", "parse_failure_rate"} & set(st)
    base.reset_stats()
    assert base.stats["n_completions"] == 0
    fan = base.fan_out(["short"], 3)[0][0]
    assert fan.rows == ["pink handbag", "short", "short"] and fan.n_generated == 1 and not fan.format_ok
    assert fan.rows == fill_missing_rows(["pink handbag"], "short", 3)
    assert base.config()["missing_rows"] == MISSING_ROW_RULE


def test_the_one_missing_row_rule() -> None:
    assert fill_missing_rows(["a", "b"], " big   query ", 4) == ["a", "b", "big query", "big query"]
    assert fill_missing_rows([], "q", 3) == ["q", "q", "q"]
    assert fill_missing_rows(["a", "b", "c"], "q", 2) == ["a", "b"]
    assert fill_missing_rows(("a",), "q", 1) == ["a"]
    with pytest.raises(ValueError, match="^k:"):
        fill_missing_rows(["a"], "q", 0)
    with pytest.raises(ValueError, match="^query:"):
        fill_missing_rows(["a"], "  ", 2)
    with pytest.raises(ValueError, match="^subqueries:"):
        fill_missing_rows("abc", "q", 2)


def test_rl_reward_uses_the_missing_row_rule(world) -> None:
    """RewardFunction(missing="query") scores exactly the rows fill_missing_rows builds."""
    from r4t_fast import objectives
    from r4t_fast.fanout.rewards import RewardFunction

    cat, enc = world
    fn = RewardFunction(cat, enc, k=3, missing="query")
    batch = fn.score([_answer(["pink handbag"], 3)], ["winter  walk"])
    rows = enc.encode(fill_missing_rows(["pink handbag"], "winter  walk", 3))
    assert batch.groundedness[0] == pytest.approx(float(objectives.groundedness(rows, cat.embeddings)))
    q = enc.encode(["winter  walk"])[0]
    assert batch.alignment[0] == pytest.approx(float(objectives.alignment(rows, q)), abs=1e-6)
    summary = batch.summary()
    assert summary["usable_subqueries"] == 1.0 and summary["no_subquery_rate"] == 0.0
    assert summary["strict_format_failure_rate"] == 1.0  # a short list breaks the strict format


def test_synthesis_uses_the_missing_row_rule(world) -> None:
    """Synthesis pads a short fan-out with the raw query (not by cycling its subqueries)."""
    from r4t_fast.train.synthesis import SynthesisConfig, synthesize_queries

    cat, enc = world
    lm = ScriptedLM(lambda q, s: _answer(["pink handbag"], 3))
    cfg = SynthesisConfig(samples=1, k=3, min_subqueries=1)
    tensors, counts = synthesize_queries(["winter walk"], lm, enc, cat, cfg, seed=0)
    assert counts["kept"] == 1
    want = enc.encode(fill_missing_rows(["pink handbag"], "winter walk", 3))
    np.testing.assert_allclose(tensors["targets_subqueries"][0].numpy(), want, atol=1e-6)


def test_best_of_n_picks_the_highest_composite_reward(world) -> None:
    cat, enc = world
    good = ["red dress", "blue jeans", "green scarf", "white sneakers"]  # grounded, diverse
    bad = ["zzqx", "zzqx two", "zzqx three", "zzqx four"]  # ungrounded nonsense
    lm = ScriptedLM(lambda q, s: _answer(good if s == 2 else bad, 4))
    bon = BestOfNBaseline(cat, enc, policy=lm, k=4, n=3, temperature=0.9)
    (res,) = bon.retrieve(["colourful outfit"], 4, n_candidates=2)
    assert lm.calls[0]["n"] == 3 and lm.calls[0]["t"] == 0.9
    assert bon.last_rewards is not None and bon.last_rewards.shape == (1, 3)
    assert int(np.argmax(bon.last_rewards[0])) == 2
    assert [cat.texts[i] for i in res.item_indices] == good
    assert res.candidates is not None and res.candidates.shape == (4, 2)
    assert bon.stats["n_completions"] == 3
    cfg = bon.config()
    assert cfg["n"] == 3 and cfg["weights"] == [0.6, 0.2, 0.2]


def test_generation_batches_are_queries_times_samples(world) -> None:
    cat, enc = world
    lm = ScriptedLM(lambda q, s: _answer(["red dress", "blue jeans"], 2))
    bon = BestOfNBaseline(cat, enc, policy=lm, k=2, n=2, batch_size=2)
    bon.retrieve(["a", "b", "c"], 2)
    assert [c["queries"] for c in lm.calls] == [["a", "b"], ["c"]]
    assert [c["batch_size"] for c in lm.calls] == [4, 2]
    lm.calls.clear()
    bon.max_sequences = 3
    bon.retrieve(["a", "b"], 2)
    assert [c["batch_size"] for c in lm.calls] == [3]


def test_bad_arguments_name_the_argument(world) -> None:
    cat, enc = world
    lm = ScriptedLM(lambda q, s: _answer(["red dress"], 1))
    with pytest.raises(ValueError, match="temperature"):
        BestOfNBaseline(cat, enc, policy=lm, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        LLMFanOutBaseline(cat, enc, policy=lm, temperature=-1.0)
    with pytest.raises(ValueError, match="k:"):
        LLMFanOutBaseline(cat, enc, policy=lm, k=65)
    with pytest.raises(ValueError, match="n:"):
        BestOfNBaseline(cat, enc, policy=lm, n=0)
    with pytest.raises(ValueError, match="policy"):
        LLMFanOutBaseline(cat, enc, policy=42)
    with pytest.raises(ValueError, match="unknown policy"):
        LLMFanOutBaseline(cat, enc, policy="gpt-17")
    base = LLMFanOutBaseline(cat, enc, policy=lm)
    with pytest.raises(ValueError, match="query_texts"):
        base.retrieve(["ok", "  "], 2)
    with pytest.raises(ValueError, match="k:"):
        base.retrieve(["ok"], 0)
    with pytest.raises(ValueError, match="k:"):
        base.retrieve(["ok"], len(cat) + 1)


def test_tiny_llama_policy_end_to_end(world, tiny_policy: Path) -> None:
    cat, enc = world
    base = get_baseline(
        "llm-zeroshot", catalog=cat, encoder=enc, policy=str(tiny_policy), max_new_tokens=6, constrained=False
    )
    assert isinstance(base, LLMFanOutBaseline) and base.name == "llm-zeroshot"
    res = base.retrieve(["summer beach", "rainy office day"], 3, n_candidates=4)
    assert [r.item_indices.shape for r in res] == [(3,), (3,)]
    assert all(len(set(r.item_indices.tolist())) == 3 for r in res)
    st = base.stats
    assert st["n_completions"] == 2 and st["generated_tokens"] > 0
    # a random model writes no parseable list in 6 tokens: every row is the raw query
    assert st["n_missing_rows"] == 6 and st["n_strict_format_failures"] == 2 and st["n_no_subquery"] == 2
    folm = LLMFanOutBaseline(cat, enc, policy=str(tiny_policy), name="folm", max_new_tokens=4)
    assert folm.name == "folm" and folm.config()["policy"] == str(tiny_policy.resolve())


def test_a_tuned_policy_is_prompted_as_it_was_tuned(world, tiny_policy: Path, tmp_path: Path) -> None:
    """A policy whose r4t_policy.json says it was tuned without the worked example is prompted without
    it by FanOutLM and the FOLM baseline unless asked otherwise; other models keep the example; a bad
    r4t_policy.json is refused naming model_dir."""
    import shutil

    from r4t_fast.fanout.generation import FanOutLM

    cat, enc = world
    pol = tmp_path / "short"
    shutil.copytree(tiny_policy, pol)
    (pol / "r4t_policy.json").write_text(json.dumps({"steps": 2, "config": {"one_shot": False}}))
    lm = FanOutLM(pol)
    assert lm.one_shot is False and FanOutLM(tiny_policy).one_shot is True
    short, full = lm.prompt_text("city walk", 4), lm.prompt_text("city walk", 4, one_shot=True)
    assert len(short) < len(full) and full == FanOutLM(tiny_policy).prompt_text("city walk", 4)
    folm = LLMFanOutBaseline(cat, enc, policy=str(pol), name="folm")
    assert folm.one_shot is False and folm.config()["one_shot"] is False
    assert LLMFanOutBaseline(cat, enc, policy=str(pol), one_shot=True).config()["one_shot"] is True
    scripted = ScriptedLM(lambda q, s: _answer(["red dress", "blue jeans"], 2))
    scripted.one_shot = False
    LLMFanOutBaseline(cat, enc, policy=scripted, k=2).retrieve(["a"], 2)
    assert scripted.calls[0]["one_shot"] is False
    (pol / "r4t_policy.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_dir"):
        FanOutLM(pol)
    (pol / "r4t_policy.json").write_text(json.dumps({"config": {"one_shot": "no"}}))
    with pytest.raises(ValueError, match="one_shot"):
        FanOutLM(pol)
    with pytest.raises(ValueError, match="one_shot"):
        LLMFanOutBaseline(cat, enc, policy=scripted, one_shot="yes")


def test_tiny_llama_constrained_by_default(world, tiny_policy: Path) -> None:
    """The LLM baselines decode constrained (think off) by default: even a random model writes k usable
    subqueries; a cap below the constraint's minimum is raised to it with a warning."""
    from r4t_fast.fanout.constrained import FanOutConstraint

    cat, enc = world
    base = LLMFanOutBaseline(cat, enc, policy=str(tiny_policy), max_new_tokens=6)
    assert base.config()["constrained"] is True and base.config()["think"] is False
    with pytest.warns(UserWarning, match="max_new_tokens"):
        base.retrieve(["summer beach", "rainy office day"], 3)
    need = FanOutConstraint(k=3).min_new_tokens(base.lm.tokenizer)
    assert base.config()["max_new_tokens"] == need
    st = base.stats
    assert st["usable_subqueries"] == 3.0 and st["no_subquery_rate"] == 0.0
    assert st["strict_format_failure_rate"] == 0.0 and st["n_missing_rows"] == 0
    bon = BestOfNBaseline(cat, enc, policy=base.lm, n=2, max_new_tokens=need, think=True)
    bon.retrieve(["city walk"], 2)
    assert bon.stats["usable_subqueries"] == 2.0 and bon.config()["think"] is True


def test_constrained_and_think_reach_generate(world) -> None:
    cat, enc = world
    lm = ScriptedLM(lambda q, s: _answer(["red dress", "blue jeans"], 2))
    LLMFanOutBaseline(cat, enc, policy=lm, k=2).retrieve(["a"], 2)
    BestOfNBaseline(cat, enc, policy=lm, k=2, n=2, constrained=False).retrieve(["a"], 2)
    assert [(c["constrained"], c["think"]) for c in lm.calls] == [(True, False), (False, True)]
    with pytest.raises(ValueError, match="constrained"):
        LLMFanOutBaseline(cat, enc, policy=lm, constrained="yes")
    with pytest.raises(ValueError, match="think"):
        LLMFanOutBaseline(cat, enc, policy=lm, think=1)


def test_tiny_llama_best_of_n(world, tiny_policy: Path) -> None:
    cat, enc = world
    bon = get_baseline(
        "llm-bon", catalog=cat, encoder=enc, policy=str(tiny_policy), n=2, max_new_tokens=4, constrained=False
    )
    assert isinstance(bon, BestOfNBaseline)
    (res,) = bon.retrieve(["city walk"], 2)
    assert res.item_indices.shape == (2,) and bon.last_rewards.shape == (1, 2)
    assert np.isfinite(bon.last_rewards).all()


def test_copy_rate_counts_generated_rows_that_copy_the_query(world) -> None:
    """Issue 19: copy_rate beside usable_subqueries in method_stats; fill rows are not counted."""
    cat, enc = world
    scripts = {
        "red dress": _answer(["red dress with", "blue jeans", "dress red"], 4),  # text rule; cosine rule
        "pink scarf": _answer(["green sandals"], 4),  # 3 fill rows (= the query) are not copies
    }
    base = LLMFanOutBaseline(cat, enc, policy=ScriptedLM(lambda q, s: scripts[q]), k=4)
    base.retrieve(list(scripts), 4)
    st = base.stats
    assert st["n_copies"] == 2 and st["usable_subqueries"] == 2.0
    assert st["copy_rate"] == pytest.approx(2 / 4)
    bon = BestOfNBaseline(cat, enc, policy=ScriptedLM(lambda q, s: scripts[q]), k=4, n=3)
    bon.retrieve(["red dress"], 4)
    assert bon.stats["n_copies"] == 3 * 2 and bon.stats["copy_rate"] == pytest.approx(6 / 9)
