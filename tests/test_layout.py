"""The diffusion retriever's ``"ranked"`` candidate layout (``r4t_fast.diffusion.layout``): distinct
candidates in one order, the fair budget's union unchanged, the query's share past it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r4t_fast.diffusion.layout import rank_candidates
from r4t_fast.objectives import fair_budget, round_robin_union, union_candidates
from test_retriever import QUERIES, _retriever


def _read(out: np.ndarray) -> np.ndarray:
    """The layout's order: column by column."""
    flat = out.T.reshape(-1)
    return flat[flat >= 0]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    L=st.integers(2, 6),
    C=st.integers(1, 8),
    fair_k=st.integers(1, 30),
    share=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    anchored=st.booleans(),
)
def test_ranked_is_distinct_keeps_the_fair_union_and_gives_the_query_its_share(
    seed: int, L: int, C: int, fair_k: int, share: float, anchored: bool
) -> None:
    rng = np.random.default_rng(seed)
    n = 40
    lists = rng.integers(0, n, size=(L, C))  # overlapping rows, as sampled rows' kNN lists are
    ranking = rng.permutation(n)[: L * C] if anchored else None
    if anchored:  # row 0 holds the query's ranking in the rows layout
        lists[0] = ranking[:C]
    free = slice(1, L) if anchored else slice(None)
    out = rank_candidates(lists, ranking, lists[free], fair_k, share)
    assert out.shape == lists.shape and out.dtype == np.int64
    seq = _read(out)
    assert len(np.unique(seq)) == seq.size  # distinct
    assert np.all(out.T.reshape(-1)[seq.size :] == -1)  # -1 pads only the end
    head = round_robin_union(lists, min(fair_k, L * C))
    np.testing.assert_array_equal(seq[: head.size], head)  # the fair union is the rows layout's
    np.testing.assert_array_equal(round_robin_union(out, head.size), head)
    for b in range(1, C + 1):  # a fixed quota per row reads the order's first L * b
        np.testing.assert_array_equal(union_candidates(out, b), np.sort(seq[: L * b]))
    tail = seq[head.size :]
    rows_items = set(lists[free].reshape(-1).tolist())
    if anchored and share == 1.0:  # the query's ranking alone past the fair budget, in its order
        want = [x for x in ranking if x not in set(head.tolist())][: tail.size]
        np.testing.assert_array_equal(tail, want)
    if share == 0.0 or not anchored:  # the rows' lists first, the query's ranking only after them
        from_rows = np.array([x in rows_items for x in tail], dtype=bool)
        assert np.all(from_rows[:-1] >= from_rows[1:])
        assert anchored or from_rows.all()
        assert set(seq.tolist()) >= rows_items or seq.size == L * C


def test_ranked_share_interleaves_the_query_and_the_rows() -> None:
    lists = np.array([[0, 2, 4, 6], [10, 11, 12, 13], [20, 21, 22, 23]])  # row 0: the query's ranking
    ranking = np.array([0, 2, 4, 6, 8, 30, 32, 34, 36, 38, 40, 42])  # none in the model rows
    out = rank_candidates(lists, ranking, lists[1:], fair_k=3, deep_share=0.5)
    seq = _read(out)
    np.testing.assert_array_equal(seq[:3], [0, 10, 20])  # the fair union: row by row
    tail = seq[3:]
    from_query = np.isin(tail, ranking)
    assert abs(from_query[:8].mean() - 0.5) <= 0.125  # half of the tail from the query's ranking
    np.testing.assert_array_equal(tail[from_query][:3], [2, 4, 6])  # each in its own order
    np.testing.assert_array_equal(tail[~from_query][:4], [11, 21, 12, 22])


@pytest.mark.parametrize("anchor", [0.0, 0.3])
def test_retriever_ranked_layout(anchor: float) -> None:
    r = _retriever()
    q = torch.from_numpy(np.asarray(r.encoder.encode(QUERIES), dtype=np.float32))
    kw = dict(k=4, n_candidates=6, seed=2, anchor=anchor, pull=0.5)
    rows = r.retrieve_embeddings(q, **kw)
    fair_k = fair_budget(len(r.catalog), 4)
    for share in (None, 0.0, 1.0):
        ranked = r.retrieve_embeddings(q, candidate_layout="ranked", deep_share=share, **kw)
        for a, b in zip(rows, ranked, strict=True):
            assert a.item_ids == b.item_ids  # the items and rows are the rows layout's
            np.testing.assert_array_equal(a.row_embeddings, b.row_embeddings)
            assert b.candidates.shape == a.candidates.shape
            seq = _read(b.candidates)
            assert len(np.unique(seq)) == seq.size
            np.testing.assert_array_equal(
                round_robin_union(b.candidates, fair_k), round_robin_union(a.candidates, fair_k)
            )
            n_rows, got = b.candidates.shape[0], union_candidates(b.candidates, 6).size
            assert got == min(n_rows * 6, seq.size) and got >= union_candidates(a.candidates, 6).size
            if anchor:  # the query's ranking fills what the rows' lists do not
                assert got == min(n_rows * 6, len(r.catalog))
    stored = _retriever(candidate_layout="ranked", deep_share=0.2)
    assert stored.defaults["candidate_layout"] == "ranked" and stored.defaults["deep_share"] == 0.2
    assert r.defaults["candidate_layout"] == "rows" and r.defaults["deep_share"] is None
    with pytest.raises(ValueError, match="candidate_layout"):
        r.retrieve(QUERIES, candidate_layout="flat")
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="deep_share"):
            r.retrieve(QUERIES, deep_share=bad)
