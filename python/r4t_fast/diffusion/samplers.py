"""Samplers for the set diffusion model. All share ``sample_*(edm, x, sigmas, cond, ...)``; noise
schedules are plain Python floats computed on the CPU, so a step never forces a device sync.

=================  ==========================================================  ==================
sampler            algorithm                                                   NFE for ``steps``
=================  ==========================================================  ==================
``euler``          Euler on the probability-flow ODE                           ``steps``
``euler_maruyama`` ancestral Euler-Maruyama on the reverse SDE (the paper's)   ``steps``
``heun``           Heun, 2nd order (EDM Algorithm 1; last step Euler)          ``2 * steps - 1``
``dpmpp_2m``       DPM-Solver++(2M), k-diffusion's form                        ``steps``
``consistency``    multistep consistency sampling (a distilled model, 1-4)     ``steps``
=================  ==========================================================  ==================

``steps`` is the number of noise levels (``sigmas`` holds ``steps + 1`` floats ending at 0) and NFE the
number of network evaluations (:func:`nfe`). With classifier-free guidance each evaluation is one
forward of a doubled batch (conditional and unconditional rows together), so the NFE count is the same.
Each sampler's schedule is :func:`sampler_sigmas` (Karras for the ODE/SDE solvers; the consistency
sampler's levels stop at σ_data instead of σ_min, where re-noising still changes the sample).

On the CPU, :func:`generate_sets` runs a float32 :class:`~r4t_fast.diffusion.SetDenoiser`'s whole
sampling in one call of the fused kernel :func:`r4t_fast.ops.sample_sets` (network, every step, optionally
the grounding: :func:`fused_sample_sets`). Elsewhere (CUDA, other models, ``fused=False``) it runs the
eager samplers below (:func:`eager_sample_sets`), whose every step's elementwise work (EDM
preconditioning, the classifier-free guidance combine, the update and the injected noise) runs through
the fused step kernel :func:`r4t_fast.ops.edm_step` (C++ on the CPU, CUDA on the GPU); a sampler's
``fused=False`` runs the pure-PyTorch reference :func:`r4t_fast.reference.edm_step` instead, which the
tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from r4t_fast._internal import check_positive_int, check_seed
from r4t_fast.diffusion.model import EDM, DiffusionConfig, SetDenoiser
from r4t_fast.kernels import ops, reference
from r4t_fast.kernels.sampler_pack import (
    PackedDenoiser,
    SampledSets,
    cached_packing,
    pack_denoiser,
    step_noise,
)

__all__ = [
    "SAMPLERS",
    "SAMPLING_DEFAULTS",
    "SamplingDefaults",
    "consistency_sigmas",
    "eager_sample_sets",
    "fused_packing",
    "fused_sample_sets",
    "fused_unavailable",
    "generate_sets",
    "get_sampler",
    "karras_sigmas",
    "nfe",
    "sample_consistency",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_maruyama",
    "sample_heun",
    "sampler_sigmas",
    "steps_for_nfe",
]


@dataclass(frozen=True)
class SamplingDefaults:
    """The one set of sampling defaults, used by ``generate_sets``, the ``Retriever`` and the presets.

    Chosen on the Polyvore validation split (benchmarks/results/pipeline/polyvore/val-sweep/): guidance
    barely changes quality, and w = 0 needs half the network calls; fewer than 16 Heun steps leave rows
    less grounded.
    """

    steps: int = field(default=16, metadata={"help": "noise levels of the Karras schedule"})
    sampler: str = field(default="heun", metadata={"help": "one of SAMPLERS"})
    guidance: float = field(default=0.0, metadata={"help": "classifier-free guidance weight w"})
    seed: int = field(default=0, metadata={"help": "seed of the initial noise (and SDE noise)"})

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "sampler": self.sampler, "guidance": self.guidance, "seed": self.seed}


SAMPLING_DEFAULTS = SamplingDefaults()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras et al. (2022) noise levels, decreasing, with a final 0: ``steps + 1`` floats."""
    steps = check_positive_int(steps, "steps")
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


def _denoised(
    edm: EDM, x: torch.Tensor, sigma: float, cond: torch.Tensor | None, guidance: float, fused: bool
) -> torch.Tensor:
    """D(x; σ, c) (guided when ``guidance`` != 0) through the same fused step with h = 0 (x unchanged)."""
    _, D = _step(edm, x, sigma, cond, guidance, 0.0, None, 0.0, fused, want_denoised=True)
    if D is None:  # pragma: no cover - _step always returns D when asked
        raise RuntimeError("edm_step: returned no denoised tensor")
    return D


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


