"""Tests for r4t_fast.rewards: hand-computed OAR/WSCR rewards on small synthetic catalogs (hashing
encoder), malformed completions, TRL's calling convention, batching (one encoder call per batch)."""

from __future__ import annotations

import doctest
import json
import math

import numpy as np
import pytest
import torch

from r4t_fast import ops
from r4t_fast.data.encoders import HashingEncoder
from r4t_fast.fanout import rewards as R

ITEMS = [
    "red wool scarf",
    "black leather boots",
    "blue denim jacket",
    "white linen shirt",
    "silver hoop earrings",
    "green canvas tote bag",
    "grey knit beanie",
    "brown suede loafers",
]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _vendi(x: np.ndarray) -> float:
    """Independent Vendi (cosine kernel) via numpy."""
    u = _unit(x.astype(np.float64))
    lam = np.clip(np.linalg.eigvalsh(u @ u.T / len(u)), 0.0, None)
    lam = lam[lam > 1e-15]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def _expected_oar(
    sub: list[str], query: str, enc: HashingEncoder, cat: np.ndarray, k: int
) -> dict[str, float]:
    """The OAR reward written out by hand: brute-force nearest item, numpy Vendi, plain cosines."""
    e = enc.encode(sub).astype(np.float64)
    q = enc.encode([query])[0].astype(np.float64)
    c = cat.astype(np.float64)
    dist = np.linalg.norm(e[:, None, :] - c[None, :, :], axis=-1)  # (n, N)
    top1 = np.argmax(e @ c.T, axis=1)  # dense retriever: inner product
    g = 1.0 - dist.min(axis=1).mean() / 2.0
    d = _vendi(c[top1]) / len(sub)
    a = (1.0 + (_unit(e) @ _unit(q[None])[0]).mean()) / 2.0
    r = len(sub) / k * (0.6 * g + 0.2 * d + 0.2 * a)
    return {"groundedness": g, "diversity": d, "alignment": a, "reward": r}


def _answer(subqueries: list[str]) -> str:
    return f"<think>short</think>\n<queries>{json.dumps(subqueries)}</queries>"


class CountingEncoder(HashingEncoder):
    def __init__(self, dim: int = 64) -> None:
        super().__init__(dim=dim)
        self.calls = 0

    def encode(self, texts, batch_size=64, show_progress=False):  # type: ignore[override]
        self.calls += 1
        return super().encode(texts, batch_size, show_progress)


@pytest.fixture
def setup() -> tuple[CountingEncoder, np.ndarray]:
    enc = CountingEncoder(dim=64)
    return enc, enc.encode(ITEMS)


def test_doctests() -> None:
    result = doctest.testmod(R)
    assert result.attempted >= 5
    assert result.failed == 0


def test_oar_reward_by_hand(setup) -> None:
    enc, cat = setup
    cases = [
        (["red scarf", "leather boots", "denim jacket"], "winter outfit"),
        (["silver earrings", "silver hoop earrings"], "silver jewelry"),
        (["tote bag"], "summer bag"),
    ]
    fn = R.RewardFunction(cat, enc, k=4, missing="zero")
    batch = fn.score([_answer(s) for s, _ in cases], [q for _, q in cases])
    for i, (sub, query) in enumerate(cases):
        want = _expected_oar(sub, query, enc, cat, k=4)
        for key, value in want.items():
            assert getattr(batch, key)[i] == pytest.approx(value, abs=1e-6), (i, key)
        assert batch.n_subqueries[i] == len(sub)
    assert batch.parse_ok.all() and not batch.format_ok.any()  # 3, 2, 1 of k = 4: not strict
    assert batch.summary()["no_subquery_rate"] == 0.0
    assert batch.summary()["strict_format_failure_rate"] == 1.0


def test_missing_rows_filled_with_the_query_by_hand(setup) -> None:
    """Default missing="query" (the r4t eval protocol): rows = written subqueries + the raw query."""
    enc, cat = setup
    cases = [
        (["red scarf", "leather boots"], "winter  outfit"),
        (["tote bag", "linen shirt", "beanie"], "x y"),
    ]
    fn = R.RewardFunction(cat, enc, k=4)
    assert fn.missing == "query"
    batch = fn.score([_answer(s) for s, _ in cases], [q for _, q in cases])
    for i, (sub, query) in enumerate(cases):
        rows = sub + [" ".join(query.split())] * (4 - len(sub))
        want = _expected_oar(rows, query, enc, cat, k=4)  # L = k rows, scale 1
        for key, value in want.items():
            assert getattr(batch, key)[i] == pytest.approx(value, abs=1e-6), (i, key)
        assert batch.n_subqueries[i] == len(sub)
    # copying ten off-topic strings does not beat writing the query's own subqueries
    off = ["autumn picnic plaid blanket", "autumn park knit sweater", "autumn picnic wicker basket"]
    on = ["red wool scarf", "red knit beanie", "red leather boots"]
    r = fn.score([_answer(off), _answer(on)], ["red winter outfit"] * 2).reward
    assert r[1] > r[0]


