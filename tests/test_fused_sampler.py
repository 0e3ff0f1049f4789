"""The fused set sampler ``ops.sample_sets`` against the eager PyTorch path (``generate_sets``) and the
float64 spec (``reference.sample_sets``), for every sampler, with and without guidance and cond_offset.

Tolerances (float32, measured ~1e-6 on these models): the fused rows equal ``generate_sets``' within
1e-4 of the row scale (max |rows|); against a float64 run of the same model the fused error is at most
2x the error of the eager float32 run (+ 1e-6 of the scale, for the cases where both are at the
rounding floor). Results are bitwise independent of the batch, the threading mode and the thread count.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import r4t_fast
from r4t_fast.diffusion.model import EDM, DiffusionConfig, SetDenoiser, get_preset
from r4t_fast.diffusion.samplers import SAMPLERS, generate_sets, sampler_sigmas
from r4t_fast.kernels import _backend, ops, reference
from r4t_fast.kernels.sampler_pack import PackedDenoiser, pack_denoiser, step_noise

REL_TOL = 1e-4
STEPS = {"euler": 6, "euler_maruyama": 6, "heun": 5, "dpmpp_2m": 6, "consistency": 3}


def _model(preset: str = "tiny", seed: int = 0, scale: float = 1.0, **overrides) -> SetDenoiser:
    """A random model whose every part matters: the default init zeros ada/out and null_cond."""
    torch.manual_seed(seed)
    m = SetDenoiser(get_preset(preset, **overrides)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("ada.1.weight", "out.weight"):
                p.normal_(0.0, scale * 0.5 / math.sqrt(p.shape[1]))
            elif name in ("ada.1.bias", "out.bias", "null_cond"):
                p.normal_(0.0, 0.1)
            elif name.endswith("norm2.weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("norm2.bias"):
                p.normal_(0.0, 0.1)
    return m


def _inputs(m: SetDenoiser, sampler: str, steps: int, B: int, seed: int = 0):
    """cond, x_init, sigmas and step noise exactly as generate_sets(seed=seed) draws them."""
    cfg = m.cfg
    cond = torch.randn(B, cfg.cond_dim, generator=torch.Generator().manual_seed(100 + seed))
    sig = sampler_sigmas(sampler, steps, cfg)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, cfg.set_size, cfg.dim), generator=g) * sig[0]
    z = step_noise(sampler, sig, (B, cfg.set_size, cfg.dim), g)
    return cond, x, sig, z


def _need(sampler: str) -> None:
    if sampler not in SAMPLERS:
        pytest.skip(f"diffusion.samplers has no {sampler!r} sampler yet (the Python reference comes first)")


@pytest.mark.parametrize("sampler", sorted(STEPS))
@pytest.mark.parametrize("guidance", [0.0, 1.5])
@pytest.mark.parametrize("offset", [0.0, 0.7])
@pytest.mark.parametrize("B", [1, 3])
def test_matches_generate_sets(sampler: str, guidance: float, offset: float, B: int) -> None:
    _need(sampler)
    m = _model(cond_offset=offset)
    steps = STEPS[sampler]
    cond, x, sig, z = _inputs(m, sampler, steps, B)
    want = generate_sets(EDM(m), cond, steps=steps, sampler=sampler, guidance=guidance, seed=0, fused=False)
    got = ops.sample_sets(pack_denoiser(m), cond, x, sig, sampler=sampler, guidance=guidance, noise=z)
    assert got.ids is None and got.scores is None
    assert got.rows.shape == want.shape and got.rows.dtype == torch.float32
    scale = float(want.abs().max())
    err = float((got.rows - want).abs().max())
    assert err <= REL_TOL * scale, f"max |fused - eager| = {err:.3g} at row scale {scale:.3g}"


@pytest.mark.parametrize(
    ("sampler", "steps", "guidance"), [("euler", 3, 0.0), ("heun", 2, 1.5), ("dpmpp_2m", 3, 0.5)]
)
def test_cpu_small_batch_64(sampler: str, steps: int, guidance: float) -> None:
    _need(sampler)
    m = _model("cpu-small", seed=1, cond_offset=0.5)
    cond, x, sig, _ = _inputs(m, sampler, steps, 64)
    want = generate_sets(EDM(m), cond, steps=steps, sampler=sampler, guidance=guidance, seed=0, fused=False)
    got = ops.sample_sets(pack_denoiser(m), cond, x, sig, sampler=sampler, guidance=guidance).rows
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= REL_TOL * scale


@pytest.mark.parametrize(
    "sizes",  # (L, d, cond_dim, hidden, heads, mlp, cond_tokens, layers): vector tails and partial panels
    [(1, 5, 7, 6, 3, 7, 3, 1), (13, 33, 33, 70, 5, 45, 2, 3)],
)
def test_odd_sizes(sizes: tuple[int, ...]) -> None:
    L, d, cd, h, heads, mlp, T, layers = sizes
    cfg = DiffusionConfig(
        set_size=L,
        dim=d,
        cond_dim=cd,
        hidden=h,
        heads=heads,
        mlp=mlp,
        cond_tokens=T,
        layers=layers,
        dropout=0.0,
    )
    torch.manual_seed(0)
    m = SetDenoiser(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("ada.1.weight", "out.weight"):
                p.normal_(0.0, 0.5 / math.sqrt(p.shape[1]))
            elif name in ("ada.1.bias", "out.bias", "null_cond"):
                p.normal_(0.0, 0.1)
    for sampler, w in (("heun", 1.0), ("dpmpp_2m", 0.0)):
        _need(sampler)
        cond, x, sig, _ = _inputs(m, sampler, 4, 3)
        want = generate_sets(EDM(m), cond, steps=4, sampler=sampler, guidance=w, seed=0, fused=False)
        got = ops.sample_sets(pack_denoiser(m), cond, x, sig, sampler=sampler, guidance=w).rows
        assert float((got - want).abs().max()) <= REL_TOL * float(want.abs().max()), sampler


@pytest.mark.parametrize(("sampler", "guidance"), [("heun", 0.0), ("heun", 2.0), ("dpmpp_2m", 1.0)])
def test_error_against_float64_like_eager(sampler: str, guidance: float) -> None:
    """STYLE 8: the fused float32 error against the float64 spec is within 2x the eager float32 error."""
    _need(sampler)
    m = _model(seed=3, scale=3.0)  # larger modulation: a less contractive, harder network
    steps = 8
    cond, x, sig, z = _inputs(m, sampler, steps, 4)
    m64 = copy.deepcopy(m).double()
    with torch.no_grad():
        truth, _, _ = reference.sample_sets(
            m64, cond.double(), x.double(), sig, sampler=sampler, guidance=guidance
        )
    eager = generate_sets(EDM(m), cond, steps=steps, sampler=sampler, guidance=guidance, seed=0, fused=False)
    fused = ops.sample_sets(pack_denoiser(m), cond, x, sig, sampler=sampler, guidance=guidance).rows
    scale = float(truth.abs().max())
    e_eager = float((eager.double() - truth).abs().max())
    e_fused = float((fused.double() - truth).abs().max())
    assert e_fused <= 2 * e_eager + 1e-6 * scale, (
        f"fused {e_fused:.3g} vs eager {e_eager:.3g} (scale {scale:.3g})"
    )


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_maruyama", "consistency"])
def test_reference_is_generate_sets(sampler: str) -> None:
    """reference.sample_sets restates diffusion.samplers: equal to the unfused eager path."""
    _need(sampler)
    m = _model(cond_offset=0.3)
    cond, x, sig, z = _inputs(m, sampler, STEPS[sampler], 2)
    want = generate_sets(
        EDM(m), cond, steps=STEPS[sampler], sampler=sampler, guidance=0.8, seed=0, fused=False
    )
    with torch.no_grad():
        got, _, _ = reference.sample_sets(m, cond, x, sig, sampler=sampler, guidance=0.8, noise=z)
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


def test_bitwise_independent_of_batch_mode_and_threads() -> None:
    m = _model(seed=5)
    pk = pack_denoiser(m)
    cond, x, sig, _ = _inputs(m, "heun", 4, 5)
    base = ops.sample_sets(pk, cond, x, sig, sampler="heun", guidance=1.0, num_threads=1).rows
    for mode in (0, 1, 2):
        for threads in (1, 2, 3):
            r = ops.sample_sets(
                pk, cond, x, sig, sampler="heun", guidance=1.0, num_threads=threads, mode=mode
            )
            assert torch.equal(r.rows, base), (mode, threads)
    for b in range(5):
        one = ops.sample_sets(pk, cond[b : b + 1], x[b : b + 1], sig, sampler="heun", guidance=1.0).rows
        assert torch.equal(one[0], base[b])
    cond, x, sig, _ = _inputs(m, "euler", 3, 70)  # more sets than one chunk (32) per thread
    big = ops.sample_sets(pk, cond, x, sig, sampler="euler", guidance=1.0, num_threads=1).rows
    for b in (0, 31, 32, 69):
        one = ops.sample_sets(pk, cond[b : b + 1], x[b : b + 1], sig, sampler="euler", guidance=1.0).rows
        assert torch.equal(one[0], big[b])


def test_simd_clones_agree() -> None:
    clones = [c for c in _backend.build_info()["simd_clones"] if "unsupported" not in c]
    m = _model(seed=6)
    pk = pack_denoiser(m)
    cond, x, sig, _ = _inputs(m, "dpmpp_2m", 6, 3)
    try:
        outs = {}
        for c in clones:
            _backend.lib().set_cpu_simd(c)
            outs[c] = ops.sample_sets(pk, cond, x, sig, sampler="dpmpp_2m", guidance=0.5).rows
    finally:
        _backend.lib().set_cpu_simd("auto")
    first = next(iter(outs.values()))
    for c, r in outs.items():
        assert float((r - first).abs().max()) <= REL_TOL * float(first.abs().max()), c


def test_grounding_matches_ground_sets() -> None:
    m = _model(seed=7)
    pk = pack_denoiser(m)
    L, d = m.cfg.set_size, m.cfg.dim
    cond, x, sig, _ = _inputs(m, "euler", 4, 6)
    catalog = torch.nn.functional.normalize(
        torch.randn(50, d, generator=torch.Generator().manual_seed(9)), dim=1
    )
    for group, cand, metric in ((1, None, "ip"), (2, None, "ip"), (3, 5, "l2")):
        out = ops.sample_sets(
            pk, cond, x, sig, sampler="euler", catalog=catalog, group=group, candidates=cand, metric=metric
        )
        rows = out.rows.reshape(6 // group, group * L, d)
        ids, scores = ops.ground_sets(rows, catalog, candidates=cand, metric=metric)
        assert out.ids.shape == (6 // group, group * L)
        assert torch.equal(out.ids, ids) and torch.equal(out.scores, scores)
        for s in range(6 // group):  # distinct items within a grounded set
            assert len(set(out.ids[s].tolist())) == group * L
    half = ops.sample_sets(pk, cond, x, sig, sampler="euler", catalog=catalog.half(), check_finite=False)
    assert torch.equal(half.ids, ops.ground_sets(half.rows, catalog.half())[0])
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[::2] = True
    out = ops.sample_sets(pk, cond, x, sig, sampler="euler", catalog=catalog, allowed=allowed)
    assert bool((out.ids % 2 == 0).all())
    small = catalog[: L - 1]  # fewer items than rows: the grounding's sentinels
    out = ops.sample_sets(pk, cond, x, sig, sampler="euler", catalog=small)
    assert int((out.ids == -1).sum(1).min()) == 1


def test_pack_is_cached_and_refreshed() -> None:
    m = _model(seed=8)
    pk = pack_denoiser(m)
    assert isinstance(pk, PackedDenoiser) and pack_denoiser(m) is pk
    assert pk.dims == (4, 16, 16, 128, 2, 4, 256, 1) and pk.buffer.dtype == torch.float32
    cond, x, sig, _ = _inputs(m, "euler", 3, 2)
    before = ops.sample_sets(pk, cond, x, sig, sampler="euler").rows
    with torch.no_grad():
        m.blocks[0].qkv.weight.mul_(1.5)  # in-place update: the cache must notice
    pk2 = pack_denoiser(m)
    assert pk2 is not pk
    after = ops.sample_sets(pk2, cond, x, sig, sampler="euler").rows
    want = generate_sets(EDM(m), cond, steps=3, sampler="euler", seed=0, fused=False)  # eager: independent
    assert not torch.equal(before, after)
    assert float((after - want).abs().max()) <= REL_TOL * float(want.abs().max())
    with pytest.raises(ValueError, match="float32"):
        pack_denoiser(copy.deepcopy(m).double())
    m.cfg.sigma_data = 0.3  # a config value the sampler reads
    assert pack_denoiser(m) is not pk2
    assert pack_denoiser(m, cache=False) is not pack_denoiser(m)


def test_fused_packing_checks_once_and_sees_dtype_changes() -> None:
    """fused_packing returns the cached packing while it is current (the per-call check reads the packed
    tensors, not the module), and refuses a model whose parameters left float32 after it was packed."""
    from r4t_fast.diffusion.samplers import fused_packing, fused_sample_sets, fused_unavailable

    m = _model(seed=9)
    edm = EDM(m)
    cond, _, sig, _ = _inputs(m, "euler", 3, 2)
    pk, why = fused_packing(edm, cond)
    assert why is None and pk is pack_denoiser(m) and fused_packing(edm, cond)[0] is pk
    with torch.no_grad():
        m.blocks[0].qkv.weight.add_(0.1)  # in place: a fresh packing, the same as packing from scratch
    pk2, _ = fused_packing(edm, cond)
    assert pk2 is not pk and torch.equal(pk2.buffer, pack_denoiser(m, cache=False).buffer)
    assert fused_unavailable(edm, cond.double()) == "cond is torch.float64, not float32"
    m.double()  # .to(): new storage under the same Parameter objects
    assert fused_packing(edm, cond)[0] is None
    assert "torch.float64" in fused_unavailable(edm, cond)
    with pytest.raises(ValueError, match="fused"):
        fused_sample_sets(edm, cond, sig, sampler="euler", guidance=0.0, seed=0)


def test_inputs_numpy_and_non_contiguous() -> None:
    m = _model(seed=10)
    pk = pack_denoiser(m)
    cond, x, sig, _ = _inputs(m, "dpmpp_2m", 4, 3)
    want = ops.sample_sets(pk, cond, x, sig, sampler="dpmpp_2m").rows
    wide = torch.zeros(3, 2 * m.cfg.cond_dim)
    wide[:, ::2] = cond
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    got = ops.sample_sets(
        pk, wide[:, ::2], xt, torch.tensor(sig, dtype=torch.float64), sampler="dpmpp_2m"
    ).rows
    assert torch.equal(got, want)
    got_np = ops.sample_sets(pk, cond.numpy(), x.numpy(), sig, sampler="dpmpp_2m").rows
    assert isinstance(got_np, np.ndarray) and np.array_equal(got_np, want.numpy())
    empty = ops.sample_sets(pk, cond[:0], x[:0], sig, sampler="dpmpp_2m")
    assert empty.rows.shape == (0, m.cfg.set_size, m.cfg.dim)


def test_argument_errors_name_the_argument() -> None:
    m = _model(seed=11)
    pk = pack_denoiser(m)
    cond, x, sig, _ = _inputs(m, "euler", 3, 2)
    cases = [
        (dict(packed=m), "packed"),
        (dict(cond=cond.double()), "cond"),
        (dict(cond=cond[:, :3]), "cond"),
        (dict(x_init=x[:1]), "x_init"),
        (dict(x_init=x[:, :2]), "x_init"),
        (dict(sigmas=[1.0]), "sigmas"),
        (dict(sigmas=[1.0, 2.0, 0.0]), "sigmas"),
        (dict(sigmas=[1.0, 0.0, 0.0]), "sigmas"),
        (dict(sigmas=[float("nan"), 0.0]), "sigmas"),
        (dict(sigmas=torch.tensor(sig)), "sigmas"),  # float32: would round the schedule
        (dict(sampler="ddim"), "sampler"),
        (dict(sampler="euler_maruyama"), "noise"),
        (dict(noise=torch.zeros(3, 2, 4, 16)), "noise"),
        (dict(guidance=float("inf")), "guidance"),
        (dict(group=3, catalog=torch.randn(10, 16)), "group"),
        (dict(catalog=torch.randn(10, 8)), "catalog"),
        (dict(candidates=2), "allowed/candidates"),
        (dict(mode=3), "mode"),
        (dict(num_threads=0), "num_threads"),
    ]
    for kw, name in cases:
        args = dict(packed=pk, cond=cond, x_init=x, sigmas=sig, sampler="euler")
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            ops.sample_sets(
                args.pop("packed"), args.pop("cond"), args.pop("x_init"), args.pop("sigmas"), **args
            )
    with pytest.raises(ValueError, match="sampler"):
        ops.sample_sets(pk, cond, x, sig, sampler="ddim")
    with pytest.raises(ValueError, match="choices"):
        step_noise("ddim", sig, (2, 4, 16))


def test_build_reports_simd() -> None:
    info = r4t_fast.build_info()
    assert info["simd"]  # the clone sample_sets shares with knn


def test_anchor_rides_in_the_grounding_pass() -> None:
    """An anchor per grounded set: its top anchor_k from the same catalog pass equal reference.knn's
    (sorted scores: ties tolerated), k = 1, n and > n (sentinels), non-contiguous input; the rows'
    grounding is unchanged by it."""
    m = _model(seed=11)
    pk = pack_denoiser(m)
    d = m.cfg.dim
    cond, x, sig, _ = _inputs(m, "euler", 3, 4)
    catalog = torch.nn.functional.normalize(
        torch.randn(40, d, generator=torch.Generator().manual_seed(12)), dim=1
    )
    plain = ops.sample_sets(pk, cond, x, sig, sampler="euler", catalog=catalog, group=2)
    assert plain.anchor_ids is None and plain.anchor_scores is None
    wide = torch.randn(2, 2 * d, generator=torch.Generator().manual_seed(13))
    anchor = wide[:, ::2]  # non-contiguous
    assert not anchor.is_contiguous()
    for ka, metric in ((1, "ip"), (10, "l2"), (40, "ip"), (45, "ip")):
        out = ops.sample_sets(
            pk,
            cond,
            x,
            sig,
            sampler="euler",
            catalog=catalog,
            group=2,
            anchor=anchor,
            anchor_k=ka,
            metric=metric,
        )
        ref = ops.sample_sets(pk, cond, x, sig, sampler="euler", catalog=catalog, group=2, metric=metric)
        assert torch.equal(out.ids, ref.ids) and torch.equal(out.scores, ref.scores)
        assert out.anchor_ids.shape == out.anchor_scores.shape == (2, ka)
        want_s, _ = reference.knn(anchor.contiguous(), catalog, min(ka, 40), metric=metric)
        got_s = out.anchor_scores[:, : min(ka, 40)]
        torch.testing.assert_close(got_s, want_s, rtol=0, atol=1e-5)
        got_ids = out.anchor_ids[:, : min(ka, 40)]  # the ids carry those scores
        a = anchor.contiguous()
        direct = (catalog[got_ids] @ a[:, :, None])[..., 0] if metric == "ip" else None
        if direct is not None:
            torch.testing.assert_close(direct, got_s, rtol=0, atol=1e-5)
        if ka > 40:  # past the catalog: knn's sentinels
            assert bool((out.anchor_ids[:, 40:] == -1).all())
            assert bool(torch.isneginf(out.anchor_scores[:, 40:]).all())
    with pytest.raises(ValueError, match="anchor"):
        ops.sample_sets(pk, cond, x, sig, sampler="euler", anchor=anchor)  # no catalog
    with pytest.raises(ValueError, match="anchor"):
        ops.sample_sets(pk, cond, x, sig, sampler="euler", catalog=catalog, group=2, anchor=anchor[:1])
    with pytest.raises(ValueError, match="anchor_k"):
        ops.sample_sets(
            pk, cond, x, sig, sampler="euler", catalog=catalog, group=2, anchor=anchor, anchor_k=0
        )
