"""The one place that imports the compiled module ``r4t_fast._C``.

``build_info()`` reports what the build contains; ``cuda_available()`` says whether CUDA kernels can
run *now* (CUDA build and a visible GPU). Neither is evaluated at import time.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType
from typing import Any


class BuildError(ImportError):
    """Raised when the compiled extension is missing or lacks a requested feature."""


@functools.lru_cache(maxsize=1)
def lib() -> ModuleType:
    """Return the compiled module, with an actionable error if it was not built."""
    try:
        from r4t_fast import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        raise BuildError(
            "r4t_fast._C (the compiled kernels) could not be imported: install the package with "
            "`pip install .` (or `pip install -e .` for development) so the extension is built. "
            f"Original error: {exc}"
        ) from exc
    return _C


def build_info() -> dict[str, Any]:
    """What this build contains.

    Returns a dict with keys ``version``, ``cuda`` (bool: CUDA kernels compiled in), ``cuda_archs``
    (list of SM numbers), ``cuda_runtime`` (str or None), ``openmp`` (bool), ``openmp_threads``,
    ``simd`` (the instruction-set clone the CPU kernels dispatch to on this machine, e.g.
    ``"x86-64-v4 (AVX-512F/BW/DQ/VL, FMA, F16C)"``), ``simd_clones`` (every clone compiled in, best
    first; ``R4T_SIMD=<name>`` in the environment picks one) and ``compiler``. Does not query any GPU.
    """
    info = dict(lib().build_info())
    info["cuda_archs"] = [int(a) for a in info.get("cuda_archs", "").split(",") if a]
    return info


@contextlib.contextmanager
def simd(name: str) -> Iterator[None]:
    """Run the CPU kernels with the SIMD clone ``name`` (``"x86-64-v4"``, ``"x86-64-v3"``,
    ``"baseline"``) inside the ``with`` block, then return to automatic dispatch. For tests and
    benchmarks; process-wide (affects other threads too). Raises ValueError for a clone this CPU or
    build lacks."""
    lib().set_cpu_simd(name)
    try:
        yield
    finally:
        lib().set_cpu_simd("auto")


def peak_flops(num_threads: int = 0, seconds: float = 0.3) -> float:
    """Measured peak FLOP/s of the active SIMD clone: ``num_threads`` threads (0 = OpenMP's default)
    each run 24 independent vector FMA chains for about ``seconds`` of their own CPU time; the result is
    the sum of the per-thread rates (per-thread CPU clocks, so time-slicing on a shared machine does not
    lower it). Two FLOP per FMA lane: the compute floor of a kernel is its FLOP count over this."""
    return float(lib().cpu_peak_flops(int(num_threads), float(seconds)))


def cuda_available() -> bool:
    """True when the build has CUDA kernels *and* a CUDA device is visible (queried on first call)."""
    info = build_info()
    if not info["cuda"]:
        return False
    return lib().cuda_device_count() > 0


def require_cuda(arg: str) -> None:
    """Raise a clear error when a CUDA tensor reaches a build without CUDA kernels."""
    if not build_info()["cuda"]:
        raise BuildError(
            f"{arg}: got a CUDA array but this r4t_fast build has no CUDA kernels "
            "(rebuild with R4T_CUDA=ON and nvcc available, or move the inputs to the CPU)"
        )


def check_device(device: Any, name: str = "device", *, kernels: bool = True) -> Any:
    """``device`` as a ``torch.device`` this machine and build can run: ``"cpu"`` or ``"cuda[:N]"``.

    ``kernels``: the caller runs r4t_fast's compiled kernels there (a retriever), so a CUDA device
    also needs a build with CUDA kernels; plain torch work (training) only needs torch's CUDA. The
    error names ``name``, the device and what :func:`r4t_fast.build_info` reports.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is not None and dev.type == "cpu":
        return dev
    info = build_info()
    built = f"build_info(): cuda={info['cuda']}, cuda_archs={info['cuda_archs']}"
    if dev is None or dev.type != "cuda":
        raise ValueError(f"{name}: r4t_fast runs on 'cpu' or 'cuda[:N]', got {device!r} ({built})")
    if kernels and not info["cuda"]:
        raise ValueError(
            f"{name}: {device!r} needs CUDA kernels, but this r4t_fast build has none ({built}; rebuild "
            "with R4T_CUDA=ON where nvcc is available), or use device='cpu'"
        )
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0 or (dev.index or 0) >= n:
        raise ValueError(
            f"{name}: {device!r} is not available: torch sees {n} CUDA device(s) "
            f"(torch.version.cuda={torch.version.cuda}; {built}); use device='cpu'"
        )
    return dev
