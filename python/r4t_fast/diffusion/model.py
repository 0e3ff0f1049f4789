"""Set diffusion: EDM-preconditioned, variance-exploding diffusion over whole sets of L embeddings.

The denoiser is a *coherent set transformer*: all L rows of a set are denoised jointly (self-attention
across rows, no positional encoding, so the model is permutation-equivariant and cannot depend on row
order), the query embedding enters by cross-attention, and the noise level by adaptive layer norm.

EDM (Karras et al. 2022) with x0-prediction::

    D(x; σ, c) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ), c)
    c_skip = σd² / (σ² + σd²), c_out = σ·σd / √(σ² + σd²), c_in = 1 / √(σ² + σd²), c_noise = ln(σ) / 4
    loss   = λ(σ)·‖D(x0 + σ·n; σ, c) − x0‖²,  λ(σ) = (σ² + σd²) / (σ·σd)²

σ is drawn from the "tangent" schedule σ = tan(atan σ_min + u·(atan σ_max − atan σ_min)), u ~ U(0, 1)
(our reading of the paper's "tangent" schedule: uniform in the angle between σ_min and σ_max).
Classifier-free guidance: during training the condition is replaced by a learned null token with
probability ``p_uncond``; at sampling D = (1 + w)·D(x, σ, c) − w·D(x, σ, ∅).

Query-centred targets (``cond_offset`` = a, our addition; 0 turns it off): when the query and the rows
live in one embedding space, the model denoises x0 − a·q and the sampler adds a·q back
(:meth:`EDM.center` / :meth:`EDM.uncenter`). ``r4t train-diffusion`` fits a by least squares. The
network then only has to learn how the set spreads around the query, not where the query is; with a
few hundred synthesised pairs the uncentred model had barely learned to use the query at all
(benchmarks/results/pipeline/polyvore/README.md).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from r4t_fast._internal import atomic_write, atomic_write_text, check_positive_int

__all__ = [
    "DiffusionConfig",
    "SetDenoiser",
    "MODEL_PRESETS",
    "PRESETS",
    "get_preset",
    "EDM",
    "shift_rows",
    "save_model",
    "load_model",
]


@dataclass
class DiffusionConfig:
    """Architecture and noise settings of the set diffusion model."""

    set_size: int = field(default=12, metadata={"help": "L: rows per generated set"})
    dim: int = field(default=128, metadata={"help": "d: embedding dimension of each row"})
    cond_dim: int = field(default=128, metadata={"help": "dimension of the query embedding"})
    hidden: int = field(default=1024, metadata={"help": "transformer width"})
    layers: int = field(default=6, metadata={"help": "number of transformer blocks"})
    heads: int = field(default=16, metadata={"help": "attention heads"})
    mlp: int = field(default=1024, metadata={"help": "MLP hidden width"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in attention/MLP"})
    cond_tokens: int = field(default=4, metadata={"help": "tokens the query embedding is projected to"})
    sigma_min: float = field(default=1e-4, metadata={"help": "smallest noise level"})
    sigma_max: float = field(default=80.0, metadata={"help": "largest noise level"})
    sigma_data: float = field(default=0.088, metadata={"help": "data std (set from the training data)"})
    p_uncond: float = field(default=0.1, metadata={"help": "condition dropout probability (for CFG)"})
    cond_offset: float = field(
        default=0.0,
        metadata={
            "help": "a: rows are modelled as x0 - a * query (query-centred targets, needs cond_dim == dim); "
            "0 = off. r4t train-diffusion fits it by least squares"
        },
    )
    sigma_sampling: str = field(
        default="tangent", metadata={"help": "training noise levels: tangent (paper) | lognormal (EDM)"}
    )
    p_mean: float = field(default=-1.2, metadata={"help": "lognormal: mean of ln(σ/σ_data) + ln 0.5"})
    p_std: float = field(default=1.2, metadata={"help": "lognormal: std of ln σ"})

    def __post_init__(self) -> None:
        for name in ("set_size", "dim", "cond_dim", "hidden", "layers", "heads", "mlp", "cond_tokens"):
            setattr(self, name, check_positive_int(getattr(self, name), name))
        if self.hidden % self.heads:
            raise ValueError(f"hidden: must be divisible by heads ({self.heads}), got {self.hidden}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"sigma_min/sigma_max: need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data: expected > 0, got {self.sigma_data}")
        if self.sigma_sampling not in ("tangent", "lognormal"):
            raise ValueError(
                f"sigma_sampling: expected 'tangent' or 'lognormal', got {self.sigma_sampling!r}"
            )
        if not math.isfinite(self.cond_offset):
            raise ValueError(f"cond_offset: expected a finite float, got {self.cond_offset!r}")
        if self.cond_offset and self.cond_dim != self.dim:
            raise ValueError(
                f"cond_offset: needs cond_dim == dim (one space), got {self.cond_dim} and {self.dim}"
            )
        if not 0 <= self.p_uncond < 1 or not 0 <= self.dropout < 1:
            raise ValueError("p_uncond/dropout: expected values in [0, 1)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusionConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's model: L = 12, d = 128, hidden 1024, MLP 1024, 16 heads, 6 layers (~54M parameters).
    "paper": dict(set_size=12, dim=128, hidden=1024, mlp=1024, heads=16, layers=6, dropout=0.1),
    # Trains in minutes on a 2-core CPU.
    # Small budgets: EDM's log-normal noise levels (the tangent schedule spends few steps at the low noise
    # levels that place rows precisely; measured on tests/test_diffusion.py's mode-coverage problem:
    # coverage 0.92 vs 0.83 after 500 steps).
    "cpu-small": dict(
        set_size=10,
        dim=128,
        hidden=256,
        mlp=512,
        heads=4,
        layers=4,
        dropout=0.0,
        cond_tokens=2,
        sigma_sampling="lognormal",
    ),
    # For unit tests.
    "tiny": dict(
        set_size=4,
        dim=16,
        cond_dim=16,
        hidden=128,
        mlp=256,
        heads=4,
        layers=2,
        dropout=0.0,
        cond_tokens=1,
        sigma_sampling="lognormal",
    ),
}


PRESETS = MODEL_PRESETS  # deprecated name (0.1); ``r4t_fast.pipeline.PIPELINE_PRESETS`` presets whole runs


def get_preset(name: str, **overrides: Any) -> DiffusionConfig:
    """A named preset (``paper``, ``cpu-small``, ``tiny``) with optional field overrides."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"preset: unknown {name!r}; valid choices: {sorted(MODEL_PRESETS)}")
    return DiffusionConfig.from_dict({**MODEL_PRESETS[name], **overrides})


