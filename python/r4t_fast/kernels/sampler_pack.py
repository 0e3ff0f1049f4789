"""Weight packing for the fused set sampler :func:`r4t_fast.ops.sample_sets`.

:func:`pack_denoiser` copies a :class:`~r4t_fast.diffusion.SetDenoiser`'s parameters once into one
contiguous float32 buffer in the layout the C++ kernel reads (every ``nn.Linear`` as 32-column panels of
Wᵀ; the layout is documented in ``csrc/set_sampler_params.h`` and defined once, in C++). The packed
object is cached on the model and rebuilt when any parameter changes (in-place updates bump
``Tensor._version``; a new tensor has a new data pointer) or a sampling-relevant config value changes.

:func:`step_noise` draws the per-step noise of the stochastic samplers in the order
``r4t_fast.diffusion.samplers`` draws it, so a fused run can reproduce a generator-seeded eager run.

This module only duck-types the model (``.cfg`` and ``.state_dict()``): the kernels room sits below
``diffusion/`` and does not import it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from r4t_fast.kernels import _backend

__all__ = ["PackedDenoiser", "SAMPLER_IDS", "SampledSets", "pack_denoiser", "step_noise"]

SAMPLER_IDS: dict[str, int] = {
    "euler": 0,
    "euler_maruyama": 1,
    "heun": 2,
    "dpmpp_2m": 3,
    "consistency": 4,
}
"""Sampler names of ``r4t_fast.diffusion.samplers.SAMPLERS`` -> the kernel's ``SetSampler`` ids."""

_CACHE_ATTR = "_r4t_fast_packed"
_UIDS = itertools.count(1)  # PackedDenoiser.uid: one per packed buffer, never reused in a process


class SampledSets(NamedTuple):
    """What :func:`r4t_fast.ops.sample_sets` returns: ``rows`` float32 (batch, rows, dim) in data space;
    ``ids`` int64 / ``scores`` float32 (batch / group, group * rows) of the grounding, or None when no
    catalog was given; ``anchor_ids`` / ``anchor_scores`` (batch / group, anchor_k): the anchors' nearest
    items (as :func:`r4t_fast.ops.knn` returns them), None without an anchor."""

    rows: torch.Tensor
    ids: torch.Tensor | None
    scores: torch.Tensor | None
    anchor_ids: torch.Tensor | None = None
    anchor_scores: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class PackedDenoiser:
    """A SetDenoiser's weights in the fused kernel's layout (float32, CPU), plus the config values the
    sampler needs. ``dims`` = (L, d, cond_dim, hidden, layers, heads, mlp, cond_tokens)."""

    dims: tuple[int, int, int, int, int, int, int, int]
    sigma_data: float
    sigma_min: float
    cond_offset: float
    buffer: torch.Tensor
    key: tuple = ()
    sources: tuple[torch.Tensor, ...] = ()  # the model's parameters it was packed from (cache check)
    sources_on_cpu: bool = True  # all of them float32 on the CPU (the fused kernel runs such models only)
    # Non-zero: unique to this packing's buffer (pack_denoiser), whose contents never change: the kernel
    # caches per-schedule constants under it. 0 (a hand-made packing): nothing is cached.
    uid: int = 0
    _offsets: dict = field(default_factory=dict, repr=False)  # with_cond_offset's copies, by offset

    def with_cond_offset(self, cond_offset: float) -> PackedDenoiser:
        """This packing with another ``cond_offset`` (the same buffer and ``uid``: the offset is a call
        argument of the kernel, not part of its cached constants); one copy per offset, reused."""
        off = float(cond_offset)
        if off == self.cond_offset:
            return self
        hit = self._offsets.get(off)
        if hit is None:
            hit = self._offsets[off] = dataclasses.replace(self, cond_offset=off, _offsets=self._offsets)
        return hit

    @property
    def set_size(self) -> int:
        return self.dims[0]

    @property
    def dim(self) -> int:
        return self.dims[1]

    @property
    def cond_dim(self) -> int:
        return self.dims[2]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * 4


def _dims(cfg: Any) -> tuple[int, int, int, int, int, int, int, int]:
    names = ("set_size", "dim", "cond_dim", "hidden", "layers", "heads", "mlp", "cond_tokens")
    return tuple(int(getattr(cfg, n)) for n in names)  # type: ignore[return-value]