@torch.no_grad()
def sample_dpmpp_2m(
    edm: EDM,
    x: torch.Tensor,
    sigmas: list[float],
    cond: torch.Tensor | None,
    *,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in k-diffusion's form: one network evaluation per step.

    With the denoiser D (x0-prediction), t = −log σ and h = t' − t: x' = (σ'/σ)·x − expm1(−h)·D̃, where
    D̃ = (1 + 1/(2r))·D − 1/(2r)·D_prev with r = h_prev / h (second-order multistep), and D̃ = D on the
    first step and on the last step to σ' = 0 (first order; that step returns D).
    """
    x = x.clone()
    old: torch.Tensor | None = None
    h_last = 0.0
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        D = _denoised(edm, x, s, cond, guidance, fused)
        if s_next == 0:
            x = D
            break
        h = math.log(s) - math.log(s_next)
        if old is None:
            d = D
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * D - (1 / (2 * r)) * old
        x = (s_next / s) * x - math.expm1(-h) * d
        old, h_last = D, h
    return x


@torch.no_grad()
def sample_consistency(
    edm: EDM,
    x: torch.Tensor,
    sigmas: list[float],
    cond: torch.Tensor | None,
    *,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) for a distilled model.

    x0 = f(x, σ_0); then for each later level σ_i > 0: x = x0 + √(σ_i² − σ_min²)·z, x0 = f(x, σ_i).
    f is the model's EDM denoiser D (a consistency-distilled model, ``r4t distill``); with an ordinary
    EDM model one step returns the posterior mean, not a sample.
    """
    smin = edm.cfg.sigma_min
    out = x.clone()
    for i, s in enumerate(sigmas[:-1]):
        if i > 0:
            out = out + math.sqrt(max(s * s - smin * smin, 0.0)) * _noise_like(out, generator)
        out = _denoised(edm, out, s, cond, guidance, fused)
    return out


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_maruyama": sample_euler_maruyama,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "consistency": sample_consistency,
}

CONSISTENCY_MAX_STEPS = 8
"""Largest step count the consistency sampler accepts (a distilled model is meant for 1-4)."""


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown {name!r}; valid choices: {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def _check_steps(steps: object) -> int:
    return check_positive_int(steps, "steps")


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations of ``sampler`` with ``steps`` noise levels (one evaluation = one forward of
    the batch, doubled under guidance): ``2 * steps - 1`` for ``heun``, ``steps`` for the others.

    >>> nfe("heun", 16), nfe("dpmpp_2m", 8), nfe("consistency", 2)
    (31, 8, 2)
    """
    get_sampler(sampler)
    steps = _check_steps(steps)
    return 2 * steps - 1 if sampler == "heun" else steps


def steps_for_nfe(sampler: str, n: int) -> int | None:
    """The ``steps`` at which ``sampler`` makes exactly ``n`` network evaluations, or None if none does
    (``heun`` reaches only odd counts; ``consistency`` at most ``CONSISTENCY_MAX_STEPS``).

    >>> steps_for_nfe("heun", 31), steps_for_nfe("heun", 8), steps_for_nfe("euler", 8)
    (16, None, 8)
    """
    get_sampler(sampler)
    n = _check_steps(n)
    if sampler == "heun":
        return (n + 1) // 2 if n % 2 else None
    if sampler == "consistency" and n > CONSISTENCY_MAX_STEPS:
        return None
    return n


def consistency_sigmas(steps: int, sigma_low: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """The consistency sampler's levels: σ_max, then ``steps - 1`` Karras levels down to ``sigma_low``,
    then 0 (``steps + 1`` floats). ``[σ_max, 0]`` for one step."""
    steps = _check_steps(steps)
    if steps > CONSISTENCY_MAX_STEPS:
        raise ValueError(
            f"steps: the consistency sampler takes 1 to {CONSISTENCY_MAX_STEPS} steps, got {steps}"
        )
    if steps == 1:
        return [float(sigma_max), 0.0]
    return karras_sigmas(steps, sigma_low, sigma_max, rho)


def sampler_sigmas(
    sampler: str,
    steps: int,
    cfg: DiffusionConfig,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> list[float]:
    """The noise levels ``generate_sets`` gives ``sampler`` for a model with config ``cfg``.

    ODE/SDE samplers: ``karras_sigmas(steps, sigma_min, sigma_max)`` with ``sigma_min`` defaulting to
    max(cfg.sigma_min, 2e-3). ``consistency``: :func:`consistency_sigmas` with the lowest level
    defaulting to ``cfg.sigma_data`` (re-noising far below the data scale changes nothing).
    ``sigma_max`` defaults to ``cfg.sigma_max``.
    """
    get_sampler(sampler)
    smax = sigma_max if sigma_max is not None else cfg.sigma_max
    if sampler == "consistency":
        low = sigma_min if sigma_min is not None else cfg.sigma_data
        return consistency_sigmas(steps, low, smax)
    smin = sigma_min if sigma_min is not None else max(cfg.sigma_min, 2e-3)
    return karras_sigmas(steps, smin, smax)


SeedArg = int | Sequence[int] | None
"""``seed`` of :func:`generate_sets`: one int (one generator for the batch), a sequence of ints (one
generator per group of consecutive condition rows), or None (torch's global generator)."""


def _stochastic(sampler: str, steps: int) -> bool:
    return sampler == "euler_maruyama" or (sampler == "consistency" and steps > 1)


def _seed_groups(seed: SeedArg, B: int) -> list[tuple[torch.Generator | None, int]]:
    """(generator, rows) per group of consecutive condition rows: the one rule of how seeds map to rows."""
    if seed is None or not isinstance(seed, Sequence):
        g = None if seed is None else torch.Generator().manual_seed(check_seed(seed))
        return [(g, B)]
    seeds = [check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]
    if not seeds or B % len(seeds):
        raise ValueError(f"seed: the number of seeds must divide the batch ({B} rows), got {len(seeds)}")
    return [(torch.Generator().manual_seed(s), B // len(seeds)) for s in seeds]


def fused_packing(edm: EDM, cond: torch.Tensor) -> tuple[PackedDenoiser | None, str | None]:
    """``(packed, None)`` when the fused sampler kernel can run this model on ``cond`` (``packed``: its
    current :func:`pack_denoiser` packing), else ``(None, why)``. One parameter check per call: the
    tensors a current cached packing was made from are the ones the kernel reads (no module traversal,
    which took ~0.8 ms of a 5 ms batch-1 query); without one, every parameter."""
    m = edm.model
    if not isinstance(m, SetDenoiser):
        return None, f"the model is a {type(m).__name__}, not a SetDenoiser"
    if cond.device.type != "cpu":
        return None, f"cond is on {cond.device} (the fused sampler is CPU only)"
    if cond.dtype != torch.float32:
        return None, f"cond is {cond.dtype}, not float32"
    hit = cached_packing(m)  # current: packed from float32 tensors, which still hold the same storage
    for p in () if hit is not None and hit.sources_on_cpu else m.parameters():
        if p.device.type != "cpu" or p.dtype != torch.float32:
            return None, f"the model's parameters are {p.dtype} on {p.device} (need float32 on the CPU)"
    if m.training and edm.cfg.dropout > 0:
        return None, "the model is in training mode with dropout (the fused sampler has inference semantics)"
    return (hit if hit is not None else pack_denoiser(m)), None


def fused_unavailable(edm: EDM, cond: torch.Tensor) -> str | None:
    """Why the fused sampler kernel cannot run this model on ``cond`` (None: it can)."""
    return fused_packing(edm, cond)[1]


@torch.no_grad()
def fused_sample_sets(
    edm: EDM,
    cond: torch.Tensor,
    sigmas: list[float],
    *,
    sampler: str,
    guidance: float,
    seed: SeedArg,
    catalog: torch.Tensor | None = None,
    group: int = 1,
    allowed: torch.Tensor | None = None,
    check_finite: bool = True,
    pull: float = 0.0,
    anchor: torch.Tensor | None = None,
    anchor_k: int = 1,
    packed: PackedDenoiser | None = None,
    coarse: ops.CoarseCatalog | None = None,
    precision: str = "fp32",
) -> SampledSets:
    """The whole sampling (and with ``catalog`` the grounding of each ``group`` consecutive sets jointly)
    in one :func:`r4t_fast.ops.sample_sets` call, with the initial and step noise drawn exactly as the
    eager path of :func:`generate_sets` draws them for ``seed`` (a CPU float32 SetDenoiser). ``pull``: the
    rows leave in data space as x + (cond_offset + pull) * cond (the Retriever's query pull).
    ``anchor`` (one query per group) and ``anchor_k``: its nearest items from the same catalog pass.
    ``packed``: what :func:`fused_packing` returned for this model and ``cond`` (skips the check).
    ``coarse``: a :func:`r4t_fast.ops.coarse_catalog` copy of ``catalog`` for the grounding search.
    ``precision``: the GEMM precision, ``"fp32"`` or ``"bf16"`` (:func:`r4t_fast.ops.sample_sets`)."""
    if packed is None:
        packed, why = fused_packing(edm, cond)
        if packed is None:
            raise ValueError(f"fused: the fused sampler cannot run here: {why}; pass fused=None or False")
    cfg = edm.cfg
    xs, zs = [], []
    for g, n in _seed_groups(seed, cond.shape[0]):
        shape = (n, cfg.set_size, cfg.dim)
        xs.append(torch.randn(shape, generator=g).mul_(sigmas[0]))
        zs.append(step_noise(sampler, sigmas, shape, g))
    x = xs[0] if len(xs) == 1 else torch.cat(xs)
    z = None if zs[0] is None else zs[0] if len(zs) == 1 else torch.cat(zs, dim=1)
    if pull:
        packed = packed.with_cond_offset(packed.cond_offset + float(pull))
    return ops.sample_sets(
        packed,
        cond.contiguous(),
        x,
        sigmas,
        sampler=sampler,
        guidance=guidance,
        noise=z,
        catalog=catalog,
        group=group,
        allowed=allowed,
        check_finite=check_finite,
        anchor=anchor,
        anchor_k=anchor_k,
        coarse=coarse,
        precision=precision,
    )


@torch.no_grad()
def eager_sample_sets(
    edm: EDM,
    cond: torch.Tensor,
    sigmas: list[float],
    *,
    sampler: str,
    guidance: float,
    seed: SeedArg,
    step_kernel: bool = True,
) -> torch.Tensor:
    """The eager path of :func:`generate_sets` (any model, any device): the sampler loop in PyTorch,
    each step's elementwise work through :func:`r4t_fast.ops.edm_step` (``step_kernel=False``: the
    pure-PyTorch :func:`r4t_fast.reference.edm_step`). Returns (B, L, d) in data space."""
    cfg, fn = edm.cfg, get_sampler(sampler)
    groups = _seed_groups(seed, cond.shape[0])
    shape = (cfg.set_size, cfg.dim)
    if len(groups) == 1 or not _stochastic(sampler, len(sigmas) - 1):
        # one batched run: only the initial noise depends on the groups' generators
        x = torch.cat([torch.randn((n, *shape), generator=g) for g, n in groups]).to(cond.device) * sigmas[0]
        x = fn(edm, x, sigmas, cond, guidance=guidance, generator=groups[0][0], fused=step_kernel)
        return edm.uncenter(x, cond)
    outs, start = [], 0  # stochastic sampler with one generator per group: one run per group
    for g, n in groups:
        c = cond[start : start + n]
        x = torch.randn((n, *shape), generator=g).to(cond.device) * sigmas[0]
        outs.append(fn(edm, x, sigmas, c, guidance=guidance, generator=g, fused=step_kernel))
        start += n
    return edm.uncenter(torch.cat(outs), cond)


@torch.no_grad()
def generate_sets(
    edm: EDM,
    cond: torch.Tensor,
    *,
    steps: int = SAMPLING_DEFAULTS.steps,
    sampler: str = SAMPLING_DEFAULTS.sampler,
    guidance: float = SAMPLING_DEFAULTS.guidance,
    seed: SeedArg = SAMPLING_DEFAULTS.seed,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """Sample one (L, d) set per condition row: cond (B, cond_dim) -> (B, L, d) (in data space: the
    model's ``cond_offset`` is added back, :meth:`r4t_fast.diffusion.EDM.uncenter`). The noise levels
    are :func:`sampler_sigmas` (``sigma_min``/``sigma_max`` override its defaults).

    ``seed``: an int (one generator draws the initial noise of the whole batch, then each step's noise),
    a sequence of ints (one generator per group of ``B / len(seed)`` consecutive rows: a group's sets
    then do not depend on the rest of the batch), or None (torch's global generator).

    ``fused``: None (default) runs the whole sampling in one :func:`r4t_fast.ops.sample_sets` call when
    the model is a float32 :class:`~r4t_fast.diffusion.SetDenoiser` on the CPU (equal to the eager path
    within float32 rounding, ~1e-6 of the row scale, for the same noise), and otherwise the eager
    samplers with each step through :func:`r4t_fast.ops.edm_step`; True requires the fused kernel
    (ValueError saying why it cannot run); False runs the eager samplers with the pure-PyTorch
    reference step :func:`r4t_fast.reference.edm_step`.
    """
    cfg = edm.cfg
    if cond.dim() != 2 or cond.shape[1] != cfg.cond_dim:
        raise ValueError(f"cond: expected (B, {cfg.cond_dim}), got {tuple(cond.shape)}")
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused: expected None, True or False, got {fused!r}")
    sigmas = sampler_sigmas(sampler, steps, cfg, sigma_min, sigma_max)
    if fused or (fused is None and fused_unavailable(edm, cond) is None):
        kw = dict(sampler=sampler, guidance=guidance, seed=seed)
        return fused_sample_sets(edm, cond, sigmas, **kw).rows.to(cond.device)
    return eager_sample_sets(
        edm, cond, sigmas, sampler=sampler, guidance=guidance, seed=seed, step_kernel=fused is None
    )
