"""Retrieval-time settings chosen on the validation split (r4t_fast.eval.selection)."""

from __future__ import annotations

import pytest
import torch

from helpers import sets_jsonl
from r4t_fast.data.prepare import load_eval_data
from r4t_fast.diffusion.model import SetDenoiser, get_preset
from r4t_fast.diffusion.options import query_budget_share
from r4t_fast.diffusion.retriever import Retriever
from r4t_fast.diffusion.samplers import nfe
from r4t_fast.eval.selection import choose_by_rails, select_retrieval_settings


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sel")
    data = load_eval_data(
        sets_jsonl(root / "sets.jsonl", n=60), encoder="hashing:32", cache_dir=root / "cache", progress=False
    )
    torch.manual_seed(0)
    model = SetDenoiser(get_preset("tiny", dim=data.catalog.dim, cond_dim=data.catalog.dim)).eval()
    with torch.no_grad():  # zero-initialised output layers would make every sample trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return data, Retriever(model, data.catalog, data.encoder, encoder_spec="hashing:32")


def test_choice_follows_the_rule_and_is_applied(setup) -> None:
    data, r = setup
    grid = (("heun", 4), ("dpmpp_2m", 2), ("euler", 1))
    res = select_retrieval_settings(
        r,
        data,
        anchors=(0.0, 0.3),
        guidances=(0.0,),
        pulls=(0.0, 0.5),
        grid=grid,
        tolerance=(0.0, 0.0, 0.0),
        progress=False,
    )
    rows = res["rows"]
    # four quality settings at the reference, the rest of the grid, then bf16 at the chosen point
    assert len(rows) == 4 + 2 + 1
    assert {(x["anchor"], x["pull"]) for x in rows[:4]} == {(a, p) for a in (0.0, 0.3) for p in (0.0, 0.5)}
    assert all(x["precision"] == "fp32" for x in rows[:6]) and rows[6]["precision"] == "bf16"
    ref = res["reference"]
    assert ref["recall_at_fair"] == max(x["recall_at_fair"] for x in rows[:4])
    assert all(x["pull"] == ref["pull"] for x in rows[4:])
    # tolerance 0: every grid point qualifies, so the fewest network evaluations wins, then bf16
    assert res["chosen"]["sampler"] == "euler" and res["chosen"]["steps"] == 1
    assert {k: rows[6][k] for k in ("sampler", "steps", "anchor", "pull")} == {
        k: res["chosen"][k] for k in ("sampler", "steps", "anchor", "pull")
    }
    assert res["chosen"]["precision"] == "bf16" and "precision bf16" in res["rule"]
    assert res["chosen"]["anchor"] == ref["anchor"]
    assert {k: r.defaults[k] for k in res["chosen"]} == res["chosen"]
    assert all(x["nfe"] == nfe(x["sampler"], x["steps"]) for x in rows)
    assert res["split"] == "val" and all(x["n_queries"] > 0 for x in rows)


@pytest.fixture(scope="module")
def euler_vs_heun(setup):
    """The fixture decides both branches: the euler-1 point's metrics against the heun-4 reference on
    this model, and a tolerance each side of the euler point's worst ratio (it must be below 1 on some
    metric: otherwise no strict tolerance could refuse it and the test would test one branch only)."""
    data, r = setup
    kw = dict(anchors=(0.0,), guidances=(0.0,), grid=(("heun", 4), ("euler", 1)), apply=False, progress=False)
    res = select_retrieval_settings(r, data, tolerance=(0.0, 0.0, 0.0), **kw)
    ref, euler = res["reference"], res["rows"][1]
    ratios = [euler[m] / ref[m] for m in ("recall_at_fair", "vendi", "item_relevance")]
    worst = min(range(3), key=lambda i: ratios[i])
    assert ratios[worst] < 1.0, f"the euler point ties or beats the reference on every metric: {ratios}"
    fails = [0.0, 0.0, 0.0]
    fails[worst] = min(1.0, (ratios[worst] + 1.0) / 2)  # strictly above the euler point's ratio
    meets = [max(0.0, x - 1e-3) for x in [min(1.0, ratio) for ratio in ratios]]
    return data, r, kw, tuple(meets), tuple(fails)


@pytest.mark.parametrize("branch", ["meets", "fails"])
def test_tolerance_decides_between_reference_and_cheaper_point(euler_vs_heun, branch) -> None:
    data, r, kw, meets, fails = euler_vs_heun
    before = dict(r.defaults)
    tol = meets if branch == "meets" else fails
    res = select_retrieval_settings(r, data, tolerance=tol, **kw)
    assert r.defaults == before  # apply=False leaves the retriever alone
    euler = res["rows"][1]
    assert (euler["sampler"], euler["steps"]) == ("euler", 1)
    if branch == "meets":  # the cheaper point qualifies: it is chosen
        assert euler["meets_tolerance"] is True
        assert (res["chosen"]["sampler"], res["chosen"]["steps"]) == ("euler", 1)
    else:  # it misses one metric: the reference stays
        assert euler["meets_tolerance"] is False
        assert (res["chosen"]["sampler"], res["chosen"]["steps"]) == ("heun", 4)


