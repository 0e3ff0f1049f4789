"""Tests for r4t_fast.metrics: hand-computed values, independent re-implementations, batching, errors."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

from r4t_fast import objectives as M
from r4t_fast.eval import metrics as M_metrics
from r4t_fast.eval import stats as M_stats
from r4t_fast.objectives import terms as M_terms


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _vendi_numpy(x: np.ndarray) -> float:
    """Independent Vendi: eigenvalues of the normalised cosine Gram matrix via numpy."""
    u = _unit(x.astype(np.float64))
    k = u @ u.T / x.shape[0]
    lam = np.clip(np.linalg.eigvalsh(k), 0.0, None)
    lam = lam[lam > 0]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def test_doctests() -> None:
    from r4t_fast.objectives import coverage, terms

    results = [doctest.testmod(m) for m in (terms, coverage)]
    assert sum(r.attempted for r in results) > 20
    assert sum(r.failed for r in results) == 0


# ----------------------------------------------------------------------------------------------------
# Vendi / diversity / ILD
# ----------------------------------------------------------------------------------------------------
def test_vendi_hand_values() -> None:
    assert float(M.vendi_score(np.eye(5))) == pytest.approx(5.0, abs=1e-12)
    assert float(M.vendi_score(np.ones((7, 3)))) == pytest.approx(1.0, abs=1e-12)
    # two identical rows + one orthogonal: eigenvalues 2/3, 1/3, 0
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    expected = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert float(M.vendi_score(x)) == pytest.approx(expected, abs=1e-12)
    # two unit rows at angle with cosine c: eigenvalues (1 +- c) / 2
    c = 0.3
    x = np.array([[1.0, 0.0], [c, math.sqrt(1 - c * c)]])
    lam = np.array([(1 + c) / 2, (1 - c) / 2])
    assert float(M.vendi_score(x)) == pytest.approx(math.exp(-(lam * np.log(lam)).sum()), abs=1e-12)


def test_vendi_matches_numpy_and_is_invariant() -> None:
    rng = _rng(1)
    x = rng.normal(size=(4, 9, 16))
    got = M.vendi_score(x)
    assert isinstance(got, np.ndarray) and got.shape == (4,) and got.dtype == np.float64
    for b in range(4):
        assert got[b] == pytest.approx(_vendi_numpy(x[b]), abs=1e-10)
        scaled = x[b] * rng.uniform(0.1, 10.0, size=(9, 1))
        perm = scaled[rng.permutation(9)]
        assert float(M.vendi_score(perm)) == pytest.approx(got[b], abs=1e-10)
    assert np.all(got >= 1.0) and np.all(got <= 9.0)


def test_vendi_lengths_equal_truncation() -> None:
    rng = _rng(2)
    x = rng.normal(size=(3, 6, 5))
    lengths = np.array([6, 2, 4])
    got = M.vendi_score(x, lengths=lengths)
    for b, n in enumerate(lengths):
        assert got[b] == pytest.approx(float(M.vendi_score(x[b, :n])), abs=1e-12)
    with pytest.raises(ValueError, match="lengths"):
        M.vendi_score(x, lengths=np.array([0, 2, 3]))
    with pytest.raises(ValueError, match="lengths"):
        M.vendi_score(x, lengths=np.array([1, 2]))


def test_vendi_torch_in_torch_out() -> None:
    x = torch.eye(3, dtype=torch.float32)
    got = M.vendi_score(x)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and got.ndim == 0
    assert float(got) == pytest.approx(3.0)
    batched = M.vendi_score(torch.stack([x, torch.ones(3, 3)]))
    assert batched.shape == (2,)


def test_vendi_zero_row_convention() -> None:
    # a zero row: similarity 0 to others, 1 to itself (the set_stats convention) -> like an orthogonal row
    x = np.array([[1.0, 0.0], [0.0, 0.0]])
    assert float(M.vendi_score(x)) == pytest.approx(2.0)


def test_vendi_agrees_with_ops_set_stats() -> None:
    # the compiled kernels are part of every build: an error here is a failure, never a skip
    from r4t_fast import ops

    x = _rng(3).normal(size=(5, 8, 12)).astype(np.float32)
    lengths = np.array([8, 3, 5, 1, 8], dtype=np.int64)
    vendi, mean_cos = ops.set_stats(x, lengths)
    assert vendi.shape == (5,) and mean_cos.shape == (5,)
    np.testing.assert_allclose(M.vendi_score(x, lengths=lengths), vendi, rtol=1e-5, atol=1e-5)
    ild = M.intra_list_diversity(x, lengths=lengths)
    multi = lengths > 1
    np.testing.assert_allclose(ild[multi], 1.0 - mean_cos[multi], atol=1e-5)


def test_diversity_bounds_and_raw() -> None:
    assert float(M.diversity(np.eye(4))) == pytest.approx(1.0)
    assert float(M.diversity(np.ones((4, 3)))) == pytest.approx(0.25)
    x = _rng(4).normal(size=(10, 8))
    assert float(M.diversity(x, normalize=False)) == pytest.approx(float(M.vendi_score(x)))
    assert float(M.diversity(x)) == pytest.approx(float(M.vendi_score(x)) / 10)
    lengths = np.array([10, 5])
    got = M.diversity(np.stack([x, x]), lengths=lengths)
    assert got[1] == pytest.approx(float(M.vendi_score(x[:5])) / 5)


def test_intra_list_diversity() -> None:
    assert float(M.intra_list_diversity(np.eye(3))) == pytest.approx(1.0)
    assert float(M.intra_list_diversity(np.ones((3, 2)))) == pytest.approx(0.0, abs=1e-12)
    assert float(M.intra_list_diversity(np.array([[1.0, 0.0]]))) == 0.0  # n < 2
    x = _rng(5).normal(size=(7, 4))
    u = _unit(x)
    pairs = [1 - u[i] @ u[j] for i in range(7) for j in range(i + 1, 7)]
    assert float(M.intra_list_diversity(x)) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_vendi_over_runs() -> None:
    rng = _rng(6)
    run = rng.normal(size=(10, 8))
    same = np.stack([run[rng.permutation(10)] for _ in range(5)])  # same rows, any order
    assert float(M.vendi_over_runs(same)) == pytest.approx(1.0, abs=1e-9)
    # runs whose means are orthogonal -> N
    eye = np.eye(5)
    ortho = np.stack([np.stack([eye[r], eye[r]]) for r in range(5)])  # (5 runs, 2 rows, 5)
    assert float(M.vendi_over_runs(ortho)) == pytest.approx(5.0, abs=1e-9)
    # definition: Vendi of the per-run row means
    runs = rng.normal(size=(3, 5, 4, 6))
    got = M.vendi_over_runs(runs)
    assert got.shape == (3,)
    for b in range(3):
        assert got[b] == pytest.approx(_vendi_numpy(runs[b].mean(axis=1)), abs=1e-10)
    with pytest.raises(ValueError, match="run_embeddings"):
        M.vendi_over_runs(np.zeros((5, 6)))


# ----------------------------------------------------------------------------------------------------
# OAR properties
# ----------------------------------------------------------------------------------------------------
def test_nearest_distance_matches_brute_force_across_chunks() -> None:
    rng = _rng(7)
    cat = rng.normal(size=(3000, 8))
    rows = rng.normal(size=(2, 5, 8))
    brute = np.linalg.norm(rows[..., None, :] - cat, axis=-1).min(-1)
    np.testing.assert_allclose(M.nearest_distance(rows, cat), brute, rtol=1e-12)
    # force many catalog chunks
    flat = torch.from_numpy(rows.reshape(-1, 8))
    got = M_terms._nearest(flat, torch.from_numpy(cat), chunk_elems=7, use_ops=False).numpy()
    np.testing.assert_allclose(got, brute.reshape(-1), rtol=1e-12)


def test_nearest_distance_is_exact_near_zero() -> None:
    cat = _unit(_rng(8).normal(size=(100, 16))).astype(np.float32)
    offset = np.zeros(16)
    offset[0] = 1e-6
    rows = cat[:3].astype(np.float64) + offset
    # a float32 ||a||^2 + ||b||^2 - 2ab expansion would lose this distance entirely
    np.testing.assert_allclose(M.nearest_distance(rows, cat), [1e-6] * 3, rtol=1e-6)


def test_groundedness_forms() -> None:
    rng = _rng(9)
    cat = _unit(rng.normal(size=(50, 6)))
    sub = _unit(rng.normal(size=(4, 10, 6)))
    dist = M.nearest_distance(sub, cat)
    raw = M.groundedness(sub, cat, normalize=False)
    norm = M.groundedness(sub, cat)
    np.testing.assert_allclose(raw, 1.0 - dist.mean(-1), atol=1e-12)
    np.testing.assert_allclose(norm, 1.0 - dist.mean(-1) / 2.0, atol=1e-12)
    np.testing.assert_allclose(norm, (1.0 + raw) / 2.0, atol=1e-12)
    assert np.all((norm >= 0) & (norm <= 1))
    # rows that are catalog items are perfectly grounded
    assert float(M.groundedness(cat[:5], cat)) == pytest.approx(1.0)
    # Catalog-like objects with .embeddings work too
    holder = type("Holder", (), {"embeddings": torch.from_numpy(cat).float()})()
    assert float(M.groundedness(cat[:5], holder)) == pytest.approx(1.0, abs=1e-6)
    lengths = np.array([10, 3, 1, 7])
    got = M.groundedness(sub, cat, lengths=lengths)
    for b, n in enumerate(lengths):
        assert got[b] == pytest.approx(1.0 - dist[b, :n].mean() / 2.0, abs=1e-12)
    with pytest.raises(ValueError, match="subquery_emb"):
        M.groundedness(sub[..., :5], cat)


def test_alignment_forms() -> None:
    sub = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    q = np.array([3.0, 0.0])
    assert float(M.alignment(sub, q, normalize=False)) == pytest.approx(0.0)
    assert float(M.alignment(sub, q)) == pytest.approx(0.5)
    assert float(M.alignment(sub[:1], q)) == pytest.approx(1.0)
    assert float(M.alignment(sub[2:], q)) == pytest.approx(0.0)
    rng = _rng(10)
    sb = rng.normal(size=(3, 5, 4))
    qb = rng.normal(size=(3, 4))
    got = M.alignment(sb, qb, normalize=False)
    for b in range(3):
        expected = np.mean(_unit(sb[b]) @ _unit(qb[b]))
        assert got[b] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="query_emb"):
        M.alignment(sb, qb[0])


def test_composite() -> None:
    assert M.composite(1.0, 0.0, 0.0) == pytest.approx(0.6)
    g, d, a = np.array([0.5, 1.0]), np.array([0.2, 0.4]), np.array([1.0, 0.0])
    np.testing.assert_allclose(M.composite(g, d, a), 0.6 * g + 0.2 * d + 0.2 * a)
    t = M.composite(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1.0]), weights=(2, 4, 4))
    assert isinstance(t, torch.Tensor) and float(t) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="weights"):
        M.composite(1.0, 1.0, 1.0, weights=(0.5, 0.5))


def test_rewards_batch_equals_loop_and_torch_keeps_device_library() -> None:
    rng = _rng(11)
    cat = torch.from_numpy(_unit(rng.normal(size=(40, 8)))).float()
    sub = torch.from_numpy(rng.normal(size=(6, 10, 8))).float()
    q = torch.from_numpy(rng.normal(size=(6, 8))).float()
    g = M.groundedness(sub, cat)
    a = M.alignment(sub, q)
    d = M.diversity(sub)
    for out in (g, a, d):
        assert isinstance(out, torch.Tensor) and out.shape == (6,)
    for b in range(6):
        assert float(M.groundedness(sub[b], cat)) == pytest.approx(float(g[b]), abs=1e-12)
        assert float(M.alignment(sub[b], q[b])) == pytest.approx(float(a[b]), abs=1e-12)
        assert float(M.diversity(sub[b])) == pytest.approx(float(d[b]), abs=1e-12)


def test_input_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"^emb: expected shape \(k, dim\) or \(batch, k, dim\)"):
        M.vendi_score(np.zeros(3))
    with pytest.raises(ValueError, match="^emb: expected a floating-point array"):
        M.vendi_score(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="^catalog:"):
        M.groundedness(np.zeros((2, 3)), "not a catalog")


# ----------------------------------------------------------------------------------------------------
# id metrics
# ----------------------------------------------------------------------------------------------------
def test_recall_and_hit() -> None:
    retrieved = [[1, 2, 3, 3], np.array([7, 8]), torch.tensor([4, 5])]
    reference = [{1, 9}, [7], {6}]
    np.testing.assert_allclose(M.recall_at_k(retrieved, reference), [0.5, 1.0, 0.0])
    np.testing.assert_allclose(M.hit_at_k(retrieved, reference), [1.0, 1.0, 0.0])
    # string item ids
    np.testing.assert_allclose(M.recall_at_k([["a", "b"]], [{"b", "c", "d", "e"}]), [0.25])
    with pytest.raises(ValueError, match=r"reference\[0\]: expected a non-empty"):
        M.recall_at_k([[1]], [set()])
    with pytest.raises(ValueError, match="reference: expected one set per query"):
        M.recall_at_k([[1], [2]], [{1}])


def test_union_candidates_protocol() -> None:
    rng = _rng(12)
    cand = rng.integers(0, 10_000, size=(10, 500))
    for b in (10, 100, 500):
        r = M.union_candidates(cand, b)
        assert np.array_equal(r, np.unique(cand[:, :b]))
        assert r.size <= 10 * b
    # overlapping rows shrink |R| below K; -1 sentinels are dropped
    cand = np.array([[3, 4, -1], [4, 3, 5]])
    assert M.union_candidates(cand, 2).tolist() == [3, 4]
    assert M.union_candidates(cand, 3).tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match=r"^budget_per_row: expected an int in \[1, 3\]"):
        M.union_candidates(cand, 4)
    with pytest.raises(ValueError, match="^budget_per_row"):
        M.union_candidates(cand, 0)
    with pytest.raises(ValueError, match="^candidates"):
        M.union_candidates(np.zeros((2, 3)), 1)


def test_fair_budget_rounding() -> None:
    # the multiple of k closest to 3.5 % of the catalog
    assert M.fair_budget(18_800, 10) == 660  # Polyvore test catalog: 658 -> 660
    assert M.fair_budget(18_689, 10) == 650  # Spotify: 654.1 -> 650
    assert M.fair_budget(142_472, 10) == 4990  # the paper's catalog: 4,986.5 -> 4,990 (paper: 5,000)
    assert M.fair_budget(18_800, 12) == 660  # 658 / 12 = 54.8 -> 55 * 12
    # halves round up, never below k, never above the catalog
    assert M.fair_budget(100, 10, share=0.25) == 30  # 2.5 multiples -> 3
    assert M.fair_budget(100, 10, share=0.24) == 20
    assert M.fair_budget(40, 10) == 10
    assert M.fair_budget(25, 10, share=1.0) == 20
    for k in (1, 5, 10):
        assert M.fair_budget(10_000, k) % k == 0
    with pytest.raises(ValueError, match=r"^k: expected an int in \[1, 5\]"):
        M.fair_budget(5, 10)
    with pytest.raises(ValueError, match="^n_items"):
        M.fair_budget(0, 1)
    with pytest.raises(ValueError, match="^share"):
        M.fair_budget(100, 10, share=0.0)


def test_round_robin_union_by_hand() -> None:
    cand = np.array([[5, 1, 9], [1, 2, -1], [7, 5, 3]])
    # row 1's first, row 2's first, row 3's first, then the second column ...; duplicates and -1 skipped
    assert M.round_robin_union(cand, 5).tolist() == [5, 1, 7, 2, 9]
    assert M.round_robin_union(cand, 1).tolist() == [5]
    assert M.round_robin_union(cand, 100).tolist() == [5, 1, 7, 2, 9, 3]  # only 6 distinct: short
    # dense baseline layout (its ranking column-major): the round-robin union is its top K
    ranking = np.arange(40)
    layout = ranking.reshape(4, 10).T  # (k = 10 rows, C = 4)
    assert M.round_robin_union(layout, 23).tolist() == list(range(23))
    assert M.round_robin_union(torch.tensor([[3, 4]]), 2).tolist() == [3, 4]
    with pytest.raises(ValueError, match="^size"):
        M.round_robin_union(cand, 0)
    with pytest.raises(ValueError, match="^candidates"):
        M.round_robin_union(np.zeros((2, 3)), 1)


def test_item_relevance_by_hand() -> None:
    items = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = np.array([1.0, 0.0])
    # cos 1, 0, -1 -> (1 + c) / 2 = 1, 0.5, 0 -> mean 0.5
    assert float(M.item_relevance(items, q)) == pytest.approx(0.5)
    assert float(M.item_relevance(items[:2], q)) == pytest.approx(0.75)
    batch = M.item_relevance(np.stack([items, items]), np.stack([q, -q]), lengths=np.array([2, 3]))
    np.testing.assert_allclose(batch, [0.75, 0.5])
    # not normalised inputs: only directions count
    assert float(M.item_relevance(3.0 * items[:1], 0.5 * q)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="^item_emb"):
        M.item_relevance(np.zeros(3), q)


def test_mrecall_definition() -> None:
    ref = [{1, 2}]
    # |Y| < k: success iff all of Y in the top k
    assert M.mrecall_at_k([[1, 2, 9]], ref, 3).tolist() == [1.0]
    assert M.mrecall_at_k([[1, 9, 2]], ref, 2).tolist() == [0.0]  # 2 is outside the top 2
    # |Y| >= k: success iff all top k are relevant
    big = [{1, 2, 3, 4, 5}]
    assert M.mrecall_at_k([[5, 1, 9]], big, 2).tolist() == [1.0]
    assert M.mrecall_at_k([[5, 9, 1]], big, 2).tolist() == [0.0]
    assert M.mrecall_at_k([[5, 9, 1]], big, 2, soft=True).tolist() == [0.5]
    assert M.mrecall_at_k([[1, 9, 8]], [{1, 2, 3}], 3, soft=True).tolist() == pytest.approx([1 / 3])
    with pytest.raises(ValueError, match="^k: expected a positive int, got 0"):
        M.mrecall_at_k([[1]], ref, 0)


def test_category_coverage() -> None:
    got = M.category_coverage(
        [["top", "shoes", None], ["bag"], ["x"]],
        [["top", "bag", "shoes", "top"], ["bag", None], [None]],
    )
    assert got[0] == pytest.approx(2 / 3)
    assert got[1] == 1.0
    assert math.isnan(got[2])


# ----------------------------------------------------------------------------------------------------
# bootstrap
# ----------------------------------------------------------------------------------------------------
def test_bootstrap_ci() -> None:
    v = _rng(13).normal(loc=1.0, scale=1.0, size=400)
    ci = M_stats.bootstrap_ci(v, n_boot=2000, seed=3)
    assert ci.mean == pytest.approx(v.mean())
    assert ci.low < ci.mean < ci.high
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size)  # normal-theory half-width
    assert ci.high - ci.low == pytest.approx(2 * half, rel=0.15)
    assert ci == M_stats.bootstrap_ci(v, n_boot=2000, seed=3)  # seeded, deterministic
    assert ci.excludes_zero
    const = M_stats.bootstrap_ci(np.full(10, 0.3))
    assert const.low == pytest.approx(0.3) and const.high == pytest.approx(0.3)
    with pytest.raises(ValueError, match="^values: expected finite"):
        M_stats.bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="^n_boot"):
        M_stats.bootstrap_ci([1.0], n_boot=0)
    with pytest.raises(ValueError, match="^alpha"):
        M_stats.bootstrap_ci([1.0], alpha=1.5)


def test_paired_bootstrap_ci() -> None:
    rng = _rng(14)
    base = rng.normal(size=300)
    better = base + 0.1 + 0.01 * rng.normal(size=300)  # small, consistent gain: paired test sees it
    ci = M_stats.paired_bootstrap_ci(better, base)
    assert ci.mean == pytest.approx(np.mean(better - base))
    assert ci.excludes_zero and ci.low > 0
    same = M_stats.paired_bootstrap_ci(base, base + 0.01 * rng.normal(size=300))
    assert not same.excludes_zero
    with pytest.raises(ValueError, match="^b: expected the same number"):
        M_stats.paired_bootstrap_ci([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------------------------------
# evaluate_sets
# ----------------------------------------------------------------------------------------------------
def test_evaluate_sets_hand_example() -> None:
    cat = np.eye(4)  # 4 items, orthogonal
    cats = ["top", "bottom", "shoes", None]
    items = np.array([[0, 1], [2, 2]])
    rows = np.stack([cat[[0, 1]], cat[[2, 2]]])  # rows are items -> groundedness 1
    queries = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    refs = [{0, 2}, {2, 3}]
    res = M_metrics.evaluate_sets(items, rows, queries, cat, references=refs, item_categories=cats)
    # renamed in issue 10: the OAR terms are row_*, "vendi" is always the Vendi of the k items
    expected_keys = {
        "recall_at_fair",
        "hit_at_fair",
        "fair_union_size",
        "mrecall@2",
        "vendi",
        "item_relevance",
        "row_groundedness",
        "row_diversity",
        "row_alignment",
        "row_composite",
        "ild",
        "category_coverage",
    }
    assert set(res.means) == expected_keys == set(res.per_query)
    assert res.fair_budget == 2  # fair_budget(4 items, k = 2): never below k
    # no candidates: the union is the items themselves (query 2 has one distinct item)
    np.testing.assert_allclose(res.per_query["recall_at_fair"], [0.5, 0.5])
    np.testing.assert_allclose(res.per_query["hit_at_fair"], [1.0, 1.0])
    np.testing.assert_allclose(res.per_query["fair_union_size"], [2, 1])
    np.testing.assert_allclose(res.per_query["mrecall@2"], [0.0, 0.0])
    np.testing.assert_allclose(res.per_query["row_groundedness"], [1.0, 1.0])
    np.testing.assert_allclose(res.per_query["vendi"], [2.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(res.per_query["row_diversity"], [1.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(res.per_query["row_alignment"], [0.75, 1.0])  # (1 + mean cos) / 2 of rows
    # item relevance: query 1's items have cos 1 and 0 with it, query 2's both cos 1
    np.testing.assert_allclose(res.per_query["item_relevance"], [0.75, 1.0])
    np.testing.assert_allclose(res.per_query["ild"], [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(res.per_query["category_coverage"], [0.5, 1.0])  # None is ignored
    np.testing.assert_allclose(
        res.per_query["row_composite"], [0.6 * 1 + 0.2 * 1 + 0.2 * 0.75, 0.6 + 0.2 * 0.5 + 0.2 * 1.0]
    )
    assert res.means["recall_at_fair"] == pytest.approx(0.5)
    ci = res.ci("row_composite")
    assert ci.low <= res.means["row_composite"] <= ci.high
    with pytest.raises(ValueError, match="^key: unknown metric"):
        res.ci("recall@5000")
    # the names before issue 10 still resolve, with a DeprecationWarning, and are never listed
    with pytest.warns(DeprecationWarning, match="row_composite"):
        np.testing.assert_allclose(res.per_query["composite"], res.per_query["row_composite"])
    with pytest.warns(DeprecationWarning):
        assert res.means["vendi_items"] == res.means["vendi"]
    with pytest.raises(KeyError):
        res.per_query["no such metric"]


def test_evaluate_sets_fair_union_and_fixed_quota_by_hand() -> None:
    """Two overlapping rows: the fixed quota (K / L per row) loses items to the overlap, the fair union
    (round-robin, K distinct) does not."""
    cat = np.eye(6)
    items = np.array([[0, 4]])
    rows = cat[[0, 4]][None]
    query = cat[:1]
    cand = [np.array([[0, 1, 2, 3], [0, 1, 4, 5]])]
    ref = [{4, 5}]
    res = M_metrics.evaluate_sets(items, rows, query, cat, references=ref, candidates=cand, fair_k=4)
    # fixed quota b = 4 / 2 = 2: {0, 1} from both rows -> 2 items, none of the reference
    np.testing.assert_allclose(res.per_query["recall_at_fair_quota"], [0.0])
    np.testing.assert_allclose(res.per_query["hit_at_fair_quota"], [0.0])
    # round robin: 0, (0), 1, (1), 2, 4 -> {0, 1, 2, 4}: one of the two reference items
    np.testing.assert_allclose(res.per_query["recall_at_fair"], [0.5])
    np.testing.assert_allclose(res.per_query["hit_at_fair"], [1.0])
    np.testing.assert_allclose(res.per_query["fair_union_size"], [4])
    # default budget: all C = 4 candidates per row, K = 2 * 4
    np.testing.assert_allclose(res.per_query["recall@8"], [1.0])
    # asking for more distinct items than the rows hold: the union is short, and says so
    short = M_metrics.evaluate_sets(items, rows, query, cat, references=ref, candidates=cand, fair_k=10)
    np.testing.assert_allclose(short.per_query["fair_union_size"], [6])
    assert "recall_at_fair_quota" not in short.per_query  # 10 / 2 = 5 > 4 candidates per row


def test_evaluate_sets_category_less_dataset() -> None:
    """Items without any category: category_coverage is nan for every query (null in a record)."""
    cat = np.eye(3)
    items = np.array([[0, 1]])
    for cats in (None, [None, None, None]):
        res = M_metrics.evaluate_sets(
            items, cat[[0, 1]][None], cat[:1], cat, references=[{0, 2}], item_categories=cats
        )
        assert np.isnan(res.per_query["category_coverage"]).all()
        assert math.isnan(res.means["category_coverage"])
        assert res.means["recall_at_fair"] == pytest.approx(0.5)


def test_evaluate_sets_candidates_runs_and_ragged() -> None:
    rng = _rng(15)
    cat = _unit(rng.normal(size=(300, 8)))
    q = 3
    items = [rng.choice(300, size=n, replace=False) for n in (10, 7, 10)]
    rows = [_unit(rng.normal(size=(n, 8))) for n in (10, 7, 10)]
    queries = _unit(rng.normal(size=(q, 8)))
    cands = [rng.integers(0, 300, size=(10, 50)) for _ in range(q)]
    refs = [set(rng.choice(300, size=4, replace=False).tolist()) for _ in range(q)]
    runs = [rng.normal(size=(5, 10, 8)) for _ in range(q)]
    res = M_metrics.evaluate_sets(
        items,
        rows,
        queries,
        cat,
        references=refs,
        candidates=cands,
        budget_per_row=20,
        run_row_embeddings=runs,
        mrecall_k=5,
    )
    assert {"recall@200", "hit@200", "mrecall@5", "vendi", "vendi_runs"} <= set(res.means)
    expected = M.recall_at_k([M.union_candidates(c, 20) for c in cands], refs)
    np.testing.assert_allclose(res.per_query["recall@200"], expected)
    # vendi is always the Vendi of the k items; the paper's Vendi over runs is vendi_runs
    np.testing.assert_allclose(res.per_query["vendi_runs"], [float(M.vendi_over_runs(r)) for r in runs])
    np.testing.assert_allclose(res.per_query["vendi"], [float(M.vendi_score(cat[i])) for i in items])
    fair = M.fair_budget(300, 10)
    assert res.fair_budget == fair == 10
    expected = M.recall_at_k([M.round_robin_union(c, fair) for c in cands], refs)
    np.testing.assert_allclose(res.per_query["recall_at_fair"], expected)
    # ragged sets: the 7-row set is scored on its 7 rows only
    assert res.per_query["row_groundedness"][1] == pytest.approx(float(M.groundedness(rows[1], cat)))
    assert res.per_query["row_diversity"][1] == pytest.approx(float(M.diversity(cat[items[1]])))
    assert np.isnan(res.per_query["category_coverage"]).all()  # no categories given
    with pytest.raises(ValueError, match="^budget_per_row"):
        M_metrics.evaluate_sets(items, rows, queries, cat, references=refs, budget_per_row=3)
    with pytest.raises(ValueError, match="^query_embeddings"):
        M_metrics.evaluate_sets(items, rows, queries[:2], cat)
    with pytest.raises(ValueError, match=r"^item_indices\[0\]: expected ids < 300"):
        M_metrics.evaluate_sets([[300]], rows[:1], queries[:1], cat)


def test_evaluate_sets_without_references_has_only_oar_keys() -> None:
    cat = np.eye(3)
    res = M_metrics.evaluate_sets([[0, 1, -1]], [cat[:2]], cat[:1], cat)  # -1 (no item) is ignored
    assert set(res.means) == {
        "vendi",
        "item_relevance",
        "row_groundedness",
        "row_diversity",
        "row_alignment",
        "row_composite",
        "ild",
    }
    assert res.means["row_diversity"] == pytest.approx(1.0)
    assert res.fair_budget is None


def test_evaluate_sets_accepts_torch_and_float16_catalog() -> None:
    rng = _rng(16)
    emb = _unit(rng.normal(size=(50, 8)))
    cat16 = torch.from_numpy(emb).half()
    items = torch.tensor([[0, 1, 2], [3, 4, 5]])
    rows = torch.from_numpy(emb[[0, 1, 2, 3, 4, 5]].reshape(2, 3, 8)).float()
    queries = torch.from_numpy(_unit(rng.normal(size=(2, 8)))).float()
    res = M_metrics.evaluate_sets(items, rows, queries, cat16, references=[{0}, {9}])
    ref = M_metrics.evaluate_sets(items.numpy(), rows.numpy(), queries.numpy(), emb, references=[{0}, {9}])
    for key in ref.means:
        assert res.means[key] == pytest.approx(ref.means[key], abs=2e-3, nan_ok=True), key
    assert res.means["row_groundedness"] == pytest.approx(1.0, abs=1e-3)


def test_fixed_quota_keys_count_set_items_not_rows() -> None:
    """A method with more candidate rows than set items (query-anchored rows) is scored at the same K =
    k * b as everyone else: floor(K / L) per row, key recall@{k * b}."""
    cat = np.eye(8)
    items = np.array([[0, 4]])  # k = 2 items
    rows = cat[[0, 4]][None]
    cand = [np.array([[0, 1, 2], [4, 5, 6], [7, 3, 2]])]  # L = 3 rows
    res = M_metrics.evaluate_sets(
        items, rows, cat[:1], cat, references=[{7, 5}], candidates=cand, budget_per_row=[3], fair_k=2
    )
    assert "recall@6" in res.per_query and "recall@9" not in res.per_query
    # K = 6, floor(6 / 3) = 2 per row: {0, 1, 4, 5, 7, 3} holds both reference items
    np.testing.assert_allclose(res.per_query["recall@6"], [1.0])
