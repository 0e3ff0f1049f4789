"""``ops.sample_sets``: the whole fused EDM sampling (and grounding) of a batch of sets in one ``_C`` call
(contract in ``csrc/set_sampler_params.h``); re-exported by :mod:`r4t_fast.kernels.ops`, whose argument
rules it shares."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from r4t_fast.kernels import _backend
from r4t_fast.kernels._arrays import (
    ArgumentTypeError,
    as_tensor,
    check_bool,
    check_choice,
    check_matrix,
    check_positive_int,
    check_real,
    check_same_device,
    describe,
    to_library,
)
from r4t_fast.kernels._rules import (
    _F32,
    _allowed,
    _catalog,
    _check_k,
    _metric,
    _threads,
)
from r4t_fast.kernels.coarse import CoarseCatalog, _coarse
from r4t_fast.kernels.sampler_pack import SAMPLER_IDS, PackedDenoiser, SampledSets

__all__ = ["PRECISIONS", "sample_sets", "sampler_linear", "SampledSets"]

PRECISIONS = {"fp32": 0, "bf16": 1, "bf16-emulated": 2}
"""The fused sampler's GEMM precisions (csrc/set_sampler_params.h): float32; bf16 inputs and weights with
float32 accumulation (AVX512-BF16 where the CPU has it, ``build_info()["sampler_bf16"]``, else the same
rounding on the float32 tiles); ``bf16-emulated`` always the latter (for comparisons)."""


_SCHEDULES: dict[tuple[float, ...], torch.Tensor] = {}
"""Checked schedules given as lists of Python floats (the samplers' own), by value: a batch-1 call reuses
its float64 tensor (read-only to the kernel) instead of re-checking and re-building it (~20 us)."""


def _schedule(sigmas: Any) -> torch.Tensor:
    if isinstance(sigmas, list) and (hit := _SCHEDULES.get(tuple(sigmas))) is not None:
        return hit
    dt = getattr(sigmas, "dtype", None)
    if dt is not None and dt not in (torch.float64, np.float64):
        raise ValueError(f"sigmas: expected Python floats or a float64 array (a float64 schedule), got {dt}")
    shape: tuple[int, ...]
    if isinstance(sigmas, list) and all(type(v) is float for v in sigmas):
        vals: list[float] | None = sigmas  # the samplers' own schedules: no tensor round trip (~80 us)
        shape = (len(sigmas),)
    else:
        t = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        vals, shape = (t.tolist() if t.dim() == 1 else None), tuple(t.shape)
    ok = vals is not None and len(vals) >= 2 and all(math.isfinite(v) for v in vals)
    ok = ok and all(v > 0 for v in vals[:-1]) and vals[-1] >= 0
    ok = ok and all(b < a for a, b in zip(vals, vals[1:], strict=False))
    if not ok:
        raise ValueError(
            f"sigmas: expected >= 2 finite, strictly decreasing noise levels > 0 (the last may be 0), "
            f"got {vals if vals is not None and len(vals) <= 8 else shape}"
        )
    out = torch.tensor(vals, dtype=torch.float64)
    if isinstance(sigmas, list) and len(_SCHEDULES) < 64:
        _SCHEDULES[tuple(vals)] = out
    return out


def sample_sets(
    packed: PackedDenoiser,
    cond: Any,
    x_init: Any,
    sigmas: Any,
    *,
    sampler: str = "heun",
    guidance: float = 0.0,
    noise: Any | None = None,
    catalog: Any | None = None,
    candidates: int | None = None,
    group: int = 1,
    metric: str = "ip",
    allowed: Any | None = None,
    check_finite: bool = True,
    num_threads: int | None = None,
    mode: int = 0,
    anchor: Any | None = None,
    anchor_k: int = 1,
    coarse: CoarseCatalog | None = None,
    precision: str = "fp32",
) -> SampledSets:
    """The whole EDM sampling of a batch of sets in one ``_C`` call: every SetDenoiser evaluation (EDM
    preconditioning, classifier-free guidance), every step of ``sampler`` and optionally the grounding,
    equal to ``diffusion.samplers.generate_sets`` given the same initial noise and schedule (contract in
    ``csrc/set_sampler_params.h``, spec in :func:`r4t_fast.reference.sample_sets`). CPU; the GIL is
    released for the whole call, so split very large batches to keep Ctrl-C responsive.

    Args:
        packed: the model's weights, :func:`r4t_fast.kernels.sampler_pack.pack_denoiser` (cached).
        cond: float32 (batch, cond_dim): one condition per set.
        x_init: float32 (batch, rows, dim): the initial noisy rows at ``sigmas[0]`` in the model's centred
            space (``generate_sets`` draws ``randn(batch, rows, dim) * sigmas[0]``); rows = the model's L.
        sigmas: the schedule, a CPU sequence of ``steps + 1`` floats (``samplers.sampler_sigmas``),
            strictly decreasing, > 0 except the last.
        sampler: ``euler`` | ``euler_maruyama`` | ``heun`` | ``dpmpp_2m`` | ``consistency``.
        guidance: classifier-free guidance weight w (0: one forward per evaluation, else two).
        noise: float32 (steps, batch, rows, dim), required by ``euler_maruyama`` and by ``consistency``
            with steps > 1 (:func:`~r4t_fast.kernels.sampler_pack.step_noise` draws it as the eager
            samplers do); must be None for the deterministic samplers.
        catalog: float32 or float16 (N, dim): when given, the rows are grounded as :func:`ground_sets`
            grounds them, each ``group`` consecutive sets jointly (as one set of group * rows rows) with
            ``candidates`` (default group * rows) nearest items per row; ``allowed`` (N,) bool filters it.
        num_threads: CPU threads (default: OpenMP's). ``mode``: 0 auto, 1 one thread per group of sets,
            2 all threads on every set; results are identical in every mode.
        anchor: float32 (batch / group, dim), with a catalog: one extra query per grounded set (the
            Retriever's query-anchored row) whose ``anchor_k`` nearest allowed items are found in the
            same catalog pass as the rows' candidates, equal to ``knn(anchor, catalog, anchor_k)``.
        coarse: optional :func:`coarse_catalog` copy of ``catalog``, for the grounding search (see
            :func:`knn`: an int8 pass with an exact re-score, when that search qualifies).
        precision: the GEMMs' precision, one of :data:`PRECISIONS`: ``"fp32"``, or ``"bf16"`` (the
            forward pass's Linears -- not the noise-level MLP -- on bf16-rounded inputs and weights with
            float32 accumulation; spec: :func:`r4t_fast.reference.sample_sets` with ``precision``).
            The bf16 weights are made once per packing (~5 ms).

    Returns:
        :class:`SampledSets`: ``rows`` float32 (batch, rows, dim) in data space (the model's
        ``cond_offset`` added back); ``ids`` int64 and ``scores`` float32 (batch / group, group * rows)
        of the grounding (sentinel id -1 where too few items qualify), None without a catalog;
        ``anchor_ids`` / ``anchor_scores`` (batch / group, anchor_k) with an anchor, else None.
    """
    if not isinstance(packed, PackedDenoiser):
        got = type(packed).__name__
        raise ArgumentTypeError(f"packed: expected a PackedDenoiser (pack_denoiser(model)), got {got}")
    L, d, cd = packed.dims[0], packed.dims[1], packed.dims[2]
    finite = check_bool(check_finite, "check_finite")
    c, lib = as_tensor(cond, "cond")
    c = check_matrix(c, "cond", ndim=2, dtypes=_F32, shape_doc=f"(batch, {cd})", dim=cd, finite=finite)
    x, _ = as_tensor(x_init, "x_init")
    x = check_matrix(x, "x_init", ndim=3, dtypes=_F32, shape_doc=f"(batch, {L}, {d})", dim=d, finite=finite)
    B = c.shape[0]
    if tuple(x.shape) != (B, L, d):
        raise ValueError(
            f"x_init: expected float32 ({B}, {L}, {d}) (cond's batch, L rows), got {describe(x)}"
        )
    check_same_device(c, "cond", x, "x_init")
    if c.is_cuda:
        raise ValueError("cond: sample_sets has no CUDA kernel yet; pass CPU tensors (or use generate_sets)")
    c = c.contiguous()
    s = _schedule(sigmas)
    steps = s.numel() - 1
    sid = check_choice(sampler, "sampler", SAMPLER_IDS)
    w = check_real(guidance, "guidance")
    needs_noise = sampler == "euler_maruyama" or (sampler == "consistency" and steps > 1)
    z = None
    if noise is not None:
        if sampler not in ("euler_maruyama", "consistency"):
            raise ValueError(f"noise: the {sampler!r} sampler is deterministic and takes no noise; pass None")
        z, _ = as_tensor(noise, "noise")
        if z.dtype != torch.float32 or tuple(z.shape) != (steps, B, L, d) or z.device != c.device:
            raise ValueError(
                f"noise: expected float32 ({steps}, {B}, {L}, {d}) on the CPU, got {describe(z)}"
            )
        z = z.contiguous()
    elif needs_noise:
        want = f"({steps}, {B}, {L}, {d})"
        raise ValueError(f"noise: the {sampler!r} sampler needs noise {want}; see sampler_pack.step_noise")
    if isinstance(mode, bool) or mode not in (0, 1, 2):
        raise ValueError(f"mode: expected 0 (auto), 1 or 2, got {mode!r}")
    group = check_positive_int(group, "group")
    if B % group:
        raise ValueError(f"group: must divide the batch ({B}), got {group}")
    m = _metric(metric)
    prec = check_choice(precision, "precision", PRECISIONS)
    rows = torch.empty((B, L, d), dtype=torch.float32)
    cat_args: tuple = (0, 0, 0, 0)
    mask_ptr, cand, ids, scores, co = 0, 0, None, None, (0, 0, 0.0)
    if catalog is not None:
        cat = _catalog(catalog, d, finite)
        check_same_device(c, "cond", cat, "catalog")
        mask = _allowed(allowed, cat)
        mask_ptr = 0 if mask is None else mask.data_ptr()
        cand = 0 if candidates is None else check_positive_int(candidates, "candidates")
        cat_args = (cat.data_ptr(), cat.stride(0), 1 if cat.dtype == torch.float16 else 0, cat.shape[0])
        co = _coarse(coarse, cat)
        ids = torch.empty((B // group, group * L), dtype=torch.int64)
        scores = torch.empty((B // group, group * L), dtype=torch.float32)
    elif allowed is not None or candidates is not None or anchor is not None or coarse is not None:
        raise ValueError("allowed/candidates/anchor/coarse: only apply to the grounding; pass a catalog")
    a, a_ids, a_scores, ka = None, None, None, 0
    if anchor is not None:
        a, _ = as_tensor(anchor, "anchor")
        want = f"({B // group}, {d})"
        a = check_matrix(a, "anchor", ndim=2, dtypes=_F32, shape_doc=want, dim=d, finite=finite)
        if a.shape[0] != B // group or a.device != c.device:
            raise ValueError(f"anchor: expected float32 {want} (one per group of sets), got {describe(a)}")
        a = a.contiguous()
        ka = _check_k(check_positive_int(anchor_k, "anchor_k"), B // group, cat.shape[0])
        a_ids = torch.empty((B // group, ka), dtype=torch.int64)
        a_scores = torch.empty((B // group, ka), dtype=torch.float32)
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    _backend.lib().sample_sets_cpu(
        packed.dims, packed.buffer.data_ptr(), packed.buffer.numel(), packed.sigma_data, packed.sigma_min,
        packed.cond_offset, c.data_ptr(), x.data_ptr(), s.data_ptr(), s.numel(), sid, w, ptr(z), B,
        rows.data_ptr(), *cat_args, m, mask_ptr, group, cand, ptr(ids), ptr(scores), _threads(num_threads),
        mode, ptr(a), ka, ptr(a_ids), ptr(a_scores), *co, packed.uid, prec,
    )  # fmt: skip
    if ids is None:
        return SampledSets(to_library(rows, lib), None, None)
    extra = () if a is None else (to_library(a_ids, lib), to_library(a_scores, lib))
    return SampledSets(to_library(rows, lib), to_library(ids, lib), to_library(scores, lib), *extra)


def sampler_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, precision: str = "fp32"
) -> torch.Tensor:
    """``x @ weight.T + bias`` through the fused sampler's GEMM (one clone's tiles, one thread) at
    ``precision`` (:data:`PRECISIONS`): the GEMM's own test hook, compared with
    ``reference.linear(precision=...)``. float32 CPU tensors x (M, K), weight (N, K), bias (N,)."""
    x = check_matrix(as_tensor(x, "x")[0], "x", ndim=2, dtypes=_F32, shape_doc="(M, K)").contiguous()
    K = x.shape[1]
    w = check_matrix(
        as_tensor(weight, "weight")[0], "weight", ndim=2, dtypes=_F32, shape_doc=f"(N, {K})", dim=K
    )
    w = w.contiguous()
    b = as_tensor(bias, "bias")[0]
    if b.dtype != torch.float32 or tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"bias: expected float32 ({w.shape[0]},), got {describe(b)}")
    b = b.contiguous()
    if x.is_cuda or w.is_cuda or b.is_cuda:
        raise ValueError("x: sampler_linear runs on the CPU")
    prec = check_choice(precision, "precision", PRECISIONS)
    y = torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32)
    _backend.lib().sampler_linear_cpu(
        x.data_ptr(), x.shape[0], K, w.data_ptr(), w.shape[0], b.data_ptr(), y.data_ptr(), prec
    )
    return y
