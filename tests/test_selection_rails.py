"""Issue 18's selection rule: the quality setting within guard rails against dense kNN and MMR."""

from __future__ import annotations

import pytest
import torch

from helpers import sets_jsonl
from r4t_fast.data.prepare import load_eval_data
from r4t_fast.diffusion.model import SetDenoiser, get_preset
from r4t_fast.diffusion.retriever import Retriever, query_budget_share
from r4t_fast.eval.selection import select_retrieval_settings


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("rails")
    data = load_eval_data(
        sets_jsonl(root / "sets.jsonl", n=60), encoder="hashing:32", cache_dir=root / "cache", progress=False
    )
    torch.manual_seed(0)
    model = SetDenoiser(get_preset("tiny", dim=data.catalog.dim, cond_dim=data.catalog.dim)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return data, Retriever(model, data.catalog, data.encoder, encoder_spec="hashing:32")


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
    assert "(0 qualified" in res["rule"]
    best = max(res["rows"], key=lambda x: x["recall_at_fair"] + x["vendi"] / 100)
    assert res["reference"] == best


def test_rule_is_checked_and_the_query_share_is_stated() -> None:
    with pytest.raises(ValueError, match="rule"):
        select_retrieval_settings(None, None, rule="best")
    assert query_budget_share(0.0, 10) == 0.0
    assert query_budget_share(0.3, 10) == pytest.approx(4 / 13)  # m = 4 appended rows of 13 read
    assert query_budget_share(0.5, 10) == pytest.approx(10 / 19)
