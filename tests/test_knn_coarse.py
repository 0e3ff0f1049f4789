"""The knn kernel's int8 coarse path (an int8 pass over ``ops.coarse_catalog``, exact re-score), the
fused sampler's per-schedule cache, and the batch-1 helpers they came with.

The coarse path equals the exact search whenever every exact top-k row is among the int8 pass's
2k + 32: on these random unit rows the gap between rank k and rank 2k + 32 is far above the int8 error
(~1e-3), so ids must be identical and scores equal to float rounding. Tests of the path itself skip
where the CPU lacks AVX-512 VNNI (the copy is then ignored: also tested)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from r4t_fast import ops
from r4t_fast.kernels._arrays import all_finite

needs_vnni = pytest.mark.skipif(not ops.coarse_supported(), reason="this CPU / build has no AVX-512 VNNI")


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def test_coarse_catalog_codes_and_scale():
    c = _unit(50, 30, 0)  # d = 30: padded to 32 with code 128 (= 0)
    cc = ops.coarse_catalog(c)
    assert cc.codes.dtype == torch.uint8 and tuple(cc.codes.shape) == (50, 32)
    assert cc.scale == pytest.approx(float(c.abs().max()) / 127)
    assert bool((cc.codes[:, 30:] == 128).all())
    back = (cc.codes[:, :30].float() - 128) * cc.scale
    assert float((back - c).abs().max()) <= cc.scale / 2 + 1e-6
    h = ops.coarse_catalog(c.half())  # float16 catalogs too
    assert tuple(h.codes.shape) == (50, 32)


@needs_vnni
@pytest.mark.parametrize("B", [2, 11, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_coarse_knn_equals_exact(B, dtype):
    c = _unit(3000, 64, 1).to(dtype)
    q = _unit(B, 64, 2)
    cc = ops.coarse_catalog(c)
    assert ops.knn_plan(B, 3000, 64, 10, coarse=True)["path"] == "coarse"
    s0, i0 = ops.knn(q, c, 10)
    s1, i1 = ops.knn(q, c, 10, coarse=cc)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(s0, s1, rtol=1e-5, atol=1e-5)


@needs_vnni
def test_coarse_knn_filters_and_sentinels():
    c = _unit(500, 40, 3)
    q = _unit(5, 40, 4)
    cc = ops.coarse_catalog(c)
    allowed = torch.zeros(500, dtype=torch.bool)
    allowed[::7] = True  # 72 rows
    s0, i0 = ops.knn(q, c, 20, allowed=allowed)
    s1, i1 = ops.knn(q, c, 20, allowed=allowed, coarse=cc)
    assert torch.equal(i0, i1) and bool(allowed[i1].all())
    torch.testing.assert_close(s0, s1, rtol=1e-5, atol=1e-5)
    few = torch.zeros(500, dtype=torch.bool)
    few[[3, 9, 400]] = True  # fewer allowed rows than k: sentinels, as the exact path
    s0, i0 = ops.knn(q, c, 6, allowed=few)
    s1, i1 = ops.knn(q, c, 6, allowed=few, coarse=cc)
    assert torch.equal(i0, i1) and bool((i1[:, 3:] == -1).all()) and bool(torch.isinf(s1[:, 3:]).all())


def test_coarse_is_ignored_where_it_does_not_apply():
    c = _unit(800, 32, 5)
    cc = ops.coarse_catalog(c)
    q = _unit(17, 32, 6)
    for b, metric in ((1, "ip"), (17, "ip"), (4, "l2")):  # one query, > 16 queries, L2: the exact paths
        assert ops.knn_plan(b, 800, 32, 5, coarse=True)["path"] != "coarse" or metric == "l2"
        s0, i0 = ops.knn(q[:b], c, 5, metric=metric)
        s1, i1 = ops.knn(q[:b], c, 5, metric=metric, coarse=cc)
        assert torch.equal(i0, i1) and torch.equal(s0, s1)


def test_coarse_switch_off_gives_the_exact_path(tmp_path):
    """R4T_KNN_COARSE=0 (read once per process) turns the path off: knn_plan says so, same ids."""
    c = _unit(2000, 64, 7)
    q = _unit(11, 64, 8)
    torch.save({"q": q, "c": c}, tmp_path / "in.pt")
    code = (
        "import sys, torch; from r4t_fast import ops; t = torch.load(sys.argv[1]); "
        "cc = ops.coarse_catalog(t['c']); s, i = ops.knn(t['q'], t['c'], 10, coarse=cc); "
        "torch.save({'i': i, 'path': ops.knn_plan(11, 2000, 64, 10, coarse=True)['path']}, sys.argv[2])"
    )
    outs = {}
    for flag in ("1", "0"):
        out = tmp_path / f"out{flag}.pt"
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "in.pt"), str(out)],
            env={**os.environ, "R4T_KNN_COARSE": flag},
            check=True,
        )
        outs[flag] = torch.load(out)
    assert outs["0"]["path"] != "coarse"
    if ops.coarse_supported():
        assert outs["1"]["path"] == "coarse"
    assert torch.equal(outs["1"]["i"], outs["0"]["i"])


def test_coarse_argument_is_validated():
    c = _unit(100, 30, 9)
    q = _unit(3, 30, 10)
    cc = ops.coarse_catalog(c)
    with pytest.raises(ValueError, match="coarse"):
        ops.knn(q, c, 5, coarse=ops.coarse_catalog(_unit(99, 30, 9)))  # another catalog's copy
    with pytest.raises(ValueError, match="coarse"):
        ops.knn(q, c, 5, coarse=cc.codes)  # the codes without their scale
    with pytest.raises(ValueError, match="coarse"):
        ops.knn(q, c, 5, coarse=ops.CoarseCatalog(cc.codes.to(torch.int8), cc.scale))
    with pytest.raises(ValueError, match="coarse"):
        ops.knn(q, c, 5, coarse=ops.CoarseCatalog(cc.codes, float("nan")))
    with pytest.raises(ValueError, match="catalog"):
        ops.coarse_catalog(torch.full((4, 8), float("nan")))


# ----------------------------------------------------------------------------------- fused sampler
def _sampler_inputs():
    from helpers import noisy_tiny_model
    from r4t_fast.diffusion.samplers import sampler_sigmas
    from r4t_fast.kernels.sampler_pack import pack_denoiser

    m = noisy_tiny_model(3)
    cfg = m.cfg
    packed = pack_denoiser(m)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(4, cfg.cond_dim, generator=g)
    return m, cfg, packed, cond, g, sampler_sigmas


@pytest.mark.parametrize("guidance", [0.0, 0.8])
def test_schedule_cache_gives_the_uncached_results(guidance):
    """Per-schedule constants cached under the packing's uid: alternating schedules (and guidance on /
    off) give exactly what an uncached packing (uid 0) gives."""
    m, cfg, packed, cond, g, sampler_sigmas = _sampler_inputs()
    assert packed.uid != 0
    bare = dataclasses.replace(packed, uid=0)
    for steps in (3, 5, 3, 2, 5):
        sig = sampler_sigmas("heun", steps, cfg)
        x = torch.randn((4, cfg.set_size, cfg.dim), generator=g) * sig[0]
        a = ops.sample_sets(packed, cond, x, sig, sampler="heun", guidance=guidance)
        b = ops.sample_sets(bare, cond, x, sig, sampler="heun", guidance=guidance)
        assert torch.equal(a.rows, b.rows)


def test_schedule_cache_follows_new_weights():
    """A re-packed model (weights changed) gets a new uid: its results follow the new weights."""
    from r4t_fast.kernels.sampler_pack import pack_denoiser

    m, cfg, packed, cond, g, sampler_sigmas = _sampler_inputs()
    sig = sampler_sigmas("euler", 2, cfg)
    x = torch.randn((4, cfg.set_size, cfg.dim), generator=g) * sig[0]
    before = ops.sample_sets(packed, cond, x, sig, sampler="euler", guidance=0.0).rows
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ada") or "sig" in name:
                p.mul_(1.5)
    new = pack_denoiser(m)
    assert new.uid != packed.uid
    after = ops.sample_sets(new, cond, x, sig, sampler="euler", guidance=0.0).rows
    fresh = ops.sample_sets(dataclasses.replace(new, uid=0), cond, x, sig, sampler="euler", guidance=0.0).rows
    assert torch.equal(after, fresh) and not torch.equal(after, before)


def test_retriever_coarse_and_exact_give_the_same_sets():
    from test_retriever import QUERIES, _retriever

    r = _retriever(anchor=0.3)
    r_exact = _retriever(anchor=0.3, coarse=False)
    for k in (4, 10):
        a = r.retrieve(QUERIES, k=k, n_candidates=3)
        b = r_exact.retrieve(QUERIES, k=k, n_candidates=3)
        for x, y in zip(a, b, strict=True):
            assert x.item_ids == y.item_ids
            np.testing.assert_allclose(x.row_scores, y.row_scores, rtol=1e-5, atol=1e-5)
    assert (r._coarse_of is not None) == ops.coarse_supported()  # the copy was built and passed
    assert r_exact._coarse_of is None
    with pytest.raises(ValueError, match="coarse"):
        _retriever(coarse=True)


def test_all_finite():
    assert all_finite(torch.zeros(0)) and all_finite(torch.ones(3, 4))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))
    big = torch.full((4,), 3e38)  # the sum overflows, every element is finite
    assert all_finite(big)
    assert not all_finite(torch.tensor([3e38, 3e38, float("-inf")]))
