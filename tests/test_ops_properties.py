"""Property-based tests (hypothesis) of the compiled ops against the pure-PyTorch / numpy reference.

Two kinds of data: small integers stored as float32 (every score is exact, so results, ids and the tie
rule included, must equal the float64 reference exactly) and Gaussian data (scores within a measured
float32 tolerance; ids compared through their true scores, tie-tolerant). Examples are derandomized
(reproducible, never seeded from the clock); R4T_HYPOTHESIS_EXAMPLES sets how many per test.
"""

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
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CLONES = [c for c in r4t_fast.build_info()["simd_clones"] if "unsupported" not in c]

seeds = st.integers(0, 2**31 - 1)
metrics = st.sampled_from(["ip", "l2"])


def _ints(g: torch.Generator, *shape: int, lo: int = -3, hi: int = 3) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=g).float()


@SETTINGS
@given(
    seed=seeds,
    B=st.integers(0, 70),
    N=st.integers(1, 400),
    d=st.integers(1, 80),
    k=st.integers(1, 60),
    metric=metrics,
    f16=st.booleans(),
    row_step=st.integers(1, 3),
)
def test_knn_exact_on_integer_data(seed, B, N, d, k, metric, f16, row_step):
    """Exact scores: ids must follow the tie rule (equal scores by ascending id) exactly."""
    g = torch.Generator().manual_seed(seed)
    q = _ints(g, B * row_step, d)[::row_step]  # row-strided views need no copy
    c = _ints(g, N, d, lo=-2, hi=2)
    s, i = ops.knn(q, c.half() if f16 else c, k, metric=metric)
    rs, ri = ref.knn(q.contiguous(), c, k, metric)
    assert torch.equal(i, ri) and torch.equal(s, rs)


@SETTINGS
@given(
    seed=seeds,
    B=st.integers(1, 40),
    N=st.integers(1, 500),
    d=st.integers(1, 130),
    k=st.integers(1, 30),
    metric=metrics,
)
def test_knn_gaussian_within_float32_tolerance(seed, B, N, d, k, metric):
    g = torch.Generator().manual_seed(seed)
    q, c = torch.randn(B, d, generator=g), torch.randn(N, d, generator=g)
    s, i = ops.knn(q, c, k, metric=metric)
    rs, ri = ref.knn(q, c, k, metric)
    kk = min(k, N)
    assert torch.equal(i[:, kk:], ri[:, kk:]) and bool((i[:, :kk] >= 0).all())
    tol = 1e-5 * (d + 1) * (4 if metric == "l2" else 1)
    assert torch.allclose(s[:, :kk], rs[:, :kk], rtol=1e-5, atol=tol)  # sorted scores agree
    true = (
        ((c[i[:, :kk]].double() - q[:, None].double()) ** 2).sum(-1)
        if metric == "l2"
        else ((c[i[:, :kk]].double() * q[:, None].double()).sum(-1))
    )
    assert torch.allclose(true.float(), s[:, :kk], rtol=1e-5, atol=tol)  # each id really has its score
    for b in range(B):
        assert len(set(i[b, :kk].tolist())) == kk


@SETTINGS
@given(
    seed=seeds,
    B=st.integers(1, 60),
    N=st.integers(1, 300),
    d=st.integers(1, 50),
    k=st.integers(1, 20),
    metric=metrics,
)
def test_knn_simd_clones_and_thread_counts_agree(seed, B, N, d, k, metric):
    g = torch.Generator().manual_seed(seed)
    q, c = _ints(g, B, d), _ints(g, N, d)
    want = ref.knn(q, c, k, metric)
    for simd in CLONES:
        with _backend.simd(simd):
            for threads in (1, 2):
                s, i = ops.knn(q, c, k, metric=metric, num_threads=threads)
                assert torch.equal(i, want[1]) and torch.equal(s, want[0]), (simd, threads)