class _Block(nn.Module):
    """Pre-LN block: self-attention over rows → cross-attention to the query tokens → MLP.

    The noise level enters through a scale/shift modulation of the first and last layer norms that is
    shared by all blocks (computed once per forward pass). Keys/values of the cross-attention are
    projected straight from the query tokens (``cond_dim`` wide), as in the paper's ~54M-parameter model.
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.norm2 = nn.LayerNorm(h)
        self.q_x = nn.Linear(h, h)
        self.kv_c = nn.Linear(cfg.cond_dim, 2 * h)
        self.proj_c = nn.Linear(h, h)
        self.norm3 = nn.LayerNorm(h, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(h, cfg.mlp), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.mlp, h)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.p_drop = cfg.dropout

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, n, h = t.shape
        return t.view(B, n, self.heads, h // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...], cond: torch.Tensor) -> torch.Tensor:
        B, L, h = x.shape
        s1, b1, s2, b2 = mod
        p = self.p_drop if self.training else 0.0
        y = self.norm1(x) * (1 + s1) + b1
        q, k, v = self.qkv(y).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v), dropout_p=p)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, h)))
        y = self.norm2(x)
        kc, vc = self.kv_c(cond).chunk(2, dim=-1)
        a = F.scaled_dot_product_attention(
            self._split(self.q_x(y)), self._split(kc), self._split(vc), dropout_p=p
        )
        x = x + self.drop(self.proj_c(a.transpose(1, 2).reshape(B, L, h)))
        y = self.norm3(x) * (1 + s2) + b2
        return x + self.drop(self.mlp(y))


class SetDenoiser(nn.Module):
    """F_θ(x_in (B, L, d), c_noise (B,), cond (B, cond_dim) or None) -> (B, L, d).

    ``cond=None`` (or rows of ``drop_mask`` set) use the learned null condition (classifier-free
    guidance). Permutation-equivariant over the L rows.
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.inp = nn.Linear(cfg.dim, h)
        self.freqs = nn.Parameter(torch.randn(h // 2) * 4.0, requires_grad=False)  # Fourier σ features
        self.sigma_mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))  # shared σ modulation
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)
        self.cond_proj = nn.Linear(cfg.cond_dim, cfg.cond_tokens * cfg.cond_dim)
        self.null_cond = nn.Parameter(torch.zeros(cfg.cond_tokens, cfg.cond_dim))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.out_norm = nn.LayerNorm(h, elementwise_affine=False)
        self.out = nn.Linear(h, cfg.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        cond: torch.Tensor | None,
        drop_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B = x.shape[0]
        cd = self.cfg.cond_dim
        f = c_noise[:, None].float() * self.freqs[None, :] * (2 * math.pi)
        emb = self.sigma_mlp(torch.cat([f.cos(), f.sin()], dim=-1))
        s1, b1, s2, b2, s3, b3 = self.ada(emb)[:, None, :].chunk(6, dim=-1)
        null = self.null_cond[None].expand(B, -1, -1)
        if cond is None:
            c = null
        else:
            c = self.cond_proj(cond).view(B, self.cfg.cond_tokens, cd)
            if drop_mask is not None:
                c = torch.where(drop_mask[:, None, None], null, c)
        y = self.inp(x)
        for blk in self.blocks:
            y = blk(y, (s1, b1, s2, b2), c)
        return self.out(self.out_norm(y) * (1 + s3) + b3)


def shift_rows(x: torch.Tensor, cond: torch.Tensor, a: float) -> torch.Tensor:
    """``x + a * cond`` for every row of every set: x (B, L, d), cond (B, d); ``x`` itself when a = 0."""
    return x + a * cond[:, None, :].to(x.dtype) if a else x


class EDM:
    """EDM preconditioning and training loss around a :class:`SetDenoiser`."""

    def __init__(self, model: SetDenoiser) -> None:
        self.model = model
        self.cfg = model.cfg

    def coefficients(self, sigma: float) -> tuple[float, float, float, float]:
        """(c_skip, c_out, c_in, c_noise) for one noise level, as Python floats (CPU-side schedule)."""
        sd = self.cfg.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / math.sqrt(sigma**2 + sd**2)
        c_in = 1.0 / math.sqrt(sigma**2 + sd**2)
        return c_skip, c_out, c_in, math.log(sigma) / 4.0

    def raw(self, x: torch.Tensor, sigma: float, cond: torch.Tensor | None) -> torch.Tensor:
        """F_θ at one scalar noise level for the whole batch."""
        _, _, c_in, c_noise = self.coefficients(sigma)
        cn = torch.full((x.shape[0],), c_noise, device=x.device)
        return self.model(x * c_in, cn, cond)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond, drop_mask=None) -> torch.Tensor:
        """D(x; σ, c) for per-example σ (B,)."""
        sd = self.cfg.sigma_data
        s = sigma.view(-1, 1, 1)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        return c_skip * x + c_out * self.model(x * c_in, sigma.log() / 4, cond, drop_mask)

    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training noise levels. ``tangent``: σ = tan(atan σ_min + u·(atan σ_max − atan σ_min)),
        u ~ U(0, 1). ``lognormal`` (EDM, rescaled to the data): ln σ ~ N(p_mean + ln(σ_data/0.5), p_std²),
        clipped to [σ_min, σ_max]."""
        if self.cfg.sigma_sampling == "lognormal":
            z = torch.randn(n, generator=generator, device=device)
            ln = self.cfg.p_mean + math.log(self.cfg.sigma_data / 0.5) + self.cfg.p_std * z
            return ln.exp().clamp(self.cfg.sigma_min, self.cfg.sigma_max)
        u = torch.rand(n, generator=generator, device=device)
        a0, a1 = math.atan(self.cfg.sigma_min), math.atan(self.cfg.sigma_max)
        return torch.tan(a0 + u * (a1 - a0))

    def center(self, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Data rows -> the space the network denoises: x0 - a * cond (a = ``cond_offset``; identity at 0)."""
        return shift_rows(x0, cond, -self.cfg.cond_offset)

    def uncenter(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`center`: sampled rows + a * cond."""
        return shift_rows(x, cond, self.cfg.cond_offset)

    def loss(
        self,
        x0: torch.Tensor,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        return_denoised: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """λ(σ)-weighted x0 loss with condition dropout, averaged over the batch (x0: data rows).

        ``return_denoised``: also return the clean-set prediction in the data space (``uncenter(D)``,
        (B, L, d), with its graph) and the bool (B,) mask of the sets whose condition was kept -- what
        a loss on the rows themselves (:mod:`r4t_fast.train.row_loss`) is computed on.
        """
        x0 = self.center(x0, cond)
        B = x0.shape[0]
        sigma = self.sample_sigma(B, generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        drop = (torch.rand(B, generator=generator) < self.cfg.p_uncond).to(x0.device)
        D = self.denoise(x0 + sigma.view(-1, 1, 1) * noise, sigma, cond, drop)
        sd = self.cfg.sigma_data
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        loss = (weight * ((D - x0) ** 2).mean(dim=(1, 2))).mean()
        if return_denoised:
            return loss, self.uncenter(D, cond), ~drop
        return loss


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, parameter-wise."""
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm.detach(), 1.0 - decay)


def clone_for_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    ema.eval()
    return ema


def save_model(model: SetDenoiser, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (atomically) into directory ``path``."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(d / "model.safetensors", lambda p: save_file(state, str(p)))
    meta = {"format": "r4t_fast.diffusion", "config": asdict(model.cfg), **(extra or {})}
    atomic_write_text(d / "config.json", json.dumps(meta, indent=2))
    return d


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[SetDenoiser, dict]:
    """Load a model saved by :func:`save_model`. Returns (model in eval mode, the config.json dict)."""
    d = Path(path)
    cfg_path, w_path = d / "config.json", d / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"path: {d} is not a diffusion model directory (missing {p.name})")
    try:
        meta = json.loads(cfg_path.read_text())
        cfg = DiffusionConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{cfg_path}: corrupt model config ({exc})") from exc
    model = SetDenoiser(cfg)
    try:
        state = load_file(str(w_path))
    except Exception as exc:  # safetensors raises several types on corrupt files
        raise ValueError(f"{w_path}: unreadable weights ({exc})") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{w_path}: weights do not match the config (missing {missing}, unexpected {unexpected})"
        )
    return model.to(device).eval(), meta
