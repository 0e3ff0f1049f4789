"""The compiled kernels against the pure-PyTorch reference (r4t_fast.reference), plus input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import r4t_fast
from r4t_fast import ops
from r4t_fast.kernels import reference as ref


def _randn(*shape, g):
    return torch.randn(*shape, generator=g)


def _assert_knn_matches(s, i, rs, ri, catalog, queries, metric, rtol=1e-5):
    """Tie-tolerant comparison: sorted scores agree; every returned id really has its score."""
    finite = torch.isfinite(rs)
    assert torch.equal(torch.isfinite(s), finite)
    assert torch.equal(i[~finite], ri[~finite])  # sentinels in the same slots
    assert torch.allclose(s[finite], rs[finite], rtol=rtol, atol=rtol)
    q = queries.double()
    for b in range(s.shape[0]):
        valid = i[b] >= 0
        c = catalog[i[b][valid]].double()
        true = c @ q[b] if metric == "ip" else ((c - q[b]) ** 2).sum(1)
        assert torch.allclose(true.float(), s[b][valid], rtol=rtol, atol=1e-4)
        assert len(set(i[b][valid].tolist())) == int(valid.sum())


GRID = [
    # B, N, d, k
    (1, 1, 4, 1),
    (1, 100, 8, 5),
    (3, 10, 16, 10),  # k = N
    (3, 10, 16, 25),  # k > N: sentinels
    (5, 777, 33, 7),  # direct path (B < 6), odd d
    (6, 1000, 64, 10),  # packed path, exactly one micro-tile of queries
    (13, 1, 4, 3),  # N = 1
    (37, 2049, 128, 10),  # ragged panels and query blocks
    (64, 5000, 384, 16),
]


@pytest.mark.parametrize("B,N,d,k", GRID)
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_knn_matches_reference(B, N, d, k, metric, dtype, rng):
    q = _randn(B, d, g=rng)
    c = _randn(N, d, g=rng).to(dtype)
    s, i = ops.knn(q, c, k, metric=metric)
    rs, ri = ref.knn(q, c.float(), k, metric)
    assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == (B, k) == i.shape
    _assert_knn_matches(s, i, rs, ri, c.float(), q, metric)
    # Sorted best first.
    fs = s.clone()
    fs[~torch.isfinite(fs)] = -1e30 if metric == "ip" else 1e30
    diffs = fs[:, :-1] - fs[:, 1:]
    assert bool((diffs >= 0).all()) if metric == "ip" else bool((diffs <= 0).all())


def test_knn_sentinel_values():
    c = torch.eye(3)
    s, i = ops.knn(torch.ones(2, 3), c, 5)
    assert i[:, 3:].eq(-1).all() and torch.isneginf(s[:, 3:]).all()
    s, i = ops.knn(torch.ones(2, 3), c, 5, metric="l2")
    assert i[:, 3:].eq(-1).all() and torch.isposinf(s[:, 3:]).all()


def test_knn_ties_by_ascending_id():
    c = torch.ones(50, 8)  # every item scores the same
    for B in (1, 7):
        s, i = ops.knn(torch.ones(B, 8), c, 10)
        assert i.tolist() == [list(range(10))] * B


@pytest.mark.parametrize("B", [3, 20])  # direct path (B < vector width) and GEMM path
def test_knn_threads_agree(B, rng):
    # Big enough that the kernel really splits the catalog over two threads (~4M multiply-adds per thread
    # are needed): the plan says so, and equal rows straddle the thread boundary to exercise the tie rule
    # (equal scores -> ascending id) across the per-thread heaps.
    N, d = 60000, 48
    q, c = _randn(B, d, g=rng), _randn(N, d, g=rng)
    c[N // 2 - 3 : N // 2 + 3] = q[0] * 10  # six identical best rows for query 0, three per thread
    if r4t_fast.build_info()["openmp"]:
        assert ops.knn_plan(B, N, d, 9, num_threads=2)["threads"] == 2
    assert ops.knn_plan(B, N, d, 9, num_threads=1)["threads"] == 1
    a = ops.knn(q, c, 9, num_threads=1)
    b = ops.knn(q, c, 9, num_threads=2)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert a[1][0, :6].tolist() == list(range(N // 2 - 3, N // 2 + 3))
    rs, ri = ref.knn(q, c, 9)
    _assert_knn_matches(a[0], a[1], rs, ri, c, q, "ip", rtol=1e-4)


def test_knn_non_contiguous_and_numpy(rng):
    base_q = _randn(10, 64, g=rng)
    base_c = _randn(500, 96, g=rng)
    q = base_q[::2, :32]  # row-strided view: no copy needed
    c = base_c[:, ::3]  # column-strided: copied internally
    s, i = ops.knn(q, c, 5)
    rs, ri = ref.knn(q.contiguous(), c.contiguous(), 5)
    _assert_knn_matches(s, i, rs, ri, c.contiguous(), q.contiguous(), "ip")
    sn, iN = ops.knn(q.numpy(), c.contiguous().numpy(), 5)
    assert isinstance(sn, np.ndarray) and isinstance(iN, np.ndarray)
    np.testing.assert_array_equal(iN, i.numpy())


def test_knn_large_batch_chunks(rng):
    # More queries than one internal chunk (4096) to cover the outer loop.
    q, c = _randn(4100, 8, g=rng), _randn(300, 8, g=rng)
    s, i = ops.knn(q, c, 3)
    rs, ri = ref.knn(q, c, 3)
    _assert_knn_matches(s, i, rs, ri, c, q, "ip")


def test_knn_empty_batch():
    s, i = ops.knn(torch.zeros(0, 4), torch.randn(5, 4), 3)
    assert s.shape == (0, 3) and i.shape == (0, 3)


@pytest.mark.parametrize(
    "queries,catalog,k,match",
    [
        (
            torch.zeros(4, 8, dtype=torch.float64),
            torch.zeros(5, 8),
            1,
            r"queries: expected float32 \(B, d\), got float64 \(4, 8\)",
        ),
        (torch.zeros(4), torch.zeros(5, 8), 1, r"queries: expected float32 \(B, d\), got float32 \(4,\)"),
        (torch.zeros(4, 8), torch.zeros(5, 7), 1, r"catalog: expected last dimension 8"),
        (torch.zeros(4, 8), torch.zeros(0, 8), 1, r"catalog: is empty"),
        (torch.zeros(4, 8), torch.zeros(5, 8, dtype=torch.int32), 1, r"catalog: expected float32 or float16"),
        (torch.full((4, 8), math.nan), torch.zeros(5, 8), 1, r"queries: contains 32 non-finite"),
        (torch.zeros(4, 8), torch.full((5, 8), math.inf), 1, r"catalog: contains 40 non-finite"),
        (torch.zeros(4, 8), torch.zeros(5, 8), 0, r"k: expected a positive int, got 0"),
        (torch.zeros(4, 8), torch.zeros(5, 8), 2.0, r"k: expected a positive int, got 2.0"),
        (torch.zeros(4, 0), torch.zeros(5, 0), 1, r"queries: feature dimension is 0"),
    ],
)
def test_knn_bad_inputs(queries, catalog, k, match):
    with pytest.raises(ValueError, match=match):
        ops.knn(queries, catalog, k)


def test_knn_bad_types_and_metric():
    with pytest.raises(TypeError, match="queries: expected a torch.Tensor, numpy.ndarray or cupy.ndarray"):
        ops.knn([[1.0, 2.0]], torch.zeros(3, 2), 1)
    with pytest.raises(ValueError, match=r"metric: expected one of \['ip', 'l2'\], got 'cos'"):
        ops.knn(torch.zeros(1, 2), torch.zeros(3, 2), 1, metric="cos")


def test_huge_but_finite_catalog_is_accepted():
    c = torch.full((10, 4), 3e38)  # the fast finiteness pre-check overflows; the exact check passes
    s, i = ops.knn(torch.zeros(1, 4), c, 2)
    assert i.tolist() == [[0, 1]]


# ----------------------------------------------------------------------------- grounding
@pytest.mark.parametrize(
    "B,L,N,d,cand", [(1, 1, 1, 4, None), (4, 10, 200, 16, None), (3, 12, 12, 8, 12), (5, 6, 40, 8, 3)]
)
def test_ground_sets_matches_reference_and_never_repeats(B, L, N, d, cand, rng):
    # Rows drawn near a few catalog items so that rows compete for the same items.
    c = torch.nn.functional.normalize(_randn(N, d, g=rng), dim=1)
    centers = c[torch.randint(0, min(N, 3), (B, L), generator=rng)]
    rows = centers + 0.05 * _randn(B, L, d, g=rng)
    ids, scores = ops.ground_sets(rows, c, candidates=cand)
    rids, rscores = ref.ground_sets(rows, c, cand)
    assert torch.equal(ids, rids)
    assert torch.allclose(scores, rscores, atol=1e-5)
    for b in range(B):
        taken = [x for x in ids[b].tolist() if x >= 0]
        assert len(taken) == len(set(taken))
    if cand is None or cand >= L:
        assert bool((ids >= 0).all())  # N >= L and C >= L: every row is grounded


def test_ground_sets_catalog_smaller_than_set():
    c = torch.eye(3)
    rows = torch.eye(3)[torch.tensor([[0, 0, 1, 2, 2]])]
    ids, scores = ops.ground_sets(rows, c)
    got = ids[0].tolist()
    assert sorted(x for x in got if x >= 0) == [0, 1, 2] and got.count(-1) == 2
    assert torch.isneginf(scores[0][ids[0] < 0]).all()


def test_ground_tie_rule():
    # Two rows want the same item with the same score: the lower row wins; the other takes its next one.
    cs = torch.tensor([[[1.0, 0.5], [1.0, 0.9]]])
    ci = torch.tensor([[[7, 3], [7, 4]]])
    ids, scores = ops.ground(cs, ci)
    assert ids.tolist() == [[7, 4]] and scores.tolist() == [[1.0, 0.8999999761581421]]
    ids, _ = ops.ground(-cs, ci, higher_is_better=False)
    assert ids.tolist() == [[7, 4]]


def test_ground_bad_inputs():
    with pytest.raises(ValueError, match=r"cand_ids: expected int64 \(S, L, C\)"):
        ops.ground(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="shapes differ"):
        ops.ground(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"rows: expected float32 \(B, L, d\)"):
        ops.ground_sets(torch.zeros(2, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="candidates: expected a positive int"):
        ops.ground_sets(torch.zeros(1, 2, 3), torch.ones(4, 3), candidates=0)


# ----------------------------------------------------------------------------- set statistics
def _vendi_numpy(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    K = x @ x.T
    lam = np.linalg.eigvalsh(K / len(x))
    lam = lam[lam > 1e-15]
    return float(np.exp(-(lam * np.log(lam)).sum()))


@pytest.mark.parametrize("S,L,d", [(1, 1, 3), (4, 2, 5), (7, 10, 128), (3, 32, 16), (2, 64, 8)])
def test_set_stats_against_float64_numpy(S, L, d, rng):
    x = _randn(S, L, d, g=rng)
    vendi, mean_cos = ops.set_stats(x)
    for s in range(S):
        assert vendi[s].item() == pytest.approx(_vendi_numpy(x[s].numpy()), rel=1e-5)
        xs = torch.nn.functional.normalize(x[s].double(), dim=1)
        K = xs @ xs.T
        want = 0.0 if L < 2 else float((K.sum() - L) / (L * (L - 1)))
        assert mean_cos[s].item() == pytest.approx(want, abs=1e-6)
    rv, rc = ref.set_stats(x)
    assert torch.allclose(vendi, rv, rtol=1e-5) and torch.allclose(mean_cos, rc, atol=1e-6)


def test_vendi_extremes_and_lengths():
    same = torch.ones(1, 5, 4)
    assert ops.vendi_score(same).item() == pytest.approx(1.0, abs=1e-5)
    ortho = torch.eye(6).reshape(1, 6, 6)
    assert ops.vendi_score(ortho).item() == pytest.approx(6.0, rel=1e-6)
    x = torch.eye(6).reshape(1, 6, 6).repeat(3, 1, 1)
    v = ops.vendi_score(x, torch.tensor([0, 2, 6]))
    assert v.tolist() == pytest.approx([0.0, 2.0, 6.0], rel=1e-6)
    assert ops.mean_pairwise_cosine(same).item() == pytest.approx(1.0, abs=1e-6)


def test_set_stats_bad_inputs():
    with pytest.raises(ValueError, match=r"x: expected float32 \(S, L, d\)"):
        ops.set_stats(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"lengths: expected int64 \(2,\)"):
        ops.set_stats(torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"lengths: values must lie in \[0, 3\]"):
        ops.set_stats(torch.zeros(2, 3, 4), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="x: contains"):
        ops.set_stats(torch.full((1, 2, 2), math.nan))


def test_nearest_distance(rng):
    c = _randn(300, 12, g=rng)
    rows = _randn(4, 5, 12, g=rng)
    got = ops.nearest_distance(rows, c)
    want = ref.nearest_distance(rows, c)
    assert got.shape == (4, 5)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    brute = torch.cdist(rows.reshape(-1, 12).double(), c.double()).min(1).values.reshape(4, 5)
    assert torch.allclose(got.double(), brute, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- fused sampler step
@pytest.mark.parametrize("guidance,noise_scale", [(0.0, 0.0), (0.1, 0.0), (1.5, 0.3)])
def test_edm_step_matches_reference(guidance, noise_scale, rng):
    x, fc, fu, z = (_randn(5, 12, 16, g=rng) for _ in range(4))
    kw = dict(sigma=2.0, c_skip=0.1, c_out=0.3, guidance=guidance, h=-0.4, noise_scale=noise_scale)
    den = torch.empty_like(x)
    out, D = ops.edm_step(x, fc, fu if guidance else None, z if noise_scale else None, denoised=den, **kw)
    rx, rD = ref.edm_step(x, fc, fu if guidance else None, z if noise_scale else None, **kw)
    assert torch.allclose(out, rx, atol=1e-6) and torch.allclose(D, rD, atol=1e-6)
    inplace = x.clone()
    ops.edm_step(inplace, fc, fu if guidance else None, z if noise_scale else None, out=inplace, **kw)
    assert torch.allclose(inplace, rx, atol=1e-6)


def test_edm_step_bad_inputs():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="f_uncond: required when guidance != 0"):
        ops.edm_step(x, x, sigma=1.0, c_skip=0.0, c_out=1.0, h=-0.1, guidance=0.5)
    with pytest.raises(ValueError, match="sigma: expected > 0"):
        ops.edm_step(x, x, sigma=0.0, c_skip=0.0, c_out=1.0, h=-0.1)
    with pytest.raises(ValueError, match=r"f_cond: expected contiguous float32 \(3, 4\)"):
        ops.edm_step(x, torch.zeros(4, 3).T, sigma=1.0, c_skip=0.0, c_out=1.0, h=-0.1)


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize(
    "B,N,d,k", [(1, 100, 8, 5), (37, 5000, 128, 10), (3, 10, 16, 25), (256, 20000, 384, 64)]
)
def test_knn_cuda_matches_reference(B, N, d, k, metric, dtype, rng):
    q = _randn(B, d, g=rng)
    c = _randn(N, d, g=rng).to(dtype)
    s, i = ops.knn(q.cuda(), c.cuda(), k, metric=metric)
    rs, ri = ref.knn(q, c.float(), k, metric)
    _assert_knn_matches(s.cpu(), i.cpu(), rs, ri, c.float(), q, metric, rtol=1e-4)


@pytest.mark.cuda
def test_ground_and_stats_cuda_match_cpu(rng):
    c = torch.nn.functional.normalize(_randn(500, 32, g=rng), dim=1)
    rows = c[torch.randint(0, 20, (64, 10), generator=rng)] + 0.05 * _randn(64, 10, 32, g=rng)
    ids, scores = ops.ground_sets(rows, c)
    gids, gscores = ops.ground_sets(rows.cuda(), c.cuda())
    assert torch.equal(gids.cpu(), ids)
    v, m = ops.set_stats(rows)
    gv, gm = ops.set_stats(rows.cuda())
    assert torch.allclose(gv.cpu(), v, rtol=1e-5) and torch.allclose(gm.cpu(), m, atol=1e-5)


@pytest.mark.cuda
def test_edm_step_cuda_matches_reference(rng):
    x, fc, fu, z = (_randn(7, 12, 16, g=rng) for _ in range(4))
    kw = dict(sigma=2.0, c_skip=0.1, c_out=0.3, guidance=0.5, h=-0.4, noise_scale=0.2)
    out, _ = ops.edm_step(x.cuda(), fc.cuda(), fu.cuda(), z.cuda(), **kw)
    rx, _ = ref.edm_step(x, fc, fu, z, **kw)
    assert torch.allclose(out.cpu(), rx, atol=1e-5)


# ------------------------------------------------------------------------------ small-B knn path
_CLONES = [c for c in r4t_fast.build_info()["simd_clones"] if "unsupported" not in c]
_WIDTH = {"x86-64-v4": 16, "x86-64-v3": 8, "baseline": 4}


@pytest.mark.parametrize("simd", _CLONES)
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_knn_small_batch_path_matches_reference(simd, metric, rng):
    """2 <= B < the vector width: the small-B kernel (every query per catalog row, one reduction per row)
    against the reference, k = 1, k = n, k > n (sentinels), non-contiguous queries, fp16 catalog, a
    filter; ties tolerated (sorted scores)."""
    from r4t_fast.kernels import _backend

    N, d = 301, 37  # odd d: a partial vector at the end of every row
    c = _randn(N, d, g=rng)
    width = _WIDTH.get(simd.split(" ")[0], 4)
    with _backend.simd(simd.split(" ")[0]):
        for B in range(2, width):
            assert ops.knn_plan(B, N, d, 5)["path"] == "small"
            base = _randn(2 * B, 2 * d, g=rng)
            q = base[::2, ::2]  # non-contiguous both ways
            for k in (1, 7, N, N + 4):
                s, i = ops.knn(q, c, k, metric=metric)
                rs, ri = ref.knn(q.contiguous(), c, k, metric)
                _assert_knn_matches(s, i, rs, ri, c, q.contiguous(), metric)
            s16, i16 = ops.knn(q, c.half(), 7, metric=metric)
            rs16, ri16 = ref.knn(q.contiguous(), c.half().float(), 7, metric)
            _assert_knn_matches(s16, i16, rs16, ri16, c.half().float(), q.contiguous(), metric)
            allowed = torch.zeros(N, dtype=torch.bool)
            allowed[::3] = True
            sa, ia = ops.knn(q, c, 7, metric=metric, allowed=allowed)
            assert bool((ia % 3 == 0).all())
            ra, _ = ref.knn(q.contiguous(), c[::3].contiguous(), 7, metric)
            torch.testing.assert_close(sa, ra, rtol=1e-4, atol=1e-4)
    assert ops.knn_plan(1, N, d, 5)["path"] == "direct"  # a single query keeps the direct path


def _knn_under_env(var: str, flags: tuple[str, ...], inputs: dict, body: str, tmp_path) -> dict:
    """Run ``body`` (Python; ``t`` = the saved ``inputs``, result saved from ``out``) in a fresh process per
    value of the environment variable ``var`` (the kernel reads such switches once per process)."""
    import os
    import subprocess
    import sys

    torch.save(inputs, tmp_path / "in.pt")
    code = f"import sys, torch; from r4t_fast import ops; t = torch.load(sys.argv[1]); {body}; "
    code += "torch.save(out, sys.argv[2])"
    outs = {}
    for flag in flags:
        out = tmp_path / f"out{flag}.pt"
        env = {**os.environ, var: flag}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(out)], env=env, check=True)
        outs[flag] = torch.load(out)
    return outs


def test_knn_small_path_equals_the_direct_path(rng, tmp_path):
    """R4T_KNN_SMALL=0 (read once per process) falls back to the direct path: same ids, scores within
    rounding, on the same inputs."""
    inputs = {"q": _randn(11, 384, g=rng), "c": _randn(2000, 384, g=rng)}
    body = (
        "s, i = ops.knn(t['q'], t['c'], 10, num_threads=1); "
        "out = {'s': s, 'i': i, 'path': ops.knn_plan(11, 2000, 384, 10)['path']}"
    )
    outs = _knn_under_env("R4T_KNN_SMALL", ("1", "0"), inputs, body, tmp_path)
    if r4t_fast.build_info()["simd"].startswith("x86-64-v4"):  # B = 11 < 16: small unless turned off
        assert (outs["1"]["path"], outs["0"]["path"]) == ("small", "direct")
    assert torch.equal(outs["1"]["i"], outs["0"]["i"])
    torch.testing.assert_close(outs["1"]["s"], outs["0"]["s"], rtol=1e-5, atol=1e-5)


def test_knn_prefetch_switch_changes_the_plan_not_the_results(rng, tmp_path):
    """The direct / small-B paths prefetch fp32 catalogs over 16 MiB (knn_plan says so); R4T_KNN_PREFETCH
    (read once per process) forces it off or on, with the same ids and scores."""
    assert ops.knn_plan(2, 20_000, 384, 10)["prefetch"] is True  # 30.7 MB: over 16 MiB
    assert ops.knn_plan(1, 20_000, 384, 10)["prefetch"] is True
    assert ops.knn_plan(1, 10_000, 384, 10)["prefetch"] is False  # 15.4 MB
    assert ops.knn_plan(2, 2_000, 384, 10)["prefetch"] is False
    assert ops.knn_plan(64, 20_000, 384, 10)["prefetch"] is False  # the GEMM path (B >= W) tiles instead
    inputs = {"q": _randn(11, 64, g=rng), "c": _randn(3000, 64, g=rng)}
    body = (
        "r = [ops.knn(t['q'][:b], t['c'], 7, num_threads=2) for b in (1, 11)]; "
        "out = {'r': r, 'pf': ops.knn_plan(2, 3000, 64, 7)['prefetch']}"
    )
    outs = _knn_under_env("R4T_KNN_PREFETCH", ("0", "1"), inputs, body, tmp_path)
    assert (outs["0"]["pf"], outs["1"]["pf"]) == (False, True)
    for (s0, i0), (s1, i1) in zip(outs["0"]["r"], outs["1"]["r"], strict=True):
        assert torch.equal(i0, i1) and torch.equal(s0, s1)