def test_l2_without_cancellation_for_near_identical_vectors():
    """||q - c||^2 is accumulated directly, so a distance of 1e-6 next to norms of 1e3 survives (the
    expansion |q|^2 + |c|^2 - 2 q.c would lose it entirely in float32)."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(64, 32, generator=g) * 1000
    q = c[[5, 17]].clone()
    q[:, 3] += 1e-3  # squared distance 1e-6 to rows 5 and 17
    for simd in CLONES:
        with _backend.simd(simd):
            for B in (2, 20):  # direct and GEMM paths
                qq = q.repeat(B // 2, 1)
                s, i = ops.knn(qq, c, 1, metric="l2")
                assert i[:, 0].tolist() == [5, 17] * (B // 2)
                exact = ((qq.double() - c[i[:, 0]].double()) ** 2).sum(1)
                assert torch.allclose(s[:, 0].double(), exact, rtol=1e-3), (simd, s[:, 0], exact)
    d = ops.nearest_distance(q, c)  # q was rounded to float32: compare with its exact distance
    exact = ((q.double() - c[[5, 17]].double()) ** 2).sum(1).sqrt()
    assert torch.allclose(d.double(), exact, rtol=1e-3) and bool((exact > 5e-4).all())


@SETTINGS
@given(
    seed=seeds,
    S=st.integers(0, 6),
    L=st.integers(1, 7),
    C=st.integers(1, 7),
    hib=st.booleans(),
    dup=st.booleans(),
    missing=st.floats(0, 0.5),
)
def test_ground_equals_reference(seed, S, L, C, hib, dup, missing):
    g = torch.Generator().manual_seed(seed)
    scores = _ints(g, S, L, C, lo=-2, hi=2)  # many ties
    ids = torch.randint(0, 4 if dup else 50, (S, L, C), generator=g)
    ids[torch.rand(S, L, C, generator=g) < missing] = -1
    got = ops.ground(scores, ids, higher_is_better=hib)
    want = ref.ground(scores, ids, higher_is_better=hib)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@SETTINGS
@given(
    seed=seeds,
    B=st.integers(0, 5),
    L=st.integers(1, 9),
    N=st.integers(1, 40),
    d=st.integers(1, 16),
    metric=metrics,
    cand=st.one_of(st.none(), st.integers(1, 12)),
)
def test_ground_sets_equals_reference(seed, B, L, N, d, metric, cand):
    g = torch.Generator().manual_seed(seed)
    rows, c = _ints(g, B, L, d), _ints(g, N, d)
    got = ops.ground_sets(rows, c, candidates=cand, metric=metric)
    want = ref.ground_sets(rows, c, cand, metric)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for b in range(B):
        taken = [x for x in got[0][b].tolist() if x >= 0]
        assert len(taken) == len(set(taken))
        if cand is None or cand >= L:
            assert len(taken) == min(L, N)


@SETTINGS
@given(
    seed=seeds,
    S=st.integers(0, 5),
    L=st.integers(1, 12),
    d=st.integers(1, 24),
    use_len=st.booleans(),
    zero_rows=st.booleans(),
)
def test_set_stats_equals_reference(seed, S, L, d, use_len, zero_rows):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, L, d, generator=g)
    if zero_rows and S > 0:
        x[:, 0] = 0.0
    lengths = torch.randint(0, L + 1, (S,), generator=g) if use_len else None
    counted_zero = zero_rows and S > 0 and (lengths is None or bool((lengths > 0).any()))
    if counted_zero:  # a counted all-zero row has no direction: refused, never scored (issue 22)
        with pytest.raises(ValueError, match=r"^x: row 0 of set \d+ is all zeros"):
            ops.set_stats(x, lengths)
        return
    v, m = ops.set_stats(x, lengths)
    rv, rm = ref.set_stats(x, lengths)
    assert torch.allclose(v, rv, rtol=1e-4, atol=1e-5) and torch.allclose(m, rm, atol=1e-5)
    n = torch.full((S,), L) if lengths is None else lengths
    assert bool((v <= n.float() + 1e-4).all()) and bool((v >= torch.clamp(n, max=1).float() - 1e-4).all())


@SETTINGS
@given(
    seed=seeds,
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    guidance=st.floats(-2, 4),
    noise_scale=st.floats(0, 2),
    sigma=st.floats(1e-3, 80),
    in_place=st.booleans(),
)
def test_edm_step_equals_reference(seed, shape, guidance, noise_scale, sigma, in_place):
    g = torch.Generator().manual_seed(seed)
    x, fc, fu, z = (torch.randn(*shape, generator=g) for _ in range(4))
    kw = dict(sigma=sigma, c_skip=0.3, c_out=0.6, guidance=guidance, h=-0.5 * sigma, noise_scale=noise_scale)
    want_x, want_d = ref.edm_step(x, fc, fu, z, **kw)
    xin = x.clone()
    den = torch.empty_like(x)
    got_x, got_d = ops.edm_step(xin, fc, fu, z, out=xin if in_place else None, denoised=den, **kw)
    scale = 1 + want_x.abs().max().item()
    assert torch.allclose(got_x, want_x, rtol=1e-5, atol=1e-5 * scale)
    assert torch.allclose(got_d, want_d, rtol=1e-5, atol=1e-5 * (1 + want_d.abs().max().item()))
    if in_place:
        assert got_x.data_ptr() == xin.data_ptr()


@SETTINGS
@given(
    seed=seeds,
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    N=st.integers(1, 200),
    d=st.integers(1, 20),
)
def test_nearest_distance_equals_brute_force(seed, lead, N, d):
    g = torch.Generator().manual_seed(seed)
    rows, c = torch.randn(*lead, d, generator=g), torch.randn(N, d, generator=g)
    got = ops.nearest_distance(rows, c)
    brute = torch.cdist(rows.reshape(-1, d).double(), c.double()).min(1).values.reshape(tuple(lead))
    assert got.shape == tuple(lead)
    assert torch.allclose(got.double(), brute, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(seed=seeds, B=st.integers(1, 30), N=st.integers(1, 100), d=st.integers(1, 30), k=st.integers(1, 12))
def test_numpy_and_torch_inputs_agree(seed, B, N, d, k):
    g = torch.Generator().manual_seed(seed)
    q, c = _ints(g, B, d), _ints(g, N, d)
    s, i = ops.knn(q, c, k)
    sn, i_n = ops.knn(q.numpy(), c.numpy(), k)
    assert isinstance(sn, np.ndarray) and isinstance(i_n, np.ndarray)
    np.testing.assert_array_equal(i_n, i.numpy())
    np.testing.assert_array_equal(sn, s.numpy())


@pytest.mark.cuda
@SETTINGS
@given(
    seed=seeds,
    B=st.integers(1, 70),
    N=st.integers(1, 3000),
    d=st.integers(1, 100),
    k=st.integers(1, 64),
    metric=metrics,
)
def test_knn_cuda_equals_reference_on_integer_data(seed, B, N, d, k, metric):
    g = torch.Generator().manual_seed(seed)
    q, c = _ints(g, B, d), _ints(g, N, d)
    s, i = ops.knn(q.cuda(), c.cuda(), k, metric=metric)
    rs, ri = ref.knn(q, c, k, metric)
    assert torch.equal(i.cpu(), ri) and torch.equal(s.cpu(), rs)