def test_oar_items_named_exactly(setup) -> None:
    """Subqueries equal to distinct item texts: groundedness 1, top-1 = the items themselves."""
    enc, cat = setup
    sub = ITEMS[:4]
    terms = R.oar_reward(enc.encode(sub)[None], enc.encode(["an outfit"]), cat, k=4)
    assert terms.groundedness[0] == pytest.approx(1.0, abs=1e-6)
    assert terms.diversity[0] == pytest.approx(_vendi(cat[:4]) / 4, abs=1e-9)
    assert terms.scale[0] == 1.0
    # the same four subqueries asked as 8: every term keeps its value, the reward halves
    half = R.oar_reward(enc.encode(sub)[None], enc.encode(["an outfit"]), cat, k=8)
    assert half.reward[0] == pytest.approx(terms.reward[0] / 2, abs=1e-12)
    ignore = R.oar_reward(enc.encode(sub)[None], enc.encode(["an outfit"]), cat, k=8, missing="ignore")
    assert ignore.reward[0] == pytest.approx(terms.reward[0], abs=1e-12)


def test_oar_weights_and_padding(setup) -> None:
    enc, cat = setup
    rows = np.zeros((2, 3, 64), dtype=np.float32)
    rows[0, :3] = enc.encode(["red scarf", "boots", "jacket"])
    rows[1, :1] = enc.encode(["linen shirt"])
    q = enc.encode(["a", "b"])
    terms = R.oar_reward(rows, q, cat, lengths=[3, 1], k=3, weights=(1.0, 0.0, 0.0))
    assert terms.reward[0] == pytest.approx(terms.groundedness[0], abs=1e-12)
    assert terms.reward[1] == pytest.approx(terms.groundedness[1] / 3, abs=1e-12)
    single = R.oar_reward(rows[1:, :1], q[1:], cat, k=3, weights=(1.0, 0.0, 0.0))
    assert single.reward[0] == pytest.approx(terms.reward[1], abs=1e-12)  # padding rows do not count
    assert terms.diversity[1] == pytest.approx(1.0)  # one item: Vendi 1 / n = 1 (hence the n/k factor)
    with pytest.raises(ValueError, match="lengths"):
        R.oar_reward(rows, q, cat, lengths=[0, 1])
    with pytest.raises(ValueError, match="lengths"):
        R.oar_reward(rows, q, cat, lengths=[3, 1], k=2)
    with pytest.raises(ValueError, match="weights"):
        R.oar_reward(rows, q, cat, weights=(1.0, 0.0))
    with pytest.raises(ValueError, match="missing"):
        R.oar_reward(rows, q, cat, missing="query")  # the query fill needs texts: RewardFunction does it


def test_wscr_coverage_by_hand(setup) -> None:
    enc, cat = setup
    fn = R.RewardFunction(cat, enc, task="wscr", k=3, budget_per_row=1, missing="zero")
    refs = [[0, 1, 2, 3], [4, 5], [6]]
    completions = [
        _answer(["red wool scarf", "black leather boots", "silver hoop earrings"]),  # items 0, 1, 4
        _answer(["green canvas tote bag"]),  # item 5
        "nothing usable here",
    ]
    batch = fn.score(completions, ["q1", "q2", "q3"], refs)
    assert batch.reward.tolist() == pytest.approx([2 / 4, 1 / 2, 0.0])
    assert batch.coverage.tolist() == pytest.approx([2 / 4, 1 / 2, 0.0])
    # larger budget: the union of each subquery's top-b items, computed by hand
    fn8 = R.RewardFunction(cat, enc, task="wscr", k=3, budget_per_row=3, missing="zero")
    sub = ["red wool scarf", "black leather boots"]
    batch8 = fn8.score([_answer(sub)], ["q"], [[0, 1, 2, 3, 7]])
    s = enc.encode(sub) @ cat.T
    union = {int(j) for row in np.argsort(-s, axis=1, kind="stable")[:, :3] for j in row}
    assert batch8.reward[0] == pytest.approx(len(union & {0, 1, 2, 3, 7}) / 5)
    assert R.wscr_coverage([np.array([[0, -1]])], [[0, 1]]).tolist() == [0.5]
    with pytest.raises(ValueError, match="references"):
        fn.score(completions, ["a", "b", "c"])  # wscr needs references


