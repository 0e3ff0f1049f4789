"""Few-step samplers against float64 closed forms: DPM-Solver++(2M) (k-diffusion's form), the consistency
sampler, NFE counts and the per-sampler schedules.

The closed form: for Gaussian data x0 ~ N(μ, s²·I) the exact EDM denoiser is
D(x; σ) = μ + s²/(s² + σ²)·(x − μ), and the probability-flow ODE moves a point from σ to σ' along
x(σ') = μ + √((s² + σ'²)/(s² + σ²))·(x(σ) − μ). A network that returns the F making EDM's
D = c_skip·x + c_out·F exact lets every sampler run in float64 against that solution.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from r4t_fast.diffusion.model import EDM, SetDenoiser, get_preset
from r4t_fast.diffusion.samplers import (
    CONSISTENCY_MAX_STEPS,
    SAMPLERS,
    consistency_sigmas,
    generate_sets,
    karras_sigmas,
    nfe,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    sampler_sigmas,
    steps_for_nfe,
)

MU, S = 0.3, 0.5  # data mean and std (per element)
SMIN, SMAX = 2e-3, 80.0


class GaussianDenoiser(nn.Module):
    """F such that EDM's D is the exact denoiser (``flow=False``) or the exact probability-flow map to
    σ = 0, i.e. the ideal consistency function (``flow=True``), for x0 ~ N(MU + cond_shift, S²)."""

    def __init__(self, flow: bool = False) -> None:
        super().__init__()
        self.cfg = get_preset("tiny", sigma_data=S)
        self.flow = flow
        self.calls = 0

    def forward(self, x_in, c_noise, cond, drop_mask=None):
        self.calls += 1
        sigma = torch.exp(4 * c_noise.to(x_in.dtype)).view(-1, 1, 1)
        sd = self.cfg.sigma_data
        x = x_in * (sigma**2 + sd**2).sqrt()  # undo c_in
        mu = MU if cond is None else MU + cond[:, :1, None].to(x.dtype)
        if drop_mask is not None and cond is not None:
            mu = torch.where(drop_mask.view(-1, 1, 1), torch.full_like(mu, MU), mu)
        scale = S / (S**2 + sigma**2).sqrt() if self.flow else S**2 / (S**2 + sigma**2)
        D = mu + scale * (x - mu)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        return (D - c_skip * x) / c_out


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread (on a shared 2-core machine a second, spinning one only costs)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # c_noise and every intermediate in float64
    yield
    torch.set_default_dtype(old)


def _exact(xT: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """The exact ODE from σ_0 to the last positive level, then the samplers' common last step x = D."""
    s0, s_last = sigmas[0], sigmas[-2]
    x = MU + math.sqrt((S**2 + s_last**2) / (S**2 + s0**2)) * (xT - MU)
    return MU + S**2 / (S**2 + s_last**2) * (x - MU)


def _noise(n: int = 2048, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dpmpp_2m_kdiffusion(model, x, sigmas):
    """k-diffusion's ``sample_dpmpp_2m``, transcribed (tensors for σ and t, as there)."""
    sigmas = torch.tensor(sigmas, dtype=torch.float64)
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, float(sigmas[i]))
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def test_dpmpp_2m_is_k_diffusions_algorithm(f64):
    edm = EDM(GaussianDenoiser())
    xT = _noise(64) * SMAX
    sig = karras_sigmas(7, SMIN, SMAX)
    ours = sample_dpmpp_2m(edm, xT, sig, None, fused=False)
    ref = _dpmpp_2m_kdiffusion(lambda x, s: MU + S**2 / (S**2 + s**2) * (x - MU), xT, sig)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_ode_samplers_converge_to_the_exact_solution_at_their_order(f64):
    """RMS error against the closed form as the steps double (16 -> 32 -> 64): DPM++(2M) and Heun fall
    ~4x per doubling (2nd order), Euler ~2x (1st order); at 32 steps DPM++(2M) is 5x closer than Euler."""
    edm = EDM(GaussianDenoiser())
    xT = _noise(256) * SMAX
    err: dict[str, list[float]] = {}
    for name, fn in (("dpmpp_2m", sample_dpmpp_2m), ("heun", sample_heun), ("euler", sample_euler)):
        err[name] = []
        for steps in (16, 32, 64):
            sig = karras_sigmas(steps, SMIN, SMAX)
            out = fn(edm, xT, sig, None, fused=False)
            err[name].append(float((out - _exact(xT, sig)).pow(2).mean().sqrt()))
    for name in ("dpmpp_2m", "heun"):
        assert err[name][0] / err[name][1] > 3.0 and err[name][1] / err[name][2] > 3.0, (name, err[name])
    for a, b in zip(err["euler"], err["euler"][1:], strict=False):
        assert 1.6 < a / b < 2.4, err["euler"]
    assert err["dpmpp_2m"][2] < 0.005 and err["dpmpp_2m"][1] < err["euler"][1] / 5, err


