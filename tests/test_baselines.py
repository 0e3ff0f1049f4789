"""Tests for r4t_fast.baselines on a small clustered synthetic catalog with a fake encoder."""

from __future__ import annotations

import doctest
import importlib.util
import itertools
import zlib

import numpy as np
import pytest
import torch

from r4t_fast import objectives as M
from r4t_fast.eval import baselines as B
from r4t_fast.eval import metrics as M_metrics

DIM = 16
N_CLUSTERS = 8
PER_CLUSTER = 40


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class FakeCatalog:
    """Exact inner-product search over unit rows; ties by ascending id (the Catalog.search contract)."""

    def __init__(self, emb: np.ndarray) -> None:
        self.embeddings = torch.from_numpy(emb.astype(np.float32))
        self.ids = [f"item{i}" for i in range(emb.shape[0])]
        self.categories = [f"c{i // PER_CLUSTER}" for i in range(emb.shape[0])]

    def search(self, queries: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.from_numpy(np.asarray(queries, dtype=np.float32)) @ self.embeddings.T
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
        return torch.gather(s, 1, order), order


class FakeEncoder:
    """Known texts map to fixed vectors; any other text to a vector seeded by its CRC32 (no clock)."""

    def __init__(self, table: dict[str, np.ndarray], dim: int = DIM) -> None:
        self.table = table
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = []
        for t in texts:
            if t in self.table:
                rows.append(self.table[t])
            else:
                rng = np.random.Generator(np.random.PCG64(zlib.crc32(t.encode())))
                rows.append(rng.normal(size=self.dim))
        return _unit(np.stack(rows)).astype(np.float32)


@pytest.fixture(scope="module")
def world() -> tuple[FakeCatalog, FakeEncoder, list[str]]:
    rng = np.random.Generator(np.random.PCG64(0))
    centers = _unit(rng.normal(size=(N_CLUSTERS, DIM)))
    emb = _unit(
        np.repeat(centers, PER_CLUSTER, axis=0) + 0.15 * rng.normal(size=(N_CLUSTERS * PER_CLUSTER, DIM))
    )
    # queries sit between two or three clusters: relevant items span several tight clusters
    table = {}
    for i, combo in enumerate(itertools.islice(itertools.combinations(range(N_CLUSTERS), 3), 12)):
        table[f"query {i}"] = centers[list(combo)].sum(0) + 0.05 * rng.normal(size=DIM)
    return FakeCatalog(emb), FakeEncoder(table), sorted(table)


def _item_emb(cat: FakeCatalog, results: list[B.RetrievalResult]) -> np.ndarray:
    return np.stack([cat.embeddings.numpy()[r.item_indices] for r in results]).astype(np.float64)


def test_doctests() -> None:
    result = doctest.testmod(B)
    assert result.attempted >= 3 and result.failed == 0


def test_dense_is_the_query_top_k(world) -> None:
    cat, enc, queries = world
    res = B.DenseBaseline(cat, enc).retrieve(queries, 10)
    q = enc.encode(queries)
    brute = np.argsort(-(q @ cat.embeddings.numpy().T), axis=1, kind="stable")[:, :10]
    assert len(res) == len(queries)
    for r, b, qq in zip(res, brute, q, strict=True):
        assert r.item_indices.dtype == np.int64 and r.item_indices.shape == (10,)
        assert r.row_embeddings.dtype == np.float32 and r.row_embeddings.shape == (10, DIM)
        np.testing.assert_array_equal(r.item_indices, b)
        np.testing.assert_allclose(r.row_embeddings, np.repeat(qq[None], 10, 0), atol=1e-6)
        assert r.candidates is None
        assert np.all(np.diff(r.scores) <= 1e-6)  # best first


def test_dense_candidates_give_top_k_times_b_for_every_budget(world) -> None:
    cat, enc, queries = world
    k, c = 10, 20
    res = B.DenseBaseline(cat, enc).retrieve(queries[:3], k, n_candidates=c)
    top = cat.search(enc.encode(queries[:3]), k * c)[1].numpy()
    for r, t in zip(res, top, strict=True):
        assert r.candidates.shape == (k, c)
        np.testing.assert_array_equal(r.candidates[:, 0], r.item_indices)
        for b in (1, 5, 20):
            np.testing.assert_array_equal(M.union_candidates(r.candidates, b), np.sort(t[: k * b]))


def test_dense_candidates_past_catalog_size_are_padded(world) -> None:
    cat, enc, queries = world
    n = cat.embeddings.shape[0]
    r = B.DenseBaseline(cat, enc).retrieve(queries[:1], 10, n_candidates=n)[0]
    assert r.candidates.shape == (10, n)
    assert (r.candidates == -1).sum() == 10 * n - n
    assert M.union_candidates(r.candidates, n).size == n


def test_mmr_lambda_one_equals_dense(world) -> None:
    cat, enc, queries = world
    dense = B.DenseBaseline(cat, enc).retrieve(queries, 10)
    mmr = B.MMRBaseline(cat, enc, lambda_=1.0, pool=50).retrieve(queries, 10)
    for d, m in zip(dense, mmr, strict=True):
        np.testing.assert_array_equal(d.item_indices, m.item_indices)


@pytest.mark.parametrize("name", ["mmr", "dpp"])
def test_diversifiers_raise_vendi_at_a_cost_in_alignment(world, name: str) -> None:
    cat, enc, queries = world
    q = enc.encode(queries)
    dense = B.DenseBaseline(cat, enc).retrieve(queries, 10)
    div = B.get_baseline(name, catalog=cat, encoder=enc).retrieve(queries, 10)
    dense_items, div_items = _item_emb(cat, dense), _item_emb(cat, div)
    v_dense = M.vendi_score(dense_items).mean()
    v_div = M.vendi_score(div_items).mean()
    assert v_div > 1.2 * v_dense, (v_dense, v_div)
    # the cost: the retrieved items sit further from the query (alignment of items to the query)
    a_dense = M.alignment(dense_items, q).mean()
    a_div = M.alignment(div_items, q).mean()
    assert a_div < a_dense, (a_dense, a_div)
    # and on the metric suite: item diversity up, ILD up
    ev_dense = M_metrics.evaluate_sets(
        [r.item_indices for r in dense], [r.row_embeddings for r in dense], q, cat
    )
    ev_div = M_metrics.evaluate_sets([r.item_indices for r in div], [r.row_embeddings for r in div], q, cat)
    assert ev_div.means["row_diversity"] > ev_dense.means["row_diversity"]
    assert ev_div.means["vendi"] > ev_dense.means["vendi"]
    assert ev_div.means["ild"] > ev_dense.means["ild"]
    # the item-level cost is visible: the diversified items are less relevant to the query
    assert ev_div.means["item_relevance"] < ev_dense.means["item_relevance"]
    # rows are the query for every non-fan-out baseline: alignment of rows is 1 for both by construction
    assert ev_div.means["row_alignment"] == pytest.approx(1.0) == ev_dense.means["row_alignment"]


@pytest.mark.parametrize("name", ["mmr", "dpp"])
def test_no_duplicates_pool_membership_and_determinism(world, name: str) -> None:
    cat, enc, queries = world
    base = B.get_baseline(name, catalog=cat, encoder=enc, pool=60)
    res = base.retrieve(queries, 12, n_candidates=5)
    pool = cat.search(enc.encode(queries), 60)[1].numpy()
    for r, p in zip(res, pool, strict=True):
        assert len(set(r.item_indices.tolist())) == 12
        assert set(r.item_indices.tolist()) <= set(p.tolist())
        assert r.candidates.shape == (12, 5)
        np.testing.assert_array_equal(r.candidates[:, 0], r.item_indices)  # item-seeded rows
    again = B.get_baseline(name, catalog=cat, encoder=enc, pool=60).retrieve(queries, 12, n_candidates=5)
    for r1, r2 in zip(res, again, strict=True):
        np.testing.assert_array_equal(r1.item_indices, r2.item_indices)
        np.testing.assert_array_equal(r1.candidates, r2.candidates)


@pytest.mark.parametrize("name", ["dense", "mmr", "dpp"])
def test_candidates_fill_the_fair_union(world, name: str) -> None:
    """With K candidates per row every baseline's round-robin union holds exactly K distinct items; the
    dense baseline's is exactly its top K."""
    cat, enc, queries = world
    big_k = M.fair_budget(len(cat.ids), 10, share=0.1)  # 32 items of 320
    assert big_k == 30
    res = B.get_baseline(name, catalog=cat, encoder=enc).retrieve(queries, 10, n_candidates=big_k)
    top = cat.search(enc.encode(queries), big_k)[1].numpy()
    for r, t in zip(res, top, strict=True):
        union = M.round_robin_union(r.candidates, big_k)
        assert union.size == big_k == len(set(union.tolist()))
        if name == "dense":
            np.testing.assert_array_equal(union, t)


def test_dpp_fills_when_kernel_rank_runs_out() -> None:
    rng = np.random.Generator(np.random.PCG64(5))
    emb = _unit(rng.normal(size=(60, 3)))  # rank 3: greedy DPP can only pick 3 items
    cat = FakeCatalog(emb)
    enc = FakeEncoder({"q": np.array([1.0, 0.0, 0.0])}, dim=3)
    r = B.DPPBaseline(cat, enc, pool=30).retrieve(["q"], 8)[0]
    assert len(set(r.item_indices.tolist())) == 8


def test_dpp_greedy_matches_brute_force_log_det() -> None:
    rng = np.random.Generator(np.random.PCG64(6))
    x = rng.normal(size=(25, 12))
    kernel = x @ x.T
    got = B.dpp_greedy(kernel, 8).tolist()
    chosen: list[int] = []
    for _ in range(8):
        gains = []
        for i in range(25):
            if i in chosen:
                gains.append(-np.inf)
                continue
            idx = chosen + [i]
            gains.append(np.linalg.slogdet(kernel[np.ix_(idx, idx)])[1])
        chosen.append(int(np.argmax(gains)))
    assert got == chosen


def test_mmr_select_matches_naive() -> None:
    rng = np.random.Generator(np.random.PCG64(7))
    e = _unit(rng.normal(size=(30, 6)))
    q = _unit(rng.normal(size=6))
    rel, sim = e @ q, e @ e.T
    for lam in (0.0, 0.3, 0.7):
        chosen: list[int] = []
        for _ in range(10):
            best, arg = -np.inf, -1
            for i in range(30):
                if i in chosen:
                    continue
                red = max((sim[i, j] for j in chosen), default=0.0)
                s = lam * rel[i] - (1 - lam) * red
                if s > best:
                    best, arg = s, i
            chosen.append(arg)
        assert B.mmr_select(rel, sim, 10, lam).tolist() == chosen


def test_registry() -> None:
    names = B.available_baselines()
    assert {"dense", "mmr", "dpp", "llm-zeroshot", "llm-bon"} <= set(names)
    with pytest.raises(ValueError, match="valid choices: dense, dpp, llm-bon, llm-zeroshot, mmr"):
        B.get_baseline("nope")
    if importlib.util.find_spec("r4t_fast.fanout") is None:
        with pytest.raises(ImportError, match="r4t_fast.fanout.LLMFanOutBaseline"):
            B.get_baseline("llm-zeroshot")
    with pytest.raises(ValueError, match="already registered"):
        B.register_baseline("dense", B.DenseBaseline)


def test_errors_name_the_argument(world) -> None:
    cat, enc, queries = world
    dense = B.DenseBaseline(cat, enc)
    with pytest.raises(ValueError, match="^k: expected a positive int, got 0"):
        dense.retrieve(queries, 0)
    with pytest.raises(ValueError, match=r"^k: expected an int in \[1, 320\]"):
        dense.retrieve(queries, 321)
    with pytest.raises(ValueError, match="^n_candidates"):
        dense.retrieve(queries, 3, n_candidates=-1)
    with pytest.raises(ValueError, match="^query_texts"):
        dense.retrieve("one string", 3)
    with pytest.raises(ValueError, match=r"^k: expected an int <= pool \(20\)"):
        B.MMRBaseline(cat, enc, pool=20).retrieve(queries, 30)
    with pytest.raises(ValueError, match="^lambda_"):
        B.MMRBaseline(cat, enc, lambda_=1.5)
    with pytest.raises(ValueError, match="^theta"):
        B.DPPBaseline(cat, enc, theta=1.0)
    with pytest.raises(ValueError, match="^encoder: expected .dim == catalog dim"):
        B.DenseBaseline(cat, FakeEncoder({}, dim=DIM + 1))
    with pytest.raises(ValueError, match="^catalog"):
        B.DenseBaseline(object(), enc)


def test_dense_without_search_uses_ops_knn(world) -> None:
    """A catalog without .search falls back to r4t_fast.ops.knn (part of every build: errors fail)."""
    cat, enc, queries = world
    bare = type("Bare", (), {"embeddings": cat.embeddings})()
    got = B.DenseBaseline(bare, enc).retrieve(queries, 10, n_candidates=3)
    want = B.DenseBaseline(cat, enc).retrieve(queries, 10, n_candidates=3)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.sort(g.scores), np.sort(w.scores), atol=1e-5)  # tie tolerant


def test_with_real_catalog(world) -> None:
    """The same baselines over a real r4t_fast.Catalog as over the exact FakeCatalog."""
    import r4t_fast

    cat, enc, queries = world
    real = r4t_fast.Catalog(ids=cat.ids, texts=cat.ids, categories=cat.categories, embeddings=cat.embeddings)
    assert len(real) == len(cat.ids)
    for name in ("dense", "mmr", "dpp"):
        got = B.get_baseline(name, catalog=real, encoder=enc).retrieve(queries, 10)
        want = B.get_baseline(name, catalog=cat, encoder=enc).retrieve(queries, 10)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.sort(g.scores), np.sort(w.scores), atol=1e-5)