def test_malformed_completions_score_zero_and_are_counted(setup) -> None:
    enc, cat = setup
    fn = R.RewardFunction(cat, enc, k=3, missing="zero")
    good = [{"role": "assistant", "content": _answer(["red scarf", "boots", "tote bag"])}]
    completions = [
        good,
        [{"role": "assistant", "content": ""}],  # empty
        [{"role": "assistant", "content": "Sure! Here are some ideas for you."}],  # chatter, no list
        [{"role": "assistant", "content": "<queries>[</queries>"}],  # broken JSON, nothing usable
        [],  # no message at all
        [{"role": "assistant", "content": None}],  # no text
        None,
        12345,
        [{"role": "assistant", "content": '<queries>["' + "x" * 50_000}],  # huge, unterminated
    ]
    logged: dict[str, float] = {}
    out = fn(
        prompts=[[{"role": "user", "content": "q"}]] * len(completions),
        completions=completions,
        completion_ids=[[1, 2]] * len(completions),
        query=["winter outfit"] * len(completions),
        trainer_state=None,
        log_extra=lambda column, values: None,
        log_metric=lambda name, value: logged.__setitem__(name, value),
    )
    assert isinstance(out, list) and len(out) == len(completions) and all(isinstance(v, float) for v in out)
    assert out[0] > 0.0
    assert out[1:] == [0.0] * (len(completions) - 1)
    assert fn.last is not None and fn.last.parse_ok.tolist() == [True] + [False] * (len(completions) - 1)
    assert np.isnan(fn.last.groundedness[1:]).all()
    assert logged["r4t/no_subquery_rate"] == pytest.approx(8 / 9)
    assert logged["r4t/groundedness"] == pytest.approx(fn.last.groundedness[0])
    assert fn.totals == {"completions": 9, "no_subquery": 8, "strict_format_failures": 8}


def test_lenient_and_strict_format(setup) -> None:
    enc, cat = setup
    numbered = "Here you go:\n1. red scarf\n2. leather boots\n3. tote bag"
    lenient = R.RewardFunction(cat, enc, k=3)
    strict = R.RewardFunction(cat, enc, k=3, require_strict_format=True)
    a = lenient.score([numbered, _answer(["red scarf", "leather boots", "tote bag"])], ["x", "x"])
    b = strict.score([numbered, _answer(["red scarf", "leather boots", "tote bag"])], ["x", "x"])
    assert a.parse_ok.all() and a.format_ok.tolist() == [False, True]
    assert a.reward[0] == pytest.approx(a.reward[1])  # same subqueries, same reward
    assert b.reward[0] == 0.0 and b.reward[1] == pytest.approx(a.reward[1])


def test_one_encoder_call_and_batched_kernel_calls(setup, monkeypatch) -> None:
    enc, cat = setup
    fn = R.RewardFunction(cat, enc, k=3)
    calls: list[tuple[int, int]] = []
    real_knn = ops.knn

    def counting_knn(queries, catalog, k, **kw):
        calls.append((int(queries.shape[0]), int(k)))
        return real_knn(queries, catalog, k, **kw)

    monkeypatch.setattr(ops, "knn", counting_knn)
    group = [_answer(["red scarf", "boots", f"jacket {i}"]) for i in range(8)]
    enc.calls = 0
    fn.score(group, ["winter"] * 8)
    assert enc.calls == 1
    # one retrieval call (top-1 of all 24 subqueries) + one nearest-item call inside metrics.groundedness
    assert len(calls) == 2 and all(n == 24 for n, _ in calls)