def test_bad_arguments(setup) -> None:
    data, r = setup
    with pytest.raises(ValueError, match="split"):
        select_retrieval_settings(r, data, split="test", progress=False)
    with pytest.raises(ValueError, match="tolerance"):
        select_retrieval_settings(r, data, tolerance=(1.5, 1.0, 1.0), progress=False)
    with pytest.raises(ValueError, match="grid"):
        select_retrieval_settings(r, data, grid=(), progress=False)
    with pytest.raises(ValueError, match="precisions"):
        select_retrieval_settings(r, data, precisions=("fp32", "fp16"), progress=False)


def test_defaults_restored_when_scoring_fails(setup) -> None:
    data, r = setup
    before = dict(r.defaults)
    with pytest.raises(ValueError):
        select_retrieval_settings(r, data, grid=(("nosuch", 2),), guidances=(0.0,), anchors=(0.0,))
    assert r.defaults == before


def test_select_distilled_follows_the_rule(setup) -> None:
    from r4t_fast.eval.selection import select_distilled

    data, r = setup
    base = select_retrieval_settings(
        r, data, anchors=(0.3,), guidances=(0.0,), grid=(("heun", 4),), apply=False, progress=False
    )
    ref = base["reference"]
    before = dict(r.defaults)
    res = select_distilled(r, data, ref, steps=(2, 1), tolerance=(0.0, 0.0, 0.0), progress=False)
    assert [x["steps"] for x in res["rows"]] == [1, 2]  # fewest first
    assert res["chosen"] == {
        "sampler": "consistency",
        "steps": 1,
        "guidance": 0.0,
        "anchor": 0.3,
        "pull": 0.0,
        "candidate_pull": None,
        "precision": "fp32",
        "candidate_layout": "rows",
        "deep_share": None,
    }
    assert {k: r.defaults[k] for k in res["chosen"]} == res["chosen"]
    assert all(x["n_queries"] == ref["n_queries"] and x["nfe"] == x["steps"] for x in res["rows"])
    r.defaults.clear()
    r.defaults.update(before)
    unreachable = {**ref, "recall_at_fair": 2.0, "vendi": 99.0, "item_relevance": 2.0}
    res = select_distilled(r, data, unreachable, steps=(1,), progress=False)
    assert res["chosen"] is None and r.defaults == before and res["rows"][0]["meets_tolerance"] is False
    with pytest.raises(ValueError, match="split"):
        select_distilled(r, data, ref, split="test", progress=False)
    with pytest.raises(ValueError, match="reference: .*missing"):
        select_distilled(r, data, {"vendi": 1.0}, progress=False)
    with pytest.raises(ValueError, match="steps"):
        select_distilled(r, data, ref, steps=(), progress=False)


# -- issue 18's rule: the quality setting within guard rails against dense kNN and MMR -----------------
def _select(setup, rails):
    data, r = setup
    return select_retrieval_settings(
        r, data, anchors=(0.0, 0.3, 0.5), guidances=(0.0,), pulls=(0.0, 0.5), grid=(("heun", 2),),
        rule="rails", rails=rails, apply=False, progress=False,
    )  # fmt: skip


def test_rails_pick_the_best_recall_among_the_settings_within_them(setup) -> None:
    res = _select(setup, (0.05, 0.2, -0.5))
    dense, mmr = res["baselines"]["dense"], res["baselines"]["mmr"]
    assert mmr["kwargs"] == {"lambda_": 0.9} and dense["n_queries"] == res["rows"][0]["n_queries"]
    ok = [
        x
        for x in res["rows"]
        if x["recall_at_fair"] >= dense["recall_at_fair"] - 0.05
        and x["item_relevance"] >= dense["item_relevance"] - 0.2
        and x["vendi"] >= mmr["vendi"] - 0.5
    ]
    assert ok, "the fixture should leave some setting within these rails"
    assert res["reference"]["recall_at_fair"] == max(x["recall_at_fair"] for x in ok)
    assert res["reference"] in ok and "dense - 0.05" in res["rule"]


def test_without_a_setting_within_the_rails_recall_plus_vendi_decides(setup) -> None:
    res = _select(setup, (-1.0, 0.0, 0.0))  # recall >= dense + 1: impossible
    assert "tier 'none'" in res["rule"]
    best = max(res["rows"], key=lambda x: x["recall_at_fair"] + x["vendi"] / 100)
    assert res["reference"] == best


def _row(r: float, rel: float, v: float, deep: float) -> dict[str, float]:
    return {"recall_at_fair": r, "item_relevance": rel, "vendi": v, "recall@5000": deep}