def _key(cfg: Any, tensors: tuple[torch.Tensor, ...]) -> tuple:
    """What the packed buffer depends on: the config values it reads and every parameter's storage and
    version (in-place updates such as optimizer steps, ``load_state_dict`` or ``.to()`` change one)."""
    versions = tuple((t.data_ptr(), t._version) for t in tensors)
    return (_dims(cfg), float(cfg.sigma_data), float(cfg.sigma_min), float(cfg.cond_offset), versions)


def cached_packing(model: Any) -> PackedDenoiser | None:
    """The packing :func:`pack_denoiser` cached on ``model`` while it is current (no parameter it was
    packed from changed, no sampling-relevant config value changed), else None. Checked against the
    tensors it was packed from: ~30 us, no module traversal."""
    hit = model.__dict__.get(_CACHE_ATTR)
    cfg = getattr(model, "cfg", None)
    if isinstance(hit, PackedDenoiser) and cfg is not None and hit.key == _key(cfg, hit.sources):
        return hit
    return None


def pack_denoiser(model: Any, *, cache: bool = True) -> PackedDenoiser:
    """Pack ``model`` (a :class:`~r4t_fast.diffusion.SetDenoiser`) for :func:`r4t_fast.ops.sample_sets`.

    The result is cached on the model (attribute ``_r4t_fast_packed``) and reused while no parameter
    changed (in place or by ``.to()``) and no sampling-relevant config value changed; a parameter
    *replaced* by a new ``nn.Parameter`` object is not seen: pass ``cache=False`` then. float32 models
    only. The fused kernel has inference semantics (dropout off), as the eager model in ``eval()``.
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "state_dict"):
        raise TypeError(
            f"model: expected a SetDenoiser (with .cfg and .state_dict()), got {type(model).__name__}"
        )
    if cache:
        hit = cached_packing(model)
        if hit is not None:
            return hit
    state = dict(model.state_dict(keep_vars=True))
    dims = _dims(cfg)
    C = _backend.lib()
    specs = C.set_denoiser_param_specs(dims)
    src, sources = [], []
    for name, shape in specs:
        if name not in state:
            raise ValueError(f"model: has no parameter {name!r} (is it a SetDenoiser with config {dims}?)")
        t = state[name].detach()
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"model: parameter {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.dtype != torch.float32:
            raise ValueError(
                f"model: parameter {name!r} is {t.dtype}; the fused sampler runs float32 models "
                "(pack a float32 copy explicitly)"
            )
        src.append(t.to(device="cpu").contiguous())
        sources.append(state[name])
    n = int(C.set_denoiser_packed_size(dims))
    buf = torch.empty(n, dtype=torch.float32)
    C.set_denoiser_pack(dims, [t.data_ptr() for t in src], buf.data_ptr(), n)
    packed = PackedDenoiser(
        dims=dims,
        sigma_data=float(cfg.sigma_data),
        sigma_min=float(cfg.sigma_min),
        cond_offset=float(cfg.cond_offset),
        buffer=buf,
        key=_key(cfg, tuple(sources)),
        sources=tuple(sources),
        sources_on_cpu=all(t.device.type == "cpu" for t in sources),
        uid=next(_UIDS),
    )
    if cache:
        model.__dict__[_CACHE_ATTR] = packed
    return packed


def step_noise(
    sampler: str,
    sigmas: Sequence[float],
    shape: tuple[int, int, int],
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """The noise the stochastic samplers of ``r4t_fast.diffusion.samplers`` draw, as one
    ``(steps, batch, rows, dim)`` float32 tensor for :func:`r4t_fast.ops.sample_sets` (``None`` for the
    deterministic samplers).

    Slice i holds step i's draw: ``euler_maruyama`` draws at the steps with σ_up > 0, ``consistency`` at
    steps i >= 1; the other slices are zero. Draws are made one ``(batch, rows, dim)`` tensor at a time
    from ``generator``, in step order, exactly as the eager samplers do after the initial noise.
    """
    if sampler not in SAMPLER_IDS:
        raise ValueError(f"sampler: unknown {sampler!r}; valid choices: {sorted(SAMPLER_IDS)}")
    if sampler not in ("euler_maruyama", "consistency"):
        return None
    steps = len(sigmas) - 1
    out = torch.zeros((max(steps, 0), *shape), dtype=torch.float32)
    for i in range(steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if sampler == "euler_maruyama":
            draws = math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0)) > 0
        else:
            draws = i > 0
        if draws:
            out[i] = torch.randn(shape, generator=generator, dtype=torch.float32)
    return out
