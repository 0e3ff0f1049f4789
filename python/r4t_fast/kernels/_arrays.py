"""Array interchange and input validation shared by the public ops.

Accepts torch tensors, numpy arrays and (on GPU) cupy arrays, viewing them as torch tensors without a
copy (numpy via ``torch.from_numpy``, cupy via DLPack). numpy views that torch cannot view (negative
strides, non-native byte order, misaligned or read-only buffers) are copied once, which never changes a
value. Outputs are converted back to the library of the primary input.

Every check raises an exception naming the argument, the rule and what it got. Wrong *types* raise
:class:`ArgumentTypeError`, which is both a ``ValueError`` and a ``TypeError`` (as numpy's ``AxisError``
is both a ``ValueError`` and an ``IndexError``), so callers may catch either.
"""

from __future__ import annotations

import math
import numbers
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
    torch.uint8: "uint8",
    torch.bool: "bool",
}

# Largest accepted num_threads (OpenMP aborts the process when it cannot create the threads asked for).
MAX_THREADS = 1024


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (also a ``ValueError``: every bad argument is one)."""


def dtype_name(dt: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dt, str(dt).replace("torch.", ""))


def _type_name(x: Any) -> str:
    mod = type(x).__module__
    return type(x).__name__ if mod == "builtins" else f"{mod}.{type(x).__name__}"


def _numpy_viewable(x: np.ndarray) -> np.ndarray:
    """Return ``x`` or a value-identical copy that ``torch.from_numpy`` accepts (and never warns on)."""
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))  # e.g. big-endian input: same values, native order
    if any(s < 0 for s in x.strides) or not x.flags.aligned or not x.flags.writeable:
        x = np.array(x, copy=True, order="C")  # negative strides (x[::-1]), misaligned or read-only
    return x


def as_tensor(x: Any, name: str) -> tuple[torch.Tensor, str]:
    """View ``x`` as a torch tensor (copying only numpy layouts torch cannot view). Returns (tensor,
    library) with library one of ``"torch"``, ``"numpy"``, ``"cupy"``."""
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided:
            raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {x.layout}")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: expected a CPU or CUDA tensor, got one on {x.device}")
        if x.is_neg() or x.is_conj():
            x = x.resolve_neg().resolve_conj()
        return x, "torch"
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise ArgumentTypeError(f"{name}: unsupported numpy dtype {x.dtype} (expected a numeric array)")
        x = _numpy_viewable(x)
        try:
            return torch.from_numpy(x), "numpy"
        except (TypeError, ValueError) as exc:
            raise ArgumentTypeError(f"{name}: unsupported numpy array (dtype {x.dtype}): {exc}") from exc
    mod = type(x).__module__.split(".")[0]
    if mod == "cupy" and hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x), "cupy"
    raise ArgumentTypeError(
        f"{name}: expected a torch.Tensor, numpy.ndarray or cupy.ndarray, got {_type_name(x)}"
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
    if t.data_ptr() % t.element_size() != 0:
        t = t.clone()  # misaligned storage (torch.frombuffer at an odd offset): kernels load whole elements
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


def _is_bool(v: Any) -> bool:
    return isinstance(v, (bool, np.bool_))


def check_positive_int(v: Any, name: str, *, maximum: int | None = None) -> int:
    """A positive int: Python ``int`` or numpy integer; ``bool``, floats, strings and tensors are refused."""
    if _is_bool(v) or not isinstance(v, (int, np.integer)):
        raise ArgumentTypeError(f"{name}: expected a positive int, got {v!r} ({_type_name(v)})")
    if int(v) <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if maximum is not None and int(v) > maximum:
        raise ValueError(f"{name}: expected a positive int <= {maximum}, got {v!r}")
    return int(v)


def check_real(v: Any, name: str, *, positive: bool = False) -> float:
    """A finite real number: ``int``, ``float``, a numpy number or a 0-d real tensor (as iterating a
    tensor schedule yields); ``bool``, strings, complex numbers and other tensors are refused (a string
    that looks like a number is still a string)."""
    if (
        isinstance(v, torch.Tensor)
        and v.dim() == 0
        and (v.is_floating_point() or (v.dtype != torch.bool and not v.is_complex()))
    ):
        v = v.item()
    if _is_bool(v) or not isinstance(v, numbers.Real):
        raise ArgumentTypeError(f"{name}: expected a real number (int or float), got {v!r} ({_type_name(v)})")
    f = float(v)
    if not np.isfinite(f):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if positive and not f > 0:
        raise ValueError(f"{name}: expected > 0, got {v!r}")
    return f


def check_bool(v: Any, name: str) -> bool:
    """``True``/``False`` (or a numpy bool); ints and strings are refused."""
    if not _is_bool(v):
        raise ArgumentTypeError(f"{name}: expected a bool, got {v!r} ({_type_name(v)})")
    return bool(v)


def check_choice(v: Any, name: str, choices: dict[str, int]) -> int:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices)}, got {v!r}")
    return choices[v]


def check_same_device(a: torch.Tensor, an: str, b: torch.Tensor, bn: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{an} and {bn}: must be on the same device, got {a.device} and {b.device}")


def check_mask(m: Any, name: str, n: int, like: torch.Tensor) -> torch.Tensor:
    """A (n,) bool mask (torch or numpy) on ``like``'s device, returned contiguous (as bytes 0/1)."""
    t, _ = as_tensor(m, name)
    if t.dtype != torch.bool or t.dim() != 1 or t.shape[0] != n:
        raise ValueError(
            f"{name}: expected a bool mask ({n},) (one entry per catalog row), got {describe(t)}"
        )
    check_same_device(t, name, like, "catalog")
    return t.contiguous()


def memory_range(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) byte addresses spanned by a contiguous tensor."""
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def cuda_stream_ptr(t: torch.Tensor) -> int:
    """Raw pointer of the caller's current CUDA stream on ``t``'s device."""
    return int(torch.cuda.current_stream(t.device).cuda_stream)


def all_finite(x: Any) -> bool:
    """Whether every element of a torch tensor is finite: one reduction (a NaN or an infinity makes the
    sum non-finite), and the exact per-element test only when the sum is not finite (it can overflow
    for finite elements). 3-5x cheaper than ``torch.isfinite(x).all()`` on batch-1 sizes."""
    if x.numel() == 0 or math.isfinite(float(torch.sum(x))):
        return True
    return bool(torch.isfinite(x).all())
