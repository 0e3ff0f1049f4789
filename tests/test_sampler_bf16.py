"""The fused sampler's bf16 precision (ops.sample_sets(precision="bf16"), Retriever(precision=...)): the
forward pass's Linears on bf16-rounded inputs and weights with float32 accumulation, against its spec
(reference.sample_sets(precision="bf16") in float64), the AVX512-BF16 tiles against the float32-tile
emulation, and the option's plumbing (validation, save / load, the eager path, the selection rule)."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import noisy_tiny_model
from r4t_fast.data.catalog import Catalog
from r4t_fast.data.encoders import HashingEncoder
from r4t_fast.diffusion.retriever import Retriever
from r4t_fast.kernels import _backend, ops, reference
from r4t_fast.kernels.sampler_pack import pack_denoiser
from test_fused_sampler import _inputs, _model

NATIVE = _backend.build_info().get("sampler_bf16") == "avx512_bf16"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _spec(m, cond, x, sig, sampler: str, guidance: float, precision: str) -> torch.Tensor:
    with torch.no_grad():
        return reference.sample_sets(
            copy.deepcopy(m).double(), cond.double(), x.double(), sig, sampler=sampler, guidance=guidance,
            precision=precision,
        )[0]  # fmt: skip


@pytest.mark.parametrize("precision", ["bf16", "bf16-emulated"])
@pytest.mark.parametrize(("M", "K", "N"), [(10, 384, 256), (3, 129, 45), (40, 256, 512), (1, 2, 1)])
def test_gemm_follows_its_spec(precision: str, M: int, K: int, N: int) -> None:
    """One Linear through the sampler's GEMM: bf16-rounded x and W (RNE), float32 sums, against the float64
    spec; odd K (a zero pad in the bf16 pairs) and N not a multiple of the 32-column panel included."""
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x, w, b = (torch.randn(s, generator=g) for s in ((M, K), (N, K), (N,)))
    got = ops.sampler_linear(x, w, b, precision=precision)
    spec16 = reference.linear(x, w, b, precision="bf16")
    spec32 = reference.linear(x, w, b)
    assert _rel(got, spec16) < 2e-6 * max(1.0, K / 64)  # float32 accumulation only
    if K > 2:
        assert _rel(got, spec32) > 1e-3  # the rounding happened (bf16 keeps 8 bits)
    assert _rel(ops.sampler_linear(x, w, b), spec32) < 2e-6 * max(1.0, K / 64)


@pytest.mark.parametrize("seed", [11, 21])
@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_sampler_follows_its_spec(seed: int, guidance: float) -> None:
    """The whole 1-step sampler: nearer the bf16 spec than the float32 one on most elements (a rounding
    flip of one activation between float32 and float64 spreads through the layers, so not on all)."""
    m = _model(seed=seed, scale=2.0)
    cond, x, sig, _ = _inputs(m, "euler", 1, 3)
    pk = pack_denoiser(m)
    got = ops.sample_sets(
        pk, cond, x, sig, sampler="euler", guidance=guidance, precision="bf16"
    ).rows.double()
    fp32 = ops.sample_sets(pk, cond, x, sig, sampler="euler", guidance=guidance).rows
    spec16 = _spec(m, cond, x, sig, "euler", guidance, "bf16")
    spec32 = _spec(m, cond, x, sig, "euler", guidance, "fp32")
    assert float(((got - spec16).abs() < (got - spec32).abs()).double().mean()) > 0.75
    assert 1e-4 < _rel(got, spec32) < 2e-2
    assert _rel(fp32, spec32) < 0.05 * _rel(got, spec32)  # the float32 path is untouched by the option


@pytest.mark.skipif(not NATIVE, reason="no AVX512-BF16 on this CPU / in this build (bf16 runs emulated)")
def test_native_tiles_equal_the_emulation_and_do_not_depend_on_threads() -> None:
    m = _model(seed=12)
    pk = pack_denoiser(m)
    cond, x, sig, _ = _inputs(m, "euler", 1, 40)  # more sets than one chunk per thread
    kw = dict(sampler="euler", guidance=0.5)
    native = ops.sample_sets(pk, cond, x, sig, precision="bf16", num_threads=1, **kw).rows
    emulated = ops.sample_sets(pk, cond, x, sig, precision="bf16-emulated", **kw).rows
    fp32 = ops.sample_sets(pk, cond, x, sig, **kw).rows
    assert _rel(native, emulated) < 0.1 * _rel(native, fp32)  # same rounding, sums in another order
    for mode in (1, 2):
        for threads in (1, 2, 3):
            again = ops.sample_sets(pk, cond, x, sig, precision="bf16", num_threads=threads, mode=mode, **kw)
            assert torch.equal(again.rows, native), (mode, threads)
    one = ops.sample_sets(pk, cond[7:8], x[7:8], sig, precision="bf16", **kw).rows
    assert torch.equal(one[0], native[7])


def test_every_simd_clone_runs_bf16() -> None:
    clones = [c for c in _backend.build_info()["simd_clones"] if "unsupported" not in c]
    m = _model(seed=13)
    pk = pack_denoiser(m)
    cond, x, sig, _ = _inputs(m, "euler", 2, 2)
    spec16 = _spec(m, cond, x, sig, "euler", 0.0, "bf16")
    spec32 = _spec(m, cond, x, sig, "euler", 0.0, "fp32")
    try:
        for c in clones:
            _backend.lib().set_cpu_simd(c)
            got = ops.sample_sets(pk, cond, x, sig, sampler="euler", precision="bf16").rows
            assert _rel(got, spec16) < 0.4 * _rel(got, spec32), c
    finally:
        _backend.lib().set_cpu_simd("auto")


def test_bf16_weights_follow_a_new_packing() -> None:
    m = _model(seed=14)
    cond, x, sig, _ = _inputs(m, "euler", 1, 2)
    before = ops.sample_sets(pack_denoiser(m), cond, x, sig, sampler="euler", precision="bf16").rows
    with torch.no_grad():
        m.blocks[0].mlp[0].weight.mul_(1.7)
    after = ops.sample_sets(pack_denoiser(m), cond, x, sig, sampler="euler", precision="bf16").rows
    spec16 = _spec(m, cond, x, sig, "euler", 0.0, "bf16")
    assert not torch.equal(before, after)
    assert _rel(after, spec16) < 0.4 * _rel(before, spec16)


def test_precision_is_validated() -> None:
    m = _model(seed=15)
    cond, x, sig, _ = _inputs(m, "euler", 1, 1)
    with pytest.raises(ValueError, match="precision"):
        ops.sample_sets(pack_denoiser(m), cond, x, sig, sampler="euler", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        reference.sample_sets(m, cond, x, sig, sampler="euler", precision="half")


def _retriever(**kw) -> Retriever:
    enc = HashingEncoder(dim=16, seed=0)
    texts = [
        f"item {w} {c}" for w in ("red", "blue", "green", "black") for c in ("shirt", "bag", "hat", "shoe")
    ]
    cat = Catalog([f"id{j}" for j in range(len(texts))], enc.encode(texts), texts)
    return Retriever(noisy_tiny_model(2), cat, enc, encoder_spec="hashing:16", steps=2, **kw)


def test_retriever_precision_option(tmp_path) -> None:
    with pytest.raises(ValueError, match="precision"):
        _retriever(precision="int8")
    r = _retriever(precision="bf16")
    assert r.defaults["precision"] == "bf16"
    back = Retriever.from_pretrained(r.save(tmp_path / "r"))
    assert back.defaults["precision"] == "bf16"
    q = torch.from_numpy(r.encoder.encode(["red hat", "blue bag"]))
    a = [s.row_embeddings for s in r.retrieve_embeddings(q, 4)]
    b = [s.row_embeddings for s in r.retrieve_embeddings(q, 4, precision="fp32")]
    assert any(not (x == y).all() for x, y in zip(a, b, strict=True))  # the option reaches the kernel
    with pytest.raises(ValueError, match="precision"):
        r.retrieve_embeddings(q, 4, precision="fp64")
    # the eager path runs float32 (and says so once)
    with pytest.warns(UserWarning, match="bf16"):
        eager = r.retrieve_embeddings(q, 4, fused=False)
    want = r.retrieve_embeddings(q, 4, fused=False, precision="fp32")
    assert all((x.row_embeddings == y.row_embeddings).all() for x, y in zip(eager, want, strict=True))
