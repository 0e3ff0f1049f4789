"""Set diffusion: preconditioning, samplers (fused vs reference), save/load, mode coverage, retriever."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from r4t_fast import Catalog
from r4t_fast.data.encoders import HashingEncoder
from r4t_fast.diffusion.model import EDM, DiffusionConfig, SetDenoiser, get_preset, load_model, save_model
from r4t_fast.diffusion.retriever import Retriever
from r4t_fast.diffusion.samplers import SAMPLERS, generate_sets, get_sampler, karras_sigmas
from r4t_fast.train.diffusion import DiffusionTrainConfig, load_shards, train_diffusion


def _random_model(seed: int = 0, **over) -> SetDenoiser:
    torch.manual_seed(seed)
    m = SetDenoiser(get_preset("tiny", **over)).eval()
    with torch.no_grad():  # zero-initialised output layers would make every sample trivial
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_presets_and_config_validation():
    paper = SetDenoiser(get_preset("paper"))
    n = sum(p.numel() for p in paper.parameters())
    assert 40e6 < n < 70e6  # the paper reports 53.9M for this shape
    with pytest.raises(
        ValueError, match=r"preset: unknown 'huge'; valid choices: \['cpu-small', 'paper', 'tiny'\]"
    ):
        get_preset("huge")
    with pytest.raises(ValueError, match="hidden: must be divisible by heads"):
        DiffusionConfig(hidden=100, heads=16)
    with pytest.raises(ValueError, match="config: unknown keys"):
        DiffusionConfig.from_dict({"layers": 2, "colour": "red"})
    with pytest.raises(ValueError, match="sigma_sampling"):
        DiffusionConfig(sigma_sampling="uniform")


def test_denoiser_is_permutation_equivariant():
    m = _random_model()
    x = torch.randn(2, 4, 16)
    c = torch.randn(2, 16)
    perm = torch.tensor([2, 0, 3, 1])
    out = m(x, torch.zeros(2), c)
    out_p = m(x[:, perm], torch.zeros(2), c)
    assert torch.allclose(out[:, perm], out_p, atol=1e-5)


def test_edm_preconditioning_limits():
    edm = EDM(_random_model())
    c_skip, c_out, c_in, _ = edm.coefficients(1e-4)
    assert c_skip == pytest.approx(1.0, abs=1e-5) and c_out < 1e-3  # D(x) ≈ x at tiny noise
    c_skip, c_out, c_in, _ = edm.coefficients(80.0)
    assert c_skip < 1e-5 and c_out == pytest.approx(edm.cfg.sigma_data, rel=1e-3)
    s = edm.sample_sigma(10000, torch.Generator().manual_seed(0))
    assert float(s.min()) >= edm.cfg.sigma_min and float(s.max()) <= edm.cfg.sigma_max


def test_karras_sigmas():
    s = karras_sigmas(5, 0.002, 80.0)
    assert len(s) == 6 and s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002) and s[-1] == 0.0
    assert all(a > b for a, b in zip(s, s[1:], strict=False))
    with pytest.raises(ValueError, match="steps: expected a positive int"):
        karras_sigmas(0, 0.1, 1.0)
    with pytest.raises(ValueError, match=r"sampler: unknown 'ddim'"):
        get_sampler("ddim")


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_fused_sampler_equals_reference(sampler, guidance):
    """Tolerance: 1e-5 absolute on outputs of scale ~0.1-1 (float32 rounding differences only)."""
    edm = EDM(_random_model())
    cond = torch.randn(3, 16)
    a = generate_sets(edm, cond, steps=8, sampler=sampler, guidance=guidance, seed=3, fused=True)
    b = generate_sets(edm, cond, steps=8, sampler=sampler, guidance=guidance, seed=3, fused=False)
    assert a.shape == (3, 4, 16)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    c = generate_sets(edm, cond, steps=8, sampler=sampler, guidance=guidance, seed=3, fused=True)
    assert torch.equal(a, c)  # seeded


def test_generate_sets_bad_cond():
    edm = EDM(_random_model())
    with pytest.raises(ValueError, match=r"cond: expected \(B, 16\)"):
        generate_sets(edm, torch.randn(3, 8))


def test_save_load_round_trip_same_samples(tmp_path):
    m = _random_model(seed=5)
    save_model(m, tmp_path / "m", extra={"note": "x"})
    m2, meta = load_model(tmp_path / "m")
    assert meta["note"] == "x"
    cond = torch.randn(2, 16)
    a = generate_sets(EDM(m), cond, steps=6, sampler="euler_maruyama", seed=11)
    b = generate_sets(EDM(m2), cond, steps=6, sampler="euler_maruyama", seed=11)
    assert torch.equal(a, b)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable weights"):
        load_model(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_model(tmp_path / "nowhere")


def test_cond_offset_fit_centres_and_samples_in_data_space(tmp_path):
    """Query-centred targets: 'fit' recovers a known offset; sampling with cond_offset = a is the same
    trajectory as with 0, shifted by a * query; the offset survives save/load; bad values are refused."""
    from r4t_fast.train.diffusion import resolve_cond_offset

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    targets = 0.45 * q[:, None, :] + 0.05 * torch.randn(40, 4, 16, generator=g)
    assert resolve_cond_offset("fit", q, targets) == pytest.approx(0.45, abs=0.02)
    assert resolve_cond_offset("auto", q, targets) == resolve_cond_offset("fit", q, targets)
    assert resolve_cond_offset("auto", torch.randn(40, 8), targets) == 0.0
    assert resolve_cond_offset(0.3, q, targets) == 0.3
    with pytest.raises(ValueError, match="cond_offset: 'fit' needs"):
        resolve_cond_offset("fit", torch.randn(40, 8), targets)

    plain, shifted = _random_model(seed=3), _random_model(seed=3, cond_offset=0.45)
    a = generate_sets(EDM(plain), q[:3], steps=5, sampler="heun", guidance=0.5, seed=4)
    b = generate_sets(EDM(shifted), q[:3], steps=5, sampler="heun", guidance=0.5, seed=4)
    torch.testing.assert_close(b, a + 0.45 * q[:3, None, :])
    edm = EDM(shifted)
    torch.testing.assert_close(edm.uncenter(edm.center(targets, q), q), targets)
    save_model(shifted, tmp_path / "m")
    assert load_model(tmp_path / "m")[0].cfg.cond_offset == 0.45

    model, _ = train_diffusion(
        q, targets, DiffusionTrainConfig(preset="tiny", steps=2, warmup=1), progress=False
    )
    assert model.cfg.cond_offset == pytest.approx(0.45, abs=0.02)
    assert model.cfg.sigma_data == pytest.approx(0.05, rel=0.2)  # measured on the centred rows
    with pytest.raises(ValueError, match="cond_offset: needs cond_dim == dim"):
        get_preset("tiny", cond_dim=8, cond_offset=0.5)
    for bad in ("nope", math.nan, True):
        with pytest.raises(ValueError, match="cond_offset"):
            DiffusionTrainConfig(cond_offset=bad)


def _modes_problem(Q=12, M=3, d=16, S=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.nn.functional.normalize(torch.randn(Q, d, generator=g), dim=1)
    modes = torch.nn.functional.normalize(torch.randn(Q, M, d, generator=g), dim=2)
    x = modes[:, None].expand(Q, S, M, d) + 0.03 * torch.randn(Q, S, M, d, generator=g)
    return cond, modes, x.reshape(Q * S, M, d), cond[:, None].expand(Q, S, d).reshape(Q * S, d)


def _coverage(out: torch.Tensor, modes: torch.Tensor, radius: float = 0.3) -> torch.Tensor:
    """Per query: fraction of its modes with at least one generated row within ``radius``."""
    dist = torch.cdist(out, modes)  # (Q, L, M)
    return (dist.min(1).values < radius).float().mean(1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP's spinning
    threads made the mode-coverage test 15x slower (490 s against 36 s single-threaded, load ~6)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_diffusion_covers_modes_where_a_regressor_cannot():
    """Each query's target set is 3 well-separated unit vectors (in random row order). The diffusion
    model must produce all three; a single-vector regressor can only produce their mean."""
    cond, modes, targets, c = _modes_problem()
    cfg = DiffusionTrainConfig(
        preset="tiny", steps=700, batch_size=128, lr=2e-3, warmup=50, ema=0.99, log_every=100
    )
    model, log = train_diffusion(c, targets, cfg, progress=False)
    assert log[-1]["loss"] < log[0]["loss"]
    out = generate_sets(EDM(model), cond, steps=24, sampler="heun", guidance=0.0, seed=1)
    cov = _coverage(out, modes)
    assert float(cov.mean()) >= 0.9, cov

    # Single-vector regressor (least squares from the condition to every target row).
    X = torch.cat([c, torch.ones(len(c), 1)], dim=1)
    Y = targets.mean(1)  # MSE-optimal single vector under random row order is the mean row
    W = torch.linalg.lstsq(X, Y).solution
    pred = (torch.cat([cond, torch.ones(len(cond), 1)], 1) @ W)[:, None].expand(-1, 3, -1)
    assert float(_coverage(pred, modes).mean()) < 0.2


def test_train_config_and_shard_errors(tmp_path):
    with pytest.raises(ValueError, match="steps: expected a positive int"):
        DiffusionTrainConfig(steps=0)
    with pytest.raises(FileNotFoundError, match="no shard-"):
        load_shards(tmp_path)
    with pytest.raises(ValueError, match="target: expected 'items' or 'subqueries'"):
        load_shards(tmp_path, target="rows")
    with pytest.raises(ValueError, match="cond: contains NaN"):
        train_diffusion(torch.full((4, 16), math.nan), torch.zeros(4, 3, 16), DiffusionTrainConfig(steps=1))
    with pytest.raises(ValueError, match="overrides: dim=8 contradicts"):
        train_diffusion(
            torch.zeros(4, 16),
            torch.zeros(4, 3, 16),
            DiffusionTrainConfig(preset="tiny", steps=1, overrides={"dim": 8}),
        )


def _toy_retriever(tmp_path=None) -> Retriever:
    enc = HashingEncoder(dim=16, seed=0)
    texts = [
        f"item {w} {c}"
        for w in ("red", "blue", "green", "black")
        for c in ("shirt", "shoe", "bag", "hat", "skirt")
    ]
    emb = enc.encode(texts)
    cat = Catalog([f"id{j}" for j in range(len(texts))], emb, texts)
    return Retriever(_random_model(seed=2), cat, enc, encoder_spec="hashing:16", steps=6)


def test_retriever_retrieve_and_round_trip(tmp_path):
    r = _toy_retriever()
    sets = r.retrieve(["red outfit", "blue bag"], k=6, n_candidates=3, seed=0)
    assert len(sets) == 2
    for s_q, s in zip(["red outfit", "blue bag"], sets, strict=True):
        assert len(s.item_ids) == 6 == len(set(s.item_ids))  # k > L=4: two samples, grounded jointly
        assert s.row_embeddings.shape == (6, 16) and s.candidates.shape == (6, 3)
        assert all(r.catalog.texts[i] == t for i, t in zip(s.item_indices, s.texts, strict=True))
        assert np.all(np.diff(s.row_scores) <= 1e-6)  # best-grounded rows first
        q = r.encoder.encode([s_q])[0]
        cos = r.catalog.embeddings[s.item_indices].numpy() @ (q / np.linalg.norm(q))
        np.testing.assert_allclose(s.scores, cos, atol=1e-5)  # scores: cos(item, query), as for baselines
    r.save(tmp_path / "ret")
    r2 = Retriever.from_pretrained(tmp_path / "ret")
    again = r2.retrieve(["red outfit", "blue bag"], k=6, seed=0)
    assert [s.item_ids for s in again] == [s.item_ids for s in sets]


def test_retriever_bad_inputs():
    r = _toy_retriever()
    with pytest.raises(ValueError, match="query_texts: expected a list of non-empty strings"):
        r.retrieve("red outfit")
    with pytest.raises(ValueError, match="k: 100 exceeds the catalog size"):
        r.retrieve(["x"], k=100)
    with pytest.raises(ValueError, match="k: expected a positive int"):
        r.retrieve(["x"], k=0)
    with pytest.raises(ValueError, match=r"query_emb: expected float32 \(B, 16\)"):
        r.retrieve_embeddings(torch.zeros(2, 8))
    with pytest.raises(FileNotFoundError, match="missing retriever.json"):
        Retriever.from_pretrained("/nonexistent")


def test_eval_resolves_a_retriever_directory(tmp_path):
    from r4t_fast.data.prepare import EvalData
    from r4t_fast.eval.evaluation import resolve_method

    r = _toy_retriever()
    r.save(tmp_path / "ret")
    data = EvalData(dataset=None, catalog=r.catalog, encoder=r.encoder, split=None)
    method, name = resolve_method(str(tmp_path / "ret"), data)
    assert name == "r4t-diffusion" and isinstance(method, Retriever)
    assert [s.item_ids for s in method.retrieve(["red outfit"], 4)] == [
        s.item_ids for s in r.retrieve(["red outfit"], 4)
    ]


def test_train_with_a_query_space_other_than_the_rows():
    """cond_dim != dim: 'auto' resolves to no offset and training runs (the centring is skipped)."""
    model, _ = train_diffusion(
        torch.randn(8, 16),
        torch.randn(8, 3, 8),
        DiffusionTrainConfig(preset="tiny", steps=1, warmup=1),
        progress=False,
    )
    assert model.cfg.cond_offset == 0.0 and (model.cfg.cond_dim, model.cfg.dim) == (16, 8)
