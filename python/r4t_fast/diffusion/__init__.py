"""Stage 3's room: the set diffusion model and the retriever built on it.

- :mod:`~r4t_fast.diffusion.model`: :class:`DiffusionConfig`, ``MODEL_PRESETS``, :class:`SetDenoiser`
  (the set transformer), :class:`EDM` (preconditioning, loss, guidance), save/load;
- :mod:`~r4t_fast.diffusion.samplers`: Karras schedule, Euler / Euler-Maruyama / Heun / DPM-Solver++(2M)
  / consistency sampling, ``nfe(sampler, steps)``, the sampling defaults (``SAMPLING_DEFAULTS``),
  ``generate_sets``; consistency distillation itself is :mod:`r4t_fast.train.distill` (``r4t distill``);
- :mod:`~r4t_fast.diffusion.retriever`: :class:`~r4t_fast.Retriever` (query text -> grounded item sets).

The names of the old ``r4t_fast.diffusion`` module are re-exported here.
"""

from __future__ import annotations

from r4t_fast.diffusion.model import (
    EDM,
    MODEL_PRESETS,
    PRESETS,
    DiffusionConfig,
    SetDenoiser,
    clone_for_ema,
    ema_update,
    get_preset,
    load_model,
    save_model,
    shift_rows,
)

__all__ = [
    "EDM",
    "MODEL_PRESETS",
    "PRESETS",
    "DiffusionConfig",
    "SetDenoiser",
    "clone_for_ema",
    "ema_update",
    "get_preset",
    "load_model",
    "save_model",
    "shift_rows",
]
