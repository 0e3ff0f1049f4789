"""Samplers for the set diffusion model. All share ``sample_*(edm, x, sigmas, cond, ...)``; noise
schedules are plain Python floats computed on the CPU, so a step never forces a device sync.

The elementwise work of every step (EDM preconditioning, the classifier-free guidance combine, the
update and the injected noise) runs through the fused kernel :func:`r4t_fast.ops.edm_step` (C++ on the
CPU, CUDA on the GPU); ``fused=False`` runs the pure-PyTorch reference :func:`r4t_fast.reference.edm_step`
instead, which the tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import ops, reference
from .diffusion import EDM

__all__ = ["karras_sigmas", "sample_euler", "sample_euler_maruyama", "sample_heun", "SAMPLERS", "get_sampler"]


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras et al. (2022) noise levels, decreasing, with a final 0: ``steps + 1`` floats."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min/sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if steps == 1:
        return [float(sigma_max), 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [float((a + i / (steps - 1) * (b - a)) ** rho) for i in range(steps)] + [0.0]


def _model_outputs(
    edm: EDM, x: torch.Tensor, sigma: float, cond: torch.Tensor | None, guidance: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw network outputs F_cond and (when guiding) F_uncond, in one batched forward."""
    _, _, c_in, c_noise = edm.coefficients(sigma)
    B = x.shape[0]
    if guidance == 0.0 or cond is None:
        cn = torch.full((B,), c_noise, device=x.device)
        return edm.model(x * c_in, cn, cond).contiguous(), None
    xin = torch.cat([x, x]) * c_in
    cn = torch.full((2 * B,), c_noise, device=x.device)
    drop = torch.zeros(2 * B, dtype=torch.bool, device=x.device)
    drop[B:] = True
    out = edm.model(xin, cn, torch.cat([cond, cond]), drop)
    return out[:B].contiguous(), out[B:].contiguous()


def _step(
    edm: EDM,
    x: torch.Tensor,
    sigma: float,
    cond: torch.Tensor | None,
    guidance: float,
    h: float,
    noise: torch.Tensor | None,
    noise_scale: float,
    fused: bool,
    want_denoised: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    fc, fu = _model_outputs(edm, x, sigma, cond, guidance)
    c_skip, c_out, _, _ = edm.coefficients(sigma)
    w = guidance if fu is not None else 0.0
    kw = dict(sigma=sigma, c_skip=c_skip, c_out=c_out, guidance=w, h=h, noise_scale=noise_scale)
    if fused:
        den = torch.empty_like(x) if want_denoised else None
        return ops.edm_step(x, fc, fu, noise if noise_scale else None, out=x, denoised=den, **kw)
    xn, D = reference.edm_step(x, fc, fu, noise if noise_scale else None, **kw)
    return xn, (D if want_denoised else None)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


@torch.no_grad()
def sample_euler(
    edm: EDM,
    x: torch.Tensor,
    sigmas: list[float],
    cond: torch.Tensor | None,
    *,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Euler steps on the probability-flow ODE (deterministic given x)."""
    x = x.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x, _ = _step(edm, x, s, cond, guidance, s_next - s, None, 0.0, fused)
    return x


@torch.no_grad()
def sample_euler_maruyama(
    edm: EDM,
    x: torch.Tensor,
    sigmas: list[float],
    cond: torch.Tensor | None,
    *,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Euler–Maruyama on the VE reverse SDE, in ancestral form (the paper's sampler).

    σ_up = √(σ'²(σ² − σ'²)/σ²), σ_down = √(σ'² − σ_up²), x' = x + (σ_down − σ)·(x − D)/σ + σ_up·z.
    """
    x = x.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        up = math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0))
        down = math.sqrt(max(s_next**2 - up**2, 0.0))
        z = _noise_like(x, generator) if up > 0 else None
        x, _ = _step(edm, x, s, cond, guidance, down - s, z, up, fused)
    return x


@torch.no_grad()
def sample_heun(
    edm: EDM,
    x: torch.Tensor,
    sigmas: list[float],
    cond: torch.Tensor | None,
    *,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (EDM Algorithm 1, no churn)."""
    x = x.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        h = s_next - s
        x0 = x.clone()
        xe, D1 = _step(edm, x, s, cond, guidance, h, None, 0.0, fused, want_denoised=True)
        if s_next == 0:
            x = xe
            continue
        d1 = (x0 - D1) / s
        # Second evaluation at (xe, σ'): reuse the fused step with h = 0 to get D2 only.
        _, D2 = _step(edm, xe.clone(), s_next, cond, guidance, 0.0, None, 0.0, fused, want_denoised=True)
        d2 = (xe - D2) / s_next
        x = x0 + h * 0.5 * (d1 + d2)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_maruyama": sample_euler_maruyama,
    "heun": sample_heun,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown {name!r}; valid choices: {sorted(SAMPLERS)}")
    return SAMPLERS[name]


@torch.no_grad()
def generate_sets(
    edm: EDM,
    cond: torch.Tensor,
    *,
    steps: int = 32,
    sampler: str = "heun",
    guidance: float = 0.1,
    seed: int | None = 0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Sample one (L, d) set per condition row: cond (B, cond_dim) -> (B, L, d) (in data space: the
    model's ``cond_offset`` is added back, :meth:`r4t_fast.diffusion.EDM.uncenter`)."""
    cfg = edm.cfg
    if cond.dim() != 2 or cond.shape[1] != cfg.cond_dim:
        raise ValueError(f"cond: expected (B, {cfg.cond_dim}), got {tuple(cond.shape)}")
    smin = sigma_min if sigma_min is not None else max(cfg.sigma_min, 2e-3)
    smax = sigma_max if sigma_max is not None else cfg.sigma_max
    sigmas = karras_sigmas(steps, smin, smax)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn((cond.shape[0], cfg.set_size, cfg.dim), generator=g).to(cond.device) * sigmas[0]
    x = get_sampler(sampler)(edm, x, sigmas, cond, guidance=guidance, generator=g, fused=fused)
    return edm.uncenter(x, cond)
