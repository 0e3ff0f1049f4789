"""Shared rules with one home: argument checks, atomic file/directory writes, row normalisation, the
cache root and the machine description recorded next to every number.

Internal: every room of the package imports from here (it imports nothing of r4t_fast), users should
not. Each check raises ``ValueError`` naming the argument, the rule and what it got.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "MAX_K",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_choice",
    "check_float",
    "check_k",
    "check_non_negative_int",
    "check_positive_int",
    "check_seed",
    "cpu_model",
    "default_cache_dir",
    "machine_description",
    "package_versions",
    "publish_dir",
    "sha256_file",
    "unit_rows",
]

MAX_K = 64
"""Most subqueries / rows per set anywhere in the package (prompt, parser, rewards, baselines)."""

A = TypeVar("A")


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def check_positive_int(value: Any, name: str, upper: int | None = None) -> int:
    """``value`` as an int in ``[1, upper]``; bools, floats and strings are refused, numpy ints accepted."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name}: expected an int in [1, {upper}], got {value!r}")
    return int(value)


def check_non_negative_int(value: Any, name: str) -> int:
    """``value`` as an int ``>= 0`` (same type rules as ``check_positive_int``)."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return int(value)


def check_k(k: Any, name: str = "k", upper: int = MAX_K) -> int:
    """The set size ``k``: an int in ``[1, upper]`` (default ``MAX_K``)."""
    if not _is_int(k) or not 1 <= k <= upper:
        raise ValueError(f"{name}: expected an int in [1, {upper}], got {k!r}")
    return int(k)


def check_seed(value: Any, name: str = "seed") -> int:
    """A random seed: any int (numpy ints accepted, bools refused)."""
    if not _is_int(value):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    return int(value)


def check_float(
    value: Any, name: str, *, low: float | None = None, high: float | None = None, finite: bool = True
) -> float:
    """``value`` as a float in ``[low, high]`` (either bound optional); bools and strings are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    v = float(value)
    if finite and not np.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if (low is not None and v < low) or (high is not None and v > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name}: expected a number in [{lo}, {hi}], got {value!r}")
    return v


def check_choice(value: Any, choices: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``choices``; the error lists the valid choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------------
def unit_rows(x: A) -> A:
    """L2-normalise the last axis of a torch tensor or numpy array; all-zero rows stay zero.

    The one normalisation rule of the package (also the ``set_stats`` kernel's convention). Callers that
    must refuse zero rows (a catalog) check for them before calling.
    """
    if isinstance(x, np.ndarray):
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        return x / np.where(norm > 0, norm, np.ones_like(norm))  # type: ignore[return-value]
    import torch

    if isinstance(x, torch.Tensor):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return x / torch.where(norm > 0, norm, torch.ones_like(norm))  # type: ignore[return-value]
    raise ValueError(f"x: expected a torch tensor or numpy array, got {type(x).__name__}")


# ----------------------------------------------------------------------------------------------------
# atomic IO
# ----------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Replace file ``path`` atomically: ``write(tmp)`` fills a temporary sibling, which is fsynced and
    renamed onto ``path`` (same directory, so the rename is atomic). On any error the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """``atomic_write`` of a bytes payload."""
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """``atomic_write`` of UTF-8 text."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def publish_dir(
    target: str | os.PathLike[str],
    write: Callable[[Path], None],
    is_complete: Callable[[Path], bool] | None = None,
) -> Path:
    """Create or replace directory ``target``: ``write(tmp)`` fills a temporary sibling, which is renamed.

    An interrupted writer never leaves a half-written ``target``. If ``target`` already exists it is kept
    when ``is_complete(target)`` is true (a concurrent writer won the race) and otherwise replaced: moved
    aside to a ``.old`` sibling, the new one renamed in, the old one removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a saved dir should be readable like any
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # target exists and is not empty
            if is_complete is not None and is_complete(target):
                return target
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------
# cache and environment
# ----------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Root of r4t_fast's cache: ``$R4T_CACHE_DIR`` if set, else ``~/.cache/r4t_fast``."""
    env = os.environ.get("R4T_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "r4t_fast"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``, else ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description() -> dict[str, Any]:
    """What ran a measurement: CPU model, cores, threads, memory, GPU, platform, load average."""
    import torch

    machine: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
    }
    try:
        machine["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        pass
    machine["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        machine["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    return machine


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    """``{"python": ..., pkg: version or "not installed"}`` for each distribution in ``packages``."""
    out = {"python": sys.version.split()[0]}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