@pytest.mark.parametrize("sampler", ["euler", "euler_maruyama", "heun", "dpmpp_2m"])
def test_samplers_draw_the_data_distribution(sampler, f64):
    """From N(0, σ_max²) noise the sample std approaches the data's S = 0.5 as the steps grow (8,192
    rows x 16 dims per run); at 64 steps within 2 % (2nd order) or 10 % (1st order); the mean is MU."""
    edm = EDM(GaussianDenoiser())
    gap = []
    for steps in (16, 32, 64):
        g = torch.Generator().manual_seed(1)
        xT = torch.randn(512, 4, 16, generator=g, dtype=torch.float64) * SMAX
        out = SAMPLERS[sampler](edm, xT, karras_sigmas(steps, SMIN, SMAX), None, generator=g, fused=False)
        assert float(out.mean()) == pytest.approx(MU, abs=0.01)
        gap.append(abs(float(out.std()) - S) / S)
    assert gap[0] > gap[1] > gap[2], gap
    assert gap[2] < (0.02 if sampler in ("heun", "dpmpp_2m") else 0.1), gap


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampler_with_the_ideal_consistency_function(steps, f64):
    """With f = the exact flow map to σ = 0, every step count draws N(MU, S²) exactly; with the plain
    denoiser one step returns the posterior mean (std ≈ S²/σ_max), not a sample."""
    g = torch.Generator().manual_seed(2)
    xT = torch.randn(512, 4, 16, generator=g, dtype=torch.float64) * SMAX
    sig = consistency_sigmas(steps, S, SMAX)
    out = SAMPLERS["consistency"](EDM(GaussianDenoiser(flow=True)), xT, sig, None, generator=g, fused=False)
    assert float(out.mean()) == pytest.approx(MU, abs=0.01)
    assert float(out.std()) == pytest.approx(S, rel=0.02)
    if steps == 1:
        torch.testing.assert_close(out, MU + S / math.sqrt(S**2 + SMAX**2) * (xT - MU))
        mean = SAMPLERS["consistency"](EDM(GaussianDenoiser()), xT, sig, None, generator=g, fused=False)
        assert float(mean.std()) < 0.01


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_nfe_counts_forward_calls(sampler, guidance):
    model = GaussianDenoiser()
    edm = EDM(model)
    cond = torch.randn(3, 16)
    for steps in (1, 2, 3, 5):
        model.calls = 0
        generate_sets(edm, cond, steps=steps, sampler=sampler, guidance=guidance, seed=0, fused=False)
        assert model.calls == nfe(sampler, steps), (sampler, steps)
        assert steps_for_nfe(sampler, nfe(sampler, steps)) == steps
    assert nfe("heun", 16) == 31 and steps_for_nfe("heun", 8) is None
    assert steps_for_nfe("consistency", CONSISTENCY_MAX_STEPS + 1) is None
    with pytest.raises(ValueError, match=r"sampler: unknown 'ddim'; valid choices"):
        nfe("ddim", 4)
    with pytest.raises(ValueError, match="steps: expected a positive int, got 0"):
        nfe(sampler, 0)


def test_guided_dpmpp_2m_uses_the_guided_denoiser(f64):
    """Guidance w: D = (1+w)·D_c − w·D_u. For Gaussian denoisers of means μ_c and μ_u that is the exact
    denoiser of mean (1+w)·μ_c − w·μ_u, so the guided run equals an unguided run for that mean."""
    edm = EDM(GaussianDenoiser())
    xT = _noise(256) * SMAX
    sig = karras_sigmas(12, SMIN, SMAX)
    guided = sample_dpmpp_2m(edm, xT, sig, torch.full((256, 16), 0.2), guidance=0.5, fused=False)
    plain = sample_dpmpp_2m(edm, xT, sig, torch.full((256, 16), 0.3), guidance=0.0, fused=False)
    torch.testing.assert_close(guided, plain, atol=1e-9, rtol=1e-9)


def test_sampler_schedules():
    cfg = get_preset("tiny", sigma_data=0.05)
    assert sampler_sigmas("heun", 4, cfg) == karras_sigmas(4, 2e-3, cfg.sigma_max)
    assert sampler_sigmas("consistency", 1, cfg) == [cfg.sigma_max, 0.0]
    c3 = sampler_sigmas("consistency", 3, cfg)
    assert len(c3) == 4 and c3[0] == cfg.sigma_max and c3[-2] == pytest.approx(0.05) and c3[-1] == 0.0
    assert sampler_sigmas("dpmpp_2m", 3, cfg, sigma_min=0.01, sigma_max=10.0) == karras_sigmas(3, 0.01, 10.0)
    with pytest.raises(ValueError, match="steps: the consistency sampler takes 1 to 8 steps, got 9"):
        consistency_sigmas(9, 0.05, 80.0)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "consistency"])
def test_few_step_samplers_fused_equals_reference_with_a_network(sampler):
    """The real set transformer in float32: the fused elementwise path equals the PyTorch reference
    (1e-5 absolute on outputs of scale ~0.1-1), with and without guidance."""
    torch.manual_seed(0)
    m = SetDenoiser(get_preset("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    edm = EDM(m)
    cond = torch.randn(3, 16)
    for w in (0.0, 0.5):
        a = generate_sets(edm, cond, steps=4, sampler=sampler, guidance=w, seed=3, fused=True)
        b = generate_sets(edm, cond, steps=4, sampler=sampler, guidance=w, seed=3, fused=False)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
