"""Array interchange and input validation shared by the public ops.

Accepts torch tensors, numpy arrays and (on GPU) cupy arrays, viewing them as torch tensors without a
copy (numpy via ``torch.from_numpy``, cupy via DLPack). Outputs are converted back to the library of
the primary input. Every check raises ``ValueError``/``TypeError`` naming the argument, the rule and what
it got.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
}


def dtype_name(dt: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dt, str(dt).replace("torch.", ""))


def as_tensor(x: Any, name: str) -> tuple[torch.Tensor, str]:
    """View ``x`` as a torch tensor without copying. Returns (tensor, library) with library one of
    ``"torch"``, ``"numpy"``, ``"cupy"``."""
    if isinstance(x, torch.Tensor):
        return x, "torch"
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:  # torch.from_numpy warns on read-only arrays; we never write inputs
            x = np.array(x, copy=True)
        try:
            return torch.from_numpy(x), "numpy"
        except TypeError as exc:
            raise TypeError(f"{name}: unsupported numpy dtype {x.dtype}") from exc
    mod = type(x).__module__.split(".")[0]
    if mod == "cupy" and hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x), "cupy"
    raise TypeError(
        f"{name}: expected a torch.Tensor, numpy.ndarray or cupy.ndarray, got {type(x).__module__}."
        f"{type(x).__name__}"
    )


def to_library(t: torch.Tensor, library: str) -> Any:
    """Convert an output tensor to the caller's array library (zero-copy where possible)."""
    if library == "torch":
        return t
    if library == "numpy":
        return t.cpu().numpy()
    if library == "cupy":
        import cupy  # noqa: PLC0415 - only reached when the caller passed cupy arrays

        return cupy.from_dlpack(t)
    raise AssertionError(library)


def describe(t: torch.Tensor) -> str:
    return f"{dtype_name(t.dtype)} {tuple(t.shape)} on {t.device}"


def check_matrix(
    t: torch.Tensor,
    name: str,
    *,
    ndim: int,
    dtypes: tuple[torch.dtype, ...],
    shape_doc: str,
    dim: int | None = None,
    finite: bool = True,
) -> torch.Tensor:
    """Validate rank, dtype, feature dim and finiteness; return a view with unit stride on the last axis
    (copying only when the input's last axis is strided)."""
    want = " or ".join(dtype_name(d) for d in dtypes)
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {want} {shape_doc}, got {describe(t)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: expected {want} {shape_doc}, got {describe(t)} (convert explicitly)")
    if dim is not None and t.shape[-1] != dim:
        raise ValueError(f"{name}: expected last dimension {dim} {shape_doc}, got {describe(t)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name}: feature dimension is 0, got {describe(t)}")
    if finite:
        check_finite(t, name)
    if t.stride(-1) != 1 or any(s < 0 for s in t.stride()):
        t = t.contiguous()
    if ndim > 2:
        t = t.contiguous()  # row-major (S, L, d) layout expected by the set kernels
    return t


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise if ``t`` holds NaN or inf. A single fast reduction first (NaN/inf propagate through a sum);
    only when that sum is not finite (or overflowed) is the exact element-wise test run."""
    if t.numel() == 0 or not t.is_floating_point():
        return
    if bool(torch.isfinite(t.sum())):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{name}: contains {bad} non-finite value(s) (NaN or inf)")


def check_positive_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return int(v)


def check_same_device(a: torch.Tensor, an: str, b: torch.Tensor, bn: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{an} and {bn}: must be on the same device, got {a.device} and {b.device}")


def cuda_stream_ptr(t: torch.Tensor) -> int:
    """Raw pointer of the caller's current CUDA stream on ``t``'s device."""
    return int(torch.cuda.current_stream(t.device).cuda_stream)