def test_catalog_object_and_errors(setup) -> None:
    from r4t_fast import Catalog

    enc, cat = setup
    catalog = Catalog([f"i{j}" for j in range(len(ITEMS))], cat, texts=ITEMS)
    fn = R.RewardFunction(catalog, enc, k=2)
    fn_arr = R.RewardFunction(torch.from_numpy(cat), enc, k=2)
    c = [_answer(["red scarf", "boots"])]
    assert fn.score(c, ["x"]).reward[0] == pytest.approx(fn_arr.score(c, ["x"]).reward[0], abs=1e-6)
    with pytest.raises(ValueError, match="encoder"):
        R.RewardFunction(cat, HashingEncoder(dim=32))
    with pytest.raises(ValueError, match="task"):
        R.RewardFunction(cat, enc, task="both")
    with pytest.raises(ValueError, match="k"):
        R.RewardFunction(cat, enc, k=0)
    with pytest.raises(ValueError, match="catalog"):
        R.RewardFunction(np.zeros((0, 64), np.float32), enc)
    with pytest.raises(ValueError, match="queries"):
        fn.score(c, [])
    with pytest.raises(ValueError, match="query"):
        fn(prompts=["p"], completions=c)  # TRL call without the query column
    assert math.isnan(
        R.RewardBatch(*(np.zeros(0),) * 5, np.zeros(0, int), *(np.zeros(0, bool),) * 2, []).summary()[
            "reward"
        ]
    )
    assert fn.__name__ == "r4t_reward"


# ----------------------------------------------------------------------------------------------------
# task 'mixed', task 'auto' and build_reward (the one constructor RL and synthesis call)
# ----------------------------------------------------------------------------------------------------
def test_mixed_reward_is_the_weighted_sum_of_coverage_and_composite(setup) -> None:
    enc, cat = setup
    completions = [
        _answer(["red wool scarf", "black leather boots", "silver hoop earrings"]),
        _answer(["green canvas tote bag"]),
        "nothing usable here",
    ]
    queries, refs = ["winter look", "tote", "x"], [[0, 1, 2, 3], [4, 5], [6]]
    oar = R.RewardFunction(cat, enc, task="oar", k=3, budget_per_row=2).score(completions, queries, refs)
    wscr = R.RewardFunction(cat, enc, task="wscr", k=3, budget_per_row=2).score(completions, queries, refs)
    for w in (0.0, 0.3, 1.0):
        fn = R.build_reward("mixed", cat, enc, k=3, budget_per_row=2, mixed_weight=w)
        got = fn.score(completions, queries, refs).reward
        np.testing.assert_allclose(got, w * wscr.reward + (1 - w) * oar.reward, atol=1e-12)
    assert got[2] == 0.0  # a format failure scores 0 under every task
    with pytest.raises(ValueError, match="references"):
        R.build_reward("mixed", cat, enc, k=3).score(completions, queries)
    with pytest.raises(ValueError, match="mixed_weight"):
        R.build_reward("mixed", cat, enc, mixed_weight=1.5)


def test_auto_task_is_wscr_with_reference_sets_else_oar(setup) -> None:
    enc, cat = setup
    assert R.resolve_task("auto", [[0, 1], [2]]) == "wscr"
    assert R.resolve_task("auto", [[0, 1], []]) == "oar"  # one query without items: no coverage
    assert R.resolve_task("auto", None) == "oar"
    assert R.resolve_task("mixed", [[1]]) == "mixed"
    with pytest.raises(ValueError, match="task"):
        R.resolve_task("wscr", [[1], []])
    with pytest.raises(ValueError, match="task"):
        R.resolve_task("coverage", None)
    assert R.build_reward("auto", cat, enc, references=[[0]]).task == "wscr"
    assert R.build_reward("auto", cat, enc).task == "oar"
    with pytest.raises(ValueError, match="auto"):  # RewardFunction takes a resolved task only
        R.RewardFunction(cat, enc, task="auto")
    assert R.TASK_CHOICES == ("auto", "oar", "wscr", "mixed", "soft", "soft-mixed")


# ----------------------------------------------------------------------------------------------------
# issue 19: smooth coverage, copies of the title, the copy penalty
# ----------------------------------------------------------------------------------------------------
def _soft_by_hand(sub: list[str], enc: HashingEncoder, cat: np.ndarray, ref: list[int], b: int, tau: float):
    """Smooth coverage written out: each row's b-th best score by a full sort, sigmoid of the margins."""
    e = enc.encode(sub).astype(np.float64)
    s = e @ cat.astype(np.float64).T  # (n, N)
    boundary = np.sort(s, axis=1)[:, ::-1][:, b - 1]
    m = (s[:, ref] - boundary[:, None]) / tau
    return float((1.0 / (1.0 + np.exp(-m))).max(axis=0).mean())