def test_choose_by_rails_tiers() -> None:
    dense, mmr = _row(0.15, 0.77, 4.4, 0.38), {"vendi": 5.2}
    rows = [
        _row(0.16, 0.70, 6.7, 0.39),  # fair rails met, deep rail (+0.02) missed
        _row(0.145, 0.70, 6.7, 0.405),  # every rail met
        _row(0.17, 0.60, 8.0, 0.45),  # relevance rail missed
        _row(0.145, 0.70, 6.7, 0.42),  # every rail met, deeper than row 1, the same recall
    ]
    assert choose_by_rails(rows, dense, mmr) == (0, "all")  # no deep rail: the highest recall
    assert choose_by_rails(rows, dense, mmr, deep_margin=0.02) == (1, "all")
    assert choose_by_rails(rows, dense, mmr, deep_margin=0.05) == (3, "fair")  # the deepest within
    assert choose_by_rails(rows[:2], dense, mmr, deep_margin=0.05) == (1, "fair")
    assert choose_by_rails(rows, dense, mmr, rails=(0.0, 0.0, 9.0)) == (2, "none")  # R + V / 100
    with pytest.raises(ValueError, match="rows"):
        choose_by_rails([], dense, mmr)


def test_deep_rail_reaches_the_selection(setup) -> None:
    data, r = setup
    kw = dict(anchors=(0.0, 0.3), guidances=(0.0,), grid=(("heun", 2),), rule="rails", apply=False)
    res = select_retrieval_settings(r, data, rails=(1.0, 1.0, -100.0), progress=False, **kw)
    deep = select_retrieval_settings(r, data, rails=(1.0, 1.0, -100.0), deep_margin=1.0, progress=False, **kw)
    assert "tier 'all'" in res["rule"] and "recall@5000 >= dense + 1" in deep["rule"]
    assert "tier 'fair'" in deep["rule"]  # recall@5000 >= dense + 1: impossible (and none at 60 items)


def test_candidate_pulls_are_traced_with_each_pull(setup) -> None:
    data, r = setup
    res = select_retrieval_settings(
        r, data, anchors=(0.3,), guidances=(0.0,), pulls=(0.0, 0.5), candidate_pulls=(None, 0.0, -0.5),
        grid=(("heun", 2),), apply=False, progress=False,
    )  # fmt: skip
    quality = res["rows"][:5]  # then the precision rows at the choice
    tried = [(x["pull"], x["candidate_pull"]) for x in quality]
    # pull 0 with candidate pull 0 is the setting without one: tried once
    assert tried == [(0.0, None), (0.0, -0.5), (0.5, None), (0.5, 0.0), (0.5, -0.5)]
    assert "candidate_pull" in res["chosen"] and res["chosen"]["candidate_pull"] in (None, 0.0, -0.5)
    by = {t: x for t, x in zip(tried, quality, strict=True)}
    assert by[(0.5, 0.0)]["item_relevance"] == by[(0.5, None)]["item_relevance"]  # items: the pull's


def test_rule_is_checked_and_the_query_share_is_stated() -> None:
    with pytest.raises(ValueError, match="rule"):
        select_retrieval_settings(None, None, rule="best")
    assert query_budget_share(0.0, 10) == 0.0
    assert query_budget_share(0.3, 10) == pytest.approx(4 / 13)  # m = 4 appended rows of 13 read
    assert query_budget_share(0.5, 10) == pytest.approx(10 / 19)


def test_deep_shares_trace_the_ranked_layout_where_the_fair_rails_hold(setup) -> None:
    data, r = setup
    kw = dict(anchors=(0.0, 0.3), guidances=(0.0,), grid=(("heun", 2),), rule="rails", apply=False)
    kw.update(deep_shares=(None, 0.2), precisions=("fp32",), progress=False)
    res = select_retrieval_settings(r, data, rails=(1.0, 1.0, -100.0), **kw)  # every setting within
    rows = res["rows"]
    plain = [x for x in rows if x["candidate_layout"] == "rows"]
    ranked = [x for x in rows if x["candidate_layout"] == "ranked"]
    assert [(x["anchor"], x["deep_share"]) for x in ranked] == [(0.0, None), (0.3, None), (0.3, 0.2)]
    for x in ranked:  # the fair budget's metrics are the rows layout's
        same = next(p for p in plain if p["anchor"] == x["anchor"])
        assert x["recall_at_fair"] == same["recall_at_fair"] and x["vendi"] == same["vendi"]
    assert "ranked layout at deep shares" in res["rule"] and "deep_share" in res["chosen"]
    none = select_retrieval_settings(r, data, rails=(-1.0, 0.0, 0.0), **kw)  # no setting within
    assert all(x["candidate_layout"] == "rows" for x in none["rows"])
