"""The one home of r4t_fast's CPU thread rule: share the cores with whatever else runs.

Two OpenMP teams spinning on the same cores do not share them, they collapse (measured on a 2-core
machine: a second 2-thread torch job slowed ``r4t train-diffusion`` from 15-34 steps/s to ~0.5 and the
MiniLM encoder from ~630 to ~39 items/s). The rule, applied by every entry point (``r4t`` via
:func:`r4t_fast.cli.main`, the benchmarks) *before* torch starts its thread pool:

- ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning on a core another process
  needs (read once, when the OpenMP runtime loads: it must be set before ``import torch``);
- threads = the CPUs this process may run on (``os.sched_getaffinity``; a ``torchrun`` rank: its share):
  with passive waits the kernel's scheduler shares the cores between our threads and another job's, so
  the threads are not cut to the CPUs left free (that gave a 2-thread job beside ours 2 of 3 runnable
  threads: the MiniLM encoder kept 37-43 % of its alone speed with 1 thread against 41-47 % with 2, same
  runs, ``benchmarks/results/contention_cpu.md``); exported as ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``
  for runtimes loaded later and set in torch when it is loaded. What other processes keep busy
  (:func:`busy_cpus`) is recorded, not acted on.

- numpy's BLAS on the calling thread (:func:`limit_blas`): OpenBLAS keeps its own pthread pool that
  busy-waits after every call, so beside the OpenMP team each takes the cores from the other (measured
  in one process on the 2-core machine: MMR at batch 1 8.0 -> 2.1 ms, DPP 8.0 -> 1.2 ms, an R4T call right
  after DPP's products 5.4 -> 1.6 ms). numpy's products here are small (MMR / DPP pools, metrics).

What the user set always wins: an explicit ``--threads N`` (``configure(N)``), or ``OMP_NUM_THREADS`` /
``OMP_WAIT_POLICY`` / ``OPENBLAS_NUM_THREADS`` in the environment. ``R4T_THREADS=auto|N`` overrides the
default of every entry point.
This module imports nothing heavy (no torch at import time).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

ENV_THREADS = "R4T_THREADS"
"""``auto`` (the default) or a positive int: the thread count every entry point uses by default."""

_DECIDED: dict[str, Any] = {}


def available_cpus() -> int:
    """CPUs this process may run on: ``len(os.sched_getaffinity(0))`` (a container's or ``taskset``'s
    limit), else ``os.cpu_count()``, at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        n = os.cpu_count() or 1
    return max(1, n)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``; None where it cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    vals = [int(v) for v in fields[1:8]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals) - idle, sum(vals)


def busy_cpus(sample_s: float = 0.1) -> tuple[float, str]:
    """How many CPUs other processes keep busy now, and where the figure comes from.

    Linux: the busy share of ``/proc/stat`` over ``sample_s`` seconds (this process sleeps meanwhile, so
    the figure is everybody else's) times the machine's CPU count. Elsewhere, or when ``/proc/stat`` is
    unreadable: the 1-minute load average (``os.getloadavg``), which lags a change by about a minute.
    """
    a = _cpu_times()
    if a is not None and sample_s > 0:
        time.sleep(sample_s)
        b = _cpu_times()
        if b is not None and b[1] > a[1]:
            share = (b[0] - a[0]) / (b[1] - a[1])
            return max(0.0, share * (os.cpu_count() or 1)), "proc_stat"
    try:
        return max(0.0, os.getloadavg()[0]), "loadavg_1m"
    except (AttributeError, OSError):  # pragma: no cover
        return 0.0, "none"


def _env_threads() -> int | None:
    """``R4T_THREADS`` as an int (None for unset / ``auto``); raises ValueError naming the variable."""
    raw = os.environ.get(ENV_THREADS, "").strip().lower()
    if raw in ("", "auto", "0"):
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV_THREADS}: expected 'auto' or a positive int, got {os.environ[ENV_THREADS]!r}")
    return n


def _local_world() -> int:
    """Processes of this run on this machine (``LOCAL_WORLD_SIZE``, set by torchrun / accelerate)."""
    raw = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def _omp_env_threads() -> int | None:
    raw = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def limit_blas() -> str:
    """Run numpy's BLAS on the calling thread (module docstring), unless the user set
    ``OPENBLAS_NUM_THREADS``: before numpy is loaded through ``OPENBLAS_NUM_THREADS=1`` (read when
    OpenBLAS loads), after through ``threadpoolctl``. Returns how: ``"env"``, ``"threadpoolctl"`` or
    ``"user"`` (left as the user set it)."""
    if "OPENBLAS_NUM_THREADS" in os.environ and "OPENBLAS_NUM_THREADS" not in _DECIDED.get("exported", ()):
        return "user"
    if "numpy" not in sys.modules:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        return "env"
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    return "threadpoolctl"


def configure(threads: int | None = None) -> dict[str, Any]:
    """Apply the thread rule (module docstring) to this process; returns what was decided.

    ``threads``: an explicit count (``--threads N``) that wins over everything; None chooses: the
    ``R4T_THREADS`` variable, else ``OMP_NUM_THREADS`` when the user set it, else the available CPUs.
    Sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy, exports the count as
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` when they are unset, runs numpy's BLAS on the calling thread
    (:func:`limit_blas`) and calls ``torch.set_num_threads`` when torch is already imported. Safe to call
    again (a later ``--threads`` overrides the first decision). The returned dict (``threads``,
    ``source``, ``cpus``, ``busy_cpus``, ``busy_from``, ``wait_policy``, ``blas``) is what benchmarks
    record.
    """
    cpus = max(1, available_cpus() // _local_world())
    busy, busy_from = None, None
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected a positive int, got {threads!r}")
        n, source = threads, "argument"
    elif _env_threads() is not None:
        n, source = _env_threads(), ENV_THREADS
    elif _omp_env_threads() is not None and "OMP_NUM_THREADS" not in _DECIDED.get("exported", ()):
        n, source = _omp_env_threads(), "OMP_NUM_THREADS"
    else:
        busy, busy_from = busy_cpus()  # recorded for the benchmarks, not acted on (module docstring)
        n, source = cpus, "auto"
    exported = list(_DECIDED.get("exported", ()))
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        exported.append("OMP_WAIT_POLICY")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if var not in os.environ or var in exported:
            os.environ[var] = str(n)
            if var not in exported:
                exported.append(var)
    blas = limit_blas()
    if blas == "env":
        exported.append("OPENBLAS_NUM_THREADS")
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)
    _DECIDED.clear()
    _DECIDED.update(
        threads=n,
        source=source,
        cpus=cpus,
        busy_cpus=None if busy is None else round(busy, 2),
        busy_from=busy_from,
        wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        blas=blas,
        exported=exported,
    )
    return decided()


def decided() -> dict[str, Any]:
    """What the last :func:`configure` decided (``{}`` when it was never called), without ``exported``."""
    return {k: v for k, v in _DECIDED.items() if k != "exported"}


def resolve(threads: int | None) -> int:
    """The thread count of a ``--threads`` option: ``threads`` when given (and applied), else the count
    :func:`configure` chose (configuring now if no entry point did)."""
    if threads is not None and threads != 0:
        return configure(int(threads))["threads"]
    if not _DECIDED:
        configure()
    return int(_DECIDED["threads"])