def test_soft_coverage_matches_a_hand_computation_and_ranks_zero_coverage_completions(setup) -> None:
    enc, cat = setup
    k, b, tau = 2, 2, 0.05
    ref = [0, 1]  # red wool scarf, black leather boots
    near = ["red wool scarf hat", "brown suede loafers"]  # a row close to item 0
    far = ["grey knit beanie", "silver hoop earrings"]
    fn = R.build_reward("soft", cat, enc, k=k, budget_per_row=b, soft_tau=tau)
    batch = fn.score([_answer(near), _answer(far)], ["q one", "q two"], [ref, ref])
    for i, sub in enumerate((near, far)):
        assert batch.reward[i] == pytest.approx(_soft_by_hand(sub, enc, cat, ref, b, tau), abs=1e-6)
        assert batch.soft_coverage[i] == pytest.approx(batch.reward[i])
    assert 0.0 < batch.reward[1] < batch.reward[0]  # a gradient where hard coverage is flat
    hard = R.build_reward("wscr", cat, enc, k=k, budget_per_row=1).score([_answer(far)], ["q"], [ref])
    assert hard.reward[0] == 0.0
    mixed = R.build_reward("soft-mixed", cat, enc, k=k, budget_per_row=b, soft_tau=tau, mixed_weight=0.3)
    mb = mixed.score([_answer(near), _answer(far)], ["q one", "q two"], [ref, ref])
    np.testing.assert_allclose(mb.reward, 0.3 * batch.soft_coverage + 0.7 * mb.coverage, atol=1e-9)
    assert fn.last_seconds > 0.0
    with pytest.raises(ValueError, match="soft_tau"):
        R.build_reward("soft", cat, enc, soft_tau=0.0)
    with pytest.raises(ValueError, match="references"):
        fn.score([_answer(near)], ["q"])


def test_soft_coverage_tends_to_hard_coverage_as_tau_shrinks(setup) -> None:
    enc, cat = setup
    subs = [["blue denim jacket", "grey knit beanie"], ["white linen shirt", "red wool scarf"]]
    refs = [[2, 4], [3, 0, 7]]
    comps, queries = [_answer(s) for s in subs], ["a b", "c d"]
    hard = R.build_reward("wscr", cat, enc, k=2, budget_per_row=3).score(comps, queries, refs).reward
    soft = R.build_reward("soft", cat, enc, k=2, budget_per_row=3, soft_tau=1e-6).score(comps, queries, refs)
    np.testing.assert_allclose(soft.reward, hard, atol=1e-6)


def test_copies_of_the_title_are_counted_and_penalised(setup) -> None:
    enc, cat = setup
    title = "Red Wool Scarf"
    sub = ["red wool scarf with", "black leather boots", "RED-wool scarf", "wool scarf"]
    k = 4
    plain = R.build_reward("oar", cat, enc, k=k).score([_answer(sub)], [title])
    assert plain.n_copies.tolist() == [2]  # text rule: the first and the third contain the title
    assert plain.summary()["copy_rate"] == pytest.approx(2 / 4)
    pen = R.build_reward("oar", cat, enc, k=k, copy_penalty=0.5).score([_answer(sub)], [title])
    assert pen.reward[0] == pytest.approx(plain.reward[0] - 0.5 * 2 / k)
    # the cosine rule: the hashing encoder embeds "scarf red wool" exactly as the title (same tokens)
    cos = R.build_reward("oar", cat, enc, k=2).score(
        [_answer(["scarf red wool", "blue denim jacket"])], [title]
    )
    assert cos.n_copies.tolist() == [1]
    with pytest.raises(ValueError, match="copy_penalty"):
        R.build_reward("oar", cat, enc, copy_penalty=2.0)


def test_copy_mask_rules() -> None:
    from r4t_fast.fanout.copies import copy_mask, normalise_text

    assert normalise_text("Boho-Chic  SUMMER!") == "boho chic summer"
    assert copy_mask(["summery dress", "summer dress"], "summer").tolist() == [False, True]  # whole words
    e = np.array([[1.0, 0.0], [0.95, np.sqrt(1 - 0.95**2)], [0.94, np.sqrt(1 - 0.94**2)]])
    assert copy_mask(["x", "y", "z"], "t", e, np.array([1.0, 0.0])).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="title_emb"):
        copy_mask(["x"], "t", e[:1])
