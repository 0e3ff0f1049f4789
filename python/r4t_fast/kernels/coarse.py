"""The knn kernel's int8 coarse copy of a catalog (the ``coarse`` argument of :func:`r4t_fast.ops.knn`
and :func:`r4t_fast.ops.sample_sets`): building it, checking it, and whether this CPU uses it
(csrc/cpu/knn_coarse.cpp: an int8 pass with AVX-512 VNNI, then an exact re-score)."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch

from r4t_fast.kernels import _backend
from r4t_fast.kernels._arrays import as_tensor, check_bool, check_matrix, describe

_CAT = (torch.float32, torch.float16)


@functools.cache
def coarse_supported() -> bool:
    """Whether this build and CPU run the knn kernel's int8 coarse path (AVX-512 VNNI)."""
    return bool(_backend.lib().build_info().get("knn_int8", False))


class CoarseCatalog(NamedTuple):
    """An int8 copy of a catalog for the ``coarse`` argument of :func:`r4t_fast.ops.knn` and
    :func:`r4t_fast.ops.sample_sets` (:func:`coarse_catalog`): ``codes`` uint8 (N, d rounded up to a
    multiple of 4) = round(c / scale) + 128 (padding 128 = 0), contiguous on the CPU; ``scale`` =
    max |c| / 127."""

    codes: torch.Tensor
    scale: float


def coarse_catalog(catalog: Any, *, check_finite: bool = True) -> CoarseCatalog:
    """The int8 copy of a float32 / float16 (N, d) CPU catalog that :func:`r4t_fast.ops.knn`'s ``coarse``
    takes: a quarter of an fp32 catalog's memory. Build it once per catalog and keep it with it."""
    c, _ = as_tensor(catalog, "catalog")
    finite = check_bool(check_finite, "check_finite")
    c = check_matrix(c, "catalog", ndim=2, dtypes=_CAT, shape_doc="(N, d)", finite=finite)
    if c.is_cuda:
        raise ValueError(f"catalog: the coarse copy is for CPU searches, got {describe(c)}")
    N, d = c.shape
    top = float(c.abs().max()) if N else 0.0
    scale = top / 127.0 if top > 0 else 1.0
    codes = torch.full((N, -(-d // 4) * 4), 128, dtype=torch.uint8)
    codes[:, :d] = (torch.round(c.float() / scale).clamp_(-127, 127) + 128).to(torch.uint8)
    return CoarseCatalog(codes, scale)


def _coarse(coarse: Any | None, c: torch.Tensor) -> tuple[int, int, float]:
    """(pointer, row stride in bytes, scale) of a validated :func:`coarse_catalog` copy of ``c``, or zeros."""
    if coarse is None:
        return 0, 0, 0.0
    N, d = c.shape
    want = f"a CoarseCatalog of uint8 ({N}, {-(-d // 4) * 4}) codes on the CPU (ops.coarse_catalog(catalog))"
    codes = getattr(coarse, "codes", None)
    scale = getattr(coarse, "scale", None)
    if (
        not isinstance(codes, torch.Tensor)
        or codes.dtype != torch.uint8
        or tuple(codes.shape) != (N, -(-d // 4) * 4)
        or codes.is_cuda
        or not codes.is_contiguous()
        or not isinstance(scale, float)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        got = describe(codes) if isinstance(codes, torch.Tensor) else type(coarse).__name__
        raise ValueError(f"coarse: expected {want}, got {got}")
    if c.is_cuda:
        raise ValueError("coarse: only CPU searches take an int8 copy; pass None with CUDA tensors")
    return codes.data_ptr(), codes.stride(0), scale
