"""Query-time filters inside the kernels (issue 13, item 4): ``ops.knn(..., allowed=mask)`` and
``ops.ground_sets(..., allowed=mask)`` against the pure-PyTorch reference, on every SIMD clone."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import r4t_fast
from r4t_fast import ops
from r4t_fast.kernels import _backend
from r4t_fast.kernels import reference as ref

SETTINGS = settings(
    max_examples=int(os.environ.get("R4T_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    derandomize=True,  # reproducible: never seeded from the clock
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CLONES = [c for c in r4t_fast.build_info()["simd_clones"] if "unsupported" not in c]


def _int_data(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Small integers as float32: every score is exact, so ids (tie rule included) can be compared exactly."""
    return torch.randint(-3, 4, shape, generator=g).float()


def _mask(g: torch.Generator, n: int, density: float) -> torch.Tensor:
    return torch.rand(n, generator=g) < density


@pytest.mark.parametrize("simd", CLONES)
@pytest.mark.parametrize("B", [1, 5, 16, 53])  # direct path, and GEMM with 1-3 query vectors
@pytest.mark.parametrize("density", [0.0, 0.002, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_knn_allowed_matches_reference_exactly(simd, B, density, metric):
    g = torch.Generator().manual_seed(B * 100 + int(density * 1000))
    N, d, k = 1500, 24, 12
    q, c = _int_data(g, B, d), _int_data(g, N, d)
    m = _mask(g, N, density)
    with _backend.simd(simd):
        s, i = ops.knn(q, c, k, metric=metric, allowed=m)
    rs, ri = ref.knn(q, c, k, metric, allowed=m)
    assert torch.equal(i, ri)
    assert torch.equal(s, rs)
    real = i[i >= 0]
    assert bool(m[real].all())  # only allowed rows come back
    assert int((i[0] >= 0).sum()) == min(k, int(m.sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_knn_allowed_fp16_and_numpy(dtype, rng):
    N, d = 700, 40
    c = torch.randn(N, d, generator=rng).to(dtype)
    q = torch.randn(9, d, generator=rng)
    m = torch.rand(N, generator=rng) < 0.3
    s, i = ops.knn(q, c, 8, allowed=m)
    rs, ri = ref.knn(q, c.float(), 8, allowed=m)
    assert torch.allclose(s, rs, atol=1e-4)
    sn, inp = ops.knn(q.numpy(), c.numpy(), 8, allowed=m.numpy())
    np.testing.assert_array_equal(inp, i.numpy())


def test_knn_all_filtered_gives_sentinels_and_mask_errors():
    q, c = torch.randn(3, 4), torch.randn(10, 4)
    s, i = ops.knn(q, c, 4, allowed=torch.zeros(10, dtype=torch.bool))
    assert bool((i == -1).all()) and bool(torch.isneginf(s).all())
    s, i = ops.knn(q, c, 4, metric="l2", allowed=torch.zeros(10, dtype=torch.bool))
    assert bool(torch.isposinf(s).all())
    with pytest.raises(ValueError, match=r"allowed: expected a bool mask \(10,\) .* got uint8 \(10,\)"):
        ops.knn(q, c, 2, allowed=torch.ones(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"allowed: expected a bool mask \(10,\) .* got bool \(9,\)"):
        ops.knn(q, c, 2, allowed=torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="allowed: expected a torch.Tensor, numpy.ndarray"):
        ops.knn(q, c, 2, allowed=[True] * 10)
    with pytest.raises(ValueError, match="allowed: expected a bool mask"):
        ops.ground_sets(torch.randn(1, 2, 4), c, allowed=np.ones(10, np.int64))


def test_knn_plan_counts_allowed_rows():
    m = torch.zeros(1000, dtype=torch.bool)
    m[::10] = True
    plan = ops.knn_plan(4, 1000, 16, 500, allowed=m)
    assert plan["n_allowed"] == 100 and plan["keff"] == 100


@pytest.mark.parametrize("simd", CLONES)
@pytest.mark.parametrize("n_allowed", [0, 3, 10, 40, 400])
def test_ground_sets_allowed_gives_distinct_allowed_items(simd, n_allowed, rng):
    B, L, N, d = 6, 10, 400, 16
    c = torch.nn.functional.normalize(torch.randn(N, d, generator=rng), dim=1)
    rows = c[torch.randint(0, 5, (B, L), generator=rng)] + 0.05 * torch.randn(B, L, d, generator=rng)
    m = torch.zeros(N, dtype=torch.bool)
    m[torch.randperm(N, generator=rng)[:n_allowed]] = True
    with _backend.simd(simd):
        ids, scores = ops.ground_sets(rows, c, allowed=m)
    rids, rscores = ref.ground_sets(rows, c, allowed=m)
    assert torch.equal(ids, rids)
    assert torch.allclose(scores, rscores, atol=1e-5)
    for b in range(B):
        taken = [x for x in ids[b].tolist() if x >= 0]
        assert len(taken) == len(set(taken)) == min(L, n_allowed)  # k distinct allowed items
        assert all(bool(m[x]) for x in taken)
    assert bool(torch.isneginf(scores[ids < 0]).all())  # the documented sentinel when fewer are allowed


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 40),
    N=st.integers(1, 300),
    d=st.integers(1, 40),
    k=st.integers(1, 40),
    density=st.sampled_from([0.0, 0.01, 0.2, 0.7, 1.0]),
    metric=st.sampled_from(["ip", "l2"]),
    f16=st.booleans(),
)
def test_property_knn_allowed_equals_reference(seed, B, N, d, k, density, metric, f16):
    g = torch.Generator().manual_seed(seed)
    q, c = _int_data(g, B, d), _int_data(g, N, d)
    m = _mask(g, N, density)
    s, i = ops.knn(q, c.half() if f16 else c, k, metric=metric, allowed=m)  # small ints are exact in fp16
    rs, ri = ref.knn(q, c, k, metric, allowed=m)
    assert torch.equal(i, ri) and torch.equal(s, rs)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 6),
    L=st.integers(1, 8),
    N=st.integers(1, 60),
    d=st.integers(1, 12),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
)
def test_property_ground_sets_allowed_equals_reference(seed, B, L, N, d, density):
    g = torch.Generator().manual_seed(seed)
    rows, c = _int_data(g, B, L, d), _int_data(g, N, d)
    m = _mask(g, N, density)
    ids, scores = ops.ground_sets(rows, c, allowed=m)
    rids, rscores = ref.ground_sets(rows, c, allowed=m)
    assert torch.equal(ids, rids) and torch.equal(scores, rscores)
    for b in range(B):
        taken = [x for x in ids[b].tolist() if x >= 0]
        assert len(taken) == len(set(taken)) == min(L, int(m.sum()))


@pytest.mark.cuda
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("B", [1, 12, 70])
def test_knn_and_ground_sets_allowed_cuda_match_cpu(metric, B, rng):
    N, d = 5000, 64
    c = _int_data(rng, N, d)
    q = _int_data(rng, B, d)
    m = torch.rand(N, generator=rng) < 0.2
    s, i = ops.knn(q, c, 16, metric=metric, allowed=m)
    gs, gi = ops.knn(q.cuda(), c.cuda(), 16, metric=metric, allowed=m.cuda())
    assert torch.equal(gi.cpu(), i) and torch.equal(gs.cpu(), s)
    rows = _int_data(rng, 4, 10, d)
    ids, _ = ops.ground_sets(rows, c, allowed=m)
    gids, _ = ops.ground_sets(rows.cuda(), c.cuda(), allowed=m.cuda())
    assert torch.equal(gids.cpu(), ids)
